//! candle's pure-AVX2 int8 kernels, forced on cores that have more (`MISTRALRS_FORCE_AVX2`,
//! read once per process: this binary holds this one test), so that AVX-512 machines check
//! the kernels that AVX2-only machines (AMD Zen 2 and 3, older Intel) run.

#[path = "common/int8.rs"]
mod int8;

#[test]
fn avx2_int8_kernels_equal_their_arithmetic() {
    if !std::arch::is_x86_feature_detected!("avx2") {
        println!("no AVX2 on this core");
        return;
    }
    // SAFETY: the only test of this binary, run before anything reads the environment.
    unsafe { std::env::set_var("MISTRALRS_FORCE_AVX2", "1") };
    assert!(
        int8::kernels_equal_their_arithmetic(),
        "AVX2 is present, so the repacked kernels must serve these products"
    );
}
