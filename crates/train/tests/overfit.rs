//! Overfitting: LoRA on the tiny model learns 8 samples (boxes included) to a loss below 0.05
//! within a fixed step budget, and greedy generation then reproduces the 8 answers exactly.
//!
//! Slow in the debug profile, so ignored by default:
//! `cargo test --release -p inspector-train --test overfit -- --ignored`.
//! With `INSPECTOR_WRITE_FIXTURES=1` it also writes the adapter to `tests/fixtures/overfit/adapter`
//! (committed; later tests use it to get answers that parse). `OVERFIT_STEPS`, `OVERFIT_LR`,
//! `OVERFIT_N` and `OVERFIT_SIZE` change the recipe for experiments, and `OVERFIT_SAVE_TO=DIR`
//! saves the adapter there whatever the outcome.

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device};
use inspector_core::reply::{ReplyStatus, parse_reply};

use common::{examples, tiny_a};
use inspector_qwen2vl::{
    Batch, Qwen2Vl, VisionInput,
    generate::{GenerationConfig, generate},
};
use inspector_train::data::Example;
use inspector_train::{
    loss::IGNORE,
    trainer::{Ending, Event, TrainConfig, Trainer},
};

mod common;

#[test]
#[ignore = "slow in debug builds; run with --release -- --ignored"]
fn the_tiny_model_learns_eight_samples_exactly() {
    let data = tempfile::tempdir().unwrap();
    let n = std::env::var("OVERFIT_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let train = examples(data.path(), n);
    let out = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        max_steps: Some(
            std::env::var("OVERFIT_STEPS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(300),
        ),
        epochs: 1000,
        lr: std::env::var("OVERFIT_LR")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1e-2),
        warmup_ratio: 0.05,
        weight_decay: 0.0,
        grad_accum: 1,
        batch_size: n,
        save_every: 1000,
        eval_every: 1000,
        log_every: 50,
        lora_r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.0,
        // The tiny random model's frozen vision features barely tell photos apart; LoRA on the
        // vision tower and merger lets it learn to.
        lora_vision: true,
        ..Default::default()
    };
    let mut t = Trainer::new(&tiny_a(), train.clone(), vec![], config, out.path()).unwrap();
    let mut last = f64::NAN;
    let end = t
        .run(&AtomicBool::new(false), &mut |e| {
            if let Event::Step { loss, step, .. } = e {
                last = *loss;
                if step % 10 == 0 || *step < 4 {
                    eprintln!("step {step}: loss {loss:.4}");
                }
            }
        })
        .unwrap();
    assert_eq!(end, Ending::Finished);
    eprintln!("final loss {last:.5}");

    if let Some(dir) = std::env::var_os("OVERFIT_SAVE_TO") {
        t.lora
            .save_peft(
                std::path::Path::new(&dir),
                "crates/qwen2vl/tests/fixtures/tiny-a",
            )
            .unwrap();
    }
    let wrong = not_reproduced(&t.model, &train);
    assert!(wrong.is_empty(), "lines not reproduced: {wrong:?}");
    assert!(last < 0.05, "final loss {last}");
    if std::env::var_os("INSPECTOR_WRITE_FIXTURES").is_some() {
        let dir = common::fixtures().join("overfit/adapter");
        t.lora
            .save_peft(&dir, "crates/qwen2vl/tests/fixtures/tiny-a")
            .unwrap();
    }
}

/// Lines whose answer greedy generation does not reproduce exactly (up to `<|im_end|>`).
fn not_reproduced(model: &Qwen2Vl, train: &[Example]) -> Vec<usize> {
    let chat =
        inspector_qwen2vl::chat::ChatTokenizer::load(&tiny_a(), model.config.tokens.image_pad)
            .unwrap();
    let im_end = chat.tokenizer.token_to_id("<|im_end|>").unwrap();
    let mut wrong = vec![];
    for e in train {
        let start = e.labels.iter().position(|&l| l != IGNORE).unwrap();
        let want: Vec<u32> = e.input_ids[start..]
            .iter()
            .copied()
            .take_while(|&t| t != im_end)
            .collect();
        let batch = Batch {
            input_ids: vec![e.input_ids[..start].to_vec()],
            attention_mask: None,
            images: Some(VisionInput {
                pixel_values: e.image.pixels().unwrap(),
                grid_thw: vec![e.image.grid_thw()],
            }),
        };
        let config = GenerationConfig::greedy(want.len() + 8, vec![im_end], 0);
        let got = generate(model, &batch, &config, |_, _| {}).unwrap();
        let (got_text, want_text) = (
            chat.decode(&got.tokens[0]).unwrap(),
            chat.decode(&want).unwrap(),
        );
        // What later tests rely on: the answer parses, with the status and box it was taught.
        let reply = parse_reply(&got_text);
        let boxed = e.line % 2 == 0; // lines 2, 4, … are the photos with a violation
        let parses = reply.status
            == if boxed {
                ReplyStatus::Violation
            } else {
                ReplyStatus::Safe
            }
            && reply.violations.first().and_then(|v| v.bbox).is_some() == boxed;
        if !got.stopped_at_eos[0] || got_text != want_text || !parses {
            eprintln!(
                "line {}: eos {}, parses {parses}\n got  {got_text:?}\n want {want_text:?}",
                e.line, got.stopped_at_eos[0]
            );
            wrong.push(e.line);
        }
    }
    wrong
}

/// The committed adapter (written by the test above) gives the eight answers exactly: later
/// tests use it to get answers that parse and carry boxes.
#[test]
fn the_committed_adapter_reproduces_the_answers() {
    let data = tempfile::tempdir().unwrap();
    let train = examples(data.path(), 8);
    let (model, _, _) = inspector_qwen2vl::adapter::load(
        &tiny_a(),
        &common::fixtures().join("overfit/adapter"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let wrong = not_reproduced(&model, &train);
    assert!(wrong.is_empty(), "lines not reproduced: {wrong:?}");
}

/// The committed photos and annotation file of the overfit set
/// (`tests/fixtures/overfit/data`), which detection and evaluation tests run the adapter on,
/// are the training set: same pixels, same annotations. `INSPECTOR_WRITE_FIXTURES=1` rewrites
/// them.
#[test]
fn the_committed_overfit_data_is_the_training_set() {
    let dir = common::fixtures().join("overfit/data");
    let mut lines = Vec::new();
    for k in 0..8 {
        let (photo, annotation) = common::sample(k, 56);
        let path = dir.join(&annotation.image);
        if std::env::var_os("INSPECTOR_WRITE_FIXTURES").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            photo.save(&path).unwrap();
        }
        let committed = image::open(&path).unwrap().to_rgb8();
        assert_eq!(committed, photo, "{}", path.display());
        lines.push(serde_json::to_string(&annotation).unwrap());
    }
    let text = lines.join("\n") + "\n";
    let file = dir.join("annotations.jsonl");
    if std::env::var_os("INSPECTOR_WRITE_FIXTURES").is_some() {
        std::fs::write(&file, &text).unwrap();
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
}
