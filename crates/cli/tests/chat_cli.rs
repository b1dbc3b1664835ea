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

/// A minimal Hugging Face hub on loopback: the repo API and `resolve` with byte ranges, as the
/// hub serves them. Serves `files` as repo `acme/served-vl` at commit `COMMIT`.
fn serve_hub(
    files: Vec<(String, Vec<u8>)>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let requests = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut range = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = v.trim().split_once('-').unwrap();
                    range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().ok()));
                }
            }
            requests.lock().unwrap().push(path.clone());
            let respond = |stream: &mut std::net::TcpStream,
                           status: &str,
                           headers: &[(String, String)],
                           body: &[u8]| {
                let mut head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let _ = stream
                    .write_all(head.as_bytes())
                    .and_then(|_| stream.write_all(body));
            };
            if path == "/api/models/acme/served-vl/revision/main" {
                let mut names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
                names.push("README.md".into());
                let siblings: Vec<serde_json::Value> = names
                    .iter()
                    .map(|n| serde_json::json!({"rfilename": n}))
                    .collect();
                let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
                respond(
                    &mut stream,
                    "200 OK",
                    &[("Content-Type".into(), "application/json".into())],
                    body.as_bytes(),
                );
            } else if let Some(name) = path.strip_prefix("/acme/served-vl/resolve/main/") {
                match files.iter().find(|(n, _)| n == name) {
                    Some((_, data)) => {
                        let (a, b) = range.unwrap_or((0, None));
                        let b = b.unwrap_or(data.len() - 1).min(data.len() - 1);
                        let headers = vec![
                            ("X-Repo-Commit".to_string(), COMMIT.to_string()),
                            (
                                "ETag".to_string(),
                                format!("\"{:x}-{}\"", data.len(), name.len()),
                            ),
                            (
                                "Content-Range".to_string(),
                                format!("bytes {a}-{b}/{}", data.len()),
                            ),
                        ];
                        respond(&mut stream, "206 Partial Content", &headers, &data[a..=b]);
                    }
                    None => respond(&mut stream, "404 Not Found", &[], b"not found"),
                }
            } else {
                respond(&mut stream, "404 Not Found", &[], b"not found");
            }
        }
    });
    (addr, log)
}

#[test]
fn downloads_through_hf_endpoint_from_a_loopback_hub() {
    let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(fixtures().join("tiny-b"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            (
                e.file_name().to_str().unwrap().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    let (endpoint, log) = serve_hub(files.clone());
    let cache = tempfile::tempdir().unwrap();
    let cache_str = cache.path().to_str().unwrap();
    let args = [
        "--model",
        "acme/served-vl",
        "--prompt",
        "hi",
        "--temperature",
        "0",
        "--max-new-tokens",
        "3",
        "--json",
    ];
    let v = ok_json(&chat(
        &args,
        &[("HF_HUB_CACHE", cache_str), ("HF_ENDPOINT", &endpoint)],
    ));
    let dir = PathBuf::from(v["model"].as_str().unwrap());
    assert!(
        dir.starts_with(cache.path())
            && dir.ends_with("snapshots/0123456789abcdef0123456789abcdef01234567"),
        "{dir:?}"
    );
    for (name, data) in &files {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), data, "{name}");
    }
    assert!(
        !dir.join("README.md").exists(),
        "only the files a model needs"
    );
    let requests = log.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("/api/models/acme/served-vl"))
    );
    // The same answer as from the fixture directory itself.
    let local = ok_json(&chat(
        &[
            "--model",
            fixtures().join("tiny-b").to_str().unwrap(),
            "--prompt",
            "hi",
            "--temperature",
            "0",
            "--max-new-tokens",
            "3",
            "--json",
        ],
        &[],
    ));
    assert_eq!(v["token_ids"], local["token_ids"]);
    // Now cached: offline works, without a request.
    let before = log.lock().unwrap().len();
    ok_json(&chat(
        &args,
        &[("HF_HUB_CACHE", cache_str), ("HF_HUB_OFFLINE", "1")],
    ));
    assert_eq!(log.lock().unwrap().len(), before);
    // An endpoint that does not answer: the error names it and says what to do.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let o = chat(
        &["--model", "acme/other", "--prompt", "hi"],
        &[("HF_HUB_CACHE", cache_str), ("HF_ENDPOINT", &dead)],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&dead) && err.contains("huggingface-cli download acme/other"),
        "{err}"
    );
}
