//! PEFT adapters on Qwen2-VL: load a base model with an adapter, and merge an adapter into a
//! new Hugging Face model directory.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use candle_core::{DType, Device, Tensor};
use inspector_lora::Lora;

use crate::{Error, ModelInfo, Qwen2Vl, proj::normalize_module, weights};

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
    let (m, info) = Qwen2Vl::load_with(model, dtype, device, Some(&lora)).map_err(|e| match e {
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
    Ok((m, info, lora))
}

/// What a merge wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    pub merged_layers: usize,
    pub files: Vec<PathBuf>,
}

/// Shards of at most this many bytes, as transformers' default `max_shard_size` (5 GB).
const SHARD_BYTES: usize = 5_000_000_000;

/// Writes `out` = base + adapter: every adapted weight becomes `W + scaling·B·A` (in the
/// base's dtype), tensor names and layout stay the base's, shards get an index when there is
/// more than one, and every other file of the base (config, tokenizer, processor, chat
/// template, generation config) is copied. Refuses an adapter that does not fit.
pub fn merge(model: &Path, adapter: &Path, out: &Path) -> Result<Merged, Error> {
    let device = Device::Cpu;
    // Building the model with the adapter checks that it fits (shapes, module names).
    let (_, _, lora) = load(model, adapter, DType::F32, &device)?;
    let scaling = lora.config().scaling();
    let pairs: HashMap<String, (Tensor, Tensor)> = lora
        .pairs()
        .into_iter()
        .map(|p| (p.module, (p.a.as_tensor().clone(), p.b.as_tensor().clone())))
        .collect();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut merged_layers = 0;
    let mut shards: Vec<BTreeMap<String, Tensor>> = vec![BTreeMap::new()];
    let mut shard_bytes = 0usize;
    for file in weights::safetensors_files(model)? {
        let tensors =
            candle_core::safetensors::load(&file, &device).map_err(|e| Error::Checkpoint {
                path: file.clone(),
                message: e.to_string(),
            })?;
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        for name in names {
            let mut t = tensors[&name].clone();
            if let Some(module) = name.strip_suffix(".weight").and_then(normalize_module)
                && let Some((a, b)) = pairs.get(&module)
            {
                t = inspector_lora::merge_weight(&t, a, b, scaling)?;
                merged_layers += 1;
            }
            let bytes = t.elem_count() * t.dtype().size_in_bytes();
            if shard_bytes + bytes > SHARD_BYTES && !shards.last().is_some_and(BTreeMap::is_empty) {
                shards.push(BTreeMap::new());
                shard_bytes = 0;
            }
            shard_bytes += bytes;
            shards.last_mut().expect("one shard").insert(name, t);
        }
    }
    if merged_layers != pairs.len() {
        return Err(Error::Checkpoint {
            path: adapter.to_path_buf(),
            message: format!(
                "{} adapted layers but {merged_layers} weights found to merge into",
                pairs.len()
            ),
        });
    }
    let mut files = Vec::new();
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        for (k, t) in shard {
            weight_map.insert(k.clone(), name.clone().into());
            total += t.elem_count() * t.dtype().size_in_bytes();
        }
        let path = out.join(&name);
        let map: HashMap<&str, Tensor> =
            shard.iter().map(|(k, t)| (k.as_str(), t.clone())).collect();
        atomic(&path, |tmp| {
            candle_core::safetensors::save(&map, tmp).map_err(|e| e.to_string())
        })?;
        files.push(path);
    }
    if n > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = out.join("model.safetensors.index.json");
        let bytes = serde_json::to_vec_pretty(&index).expect("JSON serialises");
        atomic(&path, |tmp| {
            std::fs::write(tmp, &bytes).map_err(|e| e.to_string())
        })?;
        files.push(path);
    }
    let entries = std::fs::read_dir(model).map_err(|e| Error::io(model, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(model, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_weights = name.ends_with(".safetensors") || name == "model.safetensors.index.json";
        if is_weights || !entry.path().is_file() {
            continue;
        }
        let dest = out.join(&name);
        let bytes = std::fs::read(entry.path()).map_err(|e| Error::io(&entry.path(), e))?;
        atomic(&dest, |tmp| {
            std::fs::write(tmp, &bytes).map_err(|e| e.to_string())
        })?;
        files.push(dest);
    }
    Ok(Merged {
        merged_layers,
        files,
    })
}

/// Writes through `write` into a temporary file beside `path`, then renames it into place.
fn atomic(path: &Path, write: impl FnOnce(&Path) -> Result<(), String>) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(path, e))?;
    write(tmp.path()).map_err(|message| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    })?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}
