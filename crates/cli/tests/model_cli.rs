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
/// existing non-empty folder is refused.
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
    let init = |out: &str| {
        inspector(&[
            "model",
            "init",
            "--config",
            &path("small.json"),
            "--tokenizer-corpus",
            &path("corpus.txt"),
            "--out",
            &path(out),
        ])
    };
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
    let o = Command::new(env!("CARGO_BIN_EXE_inspector"))
        .args([
            "train",
            "--model",
            "m",
            "--data",
            "train.jsonl",
            "--out",
            "run",
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
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(d.join("run/model/tokenizer.json").exists());
}
