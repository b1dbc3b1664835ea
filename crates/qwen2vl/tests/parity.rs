//! f32 parity with transformers 5.24 on every tiny fixture: position ids identical, image
//! embeddings and logits within 1e-4 (logits compared where the attention mask is 1, since
//! transformers' logits at padded positions are meaningless). Also: decoding with the KV cache
//! equals the full forward, and bf16's relative error stays under 2e-2.

mod common;

use candle_core::{DType, Device, IndexOp};
use common::*;
use inspector_qwen2vl::{Logits, Qwen2Vl, test_device};

test_device!(
    f32_parity,
    f32_parity_with_transformers_cpu,
    f32_parity_with_transformers_gpu_kernels_on_cpu,
    f32_parity_with_transformers_cuda
);
test_device!(
    kv_cache,
    kv_cache_decoding_equals_full_forward_cpu,
    kv_cache_decoding_equals_full_forward_gpu_kernels_on_cpu,
    kv_cache_decoding_equals_full_forward_cuda
);
test_device!(
    bf16_error,
    bf16_relative_error_cpu,
    bf16_relative_error_gpu_kernels_on_cpu,
    bf16_relative_error_cuda
);

fn f32_parity(device: &Device) {
    let mut report = Vec::new();
    for model_name in MODELS {
        let (model, _) = Qwen2Vl::load(&fixtures().join(model_name), DType::F32, device).unwrap();
        for case in CASES {
            let r = reference(model_name, case);
            let batch = batch(&r);
            let out = model.forward(&batch, Logits::All).unwrap();
            // Positions: identical.
            let want = r["position_ids"]
                .to_dtype(DType::I64)
                .unwrap()
                .to_vec3::<i64>()
                .unwrap();
            for (axis, want_axis) in want.iter().enumerate() {
                assert_eq!(
                    &out.rope.positions[axis], want_axis,
                    "{model_name}/{case}: position_ids axis {axis}"
                );
            }
            let deltas: Vec<i64> = r["rope_deltas"]
                .flatten_all()
                .unwrap()
                .to_vec1::<i64>()
                .unwrap();
            assert_eq!(out.rope.deltas, deltas, "{model_name}/{case}: rope_deltas");
            // Image embeddings.
            let embed_diff = match &batch.images {
                Some(images) => {
                    let ours = model.image_embeds(images).unwrap();
                    let d = max_diff(&ours, &r["image_embeds"]);
                    assert!(d <= 1e-4, "{model_name}/{case}: image embeds differ by {d}");
                    d
                }
                None => 0.0,
            };
            // Logits.
            let mask = batch.attention_mask.clone().unwrap();
            let d = max_diff_masked(&out.logits, &r["logits"], &mask);
            assert!(d <= 1e-4, "{model_name}/{case}: logits differ by {d}");
            report.push(format!(
                "{model_name}/{case}: image_embeds {embed_diff:.2e}, logits {d:.2e}"
            ));
        }
    }
    println!("{}", report.join("\n"));
}

/// Prefill a prefix, then feed the remaining tokens one by one: each step's logits equal the
/// full forward's at that position.
fn kv_cache(device: &Device) {
    for model_name in MODELS {
        let (model, _) = Qwen2Vl::load(&fixtures().join(model_name), DType::F32, device).unwrap();
        for case in ["text_only", "two_images", "batch_left_pad"] {
            let r = reference(model_name, case);
            let full_batch = batch(&r);
            let full = model.forward(&full_batch, Logits::All).unwrap();
            let s = full_batch.input_ids[0].len();
            // Decode the trailing text tokens (up to 4), never splitting an image.
            let pad = model.config.tokens.image_pad;
            let tail = full_batch
                .input_ids
                .iter()
                .map(|row| row.iter().rev().take_while(|&&t| t != pad).count())
                .min()
                .unwrap()
                .min(4);
            assert!(
                tail >= 2,
                "{model_name}/{case}: too few trailing text tokens"
            );
            let mut prefix = full_batch.clone();
            for row in prefix.input_ids.iter_mut() {
                row.truncate(s - tail);
            }
            for row in prefix.attention_mask.as_mut().unwrap().iter_mut() {
                row.truncate(s - tail);
            }
            let mut out = model.forward(&prefix, Logits::Last).unwrap();
            let first = out.logits.clone();
            let want = full.logits.i((.., s - tail - 1, ..)).unwrap();
            let d = max_diff(&first, &want);
            assert!(
                d <= 1e-4,
                "{model_name}/{case}: prefill last logits differ by {d}"
            );
            for k in 0..tail {
                let pos = s - tail + k;
                let tokens: Vec<u32> = full_batch.input_ids.iter().map(|row| row[pos]).collect();
                let logits = model.step(&tokens, &mut out.state).unwrap();
                let want = full.logits.i((.., pos, ..)).unwrap();
                let d = max_diff(&logits, &want);
                assert!(d <= 1e-4, "{model_name}/{case}: step {k} differs by {d}");
            }
        }
    }
}

fn bf16_error(device: &Device) {
    let mut report = Vec::new();
    for model_name in MODELS {
        let (model, _) = Qwen2Vl::load(&fixtures().join(model_name), DType::BF16, device).unwrap();
        for case in CASES {
            let r = reference(model_name, case);
            let batch = batch(&r);
            let out = model.forward(&batch, Logits::All).unwrap();
            let mask = batch.attention_mask.clone().unwrap();
            let rel = max_diff_masked(&out.logits, &r["logits"], &mask) / max_abs(&r["logits"]);
            report.push((format!("{model_name}/{case}"), rel));
        }
    }
    for (name, rel) in &report {
        println!("{name}: bf16 relative error {rel:.4}");
    }
    // transformers' own bf16 error on the same cases (tools/qwen2vl_bf16_reference_error.py).
    let reference_text =
        std::fs::read_to_string(fixtures().join("bf16_reference_error.txt")).unwrap();
    let theirs: std::collections::HashMap<String, f32> = reference_text
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (format!("{}/{}", f[0], f[1]), f[2].parse().unwrap())
        })
        .collect();
    let (mut ours_sum, mut theirs_sum) = (0.0, 0.0);
    for (name, rel) in &report {
        let t = theirs[name];
        ours_sum += rel;
        theirs_sum += t;
        // The bound is 2e-2. tiny-b (head_dim 32, one KV head, weights of std 0.1) is harder
        // than a trained checkpoint: transformers itself reaches 0.029 there, and weight
        // rounding alone 0.016. On it we require no worse than 1.25× transformers' own error.
        let bound = if name.starts_with("tiny-b") {
            (1.25 * t).max(2e-2)
        } else {
            2e-2
        };
        assert!(
            *rel <= bound,
            "{name}: bf16 relative error {rel} (transformers: {t})"
        );
    }
    println!(
        "mean relative error: ours {:.4}, transformers {:.4}",
        ours_sum / 15.0,
        theirs_sum / 15.0
    );
    assert!(
        ours_sum <= theirs_sum,
        "on average no worse than transformers' bf16"
    );
}
