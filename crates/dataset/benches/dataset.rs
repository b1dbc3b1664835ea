//! Dataset throughput against Python + Pillow doing the same work on the same files in the
//! same run (`tools/bench_dataset_pillow.py`):
//!
//! - validate + build: records/s on 10,000 generated records, each with its own 128×96 PNG
//!   (read, hash, full decode, field and box checks, citation resolution, conversations
//!   written);
//! - augment: images/s for a fixed pipeline (flip, rotate 10° on an expanded canvas, crop to
//!   80 %, brightness, contrast, Gaussian blur, PNG encode) on 200 generated 640×480 JPEGs.
//!
//! Rust is timed on one thread (the fair comparison with single-threaded Pillow) and on all
//! cores. Run: `INSPECTOR_PYTHON=/path/to/venv/bin/python cargo bench -p inspector-dataset
//! --bench dataset` (the Python needs Pillow; without it only the Rust numbers are printed).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use image::{Rgb, RgbImage};
use inspector_core::{Annotation, Risk, Violation, answer::INSTRUCTION};
use inspector_dataset::augment::{Op, apply, encode_png};
use inspector_rules::{Categorizer, extract_file};
use rayon::prelude::*;

const RECORDS: usize = 10_000;
const AUGMENT_IMAGES: usize = 200;

fn python() -> String {
    std::env::var("INSPECTOR_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs the reference; `None` when Python or Pillow is missing.
fn reference(args: &[&str]) -> Option<(usize, f64)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/bench_dataset_pillow.py");
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("reference failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((v["items"].as_u64()? as usize, v["seconds"].as_f64()?))
}

/// A textured scene: gradients, stripes and two filled boxes, distinct per `seed`.
fn scene(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let inside = x > w / 5 && x < w / 2 && y > h / 4 && y < h * 3 / 4;
        if inside {
            return Rgb([220, 30, (seed % 200) as u8]);
        }
        let v = (x * 3 + y * 5 + seed * 17) % 256;
        let n = (x ^ y).wrapping_mul(2_654_435_761u32.wrapping_add(seed)) >> 27;
        Rgb([
            (v / 2 + n) as u8,
            ((x + seed) % 256) as u8 / 2 + 40,
            ((y * 2) % 256) as u8 / 2 + 60,
        ])
    })
}

fn rules() -> Vec<inspector_core::Rule> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/regulations");
    [
        "safety-operation.md",
        "site-management.txt",
        "electrical-safety.docx",
    ]
    .iter()
    .flat_map(|f| {
        extract_file(&dir.join(f), &Categorizer::default())
            .unwrap()
            .rules
    })
    .collect()
}

fn validate_and_build(file: &Path, out_dir: &Path, rules: &[inspector_core::Rule]) -> usize {
    let dataset = inspector_dataset::load_file(file, rules).unwrap();
    let samples = inspector_dataset::build_samples(&dataset, out_dir).unwrap();
    let mut bytes = Vec::new();
    for s in &samples {
        serde_json::to_writer(&mut bytes, s).unwrap();
        bytes.push(b'\n');
    }
    inspector_dataset::write_atomic(&out_dir.join("samples.jsonl"), &bytes).unwrap();
    samples.len()
}

/// The fixed pipeline the reference runs.
fn pipeline(img: &RgbImage) -> Vec<u8> {
    let (img, _) = apply(img, &[], &Op::Flip);
    let (img, _) = apply(&img, &[], &Op::Rotate { degrees: 10.0 });
    let (w, h) = img.dimensions();
    let crop = Op::Crop {
        x: w / 10,
        y: h / 10,
        width: w * 8 / 10,
        height: h * 8 / 10,
    };
    let (img, _) = apply(&img, &[], &crop);
    let (img, _) = apply(&img, &[], &Op::Brightness { factor: 1.2 });
    let (img, _) = apply(&img, &[], &Op::Contrast { factor: 0.8 });
    let (img, _) = apply(&img, &[], &Op::Blur { sigma: 1.0 });
    encode_png(&img)
}

fn ratio(ours: f64, theirs: Option<f64>) -> String {
    theirs.map_or("reference unavailable".into(), |t| {
        format!("ratio {:.2}", ours / t)
    })
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let rules = rules();
    let citations: Vec<&str> = rules.iter().map(|r| r.citation.as_str()).collect();

    // --- validate + build on 10,000 records ---
    std::fs::create_dir(dir.join("images")).unwrap();
    let lines: Vec<String> = (0..RECORDS as u32)
        .into_par_iter()
        .map(|k| {
            let name = format!("images/{k:05}.png");
            scene(128, 96, k).save(dir.join(&name)).unwrap();
            let violations = if k % 3 == 0 {
                vec![]
            } else {
                vec![Violation {
                    description: "作业人员未佩戴安全帽".into(),
                    rule: citations[k as usize % citations.len()].to_string(),
                    risk: [Risk::High, Risk::Medium, Risk::Low][k as usize % 3],
                    suggestion: Some("立即佩戴合格安全帽".into()),
                    bbox: Some([25.0, 24.0, 64.0, 72.0]),
                }]
            };
            serde_json::to_string(&Annotation {
                image: name,
                violations,
            })
            .unwrap()
        })
        .collect();
    let file = dir.join("annotations.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    std::fs::write(
        dir.join("rules.json"),
        serde_json::to_vec(&citations).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("instruction.txt"), INSTRUCTION).unwrap();
    let out = dir.join("built");
    std::fs::create_dir(&out).unwrap();

    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let start = Instant::now();
    let n = one.install(|| validate_and_build(&file, &out, &rules));
    let single = n as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let n = validate_and_build(&file, &out, &rules);
    let parallel = n as f64 / start.elapsed().as_secs_f64();
    let py = reference(&[
        "validate",
        file.to_str().unwrap(),
        dir.join("py-samples.jsonl").to_str().unwrap(),
        dir.join("rules.json").to_str().unwrap(),
        dir.join("instruction.txt").to_str().unwrap(),
    ])
    .map(|(n, s)| n as f64 / s);
    println!("validate+build, {RECORDS} records with 128×96 PNGs:");
    println!(
        "  rust 1 thread  {single:>8.0} records/s  ({})",
        ratio(single, py)
    );
    println!(
        "  rust {} threads {parallel:>7.0} records/s  ({})",
        rayon::current_num_threads(),
        ratio(parallel, py)
    );
    if let Some(py) = py {
        println!("  python+Pillow  {py:>8.0} records/s");
    }

    // --- augment ---
    std::fs::create_dir(dir.join("photos")).unwrap();
    let photos: Vec<PathBuf> = (0..AUGMENT_IMAGES as u32)
        .into_par_iter()
        .map(|k| {
            let path = dir.join(format!("photos/{k:03}.jpg"));
            scene(640, 480, k).save(&path).unwrap();
            path
        })
        .collect();
    let listing = dir.join("photos.txt");
    let names: Vec<&str> = photos.iter().map(|p| p.to_str().unwrap()).collect();
    std::fs::write(&listing, names.join("\n")).unwrap();
    let aug_out = dir.join("aug");
    std::fs::create_dir(&aug_out).unwrap();
    let run = |path: &PathBuf, i: usize| {
        let bytes = std::fs::read(path).unwrap();
        let img = inspector_imaging::decode_rgb(&bytes, u64::MAX).unwrap();
        std::fs::write(aug_out.join(format!("{i}.png")), pipeline(&img)).unwrap();
    };
    let start = Instant::now();
    one.install(|| photos.iter().enumerate().for_each(|(i, p)| run(p, i)));
    let single = AUGMENT_IMAGES as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    photos.par_iter().enumerate().for_each(|(i, p)| run(p, i));
    let parallel = AUGMENT_IMAGES as f64 / start.elapsed().as_secs_f64();
    let py = reference(&[
        "augment",
        listing.to_str().unwrap(),
        dir.join("py-aug").to_str().unwrap(),
    ])
    .map(|(n, s)| n as f64 / s);
    println!(
        "augment, {AUGMENT_IMAGES} 640×480 JPEGs (flip, rotate, crop, brightness, contrast, blur, PNG):"
    );
    println!(
        "  rust 1 thread  {single:>8.1} images/s  ({})",
        ratio(single, py)
    );
    println!(
        "  rust {} threads {parallel:>7.1} images/s  ({})",
        rayon::current_num_threads(),
        ratio(parallel, py)
    );
    if let Some(py) = py {
        println!("  python+Pillow  {py:>8.1} images/s");
    }
}
