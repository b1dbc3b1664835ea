//! Loading the committed fixtures (made by tools/make_qwen2vl_fixtures.py).
#![allow(dead_code)]

use std::{collections::HashMap, path::PathBuf};

use candle_core::{DType, Device, Tensor};
use inspector_qwen2vl::{Batch, VisionInput};

pub const MODELS: [&str; 3] = ["tiny-a", "tiny-b", "tiny-c"];
pub const CASES: [&str; 5] = [
    "text_only",
    "one_square",
    "wide",
    "two_images",
    "batch_left_pad",
];

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn reference(model: &str, case: &str) -> HashMap<String, Tensor> {
    let path = fixtures()
        .join(model)
        .join("reference")
        .join(format!("{case}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap()
}

pub fn rows_u32(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u32).collect())
        .collect()
}

/// The reference's inputs as a batch.
pub fn batch(r: &HashMap<String, Tensor>) -> Batch {
    let input_ids = rows_u32(&r["input_ids"]);
    let mask: Vec<Vec<bool>> = rows_u32(&r["attention_mask"])
        .into_iter()
        .map(|row| row.into_iter().map(|x| x == 1).collect())
        .collect();
    let images = r.get("pixel_values").map(|pv| VisionInput {
        pixel_values: pv.clone(),
        grid_thw: r["image_grid_thw"]
            .to_vec2::<i64>()
            .unwrap()
            .into_iter()
            .map(|g| [g[0] as usize, g[1] as usize, g[2] as usize])
            .collect(),
    });
    Batch {
        input_ids,
        attention_mask: Some(mask),
        images,
    }
}

/// Max |a − b| over positions where `mask` is true (`a`, `b`: `[B, S, V]`).
pub fn max_diff_masked(a: &Tensor, b: &Tensor, mask: &[Vec<bool>]) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap();
    let mut worst = 0f32;
    for (bi, row) in mask.iter().enumerate() {
        for (si, &keep) in row.iter().enumerate() {
            if keep {
                for (x, y) in a[bi][si].iter().zip(&b[bi][si]) {
                    worst = worst.max((x - y).abs());
                }
            }
        }
    }
    worst
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
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

pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let f32_cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    max_abs(&(f32_cpu(a) - f32_cpu(b)).unwrap())
}

/// Copies a fixture model directory's files into `to`, for tests that break a copy.
pub fn copy_model(name: &str, to: &std::path::Path) {
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}
