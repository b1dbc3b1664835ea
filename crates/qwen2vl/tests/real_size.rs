//! Qwen2-VL-2B's shapes, random weights generated here (never committed): the checkpoint
//! loads and runs. Ignored by default (writes ~9 GB under target/, needs ~10 GB of memory):
//! `cargo test --release -p inspector-qwen2vl --test real_size -- --ignored`.
//! Speed and memory are measured by the `real_size` bench.

use candle_core::{DType, Device};
use inspector_qwen2vl::{Batch, Logits, Qwen2Vl, VisionInput, image, init};

#[test]
#[ignore = "writes a 9 GB checkpoint; run with --ignored"]
fn qwen2vl_2b_shapes_load_and_run() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("qwen2vl-2b-random");
    if !dir.join("model.safetensors.index.json").exists() {
        init::write_random_checkpoint(&dir, init::QWEN2_VL_2B_CONFIG, 0.02, 2026).unwrap();
    }
    let (model, info) = Qwen2Vl::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert!(
        info.total_params() > 2_000_000_000,
        "{}",
        info.total_params()
    );
    let img = ::image::RgbImage::from_fn(224, 224, |x, y| ::image::Rgb([x as u8, y as u8, 128]));
    let p = image::process_rgb(&img, &model.processor).unwrap();
    let tk = &model.config.tokens;
    let mut ids = vec![tk.vision_start.unwrap()];
    ids.extend(std::iter::repeat_n(tk.image_pad, p.n_tokens(2)));
    ids.extend([tk.vision_end.unwrap(), 100, 200, 300]);
    let batch = Batch {
        input_ids: vec![ids],
        attention_mask: None,
        images: Some(VisionInput {
            pixel_values: p.pixel_values,
            grid_thw: vec![p.grid_thw],
        }),
    };
    let mut out = model.forward(&batch, Logits::Last).unwrap();
    assert_eq!(out.logits.dims(), &[1, 151_936]);
    let step = model.step(&[42], &mut out.state).unwrap();
    let values: Vec<f32> = step.flatten_all().unwrap().to_vec1().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
}
