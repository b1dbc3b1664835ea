//! `--data synth:…`: the trainers learn from scenes rendered when a batch needs them, and get
//! exactly what the same scenes written by `inspector synth` give them.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../qwen2vl/tests/fixtures")
}

fn inspector(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_inspector"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    err
}

const SPEC: &str = "synth:n=12,seed=5,size=224,exclude=stack-too-high";
const PIXELS: [&str; 4] = ["--min-pixels", "3136", "--max-pixels", "12544"];

/// Writes the same scenes as [`SPEC`] to `scenes/`.
fn write_scenes(d: &Path) {
    ok(&inspector(
        d,
        &[
            "synth",
            "--n",
            "12",
            "--seed",
            "5",
            "--size",
            "224",
            "--exclude",
            "stack-too-high",
            "--out",
            "scenes",
        ],
    ));
}

#[test]
fn vision_pretraining_on_rendered_scenes_equals_training_on_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_scenes(d);
    let tiny = fixtures().join("tiny-a");
    let run = |data: &str, out: &str| {
        let mut args = vec![
            "pretrain-vision",
            "--model",
            tiny.to_str().unwrap(),
            "--data",
            data,
            "--out",
            out,
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--db",
            "x.db",
        ];
        args.extend(PIXELS);
        inspector(d, &args)
    };
    ok(&run("scenes/annotations.jsonl", "files"));
    ok(&run(SPEC, "rendered"));
    for f in ["model/model.safetensors", "metrics.jsonl", "classes.json"] {
        let (a, b) = (
            std::fs::read(d.join("files").join(f)).unwrap(),
            std::fs::read(d.join("rendered").join(f)).unwrap(),
        );
        assert!(a == b, "{f} differs");
    }
    // The tower did learn something (the run is not a no-op on both sides).
    let metrics = std::fs::read_to_string(d.join("rendered/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"step\":4"), "{metrics}");
}

#[test]
fn full_training_on_rendered_scenes_equals_training_on_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_scenes(d);
    let tiny = fixtures().join("tiny-a");
    let run = |data: &str, out: &str| {
        let mut args = vec![
            "train",
            "--model",
            tiny.to_str().unwrap(),
            "--data",
            data,
            "--out",
            out,
            "--full",
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--grad-accum",
            "1",
            "--lr",
            "1e-3",
            "--save-every",
            "100",
            "--db",
            "x.db",
        ];
        args.extend(PIXELS);
        inspector(d, &args)
    };
    ok(&run("scenes/annotations.jsonl", "files"));
    let err = ok(&run(SPEC, "rendered"));
    assert!(!err.contains("skipped"), "{err}");
    let (a, b) = (
        std::fs::read(d.join("files/model/model.safetensors")).unwrap(),
        std::fs::read(d.join("rendered/model/model.safetensors")).unwrap(),
    );
    assert!(a == b, "the trained weights differ");
    let before = std::fs::read(tiny.join("model.safetensors")).unwrap();
    assert!(a != before, "training changed nothing");
}

#[test]
fn bad_synth_specs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tiny = fixtures().join("tiny-a");
    for (spec, says) in [
        ("synth:n=0,seed=1,size=224", "n=0"),
        ("synth:n=4,size=224", "seed= is missing"),
        ("synth:n=4,seed=1,size=32", "size 32"),
        ("synth:n=4,seed=1,size=224,exclude=ladder", "unknown hazard"),
        (
            "synth:n=4,seed=1,size=224,colour=red",
            "unknown key `colour`",
        ),
        ("synth:n=four,seed=1,size=224", "not a whole number"),
    ] {
        let o = inspector(
            d,
            &[
                "pretrain-vision",
                "--model",
                tiny.to_str().unwrap(),
                "--data",
                spec,
                "--out",
                "out",
                "--db",
                "x.db",
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(says) && err.contains("--data"),
            "{spec}: {err}"
        );
    }
    assert!(!d.join("out").exists());
    // eval reads photos from files.
    let o = inspector(
        d,
        &[
            "eval",
            "--data",
            "synth:n=4,seed=1,size=224",
            "--model",
            tiny.to_str().unwrap(),
            "--db",
            "x.db",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("inspector synth"),
        "{err}"
    );
}
