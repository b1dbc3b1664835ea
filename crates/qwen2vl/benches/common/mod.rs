//! What the benches of this crate share.

use std::time::Instant;

/// Seconds per call: the best of `reps` calls after one warm-up.
pub fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
