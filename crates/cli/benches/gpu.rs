//! The GPU benchmark (issue 21): our Qwen2-VL against transformers (+ PEFT for training) on the
//! same device, in the same run, on a checkpoint with Qwen2-VL-2B's shapes and random weights.
//!
//! What is timed, on both sides, with the same inputs (written here to `inputs.safetensors`
//! and read by `tools/gpu/bench_transformers.py`):
//! - prefill of one 448×448 photo and a text prompt (the photo's 256 tokens plus 64 of text);
//! - greedy decode tokens/s at batch 1 and at batch 8 (64 new tokens, the sampled ids the only
//!   copy back to the host per step);
//! - LoRA training (r = 16 on the language model's seven projections, f32 LoRA weights and
//!   AdamW state over base weights in the benchmark's dtype): tokens/s and peak device memory.
//!
//! Everything here also runs on the CPU (`GPU_BENCH_SIZE=tiny`, the default off a GPU), so a
//! GPU only adds the device:
//!
//! ```text
//! cargo bench -p inspector-cli --bench gpu                                # CPU, tiny model
//! GPU_BENCH_SIZE=2b INSPECTOR_PYTHON=python3 target/.../gpu               # on the GPU (check.sh)
//! ```
//!
//! Env: `GPU_BENCH_SIZE` (`2b` or `tiny`), `GPU_BENCH_DEVICE` (`auto`), `GPU_BENCH_DTYPE`
//! (bf16 on a GPU, f32 on the CPU), `GPU_BENCH_WORK` (the folder for the checkpoint and inputs,
//! default `target/tmp/gpu-bench`), `GPU_BENCH_REPORT` (a Markdown file to write the table to),
//! `INSPECTOR_PYTHON` (a Python with torch, transformers and peft: runs the reference side).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use candle_core::{D, DType, Device, Tensor};
use inspector_qwen2vl::{
    Batch, DeviceRequest, Logits, Lora, LoraConfig, Qwen2Vl, VisionInput, chat::ChatTokenizer,
    image,
};
use inspector_train::{
    loss::causal_lm_loss,
    optim::{AdamW, AdamWConfig},
};

const NEW_TOKENS: usize = 64;
const TEXT_TOKENS: usize = 64;
const TRAIN_STEPS: usize = 6;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// The checkpoint: the 2B shapes with random weights (made once, in the work folder), or the
/// tiny fixture.
fn model_dir(size: &str, work: &Path) -> PathBuf {
    if size == "tiny" {
        return root().join("crates/qwen2vl/tests/fixtures/tiny-a");
    }
    let dir = work.join("2b");
    if !dir.join("tokenizer.json").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let corpus: Vec<String> = ["electrical-safety.utf8.md", "site-management.utf8.txt"]
            .iter()
            .map(|f| {
                std::fs::read_to_string(root().join("crates/rules/tests/data").join(f)).unwrap()
            })
            .collect();
        let t = Instant::now();
        inspector_qwen2vl::init::init_model_dir(
            inspector_qwen2vl::init::QWEN2_VL_2B_CONFIG,
            &corpus,
            &dir,
            0,
        )
        .unwrap();
        println!(
            "made the 2B-shaped checkpoint in {} ({:.0} s)",
            dir.display(),
            t.elapsed().as_secs_f64()
        );
    }
    dir
}

/// The prompt: one 448×448 photo, then `TEXT_TOKENS` tokens of text, as one chat turn.
fn inputs(dir: &Path, model: &Qwen2Vl) -> (Vec<u32>, VisionInput) {
    let rgb = ::image::RgbImage::from_fn(448, 448, |x, y| {
        ::image::Rgb([
            (x / 2) as u8,
            (y / 2) as u8,
            (((x + y) / 7) % 2 * 200) as u8,
        ])
    });
    let processor = model
        .processor
        .clone()
        .with_pixels(Some(448 * 448), Some(448 * 448))
        .unwrap();
    let processed = image::process_rgb(&rgb, &processor).unwrap();
    let n_image = processed.n_tokens(processor.merge_size);
    let chat = ChatTokenizer::load(dir, model.config.tokens.image_pad).unwrap();
    let mut words = String::new();
    let mut ids = Vec::new();
    // Grow the instruction until the text around the photo is TEXT_TOKENS long.
    for i in 0.. {
        ids = chat.image_prompt(&words, n_image).unwrap();
        if ids.len() >= n_image + TEXT_TOKENS || i > 10 * TEXT_TOKENS {
            break;
        }
        words.push_str(["安全帽 ", "worker ", "配电箱 ", "ladder "][i % 4]);
    }
    // The image pads come after a short system turn, well inside the first TEXT_TOKENS.
    ids.truncate(n_image + TEXT_TOKENS);
    (
        ids,
        VisionInput {
            pixel_values: processed.pixel_values,
            grid_thw: vec![processed.grid_thw],
        },
    )
}

fn sync(device: &Device) {
    device.synchronize().unwrap();
}

/// Greedy ids of a `[B, vocab]` logits tensor, computed on the device: `B` ids come back.
fn greedy(logits: &Tensor) -> Vec<u32> {
    logits
        .argmax(D::Minus1)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
}

/// Decode tokens/s at batch `b`: prefill `b` copies of the prompt, then `NEW_TOKENS` steps.
fn decode(model: &Qwen2Vl, ids: &[u32], vision: &VisionInput, b: usize) -> f64 {
    let images = VisionInput {
        pixel_values: Tensor::cat(&vec![&vision.pixel_values; b], 0).unwrap(),
        grid_thw: vec![vision.grid_thw[0]; b],
    };
    let batch = Batch {
        input_ids: vec![ids.to_vec(); b],
        attention_mask: None,
        images: Some(images),
    };
    let mut out = model.forward(&batch, Logits::Last).unwrap();
    let mut next = greedy(&out.logits);
    sync(model.device());
    let t = Instant::now();
    for _ in 0..NEW_TOKENS {
        let logits = model.step(&next, &mut out.state).unwrap();
        next = greedy(&logits);
    }
    sync(model.device());
    (b * NEW_TOKENS) as f64 / t.elapsed().as_secs_f64()
}

/// Device memory in use (bytes), where the device can say.
fn memory_in_use(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = device {
        use candle_core::cuda_backend::cudarc::driver::result;
        let (free, total) = result::mem_get_info().ok()?;
        return Some((total - free) as u64);
    }
    let _ = device;
    None
}

/// LoRA training: tokens/s over `TRAIN_STEPS` steps after one warm-up step, and the peak of
/// the device memory in use, sampled after every forward and backward pass.
fn train(
    dir: &Path,
    request: DeviceRequest,
    dtype: DType,
    ids: &[u32],
    vision: &VisionInput,
) -> (f64, Option<u64>, f32, f32) {
    let (device, _) = request.open(dtype).unwrap();
    let lora = Lora::new(
        LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            ..Default::default()
        },
        &device,
    );
    let (model, _) = Qwen2Vl::load_with(dir, dtype, &device, Some(&lora)).unwrap();
    let mut opt = AdamW::new(
        lora.vars(),
        AdamWConfig {
            lr: 1e-4,
            ..Default::default()
        },
    )
    .unwrap();
    let batch = Batch {
        input_ids: vec![ids.to_vec()],
        attention_mask: None,
        images: Some(vision.clone()),
    };
    // The last 32 text tokens are the answer.
    let labels: Vec<Vec<i64>> = vec![
        ids.iter()
            .enumerate()
            .map(|(i, &t)| if i + 32 >= ids.len() { t as i64 } else { -100 })
            .collect(),
    ];
    let mut peak = memory_in_use(&device);
    let mut losses = Vec::new();
    let mut t = Instant::now();
    for step in 0..=TRAIN_STEPS {
        if step == 1 {
            sync(&device);
            t = Instant::now();
        }
        let (loss, _) = causal_lm_loss(&model, &batch, &labels).unwrap();
        peak = peak.max(memory_in_use(&device));
        let grads = loss.backward().unwrap();
        peak = peak.max(memory_in_use(&device));
        opt.step(&grads, 1e-4).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
    }
    sync(&device);
    let tokens_per_s = (TRAIN_STEPS * ids.len()) as f64 / t.elapsed().as_secs_f64();
    (tokens_per_s, peak, losses[0], *losses.last().unwrap())
}

/// One row of the table: ours, theirs, and the ratio (higher is better for ours).
fn row(what: &str, ours: f64, theirs: Option<f64>, higher_is_better: bool) -> String {
    let ratio = theirs.map_or("—".to_string(), |t| {
        let r = if higher_is_better { ours / t } else { t / ours };
        format!("{r:.2}×")
    });
    let theirs = theirs.map_or("—".to_string(), |t| format!("{t:.3}"));
    format!("| {what} | {ours:.3} | {theirs} | {ratio} |")
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benches; there is nothing to list.
    }
    let request: DeviceRequest = env("GPU_BENCH_DEVICE")
        .unwrap_or_else(|| "auto".into())
        .parse()
        .unwrap();
    let probe = request.open(DType::F32).unwrap().0;
    let on_gpu = !probe.is_cpu();
    let size = env("GPU_BENCH_SIZE").unwrap_or_else(|| if on_gpu { "2b" } else { "tiny" }.into());
    let dtype = match env("GPU_BENCH_DTYPE").as_deref() {
        Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some("bf16") => DType::BF16,
        Some(other) => panic!("GPU_BENCH_DTYPE {other:?}: expected f32, bf16 or f16"),
        None if on_gpu => DType::BF16,
        None => DType::F32,
    };
    let work = env("GPU_BENCH_WORK")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/tmp/gpu-bench"));
    std::fs::create_dir_all(&work).unwrap();
    let dir = model_dir(&size, &work);
    let (device, what) = request.open(dtype).unwrap();
    println!("device: {what}; model: {size}; dtype: {}", dtype.as_str());

    let t = Instant::now();
    let (model, _) = Qwen2Vl::load(&dir, dtype, &device).unwrap();
    sync(&device);
    let load_s = t.elapsed().as_secs_f64();
    let (ids, vision) = inputs(&dir, &model);
    let inputs_file = work.join("inputs.safetensors");
    let grid = vision.grid_thw[0].map(|x| x as i64);
    candle_core::safetensors::save(
        &HashMap::from([
            (
                "input_ids".to_string(),
                Tensor::new(
                    ids.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                    &Device::Cpu,
                )
                .unwrap(),
            ),
            ("pixel_values".to_string(), vision.pixel_values.clone()),
            (
                "image_grid_thw".to_string(),
                Tensor::new(&[grid], &Device::Cpu).unwrap(),
            ),
        ]),
        &inputs_file,
    )
    .unwrap();
    let batch = Batch {
        input_ids: vec![ids.clone()],
        attention_mask: None,
        images: Some(vision.clone()),
    };
    // The first forward pays for loading and compiling kernels; it is reported on its own.
    let t = Instant::now();
    model.forward(&batch, Logits::Last).unwrap();
    sync(&device);
    let first_s = t.elapsed().as_secs_f64();
    let mut prefill = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        model.forward(&batch, Logits::Last).unwrap();
        sync(&device);
        prefill.push(t.elapsed().as_secs_f64());
    }
    prefill.sort_by(f64::total_cmp);
    let prefill_s = prefill[1];
    let decode1 = decode(&model, &ids, &vision, 1);
    let decode8 = decode(&model, &ids, &vision, 8);
    drop(model);
    let (train_tok_s, peak, loss0, loss_n) = train(&dir, request, dtype, &ids, &vision);
    println!(
        "ours: load {load_s:.2} s, first forward {first_s:.2} s, prefill {prefill_s:.4} s \
         ({} tokens), decode {decode1:.1} tok/s (batch 1), {decode8:.1} tok/s (batch 8), \
         LoRA training {train_tok_s:.1} tok/s (loss {loss0:.3} → {loss_n:.3}), peak memory {}",
        ids.len(),
        peak.map_or("n/a".into(), |p| format!(
            "{:.2} GiB",
            p as f64 / (1u64 << 30) as f64
        ))
    );

    let theirs: Option<serde_json::Value> = env("INSPECTOR_PYTHON").map(|python| {
        let out = work.join("transformers.json");
        let status = Command::new(python)
            .arg(root().join("tools/gpu/bench_transformers.py"))
            .arg(&dir)
            .arg(&inputs_file)
            .arg(&out)
            .args(["--device", if on_gpu { "cuda" } else { "cpu" }])
            .args(["--dtype", dtype.as_str()])
            .args(["--new-tokens", &NEW_TOKENS.to_string()])
            .args(["--train-steps", &TRAIN_STEPS.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "the transformers side failed");
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
    });
    let t = |k: &str| theirs.as_ref().and_then(|v| v[k].as_f64());
    let gib = |b: Option<u64>| b.map(|b| b as f64 / (1u64 << 30) as f64);
    let mut table = vec![
        format!(
            "device: {what}; {size} shapes, random weights, {}; prompt {} tokens ({} of them the photo's)",
            dtype.as_str(),
            ids.len(),
            ids.len() - TEXT_TOKENS.min(ids.len())
        ),
        String::new(),
        "| measure | ours | transformers | ratio |".into(),
        "|---|---|---|---|".into(),
        row("prefill (s)", prefill_s, t("prefill_s"), false),
        row(
            "decode batch 1 (tokens/s)",
            decode1,
            t("decode_b1_tok_s"),
            true,
        ),
        row(
            "decode batch 8 (tokens/s)",
            decode8,
            t("decode_b8_tok_s"),
            true,
        ),
        row(
            "LoRA training (tokens/s)",
            train_tok_s,
            t("train_tok_s"),
            true,
        ),
    ];
    if let Some(p) = gib(peak) {
        table.push(row(
            "training peak memory (GiB)",
            p,
            t("train_peak_gib"),
            false,
        ));
    }
    table.push(format!(
        "\nours: load {load_s:.2} s, first forward {first_s:.2} s (kernel loading); \
         transformers: {}",
        theirs
            .as_ref()
            .map_or("not run (set INSPECTOR_PYTHON)".into(), |v| v["versions"]
                .to_string())
    ));
    let table = table.join("\n");
    println!("{table}");
    if let Some(report) = env("GPU_BENCH_REPORT") {
        std::fs::write(report, format!("{table}\n")).unwrap();
    }
}
