//! Quantized weights: built at load time from a dense checkpoint (`--quantize`), or read from the
//! directory [`quantize_dir`] writes (`inspector model quantize`): the source directory's
//! config, tokenizer, template and processor files beside `model.gguf` (ggml blocks, written
//! and read with candle's GGUF support) and `inspector_quant.json` (the format).
//!
//! Tensor names in `model.gguf` are the checkpoint's own (either key layout). Every 2-D
//! `*.weight` of the checkpoint (the projections of both towers, the LM head, the embedding
//! table) is stored in the format's type when candle's int8 kernels take its shape, else as f32
//! ([`Quantization::weight_type`]); everything else (norms, biases, the patch embedding) is
//! stored as f32.
//!
//! Other GGUF files are refused by name: llama.cpp's (a text model and an `mmproj` with
//! `blk.N.*` tensors), and any whose `general.architecture` is not ours. So are checkpoints
//! quantized by GPTQ, AWQ or bitsandbytes (`quantization_config` in `config.json`).

use std::{
    collections::BTreeMap,
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use candle_core::{
    DType, Device, Shape, Tensor,
    quantized::{GgmlDType, QMatMul, QTensor, ggml_file::qtensor_from_ggml, gguf_file},
};
use candle_nn::{VarBuilder, var_builder::SimpleBackend};
use inspector_lora::{Base, packed::PackedF32};
use serde::{Deserialize, Serialize};

use crate::{
    Error,
    backend::{Quantization, type_name},
    text::TokenEmbedding,
    weights::{self, KeyLayout, TensorShapes},
};

/// The weights file of a quantized model directory.
pub const GGUF_FILE: &str = "model.gguf";
/// The record of a quantized model directory.
pub const RECORD_FILE: &str = "inspector_quant.json";
/// `general.architecture` of the GGUF files this crate writes.
pub const ARCHITECTURE: &str = "inspector-qwen2vl";

/// `inspector_quant.json`: what [`quantize_dir`] made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantRecord {
    pub format: Quantization,
    /// The weights file, relative to the directory.
    pub weights: String,
    /// The dense directory it was made from, and the adapter merged in (as given).
    pub source: String,
    #[serde(default)]
    pub adapter: Option<String>,
    /// Parameters stored in each type (`q8_0`, `q4k`, `f32`).
    pub params: BTreeMap<String, usize>,
}

impl QuantRecord {
    /// The record of `dir`, if it is a quantized model directory.
    pub fn read(dir: &Path) -> Result<Option<QuantRecord>, Error> {
        let path = dir.join(RECORD_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let record: QuantRecord =
            serde_json::from_slice(&bytes).map_err(|e| Error::Checkpoint {
                path: path.clone(),
                message: format!("not a quantization record: {e}"),
            })?;
        if record.format == Quantization::None || record.weights != GGUF_FILE {
            return Err(Error::Checkpoint {
                path,
                message: format!(
                    "records format {} in {:?}; expected q8_0 or q4k in {GGUF_FILE}",
                    record.format, record.weights
                ),
            });
        }
        Ok(Some(record))
    }
}

/// Whether a file starts with GGUF's magic.
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// Refuses what this crate cannot load, by name: a GGUF file given instead of a directory,
/// a directory of llama.cpp GGUF files, and GPTQ/AWQ/bitsandbytes checkpoints.
pub fn check_loadable(path: &Path) -> Result<(), Error> {
    let supported = "inspector loads Hugging Face Qwen2-VL directories (safetensors in f32, bf16 \
                     or f16) and the directories `inspector model quantize` writes from them \
                     (q8_0, q4k)";
    if path.is_file() {
        let what = if is_gguf(path) {
            "a GGUF file (llama.cpp's format: a text model plus an mmproj)"
        } else {
            "a file, not a model directory"
        };
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            message: format!("is {what}; {supported}"),
        });
    }
    let has_dense = weights::safetensors_files(path).is_ok();
    if !has_dense && path.join(GGUF_FILE).exists() && !path.join(RECORD_FILE).exists() {
        return Err(Error::Checkpoint {
            path: path.join(GGUF_FILE),
            message: format!(
                "has no {RECORD_FILE} beside it: write quantized directories with `inspector \
                 model quantize`"
            ),
        });
    }
    if !has_dense && !path.join(GGUF_FILE).exists() {
        let gguf = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.is_file() && is_gguf(p));
        if let Some(g) = gguf {
            return Err(Error::Checkpoint {
                path: g,
                message: format!("is a llama.cpp GGUF file; {supported}"),
            });
        }
    }
    let config = path.join("config.json");
    if let Ok(text) = std::fs::read_to_string(&config)
        && let Ok(json) = serde_json::from_str::<serde_json::Value>(&text)
    {
        let q = json
            .get("quantization_config")
            .or_else(|| json.pointer("/text_config/quantization_config"));
        if let Some(q) = q {
            let method = q
                .get("quant_method")
                .and_then(|m| m.as_str())
                .unwrap_or("unknown");
            return Err(Error::Checkpoint {
                path: config,
                message: format!(
                    "describes a checkpoint quantized with {method} (quantization_config); \
                     {supported}: quantize the dense checkpoint with --quantize or `inspector \
                     model quantize`"
                ),
            });
        }
    }
    Ok(())
}

/// An open `model.gguf` of ours.
pub struct GgufWeights {
    path: PathBuf,
    content: gguf_file::Content,
    /// The file, mapped: a layer the int8 kernels serve is packed straight from the mapped
    /// blocks (`packed_qtensor`); any other tensor's blocks are copied once, from the page
    /// cache, into its `QTensor` instead of read into a buffer first.
    map: memmap2::Mmap,
}

impl std::fmt::Debug for GgufWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufWeights")
            .field("path", &self.path)
            .finish()
    }
}

impl GgufWeights {
    /// Opens and checks the header: GGUF, our architecture, every tensor's bytes inside the
    /// file. Errors name the file.
    pub fn open(path: &Path) -> Result<GgufWeights, Error> {
        let bad = |message: String| Error::Checkpoint {
            path: path.to_path_buf(),
            message,
        };
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let content = gguf_file::Content::read(&mut file).map_err(|e| {
            bad(format!(
                "not a readable GGUF file (corrupt or truncated?): {e}"
            ))
        })?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned();
        if arch.as_deref() != Some(ARCHITECTURE) {
            let llama_cpp = content
                .tensor_infos
                .keys()
                .any(|k| k.starts_with("blk.") || k.starts_with("v.blk."));
            let arch = arch.unwrap_or_else(|| "none".into());
            return Err(bad(if llama_cpp {
                format!(
                    "is a llama.cpp GGUF (general.architecture = {arch}); inspector reads the \
                     directories `inspector model quantize` writes from a Hugging Face Qwen2-VL \
                     directory"
                )
            } else {
                format!(
                    "is a GGUF of another architecture (general.architecture = {arch}), not \
                     {ARCHITECTURE}"
                )
            }));
        }
        for (name, info) in &content.tensor_infos {
            match byte_range(&content, info) {
                Some(r) if r.end <= len => {}
                _ => {
                    return Err(bad(format!(
                        "tensor {name} ({:?}, {}) lies beyond the end of the file (truncated?)",
                        info.shape,
                        type_name(Some(info.ggml_dtype))
                    )));
                }
            }
        }
        // SAFETY: the map is read-only; like every mmap-based loader (safetensors, candle's
        // VarBuilder) this relies on nobody truncating the model file while it is open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(GgufWeights {
            path: path.to_path_buf(),
            content,
            map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Every tensor's name and shape.
    pub fn shapes(&self) -> TensorShapes {
        let mut shapes: TensorShapes = self
            .content
            .tensor_infos
            .iter()
            .map(|(n, i)| (n.clone(), i.shape.dims().to_vec()))
            .collect();
        shapes.sort();
        shapes
    }

    /// The stored type of tensor `name`, from the header.
    fn stored_type(&self, name: &str) -> Option<GgmlDType> {
        self.content.tensor_infos.get(name).map(|i| i.ggml_dtype)
    }

    /// An error about tensor `name` of this file.
    fn tensor_error(&self, name: &str, m: impl std::fmt::Display) -> candle_core::Error {
        candle_core::Error::Msg(format!("{}: {name}: {m}", self.path.display()))
    }

    /// Tensor `name`'s header and its bytes in the map (`None`: no such tensor).
    fn tensor_bytes(
        &self,
        name: &str,
    ) -> candle_core::Result<Option<(&gguf_file::TensorInfo, &[u8])>> {
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Ok(None);
        };
        // `open` checked that every tensor lies inside the file.
        let range = byte_range(&self.content, info)
            .ok_or_else(|| self.tensor_error(name, "its size overflows"))?;
        let bytes = self
            .map
            .get(range.start as usize..range.end as usize)
            .ok_or_else(|| self.tensor_error(name, "lies beyond the end of the file"))?;
        Ok(Some((info, bytes)))
    }

    /// Lets the kernel take `bytes`' mapped pages back out of this process once they have been
    /// copied or packed (they stay in the page cache), so the file does not count twice in
    /// memory.
    fn release(&self, bytes: &[u8]) {
        // SAFETY: a read-only shared file mapping; a later read of these pages faults them in
        // again from the file, and the callers keep no slice of them.
        #[cfg(unix)]
        unsafe {
            let start = bytes.as_ptr() as usize - self.map.as_ptr() as usize;
            let _ = self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start,
                bytes.len(),
            );
        }
    }

    /// The tensor `name`, as stored.
    pub fn qtensor(&self, name: &str) -> candle_core::Result<QTensor> {
        let (info, bytes) = self
            .tensor_bytes(name)?
            .ok_or_else(|| self.tensor_error(name, "no such tensor"))?;
        // The blocks are read in place as f32, f16 or ggml block structs (alignment ≤ 4);
        // GGUF aligns tensor data to 32 bytes.
        if bytes.as_ptr().align_offset(4) != 0 {
            let start = bytes.as_ptr() as usize - self.map.as_ptr() as usize;
            return Err(self.tensor_error(name, format!("its data offset {start} is not aligned")));
        }
        let qt = qtensor_from_ggml(
            info.ggml_dtype,
            bytes,
            info.shape.dims().to_vec(),
            &Device::Cpu,
        )
        .map_err(|e| self.tensor_error(name, e))?;
        self.release(bytes);
        Ok(qt)
    }

    /// The `[n, k]` tensor `name` packed for the CPU's int8 kernels straight from the mapped
    /// file, with no copy of its blocks, or `None` where those kernels do not serve it (then
    /// [`GgufWeights::qtensor`] reads it). Errors name the file and the tensor.
    pub fn packed_qtensor(
        &self,
        name: &str,
        (n, k): (usize, usize),
    ) -> candle_core::Result<Option<QTensor>> {
        let Some((info, bytes)) = self.tensor_bytes(name)? else {
            return Ok(None);
        };
        // Another shape: `qtensor` reads it, and the caller names the mismatch.
        if info.shape.dims() != [n, k] {
            return Ok(None);
        }
        let qt = QTensor::packed_for_cpu_from_bytes(info.ggml_dtype, bytes, (n, k))
            .map_err(|e| self.tensor_error(name, e))?;
        if qt.is_some() {
            self.release(bytes);
        }
        Ok(qt)
    }

    /// The key layout, told from the embedding's name.
    pub fn key_layout(&self) -> Result<KeyLayout, Error> {
        weights::key_layout(|n| self.contains(n), &self.path)
    }
}

/// Where a tensor's bytes lie in its GGUF file; `None` when its size overflows or its element
/// count is not whole blocks.
fn byte_range(
    content: &gguf_file::Content,
    info: &gguf_file::TensorInfo,
) -> Option<std::ops::Range<u64>> {
    let elems = info
        .shape
        .dims()
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let block = info.ggml_dtype.block_size();
    if !elems.is_multiple_of(block) {
        return None;
    }
    let size = (elems / block).checked_mul(info.ggml_dtype.type_size())? as u64;
    let start = content.tensor_data_offset.checked_add(info.offset)?;
    Some(start..start.checked_add(size)?)
}

/// A `VarBuilder` backend over [`GgufWeights`]: tensors dequantized to the asked dtype, reshaped
/// to the asked shape when only the rank differs (the patch embedding is stored 2-D).
struct GgufBackend(Arc<GgufWeights>);

impl SimpleBackend for GgufBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.elem_count() != s.elem_count() {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        t.reshape(s)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.qtensor(name)?.dequantize(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// A `VarBuilder` over a quantized directory's weights (dense tensors dequantized on demand).
pub(crate) fn var_builder(weights: &Arc<GgufWeights>, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(GgufBackend(weights.clone())),
        DType::F32,
        device.clone(),
    )
}

/// Where the linear layers' weights come from while the model is built.
#[derive(Debug, Clone)]
pub(crate) enum LinearSource {
    /// Dense, from the var builder (the reference path, and training).
    Dense,
    /// Dense f32 from the var builder, each weight packed for the CPU's f32 kernel where it
    /// applies ([`PackedF32`]): inference on the CPU, nothing to train below.
    PackedF32,
    /// Dense from the var builder, quantized as they are read.
    Quantize(Quantization),
    /// Stored quantized.
    Gguf(Arc<GgufWeights>),
}

/// The linear-layer source of one model being built, and the parameters it handed out per
/// type (for `model info`).
#[derive(Debug)]
pub(crate) struct Weights {
    source: LinearSource,
    tally: Mutex<BTreeMap<&'static str, usize>>,
}

impl Weights {
    pub fn new(source: LinearSource) -> Self {
        Weights {
            source,
            tally: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn dense() -> Self {
        Weights::new(LinearSource::Dense)
    }

    /// The GGUF file the weights are read from, for a quantized directory.
    pub fn gguf(&self) -> Option<Arc<GgufWeights>> {
        match &self.source {
            LinearSource::Gguf(g) => Some(g.clone()),
            _ => None,
        }
    }

    /// Parameters of the linear layers and embeddings per type name.
    pub fn tally(&self) -> BTreeMap<&'static str, usize> {
        self.tally.lock().expect("not poisoned").clone()
    }

    fn count(&self, t: Option<GgmlDType>, n: usize) {
        *self
            .tally
            .lock()
            .expect("not poisoned")
            .entry(type_name(t))
            .or_default() += n;
    }

    /// The quantized tensor of `[out, in]` weight `vb`'s `name`, or `None` for a dense layer.
    ///
    /// With `pack`, the weight is also packed for the CPU's int8 kernels where they serve it
    /// ([`QTensor::pack_for_cpu`]); from a GGUF file, straight from the mapped blocks.
    fn quantized(
        &self,
        vb: &VarBuilder,
        name: &str,
        (out_dim, in_dim): (usize, usize),
        pack: bool,
    ) -> candle_core::Result<Option<QTensor>> {
        let qt = match &self.source {
            LinearSource::Dense | LinearSource::PackedF32 => return Ok(None),
            LinearSource::Quantize(q) => match q.weight_type(out_dim, in_dim) {
                None => None,
                Some(t) => {
                    let w = vb.get_with_hints_dtype(
                        (out_dim, in_dim),
                        name,
                        candle_nn::Init::Const(0.),
                        DType::F32,
                    )?;
                    Some(QTensor::quantize(&w, t)?)
                }
            },
            LinearSource::Gguf(g) => {
                let full = format!("{}.{name}", vb.prefix());
                // A layer stored dense is read once, by the var builder.
                if matches!(
                    g.stored_type(&full),
                    Some(GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
                ) {
                    return Ok(None);
                }
                if pack && let Some(qt) = g.packed_qtensor(&full, (out_dim, in_dim))? {
                    return Ok(Some(qt));
                }
                let qt = g.qtensor(&full)?;
                if qt.shape().dims() != [out_dim, in_dim] {
                    candle_core::bail!(
                        "{full} is {:?} in {}, the config says [{out_dim}, {in_dim}]",
                        qt.shape(),
                        g.path().display()
                    );
                }
                Some(qt)
            }
        };
        Ok(qt.map(|mut qt| {
            if pack {
                qt.pack_for_cpu();
            }
            qt
        }))
    }

    /// The frozen base of a linear layer `vb.pp(name)`.
    pub fn linear_base(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: &VarBuilder,
        name: &str,
    ) -> candle_core::Result<Base> {
        let vb = vb.pp(name);
        match self.quantized(&vb, "weight", (out_dim, in_dim), true)? {
            Some(qt) => {
                self.count(Some(qt.dtype()), out_dim * in_dim);
                let bias = if bias {
                    Some(vb.get_with_hints_dtype(
                        out_dim,
                        "bias",
                        candle_nn::Init::Const(0.),
                        DType::F32,
                    )?)
                } else {
                    None
                };
                Ok(Base::Quantized {
                    weight: QMatMul::from_qtensor(qt)?,
                    dims: (out_dim, in_dim),
                    bias,
                })
            }
            None => {
                self.count(None, out_dim * in_dim);
                if matches!(self.source, LinearSource::PackedF32)
                    && vb.dtype() == DType::F32
                    && PackedF32::applies(out_dim, in_dim, vb.device())
                {
                    let w = vb.get((out_dim, in_dim), "weight")?;
                    if let Some(packed) = PackedF32::pack(&w)? {
                        drop(w);
                        let packed = if bias {
                            packed.with_bias(&vb.get(out_dim, "bias")?)?
                        } else {
                            packed
                        };
                        return Ok(Base::Packed(Arc::new(packed)));
                    }
                }
                let l = if bias {
                    candle_nn::linear(in_dim, out_dim, vb)?
                } else {
                    candle_nn::linear_no_bias(in_dim, out_dim, vb)?
                };
                Ok(Base::Dense(l))
            }
        }
    }

    /// The token embedding table `vb.pp(name)`: looked up row by row from the quantized blocks
    /// when quantized.
    pub fn embedding(
        &self,
        vocab: usize,
        hidden: usize,
        vb: &VarBuilder,
        name: &str,
    ) -> candle_core::Result<TokenEmbedding> {
        let vb = vb.pp(name);
        match self.quantized(&vb, "weight", (vocab, hidden), false)? {
            Some(qt) => {
                self.count(Some(qt.dtype()), vocab * hidden);
                Ok(TokenEmbedding::Quantized(Arc::new(qt)))
            }
            None => {
                self.count(None, vocab * hidden);
                Ok(TokenEmbedding::Dense(candle_nn::embedding(
                    vocab, hidden, vb,
                )?))
            }
        }
    }

    /// The LM head: the embedding table when tied (quantized alike; its blocks stay for the
    /// lookups), else `lm_head`.
    pub fn lm_head(
        &self,
        tied: Option<&TokenEmbedding>,
        hidden: usize,
        vocab: usize,
        vb: &VarBuilder,
    ) -> candle_core::Result<Base> {
        match tied {
            Some(TokenEmbedding::Dense(e)) => Ok(Base::Dense(candle_nn::Linear::new(
                e.embeddings().clone(),
                None,
            ))),
            Some(TokenEmbedding::Quantized(qt)) => Ok(Base::Quantized {
                weight: QMatMul::from_arc(qt.clone())?,
                dims: (vocab, hidden),
                bias: None,
            }),
            None => self.linear_base(hidden, vocab, false, vb, "lm_head"),
        }
    }
}

/// What [`quantize_dir`] wrote.
#[derive(Debug, Clone)]
pub struct Quantized {
    pub record: QuantRecord,
    pub gguf_bytes: u64,
    pub source_bytes: u64,
    pub merged_layers: usize,
}

/// Writes the quantized model directory `out` from the dense directory `model` (with `adapter`
/// merged in first, when given): `model.gguf`, `inspector_quant.json`, and every other file
/// of `model` that is not a weights file. With an adapter, its recorded prompt and pixel
/// limits go into `out`'s `inspector_model.json`. `out` must not exist or be empty; it is
/// filled in a temporary sibling folder and renamed, so it is complete or absent.
/// `progress(done, total)` is called per tensor.
pub fn quantize_dir(
    model: &Path,
    adapter: Option<&Path>,
    format: Quantization,
    out: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<Quantized, Error> {
    if !format.is_quantized() {
        return Err(Error::Input(
            "quantize to q8_0 or q4k (none is the dense model itself)".into(),
        ));
    }
    check_loadable(model)?;
    if QuantRecord::read(model)?.is_some() {
        return Err(Error::Checkpoint {
            path: model.to_path_buf(),
            message: "is already quantized: quantize the dense model it was made from".into(),
        });
    }
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .next()
            .is_some()
    {
        return Err(Error::Input(format!(
            "{} exists and is not empty: choose a new folder",
            out.display()
        )));
    }
    let files = weights::safetensors_files(model)?;
    let (pairs, scaling) = match adapter {
        Some(a) => {
            let lora = crate::adapter::read(a, &Device::Cpu)?;
            let pairs = crate::adapter::check_fits(model, a, &lora)?;
            (pairs, lora.config().scaling())
        }
        None => (Default::default(), 0.0),
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut params: BTreeMap<String, usize> = BTreeMap::new();
    let mut merged_layers = 0;
    weights::each_tensor(&files, |name, t, total| {
        let pair = name
            .strip_suffix(".weight")
            .and_then(crate::proj::normalize_module)
            .and_then(|m| pairs.get(&m));
        let t = match pair {
            Some((a, b)) => {
                merged_layers += 1;
                inspector_lora::merge_weight(&t, a, b, scaling)?
            }
            None => t,
        };
        let dims = t.dims().to_vec();
        let kind = match dims.as_slice() {
            [out_dim, in_dim] if name.ends_with(".weight") => format.weight_type(*out_dim, *in_dim),
            _ => None,
        };
        // GGUF holds at most 4 dimensions: the 5-D patch embedding is stored 2-D.
        let t = if dims.len() > 4 {
            t.reshape((dims[0], dims[1..].iter().product::<usize>()))?
        } else {
            t
        };
        let qt = QTensor::quantize(&t, kind.unwrap_or(GgmlDType::F32))?;
        *params.entry(type_name(kind).to_string()).or_default() += t.elem_count();
        tensors.push((name.to_string(), qt));
        progress(tensors.len(), total);
        Ok(())
    })?;
    let record = QuantRecord {
        format,
        weights: GGUF_FILE.into(),
        source: model.display().to_string(),
        adapter: adapter.map(|a| a.display().to_string()),
        params,
    };
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".quantize-")
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    // Every file inference needs but the weights.
    let entries = std::fs::read_dir(model).map_err(|e| Error::io(model, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(model, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let weights_file = name.ends_with(".safetensors")
            || name.ends_with(".gguf")
            || name.ends_with(".bin")
            || name == "model.safetensors.index.json"
            || name == RECORD_FILE;
        if weights_file || !entry.path().is_file() {
            continue;
        }
        std::fs::copy(entry.path(), tmp.path().join(&name))
            .map_err(|e| Error::io(&entry.path(), e))?;
    }
    if let Some(a) = adapter {
        carry_adapter_record(model, a, tmp.path())?;
    }
    let gguf = tmp.path().join(GGUF_FILE);
    {
        let mut f = std::io::BufWriter::new(File::create(&gguf).map_err(|e| Error::io(&gguf, e))?);
        let arch = gguf_file::Value::String(ARCHITECTURE.into());
        let fmt = gguf_file::Value::String(format.name().into());
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(
            &mut f,
            &[("general.architecture", &arch), ("inspector.format", &fmt)],
            &refs,
        )
        .map_err(|e| Error::Checkpoint {
            path: gguf.clone(),
            message: e.to_string(),
        })?;
        use std::io::Write;
        f.flush().map_err(|e| Error::io(&gguf, e))?;
        f.get_ref().sync_all().map_err(|e| Error::io(&gguf, e))?;
    }
    let gguf_bytes = std::fs::metadata(&gguf)
        .map_err(|e| Error::io(&gguf, e))?
        .len();
    let record_path = tmp.path().join(RECORD_FILE);
    let json = serde_json::to_vec_pretty(&record).expect("a record serialises");
    std::fs::write(&record_path, json).map_err(|e| Error::io(&record_path, e))?;
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, out).map_err(|e| Error::io(out, e))?;
    let source_bytes = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    Ok(Quantized {
        record,
        gguf_bytes,
        source_bytes,
        merged_layers,
    })
}

/// Writes `out/inspector_model.json`: the model's record with the adapter's prompt and pixel
/// limits over it (what the detector would have read from the adapter).
fn carry_adapter_record(model: &Path, adapter: &Path, out: &Path) -> Result<(), Error> {
    let read = |p: PathBuf| -> Result<serde_json::Map<String, serde_json::Value>, Error> {
        match std::fs::read(&p) {
            Ok(b) => match serde_json::from_slice::<serde_json::Value>(&b) {
                Ok(serde_json::Value::Object(m)) => Ok(m),
                _ => Err(Error::Checkpoint {
                    path: p,
                    message: "not a JSON object".into(),
                }),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
            Err(e) => Err(Error::io(&p, e)),
        }
    };
    let mut record = read(model.join("inspector_model.json"))?;
    let from_adapter = read(adapter.join("inspector_adapter.json"))?;
    for key in ["prompt_version", "min_pixels", "max_pixels"] {
        if let Some(v) = from_adapter.get(key) {
            record.insert(key.into(), v.clone());
        }
    }
    record.insert(
        "merged_adapter".into(),
        serde_json::Value::String(adapter.display().to_string()),
    );
    let path = out.join("inspector_model.json");
    let json = serde_json::to_vec_pretty(&record).expect("JSON serialises");
    std::fs::write(&path, json).map_err(|e| Error::io(&path, e))
}
