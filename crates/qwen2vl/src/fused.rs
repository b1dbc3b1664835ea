//! Fused CPU kernels with hand-written backward passes, for f32 tensors on the CPU.
//!
//! The composite versions in [`crate::ops`] (softmax, RMSNorm, LayerNorm, rotary, SiLU,
//! QuickGELU) are differentiable but slow to train: each is five to fifteen tensor ops, and
//! autograd walks every one of them backwards, allocating a tensor per step. Each op here is a
//! single pass forward and a single pass backward, parallel over rows. They are used when the
//! input is f32 on the CPU ([`crate::ops::kernel_for`] decides); any other dtype or device takes
//! candle's kernels or the composite path, so a CUDA build never reaches them. `tests/fused.rs`
//! checks values and gradients against the composite ops.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Tensor, bail,
};
use rayon::prelude::*;

use crate::vmath;

/// Rows per rayon task: enough work per task that scheduling costs stay small.
fn rows_per_task(row: usize) -> usize {
    (16_384 / row.max(1)).max(1)
}

fn f32s<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("fused {what}: expected f32")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("fused {what}: expected a contiguous tensor")
    };
    Ok(&data[start..end])
}

/// Whether `xs` can take the fused path.
pub fn applies(xs: &Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension.

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, "softmax")?;
        let d = l.dims()[l.dims().len() - 1];
        let mut y = vec![0f32; x.len()];
        let chunk = d * rows_per_task(d);
        y.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                    let max = vmath::max(x);
                    let inv = 1.0 / vmath::exp_sub_sum_into(y, x, max);
                    y.iter_mut().for_each(|y| *y *= inv);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd)?))
    }
}

/// `dx = y·(g − Σ g·y)` per row.
struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32s(s1, l1, "softmax backward")?;
        let g = f32s(s2, l2, "softmax backward")?;
        let d = l1.dims()[l1.dims().len() - 1];
        let mut dx = vec![0f32; y.len()];
        let chunk = d * rows_per_task(d);
        dx.par_chunks_mut(chunk)
            .zip(y.par_chunks(chunk).zip(g.par_chunks(chunk)))
            .for_each(|(dx, (y, g))| {
                for ((dx, y), g) in dx.chunks_mut(d).zip(y.chunks(d)).zip(g.chunks(d)) {
                    let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                    for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                        *dx = y * (g - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Softmax over the last dimension (f32, CPU), with a one-pass backward.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(Softmax)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x / sqrt(mean(x²) + eps) · w.

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, "rms_norm")?;
        let w = f32s(s2, l2, "rms_norm")?;
        let d = w.len();
        let mut y = vec![0f32; x.len()];
        let chunk = d * rows_per_task(d);
        y.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                    let r = inv_rms(x, self.eps);
                    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                        *y = x * r * w;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, w.elem_count())?;
        Ok((Some(dx), Some(dw)))
    }
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|x| x * x).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// Output: `dx` (all of x's elements) then `dw` (one row), packed in one vector.
struct RmsNormBwd {
    eps: f32,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, "rms_norm backward")?;
        let w = f32s(s2, l2, "rms_norm backward")?;
        let g = f32s(s3, l3, "rms_norm backward")?;
        let d = w.len();
        let mut out = vec![0f32; x.len() + d];
        let (dx, dw) = out.split_at_mut(x.len());
        let chunk = d * rows_per_task(d);
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
            .map(|(dx, (x, g))| {
                let mut dw = vec![0f32; d];
                for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                    let r = inv_rms(x, self.eps);
                    let mut m = 0f32;
                    for ((&x, &g), &w) in x.iter().zip(g).zip(w) {
                        m += g * w * x * r;
                    }
                    m /= d as f32;
                    for (i, dx) in dx.iter_mut().enumerate() {
                        let n = x[i] * r;
                        *dx = r * (g[i] * w[i] - n * m);
                        dw[i] += g[i] * n;
                    }
                }
                dw
            })
            .collect();
        for p in partial {
            dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + d)))
    }
}

/// RMSNorm over the last dimension (x and w f32 on the CPU), with a one-pass backward for
/// both the input and the weight.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    xs.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------------
// LayerNorm: y = (x − mean) / sqrt(var + eps) · w + b.

struct LayerNorm {
    eps: f32,
}

fn mean_inv_std(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = x.iter().sum::<f32>() / d;
    let var = x.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, "layer_norm")?;
        let w = f32s(s2, l2, "layer_norm")?;
        let b = f32s(s3, l3, "layer_norm")?;
        let d = w.len();
        let mut y = vec![0f32; x.len()];
        let chunk = d * rows_per_task(d);
        y.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                    let (mean, r) = mean_inv_std(x, self.eps);
                    for (i, y) in y.iter_mut().enumerate() {
                        *y = (x[i] - mean) * r * w[i] + b[i];
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let n = x.elem_count();
        let d = w.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, d)?;
        let db = packed.narrow(0, n + d, d)?.reshape(b.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Output: `dx`, then `dw`, then `db`, packed in one vector.
struct LayerNormBwd {
    eps: f32,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "fused-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, "layer_norm backward")?;
        let w = f32s(s2, l2, "layer_norm backward")?;
        let g = f32s(s3, l3, "layer_norm backward")?;
        let d = w.len();
        let mut out = vec![0f32; x.len() + 2 * d];
        let (dx, dwb) = out.split_at_mut(x.len());
        let chunk = d * rows_per_task(d);
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
            .map(|(dx, (x, g))| {
                let mut dwb = vec![0f32; 2 * d];
                for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                    let (mean, r) = mean_inv_std(x, self.eps);
                    let (mut m1, mut m2) = (0f32, 0f32);
                    for i in 0..d {
                        let gw = g[i] * w[i];
                        m1 += gw;
                        m2 += gw * (x[i] - mean) * r;
                    }
                    m1 /= d as f32;
                    m2 /= d as f32;
                    for (i, dx) in dx.iter_mut().enumerate() {
                        let n = (x[i] - mean) * r;
                        *dx = r * (g[i] * w[i] - m1 - n * m2);
                        dwb[i] += g[i] * n;
                        dwb[d + i] += g[i];
                    }
                }
                dwb
            })
            .collect();
        for p in partial {
            dwb.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * d)))
    }
}

/// LayerNorm with bias over the last dimension (f32 on the CPU), with a one-pass backward for
/// the input, the weight and the bias.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    xs.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

// ---------------------------------------------------------------------------------------------
// x·σ(αx): SiLU (α = 1) and QuickGELU (α = 1.702).

struct ScaledSilu {
    alpha: f32,
}

impl CustomOp1 for ScaledSilu {
    fn name(&self) -> &'static str {
        "fused-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, "silu")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(16_384)
            .zip(x.par_chunks(16_384))
            .for_each(|(y, x)| {
                vmath::silu_into(y, x, self.alpha);
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &g.contiguous()?,
            &ScaledSiluBwd { alpha: self.alpha },
        )?))
    }
}

/// `dx = g·(σ + αx·σ·(1 − σ))` with `σ = σ(αx)`.
struct ScaledSiluBwd {
    alpha: f32,
}

impl CustomOp2 for ScaledSiluBwd {
    fn name(&self) -> &'static str {
        "fused-silu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, "silu backward")?;
        let g = f32s(s2, l2, "silu backward")?;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(16_384)
            .zip(x.par_chunks(16_384).zip(g.par_chunks(16_384)))
            .for_each(|(dx, (x, g))| {
                vmath::silu_bwd_into(dx, x, g, self.alpha);
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `x·σ(αx)` (f32 on the CPU), with a one-pass backward.
pub fn scaled_silu(xs: &Tensor, alpha: f64) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(ScaledSilu {
        alpha: alpha as f32,
    })
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding, non-interleaved: y = x·cos + rotate_half(x)·sin.

/// `rows[r]` is the first element of the cos/sin row that row `r` of `x` uses.
struct Rope {
    rows: Vec<usize>,
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, "rope")?;
        let cos = f32s(s2, l2, "rope")?;
        let sin = f32s(s3, l3, "rope")?;
        let d = l1.dims()[l1.dims().len() - 1];
        let half = d / 2;
        let mut y = vec![0f32; x.len()];
        let per = rows_per_task(d);
        y.par_chunks_mut(d * per)
            .zip(x.par_chunks(d * per))
            .enumerate()
            .for_each(|(task, (y, x))| {
                for (k, (y, x)) in y.chunks_mut(d).zip(x.chunks(d)).enumerate() {
                    let at = self.rows[task * per + k];
                    let (c, s) = (&cos[at..at + d], &sin[at..at + d]);
                    for i in 0..half {
                        let (a, b) = (x[i], x[i + half]);
                        if self.inverse {
                            y[i] = a * c[i] + b * s[i + half];
                            y[i + half] = b * c[i + half] - a * s[i];
                        } else {
                            y[i] = a * c[i] - b * s[i];
                            y[i + half] = b * c[i + half] + a * s[i + half];
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = Rope {
            rows: self.rows.clone(),
            inverse: !self.inverse,
        };
        let dx = g.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(dx), None, None))
    }
}

/// Rotary embedding of `xs` (f32 on the CPU); `cos` and `sin` broadcast to `xs`'s shape and
/// receive no gradient (they are functions of the positions).
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    let d = dims[dims.len() - 1];
    if !d.is_multiple_of(2) || cos.dim(D::Minus1)? != d {
        bail!(
            "fused rope: head dim {d} and cos {:?} do not fit",
            cos.dims()
        )
    }
    let cos = cos.contiguous()?;
    let sin = sin.contiguous()?;
    // Strides of cos broadcast to x's shape: 0 on broadcast dims.
    let bcast = cos.broadcast_as(xs.shape())?;
    let strides = bcast.stride().to_vec();
    let outer = &dims[..dims.len() - 1];
    let n_rows: usize = outer.iter().product();
    let mut rows = Vec::with_capacity(n_rows);
    let mut idx = vec![0usize; outer.len()];
    for _ in 0..n_rows {
        rows.push(idx.iter().zip(&strides).map(|(i, s)| i * s).sum());
        for k in (0..idx.len()).rev() {
            idx[k] += 1;
            if idx[k] < outer[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    xs.contiguous()?.apply_op3(
        &cos,
        &sin,
        Rope {
            rows,
            inverse: false,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Attention: softmax(scale · Q Kᵀ + mask) V, skipping the keys a block of queries cannot see.

/// Query rows per block.
const ATTN_BLOCK: usize = 64;

/// Query rows per block of a forward pass that keeps nothing and where no key can be skipped
/// (the vision tower's full attention): fewer, larger blocks repack the keys and values fewer
/// times (`cargo bench -p inspector-qwen2vl --bench attention`: 74 → 84 G multiply-adds/s for
/// the vision tower's heads on a 2-core Xeon; 512 rows gained nothing more).
const ATTN_BLOCK_FULL: usize = 256;

/// `mask` is the additive mask `[B, 1, S, T]` (0 or a large negative), `limits[b·S + r]` the
/// number of leading keys row `r` of batch `b` may see beyond which it sees none (T for a row
/// that sees nothing, so that it averages every key as the composite does).
/// When the op's inputs need gradients and the probabilities fit in [`ATTN_KEEP_BYTES`], the
/// forward pass keeps them (`[B·H][S·T]`, block `r0` at `r0·T` with row stride `kend`) for the
/// backward pass, which otherwise recomputes them.
struct Attention {
    scale: f32,
    mask: Tensor,
    limits: Vec<usize>,
    keep: Option<std::sync::Mutex<Vec<f32>>>,
    /// Query heads per key/value head (grouped-query attention; 1 when `k`, `v` have `H` heads).
    /// Only a forward pass without gradients takes more than 1.
    groups: usize,
}

/// Where each `[T, D]` head of a `[B, H, T, D]` f32 tensor starts in its storage, for a layout
/// whose rows are contiguous and `D` apart (a contiguous tensor, or a cache buffer narrowed to
/// its first `T` positions): `(data, start, batch stride, head stride)`.
fn head_rows<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<(&'a [f32], usize, usize, usize)> {
    let CpuStorage::F32(data) = storage else {
        bail!("fused {what}: expected f32")
    };
    let (_, _, t, d) = layout.shape().dims4()?;
    let st = layout.stride();
    if st[3] != 1 || (t > 1 && st[2] != d) {
        bail!(
            "fused {what}: rows of {:?} are not contiguous (strides {st:?})",
            layout.dims()
        )
    }
    Ok((data, layout.start_offset(), st[0], st[1]))
}

/// The most probability memory one attention op keeps for its backward pass (per layer).
/// Beyond it (long sequences, many heads) the backward pass recomputes them.
pub const ATTN_KEEP_BYTES: usize = 128 << 20;

/// The data of a contiguous f32 CPU tensor's storage (borrowed, not copied).
fn storage_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(cpu) => f32s(cpu, layout, what),
        _ => bail!("fused {what}: expected a CPU tensor"),
    }
}

/// `C[m×n] = alpha·C + beta·A·B` on row-major slices given by strides (gemm crate, one thread:
/// the callers are already parallel over heads).
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    (c_rs, c_cs): (usize, usize),
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    debug_assert!(c.len() > (m - 1) * c_rs + (n - 1) * c_cs);
    debug_assert!(k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    debug_assert!(k == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // One row (a decoding step's query): dot products or a sum of scaled rows, without the
    // gemm crate's packing, which costs more than the product at this size (`cargo bench -p
    // inspector-qwen2vl --bench attention`, decoding step: 10.6–11.4 → 11.9–12.7 G/s).
    if m == 1 && k > 0 && (b_rs == 1 || b_cs == 1) && a_cs == 1 && c_cs == 1 {
        let (a, c) = (&a[..k], &mut c[..n]);
        if !accumulate {
            c.fill(0.0);
        }
        if b_rs == 1 {
            // Column j of B is the contiguous b[j·b_cs..][..k].
            for (j, c) in c.iter_mut().enumerate() {
                *c += beta * vmath::dot(a, &b[j * b_cs..][..k]);
            }
        } else {
            // Row i of B is the contiguous b[i·b_rs..][..n].
            for (i, &a) in a.iter().enumerate() {
                vmath::axpy(c, beta * a, &b[i * b_rs..][..n]);
            }
        }
        return;
    }
    // SAFETY: the slices cover every element the strides address (checked above in debug
    // builds, and by construction in the callers).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_cs as isize,
            c_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

impl Attention {
    /// Probabilities of query rows `r0..r0+rows` of head slice `(q, k)` in batch `b` over the
    /// first `kend` keys, into `p` (`rows × kend`).
    #[allow(clippy::too_many_arguments)]
    fn probs(
        &self,
        b: usize,
        r0: usize,
        rows: usize,
        kend: usize,
        (s, t, d): (usize, usize, usize),
        q: &[f32],
        k: &[f32],
        mask: &[f32],
        p: &mut [f32],
    ) {
        gemm_f32(
            rows,
            kend,
            d,
            p,
            (kend, 1),
            false,
            &q[r0 * d..],
            (d, 1),
            k,
            (1, d),
            self.scale,
        );
        for i in 0..rows {
            let mrow = &mask[(b * s + r0 + i) * t..][..kend];
            let row = &mut p[i * kend..(i + 1) * kend];
            let max = vmath::add_max(row, mrow);
            let inv = 1.0 / vmath::exp_sub_sum(row, max);
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }

    /// The keys a block of rows needs: the largest limit among them.
    fn kend(&self, b: usize, s: usize, r0: usize, rows: usize) -> usize {
        self.limits[b * s + r0..b * s + r0 + rows]
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = f32s(s1, l1, "attention")?;
        let (k, k0, kb, kh) = head_rows(s2, l2, "attention keys")?;
        let (v, v0, vb, vh) = head_rows(s3, l3, "attention values")?;
        let (_, h, s, d) = l1.shape().dims4()?;
        let t = l2.dims()[2];
        let kv_heads = l2.dims()[1];
        if kv_heads * self.groups != h || l3.dims() != l2.dims() {
            bail!(
                "fused attention: q {:?}, k {:?}, v {:?} with {} groups",
                l1.dims(),
                l2.dims(),
                l3.dims(),
                self.groups
            )
        }
        let (ms, ml) = self.mask.storage_and_layout();
        let mask = storage_f32(&ms, ml, "attention mask")?;
        let mut out = vec![0f32; q.len()];
        let mut kept = self.keep.as_ref().map(|k| k.lock().expect("lock"));
        if let Some(kept) = kept.as_mut() {
            kept.resize(q.len() / d * t, 0.0);
        }
        let mut scratch: Vec<&mut [f32]> = match kept.as_mut() {
            Some(kept) => kept.chunks_mut(s * t).collect(),
            None => Vec::new(),
        };
        // The kept probabilities' layout (and the backward pass) assumes ATTN_BLOCK.
        let block = if scratch.is_empty() && self.limits.iter().all(|&l| l == t) {
            ATTN_BLOCK_FULL
        } else {
            ATTN_BLOCK
        };
        let forward_head = |bh: usize, o: &mut [f32], keep: Option<&mut [f32]>| {
            let b = bh / h;
            let kvh = bh % h / self.groups;
            let (q, k, v) = (
                &q[bh * s * d..][..s * d],
                &k[k0 + b * kb + kvh * kh..][..t * d],
                &v[v0 + b * vb + kvh * vh..][..t * d],
            );
            let mut own = Vec::new();
            let (buf, kept) = match keep {
                Some(buf) => (buf, true),
                None => {
                    own.resize(block.min(s) * t, 0f32);
                    (&mut own[..], false)
                }
            };
            for r0 in (0..s).step_by(block) {
                let rows = block.min(s - r0);
                let kend = self.kend(b, s, r0, rows);
                let p = if kept {
                    &mut buf[r0 * t..]
                } else {
                    &mut buf[..]
                };
                self.probs(b, r0, rows, kend, (s, t, d), q, k, mask, p);
                gemm_f32(
                    rows,
                    d,
                    kend,
                    &mut o[r0 * d..],
                    (d, 1),
                    false,
                    p,
                    (kend, 1),
                    v,
                    (d, 1),
                    1.0,
                );
            }
        };
        if scratch.is_empty() {
            out.par_chunks_mut(s * d)
                .enumerate()
                .for_each(|(bh, o)| forward_head(bh, o, None));
        } else {
            out.par_chunks_mut(s * d)
                .zip(scratch.par_iter_mut())
                .enumerate()
                .for_each(|(bh, (o, keep))| forward_head(bh, o, Some(keep)));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.groups != 1 {
            bail!("fused attention: no backward pass for grouped heads (repeat them first)")
        }
        let (bsz, h, s, d) = q.dims4()?;
        let t = k.dim(2)?;
        let g = g.contiguous()?;
        let w = "attention backward";
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = o.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (ms, ml) = self.mask.storage_and_layout();
        let (qv, kv, vv) = (
            storage_f32(&qs, ql, w)?,
            storage_f32(&ks, kl, w)?,
            storage_f32(&vs, vl, w)?,
        );
        let (ov, gv) = (storage_f32(&os, ol, w)?, storage_f32(&gs, gl, w)?);
        let mask = storage_f32(&ms, ml, w)?;
        let kept = self
            .keep
            .as_ref()
            .map(|k| std::mem::take(&mut *k.lock().expect("lock")))
            .filter(|k| k.len() == qv.len() / d * t);
        let mut dq = vec![0f32; qv.len()];
        let mut dk = vec![0f32; kv.len()];
        let mut dv = vec![0f32; vv.len()];
        dq.par_chunks_mut(s * d)
            .zip(dk.par_chunks_mut(t * d))
            .zip(dv.par_chunks_mut(t * d))
            .enumerate()
            .for_each(|(bh, ((dq, dk), dv))| {
                let b = bh / h;
                let (q, k, v) = (
                    &qv[bh * s * d..][..s * d],
                    &kv[bh * t * d..][..t * d],
                    &vv[bh * t * d..][..t * d],
                );
                let (o, g) = (&ov[bh * s * d..][..s * d], &gv[bh * s * d..][..s * d]);
                let mut own = Vec::new();
                let mut dp = vec![0f32; ATTN_BLOCK.min(s) * t];
                for r0 in (0..s).step_by(ATTN_BLOCK) {
                    let rows = ATTN_BLOCK.min(s - r0);
                    let kend = self.kend(b, s, r0, rows);
                    let p: &[f32] = match &kept {
                        Some(kept) => &kept[bh * s * t + r0 * t..][..rows * kend],
                        None => {
                            own.resize(ATTN_BLOCK.min(s) * t, 0f32);
                            self.probs(b, r0, rows, kend, (s, t, d), q, k, mask, &mut own);
                            &own
                        }
                    };
                    let g_blk = &g[r0 * d..(r0 + rows) * d];
                    // dP = dO Vᵀ
                    gemm_f32(
                        rows,
                        kend,
                        d,
                        &mut dp,
                        (kend, 1),
                        false,
                        g_blk,
                        (d, 1),
                        v,
                        (1, d),
                        1.0,
                    );
                    // dS = scale · P ⊙ (dP − rowsum(dO ⊙ O))
                    for i in 0..rows {
                        let r = r0 + i;
                        let delta: f32 = g[r * d..(r + 1) * d]
                            .iter()
                            .zip(&o[r * d..(r + 1) * d])
                            .map(|(a, b)| a * b)
                            .sum();
                        let (pr, dpr) = (&p[i * kend..][..kend], &mut dp[i * kend..][..kend]);
                        for (x, y) in dpr.iter_mut().zip(pr) {
                            *x = self.scale * y * (*x - delta);
                        }
                    }
                    // dQ = dS K
                    gemm_f32(
                        rows,
                        d,
                        kend,
                        &mut dq[r0 * d..],
                        (d, 1),
                        false,
                        &dp,
                        (kend, 1),
                        k,
                        (d, 1),
                        1.0,
                    );
                    // dK += dSᵀ Q, dV += Pᵀ dO
                    gemm_f32(
                        kend,
                        d,
                        rows,
                        dk,
                        (d, 1),
                        true,
                        &dp,
                        (1, kend),
                        &q[r0 * d..],
                        (d, 1),
                        1.0,
                    );
                    gemm_f32(
                        kend,
                        d,
                        rows,
                        dv,
                        (d, 1),
                        true,
                        p,
                        (1, kend),
                        g_blk,
                        (d, 1),
                        1.0,
                    );
                }
            });
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (bsz, h, s, d), dev)?),
            Some(Tensor::from_vec(dk, (bsz, h, t, d), dev)?),
            Some(Tensor::from_vec(dv, (bsz, h, t, d), dev)?),
        ))
    }
}

/// `softmax(scale · q kᵀ + mask) v` for `q` `[B, H, S, D]`, `k`, `v` `[B, H, T, D]` (f32, CPU)
/// and the additive mask `[B, 1, S, T]`, which gets no gradient. Keys that every query of a
/// block masks are skipped (the upper triangle of a causal mask). When the inputs need
/// gradients, the probabilities are kept for the backward pass if they take at most
/// [`ATTN_KEEP_BYTES`] (128 MiB), and recomputed there otherwise.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    attention_keeping(q, k, v, mask, scale, ATTN_KEEP_BYTES)
}

/// [`attention`] with the memory limit for kept probabilities given (0: always recompute).
pub fn attention_keeping(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    keep_bytes: usize,
) -> Result<Tensor> {
    attention_op(q, k, v, mask, scale, keep_bytes, 1)
}

/// [`attention`] for grouped-query attention without gradients: `k`, `v` `[B, H/groups, T, D]`,
/// each key/value head serving `groups` consecutive query heads, read in place (no repeated
/// copy), as are the first `T` rows of a wider cache buffer (`narrow` on dimension 2).
pub fn attention_grouped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    groups: usize,
) -> Result<Tensor> {
    if q.track_op() || k.track_op() || v.track_op() {
        bail!("fused attention: grouped heads have no backward pass (repeat them first)")
    }
    attention_op(q, k, v, mask, scale, 0, groups)
}

fn attention_op(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    keep_bytes: usize,
    groups: usize,
) -> Result<Tensor> {
    let (b, h, s, _) = q.dims4()?;
    let t = k.dim(2)?;
    if mask.dims() != [b, 1, s, t] {
        bail!(
            "fused attention: mask {:?} for q {:?}, k {:?}",
            mask.dims(),
            q.dims(),
            k.dims()
        )
    }
    let mask = mask.contiguous()?;
    // A row sees keys up to its last unmasked one; a row that sees none takes them all.
    let visible = f32::MIN / 2.0;
    let limits: Vec<usize> = {
        let (ms, ml) = mask.storage_and_layout();
        storage_f32(&ms, ml, "attention mask")?
            .chunks(t)
            .map(|row| match row.iter().rposition(|&m| m > visible) {
                Some(j) => j + 1,
                None => t,
            })
            .collect()
    };
    let needs_grad = q.track_op() || k.track_op() || v.track_op();
    let keep =
        (needs_grad && b * h * s * t * 4 <= keep_bytes).then(|| std::sync::Mutex::new(Vec::new()));
    // Without gradients, keys and values whose rows are contiguous are read where they are.
    let rows_in_place = |t: &Tensor| -> Result<Tensor> {
        let st = t.stride();
        let d = t.dim(3)?;
        if needs_grad || st[3] != 1 || (t.dim(2)? > 1 && st[2] != d) {
            t.contiguous()
        } else {
            Ok(t.clone())
        }
    };
    q.contiguous()?.apply_op3(
        &rows_in_place(k)?,
        &rows_in_place(v)?,
        Attention {
            scale: scale as f32,
            mask,
            limits,
            keep,
            groups,
        },
    )
}
