//! candle's AVX-512 VNNI int8 kernels for products of 16 rows or more, which an AMX core would
//! otherwise run on AMX (`MISTRALRS_NO_AMX`, read once per process: this binary holds this one
//! test), so that AMX machines (Intel Sapphire Rapids and later) check the kernels that AVX-512
//! machines without AMX (AMD Zen 4, Intel Ice Lake) run.

#[path = "common/int8.rs"]
mod int8;

#[test]
fn vnni_int8_kernels_equal_their_arithmetic_without_amx() {
    // SAFETY: the only test of this binary, run before anything reads the environment.
    unsafe { std::env::set_var("MISTRALRS_NO_AMX", "1") };
    int8::kernels_equal_their_arithmetic();
}
