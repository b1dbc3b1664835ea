//! Golden hashes: existing seeds render byte-identical scenes (pixels and ground truth) across
//! refactors of the renderer. A change here means every dataset, benchmark and bundled model
//! built from these seeds changes too; update the hashes only for a change that is meant to do
//! that, and say so.

use inspector_synth::{Hazard, SynthConfig, render};
use sha2::{Digest, Sha256};

/// SHA-256 over 12 scenes of `seed` under `config`: raw RGB bytes, size and violations.
fn digest(config: &SynthConfig, seed: u64) -> String {
    let mut h = Sha256::new();
    for index in 0..12 {
        let scene = render(config, seed, index);
        h.update(scene.image.width().to_le_bytes());
        h.update(scene.image.height().to_le_bytes());
        h.update(scene.image.as_raw());
        for v in &scene.violations {
            h.update(format!("{v:?}\n").as_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn existing_seeds_render_byte_identical_scenes() {
    let sized = |width| SynthConfig {
        width,
        ..Default::default()
    };
    let cases: Vec<(&str, SynthConfig, u64)> = vec![
        ("448, seed 0", sized(448), 0),
        ("448, seed 4242", sized(448), 4242),
        ("320, seed 7", sized(320), 7),
        ("224, seed 1", sized(224), 1),
        ("96, seed 3", sized(96), 3),
        (
            "boosted no-helmet, 320, seed 11",
            SynthConfig {
                width: 320,
                boost: vec![Hazard::NoHelmet],
                ..Default::default()
            },
            11,
        ),
        (
            "cabinet and exit only, no safe scenes, 256, seed 5",
            SynthConfig {
                width: 256,
                hazards: vec![Hazard::CabinetNoLockout, Hazard::BlockedExit],
                safe_fraction: 0.0,
                ..Default::default()
            },
            5,
        ),
        (
            "no hazards, 192, seed 9",
            SynthConfig {
                width: 192,
                hazards: Vec::new(),
                ..Default::default()
            },
            9,
        ),
    ];
    let got: Vec<String> = cases
        .iter()
        .map(|(name, config, seed)| format!("{name}: {}", digest(config, *seed)))
        .collect();
    let expected = include_str!("golden_hashes.txt")
        .lines()
        .map(str::to_string)
        .collect::<Vec<_>>();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden_hashes.txt");
        std::fs::write(path, got.join("\n") + "\n").unwrap();
        return;
    }
    assert_eq!(got, expected, "scenes changed: see this file's header");
}

#[test]
fn every_hazard_has_one_row_in_the_table_in_order() {
    use inspector_synth::LOOKS;
    assert_eq!(LOOKS.len(), Hazard::ALL.len());
    for (look, hazard) in LOOKS.iter().zip(Hazard::ALL) {
        assert_eq!(look.hazard, hazard);
        for text in [look.placement, look.painter, look.bbox, look.look_alike] {
            assert!(!text.is_empty(), "{hazard:?}");
        }
    }
}
