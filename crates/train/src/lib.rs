//! Fine-tuning Qwen2-VL in Rust.
//!
//! - [`loss::causal_lm_loss`]: cross-entropy on answer tokens only (labels `-100` elsewhere),
//!   equal to transformers' causal-LM loss; only scored positions go through the LM head.
//! - [`optim`]: AdamW with PyTorch's semantics and a saveable state, global-norm gradient
//!   clipping, the cosine schedule with warmup.
//! - [`trainer`]: LoRA or full fine-tuning runs: batches, accumulation, checkpoints, resume.
//! - [`vision_pretrain`]: stage 0 of a model trained from scratch, the vision tower pretrained
//!   on the photos' boxes (each image token learns which hazard covers it).
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
pub mod vision_pretrain;

/// Tells glibc's allocator to keep freed memory in the process instead of handing it back to the
/// kernel. Training and inference allocate and free tensors of the same few sizes (a few MB to
/// tens of MB) at every step; with glibc's defaults the large ones are `mmap`ed and unmapped each
/// time, or trimmed from the heap, and every reuse pays page faults on fresh zeroed pages (a
/// quarter of the CPU time of a training step, measured with `perf`). A no-op elsewhere. Call it
/// once, early, from a binary's `main`.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; it is called before any other thread
    // allocates in the binaries that call this.
    unsafe {
        // The largest threshold glibc accepts on 64-bit: blocks below it come from the heap.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
        // Never trim the heap's top back to the kernel.
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
