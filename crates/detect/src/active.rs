//! Active learning: which unlabelled photos the team should annotate next.
//!
//! Two signals, each in [0, 1], higher meaning less sure:
//!
//! - **token uncertainty**: on the answer's decisive tokens (the status value, and each
//!   violation's rule and risk values), `1 − margin`, where margin is the top-1 minus top-2
//!   probability of the model's own next-token distribution; the photo takes the least sure
//!   decisive token. An answer that cannot be read is maximally uncertain (1).
//! - **disagreement**: among K sampled answers, `1 − (share of the most common verdict)`, a
//!   verdict being the status and the set of cited rules. Identical samples give 0.
//!
//! The score is their mean when both are measured, else the token uncertainty alone.

use std::collections::HashMap;

use inspector_core::reply::{ReplyStatus, parse_reply};
use serde::{Deserialize, Serialize};

use crate::RawAnswer;

/// Byte ranges of the values of `"status"`, `"rule"` and `"risk"` in a JSON answer.
fn decisive_spans(raw: &str) -> Vec<std::ops::Range<usize>> {
    let mut spans = Vec::new();
    for key in ["\"status\"", "\"rule\"", "\"risk\""] {
        let mut from = 0;
        while let Some(at) = raw[from..].find(key) {
            let after = from + at + key.len();
            // `: "value"`: the value runs from its opening quote to the closing one.
            let rest = &raw[after..];
            let Some(open) = rest.find('"') else { break };
            let start = after + open + 1;
            let end = raw[start..].find('"').map_or(raw.len(), |e| start + e);
            spans.push(start..end.max(start + 1).min(raw.len()));
            from = end.min(raw.len());
            if from >= raw.len() {
                break;
            }
        }
    }
    spans
}

/// `1 − margin` of the least sure decisive token; 1 for an answer that cannot be read or has
/// no token statistics.
pub fn token_uncertainty(answer: &RawAnswer) -> f64 {
    if parse_reply(&answer.raw).status == ReplyStatus::Unparsed {
        return 1.0;
    }
    let spans = decisive_spans(&answer.raw);
    let mut start = 0usize;
    let mut least = None::<f32>;
    for (end, margin) in answer.token_ends.iter().zip(&answer.token_margins) {
        // A token covers (start, end]; it is decisive when it overlaps a value.
        if spans.iter().any(|s| start < s.end && *end > s.start) {
            least = Some(least.map_or(*margin, |m| m.min(*margin)));
        }
        start = *end;
    }
    least.map_or(1.0, |m| (1.0 - m as f64).clamp(0.0, 1.0))
}

/// A sampled answer's verdict: status and the sorted set of cited rules.
pub fn verdict(raw: &str) -> (ReplyStatus, Vec<String>) {
    let reply = parse_reply(raw);
    let mut rules: Vec<String> = reply
        .violations
        .iter()
        .filter_map(|v| v.rule.clone())
        .collect();
    rules.sort();
    rules.dedup();
    (reply.status, rules)
}

/// `1 − share of the most common verdict` among sampled answers (0 with fewer than two).
pub fn disagreement(samples: &[&str]) -> f64 {
    if samples.len() < 2 {
        return 0.0;
    }
    let mut counts: HashMap<(ReplyStatus, Vec<String>), usize> = HashMap::new();
    for s in samples {
        *counts.entry(verdict(s)).or_default() += 1;
    }
    let top = counts.values().copied().max().unwrap_or(0);
    1.0 - top as f64 / samples.len() as f64
}

/// One photo's uncertainty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Uncertainty {
    pub token: f64,
    /// `None` when no samples were drawn.
    pub disagreement: Option<f64>,
    pub score: f64,
}

impl Uncertainty {
    pub fn new(token: f64, disagreement: Option<f64>) -> Self {
        let score = match disagreement {
            Some(d) => (token + d) / 2.0,
            None => token,
        };
        Uncertainty {
            token,
            disagreement,
            score,
        }
    }
}

/// Indices of `items` by descending score (ties keep their order), cut to `budget`.
pub fn rank(items: &[Uncertainty], budget: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..items.len()).collect();
    idx.sort_by(|&a, &b| items[b].score.total_cmp(&items[a].score));
    idx.truncate(budget);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer whose decisive tokens have the given margins (other tokens are sure).
    fn answer(status_margin: f32, rule_margin: f32) -> RawAnswer {
        let raw = r#"{"status":"violation","violations":[{"description":"x","rule":"第3.1条","risk":"高"}]}"#;
        // One token per character boundary group: cut the text into 4-byte pieces.
        let mut ends = Vec::new();
        let mut margins = Vec::new();
        let status_at = raw.find("violation").unwrap();
        let rule_at = raw.find("第3.1条").unwrap();
        let mut at = 0;
        for (i, _) in raw.char_indices().skip(1).chain([(raw.len(), ' ')]) {
            if i - at >= 4 || i == raw.len() {
                let m = if (at..i).contains(&status_at) {
                    status_margin
                } else if (at..i).contains(&rule_at) {
                    rule_margin
                } else {
                    0.99
                };
                ends.push(i);
                margins.push(m);
                at = i;
            }
        }
        RawAnswer {
            raw: raw.into(),
            token_probs: vec![0.9; ends.len()],
            token_margins: margins,
            token_ends: ends,
        }
    }

    #[test]
    fn the_least_sure_decisive_token_sets_the_uncertainty() {
        assert!((token_uncertainty(&answer(0.9, 0.95)) - 0.1).abs() < 1e-6);
        assert!((token_uncertainty(&answer(0.95, 0.2)) - 0.8).abs() < 1e-6);
        // Unreadable answers are the most uncertain.
        let junk = RawAnswer {
            raw: "???".into(),
            token_probs: vec![],
            token_margins: vec![],
            token_ends: vec![],
        };
        assert_eq!(token_uncertainty(&junk), 1.0);
    }

    #[test]
    fn ranking_follows_controlled_uncertainty() {
        // Photos whose decisive-token margins are set from sure to unsure rank in reverse.
        let margins = [0.95, 0.2, 0.6, 0.05, 0.8];
        let items: Vec<Uncertainty> = margins
            .iter()
            .map(|&m| Uncertainty::new(token_uncertainty(&answer(m, 0.99)), None))
            .collect();
        assert_eq!(rank(&items, 5), vec![3, 1, 2, 4, 0]);
        assert_eq!(rank(&items, 2), vec![3, 1]);
    }

    #[test]
    fn disagreement_counts_verdicts_not_wording() {
        let a = r#"{"status":"violation","violations":[{"description":"未戴安全帽","rule":"第3.1条","risk":"高"}]}"#;
        let a2 = r#"{"status":"violation","violations":[{"description":"没戴帽子","rule":"第3.1条","risk":"中"}]}"#;
        let b = r#"{"status":"violation","violations":[{"description":"x","rule":"第5.2条","risk":"高"}]}"#;
        let safe = r#"{"status":"safe","violations":[]}"#;
        assert_eq!(disagreement(&[a, a2, a, a2]), 0.0, "same status and rules");
        assert_eq!(disagreement(&[a, a, b, safe]), 0.5);
        assert_eq!(disagreement(&[a, b, safe, "???"]), 0.75);
        assert_eq!(disagreement(&[a]), 0.0);
        // With both signals, the score is their mean; disagreement can lift a confident photo.
        let sure = Uncertainty::new(0.1, Some(0.75));
        let unsure = Uncertainty::new(0.6, Some(0.0));
        assert!((sure.score - 0.425).abs() < 1e-12);
        assert_eq!(rank(&[unsure.clone(), sure.clone()], 2), vec![1, 0]);
    }
}
