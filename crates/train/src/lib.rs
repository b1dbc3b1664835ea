//! Fine-tuning Qwen2-VL in Rust.
//!
//! - [`loss::causal_lm_loss`]: cross-entropy on answer tokens only (labels `-100` elsewhere),
//!   equal to transformers' causal-LM loss; only scored positions go through the LM head.
//! - [`optim`]: AdamW with PyTorch's semantics and a saveable state, global-norm gradient
//!   clipping, the cosine schedule with warmup.
//!
//! Every LoRA tensor receives a real gradient: the model is built from differentiable ops only
//! (see the `qwen2vl` crate), which `tests/gradients.rs` checks against PEFT.
//!
//! ```
//! use inspector_train::optim::cosine_lr;
//!
//! assert_eq!(cosine_lr(1e-4, 0, 10, 100), 0.0);
//! assert!((cosine_lr(1e-4, 10, 10, 100) - 1e-4).abs() < 1e-12);
//! assert!(cosine_lr(1e-4, 100, 10, 100).abs() < 1e-12);
//! ```

pub mod data;
pub mod loss;
pub mod optim;
pub mod trainer;
