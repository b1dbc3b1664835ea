//! Tests over devices, as candle's `test_device!` does: one test body, an instance per device.

/// The first GPU, with TF32 off for f32 products (the parity bounds are f32's).
#[cfg(feature = "cuda")]
pub fn cuda_device() -> candle_core::Device {
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(false);
    candle_core::Device::new_cuda(0).expect("a CUDA build's GPU tests need a GPU")
}

/// `test_device!(body, cpu_name, gpu_kernels_name, cuda_name)` defines three tests that call
/// `body(&Device)`: `cpu_name` on the CPU with the kernels it takes there (the fused ones);
/// `gpu_kernels_name` on the CPU with the kernels a GPU takes (candle's, which have no backward
/// pass and are refused wherever a gradient is needed), so that on a GPU only the device is
/// new; `cuda_name` on the first GPU, compiled only when the calling crate's `cuda` feature is
/// on.
#[macro_export]
macro_rules! test_device {
    ($body:ident, $cpu:ident, $gpu_kernels:ident, $cuda:ident) => {
        #[test]
        fn $cpu() {
            $body(&candle_core::Device::Cpu)
        }

        #[test]
        fn $gpu_kernels() {
            use $crate::ops;
            let _candle = ops::force(ops::Kernel::Candle);
            let before = ops::candle_calls();
            $body(&candle_core::Device::Cpu);
            assert!(ops::candle_calls() > before, "candle's kernels were used");
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn $cuda() {
            $body(&$crate::test_utils::cuda_device())
        }
    };
}
