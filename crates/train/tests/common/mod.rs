//! The PEFT reference batch of `tools/make_lora_fixtures.py` and the tiny checkpoint it used.
#![allow(dead_code)]

use std::{collections::HashMap, path::PathBuf};

use candle_core::{Device, Tensor};
use inspector_qwen2vl::{Batch, VisionInput};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny_a() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../qwen2vl/tests/fixtures/tiny-a")
}

pub struct Reference {
    pub batch: Batch,
    pub labels: Vec<Vec<i64>>,
    pub tensors: HashMap<String, Tensor>,
}

pub fn reference() -> Reference {
    let tensors =
        candle_core::safetensors::load(fixtures().join("peft/batch.safetensors"), &Device::Cpu)
            .unwrap();
    let ids: Vec<Vec<i64>> = tensors["input_ids"].to_vec2().unwrap();
    let mask: Vec<Vec<i64>> = tensors["attention_mask"].to_vec2().unwrap();
    let grid: Vec<Vec<i64>> = tensors["image_grid_thw"].to_vec2().unwrap();
    let batch = Batch {
        input_ids: ids
            .iter()
            .map(|r| r.iter().map(|&t| t as u32).collect())
            .collect(),
        attention_mask: Some(mask.iter().map(|r| r.iter().map(|&m| m == 1).collect()).collect()),
        images: Some(VisionInput {
            pixel_values: tensors["pixel_values"].clone(),
            grid_thw: grid
                .iter()
                .map(|g| [g[0] as usize, g[1] as usize, g[2] as usize])
                .collect(),
        }),
    };
    let labels = tensors["labels"].to_vec2().unwrap();
    Reference {
        batch,
        labels,
        tensors,
    }
}

/// max |a − b| over positions where `mask` is true, for `[B, S, …]` tensors.
pub fn max_diff_masked(a: &Tensor, b: &Tensor, mask: &[Vec<bool>]) -> f32 {
    let mut worst = 0f32;
    for (bi, row) in mask.iter().enumerate() {
        for (s, &m) in row.iter().enumerate() {
            if m {
                let x: Vec<f32> = a.get(bi).unwrap().get(s).unwrap().to_vec1().unwrap();
                let y: Vec<f32> = b.get(bi).unwrap().get(s).unwrap().to_vec1().unwrap();
                for (p, q) in x.iter().zip(&y) {
                    worst = worst.max((p - q).abs());
                }
            }
        }
    }
    worst
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}
