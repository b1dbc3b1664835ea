//! Differentiable building blocks. candle's fused kernels (`rms_norm`, `layer_norm`,
//! `softmax_last_dim`, `rope`) have no backward pass and silently drop gradients, so every
//! layer here is written from ops that do have one; training and inference share the path.
//! On f32 CPU tensors each layer runs the fused kernel of [`crate::fused`] instead, one pass
//! forward and one backward.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::fused;

/// RMSNorm computed in f32, as Qwen2 does; the result is cast to the weight's dtype before the
/// scale (so a residual stream kept in f32 feeds bf16 layers).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if fused::applies(xs) && self.weight.dtype() == DType::F32 {
            return fused::rms_norm(xs, &self.weight, self.eps);
        }
        let xs = xs.to_dtype(DType::F32)?;
        let variance = xs.sqr()?.mean_keepdim(D::Minus1)?;
        let xs = xs.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        xs.to_dtype(self.weight.dtype())?
            .broadcast_mul(&self.weight)
    }
}

/// LayerNorm with bias, computed in f32; the result is in the weight's dtype.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if fused::applies(xs) && self.weight.dtype() == DType::F32 {
            return fused::layer_norm(xs, &self.weight, &self.bias, self.eps);
        }
        let xs = xs.to_dtype(DType::F32)?;
        let mean = xs.mean_keepdim(D::Minus1)?;
        let xs = xs.broadcast_sub(&mean)?;
        let var = xs.sqr()?.mean_keepdim(D::Minus1)?;
        let xs = xs.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xs.to_dtype(self.weight.dtype())?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// `[-x2, x1]` for `x = [x1, x2]` split in halves of the last dimension.
pub fn rotate_half(xs: &Tensor) -> Result<Tensor> {
    let half = xs.dim(D::Minus1)? / 2;
    let x1 = xs.narrow(D::Minus1, 0, half)?;
    let x2 = xs.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Rotary embedding, non-interleaved: `x·cos + rotate_half(x)·sin` (cos/sin broadcast).
pub fn apply_rotary(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused::applies(xs) && fused::applies(cos) && fused::applies(sin) {
        return fused::rope(xs, cos, sin);
    }
    xs.broadcast_mul(cos)? + rotate_half(xs)?.broadcast_mul(sin)?
}

/// Softmax over the last dimension in f32 (the differentiable one), cast back to `dtype`.
pub fn softmax_f32(xs: &Tensor, dtype: DType) -> Result<Tensor> {
    if fused::applies(xs) {
        return fused::softmax_last_dim(xs)?.to_dtype(dtype);
    }
    candle_nn::ops::softmax(&xs.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(dtype)
}

/// QuickGELU: `x·σ(1.702x)`.
pub fn quick_gelu(xs: &Tensor) -> Result<Tensor> {
    if fused::applies(xs) {
        return fused::scaled_silu(xs, 1.702);
    }
    xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?
}

/// SiLU: `x·σ(x)`.
pub fn silu(xs: &Tensor) -> Result<Tensor> {
    if fused::applies(xs) {
        return fused::scaled_silu(xs, 1.0);
    }
    candle_nn::ops::silu(xs)
}
