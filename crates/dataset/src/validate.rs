//! `inspector dataset validate`: every problem of an annotation file, with line and field.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use inspector_core::{
    Risk, Rule,
    citation::{Resolution, resolve},
};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

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

/// Validates an annotation file; image paths are relative to its folder.
pub fn validate_file(path: &Path, rules: &[Rule]) -> std::io::Result<Report> {
    let text = std::fs::read_to_string(path)?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok(validate_text(&text, &base, rules))
}

struct Checker<'a> {
    rules: &'a [Rule],
    report: Report,
    /// Image content hash → first line it appeared on.
    seen: HashMap<[u8; 32], usize>,
    line: usize,
}

impl Checker<'_> {
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

    /// Checks the image: present, an image, not seen before. Returns its size.
    fn image(&mut self, base: &Path, name: &str) -> Option<(u32, u32)> {
        let path = base.join(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                self.error("image", format!("{}: {e}", path.display()));
                return None;
            }
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if let Some(first) = self.seen.get(&hash) {
            let first = *first;
            self.warn("image", format!("same image bytes as line {first}"));
        } else {
            self.seen.insert(hash, self.line);
        }
        match image::load_from_memory(&bytes) {
            Ok(img) => Some((img.width(), img.height())),
            Err(e) => {
                self.error(
                    "image",
                    format!("{}: not a readable image: {e}", path.display()),
                );
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

    fn rule(&mut self, field: &str, citation: &str) {
        match resolve(citation, self.rules) {
            Resolution::Found(_) => {}
            Resolution::Ambiguous(candidates) => {
                let names: Vec<&str> = candidates.iter().map(|r| r.citation.as_str()).collect();
                self.error(
                    field,
                    format!("`{citation}` is ambiguous: {}", names.join(", ")),
                );
            }
            Resolution::Unknown(why) => {
                let hint = nearest(citation, self.rules)
                    .map(|r| format!("; did you mean {}?", r.citation))
                    .unwrap_or_default();
                self.error(field, format!("`{citation}` does not resolve: {why}{hint}"));
            }
        }
    }

    fn bbox(&mut self, field: &str, v: &Value, size: Option<(u32, u32)>) {
        let numbers: Option<Vec<f64>> = v
            .as_array()
            .and_then(|a| a.iter().map(Value::as_f64).collect());
        let Some(b) = numbers.filter(|n| n.len() == 4) else {
            self.error(field, format!("expected [x1, y1, x2, y2], found {v}"));
            return;
        };
        let [x1, y1, x2, y2] = [b[0], b[1], b[2], b[3]];
        if x2 < x1 || y2 < y1 {
            self.error(
                field,
                format!("inverted box {b:?}: x2 must exceed x1 and y2 must exceed y1"),
            );
        } else if x2 == x1 || y2 == y1 {
            self.error(field, format!("empty box {b:?}"));
        }
        if let Some((w, h)) = size
            && (x1 < 0.0 || y1 < 0.0 || x2 > w as f64 || y2 > h as f64)
        {
            self.error(field, format!("box {b:?} lies outside the {w}×{h} image"));
        }
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

/// Validates annotation text; `base` is the folder image paths are relative to.
pub fn validate_text(text: &str, base: &Path, rules: &[Rule]) -> Report {
    let mut c = Checker {
        rules,
        report: Report::default(),
        seen: HashMap::new(),
        line: 0,
    };
    for (i, raw) in text.lines().enumerate() {
        c.line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        c.report.records += 1;
        let v: Value = match serde_json::from_str(raw) {
            Ok(v) => v,
            Err(e) => {
                c.error("", format!("not valid JSON: {e}"));
                continue;
            }
        };
        if !v.is_object() {
            c.error("", "expected a JSON object");
            continue;
        }
        let size = match c.string(&v, "image", "image", true) {
            Some("") => {
                c.error("image", "empty path");
                None
            }
            Some(name) => c.image(base, name),
            None => None,
        };
        let violations = match v.get("violations") {
            None => {
                c.error("violations", "missing field (use [] for a safe photo)");
                continue;
            }
            Some(Value::Array(a)) => a,
            Some(other) => {
                c.error("violations", format!("expected a list, found {other}"));
                continue;
            }
        };
        for (k, viol) in violations.iter().enumerate() {
            let f = |name: &str| format!("violations[{k}].{name}");
            if !viol.is_object() {
                c.error(format!("violations[{k}]"), "expected an object");
                continue;
            }
            if let Some(d) = c.string(viol, "description", &f("description"), true)
                && d.trim().is_empty()
            {
                c.error(f("description"), "empty description");
            }
            if let Some(rule) = c.string(viol, "rule", &f("rule"), true) {
                c.rule(&f("rule"), rule);
            }
            if let Some(risk) = c.string(viol, "risk", &f("risk"), true)
                && Risk::parse(risk).is_none()
            {
                c.error(f("risk"), format!("`{risk}` is not a risk level: use 高, 中 or 低 (高风险, high, H … are accepted)"));
            }
            c.string(viol, "suggestion", &f("suggestion"), false);
            if let Some(b) = viol.get("box").filter(|b| !b.is_null()) {
                c.bbox(&f("box"), b, size);
            }
        }
    }
    c.report
}
