//! `inspector chat`: greedy output equals transformers' generate, streaming equals the whole
//! text, seeds reproduce, and `--model` resolves local directories and the Hugging Face cache.

use std::{path::PathBuf, process::Command};

use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../qwen2vl/tests/fixtures")
}

fn chat(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_inspector"));
    cmd.arg("chat").args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn ok_json(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn greedy_json_equals_transformers_generate() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("chat/generate.json")).unwrap(),
    )
    .unwrap();
    let single = &reference["models"]["tiny-a"]["single"];
    let model = fixtures().join("tiny-a");
    let image = fixtures().join("images/coffee.png");
    let o = chat(
        &[
            "--model",
            model.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--prompt",
            "图中有什么危险？",
            "--temperature",
            "0",
            "--repetition-penalty",
            "1",
            "--max-new-tokens",
            "32",
            "--min-pixels",
            "3136",
            "--max-pixels",
            "12544",
            "--json",
        ],
        &[],
    );
    let v = ok_json(&o);
    let mut want: Vec<Value> = single["new_tokens"].as_array().unwrap().clone();
    assert_eq!(want.pop().unwrap(), 304, "the reference stopped at eos");
    assert_eq!(v["token_ids"].as_array().unwrap(), &want);
    assert_eq!(v["stopped_at_eos"], true);
    assert_eq!(v["text"], single["decoded_text"]);
    assert_eq!(
        v["prompt_tokens"],
        single["input_ids"].as_array().unwrap().len()
    );
    assert!(
        v["template"]
            .as_str()
            .unwrap()
            .ends_with("chat_template.json")
    );
}

#[test]
fn streaming_prints_the_same_text_and_seeds_reproduce() {
    let model = fixtures().join("tiny-b");
    let base = [
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "进入车间要注意什么？",
        "--temperature",
        "0.9",
        "--seed",
        "11",
        "--max-new-tokens",
        "24",
    ];
    let a = ok_json(&chat(&[&base[..], &["--json"]].concat(), &[]));
    let b = ok_json(&chat(&[&base[..], &["--json"]].concat(), &[]));
    assert_eq!(a["token_ids"], b["token_ids"], "same seed, same tokens");
    let other = ok_json(&chat(
        &[&base[..7], &["12", "--max-new-tokens", "24", "--json"]].concat(),
        &[],
    ));
    assert_ne!(
        a["token_ids"], other["token_ids"],
        "another seed, other tokens"
    );
    let streamed = chat(&[&base[..], &["--stream"]].concat(), &[]);
    assert!(streamed.status.success());
    let text = String::from_utf8(streamed.stdout).unwrap();
    assert_eq!(
        text.strip_suffix('\n').unwrap(),
        a["text"].as_str().unwrap()
    );
}

#[test]
fn model_from_the_hugging_face_cache_and_offline_message() {
    let cache = tempfile::tempdir().unwrap();
    let snapshot = cache.path().join("models--acme--tiny-vl/snapshots/3f2a9c");
    std::fs::create_dir_all(&snapshot).unwrap();
    for e in std::fs::read_dir(fixtures().join("tiny-b")).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), snapshot.join(e.file_name())).unwrap();
        }
    }
    std::fs::create_dir_all(cache.path().join("models--acme--tiny-vl/refs")).unwrap();
    std::fs::write(
        cache.path().join("models--acme--tiny-vl/refs/main"),
        "3f2a9c",
    )
    .unwrap();
    let cache_str = cache.path().to_str().unwrap();
    let v = ok_json(&chat(
        &[
            "--model",
            "acme/tiny-vl",
            "--prompt",
            "hi",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
            "--json",
        ],
        &[("HF_HUB_CACHE", cache_str)],
    ));
    assert!(v["model"].as_str().unwrap().ends_with("snapshots/3f2a9c"));
    // HF_HOME/hub is the fallback.
    let home = tempfile::tempdir().unwrap();
    std::fs::rename(cache.path().join("models--acme--tiny-vl"), {
        std::fs::create_dir_all(home.path().join("hub")).unwrap();
        home.path().join("hub/models--acme--tiny-vl")
    })
    .unwrap();
    let v = ok_json(&chat(
        &[
            "--model",
            "acme/tiny-vl",
            "--prompt",
            "hi",
            "--temperature",
            "0",
            "--max-new-tokens",
            "2",
            "--json",
        ],
        &[
            ("HF_HOME", home.path().to_str().unwrap()),
            ("HF_HUB_CACHE", ""),
        ],
    ));
    assert!(
        v["model"]
            .as_str()
            .unwrap()
            .contains("hub/models--acme--tiny-vl")
    );
    // Not cached: a clear message, non-zero exit.
    let o = chat(
        &["--model", "Qwen/Qwen2-VL-2B-Instruct", "--prompt", "hi"],
        &[("HF_HUB_CACHE", cache_str)],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not in the Hugging Face cache")
            && err.contains("HF_ENDPOINT")
            && err.contains("huggingface-cli download Qwen/Qwen2-VL-2B-Instruct"),
        "{err}"
    );
    // A directory that is not a model.
    let o = chat(&["--model", cache_str, "--prompt", "hi"], &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("has no config.json"));
}
