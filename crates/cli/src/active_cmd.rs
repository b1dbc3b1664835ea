//! `inspector active`

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use inspector_detect::{DetectConfig, Input, active};
use inspector_store::RuleFilter;

use crate::{
    detect_cmd::{expand, load_detector},
    model_args::ModelArgs,
    output::{folder_of, write_atomic},
    rules_cmd::{DbArgs, open_with_rules},
};

/// Rank unlabelled photos by how unsure the model is, so that the next annotation hour goes
/// to the photos it would learn most from.
///
/// Two signals: the model's margin (top-1 minus top-2 probability) on the decisive tokens of
/// its greedy answer (the status, each rule and risk), and, with `--samples K`, the
/// disagreement among K answers sampled at `--temperature`. `--export` writes the chosen
/// photos with the model's answer as a draft annotation (marked `"draft": true`) to correct.
#[derive(Debug, Args)]
pub struct ActiveArgs {
    /// Unlabelled photos: a folder (or files / glob patterns).
    #[arg(long, required = true, num_args = 1.., value_name = "PATH")]
    pub images: Vec<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub db: DbArgs,
    /// How many photos to pick.
    #[arg(long, value_name = "N")]
    pub budget: usize,
    /// Answers to sample per photo for the disagreement signal (0: margins only).
    #[arg(long, default_value_t = 4, value_name = "K")]
    pub samples: usize,
    /// Sampling temperature for the disagreement signal.
    #[arg(long, default_value_t = 0.7, value_name = "T")]
    pub temperature: f64,
    #[arg(long, default_value_t = 4, value_name = "B")]
    pub batch_size: usize,
    /// Write the picked photos as draft annotations (JSONL; image paths relative to FILE).
    #[arg(long, value_name = "FILE")]
    pub export: Option<PathBuf>,
    /// Print the ranking as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ActiveArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.budget > 0, "--budget must be at least 1");
    anyhow::ensure!(args.temperature > 0.0, "--temperature must be positive");
    let paths = expand(&args.images)?;
    let store = open_with_rules(&args.db.db)?;
    let rules = store.rules(&RuleFilter::default())?;
    let detector = load_detector(&args.model, DetectConfig::default(), &rules)?;
    let mut inputs = Vec::new();
    let mut kept = Vec::new();
    let mut failed = 0;
    for p in &paths {
        match std::fs::read(p) {
            Ok(bytes) => {
                inputs.push(Input {
                    name: p.display().to_string(),
                    bytes,
                });
                kept.push(p.clone());
            }
            Err(e) => {
                eprintln!("{}: {e}", p.display());
                failed += 1;
            }
        }
    }
    let bar = ProgressBar::new(inputs.len() as u64).with_style(
        ProgressStyle::with_template("score {bar:30} {pos}/{len} photos  ETA {eta}")
            .expect("valid template"),
    );
    let results = detector.uncertainty(
        &inputs,
        &rules,
        args.samples,
        args.temperature,
        args.batch_size,
        |_| bar.inc(1),
    );
    bar.finish_and_clear();
    let mut scored = Vec::new();
    for (path, r) in kept.iter().zip(results) {
        match r {
            Ok((finding, u)) => scored.push((path, finding, u)),
            Err(e) => {
                eprintln!("{e}");
                failed += 1;
            }
        }
    }
    let uncertainties: Vec<active::Uncertainty> = scored.iter().map(|s| s.2.clone()).collect();
    let order = active::rank(&uncertainties, args.budget);
    if args.json {
        let v: Vec<serde_json::Value> = order
            .iter()
            .map(|&i| {
                let (p, f, u) = &scored[i];
                serde_json::json!({"image": p.display().to_string(), "uncertainty": u, "status": f.status})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("rank  score  margin-uncertainty  disagreement  verdict  image");
        for (n, &i) in order.iter().enumerate() {
            let (p, f, u) = &scored[i];
            println!(
                "{:>4}  {:.3}  {:>18.3}  {:>12}  {:<9} {}",
                n + 1,
                u.score,
                u.token,
                u.disagreement
                    .map(|d| format!("{d:.3}"))
                    .unwrap_or_else(|| "-".into()),
                format!("{:?}", f.status).to_lowercase(),
                p.display()
            );
        }
    }
    if let Some(file) = &args.export {
        let dir = folder_of(file)?;
        let mut text = String::new();
        for &i in &order {
            let (p, f, u) = &scored[i];
            let violations: Vec<serde_json::Value> = f
                .violations
                .iter()
                .map(|v| {
                    serde_json::json!({
                        "description": v.description,
                        "rule": v.resolved.as_ref().map(|r| r.citation.clone()).or(v.rule.clone()),
                        "risk": v.risk,
                        "suggestion": v.suggestion,
                        "box": v.bbox,
                    })
                })
                .collect();
            let line = serde_json::json!({
                "image": inspector_dataset::relative_to(p, dir)?,
                "draft": true,
                "uncertainty": u,
                "violations": violations,
            });
            text.push_str(&line.to_string());
            text.push('\n');
        }
        write_atomic(file, text.as_bytes())?;
        eprintln!(
            "wrote {} draft annotations to {} (correct them, then drop \"draft\")",
            order.len(),
            file.display()
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
