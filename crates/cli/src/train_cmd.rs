//! `inspector train`

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use inspector_dataset::Dataset;
use inspector_qwen2vl::{Config, chat::ChatTokenizer, image::ProcessorConfig};
use inspector_store::RuleFilter;
use inspector_train::{
    data::{Example, Photos, build_in_parallel, example_from, model_prompt},
    trainer::{Ending, Event, TrainConfig, Trainer},
};

use crate::rules_cmd::{DbArgs, open_with_rules};

/// Fine-tune a Qwen2-VL model on annotated photos: a LoRA adapter, or with `--full` every
/// weight. Other tools call this interface.
///
/// `--data` is an annotation file (the format `inspector dataset validate` checks); the
/// canonical conversations are built from it with the model's chat template, and only the
/// answers are trained on. Every problem of the data is listed before training starts.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The base model directory.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The training annotation file (JSONL).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// An eval annotation file: eval loss, and the best adapter by it.
    #[arg(long, value_name = "FILE")]
    pub eval_data: Option<PathBuf>,
    /// Output folder: checkpoints/, best/, adapter/ (model/ with --full), metrics.jsonl,
    /// loss.png.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A TOML file with any of the training settings (`lr = 1e-4`, `grad_accum = 4`, …);
    /// flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Train for N optimizer steps, going over the data as often as needed (overrides --epochs,
    /// as transformers' max_steps does; the schedule is sized for it).
    #[arg(long, value_name = "N")]
    pub max_steps: Option<u64>,
    /// Passes over the data [default: 5].
    #[arg(long, value_name = "E")]
    pub epochs: Option<usize>,
    /// Peak learning rate [default: 5e-5].
    #[arg(long, value_name = "X")]
    pub lr: Option<f64>,
    /// LoRA rank [default: 16].
    #[arg(long, value_name = "R")]
    pub lora_r: Option<usize>,
    /// LoRA alpha [default: 32].
    #[arg(long, value_name = "A")]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout [default: 0.1].
    #[arg(long, value_name = "D")]
    pub lora_dropout: Option<f32>,
    /// A checkpoint every N steps [default: 100]; the newest 3 are kept.
    #[arg(long, value_name = "N")]
    pub save_every: Option<u64>,
    /// Samples per micro-batch, left-padded [default: 1].
    #[arg(long, value_name = "B")]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 8].
    #[arg(long, value_name = "G")]
    pub grad_accum: Option<usize>,
    /// Seeds data order, initialisation and dropout [default: 42].
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Also adapt the vision tower and merger.
    #[arg(long)]
    pub lora_vision: bool,
    /// Train every weight (vision included, f32) instead of an adapter; writes complete model
    /// directories to OUT/model and OUT/best/model. Meant for small models.
    #[arg(long)]
    pub full: bool,
    /// Base weight dtype: f32, or bf16 (LoRA weights and optimizer state stay f32)
    /// [default: f32].
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<inspector_train::trainer::Precision>,
    /// Start the adapter from this PEFT adapter directory (same --lora-r and --lora-alpha),
    /// e.g. the vision adapter of `pretrain-vision --lora-r`; other targeted layers start
    /// fresh.
    #[arg(long, value_name = "DIR", conflicts_with = "full")]
    pub init_adapter: Option<PathBuf>,
    /// Where to train: `cpu`, `cuda`, `cuda:N` or `auto` (a GPU when this build has CUDA and
    /// the machine a GPU).
    #[arg(long, value_name = "cpu|cuda|cuda:N|auto", default_value = "auto", value_parser = crate::model_args::parse_device)]
    pub device: inspector_qwen2vl::DeviceRequest,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations:
    /// much less memory (7B, long sequences) for about a third more time; same gradients.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Continue from the newest checkpoint in OUT/checkpoints.
    #[arg(long)]
    pub resume: bool,
    /// Image pixel budget for training.
    #[arg(long, default_value_t = inspector_core::DEFAULT_MIN_PIXELS)]
    pub min_pixels: usize,
    #[arg(long, default_value_t = inspector_core::DEFAULT_MAX_PIXELS)]
    pub max_pixels: usize,
    #[command(flatten)]
    pub db: DbArgs,
}

fn settings(args: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let mut c: TrainConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("{}: invalid settings", path.display()))?
        }
        None => TrainConfig::default(),
    };
    macro_rules! set {
        ($($field:ident),*) => { $(if let Some(v) = args.$field { c.$field = v; })* };
    }
    set!(
        epochs,
        lr,
        lora_r,
        lora_alpha,
        lora_dropout,
        save_every,
        batch_size,
        grad_accum,
        seed
    );
    if args.max_steps.is_some() {
        c.max_steps = args.max_steps;
    }
    if args.init_adapter.is_some() {
        c.init_adapter = args.init_adapter.clone();
    }
    c.lora_vision |= args.lora_vision;
    c.full |= args.full;
    c.gradient_checkpointing |= args.gradient_checkpointing;
    if let Some(d) = args.dtype {
        c.dtype = d;
    }
    anyhow::ensure!(
        !(c.full && c.dtype != inspector_train::trainer::Precision::F32),
        "--full trains f32 weights: drop --dtype bf16"
    );
    anyhow::ensure!(c.lr > 0.0, "--lr must be positive");
    check_lora(c.lora_r, c.lora_alpha, c.lora_dropout)?;
    anyhow::ensure!(
        c.batch_size > 0 && c.grad_accum > 0,
        "batch size and accumulation must be ≥ 1"
    );
    Ok(c)
}

/// Refuses LoRA settings that cannot train: rank 0, a non-positive alpha, dropout outside
/// [0, 1).
pub(crate) fn check_lora(r: usize, alpha: f64, dropout: f32) -> anyhow::Result<()> {
    anyhow::ensure!(r > 0, "--lora-r must be at least 1");
    anyhow::ensure!(
        alpha.is_finite() && alpha > 0.0,
        "--lora-alpha must be positive"
    );
    anyhow::ensure!(
        (0.0..1.0).contains(&dropout),
        "--lora-dropout must be in [0, 1)"
    );
    Ok(())
}

/// Loads an annotation file, or the scenes of a `synth:` spec ([`crate::synth_cmd::data_spec`]),
/// printing every problem; `refused` says what did not happen.
pub(crate) fn load_data(
    path: &Path,
    rules: &[inspector_core::Rule],
    refused: &'static str,
) -> anyhow::Result<(Dataset, Photos)> {
    if let Some(spec) = crate::synth_cmd::data_spec(path) {
        return spec?.load(rules).context(refused);
    }
    let dataset = inspector_dataset::load_file(path, rules).map_err(|e| {
        if let inspector_dataset::Error::Invalid { file, report } = &e {
            for p in &report.errors {
                eprintln!(
                    "{}:{}: error: {}: {}",
                    file.display(),
                    p.line,
                    p.field,
                    p.message
                );
            }
        }
        anyhow::Error::from(e).context(refused)
    })?;
    Ok((dataset, Photos::Files))
}

fn examples(
    prompt: inspector_core::answer::Prompt,
    (dataset, photos): &(Dataset, Photos),
    chat: &ChatTokenizer,
    processor: &ProcessorConfig,
    max_len: usize,
    what: &str,
) -> anyhow::Result<Vec<Example>> {
    let bar = ProgressBar::new(dataset.records.len() as u64).with_style(
        ProgressStyle::with_template(&format!("{what} {{bar:30}} {{pos}}/{{len}} samples"))
            .expect("valid template"),
    );
    // Photos are read and resized on every core; those beyond the cache are read again from
    // disk for each batch.
    let (built, on_disk) = build_in_parallel(
        &dataset.records,
        PIXEL_CACHE_BYTES,
        |r| {
            example_from(prompt, chat, processor, r, photos, max_len)
                .with_context(|| format!("{}:{}", dataset.file.display(), r.line))
        },
        |built| built.as_mut().ok().map(|e| &mut e.image),
        |r| r.path.as_path(),
        || bar.inc(1),
    )?;
    bar.finish_and_clear();
    let mut out = Vec::with_capacity(built.len());
    for built in built {
        match built {
            Ok(e) => out.push(e),
            Err(skipped) => eprintln!(
                "{}:{}: skipped: {}",
                dataset.file.display(),
                skipped.line,
                skipped.reason
            ),
        }
    }
    if on_disk > 0 {
        eprintln!(
            "{what}: the pixels of {on_disk} of {} samples do not fit the {} MiB cache; they are read again from disk for each batch",
            out.len(),
            PIXEL_CACHE_BYTES >> 20
        );
    }
    Ok(out)
}

/// Memory for resized photos kept between epochs (about 13,000 photos of 320×240, resized to
/// 280×196).
pub(crate) const PIXEL_CACHE_BYTES: usize = 2 << 30;

pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let config = settings(&args)?;
    let device = crate::model_args::open_device(args.device, config.dtype.dtype())?;
    let store = open_with_rules(&args.db.db)?;
    let rules = store.rules(&RuleFilter::default())?;
    // Every problem of both files is listed before any training starts.
    let train = load_data(&args.data, &rules, "nothing was trained");
    let eval = args
        .eval_data
        .as_ref()
        .map(|p| load_data(p, &rules, "nothing was trained"))
        .transpose();
    let (train, eval) = (train?, eval?);

    let config_path = args.model.join("config.json");
    let model_config = Config::from_json(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("{}: cannot read", config_path.display()))?,
    )
    .with_context(|| config_path.display().to_string())?;
    let chat = ChatTokenizer::load(&args.model, model_config.tokens.image_pad)?;
    let processor = ProcessorConfig::from_model_dir(&args.model)?
        .with_pixels(Some(args.min_pixels), Some(args.max_pixels))?;
    let prompt = model_prompt(&args.model)?;
    if prompt != inspector_core::answer::Prompt::Full {
        eprintln!(
            "the model was trained with the prompt {}: training keeps to it",
            prompt.version()
        );
    }
    let train = examples(
        prompt,
        &train,
        &chat,
        &processor,
        config.max_len,
        "tokenising",
    )?;
    let eval = match &eval {
        Some(e) => examples(
            prompt,
            e,
            &chat,
            &processor,
            config.max_len,
            "tokenising eval",
        )?,
        None => Vec::new(),
    };
    anyhow::ensure!(!train.is_empty(), "no training sample is left");

    let mut trainer = Trainer::on_device(&args.model, train, eval, config, &args.out, &device)?;
    trainer.model.processor = processor;
    if args.resume {
        let step = trainer.resume()?;
        eprintln!("resuming at step {step}");
    }
    if trainer.config.full {
        eprintln!(
            "full fine-tuning: {} trainable parameters in {} tensors",
            trainer.trainable_params(),
            trainer.weights.len()
        );
    } else {
        eprintln!(
            "LoRA: {} trainable parameters of {} adapted layers",
            trainer.trainable_params(),
            trainer.lora.pairs().len()
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed))
            .context("installing the Ctrl-C handler")?;
    }
    let total = trainer.state.total_steps;
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("train {bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .expect("valid template"),
    );
    bar.set_position(trainer.state.step);
    let ending = trainer.run(&stop, &mut |e| match e {
        Event::Step {
            step,
            loss,
            lr,
            tokens_per_s,
            ..
        } => {
            bar.set_position(*step);
            bar.set_message(format!(
                "loss {loss:.4}  lr {lr:.2e}  {tokens_per_s:.0} tok/s"
            ));
        }
        Event::Eval { step, loss, best } => bar.println(format!(
            "step {step}: eval loss {loss:.4}{}",
            if *best { " (best)" } else { "" }
        )),
        Event::Saved { path, .. } => bar.println(format!("saved {}", path.display())),
    });
    // Name the step that failed (an out-of-memory on a GPU, say; main adds what to lower).
    let ending = ending.with_context(|| format!("training step {}", trainer.state.step + 1))?;
    bar.finish_and_clear();
    match ending {
        Ending::Finished => {
            println!(
                "done: {} steps; {} in {}; loss curve in {}",
                trainer.state.step,
                if trainer.config.full {
                    "model"
                } else {
                    "adapter"
                },
                args.out
                    .join(if trainer.config.full {
                        "model"
                    } else {
                        "adapter"
                    })
                    .display(),
                args.out.join("loss.png").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Ending::Interrupted => {
            println!(
                "stopped at step {}; checkpoint saved; continue with --resume",
                trainer.state.step
            );
            Ok(ExitCode::from(130))
        }
    }
}
