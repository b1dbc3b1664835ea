//! The option group every command that loads a model shares.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::DType;
use clap::{Args, ValueEnum};
use inspector_qwen2vl::{
    Backend, DeviceRequest, Quantization, Qwen2Vl, image::ProcessorConfig, resolve,
};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}

impl From<DtypeArg> for DType {
    fn from(d: DtypeArg) -> DType {
        match d {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F16 => DType::F16,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A Hugging Face model directory, or a repo id: looked up in the local Hugging Face cache
    /// (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), else downloaded there
    /// from HF_ENDPOINT (default https://huggingface.co) unless HF_HUB_OFFLINE=1. Without it, the
    /// bundled demo model (models/demo: base + adapter) is used.
    #[arg(long, value_name = "DIR|REPO")]
    pub model: Option<String>,
    /// Where the model computes: `cpu`, `cuda` (the first GPU), `cuda:N`, or `auto` (a GPU when
    /// this build has CUDA and the machine a GPU, else the CPU). The choice is printed.
    #[arg(long, value_name = "cpu|cuda|cuda:N|auto", default_value = "auto", value_parser = parse_device)]
    pub device: DeviceRequest,
    /// Weight dtype. bf16 needs a GPU of compute capability 8.0 or later (else f16).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Override the processor's minimum pixels per image.
    #[arg(long, value_name = "N")]
    pub min_pixels: Option<usize>,
    /// Override the processor's maximum pixels per image (the published 12.8 M is slow on CPUs).
    #[arg(long, value_name = "N")]
    pub max_pixels: Option<usize>,
    /// A PEFT LoRA adapter directory (ours or PEFT's) to apply on the model.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// CPU threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Quantize the linear layers as the model loads (ggml's formats): `q8_0` (8.5 bits a
    /// weight, answers as f32's), `q4k` (4.5 bits, fastest decode, least memory). A directory
    /// written by `inspector model quantize` loads in its own format without this; naming
    /// another format is refused.
    #[arg(long, value_name = "none|q8_0|q4k", default_value = "none", value_parser = parse_quantization)]
    pub quantize: Quantization,
    /// The backend once resolved: the device is opened (and the choice printed) once.
    #[arg(skip)]
    resolved: std::sync::OnceLock<Backend>,
}

/// `--quantize`'s parser (ggml's names; the error lists them).
pub fn parse_quantization(s: &str) -> Result<Quantization, String> {
    s.parse()
}

/// `--device`'s parser (the error lists the forms).
pub fn parse_device(s: &str) -> Result<DeviceRequest, String> {
    s.parse()
}

/// The one place where device, dtype and quantization are chosen; everything below the CLI
/// takes the result. The combination is checked before the device is opened, and the device
/// before any model file is read; the choice is printed on stderr.
pub fn backend(
    device: DeviceRequest,
    dtype: DtypeArg,
    quantization: Quantization,
) -> anyhow::Result<Backend> {
    let dtype: DType = dtype.into();
    // The int8 kernels are the CPU's: `auto` means the CPU for a quantized base.
    let device = if quantization.is_quantized() {
        anyhow::ensure!(
            !matches!(device, DeviceRequest::Cuda(_)),
            "--quantize {quantization} runs on the CPU only: use --device cpu, or --quantize \
             none with --dtype bf16 or f16 on a GPU"
        );
        DeviceRequest::Cpu
    } else {
        device
    };
    Backend {
        device: candle_core::Device::Cpu,
        dtype,
        quantization,
    }
    .validate()
    .map_err(anyhow::Error::msg)?;
    Ok(Backend {
        device: open_device(device, dtype)?,
        dtype,
        quantization,
    })
}

/// Opens the device for weights of `dtype` (bf16 needs a GPU that has it) and prints the
/// choice: for inference through [`backend`], and for the training commands before any data
/// or weights are read.
pub fn open_device(device: DeviceRequest, dtype: DType) -> anyhow::Result<candle_core::Device> {
    let (device, what) = device.open(dtype).map_err(anyhow::Error::msg)?;
    eprintln!("device: {what}");
    Ok(device)
}

/// Sets the CPU thread count for candle and its GEMM (before any model work starts a thread).
fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        // candle and its GEMM size their thread pools from RAYON_NUM_THREADS on first use.
        // SAFETY: called before any model work starts any thread.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    Ok(())
}

/// A loaded model with the processor settings the options ask for.
pub struct LoadedModel {
    pub dir: PathBuf,
    /// The adapter applied (the demo's when no `--model` was given).
    pub adapter: Option<PathBuf>,
    pub model: Qwen2Vl,
    pub processor: ProcessorConfig,
}

impl ModelArgs {
    /// The backend these options ask for ([`backend`]), resolved on the first call. Commands
    /// call it before reading any input, so that a device that cannot be had is the first
    /// error.
    pub fn backend(&self) -> anyhow::Result<Backend> {
        if let Some(b) = self.resolved.get() {
            return Ok(b.clone());
        }
        let b = backend(self.device, self.dtype, self.quantize)?;
        Ok(self.resolved.get_or_init(|| b).clone())
    }

    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        set_threads(self.threads)?;
        let backend = self.backend()?;
        let env = |k: &str| std::env::var(k).ok();
        let cache = resolve::default_cache_dir(
            env("HF_HUB_CACHE").as_deref(),
            env("HF_HOME").as_deref(),
            env("HOME").as_deref(),
        );
        let hub = resolve::Hub {
            endpoint: env("HF_ENDPOINT")
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "https://huggingface.co".into()),
            offline: env("HF_HUB_OFFLINE")
                .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes")),
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        };
        let (dir, adapter) = match &self.model {
            Some(spec) => (
                resolve::resolve_model_or_download(spec, &cache, &hub)?,
                self.adapter.clone(),
            ),
            None => {
                let demo = demo_dir().context(
                    "no --model given and the bundled demo model was not found: pass --model DIR, \
                     or set INSPECTOR_DEMO_MODEL to a folder holding base/ and adapter/",
                )?;
                let adapter = self.adapter.clone().unwrap_or_else(|| demo.join("adapter"));
                eprintln!(
                    "no --model given: using the bundled demo model {} with the adapter {}",
                    demo.join("base").display(),
                    adapter.display()
                );
                (demo.join("base"), Some(adapter))
            }
        };
        let model = match &adapter {
            Some(adapter) => {
                inspector_qwen2vl::adapter::open(&dir, adapter, &backend)
                    .with_context(|| {
                        format!(
                            "loading {} with the adapter {}",
                            dir.display(),
                            adapter.display()
                        )
                    })?
                    .0
            }
            None => {
                Qwen2Vl::open(&dir, &backend, None)
                    .with_context(|| format!("loading {}", dir.display()))?
                    .0
            }
        };
        let processor = model
            .processor
            .clone()
            .with_pixels(self.min_pixels, self.max_pixels)?;
        Ok(LoadedModel {
            dir,
            adapter,
            model,
            processor,
        })
    }
}

/// The bundled demo model's folder (holding `base/` and `adapter/`): `INSPECTOR_DEMO_MODEL`,
/// else `models/demo` next to the binary or in a folder above it (a binary built in a clone's
/// `target/release`), else the clone this binary was built from.
pub fn demo_dir() -> Option<PathBuf> {
    let usable = |d: &std::path::Path| d.join("base").join("config.json").is_file();
    if let Some(d) = std::env::var_os("INSPECTOR_DEMO_MODEL") {
        let d = PathBuf::from(d);
        return usable(&d).then_some(d);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            let d = dir.join("models").join("demo");
            if usable(&d) {
                return Some(d);
            }
        }
    }
    let built = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/demo"));
    usable(&built).then_some(built)
}
