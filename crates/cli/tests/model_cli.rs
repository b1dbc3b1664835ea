//! `inspector model forward` / `info`: the fixed interface other tools call.

use std::{path::PathBuf, process::Command};

use candle_core::{DType, Device};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../qwen2vl/tests/fixtures")
}

fn inspector(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_inspector"))
        .args(args)
        .output()
        .unwrap()
}

fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn forward_text_only_matches_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let r = candle_core::safetensors::load(
        fixtures().join("tiny-a/reference/text_only.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids: Vec<i64> = r["input_ids"].flatten_all().unwrap().to_vec1().unwrap();
    let ids_arg = ids
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let model = fixtures().join("tiny-a");
    let o = inspector(&[
        "model",
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--input-ids",
        &ids_arg,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(t["logits"].dims(), &[ids.len(), 320]);
    assert_eq!(t["logits"].dtype(), DType::F32);
    assert!(max_diff(&t["logits"], &r["logits"].squeeze(0).unwrap()) <= 1e-4);
    assert_eq!(t["input_ids"].to_vec1::<i64>().unwrap(), ids);
    assert_eq!(t["position_ids"].dims(), &[3, ids.len()]);
    assert_eq!(
        t["position_ids"].to_vec2::<i64>().unwrap(),
        r["position_ids"]
            .squeeze(1)
            .unwrap()
            .to_vec2::<i64>()
            .unwrap()
    );
    assert_eq!(t["image_grid_thw"].dims(), &[0, 3]);
}

#[test]
fn forward_expands_image_pads_and_processes_the_photo() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let model = fixtures().join("tiny-b"); // image pad 310, vision start/end 308/309
    let image = fixtures().join("images/coffee.png");
    let o = inspector(&[
        "model",
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--input-ids",
        "5,308,310,309,7",
        "--min-pixels",
        "3136",
        "--max-pixels",
        "12544",
        "--dtype",
        "bf16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let r = candle_core::safetensors::load(
        fixtures().join("images/reference/coffee.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        t["image_grid_thw"].to_vec2::<i64>().unwrap(),
        vec![vec![1, 6, 8]]
    );
    let ids: Vec<i64> = t["input_ids"].to_vec1().unwrap();
    assert_eq!(ids.len(), 4 + 12);
    assert_eq!(ids.iter().filter(|&&i| i == 310).count(), 12);
    assert!(max_diff(&t["pixel_values"], &r["pixel_values_fast"]) <= 0.0151);
    assert_eq!(t["logits"].dims(), &[16, 336]);
    // The image's h/w positions span start + 0..3 and start + 0..4 (6×8 patches → 3×4 tokens).
    let pos = t["position_ids"].to_vec2::<i64>().unwrap();
    assert_eq!(&pos[1][2..14], &[2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4]);
    assert_eq!(&pos[2][2..6], &[2, 3, 4, 5]);
    // After the image: vision_end at start + max(3, 4) = 6, the last text token at 7.
    assert_eq!((pos[0][14], pos[0][15]), (6, 7));
}

#[test]
fn forward_refuses_mismatched_images_and_bad_ids() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let model = fixtures().join("tiny-a");
    let image = fixtures().join("images/coffee.png");
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "--input-ids",
                "302,300,300,303",
                "--image",
                image.to_str().unwrap(),
            ],
            "2 image-pad tokens (id 300) but 1 --image",
        ),
        (&["--input-ids", "1,2,x"], "item 3 `x` is not a token id"),
        (
            &["--input-ids", "1,2,9999"],
            "9999 is outside the vocabulary",
        ),
    ];
    for (extra, message) in cases {
        let mut args = vec![
            "model",
            "forward",
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = inspector(&args);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(message), "{err}");
        assert!(!out.exists(), "no output on failure");
    }
}

#[test]
fn info_describes_each_layout() {
    let a = inspector(&[
        "model",
        "info",
        "--model",
        fixtures().join("tiny-a").to_str().unwrap(),
    ]);
    let a = String::from_utf8_lossy(&a.stdout).into_owned();
    assert!(
        a.contains("hub (flat)")
            && a.contains("hub (model.layers.*, visual.*)")
            && !a.contains("tied"),
        "{a}"
    );
    let b = inspector(&[
        "model",
        "info",
        "--model",
        fixtures().join("tiny-b").to_str().unwrap(),
    ]);
    let b = String::from_utf8_lossy(&b.stdout).into_owned();
    assert!(
        b.contains("nested") && b.contains("model.language_model") && b.contains("tied embeddings"),
        "{b}"
    );
    assert!(b.contains("2 file(s)") && b.contains("410.4K total"), "{b}");
}

/// `model init` writes a directory that `model info` reads and `train --full` trains; an
/// existing non-empty folder is refused. The prompt chosen at init (`--prompt brief`) is
/// recorded, kept by training and recorded again in what training writes.
#[test]
fn init_writes_a_model_that_trains() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // tiny-a's shapes with a larger vocabulary.
    let config = std::fs::read_to_string(fixtures().join("tiny-a/config.json"))
        .unwrap()
        .replace("\"vocab_size\": 320", "\"vocab_size\": 700");
    std::fs::write(d.join("small.json"), config).unwrap();
    let mut corpus = String::new();
    for k in 0..40 {
        corpus.push_str(&format!(
            "{{\"status\":\"violation\",\"violations\":[{{\"description\":\"未戴安全帽\",\"rule\":\"《安全作业规程》第3.{}条\",\"risk\":\"高\",\"box\":[{},{},{},{}]}}]}}\n",
            k % 5 + 1, k * 11, k * 7, k * 13 + 100, k * 17 + 100
        ));
    }
    corpus.push_str(inspector_core::answer::INSTRUCTION);
    std::fs::write(d.join("corpus.txt"), corpus).unwrap();
    let path = |f: &str| d.join(f).to_str().unwrap().to_string();
    let init_with = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "model".to_string(),
            "init".into(),
            "--config".into(),
            path("small.json"),
            "--tokenizer-corpus".into(),
            path("corpus.txt"),
            "--out".into(),
            path(out),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        inspector(&args)
    };
    let init = |out: &str| init_with(out, &[]);
    let o = init("m");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let info = inspector(&["model", "info", "--model", &path("m")]);
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    // Refused over an existing model.
    let again = init("m");
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && err.contains("refusing to overwrite"),
        "{err}"
    );

    // Two steps of full fine-tuning on one annotated photo.
    image::RgbImage::from_fn(56, 56, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 90]))
        .save(d.join("0.png"))
        .unwrap();
    std::fs::write(
        d.join("train.jsonl"),
        "{\"image\": \"0.png\", \"violations\": [{\"description\": \"未戴安全帽\", \"rule\": \"《安全作业规程》第3.1条\", \"risk\": \"高\", \"box\": [5, 5, 40, 50]}]}\n",
    )
    .unwrap();
    let train = |model: &str, out: &str| {
        Command::new(env!("CARGO_BIN_EXE_inspector"))
            .args([
                "train",
                "--model",
                model,
                "--data",
                "train.jsonl",
                "--out",
                out,
                "--full",
                "--max-steps",
                "2",
                "--grad-accum",
                "1",
                "--min-pixels",
                "3136",
                "--max-pixels",
                "3136",
                "--db",
                "x.db",
            ])
            .current_dir(d)
            .output()
            .unwrap()
    };
    let o = train("m", "run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(d.join("run/model/tokenizer.json").exists());
    let prompt_of = |f: &str| {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join(f)).unwrap()).unwrap();
        v["prompt_version"].as_str().unwrap().to_string()
    };
    assert_eq!(prompt_of("m/inspector_model.json"), "inspect-v1");
    assert_eq!(prompt_of("run/model/inspector_model.json"), "inspect-v1");

    // The brief prompt: recorded at init, kept and recorded by training.
    let o = init_with("b", &["--prompt", "brief"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(prompt_of("b/inspector_model.json"), "inspect-brief-v1");
    let o = train("b", "run-b");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("prompt inspect-brief-v1"), "{err}");
    assert_eq!(
        prompt_of("run-b/model/inspector_model.json"),
        "inspect-brief-v1"
    );

    // A version this build does not know is refused, naming the file.
    std::fs::write(
        d.join("b/inspector_model.json"),
        r#"{"prompt_version": "inspect-v0"}"#,
    )
    .unwrap();
    let o = train("b", "run-c");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("inspector_model.json") && err.contains("inspect-v0"),
        "{err}"
    );
}

/// `pretrain-vision` writes a complete model directory whose vision tower changed and whose
/// language model did not; a violation without a box, or an existing output, is refused
/// with the file and line named.
#[test]
fn pretrain_vision_trains_the_tower_and_refuses_boxless_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for k in 0..4u32 {
        image::RgbImage::from_fn(56, 56, |x, y| {
            if x / 28 == k % 2 && y / 28 == k / 2 {
                image::Rgb([230, 40, 40])
            } else {
                image::Rgb([100, 100, 100])
            }
        })
        .save(d.join(format!("{k}.png")))
        .unwrap();
    }
    let line = |k: u32, with_box: bool| {
        let (x, y) = ((k % 2) * 28, (k / 2) * 28);
        let b = if with_box {
            format!(", \"box\": [{x}, {y}, {}, {}]", x + 28, y + 28)
        } else {
            String::new()
        };
        format!(
            "{{\"image\": \"{k}.png\", \"violations\": [{{\"description\": \"未戴安全帽\", \"rule\": \"《安全作业规程》第3.1条\", \"risk\": \"高\"{b}}}]}}\n"
        )
    };
    let good: String = (0..4).map(|k| line(k, true)).collect();
    std::fs::write(d.join("good.jsonl"), good).unwrap();
    let bad: String = (0..4).map(|k| line(k, k != 2)).collect();
    std::fs::write(d.join("bad.jsonl"), bad).unwrap();
    let run = |data: &str, out: &str| {
        Command::new(env!("CARGO_BIN_EXE_inspector"))
            .args(["pretrain-vision", "--model"])
            .arg(fixtures().join("tiny-a"))
            .args([
                "--data",
                data,
                "--out",
                out,
                "--steps",
                "3",
                "--batch-size",
                "2",
                "--min-pixels",
                "3136",
                "--max-pixels",
                "3136",
                "--db",
                "x.db",
            ])
            .current_dir(d)
            .output()
            .unwrap()
    };
    let o = run("bad.jsonl", "bad");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("bad.jsonl:3") && err.contains("no box"),
        "{err}"
    );
    assert!(!d.join("bad/model").exists());

    let o = run("good.jsonl", "run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let weights = |dir: PathBuf| {
        let (_, _, w) =
            inspector_qwen2vl::Qwen2Vl::load_trainable(&dir, DType::F32, &Device::Cpu).unwrap();
        w.into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (before, after) = (
        weights(fixtures().join("tiny-a")),
        weights(d.join("run/model")),
    );
    let changed: Vec<&String> = before
        .keys()
        .filter(|n| max_diff(&before[*n], &after[*n]) > 0.0)
        .collect();
    assert!(!changed.is_empty());
    assert!(changed.iter().all(|n| n.contains("visual.")), "{changed:?}");
    let metrics = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"step\":3"), "{metrics}");
    assert!(d.join("run/loss.png").is_file());

    // An existing model is not overwritten.
    let o = run("good.jsonl", "run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("refusing to overwrite"),
        "{err}"
    );

    // With --lora-r the tower is frozen and a vision adapter comes out; `train` continues
    // from it with the language model's layers added.
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_inspector"))
            .args(args)
            .current_dir(d)
            .output()
            .unwrap()
    };
    let tiny = fixtures().join("tiny-a");
    let tiny = tiny.to_str().unwrap();
    let pixels = [
        "--min-pixels",
        "3136",
        "--max-pixels",
        "3136",
        "--db",
        "x.db",
    ];
    let o = cli(&[
        &[
            "pretrain-vision",
            "--model",
            tiny,
            "--data",
            "good.jsonl",
            "--out",
            "vl",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
        ][..],
        &pixels,
    ]
    .concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("《安全作业规程》第3.1条:"),
        "per-class summary: {err}"
    );
    assert!(!d.join("vl/model").exists());
    let modules = |dir: &str| {
        let v: serde_json::Value = serde_json::from_slice(
            &std::fs::read(d.join(dir).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let mut m: Vec<String> = v["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect();
        m.sort();
        m
    };
    let vision = modules("vl/adapter");
    assert!(
        vision
            .iter()
            .all(|m| inspector_lora::VISION_TARGETS.contains(&m.as_str())),
        "{vision:?}"
    );
    let metrics = std::fs::read_to_string(d.join("vl/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"recall\""), "{metrics}");
    let train = |out: &str, extra: &[&str]| {
        let common = [
            "train",
            "--model",
            tiny,
            "--data",
            "good.jsonl",
            "--out",
            out,
            "--lora-alpha",
            "8",
            "--grad-accum",
            "1",
        ];
        cli(&[&common[..], extra, &pixels].concat())
    };
    let init = ["--init-adapter", "vl/adapter"];
    let o = train(
        "lm",
        &[
            &init[..],
            &["--lora-r", "4", "--lora-vision", "--max-steps", "1"],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let both = modules("lm/adapter");
    assert!(both.contains(&"q_proj".to_string()) && vision.iter().all(|m| both.contains(m)));
    let o = train(
        "lm8",
        &[&init[..], &["--lora-r", "8", "--max-steps", "1"]].concat(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("vl/adapter/adapter_config.json")
            && err.contains("r 4"),
        "{err}"
    );
    // Without --lora-vision the vision layers still continue, and PEFT's config names them.
    let o = train(
        "lm-text",
        &[
            &init[..],
            &["--lora-r", "4", "--max-steps", "2", "--save-every", "1"],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(modules("lm-text/adapter"), both);
    // Resuming without the settings the run started with is refused, not mis-loaded.
    let o = train(
        "lm-text",
        &["--lora-r", "4", "--max-steps", "3", "--resume"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--init-adapter") && err.contains("step-2"),
        "{err}"
    );
}
