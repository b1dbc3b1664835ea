//! Stage-0 vision pretraining on tiny-a: every vision weight and the head get a gradient, the
//! tower learns where a drawn object is, and the saved directory changes only the tower.

use candle_core::{DType, Device};
use common::{examples, max_abs, tiny_a};
use inspector_qwen2vl::{
    Qwen2Vl,
    image::{ProcessedImage, ProcessorConfig, process_bytes},
};
use inspector_train::{
    trainer::{TrainConfig, Trainer},
    vision_pretrain::{
        BoxTargets, PretrainSample, Tally, VisionPretrainConfig, VisionPretrainer,
        token_box_targets, token_targets,
    },
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

/// A processed photo and its square's box.
type Photo = (ProcessedImage, [f64; 4]);

/// Six photos with the square in different places, and their targets.
fn six_photos() -> (Vec<Photo>, Vec<Vec<f32>>) {
    let photos: Vec<_> = [(4, 4), (68, 8), (10, 66), (60, 60), (36, 36), (70, 40)]
        .into_iter()
        .map(|(x, y)| photo(x, y))
        .collect();
    let targets = photos
        .iter()
        .map(|(p, b)| token_targets((112, 112), p.grid_thw, 2, &[(0, *b)], 1))
        .collect();
    (photos, targets)
}

fn samples<'a>(photos: &'a [Photo], targets: &'a [Vec<f32>]) -> Vec<PretrainSample<'a>> {
    photos
        .iter()
        .zip(targets)
        .map(|((image, _), targets)| PretrainSample {
            image,
            targets,
            boxes: None,
        })
        .collect()
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
            boxes: None,
        },
        PretrainSample {
            image: &b,
            targets: &tb,
            boxes: None,
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
        boxes: None,
    }];
    assert!(p.loss(&short).is_err());
}

#[test]
fn box_targets_give_each_covered_cell_the_distances_to_its_box_edges() {
    // 4×4 cells of 28 px; the box covers cells 0 and 1 (as in the test above).
    let b = [0.0, 0.0, 42.0, 20.0];
    let t = token_box_targets((112, 112), [1, 8, 8], 2, &[(1, b)], 2);
    let covered = token_targets((112, 112), [1, 8, 8], 2, &[(1, b)], 2);
    assert_eq!(t.mask, covered, "the mask is the class targets");
    // Cell 1 (class 1): centre (42, 14): left edge 1.5 cells to the left, top 0.5 up, right
    // edge at the centre (0), bottom 6 px down (3/14 of a cell).
    let k = 2 + 1;
    let got = &t.offsets[4 * k..4 * k + 4];
    let want = [1.5, 0.5, 0.0, 6.0 / 28.0];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
    assert!(
        t.offsets
            .iter()
            .enumerate()
            .all(|(i, &v)| t.mask[i / 4] > 0.0 || v == 0.0)
    );
    // Where two boxes of a class cover a cell, the smaller one is its target.
    let big = [0.0, 0.0, 112.0, 112.0];
    let small = [30.0, 30.0, 50.0, 50.0];
    let t = token_box_targets((112, 112), [1, 8, 8], 2, &[(0, big), (0, small)], 1);
    let k = 4 + 1; // cell (1, 1), centre (42, 42): covered by both
    let want = [12.0 / 28.0, 12.0 / 28.0, 8.0 / 28.0, 8.0 / 28.0];
    for (g, w) in t.offsets[4 * k..4 * k + 4].iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{:?}", &t.offsets[4 * k..4 * k + 4]);
    }
    // Cell (0, 0), centre (14, 14): only the big box.
    assert_eq!(&t.offsets[..4], &[0.5, 0.5, 3.5, 3.5]);
}

#[test]
fn the_box_head_learns_the_edges_and_every_weight_gets_a_gradient() {
    let (photos, targets) = six_photos();
    let box_targets: Vec<BoxTargets> = photos
        .iter()
        .map(|(p, b)| token_box_targets((112, 112), p.grid_thw, 2, &[(0, *b)], 1))
        .collect();
    let batch: Vec<PretrainSample> = photos
        .iter()
        .zip(&targets)
        .zip(&box_targets)
        .map(|(((image, _), targets), boxes)| PretrainSample {
            image,
            targets,
            boxes: Some(boxes),
        })
        .collect();
    let config = VisionPretrainConfig {
        steps: 80,
        lr: 3e-3,
        box_weight: 1.0,
        ..Default::default()
    };
    let mut p = VisionPretrainer::new(&tiny_a(), 1, config.clone()).unwrap();
    // The class head starts as without the box head (drawn first from the same seed).
    let plain = VisionPretrainer::new(&tiny_a(), 1, VisionPretrainConfig::default()).unwrap();
    assert_eq!(
        max_abs(&(p.head.0.as_tensor() - plain.head.0.as_tensor()).unwrap()),
        0.0
    );
    let (loss, _) = p.loss(&batch).unwrap();
    let grads = loss.backward().unwrap();
    let (w, b) = p.box_head.clone().expect("a box head");
    for (name, var) in p
        .weights
        .iter()
        .map(|(n, v)| (n.as_str(), v))
        .chain([("box head w", &w), ("box head b", &b)])
    {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient reached it"));
        assert!(max_abs(g) > 0.0, "{name}: zero gradient");
    }
    // Without its targets the box head refuses the batch.
    let bare = samples(&photos, &targets);
    assert!(p.loss(&bare).is_err());

    let (_, first, _) = p.train_step(&batch).unwrap();
    let mut end = first.clone();
    for _ in 1..config.steps {
        end = p.train_step(&batch).unwrap().1;
    }
    let (e0, e1) = (first.box_error().unwrap(), end.box_error().unwrap());
    eprintln!("box edge error {e0:.3} → {e1:.3} cells");
    assert!(e1 < 0.35 * e0 && e1 < 0.3, "box edge error {e0} → {e1}");
}

#[test]
fn the_tower_learns_where_the_object_is_and_only_the_tower_is_saved() {
    let (photos, targets) = six_photos();
    let batch = samples(&photos, &targets);
    let config = VisionPretrainConfig {
        steps: 60,
        lr: 3e-3,
        ..Default::default()
    };
    let mut p = VisionPretrainer::new(&tiny_a(), 1, config).unwrap();
    let (first, _, _) = p.train_step(&batch).unwrap();
    let mut last = (first, 0.0);
    let mut end = Tally::default();
    for _ in 1..60 {
        let (loss, tally, _) = p.train_step(&batch).unwrap();
        last = (loss, tally.accuracy());
        end = tally;
    }
    let [(precision, recall)] = end.precision_recall()[..] else {
        panic!("one class")
    };
    assert!(
        precision >= Some(0.9) && recall >= Some(0.9),
        "{precision:?} {recall:?}"
    );
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

#[test]
fn a_vision_adapter_learns_with_the_tower_frozen_and_the_language_adapter_starts_from_it() {
    let (photos, targets) = six_photos();
    let batch = samples(&photos, &targets);
    let config = VisionPretrainConfig {
        steps: 60,
        lr: 1e-2,
        ..Default::default()
    };
    let lora_config = inspector_lora::LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        seed: 3,
        ..Default::default()
    };
    let mut p = VisionPretrainer::with_lora(&tiny_a(), 1, config, lora_config).unwrap();
    assert!(p.weights.is_empty(), "the tower itself is frozen");
    let lora = p.lora.clone().unwrap();
    let pairs = lora.pairs();
    assert!(!pairs.is_empty());
    assert!(
        pairs.iter().all(|q| q.module.contains("visual.")),
        "only the vision side is adapted: {:?}",
        pairs.iter().map(|q| &q.module).collect::<Vec<_>>()
    );
    // B starts at zero and the first step's learning rate is zero (warmup), so after two
    // steps every A and B gets a gradient.
    let (first, _, _) = p.train_step(&batch).unwrap();
    p.train_step(&batch).unwrap();
    let (loss, _) = p.loss(&batch).unwrap();
    let grads = loss.backward().unwrap();
    for q in &pairs {
        for (which, var) in [("A", &q.a), ("B", &q.b)] {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{}.{which}: no gradient", q.module));
            assert!(max_abs(g) > 0.0, "{}.{which}: zero gradient", q.module);
        }
    }
    let mut last = first;
    for _ in 2..60 {
        last = p.train_step(&batch).unwrap().0;
    }
    eprintln!("vision adapter: loss {first:.4} → {last:.4}");
    assert!(last < 0.5 * first, "loss {first} → {last}");

    // Saved as a PEFT adapter, it loads onto the base and gives the same image embeddings.
    let out = tempfile::tempdir().unwrap();
    p.save(&tiny_a(), out.path()).unwrap();
    let (loaded, _, _) =
        inspector_qwen2vl::adapter::load(&tiny_a(), out.path(), DType::F32, &Device::Cpu).unwrap();
    let input = inspector_qwen2vl::VisionInput {
        pixel_values: photos[0].0.pixel_values.clone(),
        grid_thw: vec![photos[0].0.grid_thw],
    };
    let ours = p.model.image_embeds(&input).unwrap();
    let plain = Qwen2Vl::load(&tiny_a(), DType::F32, &Device::Cpu)
        .unwrap()
        .0
        .image_embeds(&input)
        .unwrap();
    let theirs = loaded.image_embeds(&input).unwrap();
    assert!(max_abs(&(&ours - &theirs).unwrap()) < 1e-5);
    assert!(
        max_abs(&(&ours - &plain).unwrap()) > 1e-3,
        "the adapter changes the tower's output"
    );

    // The language model's adapter starts from it: its vision layers keep the trained
    // weights, the language model's layers start fresh (B = 0).
    let data = tempfile::tempdir().unwrap();
    let train = TrainConfig {
        lora_r: 8,
        lora_alpha: 16.0,
        lora_vision: true,
        init_adapter: Some(out.path().to_path_buf()),
        ..Default::default()
    };
    let run = tempfile::tempdir().unwrap();
    let t = Trainer::new(
        &tiny_a(),
        examples(data.path(), 1),
        vec![],
        train.clone(),
        run.path(),
    )
    .unwrap();
    let started: std::collections::HashMap<String, _> = t
        .lora
        .pairs()
        .into_iter()
        .map(|q| (q.module.clone(), q))
        .collect();
    for q in &pairs {
        let s = &started[&q.module];
        assert_eq!(max_abs(&(q.b.as_tensor() - s.b.as_tensor()).unwrap()), 0.0);
        assert_eq!(max_abs(&(q.a.as_tensor() - s.a.as_tensor()).unwrap()), 0.0);
    }
    let text: Vec<_> = started
        .values()
        .filter(|q| !q.module.contains("visual."))
        .collect();
    assert!(!text.is_empty());
    assert!(text.iter().all(|q| max_abs(q.b.as_tensor()) == 0.0));

    // Another rank would scale the branches differently: refused, naming the file.
    let err = Trainer::new(
        &tiny_a(),
        examples(data.path(), 1),
        vec![],
        TrainConfig { lora_r: 4, ..train },
        run.path(),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        err.contains("adapter_config.json") && err.contains("r 8"),
        "{err}"
    );
}
