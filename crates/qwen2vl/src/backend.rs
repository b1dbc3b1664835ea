//! Where and how the model computes: device, weight dtype and quantization, chosen once (the
//! CLI resolves them from the shared model options) and passed down to loading.
//!
//! Quantization names are ggml's: `q8_0` (blocks of 32 weights, one f16 scale, 8.5 bits a
//! weight) and `q4k` (super-blocks of 256 weights with 6-bit sub-block scales, 4.5 bits a
//! weight). The linear layers' weights (every projection of the language model and the vision
//! tower, the LM head and the embedding table) are quantized; norms, biases, the patch
//! embedding, attention and the residual stream stay f32. On x86 cores with AVX-512 VNNI,
//! AVX-VNNI or AVX2, candle's repacked int8 kernels multiply them.

use std::fmt;

use candle_core::{DType, Device, quantized::GgmlDType};

/// How linear-layer weights are stored at inference.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub enum Quantization {
    /// Dense weights in the backend's dtype.
    #[default]
    #[serde(rename = "none")]
    None,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4k")]
    Q4K,
}

impl Quantization {
    pub const ALL: [Quantization; 3] = [Quantization::None, Quantization::Q8_0, Quantization::Q4K];

    /// ggml's name (`none`, `q8_0`, `q4k`).
    pub fn name(self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Q8_0 => "q8_0",
            Quantization::Q4K => "q4k",
        }
    }

    pub fn is_quantized(self) -> bool {
        self != Quantization::None
    }

    /// The ggml type an `[out_dim, in_dim]` linear weight gets: this format when candle's
    /// int8 kernels take the shape (rows split into 256-wide super-blocks, `in_dim % 256 == 0`,
    /// and whole 16-row tiles, `out_dim % 16 == 0`), else `None`: the layer stays f32. Unlike
    /// llama.cpp's quantizer, which falls back to a wider quantized type, a misfit layer does
    /// not fall back to q8_0: candle's generic (unpacked) q8_0 product is several times slower
    /// than its f32 GEMM on these CPUs (the demo model's `detect` went from 1.6 s to 14.1 s
    /// with its 96- and 128-wide layers in q8_0).
    pub fn weight_type(self, out_dim: usize, in_dim: usize) -> Option<GgmlDType> {
        let fits = in_dim > 0 && in_dim.is_multiple_of(256) && out_dim.is_multiple_of(16);
        match self {
            Quantization::None => None,
            _ if !fits => None,
            Quantization::Q4K => Some(GgmlDType::Q4K),
            Quantization::Q8_0 => Some(GgmlDType::Q8_0),
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Quantization::ALL
            .into_iter()
            .find(|q| q.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown quantization {s:?}: expected one of {}",
                    Quantization::ALL.map(Quantization::name).join(", ")
                )
            })
    }
}

/// The name ggml and our reports give a weight type.
pub fn type_name(t: Option<GgmlDType>) -> &'static str {
    match t {
        None | Some(GgmlDType::F32) => "f32",
        Some(GgmlDType::F16) => "f16",
        Some(GgmlDType::BF16) => "bf16",
        Some(GgmlDType::Q8_0) => "q8_0",
        Some(GgmlDType::Q4K) => "q4k",
        Some(GgmlDType::Q6K) => "q6k",
        Some(_) => "other",
    }
}

/// `--device`: where the model computes. `auto` takes the first GPU when this build has CUDA
/// and the machine a GPU, else the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    #[default]
    Auto,
    Cpu,
    /// A CUDA GPU by ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Auto => f.write_str("auto"),
            DeviceRequest::Cpu => f.write_str("cpu"),
            DeviceRequest::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceRequest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || format!("unknown device {s:?}: expected cpu, cuda, cuda:N or auto");
        match s {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceRequest::Cuda)
                .ok_or_else(unknown),
        }
    }
}

/// Whether this binary was built with the `cuda` feature.
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");

impl DeviceRequest {
    /// Opens the device for weights of `dtype`, with a line that says what was chosen and why
    /// (`auto` says it). Every refusal names the fix: the `cuda` feature on a CPU-only build, a
    /// GPU ordinal out of range, bf16 on a GPU without it (f16 instead).
    pub fn open(self, dtype: DType) -> Result<(Device, String), String> {
        match self {
            DeviceRequest::Cpu => Ok((Device::Cpu, "cpu".into())),
            DeviceRequest::Cuda(n) if !BUILT_WITH_CUDA => Err(format!(
                "--device cuda:{n}: this inspector was built without CUDA; rebuild it with the \
                 `cuda` feature (`cargo build --release --features cuda`, see the README's \
                 \"GPU (CUDA)\" section) or use --device cpu"
            )),
            DeviceRequest::Cuda(n) => gpu::open(n, dtype),
            DeviceRequest::Auto if !BUILT_WITH_CUDA => {
                Ok((Device::Cpu, "cpu (auto: this build has no CUDA)".into()))
            }
            DeviceRequest::Auto => match gpu::count() {
                Ok(n) if n > 0 => {
                    let (device, what) = gpu::open(0, dtype)?;
                    Ok((device, format!("{what} (auto)")))
                }
                Ok(_) => Ok((Device::Cpu, "cpu (auto: no GPU found)".into())),
                Err(e) => Ok((Device::Cpu, format!("cpu (auto: {e})"))),
            },
        }
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::{DType, Device};

    /// How many GPUs the driver sees (an error when the driver is missing or fails).
    pub fn count() -> Result<usize, String> {
        // candle's CUDA libraries are loaded at run time (a vendor patch), so a CUDA build
        // starts on a machine without the NVIDIA driver and can say so.
        // SAFETY: only tries to open the driver library.
        if !unsafe { sys::is_culib_present() } {
            return Err(
                "no NVIDIA driver found (libcuda.so.1 is not on the library path): \
                 this machine has no usable GPU"
                    .into(),
            );
        }
        result::init().map_err(|e| format!("the CUDA driver did not start: {e}"))?;
        let n = result::device::get_count().map_err(|e| format!("counting GPUs: {e}"))?;
        Ok(n.max(0) as usize)
    }

    pub fn open(ordinal: usize, dtype: DType) -> Result<(Device, String), String> {
        let n = count().map_err(|e| format!("--device cuda:{ordinal}: {e}"))?;
        if n == 0 {
            return Err(format!(
                "--device cuda:{ordinal}: no CUDA GPU found on this machine; use --device cpu"
            ));
        }
        if ordinal >= n {
            return Err(format!(
                "--device cuda:{ordinal} is out of range: this machine has {n} GPU(s), \
                 cuda:0 to cuda:{}",
                n - 1
            ));
        }
        let attr = |a| -> Result<i32, String> {
            let dev = result::device::get(ordinal as i32).map_err(|e| e.to_string())?;
            // SAFETY: `dev` is a valid device handle from the initialised driver.
            unsafe { result::device::get_attribute(dev, a) }.map_err(|e| e.to_string())
        };
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        if dtype == DType::BF16 && major < 8 {
            return Err(format!(
                "--dtype bf16: cuda:{ordinal} (compute capability {major}.{minor}) has no bf16 \
                 arithmetic; use --dtype f16"
            ));
        }
        let device = Device::new_cuda(ordinal)
            .map_err(|e| format!("--device cuda:{ordinal}: cannot open the GPU: {e}"))?;
        Ok((
            device,
            format!("cuda:{ordinal} (compute capability {major}.{minor})"),
        ))
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    use candle_core::{DType, Device};

    pub fn count() -> Result<usize, String> {
        Ok(0)
    }

    pub fn open(ordinal: usize, _dtype: DType) -> Result<(Device, String), String> {
        Err(format!("--device cuda:{ordinal}: this build has no CUDA"))
    }
}

/// Device, dense dtype and quantization of one loaded model.
#[derive(Debug, Clone)]
pub struct Backend {
    pub device: Device,
    /// The dtype of dense weights (and of the linear layers' activations). f32 with a quantized
    /// base: the int8 kernels take f32 rows.
    pub dtype: DType,
    pub quantization: Quantization,
}

impl Backend {
    /// f32 on the CPU, no quantization: the reference.
    pub fn cpu() -> Backend {
        Backend {
            device: Device::Cpu,
            dtype: DType::F32,
            quantization: Quantization::None,
        }
    }

    /// Checks the combination: a quantized base computes in f32.
    pub fn validate(&self) -> Result<(), String> {
        if self.quantization.is_quantized() && self.dtype != DType::F32 {
            return Err(format!(
                "--dtype {} with a quantized base ({}): the quantized kernels compute in f32; \
                 leave --dtype at f32",
                self.dtype.as_str(),
                self.quantization
            ));
        }
        if self.quantization.is_quantized() && !self.device.is_cpu() {
            return Err(format!(
                "quantization {} runs on the CPU only",
                self.quantization
            ));
        }
        Ok(())
    }

    /// `cpu f32`, `cpu q8_0`: for logs and the answer cache key.
    pub fn describe(&self) -> String {
        let device = match &self.device {
            Device::Cpu => "cpu".to_string(),
            Device::Cuda(d) => format!("cuda:{}", cuda_ordinal(d)),
            Device::Metal(_) => "metal".to_string(),
        };
        match self.quantization {
            Quantization::None => format!("{device} {}", self.dtype.as_str()),
            q => format!("{device} {q}"),
        }
    }
}

/// The GPU ordinal of a CUDA device (0 on builds without CUDA, where none exists).
#[allow(unused_variables)]
fn cuda_ordinal(d: &candle_core::CudaDevice) -> usize {
    #[cfg(feature = "cuda")]
    {
        d.cuda_stream().context().ordinal()
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for q in Quantization::ALL {
            assert_eq!(q.name().parse::<Quantization>().unwrap(), q);
        }
        let err = "q4_k_m".parse::<Quantization>().unwrap_err();
        assert!(err.contains("q4_k_m") && err.contains("q8_0, q4k"), "{err}");
    }

    #[test]
    fn layers_the_int8_kernels_do_not_take_stay_f32() {
        use Quantization::{Q4K, Q8_0};
        assert_eq!(Q4K.weight_type(8960, 1536), Some(GgmlDType::Q4K));
        assert_eq!(
            Q8_0.weight_type(1536, 8960),
            Some(GgmlDType::Q8_0),
            "8960 = 35 · 256"
        );
        assert_eq!(
            Q8_0.weight_type(128, 96),
            None,
            "96 is not a multiple of 256"
        );
        assert_eq!(Q8_0.weight_type(1280, 5120), Some(GgmlDType::Q8_0));
        assert_eq!(Q4K.weight_type(1280, 1176), None, "the patch embedding");
        assert_eq!(
            Q8_0.weight_type(100, 256),
            None,
            "100 rows are not whole 16-row tiles"
        );
        assert_eq!(Quantization::None.weight_type(1536, 1536), None);
    }

    #[test]
    fn devices_parse_and_a_cpu_build_refuses_cuda_by_naming_the_feature() {
        assert_eq!("auto".parse::<DeviceRequest>(), Ok(DeviceRequest::Auto));
        assert_eq!("cpu".parse::<DeviceRequest>(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse::<DeviceRequest>(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!(
            "cuda:3".parse::<DeviceRequest>(),
            Ok(DeviceRequest::Cuda(3))
        );
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU"] {
            let err = bad.parse::<DeviceRequest>().unwrap_err();
            assert!(err.contains(bad) && err.contains("cuda:N"), "{err}");
        }
        let (device, what) = DeviceRequest::Cpu.open(DType::F32).unwrap();
        assert!(device.is_cpu() && what == "cpu");
        if !BUILT_WITH_CUDA {
            let err = DeviceRequest::Cuda(1).open(DType::F32).unwrap_err();
            assert!(
                err.contains("`cuda` feature") && err.contains("cuda:1"),
                "{err}"
            );
            let (device, what) = DeviceRequest::Auto.open(DType::BF16).unwrap();
            assert!(device.is_cpu(), "{what}");
            assert!(what.contains("no CUDA"), "{what}");
        }
    }

    #[test]
    fn a_quantized_base_computes_in_f32() {
        let mut b = Backend::cpu();
        b.quantization = Quantization::Q8_0;
        assert!(b.validate().is_ok());
        b.dtype = DType::BF16;
        let err = b.validate().unwrap_err();
        assert!(err.contains("bf16") && err.contains("q8_0"), "{err}");
        assert_eq!(Backend::cpu().describe(), "cpu f32");
    }
}
