//! The bundled demo model as the fast default of the inspection benchmarks: `inspector detect`
//! on 64 synthetic scenes (seed 4242, 320×240) at batch 8 with no cache, as whole processes
//! (model loading included), for the bundled demo and for the demo it replaced, in the same
//! run, one after the other, each `DEMO_BENCH_RUNS` times (default 3, the best kept).
//!
//! The previous demo comes from git history (`PREVIOUS_DEMO_COMMIT`, or `PREVIOUS_DEMO=DIR`);
//! without it only the bundled demo is measured.
//!
//! Run: `cargo bench -p inspector-cli --bench demo` (needs Debian's `time` package).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The last commit whose `models/demo` is the previous demo (1.87 M parameters, 280×196 input,
/// text rope θ 10,000).
const PREVIOUS_DEMO_COMMIT: &str = "b2c61db";
const SCENES: usize = 64;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[allow(dead_code)] // only the time and the memory are read here
mod common;

/// Wall seconds and peak RSS (MB) of one `detect` process.
fn detect(model: &Path, photos: &[PathBuf], db: &Path) -> (f64, f64) {
    let mut args: Vec<String> = ["detect", "--batch-size", "8", "--no-cache", "--db"]
        .map(String::from)
        .into();
    args.push(db.display().to_string());
    args.extend(photos.iter().map(|p| p.display().to_string()));
    let env = [("INSPECTOR_DEMO_MODEL", model.display().to_string())];
    let run = common::timed(env!("CARGO_BIN_EXE_inspector"), &args, &env);
    (run.wall_s, run.rss_mb)
}

/// The previous demo, unpacked from git history into `dir`.
fn previous_demo(dir: &Path) -> Option<PathBuf> {
    if let Ok(d) = std::env::var("PREVIOUS_DEMO") {
        return Some(PathBuf::from(d));
    }
    let commit =
        std::env::var("PREVIOUS_DEMO_COMMIT").unwrap_or_else(|_| PREVIOUS_DEMO_COMMIT.into());
    let tar = dir.join("previous.tar");
    let archived = Command::new("git")
        .arg("-C")
        .arg(root())
        .args(["archive", "--format=tar", "-o"])
        .arg(&tar)
        .arg(&commit)
        .arg("models/demo")
        .status();
    if !matches!(archived, Ok(s) if s.success()) {
        eprintln!("the previous demo ({commit}) is not in this clone's history: not measured");
        return None;
    }
    let unpacked = Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(dir)
        .status()
        .unwrap();
    assert!(unpacked.success());
    Some(dir.join("models/demo"))
}

fn main() {
    let runs: usize = std::env::var("DEMO_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let tmp = tempfile::tempdir().unwrap();
    let scenes = tmp.path().join("scenes");
    let made = Command::new(env!("CARGO_BIN_EXE_inspector"))
        .args(["synth", "--n", &SCENES.to_string(), "--seed", "4242"])
        .args(["--size", "320", "--out"])
        .arg(&scenes)
        .output()
        .unwrap();
    assert!(made.status.success());
    let photos: Vec<PathBuf> = (0..SCENES)
        .map(|i| scenes.join(format!("images/{i:05}.png")))
        .collect();
    let db = tmp.path().join("bench.db");
    let mut models = vec![("bundled demo", root().join("models/demo"))];
    if let Some(p) = previous_demo(tmp.path()) {
        models.push(("previous demo", p));
    }
    let mut best = vec![(f64::MAX, 0.0f64); models.len()];
    // Alternating, so that a slow minute of a shared machine falls on both sides.
    for _ in 0..runs {
        for (k, (_, dir)) in models.iter().enumerate() {
            let (wall, rss) = detect(dir, &photos, &db);
            if wall < best[k].0 {
                best[k] = (wall, rss);
            }
        }
    }
    println!("| model | wall s (best of {runs}) | photos/s | peak RSS MB |");
    println!("|---|---|---|---|");
    for ((name, _), (wall, rss)) in models.iter().zip(&best) {
        println!(
            "| {name} | {wall:.2} | {:.1} | {rss:.0} |",
            SCENES as f64 / wall
        );
    }
    if best.len() == 2 {
        println!("bundled / previous photos/s: {:.2}", best[1].0 / best[0].0);
    }
}
