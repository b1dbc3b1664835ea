//! Bad input: each gives a clear error naming the key, file or count at fault.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use inspector_qwen2vl::{
    Batch, Error, Logits, Qwen2Vl, VisionInput,
    image::{ProcessorConfig, process_bytes, process_file},
};

fn load_err(dir: &Path) -> String {
    match Qwen2Vl::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_model("tiny-a", dir.path());
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("num_hidden_layers");
    std::fs::write(&path, config.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("`num_hidden_layers`: missing"),
        "{err}"
    );

    // Nested layout: the path inside the file is named.
    copy_model("tiny-b", dir.path());
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["text_config"]["rope_parameters"]
        .as_object_mut()
        .unwrap()
        .remove("mrope_section");
    std::fs::write(&path, config.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("text_config.rope_parameters.mrope_section"),
        "{err}"
    );

    config["text_config"]["rope_parameters"]["mrope_section"] = serde_json::json!([4, 6, 7]);
    std::fs::write(&path, config.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("summing to head_dim/2"), "{err}");
}

#[test]
fn wrong_tensor_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_model("tiny-a", dir.path());
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.insert(
        "model.layers.1.mlp.up_proj.weight".into(),
        Tensor::zeros((7, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("shape"),
        "{err}"
    );
}

#[test]
fn missing_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_model("tiny-c", dir.path());
    let shard = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("00002.safetensors"))
        .unwrap();
    std::fs::remove_file(&shard).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains(shard.file_name().unwrap().to_str().unwrap()) && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.jpg");
    std::fs::write(&path, "这不是图片，只是一段文字。").unwrap();
    let err = process_file(&path, &ProcessorConfig::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("notes.jpg") && err.contains("not an image"),
        "{err}"
    );
    // A JPEG cut short.
    let bytes = std::fs::read(fixtures().join("images/astronaut.jpg")).unwrap();
    let err = process_bytes(&bytes[..bytes.len() / 3], &ProcessorConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated Jpeg"), "{err}");
}

#[test]
fn an_image_under_28_px() {
    let mut png = Vec::new();
    image::RgbImage::new(20, 100)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let err = process_bytes(&png, &ProcessorConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("20×100 is too small"), "{err}");
}

#[path = "../../imaging/tests/support/png_bomb.rs"]
mod png_bomb;

/// A PNG whose header declares 50000×50000 (7.5 GB of pixels) with no pixel data behind it.
fn png_bomb() -> Vec<u8> {
    png_bomb::png_declaring(50_000, 50_000)
}

#[test]
fn a_decompression_bomb_is_refused_from_its_header() {
    let err = process_bytes(&png_bomb(), &ProcessorConfig::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("50000×50000") && err.contains("refused before decoding"),
        "{err}"
    );
}

#[test]
fn image_and_pad_counts_must_agree() {
    let (model, _) = Qwen2Vl::load(&fixtures().join("tiny-a"), DType::F32, &Device::Cpu).unwrap();
    let r = reference("tiny-a", "two_images");
    let mut b = batch(&r);
    // Drop the second image but keep its pads.
    let first = b.images.as_ref().unwrap().grid_thw[0];
    let n = first.iter().product::<usize>();
    b.images = Some(VisionInput {
        pixel_values: b
            .images
            .as_ref()
            .unwrap()
            .pixel_values
            .narrow(0, 0, n)
            .unwrap(),
        grid_thw: vec![first],
    });
    let err = model.forward(&b, Logits::All).unwrap_err();
    assert!(matches!(err, Error::ImageTokens { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("1 images give 4 image tokens but the prompt has 16"),
        "{err}"
    );
    // Pads with no image at all.
    let no_images = Batch {
        images: None,
        ..batch(&r)
    };
    let err = model
        .forward(&no_images, Logits::All)
        .unwrap_err()
        .to_string();
    assert!(err.contains("<|image_pad|> tokens but no images"), "{err}");
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    copy_model("tiny-a", dir.path());
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["max_position_embeddings"] = serde_json::json!(8);
    std::fs::write(&path, config.to_string()).unwrap();
    let (model, _) = Qwen2Vl::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let b = Batch {
        input_ids: vec![vec![1; 9]],
        attention_mask: None,
        images: None,
    };
    let err = model.forward(&b, Logits::Last).unwrap_err().to_string();
    assert!(
        err.contains("9 tokens, more than the model's context of 8"),
        "{err}"
    );
}
