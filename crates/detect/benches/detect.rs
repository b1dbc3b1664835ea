//! Inspection throughput on the fixture (the tiny checkpoint with the overfitted adapter and
//! its eight photos, repeated to 16): photos/s at batch 1, 4 and 8 (decode, preprocess, greedy
//! generation up to `<|im_end|>`, parse, citations), against transformers + PEFT generating
//! for the same prompts and pixels in the same run (`tools/bench_detect_transformers.py`); and
//! the latency of a cache hit.
//!
//! Run: `INSPECTOR_PYTHON=/path/to/venv/bin/python cargo bench -p inspector-detect --bench detect`
//! (the venv needs torch, transformers and peft; without it only our side is measured).

use std::{collections::HashMap, path::PathBuf, process::Command, time::Instant};

use candle_core::{Device, Tensor};
use inspector_core::answer::INSTRUCTION;
use inspector_detect::{DetectConfig, Detector, Input};
use inspector_qwen2vl::chat::ChatTokenizer;

const COPIES: usize = 2;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn main() {
    let tiny = root().join("crates/qwen2vl/tests/fixtures/tiny-a");
    let adapter = root().join("crates/train/tests/fixtures/overfit/adapter");
    let data = root().join("crates/train/tests/fixtures/overfit/data");
    let backend = inspector_qwen2vl::Backend::cpu();
    let detector =
        Detector::load(&tiny, Some(&adapter), &backend, DetectConfig::default()).unwrap();
    let mut inputs = Vec::new();
    for _ in 0..COPIES {
        for k in 0..8 {
            inputs.push(Input {
                name: format!("{k}.png"),
                bytes: std::fs::read(data.join(format!("{k}.png"))).unwrap(),
            });
        }
    }
    let rules = Vec::new();
    // Warm-up.
    detector.inspect(&inputs[..2], &rules, None, 2, |_| {});

    // The same prompts and pixels for the reference.
    let chat = ChatTokenizer::load(&tiny, detector.model.config.tokens.image_pad).unwrap();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (i, input) in inputs.iter().enumerate() {
        let p = inspector_qwen2vl::image::process_bytes(&input.bytes, &detector.model.processor)
            .unwrap();
        let ids = chat
            .image_prompt(INSTRUCTION, p.n_tokens(detector.model.processor.merge_size))
            .unwrap();
        let ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        let n = ids.len();
        tensors.insert(
            format!("ids.{i}"),
            Tensor::from_vec(ids, n, &Device::Cpu).unwrap(),
        );
        tensors.insert(format!("pixels.{i}"), p.pixel_values.clone());
        let g: Vec<i64> = p.grid_thw.iter().map(|&g| g as i64).collect();
        tensors.insert(
            format!("grid.{i}"),
            Tensor::from_vec(g, 3, &Device::Cpu).unwrap(),
        );
    }
    let inputs_file =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("detect-bench-inputs.safetensors");
    candle_core::safetensors::save(&tensors, &inputs_file).unwrap();

    let mut ours = Vec::new();
    let mut answers = Vec::new();
    for batch in [1usize, 4, 8] {
        let t = Instant::now();
        let out = detector.inspect(&inputs, &rules, None, batch, |_| {});
        let s = t.elapsed().as_secs_f64();
        answers = out.into_iter().map(|f| f.unwrap().raw).collect::<Vec<_>>();
        ours.push(inputs.len() as f64 / s);
        println!(
            "inspector  batch {batch}: {:.2} photos/s ({} photos in {s:.2} s)",
            inputs.len() as f64 / s,
            inputs.len()
        );
    }

    // Cache hits.
    let db = tempfile::tempdir().unwrap();
    let store = inspector_store::SqliteStore::open(db.path().join("bench.db")).unwrap();
    detector.inspect(&inputs, &rules, Some(&store), 8, |_| {});
    let t = Instant::now();
    let hits = detector.inspect(&inputs, &rules, Some(&store), 8, |_| {});
    let per_hit_ms = t.elapsed().as_secs_f64() * 1e3 / inputs.len() as f64;
    assert!(hits.iter().all(|h| h.as_ref().unwrap().timings.cached));
    println!("cache hit: {per_hit_ms:.2} ms per photo (hash, header, lookup, parse, citations)");

    let python = std::env::var("INSPECTOR_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = root().join("tools/bench_detect_transformers.py");
    let run = Command::new(&python)
        .arg(&script)
        .arg(&tiny)
        .arg(&adapter)
        .arg(&inputs_file)
        .arg(inputs.len().to_string())
        .output();
    match run {
        Ok(o) if o.status.success() => {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            for (k, batch) in [1, 4, 8].iter().enumerate() {
                let theirs = v["photos_per_s"][k].as_f64().unwrap();
                println!(
                    "transformers + PEFT batch {batch}: {theirs:.2} photos/s; ratio inspector / transformers {:.2}",
                    ours[k] / theirs
                );
            }
            let texts: Vec<String> = serde_json::from_value(v["answers"].clone()).unwrap();
            let same = texts.iter().zip(&answers).filter(|(a, b)| a == b).count();
            println!(
                "same answers as transformers: {same}/{} (torch {}, transformers {}, peft {}, {} threads)",
                answers.len(),
                v["torch"],
                v["transformers"],
                v["peft"],
                v["threads"]
            );
        }
        Ok(o) => eprintln!("reference failed:\n{}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => eprintln!("reference not run ({python}: {e}); set INSPECTOR_PYTHON"),
    }
}
