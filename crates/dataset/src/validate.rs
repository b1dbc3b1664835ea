//! `inspector dataset validate`: every problem of an annotation file, with line and field; and
//! [`load_file`], which every other dataset command starts from: it refuses a file with any
//! error, so nothing is ever built from a bad record.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use inspector_core::{
    Annotation, Risk, Rule, Violation,
    citation::{Resolution, resolve},
};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::Error;

/// One problem: 1-based line, the field at fault (`violations[0].box`), a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub line: usize,
    pub field: String,
    pub message: String,
}

/// The whole report; `errors` empty means the file can be trained on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Non-empty lines seen.
    pub records: usize,
    pub errors: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

/// The category of a record without violations.
pub const SAFE_CATEGORY: &str = "safe";

/// One valid record, checked against its image and the rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// 1-based line in the annotation file.
    pub line: usize,
    /// As in the file, but with every citation in its canonical form (`《T》第N条`) and risks
    /// normalised.
    pub annotation: Annotation,
    /// The image: the annotation file's folder joined with `annotation.image`.
    pub path: PathBuf,
    /// Width and height after EXIF orientation: what boxes and the model refer to.
    pub size: (u32, u32),
    /// SHA-256 of the image bytes.
    pub sha256: [u8; 32],
    /// The primary category of the first violation's rule, or [`SAFE_CATEGORY`].
    pub category: String,
    /// Every violation's rule id, in order.
    pub rule_ids: Vec<String>,
}

impl Record {
    /// Hex SHA-256 of the image bytes.
    pub fn sha256_hex(&self) -> String {
        hex(&self.sha256)
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A valid annotation file: every record checked; warnings kept for the user.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub file: PathBuf,
    /// The folder image paths are relative to.
    pub base: PathBuf,
    pub records: Vec<Record>,
    pub warnings: Vec<Problem>,
}

/// Validates an annotation file; image paths are relative to its folder.
pub fn validate_file(path: &Path, rules: &[Rule]) -> std::io::Result<Report> {
    let text = std::fs::read_to_string(path)?;
    Ok(validate_text(&text, &base_of(path), rules))
}

/// Validates annotation text; `base` is the folder image paths are relative to.
pub fn validate_text(text: &str, base: &Path, rules: &[Rule]) -> Report {
    check(text, base, rules).0
}

/// Reads and checks an annotation file; any error refuses the whole file
/// ([`Error::Invalid`] carries the full report).
pub fn load_file(path: &Path, rules: &[Rule]) -> Result<Dataset, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let base = base_of(path);
    let (report, records) = check(&text, &base, rules);
    if !report.errors.is_empty() {
        return Err(Error::Invalid {
            file: path.to_path_buf(),
            report: Box::new(report),
        });
    }
    Ok(Dataset {
        file: path.to_path_buf(),
        base,
        records,
        warnings: report.warnings,
    })
}

/// The folder a file's relative paths are read from.
pub(crate) fn base_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// What reading one image gave: its hash (when the file could be read) and its size or the
/// reason it is unusable.
struct ImageCheck {
    sha256: Option<[u8; 32]>,
    size: Result<(u32, u32), String>,
}

fn check_image(path: &Path) -> ImageCheck {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            return ImageCheck {
                sha256: None,
                size: Err(format!("{}: {e}", path.display())),
            };
        }
    };
    let sha256 = Some(Sha256::digest(&bytes).into());
    let size = inspector_imaging::decode_rgb(&bytes, inspector_imaging::DEFAULT_MAX_DECODE_PIXELS)
        .map(|img| img.dimensions())
        .map_err(|e| format!("{}: not a readable image: {e}", path.display()));
    ImageCheck { sha256, size }
}

struct Checker<'a> {
    rules: &'a [Rule],
    images: HashMap<PathBuf, ImageCheck>,
    report: Report,
    /// Image content hash → first line it appeared on.
    seen: HashMap<[u8; 32], usize>,
    line: usize,
    /// Errors before the current line.
    errors_before: usize,
}

impl<'a> Checker<'a> {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.report.errors.push(Problem {
            line: self.line,
            field: field.into(),
            message: message.into(),
        });
    }

    fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.report.warnings.push(Problem {
            line: self.line,
            field: field.into(),
            message: message.into(),
        });
    }

    /// Checks the image: present, an image, not seen before. Returns its size and hash.
    fn image(&mut self, path: &Path) -> Option<((u32, u32), [u8; 32])> {
        let check = &self.images[path];
        let (sha, size) = (check.sha256, check.size.clone());
        if let Some(hash) = sha {
            if let Some(first) = self.seen.get(&hash) {
                let first = *first;
                self.warn("image", format!("same image bytes as line {first}"));
            } else {
                self.seen.insert(hash, self.line);
            }
        }
        match size {
            Ok(size) => sha.map(|h| (size, h)),
            Err(message) => {
                self.error("image", message);
                None
            }
        }
    }

    fn string<'v>(
        &mut self,
        v: &'v Value,
        key: &str,
        field: &str,
        required: bool,
    ) -> Option<&'v str> {
        match v.get(key) {
            None | Some(Value::Null) => {
                if required {
                    self.error(field, "missing field");
                }
                None
            }
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                self.error(field, format!("expected a string, found {other}"));
                None
            }
        }
    }

    fn rule(&mut self, field: &str, citation: &str) -> Option<&'a Rule> {
        match resolve(citation, self.rules) {
            Resolution::Found(rule) => Some(rule),
            Resolution::Ambiguous(candidates) => {
                let names: Vec<&str> = candidates.iter().map(|r| r.citation.as_str()).collect();
                self.error(
                    field,
                    format!("`{citation}` is ambiguous: {}", names.join(", ")),
                );
                None
            }
            Resolution::Unknown(why) => {
                let hint = nearest(citation, self.rules)
                    .map(|r| format!("; did you mean {}?", r.citation))
                    .unwrap_or_default();
                self.error(field, format!("`{citation}` does not resolve: {why}{hint}"));
                None
            }
        }
    }

    fn bbox(&mut self, field: &str, v: &Value, size: Option<(u32, u32)>) -> Option<[f64; 4]> {
        let numbers: Option<Vec<f64>> = v
            .as_array()
            .and_then(|a| a.iter().map(Value::as_f64).collect());
        let Some(b) = numbers.filter(|n| n.len() == 4) else {
            self.error(field, format!("expected [x1, y1, x2, y2], found {v}"));
            return None;
        };
        let [x1, y1, x2, y2] = [b[0], b[1], b[2], b[3]];
        let mut ok = true;
        if x2 < x1 || y2 < y1 {
            self.error(
                field,
                format!("inverted box {b:?}: x2 must exceed x1 and y2 must exceed y1"),
            );
            ok = false;
        } else if x2 == x1 || y2 == y1 {
            self.error(field, format!("empty box {b:?}"));
            ok = false;
        }
        if let Some((w, h)) = size
            && (x1 < 0.0 || y1 < 0.0 || x2 > w as f64 || y2 > h as f64)
        {
            self.error(field, format!("box {b:?} lies outside the {w}×{h} image"));
            ok = false;
        }
        ok.then_some([x1, y1, x2, y2])
    }

    /// Checks one parsed line; returns the record when the line has no error.
    fn record(&mut self, v: &Value, base: &Path) -> Option<Record> {
        if !v.is_object() {
            self.error("", "expected a JSON object");
            return None;
        }
        let image = match self.string(v, "image", "image", true) {
            Some("") => {
                self.error("image", "empty path");
                None
            }
            Some(name) => {
                let path = base.join(name);
                self.image(&path)
                    .map(|(size, hash)| (name, path, size, hash))
            }
            None => None,
        };
        let size = image.as_ref().map(|i| i.2);
        let list = match v.get("violations") {
            None => {
                self.error("violations", "missing field (use [] for a safe photo)");
                return None;
            }
            Some(Value::Array(a)) => a,
            Some(other) => {
                self.error("violations", format!("expected a list, found {other}"));
                return None;
            }
        };
        let mut violations = Vec::new();
        let mut rules = Vec::new();
        for (k, viol) in list.iter().enumerate() {
            let f = |name: &str| format!("violations[{k}].{name}");
            if !viol.is_object() {
                self.error(format!("violations[{k}]"), "expected an object");
                continue;
            }
            let description = self.string(viol, "description", &f("description"), true);
            if description.is_some_and(|d| d.trim().is_empty()) {
                self.error(f("description"), "empty description");
            }
            let rule = self
                .string(viol, "rule", &f("rule"), true)
                .and_then(|r| self.rule(&f("rule"), r));
            let risk = self.string(viol, "risk", &f("risk"), true).and_then(|risk| {
                let parsed = Risk::parse(risk);
                if parsed.is_none() {
                    self.error(f("risk"), format!("`{risk}` is not a risk level: use 高, 中 or 低 (高风险, high, H … are accepted)"));
                }
                parsed
            });
            let suggestion = self.string(viol, "suggestion", &f("suggestion"), false);
            let bbox = match viol.get("box").filter(|b| !b.is_null()) {
                Some(b) => self.bbox(&f("box"), b, size).map(Some),
                None => Some(None),
            };
            if let (Some(d), Some(rule), Some(risk), Some(bbox)) = (description, rule, risk, bbox) {
                rules.push(rule);
                violations.push(Violation {
                    description: d.trim().to_string(),
                    rule: rule.citation.clone(),
                    risk,
                    suggestion: suggestion.map(str::trim).map(str::to_string),
                    bbox,
                });
            }
        }
        if self.report.errors.len() > self.errors_before {
            return None;
        }
        let (name, path, size, sha256) = image?;
        Some(Record {
            line: self.line,
            category: rules
                .first()
                .and_then(|r| r.categories.first())
                .cloned()
                .unwrap_or_else(|| SAFE_CATEGORY.to_string()),
            rule_ids: rules.iter().map(|r| r.id.clone()).collect(),
            annotation: Annotation {
                image: name.to_string(),
                violations,
            },
            path,
            size,
            sha256,
        })
    }
}

/// The rule whose citation is nearest to `citation` (edit distance), if any is close enough
/// to be a plausible typo.
fn nearest<'a>(citation: &str, rules: &'a [Rule]) -> Option<&'a Rule> {
    let folded = inspector_core::text::fold_width(citation);
    rules
        .iter()
        .map(|r| (strsim::levenshtein(&folded, &r.citation), r))
        .min_by_key(|(d, _)| *d)
        .filter(|(d, r)| *d <= r.citation.chars().count() / 2)
        .map(|(_, r)| r)
}

/// Checks annotation text whose photos are not files but made on demand (synthetic scenes
/// rendered when a batch needs them): `name` stands for the file in messages and paths, every
/// photo is `size`, and a photo's hash is that of its name. Refused as [`load_file`] refuses.
pub fn load_generated(
    name: &Path,
    text: &str,
    size: (u32, u32),
    rules: &[Rule],
) -> Result<Dataset, Error> {
    let (report, records) = check_with(text, name, rules, |path| ImageCheck {
        sha256: Some(Sha256::digest(path.as_os_str().as_encoded_bytes()).into()),
        size: Ok(size),
    });
    if !report.errors.is_empty() {
        return Err(Error::Invalid {
            file: name.to_path_buf(),
            report: Box::new(report),
        });
    }
    Ok(Dataset {
        file: name.to_path_buf(),
        base: name.to_path_buf(),
        records,
        warnings: report.warnings,
    })
}

fn check(text: &str, base: &Path, rules: &[Rule]) -> (Report, Vec<Record>) {
    check_with(text, base, rules, check_image)
}

/// Checks every line. Images are read and decoded in parallel first (the slow part, done by
/// `image`, which tells each photo's hash and size); the problems are then reported in line
/// order.
fn check_with(
    text: &str,
    base: &Path,
    rules: &[Rule],
    image: impl Fn(&Path) -> ImageCheck + Sync,
) -> (Report, Vec<Record>) {
    let lines: Vec<(usize, Result<Value, String>)> = text
        .lines()
        .enumerate()
        .filter(|(_, raw)| !raw.trim().is_empty())
        .map(|(i, raw)| {
            (
                i + 1,
                serde_json::from_str::<Value>(raw).map_err(|e| e.to_string()),
            )
        })
        .collect();
    let mut paths: Vec<PathBuf> = lines
        .iter()
        .filter_map(|(_, v)| v.as_ref().ok()?.get("image")?.as_str())
        .filter(|name| !name.is_empty())
        .map(|name| base.join(name))
        .collect();
    paths.sort();
    paths.dedup();
    let images: HashMap<PathBuf, ImageCheck> = paths
        .into_par_iter()
        .map(|p| {
            let check = image(&p);
            (p, check)
        })
        .collect();

    let mut c = Checker {
        rules,
        images,
        report: Report::default(),
        seen: HashMap::new(),
        line: 0,
        errors_before: 0,
    };
    let mut records = Vec::new();
    for (line, parsed) in &lines {
        c.line = *line;
        c.errors_before = c.report.errors.len();
        c.report.records += 1;
        match parsed {
            Ok(v) => records.extend(c.record(v, base)),
            Err(e) => c.error("", format!("not valid JSON: {e}")),
        }
    }
    (c.report, records)
}
