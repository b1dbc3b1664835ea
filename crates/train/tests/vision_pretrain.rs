//! Stage-0 vision pretraining on tiny-a: every vision weight and the head get a gradient, the
//! tower learns where a drawn object is, and the saved directory changes only the tower.

use candle_core::{DType, Device};
use common::{max_abs, tiny_a};
use inspector_qwen2vl::{
    Qwen2Vl,
    image::{ProcessedImage, ProcessorConfig, process_bytes},
};
use inspector_train::vision_pretrain::{
    PretrainSample, VisionPretrainConfig, VisionPretrainer, token_targets,
};

mod common;

/// A 112×112 grey photo with a red 40×40 square at `(x, y)`, processed at 112×112 (16 tokens),
/// and its box.
fn photo(x: u32, y: u32) -> (ProcessedImage, [f64; 4]) {
    let img = image::RgbImage::from_fn(112, 112, |px, py| {
        if (x..x + 40).contains(&px) && (y..y + 40).contains(&py) {
            image::Rgb([220, 30, 30])
        } else {
            image::Rgb([120, 120, 120])
        }
    });
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    let processor = ProcessorConfig::from_model_dir(&tiny_a())
        .unwrap()
        .with_pixels(Some(112 * 112), Some(112 * 112))
        .unwrap();
    let p = process_bytes(&bytes, &processor).unwrap();
    assert_eq!(p.grid_thw, [1, 8, 8]);
    let b = [x as f64, y as f64, (x + 40) as f64, (y + 40) as f64];
    (p, b)
}

#[test]
fn targets_mark_the_cells_a_box_covers() {
    // 4×4 cells of 28 px over a 112×112 photo.
    let t = token_targets((112, 112), [1, 8, 8], 2, &[(1, [0.0, 0.0, 42.0, 20.0])], 2);
    let on: Vec<usize> = (0..16).filter(|c| t[c * 2 + 1] == 1.0).collect();
    // Cell 0 is covered 28×20 (71 %), cell 1 14×20 (36 %): both at least a quarter.
    assert_eq!(on, vec![0, 1]);
    assert!((0..16).all(|c| t[c * 2] == 0.0), "class 0 has no box");
    // A box smaller than a quarter cell still marks the cell holding its centre.
    let t = token_targets(
        (112, 112),
        [1, 8, 8],
        2,
        &[(0, [60.0, 60.0, 64.0, 64.0])],
        1,
    );
    let on: Vec<usize> = (0..16).filter(|&c| t[c] == 1.0).collect();
    assert_eq!(on, vec![2 * 4 + 2]);
    // The photo's own size is what boxes refer to, whatever the processed size.
    let t = token_targets(
        (224, 224),
        [1, 8, 8],
        2,
        &[(0, [168.0, 0.0, 224.0, 56.0])],
        1,
    );
    let on: Vec<usize> = (0..16).filter(|&c| t[c] == 1.0).collect();
    assert_eq!(on, vec![3]);
}

#[test]
fn every_vision_weight_and_the_head_get_a_gradient() {
    let p = VisionPretrainer::new(&tiny_a(), 1, VisionPretrainConfig::default()).unwrap();
    let (model, _, all) = Qwen2Vl::load_trainable(&tiny_a(), DType::F32, &Device::Cpu).unwrap();
    drop(model);
    let vision = all.iter().filter(|(n, _)| n.contains("visual.")).count();
    assert!(vision > 0);
    assert_eq!(p.weights.len(), vision, "exactly the tower's weights train");
    let (a, ba) = photo(8, 8);
    let (b, bb) = photo(60, 50);
    let ta = token_targets((112, 112), a.grid_thw, 2, &[(0, ba)], 1);
    let tb = token_targets((112, 112), b.grid_thw, 2, &[(0, bb)], 1);
    let batch = [
        PretrainSample {
            image: &a,
            targets: &ta,
        },
        PretrainSample {
            image: &b,
            targets: &tb,
        },
    ];
    let (loss, _) = p.loss(&batch).unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in &p.weights {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient reached it"));
        assert!(max_abs(g) > 0.0, "{name}: zero gradient");
    }
    for var in [&p.head.0, &p.head.1] {
        assert!(max_abs(grads.get(var).expect("head gradient")) > 0.0);
    }
    // Wrong target counts are an error, not a panic.
    let short = [PretrainSample {
        image: &a,
        targets: &ta[..3],
    }];
    assert!(p.loss(&short).is_err());
}

#[test]
fn the_tower_learns_where_the_object_is_and_only_the_tower_is_saved() {
    let photos: Vec<_> = [(4, 4), (68, 8), (10, 66), (60, 60), (36, 36), (70, 40)]
        .into_iter()
        .map(|(x, y)| photo(x, y))
        .collect();
    let targets: Vec<Vec<f32>> = photos
        .iter()
        .map(|(p, b)| token_targets((112, 112), p.grid_thw, 2, &[(0, *b)], 1))
        .collect();
    let batch: Vec<PretrainSample> = photos
        .iter()
        .zip(&targets)
        .map(|((image, _), targets)| PretrainSample { image, targets })
        .collect();
    let config = VisionPretrainConfig {
        steps: 60,
        lr: 3e-3,
        ..Default::default()
    };
    let mut p = VisionPretrainer::new(&tiny_a(), 1, config).unwrap();
    let (first, _, _) = p.train_step(&batch).unwrap();
    let mut last = (first, 0.0);
    for _ in 1..60 {
        let (loss, right, _) = p.train_step(&batch).unwrap();
        last = (loss, right);
    }
    eprintln!("loss {first:.4} → {:.4}, cells right {:.3}", last.0, last.1);
    assert!(last.0 < 0.3 * first, "loss {first} → {}", last.0);
    assert!(last.1 >= 0.97, "cells classified right: {}", last.1);

    let out = tempfile::tempdir().unwrap();
    p.save(&tiny_a(), out.path()).unwrap();
    let load = |dir: &std::path::Path| {
        let (_, _, w) = Qwen2Vl::load_trainable(dir, DType::F32, &Device::Cpu).unwrap();
        w.into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (before, after) = (load(&tiny_a()), load(out.path()));
    assert_eq!(before.len(), after.len());
    for (name, t) in &before {
        let d = max_abs(&(t - &after[name]).unwrap());
        if name.contains("visual.") && !name.contains("norm") {
            assert!(d > 0.0, "{name}: unchanged");
        } else if !name.contains("visual.") {
            assert_eq!(d, 0.0, "{name}: changed");
        }
    }
    assert!(out.path().join("tokenizer.json").exists());
}
