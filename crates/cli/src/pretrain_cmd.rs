//! `inspector pretrain-vision`

use std::{collections::BTreeSet, io::Write, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use inspector_lora::LoraConfig;
use inspector_qwen2vl::image::ProcessorConfig;
use inspector_store::RuleFilter;
use inspector_train::{
    data::{build_in_parallel, processed_batch},
    vision_pretrain::{
        BoxTargets, PretrainSample, Tally, VisionPretrainConfig, VisionPretrainer,
        token_box_targets, token_targets,
    },
};
use rand::{SeedableRng, seq::SliceRandom};

use crate::{
    rules_cmd::{DbArgs, open_with_rules},
    train_cmd::{PIXEL_CACHE_BYTES, check_lora, load_data},
};

/// Pretrain a model's vision tower on annotated photos' boxes (stage 0 of a model trained from
/// scratch, before `train --full`).
///
/// Every image token learns, for each rule cited in the data, whether a box citing it covers
/// the token's cell. Only the vision tower and merger change; the result is a complete model
/// directory `OUT/model`. With `--lora-r` the tower stays frozen and an adapter on its layers
/// learns instead, written to `OUT/adapter`: continue from it with
/// `train --init-adapter OUT/adapter` (same rank and alpha). Every violation needs a box.
#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// The model directory (from `inspector model init`).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The annotation file (JSONL).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Output folder: model/ (adapter/ with --lora-r; must not exist yet), metrics.jsonl,
    /// loss.png, classes.json.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Optimizer steps (one batch each); the data is cycled, reshuffled each pass.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub steps: u64,
    #[arg(long, default_value_t = 16, value_name = "B")]
    pub batch_size: usize,
    /// Peak learning rate (linear warmup over 5 % of the steps, then cosine).
    #[arg(long, default_value_t = 2e-3, value_name = "X")]
    pub lr: f64,
    /// Seeds the head and the data order.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Also learn where each covered token's box edges lie (distances from the token's cell, in
    /// cells; smooth L1), with this weight in the loss; 0 leaves it out.
    #[arg(long, default_value_t = 0.0, value_name = "W")]
    pub box_loss: f64,
    /// Train a LoRA adapter of this rank on the vision tower and merger instead of their
    /// weights.
    #[arg(long, value_name = "R")]
    pub lora_r: Option<usize>,
    /// LoRA alpha (with --lora-r).
    #[arg(long, default_value_t = 32.0, value_name = "A", requires = "lora_r")]
    pub lora_alpha: f64,
    /// LoRA dropout (with --lora-r).
    #[arg(long, default_value_t = 0.05, value_name = "D", requires = "lora_r")]
    pub lora_dropout: f32,
    #[arg(long, default_value_t = inspector_core::DEFAULT_MIN_PIXELS)]
    pub min_pixels: usize,
    #[arg(long, default_value_t = inspector_core::DEFAULT_MAX_PIXELS)]
    pub max_pixels: usize,
    /// Where to train: `cpu`, `cuda`, `cuda:N` or `auto`.
    #[arg(long, value_name = "cpu|cuda|cuda:N|auto", default_value = "auto", value_parser = crate::model_args::parse_device)]
    pub device: inspector_qwen2vl::DeviceRequest,
    #[command(flatten)]
    pub db: DbArgs,
}

pub fn run(args: PretrainArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.steps > 0, "--steps must be at least 1");
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    anyhow::ensure!(args.lr > 0.0, "--lr must be positive");
    anyhow::ensure!(
        args.box_loss >= 0.0 && args.box_loss.is_finite(),
        "--box-loss {}: must be 0 or more",
        args.box_loss
    );
    if let Some(r) = args.lora_r {
        check_lora(r, args.lora_alpha, args.lora_dropout)?;
    }
    let device = crate::model_args::open_device(args.device, candle_core::DType::F32)?;
    let model_out = args.out.join(if args.lora_r.is_some() {
        "adapter"
    } else {
        "model"
    });
    anyhow::ensure!(
        !model_out.exists(),
        "{}: exists; refusing to overwrite it",
        model_out.display()
    );
    let store = open_with_rules(&args.db.db)?;
    let rules = store.rules(&RuleFilter::default())?;
    let (data, photos) = load_data(&args.data, &rules, "nothing was trained")?;
    let classes: Vec<String> = data
        .records
        .iter()
        .flat_map(|r| r.annotation.violations.iter().map(|v| v.rule.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    anyhow::ensure!(
        !classes.is_empty(),
        "{}: no violation to learn from",
        args.data.display()
    );
    let mut boxes = Vec::with_capacity(data.records.len());
    for r in &data.records {
        let mut b = Vec::new();
        for (k, v) in r.annotation.violations.iter().enumerate() {
            let bbox = v.bbox.with_context(|| {
                format!(
                    "{}:{}: violation {} has no box; vision pretraining needs every violation's box",
                    data.file.display(),
                    r.line,
                    k + 1
                )
            })?;
            let class = classes.binary_search(&v.rule).expect("collected above");
            b.push((class, bbox));
        }
        boxes.push(b);
    }

    let processor = ProcessorConfig::from_model_dir(&args.model)?
        .with_pixels(Some(args.min_pixels), Some(args.max_pixels))?;
    let config = VisionPretrainConfig {
        lr: args.lr,
        steps: args.steps,
        seed: args.seed,
        box_weight: args.box_loss,
        ..Default::default()
    };
    let lora = args.lora_r.map(|r| LoraConfig {
        r,
        alpha: args.lora_alpha,
        dropout: args.lora_dropout,
        seed: args.seed,
        ..Default::default()
    });
    let mut trainer =
        VisionPretrainer::on_device(&args.model, classes.len(), config, lora, &device)?;
    trainer.model.processor = processor.clone();
    let merge = processor.merge_size;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create", args.out.display()))?;
    crate::output::write_atomic(
        &args.out.join("classes.json"),
        &serde_json::to_vec_pretty(&classes).expect("JSON"),
    )?;
    let metrics_path = args.out.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path)
        .with_context(|| format!("{}: cannot create", metrics_path.display()))?;
    match &trainer.lora {
        None => eprintln!(
            "pretraining the vision tower: {} weights, {} photos, {} classes",
            trainer.weights.len(),
            data.records.len(),
            classes.len()
        ),
        Some(l) => eprintln!(
            "pretraining a vision adapter: {} layers, {} parameters, {} photos, {} classes",
            l.pairs().len(),
            l.trainable_params(),
            data.records.len(),
            classes.len()
        ),
    }

    // Every photo is read (and checked) before training starts, on every core; those beyond
    // the cache are read again for each batch.
    let reading = ProgressBar::new(data.records.len() as u64).with_style(
        ProgressStyle::with_template("reading {bar:30} {pos}/{len} photos")
            .expect("valid template"),
    );
    let (photos, on_disk) = build_in_parallel(
        &data.records,
        PIXEL_CACHE_BYTES,
        |r| {
            photos
                .image(r, &processor)
                .with_context(|| format!("{}:{}", data.file.display(), r.line))
        },
        |photo| Some(photo),
        |r| r.path.as_path(),
        || reading.inc(1),
    )?;
    reading.finish_and_clear();
    if on_disk > 0 {
        eprintln!(
            "the pixels of {on_disk} of {} photos do not fit the {} MiB cache; they are read again from disk for each batch",
            photos.len(),
            PIXEL_CACHE_BYTES >> 20
        );
    }
    let bar = ProgressBar::new(args.steps).with_style(
        ProgressStyle::with_template("vision {bar:30} {pos}/{len} steps  {msg}  eta {eta}")
            .expect("valid template"),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut order: Vec<usize> = Vec::new();
    let mut curve: Vec<(f64, f64)> = Vec::new();
    let (mut window_loss, mut window_n) = (0.0, 0usize);
    let mut window = Tally::default();
    // The last tenth of the run: what the tower sees at the end, per class.
    let mut end = Tally::default();
    let end_from = args.steps - args.steps.div_ceil(10);
    for step in 0..args.steps {
        let mut picked = Vec::with_capacity(args.batch_size);
        while picked.len() < args.batch_size {
            if order.is_empty() {
                order = (0..data.records.len()).collect();
                order.shuffle(&mut rng);
            }
            picked.push(order.pop().expect("refilled"));
        }
        let images = processed_batch(picked.iter().map(|&i| &photos[i]))?;
        // Each photo's class targets, and with a box head its box targets.
        let (targets, box_targets): (Vec<Vec<f32>>, Vec<Option<BoxTargets>>) = picked
            .iter()
            .zip(&images)
            .map(|(&i, image)| {
                let (size, grid) = (data.records[i].size, image.grid_thw);
                let n = classes.len();
                (
                    token_targets(size, grid, merge, &boxes[i], n),
                    (args.box_loss > 0.0)
                        .then(|| token_box_targets(size, grid, merge, &boxes[i], n)),
                )
            })
            .unzip();
        let batch: Vec<PretrainSample> = images
            .iter()
            .zip(&targets)
            .enumerate()
            .map(|(k, (image, targets))| PretrainSample {
                image,
                targets,
                boxes: box_targets[k].as_ref(),
            })
            .collect();
        let (loss, tally, norm) = trainer.train_step(&batch)?;
        anyhow::ensure!(loss.is_finite(), "the loss is {loss} at step {}", step + 1);
        (window_loss, window_n) = (window_loss + loss, window_n + 1);
        window.add(&tally);
        if step >= end_from {
            end.add(&tally);
        }
        if (step + 1) % 10 == 0 || step + 1 == args.steps {
            let n = window_n as f64;
            let (precision, recall): (Vec<_>, Vec<_>) =
                window.precision_recall().into_iter().unzip();
            writeln!(
                metrics,
                "{}",
                serde_json::json!({
                    "step": step + 1,
                    "loss": window_loss / n,
                    "cell_accuracy": window.accuracy(),
                    "precision": precision,
                    "recall": recall,
                    "grad_norm": norm,
                    "box_error": window.box_error(),
                })
            )
            .with_context(|| metrics_path.display().to_string())?;
            bar.set_message(format!("loss {:.4}", window_loss / n));
            curve.push(((step + 1) as f64, window_loss / n));
            (window_loss, window_n) = (0.0, 0);
            window = Tally::default();
        }
        bar.inc(1);
    }
    bar.finish();
    eprintln!(
        "covered tokens found in the last {} steps (precision / recall):",
        args.steps - end_from
    );
    let pct = |x: Option<f64>| x.map_or("—".to_string(), |x| format!("{:.1} %", 100.0 * x));
    for (rule, (p, r)) in classes.iter().zip(end.precision_recall()) {
        eprintln!("  {rule}: {} / {}", pct(p), pct(r));
    }
    if let Some(e) = end.box_error() {
        eprintln!("box edges of covered tokens: mean absolute error {e:.3} cells");
    }
    let chart = inspector_charts::Chart {
        title: "Vision pretraining loss".into(),
        x_label: "optimizer step".into(),
        y_label: "loss (positives weighted)".into(),
        log_y: true,
        series: vec![inspector_charts::Series::new("train", curve)],
    };
    chart
        .save_png(&args.out.join("loss.png"))
        .with_context(|| args.out.join("loss.png").display().to_string())?;
    // The whole directory appears at once.
    let tmp = args.out.join(if args.lora_r.is_some() {
        ".adapter.tmp"
    } else {
        ".model.tmp"
    });
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("{}: cannot clear", tmp.display()))?;
    }
    trainer.save(&args.model, &tmp)?;
    std::fs::rename(&tmp, &model_out)
        .with_context(|| format!("{}: cannot move into place", model_out.display()))?;
    match args.lora_r {
        None => println!(
            "done: {} steps; model with the pretrained vision tower in {}",
            args.steps,
            model_out.display()
        ),
        Some(_) => println!(
            "done: {} steps; vision adapter in {} (continue with train --init-adapter)",
            args.steps,
            model_out.display()
        ),
    }
    Ok(ExitCode::SUCCESS)
}
