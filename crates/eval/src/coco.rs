//! COCO-style average precision at IoU 0.5, step for step as pycocotools' `COCOeval`
//! (`iouType="bbox"`, area range "all", 100 detections per image and category, 101 recall
//! thresholds): per-image greedy matching in score order (each detection takes the unmatched
//! ground truth of highest IoU ≥ 0.5), detections of all images merged by a stable sort on
//! score, precision made monotone, sampled at the recall thresholds, averaged over categories
//! that have ground truth.

use std::collections::BTreeSet;

use inspector_core::BBox;

/// A gold box: image index, category (a rule), `[x1, y1, x2, y2]`.
#[derive(Debug, Clone, PartialEq)]
pub struct GroundTruth {
    pub image: usize,
    pub category: String,
    pub bbox: BBox,
}

/// A predicted box with its score.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    pub image: usize,
    pub category: String,
    pub bbox: BBox,
    pub score: f64,
}

const MAX_DETS: usize = 100;

/// pycocotools' `bbIou` on `[x, y, w, h]` boxes (not crowd).
fn iou_xywh(d: [f64; 4], g: [f64; 4]) -> f64 {
    let w = (d[0] + d[2]).min(g[0] + g[2]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[1] + d[3]).min(g[1] + g[3]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let i = w * h;
    let u = d[2] * d[3] + g[2] * g[3] - i;
    i / u
}

fn xywh(b: &BBox) -> [f64; 4] {
    [b[0], b[1], b[2] - b[0], b[3] - b[1]]
}

/// Indices of `scores` by descending score, ties in original order (numpy's stable
/// `argsort(-scores, kind="mergesort")`).
fn stable_desc(scores: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| (-scores[a]).total_cmp(&-scores[b]));
    idx
}

/// COCO AP at IoU 0.5, averaged over the categories that have ground truth (`-1` categories
/// excluded, as `COCOeval.summarize` does). 0 when there is no ground truth.
pub fn ap50(gts: &[GroundTruth], dets: &[Detection]) -> f64 {
    let categories: BTreeSet<&str> = gts.iter().map(|g| g.category.as_str()).collect();
    let images: BTreeSet<usize> = gts
        .iter()
        .map(|g| g.image)
        .chain(dets.iter().map(|d| d.image))
        .collect();
    let rec_thrs: Vec<f64> = (0..=100)
        .map(|i| if i == 100 { 1.0 } else { i as f64 * 0.01 })
        .collect();
    let threshold = 0.5f64.min(1.0 - 1e-10);
    let mut aps = Vec::new();
    for cat in categories {
        // Per image: (scores, matched) of its detections in score order, capped at 100.
        let mut scores = Vec::new();
        let mut matched = Vec::new();
        let mut npig = 0usize;
        let by_image = |img: usize| {
            let g: Vec<[f64; 4]> = gts
                .iter()
                .filter(|g| g.image == img && g.category == cat)
                .map(|g| xywh(&g.bbox))
                .collect();
            let d: Vec<(f64, [f64; 4])> = dets
                .iter()
                .filter(|d| d.image == img && d.category == cat)
                .map(|d| (d.score, xywh(&d.bbox)))
                .collect();
            (g, d)
        };
        for &img in &images {
            let (g, d) = by_image(img);
            npig += g.len();
            let order = stable_desc(&d.iter().map(|x| x.0).collect::<Vec<_>>());
            let mut gt_taken = vec![false; g.len()];
            for &di in order.iter().take(MAX_DETS) {
                let mut best = threshold;
                let mut m: Option<usize> = None;
                for (gi, gb) in g.iter().enumerate() {
                    if gt_taken[gi] {
                        continue;
                    }
                    let o = iou_xywh(d[di].1, *gb);
                    if o < best {
                        continue;
                    }
                    best = o;
                    m = Some(gi);
                }
                if let Some(gi) = m {
                    gt_taken[gi] = true;
                }
                scores.push(d[di].0);
                matched.push(m.is_some());
            }
        }
        if npig == 0 {
            continue;
        }
        let order = stable_desc(&scores);
        let (mut tp, mut fp) = (0f64, 0f64);
        let mut rc = Vec::with_capacity(order.len());
        let mut pr = Vec::with_capacity(order.len());
        for &i in &order {
            if matched[i] {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            rc.push(tp / npig as f64);
            pr.push(tp / (fp + tp + f64::EPSILON));
        }
        for i in (1..pr.len()).rev() {
            if pr[i] > pr[i - 1] {
                pr[i - 1] = pr[i];
            }
        }
        let q: Vec<f64> = rec_thrs
            .iter()
            .map(|&t| {
                // np.searchsorted(rc, t, side="left"): the first index with rc[i] >= t.
                let pi = rc.partition_point(|&r| r < t);
                pr.get(pi).copied().unwrap_or(0.0)
            })
            .collect();
        aps.push(q.iter().sum::<f64>() / q.len() as f64);
    }
    if aps.is_empty() {
        0.0
    } else {
        aps.iter().sum::<f64>() / aps.len() as f64
    }
}
