//! Metrics against scikit-learn and pycocotools on the hand-made sets of
//! `tools/make_eval_fixtures.py` (its output, `fixtures/cases.json`, is committed with it).

use inspector_core::{Risk, reply::ReplyStatus};
use inspector_eval::{Gold, GoldViolation, PredictedViolation, Prediction, Prf, evaluate};
use serde_json::Value;

const TOL: f64 = 1e-12;

fn risk(v: &Value) -> Option<Risk> {
    v.as_str().and_then(Risk::parse)
}

fn bbox(v: &Value) -> Option<[f64; 4]> {
    let a = v.as_array()?;
    Some([0, 1, 2, 3].map(|i| a[i].as_f64().unwrap()))
}

fn pairs(case: &Value) -> Vec<(Gold, Prediction)> {
    case["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let image = format!("{k}.png");
            let gold = Gold {
                image: image.clone(),
                violations: p["gold"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| GoldViolation {
                        rule: v["rule"].as_str().unwrap().into(),
                        category: v["category"].as_str().map(Into::into),
                        risk: risk(&v["risk"]).unwrap(),
                        bbox: bbox(&v["bbox"]),
                    })
                    .collect(),
            };
            let status = match p["status"].as_str().unwrap() {
                "safe" => ReplyStatus::Safe,
                "violation" => ReplyStatus::Violation,
                _ => ReplyStatus::Unparsed,
            };
            let pred = Prediction {
                image,
                status,
                violations: p["pred"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| PredictedViolation {
                        rule: v["rule"].as_str().unwrap().into(),
                        category: v["category"].as_str().map(Into::into),
                        risk: risk(&v["risk"]),
                        bbox: bbox(&v["bbox"]),
                        score: v["score"].as_f64(),
                    })
                    .collect(),
            };
            (gold, pred)
        })
        .collect()
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= TOL, "{what}: ours {a} vs reference {b}");
}

fn check_prf(ours: &Prf, theirs: &Value, what: &str) {
    close(
        ours.precision,
        theirs["precision"].as_f64().unwrap(),
        &format!("{what} precision"),
    );
    close(
        ours.recall,
        theirs["recall"].as_f64().unwrap(),
        &format!("{what} recall"),
    );
    close(
        ours.f1,
        theirs["f1"].as_f64().unwrap(),
        &format!("{what} f1"),
    );
}

#[test]
fn metrics_equal_sklearn_and_pycocotools() {
    let text = include_str!("fixtures/cases.json");
    let fixture: Value = serde_json::from_str(text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    let mut with_ap = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let want = &case["expected"];
        let r = evaluate(&pairs(case));
        let b = &want["binary"];
        for (ours, key) in [
            (r.binary.accuracy, "accuracy"),
            (r.binary.precision, "precision"),
            (r.binary.recall, "recall"),
            (r.binary.f1, "f1"),
        ] {
            close(
                ours,
                b[key].as_f64().unwrap(),
                &format!("{name}: binary {key}"),
            );
        }
        let confusion: Vec<Vec<u64>> = serde_json::from_value(want["confusion"].clone()).unwrap();
        assert_eq!(
            r.confusion.iter().map(|r| r.to_vec()).collect::<Vec<_>>(),
            confusion,
            "{name}: confusion"
        );
        assert_eq!(r.unparsed, want["unparsed"].as_u64().unwrap(), "{name}");
        close(
            r.citation_accuracy,
            want["citation_accuracy"].as_f64().unwrap(),
            &format!("{name}: citation accuracy"),
        );
        for (key, ours) in [
            ("per_rule", &r.per_rule),
            ("per_category", &r.per_category),
            ("per_risk", &r.per_risk),
        ] {
            let theirs = want[key].as_object().unwrap();
            assert_eq!(
                ours.keys().collect::<Vec<_>>(),
                theirs.keys().collect::<Vec<_>>(),
                "{name}: {key} labels"
            );
            for (label, prf) in ours {
                check_prf(prf, &theirs[label], &format!("{name}: {key}[{label}]"));
            }
        }
        let bx = &want["box"];
        close(
            r.r#box.precision,
            bx["precision"].as_f64().unwrap(),
            &format!("{name}: box precision"),
        );
        close(
            r.r#box.recall,
            bx["recall"].as_f64().unwrap(),
            &format!("{name}: box recall"),
        );
        assert_eq!(
            r.r#box.gold_boxes,
            bx["gold_boxes"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            r.r#box.predicted_boxes,
            bx["predicted_boxes"].as_u64().unwrap(),
            "{name}"
        );
        // The per-rule box counts add up to the reference's totals.
        let per_rule = &r.r#box.per_rule;
        let sum =
            |f: &dyn Fn(&inspector_eval::BoxCounts) -> f64| per_rule.values().map(f).sum::<f64>();
        assert_eq!(
            sum(&|b| b.gold_boxes as f64) as u64,
            bx["gold_boxes"].as_u64().unwrap(),
            "{name}: per-rule gold boxes"
        );
        assert_eq!(
            sum(&|b| b.predicted_boxes as f64) as u64,
            bx["predicted_boxes"].as_u64().unwrap(),
            "{name}: per-rule predicted boxes"
        );
        close(
            sum(&|b| b.precision * b.predicted_boxes as f64),
            bx["precision"].as_f64().unwrap() * bx["predicted_boxes"].as_f64().unwrap(),
            &format!("{name}: per-rule matched boxes"),
        );
        assert!(
            per_rule.keys().all(|k| r.per_rule.contains_key(k)),
            "{name}"
        );
        match (r.r#box.ap50, bx["ap50"].as_f64()) {
            (Some(ours), Some(theirs)) => {
                close(ours, theirs, &format!("{name}: ap50"));
                with_ap += 1;
            }
            (None, None) => {}
            (ours, _) => panic!("{name}: ap50 {ours:?} vs {}", bx["ap50"]),
        }
    }
    assert!(with_ap >= 2, "AP checked on {with_ap} sets");
}
