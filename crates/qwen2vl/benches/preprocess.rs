//! Photo → `pixel_values` throughput: ours against transformers' Qwen2-VL image processors
//! (PIL "slow" and torchvision "fast") on the same photos, measured in the same run.
//!
//! The photos are 64 synthetic factory scenes (`inspector-synth`, 320×240 PNG, as the demo
//! model trains on), processed at the demo's pixel budget (3,136–60,000 pixels: 280×196, 280
//! patches). Each side reads, decodes, resizes, normalises and patches every photo, one at a
//! time, in one thread per photo; the best of three rounds counts.
//!
//! Run: `INSPECTOR_PYTHON=/path/to/venv/bin/python cargo bench -p inspector-qwen2vl --bench
//! preprocess` (the venv needs torch, torchvision and transformers; without it only our side
//! is measured).

use std::{path::PathBuf, process::Command, time::Instant};

use inspector_qwen2vl::image::{ProcessorConfig, process_file};

const PHOTOS: usize = 64;
const ROUNDS: usize = 3;
const MIN_PIXELS: usize = 3136;
const MAX_PIXELS: usize = 60000;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let synth = inspector_synth::SynthConfig {
        width: 320,
        ..Default::default()
    };
    let paths: Vec<PathBuf> = (0..PHOTOS as u64)
        .map(|i| {
            let p = dir.path().join(format!("{i:03}.png"));
            inspector_synth::render(&synth, 11, i)
                .image
                .save(&p)
                .unwrap();
            p
        })
        .collect();
    let config = ProcessorConfig::default()
        .with_pixels(Some(MIN_PIXELS), Some(MAX_PIXELS))
        .unwrap();
    let mut best = f64::INFINITY;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for p in &paths {
            let processed = process_file(p, &config).unwrap();
            assert_eq!(processed.grid_thw, [1, 14, 20]);
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    let ours = PHOTOS as f64 / best;
    println!(
        "inspector:                 {ours:8.1} photos/s ({:.2} ms a photo)",
        1e3 / ours
    );

    let python = std::env::var("INSPECTOR_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tools/bench_preprocess_transformers.py");
    let out = Command::new(&python)
        .arg(&script)
        .args([
            MIN_PIXELS.to_string(),
            MAX_PIXELS.to_string(),
            ROUNDS.to_string(),
        ])
        .args(&paths)
        .output();
    let theirs = match out {
        Ok(o) if o.status.success() => {
            serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
        }
        Ok(o) => {
            println!(
                "(reference failed: {}; set INSPECTOR_PYTHON to a venv with torch, torchvision and transformers for the ratio)",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            return;
        }
        Err(e) => {
            println!("(no reference: {python}: {e}; set INSPECTOR_PYTHON for the ratio)");
            return;
        }
    };
    for (name, key) in [
        ("PIL processor", "slow_seconds"),
        ("torchvision processor", "fast_seconds"),
    ] {
        let rate = PHOTOS as f64 / theirs[key].as_f64().unwrap();
        println!(
            "transformers {name:22} {rate:8.1} photos/s ({:.2} ms a photo); ratio inspector / it: {:.2}",
            1e3 / rate,
            ours / rate
        );
    }
}
