//! The f32 products of a Qwen2-VL-2B prefill, one layer's shapes at a time: the weight packed
//! at load ([`inspector_lora::packed::PackedF32`]) against candle's matmul of the checkpoint's
//! `[out, in]` weight (what a dense layer runs), in the same run. Prints multiply-adds per
//! second and the ratio.
//!
//! Run: `cargo bench -p inspector-lora --bench packed_f32` on an otherwise idle machine.

use std::time::Instant;

use candle_core::{Device, Module, Tensor};
use inspector_lora::packed::PackedF32;

const SHAPES: [(&str, usize, usize, usize); 8] = [
    ("vision qkv, 1024 patches", 1024, 1280, 3840),
    ("vision proj, 1024 patches", 1024, 1280, 1280),
    ("vision fc1, 1024 patches", 1024, 1280, 5120),
    ("vision fc2, 1024 patches", 1024, 5120, 1280),
    ("LM q/k/v, 396 tokens", 396, 1536, 2048),
    ("LM gate/up, 396 tokens", 396, 1536, 8960),
    ("LM down, 396 tokens", 396, 8960, 1536),
    ("LM gate/up, 1 token", 1, 1536, 8960),
];

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let dev = Device::Cpu;
    println!(
        "{:<28} {:>14} {:>14} {:>7} {:>13}",
        "shape", "candle GMAC/s", "packed GMAC/s", "ratio", "pack GB/s"
    );
    for (what, m, k, n) in SHAPES {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev).unwrap();
        // `[1, m, k]`, as the model's layers see it.
        let x = Tensor::randn(0f32, 1., (1, m, k), &dev).unwrap();
        let linear = candle_nn::Linear::new(w.clone(), None);
        let reps = if m == 1 { 50 } else { 5 };
        let dense = time(reps, || {
            linear.forward(&x).unwrap();
        });
        let t = Instant::now();
        let p = PackedF32::pack(&w).unwrap().expect("AVX-512F");
        let pack_s = t.elapsed().as_secs_f64();
        let packed = time(reps, || {
            p.forward(&x, None).unwrap();
        });
        let macs = (m * k * n) as f64 / 1e9;
        println!(
            "{:<28} {:>14.1} {:>14.1} {:>7.2} {:>13.2}",
            what,
            macs / dense,
            macs / packed,
            dense / packed,
            (n * k * 4) as f64 / 1e9 / pack_s
        );
    }
}
