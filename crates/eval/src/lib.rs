//! Comparing predictions with gold annotations, computed the way everyone else computes them.
//!
//! - `binary`: violation vs safe per image, as scikit-learn's `accuracy_score` and
//!   `precision_recall_fscore_support(average="binary", zero_division=0)`; an unparsed
//!   prediction counts as a violation prediction (only an explicit "safe" is safe).
//! - `per_rule`: each image's set of cited rules against the gold set, as scikit-learn's
//!   multilabel `precision_recall_fscore_support(average=None)`; a predicted violation matches a
//!   gold one of the same image when the rule is the same.
//! - `per_category` / `per_risk`: the same labels, micro-averaged over the rules of a category,
//!   and over (rule, risk) labels of a risk level (the risk must match too).
//! - `citation_accuracy`: of the gold (image, rule) violations, the share predicted.
//! - `box`: over matched violations where both sides have boxes, precision and recall at
//!   IoU ≥ 0.5 (greedy by IoU); `ap50`: COCO-style AP at IoU 0.5 with one category per rule,
//!   averaged over rules with gold boxes, exactly as pycocotools' `COCOeval` — when every
//!   predicted box carries a score.
//!
//! ```
//! use inspector_core::{Risk, reply::ReplyStatus};
//! use inspector_eval::{evaluate, Gold, GoldViolation, Prediction, PredictedViolation};
//!
//! let gold = Gold { image: "a.png".into(), violations: vec![GoldViolation {
//!     rule: "《安全作业规程》第3.1条".into(), category: Some("安全防护".into()),
//!     risk: Risk::High, bbox: Some([10.0, 10.0, 50.0, 80.0]) }] };
//! let pred = Prediction { image: "a.png".into(), status: ReplyStatus::Violation,
//!     violations: vec![PredictedViolation { rule: "《安全作业规程》第3.1条".into(),
//!     category: Some("安全防护".into()), risk: Some(Risk::High),
//!     bbox: Some([12.0, 10.0, 50.0, 78.0]), score: Some(0.9) }] };
//! let report = evaluate(&[(gold, pred)]);
//! assert_eq!(report.binary.f1, 1.0);
//! assert_eq!(report.citation_accuracy, 1.0);
//! assert!((report.r#box.ap50.unwrap() - 1.0).abs() < 1e-9); // pycocotools: 1 − 2⁻⁵²
//! ```

use std::collections::{BTreeMap, BTreeSet};

use inspector_core::{BBox, Risk, reply::ReplyStatus};
use serde::{Deserialize, Serialize};

mod coco;

pub use coco::{Detection, GroundTruth, ap50};

/// One gold violation: the rule as its canonical citation, its category (from the rules
/// database), risk and box in pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldViolation {
    pub rule: String,
    pub category: Option<String>,
    pub risk: Risk,
    pub bbox: Option<BBox>,
}

/// A gold image; no violations means safe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gold {
    pub image: String,
    pub violations: Vec<GoldViolation>,
}

/// One predicted violation: the rule as its canonical citation when it resolved, else as
/// written; box in pixels; `score` its confidence (mean token probability in model runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictedViolation {
    pub rule: String,
    pub category: Option<String>,
    pub risk: Option<Risk>,
    pub bbox: Option<BBox>,
    pub score: Option<f64>,
}

/// The prediction for one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub image: String,
    pub status: ReplyStatus,
    pub violations: Vec<PredictedViolation>,
}

/// Precision, recall and F1 of one label or group.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Gold positives.
    pub support: u64,
    /// Predicted positives.
    pub predicted: u64,
}

impl Prf {
    /// From counts, with scikit-learn's `zero_division=0`.
    pub fn from_counts(tp: u64, predicted: u64, support: u64) -> Prf {
        let div = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let (precision, recall) = (div(tp, predicted), div(tp, support));
        // sklearn: F = 2·tp / (2·tp + fp + fn), 0 when the denominator is.
        let f1 = div(2 * tp, predicted + support);
        Prf {
            precision,
            recall,
            f1,
            support,
            predicted,
        }
    }
}

/// Violation (positive) vs safe, per image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Binary {
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// Box quality over matched violations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoxMetrics {
    pub precision: f64,
    pub recall: f64,
    /// Boxes compared: gold and predicted, in matched (image, rule) groups.
    pub gold_boxes: u64,
    pub predicted_boxes: u64,
    /// COCO AP at IoU 0.5, per rule, averaged; `None` without scores or gold boxes.
    pub ap50: Option<f64>,
    /// The same precision and recall for each rule's matched violations (`ap50` left out).
    #[serde(default)]
    pub per_rule: BTreeMap<String, BoxCounts>,
}

/// Box precision and recall of one rule's matched violations.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BoxCounts {
    pub precision: f64,
    pub recall: f64,
    pub gold_boxes: u64,
    pub predicted_boxes: u64,
}

/// Everything `inspector eval --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub images: u64,
    pub binary: Binary,
    /// `[[tn, fp], [fn, tp]]` with violation as the positive class (scikit-learn's layout).
    pub confusion: [[u64; 2]; 2],
    pub unparsed: u64,
    pub citation_accuracy: f64,
    pub per_rule: BTreeMap<String, Prf>,
    pub per_category: BTreeMap<String, Prf>,
    pub per_risk: BTreeMap<String, Prf>,
    pub r#box: BoxMetrics,
}

/// The category key of a rule with none (a citation that did not resolve).
pub const UNVERIFIED: &str = "unverified";
/// The risk key of a predicted violation whose risk could not be read.
pub const UNKNOWN_RISK: &str = "unknown";

/// Compares each gold image with its prediction.
pub fn evaluate(pairs: &[(Gold, Prediction)]) -> Report {
    let mut confusion = [[0u64; 2]; 2];
    let mut unparsed = 0;
    // (label → tp, predicted, support) for rules, categories and risks.
    let mut rules: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    let mut categories: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    let mut risks: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    let (mut box_tp, mut box_gold, mut box_pred) = (0u64, 0u64, 0u64);
    // rule → (tp, gold, predicted) boxes.
    let mut rule_boxes: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    let mut gts = Vec::new();
    let mut dets = Vec::new();
    let mut scored = true;

    for (k, (gold, pred)) in pairs.iter().enumerate() {
        let truth = !gold.violations.is_empty();
        let guess = pred.status.predicts_violation();
        confusion[truth as usize][guess as usize] += 1;
        unparsed += (pred.status == ReplyStatus::Unparsed) as u64;

        // Rule labels of this image, with the category each belongs to.
        let g_rules: BTreeMap<&str, Option<&str>> = gold
            .violations
            .iter()
            .map(|v| (v.rule.as_str(), v.category.as_deref()))
            .collect();
        let p_rules: BTreeMap<&str, Option<&str>> = pred
            .violations
            .iter()
            .map(|v| (v.rule.as_str(), v.category.as_deref()))
            .collect();
        let category = |c: Option<&str>| c.unwrap_or(UNVERIFIED).to_string();
        for (rule, cat) in &g_rules {
            rules.entry(rule.to_string()).or_default()[2] += 1;
            categories.entry(category(*cat)).or_default()[2] += 1;
        }
        for (rule, cat) in &p_rules {
            rules.entry(rule.to_string()).or_default()[1] += 1;
            categories.entry(category(*cat)).or_default()[1] += 1;
            if let Some(gcat) = g_rules.get(rule) {
                rules.get_mut(*rule).expect("counted above")[0] += 1;
                // A matched rule counts for the gold side's category.
                categories.entry(category(*gcat)).or_default()[0] += 1;
            }
        }
        // (rule, risk) labels.
        let g_risk: BTreeSet<(&str, &str)> = gold
            .violations
            .iter()
            .map(|v| (v.rule.as_str(), v.risk.as_str()))
            .collect();
        let p_risk: BTreeSet<(&str, &str)> = pred
            .violations
            .iter()
            .map(|v| (v.rule.as_str(), v.risk.map_or(UNKNOWN_RISK, Risk::as_str)))
            .collect();
        for (_, risk) in &g_risk {
            risks.entry(risk.to_string()).or_default()[2] += 1;
        }
        for label in &p_risk {
            let e = risks.entry(label.1.to_string()).or_default();
            e[1] += 1;
            if g_risk.contains(label) {
                e[0] += 1;
            }
        }

        // Boxes of matched rules.
        for rule in p_rules.keys().filter(|r| g_rules.contains_key(*r)) {
            let g: Vec<BBox> = gold
                .violations
                .iter()
                .filter(|v| v.rule == *rule)
                .filter_map(|v| v.bbox)
                .collect();
            let p: Vec<BBox> = pred
                .violations
                .iter()
                .filter(|v| v.rule == *rule)
                .filter_map(|v| v.bbox)
                .collect();
            if g.is_empty() || p.is_empty() {
                continue;
            }
            let tp = greedy_matches(&g, &p, 0.5);
            box_gold += g.len() as u64;
            box_pred += p.len() as u64;
            box_tp += tp;
            let e = rule_boxes.entry(rule.to_string()).or_default();
            e[0] += tp;
            e[1] += g.len() as u64;
            e[2] += p.len() as u64;
        }

        // COCO: every boxed violation, one category per rule.
        for v in &gold.violations {
            if let Some(b) = v.bbox {
                gts.push(GroundTruth {
                    image: k,
                    category: v.rule.clone(),
                    bbox: b,
                });
            }
        }
        for v in &pred.violations {
            if let Some(b) = v.bbox {
                match v.score {
                    Some(score) => dets.push(Detection {
                        image: k,
                        category: v.rule.clone(),
                        bbox: b,
                        score,
                    }),
                    None => scored = false,
                }
            }
        }
    }

    let [[tn, fp], [fn_, tp]] = confusion;
    let n = tn + fp + fn_ + tp;
    let bin = Prf::from_counts(tp, tp + fp, tp + fn_);
    let prf = |m: BTreeMap<String, [u64; 3]>| {
        m.into_iter()
            .map(|(k, [tp, p, s])| (k, Prf::from_counts(tp, p, s)))
            .collect::<BTreeMap<_, _>>()
    };
    let (matched, gold_total) = rules
        .values()
        .fold((0, 0), |(m, g), [tp, _, s]| (m + tp, g + s));
    let div = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Report {
        images: n,
        binary: Binary {
            accuracy: div(tn + tp, n),
            precision: bin.precision,
            recall: bin.recall,
            f1: bin.f1,
        },
        confusion,
        unparsed,
        citation_accuracy: div(matched, gold_total),
        per_rule: prf(rules),
        per_category: prf(categories),
        per_risk: prf(risks),
        r#box: BoxMetrics {
            precision: div(box_tp, box_pred),
            recall: div(box_tp, box_gold),
            gold_boxes: box_gold,
            predicted_boxes: box_pred,
            ap50: if scored && !gts.is_empty() {
                Some(ap50(&gts, &dets))
            } else {
                None
            },
            per_rule: rule_boxes
                .into_iter()
                .map(|(rule, [tp, gold, pred])| {
                    let counts = BoxCounts {
                        precision: div(tp, pred),
                        recall: div(tp, gold),
                        gold_boxes: gold,
                        predicted_boxes: pred,
                    };
                    (rule, counts)
                })
                .collect(),
        },
    }
}

/// Intersection over union of two `[x1, y1, x2, y2]` boxes.
pub fn iou(a: &BBox, b: &BBox) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// One-to-one matches at IoU ≥ `threshold`, taking the best-overlapping pair first.
fn greedy_matches(gold: &[BBox], pred: &[BBox], threshold: f64) -> u64 {
    let mut pairs: Vec<(f64, usize, usize)> = gold
        .iter()
        .enumerate()
        .flat_map(|(i, g)| pred.iter().enumerate().map(move |(j, p)| (iou(g, p), i, j)))
        .filter(|(o, _, _)| *o >= threshold)
        .collect();
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let (mut g_used, mut p_used) = (vec![false; gold.len()], vec![false; pred.len()]);
    let mut n = 0;
    for (_, i, j) in pairs {
        if !g_used[i] && !p_used[j] {
            g_used[i] = true;
            p_used[j] = true;
            n += 1;
        }
    }
    n
}
