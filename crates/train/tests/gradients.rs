//! Gradients against PEFT: the same adapter (non-zero B), the same batch of 2 (images of two
//! sizes, left padding, labels masked to the answers), one backward pass. The loss and every
//! LoRA gradient must match transformers + PEFT, and every LoRA tensor must receive a
//! non-zero gradient.

use candle_core::{DType, Device};
use common::{max_abs, max_diff_masked, reference, tiny_a};
use inspector_qwen2vl::{Logits, adapter, test_device};
use inspector_train::loss::causal_lm_loss;

mod common;

test_device!(
    lora_gradients,
    loss_and_every_lora_gradient_equal_peft_cpu,
    loss_and_every_lora_gradient_equal_peft_gpu_kernels_on_cpu,
    loss_and_every_lora_gradient_equal_peft_cuda
);
test_device!(
    peft_logits,
    a_peft_adapter_gives_pefts_logits_cpu,
    a_peft_adapter_gives_pefts_logits_gpu_kernels_on_cpu,
    a_peft_adapter_gives_pefts_logits_cuda
);
test_device!(
    gradient_after_one_step,
    every_lora_tensor_gets_a_gradient_after_one_step_cpu,
    every_lora_tensor_gets_a_gradient_after_one_step_gpu_kernels_on_cpu,
    every_lora_tensor_gets_a_gradient_after_one_step_cuda
);

fn lora_gradients(device: &Device) {
    let r = reference();
    let (model, _, lora) = adapter::load(
        &tiny_a(),
        &common::fixtures().join("peft/adapter"),
        DType::F32,
        device,
    )
    .unwrap();
    let (loss, n) = causal_lm_loss(&model, &r.batch, &r.labels).unwrap();
    let ours = loss.to_scalar::<f32>().unwrap();
    let theirs = r.tensors["loss"].to_vec1::<f32>().unwrap()[0];
    assert!(n > 0);
    assert!(
        (ours - theirs).abs() <= 1e-5,
        "loss {ours} vs PEFT {theirs}"
    );

    let grads = loss.backward().unwrap();
    let pairs = lora.pairs();
    assert_eq!(pairs.len(), 14, "7 projections × 2 layers");
    let mut checked = 0;
    let mut worst = 0f32;
    for pair in &pairs {
        for (which, var) in [("A", &pair.a), ("B", &pair.b)] {
            let key = format!("grad.base_model.model.{}.lora_{which}.weight", pair.module);
            let reference = &r.tensors[&key];
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{key}: no gradient reached it"));
            assert!(max_abs(g) > 0.0, "{key}: zero gradient");
            let diff = max_abs(&(g.to_device(&Device::Cpu).unwrap() - reference).unwrap());
            let rel = diff / max_abs(reference);
            assert!(rel <= 1e-4, "{key}: max |Δ| / max |ref| = {rel:e}");
            worst = worst.max(rel);
            checked += 1;
        }
    }
    assert_eq!(checked, 28);
    eprintln!("loss {ours} vs PEFT {theirs}; worst gradient max|Δ|/max|ref| = {worst:e}");
}

fn peft_logits(device: &Device) {
    let r = reference();
    let (model, _, _) = adapter::load(
        &tiny_a(),
        &common::fixtures().join("peft/adapter"),
        DType::F32,
        device,
    )
    .unwrap();
    let logits = model.forward(&r.batch, Logits::All).unwrap().logits;
    let mask = r.batch.attention_mask.clone().unwrap();
    let diff = max_diff_masked(&logits, &r.tensors["logits"], &mask);
    assert!(diff <= 1e-4, "max |Δ logits| = {diff:e}");
    // Without the adapter the logits differ: the adapter is really applied.
    let (base, _) = inspector_qwen2vl::Qwen2Vl::load(&tiny_a(), DType::F32, device).unwrap();
    let plain = base.forward(&r.batch, Logits::All).unwrap().logits;
    assert!(max_diff_masked(&plain, &r.tensors["logits"], &mask) > 1e-2);
}

/// A new LoRA set (r 4, α 8, PEFT's initialisation) on tiny-a's language model, vision tower
/// and merger, and the model built with it.
fn fresh_lora(
    device: &Device,
    dropout: f32,
) -> (inspector_qwen2vl::Lora, inspector_qwen2vl::Qwen2Vl) {
    let config = inspector_train::trainer::TrainConfig {
        lora_r: 4,
        lora_alpha: 8.0,
        lora_dropout: dropout,
        lora_vision: true,
        ..Default::default()
    };
    let lora = inspector_qwen2vl::Lora::new(config.lora_config(), device);
    let (model, _) =
        inspector_qwen2vl::Qwen2Vl::load_with(&tiny_a(), DType::F32, device, Some(&lora)).unwrap();
    (lora, model)
}

/// With PEFT's initialisation (B = 0) A's first gradient is zero; after one optimizer step
/// every LoRA tensor — language model, vision tower and merger — receives a non-zero gradient.
fn gradient_after_one_step(device: &Device) {
    use inspector_train::optim::{AdamW, AdamWConfig};
    let r = reference();
    let (lora, model) = fresh_lora(device, 0.0);
    let pairs = lora.pairs();
    assert_eq!(
        pairs.len(),
        14 + 2 * 4 + 2,
        "LM projections, vision blocks (qkv, proj, fc1, fc2), merger"
    );
    let (loss, _) = causal_lm_loss(&model, &r.batch, &r.labels).unwrap();
    let grads = loss.backward().unwrap();
    for p in &pairs {
        assert_eq!(
            max_abs(grads.get(&p.a).unwrap()),
            0.0,
            "{}: A's first gradient is zero (B = 0)",
            p.module
        );
        assert!(max_abs(grads.get(&p.b).unwrap()) > 0.0, "{}: B", p.module);
    }
    let mut opt = AdamW::new(
        lora.vars(),
        AdamWConfig {
            lr: 1e-3,
            ..Default::default()
        },
    )
    .unwrap();
    opt.step(&grads, 1e-3).unwrap();
    let (loss, _) = causal_lm_loss(&model, &r.batch, &r.labels).unwrap();
    let grads = loss.backward().unwrap();
    for p in &pairs {
        for (which, v) in [("A", &p.a), ("B", &p.b)] {
            let g = grads
                .get(v)
                .unwrap_or_else(|| panic!("{} {which}: no gradient", p.module));
            assert!(max_abs(g) > 0.0, "{} {which}: zero gradient", p.module);
        }
    }
}

test_device!(
    checkpointing,
    gradient_checkpointing_gives_the_same_gradients_cpu,
    gradient_checkpointing_gives_the_same_gradients_gpu_kernels_on_cpu,
    gradient_checkpointing_gives_the_same_gradients_cuda
);

/// Gradient checkpointing recomputes each decoder layer from its saved input: the loss and
/// every LoRA gradient (language model, vision tower, merger; dropout on, so the recomputed
/// layers must draw the same masks) equal the plain backward pass's, and the dropout stream
/// ends where the plain pass left it.
fn checkpointing(device: &Device) {
    use inspector_train::{
        loss::causal_lm_loss_checkpointed,
        optim::{AdamW, AdamWConfig},
    };
    let r = reference();
    let (lora, model) = fresh_lora(device, 0.1);
    lora.set_training(true);
    // One step first, so that B is non-zero and every gradient is too.
    let (loss, _) = causal_lm_loss(&model, &r.batch, &r.labels).unwrap();
    let mut opt = AdamW::new(
        lora.vars(),
        AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        },
    )
    .unwrap();
    opt.step(&loss.backward().unwrap(), 1e-2).unwrap();

    let start = lora.rng_position();
    let (plain_loss, _) = causal_lm_loss(&model, &r.batch, &r.labels).unwrap();
    let plain_loss = (plain_loss * 0.5).unwrap();
    let plain = plain_loss.backward().unwrap();
    let after = lora.rng_position();
    assert_ne!(after, start, "dropout drew masks");
    lora.set_rng_position(start);
    let (value, n, checkpointed) =
        causal_lm_loss_checkpointed(&model, &r.batch, &r.labels, 0.5, Some(&lora)).unwrap();
    assert!(n > 0);
    assert_eq!(lora.rng_position(), after);
    let (a, b) = (
        plain_loss.to_scalar::<f32>().unwrap(),
        value.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() <= 1e-6 * a.abs(), "loss {a} vs {b}");
    let mut worst = 0f32;
    for p in lora.pairs() {
        for (which, var) in [("A", &p.a), ("B", &p.b)] {
            let want = plain.get(var).unwrap();
            let got = checkpointed
                .get(var)
                .unwrap_or_else(|| panic!("{} {which}: no gradient", p.module));
            assert!(max_abs(want) > 0.0, "{} {which}: zero gradient", p.module);
            let rel = max_abs(&(got - want).unwrap()) / max_abs(want);
            assert!(
                rel <= 1e-5,
                "{} {which}: max|Δ|/max|ref| = {rel:e}",
                p.module
            );
            worst = worst.max(rel);
        }
    }
    eprintln!("checkpointed gradients: worst max|Δ|/max|ref| = {worst:e}");
}
