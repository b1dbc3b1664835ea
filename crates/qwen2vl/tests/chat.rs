//! Chat against transformers 5.24 (fixtures from tools/make_qwen2vl_chat_fixtures.py): the
//! rendered template and input ids of 16 conversations, and greedy generation token for token,
//! alone and in a left-padded batch of 3. Plus sampling, streaming and bad input.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::fixtures;
use inspector_qwen2vl::{
    Batch, Error, Qwen2Vl, VisionInput,
    chat::{ChatTokenizer, RenderOptions},
    generate::{GenerationConfig, TextStream, generate},
    image::{self, ProcessorConfig},
};
use serde_json::Value;

fn json(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(path)).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn processor(dir: &Path) -> ProcessorConfig {
    ProcessorConfig::from_model_dir(dir)
        .unwrap()
        .with_pixels(Some(3136), Some(12544))
        .unwrap()
}

fn images(paths: &Value, processor: &ProcessorConfig) -> Vec<image::ProcessedImage> {
    paths
        .as_array()
        .unwrap()
        .iter()
        .map(|p| image::process_file(&fixtures().join(p.as_str().unwrap()), processor).unwrap())
        .collect()
}

fn vision(images: &[image::ProcessedImage]) -> Option<VisionInput> {
    (!images.is_empty()).then(|| VisionInput {
        pixel_values: Tensor::cat(
            &images.iter().map(|i| &i.pixel_values).collect::<Vec<_>>(),
            0,
        )
        .unwrap(),
        grid_thw: images.iter().map(|i| i.grid_thw).collect(),
    })
}

#[test]
fn input_ids_equal_transformers_apply_chat_template() {
    let cases = json("chat/conversations.json");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 12);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let dir = fixtures().join(case["model"].as_str().unwrap());
        let model_config = inspector_qwen2vl::Config::from_json(
            &std::fs::read_to_string(dir.join("config.json")).unwrap(),
        )
        .unwrap();
        let chat = ChatTokenizer::load(&dir, model_config.tokens.image_pad).unwrap();
        assert_eq!(
            chat.template_source
                .file
                .file_name()
                .unwrap()
                .to_str()
                .unwrap(),
            case["template_source"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap(),
            "{name}: template file"
        );
        let options = RenderOptions {
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
            continue_final_message: case["continue_final_message"].as_bool().unwrap_or(false),
            add_vision_id: case
                .pointer("/template_kwargs/add_vision_id")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        let text = chat.render(&case["messages"], options).unwrap();
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "{name}: rendered text"
        );
        let processor = processor(&dir);
        let imgs = images(&case["images"], &processor);
        let grids: Vec<Vec<u64>> = imgs
            .iter()
            .map(|i| i.grid_thw.iter().map(|&x| x as u64).collect())
            .collect();
        let want_grids: Vec<Vec<u64>> = case["image_grid_thw"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|g| {
                        g.as_array()
                            .unwrap()
                            .iter()
                            .map(|x| x.as_u64().unwrap())
                            .collect()
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(grids, want_grids, "{name}: grids");
        let counts: Vec<usize> = imgs.iter().map(|i| i.n_tokens(2)).collect();
        let got = chat.encode(&text, &counts).unwrap();
        assert_eq!(got, ids(&case["input_ids"]), "{name}: input ids");
    }
}

fn load(model: &str) -> (Qwen2Vl, std::path::PathBuf) {
    let dir = fixtures().join(model);
    let (m, _) = Qwen2Vl::load(&dir, DType::F32, &Device::Cpu).unwrap();
    (m, dir)
}

/// transformers' new tokens include the eos it stopped at; ours list it separately.
fn with_eos(tokens: &[u32], stopped: bool, eos: u32) -> Vec<u32> {
    let mut t = tokens.to_vec();
    if stopped {
        t.push(eos);
    }
    t
}

/// The left-padded batch of the reference's `rows`, with their images.
fn reference_batch(rows: &[Value], processor: &ProcessorConfig) -> Batch {
    let mut all_images = Vec::new();
    for r in rows {
        all_images.extend(images(&r["images"], processor));
    }
    Batch {
        input_ids: rows.iter().map(|r| ids(&r["input_ids"])).collect(),
        attention_mask: Some(
            rows.iter()
                .map(|r| ids(&r["attention_mask"]).iter().map(|&m| m == 1).collect())
                .collect(),
        ),
        images: vision(&all_images),
    }
}

#[test]
fn greedy_generation_equals_transformers_generate() {
    let reference = json("chat/generate.json");
    for model_name in ["tiny-a", "tiny-b", "tiny-c"] {
        let (model, dir) = load(model_name);
        let eos = model.config.tokens.eos[0];
        let pad = model.config.tokens.pad.unwrap();
        let config = GenerationConfig::greedy(32, vec![eos], pad);
        let processor = processor(&dir);

        let single = &reference["models"][model_name]["single"];
        let imgs = images(&single["images"], &processor);
        let batch = Batch {
            input_ids: vec![ids(&single["input_ids"])],
            attention_mask: None,
            images: vision(&imgs),
        };
        let out = generate(&model, &batch, &config, |_, _| {}).unwrap();
        assert_eq!(
            with_eos(&out.tokens[0], out.stopped_at_eos[0], eos),
            ids(&single["new_tokens"]),
            "{model_name}: single sequence"
        );

        let rows = reference["models"][model_name]["batch"]["rows"]
            .as_array()
            .unwrap();
        let batch = reference_batch(rows, &processor);
        let out = generate(&model, &batch, &config, |_, _| {}).unwrap();
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(
                with_eos(&out.tokens[i], out.stopped_at_eos[i], eos),
                ids(&r["new_tokens"]),
                "{model_name}: batch row {i}"
            );
        }
    }
}

#[test]
fn streaming_concatenates_to_the_full_text() {
    let reference = json("chat/generate.json");
    for model_name in ["tiny-a", "tiny-b"] {
        let dir = fixtures().join(model_name);
        let (model, _) = load(model_name);
        let chat = ChatTokenizer::load(&dir, model.config.tokens.image_pad).unwrap();
        let single = &reference["models"][model_name]["single"];
        let tokens = ids(&single["new_tokens"]);
        let full = chat.decode(&tokens).unwrap();
        assert_eq!(full, single["decoded_text"].as_str().unwrap());
        let mut stream = TextStream::new(|t: &[u32]| chat.decode(t));
        let mut pieces = Vec::new();
        for &t in &tokens {
            if let Some(p) = stream.push(t).unwrap() {
                pieces.push(p);
            }
        }
        pieces.extend(stream.finish().unwrap());
        assert_eq!(pieces.concat(), full, "{model_name}");
    }
    // Chinese text split into single bytes never releases half a character.
    let dir = fixtures().join("tiny-b");
    let chat = ChatTokenizer::load(&dir, 310).unwrap();
    let text = "进入作业区域必须佩戴安全帽。Helmet on! 👷";
    let tokens = chat
        .tokenizer
        .encode(text, false)
        .unwrap()
        .get_ids()
        .to_vec();
    let mut stream = TextStream::new(|t: &[u32]| chat.decode(t));
    let mut pieces = Vec::new();
    for &t in &tokens {
        if let Some(p) = stream.push(t).unwrap() {
            assert!(!p.contains('\u{FFFD}'), "{p:?}");
            pieces.push(p);
        }
    }
    pieces.extend(stream.finish().unwrap());
    assert_eq!(pieces.concat(), text);
}

#[test]
fn bad_input_tokenizer_template_images_context() {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(fixtures().join("tiny-b").join(f), dir.path().join(f)).unwrap();
    }
    // A malformed tokenizer.json.
    std::fs::write(
        dir.path().join("tokenizer.json"),
        "{\"model\": {\"type\": \"BPE\", \"vocab\": 3",
    )
    .unwrap();
    let err = ChatTokenizer::load(dir.path(), 310)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("not a valid tokenizer"),
        "{err}"
    );
    std::fs::copy(
        fixtures().join("tiny-b/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    // A syntax error is reported at load, an unknown filter when rendering; both name the file.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}{{ m }",
    )
    .unwrap();
    let err = ChatTokenizer::load(dir.path(), 310)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("chat_template.jinja") && err.contains("syntax error"),
        "{err}"
    );
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{{ messages[0]['content'] | no_such_filter }}",
    )
    .unwrap();
    let chat = ChatTokenizer::load(dir.path(), 310).unwrap();
    let messages = serde_json::json!([{"role": "user", "content": "hi"}]);
    let err = chat
        .render(&messages, RenderOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("chat_template.jinja") && err.contains("no_such_filter"),
        "{err}"
    );
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{{ raise_exception('only user messages') }}",
    )
    .unwrap();
    let chat = ChatTokenizer::load(dir.path(), 310).unwrap();
    let err = chat
        .render(&serde_json::json!([]), RenderOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("only user messages"), "{err}");
    // More images than placeholders.
    let chat = ChatTokenizer::load(&fixtures().join("tiny-b"), 310).unwrap();
    let err = chat
        .encode("<|im_start|>user\nhello<|im_end|>", &[4])
        .unwrap_err();
    assert!(
        matches!(err, Error::ImageTokens { .. })
            && err.to_string().contains("1 images but the prompt has 0"),
        "{err}"
    );
    // A prompt longer than the context.
    let model_dir = tempfile::tempdir().unwrap();
    common::copy_model("tiny-a", model_dir.path());
    let cfg_path = model_dir.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["max_position_embeddings"] = 16.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (model, _) = Qwen2Vl::load(model_dir.path(), DType::F32, &Device::Cpu).unwrap();
    let batch = Batch {
        input_ids: vec![vec![5; 20]],
        attention_mask: None,
        images: None,
    };
    let err = generate(
        &model,
        &batch,
        &GenerationConfig::greedy(4, vec![304], 305),
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("20 tokens, more than the model's context of 16"),
        "{err}"
    );
}

/// Refuses every token whose id is a multiple of 3 (and eos only after 5 tokens): the
/// greedy choice is often refused, so rows fall back to the host.
struct EveryThirdRefused {
    eos: u32,
    emitted: Vec<usize>,
}

impl inspector_qwen2vl::generate::Constraint for EveryThirdRefused {
    fn allows(&mut self, row: usize, token: u32) -> bool {
        if token == self.eos {
            return self.emitted[row] >= 5;
        }
        !token.is_multiple_of(3)
    }

    fn push(&mut self, row: usize, _token: u32) {
        self.emitted[row] += 1;
    }
}

/// Greedy decoding as a GPU runs it (the argmax and the token statistics reduced where the
/// logits are, a row copied to the host only when the constraint refuses its argmax), forced
/// on the CPU: the same tokens as the host path, and the same statistics within 1e-5, with
/// and without a constraint.
#[test]
fn greedy_decoding_on_the_device_equals_the_host_path() {
    use inspector_qwen2vl::{generate::generate_constrained, ops};
    let reference = json("chat/generate.json");
    let (model, dir) = load("tiny-a");
    let eos = model.config.tokens.eos[0];
    let pad = model.config.tokens.pad.unwrap();
    let config = GenerationConfig::greedy(24, vec![eos], pad);
    let processor = processor(&dir);
    let rows = reference["models"]["tiny-a"]["batch"]["rows"]
        .as_array()
        .unwrap();
    let batch = reference_batch(rows, &processor);
    for constrained in [false, true] {
        let run = |device_path: bool| {
            let _k = device_path.then(|| ops::force(ops::Kernel::Candle));
            let mut c = EveryThirdRefused {
                eos,
                emitted: vec![0; rows.len()],
            };
            let c: Option<&mut dyn inspector_qwen2vl::generate::Constraint> =
                constrained.then_some(&mut c as _);
            generate_constrained(&model, &batch, &config, c, |_, _| {}).unwrap()
        };
        let (host, device) = (run(false), run(true));
        assert_eq!(host.tokens, device.tokens, "constrained: {constrained}");
        assert_eq!(host.stopped_at_eos, device.stopped_at_eos);
        if constrained {
            assert!(
                host.tokens.iter().flatten().all(|t| !t.is_multiple_of(3)),
                "the constraint held"
            );
        }
        for (h, d) in host
            .stats
            .iter()
            .flatten()
            .zip(device.stats.iter().flatten())
        {
            for (what, a, b) in [
                ("prob", h.prob, d.prob),
                ("entropy", h.entropy, d.entropy),
                ("margin", h.margin, d.margin),
            ] {
                assert!((a - b).abs() <= 1e-5, "{what}: host {a}, device {b}");
            }
        }
    }
}
