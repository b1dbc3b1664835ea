//! AdamW with PyTorch's semantics, whose state can be saved and restored exactly; gradient
//! clipping by global norm; the cosine schedule with linear warmup.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var, backprop::GradStore};

/// AdamW hyper-parameters (PyTorch's defaults but the learning rate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 5e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// `torch.optim.AdamW`: decoupled weight decay, bias-corrected moments. Moments are f32.
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    vars: Vec<Var>,
    /// Whether weight decay applies, per variable.
    decay: Vec<bool>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken.
    pub step: u64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> candle_core::Result<Self> {
        let decay = vec![true; vars.len()];
        Self::grouped(vars, decay, config)
    }

    /// Two parameter groups, as Hugging Face's Trainer makes them: weight decay only where
    /// `decay[i]` (it leaves biases and norm weights out).
    pub fn grouped(
        vars: Vec<Var>,
        decay: Vec<bool>,
        config: AdamWConfig,
    ) -> candle_core::Result<Self> {
        if decay.len() != vars.len() {
            candle_core::bail!("{} decay flags for {} variables", decay.len(), vars.len());
        }
        let zeros = |v: &Var| Tensor::zeros(v.shape(), DType::F32, v.device());
        let m = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        let v = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        Ok(AdamW {
            config,
            vars,
            decay,
            m,
            v,
            step: 0,
        })
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// One update with learning rate `lr` from `grads` (a variable without a gradient is
    /// left as it is, as PyTorch skips parameters whose `.grad` is None).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> candle_core::Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (((var, m), v), &decay) in self
            .vars
            .iter()
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut())
            .zip(&self.decay)
        {
            let Some(g) = grads.get(var) else { continue };
            // A variable's gradient can carry the graph it was computed from (candle detaches
            // only the gradients of intermediate nodes); the moments must not keep it alive
            // from one step to the next.
            let g = g.detach().to_dtype(DType::F32)?;
            *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let p = var.as_tensor().to_dtype(DType::F32)?;
            let p = if decay {
                (&p * (1.0 - lr * c.weight_decay))?
            } else {
                p
            };
            let update = ((&*m / bc1)? / ((&*v / bc2)?.sqrt()? + c.eps)?)?;
            let p = (p - (update * lr)?)?;
            var.set(&p.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// The moments and step, to checkpoint: `m.<i>`, `v.<i>`, `step`.
    pub fn state(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            out.insert(format!("m.{i}"), m.clone());
            out.insert(format!("v.{i}"), v.clone());
        }
        let device = self
            .vars
            .first()
            .map(|v| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        out.insert("step".into(), Tensor::new(&[self.step as f64], &device)?);
        Ok(out)
    }

    /// Restores [`AdamW::state`]; shapes must match the variables.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> candle_core::Result<()> {
        for i in 0..self.vars.len() {
            for (name, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let t = state.get(&format!("{name}.{i}")).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state lacks {name}.{i}"))
                })?;
                if t.shape() != slot.shape() {
                    candle_core::bail!(
                        "optimizer state {name}.{i} has shape {:?}, expected {:?}",
                        t.dims(),
                        slot.dims()
                    );
                }
                *slot = t.to_dtype(DType::F32)?.to_device(slot.device())?;
            }
        }
        let step = state
            .get("step")
            .ok_or_else(|| candle_core::Error::Msg("optimizer state lacks step".into()))?;
        self.step = step.to_vec1::<f64>()?[0] as u64;
        Ok(())
    }
}

/// `torch.nn.utils.clip_grad_norm_`: scales every gradient by `max_norm / (norm + 1e-6)` when
/// the global L2 norm exceeds `max_norm`. Returns the norm before clipping.
pub fn clip_grad_norm(
    vars: &[Var],
    grads: &mut GradStore,
    max_norm: f64,
) -> candle_core::Result<f64> {
    let mut total = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var) {
            total += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    let norm = total.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for var in vars {
            if let Some(g) = grads.remove(var) {
                grads.insert(var, (g * coef)?);
            }
        }
    }
    Ok(norm)
}

/// transformers' `get_cosine_schedule_with_warmup`: linear warmup from 0, then half a cosine
/// down to 0 at `total` steps. `step` counts from 0 (the first update uses `lr(0)`).
pub fn cosine_lr(base: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
    base * (0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())).max(0.0)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    /// candle's stock `matmul` gives a variable a gradient that still carries the forward
    /// graph; the moments must hold plain values, or every step's activations stay alive.
    #[test]
    fn moments_do_not_keep_the_graph_alive() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::ones((3, 4), DType::F32, &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::ones((4, 2), DType::F32, &dev).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![a.clone(), w.clone()], AdamWConfig::default()).unwrap();
        for _ in 0..2 {
            let hidden = (a.as_tensor() * 2.0).unwrap();
            let loss = hidden.matmul(w.as_tensor()).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            assert!(
                grads.get(&w).unwrap().track_op(),
                "candle's gradient keeps its graph"
            );
            opt.step(&grads, 1e-3).unwrap();
            for (name, t) in opt.state().unwrap() {
                assert!(!t.track_op(), "{name} keeps a graph");
            }
        }
    }
}
