//! The kernel dispatcher (`ops::kernel_for`): candle's fast kernels, which a GPU takes in
//! inference, give the composite ops' values on the CPU; and wherever a gradient is needed
//! they are never taken, even when forced, so training cannot lose a gradient to them.

use std::collections::HashMap;

use candle_core::{D, DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;
use inspector_qwen2vl::ops::{self, Kernel};

mod common;

/// A fixed pseudo-random fill in [-2, 2), so that every run sees the same values.
fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(6364136223846793005);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// `f` under a forced kernel, and whether candle's kernels ran.
fn under(kernel: Kernel, f: &dyn Fn() -> Tensor) -> (Tensor, bool) {
    let _k = ops::force(kernel);
    let before = ops::candle_calls();
    let y = f();
    (y, ops::candle_calls() > before)
}

fn close(what: &str, got: &Tensor, want: &Tensor, bound: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let d = common::max_diff(got, want) / common::max_abs(want).max(1e-6);
    assert!(d <= bound, "{what}: relative max|Δ| {d} > {bound}");
}

/// Every layer: candle's kernel and the composite ops agree, and the fused one where it applies.
#[test]
fn candle_kernels_give_the_composite_values() {
    let (x, x3) = (randn(&[2, 3, 7, 16], 1), randn(&[7, 3, 16], 2));
    let angles = randn(&[2, 1, 7, 8], 3);
    let angles = Tensor::cat(&[&angles, &angles], D::Minus1).unwrap();
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let angles3 = randn(&[7, 1, 8], 4);
    let angles3 = Tensor::cat(&[&angles3, &angles3], D::Minus1).unwrap();
    let (cos3, sin3) = (angles3.cos().unwrap(), angles3.sin().unwrap());
    let mask = Tensor::from_vec(
        (0..7 * 7)
            .map(|i| if i % 7 <= i / 7 { 0.0 } else { f32::MIN })
            .collect::<Vec<f32>>(),
        (1, 1, 7, 7),
        &Device::Cpu,
    )
    .and_then(|m| m.broadcast_as((2, 1, 7, 7))?.contiguous())
    .unwrap();
    let hidden = randn(&[2, 5, 16], 5);
    let params = |dtype: DType| {
        let t: HashMap<String, Tensor> = [
            ("norm.weight", randn(&[16], 6)),
            ("ln.weight", randn(&[16], 7)),
            ("ln.bias", randn(&[16], 8)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_dtype(dtype).unwrap()))
        .collect();
        VarBuilder::from_tensors(t, dtype, &Device::Cpu)
    };
    type Layer<'a> = (&'a str, Box<dyn Fn() -> Tensor + 'a>);
    let layers: Vec<Layer> = vec![
        (
            "rms_norm f32",
            Box::new(|| {
                let n = ops::RmsNorm::new(16, 1e-6, params(DType::F32).pp("norm")).unwrap();
                n.forward(&hidden).unwrap()
            }),
        ),
        (
            "rms_norm bf16 weight",
            Box::new(|| {
                let n = ops::RmsNorm::new(16, 1e-6, params(DType::BF16).pp("norm")).unwrap();
                n.forward(&hidden).unwrap().to_dtype(DType::F32).unwrap()
            }),
        ),
        (
            "layer_norm f32",
            Box::new(|| {
                let n = ops::LayerNorm::new(16, 1e-6, params(DType::F32).pp("ln")).unwrap();
                n.forward(&hidden).unwrap()
            }),
        ),
        (
            "layer_norm bf16 weight",
            Box::new(|| {
                let n = ops::LayerNorm::new(16, 1e-6, params(DType::BF16).pp("ln")).unwrap();
                n.forward(&hidden).unwrap().to_dtype(DType::F32).unwrap()
            }),
        ),
        (
            "rotary [B, H, S, D]",
            Box::new(|| ops::apply_rotary(&x, &cos, &sin).unwrap()),
        ),
        (
            "rotary [N, H, D]",
            Box::new(|| ops::apply_rotary(&x3, &cos3, &sin3).unwrap()),
        ),
        (
            "softmax",
            Box::new(|| ops::softmax_f32(&x, DType::F32).unwrap()),
        ),
        (
            "attention, causal mask",
            Box::new(|| ops::attention(&x, &x, &x, Some(&mask), 0.25).unwrap()),
        ),
        (
            "attention, no mask",
            Box::new(|| ops::attention(&x, &x, &x, None, 0.25).unwrap()),
        ),
    ];
    for (name, f) in &layers {
        let (composite, c0) = under(Kernel::Composite, f.as_ref());
        let (candle, c1) = under(Kernel::Candle, f.as_ref());
        let (fused, _) = under(Kernel::Fused, f.as_ref());
        assert!(!c0, "{name}: composite took candle's kernel");
        assert!(c1, "{name}: candle's kernel was not taken");
        // bf16 weights round the normalised values to bf16 on every path, at slightly
        // different points.
        let bound = if name.contains("bf16") { 1e-2 } else { 1e-5 };
        close(&format!("{name}: candle"), &candle, &composite, bound);
        close(&format!("{name}: fused"), &fused, &composite, bound);
    }
}

/// Where an input leads to a trainable variable, candle's kernels are refused even when
/// forced: the gradients equal the composite ops' and every input gets one.
#[test]
fn no_kernel_without_a_backward_pass_is_taken_where_a_gradient_is_needed() {
    let x = Var::from_tensor(&randn(&[2, 3, 7, 16], 9)).unwrap();
    let angles = randn(&[2, 1, 7, 16], 10);
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let weights = randn(&[2, 3, 7, 16], 11);
    let grad = |kernel: Kernel| {
        let _k = ops::force(kernel);
        let before = ops::candle_calls();
        let t = x.as_tensor();
        let y = ops::apply_rotary(t, &cos, &sin).unwrap();
        let y = ops::attention(&y, t, t, None, 0.25).unwrap();
        let y = ops::softmax_f32(&y, DType::F32).unwrap();
        let g = (y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(
            ops::candle_calls(),
            before,
            "{kernel:?}: a kernel without backward ran on a tracked input"
        );
        g.get(&x).expect("a gradient for the input").clone()
    };
    let composite = grad(Kernel::Composite);
    assert!(common::max_abs(&composite) > 0.0);
    close("forced candle", &grad(Kernel::Candle), &composite, 1e-5);
    close("fused", &grad(Kernel::Fused), &composite, 1e-5);
    // And without a variable, the same forced call does take candle's kernel.
    let (_, took) = under(Kernel::Candle, &|| {
        ops::softmax_f32(&x.as_tensor().detach(), DType::F32).unwrap()
    });
    assert!(took);
}
