//! Stage 0 for models trained from scratch: pretraining the vision tower on the photos' boxes.
//!
//! Real vision-language models start from a pretrained vision encoder. A model made by
//! `inspector model init` has none, and a language loss alone teaches its vision tower slowly:
//! the language model first learns the answers' distribution and ignores the image. This stage
//! gives the tower a direct, dense task instead. Each image token (one 2×2 block of patches, the
//! unit the merger hands to the language model) is asked, for every hazard class, whether a box
//! of that class covers it. A linear head on the merger's output reads the answer; the head is
//! thrown away afterwards, and only the tower's and merger's weights change, so the result is
//! the same Qwen2-VL model directory with a trained tower.
//!
//! With a LoRA configuration ([`VisionPretrainer::with_lora`]) the tower itself stays frozen and
//! an adapter on its layers learns instead: the way to teach a trained model a new hazard's
//! look without changing its base weights. `inspector train --init-adapter` then trains the
//! language model's adapter on top of it.
//!
//! The loss is binary cross-entropy on the logits, positives weighted
//! ([`VisionPretrainConfig::pos_weight`]), written with differentiable ops only
//! (`max(x, 0) − x·y + log(1 + e^−|x|)`).
//!
//! With [`VisionPretrainConfig::box_weight`] above zero, a second linear head also asks every
//! covered token where its box's edges lie, as distances from the token's cell in cells
//! ([`token_box_targets`], as FCOS does), under a smooth L1 loss: the tower learns to carry a
//! box's extent in each of its tokens, which the language model later has to write out.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use inspector_core::BBox;
use inspector_lora::{Lora, LoraConfig};
use inspector_qwen2vl::{Error, Qwen2Vl, VisionInput, image::ProcessedImage};
use rand::{Rng, SeedableRng};

use crate::optim::{AdamW, AdamWConfig, clip_grad_norm, cosine_lr};

/// Settings of a pretraining run.
#[derive(Debug, Clone)]
pub struct VisionPretrainConfig {
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_ratio: f64,
    pub max_grad_norm: f64,
    /// The weight of a positive target in the loss. A hazard covers a few of a photo's tokens,
    /// so unweighted, "nothing anywhere" is right for 98 % of the targets and learnt first.
    pub pos_weight: f64,
    /// Optimizer steps (one batch each).
    pub steps: u64,
    pub seed: u64,
    /// The weight of the box-edge loss ([`token_box_targets`]); 0 leaves the box head out.
    pub box_weight: f64,
}

impl Default for VisionPretrainConfig {
    fn default() -> Self {
        VisionPretrainConfig {
            lr: 2e-3,
            weight_decay: 0.01,
            warmup_ratio: 0.05,
            max_grad_norm: 1.0,
            pos_weight: 8.0,
            steps: 1000,
            seed: 0,
            box_weight: 0.0,
        }
    }
}

/// The targets of one image: `[tokens · classes]` row-major, 1 where a box of the class covers
/// the token's cell. A cell is covered when the box overlaps at least a quarter of it, or holds
/// the box's centre (so the smallest box still marks one cell).
///
/// `size` is the photo's (width, height) that `boxes` refer to; `grid_thw` and `merge` give the
/// token grid of the processed image, which spans the whole photo.
pub fn token_targets(
    size: (u32, u32),
    grid_thw: [usize; 3],
    merge: usize,
    boxes: &[(usize, BBox)],
    n_classes: usize,
) -> Vec<f32> {
    let [t, gh, gw] = grid_thw;
    let (rows, cols) = (gh / merge, gw / merge);
    let (cw, ch) = (size.0 as f64 / cols as f64, size.1 as f64 / rows as f64);
    let mut out = vec![0f32; t * rows * cols * n_classes];
    for &(class, b) in boxes {
        let centre = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
        for r in 0..rows {
            for c in 0..cols {
                let cell = [
                    c as f64 * cw,
                    r as f64 * ch,
                    (c + 1) as f64 * cw,
                    (r + 1) as f64 * ch,
                ];
                let iw = (b[2].min(cell[2]) - b[0].max(cell[0])).max(0.0);
                let ih = (b[3].min(cell[3]) - b[1].max(cell[1])).max(0.0);
                let holds_centre = (cell[0]..cell[2]).contains(&centre.0)
                    && (cell[1]..cell[3]).contains(&centre.1);
                if iw * ih >= 0.25 * cw * ch || holds_centre {
                    for f in 0..t {
                        out[((f * rows + r) * cols + c) * n_classes + class] = 1.0;
                    }
                }
            }
        }
    }
    out
}

/// Where the box covering each (token, class) lies, for the box head: `offsets` is
/// `[tokens · classes · 4]`, the distances from the token's cell centre to the box's left, top,
/// right and bottom edges in cells (negative where an edge lies past the centre); `mask` is
/// `[tokens · classes]`, 1 where a box of the class covers the token by [`token_targets`]'s rule
/// (the smallest such box when several do), else 0 with offsets 0.
#[derive(Debug, Clone, PartialEq)]
pub struct BoxTargets {
    pub offsets: Vec<f32>,
    pub mask: Vec<f32>,
}

/// The [`BoxTargets`] of one image; the arguments are [`token_targets`]'s.
pub fn token_box_targets(
    size: (u32, u32),
    grid_thw: [usize; 3],
    merge: usize,
    boxes: &[(usize, BBox)],
    n_classes: usize,
) -> BoxTargets {
    let [t, gh, gw] = grid_thw;
    let (rows, cols) = (gh / merge, gw / merge);
    let (cw, ch) = (size.0 as f64 / cols as f64, size.1 as f64 / rows as f64);
    let cells = t * rows * cols * n_classes;
    let mut offsets = vec![0f32; cells * 4];
    let mut mask = vec![0f32; cells];
    // The area of the box each (token, class) holds so far.
    let mut held = vec![f64::INFINITY; cells];
    for &(class, b) in boxes {
        let area = (b[2] - b[0]) * (b[3] - b[1]);
        let single = [(class, b)];
        let covered = token_targets(size, grid_thw, merge, &single, n_classes);
        for (k, _) in covered.iter().enumerate().filter(|(_, v)| **v > 0.5) {
            if area >= held[k] {
                continue;
            }
            held[k] = area;
            mask[k] = 1.0;
            let cell = (k / n_classes) % (rows * cols);
            let (r, c) = (cell / cols, cell % cols);
            let (cx, cy) = ((c as f64 + 0.5) * cw, (r as f64 + 0.5) * ch);
            offsets[4 * k..4 * k + 4].copy_from_slice(&[
                ((cx - b[0]) / cw) as f32,
                ((cy - b[1]) / ch) as f32,
                ((b[2] - cx) / cw) as f32,
                ((b[3] - cy) / ch) as f32,
            ]);
        }
    }
    BoxTargets { offsets, mask }
}

/// One image and its targets ([`token_targets`]; with a box head, [`token_box_targets`] too).
pub struct PretrainSample<'a> {
    pub image: &'a ProcessedImage,
    pub targets: &'a [f32],
    pub boxes: Option<&'a BoxTargets>,
}

/// How a batch's token × class answers compare with the targets (logit ≥ 0 means "covered").
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Token × class targets answered right, of all.
    pub right: u64,
    pub total: u64,
    /// Per class: targets that are 1 and answered 1, answered 1 where 0, and 1 but answered 0.
    pub true_pos: Vec<u64>,
    pub false_pos: Vec<u64>,
    pub false_neg: Vec<u64>,
    /// With a box head: the summed absolute error of the predicted edges of covered tokens, in
    /// cells, and how many edges that is.
    pub box_abs_error: f64,
    pub box_edges: u64,
}

impl Tally {
    /// The share of token × class targets answered right.
    pub fn accuracy(&self) -> f64 {
        self.right as f64 / self.total.max(1) as f64
    }

    /// Adds another batch's counts.
    pub fn add(&mut self, other: &Tally) {
        if self.true_pos.is_empty() {
            *self = other.clone();
            return;
        }
        self.right += other.right;
        self.total += other.total;
        self.box_abs_error += other.box_abs_error;
        self.box_edges += other.box_edges;
        for (a, b) in [
            (&mut self.true_pos, &other.true_pos),
            (&mut self.false_pos, &other.false_pos),
            (&mut self.false_neg, &other.false_neg),
        ] {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
    }

    /// Per class: (precision, recall) of the covered tokens; `None` where undefined.
    /// The mean absolute error of covered tokens' box edges, in cells (with a box head).
    pub fn box_error(&self) -> Option<f64> {
        (self.box_edges > 0).then(|| self.box_abs_error / self.box_edges as f64)
    }

    pub fn precision_recall(&self) -> Vec<(Option<f64>, Option<f64>)> {
        (0..self.true_pos.len())
            .map(|c| {
                let tp = self.true_pos[c] as f64;
                let ratio = |d: u64| (d > 0).then(|| tp / d as f64);
                (
                    ratio(self.true_pos[c] + self.false_pos[c]),
                    ratio(self.true_pos[c] + self.false_neg[c]),
                )
            })
            .collect()
    }
}

/// The vision tower, its trainable weights and the throw-away head.
pub struct VisionPretrainer {
    pub model: Qwen2Vl,
    /// The tower's and merger's weights, by checkpoint name (empty with an adapter).
    pub weights: Vec<(String, Var)>,
    /// The adapter on the tower's layers, when the tower itself is frozen.
    pub lora: Option<Lora>,
    model_dir: std::path::PathBuf,
    /// `[hidden, classes]` and `[classes]`.
    pub head: (Var, Var),
    /// The box head ([`VisionPretrainConfig::box_weight`]): 4 edges per class.
    pub box_head: Option<(Var, Var)>,
    opt: AdamW,
    pub config: VisionPretrainConfig,
    pub step: u64,
    n_classes: usize,
}

/// Whether a checkpoint name is part of the vision tower (either key layout).
fn is_vision(name: &str) -> bool {
    name.starts_with("visual.") || name.contains(".visual.")
}

impl VisionPretrainer {
    /// Loads `model_dir` (f32, CPU) with its vision weights trainable, and a new head for
    /// `n_classes` classes.
    pub fn new(
        model_dir: &Path,
        n_classes: usize,
        config: VisionPretrainConfig,
    ) -> Result<VisionPretrainer, Error> {
        Self::on_device(model_dir, n_classes, config, None, &Device::Cpu)
    }

    /// Loads `model_dir` (f32, CPU) frozen, with a new LoRA adapter on the vision tower's and
    /// merger's layers ([`inspector_lora::VISION_TARGETS`]; `lora.target_modules` is replaced)
    /// and a new head for `n_classes` classes.
    pub fn with_lora(
        model_dir: &Path,
        n_classes: usize,
        config: VisionPretrainConfig,
        lora: LoraConfig,
    ) -> Result<VisionPretrainer, Error> {
        Self::on_device(model_dir, n_classes, config, Some(lora), &Device::Cpu)
    }

    /// [`VisionPretrainer::new`] (`lora: None`) or [`VisionPretrainer::with_lora`] on `device`.
    pub fn on_device(
        model_dir: &Path,
        n_classes: usize,
        config: VisionPretrainConfig,
        lora: Option<LoraConfig>,
        device: &Device,
    ) -> Result<VisionPretrainer, Error> {
        if n_classes == 0 {
            return Err(Error::Input("no hazard class to pretrain on".into()));
        }
        inspector_qwen2vl::adapter::refuse_quantized(model_dir, "train")?;
        let device = device.clone();
        let (model, weights, lora) = match lora {
            None => {
                let (model, _, weights) = Qwen2Vl::load_trainable(model_dir, DType::F32, &device)?;
                let weights: Vec<(String, Var)> =
                    weights.into_iter().filter(|(n, _)| is_vision(n)).collect();
                (model, weights, None)
            }
            Some(cfg) => {
                let lora = Lora::new(
                    LoraConfig {
                        target_modules: inspector_lora::VISION_TARGETS
                            .iter()
                            .map(|s| s.to_string())
                            .collect(),
                        ..cfg
                    },
                    &device,
                );
                let (model, _) = Qwen2Vl::load_with(model_dir, DType::F32, &device, Some(&lora))?;
                (model, vec![], Some(lora))
            }
        };
        let trained: Vec<(Var, bool)> = match &lora {
            None => weights
                .iter()
                .map(|(n, v)| (v.clone(), crate::trainer::decays(n)))
                .collect(),
            Some(l) => l.vars().into_iter().map(|v| (v, true)).collect(),
        };
        if trained.is_empty() {
            return Err(Error::Input(format!(
                "{}: no vision weights found",
                model_dir.display()
            )));
        }
        let hidden = model.config.text.hidden_size;
        let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
        let bound = 1.0 / (hidden as f32).sqrt();
        let w: Vec<f32> = (0..hidden * n_classes)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let head = (
            Var::from_tensor(&Tensor::from_vec(w, (hidden, n_classes), &device)?)?,
            Var::from_tensor(&Tensor::zeros(n_classes, DType::F32, &device)?)?,
        );
        // Drawn after the class head, so that a run without it starts as before.
        let box_head = if config.box_weight > 0.0 {
            let w: Vec<f32> = (0..hidden * 4 * n_classes)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            Some((
                Var::from_tensor(&Tensor::from_vec(w, (hidden, 4 * n_classes), &device)?)?,
                Var::from_tensor(&Tensor::zeros(4 * n_classes, DType::F32, &device)?)?,
            ))
        } else {
            None
        };
        let (mut vars, mut decay): (Vec<Var>, Vec<bool>) = trained.into_iter().unzip();
        vars.extend([head.0.clone(), head.1.clone()]);
        decay.extend([true, false]);
        if let Some((w, b)) = &box_head {
            vars.extend([w.clone(), b.clone()]);
            decay.extend([true, false]);
        }
        let opt = AdamW::grouped(
            vars,
            decay,
            AdamWConfig {
                lr: config.lr,
                weight_decay: config.weight_decay,
                ..Default::default()
            },
        )?;
        Ok(VisionPretrainer {
            model,
            weights,
            lora,
            model_dir: model_dir.to_path_buf(),
            head,
            box_head,
            opt,
            config,
            step: 0,
            n_classes,
        })
    }

    /// The mean (positives weighted) binary cross-entropy of a batch, and how the answers
    /// compare with the targets.
    pub fn loss(&self, batch: &[PretrainSample]) -> Result<(Tensor, Tally), Error> {
        if batch.is_empty() {
            return Err(Error::Input("an empty batch".into()));
        }
        let pixel_values = Tensor::cat(
            &batch
                .iter()
                .map(|s| &s.image.pixel_values)
                .collect::<Vec<_>>(),
            0,
        )?;
        let input = VisionInput {
            pixel_values,
            grid_thw: batch.iter().map(|s| s.image.grid_thw).collect(),
        };
        let embeds = self.model.image_embeds(&input)?;
        let n = embeds.dim(0)?;
        let targets: Vec<f32> = batch
            .iter()
            .flat_map(|s| s.targets.iter().copied())
            .collect();
        if targets.len() != n * self.n_classes {
            return Err(Error::Input(format!(
                "{} targets for {n} image tokens of {} classes",
                targets.len(),
                self.n_classes
            )));
        }
        let y = Tensor::from_vec(targets, (n, self.n_classes), embeds.device())?;
        let x = embeds
            .matmul(self.head.0.as_tensor())?
            .broadcast_add(self.head.1.as_tensor())?;
        // max(x, 0) − x·y + log(1 + e^−|x|), every op differentiable.
        let bce = (x.relu()? - (&x * &y)? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        let weight = ((&y * (self.config.pos_weight - 1.0))? + 1.0)?;
        let mut loss = (bce * weight)?.mean_all()?;
        let mut box_abs_error = 0.0;
        let mut box_edges = 0u64;
        if let Some((w, b)) = &self.box_head {
            let mut offsets = Vec::with_capacity(n * 4 * self.n_classes);
            let mut mask = Vec::with_capacity(n * 4 * self.n_classes);
            for s in batch {
                let t = s.boxes.ok_or_else(|| {
                    Error::Input("the box head needs every sample's box targets".into())
                })?;
                offsets.extend_from_slice(&t.offsets);
                mask.extend(t.mask.iter().flat_map(|&m| [m; 4]));
            }
            if offsets.len() != n * 4 * self.n_classes || mask.len() != offsets.len() {
                return Err(Error::Input(format!(
                    "{} box targets for {n} image tokens of {} classes",
                    offsets.len() / 4,
                    self.n_classes
                )));
            }
            let covered: f32 = mask.iter().sum();
            let shape = (n, 4 * self.n_classes);
            let target = Tensor::from_vec(offsets, shape, embeds.device())?;
            let mask = Tensor::from_vec(mask, shape, embeds.device())?;
            let predicted = embeds.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
            // Smooth L1 (β = 1), differentiable: 0.5·min(|d|, 1)² + (|d| − min(|d|, 1)).
            let a = (predicted - target)?.abs()?;
            let q = a.clamp(0.0, 1.0)?;
            let smooth = ((q.sqr()? * 0.5)? + (&a - &q)?)?;
            let box_loss = ((smooth * &mask)?.sum_all()? / f64::from(covered.max(1.0)))?;
            loss = (loss + (box_loss * self.config.box_weight)?)?;
            box_abs_error = (a * &mask)?.sum_all()?.to_scalar::<f32>()? as f64;
            box_edges = covered as u64;
        }
        let said: Vec<Vec<f32>> = x.ge(0.0)?.to_dtype(DType::F32)?.to_vec2()?;
        let truth: Vec<Vec<f32>> = y.to_vec2()?;
        let mut tally = Tally {
            right: 0,
            total: (n * self.n_classes) as u64,
            true_pos: vec![0; self.n_classes],
            false_pos: vec![0; self.n_classes],
            false_neg: vec![0; self.n_classes],
            box_abs_error,
            box_edges,
        };
        for (s_row, t_row) in said.iter().zip(&truth) {
            for (c, (&s, &t)) in s_row.iter().zip(t_row).enumerate() {
                match (s > 0.5, t > 0.5) {
                    (true, true) => tally.true_pos[c] += 1,
                    (true, false) => tally.false_pos[c] += 1,
                    (false, true) => tally.false_neg[c] += 1,
                    (false, false) => {}
                }
                tally.right += u64::from((s > 0.5) == (t > 0.5));
            }
        }
        Ok((loss, tally))
    }

    /// One optimizer step on a batch; returns (loss, tally, gradient norm).
    pub fn train_step(&mut self, batch: &[PretrainSample]) -> Result<(f64, Tally, f64), Error> {
        if let Some(l) = &self.lora {
            l.set_training(true);
        }
        let result = self.loss(batch);
        if let Some(l) = &self.lora {
            l.set_training(false);
        }
        let (loss, right) = result?;
        let mut grads = loss.backward()?;
        let vars = self.opt.vars().to_vec();
        let norm = clip_grad_norm(&vars, &mut grads, self.config.max_grad_norm)?;
        let total = self.config.steps.max(1);
        let warmup = (total as f64 * self.config.warmup_ratio).ceil() as u64;
        let lr = cosine_lr(self.config.lr, self.step, warmup, total);
        self.opt.step(&grads, lr)?;
        self.step += 1;
        Ok((loss.to_scalar::<f32>()? as f64, right, norm))
    }

    /// Writes the result into `out`: without an adapter, the complete model directory from
    /// `base`'s files with the trained vision weights; with one, the adapter (PEFT's files and
    /// `inspector_adapter.json`) for the loaded model. Each file is written atomically; the
    /// head is not written.
    pub fn save(&self, base: &Path, out: &Path) -> Result<(), Error> {
        match &self.lora {
            None => crate::trainer::write_weights(base, out, &self.weights, &self.model.processor),
            Some(lora) => crate::trainer::write_adapter(
                lora,
                out,
                &self.model_dir,
                &crate::trainer::provenance(
                    &crate::data::model_prompt(&self.model_dir)?,
                    &self.model.processor,
                    &self.model_dir,
                ),
            ),
        }
    }
}
