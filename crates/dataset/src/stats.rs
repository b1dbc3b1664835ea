//! `inspector dataset stats`: what a dataset contains, and what will hurt training.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{Dataset, SAFE_CATEGORY};

/// Minimum, median and maximum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Spread {
            min: values[0],
            median,
            max: values[n - 1],
        })
    }
}

/// Counts and warnings for one annotation file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub records: usize,
    pub safe: usize,
    pub safe_ratio: f64,
    pub violations: usize,
    pub violations_with_box: usize,
    /// Records per category (the primary category of the first violation's rule; `safe`).
    pub categories: BTreeMap<String, usize>,
    /// Violations per risk level.
    pub risks: BTreeMap<String, usize>,
    /// Violations per cited rule.
    pub rules: BTreeMap<String, usize>,
    pub width: Option<Spread>,
    pub height: Option<Spread>,
    pub megapixels: Option<Spread>,
    /// Lines whose image `max_pixels` shrinks to less than half its width and height.
    pub shrunk_lines: Vec<usize>,
    pub warnings: Vec<String>,
}

/// Counts a dataset. A category with fewer than `thin` records is warned about, and so are
/// images that `max_pixels` (the training setting) shrinks to less than half their sides.
pub fn stats(dataset: &Dataset, max_pixels: usize, thin: usize) -> Stats {
    let records = dataset.records.len();
    let mut categories = BTreeMap::new();
    let mut risks = BTreeMap::new();
    let mut rules = BTreeMap::new();
    let (mut violations, mut with_box) = (0, 0);
    for r in &dataset.records {
        *categories.entry(r.category.clone()).or_insert(0) += 1;
        for v in &r.annotation.violations {
            violations += 1;
            with_box += usize::from(v.bbox.is_some());
            *risks.entry(v.risk.as_str().to_string()).or_insert(0) += 1;
            *rules.entry(v.rule.clone()).or_insert(0) += 1;
        }
    }
    let safe = categories.get(SAFE_CATEGORY).copied().unwrap_or(0);
    let shrunk_lines: Vec<usize> = dataset
        .records
        .iter()
        .filter(|r| (r.size.0 as f64 * r.size.1 as f64) > 4.0 * max_pixels as f64)
        .map(|r| r.line)
        .collect();
    let mut warnings = Vec::new();
    for (category, n) in &categories {
        if *n < thin {
            warnings.push(format!(
                "category {category} has only {n} record(s); fewer than {thin} teach the model little and make its eval numbers noise"
            ));
        }
    }
    if records > 0 && safe == 0 {
        warnings.push(
            "no safe photos: a model that only ever sees violations finds them everywhere"
                .to_string(),
        );
    }
    if !shrunk_lines.is_empty() {
        let shown: Vec<String> = shrunk_lines.iter().take(5).map(|l| l.to_string()).collect();
        warnings.push(format!(
            "{} image(s) are shrunk to less than half their width and height by max_pixels = {max_pixels} (lines {}{}); small hazards may vanish — crop them or raise max_pixels",
            shrunk_lines.len(),
            shown.join(", "),
            if shrunk_lines.len() > 5 { ", …" } else { "" }
        ));
    }
    let sizes = |f: fn(&crate::Record) -> f64| Spread::of(dataset.records.iter().map(f).collect());
    Stats {
        records,
        safe,
        safe_ratio: if records == 0 {
            0.0
        } else {
            safe as f64 / records as f64
        },
        violations,
        violations_with_box: with_box,
        categories,
        risks,
        rules,
        width: sizes(|r| r.size.0 as f64),
        height: sizes(|r| r.size.1 as f64),
        megapixels: sizes(|r| r.size.0 as f64 * r.size.1 as f64 / 1e6),
        shrunk_lines,
        warnings,
    }
}
