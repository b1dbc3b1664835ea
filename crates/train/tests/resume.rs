//! Resume: 20 steps straight equal 10 steps, a stop, a fresh trainer resuming from the step-10
//! checkpoint, and 10 more (adapter weights within 1e-6), dropout and data order included. A
//! failure while saving leaves the previous checkpoint intact.

use std::sync::atomic::AtomicBool;

use common::{examples, tiny_a};
use inspector_train::trainer::{Ending, Event, TrainConfig, Trainer, checkpoints};

mod common;

fn config() -> TrainConfig {
    TrainConfig {
        max_steps: Some(20),
        epochs: 100,
        lr: 5e-3,
        grad_accum: 2,
        batch_size: 2,
        save_every: 10,
        eval_every: 5,
        log_every: 5,
        lora_r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        ..Default::default()
    }
}

fn weights(t: &Trainer) -> Vec<Vec<f32>> {
    t.lora
        .vars()
        .iter()
        .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn resuming_continues_the_same_run() {
    let data = tempfile::tempdir().unwrap();
    let train = examples(data.path(), 6);
    let eval = train[..2].to_vec();
    let never = AtomicBool::new(false);

    let straight = tempfile::tempdir().unwrap();
    let mut a = Trainer::new(
        &tiny_a(),
        train.clone(),
        eval.clone(),
        config(),
        straight.path(),
    )
    .unwrap();
    let mut losses = Vec::new();
    let end = a
        .run(&never, &mut |e| {
            if let Event::Step { loss, .. } = e {
                losses.push(*loss);
            }
        })
        .unwrap();
    assert_eq!(end, Ending::Finished);
    assert_eq!(a.state.step, 20);
    assert!(losses[19] < losses[0], "it learns: {losses:?}");

    // The same run, stopped right after step 10 …
    let split = tempfile::tempdir().unwrap();
    let mut b = Trainer::new(
        &tiny_a(),
        train.clone(),
        eval.clone(),
        config(),
        split.path(),
    )
    .unwrap();
    let stop = AtomicBool::new(false);
    let end = b
        .run(&stop, &mut |e| {
            if let Event::Step { step: 10, .. } = e {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        })
        .unwrap();
    assert_eq!(end, Ending::Interrupted);
    drop(b);
    // … and resumed by a fresh trainer, as a new process would.
    let mut c = Trainer::new(&tiny_a(), train, eval, config(), split.path()).unwrap();
    assert_eq!(c.resume().unwrap(), 10);
    assert_eq!(c.run(&never, &mut |_| {}).unwrap(), Ending::Finished);

    let (wa, wc) = (weights(&a), weights(&c));
    let mut worst = 0f32;
    for (x, y) in wa.iter().zip(&wc) {
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs());
        }
    }
    assert!(worst <= 1e-6, "adapter weights differ by {worst:e}");
    // The final adapter, the best one and the metrics are there.
    for f in [
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "best/adapter_model.safetensors",
        "metrics.jsonl",
    ] {
        assert!(split.path().join(f).exists(), "{f}");
    }
}

#[test]
fn a_failed_save_keeps_the_previous_checkpoint() {
    let data = tempfile::tempdir().unwrap();
    let train = examples(data.path(), 4);
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&tiny_a(), train, vec![], config(), out.path()).unwrap();
    let never = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    t.run(&stop, &mut |e| {
        if let Event::Step { step: 10, .. } = e {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .unwrap();
    let before = std::fs::read(
        out.path()
            .join("checkpoints/step-10/adapter_model.safetensors"),
    )
    .unwrap();
    t.fail_next_save = true;
    let err = t.run(&never, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("simulated failure"), "{err}");
    let list = checkpoints(out.path()).unwrap();
    assert_eq!(list.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [10]);
    assert_eq!(
        std::fs::read(
            out.path()
                .join("checkpoints/step-10/adapter_model.safetensors")
        )
        .unwrap(),
        before
    );
    // No half-written folder is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(out.path().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
