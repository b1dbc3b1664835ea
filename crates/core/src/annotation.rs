//! Annotation records (one JSONL line per image) and their parts: violations, risk levels,
//! boxes. Parsing from JSON and validation against files live in the dataset crate.

use serde::{Deserialize, Serialize};

/// Risk level: 高 / 中 / 低.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Risk {
    #[serde(rename = "高")]
    High,
    #[serde(rename = "中")]
    Medium,
    #[serde(rename = "低")]
    Low,
}

impl Risk {
    /// Reads a risk as people and models write it: 高/中/低, 高风险, 重大, high, H, 3, …
    /// (case and surrounding spaces ignored). `None` when it is none of them.
    pub fn parse(text: &str) -> Option<Risk> {
        let t = crate::text::fold_width(text).trim().to_lowercase();
        let t = t
            .trim_end_matches("风险")
            .trim_end_matches("等级")
            .trim_end_matches("risk")
            .trim();
        Some(match t {
            "高" | "较高" | "重大" | "严重" | "high" | "h" | "3" => Risk::High,
            "中" | "中等" | "一般" | "较大" | "medium" | "med" | "m" | "2" => Risk::Medium,
            "低" | "较低" | "轻微" | "low" | "l" | "1" => Risk::Low,
            _ => return None,
        })
    }

    /// 高 / 中 / 低.
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::High => "高",
            Risk::Medium => "中",
            Risk::Low => "低",
        }
    }
}

/// A box `[x1, y1, x2, y2]`: image pixels in annotations, 0–1000 in model answers.
pub type BBox = [f64; 4];

/// One violation in an annotated image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Violation {
    pub description: String,
    /// A citation that must resolve to a rule.
    pub rule: String,
    pub risk: Risk,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suggestion: Option<String>,
    #[serde(default, rename = "box", skip_serializing_if = "Option::is_none")]
    pub bbox: Option<BBox>,
}

/// One annotated image; no violations marks a safe photo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Annotation {
    /// Relative to the annotation file's folder.
    pub image: String,
    pub violations: Vec<Violation>,
}

#[cfg(test)]
mod tests {
    use super::Risk;

    #[test]
    fn risk_synonyms() {
        for (text, want) in [
            ("高", Some(Risk::High)),
            ("高风险", Some(Risk::High)),
            ("High", Some(Risk::High)),
            (" H ", Some(Risk::High)),
            ("high risk", Some(Risk::High)),
            ("中等风险", Some(Risk::Medium)),
            ("medium", Some(Risk::Medium)),
            ("低", Some(Risk::Low)),
            ("ｌｏｗ", Some(Risk::Low)),
            ("危险", None),
            ("", None),
        ] {
            assert_eq!(Risk::parse(text), want, "{text}");
        }
    }
}
