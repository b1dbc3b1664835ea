//! `--device`: the choice is printed, and every refusal comes before any file is read, with
//! exit 1 and a message that names the fix. These run on a build without the `cuda` feature
//! (CI's); on a CUDA build the GPU suite (`tools/gpu/check.sh`) covers the rest.

use std::{path::PathBuf, process::Command};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn inspector(args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_inspector"))
        .args(args)
        .current_dir(dir.path())
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Every command that loads a model takes `--device`; on a CPU-only build `cuda` is refused
/// by naming the feature, before the (missing) model or data is looked at.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_on_a_cpu_build_is_refused_before_anything_loads() {
    let missing = "no-such-model";
    let commands: Vec<Vec<&str>> = vec![
        vec!["detect", "photos", "--model", missing],
        vec!["eval", "--data", "a.jsonl", "--model", missing],
        vec!["chat", "--model", missing, "--prompt", "hi"],
        vec!["model", "info", "--model", missing],
        vec![
            "model",
            "forward",
            "--model",
            missing,
            "--input-ids",
            "1",
            "--out",
            "o.st",
        ],
        vec![
            "train", "--model", missing, "--data", "a.jsonl", "--out", "run",
        ],
        vec![
            "pretrain-vision",
            "--model",
            missing,
            "--data",
            "a.jsonl",
            "--out",
            "run",
        ],
    ];
    for mut args in commands {
        args.extend(["--device", "cuda:1"]);
        let (code, _, err) = inspector(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(
            err.contains("built without CUDA") && err.contains("`cuda` feature"),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains(missing),
            "{args:?} looked at the model first: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn an_unknown_device_is_refused_with_the_forms_accepted() {
    let (code, _, err) = inspector(&["model", "info", "--model", "m", "--device", "gpu0"]);
    assert_eq!(code, 2, "a usage error: {err}");
    assert!(
        err.contains("gpu0") && err.contains("cpu, cuda, cuda:N or auto"),
        "{err}"
    );
}

/// `auto` (the default) on a CPU-only build says that it chose the CPU and why.
#[cfg(not(feature = "cuda"))]
#[test]
fn auto_chooses_the_cpu_and_says_so() {
    let tiny = root().join("crates/qwen2vl/tests/fixtures/tiny-a");
    let (code, out, err) = inspector(&["model", "info", "--model", tiny.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("device: cpu (auto: this build has no CUDA)"),
        "{err}"
    );
    assert!(out.contains("architecture: Qwen2-VL"), "{out}");
    let (code, _, err) = inspector(&[
        "model",
        "info",
        "--model",
        tiny.to_str().unwrap(),
        "--device",
        "cpu",
        "--quantize",
        "q8_0",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("device: cpu"), "{err}");
    // A quantized base is the CPU's: naming a GPU for it is refused.
    let (code, _, err) = inspector(&[
        "model",
        "info",
        "--model",
        tiny.to_str().unwrap(),
        "--device",
        "cuda",
        "--quantize",
        "q8_0",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("runs on the CPU only"), "{err}");
}

/// On a CUDA build (run by tools/gpu/check.sh on a GPU machine): an ordinal beyond the GPUs
/// present is refused with the range, and `auto` takes the first GPU.
#[cfg(feature = "cuda")]
#[test]
fn cuda_ordinal_out_of_range_is_refused_and_auto_takes_the_gpu() {
    let tiny = root().join("crates/qwen2vl/tests/fixtures/tiny-a");
    let (code, _, err) = inspector(&[
        "model",
        "info",
        "--model",
        tiny.to_str().unwrap(),
        "--device",
        "cuda:99",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cuda:99 is out of range") && err.contains("cuda:0 to"),
        "{err}"
    );
    let (code, _, err) = inspector(&["model", "info", "--model", tiny.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("device: cuda:0") && err.contains("(auto)"),
        "{err}"
    );
}
