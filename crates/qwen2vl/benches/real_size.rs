//! Qwen2-VL-2B shapes with random weights (generated here, never committed): peak RSS, prefill
//! time for one 448×448 image plus 64 text tokens, and decode tokens/s — beside transformers'
//! figures for the same checkpoint and the same inputs, measured in the same run by
//! `tools/bench_transformers_qwen2vl.py`.
//!
//! Run: `INSPECTOR_PYTHON=/path/to/venv/bin/python cargo bench -p inspector-qwen2vl --bench real_size`
//! (the venv needs torch and transformers; without it only our side is measured). Needs about
//! 9 GB of disk under target/ and 10 GB of memory per side; the sides run one after the other.

use std::{collections::HashMap, path::Path, process::Command, time::Instant};

use candle_core::{DType, Device, Tensor};
use inspector_qwen2vl::{Batch, Logits, Qwen2Vl, VisionInput, image, init};

const TEXT_TOKENS: usize = 64;
const DECODE_STEPS: usize = 32;

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qwen2vl-2b-random");
    if !dir.join("model.safetensors.index.json").exists() {
        let t = Instant::now();
        init::write_random_checkpoint(&dir, init::QWEN2_VL_2B_CONFIG, 0.02, 2026).unwrap();
        println!(
            "generated random 2B checkpoint in {:.1}s at {}",
            t.elapsed().as_secs_f64(),
            dir.display()
        );
    }

    let t = Instant::now();
    let (model, info) = Qwen2Vl::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let load_s = t.elapsed().as_secs_f64();
    println!("loaded {} parameters in {load_s:.1}s", info.total_params());

    // A deterministic 448×448 picture (smooth gradients and stripes).
    let img = ::image::RgbImage::from_fn(448, 448, |x, y| {
        ::image::Rgb([
            (x / 2) as u8,
            (y / 2) as u8,
            (((x + y) / 7) % 2 * 200) as u8,
        ])
    });
    let processed = image::process_rgb(&img, &model.processor).unwrap();
    assert_eq!(processed.grid_thw, [1, 32, 32]);
    let tk = &model.config.tokens;
    let mut ids = vec![tk.vision_start.unwrap()];
    ids.extend(std::iter::repeat_n(tk.image_pad, processed.n_tokens(2)));
    ids.push(tk.vision_end.unwrap());
    ids.extend((0..TEXT_TOKENS as u32).map(|i| 1000 + i * 37));
    let n_prompt = ids.len();
    let batch = Batch {
        input_ids: vec![ids.clone()],
        attention_mask: None,
        images: Some(VisionInput {
            pixel_values: processed.pixel_values.clone(),
            grid_thw: vec![processed.grid_thw],
        }),
    };

    // Prefill twice: the first run also faults the memory-mapped weights in.
    let mut prefill = Vec::new();
    let mut out = None;
    for _ in 0..2 {
        let t = Instant::now();
        out = Some(model.forward(&batch, Logits::Last).unwrap());
        prefill.push(t.elapsed().as_secs_f64());
    }
    let mut out = out.unwrap();
    let last_logits = out.logits.clone();
    let mut token = argmax(&out.logits);
    let t = Instant::now();
    for _ in 0..DECODE_STEPS {
        let logits = model.step(&[token], &mut out.state).unwrap();
        token = argmax(&logits);
    }
    let decode_tps = DECODE_STEPS as f64 / t.elapsed().as_secs_f64();
    let rss = peak_rss_mb();
    println!(
        "inspector (candle, f32): prefill {n_prompt} tokens {:.2}s (first {:.2}s), decode {decode_tps:.2} tok/s, peak RSS {rss:.0} MB",
        prefill[1], prefill[0]
    );

    // Inputs and our logits for the reference run.
    let mut tensors = HashMap::new();
    tensors.insert(
        "input_ids".to_string(),
        Tensor::from_vec(
            ids.iter().map(|&t| t as i64).collect::<Vec<_>>(),
            (1, n_prompt),
            &Device::Cpu,
        )
        .unwrap(),
    );
    tensors.insert("pixel_values".to_string(), processed.pixel_values.clone());
    tensors.insert(
        "image_grid_thw".to_string(),
        Tensor::new(&[[1i64, 32, 32]], &Device::Cpu).unwrap(),
    );
    tensors.insert(
        "last_logits".to_string(),
        last_logits.to_dtype(DType::F32).unwrap(),
    );
    let inputs = dir.join("bench_inputs.safetensors");
    candle_core::safetensors::save(&tensors, &inputs).unwrap();
    drop(model);

    let python = std::env::var("INSPECTOR_PYTHON").unwrap_or_else(|_| "python3".into());
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/bench_transformers_qwen2vl.py");
    let result = Command::new(&python)
        .arg(&script)
        .arg(&dir)
        .arg(&inputs)
        .arg(DECODE_STEPS.to_string())
        .output();
    match result {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let line = text.lines().last().unwrap_or_default();
            println!("transformers: {line}");
            let get = |k: &str| -> f64 {
                let key = format!("\"{k}\": ");
                line.find(&key)
                    .and_then(|i| line[i + key.len()..].split([',', '}']).next())
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(f64::NAN)
            };
            let (tf_prefill, tf_decode, tf_rss) =
                (get("prefill_s"), get("decode_tok_s"), get("peak_rss_mb"));
            println!("| | prefill {n_prompt} tokens (s) | decode (tok/s) | peak RSS (MB) |");
            println!("|---|---|---|---|");
            println!(
                "| inspector (candle) | {:.2} | {decode_tps:.2} | {rss:.0} |",
                prefill[1]
            );
            println!("| transformers | {tf_prefill:.2} | {tf_decode:.2} | {tf_rss:.0} |");
            println!(
                "| ratio (inspector vs transformers, >1 is better) | {:.2} | {:.2} | {:.2} |",
                tf_prefill / prefill[1],
                decode_tps / tf_decode,
                tf_rss / rss
            );
            println!(
                "last-position logits max |Δ| vs transformers: {:.2e}",
                get("max_abs_diff")
            );
        }
        Ok(o) => println!(
            "transformers side failed (is INSPECTOR_PYTHON a venv with torch + transformers?):\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => println!("transformers side not run: {python}: {e}"),
    }
}

fn argmax(logits: &Tensor) -> u32 {
    logits
        .flatten_all()
        .unwrap()
        .argmax(0)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap()
}
