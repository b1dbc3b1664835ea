//! Reading what a model actually wrote: the canonical JSON answer, however mangled, else the
//! numbered Chinese list; never a panic.
//!
//! The JSON reader tolerates code fences, prose around the object, trailing commas, single
//! field-name spellings in Chinese, and truncated output, from which it salvages every
//! violation written out completely (and says so). What is neither JSON nor a numbered list
//! nor an explicit "safe" is [`ReplyStatus::Unparsed`]; for binary metrics that counts as a
//! violation prediction, since only an explicit "safe" is safe.
//!
//! ```
//! use inspector_core::reply::{parse_reply, ReplyStatus};
//!
//! let r = parse_reply("```json\n{\"status\": \"violation\", \"violations\": [{\"description\": \"未戴安全帽\", \"rule\": \"第3.1条\", \"risk\": \"高\", \"box\": [1, 2, 300, 400]},]}\n```");
//! assert_eq!(r.status, ReplyStatus::Violation);
//! assert_eq!(r.violations[0].rule.as_deref(), Some("第3.1条"));
//! assert!(!r.truncated);
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Risk, answer::parse_numbered_list};

/// What a reply says about the photo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyStatus {
    Safe,
    Violation,
    /// Neither a readable answer nor an explicit "safe".
    Unparsed,
}

impl ReplyStatus {
    /// For binary metrics: everything but an explicit "safe" is a violation prediction.
    pub fn predicts_violation(self) -> bool {
        self != ReplyStatus::Safe
    }
}

/// Which format the reply was read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyFormat {
    Json,
    NumberedList,
    None,
}

/// One violation as read from a reply; fields the model left out or garbled are `None`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ReplyViolation {
    pub description: String,
    /// The citation as written.
    pub rule: Option<String>,
    pub risk: Option<Risk>,
    pub suggestion: Option<String>,
    /// On the 0–1000 scale, ordered (x1 ≤ x2, y1 ≤ y2) and clamped to it.
    #[serde(rename = "box")]
    pub bbox: Option<[f64; 4]>,
}

/// A parsed reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub status: ReplyStatus,
    pub violations: Vec<ReplyViolation>,
    /// The JSON broke off; `violations` holds those written out completely.
    pub truncated: bool,
    pub format: ReplyFormat,
}

/// Reads a model's reply. Total: any text gives a [`Reply`].
pub fn parse_reply(text: &str) -> Reply {
    if let Some(reply) = parse_json(text) {
        return reply;
    }
    match parse_numbered_list(text) {
        Some(items) => {
            let violations: Vec<ReplyViolation> = items
                .into_iter()
                .map(|i| ReplyViolation {
                    description: i.description,
                    rule: i.rule.filter(|r| !r.is_empty()),
                    risk: i.risk.as_deref().and_then(Risk::parse),
                    suggestion: i.suggestion.filter(|s| !s.is_empty()),
                    bbox: None,
                })
                .collect();
            Reply {
                status: if violations.is_empty() {
                    ReplyStatus::Safe
                } else {
                    ReplyStatus::Violation
                },
                violations,
                truncated: false,
                format: ReplyFormat::NumberedList,
            }
        }
        None => Reply {
            status: ReplyStatus::Unparsed,
            violations: vec![],
            truncated: false,
            format: ReplyFormat::None,
        },
    }
}

/// Byte ranges of the complete violation objects in a JSON reply, in order (for scoring each
/// violation by the tokens that wrote it). Empty for a reply that is not JSON.
pub fn violation_spans(text: &str) -> Vec<std::ops::Range<usize>> {
    list_start(text)
        .map(|at| {
            complete_violations(text, at)
                .into_iter()
                .map(|(r, _)| r)
                .collect()
        })
        .unwrap_or_default()
}

/// Where the violations array of a JSON reply opens (just after its `[`).
fn list_start(text: &str) -> Option<usize> {
    let key = VIOLATIONS
        .iter()
        .filter_map(|k| text.find(&format!("\"{k}\"")))
        .min()?;
    text[key..].find('[').map(|open| key + open + 1)
}

/// The complete, readable violation objects of the array starting at `from`, with their
/// byte ranges; stops at the array's end or at an object that breaks off.
fn complete_violations(text: &str, from: usize) -> Vec<(std::ops::Range<usize>, ReplyViolation)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut pos = from;
    while let Some(off) = bytes[pos..].iter().position(|&b| b == b'{' || b == b']') {
        let at = pos + off;
        if bytes[at] == b']' {
            break;
        }
        let Some(end) = object_end(bytes, at) else {
            break;
        };
        if let Some(v) = lenient_value(&text[at..=end]).as_ref().and_then(violation) {
            out.push((at..end + 1, v));
        }
        pos = end + 1;
    }
    out
}

/// The JSON reading: the first `{` that opens an object with a status or violations.
fn parse_json(text: &str) -> Option<Reply> {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(off) = bytes[from..].iter().position(|&b| b == b'{') {
        let start = from + off;
        match object_end(bytes, start) {
            Some(end) => {
                if let Some(v) = lenient_value(&text[start..=end])
                    && let Some(reply) = from_value(&v)
                {
                    return Some(reply);
                }
                from = start + 1;
            }
            None => return salvage(text, start),
        }
    }
    None
}

/// The index of the `}` closing the object opened at `start`, skipping strings; `None` when
/// the text ends first.
fn object_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate().skip(start) {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return (b == b'}').then_some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Parses JSON after dropping trailing commas (outside strings); also accepts full-width
/// punctuation models sometimes emit between fields.
fn lenient_value(text: &str) -> Option<Value> {
    if let Ok(v) = serde_json::from_str(text) {
        return Some(v);
    }
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            ',' | '，' => {
                let next = chars[i + 1..].iter().find(|c| !c.is_whitespace());
                if !matches!(next, Some('}' | ']') | None) {
                    out.push(',');
                }
            }
            '：' => out.push(':'),
            _ => out.push(c),
        }
    }
    serde_json::from_str(&out).ok()
}

fn field<'a>(obj: &'a serde_json::Map<String, Value>, names: &[&str]) -> Option<&'a Value> {
    names
        .iter()
        .find_map(|n| obj.get(*n))
        .filter(|v| !v.is_null())
}

fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

const DESCRIPTION: &[&str] = &["description", "desc", "描述", "违规描述", "问题描述"];
const RULE: &[&str] = &[
    "rule",
    "regulation",
    "citation",
    "违反规定",
    "违反条款",
    "依据",
];
const RISK: &[&str] = &["risk", "risk_level", "风险等级", "风险"];
const SUGGESTION: &[&str] = &["suggestion", "advice", "改进建议", "整改建议", "建议"];
const BOX: &[&str] = &["box", "bbox", "bbox_2d", "位置"];
const VIOLATIONS: &[&str] = &["violations", "违规", "违规项"];

fn violation(v: &Value) -> Option<ReplyViolation> {
    let obj = v.as_object()?;
    let out = ReplyViolation {
        description: field(obj, DESCRIPTION)
            .and_then(text_of)
            .unwrap_or_default(),
        rule: field(obj, RULE).and_then(text_of),
        risk: field(obj, RISK)
            .and_then(text_of)
            .and_then(|r| Risk::parse(&r)),
        suggestion: field(obj, SUGGESTION).and_then(text_of),
        bbox: field(obj, BOX).and_then(bbox),
    };
    (!out.description.is_empty() || out.rule.is_some()).then_some(out)
}

fn bbox(v: &Value) -> Option<[f64; 4]> {
    let a = v.as_array()?;
    if a.len() != 4 {
        return None;
    }
    let mut b = [0f64; 4];
    for (slot, x) in b.iter_mut().zip(a) {
        let n = match x {
            Value::Number(n) => n.as_f64()?,
            Value::String(s) => s.trim().parse().ok()?,
            _ => return None,
        };
        if !n.is_finite() {
            return None;
        }
        *slot = n.clamp(0.0, crate::answer::BOX_SCALE);
    }
    let [x1, y1, x2, y2] = b;
    Some([x1.min(x2), y1.min(y2), x1.max(x2), y1.max(y2)])
}

fn status_of(obj: &serde_json::Map<String, Value>) -> Option<ReplyStatus> {
    let s = field(obj, &["status", "result", "结论"]).and_then(text_of)?;
    let s = s.to_lowercase();
    if s.contains("safe") || s.contains("安全") || s.contains("未发现") || s.contains("合规")
    {
        Some(ReplyStatus::Safe)
    } else if s.contains("violation") || s.contains("违规") || s.contains("unsafe") {
        Some(ReplyStatus::Violation)
    } else {
        None
    }
}

/// A complete JSON object → a reply, if it looks like an answer.
fn from_value(v: &Value) -> Option<Reply> {
    let obj = v.as_object()?;
    let status = status_of(obj);
    let list = field(obj, VIOLATIONS);
    if status.is_none() && list.is_none() {
        return None;
    }
    let violations: Vec<ReplyViolation> = list
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(violation).collect())
        .unwrap_or_default();
    let status = if !violations.is_empty() {
        ReplyStatus::Violation
    } else {
        // "violation" with nothing readable still predicts a violation; no status and an
        // empty list reads as safe only when the list is really there and empty.
        match status {
            Some(s) => s,
            None if list.and_then(Value::as_array).is_some() => ReplyStatus::Safe,
            None => ReplyStatus::Unparsed,
        }
    };
    Some(Reply {
        status,
        violations,
        truncated: false,
        format: ReplyFormat::Json,
    })
}

/// A JSON object that breaks off: keep every violation object written out completely.
fn salvage(text: &str, start: usize) -> Option<Reply> {
    let rest = &text[start..];
    let list_at = VIOLATIONS
        .iter()
        .filter_map(|k| rest.find(&format!("\"{k}\"")))
        .min();
    let status_hint = {
        let head = list_at.map_or(rest, |i| &rest[..i]);
        if head.contains("\"safe\"") {
            Some(ReplyStatus::Safe)
        } else if head.contains("\"violation\"") {
            Some(ReplyStatus::Violation)
        } else {
            None
        }
    };
    let violations: Vec<ReplyViolation> = list_start(rest)
        .map(|at| {
            complete_violations(rest, at)
                .into_iter()
                .map(|(_, v)| v)
                .collect()
        })
        .unwrap_or_default();
    if violations.is_empty() && status_hint.is_none() {
        return None;
    }
    Some(Reply {
        status: if violations.is_empty() {
            // A cut-off answer that had said "violation" still predicts one.
            status_hint.expect("checked")
        } else {
            ReplyStatus::Violation
        },
        violations,
        truncated: true,
        format: ReplyFormat::Json,
    })
}
