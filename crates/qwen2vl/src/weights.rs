//! Finding and memory-mapping a checkpoint's safetensors, and telling its key layout.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::Error;

/// How the checkpoint names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// The hub's: `model.layers.*`, `model.embed_tokens`, `visual.*`, `lm_head`.
    Legacy,
    /// transformers ≥ 4.52's: `model.language_model.*`, `model.visual.*`, `lm_head`.
    Nested,
}

impl KeyLayout {
    /// The prefix of the language model's tensors.
    pub fn text_prefix(self) -> &'static str {
        match self {
            KeyLayout::Legacy => "model",
            KeyLayout::Nested => "model.language_model",
        }
    }

    /// The prefix of the vision tower's tensors.
    pub fn vision_prefix(self) -> &'static str {
        match self {
            KeyLayout::Legacy => "visual",
            KeyLayout::Nested => "model.visual",
        }
    }
}

/// The safetensors files of a model directory: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` lists (every one must exist).
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
                path: index.clone(),
                message: format!("not valid JSON: {e}"),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Checkpoint {
                path: index.clone(),
                message: "no `weight_map` object".into(),
            })?;
        let mut files: Vec<String> = Vec::new();
        for (key, file) in map {
            let file = file.as_str().ok_or_else(|| Error::Checkpoint {
                path: index.clone(),
                message: format!("weight_map.{key} is not a file name"),
            })?;
            // Shard names come from a file we did not write: keep them inside the directory.
            if file.contains(['/', '\\']) || file.starts_with('.') {
                return Err(Error::Checkpoint {
                    path: index.clone(),
                    message: format!("shard name `{file}` is not a plain file name"),
                });
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
        }
        files.sort();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            if !p.exists() {
                return Err(Error::Checkpoint {
                    path: p.clone(),
                    message: format!("shard listed in {} is missing", index.display()),
                });
            }
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::Checkpoint {
        path: dir.to_path_buf(),
        message: "no model.safetensors or model.safetensors.index.json".into(),
    })
}

/// Memory-maps `files` and tells the key layout from the embedding's name.
pub fn load(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, KeyLayout), Error> {
    for f in files {
        check_header(f)?;
    }
    // SAFETY: the files are memory-mapped read-only; like every safetensors loader we assume
    // they are not modified while the model is alive.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.map_err(|e| {
        Error::Checkpoint {
            path: files[0].clone(),
            message: e.to_string(),
        }
    })?;
    let layout = if vb.contains_tensor("model.language_model.embed_tokens.weight") {
        KeyLayout::Nested
    } else if vb.contains_tensor("model.embed_tokens.weight") {
        KeyLayout::Legacy
    } else {
        return Err(Error::Checkpoint {
            path: files[0].clone(),
            message: "no embedding tensor (model.embed_tokens.weight or model.language_model.embed_tokens.weight)".into(),
        });
    };
    Ok((vb, layout))
}

/// Reads a safetensors header, so that a truncated or foreign file is named in the error.
fn check_header(path: &Path) -> Result<(), Error> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| Error::Checkpoint {
        path: path.to_path_buf(),
        message: "too short to be a safetensors file".into(),
    })?;
    let header_len = u64::from_le_bytes(n);
    if header_len == 0 || header_len > 100 << 20 || 8 + header_len > len {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            message: "not a safetensors file (bad header length)".into(),
        });
    }
    Ok(())
}
