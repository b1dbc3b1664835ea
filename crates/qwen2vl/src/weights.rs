//! Finding and memory-mapping a checkpoint's safetensors, and telling its key layout.

use std::path::{Path, PathBuf};

use std::{
    collections::HashMap,
    io::Read,
    sync::{Arc, Mutex},
};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{VarBuilder, var_builder::SimpleBackend};
use inspector_lora::write_atomic;

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

/// Every tensor's name and shape, from the shard headers.
pub type TensorShapes = Vec<(String, Vec<usize>)>;

/// Opens `files` for loading and tells the key layout from the embedding's name; also returns
/// every tensor's shape (read from the same headers, for parameter counts).
///
/// Tensors are read with positioned reads straight into the model's own buffers rather than
/// through a memory map: a map's pages stay resident until the whole checkpoint is unmapped,
/// which doubled peak memory at load (16.9 GB against 9.8 GB for transformers on 2B shapes).
pub fn load(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, KeyLayout, TensorShapes), Error> {
    let (backend, layout, shapes) = open(files)?;
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    Ok((vb, layout, shapes))
}

/// Variables with their checkpoint names.
pub type NamedVars = Vec<(String, Var)>;

/// The variables a [`load_trainable`] builder handed out, by checkpoint name.
pub type Trainables = Arc<Mutex<NamedVars>>;

/// [`load`] for full fine-tuning: every tensor the model asks for becomes a [`Var`] (one per
/// name, however often it is asked for), listed in the returned set under its checkpoint name.
pub fn load_trainable(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, KeyLayout, TensorShapes, Trainables), Error> {
    let (inner, layout, shapes) = open(files)?;
    let vars: Trainables = Arc::default();
    let backend = TrainableReader {
        inner,
        vars: vars.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    Ok((vb, layout, shapes, vars))
}

/// The key layout of a checkpoint holding `has`'s tensors, told from the embedding's name.
pub(crate) fn key_layout(has: impl Fn(&str) -> bool, path: &Path) -> Result<KeyLayout, Error> {
    if has("model.language_model.embed_tokens.weight") {
        Ok(KeyLayout::Nested)
    } else if has("model.embed_tokens.weight") {
        Ok(KeyLayout::Legacy)
    } else {
        Err(Error::Checkpoint {
            path: path.to_path_buf(),
            message: "no embedding tensor (model.embed_tokens.weight or model.language_model.embed_tokens.weight)".into(),
        })
    }
}

/// Hands every tensor of the checkpoint to `f`, one at a time in name order, as f32 on the CPU
/// (so that only one is in memory besides what `f` keeps), with the number of tensors. Returns
/// the key layout.
pub(crate) fn each_tensor(
    files: &[PathBuf],
    mut f: impl FnMut(&str, Tensor, usize) -> Result<(), Error>,
) -> Result<KeyLayout, Error> {
    let (reader, layout, _) = open(files)?;
    let mut names: Vec<&String> = reader.tensors.keys().collect();
    names.sort();
    let total = names.len();
    for name in names {
        let entry = &reader.tensors[name];
        let tensor = reader
            .read(name, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| Error::Checkpoint {
                path: reader.files[entry.file].0.clone(),
                message: format!("{name}: {e}"),
            })?;
        f(name, tensor, total)?;
    }
    Ok(layout)
}

fn open(files: &[PathBuf]) -> Result<(ShardReader, KeyLayout, TensorShapes), Error> {
    let backend = ShardReader::open(files)?;
    let layout = key_layout(|name| backend.tensors.contains_key(name), &files[0])?;
    let shapes = backend
        .tensors
        .iter()
        .map(|(name, e)| (name.clone(), e.shape.clone()))
        .collect();
    Ok((backend, layout, shapes))
}

/// Writes the model directory `out` from `base`: every shard of `base` is rewritten with the
/// same file name, tensor names and dtypes, each tensor passed through `replace(name, tensor)`
/// (one shard in memory at a time); every other file of `base` (config, shard index,
/// tokenizer, processor, chat template, generation config) is copied. Each file is written
/// atomically. Returns the files written.
pub fn rewrite(
    base: &Path,
    out: &Path,
    mut replace: impl FnMut(&str, Tensor) -> Result<Tensor, Error>,
) -> Result<Vec<PathBuf>, Error> {
    let files = safetensors_files(base)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut written = Vec::new();
    for file in &files {
        let tensors =
            candle_core::safetensors::load(file, &Device::Cpu).map_err(|e| Error::Checkpoint {
                path: file.clone(),
                message: e.to_string(),
            })?;
        let mut new: HashMap<String, Tensor> = HashMap::with_capacity(tensors.len());
        for (name, t) in tensors {
            let t = replace(&name, t)?;
            new.insert(name, t);
        }
        let name = file.file_name().expect("a shard file has a name");
        let path = out.join(name);
        write_atomic(&path, |tmp| candle_core::safetensors::save(&new, tmp))?;
        written.push(path);
    }
    let entries = std::fs::read_dir(base).map_err(|e| Error::io(base, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(base, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") || !entry.path().is_file() {
            continue;
        }
        let dest = out.join(&name);
        let bytes = std::fs::read(entry.path()).map_err(|e| Error::io(&entry.path(), e))?;
        write_atomic(&dest, |tmp| {
            std::fs::write(tmp, &bytes).map_err(candle_core::Error::wrap)
        })?;
        written.push(dest);
    }
    Ok(written)
}

/// Where one tensor lies in which shard.
#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// Tensor names and shapes of one safetensors file, from its header alone (checked against
/// the file's length).
pub fn file_shapes(path: &Path) -> Result<TensorShapes, Error> {
    let reader = ShardReader::open(&[path.to_path_buf()])?;
    Ok(reader
        .tensors
        .into_iter()
        .map(|(name, entry)| (name, entry.shape))
        .collect())
}

/// A `VarBuilder` backend reading tensors from safetensors shards on demand.
struct ShardReader {
    files: Vec<(PathBuf, std::fs::File)>,
    tensors: HashMap<String, TensorEntry>,
}

impl ShardReader {
    fn open(paths: &[PathBuf]) -> Result<Self, Error> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (k, path) in paths.iter().enumerate() {
            let bad = |message: String| Error::Checkpoint {
                path: path.clone(),
                message,
            };
            let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
            let mut n = [0u8; 8];
            file.read_exact(&mut n)
                .map_err(|_| bad("too short to be a safetensors file".into()))?;
            let header_len = u64::from_le_bytes(n);
            if header_len == 0 || header_len > 100 << 20 || 8 + header_len > len {
                return Err(bad("not a safetensors file (bad header length)".into()));
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact(&mut header)
                .map_err(|e| Error::io(path, e))?;
            let entries: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
                .map_err(|e| bad(format!("invalid safetensors header: {e}")))?;
            let data_start = 8 + header_len;
            for (name, value) in entries {
                if name == "__metadata__" {
                    continue;
                }
                let info: safetensors::tensor::TensorInfo = serde_json::from_value(value)
                    .map_err(|e| bad(format!("invalid header entry for {name}: {e}")))?;
                let (start, end) = (
                    data_start + info.data_offsets.0 as u64,
                    data_start + info.data_offsets.1 as u64,
                );
                let expected = info.shape.iter().product::<usize>() * info.dtype.bitsize() / 8;
                if end > len || start > end || (end - start) as usize != expected {
                    return Err(bad(format!(
                        "tensor {name}: its byte range does not fit its shape or the file (truncated?)"
                    )));
                }
                tensors.insert(
                    name,
                    TensorEntry {
                        file: k,
                        dtype: info.dtype,
                        shape: info.shape,
                        start,
                        end,
                    },
                );
            }
            files.push((path.clone(), file));
        }
        Ok(ShardReader { files, tensors })
    }

    fn read(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        use candle_core::safetensors::Load;
        use std::os::unix::fs::FileExt;
        let entry = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        let (path, file) = &self.files[entry.file];
        let read = |buf: &mut [u8]| {
            file.read_exact_at(buf, entry.start).map_err(|e| {
                candle_core::Error::Msg(format!("{}: reading {name}: {e}", path.display()))
            })
        };
        // f32 (the dense checkpoints' usual type) is read straight into the tensor's own buffer:
        // going through a byte buffer and candle's conversion copied every weight once more,
        // and faulted in 8.8 GB of fresh pages for nothing on 2B shapes. (`open` checked that
        // the byte range holds exactly the shape's values.)
        #[cfg(target_endian = "little")]
        if entry.dtype == safetensors::Dtype::F32 {
            // Zeroed (a large block comes from the kernel already zero, untouched until read).
            let mut values = vec![0f32; entry.shape.iter().product()];
            // SAFETY: the initialised f32s viewed as their bytes (u8 has no alignment and every
            // bit pattern is an f32). safetensors stores little-endian, as this target is.
            read(unsafe {
                std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), values.len() * 4)
            })?;
            return Tensor::from_vec(values, entry.shape.clone(), device);
        }
        let mut bytes = vec![0u8; (entry.end - entry.start) as usize];
        read(&mut bytes)?;
        let view =
            safetensors::tensor::TensorView::new(entry.dtype, entry.shape.clone(), &bytes)
                .map_err(|e| candle_core::Error::Msg(format!("{}: {name}: {e}", path.display())))?;
        view.load(device)
    }
}

impl SimpleBackend for ShardReader {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.read(name, dev)?.to_dtype(dtype)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// A [`ShardReader`] that hands out variables, for full fine-tuning.
struct TrainableReader {
    inner: ShardReader,
    vars: Trainables,
}

impl TrainableReader {
    fn var(
        &self,
        name: &str,
        tensor: impl FnOnce() -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut vars = self.vars.lock().expect("not poisoned");
        if let Some((_, v)) = vars.iter().find(|(n, _)| n == name) {
            return Ok(v.as_tensor().clone());
        }
        let var = Var::from_tensor(&tensor()?)?;
        vars.push((name.to_string(), var.clone()));
        Ok(var.as_tensor().clone())
    }
}

impl SimpleBackend for TrainableReader {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.var(name, || self.inner.get(s.clone(), name, init, dtype, dev))?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.var(name, || self.inner.get_unchecked(name, dtype, dev))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}
