//! Scene generation: determinism, the hazard mix, boxes, and citations that resolve against the
//! bundled example regulations.

use std::collections::HashMap;

use inspector_core::citation::{Resolution, resolve};
use inspector_rules::{Categorizer, extract_bytes};
use inspector_synth::{Hazard, SynthConfig, render, write_dataset};

fn bundled_rules() -> Vec<inspector_core::Rule> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/regulations");
    let mut rules = Vec::new();
    for name in [
        "safety-operation.md",
        "site-management.txt",
        "electrical-safety.docx",
    ] {
        let bytes = std::fs::read(format!("{root}/{name}")).unwrap();
        let doc = extract_bytes(name, &bytes, &Categorizer::default()).unwrap();
        rules.extend(doc.rules);
    }
    rules
}

#[test]
fn every_hazard_cites_a_bundled_clause() {
    let rules = bundled_rules();
    for hz in Hazard::ALL {
        let v = hz.violation(None);
        match resolve(&v.rule, &rules) {
            Resolution::Found(rule) => assert!(!rule.text.is_empty(), "{}", v.rule),
            other => panic!("{:?}: {} does not resolve: {other:?}", hz, v.rule),
        }
        assert_eq!(Hazard::from_key(hz.key()), Some(hz));
        assert_eq!(Hazard::from_description(&v.description), Some(hz));
    }
}

#[test]
fn the_same_seed_gives_the_same_scene_and_another_seed_does_not() {
    let config = SynthConfig {
        width: 224,
        ..SynthConfig::default()
    };
    let a = render(&config, 5, 3);
    let b = render(&config, 5, 3);
    assert_eq!(a.image.as_raw(), b.image.as_raw());
    assert_eq!(a.violations, b.violations);
    let c = render(&config, 6, 3);
    assert_ne!(a.image.as_raw(), c.image.as_raw());
}

#[test]
fn the_hazard_mix_boxes_and_safe_share_are_as_configured() {
    let config = SynthConfig::default();
    let n = 400;
    let mut safe = 0;
    let mut counts: HashMap<Hazard, usize> = HashMap::new();
    for i in 0..n {
        let scene = render(&config, 11, i);
        let (w, h) = scene.image.dimensions();
        assert_eq!((w, h), (448, 336));
        if scene.violations.is_empty() {
            safe += 1;
        }
        for v in &scene.violations {
            let hz = Hazard::from_description(&v.description).expect("a known hazard");
            *counts.entry(hz).or_default() += 1;
            let b = v.bbox.expect("every violation has a box");
            assert!(b[0] < b[2] && b[1] < b[3], "scene {i}: empty box {b:?}");
            assert!(b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= w as f64 && b[3] <= h as f64);
            // Big enough to see at the demo model's resolution (a 14-px patch at 280 px wide).
            assert!(
                (b[2] - b[0]) * (b[3] - b[1]) >= 14.0 * 14.0,
                "scene {i}: {b:?}"
            );
        }
    }
    let share = safe as f64 / n as f64;
    assert!((0.22..=0.38).contains(&share), "safe share {share}");
    for hz in Hazard::ALL {
        let c = counts.get(&hz).copied().unwrap_or(0);
        assert!(c >= 40, "{hz:?} appears only {c} times in {n} scenes");
    }
}

#[test]
fn excluded_hazards_never_appear_and_boosted_ones_dominate() {
    let held_out = SynthConfig {
        width: 224,
        hazards: Hazard::ALL
            .into_iter()
            .filter(|h| *h != Hazard::StackTooHigh)
            .collect(),
        ..SynthConfig::default()
    };
    let boosted = SynthConfig {
        width: 224,
        boost: vec![Hazard::StackTooHigh],
        ..SynthConfig::default()
    };
    let (mut unsafe_scenes, mut with_stack) = (0, 0);
    for i in 0..200 {
        let s = render(&held_out, 2, i);
        assert!(
            s.violations
                .iter()
                .all(|v| Hazard::from_description(&v.description) != Some(Hazard::StackTooHigh))
        );
        let s = render(&boosted, 2, i);
        if !s.violations.is_empty() {
            unsafe_scenes += 1;
            with_stack += s
                .violations
                .iter()
                .any(|v| Hazard::from_description(&v.description) == Some(Hazard::StackTooHigh))
                as usize;
        }
    }
    assert!(
        with_stack * 2 >= unsafe_scenes,
        "{with_stack} of {unsafe_scenes}"
    );
}

#[test]
fn a_dataset_is_written_with_images_and_annotations() {
    let dir = tempfile::tempdir().unwrap();
    let config = SynthConfig {
        width: 160,
        ..SynthConfig::default()
    };
    let file = write_dataset(dir.path(), &config, 1, 6, || {}).unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let records: Vec<inspector_core::Annotation> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 6);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.image, format!("images/{i:05}.png"));
        let img = image::open(dir.path().join(&r.image)).unwrap();
        assert_eq!((img.width(), img.height()), (160, 120));
        assert_eq!(r.violations, render(&config, 1, i as u64).violations);
    }
    // No temporary files are left behind.
    let leftovers = std::fs::read_dir(dir.path().join("images"))
        .unwrap()
        .filter(|e| {
            !e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".png")
        })
        .count();
    assert_eq!(leftovers, 0);
}
