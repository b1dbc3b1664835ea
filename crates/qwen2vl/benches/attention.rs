//! The attention of a Qwen2-VL-2B prefill, as the model runs it on CPU (`ops::attention`, the
//! fused kernel), against candle's own composite of the same product in the same run
//! (`q kᵀ` matmul, `softmax_last_dim`, matmul with `v`), 2 threads: the vision tower's
//! 16 heads over the 1024 patches of a 448×448 photo (no mask), the language model's 12 heads
//! over a 396-token prompt (causal) and over 460 cached positions for one decoding step. Prints the multiply-adds per second of each and
//! their ratio.
//!
//! Run: `cargo bench -p inspector-qwen2vl --bench attention` on an otherwise idle machine.

use candle_core::{Device, Tensor};
use inspector_qwen2vl::ops;

mod common;
use common::time;

fn main() {
    let dev = Device::Cpu;
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "attention", "fused GMAC/s", "candle", "ratio"
    );
    // (what, heads, tokens, head dim, causal)
    for (what, h, s, d, causal) in [
        ("vision, 16 heads × 1024 patches", 16, 1024, 80, false),
        ("LM prefill, 12 heads × 396 tokens", 12, 396, 128, true),
        ("LM decoding step, 12 heads × 460", 12, 1, 128, false),
    ] {
        // A decoding step's one query sees the 460 cached positions.
        let t = if s == 1 { 460 } else { s };
        let q = Tensor::randn(0f32, 1.0, (1, h, s, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, h, t, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, h, t, d), &dev).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let mask = causal.then(|| {
            let m: Vec<f32> = (0..s * s)
                .map(|i| if i % s > i / s { f32::MIN } else { 0.0 })
                .collect();
            Tensor::from_vec(m, (1, 1, s, s), &dev).unwrap()
        });
        let reps = if s == 1 { 200 } else { 5 };
        let fused = time(reps, || {
            ops::attention(&q, &k, &v, mask.as_ref(), scale).unwrap();
        });
        let candle = time(reps, || {
            let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
            let scores = match &mask {
                Some(m) => scores.broadcast_add(m).unwrap(),
                None => scores,
            };
            candle_nn::ops::softmax_last_dim(&scores.contiguous().unwrap())
                .unwrap()
                .matmul(&v)
                .unwrap();
        });
        // Multiply-adds of both products over every key (the causal half is skipped by the
        // fused kernel, which is part of what it gains).
        let macs = (2 * h * s * t * d) as f64;
        println!(
            "{what:<34} {:>12.1} {:>12.1} {:>8.2}",
            macs / fused / 1e9,
            macs / candle / 1e9,
            candle / fused
        );
    }
}
