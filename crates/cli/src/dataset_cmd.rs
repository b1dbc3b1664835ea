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
use inspector_store::{RuleFilter, RuleStore};

use crate::{
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
