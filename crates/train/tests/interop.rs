//! Interop with PEFT and transformers, in both directions, for an adapter trained here (20
//! steps on tiny-a, vision tower and merger adapted too, written by `write_interop_fixtures`):
//!
//! - `tools/make_lora_fixtures.py check-ours` loaded it with PEFT — no missing or unexpected
//!   keys — and computed our logits (`fixtures/ours/peft_check.json`);
//! - `check-merged` loaded `inspector adapter merge`'s output with transformers
//!   (`merged_check.json`).
//!
//! These tests assert those committed results, and that today's code still computes the logits
//! PEFT and transformers were compared against. `write_interop_fixtures` (ignored) rewrites
//! `our_logits.safetensors` and `merged/` before the script is rerun.

use std::path::PathBuf;

use candle_core::{DType, Device};
use common::{fixtures, max_diff_masked, reference, tiny_a};
use inspector_qwen2vl::{Logits, Qwen2Vl, adapter};

mod common;

fn overfit() -> PathBuf {
    fixtures().join("ours")
}

fn our_logits() -> candle_core::Tensor {
    let r = reference();
    let (model, _, _) = adapter::load(
        &tiny_a(),
        &overfit().join("adapter"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    model.forward(&r.batch, Logits::All).unwrap().logits
}

fn check(file: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(overfit().join(file)).unwrap()).unwrap()
}

#[test]
fn an_adapter_trained_here_loads_in_peft_and_gives_our_logits() {
    let c = check("peft_check.json");
    assert_eq!(c["missing_keys"], serde_json::json!([]), "{c}");
    assert_eq!(c["unexpected_keys"], serde_json::json!([]), "{c}");
    assert!(
        c["lora_tensors"].as_u64().unwrap() > 28,
        "vision modules included: {c}"
    );
    assert!(c["max_abs_diff"].as_f64().unwrap() <= 1e-4, "{c}");
    // The logits PEFT was compared against are still ours.
    let r = reference();
    let committed =
        candle_core::safetensors::load(overfit().join("our_logits.safetensors"), &Device::Cpu)
            .unwrap();
    let mask = r.batch.attention_mask.clone().unwrap();
    let diff = max_diff_masked(&our_logits(), &committed["logits"], &mask);
    assert!(diff <= 1e-5, "{diff:e}");
}

#[test]
fn transformers_loads_the_merged_model_and_gives_our_logits() {
    let c = check("merged_check.json");
    assert_eq!(c["missing_keys"], serde_json::json!([]), "{c}");
    assert_eq!(c["unexpected_keys"], serde_json::json!([]), "{c}");
    assert!(c["max_abs_diff"].as_f64().unwrap() <= 1e-4, "{c}");
    // Merging today gives the committed model, whose logits are base + adapter's.
    let out = tempfile::tempdir().unwrap();
    adapter::merge(&tiny_a(), &overfit().join("adapter"), out.path()).unwrap();
    let r = reference();
    let mask = r.batch.attention_mask.clone().unwrap();
    for dir in [out.path().to_path_buf(), overfit().join("merged")] {
        let (merged, _) = Qwen2Vl::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let logits = merged.forward(&r.batch, Logits::All).unwrap().logits;
        let diff = max_diff_masked(&logits, &our_logits(), &mask);
        assert!(
            diff <= 1e-4,
            "{}: merged vs base + adapter: {diff:e}",
            dir.display()
        );
    }
}

#[test]
#[ignore = "rewrites committed fixtures; then rerun tools/make_lora_fixtures.py check-ours / check-merged"]
fn write_interop_fixtures() {
    use inspector_train::trainer::{TrainConfig, Trainer};
    let data = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        max_steps: Some(20),
        lr: 1e-2,
        grad_accum: 1,
        batch_size: 2,
        lora_r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        lora_vision: true,
        eval_every: 1000,
        ..Default::default()
    };
    let mut t = Trainer::new(
        &tiny_a(),
        common::examples(data.path(), 4),
        vec![],
        config,
        run.path(),
    )
    .unwrap();
    t.run(&std::sync::atomic::AtomicBool::new(false), &mut |_| {})
        .unwrap();
    let _ = std::fs::remove_dir_all(overfit().join("adapter"));
    std::fs::create_dir_all(overfit()).unwrap();
    std::fs::rename(run.path().join("adapter"), overfit().join("adapter")).unwrap();
    let mut map = std::collections::HashMap::new();
    map.insert("logits".to_string(), our_logits());
    candle_core::safetensors::save(&map, overfit().join("our_logits.safetensors")).unwrap();
    let merged = overfit().join("merged");
    let _ = std::fs::remove_dir_all(&merged);
    adapter::merge(&tiny_a(), &overfit().join("adapter"), &merged).unwrap();
}
