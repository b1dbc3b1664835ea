//! candle's repacked int8 kernels (`repack_x86`, vendored) against the arithmetic they stand
//! for, done in f32: the weights as their blocks dequantize, times the activations as the
//! kernels quantize them (q8k, 256 values a block); on AMX-BF16 cores, for products of enough
//! rows, both rounded to bf16 instead. What is left is float rounding, so a wrong sign, scale,
//! offset or tile index shows far above the bound.
#![allow(dead_code)]

use candle_core::{
    DType, Device, Module, Tensor,
    quantized::{GgmlDType, QMatMul, QTensor},
};

/// Values a q8k block (the kernels' activations).
const QK: usize = 256;

/// Relative to the largest reference value; measured 1e-7–4e-7 (float rounding).
const BOUND: f32 = 1e-5;

fn values(len: usize, seed: usize, scale: impl Fn(usize) -> f32) -> Vec<f32> {
    (0..len)
        .map(|i| (((i + seed) * 7919 % 1013) as f32 / 1013.0 - 0.5) * scale(i))
        .collect()
}

/// Returns false where no repacked kernel serves these products (no AVX2, or not x86).
pub fn kernels_equal_their_arithmetic() -> bool {
    let dev = Device::Cpu;
    let amx_bf16 = candle_core::quantized::amx_bf16_min_rows();
    println!("AMX-BF16 from {amx_bf16:?} rows");
    // 80 outputs: an odd number of 16-output tiles, which the AMX-BF16 kernel pairs.
    for (n, k) in [(96, 512), (80, 512)] {
        if !weights_equal_their_arithmetic(&dev, n, k, amx_bf16) {
            return false;
        }
    }
    true
}

/// One weight shape (n x k) at q8_0 and q4k, against activations of 1 to 64 rows.
fn weights_equal_their_arithmetic(
    dev: &Device,
    n: usize,
    k: usize,
    amx_bf16: Option<usize>,
) -> bool {
    // Rows of different magnitudes, so that every row and block has its own scale.
    let w = values(n * k, 0, |i| 0.05 + 0.02 * ((i / k) % 13) as f32);
    let w = Tensor::from_vec(w, (n, k), dev).unwrap();
    for t in [GgmlDType::Q8_0, GgmlDType::Q4K] {
        let blocks = QTensor::quantize(&w, t).unwrap();
        let w_deq = blocks.dequantize(dev).unwrap();
        let mut packed = QTensor::quantize(&w, t).unwrap();
        if !packed.pack_for_cpu() {
            println!("{t:?}: no repacked kernel on this core");
            return false;
        }
        let mm = QMatMul::from_qtensor(packed).unwrap();
        // 16 rows or more run on AMX-BF16 where the core has it: 32-row units with rows past
        // m (16, 37, 50) and without (64).
        for m in [1usize, 2, 3, 4, 5, 8, 16, 37, 50, 64] {
            // Both signs, with a large negative value leading some blocks (the q8k scale
            // follows the value of largest magnitude, whatever its sign).
            let mut x = values(m * k, 31 * m, |_| 2.0);
            for (i, v) in x.iter_mut().enumerate() {
                if i % 97 == 5 {
                    *v = -3.0 - (i % 5) as f32;
                }
            }
            if m == 2 {
                // The second row lands on rounding ties: its scale is 1 (largest value -127),
                // and every other value is an odd multiple of 0.5, which q8k rounds away from
                // zero.
                for (j, v) in x[k..].iter_mut().enumerate() {
                    *v = if j % QK == 0 {
                        -127.0
                    } else {
                        (j % 9) as f32 - 4.5
                    };
                }
            }
            let x = Tensor::from_vec(x, (m, k), dev).unwrap();
            let reference = if amx_bf16.is_some_and(|rows| m >= rows) {
                // AMX-BF16: both sides rounded to bf16, summed in f32.
                let bf16 = |t: &Tensor| {
                    t.to_dtype(DType::BF16)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                };
                bf16(&x).matmul(&bf16(&w_deq).t().unwrap()).unwrap()
            } else {
                let x_q = QTensor::quantize(&x, GgmlDType::Q8K)
                    .unwrap()
                    .dequantize(dev)
                    .unwrap();
                x_q.matmul(&w_deq.t().unwrap()).unwrap()
            };
            let got = mm.forward(&x).unwrap();
            let scale = reference
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let gap = (&got - &reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            println!(
                "{t:?} m={m} n={n}: max |kernel - f32 arithmetic| / max |ref| = {:.2e}",
                gap / scale
            );
            assert!(gap <= BOUND * scale, "{t:?} m={m}: {gap} against {scale}");
        }
    }
    true
}
