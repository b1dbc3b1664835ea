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
        attention_mask: Some(
            mask.iter()
                .map(|r| r.iter().map(|&m| m == 1).collect())
                .collect(),
        ),
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

/// Photo `k` of the [`examples`] set and its annotation: distinct photos (a colour of their
/// own, hues 45° apart, alternating brightness), half safe, half with one boxed violation (a
/// dark object where its box is; different texts).
pub fn sample(k: usize, side: u32) -> (image::RgbImage, inspector_core::Annotation) {
    use inspector_core::{Annotation, Risk, Violation};
    let what = ["未戴安全帽", "未穿反光背心", "通道堆放杂物", "配电柜未上锁"];
    let hue = k as f32 * 45.0 % 360.0;
    let (r, g, b) = hsv(hue, 0.8, if (k / 8).is_multiple_of(2) { 0.9 } else { 0.55 });
    let scale = side as f64 / 56.0;
    let boxed = (k % 2 == 1).then(|| {
        let [x0, y0, x1, y1] = [4.0 * k as f64, 8.0, 30.0 + 2.0 * k as f64, 50.0];
        [x0 * scale, y0 * scale, x1 * scale, y1 * scale]
    });
    let photo = image::RgbImage::from_fn(side, side, |x, y| {
        let inside = boxed.is_some_and(|[x0, y0, x1, y1]| {
            (x0..x1).contains(&(x as f64)) && (y0..y1).contains(&(y as f64))
        });
        if inside {
            image::Rgb([20, 20, 20])
        } else {
            image::Rgb([r, g, b])
        }
    });
    let violations = if k.is_multiple_of(2) {
        vec![]
    } else {
        vec![Violation {
            description: what[(k / 2) % 4].into(),
            rule: format!("《安全作业规程》第3.{}条", k % 5 + 1),
            risk: [Risk::High, Risk::Medium, Risk::Low][k % 3],
            suggestion: None,
            bbox: boxed,
        }]
    };
    let annotation = Annotation {
        image: format!("{k}.png"),
        violations,
    };
    (photo, annotation)
}

/// `n` tiny training examples for tiny-a ([`sample`] 0..n), as the training data path builds
/// them.
pub fn examples(dir: &std::path::Path, n: usize) -> Vec<inspector_train::data::Example> {
    let (model, _) =
        inspector_qwen2vl::Qwen2Vl::load(&tiny_a(), candle_core::DType::F32, &Device::Cpu).unwrap();
    let chat =
        inspector_qwen2vl::chat::ChatTokenizer::load(&tiny_a(), model.config.tokens.image_pad)
            .unwrap();
    let side = size();
    (0..n)
        .map(|k| {
            let path = dir.join(format!("{k}.png"));
            let (photo, annotation) = sample(k, side);
            photo.save(&path).unwrap();
            let record = inspector_dataset::Record {
                line: k + 1,
                annotation,
                path: path.clone(),
                size: (side, side),
                sha256: [k as u8; 32],
                category: "x".into(),
                rule_ids: vec![],
            };
            inspector_train::data::example(&chat, &model.processor, &record, 4096)
                .unwrap()
                .unwrap()
        })
        .collect()
}

/// Side of the [`examples`] photos: `OVERFIT_SIZE`, else 56.
fn size() -> u32 {
    std::env::var("OVERFIT_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(56)
}

fn hsv(h: f32, s: f32, v: f32) -> (u8, u8, u8) {
    let c = v * s;
    let x = c * (1.0 - ((h / 60.0) % 2.0 - 1.0).abs());
    let (r, g, b) = match (h / 60.0) as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    let q = |u: f32| ((u + m) * 255.0).round() as u8;
    (q(r), q(g), q(b))
}
