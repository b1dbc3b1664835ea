//! LoRA training throughput against PyTorch + PEFT on the same model, data and machine, in the
//! same run (`tools/bench_train_peft.py`).
//!
//! Model: the Qwen2-VL architecture at a small size (text hidden 256, 4 layers, 4 heads, 2 KV
//! heads, MLP 1024, vocab 2048; vision embed 128, depth 4), random weights generated here.
//! Data: 8 samples, each a 224×224 photo (64 image tokens) with the canonical instruction and
//! an answer, every sample the same length so that batches carry no padding. Recipe: LoRA r 16,
//! α 32, dropout 0.1 on the language model's seven projections, AdamW (lr 1e-4, weight decay
//! 0.01), clipping at 1.0, batch 2, no accumulation; f32 on CPU.
//!
//! Both sides run one warm-up step, then `STEPS` timed steps (forward, backward, clip, AdamW),
//! and report tokens/s (every position of every sample) and peak RSS. The two sides alternate
//! for `ROUNDS` rounds (each round a fresh trainer and a fresh Python process) and the ratio
//! is of the median tokens/s: this machine's speed drifts by ±10 % from minute to minute.
//!
//! Run: `INSPECTOR_PYTHON=/path/to/venv/bin/python cargo bench -p inspector-train --bench train`
//! (the venv needs torch, transformers and peft; without it only our side is measured).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::AtomicBool,
    time::Instant,
};

use candle_core::{DType, Device, Tensor};
use inspector_core::{Annotation, Risk, Violation};
use inspector_qwen2vl::{Qwen2Vl, chat::ChatTokenizer, init};
use inspector_train::{
    data::{Example, example},
    trainer::{Event, TrainConfig, Trainer},
};

const STEPS: u64 = 10;
/// Rounds of (ours, theirs), alternating, so that both sides see the same drift in the
/// machine's speed; the ratio is of the medians.
const ROUNDS: usize = 3;
const SAMPLES: usize = 8;
const SIDE: u32 = 224;

const CONFIG: &str = r#"{
  "architectures": ["Qwen2VLForConditionalGeneration"],
  "model_type": "qwen2_vl",
  "bos_token_id": 306, "eos_token_id": 304, "pad_token_id": 305,
  "vision_start_token_id": 302, "vision_end_token_id": 303, "vision_token_id": 307,
  "image_token_id": 300, "video_token_id": 301,
  "hidden_act": "silu", "hidden_size": 256, "intermediate_size": 1024,
  "initializer_range": 0.02, "max_position_embeddings": 4096, "max_window_layers": 4,
  "num_attention_heads": 4, "num_hidden_layers": 4, "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 4096,
  "tie_word_embeddings": false, "torch_dtype": "float32", "use_cache": true,
  "use_sliding_window": false, "attention_dropout": 0.0,
  "vision_config": {
    "depth": 4, "embed_dim": 128, "mlp_ratio": 4, "num_heads": 4, "in_chans": 3,
    "hidden_size": 256, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
    "temporal_patch_size": 2, "hidden_act": "quick_gelu"
  },
  "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
  "vocab_size": 2048
}"#;

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn tiny_a() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../qwen2vl/tests/fixtures/tiny-a")
}

/// The small model: random weights, tiny-a's tokenizer, chat template and processor.
fn model_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("train-bench-model");
    if !dir.join("model.safetensors.index.json").exists() {
        init::write_random_checkpoint(&dir, CONFIG, 0.02, 2026).unwrap();
    }
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "preprocessor_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(tiny_a().join(f), dir.join(f)).unwrap();
    }
    dir
}

/// Eight distinct photos with the same answer, so every sample has the same number of tokens
/// (batches carry no padding, and both sides see the same work whatever the batch order).
fn examples(dir: &Path, data: &Path) -> Vec<Example> {
    let (model, _) = Qwen2Vl::load(dir, DType::F32, &Device::Cpu).unwrap();
    let chat = ChatTokenizer::load(dir, model.config.tokens.image_pad).unwrap();
    (0..SAMPLES)
        .map(|k| {
            let path = data.join(format!("{k}.png"));
            image::RgbImage::from_fn(SIDE, SIDE, |x, y| {
                let inside = (40..180).contains(&x) && (30..200).contains(&y);
                if inside {
                    image::Rgb([30, 30, 30])
                } else {
                    image::Rgb([(x + 29 * k as u32) as u8, (y * 2) as u8, (90 * k) as u8])
                }
            })
            .save(&path)
            .unwrap();
            let record = inspector_dataset::Record {
                line: k + 1,
                annotation: Annotation {
                    image: format!("{k}.png"),
                    violations: vec![Violation {
                        description: "作业人员未佩戴安全帽".into(),
                        rule: "《安全作业规程》第3.1条".into(),
                        risk: Risk::High,
                        suggestion: Some("立即停止作业并佩戴安全帽".into()),
                        bbox: Some([40.0, 30.0, 180.0, 200.0]),
                    }],
                },
                path,
                size: (SIDE, SIDE),
                sha256: [k as u8; 32],
                category: "x".into(),
                rule_ids: vec![],
            };
            example(&chat, &model.processor, &record, 4096)
                .unwrap()
                .unwrap()
        })
        .collect()
}

/// What both sides train on, for the Python side.
fn write_inputs(examples: &[Example], path: &Path) {
    let n = examples.len();
    let len = examples[0].input_ids.len();
    let ids: Vec<i64> = examples
        .iter()
        .flat_map(|e| e.input_ids.iter().map(|&t| t as i64))
        .collect();
    let labels: Vec<i64> = examples.iter().flat_map(|e| e.labels.clone()).collect();
    let pixels: Vec<Tensor> = examples.iter().map(|e| e.image.pixels().unwrap()).collect();
    let grid: Vec<i64> = examples
        .iter()
        .flat_map(|e| e.image.grid_thw().map(|g| g as i64))
        .collect();
    let d = Device::Cpu;
    let mut map = HashMap::new();
    map.insert(
        "input_ids".to_string(),
        Tensor::from_vec(ids, (n, len), &d).unwrap(),
    );
    map.insert(
        "labels".to_string(),
        Tensor::from_vec(labels, (n, len), &d).unwrap(),
    );
    map.insert("pixel_values".to_string(), Tensor::cat(&pixels, 0).unwrap());
    map.insert(
        "image_grid_thw".to_string(),
        Tensor::from_vec(grid, (n, 3), &d).unwrap(),
    );
    candle_core::safetensors::save(&map, path).unwrap();
}

fn main() {
    inspector_train::keep_freed_memory();
    let dir = model_dir();
    let data = tempfile::tempdir().unwrap();
    let examples = examples(&dir, data.path());
    let len = examples[0].input_ids.len();
    assert!(
        examples.iter().all(|e| e.input_ids.len() == len),
        "every sample has the same length"
    );
    let inputs = Path::new(env!("CARGO_TARGET_TMPDIR")).join("train-bench-inputs.safetensors");
    write_inputs(&examples, &inputs);
    println!(
        "{SAMPLES} samples of {len} tokens ({} image tokens, {} answer tokens each); batch 2; {STEPS} timed steps",
        examples[0].image.n_tokens(2),
        examples[0].answer_tokens()
    );

    let python = std::env::var("INSPECTOR_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut their_rss = 0f64;
    for round in 1..=ROUNDS {
        let (tps, tokens, seconds, params) = run_ours(&dir, examples.clone());
        println!(
            "round {round}: inspector (candle):  {tps:8.1} tokens/s  ({tokens} tokens in {seconds:.2} s), {params} LoRA parameters"
        );
        ours.push(tps);
        if let Some(v) = run_theirs(&python, &dir, &inputs) {
            let tps = v["tokens_per_s"].as_f64().unwrap();
            their_rss = their_rss.max(v["peak_rss_mb"].as_f64().unwrap());
            println!(
                "round {round}: PyTorch + PEFT:      {tps:8.1} tokens/s  ({} tokens in {:.2} s), peak RSS {:.0} MB, {} LoRA parameters; torch {}, transformers {}, peft {}, {} threads",
                v["tokens"],
                v["seconds"].as_f64().unwrap(),
                v["peak_rss_mb"].as_f64().unwrap(),
                v["trainable_params"],
                v["torch"],
                v["transformers"],
                v["peft"],
                v["threads"]
            );
            println!("round {round}: ratio {:.2}", ours[ours.len() - 1] / tps);
            theirs.push(tps);
        }
    }
    let ours_rss = peak_rss_mb();
    let med_ours = median(&ours);
    println!(
        "inspector (candle):  median {med_ours:8.1} tokens/s over {ROUNDS} rounds, peak RSS {ours_rss:.0} MB"
    );
    if theirs.is_empty() {
        println!(
            "(set INSPECTOR_PYTHON to a venv with torch, transformers and peft for the ratio)"
        );
        return;
    }
    let med_theirs = median(&theirs);
    println!(
        "PyTorch + PEFT:      median {med_theirs:8.1} tokens/s over {} rounds, peak RSS {their_rss:.0} MB",
        theirs.len()
    );
    println!(
        "ratio inspector / PyTorch: {:.2} (median tokens/s); peak RSS {:.2}×",
        med_ours / med_theirs,
        ours_rss / their_rss
    );
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Our side: the real trainer, timed from the end of the warm-up step to the end of the last.
/// Returns tokens/s, tokens, seconds and the trainable parameter count.
fn run_ours(dir: &Path, examples: Vec<Example>) -> (f64, usize, f64, usize) {
    let out = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        max_steps: Some(STEPS + 1),
        epochs: 1000,
        lr: 1e-4,
        warmup_ratio: 0.0,
        grad_accum: 1,
        batch_size: 2,
        save_every: 1_000_000,
        log_every: 1_000_000,
        ..Default::default()
    };
    let mut trainer = Trainer::new(dir, examples, vec![], config, out.path()).unwrap();
    let mut start = None;
    let mut tokens = 0usize;
    let mut end = Instant::now();
    trainer
        .run(&AtomicBool::new(false), &mut |e| {
            if let Event::Step {
                step, tokens: n, ..
            } = e
            {
                if *step == 1 {
                    start = Some(Instant::now());
                } else {
                    tokens += n;
                    end = Instant::now();
                }
            }
        })
        .unwrap();
    let seconds = (end - start.unwrap()).as_secs_f64();
    (
        tokens as f64 / seconds,
        tokens,
        seconds,
        trainer.trainable_params(),
    )
}

/// The reference side (`tools/bench_train_peft.py`), or `None` when it cannot run.
fn run_theirs(python: &str, dir: &Path, inputs: &Path) -> Option<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/bench_train_peft.py");
    let run = Command::new(python)
        .arg(&script)
        .arg(dir)
        .arg(inputs)
        .arg(STEPS.to_string())
        .output();
    match run {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).ok(),
        Ok(o) => {
            eprintln!("reference failed:\n{}", String::from_utf8_lossy(&o.stderr));
            None
        }
        Err(e) => {
            eprintln!("reference not run ({python}: {e})");
            None
        }
    }
}
