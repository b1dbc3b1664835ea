//! Full fine-tuning (every weight trains with transformers' gradient, complete model directories
//! come out, resume is exact)
//! and bf16 base weights under f32 LoRA weights; both draw the loss curve.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use common::{examples, max_abs, reference, tiny_a};
use inspector_qwen2vl::{Batch, Logits, Qwen2Vl, VisionInput};
use inspector_train::{
    data::Example,
    loss::causal_lm_loss,
    trainer::{Ending, Event, Precision, TrainConfig, Trainer},
};

mod common;

#[test]
fn every_weight_receives_a_gradient_in_full_fine_tuning() {
    let r = reference();
    let (model, _, weights) = Qwen2Vl::load_trainable(&tiny_a(), DType::F32, &Device::Cpu).unwrap();
    let in_checkpoint =
        inspector_qwen2vl::weights::file_shapes(&tiny_a().join("model.safetensors"))
            .unwrap()
            .len();
    assert_eq!(
        weights.len(),
        in_checkpoint,
        "every tensor of the checkpoint is trained"
    );
    let (loss, _) = causal_lm_loss(&model, &r.batch, &r.labels).unwrap();
    // Without an adapter this is the base model's loss, which the PEFT fixture also records.
    // And it equals transformers' (tools/make_lora_fixtures.py full), as does every weight's
    // gradient, the vision tower's and merger's included.
    let full = candle_core::safetensors::load(
        common::fixtures().join("full/grads.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ours = loss.to_scalar::<f32>().unwrap();
    let theirs = full["loss"].to_vec1::<f32>().unwrap()[0];
    assert!(
        (ours - theirs).abs() <= 1e-5,
        "loss {ours} vs transformers {theirs}"
    );
    let grads = loss.backward().unwrap();
    let mut vision = 0;
    let mut worst = (0f32, String::new());
    for (name, var) in &weights {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient reached it"));
        assert!(max_abs(g) > 0.0, "{name}: zero gradient");
        let reference = full
            .get(&format!("grad.{name}"))
            .unwrap_or_else(|| panic!("{name}: not in the transformers fixture"));
        let rel = max_abs(&(g - reference).unwrap()) / max_abs(reference);
        assert!(rel <= 1e-4, "{name}: max |Δ| / max |ref| = {rel:e}");
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
        vision += name.starts_with("visual.") as usize;
    }
    assert_eq!(full.len() - 1, weights.len(), "one reference per weight");
    assert!(
        vision > 10,
        "the vision tower trains too ({vision} tensors)"
    );
    eprintln!(
        "full fine-tuning gradients vs transformers: worst max|Δ|/max|ref| = {:e} ({})",
        worst.0, worst.1
    );
}

fn config(full: bool) -> TrainConfig {
    TrainConfig {
        max_steps: Some(6),
        epochs: 100,
        lr: if full { 2e-3 } else { 5e-3 },
        grad_accum: 2,
        batch_size: 2,
        save_every: 3,
        eval_every: 3,
        log_every: 1,
        lora_r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        full,
        ..Default::default()
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn logits(model: &Qwen2Vl, e: &Example) -> Tensor {
    let batch = Batch {
        input_ids: vec![e.input_ids.clone()],
        attention_mask: None,
        images: Some(VisionInput {
            pixel_values: e.image.pixels().unwrap(),
            grid_thw: vec![e.image.grid_thw()],
        }),
    };
    model.forward(&batch, Logits::All).unwrap().logits
}

#[test]
fn full_fine_tuning_writes_model_directories_and_resumes_exactly() {
    let data = tempfile::tempdir().unwrap();
    let train = examples(data.path(), 4);
    let eval = train[..2].to_vec();
    let never = AtomicBool::new(false);

    let straight = tempfile::tempdir().unwrap();
    let mut a = Trainer::new(
        &tiny_a(),
        train.clone(),
        eval.clone(),
        config(true),
        straight.path(),
    )
    .unwrap();
    let mut losses = Vec::new();
    assert_eq!(
        a.run(&never, &mut |e| if let Event::Step { loss, .. } = e {
            losses.push(*loss)
        })
        .unwrap(),
        Ending::Finished
    );
    assert!(losses[5] < losses[0], "it learns: {losses:?}");

    // Stopped after step 3, resumed by a fresh trainer.
    let split = tempfile::tempdir().unwrap();
    let mut b = Trainer::new(
        &tiny_a(),
        train.clone(),
        eval.clone(),
        config(true),
        split.path(),
    )
    .unwrap();
    let stop = AtomicBool::new(false);
    let end = b
        .run(&stop, &mut |e| {
            if let Event::Step { step: 3, .. } = e {
                stop.store(true, Ordering::Relaxed);
            }
        })
        .unwrap();
    assert_eq!(end, Ending::Interrupted);
    drop(b);
    let mut c = Trainer::new(&tiny_a(), train.clone(), eval, config(true), split.path()).unwrap();
    assert_eq!(c.resume().unwrap(), 3);
    assert_eq!(c.run(&never, &mut |_| {}).unwrap(), Ending::Finished);
    let mut worst = 0f32;
    for ((name, x), (_, y)) in a.weights.iter().zip(&c.weights) {
        let d = max_abs(&(x.as_tensor() - y.as_tensor()).unwrap());
        assert!(d <= 1e-6, "{name} differs by {d:e}");
        worst = worst.max(d);
    }
    eprintln!("full fine-tuning resume: worst weight difference {worst:e}");

    // Complete model directories, with the training image settings.
    let out = split.path();
    for dir in ["model", "best/model", "checkpoints/step-6/model"] {
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "preprocessor_config.json",
            "inspector_model.json",
        ] {
            assert!(out.join(dir).join(f).exists(), "{dir}/{f}");
        }
    }
    assert!(!out.join("adapter").exists(), "no adapter in full mode");
    let pre: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model/preprocessor_config.json")).unwrap())
            .unwrap();
    assert_eq!(pre["max_pixels"], c.model.processor.max_pixels);

    // The written model is the trained one: its logits equal the trainer's, and differ from
    // the base's.
    let (written, _) = Qwen2Vl::load(&out.join("model"), DType::F32, &Device::Cpu).unwrap();
    let (base, _) = Qwen2Vl::load(&tiny_a(), DType::F32, &Device::Cpu).unwrap();
    let e = &train[1];
    let (ours, theirs, before) = (logits(&c.model, e), logits(&written, e), logits(&base, e));
    let d = max_abs(&(&ours - &theirs).unwrap());
    assert!(d <= 1e-5, "written model's logits differ by {d:e}");
    assert!(
        max_abs(&(&ours - &before).unwrap()) > 1e-3,
        "the weights moved"
    );

    // Norm weights and biases are left out of weight decay; every other weight decays.
    assert!(
        c.weights
            .iter()
            .any(|(n, _)| n.ends_with("input_layernorm.weight"))
    );
    // Outputs get an ordinary file's and folder's permissions (not tempfile's owner-only
    // ones), so other users and services can read them.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    std::fs::write(out.join("plain"), b"x").unwrap();
    std::fs::create_dir(out.join("plain-dir")).unwrap();
    for f in ["model/model.safetensors", "model/config.json", "loss.png"] {
        assert_eq!(mode(&out.join(f)), mode(&out.join("plain")), "{f}");
    }
    for d in ["model", "best", "checkpoints/step-6"] {
        assert_eq!(mode(&out.join(d)), mode(&out.join("plain-dir")), "{d}");
    }
    let png = image::open(out.join("loss.png")).unwrap();
    assert!(png.width() > 100 && png.height() > 100);
}

#[test]
fn bf16_base_weights_train_f32_lora_weights() {
    let data = tempfile::tempdir().unwrap();
    let train = examples(data.path(), 4);
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(
        &tiny_a(),
        train,
        vec![],
        TrainConfig {
            dtype: Precision::Bf16,
            lora_vision: true,
            ..config(false)
        },
        out.path(),
    )
    .unwrap();
    assert_eq!(t.model.dtype(), DType::BF16);
    let before: Vec<Vec<f32>> = t.lora.vars().iter().map(|v| flat(v.as_tensor())).collect();
    let mut losses = Vec::new();
    t.run(&AtomicBool::new(false), &mut |e| {
        if let Event::Step { loss, .. } = e {
            losses.push(*loss)
        }
    })
    .unwrap();
    assert!(losses[5] < losses[0], "it learns: {losses:?}");
    // Every LoRA tensor is f32 and moved (A and B alike: B received a gradient at step 1, A
    // from step 2 on).
    let names = t
        .lora
        .pairs()
        .into_iter()
        .flat_map(|p| [format!("{}.A", p.module), format!("{}.B", p.module)]);
    for (name, (var, old)) in names.zip(t.lora.vars().iter().zip(&before)) {
        assert_eq!(var.dtype(), DType::F32, "{name}");
        let now = flat(var.as_tensor());
        assert!(
            now.iter().zip(old).any(|(a, b)| a != b),
            "{name}: did not train"
        );
    }
    let opt = t.opt.state().unwrap();
    assert!(opt.values().all(|s| s.dtype() != DType::BF16));
    assert!(out.path().join("loss.png").exists());
}

/// `gradient_checkpointing` trains the same adapter: two runs of the same seed and data, with
/// and without it (LoRA with dropout on the language model and the vision tower; full fine-tuning
/// too), end with the same weights and the same losses.
#[test]
fn gradient_checkpointing_trains_the_same_weights() {
    let data = tempfile::tempdir().unwrap();
    let train = examples(data.path(), 4);
    for full in [false, true] {
        let run = |checkpointing: bool| {
            let out = tempfile::tempdir().unwrap();
            let mut t = Trainer::new(
                &tiny_a(),
                train.clone(),
                vec![],
                TrainConfig {
                    max_steps: Some(3),
                    lora_dropout: 0.1,
                    lora_vision: !full,
                    gradient_checkpointing: checkpointing,
                    ..config(full)
                },
                out.path(),
            )
            .unwrap();
            let mut losses = Vec::new();
            t.run(&AtomicBool::new(false), &mut |e| {
                if let Event::Step { loss, .. } = e {
                    losses.push(*loss)
                }
            })
            .unwrap();
            let weights: Vec<Vec<f32>> = if full {
                t.weights.iter().map(|(_, v)| flat(v.as_tensor())).collect()
            } else {
                t.lora.vars().iter().map(|v| flat(v.as_tensor())).collect()
            };
            (losses, weights)
        };
        let (plain_losses, plain) = run(false);
        let (ck_losses, ck) = run(true);
        for (a, b) in plain_losses.iter().zip(&ck_losses) {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs(),
                "full={full}: losses {plain_losses:?} vs {ck_losses:?}"
            );
        }
        let mut worst = 0f32;
        for (p, c) in plain.iter().zip(&ck) {
            let scale = p.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
            for (x, y) in p.iter().zip(c) {
                worst = worst.max((x - y).abs() / scale);
            }
        }
        assert!(
            worst <= 1e-4,
            "full={full}: weights differ by {worst:e} of their scale"
        );
    }
}
