//! `inspector eval`

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context;
use clap::Args;
use inspector_core::{
    Rule,
    citation::{Resolution, resolve},
    reply::ReplyStatus,
};
use inspector_detect::{DetectConfig, Finding, ImageInfo, RawAnswer, Timings};
use inspector_eval::{Gold, GoldViolation, PredictedViolation, Prediction, Report, evaluate};
use inspector_store::RuleFilter;

use crate::{
    detect_cmd::{inspect_paths, load_detector},
    model_args::ModelArgs,
    output::write_atomic,
    rules_cmd::{DbArgs, open_with_rules},
    train_cmd::load_data,
};

/// Compare predictions with gold annotations: binary, per-rule, per-category and per-risk
/// precision / recall / F1, citation accuracy, boxes (P/R at IoU 0.5, COCO AP50). Other tools
/// call this interface.
///
/// Predictions come from a file (`{"image", "answer": raw text}` or `{"image", "finding"}` per
/// line, as `inspector detect --jsonl` writes) or from running a model on the gold photos. A
/// prediction matches a gold record by image path (each resolved against its own file's
/// folder), else by the image's content hash.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The gold annotation file.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Predictions to score (JSONL).
    #[arg(long, value_name = "FILE", conflicts_with = "model")]
    pub predictions: Option<PathBuf>,
    /// Run a model on the gold photos instead (without --model and without --predictions, the
    /// bundled demo model).
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 4, value_name = "B")]
    pub batch_size: usize,
    #[command(flatten)]
    pub db: DbArgs,
    /// Print one JSON object with every metric.
    #[arg(long)]
    pub json: bool,
    /// Also write report.json, a per-image CSV and charts (PNG) into DIR.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

fn category_of(citation: &str, rules: &[Rule]) -> Option<String> {
    match resolve(citation, rules) {
        Resolution::Found(r) => r.categories.first().cloned(),
        _ => None,
    }
}

/// The predictions file's records, matched to gold record indices.
fn read_predictions(
    path: &Path,
    gold: &inspector_dataset::Dataset,
    rules: &[Rule],
) -> anyhow::Result<Vec<(usize, Finding)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let by_path: HashMap<PathBuf, usize> = gold
        .records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.path.canonicalize().ok().map(|p| (p, i)))
        .collect();
    let hex = |h: &[u8; 32]| h.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let by_hash: HashMap<String, usize> = gold
        .records
        .iter()
        .enumerate()
        .map(|(i, r)| (hex(&r.sha256), i))
        .collect();
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let mut unmatched = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = format!("{}:{}", path.display(), n + 1);
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("{at}: not JSON: {e}"));
                continue;
            }
        };
        let Some(image) = v["image"].as_str() else {
            problems.push(format!("{at}: no \"image\""));
            continue;
        };
        let file = base.join(image);
        let index = file
            .canonicalize()
            .ok()
            .and_then(|p| by_path.get(&p).copied())
            .or_else(|| {
                let bytes = std::fs::read(&file).ok()?;
                by_hash.get(&inspector_detect::sha256_hex(&bytes)).copied()
            });
        let Some(index) = index else {
            unmatched.push(at);
            continue;
        };
        let record = &gold.records[index];
        let finding = if let Some(f) = v.get("finding").filter(|f| !f.is_null()) {
            match serde_json::from_value::<Finding>(f.clone()) {
                Ok(f) => f,
                Err(e) => {
                    problems.push(format!("{at}: finding: {e}"));
                    continue;
                }
            }
        } else if let Some(raw) = v["answer"].as_str() {
            let answer = RawAnswer {
                raw: raw.to_string(),
                token_probs: vec![],
                token_margins: vec![],
                token_ends: vec![],
            };
            let info = ImageInfo {
                width: record.size.0,
                height: record.size.1,
                sha256: hex(&record.sha256),
            };
            inspector_detect::finding(&answer, info, rules, Timings::default(), "", None)
        } else if v.get("error").is_some() {
            // The photo could not be inspected: it counts as missing.
            continue;
        } else {
            problems.push(format!("{at}: needs \"answer\" (raw text) or \"finding\""));
            continue;
        };
        out.push((index, finding));
    }
    if !unmatched.is_empty() {
        eprintln!(
            "note: {} prediction(s) are for photos outside the gold set and are ignored, e.g. {}",
            unmatched.len(),
            unmatched[0]
        );
    }
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("{p}");
        }
        anyhow::bail!(
            "{} bad prediction line(s); nothing was scored",
            problems.len()
        );
    }
    Ok(out)
}

fn prediction(image: &str, f: &Finding, rules: &[Rule]) -> Prediction {
    Prediction {
        image: image.to_string(),
        status: f.status,
        violations: f
            .violations
            .iter()
            .map(|v| {
                let rule = v
                    .resolved
                    .as_ref()
                    .map(|r| r.citation.clone())
                    .or(v.rule.clone())
                    .unwrap_or_default();
                PredictedViolation {
                    category: v
                        .resolved
                        .as_ref()
                        .and_then(|r| r.categories.first().cloned())
                        .or_else(|| category_of(&rule, rules)),
                    rule,
                    risk: v.risk,
                    bbox: v.bbox,
                    score: v.score,
                }
            })
            .collect(),
    }
}

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let store = open_with_rules(&args.db.db)?;
    let rules = store.rules(&RuleFilter::default())?;
    let (gold, photos) = load_data(&args.data, &rules, "nothing was scored")?;
    anyhow::ensure!(
        matches!(photos, inspector_train::data::Photos::Files),
        "--data {}: eval reads its photos from files; write the scenes with `inspector synth` first",
        args.data.display()
    );
    let findings: Vec<(usize, Finding)> = match &args.predictions {
        Some(_) if args.model.model.is_some() || args.model.adapter.is_some() => {
            anyhow::bail!("--predictions scores a file: it takes no --model or --adapter")
        }
        Some(p) => read_predictions(p, &gold, &rules)?,
        None => {
            let detector = load_detector(&args.model, DetectConfig::default(), &rules)?;
            let paths: Vec<PathBuf> = gold.records.iter().map(|r| r.path.clone()).collect();
            let done = inspect_paths(
                &detector,
                &paths,
                &rules,
                Some(store.as_ref()),
                args.batch_size,
            );
            let mut out = Vec::new();
            for (i, d) in done.into_iter().enumerate() {
                match d.result {
                    Ok(f) => out.push((i, f)),
                    Err(e) => anyhow::bail!("{}: {e}", d.path.display()),
                }
            }
            out
        }
    };
    let mut by_record: HashMap<usize, Finding> = HashMap::new();
    for (i, f) in findings {
        by_record.insert(i, f);
    }
    let missing: Vec<&str> = gold
        .records
        .iter()
        .enumerate()
        .filter(|(i, _)| !by_record.contains_key(i))
        .map(|(_, r)| r.annotation.image.as_str())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "warning: {} gold photo(s) have no prediction and are left out of every metric, e.g. {}",
            missing.len(),
            missing[0]
        );
    }
    let pairs: Vec<(Gold, Prediction)> = gold
        .records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let f = by_record.get(&i)?;
            let g = Gold {
                image: r.annotation.image.clone(),
                violations: r
                    .annotation
                    .violations
                    .iter()
                    .map(|v| GoldViolation {
                        category: category_of(&v.rule, &rules),
                        rule: v.rule.clone(),
                        risk: v.risk,
                        bbox: v.bbox,
                    })
                    .collect(),
            };
            Some((g, prediction(&r.annotation.image, f, &rules)))
        })
        .collect();
    let report = evaluate(&pairs);
    let mut json = serde_json::to_value(&report)?;
    json["missing"] = missing.len().into();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print_summary(&report, missing.len());
    }
    if let Some(dir) = &args.out {
        write_out(dir, &report, &json, &pairs)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_summary(r: &Report, missing: usize) {
    let b = &r.binary;
    println!(
        "照片 {}（无预测 {missing}，无法解析 {}）",
        r.images, r.unparsed
    );
    println!(
        "违规/安全二分类：准确率 {:.3}  精确率 {:.3}  召回率 {:.3}  F1 {:.3}",
        b.accuracy, b.precision, b.recall, b.f1
    );
    println!("条款引用准确率：{:.3}", r.citation_accuracy);
    let bx = &r.r#box;
    println!(
        "位置框（IoU ≥ 0.5）：精确率 {:.3}  召回率 {:.3}{}",
        bx.precision,
        bx.recall,
        bx.ap50
            .map(|a| format!("  AP50 {a:.3}"))
            .unwrap_or_default()
    );
    println!("按条款：");
    for (rule, p) in &r.per_rule {
        let boxes = bx
            .per_rule
            .get(rule)
            .map(|b| format!("  框 P {:.3} R {:.3}", b.precision, b.recall))
            .unwrap_or_default();
        println!(
            "  {rule}  P {:.3}  R {:.3}  F1 {:.3}  (gold {}, predicted {}){boxes}",
            p.precision, p.recall, p.f1, p.support, p.predicted
        );
    }
}

/// report.json, per-image CSV, and the precision–recall chart of scored violations.
fn write_out(
    dir: &Path,
    report: &Report,
    json: &serde_json::Value,
    pairs: &[(Gold, Prediction)],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    write_atomic(
        &dir.join("report.json"),
        serde_json::to_string_pretty(json)?.as_bytes(),
    )?;
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "image",
        "gold",
        "predicted",
        "gold_rules",
        "predicted_rules",
        "correct",
    ])?;
    let mut scored: Vec<(f64, bool)> = Vec::new();
    for (g, p) in pairs {
        let gold_rules: Vec<&str> = g.violations.iter().map(|v| v.rule.as_str()).collect();
        let pred_rules: Vec<&str> = p.violations.iter().map(|v| v.rule.as_str()).collect();
        let truth = if g.violations.is_empty() {
            "safe"
        } else {
            "violation"
        };
        let guess = match p.status {
            ReplyStatus::Safe => "safe",
            ReplyStatus::Violation => "violation",
            ReplyStatus::Unparsed => "unparsed",
        };
        let mut gs = gold_rules.clone();
        let mut ps = pred_rules.clone();
        gs.sort();
        gs.dedup();
        ps.sort();
        ps.dedup();
        w.write_record([
            g.image.as_str(),
            truth,
            guess,
            &gold_rules.join("; "),
            &pred_rules.join("; "),
            &(truth == guess && gs == ps).to_string(),
        ])?;
        for v in &p.violations {
            if let Some(s) = v.score {
                scored.push((s, gold_rules.contains(&v.rule.as_str())));
            }
        }
    }
    write_atomic(
        &dir.join("images.csv"),
        &w.into_inner().map_err(|e| e.into_error())?,
    )?;
    // Precision–recall over scored violations (a violation is right when its image's gold has
    // the same rule), highest score first.
    let gold_total: u64 = report.per_rule.values().map(|p| p.support).sum();
    if !scored.is_empty() && gold_total > 0 {
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let (mut tp, mut n) = (0f64, 0f64);
        let mut pr = Vec::new();
        for (_, right) in &scored {
            n += 1.0;
            tp += *right as u8 as f64;
            pr.push((tp / gold_total as f64, tp / n));
        }
        let chart = inspector_charts::Chart {
            title: "Precision–recall of scored violations".into(),
            x_label: "recall".into(),
            y_label: "precision".into(),
            log_y: false,
            series: vec![inspector_charts::Series::new("violations", pr).with_markers()],
        };
        chart
            .save_png(&dir.join("precision_recall.png"))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}
