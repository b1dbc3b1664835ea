//! Gradients against PEFT: the same adapter (non-zero B), the same batch of 2 (images of two
//! sizes, left padding, labels masked to the answers), one backward pass. The loss and every
//! LoRA gradient must match transformers + PEFT, and every LoRA tensor must receive a
//! non-zero gradient.

use candle_core::{DType, Device};
use common::{max_abs, max_diff_masked, reference, tiny_a};
use inspector_qwen2vl::{Logits, adapter};
use inspector_train::loss::causal_lm_loss;

mod common;

#[test]
fn loss_and_every_lora_gradient_equal_peft() {
    let r = reference();
    let (model, _, lora) = adapter::load(
        &tiny_a(),
        &common::fixtures().join("peft/adapter"),
        DType::F32,
        &Device::Cpu,
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
            let diff = max_abs(&(g - reference).unwrap());
            let rel = diff / max_abs(reference);
            assert!(rel <= 1e-4, "{key}: max |Δ| / max |ref| = {rel:e}");
            worst = worst.max(rel);
            checked += 1;
        }
    }
    assert_eq!(checked, 28);
    eprintln!("loss {ours} vs PEFT {theirs}; worst gradient max|Δ|/max|ref| = {worst:e}");
}

#[test]
fn a_peft_adapter_gives_pefts_logits() {
    let r = reference();
    let (model, _, _) = adapter::load(
        &tiny_a(),
        &common::fixtures().join("peft/adapter"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let logits = model.forward(&r.batch, Logits::All).unwrap().logits;
    let mask = r.batch.attention_mask.clone().unwrap();
    let diff = max_diff_masked(&logits, &r.tensors["logits"], &mask);
    assert!(diff <= 1e-4, "max |Δ logits| = {diff:e}");
    // Without the adapter the logits differ: the adapter is really applied.
    let (base, _) = inspector_qwen2vl::Qwen2Vl::load(&tiny_a(), DType::F32, &Device::Cpu).unwrap();
    let plain = base.forward(&r.batch, Logits::All).unwrap().logits;
    assert!(max_diff_masked(&plain, &r.tensors["logits"], &mask) > 1e-2);
}
