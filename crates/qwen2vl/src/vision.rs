//! The vision tower: patch embedding, blocks with 2-D rotary attention confined to each image,
//! and the merger that turns each 2×2 block of patches into one language-model token.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use inspector_lora::Linear;

use crate::{
    config::VisionConfig,
    ops::{LayerNorm, apply_rotary, quick_gelu},
    proj::Ctx,
};

/// Images to encode: flattened patches and each image's (t, h, w) grid.
#[derive(Debug, Clone)]
pub struct VisionInput {
    /// `[Σ t·h·w, C·T·P·P]`.
    pub pixel_values: Tensor,
    pub grid_thw: Vec<[usize; 3]>,
}

/// The Conv3d with kernel = stride over rows that are already one patch each, i.e. one matmul.
#[derive(Debug, Clone)]
struct PatchEmbed {
    weight: Tensor,
}

impl PatchEmbed {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let w = vb.get(
            (
                cfg.embed_dim,
                cfg.in_channels,
                cfg.temporal_patch_size,
                cfg.patch_size,
                cfg.patch_size,
            ),
            "proj.weight",
        )?;
        Ok(PatchEmbed {
            weight: w.reshape((cfg.embed_dim, cfg.patch_len()))?.t()?,
        })
    }

    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        pixel_values
            .to_dtype(self.weight.dtype())?
            .matmul(&self.weight)
    }
}

#[derive(Debug, Clone)]
struct VisionAttention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl VisionAttention {
    fn new(cfg: &VisionConfig, vb: VarBuilder, ctx: &Ctx) -> Result<Self> {
        Ok(VisionAttention {
            qkv: ctx.linear(cfg.embed_dim, cfg.embed_dim * 3, true, &vb, "qkv")?,
            proj: ctx.linear(cfg.embed_dim, cfg.embed_dim, true, &vb, "proj")?,
            num_heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `xs` is `[N, E]` for all images; attention is computed within each image's rows.
    fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        seq_lens: &[usize],
    ) -> Result<Tensor> {
        let n = xs.dim(0)?;
        let dtype = xs.dtype();
        let qkv = self
            .qkv
            .forward(xs)?
            .reshape((n, 3, self.num_heads, self.head_dim))?;
        // Rotary in f32, as the reference does.
        // Attention runs in f32 whatever the weights' dtype, as in the decoder.
        let rot = |i: usize| -> Result<Tensor> {
            let t = qkv.narrow(1, i, 1)?.squeeze(1)?.to_dtype(DType::F32)?;
            apply_rotary(&t, cos, sin)
        };
        let q = rot(0)?.transpose(0, 1)?.contiguous()?; // [heads, N, hd]
        let k = rot(1)?.transpose(0, 1)?.contiguous()?;
        let v = qkv
            .narrow(1, 2, 1)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .transpose(0, 1)?
            .contiguous()?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut outs = Vec::with_capacity(seq_lens.len());
        let mut start = 0;
        for &len in seq_lens {
            let q = q.narrow(1, start, len)?;
            let k = k.narrow(1, start, len)?;
            let v = v.narrow(1, start, len)?;
            // Nothing is masked within an image: the fused CPU op then materialises no
            // `[heads, len, len]` scores tensor.
            let one = |t: &Tensor| t.unsqueeze(0);
            let out =
                crate::ops::attention(&one(&q)?, &one(&k)?, &one(&v)?, None, scale)?.squeeze(0)?;
            outs.push(out);
            start += len;
        }
        let out = Tensor::cat(&outs, 1)?; // [heads, N, hd]
        let out = out
            .transpose(0, 1)?
            .reshape((n, self.num_heads * self.head_dim))?;
        self.proj.forward(&out.to_dtype(dtype)?)
    }
}

#[derive(Debug, Clone)]
struct VisionMlp {
    fc1: Linear,
    fc2: Linear,
}

impl VisionMlp {
    fn new(cfg: &VisionConfig, vb: VarBuilder, ctx: &Ctx) -> Result<Self> {
        Ok(VisionMlp {
            fc1: ctx.linear(cfg.embed_dim, cfg.mlp_hidden(), true, &vb, "fc1")?,
            fc2: ctx.linear(cfg.mlp_hidden(), cfg.embed_dim, true, &vb, "fc2")?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&quick_gelu(&self.fc1.forward(xs)?)?)
    }
}

#[derive(Debug, Clone)]
struct VisionBlock {
    norm1: LayerNorm,
    norm2: LayerNorm,
    attn: VisionAttention,
    mlp: VisionMlp,
}

impl VisionBlock {
    fn new(cfg: &VisionConfig, vb: VarBuilder, ctx: &Ctx) -> Result<Self> {
        Ok(VisionBlock {
            norm1: LayerNorm::new(cfg.embed_dim, 1e-6, vb.pp("norm1"))?,
            norm2: LayerNorm::new(cfg.embed_dim, 1e-6, vb.pp("norm2"))?,
            attn: VisionAttention::new(cfg, vb.pp("attn"), &ctx.pp("attn"))?,
            mlp: VisionMlp::new(cfg, vb.pp("mlp"), &ctx.pp("mlp"))?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        seq_lens: &[usize],
    ) -> Result<Tensor> {
        // Residual stream in f32, as in the decoder.
        let residual = xs;
        let h = self
            .attn
            .forward(&self.norm1.forward(xs)?, cos, sin, seq_lens)?;
        let xs = (residual + h.to_dtype(residual.dtype())?)?;
        let residual = &xs;
        residual
            + self
                .mlp
                .forward(&self.norm2.forward(&xs)?)?
                .to_dtype(residual.dtype())?
    }
}

/// LayerNorm per patch, then each 2×2 block's 4 patches concatenated → Linear → GELU (exact
/// erf) → Linear to the language model's width.
#[derive(Debug, Clone)]
struct PatchMerger {
    ln_q: LayerNorm,
    mlp0: Linear,
    mlp2: Linear,
    merged_dim: usize,
}

impl PatchMerger {
    fn new(cfg: &VisionConfig, vb: VarBuilder, ctx: &Ctx) -> Result<Self> {
        let merged_dim = cfg.embed_dim * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(PatchMerger {
            ln_q: LayerNorm::new(cfg.embed_dim, 1e-6, vb.pp("ln_q"))?,
            mlp0: ctx.linear(merged_dim, merged_dim, true, &vb, "mlp.0")?,
            mlp2: ctx.linear(merged_dim, cfg.hidden_size, true, &vb, "mlp.2")?,
            merged_dim,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.ln_q.forward(xs)?;
        let n = xs.dim(0)? * xs.dim(1)? / self.merged_dim;
        let xs = xs.reshape((n, self.merged_dim))?;
        self.mlp2.forward(&self.mlp0.forward(&xs)?.gelu_erf()?)
    }
}

/// The whole vision tower.
#[derive(Debug, Clone)]
pub struct VisionModel {
    patch_embed: PatchEmbed,
    blocks: Vec<VisionBlock>,
    merger: PatchMerger,
    cfg: VisionConfig,
}

impl VisionModel {
    pub(crate) fn new(cfg: &VisionConfig, vb: VarBuilder, ctx: &Ctx) -> Result<Self> {
        let blocks = (0..cfg.depth)
            .map(|i| VisionBlock::new(cfg, vb.pp("blocks").pp(i), &ctx.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionModel {
            patch_embed: PatchEmbed::new(cfg, vb.pp("patch_embed"))?,
            blocks,
            merger: PatchMerger::new(cfg, vb.pp("merger"), &ctx.pp("merger"))?,
            cfg: cfg.clone(),
        })
    }

    /// cos/sin `[N, head_dim]` of the 2-D rotary: each patch's row and column, in the
    /// merge-block order the patches are laid out in.
    fn rotary(&self, grid_thw: &[[usize; 3]], device: &Device) -> Result<(Tensor, Tensor)> {
        let m = self.cfg.spatial_merge_size;
        let quarter = self.cfg.head_dim() / 4;
        let inv_freq: Vec<f32> = (0..quarter)
            .map(|i| 1.0 / (self.cfg.rope_theta as f32).powf((2 * i) as f32 / (2 * quarter) as f32))
            .collect();
        let mut angles: Vec<f32> = Vec::new();
        for &[t, h, w] in grid_thw {
            for _ in 0..t {
                for bh in 0..h / m {
                    for bw in 0..w / m {
                        for mh in 0..m {
                            for mw in 0..m {
                                let (row, col) = ((bh * m + mh) as f32, (bw * m + mw) as f32);
                                let half: Vec<f32> = inv_freq
                                    .iter()
                                    .map(|f| row * f)
                                    .chain(inv_freq.iter().map(|f| col * f))
                                    .collect();
                                angles.extend_from_slice(&half);
                                angles.extend_from_slice(&half);
                            }
                        }
                    }
                }
            }
        }
        let n = angles.len() / (4 * quarter);
        let angles = Tensor::from_vec(angles, (n, 1, 4 * quarter), device)?;
        Ok((angles.cos()?, angles.sin()?))
    }

    /// `[Σ t·h·w / 4, hidden]`: one embedding per image token, images in order.
    pub fn forward(&self, input: &VisionInput) -> Result<Tensor> {
        let expected: usize = input
            .grid_thw
            .iter()
            .map(|g| g.iter().product::<usize>())
            .sum();
        let rows = input.pixel_values.dim(0)?;
        if rows != expected {
            candle_core::bail!("pixel_values has {rows} patches but grid_thw describes {expected}");
        }
        let device = input.pixel_values.device();
        let (cos, sin) = self.rotary(&input.grid_thw, device)?;
        let seq_lens: Vec<usize> = input
            .grid_thw
            .iter()
            .flat_map(|&[t, h, w]| std::iter::repeat_n(h * w, t))
            .collect();
        let mut xs = self
            .patch_embed
            .forward(&input.pixel_values)?
            .to_dtype(DType::F32)?;
        for block in &self.blocks {
            xs = block.forward(&xs, &cos, &sin, &seq_lens)?;
        }
        self.merger.forward(&xs)
    }
}
