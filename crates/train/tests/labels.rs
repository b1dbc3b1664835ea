//! Only the answer counts: labels cover the answer's tokens and its `<|im_end|>`, nothing of
//! the prompt, the image or the padding; a sample whose answer would be cut is reported and
//! left out.

use std::path::PathBuf;

use candle_core::{DType, Device};
use common::tiny_a;
use inspector_core::{Annotation, Risk, Violation};
use inspector_dataset::Record;
use inspector_qwen2vl::{Qwen2Vl, chat::ChatTokenizer};
use inspector_train::{
    data::{collate, encode_turns, example},
    loss::{IGNORE, causal_lm_loss},
};

mod common;

fn record(dir: &std::path::Path, line: usize, violations: Vec<Violation>) -> Record {
    let path = dir.join(format!("{line}.png"));
    image::RgbImage::from_fn(56 + 28 * line as u32, 56, |x, y| {
        image::Rgb([x as u8, y as u8, 7])
    })
    .save(&path)
    .unwrap();
    Record {
        line,
        annotation: Annotation {
            image: path.file_name().unwrap().to_string_lossy().into(),
            violations,
        },
        size: (56 + 28 * line as u32, 56),
        path: PathBuf::from(&path),
        sha256: [line as u8; 32],
        category: "safe".into(),
        rule_ids: vec![],
    }
}

#[test]
fn labels_are_the_answer_and_its_im_end() {
    let (model, _) = Qwen2Vl::load(&tiny_a(), DType::F32, &Device::Cpu).unwrap();
    let chat = ChatTokenizer::load(&tiny_a(), model.config.tokens.image_pad).unwrap();
    let answer = r#"{"status":"safe","violations":[]}"#;
    let (ids, labels) = encode_turns(&chat, "检查这张照片", answer, 4).unwrap();
    let first = labels.iter().position(|&l| l != IGNORE).unwrap();
    let last = labels.iter().rposition(|&l| l != IGNORE).unwrap();
    // A contiguous span …
    assert!(labels[first..=last].iter().all(|&l| l != IGNORE));
    assert!(
        labels[first..=last]
            .iter()
            .zip(&ids[first..=last])
            .all(|(&l, &t)| l == t as i64)
    );
    // … which decodes to the answer and the closing <|im_end|>, …
    let span: Vec<u32> = ids[first..=last].to_vec();
    assert_eq!(
        chat.tokenizer.decode(&span, false).unwrap(),
        format!("{answer}<|im_end|>")
    );
    // … preceded by the whole prompt (image pads included) and followed only by the template's
    // trailing newline.
    let prompt = chat.tokenizer.decode(&ids[..first], false).unwrap();
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
    assert_eq!(
        ids[..first]
            .iter()
            .filter(|&&t| t == model.config.tokens.image_pad)
            .count(),
        4
    );
    assert!(ids.len() - last - 1 <= 1);
}

#[test]
fn padding_and_prompt_are_not_scored_and_cut_answers_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = Qwen2Vl::load(&tiny_a(), DType::F32, &Device::Cpu).unwrap();
    let chat = ChatTokenizer::load(&tiny_a(), model.config.tokens.image_pad).unwrap();
    let v = Violation {
        description: "作业人员未佩戴安全帽".into(),
        rule: "《安全作业规程》第3.1条".into(),
        risk: Risk::High,
        suggestion: Some("立即佩戴安全帽".into()),
        bbox: Some([10.0, 10.0, 40.0, 50.0]),
    };
    let a = record(dir.path(), 1, vec![v]);
    let b = record(dir.path(), 2, vec![]);
    let ea = example(&chat, &model.processor, &a, 4096).unwrap().unwrap();
    let eb = example(&chat, &model.processor, &b, 4096).unwrap().unwrap();
    let (batch, labels) = collate(&[&ea, &eb], model.config.tokens.pad.unwrap_or(0)).unwrap();
    let (_, n) = causal_lm_loss(&model, &batch, &labels).unwrap();
    // Every scored token is an answer token (the first label of a row has no predecessor, but
    // it is never an answer token: answers follow their prompts).
    assert_eq!(n, ea.answer_tokens() + eb.answer_tokens());
    // Padding rows are IGNORE.
    for (row, e) in labels.iter().zip([&ea, &eb]) {
        let p = row.len() - e.labels.len();
        assert!(row[..p].iter().all(|&l| l == IGNORE));
    }

    // A maximum length that would cut the answer leaves the sample out, with the reason.
    let total = ea.labels.iter().rposition(|&l| l != IGNORE).unwrap() + 1;
    let skipped = example(&chat, &model.processor, &a, total - 1)
        .unwrap()
        .unwrap_err();
    assert_eq!(skipped.line, 1);
    assert!(
        skipped.reason.contains(&format!("{total} tokens")),
        "{}",
        skipped.reason
    );
    // Exactly enough room is fine.
    assert!(example(&chat, &model.processor, &a, total).unwrap().is_ok());
}

/// An example whose pixels were dropped from memory batches exactly as before, read again from
/// its photo; a photo replaced by one of another size since is an error, not a mismatch.
#[test]
fn unloaded_examples_reread_their_photos() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = Qwen2Vl::load(&tiny_a(), DType::F32, &Device::Cpu).unwrap();
    let chat = ChatTokenizer::load(&tiny_a(), model.config.tokens.image_pad).unwrap();
    let a = record(dir.path(), 1, vec![]);
    let b = record(dir.path(), 2, vec![]);
    let ea = example(&chat, &model.processor, &a, 4096).unwrap().unwrap();
    let eb = example(&chat, &model.processor, &b, 4096).unwrap().unwrap();
    let pad = model.config.tokens.pad.unwrap_or(0);
    let (loaded, _) = collate(&[&ea, &eb], pad).unwrap();

    let mut ub = eb.clone();
    ub.unload(&b.path);
    assert_eq!(ub.image.bytes_in_memory(), 0);
    assert!(eb.image.bytes_in_memory() > 0);
    let (reread, _) = collate(&[&ea, &ub], pad).unwrap();
    let (l, r) = (loaded.images.unwrap(), reread.images.unwrap());
    assert_eq!(l.grid_thw, r.grid_thw);
    let diff = (l.pixel_values - r.pixel_values)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);

    // The photo replaced by a larger one: refused, naming the file.
    image::RgbImage::new(200, 120).save(&b.path).unwrap();
    let err = collate(&[&ea, &ub], pad).unwrap_err().to_string();
    assert!(err.contains("2.png") && err.contains("changed"), "{err}");
}
