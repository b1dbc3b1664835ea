//! `inspector model …`

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use clap::Subcommand;
use inspector_core::answer::Prompt;
use inspector_qwen2vl::{
    Backend, Batch, ConfigLayout, DeviceRequest, KeyLayout, Logits, Quantization, Qwen2Vl,
    VisionInput, image,
};

use crate::model_args::{DtypeArg, backend, parse_device, parse_quantization};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Run one forward pass and save the logits and the inputs the model saw.
    ///
    /// Other tools call this interface. `--input-ids` holds exactly one image-pad id per
    /// `--image`; each is expanded to that image's token count, as the processor does. The
    /// output file receives `logits` (f32 [seq, vocab]), `input_ids` (i64 [seq], expanded),
    /// `position_ids` (i64 [3, seq]), `pixel_values` (f32) and `image_grid_thw`
    /// (i64 [n_images, 3]).
    Forward {
        /// A Hugging Face model directory.
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// An image, once per image pad in `--input-ids`, in order.
        #[arg(long = "image", value_name = "PATH")]
        images: Vec<PathBuf>,
        /// Comma-separated token ids.
        #[arg(long, value_name = "ID,ID,...")]
        input_ids: String,
        /// `cpu`, `cuda`, `cuda:N` or `auto` (as for every command that loads a model).
        #[arg(long, value_name = "cpu|cuda|cuda:N|auto", default_value = "auto", value_parser = parse_device)]
        device: DeviceRequest,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DtypeArg,
        /// Override the processor's minimum pixels per image.
        #[arg(long, value_name = "N")]
        min_pixels: Option<usize>,
        /// Override the processor's maximum pixels per image.
        #[arg(long, value_name = "N")]
        max_pixels: Option<usize>,
        /// Where to write the tensors (safetensors, written atomically).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// A PEFT LoRA adapter directory to apply on the model.
        #[arg(long, value_name = "DIR")]
        adapter: Option<PathBuf>,
        /// Quantize the linear layers as the model loads (`none`, `q8_0`, `q4k`).
        #[arg(long, value_name = "none|q8_0|q4k", default_value = "none", value_parser = parse_quantization)]
        quantize: Quantization,
    },
    /// Write a quantized copy of a model directory that every command loads: the weights in
    /// GGUF (`model.gguf`: the projections of both towers, the LM head and the embedding table
    /// in FORMAT, each layer whose rows do not split into FORMAT's blocks one step wider:
    /// q4k → q8_0 → f32; norms, biases and the patch embedding f32), every other file the
    /// source's inference needs (config, tokenizer, template, processor and generation
    /// configs, `inspector_model.json`) and `inspector_quant.json`. With `--adapter`, the
    /// adapter is merged in first and its prompt and pixel limits are recorded.
    Quantize {
        /// A Hugging Face model directory (dense: f32, bf16 or f16).
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// A PEFT LoRA adapter to merge in before quantizing.
        #[arg(long, value_name = "DIR")]
        adapter: Option<PathBuf>,
        /// `q8_0` (8.5 bits a weight) or `q4k` (4.5 bits a weight).
        #[arg(long, value_name = "q8_0|q4k", value_parser = parse_quantization)]
        format: Quantization,
        /// The new directory (must not exist or be empty).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Write a complete, randomly initialised Qwen2-VL model directory: config, weights, a
    /// byte-level BPE tokenizer trained on the corpus with Qwen's special tokens, the chat
    /// template, processor and generation configs. The starting point of a model trained from
    /// scratch with `inspector train --full`.
    Init {
        /// A Qwen2-VL `config.json` (its `vocab_size` bounds the tokenizer; special token ids
        /// are filled in).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// UTF-8 text files to train the tokenizer on (one sequence per line).
        #[arg(long = "tokenizer-corpus", value_name = "FILE", required = true, num_args = 1..)]
        corpus: Vec<PathBuf>,
        /// The new model directory (must not exist or be empty).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Seeds the weights.
        #[arg(long, default_value_t = 0, value_name = "S")]
        seed: u64,
        /// The instruction the model will be trained and asked with: `full` (the canonical
        /// one) or `brief` (one line, for small models trained from scratch). Recorded in
        /// `inspector_model.json`; training and inspection keep to it.
        #[arg(long, value_enum, default_value = "full")]
        prompt: PromptArg,
    },
    /// Describe a checkpoint: architecture, sizes, parameter counts, dtype, key layout.
    Info {
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// `cpu`, `cuda`, `cuda:N` or `auto`.
        #[arg(long, value_name = "cpu|cuda|cuda:N|auto", default_value = "auto", value_parser = parse_device)]
        device: DeviceRequest,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DtypeArg,
        /// Report the model as `--quantize` would load it (`none`, `q8_0`, `q4k`).
        #[arg(long, value_name = "none|q8_0|q4k", default_value = "none", value_parser = parse_quantization)]
        quantize: Quantization,
    },
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ModelCommand::Forward {
            model,
            images,
            input_ids,
            device,
            dtype,
            min_pixels,
            max_pixels,
            out,
            adapter,
            quantize,
        } => forward(
            &model,
            adapter.as_deref(),
            &images,
            &input_ids,
            &backend(device, dtype, quantize)?,
            min_pixels,
            max_pixels,
            &out,
        ),
        ModelCommand::Info {
            model,
            device,
            dtype,
            quantize,
        } => info(&model, &backend(device, dtype, quantize)?),
        ModelCommand::Quantize {
            model,
            adapter,
            format,
            out,
        } => quantize(&model, adapter.as_deref(), format, &out),
        ModelCommand::Init {
            config,
            corpus,
            out,
            seed,
            prompt,
        } => init(&config, &corpus, &out, seed, prompt.into()),
    }
}

/// `--prompt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PromptArg {
    Full,
    Brief,
}

impl From<PromptArg> for Prompt {
    fn from(p: PromptArg) -> Prompt {
        match p {
            PromptArg::Full => Prompt::Full,
            PromptArg::Brief => Prompt::Brief,
        }
    }
}

fn init(
    config: &Path,
    corpus: &[PathBuf],
    out: &Path,
    seed: u64,
    prompt: Prompt,
) -> anyhow::Result<ExitCode> {
    let config_text = std::fs::read_to_string(config)
        .with_context(|| format!("{}: cannot read", config.display()))?;
    let mut lines = Vec::new();
    for f in corpus {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("{}: cannot read as UTF-8 text", f.display()))?;
        lines.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    anyhow::ensure!(!lines.is_empty(), "the tokenizer corpus is empty");
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        anyhow::ensure!(
            empty,
            "{}: exists and is not an empty folder; refusing to overwrite it",
            out.display()
        );
    }
    let cfg = inspector_qwen2vl::init::init_model_dir(&config_text, &lines, out, seed)
        .with_context(|| config.display().to_string())?;
    let chat = inspector_qwen2vl::chat::ChatTokenizer::load(out, cfg.tokens.image_pad)?;
    let record = serde_json::json!({ "prompt_version": prompt.version() });
    crate::output::write_atomic(
        &out.join("inspector_model.json"),
        &serde_json::to_vec_pretty(&record).expect("JSON"),
    )?;
    println!(
        "wrote {}: {} layers, hidden {}, vision depth {}; tokenizer of {} tokens from {} lines; prompt {}",
        out.display(),
        cfg.text.num_hidden_layers,
        cfg.text.hidden_size,
        cfg.vision.depth,
        chat.tokenizer.get_vocab_size(true),
        lines.len(),
        prompt.version()
    );
    Ok(ExitCode::SUCCESS)
}

fn parse_ids(text: &str) -> anyhow::Result<Vec<u32>> {
    let ids: Vec<u32> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .enumerate()
        .map(|(i, s)| {
            s.parse::<u32>()
                .with_context(|| format!("--input-ids: item {} `{s}` is not a token id", i + 1))
        })
        .collect::<anyhow::Result<_>>()?;
    if ids.is_empty() {
        bail!("--input-ids is empty");
    }
    Ok(ids)
}

fn quantize(
    model: &Path,
    adapter: Option<&Path>,
    format: Quantization,
    out: &Path,
) -> anyhow::Result<ExitCode> {
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "quantizing {bar:30} {pos}/{len} tensors {elapsed}",
        )
        .expect("a valid template"),
    );
    let done = inspector_qwen2vl::quant::quantize_dir(model, adapter, format, out, |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    let total: usize = done.record.params.values().sum();
    let shares: Vec<String> = done
        .record
        .params
        .iter()
        .map(|(t, n)| format!("{t} {:.1} %", 100.0 * *n as f64 / total.max(1) as f64))
        .collect();
    println!(
        "wrote {} ({}): {:.1} MB of weights from {:.1} MB; parameters {}{}",
        out.display(),
        format,
        done.gguf_bytes as f64 / 1e6,
        done.source_bytes as f64 / 1e6,
        shares.join(", "),
        match adapter {
            Some(a) => format!(
                "; {} layers of {} merged in",
                done.merged_layers,
                a.display()
            ),
            None => String::new(),
        }
    );
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn forward(
    dir: &Path,
    adapter: Option<&Path>,
    image_paths: &[PathBuf],
    input_ids: &str,
    backend: &Backend,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
    out: &Path,
) -> anyhow::Result<ExitCode> {
    let ids = parse_ids(input_ids)?;
    let model = match adapter {
        Some(a) => inspector_qwen2vl::adapter::open(dir, a, backend)?.0,
        None => Qwen2Vl::open(dir, backend, None)?.0,
    };
    let vocab = model.config.text.vocab_size as u32;
    if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
        bail!("--input-ids: token id {bad} is outside the vocabulary (size {vocab})");
    }
    let pad = model.config.tokens.image_pad;
    let n_pads = ids.iter().filter(|&&t| t == pad).count();
    if n_pads != image_paths.len() {
        bail!(
            "--input-ids has {n_pads} image-pad tokens (id {pad}) but {} --image were given; they must match",
            image_paths.len()
        );
    }
    let processor = model
        .processor
        .clone()
        .with_pixels(min_pixels, max_pixels)?;
    let processed = image_paths
        .iter()
        .map(|p| image::process_file(p, &processor))
        .collect::<Result<Vec<_>, _>>()?;
    let mut expanded = Vec::with_capacity(ids.len());
    let mut next_image = processed.iter();
    for &t in &ids {
        if t == pad {
            let img = next_image.next().expect("counted above");
            expanded.extend(std::iter::repeat_n(pad, img.n_tokens(processor.merge_size)));
        } else {
            expanded.push(t);
        }
    }
    let patch_len = model.config.vision.patch_len();
    let pixel_values = if processed.is_empty() {
        Tensor::zeros((0, patch_len), DType::F32, &Device::Cpu)?
    } else {
        Tensor::cat(
            &processed
                .iter()
                .map(|p| &p.pixel_values)
                .collect::<Vec<_>>(),
            0,
        )?
    };
    let grids: Vec<[usize; 3]> = processed.iter().map(|p| p.grid_thw).collect();
    let batch = Batch {
        input_ids: vec![expanded.clone()],
        attention_mask: None,
        images: (!processed.is_empty()).then(|| VisionInput {
            pixel_values: pixel_values.clone(),
            grid_thw: grids.clone(),
        }),
    };
    let output = model.forward(&batch, Logits::All)?;
    let seq = expanded.len();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert(
        "logits".into(),
        // The output file is written from host memory, whatever device computed.
        output
            .logits
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?,
    );
    tensors.insert(
        "input_ids".into(),
        Tensor::from_vec(
            expanded.iter().map(|&t| t as i64).collect::<Vec<_>>(),
            seq,
            &Device::Cpu,
        )?,
    );
    let positions: Vec<i64> = (0..3)
        .flat_map(|a| output.rope.positions[a][0].clone())
        .collect();
    tensors.insert(
        "position_ids".into(),
        Tensor::from_vec(positions, (3, seq), &Device::Cpu)?,
    );
    tensors.insert("pixel_values".into(), pixel_values);
    let grid_flat: Vec<i64> = grids
        .iter()
        .flat_map(|g| g.iter().map(|&x| x as i64))
        .collect();
    tensors.insert(
        "image_grid_thw".into(),
        Tensor::from_vec(grid_flat, (grids.len(), 3), &Device::Cpu)?,
    );
    save_atomic(&tensors, out)?;
    eprintln!(
        "wrote logits [{seq}, {}] for {} tokens ({} images) to {}",
        model.config.text.vocab_size,
        seq,
        grids.len(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// safetensors written beside the target, then renamed over it.
fn save_atomic(tensors: &HashMap<String, Tensor>, out: &Path) -> anyhow::Result<()> {
    inspector_lora::write_atomic(out, |tmp| candle_core::safetensors::save(tensors, tmp))
        .with_context(|| format!("{}: write failed", out.display()))
}

fn info(dir: &Path, backend: &Backend) -> anyhow::Result<ExitCode> {
    let (model, info) = Qwen2Vl::open(dir, backend, None)?;
    let c = &info.config;
    let t = &c.text;
    let v = &c.vision;
    println!("model:        {}", dir.display());
    println!("architecture: Qwen2-VL (Qwen2VLForConditionalGeneration)");
    println!(
        "config:       {} layout",
        match c.layout {
            ConfigLayout::Flat => "hub (flat)",
            ConfigLayout::Nested => "transformers 5 (nested text_config/vision_config)",
        }
    );
    println!(
        "weights:      {} file(s), {} keys{}",
        info.files.len(),
        match info.key_layout {
            KeyLayout::Legacy => "hub (model.layers.*, visual.*)",
            KeyLayout::Nested => "transformers ≥ 4.52 (model.language_model.*, model.visual.*)",
        },
        if c.tie_word_embeddings {
            ", tied embeddings"
        } else {
            ""
        }
    );
    println!("dtype:        {:?}", info.dtype);
    let total = info.total_params().max(1) as f64;
    let by_type: Vec<String> = info
        .params_by_type
        .iter()
        .map(|(t, n)| format!("{t} {} ({:.1} %)", human(*n), 100.0 * *n as f64 / total))
        .collect();
    println!(
        "quantization: {}; parameters by type: {}",
        info.quantization,
        by_type.join(", ")
    );
    println!(
        "text:         hidden {}, {} layers, {} heads / {} kv heads, head_dim {}, intermediate {}, vocab {}, mrope_section {:?}, rope_theta {}, context {}",
        t.hidden_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.head_dim,
        t.intermediate_size,
        t.vocab_size,
        t.mrope_section,
        t.rope_theta,
        t.max_position_embeddings
    );
    println!(
        "vision:       embed {}, depth {}, {} heads, mlp ratio {}, patch {}, temporal patch {}, merge {}",
        v.embed_dim,
        v.depth,
        v.num_heads,
        v.mlp_ratio,
        v.patch_size,
        v.temporal_patch_size,
        v.spatial_merge_size
    );
    println!(
        "parameters:   {} total (vision {}, language {}, lm_head {})",
        human(info.total_params()),
        human(info.vision_params),
        human(info.text_params),
        human(info.lm_head_params)
    );
    let tk = &c.tokens;
    println!(
        "tokens:       image_pad {}, vision_start {:?}, vision_end {:?}, eos {:?}, pad {:?}",
        tk.image_pad, tk.vision_start, tk.vision_end, tk.eos, tk.pad
    );
    println!(
        "images:       {}–{} pixels (max {} tokens per image)",
        model.processor.min_pixels,
        model.processor.max_pixels,
        model.processor.max_pixels / (model.processor.factor() * model.processor.factor())
    );
    Ok(ExitCode::SUCCESS)
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}
