//! The Qwen2 language model with M-RoPE: rotary positions on three axes (t, h, w), the head
//! dimension split between them by `mrope_section`.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use inspector_lora::{Linear, forward_shared};

use crate::proj::Ctx;

use crate::{
    config::TextConfig,
    ops::{RmsNorm, apply_rotary},
};

/// cos/sin for a batch of 3-axis positions, `[B, 1, S, head_dim]` each, f32.
#[derive(Debug, Clone)]
pub struct MRope {
    inv_freq: Vec<f32>,
    mrope_section: Vec<usize>,
}

impl MRope {
    pub fn new(cfg: &TextConfig) -> Self {
        let half = cfg.head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        MRope {
            inv_freq,
            mrope_section: cfg.mrope_section.clone(),
        }
    }

    /// `positions` is `[3][B][S]` (t, h, w axes).
    pub fn cos_sin(
        &self,
        positions: &[Vec<Vec<i64>>; 3],
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let b = positions[0].len();
        let s = positions[0].first().map_or(0, Vec::len);
        let half = self.inv_freq.len();
        // Which axis each of the half-dim frequencies follows: chunk i of mrope_section → axis i % 3.
        let axis_of: Vec<usize> = self
            .mrope_section
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| std::iter::repeat_n(i % 3, n))
            .collect();
        let mut angles = Vec::with_capacity(b * s * half * 2);
        // Indexing three axes at once reads clearer than zipped iterators here.
        #[allow(clippy::needless_range_loop)]
        for bi in 0..b {
            for si in 0..s {
                let row: Vec<f32> = (0..half)
                    .map(|j| positions[axis_of[j]][bi][si] as f32 * self.inv_freq[j])
                    .collect();
                angles.extend_from_slice(&row);
                angles.extend_from_slice(&row);
            }
        }
        let angles = Tensor::from_vec(angles, (b, 1, s, half * 2), device)?;
        Ok((angles.cos()?, angles.sin()?))
    }
}

/// Keys and values seen so far, `[B, kv_heads, T, head_dim]`, kept in buffers with room to
/// grow: a decoding step writes its one position in place (`slice_set`) instead of copying the
/// whole cache into a new tensor, as concatenation did at every step and layer.
#[derive(Debug)]
pub struct LayerCache {
    /// `[B, kv_heads, capacity, head_dim]` each, valid up to `len`.
    buf: Option<(Tensor, Tensor)>,
    len: usize,
    /// False for a single pass that will not be continued (training): nothing is kept.
    keep: bool,
}

/// Positions a buffer holds beyond what it was filled with (a typical answer's length).
const CACHE_ROOM: usize = 256;

impl Default for LayerCache {
    fn default() -> Self {
        LayerCache {
            buf: None,
            len: 0,
            keep: true,
        }
    }
}

impl Clone for LayerCache {
    /// A deep copy: the buffers are written in place, so clones must not share them.
    fn clone(&self) -> Self {
        LayerCache {
            buf: self.buf.as_ref().map(|(k, v)| {
                (
                    k.copy().expect("a CPU or device copy of a cache buffer"),
                    v.copy().expect("a CPU or device copy of a cache buffer"),
                )
            }),
            len: self.len,
            keep: self.keep,
        }
    }
}

impl LayerCache {
    /// Appends `k`, `v` (`[B, kv_heads, S, head_dim]`) and returns every cached key and value.
    /// The first call returns its own inputs (so that a training pass keeps its gradients) and
    /// copies them into new buffers when the cache is kept.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = k.dim(2)?;
        if !self.keep {
            return Ok((k.clone(), v.clone()));
        }
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let Some((kb, vb)) = &self.buf else {
            self.buf = Some((
                with_room(&k, 0, s + CACHE_ROOM)?,
                with_room(&v, 0, s + CACHE_ROOM)?,
            ));
            self.len = s;
            return Ok((k, v));
        };
        let (mut kb, mut vb) = (kb.clone(), vb.clone());
        if self.len + s > kb.dim(2)? {
            let cap = 2 * (self.len + s);
            kb = with_room(&kb.narrow(2, 0, self.len)?.contiguous()?, 0, cap)?;
            vb = with_room(&vb.narrow(2, 0, self.len)?.contiguous()?, 0, cap)?;
        }
        kb.slice_set(&k, 2, self.len)?;
        vb.slice_set(&v, 2, self.len)?;
        self.len += s;
        let out = (kb.narrow(2, 0, self.len)?, vb.narrow(2, 0, self.len)?);
        self.buf = Some((kb, vb));
        Ok(out)
    }
}

/// A `[B, H, cap, D]` buffer holding `t` (`[B, H, T, D]`) at `offset`.
fn with_room(t: &Tensor, offset: usize, cap: usize) -> Result<Tensor> {
    let (b, h, _, d) = t.dims4()?;
    let buf = Tensor::zeros((b, h, cap, d), t.dtype(), t.device())?;
    buf.slice_set(t, 2, offset)?;
    Ok(buf)
}

/// One cache per layer, plus the positions bookkeeping for decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![LayerCache::default(); n_layers],
        }
    }

    /// A cache for one pass that will not be continued (training): it keeps nothing.
    pub fn discarding(n_layers: usize) -> Self {
        KvCache {
            layers: (0..n_layers)
                .map(|_| LayerCache {
                    keep: false,
                    ..LayerCache::default()
                })
                .collect(),
        }
    }

    /// How many positions are cached.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &TextConfig, vb: VarBuilder, ctx: &Ctx) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        Ok(Attention {
            q_proj: ctx.linear(h, nq, true, &vb, "q_proj")?,
            k_proj: ctx.linear(h, nkv, true, &vb, "k_proj")?,
            v_proj: ctx.linear(h, nkv, true, &vb, "v_proj")?,
            o_proj: ctx.linear(nq, h, false, &vb, "o_proj")?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        let dtype = xs.dtype();
        let shape = |t: Tensor, heads: usize| -> Result<Tensor> {
            t.reshape((b, s, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let [q, k, v]: [Tensor; 3] =
            forward_shared(&[&self.q_proj, &self.k_proj, &self.v_proj], xs)?
                .try_into()
                .expect("three projections");
        let q = shape(q, self.num_heads)?;
        let k = shape(k, self.num_kv_heads)?;
        let v = shape(v, self.num_kv_heads)?;
        // Rotary, scores, softmax and the weighted sum run in f32 whatever the weights' dtype
        // (the cache keeps the weights' dtype): on bf16 weights this halves the logits' error.
        let q = apply_rotary(&q.to_dtype(DType::F32)?, cos, sin)?;
        let k = apply_rotary(&k.to_dtype(DType::F32)?, cos, sin)?.to_dtype(dtype)?;
        let (k, v) = cache.append(&k, &v)?;
        let groups = self.num_heads / self.num_kv_heads;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // One dispatcher: the fused CPU op (which skips masked key blocks and, in inference,
        // reads the shared key/value heads in the cache in place), or the scores as a tensor
        // with candle's softmax (inference elsewhere) or the differentiable one.
        let out = crate::ops::attention_grouped(
            &q,
            &k.to_dtype(DType::F32)?,
            &v.to_dtype(DType::F32)?,
            mask,
            scale,
            groups,
        )?; // [B, heads, S, hd]
        let out = out
            .transpose(1, 2)?
            .reshape((b, s, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out.to_dtype(dtype)?)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &TextConfig, vb: VarBuilder, ctx: &Ctx) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_proj: ctx.linear(h, i, false, &vb, "gate_proj")?,
            up_proj: ctx.linear(h, i, false, &vb, "up_proj")?,
            down_proj: ctx.linear(i, h, false, &vb, "down_proj")?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] = forward_shared(&[&self.gate_proj, &self.up_proj], xs)?
            .try_into()
            .expect("two projections");
        let gate = crate::ops::silu(&gate)?;
        self.down_proj.forward(&(gate * up)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder, ctx: &Ctx) -> Result<Self> {
        Ok(DecoderLayer {
            self_attn: Attention::new(cfg, vb.pp("self_attn"), &ctx.pp("self_attn"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"), &ctx.pp("mlp"))?,
            input_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("input_layernorm"),
            )?,
            post_attention_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        // The residual stream stays f32 whatever the weights' dtype: bf16 rounding of the
        // running sum is the largest avoidable error in a bf16 forward.
        let residual = xs;
        let xs =
            self.self_attn
                .forward(&self.input_layernorm.forward(xs)?, cos, sin, mask, cache)?;
        let xs = (residual + xs.to_dtype(residual.dtype())?)?;
        let residual = &xs;
        residual
            + self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&xs)?)?
                .to_dtype(residual.dtype())?
    }
}

/// The token embedding table: dense, or ggml blocks whose rows are dequantized as they are
/// looked up (the table of a tied quantized model is also its LM head).
#[derive(Debug, Clone)]
pub enum TokenEmbedding {
    Dense(Embedding),
    Quantized(std::sync::Arc<candle_core::quantized::QTensor>),
}

impl Module for TokenEmbedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            TokenEmbedding::Dense(e) => e.forward(ids),
            TokenEmbedding::Quantized(q) => q.embedding(ids),
        }
    }
}

/// The decoder stack (embeddings, layers, final norm); the LM head lives in the full model.
#[derive(Debug, Clone)]
pub struct TextModel {
    pub embed_tokens: TokenEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    rope: MRope,
}

impl TextModel {
    pub(crate) fn new(cfg: &TextConfig, vb: VarBuilder, ctx: &Ctx) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, vb.pp("layers").pp(i), &ctx.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(TextModel {
            embed_tokens: ctx.weights.embedding(
                cfg.vocab_size,
                cfg.hidden_size,
                &vb,
                "embed_tokens",
            )?,
            layers,
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?,
            rope: MRope::new(cfg),
        })
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Runs the stack over `embeds` `[B, S, H]` at `positions` `[3][B][S]`. `key_mask[b][j]` is
    /// false for padded keys over the cache and the new tokens (`[B][T + S]`). Attention is
    /// causal. Returns the final-normed hidden states `[B, S, H]`.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        positions: &[Vec<Vec<i64>>; 3],
        key_mask: &[Vec<bool>],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, s, _) = embeds.dims3()?;
        let device = embeds.device();
        let past = cache.len();
        let (cos, sin) = self.rope.cos_sin(positions, device)?;
        let mask = attention_mask(b, s, past, key_mask, device)?;
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache::new(self.layers.len());
        }
        let mut xs = embeds.to_dtype(DType::F32)?;
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            xs = layer.forward(&xs, &cos, &sin, &mask, layer_cache)?;
        }
        self.norm.forward(&xs)
    }

    /// Gradient checkpointing: the decoder run forward keeping only each layer's input (the
    /// activations inside a layer are freed as soon as it has run), `head` applied to the
    /// final hidden states (after the norm), and the gradients of `head`'s result computed
    /// layer by layer backwards, each layer's forward recomputed from its saved input. Memory
    /// holds one layer's activations at a time instead of all of them, for about one more
    /// forward pass of compute.
    ///
    /// `dropout_position` reads and sets the LoRA dropout stream, so that a recomputed layer
    /// draws the masks it drew the first time. Returns the value of `head` (detached), the
    /// gradients of every variable reached through the decoder, the norm and `head`, and the
    /// gradient with respect to `embeds` (for the embeddings and vision tower below).
    pub fn checkpointed(
        &self,
        embeds: &Tensor,
        positions: &[Vec<Vec<i64>>; 3],
        key_mask: &[Vec<bool>],
        head: &dyn Fn(&Tensor) -> Result<Tensor>,
        dropout_position: Option<DropoutPosition>,
    ) -> Result<(Tensor, candle_core::backprop::GradStore, Tensor)> {
        let (b, s, _) = embeds.dims3()?;
        let device = embeds.device();
        let (cos, sin) = self.rope.cos_sin(positions, device)?;
        let mask = attention_mask(b, s, 0, key_mask, device)?;
        let position = || dropout_position.map(|(get, _)| get());
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut xs = embeds.to_dtype(DType::F32)?.detach();
        for layer in &self.layers {
            inputs.push((xs.clone(), position()));
            let mut cache = LayerCache {
                keep: false,
                ..LayerCache::default()
            };
            // Detached: the layer's graph, and with it its activations, is dropped here.
            xs = layer.forward(&xs, &cos, &sin, &mask, &mut cache)?.detach();
        }
        let after = position();
        let top = candle_core::Var::from_tensor(&xs)?;
        let value = head(&self.norm.forward(top.as_tensor())?)?;
        let mut grads = value.backward()?;
        let mut upstream = grads
            .remove(top.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("no gradient reached the decoder".into()))?;
        for (layer, (input, at)) in self.layers.iter().zip(inputs).rev() {
            if let (Some((_, set)), Some(at)) = (dropout_position, at) {
                set(at);
            }
            let x = candle_core::Var::from_tensor(&input)?;
            let mut cache = LayerCache {
                keep: false,
                ..LayerCache::default()
            };
            let y = layer.forward(x.as_tensor(), &cos, &sin, &mask, &mut cache)?;
            let mut layer_grads = (y * &upstream)?.sum_all()?.backward()?;
            upstream = layer_grads
                .remove(x.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("no gradient reached a layer".into()))?;
            grads.extend(layer_grads)?;
        }
        if let (Some((_, set)), Some(at)) = (dropout_position, after) {
            set(at);
        }
        Ok((value.detach(), grads, upstream))
    }
}

/// Reads and sets a LoRA dropout stream's position ([`TextModel::checkpointed`]).
pub type DropoutPosition<'a> = (&'a dyn Fn() -> u128, &'a dyn Fn(u128));

/// Additive mask `[B, 1, S, T+S]`, f32: 0 where query i may see key j (causal and not padded),
/// `f32::MIN` elsewhere. A finite minimum (not −∞) keeps fully masked rows (pad queries)
/// finite, as transformers does, so no NaN reaches the real rows through later layers.
fn attention_mask(
    b: usize,
    s: usize,
    past: usize,
    key_mask: &[Vec<bool>],
    device: &Device,
) -> Result<Tensor> {
    let total = past + s;
    let mut data = vec![0f32; b * s * total];
    for bi in 0..b {
        for i in 0..s {
            for j in 0..total {
                let visible = j <= past + i
                    && key_mask
                        .get(bi)
                        .and_then(|m| m.get(j))
                        .copied()
                        .unwrap_or(true);
                if !visible {
                    data[(bi * s + i) * total + j] = f32::MIN;
                }
            }
        }
    }
    Tensor::from_vec(data, (b, 1, s, total), device)
}
