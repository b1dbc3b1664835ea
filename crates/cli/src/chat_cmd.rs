//! `inspector chat`

use std::{io::Write, path::PathBuf, process::ExitCode, time::Instant};

use anyhow::Context;
use candle_core::Tensor;
use clap::Args;
use inspector_qwen2vl::{
    Batch, VisionInput,
    chat::{ChatTokenizer, RenderOptions},
    generate::{GenerationConfig, TextStream, generate},
    image,
};

use crate::model_args::ModelArgs;

/// Chat with a Qwen2-VL model about images. Other tools call this interface.
#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An image to show the model (repeatable; shown in order, before the prompt).
    #[arg(long = "image", value_name = "PATH")]
    pub images: Vec<PathBuf>,
    /// The user's message.
    #[arg(long)]
    pub prompt: String,
    /// A system message (the template's default otherwise).
    #[arg(long)]
    pub system: Option<String>,
    /// Sampling temperature; 0 decodes greedily. Default: generation_config.json's.
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Seed of the sampler (same seed, same output).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Print text as it is generated.
    #[arg(long)]
    pub stream: bool,
    /// Print one JSON object: text, token_ids (eos excluded), stopped_at_eos, prompt_tokens.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ChatArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let loaded = args.model.load()?;
    let load_s = started.elapsed().as_secs_f64();
    let model = &loaded.model;
    let chat = ChatTokenizer::load(&loaded.dir, model.config.tokens.image_pad)?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(serde_json::json!({"role": "system", "content": system}));
    }
    let mut content: Vec<serde_json::Value> = args
        .images
        .iter()
        .map(|p| serde_json::json!({"type": "image", "image": p.display().to_string()}))
        .collect();
    content.push(serde_json::json!({"type": "text", "text": args.prompt}));
    messages.push(serde_json::json!({"role": "user", "content": content}));
    let messages = serde_json::Value::Array(messages);
    let text = chat.render(
        &messages,
        RenderOptions {
            add_generation_prompt: true,
            ..Default::default()
        },
    )?;
    let processed = args
        .images
        .iter()
        .map(|p| image::process_file(p, &loaded.processor))
        .collect::<Result<Vec<_>, _>>()?;
    let counts: Vec<usize> = processed
        .iter()
        .map(|p| p.n_tokens(loaded.processor.merge_size))
        .collect();
    let input_ids = chat.encode(&text, &counts)?;
    let images = (!processed.is_empty())
        .then(|| -> anyhow::Result<VisionInput> {
            Ok(VisionInput {
                pixel_values: Tensor::cat(
                    &processed
                        .iter()
                        .map(|p| &p.pixel_values)
                        .collect::<Vec<_>>(),
                    0,
                )?,
                grid_thw: processed.iter().map(|p| p.grid_thw).collect(),
            })
        })
        .transpose()?;
    let prompt_tokens = input_ids.len();
    let batch = Batch {
        input_ids: vec![input_ids],
        attention_mask: None,
        images,
    };

    let mut config = GenerationConfig::from_model_dir(&loaded.dir, model)?;
    config.max_new_tokens = args.max_new_tokens;
    config.seed = args.seed;
    if let Some(t) = args.temperature {
        anyhow::ensure!(t >= 0.0, "--temperature must be ≥ 0");
        config.temperature = t;
        config.do_sample = t > 0.0;
    }
    if let Some(p) = args.top_p {
        anyhow::ensure!(p > 0.0 && p <= 1.0, "--top-p must be in (0, 1]");
        config.top_p = Some(p);
    }
    if let Some(k) = args.top_k {
        config.top_k = Some(k);
    }
    if let Some(r) = args.repetition_penalty {
        anyhow::ensure!(r > 0.0, "--repetition-penalty must be > 0");
        config.repetition_penalty = Some(r);
    }
    let eos = config.eos.clone();
    let mut stream = args
        .stream
        .then(|| TextStream::new(|t: &[u32]| chat.decode(t)));
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let generating = Instant::now();
    let mut first_token: Option<Instant> = None;
    let out = generate(model, &batch, &config, |_, token| {
        first_token.get_or_insert_with(Instant::now);
        if let Some(s) = stream.as_mut() {
            if eos.contains(&token) {
                return;
            }
            match s.push(token) {
                Ok(Some(piece)) if !args.json => {
                    if let Err(e) = stdout
                        .write_all(piece.as_bytes())
                        .and_then(|_| stdout.flush())
                    {
                        write_error.get_or_insert(e);
                    }
                }
                _ => {}
            }
        }
    })?;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    let done = Instant::now();
    let text = chat.decode(&out.tokens[0])?;
    // Prefill: images, prompt and the first token; decode: every later token.
    let first = first_token.unwrap_or(done);
    let prefill_s = (first - generating).as_secs_f64();
    let decode_s = (done - first).as_secs_f64();
    let n_decoded = out.stats[0].len().saturating_sub(1);
    if args.json {
        let value = serde_json::json!({
            "text": text,
            "token_ids": out.tokens[0],
            "stopped_at_eos": out.stopped_at_eos[0],
            "prompt_tokens": prompt_tokens,
            "model": loaded.dir.display().to_string(),
            "template": chat.template_source.file.display().to_string(),
            "backend": model.backend().describe(),
            "timings": {
                "load_s": load_s,
                "prefill_s": prefill_s,
                "decode_s": decode_s,
                "decode_tokens_per_s": if decode_s > 0.0 { n_decoded as f64 / decode_s } else { 0.0 },
            },
        });
        writeln!(stdout, "{value}")?;
    } else if let Some(s) = stream {
        if let Some(rest) = s.finish()? {
            stdout.write_all(rest.as_bytes())?;
        }
        writeln!(stdout)?;
    } else {
        writeln!(stdout, "{text}").context("writing the answer")?;
    }
    Ok(ExitCode::SUCCESS)
}
