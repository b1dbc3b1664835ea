//! Qwen2-VL (2B/7B and smaller variants) in candle.
//!
//! Loads Hugging Face checkpoints as published — `config.json` in the hub's flat layout or
//! transformers 5's nested one, safetensors single or sharded, keys in the hub's layout or the
//! one transformers ≥ 4.52 writes, tied or untied embeddings — and computes the same numbers as
//! transformers: the image processor, the vision tower with 2-D rotary attention confined to
//! each image, M-RoPE positions (`get_rope_index`), the decoder with a KV cache and left-padded
//! batches. Every layer is built from differentiable ops, so training shares this code.
//!
//! [`Qwen2Vl::open`] loads for inference on a [`Backend`]: device, dtype and quantization
//! (`q8_0`/`q4k`: the linear layers in ggml blocks on candle's int8 kernels, quantized while
//! loading or read from a directory [`quant::quantize_dir`] wrote).
//!
//! This crate knows nothing of safety rules, prompts or HTTP.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use inspector_qwen2vl::{Batch, Logits, Qwen2Vl, image};
//!
//! let dir = std::path::Path::new("Qwen2-VL-2B-Instruct");
//! let (model, info) = Qwen2Vl::load(dir, DType::F32, &Device::Cpu)?;
//! let img = image::process_file("site.jpg".as_ref(), &model.processor)?;
//! let pad = model.config.tokens.image_pad;
//! let mut ids = vec![model.config.tokens.vision_start.unwrap()];
//! ids.extend(std::iter::repeat_n(pad, img.n_tokens(model.processor.merge_size)));
//! ids.push(model.config.tokens.vision_end.unwrap());
//! let batch = Batch {
//!     input_ids: vec![ids],
//!     attention_mask: None,
//!     images: Some(inspector_qwen2vl::VisionInput {
//!         pixel_values: img.pixel_values,
//!         grid_thw: vec![img.grid_thw],
//!     }),
//! };
//! let out = model.forward(&batch, Logits::Last)?;
//! println!("{} parameters, logits {:?}", info.total_params(), out.logits.shape());
//!
//! // The same model with its linear layers in q8_0.
//! let backend = inspector_qwen2vl::Backend {
//!     quantization: inspector_qwen2vl::Quantization::Q8_0,
//!     ..inspector_qwen2vl::Backend::cpu()
//! };
//! let (q8, _) = Qwen2Vl::open(dir, &backend, None)?;
//! assert_eq!(q8.quantization().name(), "q8_0");
//! # Ok::<(), inspector_qwen2vl::Error>(())
//! ```

pub mod adapter;
pub mod backend;
pub mod chat;
pub mod config;
pub mod fused;
pub mod generate;
pub mod image;
pub mod init;
mod model;
pub mod ops;
pub mod positions;
mod proj;
pub mod quant;
pub mod resolve;
pub mod test_utils;
pub mod text;
pub mod vision;
pub mod vmath;
pub mod weights;

use std::path::{Path, PathBuf};

pub use backend::{Backend, DeviceRequest, Quantization};
pub use config::{Config, ConfigLayout, TextConfig, TokenIds, VisionConfig};
pub use inspector_lora::{Lora, LoraConfig};
pub use model::{Batch, DecodeState, Logits, ModelInfo, Output, Qwen2Vl};
pub use vision::VisionInput;
pub use weights::KeyLayout;

/// Everything that can go wrong, with the file or key it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config key `{key}`: {problem}")]
    ConfigKey { key: String, problem: String },
    #[error("{file}: config key `{key}`: {problem}")]
    ConfigFile {
        file: PathBuf,
        key: String,
        problem: String,
    },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("chat template {file}: {message}")]
    Template { file: PathBuf, message: String },
    #[error("image: {0}")]
    Image(String),
    #[error("{path}: {message}")]
    ImageFile { path: PathBuf, message: String },
    #[error("image tokens: {message}")]
    ImageTokens { message: String },
    #[error("the input has {tokens} tokens, more than the model's context of {max}")]
    TooLong { tokens: usize, max: usize },
    #[error("{0}")]
    Resolve(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Lora(#[from] inspector_lora::Error),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Attaches the config file's name to a config error.
    pub(crate) fn in_file(self, file: &Path) -> Error {
        match self {
            Error::ConfigKey { key, problem } => Error::ConfigFile {
                file: file.to_path_buf(),
                key,
                problem,
            },
            other => other,
        }
    }
}
