//! Inspection through a remote model engine that speaks OpenAI's chat API: vLLM, SGLang or TGI
//! serving the (merged) fine-tuned model on a GPU, or another `inspector serve`.
//!
//! Each photo goes to `POST {base}/chat/completions` as a data URI with the model's instruction,
//! greedy, with the canonical answer's JSON schema as `response_format` (the database's
//! citations as `rule`'s enum, so the engine's constrained decoder cannot cite a clause that does
//! not exist). The answer is read, checked, cached and reported exactly as a local model's
//! ([`crate::finding`]); engines give no token probabilities, so violations carry no score.
//!
//! An engine that is down must not hold inspections up: connection failures, 429 and 5xx are
//! retried with backoff (100 ms doubling, a few times), then the photo fails with
//! [`Error::Unavailable`]; after `breaker_threshold` failed photos in a row the circuit opens and
//! photos fail at once for `breaker_cooldown`, after which one photo probes the engine (the
//! circuit closes on its success). Timeouts are not retried.

use std::{
    io::Read,
    sync::Mutex,
    time::{Duration, Instant},
};

use base64::Engine as _;
use inspector_core::{Rule, answer::Prompt, json_schema::Json};
pub use inspector_store::redact;

use crate::{
    AnswerCache, DetectConfig, Error, Finding, ImageInfo, Input, RawAnswer, Timings, citations,
    sha256_hex,
};

/// How to reach the engine and how patient to be with it.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// The API base including `/v1`, e.g. `http://gpu-1:8000/v1`.
    pub base_url: String,
    /// The model name the engine serves.
    pub model: String,
    /// Sent as `Authorization: Bearer …` when given.
    pub api_key: Option<String>,
    /// The instruction the model was fine-tuned with.
    pub prompt: Prompt,
    pub max_tokens: usize,
    /// Longest wait for one answer.
    pub timeout: Duration,
    /// Attempts after the first on connection failures, 429 and 5xx.
    pub retries: u32,
    /// Wait before the first retry (doubling after).
    pub backoff: Duration,
    /// Photos failed in a row that open the circuit.
    pub breaker_threshold: u32,
    /// How long an open circuit fails photos at once.
    pub breaker_cooldown: Duration,
}

impl RemoteConfig {
    /// Defaults for an engine: 512 tokens, 120 s per answer, 2 retries, circuit open for 5 s
    /// after 3 failed photos.
    pub fn new(base_url: &str, model: &str, prompt: Prompt) -> RemoteConfig {
        RemoteConfig {
            base_url: base_url.trim_end_matches('/').to_string(),
            model: model.to_string(),
            api_key: None,
            prompt,
            max_tokens: DetectConfig::default().max_new_tokens,
            timeout: Duration::from_secs(120),
            retries: 2,
            backoff: Duration::from_millis(100),
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_secs(5),
        }
    }
}

/// The circuit breaker's state.
#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    /// A photo is probing a circuit whose cooldown ended.
    probing: bool,
}

/// The engine, with the citations its answers may use.
pub struct RemoteEngine {
    config: RemoteConfig,
    agent: ureq::Agent,
    breaker: Mutex<Breaker>,
    /// `response_format` for the current citations, as JSON text (keys in order).
    response_format: String,
    citations_fingerprint: String,
    pub model_fingerprint: String,
}

/// Why one call failed: worth retrying (the engine may come back) or not.
enum CallError {
    Retry(String),
    Fail(String),
}

impl RemoteEngine {
    pub fn new(config: RemoteConfig) -> RemoteEngine {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(2).min(config.timeout))
            .timeout(config.timeout)
            .build();
        let model_fingerprint =
            sha256_hex(format!("openai\n{}\n{}", config.base_url, config.model).as_bytes());
        let mut engine = RemoteEngine {
            config,
            agent,
            breaker: Mutex::new(Breaker::default()),
            response_format: String::new(),
            citations_fingerprint: String::new(),
            model_fingerprint,
        };
        engine.set_citations(&[]);
        engine
    }

    pub fn config(&self) -> &RemoteConfig {
        &self.config
    }

    /// The citations `rule` may take (the database's rules); none allows any string.
    pub fn set_citations(&mut self, rules: &[Rule]) {
        let citations = citations(rules);
        self.citations_fingerprint = sha256_hex(citations.join("\n").as_bytes());
        self.response_format = Json::object([
            ("type", Json::str("json_schema")),
            (
                "json_schema",
                Json::object([
                    ("name", Json::str("inspection")),
                    ("strict", Json::Bool(true)),
                    ("schema", inspector_core::answer::json_schema(&citations)),
                ]),
            ),
        ])
        .to_json();
    }

    /// The answer cache's keys for this engine: its URL and model name stand for the model.
    pub fn answer_cache(&self) -> AnswerCache {
        AnswerCache {
            model_fingerprint: self.model_fingerprint.clone(),
            adapter_fingerprint: None,
            prompt: self.config.prompt,
            config: DetectConfig {
                max_new_tokens: self.config.max_tokens,
                ..DetectConfig::default()
            },
            pixels: [0, 0],
            backend: "openai".into(),
        }
    }

    /// Whether the engine answers `GET {base}/models` within `within`.
    pub fn probe(&self, within: Duration) -> Result<(), String> {
        let mut request = self
            .agent
            .get(&format!("{}/models", self.config.base_url))
            .timeout(within);
        if let Some(key) = &self.config.api_key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        request
            .call()
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", redact(&self.config.base_url)))
    }

    /// Inspects photos like [`crate::Detector::inspect`]: cache hits from `cache`, the others
    /// sent to the engine all at once (the engine batches), their answers cached.
    pub fn inspect(
        &self,
        inputs: &[Input],
        rules: &[Rule],
        cache: Option<&dyn inspector_store::Store>,
    ) -> Vec<Result<Finding, Error>> {
        let answers = self.answer_cache();
        let mut results: Vec<Option<Result<Finding, Error>>> =
            (0..inputs.len()).map(|_| None).collect();
        let mut pending = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let started = Instant::now();
            let sha256 = sha256_hex(&input.bytes);
            let (width, height) = match inspector_imaging::dimensions(&input.bytes) {
                Ok(size) => size,
                Err(e) => {
                    results[i] = Some(Err(Error::Image {
                        name: input.name.clone(),
                        message: e.to_string(),
                    }));
                    continue;
                }
            };
            let image = ImageInfo {
                width,
                height,
                sha256,
            };
            let key = answers.key(&image.sha256, &self.citations_fingerprint);
            if let Some(store) = cache {
                match answers.lookup(store, &key, image.clone(), rules, started) {
                    Ok(Some(finding)) => {
                        results[i] = Some(Ok(finding));
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        results[i] = Some(Err(e));
                        continue;
                    }
                }
            }
            pending.push((i, image, key, started));
        }
        let answered: Vec<Result<String, Error>> = std::thread::scope(|scope| {
            let calls: Vec<_> = pending
                .iter()
                .map(|(i, ..)| scope.spawn(move || self.answer(&inputs[*i])))
                .collect();
            calls
                .into_iter()
                .map(|c| {
                    c.join()
                        .unwrap_or_else(|_| Err(Error::Remote("the request panicked".into())))
                })
                .collect()
        });
        for ((i, image, key, started), answer) in pending.into_iter().zip(answered) {
            results[i] = Some(answer.and_then(|raw| {
                let answer = RawAnswer {
                    raw,
                    token_probs: Vec::new(),
                    token_margins: Vec::new(),
                    token_ends: Vec::new(),
                };
                if let Some(store) = cache {
                    store.cache_answer(&key, &serde_json::to_string(&answer).expect("JSON"))?;
                }
                let ms = started.elapsed().as_secs_f64() * 1e3;
                let timings = Timings {
                    decode_ms: 0.0,
                    generate_ms: ms,
                    total_ms: ms,
                    cached: false,
                };
                Ok(answers.finding(&answer, image, rules, timings))
            }));
        }
        results
            .into_iter()
            .map(|r| r.expect("every photo gets a result"))
            .collect()
    }

    /// The engine's answer about one photo, through the circuit breaker and retries.
    fn answer(&self, input: &Input) -> Result<String, Error> {
        self.admit()?;
        let body = self.body(input);
        let mut wait = self.config.backoff;
        let mut attempt = 0;
        loop {
            match self.call(&body) {
                Ok(text) => {
                    self.settle(true);
                    return Ok(text);
                }
                Err(CallError::Retry(e)) if attempt < self.config.retries => {
                    tracing::debug!("engine call failed ({e}); retrying in {wait:?}");
                    std::thread::sleep(wait);
                    wait *= 2;
                    attempt += 1;
                }
                Err(CallError::Retry(e)) => {
                    self.settle(false);
                    return Err(Error::Unavailable {
                        message: format!("the model engine did not answer: {e}"),
                        retry_after: self.config.breaker_cooldown,
                    });
                }
                Err(CallError::Fail(e)) => {
                    // The engine is up but refused or garbled this photo.
                    self.settle(true);
                    return Err(Error::Remote(e));
                }
            }
        }
    }

    /// Lets a call through unless the circuit is open (one probe once its cooldown ends).
    fn admit(&self) -> Result<(), Error> {
        let mut b = self.breaker.lock().expect("breaker lock");
        let Some(until) = b.open_until else {
            return Ok(());
        };
        let now = Instant::now();
        let unavailable = |retry_after: Duration| Error::Unavailable {
            message: format!(
                "the model engine at {} is failing; not calling it for now",
                redact(&self.config.base_url)
            ),
            retry_after,
        };
        if now < until {
            return Err(unavailable(until - now));
        }
        if b.probing {
            return Err(unavailable(Duration::from_secs(1)));
        }
        b.probing = true;
        Ok(())
    }

    /// Records a call's outcome: success closes the circuit, enough failures open it.
    fn settle(&self, ok: bool) {
        let mut b = self.breaker.lock().expect("breaker lock");
        b.probing = false;
        if ok {
            b.failures = 0;
            b.open_until = None;
        } else {
            b.failures += 1;
            if b.failures >= self.config.breaker_threshold {
                if b.open_until.is_none() {
                    tracing::warn!(
                        "the model engine at {} failed {} times in a row: circuit open",
                        redact(&self.config.base_url),
                        b.failures
                    );
                }
                b.open_until = Some(Instant::now() + self.config.breaker_cooldown);
            }
        }
    }

    /// The request body: the photo as a data URI, then the instruction; greedy; the answer's
    /// schema.
    fn body(&self, input: &Input) -> String {
        let mime = match image::guess_format(&input.bytes) {
            Ok(f) => f.to_mime_type(),
            Err(_) => "application/octet-stream",
        };
        let url = format!(
            "data:{mime};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&input.bytes)
        );
        let message = Json::object([
            ("role", Json::str("user")),
            (
                "content",
                Json::Array(vec![
                    Json::object([
                        ("type", Json::str("image_url")),
                        ("image_url", Json::object([("url", Json::String(url))])),
                    ]),
                    Json::object([
                        ("type", Json::str("text")),
                        ("text", Json::str(self.config.prompt.instruction())),
                    ]),
                ]),
            ),
        ]);
        let head = Json::object([
            ("model", Json::str(self.config.model.as_str())),
            ("messages", Json::Array(vec![message])),
            ("max_tokens", Json::Number(self.config.max_tokens.into())),
            ("temperature", Json::Number(0.into())),
        ])
        .to_json();
        // `response_format` is spliced in as text to keep the schema's key order.
        format!(
            "{},\"response_format\":{}}}",
            &head[..head.len() - 1],
            self.response_format
        )
    }

    fn call(&self, body: &str) -> Result<String, CallError> {
        let mut request = self
            .agent
            .post(&format!("{}/chat/completions", self.config.base_url))
            .set("Content-Type", "application/json");
        if let Some(key) = &self.config.api_key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        let response = match request.send_string(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let text = read_text(r).unwrap_or_default();
                let message = format!("the engine answered {code}: {}", truncate(&text, 300));
                return Err(if code == 429 || code >= 500 {
                    CallError::Retry(message)
                } else {
                    CallError::Fail(message)
                });
            }
            Err(ureq::Error::Transport(t)) => {
                let message = format!("{}: {t}", redact(&self.config.base_url));
                // A timeout is not retried: the engine is busy, and waiting again doubles it.
                let timed_out = std::error::Error::source(&t)
                    .and_then(|s| s.downcast_ref::<std::io::Error>())
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut);
                return Err(if timed_out {
                    CallError::Fail(message)
                } else {
                    CallError::Retry(message)
                });
            }
        };
        let text = read_text(response)
            .map_err(|e| CallError::Retry(format!("reading the engine's answer: {e}")))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            CallError::Fail(format!(
                "the engine's answer is not JSON ({e}): {}",
                truncate(&text, 300)
            ))
        })?;
        value["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| {
                CallError::Fail(format!(
                    "the engine's answer has no choices[0].message.content: {}",
                    truncate(&text, 300)
                ))
            })
    }
}

/// Reads a body of at most 16 MiB.
fn read_text(response: ureq::Response) -> std::io::Result<String> {
    let mut text = String::new();
    response
        .into_reader()
        .take(16 << 20)
        .read_to_string(&mut text)?;
    Ok(text)
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords_when_shown() {
        assert_eq!(redact("http://u:p@host:8000/v1"), "http://u@host:8000/v1");
        assert_eq!(
            redact("http://host:8000/v1?a=b@c"),
            "http://host:8000/v1?a=b@c"
        );
        assert_eq!(redact("postgres://me:pw@db/x"), "postgres://me@db/x");
        assert_eq!(redact("no scheme"), "no scheme");
    }

    #[test]
    fn the_request_keeps_the_schema_in_answer_order_and_is_json() {
        let mut e = RemoteEngine::new(RemoteConfig::new("http://h/v1/", "m", Prompt::Brief));
        let rule = Rule::new(
            "安全作业规程",
            "3.1",
            "x",
            vec![],
            None,
            inspector_core::SourceSpan {
                file: "a.md".into(),
                line_start: 1,
                line_end: 1,
            },
        );
        e.set_citations(&[rule]);
        let body = e.body(&Input {
            name: "a".into(),
            bytes: vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a],
        });
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["model"], "m");
        assert_eq!(v["temperature"], 0);
        assert!(
            v["messages"][0]["content"][0]["image_url"]["url"]
                .as_str()
                .unwrap()
                .starts_with("data:image/png;base64,")
        );
        assert_eq!(
            v["messages"][0]["content"][1]["text"],
            Prompt::Brief.instruction()
        );
        let schema = &v["response_format"]["json_schema"]["schema"];
        assert_eq!(
            schema["properties"]["violations"]["items"]["properties"]["rule"]["enum"][0],
            "《安全作业规程》第3.1条"
        );
        let status = body.find("\"status\"").unwrap();
        let violations = body.find("\"violations\":{").unwrap();
        let description = body.find("\"description\"").unwrap();
        let risk = body.find("\"risk\"").unwrap();
        assert!(status < violations && description < risk, "{body}");
        assert_eq!(e.config().base_url, "http://h/v1");
    }
}
