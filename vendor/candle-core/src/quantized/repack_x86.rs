//! x86 repacked quantized kernels: weights tiled [n/16][k-blocks][16 rows] so one
//! vpdpbusd (AVX512-VNNI) produces 16 output columns for 4 k-values per instruction.
//! Activations are BlockQ8K rows; q4k/q6k quants are unsigned so vpdpbusd applies
//! directly with the min/offset terms corrected through the q8k bsums, and q8_0
//! weights are stored offset by +128 with the same correction (signed on pure AVX2
//! cores, whose kernel moves the activations' signs onto them instead).

use super::k_quants::{BlockQ4K, BlockQ6K, BlockQ8K, BlockQ8_0, QK8_0, QK_K};
use super::{GgmlType, QuantizedType};
use half::f16;

pub(crate) const TILE_N: usize = 16;

// One k-superblock (256 values) for 16 output rows: 4.75 bits a weight (ggml's block is
// 4.5). The 6-bit sub-block scales and mins stay integers, so a kernel sums
// scale * dot(q, a) in i32 over the whole superblock and converts to f32 once.
#[repr(C)]
pub(crate) struct TileQ4K {
    // per-row superblock scale and min scale
    pub(crate) d: [f32; TILE_N],
    pub(crate) dmin: [f32; TILE_N],
    // per-subblock (8) per-row (16) 6-bit scales and mins, unpacked from the 12-byte fields
    pub(crate) scales: [[u8; TILE_N]; 8],
    pub(crate) mins: [[u8; TILE_N]; 8],
    // nibble-packed: [k8-group (32)][row (16)][4 bytes]; byte j = q[8g+j] | q[8g+j+4] << 4
    pub(crate) qs: [u8; QK_K / 8 * TILE_N * 4],
}

#[repr(C)]
pub(crate) struct TileQ6K {
    pub(crate) scales: [[f32; TILE_N]; 16],
    // raw 6-bit values as u8 (0..63; real value is v - 32): [k4-group (64)][row (16)][4 bytes]
    pub(crate) qs: [u8; QK_K / 4 * TILE_N * 4],
}

// One 32-value block group for 16 rows of q8_0 weights, stored offset by +128 for the VNNI
// kernels and signed for the pure AVX2 one (`pack_q8_0`).
#[repr(C)]
pub(crate) struct TileQ8_0 {
    pub(crate) d: [f16; TILE_N],
    pub(crate) qs: [u8; QK8_0 * TILE_N],
}

pub(crate) enum PackedX86 {
    Q4K(Vec<TileQ4K>),
    Q6K(Vec<TileQ6K>),
    Q8_0(Vec<TileQ8_0>),
}

impl PackedX86 {
    /// These tiles as the AMX-BF16 kernel reads them (q8_0 and q4k).
    pub(crate) fn bf16_source(&self) -> Option<Bf16Source<'_>> {
        match self {
            PackedX86::Q8_0(t) => Some(Bf16Source::Q8_0(t)),
            PackedX86::Q4K(t) => Some(Bf16Source::Q4K(t)),
            PackedX86::Q6K(_) => None,
        }
    }
}

pub(crate) fn select(dtype: super::GgmlDType, m: usize, n: usize, k: usize) -> bool {
    use super::GgmlDType as D;
    if level().is_none() {
        return false;
    }
    if k == 0 || !n.is_multiple_of(TILE_N) || !k.is_multiple_of(QK_K) {
        return false;
    }
    match dtype {
        D::Q4K => true,
        // Keep Q6K GEMV on compact weights; expanded tiles cost bandwidth
        // without reuse across multiple activation rows.
        D::Q6K => m > 1,
        // pure AVX2 reads signed tiles (kernels256::q8_0_tile2_avx2)
        D::Q8_0 => true,
        _ => false,
    }
}

/// The blocks in `bytes` (a whole number of them, aligned for `T`: checked by the callers).
fn blocks_of<T>(bytes: &[u8]) -> &[T] {
    debug_assert_eq!(bytes.as_ptr().align_offset(std::mem::align_of::<T>()), 0);
    // SAFETY: ggml's block structs are plain bytes and f16s (any bit pattern is valid), and
    // the slice is aligned for them (above); a trailing partial block is left out.
    unsafe {
        std::slice::from_raw_parts(
            bytes.as_ptr() as *const T,
            bytes.len() / std::mem::size_of::<T>(),
        )
    }
}

/// The bytes of a quantized storage's blocks.
fn storage_bytes(storage: &dyn QuantizedType) -> &[u8] {
    // SAFETY: the storage owns `storage_size_in_bytes` bytes at `as_ptr`.
    unsafe { std::slice::from_raw_parts(storage.as_ptr(), storage.storage_size_in_bytes()) }
}

/// `count` tiles made by `make(i)`, built in parallel on the barrier pool: packing at load
/// reads every weight once and is otherwise single-threaded work.
fn build_tiles<T: Send>(count: usize, make: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(count);
    let ptr = out.as_mut_ptr() as usize;
    crate::utils::barrier_pool().execute_chunked(count, |range| {
        let ptr = ptr as *mut T;
        for i in range {
            // SAFETY: each index in 0..count is written once, within the capacity.
            unsafe { ptr.add(i).write(make(i)) };
        }
    });
    // SAFETY: execute_chunked returns once every index of 0..count has been written.
    unsafe { out.set_len(count) };
    out
}

// ggml's 6-bit scale/min unpack for q4k/q5k superblocks.
fn get_scale_min_k4(j: usize, scales: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

pub(crate) fn pack_q4k(bytes: &[u8], n: usize, k: usize) -> PackedX86 {
    let blocks: &[BlockQ4K] = blocks_of(bytes);
    let kb = k / QK_K;
    let n_tiles = n / TILE_N;
    let out = build_tiles(n_tiles * kb, |i| {
        let (t, b) = (i / kb, i % kb);
        let mut tile = TileQ4K {
            d: [0.0; TILE_N],
            dmin: [0.0; TILE_N],
            scales: [[0; TILE_N]; 8],
            mins: [[0; TILE_N]; 8],
            qs: [0; QK_K / 8 * TILE_N * 4],
        };
        for r in 0..TILE_N {
            let blk = &blocks[(t * TILE_N + r) * kb + b];
            tile.d[r] = blk.d.to_f32();
            tile.dmin[r] = blk.dmin.to_f32();
            for sub in 0..8 {
                let (sc, mn) = get_scale_min_k4(sub, &blk.scales);
                tile.scales[sub][r] = sc;
                tile.mins[sub][r] = mn;
            }
            // q4k qs: 32-byte chunks c hold values [c*64, c*64+32) in the low nibbles
            // and [c*64+32, c*64+64) in the high nibbles
            let mut vals = [0u8; QK_K];
            for c in 0..4 {
                for j in 0..32 {
                    let byte = blk.qs[c * 32 + j];
                    vals[c * 64 + j] = byte & 0x0F;
                    vals[c * 64 + 32 + j] = byte >> 4;
                }
            }
            for g in 0..QK_K / 8 {
                for j in 0..4 {
                    tile.qs[(g * TILE_N + r) * 4 + j] =
                        vals[g * 8 + j] | (vals[g * 8 + j + 4] << 4);
                }
            }
        }
        tile
    });
    PackedX86::Q4K(out)
}

pub(crate) fn pack_q6k(bytes: &[u8], n: usize, k: usize) -> PackedX86 {
    let blocks: &[BlockQ6K] = blocks_of(bytes);
    let kb = k / QK_K;
    let n_tiles = n / TILE_N;
    let out = build_tiles(n_tiles * kb, |i| {
        let (t, b) = (i / kb, i % kb);
        let mut tile = TileQ6K {
            scales: [[0.0; TILE_N]; 16],
            qs: [0; QK_K / 4 * TILE_N * 4],
        };
        for r in 0..TILE_N {
            let blk = &blocks[(t * TILE_N + r) * kb + b];
            let d = blk.d.to_f32();
            for sub in 0..16 {
                tile.scales[sub][r] = d * blk.scales[sub] as f32;
            }
            // q6k: ql 128 bytes (low 4 bits), qh 64 bytes (high 2 bits), in 128-value halves
            let mut vals = [0u8; QK_K];
            for h in 0..2 {
                let ql = &blk.ql[h * 64..];
                let qh = &blk.qh[h * 32..];
                for j in 0..32 {
                    vals[h * 128 + j] = (ql[j] & 0x0F) | ((qh[j] & 3) << 4);
                    vals[h * 128 + j + 32] = (ql[j + 32] & 0x0F) | (((qh[j] >> 2) & 3) << 4);
                    vals[h * 128 + j + 64] = (ql[j] >> 4) | (((qh[j] >> 4) & 3) << 4);
                    vals[h * 128 + j + 96] = (ql[j + 32] >> 4) | (((qh[j] >> 6) & 3) << 4);
                }
            }
            for g in 0..QK_K / 4 {
                for j in 0..4 {
                    tile.qs[(g * TILE_N + r) * 4 + j] = vals[g * 4 + j];
                }
            }
        }
        tile
    });
    PackedX86::Q6K(out)
}

pub(crate) fn pack_q8_0(bytes: &[u8], n: usize, k: usize) -> PackedX86 {
    let blocks: &[BlockQ8_0] = blocks_of(bytes);
    let kb = k / QK8_0;
    let n_tiles = n / TILE_N;
    // The VNNI kernels take the weights offset by +128 (vpdpbusd's unsigned operand); the
    // pure AVX2 kernel takes them signed (it moves the activations' signs onto them).
    let offset: i16 = if level() == Some(X86Level::Avx2) { 0 } else { 128 };
    let out = build_tiles(n_tiles * kb, |i| {
        let (t, b) = (i / kb, i % kb);
        let mut tile = TileQ8_0 {
            d: [f16::ZERO; TILE_N],
            qs: [0; QK8_0 * TILE_N],
        };
        for r in 0..TILE_N {
            let blk = &blocks[(t * TILE_N + r) * kb + b];
            tile.d[r] = blk.d;
            for g in 0..QK8_0 / 4 {
                for j in 0..4 {
                    tile.qs[(g * TILE_N + r) * 4 + j] =
                        (blk.qs[g * 4 + j] as i16 + offset) as u8;
                }
            }
        }
        tile
    });
    PackedX86::Q8_0(out)
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use super::*;
    use core::arch::x86_64::*;

    // acc[m][16] f32 for up to MT activation rows against one 16-row weight tile
    pub(crate) const MAX_MT: usize = 4;

    #[inline(always)]
    unsafe fn bcast4(act: &[i8], off: usize) -> __m512i {
        _mm512_set1_epi32(std::ptr::read_unaligned(act.as_ptr().add(off) as *const i32))
    }

    // q4k: one superblock tile against `mt` q8k activation blocks. Subblocks are
    // processed in pairs with independent integer accumulators to break the dpbusd
    // latency chain when mt is small (decode gemv). Each subblock's dot product is
    // scaled by its 6-bit scale in i32 (|sum| <= 8 * 63 * 32 * 15 * 128 < 2^31), and
    // the mins term is the i32 sum of mins times the q8k block sums, so the float work
    // is two fmas per superblock and activation row.
    #[target_feature(enable = "avx512f,avx512vnni,avx512bw")]
    pub(crate) unsafe fn q4k_tile(tile: &TileQ4K, acts: &[&BlockQ8K], acc: &mut [[__m512; 1]]) {
        let mask = _mm512_set1_epi8(0x0F_u8 as i8);
        let mut qsum = [_mm512_setzero_si512(); MAX_MT];
        for sub2 in 0..4 {
            let sa = sub2 * 2;
            let sb = sa + 1;
            let mut isum_a = [_mm512_setzero_si512(); MAX_MT];
            let mut isum_b = [_mm512_setzero_si512(); MAX_MT];
            for g4 in 0..4 {
                let ga = sa * 4 + g4;
                let gb = sb * 4 + g4;
                let wa = _mm512_loadu_si512(tile.qs.as_ptr().add(ga * TILE_N * 4) as *const _);
                let wb = _mm512_loadu_si512(tile.qs.as_ptr().add(gb * TILE_N * 4) as *const _);
                let lo_a = _mm512_and_si512(wa, mask);
                let hi_a = _mm512_and_si512(_mm512_srli_epi16(wa, 4), mask);
                let lo_b = _mm512_and_si512(wb, mask);
                let hi_b = _mm512_and_si512(_mm512_srli_epi16(wb, 4), mask);
                for (m, act) in acts.iter().enumerate() {
                    isum_a[m] =
                        _mm512_dpbusd_epi32(isum_a[m], lo_a, bcast4(&act.qs, sa * 32 + g4 * 8));
                    isum_a[m] =
                        _mm512_dpbusd_epi32(isum_a[m], hi_a, bcast4(&act.qs, sa * 32 + g4 * 8 + 4));
                    isum_b[m] =
                        _mm512_dpbusd_epi32(isum_b[m], lo_b, bcast4(&act.qs, sb * 32 + g4 * 8));
                    isum_b[m] =
                        _mm512_dpbusd_epi32(isum_b[m], hi_b, bcast4(&act.qs, sb * 32 + g4 * 8 + 4));
                }
            }
            let sc_a = _mm512_cvtepu8_epi32(_mm_loadu_si128(tile.scales[sa].as_ptr() as *const _));
            let sc_b = _mm512_cvtepu8_epi32(_mm_loadu_si128(tile.scales[sb].as_ptr() as *const _));
            for m in 0..acts.len() {
                qsum[m] = _mm512_add_epi32(
                    qsum[m],
                    _mm512_add_epi32(
                        _mm512_mullo_epi32(isum_a[m], sc_a),
                        _mm512_mullo_epi32(isum_b[m], sc_b),
                    ),
                );
            }
        }
        let d = _mm512_loadu_ps(tile.d.as_ptr());
        let dmin = _mm512_loadu_ps(tile.dmin.as_ptr());
        for (m, act) in acts.iter().enumerate() {
            let mut msum = _mm512_setzero_si512();
            for sub in 0..8 {
                let bsum = act.bsums[sub * 2] as i32 + act.bsums[sub * 2 + 1] as i32;
                let mn = _mm512_cvtepu8_epi32(_mm_loadu_si128(tile.mins[sub].as_ptr() as *const _));
                msum = _mm512_add_epi32(msum, _mm512_mullo_epi32(mn, _mm512_set1_epi32(bsum)));
            }
            let dall = _mm512_set1_ps(act.d);
            acc[m][0] =
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(qsum[m]), _mm512_mul_ps(d, dall), acc[m][0]);
            acc[m][0] =
                _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum), _mm512_mul_ps(dmin, dall), acc[m][0]);
        }
    }

    // q6k: values are v-32; vpdpbusd on raw u6 then subtract 32 * bsum per 16-value subblock.
    #[target_feature(enable = "avx512f,avx512vnni,avx512bw")]
    pub(crate) unsafe fn q6k_tile(tile: &TileQ6K, acts: &[&BlockQ8K], acc: &mut [[__m512; 1]]) {
        for sub in 0..16 {
            let mut isum = [_mm512_setzero_si512(); MAX_MT];
            // subblock = 16 k-values = 4 k4-groups
            for g4 in 0..4 {
                let g = sub * 4 + g4;
                let w = _mm512_loadu_si512(tile.qs.as_ptr().add(g * TILE_N * 4) as *const _);
                for (m, act) in acts.iter().enumerate() {
                    let a = bcast4(&act.qs, sub * 16 + g4 * 4);
                    isum[m] = _mm512_dpbusd_epi32(isum[m], w, a);
                }
            }
            let scale = _mm512_loadu_ps(tile.scales[sub].as_ptr());
            for (m, act) in acts.iter().enumerate() {
                let dall = act.d;
                let bsum = act.bsums[sub] as f32;
                let f = _mm512_sub_ps(_mm512_cvtepi32_ps(isum[m]), _mm512_set1_ps(32.0 * bsum));
                acc[m][0] =
                    _mm512_fmadd_ps(f, _mm512_mul_ps(scale, _mm512_set1_ps(dall)), acc[m][0]);
            }
        }
    }

    // q8_0 (+128 offset weights), two 32-value block groups per call with independent
    // integer accumulators so the dpbusd latency chain never serializes at small m.
    #[target_feature(enable = "avx512f,avx512vnni,avx512bw")]
    pub(crate) unsafe fn q8_0_tile2(
        t0: &TileQ8_0,
        t1: &TileQ8_0,
        acts: &[&BlockQ8K],
        sub32: usize,
        acc: &mut [[__m512; 1]],
    ) {
        let mut isum_a = [_mm512_setzero_si512(); MAX_MT];
        let mut isum_b = [_mm512_setzero_si512(); MAX_MT];
        for g4 in 0..8 {
            let wa = _mm512_loadu_si512(t0.qs.as_ptr().add(g4 * TILE_N * 4) as *const _);
            let wb = _mm512_loadu_si512(t1.qs.as_ptr().add(g4 * TILE_N * 4) as *const _);
            for (m, act) in acts.iter().enumerate() {
                isum_a[m] =
                    _mm512_dpbusd_epi32(isum_a[m], wa, bcast4(&act.qs, sub32 * 32 + g4 * 4));
                isum_b[m] =
                    _mm512_dpbusd_epi32(isum_b[m], wb, bcast4(&act.qs, (sub32 + 1) * 32 + g4 * 4));
            }
        }
        for (blk, isum, tile) in [(sub32, &isum_a, t0), (sub32 + 1, &isum_b, t1)] {
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(tile.d.as_ptr() as *const _));
            for (m, act) in acts.iter().enumerate() {
                let bsum = (act.bsums[blk * 2] as i32 + act.bsums[blk * 2 + 1] as i32) as f32;
                let f = _mm512_sub_ps(_mm512_cvtepi32_ps(isum[m]), _mm512_set1_ps(128.0 * bsum));
                acc[m][0] = _mm512_fmadd_ps(f, _mm512_mul_ps(dw, _mm512_set1_ps(act.d)), acc[m][0]);
            }
        }
    }
}

// Full matmul over the packed tiles: lhs is m rows already quantized to BlockQ8K,
// parallelized over (m-tiles x n-tiles) on the barrier pool by the caller's chunker.
// Per-unit bodies live in #[target_feature] fns so intrinsics inline under portable
// (target-cpu=generic) release builds; closures cannot carry the attribute.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_unit_512(
    packed: &PackedX86,
    lhs_q: &[BlockQ8K],
    kb: usize,
    nt: usize,
    m0: usize,
    mt: usize,
    dst_ptr: *mut f32,
    n: usize,
) {
    use core::arch::x86_64::*;
    let mut act_refs: [&BlockQ8K; kernels::MAX_MT] = [&lhs_q[m0 * kb]; kernels::MAX_MT];
    let mut acc = [[_mm512_setzero_ps(); 1]; kernels::MAX_MT];
    for b in 0..kb {
        for (i, a) in act_refs.iter_mut().enumerate().take(mt) {
            *a = &lhs_q[(m0 + i) * kb + b];
        }
        match packed {
            PackedX86::Q4K(tiles) => {
                kernels::q4k_tile(&tiles[nt * kb + b], &act_refs[..mt], &mut acc)
            }
            PackedX86::Q6K(tiles) => {
                kernels::q6k_tile(&tiles[nt * kb + b], &act_refs[..mt], &mut acc)
            }
            PackedX86::Q8_0(tiles) => {
                // q8_0 tiles cover 32 k-values each; 8 tiles per q8k superblock
                for s in (0..8).step_by(2) {
                    kernels::q8_0_tile2(
                        &tiles[nt * (kb * 8) + b * 8 + s],
                        &tiles[nt * (kb * 8) + b * 8 + s + 1],
                        &act_refs[..mt],
                        s,
                        &mut acc,
                    );
                }
            }
        }
    }
    for (i, row) in acc[..mt].iter().enumerate() {
        _mm512_storeu_ps(dst_ptr.add((m0 + i) * n + nt * TILE_N), row[0]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_unit_256(
    packed: &PackedX86,
    lhs_q: &[BlockQ8K],
    kb: usize,
    nt: usize,
    m0: usize,
    mt: usize,
    dst_ptr: *mut f32,
    n: usize,
    vnni: bool,
) {
    use core::arch::x86_64::*;
    let mut act_refs: [&BlockQ8K; kernels::MAX_MT] = [&lhs_q[m0 * kb]; kernels::MAX_MT];
    let mut acc = [[_mm256_setzero_ps(); 2]; kernels::MAX_MT];
    for b in 0..kb {
        for (i, a) in act_refs.iter_mut().enumerate().take(mt) {
            *a = &lhs_q[(m0 + i) * kb + b];
        }
        match packed {
            PackedX86::Q4K(tiles) => {
                let t = &tiles[nt * kb + b];
                if vnni {
                    kernels256::q4k_tile_avxvnni(t, &act_refs[..mt], &mut acc)
                } else {
                    kernels256::q4k_tile_avx2(t, &act_refs[..mt], &mut acc)
                }
            }
            PackedX86::Q6K(tiles) => {
                let t = &tiles[nt * kb + b];
                if vnni {
                    kernels256::q6k_tile_avxvnni(t, &act_refs[..mt], &mut acc)
                } else {
                    kernels256::q6k_tile_avx2(t, &act_refs[..mt], &mut acc)
                }
            }
            PackedX86::Q8_0(tiles) => {
                for s in (0..8).step_by(2) {
                    let (t0, t1) = (
                        &tiles[nt * (kb * 8) + b * 8 + s],
                        &tiles[nt * (kb * 8) + b * 8 + s + 1],
                    );
                    if vnni {
                        kernels256::q8_0_tile2_avxvnni(t0, t1, &act_refs[..mt], s, &mut acc)
                    } else {
                        kernels256::q8_0_tile2_avx2(t0, t1, &act_refs[..mt], s, &mut acc)
                    }
                }
            }
        }
    }
    for (i, row) in acc[..mt].iter().enumerate() {
        _mm256_storeu_ps(dst_ptr.add((m0 + i) * n + nt * TILE_N), row[0]);
        _mm256_storeu_ps(dst_ptr.add((m0 + i) * n + nt * TILE_N + 8), row[1]);
    }
}

pub(crate) fn matmul_tiles(
    packed: &PackedX86,
    lhs_q: &[BlockQ8K],
    m: usize,
    k: usize,
    n: usize,
    dst: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        let lv = level().expect("select() gated");
        let kb = k / QK_K;
        let n_tiles = n / TILE_N;
        let mt_step = kernels::MAX_MT;
        let dst_ptr = dst.as_mut_ptr() as usize;
        let total_units = n_tiles * m.div_ceil(mt_step);
        let m_units = m.div_ceil(mt_step);
        crate::utils::barrier_pool().execute_chunked(total_units, |range| {
            let dst_ptr = dst_ptr as *mut f32;
            for unit in range {
                let nt = unit / m_units;
                let m0 = (unit % m_units) * mt_step;
                let mt = (m - m0).min(mt_step);
                unsafe {
                    if lv == X86Level::Avx512Vnni {
                        matmul_unit_512(packed, lhs_q, kb, nt, m0, mt, dst_ptr, n);
                    } else {
                        matmul_unit_256(
                            packed,
                            lhs_q,
                            kb,
                            nt,
                            m0,
                            mt,
                            dst_ptr,
                            n,
                            lv == X86Level::AvxVnni,
                        );
                    }
                }
            }
        });
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (packed, lhs_q, m, k, n, dst);
        unreachable!("x86 repack kernels on non-x86 arch");
    }
}

pub(crate) fn pack(
    dtype: super::GgmlDType,
    storage: &dyn QuantizedType,
    n: usize,
    k: usize,
) -> PackedX86 {
    pack_bytes(dtype, storage_bytes(storage), n, k)
}

/// [`pack`] from the blocks' bytes (`n·k` weights' worth, aligned for the block type).
pub(crate) fn pack_bytes(dtype: super::GgmlDType, bytes: &[u8], n: usize, k: usize) -> PackedX86 {
    use super::GgmlDType as D;
    match dtype {
        D::Q4K => pack_q4k(bytes, n, k),
        D::Q6K => pack_q6k(bytes, n, k),
        D::Q8_0 => pack_q8_0(bytes, n, k),
        _ => unreachable!("select() gates dtypes"),
    }
}

// Quantize lhs rows to BlockQ8K, parallelizing only when there are multiple rows.
pub(crate) fn quantize_lhs(lhs: &[f32], m: usize, k: usize) -> Vec<BlockQ8K> {
    let kb = k / QK_K;
    let mut out = vec![BlockQ8K::zeros(); m * kb];
    if m == 1 {
        q8k_row(&lhs[..k], &mut out);
        return out;
    }
    let out_ptr = out.as_mut_ptr() as usize;
    crate::utils::barrier_pool().execute_chunked(m, |range| {
        let out_ptr = out_ptr as *mut BlockQ8K;
        for r in range {
            let row = &lhs[r * k..(r + 1) * k];
            let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.add(r * kb), kb) };
            q8k_row(row, dst);
        }
    });
    out
}

/// `BlockQ8K::from_float`, vectorised where the kernels run (any of their levels has AVX2),
/// with the same result bit for bit: the scale follows the first value of largest magnitude,
/// and values round half away from zero (`f32::round`) before the clamp.
fn q8k_row(xs: &[f32], ys: &mut [BlockQ8K]) {
    #[cfg(target_arch = "x86_64")]
    if level().is_some() {
        // SAFETY: every kernel level implies AVX2 and FMA.
        unsafe { q8k_row_avx2(xs, ys) };
        return;
    }
    BlockQ8K::from_float(xs, ys)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q8k_row_avx2(xs: &[f32], ys: &mut [BlockQ8K]) {
    use core::arch::x86_64::*;
    assert_eq!(xs.len(), ys.len() * QK_K);
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let sign_bit = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
    let lo = _mm256_set1_ps(-128.0);
    let hi = _mm256_set1_ps(127.0);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (x, y) in xs.chunks_exact(QK_K).zip(ys.iter_mut()) {
        // max(|v|, acc) keeps acc where |v| is NaN, as the scalar comparison does.
        let mut vmax = _mm256_setzero_ps();
        for j in (0..QK_K).step_by(8) {
            let v = _mm256_and_ps(_mm256_loadu_ps(x.as_ptr().add(j)), abs_mask);
            vmax = _mm256_max_ps(v, vmax);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
        let amax = lanes.iter().fold(0f32, |a, &v| if a < v { v } else { a });
        if amax == 0.0 {
            y.d = 0.0;
            y.qs.fill(0);
            y.bsums.fill(0);
            continue;
        }
        let max = *x.iter().find(|v| v.abs() == amax).expect("amax is some |x|");
        let iscale = -127f32 / max;
        let vs = _mm256_set1_ps(iscale);
        for j in (0..QK_K).step_by(32) {
            let mut q = [_mm256_setzero_si256(); 4];
            for (u, qu) in q.iter_mut().enumerate() {
                let v = _mm256_mul_ps(vs, _mm256_loadu_ps(x.as_ptr().add(j + u * 8)));
                // round half away from zero: truncate, then step away where |frac| >= 0.5
                let t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                let frac = _mm256_and_ps(_mm256_sub_ps(v, t), abs_mask);
                let step = _mm256_and_ps(
                    _mm256_cmp_ps(frac, half, _CMP_GE_OQ),
                    _mm256_or_ps(one, _mm256_and_ps(v, sign_bit)),
                );
                let r = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(t, step), lo), hi);
                *qu = _mm256_cvttps_epi32(r);
            }
            let w01 = _mm256_packs_epi32(q[0], q[1]);
            let w23 = _mm256_packs_epi32(q[2], q[3]);
            let b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), order);
            _mm256_storeu_si256(y.qs.as_mut_ptr().add(j) as *mut __m256i, b);
        }
        for (sum, chunk) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
            *sum = chunk.iter().map(|&q| q as i16).sum();
        }
        y.d = 1.0 / iscale;
    }
}

// Fused multi-projection gemv: one lhs quantization and one barrier region across
// all projections sharing the same activations (qkv, gate/up). 512-bit only; the
// per-unit body reuses matmul_unit_512 so intrinsics inline in portable builds.
pub(crate) fn gemv_fused(
    parts: &[(&PackedX86, usize)],
    lhs_q: &[BlockQ8K],
    m: usize,
    k: usize,
    dsts: &mut [Vec<f32>],
) {
    #[cfg(target_arch = "x86_64")]
    {
        let kb = k / QK_K;
        let mt_step = kernels::MAX_MT;
        let m_units = m.div_ceil(mt_step);
        // (n, dst ptr, unit offset)
        let mut metas: Vec<(usize, usize, usize)> = Vec::with_capacity(parts.len());
        let mut total = 0usize;
        for (i, (_p, n)) in parts.iter().enumerate() {
            metas.push((*n, dsts[i].as_mut_ptr() as usize, total));
            total += (n / TILE_N) * m_units;
        }
        let parts_ref = parts;
        crate::utils::barrier_pool().execute_chunked(total, |range| {
            for unit in range {
                let pi = metas
                    .iter()
                    .rposition(|(_n, _d, off)| unit >= *off)
                    .unwrap();
                let (n, dst_ptr, off) = metas[pi];
                let local = unit - off;
                let nt = local / m_units;
                let m0 = (local % m_units) * mt_step;
                let mt = (m - m0).min(mt_step);
                unsafe {
                    matmul_unit_512(
                        parts_ref[pi].0,
                        lhs_q,
                        kb,
                        nt,
                        m0,
                        mt,
                        dst_ptr as *mut f32,
                        n,
                    );
                }
            }
        });
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (parts, lhs_q, m, k, dsts);
        unreachable!("x86 repack kernels on non-x86 arch");
    }
}

pub(crate) fn amx_available() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // forced downlevel testing must exercise the 256-bit paths end to end;
        // MISTRALRS_NO_AMX=1 keeps an AMX core on its VNNI kernels (tests, A/B timing)
        if level() != Some(X86Level::Avx512Vnni)
            || std::env::var("MISTRALRS_NO_AMX").as_deref() == Ok("1")
        {
            return false;
        }
        // is_x86_feature_detected!("amx-int8") is unstable; read CPUID leaf 7 directly
        #[cfg(target_arch = "x86_64")]
        let has_amx = {
            let info = core::arch::x86_64::__cpuid_count(7, 0);
            info.edx & (1 << 25) != 0 && info.edx & (1 << 24) != 0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let has_amx = false;
        if !has_amx {
            return false;
        }
        // Linux gates AMX tile state behind a per-process permission request; other
        // OSes would need their own enablement, so AMX stays off there.
        #[cfg(target_os = "linux")]
        {
            const ARCH_REQ_XCOMP_PERM: i32 = 0x1023;
            const XFEATURE_XTILEDATA: u64 = 18;
            let r = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            };
            r == 0
        }
        #[cfg(not(target_os = "linux"))]
        false
    })
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use super::*;
    use core::arch::x86_64::*;

    #[repr(C, align(64))]
    struct TileCfg {
        palette: u8,
        start_row: u8,
        _rsvd: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    // tmm0-3: C (16x16 f32); tmm4-5: A (16 rows x 32 bf16); tmm6-7: B (16 k-pairs x 16 outputs)
    unsafe fn configure() {
        let mut cfg = TileCfg {
            palette: 1,
            start_row: 0,
            _rsvd: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        const _: () = assert!(std::mem::size_of::<TileCfg>() == 64);
        cfg.colsb[..8].fill(64);
        cfg.rows[..8].fill(16);
        core::arch::asm!(
            "ldtilecfg [{cfg}]",
            cfg = in(reg) &cfg,
            options(nostack)
        );
    }

    thread_local! {
        static AMX_READY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Loads the tile configuration on this thread once.
    fn ensure_configured() {
        AMX_READY.with(|f| {
            if !f.get() {
                unsafe { configure() };
                f.set(true);
            }
        });
    }

    /// One f32 row as bf16 (round to nearest even), 16 values at a time.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn bf16_row(src: &[f32], dst: &mut [u16]) {
        debug_assert!(src.len() == dst.len() && src.len().is_multiple_of(32));
        unsafe {
            for i in (0..src.len()).step_by(32) {
                let lo = _mm512_loadu_ps(src.as_ptr().add(i));
                let hi = _mm512_loadu_ps(src.as_ptr().add(i + 16));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.as_mut_ptr().add(i) as *mut _, v);
            }
        }
    }

    /// `v`'s 16 lanes (one per output), each repeated 4 times, in four vectors (outputs 0-3,
    /// 4-7, 8-11, 12-15): the layout of a group's 64 values, [output][4 k-values].
    #[inline(always)]
    unsafe fn by_output(v: __m512) -> [__m512; 4] {
        unsafe {
            let base = _mm512_srli_epi32(
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                2,
            );
            std::array::from_fn(|h| {
                _mm512_permutexvar_ps(_mm512_add_epi32(base, _mm512_set1_epi32(4 * h as i32)), v)
            })
        }
    }

    /// Two rows of a bf16 B tile (k-pairs (0, 1) and (2, 3) of 4 k-values, 16 outputs each)
    /// from a group of 64 unsigned values laid out [output (16)][4 k-values]: each value q
    /// becomes q * scale - offset of its output.
    #[inline(always)]
    unsafe fn group_rows(q: __m512i, scale: &[__m512; 4], offset: &[__m512; 4], out: *mut u8) {
        unsafe {
            let quarters = [
                _mm512_extracti32x4_epi32::<0>(q),
                _mm512_extracti32x4_epi32::<1>(q),
                _mm512_extracti32x4_epi32::<2>(q),
                _mm512_extracti32x4_epi32::<3>(q),
            ];
            let f: [__m512; 4] = std::array::from_fn(|h| {
                let v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(quarters[h]));
                _mm512_fmsub_ps(v, scale[h], offset[h])
            });
            // As 32-bit lanes, a bf16 vector of 32 values holds k-pairs [output][pair (2)].
            let p0: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(f[1], f[0]));
            let p1: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(f[3], f[2]));
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
            _mm512_storeu_si512(out as *mut _, _mm512_permutex2var_epi32(p0, even, p1));
            _mm512_storeu_si512(out.add(64) as *mut _, _mm512_permutex2var_epi32(p0, odd, p1));
        }
    }

    /// A q8_0 tile (32 k-values x 16 outputs, stored +128) as a bf16 B tile (1 KB).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,f16c")]
    unsafe fn q8_0_bf16_tile(t: &TileQ8_0, out: *mut u8) {
        unsafe {
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(t.d.as_ptr() as *const _));
            let scale = by_output(d);
            let offset = by_output(_mm512_mul_ps(d, _mm512_set1_ps(128.0)));
            for g in 0..8 {
                let q = _mm512_loadu_si512(t.qs.as_ptr().add(g * 64) as *const _);
                group_rows(q, &scale, &offset, out.add(g * 128));
            }
        }
    }

    /// Sub-block `sub` (32 k-values) of a q4k tile (16 outputs) as a bf16 B tile (1 KB).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn q4k_bf16_tile(t: &TileQ4K, sub: usize, out: *mut u8) {
        unsafe {
            let sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                t.scales[sub].as_ptr() as *const _,
            )));
            let mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                t.mins[sub].as_ptr() as *const _,
            )));
            let scale = by_output(_mm512_mul_ps(_mm512_loadu_ps(t.d.as_ptr()), sc));
            let offset = by_output(_mm512_mul_ps(_mm512_loadu_ps(t.dmin.as_ptr()), mn));
            let low = _mm512_set1_epi8(0x0F);
            // k8-groups 4 sub .. 4 sub + 3: the low nibbles hold a group's first 4 k-values,
            // the high ones its last 4.
            for g in 0..4 {
                let q = _mm512_loadu_si512(t.qs.as_ptr().add((sub * 4 + g) * 64) as *const _);
                let lo = _mm512_and_si512(q, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), low);
                group_rows(lo, &scale, &offset, out.add(g * 256));
                group_rows(hi, &scale, &offset, out.add(g * 256 + 128));
            }
        }
    }

    /// A thread's panel of weights in bf16: [k-step (k / 32)][column tile (2)][1 KB B tile].
    pub(super) struct Panel {
        buf: Vec<u8>,
        skip: usize,
    }

    thread_local! {
        static PANEL: std::cell::RefCell<Panel> =
            const { std::cell::RefCell::new(Panel { buf: Vec::new(), skip: 0 }) };
    }

    impl Panel {
        /// Runs `f` with this thread's panel, grown to hold `k` values. It is kept between
        /// products: a panel is up to k / 16 KB, which would otherwise be mapped, zeroed and
        /// faulted in afresh for every chunk of every product. `fill` writes every tile that
        /// the kernel then reads, so what an earlier product left is never read.
        pub(super) fn with<R>(k: usize, f: impl FnOnce(&mut Panel) -> R) -> R {
            PANEL.with_borrow_mut(|panel| {
                let len = k / 32 * 2048 + 64;
                if panel.buf.len() < len {
                    panel.buf = vec![0u8; len];
                    panel.skip = panel.buf.as_ptr().align_offset(64);
                }
                f(panel)
            })
        }

        pub(super) fn ptr(&self) -> *const u8 {
            self.buf[self.skip..].as_ptr()
        }

        /// Column tiles `nt0` and `nt1` (zeros where `None`) of `w` (k values a row). `next`,
        /// the column tile that the following call starts with, has its first tiles fetched
        /// ahead too: the weights come from memory, once.
        pub(super) unsafe fn fill(
            &mut self,
            w: Bf16Source,
            nt0: usize,
            nt1: Option<usize>,
            next: Option<usize>,
            k: usize,
        ) {
            let out = self.buf[self.skip..].as_mut_ptr();
            let steps = k / 32;
            // The source tiles in the order they are read: (column tile, k-block of 32).
            let cols = [Some(nt0), nt1, next];
            let source = |i: usize| -> Option<*const u8> {
                let nt = cols.get(i / steps).copied().flatten()?;
                let b32 = i % steps;
                Some(match w {
                    Bf16Source::Q8_0(t) => &t[nt * (k / QK8_0) + b32] as *const TileQ8_0 as _,
                    Bf16Source::Q4K(t) => {
                        let tile = &t[nt * (k / QK_K) + b32 / 8];
                        // the sub-block's quants (a tile's scales are read by its first)
                        tile.qs[(b32 % 8) * 256..].as_ptr()
                    }
                })
            };
            const AHEAD: usize = 8;
            let lines = match w {
                Bf16Source::Q8_0(_) => std::mem::size_of::<TileQ8_0>().div_ceil(64) + 1,
                Bf16Source::Q4K(_) => 256 / 64 + 1,
            };
            for i in 0..AHEAD.min(steps) {
                if let Some(p) = source(i) {
                    prefetch(p, lines);
                }
            }
            for (col, nt) in [Some(nt0), nt1].into_iter().enumerate() {
                for s in 0..steps {
                    let i = col * steps + s;
                    if let Some(p) = source(i + AHEAD) {
                        prefetch(p, lines);
                    }
                    let b32 = s;
                    // SAFETY: the panel holds k / 32 steps of two 1 KB tiles.
                    let tile_out = unsafe { out.add((s * 2 + col) * 1024) };
                    let Some(nt) = nt else {
                        unsafe { std::ptr::write_bytes(tile_out, 0, 1024) };
                        continue;
                    };
                    // SAFETY: amx_bf16_available (the only way here) implies AVX512-BF16.
                    unsafe {
                        match w {
                            Bf16Source::Q8_0(tiles) => {
                                q8_0_bf16_tile(&tiles[nt * (k / QK8_0) + b32], tile_out)
                            }
                            Bf16Source::Q4K(tiles) => {
                                q4k_bf16_tile(&tiles[nt * (k / QK_K) + b32 / 8], b32 % 8, tile_out)
                            }
                        }
                    }
                }
            }
        }
    }

    /// Asks for `lines` cache lines from `p` on (a hint: never faults).
    #[inline(always)]
    fn prefetch(p: *const u8, lines: usize) {
        for l in 0..lines {
            // SAFETY: prefetching is a hint and never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(l * 64) as *const i8) };
        }
    }

    /// 32 rows x 32 outputs over `steps` k-steps of 32 values: two A tiles from `a` (rows of
    /// `k` bf16 values), two B tiles a step from `b` (a `Panel`), summed in f32 into the C
    /// tiles, which are stored at `c` (rows of `ldc` values).
    pub(super) unsafe fn bf16_m32n32(
        a: *const u16,
        k: usize,
        b: *const u8,
        steps: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        ensure_configured();
        debug_assert!(steps > 0);
        unsafe {
            core::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "2:",
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b} + {sb}*1 + 1024]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b}, 2048",
                "dec {steps}",
                "jnz 2b",
                "tilestored [{c0} + {sc}*1], tmm0",
                "tilestored [{c0} + {sc}*1 + 64], tmm1",
                "tilestored [{c2} + {sc}*1], tmm2",
                "tilestored [{c2} + {sc}*1 + 64], tmm3",
                c0 = in(reg) c,
                c2 = in(reg) c.add(16 * ldc),
                sc = in(reg) ldc * 4,
                a0 = inout(reg) a => _,
                a1 = inout(reg) a.add(16 * k) => _,
                sa = in(reg) k * 2,
                b = inout(reg) b => _,
                sb = in(reg) 64usize,
                steps = inout(reg) steps => _,
                options(nostack)
            );
        }
    }
}


/// Whether products of many rows run on AMX-BF16 (`AmxBf16Acts`): an AMX core (see
/// `amx_available`) that also has AMX-BF16 and AVX512-BF16 (Intel Sapphire Rapids and later).
pub(crate) fn amx_bf16_available() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // CPUID leaf 7: EDX bit 22 is AMX-BF16 (bits 24 and 25, AMX-TILE and AMX-INT8,
            // are checked by amx_available, which also asks Linux for the tile state).
            let amx_bf16 = core::arch::x86_64::__cpuid_count(7, 0).edx & (1 << 22) != 0;
            amx_bf16 && std::is_x86_feature_detected!("avx512bf16") && amx_available()
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// The fewest rows a product must have to run on AMX-BF16 (`AmxBf16Acts`), when the core has
/// it: below, the weights' dequantization is not repaid.
pub(crate) const AMX_BF16_MIN_ROWS: usize = 16;

/// A weight on the VNNI tiles, as the AMX-BF16 kernel reads it: dequantized to bf16 a panel at
/// a time.
#[derive(Clone, Copy)]
pub(crate) enum Bf16Source<'a> {
    Q8_0(&'a [TileQ8_0]),
    Q4K(&'a [TileQ4K]),
}

/// Activations converted to bf16 for the AMX-BF16 kernel, once for every weight that multiplies
/// them (the fused projections): row-major, `k` values a row, rows padded with zeros to a
/// multiple of 32 so that every kernel unit reads two whole 16-row A tiles.
///
/// The products are f32 sums of bf16 products (`tdpbf16ps`), with the weights dequantized to
/// bf16 from their tiles, a panel of 32 outputs at a time: no per-block
/// epilogue as the int8 kernels need (a q8_0 block's 32 values each have their own scales).
pub(crate) struct AmxBf16Acts {
    m: usize,
    k: usize,
    m_pad: usize,
    // [m_pad][k] bf16 bits, from `skip` so that rows start on 64-byte lines
    buf: Vec<u16>,
    skip: usize,
}

impl AmxBf16Acts {
    pub(crate) fn new(lhs: &[f32], m: usize, k: usize) -> Self {
        debug_assert!(k.is_multiple_of(QK_K) && lhs.len() >= m * k);
        let m_pad = m.div_ceil(32) * 32;
        let mut buf = Vec::<u16>::with_capacity(m_pad * k + 32);
        // SAFETY: u16 has no invalid bit patterns; rows 0..m are written below and the
        // padding rows are zeroed here.
        unsafe { buf.set_len(m_pad * k + 32) };
        let skip = buf.as_ptr().align_offset(64);
        buf[skip + m * k..skip + m_pad * k].fill(0);
        let ptr = buf[skip..].as_mut_ptr() as usize;
        crate::utils::barrier_pool().execute_chunked(m, |range| {
            for r in range {
                // SAFETY: each row writes its own k values of the buffer.
                let out = unsafe { std::slice::from_raw_parts_mut((ptr as *mut u16).add(r * k), k) };
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    amx::bf16_row(&lhs[r * k..(r + 1) * k], out)
                };
                #[cfg(not(target_arch = "x86_64"))]
                let _ = out;
            }
        });
        Self {
            m,
            k,
            m_pad,
            buf,
            skip,
        }
    }

    /// `dst` (m x n) = these activations times the weight (n x k) transposed.
    pub(crate) fn matmul(&self, w: Bf16Source, n: usize, dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            let Self { m, k, m_pad, .. } = *self;
            let n_tiles = n / TILE_N;
            let n_pairs = n_tiles.div_ceil(2);
            // Rows of a partial last row pair, and every row when the last column tile has no
            // partner, go to a padded buffer first: the kernel stores whole 32 x 32 units.
            let odd = !n_tiles.is_multiple_of(2);
            let direct_rows = if odd { 0 } else { m / 32 * 32 };
            let pad_n = n_pairs * 32;
            let mut pad = vec![0f32; (m_pad - direct_rows) * pad_n];
            let a = self.buf[self.skip..].as_ptr() as usize;
            let (dst_ptr, pad_ptr) = (dst.as_mut_ptr() as usize, pad.as_mut_ptr() as usize);
            // Column pairs outermost: a thread dequantizes a pair's whole panel (32 outputs x
            // k values, k / 16 KB) once and runs every row pair against it. (Splitting k into
            // panels that fit a cache measured slower: the outputs are then read and written
            // once a panel.)
            crate::utils::barrier_pool().execute_chunked(n_pairs, |range| {
                amx::Panel::with(k, |panel| {
                    for np in range.clone() {
                        let nt0 = np * 2;
                        let nt1 = (nt0 + 1 < n_tiles).then_some(nt0 + 1);
                        let next = (np + 1 < range.end).then_some(nt0 + 2);
                        // SAFETY: the panel holds k / 32 steps of two B tiles; each unit reads
                        // two 16-row A tiles inside the padded rows and writes its own 32 rows
                        // x 32 columns of dst or of the padded buffer.
                        unsafe {
                            panel.fill(w, nt0, nt1, next, k);
                            for mp in 0..m_pad / 32 {
                                let r0 = mp * 32;
                                let (c, stride) = if r0 < direct_rows {
                                    ((dst_ptr as *mut f32).add(r0 * n + nt0 * TILE_N), n)
                                } else {
                                    let r = r0 - direct_rows;
                                    ((pad_ptr as *mut f32).add(r * pad_n + np * 32), pad_n)
                                };
                                let a0 = (a as *const u16).add(r0 * k);
                                amx::bf16_m32n32(a0, k, panel.ptr(), k / 32, c, stride);
                            }
                        }
                    }
                })
            });
            for r in direct_rows..m {
                let src = &pad[(r - direct_rows) * pad_n..][..n];
                dst[r * n..(r + 1) * n].copy_from_slice(src);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (w, n, dst);
            unreachable!()
        }
    }
}

// 256-bit kernel tier for CPUs without AVX512: AVX-VNNI (vpdpbusd ymm) or pure AVX2
// (maddubs+madd, safe for the u4/u6 x i8 operand ranges). Same tile layout, each
// 16-column group processed as two ymm halves.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum X86Level {
    Avx512Vnni,
    AvxVnni,
    Avx2,
}

pub(crate) fn level() -> Option<X86Level> {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Option<X86Level>> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let force_avx2 = std::env::var("MISTRALRS_FORCE_AVX2").as_deref() == Ok("1");
        let force_vnni = std::env::var("MISTRALRS_FORCE_AVXVNNI").as_deref() == Ok("1");
        if !force_avx2
            && !force_vnni
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vnni")
        {
            return Some(X86Level::Avx512Vnni);
        }
        if !force_avx2
            && (force_vnni || is_x86_feature_detected!("avxvnni"))
            && is_x86_feature_detected!("avx2")
        {
            return Some(X86Level::AvxVnni);
        }
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Some(X86Level::Avx2);
        }
        None
    })
}

#[cfg(target_arch = "x86_64")]
mod kernels256 {
    use super::kernels::MAX_MT;
    use super::*;
    use core::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    unsafe fn bcast4_256(act: &[i8], off: usize) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(act.as_ptr().add(off) as *const i32))
    }

    #[target_feature(enable = "avx2,avxvnni")]
    unsafe fn dp_vnni(acc: __m256i, w_u8: __m256i, a_i8: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, w_u8, a_i8)
    }

    // dpbusd stand-in for pure AVX2: maddubs (u8 x i8 -> i16 pairs) then madd against ones.
    #[target_feature(enable = "avx2")]
    unsafe fn dp_avx2(acc: __m256i, w_u8: __m256i, a_i8: __m256i) -> __m256i {
        let prod16 = _mm256_maddubs_epi16(w_u8, a_i8);
        _mm256_add_epi32(acc, _mm256_madd_epi16(prod16, _mm256_set1_epi16(1)))
    }

    macro_rules! q4k_tile_256 {
        ($fname:ident, $dp:path, $feat:literal) => {
            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn $fname(
                tile: &TileQ4K,
                acts: &[&BlockQ8K],
                acc: &mut [[__m256; 2]],
            ) {
                let mask = _mm256_set1_epi8(0x0F_u8 as i8);
                let mut qsum = [[_mm256_setzero_si256(); 2]; MAX_MT];
                for sub in 0..8 {
                    let mut isum = [[_mm256_setzero_si256(); 2]; MAX_MT];
                    for g4 in 0..4 {
                        let g = sub * 4 + g4;
                        for h in 0..2 {
                            let w = _mm256_loadu_si256(
                                tile.qs.as_ptr().add(g * TILE_N * 4 + h * 32) as *const _,
                            );
                            let lo = _mm256_and_si256(w, mask);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
                            for (m, act) in acts.iter().enumerate() {
                                let a_lo = bcast4_256(&act.qs, sub * 32 + g4 * 8);
                                let a_hi = bcast4_256(&act.qs, sub * 32 + g4 * 8 + 4);
                                isum[m][h] = $dp(isum[m][h], lo, a_lo);
                                isum[m][h] = $dp(isum[m][h], hi, a_hi);
                            }
                        }
                    }
                    for h in 0..2 {
                        let sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                            tile.scales[sub].as_ptr().add(h * 8) as *const _,
                        ));
                        for m in 0..acts.len() {
                            qsum[m][h] =
                                _mm256_add_epi32(qsum[m][h], _mm256_mullo_epi32(isum[m][h], sc));
                        }
                    }
                }
                for h in 0..2 {
                    let d = _mm256_loadu_ps(tile.d.as_ptr().add(h * 8));
                    let dmin = _mm256_loadu_ps(tile.dmin.as_ptr().add(h * 8));
                    for (m, act) in acts.iter().enumerate() {
                        let mut msum = _mm256_setzero_si256();
                        for sub in 0..8 {
                            let bsum = act.bsums[sub * 2] as i32 + act.bsums[sub * 2 + 1] as i32;
                            let mn = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                tile.mins[sub].as_ptr().add(h * 8) as *const _,
                            ));
                            msum = _mm256_add_epi32(
                                msum,
                                _mm256_mullo_epi32(mn, _mm256_set1_epi32(bsum)),
                            );
                        }
                        let dall = _mm256_set1_ps(act.d);
                        acc[m][h] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(qsum[m][h]),
                            _mm256_mul_ps(d, dall),
                            acc[m][h],
                        );
                        acc[m][h] = _mm256_fnmadd_ps(
                            _mm256_cvtepi32_ps(msum),
                            _mm256_mul_ps(dmin, dall),
                            acc[m][h],
                        );
                    }
                }
            }
        };
    }
    q4k_tile_256!(q4k_tile_avxvnni, dp_vnni, "avx2,avxvnni,fma");

    // Pure AVX2 q4k. The maddubs products of 4-bit weights and q8k activations stay in i16
    // for a whole 32-value sub-block (8 pair sums of at most 2 * 15 * 128 = 3840, so
    // |sum| <= 30720 < 2^15), and one madd with the sub-block's scale in both halves of each
    // column's lane gives scale * dot in i32: one multiply-port op per 32 products instead
    // of two plus a mullo per sub-block. The two 8-column halves run one after the other and
    // the row count is a constant, so the accumulators stay in AVX2's 16 registers.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn q4k_tile_avx2_mt<const MT: usize>(
        tile: &TileQ4K,
        acts: &[&BlockQ8K],
        acc: &mut [[__m256; 2]],
    ) {
        let mask = _mm256_set1_epi8(0x0F_u8 as i8);
        for h in 0..2 {
            let mut qsum = [_mm256_setzero_si256(); MT];
            for sub in 0..8 {
                let mut s16 = [_mm256_setzero_si256(); MT];
                for g4 in 0..4 {
                    let g = sub * 4 + g4;
                    let w =
                        _mm256_loadu_si256(tile.qs.as_ptr().add(g * TILE_N * 4 + h * 32) as *const _);
                    let lo = _mm256_and_si256(w, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
                    for m in 0..MT {
                        let a_lo = bcast4_256(&acts[m].qs, sub * 32 + g4 * 8);
                        let a_hi = bcast4_256(&acts[m].qs, sub * 32 + g4 * 8 + 4);
                        s16[m] = _mm256_add_epi16(s16[m], _mm256_maddubs_epi16(lo, a_lo));
                        s16[m] = _mm256_add_epi16(s16[m], _mm256_maddubs_epi16(hi, a_hi));
                    }
                }
                let sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    tile.scales[sub].as_ptr().add(h * 8) as *const _,
                ));
                let sc = _mm256_or_si256(sc, _mm256_slli_epi32(sc, 16));
                for m in 0..MT {
                    qsum[m] = _mm256_add_epi32(qsum[m], _mm256_madd_epi16(s16[m], sc));
                }
            }
            let d = _mm256_loadu_ps(tile.d.as_ptr().add(h * 8));
            let dmin = _mm256_loadu_ps(tile.dmin.as_ptr().add(h * 8));
            for m in 0..MT {
                let act = acts[m];
                let mut msum = _mm256_setzero_si256();
                for sub in 0..8 {
                    let bsum = act.bsums[sub * 2] as i32 + act.bsums[sub * 2 + 1] as i32;
                    let mn = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        tile.mins[sub].as_ptr().add(h * 8) as *const _,
                    ));
                    msum = _mm256_add_epi32(msum, _mm256_mullo_epi32(mn, _mm256_set1_epi32(bsum)));
                }
                let dall = _mm256_set1_ps(act.d);
                acc[m][h] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(qsum[m]),
                    _mm256_mul_ps(d, dall),
                    acc[m][h],
                );
                acc[m][h] = _mm256_fnmadd_ps(
                    _mm256_cvtepi32_ps(msum),
                    _mm256_mul_ps(dmin, dall),
                    acc[m][h],
                );
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn q4k_tile_avx2(tile: &TileQ4K, acts: &[&BlockQ8K], acc: &mut [[__m256; 2]]) {
        match acts.len() {
            1 => q4k_tile_avx2_mt::<1>(tile, acts, acc),
            2 => q4k_tile_avx2_mt::<2>(tile, acts, acc),
            3 => q4k_tile_avx2_mt::<3>(tile, acts, acc),
            _ => q4k_tile_avx2_mt::<MAX_MT>(tile, acts, acc),
        }
    }

    macro_rules! q6k_tile_256 {
        ($fname:ident, $dp:path, $feat:literal) => {
            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn $fname(
                tile: &TileQ6K,
                acts: &[&BlockQ8K],
                acc: &mut [[__m256; 2]],
            ) {
                for sub in 0..16 {
                    let mut isum = [[_mm256_setzero_si256(); 2]; MAX_MT];
                    for g4 in 0..4 {
                        let g = sub * 4 + g4;
                        for h in 0..2 {
                            let w = _mm256_loadu_si256(
                                tile.qs.as_ptr().add(g * TILE_N * 4 + h * 32) as *const _,
                            );
                            for (m, act) in acts.iter().enumerate() {
                                let a = bcast4_256(&act.qs, sub * 16 + g4 * 4);
                                isum[m][h] = $dp(isum[m][h], w, a);
                            }
                        }
                    }
                    for h in 0..2 {
                        let scale = _mm256_loadu_ps(tile.scales[sub].as_ptr().add(h * 8));
                        for (m, act) in acts.iter().enumerate() {
                            let dall = act.d;
                            let bsum = act.bsums[sub] as f32;
                            let f = _mm256_sub_ps(
                                _mm256_cvtepi32_ps(isum[m][h]),
                                _mm256_set1_ps(32.0 * bsum),
                            );
                            acc[m][h] = _mm256_fmadd_ps(
                                f,
                                _mm256_mul_ps(scale, _mm256_set1_ps(dall)),
                                acc[m][h],
                            );
                        }
                    }
                }
            }
        };
    }
    q6k_tile_256!(q6k_tile_avxvnni, dp_vnni, "avx2,avxvnni,fma");
    q6k_tile_256!(q6k_tile_avx2, dp_avx2, "avx2,fma");

    // Pure AVX2 q8_0 on signed tiles (`pack_q8_0` leaves out the +128 offset at this level):
    // maddubs(|a|, sign(w, a)) = a * w in pairs of at most 2 * 128 * 127 = 32512 < 2^15 (q8_0
    // weights are within ±127, and |a| of an activation of -128 is 128 as an unsigned byte).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_tile2_avx2_mt<const MT: usize>(
        t0: &TileQ8_0,
        t1: &TileQ8_0,
        acts: &[&BlockQ8K],
        sub32: usize,
        acc: &mut [[__m256; 2]],
    ) {
        let ones = _mm256_set1_epi16(1);
        for (blk, tile) in [(sub32, t0), (sub32 + 1, t1)] {
            let mut isum = [[_mm256_setzero_si256(); 2]; MT];
            for g4 in 0..8 {
                let w0 = _mm256_loadu_si256(tile.qs.as_ptr().add(g4 * TILE_N * 4) as *const _);
                let w1 = _mm256_loadu_si256(tile.qs.as_ptr().add(g4 * TILE_N * 4 + 32) as *const _);
                for m in 0..MT {
                    let a = bcast4_256(&acts[m].qs, blk * 32 + g4 * 4);
                    let ua = _mm256_abs_epi8(a);
                    let p0 = _mm256_maddubs_epi16(ua, _mm256_sign_epi8(w0, a));
                    let p1 = _mm256_maddubs_epi16(ua, _mm256_sign_epi8(w1, a));
                    isum[m][0] = _mm256_add_epi32(isum[m][0], _mm256_madd_epi16(p0, ones));
                    isum[m][1] = _mm256_add_epi32(isum[m][1], _mm256_madd_epi16(p1, ones));
                }
            }
            for h in 0..2 {
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(tile.d.as_ptr().add(h * 8) as *const _));
                for m in 0..MT {
                    acc[m][h] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(isum[m][h]),
                        _mm256_mul_ps(dw, _mm256_set1_ps(acts[m].d)),
                        acc[m][h],
                    );
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn q8_0_tile2_avx2(
        t0: &TileQ8_0,
        t1: &TileQ8_0,
        acts: &[&BlockQ8K],
        sub32: usize,
        acc: &mut [[__m256; 2]],
    ) {
        match acts.len() {
            1 => q8_0_tile2_avx2_mt::<1>(t0, t1, acts, sub32, acc),
            2 => q8_0_tile2_avx2_mt::<2>(t0, t1, acts, sub32, acc),
            3 => q8_0_tile2_avx2_mt::<3>(t0, t1, acts, sub32, acc),
            _ => q8_0_tile2_avx2_mt::<MAX_MT>(t0, t1, acts, sub32, acc),
        }
    }

    // AVX-VNNI q8_0 on the +128-offset tiles with the bsum correction.
    #[target_feature(enable = "avx2,avxvnni,fma,f16c")]
    pub(crate) unsafe fn q8_0_tile2_avxvnni(
        t0: &TileQ8_0,
        t1: &TileQ8_0,
        acts: &[&BlockQ8K],
        sub32: usize,
        acc: &mut [[__m256; 2]],
    ) {
        let mut isum_a = [[_mm256_setzero_si256(); 2]; MAX_MT];
        let mut isum_b = [[_mm256_setzero_si256(); 2]; MAX_MT];
        for g4 in 0..8 {
            for h in 0..2 {
                let wa =
                    _mm256_loadu_si256(t0.qs.as_ptr().add(g4 * TILE_N * 4 + h * 32) as *const _);
                let wb =
                    _mm256_loadu_si256(t1.qs.as_ptr().add(g4 * TILE_N * 4 + h * 32) as *const _);
                for (m, act) in acts.iter().enumerate() {
                    isum_a[m][h] = _mm256_dpbusd_avx_epi32(
                        isum_a[m][h],
                        wa,
                        bcast4_256(&act.qs, sub32 * 32 + g4 * 4),
                    );
                    isum_b[m][h] = _mm256_dpbusd_avx_epi32(
                        isum_b[m][h],
                        wb,
                        bcast4_256(&act.qs, (sub32 + 1) * 32 + g4 * 4),
                    );
                }
            }
        }
        for (blk, isum, tile) in [(sub32, &isum_a, t0), (sub32 + 1, &isum_b, t1)] {
            for h in 0..2 {
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(tile.d.as_ptr().add(h * 8) as *const _));
                for (m, act) in acts.iter().enumerate() {
                    let bsum = (act.bsums[blk * 2] as i32 + act.bsums[blk * 2 + 1] as i32) as f32;
                    let f =
                        _mm256_sub_ps(_mm256_cvtepi32_ps(isum[m][h]), _mm256_set1_ps(128.0 * bsum));
                    acc[m][h] =
                        _mm256_fmadd_ps(f, _mm256_mul_ps(dw, _mm256_set1_ps(act.d)), acc[m][h]);
                }
            }
        }
    }
}
