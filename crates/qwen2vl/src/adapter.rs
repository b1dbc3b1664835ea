//! PEFT adapters on Qwen2-VL: load a base model with an adapter, and merge an adapter into a
//! new Hugging Face model directory.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use candle_core::{DType, Device};
use inspector_lora::Lora;

use crate::{Backend, Error, ModelInfo, Qwen2Vl, proj::normalize_module, weights};

/// Reads a PEFT adapter directory (either key layout) for this model's module paths.
pub fn read(adapter: &Path, device: &Device) -> Result<Lora, Error> {
    Ok(Lora::from_peft(adapter, device, &normalize_module)?)
}

/// Loads a base model with an adapter on it. Refuses an adapter whose shapes do not fit the
/// model or that names modules the model does not have.
pub fn load(
    model: &Path,
    adapter: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(Qwen2Vl, ModelInfo, Lora), Error> {
    let lora = read(adapter, device)?;
    let (m, info) = load_onto(model, adapter, &lora, dtype, device)?;
    Ok((m, info, lora))
}

/// [`load`] for inference on any backend: the adapter applies unmerged (f32) on a dense or
/// quantized base, frozen ([`Lora::freeze`]: no graph is recorded, so a pass keeps only the
/// activations it still needs).
pub fn open(
    model: &Path,
    adapter: &Path,
    backend: &Backend,
) -> Result<(Qwen2Vl, ModelInfo, Lora), Error> {
    let lora = read(adapter, &backend.device)?;
    lora.freeze();
    let (m, info) = open_onto(model, adapter, &lora, backend)?;
    Ok((m, info, lora))
}

/// Loads a base model with `lora` on it, where `lora` holds the weights of the adapter
/// directory `adapter` (as [`read`] gives them, or a training set started from them). Errors
/// name `adapter`: shapes that do not fit the model, or modules the model does not have.
pub fn load_onto(
    model: &Path,
    adapter: &Path,
    lora: &Lora,
    dtype: DType,
    device: &Device,
) -> Result<(Qwen2Vl, ModelInfo), Error> {
    let backend = Backend {
        device: device.clone(),
        dtype,
        quantization: crate::Quantization::None,
    };
    open_onto(model, adapter, lora, &backend)
}

fn open_onto(
    model: &Path,
    adapter: &Path,
    lora: &Lora,
    backend: &Backend,
) -> Result<(Qwen2Vl, ModelInfo), Error> {
    let (m, info) = Qwen2Vl::open(model, backend, Some(lora)).map_err(|e| match e {
        Error::Checkpoint { message, .. } if message.contains("adapter weights") => {
            Error::Checkpoint {
                path: adapter.to_path_buf(),
                message: format!("does not fit {}: {message}", model.display()),
            }
        }
        other => other,
    })?;
    let unclaimed = lora.unclaimed();
    if !unclaimed.is_empty() {
        return Err(Error::Checkpoint {
            path: adapter.to_path_buf(),
            message: format!(
                "has weights for {} module(s) that {} does not have or cannot adapt, e.g. {}",
                unclaimed.len(),
                model.display(),
                unclaimed[0]
            ),
        });
    }
    Ok((m, info))
}

/// Refuses a quantized model directory for what needs dense weights (`what` the model).
pub fn refuse_quantized(model: &Path, what: &str) -> Result<(), Error> {
    if crate::quant::QuantRecord::read(model)?.is_some()
        || model.join(crate::quant::GGUF_FILE).exists()
    {
        return Err(Error::Checkpoint {
            path: model.to_path_buf(),
            message: format!(
                "is quantized: cannot {what} it (quantized weights have no backward pass and \
                 cannot be written back); use the dense model it was made from"
            ),
        });
    }
    Ok(())
}

/// The adapter's (A, B) pairs by module, each checked against the dense base's headers: an
/// adapter that does not fit, or names modules the base does not have, is refused.
pub(crate) fn check_fits(
    model: &Path,
    adapter: &Path,
    lora: &Lora,
) -> Result<std::collections::BTreeMap<String, (candle_core::Tensor, candle_core::Tensor)>, Error> {
    let pairs = lora.pending();
    let files = weights::safetensors_files(model)?;
    let mut found: HashMap<String, PathBuf> = HashMap::new();
    for file in &files {
        for (name, shape) in weights::file_shapes(file)? {
            let Some(module) = name.strip_suffix(".weight").and_then(normalize_module) else {
                continue;
            };
            if let Some((a, b)) = pairs.get(&module) {
                let fits = shape.len() == 2 && shape[1] == a.dim(1)? && shape[0] == b.dim(0)?;
                if !fits {
                    return Err(Error::Checkpoint {
                        path: adapter.to_path_buf(),
                        message: format!(
                            "does not fit {}: {module} is {shape:?} in the base but the adapter has A {:?}, B {:?}",
                            model.display(),
                            a.dims(),
                            b.dims()
                        ),
                    });
                }
                found.insert(module, file.clone());
            }
        }
    }
    if let Some(missing) = pairs.keys().find(|m| !found.contains_key(*m)) {
        return Err(Error::Checkpoint {
            path: adapter.to_path_buf(),
            message: format!(
                "has weights for {missing}, which {} does not have",
                model.display()
            ),
        });
    }
    Ok(pairs)
}

/// What a merge wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    pub merged_layers: usize,
    pub files: Vec<PathBuf>,
}

/// Writes `out` = base + adapter: every adapted weight becomes `W + scaling·B·A` (in the
/// base's dtype). The base's files, tensor names, dtypes and sharding are kept (one shard in
/// memory at a time, so a 7B model merges in little more than its largest shard), and every
/// other file of the base (config, tokenizer, processor, chat template, generation config,
/// shard index) is copied. An adapter whose shapes do not fit, or which names modules the base
/// does not have, is refused before anything is written.
pub fn merge(model: &Path, adapter: &Path, out: &Path) -> Result<Merged, Error> {
    let device = Device::Cpu;
    refuse_quantized(model, "merge an adapter into")?;
    let lora = read(adapter, &device)?;
    let scaling = lora.config().scaling();
    let pairs = check_fits(model, adapter, &lora)?;
    let mut merged_layers = 0;
    let written = weights::rewrite(model, out, |name, t| {
        let pair = name
            .strip_suffix(".weight")
            .and_then(normalize_module)
            .and_then(|m| pairs.get(&m));
        Ok(match pair {
            Some((a, b)) => {
                merged_layers += 1;
                inspector_lora::merge_weight(&t, a, b, scaling)?
            }
            None => t,
        })
    })?;
    Ok(Merged {
        merged_layers,
        files: written,
    })
}
