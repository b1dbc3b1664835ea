//! Randomly initialised checkpoints: a `config.json` and safetensors shards in the hub's key
//! layout, initialised as transformers' `_init_weights` does (normal(0, initializer_range) for
//! linear and embedding weights, zero biases, unit norms). Used for real-size tests and
//! benchmarks without downloading weights, and as the starting point of a model trained from
//! scratch.

use std::{collections::HashMap, path::Path};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use crate::{Config, Error};

/// Every tensor of the model in the hub's (legacy) key layout, with its shape, grouped into
/// shards: the vision tower, one shard per decoder layer, and the rest.
/// A shard's name and its tensors' names and shapes.
type ShardPlan = (String, Vec<(String, Vec<usize>)>);

fn tensor_plan(cfg: &Config) -> Vec<ShardPlan> {
    let t = &cfg.text;
    let v = &cfg.vision;
    let (h, hd) = (t.hidden_size, t.head_dim);
    let mut shards = Vec::new();
    let mut vision = vec![(
        "visual.patch_embed.proj.weight".to_string(),
        vec![
            v.embed_dim,
            v.in_channels,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
        ],
    )];
    for j in 0..v.depth {
        let p = format!("visual.blocks.{j}");
        let e = v.embed_dim;
        for (name, shape) in [
            ("norm1.weight", vec![e]),
            ("norm1.bias", vec![e]),
            ("norm2.weight", vec![e]),
            ("norm2.bias", vec![e]),
            ("attn.qkv.weight", vec![3 * e, e]),
            ("attn.qkv.bias", vec![3 * e]),
            ("attn.proj.weight", vec![e, e]),
            ("attn.proj.bias", vec![e]),
            ("mlp.fc1.weight", vec![v.mlp_hidden(), e]),
            ("mlp.fc1.bias", vec![v.mlp_hidden()]),
            ("mlp.fc2.weight", vec![e, v.mlp_hidden()]),
            ("mlp.fc2.bias", vec![e]),
        ] {
            vision.push((format!("{p}.{name}"), shape));
        }
    }
    let merged = v.embed_dim * v.spatial_merge_size * v.spatial_merge_size;
    for (name, shape) in [
        ("visual.merger.ln_q.weight", vec![v.embed_dim]),
        ("visual.merger.ln_q.bias", vec![v.embed_dim]),
        ("visual.merger.mlp.0.weight", vec![merged, merged]),
        ("visual.merger.mlp.0.bias", vec![merged]),
        ("visual.merger.mlp.2.weight", vec![h, merged]),
        ("visual.merger.mlp.2.bias", vec![h]),
    ] {
        vision.push((name.to_string(), shape));
    }
    shards.push(("visual".to_string(), vision));
    for i in 0..t.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let (q, kv, inter) = (
            t.num_attention_heads * hd,
            t.num_key_value_heads * hd,
            t.intermediate_size,
        );
        let layer = [
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.q_proj.bias", vec![q]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.k_proj.bias", vec![kv]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.bias", vec![kv]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![inter, h]),
            ("mlp.up_proj.weight", vec![inter, h]),
            ("mlp.down_proj.weight", vec![h, inter]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ]
        .into_iter()
        .map(|(n, s)| (format!("{p}.{n}"), s))
        .collect();
        shards.push((format!("layer-{i}"), layer));
    }
    let mut rest = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![t.vocab_size, h],
        ),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    if !cfg.tie_word_embeddings {
        rest.push(("lm_head.weight".to_string(), vec![t.vocab_size, h]));
    }
    shards.push(("rest".to_string(), rest));
    shards
}

/// Writes random weights for the model described by `config_json` into `dir` (which gets
/// `config.json`, `model-NNNNN-of-NNNNN.safetensors` shards and their index). Memory use is one
/// shard at a time. `seed` makes it reproducible.
pub fn write_random_checkpoint(
    dir: &Path,
    config_json: &str,
    std: f64,
    seed: u64,
) -> Result<Config, Error> {
    let cfg = Config::from_json(config_json)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let device = Device::Cpu;
    // candle's CPU device cannot be seeded: draw from a seeded generator of our own.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0f32, std as f32)
        .map_err(|e| Error::Input(format!("std {std}: {e}")))?;
    let plan = tensor_plan(&cfg);
    let n = plan.len();
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0usize;
    for (k, (_, tensors)) in plan.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        let mut out: HashMap<String, Tensor> = HashMap::new();
        for (name, shape) in tensors {
            let is_norm = name.contains("norm") || name.contains("ln_q");
            let t = if is_norm && name.ends_with(".weight") {
                Tensor::ones(shape.as_slice(), DType::F32, &device)?
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape.as_slice(), DType::F32, &device)?
            } else {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
                Tensor::from_vec(values, shape.as_slice(), &device)?
            };
            total_size += t.elem_count() * 4;
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
            out.insert(name.clone(), t);
        }
        let path = dir.join(&file);
        // Atomically and with ordinary permissions (safetensors' own writes are owner-only).
        inspector_lora::write_atomic(&path, |tmp| candle_core::safetensors::save(&out, tmp))?;
    }
    let index =
        serde_json::json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map });
    let write = |name: &str, text: String| -> Result<(), Error> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    };
    write(
        "model.safetensors.index.json",
        serde_json::to_string_pretty(&index).expect("json"),
    )?;
    write("config.json", config_json.to_string())?;
    Ok(cfg)
}

/// A small Qwen2-VL config whose every linear layer fits candle's int8 kernels (input widths
/// 256, 512 and 1024, output widths multiples of 16), so that q8_0 and q4k apply to all of them:
/// the quantization tests' model (the tiny fixtures' 32- to 128-wide layers stay f32).
pub const KERNEL_FIT_CONFIG: &str = r#"{
  "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
  "hidden_act": "silu", "hidden_size": 256, "intermediate_size": 512,
  "initializer_range": 0.02, "max_position_embeddings": 2048, "max_window_layers": 2,
  "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 2048,
  "tie_word_embeddings": true, "torch_dtype": "float32", "use_cache": true,
  "use_sliding_window": false, "attention_dropout": 0.0,
  "vision_config": {"depth": 2, "embed_dim": 256, "mlp_ratio": 2, "num_heads": 4, "in_chans": 3,
    "hidden_size": 256, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
    "temporal_patch_size": 2, "hidden_act": "quick_gelu"},
  "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
  "image_token_id": 500, "vision_start_token_id": 501, "vision_end_token_id": 502,
  "vocab_size": 512
}"#;

/// `config.json` of Qwen/Qwen2-VL-2B-Instruct (the hub's flat layout), for real-size runs.
pub const QWEN2_VL_2B_CONFIG: &str = r#"{
  "architectures": ["Qwen2VLForConditionalGeneration"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "vision_start_token_id": 151652,
  "vision_end_token_id": 151653,
  "vision_token_id": 151654,
  "image_token_id": 151655,
  "video_token_id": 151656,
  "hidden_act": "silu",
  "hidden_size": 1536,
  "initializer_range": 0.02,
  "intermediate_size": 8960,
  "max_position_embeddings": 32768,
  "max_window_layers": 28,
  "model_type": "qwen2_vl",
  "num_attention_heads": 12,
  "num_hidden_layers": 28,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 32768,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "use_cache": true,
  "use_sliding_window": false,
  "vision_config": {
    "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
    "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
    "temporal_patch_size": 2
  },
  "rope_scaling": { "type": "mrope", "mrope_section": [16, 24, 24] },
  "vocab_size": 151936
}"#;

/// Qwen2-VL's special tokens, in the order the published tokenizer adds them after its BPE
/// vocabulary.
pub const SPECIAL_TOKENS: [&str; 14] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
];

/// Qwen2's pre-tokenizer split (before the byte-level mapping).
const QWEN_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The chat template of Qwen2-VL-Instruct (images and videos as vision pads).
pub const QWEN2_VL_CHAT_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Trains a byte-level BPE tokenizer of `vocab_size` entries in all (special tokens included)
/// on `corpus`, with Qwen2's pre-tokenizer and decoder and its special tokens after the BPE
/// vocabulary.
pub fn train_tokenizer(
    corpus: &[String],
    vocab_size: usize,
) -> Result<tokenizers::Tokenizer, Error> {
    use tokenizers::{
        AddedToken, DecoderWrapper, PreTokenizerWrapper, Tokenizer,
        decoders::byte_level::ByteLevel as ByteLevelDecoder,
        models::TrainerWrapper,
        models::{
            ModelWrapper,
            bpe::{BPE, BpeTrainerBuilder},
        },
        normalizer::SplitDelimiterBehavior,
        pre_tokenizers::{
            byte_level::ByteLevel, sequence::Sequence, split::Split, split::SplitPattern,
        },
    };
    let err = |e: tokenizers::Error| Error::Input(format!("tokenizer training: {e}"));
    let base = 256 + SPECIAL_TOKENS.len();
    if vocab_size < base {
        return Err(Error::Input(format!(
            "vocab_size {vocab_size} is below the {base} byte and special tokens"
        )));
    }
    let mut tokenizer = Tokenizer::new(ModelWrapper::BPE(BPE::default()));
    let split = Split::new(
        SplitPattern::Regex(QWEN_SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(err)?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ]))));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::new(
        false, false, false,
    ))));
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(vocab_size - SPECIAL_TOKENS.len())
            .min_frequency(2)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .show_progress(false)
            .build(),
    );
    tokenizer.train(&mut trainer, corpus.iter()).map_err(err)?;
    let special: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tokenizer.add_special_tokens(&special);
    Ok(tokenizer)
}

/// Writes a complete, randomly initialised Qwen2-VL model directory into `out`: a tokenizer
/// trained on `corpus` (at most `config_json`'s `vocab_size` tokens: fewer when the corpus
/// supports fewer merges), `config.json` with the special token ids filled in from it, random weights, the chat template,
/// the processor and generation configs. Every file is written atomically.
pub fn init_model_dir(
    config_json: &str,
    corpus: &[String],
    out: &Path,
    seed: u64,
) -> Result<Config, Error> {
    let mut config: serde_json::Value =
        serde_json::from_str(config_json).map_err(|e| Error::Input(format!("config: {e}")))?;
    let vocab = config["vocab_size"]
        .as_u64()
        .ok_or_else(|| Error::Input("config: vocab_size is missing".into()))?
        as usize;
    let tokenizer = train_tokenizer(corpus, vocab)?;
    let id = |t: &str| {
        tokenizer
            .token_to_id(t)
            .ok_or_else(|| Error::Input(format!("the trained tokenizer lacks {t}")))
    };
    let size = tokenizer.get_vocab_size(true);
    let obj = config
        .as_object_mut()
        .ok_or_else(|| Error::Input("config: not a JSON object".into()))?;
    for (key, token) in [
        ("bos_token_id", "<|endoftext|>"),
        ("eos_token_id", "<|im_end|>"),
        ("pad_token_id", "<|endoftext|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
        ("vision_token_id", "<|vision_pad|>"),
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
    ] {
        obj.insert(key.into(), id(token)?.into());
    }
    // Like Qwen's own (151,936 rows for 151,646 tokens), the embedding may have more rows
    // than the tokenizer has tokens when the corpus supports fewer merges.
    if size > vocab {
        return Err(Error::Input(format!(
            "the tokenizer has {size} tokens, more than vocab_size {vocab}"
        )));
    }
    let config_text = serde_json::to_string_pretty(&config).expect("JSON");
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let cfg = write_random_checkpoint(out, &config_text, 0.02, seed)?;
    let write = |name: &str, text: String| -> Result<(), Error> {
        inspector_lora::write_atomic(&out.join(name), |tmp| {
            std::fs::write(tmp, text.as_bytes()).map_err(candle_core::Error::wrap)
        })?;
        Ok(())
    };
    write(
        "tokenizer.json",
        tokenizer
            .to_string(true)
            .map_err(|e| Error::Input(format!("tokenizer: {e}")))?,
    )?;
    let added: serde_json::Map<String, serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .map(|t| {
            (
                id(t).expect("added above").to_string(),
                serde_json::json!({"content": t, "lstrip": false, "normalized": false,
                    "rstrip": false, "single_word": false, "special": true}),
            )
        })
        .collect();
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&serde_json::json!({
            "add_bos_token": false,
            "add_prefix_space": false,
            "added_tokens_decoder": added,
            "bos_token": null,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "errors": "replace",
            "model_max_length": cfg.text.max_position_embeddings,
            "split_special_tokens": false,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": null,
        }))
        .expect("JSON"),
    )?;
    write(
        "chat_template.json",
        serde_json::to_string_pretty(&serde_json::json!({"chat_template": QWEN2_VL_CHAT_TEMPLATE}))
            .expect("JSON"),
    )?;
    write(
        "generation_config.json",
        serde_json::to_string_pretty(&serde_json::json!({
            "bos_token_id": id("<|endoftext|>")?,
            "eos_token_id": [id("<|im_end|>")?],
            "pad_token_id": id("<|endoftext|>")?,
            "do_sample": false,
        }))
        .expect("JSON"),
    )?;
    crate::image::ProcessorConfig::default()
        .with_pixels(Some(56 * 56), Some(224 * 224))?
        .write_pixels(out)?;
    Ok(cfg)
}
