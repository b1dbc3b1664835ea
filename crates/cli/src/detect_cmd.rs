//! `inspector detect`

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use inspector_core::Rule;
use inspector_detect::{
    DetectConfig, Detector, Finding, Input,
    fingerprint::{adapter_fingerprint, model_fingerprint},
    report::{self, Entry, Lang},
};
use inspector_qwen2vl::chat::ChatTokenizer;
use inspector_store::RuleFilter;

use crate::{
    model_args::ModelArgs,
    output::{folder_of, write_atomic},
    rules_cmd::{DbArgs, open_with_rules},
};

/// Inspect photos: each gets a finding (violations, the rule each breaks checked against the
/// database, risk, suggestion, box), printed as a Chinese report by default. Other tools call
/// this interface.
///
/// Exit status: 0 when every photo was inspected, 1 when some could not be (each is reported
/// in its own row and the others go on) or nothing could run.
#[derive(Debug, Args)]
pub struct DetectArgs {
    /// Photos: files, folders (the images directly in them, sorted) or glob patterns.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub db: DbArgs,
    /// Photos per model batch.
    #[arg(long, default_value_t = 4, value_name = "B")]
    pub batch_size: usize,
    /// Print one JSON array of `{"image", "finding" | "error"}` instead of the report.
    #[arg(long, conflicts_with = "jsonl")]
    pub json: bool,
    /// Write one `{"image", "finding"}` line per photo (image paths relative to FILE's
    /// folder): what `inspector eval --predictions` reads.
    #[arg(long, value_name = "FILE")]
    pub jsonl: Option<PathBuf>,
    /// Write a CSV: one row per violation, and one per photo without any.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Write a self-contained HTML report: every photo with its boxes, and a summary table.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Neither read nor write the answer cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Report language: zh (default) or en.
    #[arg(long, default_value = "zh", value_name = "LANG")]
    pub lang: Lang,
    /// At most this many new tokens per answer.
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub max_new_tokens: usize,
    /// Decode freely instead of under the answer's grammar (by default every answer parses and
    /// cites a rule of the database).
    #[arg(long)]
    pub unconstrained: bool,
    /// 1.0 is none.
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    pub repetition_penalty: f64,
    /// 0 decodes greedily (the default for inspection).
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    pub temperature: f64,
    #[arg(long, value_name = "P")]
    pub top_p: Option<f64>,
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
}

const IMAGE_EXTENSIONS: [&str; 9] = [
    "jpg", "jpeg", "png", "bmp", "webp", "gif", "tif", "tiff", "jfif",
];

/// Files, folders and glob patterns → photo paths, in order, without duplicates.
pub fn expand(paths: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = Vec::new();
    let is_image = |p: &Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_lowercase().as_str()))
    };
    for arg in paths {
        let path = Path::new(arg);
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("{arg}: cannot list"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            found.sort();
            anyhow::ensure!(!found.is_empty(), "{arg}: no images in this folder");
            out.extend(found);
        } else if path.exists() {
            out.push(path.to_path_buf());
        } else if arg.contains(['*', '?', '[']) {
            let mut found: Vec<PathBuf> = glob::glob(arg)
                .with_context(|| format!("{arg}: invalid pattern"))?
                .filter_map(Result::ok)
                .filter(|p| p.is_file())
                .collect();
            found.sort();
            anyhow::ensure!(!found.is_empty(), "{arg}: no file matches");
            out.extend(found);
        } else {
            anyhow::bail!("{arg}: no such file or folder");
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    Ok(out)
}

/// The pixel limits a model or adapter was trained with (`inspector_adapter.json` /
/// `inspector_model.json`), if it says.
fn trained_pixels(dir: &Path) -> Option<(usize, usize)> {
    ["inspector_adapter.json", "inspector_model.json"]
        .iter()
        .find_map(|f| std::fs::read(dir.join(f)).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            Some((
                v["min_pixels"].as_u64()? as usize,
                v["max_pixels"].as_u64()? as usize,
            ))
        })
}

/// Loads the detector the options describe. Pixel limits: the flags, else what the adapter or
/// model was trained with (`inspector train` records it), else the model's processor config.
pub fn load_detector(
    args: &ModelArgs,
    config: DetectConfig,
    rules: &[Rule],
) -> anyhow::Result<Detector> {
    let loaded = args.load()?;
    let chat = ChatTokenizer::load(&loaded.dir, loaded.model.config.tokens.image_pad)?;
    let model_fp = model_fingerprint(&loaded.dir)?;
    let adapter_fp = loaded
        .adapter
        .as_deref()
        .map(adapter_fingerprint)
        .transpose()?;
    let trained = loaded
        .adapter
        .as_deref()
        .and_then(trained_pixels)
        .or_else(|| trained_pixels(&loaded.dir))
        .unwrap_or((
            loaded.model.processor.min_pixels,
            loaded.model.processor.max_pixels,
        ));
    let processor = loaded.model.processor.clone().with_pixels(
        Some(args.min_pixels.unwrap_or(trained.0)),
        Some(args.max_pixels.unwrap_or(trained.1)),
    )?;
    let prompt = inspector_detect::trained_prompt(&loaded.dir, loaded.adapter.as_deref())?;
    let mut detector = Detector::new(loaded.model, chat, model_fp, adapter_fp, config)?;
    detector.set_prompt(prompt);
    detector.set_processor(processor);
    detector.set_citations(rules);
    Ok(detector)
}

/// One inspected photo: its path, bytes (when they could be read) and outcome.
pub struct Inspected {
    pub path: PathBuf,
    pub bytes: Option<Vec<u8>>,
    pub result: Result<Finding, String>,
}

/// Reads and inspects photos with a progress bar; a photo that cannot be read gets its own
/// error.
pub fn inspect_paths(
    detector: &Detector,
    paths: &[PathBuf],
    rules: &[inspector_core::Rule],
    cache: Option<&dyn inspector_store::Store>,
    batch_size: usize,
) -> Vec<Inspected> {
    let mut read: Vec<(PathBuf, Result<Vec<u8>, String>)> = paths
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
            (p.clone(), bytes)
        })
        .collect();
    let inputs: Vec<Input> = read
        .iter()
        .filter_map(|(p, b)| {
            b.as_ref().ok().map(|bytes| Input {
                name: p.display().to_string(),
                bytes: bytes.clone(),
            })
        })
        .collect();
    let bar = ProgressBar::new(inputs.len() as u64).with_style(
        ProgressStyle::with_template("inspect {bar:30} {pos}/{len} photos  ETA {eta}")
            .expect("valid template"),
    );
    let mut findings = detector
        .inspect(&inputs, rules, cache, batch_size, |_| bar.inc(1))
        .into_iter();
    bar.finish_and_clear();
    read.drain(..)
        .map(|(path, bytes)| match bytes {
            Ok(bytes) => {
                let result = findings
                    .next()
                    .expect("one result per input")
                    .map_err(|e| e.to_string());
                Inspected {
                    path,
                    bytes: Some(bytes),
                    result,
                }
            }
            Err(e) => Inspected {
                path,
                bytes: None,
                result: Err(e),
            },
        })
        .collect()
}

pub fn run(args: DetectArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let paths = expand(&args.paths)?;
    let store = open_with_rules(&args.db.db)?;
    let rules = store.rules(&RuleFilter::default())?;
    let config = DetectConfig {
        max_new_tokens: args.max_new_tokens,
        repetition_penalty: args.repetition_penalty,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        constrained: !args.unconstrained,
    };
    let detector = load_detector(&args.model, config, &rules)?;
    let cache = (!args.no_cache).then_some(store.as_ref());
    let done = inspect_paths(&detector, &paths, &rules, cache, args.batch_size);

    let names: Vec<String> = done.iter().map(|d| d.path.display().to_string()).collect();
    let entries: Vec<Entry> = done
        .iter()
        .zip(&names)
        .map(|(d, name)| Entry {
            image: name,
            finding: d.result.as_ref().ok(),
            error: d.result.as_ref().err().cloned(),
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
    } else {
        for e in &entries {
            println!("{}", report::text(e, args.lang));
        }
    }
    if let Some(file) = &args.jsonl {
        let dir = folder_of(file)?;
        let mut text = String::new();
        for d in &done {
            let image = inspector_dataset::relative_to(&d.path, dir)
                .unwrap_or_else(|_| d.path.display().to_string());
            let line = match &d.result {
                Ok(f) => serde_json::json!({"image": image, "finding": f}),
                Err(e) => serde_json::json!({"image": image, "error": e}),
            };
            text.push_str(&line.to_string());
            text.push('\n');
        }
        write_atomic(file, text.as_bytes())?;
    }
    if let Some(file) = &args.csv {
        write_atomic(file, &report::csv(&entries)?)?;
    }
    if let Some(file) = &args.html {
        let images: Vec<Option<&[u8]>> = done.iter().map(|d| d.bytes.as_deref()).collect();
        let page = report::html(&entries, &images, args.lang).map_err(anyhow::Error::msg)?;
        write_atomic(file, page.as_bytes())?;
    }
    let failed = entries.iter().filter(|e| e.finding.is_none()).count();
    let cached = entries
        .iter()
        .filter(|e| e.finding.is_some_and(|f| f.timings.cached))
        .count();
    eprintln!(
        "{} photos: {} inspected ({cached} from the cache), {failed} could not be",
        entries.len(),
        entries.len() - failed
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
