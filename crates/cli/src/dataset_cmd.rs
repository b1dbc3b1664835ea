//! `inspector dataset …`

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use inspector_core::Rule;
use inspector_dataset::{
    AugmentOptions, Dataset, Error, Problem, Report,
    formats::{self, Format},
    jsonl,
};
use inspector_detect::DetectConfig;
use inspector_store::RuleFilter;

use crate::{
    detect_cmd::{inspect_paths, load_detector},
    model_args::ModelArgs,
    output::write_atomic,
    rules_cmd::{DbArgs, open_with_rules},
};

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Check an annotation file (JSONL) and report every problem with its line and field:
    /// invalid JSON, missing fields, missing or unreadable images, citations that do not
    /// resolve in the rules database (with the nearest rule), unknown risks, boxes outside the
    /// image, inverted or empty, empty descriptions; repeated image bytes are warnings.
    /// Exits non-zero when there are errors.
    Validate {
        file: PathBuf,
        /// Print `{"records", "errors": [{"line", "field", "message"}], "warnings": [...]}`.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Write the exact conversations the model is trained on (`{"messages", "images"}` per
    /// line: the canonical instruction and JSON answer, boxes on the 0–1000 scale). Image paths
    /// are relative to the output file.
    Build {
        file: PathBuf,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Split into DIR/train.jsonl and DIR/eval.jsonl: deterministic for a seed, stratified by
    /// category (safe photos are their own stratum), and grouped by image content so the same
    /// photo never lands on both sides.
    Split {
        file: PathBuf,
        /// Share of each stratum that goes to eval.
        #[arg(long, default_value_t = 0.2)]
        eval_ratio: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Write DIR/annotations.jsonl (the originals plus FACTOR augmented copies of each) and
    /// DIR/images/, with DIR/manifest.jsonl recording each file's source and operations:
    /// flip, rotation (±15°), crop, brightness, contrast, blur; boxes follow the pixels. Run it
    /// on the train split only.
    Augment {
        file: PathBuf,
        #[arg(long, default_value_t = 4)]
        factor: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
        /// An eval annotation file: refuse to run if any of its images is in FILE.
        #[arg(long, value_name = "FILE")]
        exclude: Option<PathBuf>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Counts per category, risk and rule, the safe ratio and image sizes, with warnings for
    /// thin categories and for photos that max_pixels will shrink a lot.
    Stats {
        file: PathBuf,
        /// The training max_pixels.
        #[arg(long, default_value_t = inspector_core::DEFAULT_MAX_PIXELS)]
        max_pixels: usize,
        /// Warn about categories with fewer records than this.
        #[arg(long, default_value_t = 10)]
        thin: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Convert another tool's dataset into an annotation file: the tutorial's article format
    /// (numbered Chinese answers), LLaMA-Factory (JSON array or JSONL, messages or
    /// conversations) or ms-swift (JSONL). Image paths are read relative to FILE and written
    /// relative to OUT.
    Import {
        file: PathBuf,
        #[arg(long, value_parser = parse_format)]
        format: Format,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Complete an annotation file that is labelled for some rules only: the findings of the
    /// `--keep` rules come from FILE, every other finding from the model's answer for the
    /// photo (constrained decoding; its texts, risk and box), after the kept ones. Teach a
    /// model a new hazard from photos annotated for that hazard alone by training on the
    /// completed file: the model keeps answering the other rules as it did ("learning without
    /// forgetting"). Findings of other rules in FILE are replaced, and counted. Nothing is
    /// written if a photo fails.
    Complete {
        file: PathBuf,
        /// A rule whose findings FILE holds (repeat for several).
        #[arg(long, required = true, value_name = "CITATION")]
        keep: Vec<String>,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value_t = 8, value_name = "B")]
        batch_size: usize,
        /// Where FILE also holds findings of another rule for the photo, a model finding of that
        /// rule takes FILE's box (of that rule's boxes, the one that overlaps it most; each
        /// used once): the model's decisions with the annotated boxes.
        #[arg(long)]
        gold_boxes: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Export an annotation file for LLaMA-Factory (DIR/safety_inspector.json and the
    /// DIR/dataset_info.json entry) or ms-swift (DIR/safety_inspector.jsonl), with the images
    /// copied into DIR/images/.
    Export {
        file: PathBuf,
        #[arg(long, value_parser = parse_format)]
        format: Format,
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
        #[command(flatten)]
        db: DbArgs,
    },
}

impl DatasetCommand {
    /// The model options of a subcommand that loads a model.
    pub fn model_args(&self) -> Option<&ModelArgs> {
        match self {
            DatasetCommand::Complete { model, .. } => Some(model),
            _ => None,
        }
    }
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse()
}

fn rules(db: &DbArgs) -> anyhow::Result<Vec<Rule>> {
    let store = open_with_rules(&db.db)?;
    Ok(store.rules(&RuleFilter::default())?)
}

fn print_problems(out: &mut dyn Write, file: &Path, kind: &str, problems: &[Problem]) {
    for p in problems {
        let field = if p.field.is_empty() {
            String::new()
        } else {
            format!(" {}:", p.field)
        };
        let _ = writeln!(
            out,
            "{}:{}: {kind}:{field} {}",
            file.display(),
            p.line,
            p.message
        );
    }
}

/// Prints every problem of a refused file to stderr before handing the error on.
fn report_refusal(e: Error) -> anyhow::Error {
    if let Error::Invalid { file, report } = &e {
        print_problems(&mut std::io::stderr(), file, "error", &report.errors);
    }
    e.into()
}

/// Loads and checks an annotation file; a file with any error is refused with every problem
/// listed. Warnings are printed.
fn load(file: &Path, rules: &[Rule]) -> anyhow::Result<Dataset> {
    let dataset = inspector_dataset::load_file(file, rules).map_err(report_refusal)?;
    print_problems(&mut std::io::stderr(), file, "warning", &dataset.warnings);
    Ok(dataset)
}

fn create_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))
}

/// The folder of an output file, created if missing.
fn out_folder(out: &Path) -> anyhow::Result<PathBuf> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    create_dir(&dir)?;
    Ok(dir)
}

/// Annotation records of `records`, with image paths rewritten relative to `dir`.
fn rebased(records: &[inspector_dataset::Record], dir: &Path) -> anyhow::Result<Vec<u8>> {
    let annotations = records
        .iter()
        .map(|r| {
            Ok(inspector_core::Annotation {
                image: inspector_dataset::relative_to(&r.path, dir)?,
                violations: r.annotation.violations.clone(),
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(jsonl(&annotations))
}

/// `dataset complete`: FILE's findings of the `keep` rules, the model's for the others.
fn complete(
    file: &Path,
    keep: &[String],
    out: &Path,
    model: &ModelArgs,
    batch_size: usize,
    gold_boxes: bool,
    db: &DbArgs,
) -> anyhow::Result<ExitCode> {
    let store = open_with_rules(&db.db)?;
    let rules = store.rules(&RuleFilter::default())?;
    let mut kept = std::collections::BTreeSet::new();
    for citation in keep {
        match inspector_core::citation::resolve(citation, &rules) {
            inspector_core::citation::Resolution::Found(rule) => {
                kept.insert(rule.citation.clone());
            }
            inspector_core::citation::Resolution::Ambiguous(found) => anyhow::bail!(
                "--keep `{citation}` is ambiguous: {}",
                found
                    .iter()
                    .map(|r| r.citation.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            inspector_core::citation::Resolution::Unknown(why) => {
                anyhow::bail!("--keep `{citation}` does not resolve in the rules: {why}")
            }
        }
    }
    let dataset = load(file, &rules)?;
    let detector = load_detector(model, DetectConfig::default(), &rules)?;
    let paths: Vec<PathBuf> = dataset.records.iter().map(|r| r.path.clone()).collect();
    let inspected = inspect_paths(&detector, &paths, &rules, None, batch_size);
    let dir = out_folder(out)?;
    let (mut from_model, mut from_file, mut replaced, mut unusable, mut truncated) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut reboxed = 0usize;
    let mut failed = 0usize;
    let mut annotations = Vec::with_capacity(dataset.records.len());
    for (r, inspected) in dataset.records.iter().zip(inspected) {
        let finding = match inspected.result {
            Ok(f) => f,
            Err(e) => {
                eprintln!("{}:{}: {e}", file.display(), r.line);
                failed += 1;
                continue;
            }
        };
        truncated += usize::from(finding.truncated);
        let mut violations = Vec::new();
        let (w, h) = (r.size.0 as f64, r.size.1 as f64);
        // FILE's boxes of the other rules, for --gold-boxes; each is given out once.
        let mut gold: Vec<(&str, inspector_core::BBox)> = if gold_boxes {
            r.annotation
                .violations
                .iter()
                .filter(|v| !kept.contains(&v.rule))
                .filter_map(|v| Some((v.rule.as_str(), v.bbox?)))
                .collect()
        } else {
            Vec::new()
        };
        for mut v in finding.violations {
            // A finding must be a valid label: one rule, a risk, a description, and a box (if
            // any) inside the photo and not empty.
            let (Some(rule), Some(risk)) = (v.resolved, v.risk) else {
                unusable += 1;
                continue;
            };
            let bad_box = v.bbox.is_some_and(|[x1, y1, x2, y2]| {
                !(x1 >= 0.0 && y1 >= 0.0 && x2 <= w && y2 <= h && x2 > x1 && y2 > y1)
            });
            if v.description.trim().is_empty() || bad_box {
                unusable += 1;
                continue;
            }
            if kept.contains(&rule.citation) {
                continue;
            }
            let closest = gold
                .iter()
                .enumerate()
                .filter(|(_, (citation, _))| *citation == rule.citation)
                .map(|(k, (_, b))| (k, v.bbox.map_or(0.0, |p| inspector_eval::iou(b, &p))))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(k, _)| k);
            if let Some(k) = closest {
                v.bbox = Some(gold.swap_remove(k).1);
                reboxed += 1;
            }
            violations.push(inspector_core::Violation {
                description: v.description,
                rule: rule.citation,
                risk,
                suggestion: v.suggestion,
                bbox: v.bbox,
            });
        }
        from_model += violations.len();
        // The kept findings come first: whether the photo shows the new hazard is then the
        // answer's first decision, taken from the photo alone, and what follows is the model's
        // own answer.
        let mut answer = Vec::with_capacity(violations.len() + 1);
        for v in &r.annotation.violations {
            if kept.contains(&v.rule) {
                answer.push(v.clone());
                from_file += 1;
            } else {
                replaced += 1;
            }
        }
        answer.extend(violations);
        annotations.push(inspector_core::Annotation {
            image: inspector_dataset::relative_to(&r.path, &dir)?,
            violations: answer,
        });
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} photos could not be inspected; nothing was written",
        dataset.records.len()
    );
    // What is written loads as an annotation file: checked as `dataset validate` would.
    let text = jsonl(&annotations);
    let report = inspector_dataset::validate_text(
        std::str::from_utf8(&text).expect("JSON is UTF-8"),
        &dir,
        &rules,
    );
    if let Some(p) = report.errors.first() {
        anyhow::bail!(
            "the completed record of line {} would not be valid ({}: {}); nothing was written",
            p.line,
            p.field,
            p.message
        );
    }
    write_atomic(out, &text)?;
    eprintln!(
        "wrote {} records to {}: {from_file} findings of {} from {}, {from_model} from the model",
        annotations.len(),
        out.display(),
        kept.iter().cloned().collect::<Vec<_>>().join(", "),
        file.display(),
    );
    if replaced > 0 {
        eprintln!(
            "{replaced} findings of other rules in {} were replaced by the model's",
            file.display()
        );
    }
    if gold_boxes {
        eprintln!(
            "{reboxed} of the model's findings took the box of {}'s finding of the same rule",
            file.display()
        );
    }
    if unusable + truncated > 0 {
        eprintln!(
            "left out: {unusable} model findings that are not valid labels (no single rule, no risk, an empty description, or a box outside the photo); {truncated} answers broke off (their complete findings kept)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(file: &Path, json: bool, rules: &[Rule]) -> anyhow::Result<ExitCode> {
    let report: Report = inspector_dataset::validate_file(file, rules)
        .with_context(|| format!("{}: cannot read", file.display()))?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_problems(&mut out, file, "error", &report.errors);
        print_problems(&mut out, file, "warning", &report.warnings);
        writeln!(
            out,
            "{} records, {} errors, {} warnings",
            report.records,
            report.errors.len(),
            report.warnings.len()
        )?;
    }
    Ok(if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn run(cmd: DatasetCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DatasetCommand::Complete {
            file,
            keep,
            out,
            model,
            batch_size,
            gold_boxes,
            db,
        } => complete(&file, &keep, &out, &model, batch_size, gold_boxes, &db),
        DatasetCommand::Validate { file, json, db } => validate(&file, json, &rules(&db)?),
        DatasetCommand::Build { file, out, db } => {
            let dataset = load(&file, &rules(&db)?)?;
            let dir = out_folder(&out)?;
            let samples = inspector_dataset::build_samples(&dataset, &dir)?;
            write_atomic(&out, &jsonl(&samples))?;
            eprintln!(
                "wrote {} conversations (prompt {}) to {}",
                samples.len(),
                inspector_core::answer::PROMPT_VERSION,
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        DatasetCommand::Split {
            file,
            eval_ratio,
            seed,
            out_dir,
            db,
        } => {
            let dataset = load(&file, &rules(&db)?)?;
            let split = inspector_dataset::split(&dataset.records, eval_ratio, seed)?;
            create_dir(&out_dir)?;
            let train = rebased(&split.train, &out_dir)?;
            let eval = rebased(&split.eval, &out_dir)?;
            write_atomic(&out_dir.join("train.jsonl"), &train)?;
            write_atomic(&out_dir.join("eval.jsonl"), &eval)?;
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:<12} {:>8} {:>6} {:>6}",
                "stratum", "records", "eval", "target"
            )?;
            for s in &split.strata {
                writeln!(
                    out,
                    "{:<12} {:>8} {:>6} {:>6}",
                    s.category, s.records, s.eval, s.target
                )?;
            }
            writeln!(
                out,
                "train {} / eval {} → {}",
                split.train.len(),
                split.eval.len(),
                out_dir.display()
            )?;
            Ok(ExitCode::SUCCESS)
        }
        DatasetCommand::Augment {
            file,
            factor,
            seed,
            out_dir,
            exclude,
            db,
        } => {
            let rules = rules(&db)?;
            let dataset = load(&file, &rules)?;
            let exclude = exclude.map(|e| load(&e, &rules)).transpose()?;
            create_dir(&out_dir)?;
            let bar = ProgressBar::new(dataset.records.len() as u64).with_style(
                ProgressStyle::with_template(
                    "augment {bar:30} {pos}/{len} photos  {per_sec}  ETA {eta}",
                )
                .expect("valid template"),
            );
            let summary = inspector_dataset::augment(
                &dataset,
                &AugmentOptions { factor, seed },
                exclude.as_ref(),
                &out_dir,
                &|| bar.inc(1),
            )?;
            bar.finish_and_clear();
            println!(
                "{} originals + {} copies → {} ({} violation(s) cropped away)",
                summary.originals,
                summary.copies,
                out_dir.join("annotations.jsonl").display(),
                summary.removed_violations
            );
            Ok(ExitCode::SUCCESS)
        }
        DatasetCommand::Stats {
            file,
            max_pixels,
            thin,
            json,
            db,
        } => {
            let dataset = load(&file, &rules(&db)?)?;
            let stats = inspector_dataset::stats(&dataset, max_pixels, thin);
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&stats)?)?;
                return Ok(ExitCode::SUCCESS);
            }
            writeln!(
                out,
                "{} records, {} safe ({:.1}%), {} violations ({} with a box)",
                stats.records,
                stats.safe,
                stats.safe_ratio * 100.0,
                stats.violations,
                stats.violations_with_box
            )?;
            for (title, map) in [
                ("category", &stats.categories),
                ("risk", &stats.risks),
                ("rule", &stats.rules),
            ] {
                writeln!(out, "\nby {title}:")?;
                for (k, n) in map {
                    writeln!(out, "  {n:>6}  {k}")?;
                }
            }
            if let (Some(w), Some(h), Some(mp)) = (stats.width, stats.height, stats.megapixels) {
                writeln!(out, "\nimage size (min / median / max):")?;
                writeln!(out, "  width   {} / {} / {}", w.min, w.median, w.max)?;
                writeln!(out, "  height  {} / {} / {}", h.min, h.median, h.max)?;
                writeln!(
                    out,
                    "  MP      {:.2} / {:.2} / {:.2}",
                    mp.min, mp.median, mp.max
                )?;
            }
            for w in &stats.warnings {
                writeln!(out, "warning: {w}")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        DatasetCommand::Import { file, format, out } => {
            let dir = out_folder(&out)?;
            let annotations = formats::import(&file, format, &dir).map_err(report_refusal)?;
            write_atomic(&out, &jsonl(&annotations))?;
            let safe = annotations
                .iter()
                .filter(|a| a.violations.is_empty())
                .count();
            println!(
                "imported {} records ({safe} safe) → {}; check them with `inspector dataset validate`",
                annotations.len(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        DatasetCommand::Export {
            file,
            format,
            out_dir,
            db,
        } => {
            let dataset = load(&file, &rules(&db)?)?;
            create_dir(&out_dir)?;
            let exported = formats::export(&dataset, format, &out_dir)?;
            let files: Vec<String> = exported
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            println!(
                "exported {} records → {}",
                exported.records,
                files.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
