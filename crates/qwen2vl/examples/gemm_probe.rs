//! GEMM throughput of candle's CPU matmul (the `gemm` crate) for the shapes of the training
//! benchmark's step, plain, with a transposed right side, and batched. Diagnostic only; the
//! numpy/torch side is `tools/gemm_probe.py` (BENCHMARKS.md, LoRA training throughput).
//!
//!     cargo run --release -p inspector-qwen2vl --example gemm_probe

use candle_core::{Device, Tensor};
fn main() -> candle_core::Result<()> {
    let shapes = [
        ("qo fwd", 1490, 256, 256),
        ("kv fwd", 1490, 256, 128),
        ("gate/up fwd", 1490, 256, 1024),
        ("down fwd", 1490, 1024, 256),
        ("down dX", 1490, 256, 1024),
        ("up dW", 1024, 1490, 256),
        ("attn QK", 745, 64, 745),
        ("attn PV", 745, 745, 64),
    ];
    for (name, m, k, n) in shapes {
        let a = Tensor::rand(0f32, 1., (m, k), &Device::Cpu)?;
        let b = Tensor::rand(0f32, 1., (k, n), &Device::Cpu)?;
        let _ = a.matmul(&b)?;
        let t = std::time::Instant::now();
        for _ in 0..20 {
            let _ = a.matmul(&b)?;
        }
        let s = t.elapsed().as_secs_f64() / 20.0;
        let bt = Tensor::rand(0f32, 1., (n, k), &Device::Cpu)?;
        let _ = a.matmul(&bt.t()?)?;
        let t = std::time::Instant::now();
        for _ in 0..20 {
            let _ = a.matmul(&bt.t()?)?;
        }
        let s2 = t.elapsed().as_secs_f64() / 20.0;
        let a3 = Tensor::rand(0f32, 1., (2, m, k), &Device::Cpu)?;
        let _ = a3.broadcast_matmul(&bt.t()?)?;
        let t = std::time::Instant::now();
        for _ in 0..20 {
            let _ = a3.broadcast_matmul(&bt.t()?)?;
        }
        let s3 = t.elapsed().as_secs_f64() / 20.0;
        let f = 2.0 * (m * k * n) as f64;
        println!(
            "{name:12} {m}x{k}x{n}  candle/gemm {:6.1}  B^T {:6.1}  batched-3d B^T {:6.1} GFLOP/s",
            f / s / 1e9,
            f / s2 / 1e9,
            2.0 * f / s3 / 1e9
        );
    }
    Ok(())
}
