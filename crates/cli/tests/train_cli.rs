//! `inspector train`, `--adapter` and `inspector adapter merge` on the tiny checkpoint:
//! training writes a PEFT adapter; a SIGKILL after a checkpoint and `--resume` end where a
//! straight run ends; bad data is all listed before training; a merged model computes what base
//! + adapter computes.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny() -> PathBuf {
    root().join("crates/qwen2vl/tests/fixtures/tiny-a")
}

fn inspector(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_inspector"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Four photos and their annotations (citations of the bundled regulations).
fn data(dir: &Path) {
    let mut lines = Vec::new();
    for k in 0..4u32 {
        image::RgbImage::from_fn(56, 56, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4 + k * 40) as u8, 90])
        })
        .save(dir.join(format!("{k}.png")))
        .unwrap();
        lines.push(if k % 2 == 0 {
            format!(r#"{{"image": "{k}.png", "violations": []}}"#)
        } else {
            format!(r#"{{"image": "{k}.png", "violations": [{{"description": "未戴安全帽", "rule": "《安全作业规程》第3.1条", "risk": "高", "box": [5, 5, 40, 50]}}]}}"#)
        });
    }
    std::fs::write(dir.join("train.jsonl"), lines.join("\n") + "\n").unwrap();
}

fn train_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--model",
        tiny().to_str().unwrap(),
        "--data",
        "train.jsonl",
        "--out",
        out,
        "--lr",
        "1e-2",
        "--lora-r",
        "2",
        "--lora-dropout",
        "0.1",
        "--grad-accum",
        "1",
        "--batch-size",
        "2",
        "--min-pixels",
        "3136",
        "--max-pixels",
        "3136",
        "--db",
        "x.db",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn adapter_weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let t = candle_core::safetensors::load(
        dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn sigkill_and_resume_end_where_a_straight_run_ends() {
    let dir = tempfile::tempdir().unwrap();
    data(dir.path());
    let args = |out: &'static str, extra: &[&'static str]| train_args(out, extra);
    let run = |a: Vec<String>| {
        inspector(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            dir.path(),
        )
    };

    let o = run(args(
        "straight",
        &["--max-steps", "60", "--save-every", "10"],
    ));
    ok(&o);
    let straight = adapter_weights(&dir.path().join("straight/adapter"));
    assert!(dir.path().join("straight/metrics.jsonl").exists());
    let pairs = straight.len() / 2;
    assert_eq!(pairs, 14, "the language model's 7 projections × 2 layers");

    // --max-steps overrides the 5 default epochs (2 steps each here): the run is 60 steps long.
    let metrics = std::fs::read_to_string(dir.path().join("straight/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(
        metrics
            .lines()
            .rfind(|l| l.contains("\"loss\""))
            .expect("a logged step"),
    )
    .unwrap();
    assert_eq!(last["step"], 60, "{metrics}");

    // The same run, killed with SIGKILL once step 10's checkpoint is complete, up to 50 steps
    // before the end: on a loaded machine the kill may land a few checkpoints later, and the
    // run resumes from whichever is the last. (Should the run still end before the kill, it
    // tries again.)
    let a = args("killed", &["--max-steps", "60", "--save-every", "10"]);
    let marker = dir
        .path()
        .join("killed/checkpoints/step-10/trainer_state.json");
    for attempt in 1..=3 {
        let _ = std::fs::remove_dir_all(dir.path().join("killed"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_inspector"))
            .args(&a)
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !marker.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "no checkpoint at step 10"
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before step 10's checkpoint"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        if !dir.path().join("killed/adapter").exists() || attempt == 3 {
            break;
        }
    }
    assert!(
        !dir.path().join("killed/adapter").exists(),
        "killed before the end"
    );
    // … then resumed from its last complete checkpoint.
    let o = run(args(
        "killed",
        &["--max-steps", "60", "--save-every", "10", "--resume"],
    ));
    ok(&o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let from: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("resuming at step "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no resume: {stderr}"));
    assert!(
        (10..60).contains(&from) && from.is_multiple_of(10),
        "resumed at step {from}"
    );
    let resumed = adapter_weights(&dir.path().join("killed/adapter"));
    let mut worst = 0f32;
    for ((ka, a), (kb, b)) in straight.iter().zip(&resumed) {
        assert_eq!(ka, kb);
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst <= 1e-6, "adapter weights differ by {worst:e}");

    // The adapter applies in `model forward` and changes the logits.
    let tiny = tiny();
    let forward = |extra: &[&str], out: &str| {
        let mut a = vec![
            "model",
            "forward",
            "--model",
            tiny.to_str().unwrap(),
            "--input-ids",
            "1,2,3,4,5",
            "--out",
            out,
        ];
        a.extend(extra);
        ok(&inspector(&a, dir.path()));
        candle_core::safetensors::load(dir.path().join(out), &candle_core::Device::Cpu).unwrap()["logits"].clone()
    };
    let base = forward(&[], "base.safetensors");
    let adapted = forward(&["--adapter", "straight/adapter"], "adapted.safetensors");
    let diff: f32 = (&base - &adapted)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff > 1e-3, "the adapter changed nothing ({diff})");
}

#[test]
fn bad_data_is_all_listed_before_training() {
    let dir = tempfile::tempdir().unwrap();
    data(dir.path());
    let mut text = std::fs::read_to_string(dir.path().join("train.jsonl")).unwrap();
    text.push_str("{\"image\": \"missing.png\", \"violations\": []}\n{broken\n");
    std::fs::write(dir.path().join("train.jsonl"), text).unwrap();
    std::fs::write(dir.path().join("eval.jsonl"), "{\"image\": \"0.png\", \"violations\": [{\"description\": \"x\", \"rule\": \"《安全作业规程》第99条\", \"risk\": \"高\"}]}\n").unwrap();
    let a = train_args("run", &["--eval-data", "eval.jsonl", "--max-steps", "2"]);
    let o = inspector(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        dir.path(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("train.jsonl:5: error: image:"), "{err}");
    assert!(
        err.contains("train.jsonl:6: error: : not valid JSON"),
        "{err}"
    );
    assert!(
        err.contains("eval.jsonl:1: error: violations[0].rule:"),
        "{err}"
    );
    assert!(!dir.path().join("run").exists(), "nothing is written");
}

#[test]
fn merged_model_equals_base_plus_adapter_and_bad_adapters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = root().join("crates/train/tests/fixtures/peft/adapter");
    let o = inspector(
        &[
            "adapter",
            "merge",
            "--model",
            tiny().to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            "merged",
        ],
        dir.path(),
    );
    ok(&o);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "chat_template.json",
    ] {
        assert!(dir.path().join("merged").join(f).exists(), "{f}");
    }
    let image = root().join("crates/qwen2vl/tests/fixtures/images/coffee.png");
    let logits = |model: &str, extra: &[&str], out: &str| {
        let mut a = vec![
            "model",
            "forward",
            "--model",
            model,
            "--image",
            image.to_str().unwrap(),
            "--input-ids",
            "302,300,303,5,6,7",
            "--max-pixels",
            "12544",
            "--out",
            out,
        ];
        a.extend(extra);
        ok(&inspector(&a, dir.path()));
        candle_core::safetensors::load(dir.path().join(out), &candle_core::Device::Cpu).unwrap()["logits"].clone()
    };
    let tiny = tiny();
    let with_adapter = logits(
        tiny.to_str().unwrap(),
        &["--adapter", adapter.to_str().unwrap()],
        "a.safetensors",
    );
    let merged = logits("merged", &[], "m.safetensors");
    let diff: f32 = (&with_adapter - &merged)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff <= 1e-4, "merged logits differ by {diff:e}");

    // An adapter for another base (tiny-c has other widths) is refused, naming the adapter.
    let other = root().join("crates/qwen2vl/tests/fixtures/tiny-c");
    let o = inspector(
        &[
            "model",
            "forward",
            "--model",
            other.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--input-ids",
            "1,2",
            "--out",
            "x.safetensors",
        ],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("adapter") && !err.contains("panicked"),
        "{err}"
    );
    // A DoRA adapter is refused with a clear message.
    let dora = dir.path().join("dora");
    std::fs::create_dir(&dora).unwrap();
    std::fs::copy(
        adapter.join("adapter_model.safetensors"),
        dora.join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(adapter.join("adapter_config.json"))
        .unwrap()
        .replace("\"use_dora\": false", "\"use_dora\": true");
    std::fs::write(dora.join("adapter_config.json"), cfg).unwrap();
    let o = inspector(
        &[
            "model",
            "forward",
            "--model",
            tiny.to_str().unwrap(),
            "--adapter",
            "dora",
            "--input-ids",
            "1,2",
            "--out",
            "x.safetensors",
        ],
        dir.path(),
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("DoRA"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn full_fine_tuning_writes_a_model_that_the_cli_loads() {
    let dir = tempfile::tempdir().unwrap();
    data(dir.path());
    let args = train_args("run", &["--full", "--max-steps", "3", "--save-every", "2"]);
    let o = inspector(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        dir.path(),
    );
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("full fine-tuning:"), "{err}");
    let run = dir.path().join("run");
    for f in [
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "checkpoints/step-2/model/model.safetensors",
        "checkpoints/step-2/optimizer.safetensors",
        "loss.png",
        "metrics.jsonl",
    ] {
        assert!(run.join(f).exists(), "{f}");
    }
    assert!(!run.join("adapter").exists());
    // The training pixel limits went into the written processor config.
    let pre: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("model/preprocessor_config.json")).unwrap())
            .unwrap();
    assert_eq!(pre["max_pixels"], 3136);
    // The written model runs.
    ok(&inspector(
        &[
            "model",
            "forward",
            "--model",
            "run/model",
            "--input-ids",
            "5,6,7",
            "--out",
            "f.safetensors",
        ],
        dir.path(),
    ));
    image::open(run.join("loss.png")).unwrap();

    // bf16 full fine-tuning is refused before anything runs.
    let args = train_args("run2", &["--full", "--dtype", "bf16"]);
    let o = inspector(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        dir.path(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--full"), "{err}");
    assert!(!dir.path().join("run2").exists());
}
