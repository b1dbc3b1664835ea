//! A dense f32 weight packed once, at load, for the CPU's f32 product: the base of an inference
//! layer on x86 cores with AVX-512.
//!
//! candle's f32 matmul (the `gemm` crate) repacks the weight of `x·Wᵀ` on every call, one value
//! at a time, because a checkpoint stores `W` as `[out, in]` rows: 14 % of a Qwen2-VL-2B prefill
//! went there. This type stores the weight as panels of 32 outputs, `[out/32][in][32]`, so the
//! kernel streams each panel in order and nothing is repacked per call. It holds the only copy
//! of the weight (the same bytes as the `[out, in]` tensor it replaces).
//!
//! The product: `x` is copied once per call into blocks of 12 rows laid out `[k][12]`, so a
//! step's 12 broadcasts are adjacent. Each thread takes groups of 8 panels; for each block of
//! 512 inner values, every row block of `x` passes over the group's panels (which stay in L2),
//! 12 rows × 32 outputs at a time in 24 AVX-512 accumulators, the panel fetched ahead. Tiles
//! are summed in a per-thread buffer and copied out in rows once. Threads come from candle's
//! CPU pool (`candle_core::utils::barrier_pool`). Sums are f32 fused multiply-adds in the order
//! of the inner dimension, so results differ from candle's GEMM by rounding only.
//!
//! It has no backward pass: a caller that trains keeps the dense tensor.

use candle_core::{DType, Device, Result, Tensor};

/// Outputs per panel: two AVX-512 vectors.
pub const PANEL: usize = 32;
/// Rows of `x` per kernel step.
const ROWS: usize = 12;
/// The inner dimension is walked in blocks of this many values, so that a panel's block
/// (`KC × 32 × 4` bytes) stays in the core's L2 while every row block of `x` passes over it.
const KC: usize = 512;
/// Panels per group (see `gemm`).
const GROUP: usize = 8;
/// Row blocks summed at a time: bounds the per-thread tile buffer (`CHUNK × GROUP × 12 × 32`
/// values, 768 KiB) whatever the number of rows.
const CHUNK: usize = 64;

/// `[out, in]` f32 weights as `[out/32][in][32]` panels, and the layer's bias.
pub struct PackedF32 {
    data: Vec<f32>,
    out_dim: usize,
    in_dim: usize,
    /// `[out]`, read once at load (the kernel starts its sums from it).
    bias: Option<Vec<f32>>,
}

impl std::fmt::Debug for PackedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedF32")
            .field("out_dim", &self.out_dim)
            .field("in_dim", &self.in_dim)
            .finish()
    }
}

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so that a closure captures the whole `SendPtr`).
    fn get(self) -> *mut T {
        self.0
    }
}

impl PackedF32 {
    /// Whether a weight of `[out_dim, in_dim]` on `device` can be packed here: a CPU with
    /// AVX-512F and whole panels of outputs.
    pub fn applies(out_dim: usize, in_dim: usize, device: &Device) -> bool {
        device.is_cpu()
            && in_dim > 0
            && out_dim > 0
            && out_dim.is_multiple_of(PANEL)
            && has_avx512()
    }

    /// Packs `w` (`[out, in]`, f32, on the CPU). `None` where [`PackedF32::applies`] is false.
    pub fn pack(w: &Tensor) -> Result<Option<PackedF32>> {
        let (out_dim, in_dim) = w.dims2()?;
        if w.dtype() != DType::F32 || !Self::applies(out_dim, in_dim, w.device()) {
            return Ok(None);
        }
        let w = w.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Ok(None);
        };
        let o = layout.start_offset();
        let src = &cpu.as_slice::<f32>()?[o..o + out_dim * in_dim];
        Ok(Some(Self::from_rows(src, out_dim, in_dim)))
    }

    /// Packs row-major `[out_dim, in_dim]` values. `out_dim` must be a multiple of 32.
    fn from_rows(src: &[f32], out_dim: usize, in_dim: usize) -> PackedF32 {
        assert_eq!(src.len(), out_dim * in_dim);
        assert!(out_dim.is_multiple_of(PANEL));
        let panel_len = in_dim * PANEL;
        let mut data = Vec::<f32>::with_capacity(out_dim * in_dim);
        let dst = SendPtr(data.as_mut_ptr());
        let n_panels = out_dim / PANEL;
        candle_core::utils::barrier_pool().execute_chunked(n_panels, |range| {
            for p in range {
                // SAFETY: panel p owns dst[p*panel_len .. (p+1)*panel_len]; every value of it
                // is written below before `set_len`.
                let panel = unsafe {
                    std::slice::from_raw_parts_mut(dst.get().add(p * panel_len), panel_len)
                };
                let rows = &src[p * panel_len..(p + 1) * panel_len];
                // The panel is written in order; its 32 source rows are read side by side.
                for (kk, out) in panel.chunks_exact_mut(PANEL).enumerate() {
                    for (j, v) in out.iter_mut().enumerate() {
                        *v = rows[j * in_dim + kk];
                    }
                }
            }
        });
        // SAFETY: every panel was filled.
        unsafe { data.set_len(out_dim * in_dim) };
        PackedF32 {
            data,
            out_dim,
            in_dim,
            bias: None,
        }
    }

    /// This weight with the layer's bias (`[out]`, any float dtype), added by the kernel.
    pub fn with_bias(mut self, bias: &Tensor) -> Result<PackedF32> {
        let b = bias.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if b.len() != self.out_dim {
            candle_core::bail!(
                "packed linear: bias has {} values for {} outputs",
                b.len(),
                self.out_dim
            );
        }
        self.bias = Some(b);
        Ok(self)
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// The weight back as `[out, in]` rows.
    #[cfg(test)]
    fn to_rows(&self) -> Vec<f32> {
        let mut rows = vec![0f32; self.out_dim * self.in_dim];
        for p in 0..self.out_dim / PANEL {
            let panel = &self.data[p * self.in_dim * PANEL..(p + 1) * self.in_dim * PANEL];
            for kk in 0..self.in_dim {
                for j in 0..PANEL {
                    rows[(p * PANEL + j) * self.in_dim + kk] = panel[kk * PANEL + j];
                }
            }
        }
        rows
    }

    /// `x·Wᵀ (+ bias)` for `x` of `[.., in]` (any dtype; computed in f32), giving `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("packed linear: a scalar input");
        };
        if k != self.in_dim {
            candle_core::bail!(
                "packed linear: input has {k} features, the weight takes {}",
                self.in_dim
            );
        }
        let m: usize = lead.iter().product();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let mut out = Vec::<f32>::with_capacity(m * self.out_dim);
        {
            let (storage, layout) = x.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("packed linear: the input is not on the CPU");
            };
            let xs = &cpu.as_slice::<f32>()?[layout.start_offset()..];
            // SAFETY: `gemm` writes all m × out values.
            unsafe {
                self.gemm(&xs[..m * k], m, out.as_mut_ptr());
                out.set_len(m * self.out_dim);
            }
        }
        let mut shape = lead.to_vec();
        shape.push(self.out_dim);
        Tensor::from_vec(out, shape, x.device())
    }

    /// `out[m, out_dim] = x[m, in]·Wᵀ + bias`, every value of `out` written.
    unsafe fn gemm(&self, x: &[f32], m: usize, out: *mut f32) {
        let bias = self.bias.as_deref();
        let k = self.in_dim;
        let n = self.out_dim;
        let n_panels = n / PANEL;
        // Panels go to the threads in groups: a group's block of weights (up to 8 × KC × 128
        // bytes) stays in L2 while every row block of `x` passes over it. Groups are small
        // enough that each thread gets several.
        let threads = candle_core::utils::get_num_threads().max(1);
        let group = (n_panels / (threads * 4)).clamp(1, GROUP);
        // x as blocks of up to 12 rows, `[block][k][rows]`: a step's broadcasts are adjacent.
        let blocks = m.div_ceil(ROWS);
        let mut xp = Vec::<f32>::with_capacity(m * k);
        let xp_ptr = SendPtr(xp.as_mut_ptr());
        let pack_x = |range: std::ops::Range<usize>| {
            for b in range {
                let r0 = b * ROWS;
                let rows = ROWS.min(m - r0);
                let src = &x[r0 * k..(r0 + rows) * k];
                // SAFETY: block b owns xp[r0 * k .. (r0 + rows) * k].
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(xp_ptr.get().add(r0 * k), rows * k) };
                for (kk, d) in dst.chunks_exact_mut(rows).enumerate() {
                    for (r, v) in d.iter_mut().enumerate() {
                        *v = src[r * k + kk];
                    }
                }
            }
        };
        let pool = candle_core::utils::barrier_pool();
        if blocks == 1 {
            // A decoding step: not worth a parallel region.
            pack_x(0..1);
        } else {
            pool.execute_chunked(blocks, pack_x);
        }
        // SAFETY: every block was written.
        unsafe { xp.set_len(m * k) };
        let xp = &xp;
        let out = SendPtr(out);
        pool.execute_chunked(n_panels.div_ceil(group), |groups| {
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                // Up to CHUNK row blocks of the group's outputs, tile after tile
                // (`[block][panel][12][32]`): the tiles are summed here, in memory the thread
                // keeps, and copied out in rows once.
                let len = blocks.min(CHUNK) * group * ROWS * PANEL;
                if scratch.len() < len {
                    scratch.resize(len, 0.);
                }
                let sc = scratch.as_mut_ptr();
                for g in groups {
                    let panels = g * group..((g + 1) * group).min(n_panels);
                    for b0 in (0..blocks).step_by(CHUNK) {
                        let chunk = b0..(b0 + CHUNK).min(blocks);
                        for kb in (0..k).step_by(KC) {
                            let kc = KC.min(k - kb);
                            for b in chunk.clone() {
                                let r0 = b * ROWS;
                                let rows = ROWS.min(m - r0);
                                for (j, p) in panels.clone().enumerate() {
                                    let init = match bias {
                                        _ if kb > 0 => Init::Accumulate,
                                        Some(bs) => {
                                            Init::Bias(unsafe { bs.as_ptr().add(p * PANEL) })
                                        }
                                        None => Init::Zero,
                                    };
                                    // SAFETY: in bounds of xp, the panel and the scratch.
                                    unsafe {
                                        let w = self.data.as_ptr().add((p * k + kb) * PANEL);
                                        let xb = xp.as_ptr().add(r0 * k + kb * rows);
                                        let c = sc.add(((b - b0) * group + j) * ROWS * PANEL);
                                        tile(rows, xb, w, kc, c, PANEL, init);
                                    }
                                }
                            }
                        }
                        for r in chunk.start * ROWS..(chunk.end * ROWS).min(m) {
                            let (b, i) = (r / ROWS - b0, r % ROWS);
                            for (j, p) in panels.clone().enumerate() {
                                // SAFETY: this group alone writes its panels' columns of out.
                                unsafe {
                                    std::ptr::copy_nonoverlapping(
                                        sc.add(((b * group + j) * ROWS + i) * PANEL),
                                        out.get().add(r * n + p * PANEL),
                                        PANEL,
                                    );
                                }
                            }
                        }
                    }
                }
            });
        });
    }
}

thread_local! {
    /// Per-thread output tiles of [`PackedF32::gemm`], kept between products.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How a tile's accumulators start.
#[derive(Clone, Copy)]
enum Init {
    Zero,
    Bias(*const f32),
    /// From the output already there (a later block of the inner dimension).
    Accumulate,
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    rows: usize,
    x: *const f32,
    w: *const f32,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    init: Init,
) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match rows {
                    $($r => avx512::tile::<$r>(x, w, kc, c, ldc, init),)*
                    _ => unreachable!("1 to {ROWS} rows"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, x, w, kc, c, ldc, init);
        unreachable!("PackedF32 is built only where AVX-512F is detected")
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Init, PANEL};
    use std::arch::x86_64::*;

    /// `c[R, 32] (=|+=) x[kc, R]ᵀ·w[kc, 32]`, `c` rows `ldc` apart.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const R: usize>(
        x: *const f32,
        w: *const f32,
        kc: usize,
        c: *mut f32,
        ldc: usize,
        init: Init,
    ) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            match init {
                Init::Zero => {}
                Init::Bias(b) => {
                    let b0 = _mm512_loadu_ps(b);
                    let b1 = _mm512_loadu_ps(b.add(16));
                    for a in acc.iter_mut() {
                        *a = [b0, b1];
                    }
                }
                Init::Accumulate => {
                    for (r, a) in acc.iter_mut().enumerate() {
                        *a = [
                            _mm512_loadu_ps(c.add(r * ldc)),
                            _mm512_loadu_ps(c.add(r * ldc + 16)),
                        ];
                    }
                }
            }
            for kk in 0..kc {
                // The panel streams from L2; ask for it 16 steps ahead.
                _mm_prefetch::<_MM_HINT_T0>(w.add((kk + 16) * PANEL) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(w.add((kk + 16) * PANEL + 16) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(x.add((kk + 32) * R) as *const i8);
                let w0 = _mm512_loadu_ps(w.add(kk * PANEL));
                let w1 = _mm512_loadu_ps(w.add(kk * PANEL + 16));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*x.add(kk * R + r));
                    a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                    a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(c.add(r * ldc), a[0]);
                _mm512_storeu_ps(c.add(r * ldc + 16), a[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against candle's matmul: one row (decoding), rows that leave a partial block of 12,
    /// inner dimensions across several 512-blocks and not a multiple of 16, more panels than
    /// one group, and more rows than one chunk of row blocks; with and without a bias.
    #[test]
    fn matches_candle_matmul() -> Result<()> {
        let dev = Device::Cpu;
        if !PackedF32::applies(32, 1, &dev) {
            eprintln!("no AVX-512F here: the packed product is never built");
            return Ok(());
        }
        let shapes = [
            (1, 40, 64),
            (13, 1100, 96),
            (37, 16, 32),
            (25, 600, 512),
            (800, 70, 64),
        ];
        for (m, k, n) in shapes {
            let w = Tensor::randn(0f32, 1., (n, k), &dev)?;
            let b = Tensor::randn(0f32, 1., n, &dev)?;
            let x = Tensor::randn(0f32, 1., (2, m, k), &dev)?;
            let p = PackedF32::pack(&w)?.expect("applies");
            assert_eq!(p.dims(), (n, k));
            assert_eq!(p.to_rows(), w.flatten_all()?.to_vec1::<f32>()?);
            let with_bias = PackedF32::pack(&w)?.expect("applies").with_bias(&b)?;
            for bias in [None, Some(&b)] {
                let mut want = x.broadcast_matmul(&w.t()?)?;
                if let Some(b) = bias {
                    want = want.broadcast_add(b)?;
                }
                let got = match bias {
                    Some(_) => with_bias.forward(&x)?,
                    None => p.forward(&x)?,
                };
                assert_eq!(got.dims(), want.dims());
                let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
                let err = (&want - &got)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    err <= 1e-5 * scale,
                    "{m}x{k}x{n}, bias {}: {err} of {scale}",
                    bias.is_some()
                );
            }
        }
        Ok(())
    }

    #[test]
    fn refuses_what_it_cannot_take() -> Result<()> {
        let dev = Device::Cpu;
        // Not whole panels, or not f32: left dense.
        assert!(PackedF32::pack(&Tensor::zeros((48, 8), DType::F32, &dev)?)?.is_none());
        assert!(PackedF32::pack(&Tensor::zeros((64, 8), DType::F64, &dev)?)?.is_none());
        if !PackedF32::applies(32, 1, &dev) {
            return Ok(());
        }
        let p = PackedF32::pack(&Tensor::zeros((64, 8), DType::F32, &dev)?)?.expect("applies");
        let err = p
            .forward(&Tensor::zeros((3, 9), DType::F32, &dev)?)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("input has 9 features, the weight takes 8"),
            "{err}"
        );
        let bias = Tensor::zeros(63, DType::F32, &dev)?;
        let err = p.with_bias(&bias).unwrap_err();
        assert!(
            err.to_string()
                .contains("bias has 63 values for 64 outputs"),
            "{err}"
        );
        Ok(())
    }
}
