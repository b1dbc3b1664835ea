//! LoRA for candle models, with adapters in PEFT's file format. Knows nothing of any particular
//! model: a model builds its linear layers through [`Lora::wrap`] (or [`Linear::plain`]), giving
//! each its module path (`model.language_model.layers.0.self_attn.q_proj`); the modules whose
//! path matches a target pattern get a trainable low-rank branch.
//!
//! - `A` `[r, in]` starts Kaiming-uniform as PEFT does (`U(±1/√in)`), `B` `[out, r]` at zero;
//!   the branch adds `scaling · B·A·dropout(x)`, scaling `α/r` (`α/√r` with rsLoRA).
//! - The branch runs in f32 whatever the base weights' dtype, from differentiable ops only.
//! - The base ([`Base`]) is a dense `candle_nn::Linear`, an f32 weight packed once for the CPU
//!   ([`packed::PackedF32`]) or a quantized `QMatMul`; only a dense base has a backward pass.
//! - Randomness (initialisation, dropout) comes from seeded ChaCha8 streams, so a run can be
//!   reproduced and resumed exactly.
//! - [`Lora::save_peft`] writes `adapter_config.json` + `adapter_model.safetensors` with keys
//!   `base_model.model.<module>.lora_A.weight`; [`Lora::from_peft`] reads them back (and PEFT's),
//!   refusing with a clear message whatever it cannot honour (DoRA, bias training, shapes that do
//!   not fit, keys for modules the model does not have).
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use inspector_lora::{Lora, LoraConfig};
//!
//! let device = Device::Cpu;
//! let lora = Lora::new(LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() }, &device);
//! let base = candle_nn::Linear::new(Tensor::ones((6, 8), candle_core::DType::F32, &device)?, None);
//! let q = lora.wrap("model.layers.0.self_attn.q_proj", base.clone())?;
//! let other = lora.wrap("model.layers.0.mlp.norm_proj", base)?;
//! assert!(q.has_lora() && !other.has_lora());
//! // B starts at zero: the wrapped layer computes what the base layer does.
//! let x = Tensor::ones((2, 8), candle_core::DType::F32, &device)?;
//! assert_eq!(q.forward(&x)?.to_vec2::<f32>()?, other.forward(&x)?.to_vec2::<f32>()?);
//! assert_eq!(lora.trainable_params(), 4 * 8 + 6 * 4);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod packed;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use candle_core::{DType, Device, Module, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The file names of a PEFT adapter.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// Errors name the file and key at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Adapter { path: PathBuf, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn adapter_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Adapter {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// How `A` and `B` start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Init {
    /// PEFT's default: `A` Kaiming-uniform, `B` zero (the adapter starts as a no-op).
    Peft,
    /// Both `A` and `B` uniform in `±1/√fan_in` (PEFT's `init_lora_weights=False`), so that
    /// every gradient is non-zero from the first step. For tests.
    Random,
}

/// What to adapt and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Scale by `α/√r` instead of `α/r`.
    pub use_rslora: bool,
    /// Module-name patterns, as PEFT matches them: a module is adapted when its path equals a
    /// pattern or ends with `.` + pattern.
    pub target_modules: Vec<String>,
    pub init: Init,
    /// Seeds initialisation and dropout.
    pub seed: u64,
}

/// The language model's projections: the widely used LoRA targets for Qwen2-VL.
pub const DEFAULT_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The vision tower's and merger's linear layers of Qwen2-VL (attention, MLP, merger MLP): the
/// extra targets of an adapter that also adapts the vision side.
pub const VISION_TARGETS: [&str; 6] = ["qkv", "attn.proj", "fc1", "fc2", "mlp.0", "mlp.2"];

impl Default for LoraConfig {
    /// r 16, α 32, dropout 0.1, the language model's projections.
    fn default() -> Self {
        LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.1,
            use_rslora: false,
            target_modules: DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
            init: Init::Peft,
            seed: 0,
        }
    }
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Whether a module path is targeted (PEFT's rule for a list of names).
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules
            .iter()
            .any(|t| module == t || module.ends_with(&format!(".{t}")))
    }
}

/// One adapted layer's trainable pair.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// The module path, e.g. `model.language_model.layers.0.self_attn.q_proj`.
    pub module: String,
    pub a: Var,
    pub b: Var,
}

#[derive(Debug)]
struct Shared {
    config: LoraConfig,
    training: AtomicBool,
    /// Dropout randomness; its position is part of a training checkpoint.
    rng: Mutex<ChaCha8Rng>,
    pairs: Mutex<Vec<LoraPair>>,
    /// Weights read from an adapter file, by module path, waiting for their layer.
    pending: Mutex<BTreeMap<String, (Tensor, Tensor)>>,
    /// Read from an adapter file: only modules with weights in it get a branch.
    from_file: AtomicBool,
    /// Inference only: branches use their weights as constants, so that no forward pass
    /// records a graph for gradients (which kept every activation of a pass alive).
    frozen: AtomicBool,
    device: Device,
}

/// The set of LoRA branches of one model: created while the model is built, then trained,
/// saved and loaded as one adapter. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Lora {
    shared: Arc<Shared>,
}

/// The frozen part of a linear layer: a dense weight (any dtype; a [`Var`] in full
/// fine-tuning), an f32 weight packed for the CPU's f32 kernel ([`packed::PackedF32`]), or ggml
/// blocks multiplied by candle's quantized kernels. Packed and quantized bases have no backward
/// pass: they serve inference, with or without a LoRA branch on top.
#[derive(Debug, Clone)]
pub enum Base {
    Dense(candle_nn::Linear),
    /// With its bias, if any.
    Packed(Arc<packed::PackedF32>),
    Quantized {
        weight: candle_core::quantized::QMatMul,
        /// `[out, in]`.
        dims: (usize, usize),
        /// `[out]`, f32.
        bias: Option<Tensor>,
    },
}

impl Base {
    /// `(out, in)`.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Base::Dense(l) => l.weight().dims2(),
            Base::Packed(p) => Ok(p.dims()),
            Base::Quantized { dims, .. } => Ok(*dims),
        }
    }
}

impl From<candle_nn::Linear> for Base {
    fn from(l: candle_nn::Linear) -> Self {
        Base::Dense(l)
    }
}

impl Module for Base {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Base::Dense(l) => l.forward(x),
            Base::Packed(p) => p.forward(x),
            Base::Quantized { weight, bias, .. } => {
                // The quantized kernels read f32 rows of a contiguous input.
                let y = weight.forward(&x.to_dtype(DType::F32)?.contiguous()?)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }
}

/// A linear layer, with or without a LoRA branch.
#[derive(Debug, Clone)]
pub struct Linear {
    base: Base,
    branch: Option<Branch>,
}

#[derive(Debug, Clone)]
struct Branch {
    a: Var,
    b: Var,
    scaling: f64,
    lora: Lora,
}

impl Linear {
    /// A plain linear layer (no adapter).
    pub fn plain(base: impl Into<Base>) -> Self {
        Linear {
            base: base.into(),
            branch: None,
        }
    }

    pub fn has_lora(&self) -> bool {
        self.branch.is_some()
    }

    pub fn base(&self) -> &Base {
        &self.base
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.base.forward(x)?;
        self.add_branch(x, y)
    }
}

impl Linear {
    /// `y` (the base's output for `x`) plus the LoRA branch's, if any.
    fn add_branch(&self, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        let Some(br) = &self.branch else {
            return Ok(y);
        };
        let xf = x.to_dtype(DType::F32)?;
        let xf = br.lora.dropout(&xf)?;
        let (a, b) = if br.lora.is_frozen() {
            (br.a.as_tensor().detach(), br.b.as_tensor().detach())
        } else {
            (br.a.as_tensor().clone(), br.b.as_tensor().clone())
        };
        let down = candle_nn::Linear::new(a, None).forward(&xf)?;
        // Scaling the r-wide product instead of the output saves a pass over `[.., out]`
        // forward and backward.
        let down = (down * br.scaling)?;
        let up = candle_nn::Linear::new(b, None).forward(&down)?;
        let dtype = y.dtype();
        y + up.to_dtype(dtype)?
    }
}

/// `x` through layers that all read it (a layer's q, k and v projections; gate and up). When
/// every base is quantized in one ggml type, the products run as one: the activations are
/// quantized once and one parallel region computes them all (candle's
/// `QTensor::gemv_fused_shared_lhs`), which saves a pass and a thread hand-off per layer in
/// decoding. Otherwise each layer runs on its own. The results equal one `forward` per layer.
pub fn forward_shared(layers: &[&Linear], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
    use candle_core::quantized::{QMatMul, QTensor};
    let quantized: Option<Vec<&QTensor>> = layers
        .iter()
        .map(|l| match &l.base {
            Base::Quantized {
                weight: QMatMul::QTensor(t),
                ..
            } => Some(t.as_ref()),
            _ => None,
        })
        .collect();
    let fused = match quantized {
        Some(ts) if ts.len() > 1 => {
            QTensor::gemv_fused_shared_lhs(&ts, &x.to_dtype(DType::F32)?.contiguous()?)?
        }
        _ => None,
    };
    let Some(outs) = fused else {
        return layers.iter().map(|l| l.forward(x)).collect();
    };
    layers
        .iter()
        .zip(outs)
        .map(|(l, y)| {
            let y = match &l.base {
                Base::Quantized { bias: Some(b), .. } => y.broadcast_add(b)?,
                _ => y,
            };
            l.add_branch(x, y)
        })
        .collect()
}

/// A uniform `[rows, cols]` tensor in `±bound` from `rng`.
fn uniform(
    rng: &mut ChaCha8Rng,
    rows: usize,
    cols: usize,
    bound: f64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect();
    Tensor::from_vec(data, (rows, cols), device)
}

/// A per-module stream, so that initialisation does not depend on construction order.
fn module_rng(seed: u64, module: &str) -> ChaCha8Rng {
    use sha2::{Digest, Sha256};
    let digest: [u8; 32] = Sha256::new()
        .chain_update(seed.to_le_bytes())
        .chain_update(module.as_bytes())
        .finalize()
        .into();
    ChaCha8Rng::from_seed(digest)
}

impl Lora {
    /// New, empty LoRA set; branches are created by [`Lora::wrap`].
    pub fn new(config: LoraConfig, device: &Device) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x6c6f_7261);
        Lora {
            shared: Arc::new(Shared {
                config,
                training: AtomicBool::new(false),
                rng: Mutex::new(rng),
                pairs: Mutex::new(Vec::new()),
                pending: Mutex::new(BTreeMap::new()),
                from_file: AtomicBool::new(false),
                frozen: AtomicBool::new(false),
                device: device.clone(),
            }),
        }
    }

    /// For inference: the branches' weights stop being variables of a graph. A forward pass
    /// through a model with trainable weights records every op for the backward pass, which
    /// keeps each activation alive until the output is dropped (400 MB for the demo model's
    /// batch of 8 photos, against 90 MB frozen). A frozen set cannot be trained.
    pub fn freeze(&self) {
        self.shared.frozen.store(true, Ordering::Relaxed);
    }

    pub fn is_frozen(&self) -> bool {
        self.shared.frozen.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> &LoraConfig {
        &self.shared.config
    }

    /// Wraps a base layer: adds a branch when the module is targeted (or, for an adapter read
    /// from files, when the file has weights for it).
    pub fn wrap(&self, module: &str, base: impl Into<Base>) -> candle_core::Result<Linear> {
        let base = base.into();
        let (out_dim, in_dim) = base.dims()?;
        let cfg = &self.shared.config;
        let loaded = self.shared.pending.lock().expect("lock").remove(module);
        let (a, b) = match loaded {
            Some((a, b)) => {
                let (ra, ia) = a.dims2()?;
                let (ob, rb) = b.dims2()?;
                if ia != in_dim || ob != out_dim || ra != rb {
                    candle_core::bail!(
                        "adapter weights for {module} are A {:?} and B {:?}, but the model's layer is [{out_dim}, {in_dim}] (the adapter was trained for another base model)",
                        a.dims(),
                        b.dims()
                    );
                }
                (Var::from_tensor(&a)?, Var::from_tensor(&b)?)
            }
            None if self.shared.pending_origin() || !cfg.targets(module) => {
                return Ok(Linear::plain(base));
            }
            None => {
                let mut rng = module_rng(cfg.seed, module);
                let dev = &self.shared.device;
                let a = uniform(&mut rng, cfg.r, in_dim, 1.0 / (in_dim as f64).sqrt(), dev)?;
                let b = match cfg.init {
                    Init::Peft => Tensor::zeros((out_dim, cfg.r), DType::F32, dev)?,
                    Init::Random => {
                        uniform(&mut rng, out_dim, cfg.r, 1.0 / (cfg.r as f64).sqrt(), dev)?
                    }
                };
                (Var::from_tensor(&a)?, Var::from_tensor(&b)?)
            }
        };
        self.shared.pairs.lock().expect("lock").push(LoraPair {
            module: module.to_string(),
            a: a.clone(),
            b: b.clone(),
        });
        Ok(Linear {
            base,
            branch: Some(Branch {
                a,
                b,
                scaling: cfg.scaling(),
                lora: self.clone(),
            }),
        })
    }

    /// The adapted layers, in construction order.
    pub fn pairs(&self) -> Vec<LoraPair> {
        self.shared.pairs.lock().expect("lock").clone()
    }

    /// Every trainable variable (A and B of each pair).
    pub fn vars(&self) -> Vec<Var> {
        self.pairs().into_iter().flat_map(|p| [p.a, p.b]).collect()
    }

    pub fn trainable_params(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Dropout is applied only while training.
    pub fn set_training(&self, training: bool) {
        self.shared.training.store(training, Ordering::Relaxed);
    }

    /// The dropout stream's position (to checkpoint) and restoring it.
    pub fn rng_position(&self) -> u128 {
        self.shared.rng.lock().expect("lock").get_word_pos()
    }

    pub fn set_rng_position(&self, pos: u128) {
        self.shared.rng.lock().expect("lock").set_word_pos(pos);
    }

    fn dropout(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let p = self.shared.config.dropout;
        if p <= 0.0 || !self.shared.training.load(Ordering::Relaxed) {
            return Ok(x.clone());
        }
        let n = x.elem_count();
        let keep = 1.0 / (1.0 - p);
        // One 32-bit word per element, drawn in bulk; each decides as `rng.random::<f32>() < p`
        // would (its top 24 bits, scaled to [0, 1)), so the stream and the masks are those of
        // drawing one float per element.
        let mut words = vec![0u32; n];
        self.shared.rng.lock().expect("lock").fill(&mut words[..]);
        let mask: Vec<f32> = words
            .iter()
            .map(|&w| if unit_f32(w) < p { 0.0 } else { keep })
            .collect();
        x * Tensor::from_vec(mask, x.shape(), x.device())?
    }

    /// The weights read from an adapter file and not yet claimed by a layer, by module path
    /// (all of them before a model is built with this set).
    pub fn pending(&self) -> BTreeMap<String, (Tensor, Tensor)> {
        self.shared.pending.lock().expect("lock").clone()
    }

    /// Adapter weights not claimed by any layer after the model was built: keys of an adapter
    /// for modules this model does not have.
    pub fn unclaimed(&self) -> Vec<String> {
        self.shared
            .pending
            .lock()
            .expect("lock")
            .keys()
            .cloned()
            .collect()
    }

    /// The adapter's tensors under PEFT's keys (`base_model.model.<module>.lora_A.weight`).
    pub fn peft_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for p in self.pairs() {
            out.insert(
                format!("base_model.model.{}.lora_A.weight", p.module),
                p.a.as_tensor().clone(),
            );
            out.insert(
                format!("base_model.model.{}.lora_B.weight", p.module),
                p.b.as_tensor().clone(),
            );
        }
        out
    }

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` as PEFT does, each
    /// atomically. `base_model` is recorded as `base_model_name_or_path`.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<(), Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: dir.to_path_buf(),
            error: e,
        })?;
        let cfg = &self.shared.config;
        let pairs = self.pairs();
        let mut targets: Vec<&str> = pairs
            .iter()
            .map(|p| p.module.rsplit('.').next().unwrap_or(&p.module))
            .map(|last| {
                cfg.target_modules
                    .iter()
                    .find(|t| t.as_str() == last || t.ends_with(&format!(".{last}")))
                    .map_or(last, |t| t.as_str())
            })
            .collect();
        targets.sort();
        targets.dedup();
        let config = json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": base_model,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": cfg.init == Init::Peft,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": cfg.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": cfg.use_rslora,
        });
        let mut bytes = serde_json::to_vec_pretty(&config).expect("JSON serialises");
        bytes.push(b'\n');
        write_atomic(&dir.join(ADAPTER_CONFIG), |path| {
            std::fs::write(path, &bytes).map_err(candle_core::Error::wrap)
        })?;
        let tensors = self.peft_tensors();
        write_atomic(&dir.join(ADAPTER_WEIGHTS), |path| {
            candle_core::safetensors::save(&tensors, path)
        })?;
        Ok(())
    }

    /// Reads a PEFT adapter directory. `normalize` maps each module path found in the file to
    /// the path the model will ask for (e.g. an older key layout to the current one); `None`
    /// drops nothing silently — it refuses the key. The returned set gives the file's weights
    /// to [`Lora::wrap`]; after building the model, check [`Lora::unclaimed`].
    pub fn from_peft(
        dir: &Path,
        device: &Device,
        normalize: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Lora, Error> {
        let config_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::Io {
            path: config_path.clone(),
            error: e,
        })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| adapter_err(&config_path, format!("not valid JSON: {e}")))?;
        let config = peft_config(&v).map_err(|m| adapter_err(&config_path, m))?;
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        if !weights_path.exists() {
            let bin = dir.join("adapter_model.bin");
            let hint = if bin.exists() {
                " (only adapter_model.bin is there: PyTorch pickles are not read; re-save it with safe_serialization=True)"
            } else {
                ""
            };
            return Err(adapter_err(&weights_path, format!("missing{hint}")));
        }
        let tensors = candle_core::safetensors::load(&weights_path, device)
            .map_err(|e| adapter_err(&weights_path, e.to_string()))?;
        let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (key, t) in tensors {
            let key = key.replace(".default.", ".");
            let (module, which) = if let Some(m) = key.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = key.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else {
                return Err(adapter_err(
                    &weights_path,
                    format!("unexpected key `{key}`: only lora_A / lora_B weights are supported"),
                ));
            };
            let module = module.strip_prefix("base_model.model.").unwrap_or(module);
            let module = normalize(module).ok_or_else(|| {
                adapter_err(
                    &weights_path,
                    format!("key `{key}` names no module of this model"),
                )
            })?;
            let t = t.to_dtype(DType::F32)?;
            let entry = halves.entry(module).or_default();
            if which == 0 {
                entry.0 = Some(t);
            } else {
                entry.1 = Some(t);
            }
        }
        let mut pending = BTreeMap::new();
        for (module, pair) in halves {
            match pair {
                (Some(a), Some(b)) => {
                    if a.dim(0)? != config.r || b.dim(1)? != config.r {
                        return Err(adapter_err(
                            &weights_path,
                            format!(
                                "{module}: rank {} but adapter_config.json says r = {}",
                                a.dim(0)?,
                                config.r
                            ),
                        ));
                    }
                    pending.insert(module, (a, b));
                }
                _ => {
                    return Err(adapter_err(
                        &weights_path,
                        format!("{module}: lora_A and lora_B must both be present"),
                    ));
                }
            }
        }
        if pending.is_empty() {
            return Err(adapter_err(&weights_path, "no LoRA weights"));
        }
        let lora = Lora::new(config, device);
        *lora.shared.pending.lock().expect("lock") = pending;
        lora.shared.from_file.store(true, Ordering::Relaxed);
        Ok(lora)
    }

    /// A new set for training by `config` that starts from an adapter read from files
    /// ([`Lora::from_peft`]): the adapter's modules keep their weights, and every other module
    /// that `config` targets starts fresh. This continues a run in a later stage, e.g. a vision
    /// adapter pretrained on boxes before the language model's adapter is trained with it.
    ///
    /// The adapter must have been trained with the same rank, alpha and scaling rule, or its
    /// branches would be scaled differently from how they were trained. `dir` names the
    /// adapter in errors. After building the model, check [`Lora::unclaimed`].
    pub fn starting_from(
        config: LoraConfig,
        from: &Lora,
        dir: &Path,
        device: &Device,
    ) -> Result<Lora, Error> {
        let theirs = from.config();
        if theirs.r != config.r
            || theirs.alpha != config.alpha
            || theirs.use_rslora != config.use_rslora
        {
            return Err(adapter_err(
                &dir.join(ADAPTER_CONFIG),
                format!(
                    "r {} alpha {} (rslora {}), but this run uses r {} alpha {} (rslora {}); continue with the same values",
                    theirs.r,
                    theirs.alpha,
                    theirs.use_rslora,
                    config.r,
                    config.alpha,
                    config.use_rslora
                ),
            ));
        }
        // The adapter's layers keep their branches, so its target patterns are this set's too
        // (PEFT's config must name them for the saved adapter to load elsewhere).
        let mut config = config;
        for t in &theirs.target_modules {
            if !config.target_modules.contains(t) {
                config.target_modules.push(t.clone());
            }
        }
        let lora = Lora::new(config, device);
        *lora.shared.pending.lock().expect("lock") = from.pending();
        Ok(lora)
    }
}

impl Shared {
    /// True for a set read from an adapter file: only modules with weights get a branch.
    fn pending_origin(&self) -> bool {
        self.from_file.load(Ordering::Relaxed)
    }
}

/// Reads the parts of PEFT's `adapter_config.json` that change the computation, refusing what
/// this implementation cannot honour.
fn peft_config(v: &Value) -> Result<LoraConfig, String> {
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    match get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => return Err(format!("peft_type `{other}` is not LoRA")),
        None => return Err("missing `peft_type`".into()),
    }
    let r = get("r")
        .and_then(Value::as_u64)
        .filter(|r| *r > 0)
        .ok_or("`r` must be a positive integer")? as usize;
    let alpha = get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or("`lora_alpha` must be a number")?;
    if get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err("DoRA adapters (`use_dora: true`) are not supported".into());
    }
    if let Some(bias) = get("bias").and_then(Value::as_str)
        && bias != "none"
    {
        return Err(format!(
            "`bias: {bias}` (trained biases) is not supported; only \"none\""
        ));
    }
    if get("lora_bias").and_then(Value::as_bool) == Some(true) {
        return Err("`lora_bias: true` is not supported".into());
    }
    if get("trainable_token_indices").is_some() {
        return Err("`trainable_token_indices` (trained token embeddings) is not supported".into());
    }
    if get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err("`fan_in_fan_out: true` (GPT-2 style Conv1D) is not supported".into());
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if get(key)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(format!("a non-empty `{key}` is not supported"));
        }
    }
    if get("modules_to_save")
        .and_then(Value::as_array)
        .is_some_and(|m| !m.is_empty())
    {
        return Err("`modules_to_save` (fully trained extra modules) is not supported".into());
    }
    let target_modules = match get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    };
    Ok(LoraConfig {
        r,
        alpha,
        dropout: get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
        use_rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        target_modules,
        init: Init::Peft,
        seed: 0,
    })
}

/// Writes through `write` into a temporary file beside `path`, then renames it over `path`
/// (a reader never sees half a file; a failure leaves the old one).
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> candle_core::Result<()>,
) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let io = |error| Error::Io {
        path: path.to_path_buf(),
        error,
    };
    // 0666 less the umask, as an ordinary file (tempfile's default is 0600, which would
    // hide adapters from other users and services).
    let tmp = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(io)?;
    let mode = tmp.as_file().metadata().map_err(io)?.permissions();
    write(tmp.path()).map_err(|e| adapter_err(path, e.to_string()))?;
    // The writer may have replaced the file (safetensors writes a temporary file of its own
    // and renames it, owner-only): give it back the ordinary mode.
    std::fs::set_permissions(tmp.path(), mode).map_err(io)?;
    std::fs::File::open(tmp.path())
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// `W + scaling · B·A` in the weight's dtype (merging an adapter into its base).
pub fn merge_weight(
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
) -> candle_core::Result<Tensor> {
    let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scaling)?;
    (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())
}

/// The float in [0, 1) that `rng.random::<f32>()` makes of the 32-bit word it draws (its top
/// 24 bits, scaled).
fn unit_f32(word: u32) -> f32 {
    ((word >> 8) as f32) * (1.0 / 16_777_216.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dropout draws its words in bulk; that must be the very stream, and the very floats, of
    /// one `random::<f32>()` per element (masks of runs before the change, exact resume).
    #[test]
    fn bulk_words_are_the_per_element_floats() {
        let mut one = ChaCha8Rng::seed_from_u64(5);
        let mut bulk = one.clone();
        one.random::<u32>(); // start mid-block
        bulk.random::<u32>();
        let floats: Vec<f32> = (0..1001).map(|_| one.random::<f32>()).collect();
        let mut words = vec![0u32; 1001];
        bulk.fill(&mut words[..]);
        let from_words: Vec<f32> = words.iter().map(|&w| unit_f32(w)).collect();
        assert_eq!(floats, from_words);
        assert_eq!(one.get_word_pos(), bulk.get_word_pos());
    }
}
