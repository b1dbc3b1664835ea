//! Branch-free f32 kernels written so that the compiler vectorises them: `exp` over a slice
//! (Cephes' polynomial, within 2 ulp of libm's `expf` over the range that matters), and
//! sum/max reductions with eight independent accumulators.
//!
//! libm's `expf` is a scalar call per element; in the fused attention, softmax and SiLU
//! kernels it was the largest single cost after matrix products (about 7 % of a training
//! step). On x86-64 the slice functions are compiled twice, for the baseline target and for
//! AVX2 + FMA, and pick one at run time.

const LANES: usize = 8;

/// `e^x` for one value: Cephes `expf` (range reduction by ln 2 split in two, degree-6
/// polynomial, exponent built from bits). Results below `e^-87.3` are flushed to 0, above
/// `e^88` saturate at `e^88`; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let under = x < -87.3;
    let xc = x.clamp(-87.3, 88.0);
    // Plain multiply-adds: `mul_add` is a libm call where the target has no FMA.
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let bits = (t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23;
    let y = y * f32::from_bits(bits as u32);
    if under { 0.0 } else { y }
}

macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn imp($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret { imp($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

dispatch! {
    /// `x[i] = e^(x[i] - shift)` in place; returns the sum of the results.
    exp_sub_sum(x: &mut [f32], shift: f32) -> f32 {
        for v in x.iter_mut() {
            *v = exp(*v - shift);
        }
        sum_imp(x)
    }
}

dispatch! {
    /// `x[i] += m[i]` in place; returns the maximum of the results (−∞ when empty).
    add_max(x: &mut [f32], m: &[f32]) -> f32 {
        for (v, m) in x.iter_mut().zip(m) {
            *v += m;
        }
        max_imp(x)
    }
}

dispatch! {
    /// The maximum of `x` (−∞ when empty).
    max(x: &[f32]) -> f32 {
        max_imp(x)
    }
}

dispatch! {
    /// `y[i] = e^(x[i] - shift)`; returns the sum of the results.
    exp_sub_sum_into(y: &mut [f32], x: &[f32], shift: f32) -> f32 {
        for (y, x) in y.iter_mut().zip(x) {
            *y = exp(*x - shift);
        }
        sum_imp(y)
    }
}

dispatch! {
    /// `y[i] = x[i] · σ(α·x[i])`.
    silu_into(y: &mut [f32], x: &[f32], alpha: f32) -> () {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x / (1.0 + exp(-alpha * x));
        }
    }
}

dispatch! {
    /// `dx[i] = g[i]·(σ + αx·σ·(1 − σ))` with `σ = σ(α·x[i])`.
    silu_bwd_into(dx: &mut [f32], x: &[f32], g: &[f32], alpha: f32) -> () {
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let s = 1.0 / (1.0 + exp(-alpha * x));
            *dx = g * (s + alpha * x * s * (1.0 - s));
        }
    }
}

dispatch! {
    /// `Σ a[i]·b[i]` over the shorter of the two, with eight independent accumulators.
    dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
        for (x, y) in ca.zip(cb) {
            for ((acc, x), y) in acc.iter_mut().zip(x).zip(y) {
                *acc += x * y;
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

dispatch! {
    /// `y[i] += alpha·x[i]` over the shorter of the two.
    axpy(y: &mut [f32], alpha: f32, x: &[f32]) -> () {
        for (y, x) in y.iter_mut().zip(x) {
            *y += alpha * x;
        }
    }
}

#[inline(always)]
fn sum_imp(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max_imp(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().fold(tail, |a, &b| if b > a { b } else { a })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((a - b).abs() / b);
            x += 0.000_731;
        }
        // 2 ulp of f32 is 2.4e-7 relative.
        assert!(worst < 2.4e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn slice_kernels_match_scalar_loops() {
        let x: Vec<f32> = (0..1003)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let m: Vec<f32> = (0..1003)
            .map(|i| if i % 5 == 0 { f32::MIN } else { 0.0 })
            .collect();
        let mut a = x.clone();
        let mx = add_max(&mut a, &m);
        let want: Vec<f32> = x.iter().zip(&m).map(|(x, m)| x + m).collect();
        assert_eq!(a, want);
        assert_eq!(mx, want.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        assert_eq!(max(&x), x.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let s = exp_sub_sum(&mut a, mx);
        let want_s: f64 = want.iter().map(|v| ((v - mx) as f64).exp()).sum();
        assert!(((s as f64) - want_s).abs() / want_s < 1e-6);
        let z: Vec<f32> = x.iter().rev().map(|v| v * 0.3 + 1.0).collect();
        let want_dot: f64 = x.iter().zip(&z).map(|(a, b)| *a as f64 * *b as f64).sum();
        let d = dot(&x, &z);
        assert!(
            (d as f64 - want_dot).abs() <= 1e-5 * want_dot.abs(),
            "{d} {want_dot}"
        );
        let mut y = z.clone();
        axpy(&mut y, 0.5, &x);
        for ((y, w), x) in y.iter().zip(&z).zip(&x) {
            assert_eq!(*y, w + 0.5 * x);
        }
        let mut y = vec![0f32; x.len()];
        silu_into(&mut y, &x, 1.702);
        for (y, x) in y.iter().zip(&x) {
            let want = *x as f64 / (1.0 + (-1.702 * *x as f64).exp());
            assert!((*y as f64 - want).abs() <= 1e-6 * want.abs().max(1.0));
        }
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }
}
