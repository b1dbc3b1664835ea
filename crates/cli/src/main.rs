//! `inspector`: the Safety Inspector command line. Parsing and wiring only; the work is done by
//! the library crates.

mod active_cmd;
mod adapter_cmd;
mod bundled;
mod chat_cmd;
mod dataset_cmd;
mod db_cmd;
mod detect_cmd;
mod eval_cmd;
mod model_args;
mod model_cmd;
mod output;
mod pretrain_cmd;
mod rules_cmd;
mod serve_cmd;
mod synth_cmd;
mod train_cmd;
mod watch_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Safety Inspector: turn a factory's safety regulations and annotated photos into a
/// vision-language model that inspects new photos.
#[derive(Debug, Parser)]
#[command(name = "inspector", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Regulation documents → clause-level rules in the database.
    #[command(subcommand)]
    Rules(rules_cmd::RulesCommand),
    /// Annotated images → validated training samples.
    #[command(subcommand)]
    Dataset(dataset_cmd::DatasetCommand),
    /// Chat with a Qwen2-VL model about images.
    Chat(chat_cmd::ChatArgs),
    /// Inspect and run a Qwen2-VL checkpoint (a Hugging Face model directory).
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Fine-tune a model with LoRA on annotated photos.
    Train(Box<train_cmd::TrainArgs>),
    /// Pretrain a new model's vision tower on annotated photos' boxes (before `train --full`).
    PretrainVision(Box<pretrain_cmd::PretrainArgs>),
    /// Inspect photos: violations, the rules they break, risk, fix and where.
    Detect(Box<detect_cmd::DetectArgs>),
    /// Score predictions (or a model) against gold annotations.
    Eval(Box<eval_cmd::EvalArgs>),
    /// Rank unlabelled photos by the model's uncertainty (what to annotate next).
    Active(Box<active_cmd::ActiveArgs>),
    /// Procedural factory scenes with hazards and their annotations (demo and test data).
    Synth(synth_cmd::SynthArgs),
    /// LoRA adapters: merge into a base model.
    #[command(subcommand)]
    Adapter(adapter_cmd::AdapterCommand),
    /// The HTTP service: inspection API, web page, tutorial-compatible and OpenAI-compatible
    /// endpoints, metrics.
    Serve(Box<serve_cmd::ServeArgs>),
    /// API keys of the HTTP service.
    #[command(subcommand)]
    Keys(serve_cmd::KeysCommand),
    /// The database: move an installation into another one (SQLite → PostgreSQL).
    #[command(subcommand)]
    Db(db_cmd::DbCommand),
    /// Watch camera sources: inspect a frame every few seconds and raise an alert event when a
    /// rule is broken in K of the last M frames.
    Watch(Box<watch_cmd::WatchArgs>),
}

/// Logs to stderr, filtered by `INSPECTOR_LOG` (default: warnings, and the server's access
/// log); colours only on a terminal.
fn init_logging(format: serve_cmd::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("INSPECTOR_LOG")
        .unwrap_or_else(|_| "warn,access=info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        serve_cmd::LogFormat::Text => builder.init(),
        serve_cmd::LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(match &cli.command {
        Command::Serve(args) => args.log_format,
        _ => serve_cmd::LogFormat::Text,
    });
    // Training frees and reallocates same-sized tensors every step, and a batch job's forward
    // passes free and reallocate same-sized activations every layer: keeping freed memory saves
    // page faults there (5-10 % of a Qwen2-VL-2B prefill on the CPU went to faulting in and
    // zeroing fresh pages; the demo's detect keeps its 92 MB peak). Long-running processes
    // (serve, watch) keep their low resident memory instead (the server's grew from 59 MiB to
    // 933 MiB under load with it), so only these commands ask for it, before any thread starts.
    if matches!(
        cli.command,
        Command::Train(_)
            | Command::PretrainVision(_)
            | Command::Chat(_)
            | Command::Detect(_)
            | Command::Eval(_)
            | Command::Active(_)
    ) {
        inspector_train::keep_freed_memory();
    }
    // The device (and dtype and quantization) comes first: one that cannot be had is the first
    // error, before any input is read.
    let model_args = match &cli.command {
        Command::Chat(a) => Some(&a.model),
        Command::Detect(a) => Some(&a.model),
        Command::Eval(a) => Some(&a.model),
        Command::Active(a) => Some(&a.model),
        Command::Serve(a) => Some(&a.model),
        Command::Watch(a) => Some(&a.model),
        Command::Dataset(cmd) => cmd.model_args(),
        _ => None,
    };
    if let Some(Err(e)) = model_args.map(model_args::ModelArgs::backend) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Rules(cmd) => rules_cmd::run(cmd),
        Command::Model(cmd) => model_cmd::run(cmd),
        Command::Chat(args) => chat_cmd::run(args),
        Command::Dataset(cmd) => dataset_cmd::run(cmd),
        Command::Train(args) => train_cmd::run(*args),
        Command::PretrainVision(args) => pretrain_cmd::run(*args),
        Command::Adapter(cmd) => adapter_cmd::run(cmd),
        Command::Detect(args) => detect_cmd::run(*args),
        Command::Eval(args) => eval_cmd::run(*args),
        Command::Active(args) => active_cmd::run(*args),
        Command::Synth(args) => synth_cmd::run(args),
        Command::Serve(args) => serve_cmd::serve(*args),
        Command::Keys(cmd) => serve_cmd::keys(cmd),
        Command::Db(cmd) => db_cmd::run(cmd),
        Command::Watch(args) => watch_cmd::run(*args),
    };
    match result {
        Ok(code) => code,
        // A reader that stops early (`inspector rules list | head`) is not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = out_of_memory_hint(&e) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

/// What to lower when the device ran out of memory (CUDA's `CUDA_ERROR_OUT_OF_MEMORY`, or an
/// allocation candle could not make); the error itself names the step through its context.
fn out_of_memory_hint(e: &anyhow::Error) -> Option<&'static str> {
    let text = format!("{e:#}").to_lowercase();
    (text.contains("out_of_memory") || text.contains("out of memory")).then_some(
        "the device ran out of memory: lower --max-pixels (fewer image tokens), --batch-size \
         or --grad-accum's micro-batch size, use --dtype bf16, or train fewer layers \
         (--lora-r, no --lora-vision); on a GPU also see nvidia-smi for other processes",
    )
}

#[cfg(test)]
mod tests {
    use super::out_of_memory_hint;

    #[test]
    fn an_out_of_memory_error_gets_a_hint_and_others_do_not() {
        let oom = anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")")
            .context("training step 12");
        let hint = out_of_memory_hint(&oom).expect("a hint");
        assert!(
            hint.contains("--max-pixels") && hint.contains("--batch-size"),
            "{hint}"
        );
        assert!(format!("{oom:#}").starts_with("training step 12: "));
        assert!(out_of_memory_hint(&anyhow::anyhow!("photos: no such file")).is_none());
    }
}
