//! candle's repacked int8 kernels at this core's own level (AVX-512 VNNI, AVX-VNNI or AVX2).

#[path = "common/int8.rs"]
mod int8;

#[test]
fn int8_kernels_equal_their_arithmetic() {
    int8::kernels_equal_their_arithmetic();
}
