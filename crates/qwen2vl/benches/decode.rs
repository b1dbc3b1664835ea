//! Decode speed on the tiny fixture (tiny-b) against transformers' `generate` on the same
//! checkpoint and prompt in the same run, and the time of one decode step with 256, 1024 and
//! 4096 tokens of context (the KV cache keeps it from growing with the context).
//!
//! Run: `INSPECTOR_PYTHON=/path/to/venv/bin/python cargo bench -p inspector-qwen2vl --bench decode`.
//! Qwen2-VL-2B shapes: the `real_size` bench measures decode there against transformers'
//! `generate` too.

use std::{path::Path, process::Command, time::Instant};

use candle_core::{DType, Device};
use inspector_qwen2vl::{
    Batch, Logits, Qwen2Vl,
    generate::{GenerationConfig, generate},
};

const NEW_TOKENS: usize = 256;
const STEPS_PER_CONTEXT: usize = 32;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-b");
    let (model, _) = Qwen2Vl::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let prompt: Vec<u32> = (0..64u32).map(|i| (i * 37) % 280).collect();
    let batch = Batch {
        input_ids: vec![prompt.clone()],
        attention_mask: None,
        images: None,
    };
    // No eos: always NEW_TOKENS tokens.
    let config = GenerationConfig::greedy(NEW_TOKENS, vec![], model.config.tokens.pad.unwrap());
    generate(&model, &batch, &config, |_, _| {}).unwrap(); // warm-up
    let t = Instant::now();
    let prefill = model.forward(&batch, Logits::Last).unwrap();
    let prefill_s = t.elapsed().as_secs_f64();
    drop(prefill);
    let t = Instant::now();
    let out = generate(&model, &batch, &config, |_, _| {}).unwrap();
    let total = t.elapsed().as_secs_f64();
    assert_eq!(out.tokens[0].len(), NEW_TOKENS);
    let ours_tps = (NEW_TOKENS - 1) as f64 / (total - prefill_s);

    let mut ours_steps = Vec::new();
    for ctx in [256usize, 1024, 4096] {
        let ids: Vec<u32> = (0..ctx as u32 - STEPS_PER_CONTEXT as u32)
            .map(|i| (i * 7) % 280)
            .collect();
        let b = Batch {
            input_ids: vec![ids],
            attention_mask: None,
            images: None,
        };
        let mut out = model.forward(&b, Logits::Last).unwrap();
        let t = Instant::now();
        for _ in 0..STEPS_PER_CONTEXT {
            model.step(&[5], &mut out.state).unwrap();
        }
        ours_steps.push(t.elapsed().as_secs_f64() * 1000.0 / STEPS_PER_CONTEXT as f64);
    }

    println!(
        "tiny-b (hidden 128, 2 layers), f32, batch 1, {NEW_TOKENS} new tokens after a 64-token prompt"
    );
    println!(
        "inspector: {ours_tps:.0} tok/s; step at context 256/1024/4096: {:.2} / {:.2} / {:.2} ms",
        ours_steps[0], ours_steps[1], ours_steps[2]
    );
    let python = std::env::var("INSPECTOR_PYTHON").unwrap_or_else(|_| "python3".into());
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/bench_transformers_decode.py");
    let prompt_arg = prompt
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(",");
    match Command::new(&python)
        .arg(script)
        .arg(&dir)
        .arg(&prompt_arg)
        .arg(NEW_TOKENS.to_string())
        .arg(STEPS_PER_CONTEXT.to_string())
        .output()
    {
        Ok(o) if o.status.success() => {
            let line = String::from_utf8_lossy(&o.stdout)
                .lines()
                .last()
                .unwrap_or_default()
                .to_string();
            let get = |k: &str| -> f64 {
                let key = format!("\"{k}\": ");
                line.find(&key)
                    .and_then(|i| line[i + key.len()..].split([',', '}', ']']).next())
                    .and_then(|v| v.trim().trim_start_matches('[').parse().ok())
                    .unwrap_or(f64::NAN)
            };
            let steps: Vec<f64> = line
                .split("\"step_ms\": [")
                .nth(1)
                .and_then(|r| r.split(']').next())
                .map(|r| r.split(',').filter_map(|x| x.trim().parse().ok()).collect())
                .unwrap_or_default();
            let tf_tps = get("decode_tok_s");
            println!(
                "transformers: {tf_tps:.0} tok/s; step at context 256/1024/4096: {}",
                steps
                    .iter()
                    .map(|s| format!("{s:.2}"))
                    .collect::<Vec<_>>()
                    .join(" / ")
            );
            println!(
                "ratio decode tok/s inspector/transformers: {:.2}",
                ours_tps / tf_tps
            );
            for (i, ctx) in [256, 1024, 4096].iter().enumerate() {
                if let Some(s) = steps.get(i) {
                    println!(
                        "ratio step time at {ctx} (transformers/inspector, >1 is better): {:.2}",
                        s / ours_steps[i]
                    );
                }
            }
        }
        Ok(o) => println!(
            "transformers side failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => println!("transformers side not run: {python}: {e}"),
    }
}
