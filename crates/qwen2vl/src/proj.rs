//! Linear layers built with their module path, so that a LoRA set can adapt the ones it
//! targets. Paths are those of transformers ≥ 4.52 (`model.language_model.layers.N…`,
//! `model.visual.blocks.N…`) whatever the checkpoint's key layout, so adapters name modules
//! the same way for every checkpoint.

use candle_core::Result;
use candle_nn::VarBuilder;
use inspector_lora::{Linear, Lora};

use crate::quant::Weights;

/// Where a layer sits, where its weights come from (dense or quantized), and the LoRA set (if
/// any) to offer it to.
#[derive(Clone)]
pub(crate) struct Ctx<'a> {
    pub lora: Option<&'a Lora>,
    pub weights: &'a Weights,
    pub path: String,
}

impl<'a> Ctx<'a> {
    pub fn root(lora: Option<&'a Lora>, weights: &'a Weights, path: &str) -> Self {
        Ctx {
            lora,
            weights,
            path: path.to_string(),
        }
    }

    pub fn pp(&self, part: impl std::fmt::Display) -> Self {
        Ctx {
            lora: self.lora,
            weights: self.weights,
            path: format!("{}.{part}", self.path),
        }
    }

    /// A linear layer `name` under this path, read from `vb.pp(name)`.
    pub fn linear(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: &VarBuilder,
        name: &str,
    ) -> Result<Linear> {
        let base = self.weights.linear_base(in_dim, out_dim, bias, vb, name)?;
        match self.lora {
            Some(lora) => lora.wrap(&format!("{}.{name}", self.path), base),
            None => Ok(Linear::plain(base)),
        }
    }
}

/// Maps a module path found in an adapter to this crate's paths: the pre-4.52 layout
/// (`model.layers.N…`, `visual.…`) to the current one. Paths of modules that cannot carry an
/// adapter here come back unchanged, and are then reported as unclaimed.
pub fn normalize_module(path: &str) -> Option<String> {
    if path.starts_with("model.language_model.") || path.starts_with("model.visual.") {
        return Some(path.to_string());
    }
    if let Some(rest) = path.strip_prefix("model.layers.") {
        return Some(format!("model.language_model.layers.{rest}"));
    }
    if let Some(rest) = path.strip_prefix("visual.") {
        return Some(format!("model.visual.{rest}"));
    }
    Some(path.to_string())
}
