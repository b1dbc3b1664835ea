//! Reports of an inspection run: the readable text report (Chinese by default), CSV rows, and
//! a self-contained HTML page with every photo, its boxes and labels drawn, and a summary
//! table. Model output is untrusted text: the HTML template escapes everything it inserts.

use inspector_core::{Risk, reply::ReplyStatus};
use serde::Serialize;

use crate::Finding;

/// Report language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lang {
    #[default]
    Zh,
    En,
}

impl std::str::FromStr for Lang {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zh" | "zh-CN" | "cn" => Ok(Lang::Zh),
            "en" => Ok(Lang::En),
            other => Err(format!("unknown language `{other}` (zh or en)")),
        }
    }
}

/// One photo's outcome in a run: its finding, or why it could not be inspected.
#[derive(Debug, Clone, Serialize)]
pub struct Entry<'a> {
    pub image: &'a str,
    pub finding: Option<&'a Finding>,
    pub error: Option<String>,
}

fn risk_word(r: Option<Risk>, lang: Lang) -> &'static str {
    match (r, lang) {
        (Some(Risk::High), Lang::Zh) => "高风险",
        (Some(Risk::Medium), Lang::Zh) => "中风险",
        (Some(Risk::Low), Lang::Zh) => "低风险",
        (None, Lang::Zh) => "未知",
        (Some(Risk::High), Lang::En) => "high",
        (Some(Risk::Medium), Lang::En) => "medium",
        (Some(Risk::Low), Lang::En) => "low",
        (None, Lang::En) => "unknown",
    }
}

fn status_word(s: ReplyStatus, lang: Lang) -> &'static str {
    match (s, lang) {
        (ReplyStatus::Safe, Lang::Zh) => "安全",
        (ReplyStatus::Violation, Lang::Zh) => "发现违规",
        (ReplyStatus::Unparsed, Lang::Zh) => "无法解析",
        (ReplyStatus::Safe, Lang::En) => "safe",
        (ReplyStatus::Violation, Lang::En) => "violation",
        (ReplyStatus::Unparsed, Lang::En) => "unparsed",
    }
}

/// The readable report of one photo.
pub fn text(entry: &Entry, lang: Lang) -> String {
    let zh = lang == Lang::Zh;
    let mut out = String::new();
    let Some(f) = entry.finding else {
        let e = entry.error.as_deref().unwrap_or("");
        return if zh {
            format!("图片：{}\n无法检查：{e}\n", entry.image)
        } else {
            format!("Image: {}\nCould not inspect: {e}\n", entry.image)
        };
    };
    out.push_str(&if zh {
        format!(
            "图片：{}（{}×{}）\n",
            entry.image, f.image.width, f.image.height
        )
    } else {
        format!(
            "Image: {} ({}×{})\n",
            entry.image, f.image.width, f.image.height
        )
    });
    match f.status {
        ReplyStatus::Safe => out.push_str(if zh {
            "结论：未发现明显违规行为。\n"
        } else {
            "Verdict: no obvious violation found.\n"
        }),
        ReplyStatus::Unparsed => {
            let raw: String = f.raw.chars().take(200).collect();
            out.push_str(&if zh {
                format!("结论：无法解析模型回答（按违规处理，请人工复核）。\n模型回答：{raw}\n")
            } else {
                format!("Verdict: the answer could not be read (counted as a violation; please review).\nAnswer: {raw}\n")
            });
        }
        ReplyStatus::Violation => {
            let s = &f.summary;
            out.push_str(&if zh {
                format!(
                    "结论：发现 {} 项违规（高风险 {}，中风险 {}，低风险 {}{}）\n",
                    s.total,
                    s.high,
                    s.medium,
                    s.low,
                    if s.unknown > 0 {
                        format!("，未知 {}", s.unknown)
                    } else {
                        String::new()
                    }
                )
            } else {
                format!(
                    "Verdict: {} violation(s) (high {}, medium {}, low {}{})\n",
                    s.total,
                    s.high,
                    s.medium,
                    s.low,
                    if s.unknown > 0 {
                        format!(", unknown {}", s.unknown)
                    } else {
                        String::new()
                    }
                )
            });
            if f.violations.is_empty() {
                out.push_str(if zh {
                    "（模型判定违规，但未给出可读的明细）\n"
                } else {
                    "(the model said violation but gave no readable details)\n"
                });
            }
            for (i, v) in f.violations.iter().enumerate() {
                out.push_str(&format!("{}. {}\n", i + 1, v.description));
                let rule = match (&v.resolved, &v.rule) {
                    (Some(r), _) => format!("{}：{}", r.citation, r.text),
                    (None, Some(written)) => format!(
                        "{written}{}",
                        if zh {
                            "（未在规章库中找到，未验证）"
                        } else {
                            " (not found in the rules database: unverified)"
                        }
                    ),
                    (None, None) => if zh {
                        "（未给出）"
                    } else {
                        "(none given)"
                    }
                    .to_string(),
                };
                out.push_str(&if zh {
                    format!(
                        "   违反规定：{rule}\n   风险等级：{}\n",
                        risk_word(v.risk, lang)
                    )
                } else {
                    format!("   Rule: {rule}\n   Risk: {}\n", risk_word(v.risk, lang))
                });
                if let Some(s) = &v.suggestion {
                    out.push_str(&if zh {
                        format!("   改进建议：{s}\n")
                    } else {
                        format!("   Suggestion: {s}\n")
                    });
                }
                if let Some([x1, y1, x2, y2]) = v.bbox {
                    out.push_str(&if zh {
                        format!("   位置：({x1:.0}, {y1:.0}) – ({x2:.0}, {y2:.0})\n")
                    } else {
                        format!("   Where: ({x1:.0}, {y1:.0}) – ({x2:.0}, {y2:.0})\n")
                    });
                }
            }
        }
    }
    if f.truncated {
        out.push_str(if zh {
            "注意：模型回答被截断，仅保留完整的违规项。\n"
        } else {
            "Note: the answer was cut off; only complete violations are kept.\n"
        });
    }
    out
}

/// CSV header and rows: one row per violation, and one per photo without any (safe,
/// unparsed, or not inspected).
pub fn csv(entries: &[Entry]) -> Result<Vec<u8>, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "image",
        "status",
        "violation",
        "description",
        "rule",
        "verified",
        "rule_id",
        "rule_text",
        "risk",
        "suggestion",
        "x1",
        "y1",
        "x2",
        "y2",
        "score",
        "error",
    ])?;
    let num = |v: Option<f64>| v.map(|x| format!("{x}")).unwrap_or_default();
    for e in entries {
        let Some(f) = e.finding else {
            let mut row = vec![e.image.to_string(), "error".into()];
            row.extend(std::iter::repeat_n(String::new(), 13));
            row.push(e.error.clone().unwrap_or_default());
            w.write_record(&row)?;
            continue;
        };
        let status = status_word(f.status, Lang::En);
        if f.violations.is_empty() {
            let mut row = vec![e.image.to_string(), status.into()];
            row.extend(std::iter::repeat_n(String::new(), 14));
            w.write_record(&row)?;
        }
        for (i, v) in f.violations.iter().enumerate() {
            let b = v.bbox;
            w.write_record([
                e.image.to_string(),
                status.into(),
                (i + 1).to_string(),
                v.description.clone(),
                v.resolved
                    .as_ref()
                    .map(|r| r.citation.clone())
                    .or(v.rule.clone())
                    .unwrap_or_default(),
                v.verified.to_string(),
                v.resolved
                    .as_ref()
                    .map(|r| r.id.clone())
                    .unwrap_or_default(),
                v.resolved
                    .as_ref()
                    .map(|r| r.text.clone())
                    .unwrap_or_default(),
                v.risk.map(|r| r.as_str().to_string()).unwrap_or_default(),
                v.suggestion.clone().unwrap_or_default(),
                num(b.map(|b| b[0])),
                num(b.map(|b| b[1])),
                num(b.map(|b| b[2])),
                num(b.map(|b| b[3])),
                num(v.score),
                String::new(),
            ])?;
        }
    }
    w.into_inner().map_err(|e| e.into_error().into())
}

const HTML: &str = include_str!("report.html");

/// A self-contained HTML report: `images[i]` holds the bytes of `entries[i]`'s photo (shown
/// inline as a data URI, with its boxes drawn over it).
pub fn html(entries: &[Entry], images: &[Option<&[u8]>], lang: Lang) -> Result<String, String> {
    use base64::Engine;
    let zh = lang == Lang::Zh;
    let rows: Vec<serde_json::Value> = entries
        .iter()
        .zip(images)
        .map(|(e, bytes)| {
            let mime = bytes
                .and_then(|b| image::guess_format(b).ok())
                .map(|f| f.to_mime_type())
                .unwrap_or("application/octet-stream");
            let src = bytes.map(|b| {
                format!(
                    "data:{mime};base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(b)
                )
            });
            let violations: Vec<serde_json::Value> = e
                .finding
                .map(|f| {
                    f.violations
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            serde_json::json!({
                                "n": i + 1,
                                "description": v.description,
                                "citation": v.resolved.as_ref().map(|r| r.citation.clone()).or(v.rule.clone()),
                                "rule_text": v.resolved.as_ref().map(|r| r.text.clone()),
                                "verified": v.verified,
                                "risk": risk_word(v.risk, lang),
                                "risk_class": match v.risk {
                                    Some(Risk::High) => "high",
                                    Some(Risk::Medium) => "medium",
                                    Some(Risk::Low) => "low",
                                    None => "unknown",
                                },
                                "suggestion": v.suggestion,
                                "box": v.bbox.map(|[x1, y1, x2, y2]| serde_json::json!({
                                    "x": x1, "y": y1, "w": x2 - x1, "h": y2 - y1,
                                })),
                                "score": v.score.map(|s| format!("{s:.2}")),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            serde_json::json!({
                "image": e.image,
                "src": src,
                "error": e.error,
                "width": e.finding.map(|f| f.image.width),
                "height": e.finding.map(|f| f.image.height),
                "status": e.finding.map(|f| status_word(f.status, lang)),
                "status_class": e.finding.map(|f| status_word(f.status, Lang::En)),
                "summary": e.finding.map(|f| &f.summary),
                "truncated": e.finding.is_some_and(|f| f.truncated),
                "violations": violations,
            })
        })
        .collect();
    let t = |zh_text: &'static str, en: &'static str| if zh { zh_text } else { en };
    let words = serde_json::json!({
        "title": t("安全巡检报告", "Safety inspection report"),
        "image": t("图片", "Image"),
        "status": t("结论", "Verdict"),
        "high": t("高", "High"),
        "medium": t("中", "Medium"),
        "low": t("低", "Low"),
        "total": t("违规数", "Violations"),
        "rule": t("违反规定", "Rule"),
        "risk": t("风险等级", "Risk"),
        "suggestion": t("改进建议", "Suggestion"),
        "unverified": t("未在规章库中找到（未验证）", "not in the rules database (unverified)"),
        "safe_text": t("未发现明显违规行为。", "No obvious violation found."),
        "error": t("无法检查", "Could not inspect"),
        "truncated": t("模型回答被截断", "The answer was cut off"),
        "score": t("置信度", "Confidence"),
        "photos": t("张照片", "photos"),
    });
    let mut env = minijinja::Environment::new();
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
    env.add_template("report", HTML)
        .map_err(|e| e.to_string())?;
    env.get_template("report")
        .and_then(|t| {
            t.render(minijinja::context! {
                lang => if zh { "zh-CN" } else { "en" },
                w => words,
                rows => rows,
            })
        })
        .map_err(|e| e.to_string())
}
