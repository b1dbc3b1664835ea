//! The products of a Qwen2-VL-2B prefill, one layer's shapes at a time, in the same run:
//! - f32: candle's matmul with the weight transposed to `[in, out]` (the reference of the
//!   ratios);
//! - f32 `[out, in]`: `candle_nn::Linear` on a `[1, m, in]` input, what a dense layer runs
//!   (the gemm crate repacks the checkpoint's `[out, in]` weight on every call);
//! - f32 packed: the weight packed at load into 32-output panels
//!   (`inspector_lora::packed::PackedF32`, what f32 inference on the CPU runs), and the
//!   speed of packing it;
//! - q8_0 and q4k weights packed at load, as `inspector_qwen2vl::quant` does.
//!
//! Prints multiply-adds per second for each shape, at the core's own kernel level (AVX-512
//! with AMX, AVX-512 VNNI, AVX-VNNI or AVX2).
//!
//! Run: `cargo bench -p inspector-qwen2vl --bench int8_matmul` on an otherwise idle machine.

use candle_core::{
    Device, Module, Tensor,
    quantized::{GgmlDType, QMatMul, QTensor},
};
use inspector_lora::packed::PackedF32;

/// (what, m rows, k, n): the language model's prompt of 396 tokens and the vision tower's 1024
/// patches of a 448×448 photo, plus one decoding step.
const SHAPES: [(&str, usize, usize, usize); 6] = [
    ("LM q/o proj, 396 tokens", 396, 1536, 1536),
    ("LM gate/up, 396 tokens", 396, 1536, 8960),
    ("LM down, 396 tokens", 396, 8960, 1536),
    ("vision qkv, 1024 patches", 1024, 1280, 3840),
    ("vision fc2, 1024 patches", 1024, 5120, 1280),
    ("LM gate/up, 1 token (decode)", 1, 1536, 8960),
];

mod common;
use common::time;

fn main() {
    let dev = Device::Cpu;
    println!(
        "{:<30} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>10}",
        "shape",
        "f32 GMAC/s",
        "[out,in]",
        "packed",
        "q8_0",
        "q4k",
        "q8_0/f32",
        "q4k/f32",
        "pack GB/s"
    );
    for (what, m, k, n) in SHAPES {
        let w = Tensor::rand(-0.02f32, 0.02, (n, k), &dev).unwrap();
        let x = Tensor::rand(-0.02f32, 0.02, (m, k), &dev).unwrap();
        let reps = if m == 1 { 50 } else { 5 };
        let wt = w.t().unwrap().contiguous().unwrap();
        let f32_s = time(reps, || {
            x.matmul(&wt).unwrap();
        });
        let linear = candle_nn::Linear::new(w.clone(), None);
        let x3 = x.unsqueeze(0).unwrap();
        let dense_s = time(reps, || {
            linear.forward(&x3).unwrap();
        });
        let t = std::time::Instant::now();
        let packed = PackedF32::pack(&w).unwrap();
        let pack_s = t.elapsed().as_secs_f64();
        let packed_s = packed.map(|p| {
            time(reps, || {
                p.forward(&x).unwrap();
            })
        });
        let mut secs = Vec::new();
        for t in [GgmlDType::Q8_0, GgmlDType::Q4K] {
            let mut q = QTensor::quantize(&w, t).unwrap();
            q.pack_for_cpu();
            let mm = QMatMul::from_qtensor(q).unwrap();
            secs.push(time(reps, || {
                mm.forward(&x).unwrap();
            }));
        }
        let macs = (m * k * n) as f64 / 1e9;
        println!(
            "{:<30} {:>10.1} {:>10.1} {:>10} {:>10.1} {:>10.1} {:>8.2} {:>8.2} {:>10}",
            what,
            macs / f32_s,
            macs / dense_s,
            packed_s.map_or("—".into(), |s| format!("{:.1}", macs / s)),
            macs / secs[0],
            macs / secs[1],
            f32_s / secs[0],
            f32_s / secs[1],
            packed_s.map_or("—".into(), |_| format!(
                "{:.2}",
                (n * k * 4) as f64 / 1e9 / pack_s
            )),
        );
    }
}
