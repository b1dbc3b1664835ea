//! Augmentation geometry checked with pixels: coloured boxes are drawn, the photo is
//! transformed, and each colour must be found exactly where its transformed box says. Crops
//! never keep a label whose box was cut away, nor drop one that is still visible.

use std::path::Path;

use common::{BLUE, RED, extent, is, photo, rules, write_lines};
use image::{Rgb, RgbImage};
use inspector_core::{Annotation, Risk, Violation};
use inspector_dataset::{
    AugmentOptions, augment,
    augment::{Op, apply_all},
    load_file,
};

mod common;

const RED_BOX: [u32; 4] = [60, 40, 140, 120];
const BLUE_BOX: [u32; 4] = [200, 90, 260, 170];

fn violation(b: [u32; 4]) -> Violation {
    Violation {
        description: "未戴安全帽".into(),
        rule: "《安全作业规程》第3.1条".into(),
        risk: Risk::High,
        suggestion: None,
        bbox: Some(b.map(f64::from)),
    }
}

/// The colour lies within `tol` px of the box on every side, and fills most of it.
fn assert_colour_in_box(img: &RgbImage, colour: Rgb<u8>, b: &[f64; 4], min_fill: f64, what: &str) {
    let found = extent(img, colour).unwrap_or_else(|| panic!("{what}: colour vanished"));
    for k in 0..4 {
        assert!(
            (found[k] - b[k]).abs() <= 3.0,
            "{what}: colour spans {found:?}, box says {b:?}"
        );
    }
    let (mut inside, mut total) = (0u32, 0u32);
    for y in b[1].floor() as u32..(b[3].ceil() as u32).min(img.height()) {
        for x in b[0].floor() as u32..(b[2].ceil() as u32).min(img.width()) {
            total += 1;
            inside += u32::from(is(img.get_pixel(x, y), colour));
        }
    }
    let fill = inside as f64 / total.max(1) as f64;
    assert!(
        fill >= min_fill,
        "{what}: colour fills {fill:.2} of the box"
    );
}

#[test]
fn every_geometric_op_moves_boxes_with_the_pixels() {
    let img = photo(300, 200, 1, &[(RED_BOX, RED), (BLUE_BOX, BLUE)]);
    let vs = vec![violation(RED_BOX), violation(BLUE_BOX)];
    let pipelines: Vec<Vec<Op>> = vec![
        vec![Op::Flip],
        vec![Op::Rotate { degrees: 15.0 }],
        vec![Op::Rotate { degrees: -15.0 }],
        vec![Op::Rotate { degrees: 7.3 }],
        vec![Op::Crop {
            x: 30,
            y: 20,
            width: 250,
            height: 170,
        }],
        vec![
            Op::Brightness { factor: 0.7 },
            Op::Contrast { factor: 1.3 },
            Op::Blur { sigma: 1.5 },
        ],
        vec![
            Op::Flip,
            Op::Rotate { degrees: -11.0 },
            Op::Crop {
                x: 25,
                y: 30,
                width: 280,
                height: 200,
            },
            Op::Brightness { factor: 1.25 },
            Op::Contrast { factor: 0.75 },
            Op::Blur { sigma: 1.0 },
        ],
    ];
    for ops in pipelines {
        let (out, moved) = apply_all(&img, &vs, &ops);
        assert_eq!(moved.len(), 2, "{ops:?}");
        let rotated = ops.iter().any(|o| matches!(o, Op::Rotate { .. }));
        // A rotated rectangle fills ≥ 70 % of its enclosing box at 15°.
        let min_fill = if rotated { 0.6 } else { 0.9 };
        for (v, colour) in moved.iter().zip([RED, BLUE]) {
            let b = v.bbox.unwrap();
            assert!(
                b[0] >= 0.0
                    && b[1] >= 0.0
                    && b[2] <= out.width() as f64
                    && b[3] <= out.height() as f64
            );
            assert_colour_in_box(&out, colour, &b, min_fill, &format!("{ops:?}"));
        }
    }
    // The flip mirrors exactly.
    let (_, flipped) = apply_all(&img, &vs, &[Op::Flip]);
    assert_eq!(flipped[0].bbox, Some([160.0, 40.0, 240.0, 120.0]));
    // A rotation enlarges the canvas to keep every pixel: 300×200 at 15° → 342×271.
    let (out, _) = apply_all(&img, &vs, &[Op::Rotate { degrees: 15.0 }]);
    assert_eq!(out.dimensions(), (342, 271));
    // Brightness is Pillow's: every channel times the factor.
    let (out, _) = apply_all(&img, &vs, &[Op::Brightness { factor: 0.5 }]);
    assert_eq!(*out.get_pixel(70, 50), Rgb([115, 10, 10]));
}

#[test]
fn a_crop_removes_exactly_the_labels_whose_box_is_gone() {
    let img = photo(300, 200, 2, &[(RED_BOX, RED), (BLUE_BOX, BLUE)]);
    let vs = vec![violation(RED_BOX), violation(BLUE_BOX)];
    // The blue box lies wholly outside this window.
    let (out, kept) = apply_all(
        &img,
        &vs,
        &[Op::Crop {
            x: 0,
            y: 0,
            width: 180,
            height: 200,
        }],
    );
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].bbox, Some([60.0, 40.0, 140.0, 120.0]));
    assert!(extent(&out, BLUE).is_none());
    // Here the red box is clipped on the left, and kept.
    let (out, kept) = apply_all(
        &img,
        &vs,
        &[Op::Crop {
            x: 80,
            y: 0,
            width: 220,
            height: 200,
        }],
    );
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[0].bbox, Some([0.0, 40.0, 60.0, 120.0]));
    assert_colour_in_box(&out, RED, &kept[0].bbox.unwrap(), 0.95, "clipped");
}

fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn augmented_records_match_their_pixels_and_runs_are_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("images")).unwrap();
    let mut lines = Vec::new();
    for k in 0..6u32 {
        // Boxes in varied places, some near the edges so that crops cut them away.
        let red = [5 + 20 * k, 10 + 5 * k, 60 + 20 * k, 80 + 5 * k];
        let blue = [230 - 10 * k, 120, 295 - 10 * k, 195];
        photo(300, 200, k, &[(red, RED), (blue, BLUE)])
            .save(dir.path().join(format!("images/{k}.png")))
            .unwrap();
        let a = Annotation {
            image: format!("images/{k}.png"),
            violations: vec![violation(red), violation(blue)],
        };
        lines.push(serde_json::to_string(&a).unwrap());
    }
    // A violation without a box: this photo must never be cropped.
    photo(300, 200, 9, &[])
        .save(dir.path().join("images/nobox.png"))
        .unwrap();
    lines.push(
        r#"{"image": "images/nobox.png", "violations": [{"description": "通道堆放杂物", "rule": "《现场管理标准》第2.2条", "risk": "中"}]}"#.into(),
    );
    let file = write_lines(dir.path(), "train.jsonl", &lines);
    let dataset = load_file(&file, &rules()).unwrap();
    let options = AugmentOptions {
        factor: 12,
        seed: 3,
    };
    let out = dir.path().join("aug");
    let summary = augment(&dataset, &options, None, &out, &|| {}).unwrap();
    assert_eq!((summary.originals, summary.copies), (7, 84));
    assert!(
        summary.removed_violations > 0,
        "some crops should cut a box away: {summary:?}"
    );

    let records: Vec<Annotation> = read_jsonl(&out.join("annotations.jsonl"));
    let manifest: Vec<serde_json::Value> = read_jsonl(&out.join("manifest.jsonl"));
    assert_eq!(records.len(), 91);
    assert_eq!(manifest.len(), 91);
    let mut ops_seen = std::collections::BTreeSet::new();
    for (record, entry) in records.iter().zip(&manifest) {
        assert_eq!(entry["file"], record.image.as_str());
        let img = image::open(out.join(&record.image)).unwrap().to_rgb8();
        let ops = entry["ops"].as_array().unwrap();
        for op in ops {
            ops_seen.insert(op["op"].as_str().unwrap().to_string());
        }
        if entry["source"].as_str().unwrap().ends_with("nobox.png") {
            assert!(ops.iter().all(|o| o["op"] != "crop"), "{entry}");
            assert_eq!(record.violations.len(), 1);
            continue;
        }
        // Each colour is visible exactly when its label is kept (red is always listed first).
        let labelled: Vec<Rgb<u8>> = match record.violations.len() {
            2 => vec![RED, BLUE],
            1 if extent(&img, RED).is_some() => vec![RED],
            1 => vec![BLUE],
            _ => vec![],
        };
        for colour in [RED, BLUE] {
            let visible = extent(&img, colour).is_some();
            let position = labelled.iter().position(|c| *c == colour);
            assert_eq!(visible, position.is_some(), "{} {ops:?}", record.image);
            if let Some(i) = position {
                let b = record.violations[i].bbox.unwrap();
                let rotated = ops.iter().any(|o| o["op"] == "rotate");
                let fill = if rotated { 0.5 } else { 0.85 };
                assert_colour_in_box(&img, colour, &b, fill, &format!("{} {ops:?}", record.image));
            }
        }
    }
    for op in ["flip", "rotate", "crop", "brightness", "contrast", "blur"] {
        assert!(ops_seen.contains(op), "{op} never drawn: {ops_seen:?}");
    }
    // Content-hash names: every file's name is the hash of its bytes.
    for r in &records {
        let bytes = std::fs::read(out.join(&r.image)).unwrap();
        let hash =
            sha2::Digest::finalize(sha2::Digest::chain_update(sha2::Sha256::default(), &bytes));
        let hex: String = hash[..10].iter().map(|b| format!("{b:02x}")).collect();
        assert!(r.image.contains(&hex), "{}", r.image);
    }
    // The same seed writes the same files.
    let again = dir.path().join("again");
    augment(&dataset, &options, None, &again, &|| {}).unwrap();
    assert_eq!(
        std::fs::read(out.join("annotations.jsonl")).unwrap(),
        std::fs::read(again.join("annotations.jsonl")).unwrap()
    );
    // The output validates.
    let report =
        inspector_dataset::validate_file(&out.join("annotations.jsonl"), &rules()).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

#[test]
fn eval_photos_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    for k in 0..3u32 {
        photo(64, 64, k, &[])
            .save(dir.path().join(format!("{k}.png")))
            .unwrap();
    }
    let line = |k: u32| format!(r#"{{"image": "{k}.png", "violations": []}}"#);
    let train = write_lines(dir.path(), "train.jsonl", &[line(0), line(1)]);
    let eval = write_lines(dir.path(), "eval.jsonl", &[line(2), line(1)]);
    let train = load_file(&train, &[]).unwrap();
    let eval = load_file(&eval, &[]).unwrap();
    let out = dir.path().join("aug");
    let err = augment(
        &train,
        &AugmentOptions { factor: 2, seed: 1 },
        Some(&eval),
        &out,
        &|| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("line 2 (1.png) is line 2 of"), "{err}");
    assert!(!out.join("annotations.jsonl").exists());
}
