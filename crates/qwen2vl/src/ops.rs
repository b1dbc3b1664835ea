//! The model's norms, softmax, rotary, activations and attention core, each dispatched to one
//! of three kernels ([`Kernel`]):
//! - [`Kernel::Fused`]: our f32 CPU custom ops ([`crate::fused`]), one pass forward and one
//!   hand-written pass backward;
//! - [`Kernel::Candle`]: candle's fast kernels (`rms_norm`, `layer_norm`, `softmax_last_dim`,
//!   `rope`), which exist for the CPU and CUDA but have **no backward pass** and silently drop
//!   gradients;
//! - [`Kernel::Composite`]: the same layer written from differentiable tensor ops.
//!
//! The choice is made per call from the inputs: candle's kernels are taken only when no input
//! is on a path to a trainable variable (`Tensor::track_op`), so inference on a GPU gets them
//! and training can never reach them, whatever the device. f32 CPU tensors take the fused
//! kernels, which are both fast and differentiable. [`force`] overrides the choice on the
//! calling thread (within the same safety rule), so tests run every kernel on the CPU and a
//! GPU adds only the device.

use std::cell::Cell;

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::fused;

/// Which implementation computes a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Fused,
    Candle,
    Composite,
}

thread_local! {
    static FORCED: Cell<Option<Kernel>> = const { Cell::new(None) };
    static CANDLE_CALLS: Cell<u64> = const { Cell::new(0) };
}

/// Restores the previous forced kernel when dropped.
pub struct Forced(Option<Kernel>);

impl Drop for Forced {
    fn drop(&mut self) {
        FORCED.with(|f| f.set(self.0));
    }
}

/// Makes this thread prefer `kernel` until the guard drops. [`Kernel::Candle`] is still never
/// taken where a gradient is needed, and [`Kernel::Fused`] only where it applies (f32, CPU).
pub fn force(kernel: Kernel) -> Forced {
    Forced(FORCED.with(|f| f.replace(Some(kernel))))
}

/// The kernel this thread is forced to prefer, if any (decoding takes the GPU's path on the
/// CPU under [`Kernel::Candle`], so that tests exercise it).
pub fn forced() -> Option<Kernel> {
    FORCED.with(Cell::get)
}

/// How many times candle's backward-less kernels ran on this thread (for tests).
pub fn candle_calls() -> u64 {
    CANDLE_CALLS.with(Cell::get)
}

/// The kernel for a layer over `inputs` (activations and weights alike).
pub fn kernel_for(inputs: &[&Tensor]) -> Kernel {
    let fused_ok = inputs.iter().all(|t| fused::applies(t));
    let needs_grad = inputs.iter().any(|t| t.track_op());
    let choice = match FORCED.with(Cell::get) {
        Some(Kernel::Fused) if fused_ok => Kernel::Fused,
        Some(Kernel::Candle) if !needs_grad => Kernel::Candle,
        Some(Kernel::Composite) => Kernel::Composite,
        Some(_) | None if fused_ok => Kernel::Fused,
        Some(_) | None if !needs_grad && !inputs.iter().all(|t| t.device().is_cpu()) => {
            Kernel::Candle
        }
        Some(_) | None => Kernel::Composite,
    };
    if choice == Kernel::Candle {
        CANDLE_CALLS.with(|c| c.set(c.get() + 1));
    }
    choice
}

/// RMSNorm computed in f32, as Qwen2 does; the result is cast to the weight's dtype before the
/// scale (so a residual stream kept in f32 feeds bf16 layers).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    /// Ones in f32, the scale candle's kernel applies before the weight's own in its dtype.
    unit: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(size, "weight")?;
        let unit = Tensor::ones(size, DType::F32, weight.device())?;
        Ok(RmsNorm { weight, unit, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let f32_weight = self.weight.dtype() == DType::F32;
        match kernel_for(&[xs, &self.weight]) {
            Kernel::Fused if f32_weight => fused::rms_norm(xs, &self.weight, self.eps),
            Kernel::Candle => {
                let xs = xs.to_dtype(DType::F32)?.contiguous()?;
                let eps = self.eps as f32;
                if f32_weight {
                    return candle_nn::ops::rms_norm(&xs, &self.weight, eps);
                }
                candle_nn::ops::rms_norm(&xs, &self.unit, eps)?
                    .to_dtype(self.weight.dtype())?
                    .broadcast_mul(&self.weight)
            }
            _ => {
                let xs = xs.to_dtype(DType::F32)?;
                let variance = xs.sqr()?.mean_keepdim(D::Minus1)?;
                let xs = xs.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
                xs.to_dtype(self.weight.dtype())?
                    .broadcast_mul(&self.weight)
            }
        }
    }
}

/// LayerNorm with bias, computed in f32; the result is in the weight's dtype.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    /// Ones and zeros in f32: candle's kernel normalises with them, then the weight and bias
    /// apply in their dtype.
    unit: (Tensor, Tensor),
    eps: f64,
}

impl LayerNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(size, "weight")?;
        let unit = (
            Tensor::ones(size, DType::F32, weight.device())?,
            Tensor::zeros(size, DType::F32, weight.device())?,
        );
        Ok(LayerNorm {
            weight,
            bias: vb.get(size, "bias")?,
            unit,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let f32_weight = self.weight.dtype() == DType::F32;
        match kernel_for(&[xs, &self.weight, &self.bias]) {
            Kernel::Fused if f32_weight => {
                fused::layer_norm(xs, &self.weight, &self.bias, self.eps)
            }
            Kernel::Candle => {
                let xs = xs.to_dtype(DType::F32)?.contiguous()?;
                let eps = self.eps as f32;
                if f32_weight {
                    return candle_nn::ops::layer_norm(&xs, &self.weight, &self.bias, eps);
                }
                candle_nn::ops::layer_norm(&xs, &self.unit.0, &self.unit.1, eps)?
                    .to_dtype(self.weight.dtype())?
                    .broadcast_mul(&self.weight)?
                    .broadcast_add(&self.bias)
            }
            _ => {
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
    }
}

/// `[-x2, x1]` for `x = [x1, x2]` split in halves of the last dimension.
pub fn rotate_half(xs: &Tensor) -> Result<Tensor> {
    let half = xs.dim(D::Minus1)? / 2;
    let x1 = xs.narrow(D::Minus1, 0, half)?;
    let x2 = xs.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Rotary embedding, non-interleaved: `x·cos + rotate_half(x)·sin`. Two layouts: the decoder's
/// `xs [B, heads, S, hd]` with `cos`/`sin` `[B, 1, S, hd]`, and the vision tower's
/// `xs [N, heads, hd]` with `[N, 1, hd]`; the tables repeat their first half in the second.
pub fn apply_rotary(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    match kernel_for(&[xs, cos, sin]) {
        Kernel::Fused => fused::rope(xs, cos, sin),
        Kernel::Candle => {
            let half = xs.dim(D::Minus1)? / 2;
            // candle's rope takes the tables' first halves, `[S, hd/2]` or `[B, S, hd/2]`.
            let table = |t: &Tensor| t.squeeze(1)?.narrow(D::Minus1, 0, half)?.contiguous();
            match xs.rank() {
                4 => candle_nn::rotary_emb::rope(&xs.contiguous()?, &table(cos)?, &table(sin)?),
                _ => {
                    let heads_first = xs.transpose(0, 1)?.unsqueeze(0)?.contiguous()?;
                    candle_nn::rotary_emb::rope(&heads_first, &table(cos)?, &table(sin)?)?
                        .squeeze(0)?
                        .transpose(0, 1)
                }
            }
        }
        Kernel::Composite => xs.broadcast_mul(cos)? + rotate_half(xs)?.broadcast_mul(sin)?,
    }
}

/// Softmax over the last dimension in f32, cast back to `dtype`.
pub fn softmax_f32(xs: &Tensor, dtype: DType) -> Result<Tensor> {
    match kernel_for(&[xs]) {
        Kernel::Fused => fused::softmax_last_dim(xs)?.to_dtype(dtype),
        Kernel::Candle => {
            candle_nn::ops::softmax_last_dim(&xs.to_dtype(DType::F32)?.contiguous()?)?
                .to_dtype(dtype)
        }
        Kernel::Composite => {
            candle_nn::ops::softmax(&xs.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(dtype)
        }
    }
}

/// QuickGELU: `x·σ(1.702x)`. Outside the fused kernel it is written from ops that have a
/// backward pass on every device.
pub fn quick_gelu(xs: &Tensor) -> Result<Tensor> {
    match kernel_for(&[xs]) {
        Kernel::Fused => fused::scaled_silu(xs, 1.702),
        _ => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
    }
}

/// SiLU: `x·σ(x)`.
pub fn silu(xs: &Tensor) -> Result<Tensor> {
    match kernel_for(&[xs]) {
        Kernel::Fused => fused::scaled_silu(xs, 1.0),
        _ => candle_nn::ops::silu(xs),
    }
}

/// [`attention`] for grouped-query attention: `k`, `v` `[B, H/groups, T, D]`, each key/value
/// head serving `groups` consecutive query heads. Inference on the fused kernel reads the shared
/// heads (and a cache buffer's rows) in place; every other path repeats them first.
pub fn attention_grouped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    groups: usize,
) -> Result<Tensor> {
    let needs_grad = [q, k, v].iter().any(|t| t.track_op());
    if groups > 1 && !needs_grad && kernel_for(&[q, k, v, mask]) == Kernel::Fused {
        return fused::attention_grouped(q, k, v, mask, scale, groups);
    }
    attention(
        q,
        &repeat_kv(k, groups)?,
        &repeat_kv(v, groups)?,
        Some(mask),
        scale,
    )
}

/// `[B, kv, T, hd]` → `[B, kv·groups, T, hd]`, each kv head serving `groups` query heads.
pub fn repeat_kv(xs: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(xs.clone());
    }
    let (b, kv, t, hd) = xs.dims4()?;
    xs.unsqueeze(2)?
        .expand((b, kv, groups, t, hd))?
        .reshape((b, kv * groups, t, hd))
}

/// The attention core in f32: `softmax(q·kᵀ·scale + mask)·v` for `q [B, heads, S, hd]`, `k`
/// and `v` `[B, heads, T, hd]` (kv heads already repeated) and an additive `mask`
/// broadcastable to `[B, heads, S, T]` (`None`: every key visible). The fused CPU op skips
/// masked key blocks and never materialises the scores; elsewhere the scores are a tensor and
/// the softmax is dispatched like every other layer's.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let kernel = match mask {
        Some(m) => kernel_for(&[q, k, v, m]),
        None => kernel_for(&[q, k, v]),
    };
    if kernel == Kernel::Fused {
        let (b, s, t) = (q.dim(0)?, q.dim(2)?, k.dim(2)?);
        let zeros;
        let mask = match mask {
            Some(m) => m,
            None => {
                zeros = Tensor::zeros((b, 1, s, t), DType::F32, q.device())?;
                &zeros
            }
        };
        return fused::attention(q, k, v, mask, scale);
    }
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    softmax_f32(&scores, DType::F32)?.matmul(v)
}
