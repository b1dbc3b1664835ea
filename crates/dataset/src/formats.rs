//! Moving between tools: import from the tutorial's article format, LLaMA-Factory and
//! ms-swift; export to LLaMA-Factory and ms-swift.
//!
//! - **article**: a JSON array of `{"image", "conversations": [{"from": "human"|"gpt"|"assistant",
//!   "value"}]}`; the assistant's text is the numbered Chinese list
//!   ([`inspector_core::answer::parse_numbered_list`]). It has no boxes.
//! - **llamafactory**: a JSON array (or JSONL) of `{"messages": [{"role", "content"}], "images"}`
//!   (OpenAI style) or `{"conversations": [{"from", "value"}], "images"}` (ShareGPT style).
//!   Exported as `safety_inspector.json` plus the `dataset_info.json` entry LLaMA-Factory
//!   needs; image paths are relative to the export folder, LLaMA-Factory's `dataset_dir`.
//! - **swift**: ms-swift's JSONL of `{"messages", "images"}`. Exported as
//!   `safety_inspector.jsonl` with absolute image paths (ms-swift resolves relative paths
//!   against its working directory, which is not known here).
//!
//! Assistant answers are read as the canonical JSON answer first (boxes on the 0–1000 scale,
//! converted to pixels with the image's size), then as the numbered list. Exports write the
//! canonical conversation of [`crate::conversation`], so a model trained by either tool
//! answers in the format the detector parses. Images are copied into `images/`, named by
//! content hash.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
};

use inspector_core::{
    Annotation, Risk, Violation,
    answer::{Answer, parse_numbered_list},
};
use serde_json::Value;

use crate::{
    Dataset, Error, Problem, Report, conversation, create_dir, jsonl, relative_to, store_image,
    write_atomic,
};

/// An outside dataset format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Article,
    LlamaFactory,
    Swift,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "article" => Ok(Format::Article),
            "llamafactory" => Ok(Format::LlamaFactory),
            "swift" | "msswift" => Ok(Format::Swift),
            _ => Err(format!(
                "unknown format `{s}`: use article, llamafactory or swift"
            )),
        }
    }
}

/// The name of exported data files and of the LLaMA-Factory dataset entry.
pub const EXPORT_NAME: &str = "safety_inspector";

/// Reads a JSON array or JSONL file into (number, entry) pairs: the 1-based record for an
/// array, the 1-based line for JSONL.
fn entries(file: &Path, text: &str, problems: &mut Vec<Problem>) -> Vec<(usize, Value)> {
    if text.trim_start().starts_with('[') {
        match serde_json::from_str::<Vec<Value>>(text) {
            Ok(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (i + 1, v))
                .collect(),
            Err(e) => {
                problems.push(Problem {
                    line: e.line(),
                    field: String::new(),
                    message: format!("{}: not a valid JSON array: {e}", file.display()),
                });
                Vec::new()
            }
        }
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .filter_map(|(i, l)| match serde_json::from_str(l) {
                Ok(v) => Some((i + 1, v)),
                Err(e) => {
                    problems.push(Problem {
                        line: i + 1,
                        field: String::new(),
                        message: format!("not valid JSON: {e}"),
                    });
                    None
                }
            })
            .collect()
    }
}

/// The turns of an entry as (role, text): `messages` (role/content) or `conversations`
/// (from/value), roles normalised to user/assistant/system.
fn turns(entry: &Value) -> Result<Vec<(String, String)>, (String, String)> {
    let (key, list) = if let Some(m) = entry.get("messages") {
        ("messages", m)
    } else if let Some(c) = entry.get("conversations") {
        ("conversations", c)
    } else {
        return Err((
            "messages".into(),
            "missing field (`messages` or `conversations`)".into(),
        ));
    };
    let list = list
        .as_array()
        .ok_or_else(|| (key.to_string(), "expected a list".to_string()))?;
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            let field = format!("{key}[{i}]");
            let get = |a: &str, b: &str| t.get(a).or_else(|| t.get(b)).and_then(Value::as_str);
            let role = get("role", "from")
                .ok_or_else(|| (field.clone(), "missing `role`/`from`".to_string()))?;
            let text = get("content", "value")
                .ok_or_else(|| (field.clone(), "missing `content`/`value`".to_string()))?;
            let role = match role {
                "user" | "human" => "user",
                "assistant" | "gpt" | "model" => "assistant",
                "system" => "system",
                other => return Err((field, format!("unknown role `{other}`"))),
            };
            Ok((role.to_string(), text.to_string()))
        })
        .collect()
}

/// The one image of an entry: `images: [path]` or `image: path`.
fn image_of(entry: &Value) -> Result<&str, (String, String)> {
    if let Some(images) = entry.get("images") {
        let list = images
            .as_array()
            .ok_or_else(|| ("images".to_string(), "expected a list".to_string()))?;
        return match list.as_slice() {
            [Value::String(s)] => Ok(s),
            [_] => Err(("images[0]".into(), "expected a path".into())),
            other => Err((
                "images".into(),
                format!(
                    "expected exactly one image, found {}; a safety inspection is one photo",
                    other.len()
                ),
            )),
        };
    }
    match entry.get("image") {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(("image".into(), "expected a path".into())),
        None => Err(("images".into(), "missing field".into())),
    }
}

/// Strips a Markdown code fence around an answer.
fn unfence(text: &str) -> &str {
    let t = text.trim();
    let Some(rest) = t.strip_prefix("```") else {
        return t;
    };
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_alphanumeric());
    rest.strip_suffix("```").unwrap_or(rest).trim()
}

/// Reads one assistant answer into violations (boxes in pixels of an image of `size`, read
/// lazily: only canonical answers with boxes need it).
fn answer_violations(
    text: &str,
    size: &mut dyn FnMut() -> Result<(u32, u32), String>,
) -> Result<Vec<Violation>, String> {
    let body = unfence(text);
    if body.starts_with('{') {
        let answer = Answer::from_json(body).map_err(|e| {
            format!("the answer looks like JSON but is not the canonical answer: {e}")
        })?;
        let has_box = answer.violations.iter().any(|v| v.bbox.is_some());
        let size = if has_box { size()? } else { (1, 1) };
        return Ok(answer.to_violations(size));
    }
    let items = parse_numbered_list(text).ok_or_else(|| {
        "the answer is neither the canonical JSON, nor a numbered violation list, nor 未发现明显违规行为".to_string()
    })?;
    items
        .into_iter()
        .enumerate()
        .map(|(k, item)| {
            let n = k + 1;
            if item.description.trim().is_empty() {
                return Err(format!("item {n}: no description"));
            }
            let rule = item
                .rule
                .filter(|r| !r.is_empty())
                .ok_or_else(|| format!("item {n}: no 违反规定 line"))?;
            let risk_text = item
                .risk
                .ok_or_else(|| format!("item {n}: no 风险等级 line"))?;
            let risk = Risk::parse(&risk_text)
                .ok_or_else(|| format!("item {n}: `{risk_text}` is not a risk level"))?;
            Ok(Violation {
                description: item.description.trim().to_string(),
                rule,
                risk,
                suggestion: item.suggestion,
                bbox: None,
            })
        })
        .collect()
}

/// Imports a file of another tool into annotation records whose image paths are relative to
/// `out_dir` (the folder the annotation file will be written to; it must exist). Image paths
/// in the input are relative to the input file's folder. Every entry is checked; any problem
/// refuses the import with the full list.
pub fn import(file: &Path, format: Format, out_dir: &Path) -> Result<Vec<Annotation>, Error> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let base = crate::validate::base_of(file);
    let mut problems = Vec::new();
    let items = entries(file, &text, &mut problems);
    let mut out = Vec::new();
    for (n, entry) in &items {
        let mut problem = |field: &str, message: String| {
            problems.push(Problem {
                line: *n,
                field: field.to_string(),
                message,
            })
        };
        if format == Format::Article && entry.get("conversations").is_none() {
            problem("conversations", "missing field".into());
            continue;
        }
        let turns = match turns(entry) {
            Ok(t) => t,
            Err((field, message)) => {
                problem(&field, message);
                continue;
            }
        };
        let image = match image_of(entry) {
            Ok(i) => i,
            Err((field, message)) => {
                problem(&field, message);
                continue;
            }
        };
        let path = base.join(image);
        let Some((_, answer)) = turns.iter().rev().find(|(role, _)| role == "assistant") else {
            problem("messages", "no assistant answer".into());
            continue;
        };
        let mut size = || {
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            inspector_imaging::dimensions(&bytes).map_err(|e| format!("{}: {e}", path.display()))
        };
        let violations = match answer_violations(answer, &mut size) {
            Ok(v) => v,
            Err(message) => {
                problem("answer", message);
                continue;
            }
        };
        let image = match relative_to(&path, out_dir) {
            Ok(rel) => rel,
            Err(e) => {
                problem("images", e.to_string());
                continue;
            }
        };
        out.push(Annotation { image, violations });
    }
    if !problems.is_empty() {
        problems.sort_by_key(|p| p.line);
        return Err(Error::Invalid {
            file: file.to_path_buf(),
            report: Box::new(Report {
                records: items.len(),
                errors: problems,
                warnings: Vec::new(),
            }),
        });
    }
    Ok(out)
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    pub records: usize,
    /// The data file, and `dataset_info.json` for LLaMA-Factory.
    pub files: Vec<PathBuf>,
}

/// Exports a validated dataset for another tool into `out_dir`: images copied into
/// `images/`, the canonical conversations in the tool's file, and for LLaMA-Factory the
/// `dataset_info.json` entry (merged into an existing file, other entries kept).
pub fn export(dataset: &Dataset, format: Format, out_dir: &Path) -> Result<Exported, Error> {
    if format == Format::Article {
        return Err(Error::Refused(
            "export writes llamafactory or swift; the article format cannot hold boxes".into(),
        ));
    }
    create_dir(&out_dir.join("images"))?;
    let out_abs = out_dir.canonicalize().map_err(|e| Error::io(out_dir, e))?;
    let mut samples = Vec::new();
    for r in &dataset.records {
        let bytes = std::fs::read(&r.path).map_err(|e| Error::io(&r.path, e))?;
        let name = store_image(&r.path, &bytes, out_dir)?;
        let reference = match format {
            Format::Swift => out_abs.join(&name).to_string_lossy().into_owned(),
            _ => name,
        };
        samples.push(conversation(&r.annotation, r.size, reference));
    }
    let mut files = Vec::new();
    match format {
        Format::LlamaFactory => {
            let data = out_dir.join(format!("{EXPORT_NAME}.json"));
            let mut bytes = serde_json::to_vec_pretty(&samples).expect("samples serialise");
            bytes.push(b'\n');
            write_atomic(&data, &bytes)?;
            let info_path = out_dir.join("dataset_info.json");
            let mut info =
                match std::fs::read_to_string(&info_path) {
                    Ok(text) => serde_json::from_str::<serde_json::Map<String, Value>>(&text)
                        .map_err(|e| Error::Format {
                            file: info_path.clone(),
                            location: format!("line {}", e.line()),
                            message: format!(
                                "existing dataset_info.json is not a JSON object: {e}"
                            ),
                        })?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
                    Err(e) => return Err(Error::io(&info_path, e)),
                };
            info.insert(
                EXPORT_NAME.to_string(),
                serde_json::json!({
                    "file_name": format!("{EXPORT_NAME}.json"),
                    "formatting": "sharegpt",
                    "columns": {"messages": "messages", "images": "images"},
                    "tags": {
                        "role_tag": "role",
                        "content_tag": "content",
                        "user_tag": "user",
                        "assistant_tag": "assistant",
                        "system_tag": "system"
                    }
                }),
            );
            let mut bytes = serde_json::to_vec_pretty(&info).expect("JSON serialises");
            bytes.push(b'\n');
            write_atomic(&info_path, &bytes)?;
            files.extend([data, info_path]);
        }
        Format::Swift => {
            let data = out_dir.join(format!("{EXPORT_NAME}.jsonl"));
            write_atomic(&data, &jsonl(&samples))?;
            files.push(data);
        }
        Format::Article => unreachable!("refused above"),
    }
    Ok(Exported {
        records: samples.len(),
        files,
    })
}
