//! The whole Qwen2-VL: vision tower, image embeddings placed at the `<|image_pad|>` tokens,
//! M-RoPE decoder, LM head; loading from a Hugging Face model directory.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::VarBuilder;

use inspector_lora::{Base, Lora};

use crate::{
    Error,
    backend::{Backend, Quantization},
    config::{Config, ConfigLayout},
    image::ProcessorConfig,
    positions::{RopeIndex, rope_index},
    proj::Ctx,
    quant::{self, GgufWeights, LinearSource, QuantRecord, Weights},
    text::{KvCache, TextModel},
    vision::{VisionInput, VisionModel},
    weights::{self, KeyLayout},
};

/// Token ids and images for one forward pass.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B][S]`, image pads already expanded to each image's token count, left-padded.
    pub input_ids: Vec<Vec<u32>>,
    /// `[B][S]`, false at padding. `None`: no padding.
    pub attention_mask: Option<Vec<Vec<bool>>>,
    /// All images of the batch, in the order their pads appear (row 0 first).
    pub images: Option<VisionInput>,
}

/// Which positions to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position, `[B, S, V]` (training).
    All,
    /// The last position only, `[B, V]` (inference).
    Last,
}

/// What a prefill leaves for decoding.
#[derive(Debug, Clone)]
pub struct DecodeState {
    pub cache: KvCache,
    /// Per row, the position the next token takes (on all three axes).
    pub next_position: Vec<i64>,
    /// Per row, which cached keys are real (false at left padding).
    pub key_mask: Vec<Vec<bool>>,
}

/// Output of a forward pass.
#[derive(Debug, Clone)]
pub struct Output {
    pub logits: Tensor,
    pub rope: RopeIndex,
    pub state: DecodeState,
}

/// A prefill's hidden states, positions, key mask and cache.
type Prefill = (Tensor, RopeIndex, Vec<Vec<bool>>, KvCache);

/// Facts about a loaded checkpoint, for `inspector model info`.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub dir: PathBuf,
    pub config: Config,
    pub key_layout: KeyLayout,
    pub files: Vec<PathBuf>,
    pub dtype: DType,
    pub vision_params: usize,
    pub text_params: usize,
    pub lm_head_params: usize,
    /// How the linear layers are stored.
    pub quantization: Quantization,
    /// Parameters per storage type (`f32`, `bf16`, `q8_0`, `q4k`, …).
    pub params_by_type: BTreeMap<String, usize>,
}

impl ModelInfo {
    pub fn total_params(&self) -> usize {
        self.vision_params + self.text_params + self.lm_head_params
    }

    pub fn config_layout(&self) -> ConfigLayout {
        self.config.layout
    }
}

#[derive(Debug, Clone)]
pub struct Qwen2Vl {
    pub config: Config,
    pub processor: ProcessorConfig,
    vision: VisionModel,
    text: TextModel,
    lm_head: Base,
    device: Device,
    dtype: DType,
    quantization: Quantization,
}

impl Qwen2Vl {
    /// Loads a Hugging Face model directory (config.json, safetensors single or sharded, in
    /// either key layout; processor config if present), dense.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<(Self, ModelInfo), Error> {
        Self::load_with(dir, dtype, device, None)
    }

    /// [`Qwen2Vl::load`], offering every linear layer to a LoRA set (new, or read from an
    /// adapter with [`crate::adapter::read`]).
    pub fn load_with(
        dir: &Path,
        dtype: DType,
        device: &Device,
        lora: Option<&Lora>,
    ) -> Result<(Self, ModelInfo), Error> {
        let backend = Backend {
            device: device.clone(),
            dtype,
            quantization: Quantization::None,
        };
        Self::open(dir, &backend, lora)
    }

    /// Loads a model directory for inference on `backend`: a dense directory (quantized while
    /// it is read when the backend asks for it), or a quantized one that
    /// [`quant::quantize_dir`] wrote (whose format a quantizing backend must name). A LoRA set
    /// applies unmerged on top (its weights stay f32).
    pub fn open(
        dir: &Path,
        backend: &Backend,
        lora: Option<&Lora>,
    ) -> Result<(Self, ModelInfo), Error> {
        backend.validate().map_err(Error::Input)?;
        quant::check_loadable(dir)?;
        let record = QuantRecord::read(dir)?;
        let (weights, quantization) = match &record {
            Some(r) => {
                if backend.quantization.is_quantized() && backend.quantization != r.format {
                    return Err(Error::Input(format!(
                        "{} is quantized to {}; it cannot be loaded as {} (quantize the dense \
                         model to that format instead)",
                        dir.display(),
                        r.format,
                        backend.quantization
                    )));
                }
                if backend.dtype != DType::F32 {
                    return Err(Error::Input(format!(
                        "{} is quantized to {}: its kernels compute in f32, so --dtype {} does \
                         not apply",
                        dir.display(),
                        r.format,
                        backend.dtype.as_str()
                    )));
                }
                let g = std::sync::Arc::new(GgufWeights::open(&dir.join(quant::GGUF_FILE))?);
                (Weights::new(LinearSource::Gguf(g)), r.format)
            }
            None if backend.quantization.is_quantized() => (
                Weights::new(LinearSource::Quantize(backend.quantization)),
                backend.quantization,
            ),
            None => (
                Weights::new(dense_source(backend, lora)),
                Quantization::None,
            ),
        };
        if quantization.is_quantized()
            && let Some(l) = lora
            && !l.is_frozen()
        {
            // The quantized products have no backward pass: the gradients of every branch
            // below a quantized layer would miss that layer's share, without a word.
            return Err(Error::Input(format!(
                "{} is loaded quantized ({quantization}): a trainable LoRA set cannot go on a \
                 quantized base; train on the dense model",
                dir.display()
            )));
        }
        let device = backend.device.clone();
        let dtype = backend.dtype;
        Self::load_from(
            dir,
            dtype,
            lora,
            &weights,
            quantization,
            |files| match &weights.gguf() {
                Some(g) => {
                    let vb = quant::var_builder(g, &device);
                    Ok((vb, g.key_layout()?, g.shapes()))
                }
                None => weights::load(files, dtype, &device),
            },
        )
    }

    /// Loads for full fine-tuning: every tensor the model uses becomes a [`candle_core::Var`], returned
    /// with its checkpoint name (save them with [`weights::rewrite`]).
    pub fn load_trainable(
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, ModelInfo, weights::NamedVars), Error> {
        crate::adapter::refuse_quantized(dir, "train")?;
        let mut vars = None;
        let dense = Weights::dense();
        let (model, info) =
            Self::load_from(dir, dtype, None, &dense, Quantization::None, |files| {
                let (vb, layout, shapes, v) = weights::load_trainable(files, dtype, device)?;
                vars = Some(v);
                Ok((vb, layout, shapes))
            })?;
        let vars = vars.expect("the loader ran");
        let vars = std::mem::take(&mut *vars.lock().expect("not poisoned"));
        Ok((model, info, vars))
    }

    fn load_from(
        dir: &Path,
        dtype: DType,
        lora: Option<&Lora>,
        weights_src: &Weights,
        quantization: Quantization,
        open: impl FnOnce(
            &[PathBuf],
        )
            -> Result<(VarBuilder<'static>, KeyLayout, weights::TensorShapes), Error>,
    ) -> Result<(Self, ModelInfo), Error> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config = Config::from_json(&text).map_err(|e| e.in_file(&config_path))?;
        let processor = ProcessorConfig::from_model_dir(dir)?;
        let files = match weights_src.gguf() {
            Some(g) => vec![g.path().to_path_buf()],
            None => weights::safetensors_files(dir)?,
        };
        let (vb, key_layout, shapes) = open(&files)?;
        let mut model = Self::build(&config, processor, vb, key_layout, lora, weights_src)
            .map_err(|e| Error::Checkpoint {
                path: dir.to_path_buf(),
                message: e.to_string(),
            })?;
        model.quantization = quantization;
        let (vision_params, text_params, lm_head_params) = count_params(&shapes, key_layout);
        let total = vision_params + text_params + lm_head_params;
        let mut params_by_type: BTreeMap<String, usize> = BTreeMap::new();
        if quantization.is_quantized() {
            let mut quantized = 0;
            for (t, n) in weights_src.tally() {
                if t != "f32" {
                    quantized += n;
                    params_by_type.insert(t.to_string(), n);
                }
            }
            params_by_type.insert("f32".into(), total.saturating_sub(quantized));
        } else {
            params_by_type.insert(dtype.as_str().to_string(), total);
        }
        let info = ModelInfo {
            dir: dir.to_path_buf(),
            config,
            key_layout,
            files,
            dtype,
            vision_params,
            text_params,
            lm_head_params,
            quantization,
            params_by_type,
        };
        Ok((model, info))
    }

    /// Builds the model from tensors named in `key_layout` (a checkpoint, or variables for
    /// training).
    pub fn from_var_builder(
        config: &Config,
        processor: ProcessorConfig,
        vb: VarBuilder,
        key_layout: KeyLayout,
    ) -> candle_core::Result<Self> {
        Self::from_var_builder_with(config, processor, vb, key_layout, None)
    }

    /// [`Qwen2Vl::from_var_builder`], offering every linear layer to a LoRA set.
    pub fn from_var_builder_with(
        config: &Config,
        processor: ProcessorConfig,
        vb: VarBuilder,
        key_layout: KeyLayout,
        lora: Option<&Lora>,
    ) -> candle_core::Result<Self> {
        Self::build(config, processor, vb, key_layout, lora, &Weights::dense())
    }

    fn build(
        config: &Config,
        processor: ProcessorConfig,
        vb: VarBuilder,
        key_layout: KeyLayout,
        lora: Option<&Lora>,
        weights: &Weights,
    ) -> candle_core::Result<Self> {
        let vision = VisionModel::new(
            &config.vision,
            vb.pp(key_layout.vision_prefix()),
            &Ctx::root(lora, weights, "model.visual"),
        )?;
        let text = TextModel::new(
            &config.text,
            vb.pp(key_layout.text_prefix()),
            &Ctx::root(lora, weights, "model.language_model"),
        )?;
        let tied = config.tie_word_embeddings.then_some(&text.embed_tokens);
        let lm_head =
            weights.lm_head(tied, config.text.hidden_size, config.text.vocab_size, &vb)?;
        Ok(Qwen2Vl {
            config: config.clone(),
            processor,
            vision,
            text,
            lm_head,
            device: vb.device().clone(),
            dtype: vb.dtype(),
            quantization: Quantization::None,
        })
    }

    /// How the linear layers are stored.
    pub fn quantization(&self) -> Quantization {
        self.quantization
    }

    /// The device, dtype and quantization the model computes with.
    pub fn backend(&self) -> Backend {
        Backend {
            device: self.device.clone(),
            dtype: self.dtype,
            quantization: self.quantization,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The vision tower's output for `images`: `[n_image_tokens, hidden]`.
    pub fn image_embeds(&self, images: &VisionInput) -> Result<Tensor, Error> {
        let pixel_values = images
            .pixel_values
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        let input = VisionInput {
            pixel_values,
            grid_thw: images.grid_thw.clone(),
        };
        Ok(self.vision.forward(&input)?)
    }

    /// Token embeddings with image features placed at the image pads, `[B, S, H]`.
    pub fn input_embeds(&self, batch: &Batch) -> Result<Tensor, Error> {
        let (b, s) = batch_dims(batch)?;
        let flat: Vec<u32> = batch.input_ids.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat.clone(), (b * s,), &self.device)?;
        let embeds = self.text.embed_tokens.forward(&ids)?; // [B·S, H]
        let pad = self.config.tokens.image_pad;
        let pad_positions: Vec<usize> = flat
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == pad)
            .map(|(i, _)| i)
            .collect();
        let embeds = match &batch.images {
            None if pad_positions.is_empty() => embeds,
            None => {
                return Err(Error::ImageTokens {
                    message: format!("{} <|image_pad|> tokens but no images", pad_positions.len()),
                });
            }
            Some(images) => {
                let image_embeds = self.image_embeds(images)?;
                let n = image_embeds.dim(0)?;
                if n != pad_positions.len() {
                    return Err(Error::ImageTokens {
                        message: format!(
                            "{} images give {n} image tokens but the prompt has {} <|image_pad|> tokens",
                            images.grid_thw.len(),
                            pad_positions.len()
                        ),
                    });
                }
                // Gather from [token embeddings; image embeddings]: index_select has a backward
                // pass, so gradients reach both the vision tower and the embeddings.
                let mut index: Vec<u32> = (0..(b * s) as u32).collect();
                for (k, &p) in pad_positions.iter().enumerate() {
                    index[p] = (b * s + k) as u32;
                }
                let index = Tensor::from_vec(index, (b * s,), &self.device)?;
                Tensor::cat(&[&embeds, &image_embeds.to_dtype(embeds.dtype())?], 0)?
                    .index_select(&index, 0)?
            }
        };
        Ok(embeds.reshape((b, s, self.config.text.hidden_size))?)
    }

    /// M-RoPE positions for the batch.
    pub fn rope_index(&self, batch: &Batch) -> Result<RopeIndex, Error> {
        let grids: Vec<[usize; 3]> = batch
            .images
            .as_ref()
            .map(|i| i.grid_thw.clone())
            .unwrap_or_default();
        rope_index(
            &batch.input_ids,
            batch.attention_mask.as_deref(),
            self.config.tokens.image_pad,
            &grids,
            self.config.vision.spatial_merge_size,
        )
    }

    /// A full forward pass from an empty cache.
    pub fn forward(&self, batch: &Batch, logits: Logits) -> Result<Output, Error> {
        let (hidden, rope, key_mask, cache) = self.prefill(batch, true)?;
        let next_position = (0..key_mask.len())
            .map(|bi| {
                (0..3)
                    .flat_map(|a| rope.positions[a][bi].iter().copied())
                    .max()
                    .unwrap_or(-1)
                    + 1
            })
            .collect();
        let logits = self.head(&hidden, logits)?;
        Ok(Output {
            logits,
            rope,
            state: DecodeState {
                cache,
                next_position,
                key_mask,
            },
        })
    }

    /// The final-normed hidden states `[B, S, H]` of a full forward pass (no cache kept): the
    /// training path, which then applies [`Qwen2Vl::lm_logits`] to the positions it scores.
    pub fn hidden_states(&self, batch: &Batch) -> Result<Tensor, Error> {
        Ok(self.prefill(batch, false)?.0)
    }

    /// Embeds, positions and runs the decoder over a whole batch from an empty cache, which
    /// keeps the keys and values for decoding when `keep`.
    fn prefill(&self, batch: &Batch, keep: bool) -> Result<Prefill, Error> {
        let (b, s) = batch_dims(batch)?;
        let max = self.config.text.max_position_embeddings;
        if s > max {
            return Err(Error::TooLong { tokens: s, max });
        }
        let embeds = self.input_embeds(batch)?;
        let rope = self.rope_index(batch)?;
        let key_mask: Vec<Vec<bool>> = match &batch.attention_mask {
            Some(m) => m.clone(),
            None => vec![vec![true; s]; b],
        };
        let n = self.text.n_layers();
        let mut cache = if keep {
            KvCache::new(n)
        } else {
            KvCache::discarding(n)
        };
        let hidden = self
            .text
            .forward_embeds(&embeds, &rope.positions, &key_mask, &mut cache)?;
        Ok((hidden, rope, key_mask, cache))
    }

    /// Training with gradient checkpointing ([`crate::text::TextModel::checkpointed`]): the
    /// embeddings (image features placed) with their graph, the decoder layer by layer, and
    /// `head` on the final hidden states `[B, S, H]`. Returns `head`'s value (detached) and
    /// the gradients of every variable, as `head(..).backward()` on the plain forward would.
    /// `lora`: the set being trained, whose dropout masks the recomputation repeats.
    pub fn checkpointed_backward(
        &self,
        batch: &Batch,
        head: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
        lora: Option<&Lora>,
    ) -> Result<(Tensor, candle_core::backprop::GradStore), Error> {
        let (b, s) = batch_dims(batch)?;
        let max = self.config.text.max_position_embeddings;
        if s > max {
            return Err(Error::TooLong { tokens: s, max });
        }
        let embeds = self.input_embeds(batch)?;
        let rope = self.rope_index(batch)?;
        let key_mask: Vec<Vec<bool>> = match &batch.attention_mask {
            Some(m) => m.clone(),
            None => vec![vec![true; s]; b],
        };
        let get = || lora.map_or(0, Lora::rng_position);
        let set = |at: u128| {
            if let Some(l) = lora {
                l.set_rng_position(at);
            }
        };
        let (value, mut grads, upstream) = self.text.checkpointed(
            &embeds,
            &rope.positions,
            &key_mask,
            head,
            lora.map(|_| (&get as &dyn Fn() -> u128, &set as &dyn Fn(u128))),
        )?;
        // Below the decoder: the embedding table and the vision tower, when they train.
        if embeds.track_op() {
            let bottom = (embeds.to_dtype(DType::F32)? * upstream)?
                .sum_all()?
                .backward()?;
            grads.extend(bottom)?;
        }
        Ok((value, grads))
    }

    /// The LM head on hidden states `[…, H]` → f32 logits `[…, V]`.
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor, Error> {
        Ok(self.lm_head.forward(hidden)?.to_dtype(DType::F32)?)
    }

    /// One decoding step: one new token per row. Returns logits `[B, V]`.
    pub fn step(&self, tokens: &[u32], state: &mut DecodeState) -> Result<Tensor, Error> {
        let b = tokens.len();
        if b != state.next_position.len() {
            return Err(Error::Input(format!(
                "{b} tokens for a batch of {}",
                state.next_position.len()
            )));
        }
        let max = self.config.text.max_position_embeddings;
        if state.cache.len() + 1 > max {
            return Err(Error::TooLong {
                tokens: state.cache.len() + 1,
                max,
            });
        }
        let ids = Tensor::from_vec(tokens.to_vec(), (b, 1), &self.device)?;
        let embeds = self.text.embed_tokens.forward(&ids)?;
        let pos: Vec<Vec<i64>> = state.next_position.iter().map(|&p| vec![p]).collect();
        let positions = [pos.clone(), pos.clone(), pos];
        for m in state.key_mask.iter_mut() {
            m.push(true);
        }
        let hidden =
            self.text
                .forward_embeds(&embeds, &positions, &state.key_mask, &mut state.cache)?;
        for p in state.next_position.iter_mut() {
            *p += 1;
        }
        self.head(&hidden, Logits::Last)
    }

    fn head(&self, hidden: &Tensor, logits: Logits) -> Result<Tensor, Error> {
        let hidden = match logits {
            Logits::All => hidden.clone(),
            Logits::Last => {
                let s = hidden.dim(1)?;
                hidden.i((.., s - 1, ..))?.contiguous()?
            }
        };
        Ok(self.lm_head.forward(&hidden)?.to_dtype(DType::F32)?)
    }
}

fn batch_dims(batch: &Batch) -> Result<(usize, usize), Error> {
    let b = batch.input_ids.len();
    let s = batch.input_ids.first().map_or(0, Vec::len);
    if b == 0 || s == 0 {
        return Err(Error::Input("empty batch".into()));
    }
    if batch.input_ids.iter().any(|r| r.len() != s) {
        return Err(Error::Input(
            "rows of different lengths: pad them (left)".into(),
        ));
    }
    if let Some(m) = &batch.attention_mask
        && (m.len() != b || m.iter().any(|r| r.len() != s))
    {
        return Err(Error::Input(
            "attention_mask does not match input_ids".into(),
        ));
    }
    Ok((b, s))
}

/// Parameters per part, from the safetensors headers (tied weights counted once).
fn count_params(shapes: &weights::TensorShapes, layout: KeyLayout) -> (usize, usize, usize) {
    let (mut vision, mut text, mut head) = (0, 0, 0);
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        if name.starts_with(layout.vision_prefix()) {
            vision += n;
        } else if name.starts_with("lm_head") {
            head += n;
        } else {
            text += n;
        }
    }
    (vision, text, head)
}

/// Where a dense model's linear layers come from: on the CPU in f32, weights packed once at
/// load for the CPU's f32 kernel ([`inspector_lora::packed::PackedF32`]); the dense tensors
/// where a LoRA set trains (the packed product has no backward pass: the gradients of every
/// branch below a packed layer would miss that layer's share), on GPUs and in other dtypes.
pub(crate) fn dense_source(backend: &Backend, lora: Option<&Lora>) -> LinearSource {
    if backend.device.is_cpu() && backend.dtype == DType::F32 && lora.is_none_or(|l| l.is_frozen())
    {
        LinearSource::PackedF32
    } else {
        LinearSource::Dense
    }
}

#[cfg(test)]
mod dense_source_tests {
    use super::*;

    #[test]
    fn packs_for_cpu_f32_inference_only() {
        let cpu = |dtype| Backend {
            device: Device::Cpu,
            dtype,
            quantization: Quantization::None,
        };
        let packed = |s| matches!(s, LinearSource::PackedF32);
        assert!(packed(dense_source(&cpu(DType::F32), None)));
        assert!(!packed(dense_source(&cpu(DType::BF16), None)));
        let lora = Lora::new(inspector_lora::LoraConfig::default(), &Device::Cpu);
        // A LoRA set that trains needs the backward pass of every product below it.
        assert!(!packed(dense_source(&cpu(DType::F32), Some(&lora))));
        lora.freeze();
        assert!(packed(dense_source(&cpu(DType::F32), Some(&lora))));
    }
}
