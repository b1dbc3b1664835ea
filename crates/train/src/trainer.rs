//! The training loop: shuffled epochs, gradient accumulation, clipping, AdamW on a cosine
//! schedule, periodic evaluation, atomic checkpoints that resume exactly.
//!
//! Output folder:
//!
//! ```text
//! DIR/checkpoints/step-N/   adapter (PEFT files), optimizer.safetensors, trainer_state.json
//! DIR/best/                 the adapter with the lowest eval loss so far
//! DIR/adapter/              the final adapter
//! DIR/metrics.jsonl         one line per log / eval event
//! DIR/loss.png              the loss curves, drawn at the end
//! ```
//!
//! With `full = true` every weight of the model is trained (f32) instead of an adapter, and
//! each of those folders holds a complete Hugging Face model directory in `model/`
//! (`checkpoints/step-N/model`, `best/model`, `DIR/model`) with the training image settings in
//! its processor config.
//!
//! A checkpoint is written into a temporary folder and renamed into place, so a failure while
//! saving leaves the previous checkpoint as it was. Data order, dropout and initialisation come
//! from seeded ChaCha8 streams whose positions are saved, so `--resume` continues the very run
//! that stopped.

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use candle_core::{DType, Device, Tensor, Var, backprop::GradStore};
use inspector_lora::{Lora, LoraConfig};
use inspector_qwen2vl::{Error, Qwen2Vl};
use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{
    data::{Example, collate},
    loss::{causal_lm_loss, causal_lm_loss_checkpointed},
    optim::{AdamW, AdamWConfig, clip_grad_norm, cosine_lr},
};

/// Hyper-parameters; the defaults are the widely used recipe for this task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Train for exactly this many optimizer steps, going over the data as often as needed; it
    /// overrides `epochs`, as transformers' `max_steps` does (the schedule is sized for it).
    pub max_steps: Option<u64>,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub grad_accum: usize,
    pub batch_size: usize,
    pub max_grad_norm: f64,
    pub eval_every: u64,
    pub save_every: u64,
    pub keep_checkpoints: usize,
    pub log_every: u64,
    pub max_len: usize,
    pub seed: u64,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    pub use_rslora: bool,
    /// Also adapt the vision tower and merger.
    pub lora_vision: bool,
    /// Train every weight (f32) instead of a LoRA adapter.
    pub full: bool,
    /// The base weights' dtype. LoRA weights and optimizer state are f32 either way.
    pub dtype: Precision,
    /// Start the adapter from this PEFT adapter (same rank and alpha): its modules keep their
    /// weights, other targeted modules start fresh. E.g. the vision adapter that
    /// `inspector pretrain-vision --lora-r` trained on the boxes.
    pub init_adapter: Option<PathBuf>,
    /// Keep only each decoder layer's input through the forward pass and recompute the layer
    /// during the backward pass: activation memory of one layer instead of all of them (7B,
    /// long sequences), for about one more forward pass of compute. The gradients are the
    /// same.
    pub gradient_checkpointing: bool,
}

/// Base weight precision for training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!("unknown dtype `{other}` (f32 or bf16)")),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 5,
            max_steps: None,
            lr: 5e-5,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            grad_accum: 8,
            batch_size: 1,
            max_grad_norm: 1.0,
            eval_every: 50,
            save_every: 100,
            keep_checkpoints: 3,
            log_every: 10,
            max_len: 2048,
            seed: 42,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.1,
            use_rslora: false,
            lora_vision: false,
            full: false,
            dtype: Precision::F32,
            init_adapter: None,
            gradient_checkpointing: false,
        }
    }
}

impl TrainConfig {
    pub fn lora_config(&self) -> LoraConfig {
        let mut targets: Vec<String> = inspector_lora::DEFAULT_TARGETS
            .iter()
            .map(|s| s.to_string())
            .collect();
        if self.lora_vision {
            targets.extend(inspector_lora::VISION_TARGETS.iter().map(|s| s.to_string()));
        }
        LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            use_rslora: self.use_rslora,
            target_modules: targets,
            init: inspector_lora::Init::Peft,
            seed: self.seed,
        }
    }
}

/// Where a run is: saved in every checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    pub epoch: usize,
    /// Micro-batches of the current epoch already consumed.
    pub position: usize,
    pub best_eval: Option<f64>,
    /// The dropout stream's word position (u128 as a string: JSON numbers are f64).
    pub dropout_rng: String,
    pub total_steps: u64,
}

/// What the loop reports, for progress bars and logs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Step {
        step: u64,
        total: u64,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        /// Tokens processed in this step (every position of every sample, padding excluded).
        tokens: usize,
        tokens_per_s: f64,
    },
    Eval {
        step: u64,
        loss: f64,
        best: bool,
    },
    Saved {
        step: u64,
        path: PathBuf,
    },
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Finished,
    /// Stopped on request (Ctrl-C) after saving a checkpoint.
    Interrupted,
}

/// A model with its LoRA set (or, with `full`, all its weights), an optimizer and the data.
pub struct Trainer {
    pub model: Qwen2Vl,
    /// The adapter being trained; with `full`, an empty set.
    pub lora: Lora,
    /// With `full`: every weight of the model, by checkpoint name.
    pub weights: Vec<(String, Var)>,
    pub opt: AdamW,
    pub config: TrainConfig,
    pub state: TrainerState,
    train: Vec<Example>,
    eval: Vec<Example>,
    out: PathBuf,
    model_dir: PathBuf,
    /// The instruction the examples were built with ([`crate::data::model_prompt`]).
    prompt: inspector_core::answer::Prompt,
    pad: u32,
    /// Set to make the loop fail while writing the next checkpoint (tests).
    pub fail_next_save: bool,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

impl Trainer {
    /// A new run on `model_dir` on the CPU, writing into `out`.
    pub fn new(
        model_dir: &Path,
        train: Vec<Example>,
        eval: Vec<Example>,
        config: TrainConfig,
        out: &Path,
    ) -> Result<Trainer, Error> {
        Self::on_device(model_dir, train, eval, config, out, &Device::Cpu)
    }

    /// A new run on `device`: the base weights in `config.dtype`, the LoRA weights, the
    /// gradients and the optimizer state in f32, all on the device; checkpoints are written
    /// from host copies and read back onto the device.
    pub fn on_device(
        model_dir: &Path,
        train: Vec<Example>,
        eval: Vec<Example>,
        config: TrainConfig,
        out: &Path,
        device: &Device,
    ) -> Result<Trainer, Error> {
        if train.is_empty() {
            return Err(Error::Input("no training examples".into()));
        }
        // Quantized weights have no backward pass: the gradients of every layer below them
        // would be lost without a word.
        inspector_qwen2vl::adapter::refuse_quantized(model_dir, "train")?;
        let device = device.clone();
        let adamw = AdamWConfig {
            lr: config.lr,
            weight_decay: config.weight_decay,
            ..Default::default()
        };
        let (model, lora, weights, opt) = if config.full {
            if config.init_adapter.is_some() {
                return Err(Error::Input(
                    "full fine-tuning (`full`, --full) trains the weights themselves: an initial adapter (`init_adapter`, --init-adapter) does not apply"
                        .into(),
                ));
            }
            if config.dtype != Precision::F32 {
                return Err(Error::Input(
                    "full fine-tuning trains f32 weights: leave dtype at f32".into(),
                ));
            }
            let lora = Lora::new(
                LoraConfig {
                    target_modules: vec![],
                    ..config.lora_config()
                },
                &device,
            );
            let (model, _, weights) = Qwen2Vl::load_trainable(model_dir, DType::F32, &device)?;
            let vars = weights.iter().map(|(_, v)| v.clone()).collect();
            let decay = weights.iter().map(|(n, _)| decays(n)).collect();
            let opt = AdamW::grouped(vars, decay, adamw)?;
            (model, lora, weights, opt)
        } else {
            let dtype = config.dtype.dtype();
            let (model, lora) = match &config.init_adapter {
                Some(dir) => {
                    let file = inspector_qwen2vl::adapter::read(dir, &device)?;
                    let lora = Lora::starting_from(config.lora_config(), &file, dir, &device)?;
                    let (model, _) = inspector_qwen2vl::adapter::load_onto(
                        model_dir, dir, &lora, dtype, &device,
                    )?;
                    (model, lora)
                }
                None => {
                    let lora = Lora::new(config.lora_config(), &device);
                    let (model, _) = Qwen2Vl::load_with(model_dir, dtype, &device, Some(&lora))?;
                    (model, lora)
                }
            };
            let opt = AdamW::new(lora.vars(), adamw)?;
            (model, lora, vec![], opt)
        };
        let micro = train.len().div_ceil(config.batch_size.max(1));
        let per_epoch = micro.div_ceil(config.grad_accum.max(1)) as u64;
        let total_steps = total_steps(&config, per_epoch);
        let pad = model.config.tokens.pad.unwrap_or(0);
        let prompt = crate::data::model_prompt(model_dir)?;
        std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
        Ok(Trainer {
            model,
            lora,
            weights,
            opt,
            state: TrainerState {
                total_steps,
                ..Default::default()
            },
            config,
            train,
            eval,
            out: out.to_path_buf(),
            model_dir: model_dir.to_path_buf(),
            prompt,
            pad,
            fail_next_save: false,
        })
    }

    /// Restores the latest checkpoint under `out/checkpoints` (adapter, optimizer, position,
    /// dropout stream). Returns its step.
    pub fn resume(&mut self) -> Result<u64, Error> {
        let dir = latest_checkpoint(&self.out)?.ok_or_else(|| {
            Error::Input(format!(
                "{}: no checkpoint to resume from",
                self.out.join("checkpoints").display()
            ))
        })?;
        if self.config.full {
            self.restore_weights(&dir.join("model"))?;
        } else {
            let weights = candle_core::safetensors::load(
                dir.join(inspector_lora::ADAPTER_WEIGHTS),
                self.model.device(),
            )?;
            let pairs = self.lora.pairs();
            if weights.len() != 2 * pairs.len() {
                let ours: std::collections::HashSet<String> = pairs
                    .iter()
                    .flat_map(|p| {
                        ["A", "B"].map(|w| format!("base_model.model.{}.lora_{w}.weight", p.module))
                    })
                    .collect();
                let extra = weights.keys().find(|k| !ours.contains(*k));
                return Err(Error::Checkpoint {
                    path: dir.join(inspector_lora::ADAPTER_WEIGHTS),
                    message: format!(
                        "holds {} LoRA tensors but this run adapts {} layers{}; resume with the settings the run started with (--lora-vision, --init-adapter)",
                        weights.len(),
                        pairs.len(),
                        extra.map_or(String::new(), |k| format!(" (e.g. {k} is not one of them)"))
                    ),
                });
            }
            for pair in pairs {
                for (which, var) in [("A", &pair.a), ("B", &pair.b)] {
                    let key = format!("base_model.model.{}.lora_{which}.weight", pair.module);
                    let t = weights.get(&key).ok_or_else(|| Error::Checkpoint {
                        path: dir.clone(),
                        message: format!("missing {key}"),
                    })?;
                    var.set(t)?;
                }
            }
        }
        let opt =
            candle_core::safetensors::load(dir.join("optimizer.safetensors"), self.model.device())?;
        self.opt.load_state(&opt)?;
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| io(&state_path, e))?;
        self.state = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: state_path.clone(),
            message: e.to_string(),
        })?;
        self.lora
            .set_rng_position(self.state.dropout_rng.parse().unwrap_or(0));
        Ok(self.state.step)
    }

    /// Sets every trained weight from the model directory `dir` (a checkpoint's `model/`).
    fn restore_weights(&self, dir: &Path) -> Result<(), Error> {
        let mut found: HashMap<String, Tensor> = HashMap::new();
        for file in inspector_qwen2vl::weights::safetensors_files(dir)? {
            found.extend(candle_core::safetensors::load(&file, self.model.device())?);
        }
        for (name, var) in &self.weights {
            let t = found.get(name).ok_or_else(|| Error::Checkpoint {
                path: dir.to_path_buf(),
                message: format!("missing {name}"),
            })?;
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// The variables being trained.
    pub fn trainable(&self) -> Vec<Var> {
        self.opt.vars().to_vec()
    }

    /// The number of trained parameters.
    pub fn trainable_params(&self) -> usize {
        self.opt.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// The micro-batch order of an epoch: a permutation of the examples from the seed and
    /// the epoch number, cut into batches.
    fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.config.seed.wrapping_add(epoch as u64 * 0x9e37));
        order.shuffle(&mut rng);
        order
            .chunks(self.config.batch_size.max(1))
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// Runs until the schedule ends or `stop` is set.
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<Ending, Error> {
        let total = self.state.total_steps;
        let warmup = (total as f64 * self.config.warmup_ratio).ceil() as u64;
        let vars = self.trainable();
        let mut window_loss = Vec::new();
        let mut order: Option<(usize, Vec<Vec<usize>>)> = None;
        while self.state.step < total {
            if order.as_ref().is_none_or(|(e, _)| *e != self.state.epoch) {
                order = Some((self.state.epoch, self.epoch_batches(self.state.epoch)));
            }
            let batches = &order.as_ref().expect("just set").1;
            if self.state.position >= batches.len() {
                self.state.epoch += 1;
                self.state.position = 0;
                continue;
            }
            let end = (self.state.position + self.config.grad_accum.max(1)).min(batches.len());
            let window = &batches[self.state.position..end];
            let started = Instant::now();
            let n_tokens: usize = window
                .iter()
                .flatten()
                .map(|&i| self.train[i].answer_tokens())
                .sum();
            let seen: usize = window
                .iter()
                .flatten()
                .map(|&i| self.train[i].input_ids.len())
                .sum();
            self.lora.set_training(true);
            let mut grads: Option<GradStore> = None;
            let mut loss_sum = 0f64;
            for micro in window {
                let examples: Vec<&Example> = micro.iter().map(|&i| &self.train[i]).collect();
                let (batch, labels) = collate(&examples, self.pad)?;
                let g = if self.config.gradient_checkpointing {
                    // Token-weighted as below; the scale goes into the recomputed pass.
                    let n: usize = examples.iter().map(|e| e.answer_tokens()).sum();
                    let lora = (!self.config.full).then_some(&self.lora);
                    let (value, _, g) = causal_lm_loss_checkpointed(
                        &self.model,
                        &batch,
                        &labels,
                        n as f64 / n_tokens as f64,
                        lora,
                    )?;
                    loss_sum += value.to_scalar::<f32>()? as f64;
                    g
                } else {
                    let (loss, n) = causal_lm_loss(&self.model, &batch, &labels)?;
                    // Token-weighted: the window's loss is the mean over all its answer tokens.
                    let weighted = (loss * (n as f64 / n_tokens as f64))?;
                    loss_sum += weighted.to_scalar::<f32>()? as f64;
                    weighted.backward()?
                };
                grads = Some(match grads {
                    None => g,
                    Some(mut acc) => {
                        for var in &vars {
                            if let Some(new) = g.get(var) {
                                let sum = match acc.remove(var) {
                                    Some(old) => (old + new)?,
                                    None => new.clone(),
                                };
                                acc.insert(var, sum);
                            }
                        }
                        acc
                    }
                });
            }
            self.lora.set_training(false);
            let mut grads = grads.expect("a window has at least one micro-batch");
            let grad_norm = clip_grad_norm(&vars, &mut grads, self.config.max_grad_norm)?;
            let lr = cosine_lr(self.config.lr, self.state.step, warmup, total);
            self.opt.step(&grads, lr)?;
            self.state.step += 1;
            self.state.position = end;
            window_loss.push(loss_sum);
            let step = self.state.step;
            let event = Event::Step {
                step,
                total,
                loss: loss_sum,
                lr,
                grad_norm,
                tokens: seen,
                tokens_per_s: seen as f64 / started.elapsed().as_secs_f64().max(1e-9),
            };
            on_event(&event);
            if step.is_multiple_of(self.config.log_every.max(1)) || step == total {
                let mean = window_loss.iter().sum::<f64>() / window_loss.len() as f64;
                window_loss.clear();
                self.metric(serde_json::json!({
                    "step": step, "epoch": self.state.epoch, "loss": mean, "lr": lr,
                    "grad_norm": grad_norm,
                }))?;
            }
            if !self.eval.is_empty()
                && (step.is_multiple_of(self.config.eval_every.max(1)) || step == total)
            {
                let loss = self.eval_loss()?;
                let best = self.state.best_eval.is_none_or(|b| loss < b);
                if best {
                    self.state.best_eval = Some(loss);
                    self.save_result(&self.out.join("best"))?;
                }
                self.metric(serde_json::json!({"step": step, "eval_loss": loss, "best": best}))?;
                on_event(&Event::Eval { step, loss, best });
            }
            let interrupted = stop.load(Ordering::Relaxed);
            if step.is_multiple_of(self.config.save_every.max(1)) || interrupted {
                let path = self.save_checkpoint()?;
                on_event(&Event::Saved { step, path });
            }
            if interrupted {
                return Ok(Ending::Interrupted);
            }
        }
        if self.config.full {
            self.write_dir(&self.out.join("model"), |tmp| self.write_model(tmp))?;
        } else {
            self.save_result(&self.out.join("adapter"))?;
        }
        self.draw_loss_curve()?;
        Ok(Ending::Finished)
    }

    /// The token-weighted mean loss over the eval examples (no dropout, no gradients kept).
    pub fn eval_loss(&self) -> Result<f64, Error> {
        self.lora.set_training(false);
        let (mut sum, mut n) = (0f64, 0usize);
        for chunk in self.eval.chunks(self.config.batch_size.max(1)) {
            let examples: Vec<&Example> = chunk.iter().collect();
            let (batch, labels) = collate(&examples, self.pad)?;
            let (loss, k) = causal_lm_loss(&self.model, &batch, &labels)?;
            sum += loss.to_scalar::<f32>()? as f64 * k as f64;
            n += k;
        }
        Ok(sum / n.max(1) as f64)
    }

    fn metric(&self, value: serde_json::Value) -> Result<(), Error> {
        let path = self.out.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        writeln!(f, "{value}").map_err(|e| io(&path, e))
    }

    /// Writes what is trained into `dir`: the adapter, or with `full` the model directory
    /// `dir/model`. Built in a temporary folder beside `dir`, then swapped in.
    fn save_result(&self, dir: &Path) -> Result<(), Error> {
        self.write_dir(dir, |tmp| self.write_trained(tmp))
    }

    fn write_trained(&self, dir: &Path) -> Result<(), Error> {
        if self.config.full {
            self.write_model(&dir.join("model"))
        } else {
            self.write_adapter(dir)
        }
    }

    /// What a result was trained for: the prompt version and image settings.
    fn provenance(&self) -> serde_json::Value {
        let mut v = provenance(&self.prompt, &self.model.processor, &self.model_dir);
        if let Some(dir) = &self.config.init_adapter {
            v["init_adapter"] = dir.display().to_string().into();
        }
        v
    }

    fn write_adapter(&self, dir: &Path) -> Result<(), Error> {
        write_adapter(&self.lora, dir, &self.model_dir, &self.provenance())
    }

    /// A complete model directory: the base's files with every trained weight replaced (in
    /// the base's dtype), the training image settings written into the processor config.
    fn write_model(&self, dir: &Path) -> Result<(), Error> {
        write_weights(&self.model_dir, dir, &self.weights, &self.model.processor)?;
        let path = dir.join("inspector_model.json");
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&self.provenance()).expect("JSON"),
        )
        .map_err(|e| io(&path, e))
    }

    /// Draws `DIR/loss.png` from `metrics.jsonl`: the training loss (logged means) and the
    /// eval loss, by step. A step logged twice (a run resumed from an earlier checkpoint)
    /// keeps its newest value. `None` when no finite loss was logged.
    pub fn draw_loss_curve(&self) -> Result<Option<PathBuf>, Error> {
        let metrics = self.out.join("metrics.jsonl");
        let text = std::fs::read_to_string(&metrics).map_err(|e| io(&metrics, e))?;
        let (mut train, mut eval) = (
            std::collections::BTreeMap::new(),
            std::collections::BTreeMap::new(),
        );
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let Some(step) = v.get("step").and_then(|s| s.as_u64()) else {
                continue;
            };
            if let Some(x) = v.get("loss").and_then(|x| x.as_f64()) {
                train.insert(step, x);
            }
            if let Some(x) = v.get("eval_loss").and_then(|x| x.as_f64()) {
                eval.insert(step, x);
            }
        }
        let points = |m: std::collections::BTreeMap<u64, f64>| {
            m.into_iter().map(|(s, x)| (s as f64, x)).collect()
        };
        let mut series = vec![inspector_charts::Series::new("train", points(train))];
        if !eval.is_empty() {
            series.push(inspector_charts::Series::new("eval", points(eval)).with_markers());
        }
        let chart = inspector_charts::Chart {
            title: if self.config.full {
                "Full fine-tuning loss".into()
            } else {
                "LoRA fine-tuning loss".into()
            },
            x_label: "optimizer step".into(),
            y_label: "loss".into(),
            log_y: true,
            series,
        };
        let path = self.out.join("loss.png");
        match chart.save_png(&path) {
            Ok(()) => Ok(Some(path)),
            Err(inspector_charts::Error::Empty) => Ok(None),
            Err(inspector_charts::Error::Io(path, source)) => Err(Error::Io { path, source }),
            Err(e) => Err(Error::Checkpoint {
                path,
                message: e.to_string(),
            }),
        }
    }

    /// Builds a folder in a temporary sibling and renames it over `dir` (the old one, if any,
    /// is removed only after the new one is in place).
    fn write_dir(
        &self,
        dir: &Path,
        fill: impl FnOnce(&Path) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        // 0777 less the umask, as an ordinary folder (tempfile's default is 0700).
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .tempdir_in(parent)
            .map_err(|e| io(parent, e))?;
        fill(tmp.path())?;
        let tmp = tmp.keep();
        let old = parent.join(format!(
            ".old-{}",
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(|e| io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| io(dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Saves `checkpoints/step-N` and prunes the oldest beyond `keep_checkpoints`.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf, Error> {
        let dir = self
            .out
            .join("checkpoints")
            .join(format!("step-{}", self.state.step));
        self.state.dropout_rng = self.lora.rng_position().to_string();
        let fail = std::mem::take(&mut self.fail_next_save);
        self.write_dir(&dir, |tmp| {
            self.write_trained(tmp)?;
            let state: HashMap<String, Tensor> = self.opt.state()?;
            candle_core::safetensors::save(&state, tmp.join("optimizer.safetensors"))?;
            if fail {
                return Err(Error::Input("simulated failure while saving".into()));
            }
            let path = tmp.join("trainer_state.json");
            std::fs::write(&path, serde_json::to_vec_pretty(&self.state).expect("JSON"))
                .map_err(|e| io(&path, e))
        })?;
        let mut all = checkpoints(&self.out)?;
        while all.len() > self.config.keep_checkpoints.max(1) {
            let (_, oldest) = all.remove(0);
            let _ = std::fs::remove_dir_all(oldest);
        }
        Ok(dir)
    }
}

/// The run's optimizer steps: `max_steps` when set (overriding `epochs`), else `epochs` passes
/// of `per_epoch` steps; at least one.
fn total_steps(config: &TrainConfig, per_epoch: u64) -> u64 {
    config
        .max_steps
        .unwrap_or(per_epoch * config.epochs as u64)
        .max(1)
}

/// `(step, path)` of every complete checkpoint, oldest first.
pub fn checkpoints(out: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let dir = out.join("checkpoints");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io(&dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
            && entry.path().join("trainer_state.json").exists()
        {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>, Error> {
    Ok(checkpoints(out)?.pop().map(|(_, p)| p))
}

/// What a result was trained for: the prompt version and image settings.
pub(crate) fn provenance(
    prompt: &inspector_core::answer::Prompt,
    processor: &inspector_qwen2vl::image::ProcessorConfig,
    model_dir: &Path,
) -> serde_json::Value {
    serde_json::json!({
        "prompt_version": prompt.version(),
        "min_pixels": processor.min_pixels,
        "max_pixels": processor.max_pixels,
        "base_model": model_dir.display().to_string(),
    })
}

/// Writes an adapter directory: PEFT's two files and `inspector_adapter.json` (`provenance`:
/// the prompt and image settings it was trained for), for the base model `model_dir`.
pub(crate) fn write_adapter(
    lora: &Lora,
    dir: &Path,
    model_dir: &Path,
    provenance: &serde_json::Value,
) -> Result<(), Error> {
    lora.save_peft(dir, &model_dir.display().to_string())?;
    let path = dir.join("inspector_adapter.json");
    let bytes = serde_json::to_vec_pretty(provenance).expect("JSON");
    inspector_lora::write_atomic(&path, |p| {
        std::fs::write(p, &bytes).map_err(candle_core::Error::wrap)
    })?;
    Ok(())
}

/// Writes the model directory `out` from `base`: its files, with `weights` (by checkpoint name)
/// replacing the base's tensors in the base's dtype, and `processor`'s pixel limits in the
/// processor config. Full fine-tuning and vision pretraining both save through this.
pub(crate) fn write_weights(
    base: &Path,
    out: &Path,
    weights: &[(String, Var)],
    processor: &inspector_qwen2vl::image::ProcessorConfig,
) -> Result<(), Error> {
    let trained: HashMap<&str, &Var> = weights.iter().map(|(n, v)| (n.as_str(), v)).collect();
    inspector_qwen2vl::weights::rewrite(base, out, |name, t| {
        Ok(match trained.get(name) {
            Some(v) => v.as_tensor().to_dtype(t.dtype())?,
            None => t,
        })
    })?;
    processor.write_pixels(out)
}

/// Whether weight decay applies to a weight in full fine-tuning: not to biases and norm
/// weights (Hugging Face's Trainer leaves them out too).
pub(crate) fn decays(name: &str) -> bool {
    let module = name.rsplit('.').nth(1).unwrap_or("");
    !(name.ends_with(".bias") || module.contains("norm") || module == "ln_q")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_steps_overrides_epochs_as_in_transformers() {
        let config = |max_steps, epochs| TrainConfig {
            max_steps,
            epochs,
            ..Default::default()
        };
        // 2 steps an epoch: 5 epochs are 10 steps, unless max_steps says otherwise.
        assert_eq!(total_steps(&config(None, 5), 2), 10);
        assert_eq!(total_steps(&config(Some(60), 5), 2), 60);
        assert_eq!(total_steps(&config(Some(3), 5), 2), 3);
        assert_eq!(total_steps(&config(None, 0), 2), 1);
    }
}
