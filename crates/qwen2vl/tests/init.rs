//! `init::init_model_dir`: a complete random Qwen2-VL directory with a tokenizer trained here
//! loads, chats and runs like a published one.

use candle_core::{DType, Device};
use inspector_qwen2vl::{
    Batch, Logits, Qwen2Vl, VisionInput,
    chat::ChatTokenizer,
    image::process_rgb,
    init::{SPECIAL_TOKENS, init_model_dir},
};

const INSTRUCTION: &str =
    "你是工厂安全巡检员。请检查这张现场照片，找出其中违反安全规章制度的行为。只输出一个JSON对象。";

const SMALL: &str = r#"{
  "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
  "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 128,
  "initializer_range": 0.02, "max_position_embeddings": 2048, "max_window_layers": 2,
  "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 2048,
  "tie_word_embeddings": false, "torch_dtype": "float32", "use_cache": true,
  "use_sliding_window": false, "attention_dropout": 0.0,
  "vision_config": {"depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3,
    "hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
    "temporal_patch_size": 2, "hidden_act": "quick_gelu"},
  "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
  "vocab_size": 600
}"#;

fn corpus() -> Vec<String> {
    let mut c = vec![INSTRUCTION.to_string()];
    for k in 0..50 {
        c.push(format!(
            r#"{{"status":"violation","violations":[{{"description":"作业人员未佩戴安全帽","rule":"《安全作业规程》第3.{}条","risk":"高","box":[{},{},{},{}]}}]}}"#,
            k % 7 + 1,
            k * 13 % 1000,
            k * 7 % 1000,
            k * 31 % 1000,
            k * 17 % 1000
        ));
    }
    c.push(r#"{"status":"safe","violations":[]}"#.into());
    c
}

#[test]
fn an_initialised_directory_loads_tokenizes_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("small");
    let cfg = init_model_dir(SMALL, &corpus(), &out, 7).unwrap();
    for f in [
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "generation_config.json",
        "preprocessor_config.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    // The embedding has the requested rows; the tokenizer at most as many tokens, its
    // special tokens after the learnt vocabulary.
    assert_eq!(cfg.text.vocab_size, 600);
    let (model, _) = Qwen2Vl::load(&out, DType::F32, &Device::Cpu).unwrap();
    let chat = ChatTokenizer::load(&out, model.config.tokens.image_pad).unwrap();
    assert_eq!(
        chat.tokenizer.token_to_id("<|image_pad|>"),
        Some(model.config.tokens.image_pad)
    );
    let size = chat.tokenizer.get_vocab_size(true) as u32;
    assert!(
        size > 256 + SPECIAL_TOKENS.len() as u32 && size <= 600,
        "{size} tokens"
    );
    for t in SPECIAL_TOKENS {
        let id = chat.tokenizer.token_to_id(t).unwrap();
        assert!(
            id >= size - SPECIAL_TOKENS.len() as u32 && id < size,
            "{t} {id}"
        );
    }
    // Text round-trips, Chinese included, and learnt merges make it shorter than bytes.
    let text = r#"{"status":"violation","violations":[{"description":"作业人员未佩戴安全帽"}]}"#;
    let ids = chat.tokenizer.encode(text, false).unwrap();
    assert_eq!(chat.decode(ids.get_ids()).unwrap(), text);
    assert!(
        ids.get_ids().len() < text.len() / 2,
        "{} tokens",
        ids.get_ids().len()
    );
    // The canonical prompt with an image runs through the model.
    let img = image::RgbImage::from_fn(56, 56, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 90]));
    let p = process_rgb(&img, &model.processor).unwrap();
    let prompt = chat.image_prompt(INSTRUCTION, p.n_tokens(2)).unwrap();
    let out_logits = model
        .forward(
            &Batch {
                input_ids: vec![prompt],
                attention_mask: None,
                images: Some(VisionInput {
                    pixel_values: p.pixel_values,
                    grid_thw: vec![p.grid_thw],
                }),
            },
            Logits::Last,
        )
        .unwrap()
        .logits;
    assert_eq!(out_logits.dims(), &[1, 600]);
    // Deterministic from the seed.
    let again = dir.path().join("again");
    init_model_dir(SMALL, &corpus(), &again, 7).unwrap();
    for f in ["tokenizer.json", "config.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn a_vocabulary_too_small_for_bytes_and_specials_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let small = SMALL.replace("\"vocab_size\": 600", "\"vocab_size\": 100");
    let err = init_model_dir(&small, &corpus(), dir.path(), 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocab_size 100"), "{err}");
}
