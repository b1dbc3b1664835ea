//! The one conversation the model is trained on and asked: the canonical instruction, the
//! canonical JSON answer, and the numbered Chinese list that older tools write.
//!
//! Training builds its conversations with [`Answer::from_annotation`] and [`Answer::to_json`];
//! inspection sends the same [`INSTRUCTION`] and parses the same answer. Changing the
//! instruction or the answer schema means bumping [`PROMPT_VERSION`]: cached inspections and
//! adapters are keyed by it, and a test pins the instruction's hash to the version.
//!
//! A model is trained with one [`Prompt`]: the full [`INSTRUCTION`] (the default, and what a
//! pretrained instruction-following model needs), or the one-line [`INSTRUCTION_BRIEF`] for
//! small models trained from scratch, for which the full instruction's 105 tokens are only cost.
//! Both ask for the same answer schema. The model directory records which one it learnt
//! (`inspector_model.json`, `prompt_version`), and inspection sends that one.

use serde::{Deserialize, Serialize};

use crate::{Annotation, BBox, Risk, Violation};

/// Version of [`INSTRUCTION`] and of the answer schema.
pub const PROMPT_VERSION: &str = "inspect-v1";

/// The instruction sent with every photo, in training and in inspection. It does not list the
/// rules: the model learns the plant's rules in fine-tuning, and citations are checked against
/// the database afterwards.
pub const INSTRUCTION: &str = "你是工厂安全巡检员。请检查这张现场照片，找出其中违反安全规章制度的行为。\
只输出一个JSON对象，格式为：{\"status\": \"violation\", \"violations\": [{\"description\": \"违规描述\", \
\"rule\": \"违反的规章条款，如《安全作业规程》第3.1条\", \"risk\": \"高、中或低\", \"suggestion\": \"改进建议\", \
\"box\": [x1, y1, x2, y2]}]}，其中box为违规位置在图中的坐标，按0到1000归一化。\
未发现违规行为时输出{\"status\": \"safe\", \"violations\": []}。";

/// Version of [`INSTRUCTION_BRIEF`] (same answer schema as [`PROMPT_VERSION`]).
pub const PROMPT_VERSION_BRIEF: &str = "inspect-brief-v1";

/// The one-line instruction of models trained from scratch on this task (the bundled demo
/// model): the answer format is learnt from the answers, not read from the prompt.
pub const INSTRUCTION_BRIEF: &str = "安全巡检：找出照片中的违规，输出JSON。";

/// Which instruction a model was trained with, and so is asked with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Prompt {
    /// [`INSTRUCTION`], version [`PROMPT_VERSION`].
    #[default]
    Full,
    /// [`INSTRUCTION_BRIEF`], version [`PROMPT_VERSION_BRIEF`].
    Brief,
}

impl Prompt {
    pub const ALL: [Prompt; 2] = [Prompt::Full, Prompt::Brief];

    /// The version string recorded with models, adapters, findings and cache keys.
    pub fn version(self) -> &'static str {
        match self {
            Prompt::Full => PROMPT_VERSION,
            Prompt::Brief => PROMPT_VERSION_BRIEF,
        }
    }

    /// The instruction text.
    pub fn instruction(self) -> &'static str {
        match self {
            Prompt::Full => INSTRUCTION,
            Prompt::Brief => INSTRUCTION_BRIEF,
        }
    }

    /// The prompt of a recorded version; `None` for a version this build does not know.
    pub fn from_version(version: &str) -> Option<Prompt> {
        Prompt::ALL.into_iter().find(|p| p.version() == version)
    }

    /// The prompt a model or adapter directory records in `inspector_model.json` or
    /// `inspector_adapter.json` (`prompt_version`); `Ok(None)` when neither file says, as in a
    /// model published by others. An unreadable file or an unknown version is an error that
    /// names the file.
    pub fn recorded_in(dir: &std::path::Path) -> Result<Option<Prompt>, String> {
        for name in ["inspector_adapter.json", "inspector_model.json"] {
            let path = dir.join(name);
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("{}: {e}", path.display())),
            };
            let value: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
            return match value.get("prompt_version") {
                None => Ok(None),
                Some(v) => v
                    .as_str()
                    .and_then(Prompt::from_version)
                    .map(Some)
                    .ok_or_else(|| {
                        format!(
                            "{}: prompt_version {v} is not one this build knows ({})",
                            path.display(),
                            Prompt::ALL.map(Prompt::version).join(", ")
                        )
                    }),
            };
        }
        Ok(None)
    }
}

/// The side of the normalised coordinate square Qwen2-VL grounds boxes in.
pub const BOX_SCALE: f64 = 1000.0;

/// Safe or not, as the answer states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Safe,
    Violation,
}

/// One violation as the model writes it: box on the 0–1000 scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerViolation {
    pub description: String,
    pub rule: String,
    pub risk: Risk,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suggestion: Option<String>,
    #[serde(default, rename = "box", skip_serializing_if = "Option::is_none")]
    pub bbox: Option<[u32; 4]>,
}

/// The canonical answer: `{"status", "violations"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub status: Status,
    pub violations: Vec<AnswerViolation>,
}

/// The canonical answer as a JSON schema (for `response_format` when another engine serves the
/// model), keys in the answer's order. `citations` are the values `rule` may take (the rules in
/// the database); empty allows any string. JSON Schema's subset cannot say "exactly four
/// integers of 0–1000", so `box` is at most four integers; a shorter box is dropped when the
/// answer is read.
pub fn json_schema(citations: &[String]) -> crate::json_schema::Json {
    use crate::json_schema::Json;
    let string = || Json::object([("type", Json::str("string"))]);
    let choice = |values: Vec<Json>| {
        Json::object([("type", Json::str("string")), ("enum", Json::Array(values))])
    };
    let rule = if citations.is_empty() {
        string()
    } else {
        choice(citations.iter().map(|c| Json::str(c.as_str())).collect())
    };
    let violation = Json::object([
        ("type", Json::str("object")),
        (
            "properties",
            Json::object([
                ("description", string()),
                ("rule", rule),
                (
                    "risk",
                    choice(
                        [Risk::High, Risk::Medium, Risk::Low]
                            .map(|r| Json::str(r.as_str()))
                            .into(),
                    ),
                ),
                ("suggestion", string()),
                (
                    "box",
                    Json::object([
                        ("type", Json::str("array")),
                        ("items", Json::object([("type", Json::str("integer"))])),
                        ("maxItems", Json::Number(4.into())),
                    ]),
                ),
            ]),
        ),
        (
            "required",
            Json::Array(vec![
                Json::str("description"),
                Json::str("rule"),
                Json::str("risk"),
            ]),
        ),
        ("additionalProperties", Json::Bool(false)),
    ]);
    Json::object([
        ("type", Json::str("object")),
        (
            "properties",
            Json::object([
                (
                    "status",
                    choice(vec![Json::str("safe"), Json::str("violation")]),
                ),
                (
                    "violations",
                    Json::object([("type", Json::str("array")), ("items", violation)]),
                ),
            ]),
        ),
        (
            "required",
            Json::Array(vec![Json::str("status"), Json::str("violations")]),
        ),
        ("additionalProperties", Json::Bool(false)),
    ])
}

/// Pixel box → 0–1000 box (rounded, clamped).
pub fn box_to_scale(b: &BBox, (w, h): (u32, u32)) -> [u32; 4] {
    let f = |v: f64, side: u32| (v / side as f64 * BOX_SCALE).round().clamp(0.0, BOX_SCALE) as u32;
    [f(b[0], w), f(b[1], h), f(b[2], w), f(b[3], h)]
}

/// 0–1000 box → pixel box (to 1/100 px).
pub fn box_from_scale(b: &[u32; 4], (w, h): (u32, u32)) -> BBox {
    let f = |v: u32, side: u32| (v as f64 * side as f64 / BOX_SCALE * 100.0).round() / 100.0;
    [f(b[0], w), f(b[1], h), f(b[2], w), f(b[3], h)]
}

impl Answer {
    /// The answer a photo's annotation teaches; `size` is the image's (oriented) width and
    /// height in pixels.
    pub fn from_annotation(annotation: &Annotation, size: (u32, u32)) -> Answer {
        let violations: Vec<AnswerViolation> = annotation
            .violations
            .iter()
            .map(|v| AnswerViolation {
                description: v.description.trim().to_string(),
                rule: v.rule.trim().to_string(),
                risk: v.risk,
                suggestion: v
                    .suggestion
                    .as_deref()
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
                bbox: v.bbox.as_ref().map(|b| box_to_scale(b, size)),
            })
            .collect();
        Answer {
            status: if violations.is_empty() {
                Status::Safe
            } else {
                Status::Violation
            },
            violations,
        }
    }

    /// The violations with boxes in pixels of an image of `size`.
    pub fn to_violations(&self, size: (u32, u32)) -> Vec<Violation> {
        self.violations
            .iter()
            .map(|v| Violation {
                description: v.description.clone(),
                rule: v.rule.clone(),
                risk: v.risk,
                suggestion: v.suggestion.clone(),
                bbox: v.bbox.as_ref().map(|b| box_from_scale(b, size)),
            })
            .collect()
    }

    /// Compact JSON, keys in schema order, Chinese unescaped: the exact training target.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an answer always serialises")
    }

    /// Strict parse of the canonical JSON (model output goes through the tolerant
    /// [`crate::reply::parse_reply`]).
    pub fn from_json(text: &str) -> Result<Answer, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// One violation read from the numbered Chinese list format.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListedViolation {
    pub description: String,
    /// The citation alone (`《安全作业规程》第3.1条`), without the clause text that often
    /// follows it.
    pub rule: Option<String>,
    /// The risk as written (`高风险`); [`Risk::parse`] reads it.
    pub risk: Option<String>,
    pub suggestion: Option<String>,
}

/// What the numbered-list text says: `Some(vec![])` is an explicit "safe"
/// (`未发现明显违规行为`), `None` is text that is neither a list nor a safe verdict.
///
/// ```text
/// 根据制造业安全规章制度分析,发现以下问题:
/// 1. 作业人员未佩戴安全帽,头部缺乏有效防护
///    违反规定:《安全作业规程》第3.1条:进入作业区域必须佩戴安全帽
///    风险等级:高风险
///    改进建议:立即佩戴安全帽
/// ```
///
/// Colons may be ASCII or full-width; items may be numbered `1.`, `1、`, `1)` or `（1）`; the
/// description may instead come on a `违规描述:` line.
pub fn parse_numbered_list(text: &str) -> Option<Vec<ListedViolation>> {
    let mut items: Vec<ListedViolation> = Vec::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let (numbered, rest) = match strip_item_number(line) {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        if numbered {
            items.push(ListedViolation::default());
        }
        let Some(item) = items.last_mut() else {
            continue; // preamble before the first item
        };
        match split_key(rest) {
            Some((Key::Description, v)) => item.description = v.to_string(),
            Some((Key::Rule, v)) => item.rule = Some(citation_part(v)),
            Some((Key::Risk, v)) => item.risk = Some(v.to_string()),
            Some((Key::Suggestion, v)) => item.suggestion = Some(v.to_string()),
            None if item.description.is_empty() => item.description = rest.to_string(),
            None => {
                // A continuation line: it belongs to the last field written.
                if let Some(s) = item.suggestion.as_mut() {
                    s.push_str(rest);
                } else {
                    item.description.push_str(rest);
                }
            }
        }
    }
    items.retain(|i| !i.description.is_empty() || i.rule.is_some());
    if !items.is_empty() {
        return Some(items);
    }
    let folded = crate::text::fold_width(text);
    [
        "未发现明显违规",
        "未发现违规",
        "没有发现违规",
        "未发现安全违规",
    ]
    .iter()
    .any(|p| folded.contains(p))
    .then(Vec::new)
}

/// Writes violations in the numbered Chinese list format [`parse_numbered_list`] reads.
pub fn format_numbered_list(violations: &[Violation]) -> String {
    if violations.is_empty() {
        return "根据制造业安全规章制度分析，未发现明显违规行为。".to_string();
    }
    let mut out = String::from("根据制造业安全规章制度分析，发现以下问题：\n");
    for (i, v) in violations.iter().enumerate() {
        out.push_str(&format!(
            "{}. {}\n   违反规定：{}\n   风险等级：{}风险\n",
            i + 1,
            v.description.trim(),
            v.rule.trim(),
            v.risk.as_str()
        ));
        if let Some(s) = v.suggestion.as_deref().filter(|s| !s.trim().is_empty()) {
            out.push_str(&format!("   改进建议：{}\n", s.trim()));
        }
    }
    out.truncate(out.trim_end().len());
    out
}

enum Key {
    Description,
    Rule,
    Risk,
    Suggestion,
}

/// `违反规定：…` → (Rule, "…"), for every key spelling the tutorial format and models use.
fn split_key(line: &str) -> Option<(Key, &str)> {
    const KEYS: [(&str, Key); 12] = [
        ("违规描述", Key::Description),
        ("问题描述", Key::Description),
        ("描述", Key::Description),
        ("违反规定", Key::Rule),
        ("违反条款", Key::Rule),
        ("违规条款", Key::Rule),
        ("依据", Key::Rule),
        ("风险等级", Key::Risk),
        ("风险", Key::Risk),
        ("改进建议", Key::Suggestion),
        ("整改建议", Key::Suggestion),
        ("建议", Key::Suggestion),
    ];
    let line = line.trim_start_matches(['-', '*', '•', ' ']);
    for (name, key) in KEYS {
        if let Some(rest) = line.strip_prefix(name) {
            let rest = rest.trim_start();
            if let Some(value) = rest.strip_prefix([':', '：']) {
                return Some((key, value.trim()));
            }
        }
    }
    None
}

/// `1. `, `1、`, `1)`, `（1）`, `(1)` at the start of a line → the rest.
fn strip_item_number(line: &str) -> Option<&str> {
    let line = line.trim_start_matches(['(', '（']);
    let digits = line.len() - line.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 || digits > 3 {
        return None;
    }
    let rest = &line[digits..];
    let rest = rest.strip_prefix(['.', '、', ')', '）', '．'])?;
    // "3.1条" is not an item number.
    if rest.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    Some(rest.trim())
}

/// The citation at the start of `违反规定` (`《T》第3.1条：clause text` → `《T》第3.1条`).
fn citation_part(value: &str) -> String {
    if let Some(close) = value.find('》') {
        let after = &value[close..];
        if let Some(end) = after.find('条') {
            return value[..close + end + '条'.len_utf8()].trim().to_string();
        }
        return value.trim().to_string();
    }
    value
        .split([':', '：'])
        .next()
        .unwrap_or(value)
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    /// The answer schema's grammar takes the canonical answers, safe or not, and holds `rule` to
    /// the citations given.
    #[test]
    fn the_answer_schema_takes_canonical_answers_and_only_given_citations() {
        use crate::{grammar::Viability, json_schema::SchemaGrammar};
        let citations = vec!["《安全作业规程》第3.1条".to_string()];
        let g = SchemaGrammar::compile(&json_schema(&citations)).unwrap();
        let violation = |rule: &str| crate::Violation {
            description: "未戴安全帽".into(),
            rule: rule.into(),
            risk: Risk::Medium,
            suggestion: Some("佩戴".into()),
            bbox: Some([1.0, 2.0, 30.0, 40.0]),
        };
        let answer = |v: Vec<crate::Violation>| {
            Answer::from_annotation(
                &Annotation {
                    image: "a.png".into(),
                    violations: v,
                },
                (64, 48),
            )
            .to_json()
        };
        for text in [answer(vec![]), answer(vec![violation(&citations[0]); 2])] {
            assert_eq!(g.check(text.as_bytes()), Viability::Complete, "{text}");
        }
        let other = answer(vec![violation("《电气安全规程》第12条")]);
        assert_eq!(g.check(other.as_bytes()), Viability::Invalid);
        // Without citations, any rule string.
        let free = SchemaGrammar::compile(&json_schema(&[])).unwrap();
        assert_eq!(free.check(other.as_bytes()), Viability::Complete);
        // Keys in the answer's order.
        assert!(
            json_schema(&[])
                .to_json()
                .starts_with(r#"{"type":"object","properties":{"status""#)
        );
    }

    /// Changing the instruction without bumping the version would mix caches and adapters of
    /// two prompts. If this fails: bump `PROMPT_VERSION`, then update the hash here.
    #[test]
    fn instruction_is_pinned_to_its_version() {
        let hash = hex(&Sha256::digest(INSTRUCTION.as_bytes())[..8]);
        assert_eq!(
            (PROMPT_VERSION, hash.as_str()),
            ("inspect-v1", "b8967390394ce20a"),
            "the instruction changed: bump PROMPT_VERSION"
        );
        let hash = hex(&Sha256::digest(INSTRUCTION_BRIEF.as_bytes())[..8]);
        assert_eq!(
            (PROMPT_VERSION_BRIEF, hash.as_str()),
            ("inspect-brief-v1", "1a0837d9a94613c7"),
            "the brief instruction changed: bump PROMPT_VERSION_BRIEF"
        );
        for p in Prompt::ALL {
            assert_eq!(Prompt::from_version(p.version()), Some(p));
        }
        assert_eq!(Prompt::from_version("inspect-v0"), None);
    }

    /// What a model or adapter directory records picks the prompt; an unknown version or a
    /// broken file is an error naming the file, never a silent fall-back to the full prompt.
    #[test]
    fn the_recorded_prompt_is_read_and_bad_records_are_refused() {
        let dir = std::env::temp_dir().join(format!("inspector-prompt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(Prompt::recorded_in(&dir), Ok(None));
        let model = dir.join("inspector_model.json");
        std::fs::write(&model, r#"{"min_pixels": 3136}"#).unwrap();
        assert_eq!(Prompt::recorded_in(&dir), Ok(None));
        std::fs::write(&model, r#"{"prompt_version": "inspect-brief-v1"}"#).unwrap();
        assert_eq!(Prompt::recorded_in(&dir), Ok(Some(Prompt::Brief)));
        // The adapter's record is read first.
        let adapter = dir.join("inspector_adapter.json");
        std::fs::write(&adapter, r#"{"prompt_version": "inspect-v1"}"#).unwrap();
        assert_eq!(Prompt::recorded_in(&dir), Ok(Some(Prompt::Full)));
        std::fs::write(&adapter, r#"{"prompt_version": "inspect-v9"}"#).unwrap();
        let e = Prompt::recorded_in(&dir).unwrap_err();
        assert!(
            e.contains("inspector_adapter.json") && e.contains("inspect-v9"),
            "{e}"
        );
        std::fs::write(&adapter, "{not json").unwrap();
        let e = Prompt::recorded_in(&dir).unwrap_err();
        assert!(
            e.contains("inspector_adapter.json") && e.contains("not JSON"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn boxes_round_trip_within_one_unit() {
        for size in [(640, 480), (1003, 757), (37, 2000)] {
            for b in [[0, 0, 1000, 1000], [123, 456, 789, 999], [1, 2, 3, 4]] {
                let px = box_from_scale(&b, size);
                let back = box_to_scale(&px, size);
                for k in 0..4 {
                    assert!(
                        back[k].abs_diff(b[k]) <= 1,
                        "{size:?} {b:?} → {px:?} → {back:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn answer_json_is_canonical() {
        let a = Annotation {
            image: "x.png".into(),
            violations: vec![Violation {
                description: " 未戴安全帽 ".into(),
                rule: "《安全作业规程》第3.1条".into(),
                risk: Risk::High,
                suggestion: Some("佩戴安全帽".into()),
                bbox: Some([64.0, 48.0, 320.0, 240.0]),
            }],
        };
        let answer = Answer::from_annotation(&a, (640, 480));
        assert_eq!(
            answer.to_json(),
            r#"{"status":"violation","violations":[{"description":"未戴安全帽","rule":"《安全作业规程》第3.1条","risk":"高","suggestion":"佩戴安全帽","box":[100,100,500,500]}]}"#
        );
        assert_eq!(Answer::from_json(&answer.to_json()).unwrap(), answer);
        let safe = Answer::from_annotation(
            &Annotation {
                image: "y".into(),
                violations: vec![],
            },
            (1, 1),
        );
        assert_eq!(safe.to_json(), r#"{"status":"safe","violations":[]}"#);
    }

    #[test]
    fn numbered_list_as_the_tutorial_writes_it() {
        let text = "根据制造业安全规章制度分析,发现以下问题:\n\
                    1. 作业人员未佩戴安全帽,头部缺乏有效防护\n   违反规定:《安全作业规程》第3.1条:进入作业区域必须佩戴安全帽\n   风险等级:高风险\n\
                    2、通道堆放杂物\n   违反规定：《现场管理制度》第十二条\n   风险等级：中\n   改进建议：立即清理通道\n";
        let items = parse_numbered_list(text).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(
            items[0].description,
            "作业人员未佩戴安全帽,头部缺乏有效防护"
        );
        assert_eq!(items[0].rule.as_deref(), Some("《安全作业规程》第3.1条"));
        assert_eq!(items[0].risk.as_deref(), Some("高风险"));
        assert_eq!(items[0].suggestion, None);
        assert_eq!(items[1].rule.as_deref(), Some("《现场管理制度》第十二条"));
        assert_eq!(items[1].suggestion.as_deref(), Some("立即清理通道"));

        let prompt_style = "1. 违规描述：工人未系安全带\n违反规定: 《高处作业规定》第5条\n风险等级: 高\n改进建议: 系好安全带";
        let items = parse_numbered_list(prompt_style).unwrap();
        assert_eq!(items[0].description, "工人未系安全带");
        assert_eq!(items[0].suggestion.as_deref(), Some("系好安全带"));

        assert_eq!(
            parse_numbered_list("经检查，未发现明显违规行为。"),
            Some(vec![])
        );
        assert_eq!(parse_numbered_list("图中是一台机器。"), None);
        assert_eq!(parse_numbered_list(""), None);
    }

    #[test]
    fn numbered_list_round_trips() {
        let vs = vec![Violation {
            description: "叉车超速".into(),
            rule: "《厂内交通安全规定》第4.2条".into(),
            risk: Risk::Medium,
            suggestion: Some("限速行驶".into()),
            bbox: None,
        }];
        let items = parse_numbered_list(&format_numbered_list(&vs)).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].description, "叉车超速");
        assert_eq!(
            items[0].rule.as_deref(),
            Some("《厂内交通安全规定》第4.2条")
        );
        assert_eq!(
            items[0].risk.as_deref().and_then(Risk::parse),
            Some(Risk::Medium)
        );
        assert_eq!(items[0].suggestion.as_deref(), Some("限速行驶"));
        assert_eq!(
            parse_numbered_list(&format_numbered_list(&[])),
            Some(vec![])
        );
    }
}
