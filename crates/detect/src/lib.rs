//! Inspection: a photo in, a structured finding out, every rule citation checked against the
//! plant's rules.
//!
//! [`Detector`] holds a Qwen2-VL model (with an optional LoRA adapter), the decoding settings
//! and the model's and adapter's fingerprints. It asks each photo the instruction the model was
//! trained with ([`Prompt`](inspector_core::answer::Prompt): the canonical
//! [`INSTRUCTION`](inspector_core::answer::INSTRUCTION) unless the model directory records the
//! brief one); neither lists rules, as the model learnt them in fine-tuning. It reads the
//! answer with the tolerant [`parse_reply`], resolves each citation against the rules
//! (unresolvable ones are marked unverified, never dropped or guessed), turns 0–1000 boxes into
//! pixels and scores each violation by the mean probability of the tokens that wrote it.
//!
//! Photos run in batches (left-padded, mixed sizes); greedy batched answers equal one-by-one
//! answers. With a cache (an [`inspector_store::Store`]) an answer is stored under the hash
//! of the image bytes, the model and adapter fingerprints, the prompt version and the decoding
//! settings; citations are resolved again when a cached answer is read, so a changed rules
//! database shows.
//!
//! [`remote::RemoteEngine`] does the same through a model served elsewhere (vLLM, SGLang, TGI or
//! another `inspector serve`) over OpenAI's chat API, with the answer's JSON schema as
//! `response_format`.
//!
//! ```no_run
//! use inspector_detect::{DetectConfig, Detector, Input};
//!
//! let backend = inspector_qwen2vl::Backend::cpu();
//! let detector =
//!     Detector::load("models/demo/base".as_ref(), None, &backend, DetectConfig::default()).unwrap();
//! let photo = Input { name: "a.jpg".into(), bytes: std::fs::read("a.jpg").unwrap() };
//! let rules = vec![]; // from the rules database
//! for finding in detector.inspect(&[photo], &rules, None, 4, |_| {}) {
//!     println!("{:?}", finding.map(|f| f.status));
//! }
//! ```

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use candle_core::Tensor;
use inspector_core::{
    Risk, Rule,
    answer::{BOX_SCALE, PROMPT_VERSION, Prompt},
    citation::{Resolution, resolve},
    grammar::{AnswerGrammar, Viability},
    json_schema::SchemaGrammar,
    reply::{ReplyFormat, ReplyStatus, parse_reply, violation_spans},
};
use inspector_qwen2vl::{
    Batch, Qwen2Vl, VisionInput,
    chat::ChatTokenizer,
    generate::{Constraint, GenerationConfig, generate_constrained},
    image::{ProcessedImage, ProcessorConfig, process_rgb},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod active;
pub mod fingerprint;
pub mod remote;
pub mod report;

pub use inspector_qwen2vl::{Backend, Quantization};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Model { path: PathBuf, message: String },
    #[error("{name}: {message}")]
    Image { name: String, message: String },
    #[error(transparent)]
    Qwen(#[from] inspector_qwen2vl::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Store(#[from] inspector_store::StoreError),
    #[error("the prompt is {tokens} tokens long, above the limit of {limit}")]
    PromptTooLong { tokens: usize, limit: usize },
    #[error(
        "the response format's shortest answer needs {needed} tokens, more than max_tokens {max_tokens}"
    )]
    SchemaBudget { needed: usize, max_tokens: usize },
    /// The remote model engine is down or failing (see [`remote`]): try again later.
    #[error("{message}")]
    Unavailable {
        message: String,
        retry_after: std::time::Duration,
    },
    /// The remote model engine answered, but not with an answer.
    #[error("{0}")]
    Remote(String),
}

/// Decoding settings for inspection: greedy, no repetition penalty, at most 512 new tokens,
/// whatever sampling defaults the model's `generation_config.json` carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectConfig {
    pub max_new_tokens: usize,
    pub repetition_penalty: f64,
    /// 0 decodes greedily.
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: u64,
    /// Decode under the canonical answer's grammar ([`inspector_core::grammar`]): every answer
    /// parses, and `rule` is one of the citations given with [`Detector::set_citations`].
    #[serde(default = "yes")]
    pub constrained: bool,
}

fn yes() -> bool {
    true
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            max_new_tokens: 512,
            repetition_penalty: 1.0,
            temperature: 0.0,
            top_p: None,
            top_k: None,
            seed: 0,
            constrained: true,
        }
    }
}

/// A photo to inspect: a name for reports and its bytes.
#[derive(Debug, Clone)]
pub struct Input {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// A rule a citation resolved to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedRule {
    pub id: String,
    pub citation: String,
    pub text: String,
    pub categories: Vec<String>,
}

/// One violation found in a photo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FoundViolation {
    pub description: String,
    /// The citation as the model wrote it.
    pub rule: Option<String>,
    /// The rule it names in the database; `None` when it names none (or several).
    pub resolved: Option<ResolvedRule>,
    /// `false` when the citation could not be checked against the rules.
    pub verified: bool,
    pub risk: Option<Risk>,
    pub suggestion: Option<String>,
    /// `[x1, y1, x2, y2]` in pixels of the (upright) photo.
    #[serde(rename = "box")]
    pub bbox: Option<[f64; 4]>,
    /// Mean probability of the tokens that wrote this violation.
    pub score: Option<f64>,
}

/// Violations by risk level.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub high: usize,
    pub medium: usize,
    pub low: usize,
    pub unknown: usize,
    pub total: usize,
}

/// The photo a finding is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub width: u32,
    pub height: u32,
    /// Hex sha256 of the file's bytes.
    pub sha256: String,
}

/// Where the time went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub decode_ms: f64,
    pub generate_ms: f64,
    pub total_ms: f64,
    /// The answer came from the cache (no model work).
    pub cached: bool,
}

/// What inspection says about one photo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub status: ReplyStatus,
    pub violations: Vec<FoundViolation>,
    pub summary: Summary,
    /// The model's answer, as generated.
    pub raw: String,
    /// The answer broke off; `violations` holds those written out completely.
    pub truncated: bool,
    pub format: ReplyFormat,
    pub image: ImageInfo,
    pub timings: Timings,
    pub model_fingerprint: String,
    pub adapter_fingerprint: Option<String>,
    pub prompt_version: String,
}

/// What the model produced for one photo: the answer and each generated token's probability
/// (eos included). This is what the cache stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawAnswer {
    pub raw: String,
    pub token_probs: Vec<f32>,
    /// Top-1 minus top-2 probability of each generated token (active learning).
    #[serde(default)]
    pub token_margins: Vec<f32>,
    /// Text offsets (bytes of `raw`) where each token's text ends.
    pub token_ends: Vec<usize>,
}

/// The answer of [`Detector::chat`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatAnswer {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// False when the answer stopped at the token limit.
    pub stopped_at_eos: bool,
}

/// A model, an optional adapter and decoding settings.
pub struct Detector {
    pub model: Qwen2Vl,
    chat: Arc<ChatTokenizer>,
    im_end: u32,
    pad: u32,
    pub model_fingerprint: String,
    pub adapter_fingerprint: Option<String>,
    pub config: DetectConfig,
    generate_calls: AtomicU64,
    /// The bytes of each token id (constrained decoding).
    pieces: Vec<Option<Vec<u8>>>,
    grammar: AnswerGrammar,
    /// Hash of the citations the grammar allows (part of the cache key).
    citations_fingerprint: String,
    /// The instruction the model was trained with.
    prompt: Prompt,
}

/// Constrained decoding: a row may only emit tokens that keep its text a prefix of a valid
/// answer, and eos only once the answer is complete.
struct GrammarConstraint<'a> {
    grammar: &'a AnswerGrammar,
    pieces: &'a [Option<Vec<u8>>],
    eos: u32,
    texts: Vec<Vec<u8>>,
    complete: Vec<bool>,
}

impl Constraint for GrammarConstraint<'_> {
    fn allows(&mut self, row: usize, token: u32) -> bool {
        if token == self.eos {
            return self.complete[row];
        }
        if self.complete[row] {
            return false;
        }
        let Some(Some(piece)) = self.pieces.get(token as usize) else {
            return false;
        };
        let mut text = self.texts[row].clone();
        text.extend_from_slice(piece);
        self.grammar.check(&text) != Viability::Invalid
    }

    fn push(&mut self, row: usize, token: u32) {
        if let Some(Some(piece)) = self.pieces.get(token as usize) {
            self.texts[row].extend_from_slice(piece);
            self.complete[row] = self.grammar.check(&self.texts[row]) == Viability::Complete;
        }
    }
}

/// Decoding to a JSON schema (one row): only tokens that keep the text a prefix of an instance
/// whose shortest completion, one byte a token, still fits in the tokens left before the eos.
struct SchemaConstraint<'a> {
    grammar: &'a SchemaGrammar,
    pieces: &'a [Option<Vec<u8>>],
    eos: u32,
    /// `max_new_tokens`, the eos included.
    budget: usize,
    text: Vec<u8>,
    emitted: usize,
    complete: bool,
}

impl Constraint for SchemaConstraint<'_> {
    fn allows(&mut self, _row: usize, token: u32) -> bool {
        if token == self.eos {
            return self.complete;
        }
        if self.complete {
            return false;
        }
        let Some(Some(piece)) = self.pieces.get(token as usize) else {
            return false;
        };
        // Tokens left after this one, of which the eos takes the last.
        let left = self.budget.saturating_sub(self.emitted + 1);
        let mut text = self.text.clone();
        text.extend_from_slice(piece);
        self.grammar
            .remaining(&text)
            .is_some_and(|need| need < left)
    }

    fn push(&mut self, _row: usize, token: u32) {
        self.emitted += 1;
        if let Some(Some(piece)) = self.pieces.get(token as usize) {
            self.text.extend_from_slice(piece);
            self.complete = self.grammar.remaining(&self.text) == Some(0);
        }
    }
}

/// The prompt a model, or the adapter on it, was trained with: the adapter's record first, then
/// the model's, else [`Prompt::Full`].
pub fn trained_prompt(model_dir: &Path, adapter: Option<&Path>) -> Result<Prompt, Error> {
    let recorded = |dir: &Path| {
        Prompt::recorded_in(dir).map_err(|e| Error::Qwen(inspector_qwen2vl::Error::Input(e)))
    };
    if let Some(p) = adapter.map(recorded).transpose()?.flatten() {
        return Ok(p);
    }
    Ok(recorded(model_dir)?.unwrap_or_default())
}

/// Hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Detector {
    /// Loads `model_dir` on `backend` with an optional adapter.
    pub fn load(
        model_dir: &Path,
        adapter: Option<&Path>,
        backend: &Backend,
        config: DetectConfig,
    ) -> Result<Detector, Error> {
        let (model, _) = match adapter {
            Some(a) => {
                let (m, info, _) = inspector_qwen2vl::adapter::open(model_dir, a, backend)?;
                (m, info)
            }
            None => Qwen2Vl::open(model_dir, backend, None)?,
        };
        let chat = ChatTokenizer::load(model_dir, model.config.tokens.image_pad)?;
        let model_fp = fingerprint::model_fingerprint(model_dir)?;
        let adapter_fp = adapter.map(fingerprint::adapter_fingerprint).transpose()?;
        let mut detector = Detector::new(model, chat, model_fp, adapter_fp, config)?;
        detector.set_prompt(trained_prompt(model_dir, adapter)?);
        Ok(detector)
    }

    /// A detector from parts already loaded.
    pub fn new(
        model: Qwen2Vl,
        chat: ChatTokenizer,
        model_fingerprint: String,
        adapter_fingerprint: Option<String>,
        config: DetectConfig,
    ) -> Result<Detector, Error> {
        let im_end = chat.tokenizer.token_to_id("<|im_end|>").ok_or_else(|| {
            Error::Qwen(inspector_qwen2vl::Error::Input(
                "the tokenizer has no <|im_end|> token".into(),
            ))
        })?;
        let pad = model.config.tokens.pad.unwrap_or(im_end);
        let pieces = chat.token_bytes();
        Ok(Detector {
            model,
            chat: Arc::new(chat),
            im_end,
            pad,
            model_fingerprint,
            adapter_fingerprint,
            config,
            generate_calls: AtomicU64::new(0),
            pieces,
            grammar: AnswerGrammar::new(Vec::new()),
            citations_fingerprint: String::new(),
            prompt: Prompt::Full,
        })
    }

    /// Asks with the instruction of `prompt` (the one the model or adapter was trained with,
    /// [`Prompt::recorded_in`]); [`Prompt::Full`] until set.
    pub fn set_prompt(&mut self, prompt: Prompt) {
        self.prompt = prompt;
    }

    /// The instruction the detector asks with.
    pub fn prompt(&self) -> Prompt {
        self.prompt
    }

    /// The citations constrained decoding allows in `rule` (the database's rules, written as
    /// `《title》第N条`); none allows any string.
    pub fn set_citations(&mut self, rules: &[Rule]) {
        let citations = citations(rules);
        self.citations_fingerprint = sha256_hex(citations.join("\n").as_bytes());
        self.grammar = AnswerGrammar::new(citations);
    }

    /// What answering a photo from the cache needs, apart from the model: the cache key's
    /// parts and the fingerprints a finding carries. It can be used on other threads while the
    /// model works (the server answers cache hits without the model worker).
    pub fn answer_cache(&self) -> AnswerCache {
        let p = &self.model.processor;
        AnswerCache {
            model_fingerprint: self.model_fingerprint.clone(),
            adapter_fingerprint: self.adapter_fingerprint.clone(),
            prompt: self.prompt,
            config: self.config.clone(),
            pixels: [p.min_pixels, p.max_pixels],
            backend: self.model.backend().describe(),
        }
    }

    /// Renders and tokenizes chat turns off the model's thread ([`ChatPrompter::prepare`]).
    pub fn chat_prompter(&self) -> ChatPrompter {
        ChatPrompter {
            chat: self.chat.clone(),
            processor: self.model.processor.clone(),
        }
    }

    /// Sets the processor's pixel limits (training's settings belong here).
    pub fn set_processor(&mut self, processor: ProcessorConfig) {
        self.model.processor = processor;
    }

    /// Batches the model has generated for (cache hits do none).
    pub fn generate_calls(&self) -> u64 {
        self.generate_calls.load(Ordering::Relaxed)
    }

    /// The cache key of a photo: its bytes' hash, both fingerprints, the prompt version, the
    /// decoding settings, the pixel limits and the backend (device, dtype, quantization: a
    /// bf16 or q8_0 answer is not an f32 one).
    pub fn cache_key(&self, image_sha256: &str) -> String {
        self.answer_cache()
            .key(image_sha256, &self.citations_fingerprint)
    }

    /// Generates answers for processed images in one left-padded batch.
    pub fn generate(&self, images: &[&ProcessedImage]) -> Result<Vec<RawAnswer>, Error> {
        self.generate_with(images, &self.config)
    }

    /// [`Detector::generate`] with other decoding settings (sampling, for active learning).
    pub fn generate_with(
        &self,
        images: &[&ProcessedImage],
        config: &DetectConfig,
    ) -> Result<Vec<RawAnswer>, Error> {
        if images.is_empty() {
            return Ok(vec![]);
        }
        self.generate_calls.fetch_add(1, Ordering::Relaxed);
        let merge = self.model.processor.merge_size;
        let prompts: Vec<Vec<u32>> = images
            .iter()
            .map(|im| {
                self.chat
                    .image_prompt(self.prompt.instruction(), im.n_tokens(merge))
            })
            .collect::<Result<_, _>>()?;
        let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let input_ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let mut row = vec![self.pad; len - p.len()];
                row.extend(p);
                row
            })
            .collect();
        let attention_mask: Vec<Vec<bool>> = prompts
            .iter()
            .map(|p| (0..len).map(|i| i >= len - p.len()).collect())
            .collect();
        let pixel_values = Tensor::cat(
            &images
                .iter()
                .map(|im| im.pixel_values.clone())
                .collect::<Vec<_>>(),
            0,
        )?;
        let batch = Batch {
            input_ids,
            attention_mask: Some(attention_mask),
            images: Some(VisionInput {
                pixel_values,
                grid_thw: images.iter().map(|im| im.grid_thw).collect(),
            }),
        };
        let c = config;
        let settings = GenerationConfig {
            max_new_tokens: c.max_new_tokens,
            do_sample: c.temperature > 0.0,
            temperature: c.temperature,
            top_k: c.top_k,
            top_p: c.top_p,
            repetition_penalty: Some(c.repetition_penalty),
            seed: c.seed,
            eos: vec![self.im_end],
            pad: self.pad,
        };
        let mut grammar = GrammarConstraint {
            grammar: &self.grammar,
            pieces: &self.pieces,
            eos: self.im_end,
            texts: vec![Vec::new(); images.len()],
            complete: vec![false; images.len()],
        };
        let constraint: Option<&mut dyn Constraint> = if c.constrained {
            Some(&mut grammar)
        } else {
            None
        };
        let out = generate_constrained(&self.model, &batch, &settings, constraint, |_, _| {})?;
        out.tokens
            .iter()
            .zip(&out.stats)
            .map(|(tokens, stats)| {
                let raw = self.chat.decode(tokens)?;
                let token_ends = self.token_ends(tokens, &raw)?;
                Ok(RawAnswer {
                    raw,
                    token_probs: stats.iter().map(|s| s.prob).collect(),
                    token_margins: stats.iter().map(|s| s.margin).collect(),
                    token_ends,
                })
            })
            .collect()
    }

    /// Where each token's text ends in `raw` (byte offsets): the running sum of the tokens'
    /// bytes when they spell `raw` exactly (byte-level BPE, the usual case), else the decoded
    /// length of each prefix (quadratic in the answer's length, so only as a fallback).
    fn token_ends(&self, tokens: &[u32], raw: &str) -> Result<Vec<usize>, Error> {
        let mut ends = Vec::with_capacity(tokens.len());
        let mut spelled: Vec<u8> = Vec::with_capacity(raw.len());
        for &t in tokens {
            if let Some(Some(piece)) = self.pieces.get(t as usize)
                && t != self.im_end
            {
                spelled.extend_from_slice(piece);
            }
            ends.push(spelled.len().min(raw.len()));
        }
        if spelled == raw.as_bytes() {
            return Ok(ends);
        }
        (1..=tokens.len())
            .map(|i| Ok(self.chat.decode(&tokens[..i])?.len().min(raw.len())))
            .collect()
    }

    /// A free chat turn (OpenAI-compatible serving): `messages` in transformers' form, where
    /// each `{"type": "image"}` part is one of `images` in order. Greedy when `temperature` is
    /// 0; no answer grammar, but with `schema` the reply is an instance of that JSON schema
    /// (see [`Detector::chat_prepared`]).
    pub fn chat(
        &self,
        messages: &serde_json::Value,
        images: &[Input],
        max_new_tokens: usize,
        temperature: f64,
        seed: u64,
        schema: Option<&SchemaGrammar>,
    ) -> Result<ChatAnswer, Error> {
        let prepared = self.chat_prompter().prepare(messages, images, usize::MAX)?;
        self.chat_prepared(prepared, max_new_tokens, temperature, seed, schema)
    }

    /// Answers a chat turn that [`ChatPrompter::prepare`] rendered and tokenized. With `schema`,
    /// decoding is constrained to it: the reply is an instance that closes within
    /// `max_new_tokens` (the eos included), or [`Error::SchemaBudget`] when even its shortest
    /// instance does not fit.
    pub fn chat_prepared(
        &self,
        prepared: PreparedChat,
        max_new_tokens: usize,
        temperature: f64,
        seed: u64,
        schema: Option<&SchemaGrammar>,
    ) -> Result<ChatAnswer, Error> {
        if let Some(g) = schema
            && g.min_len() + 1 > max_new_tokens
        {
            return Err(Error::SchemaBudget {
                needed: g.min_len() + 1,
                max_tokens: max_new_tokens,
            });
        }
        let PreparedChat { input_ids, images } = prepared;
        let prompt_tokens = input_ids.len();
        let images = if images.is_empty() {
            None
        } else {
            Some(VisionInput {
                pixel_values: Tensor::cat(
                    &images
                        .iter()
                        .map(|p| p.pixel_values.clone())
                        .collect::<Vec<_>>(),
                    0,
                )?,
                grid_thw: images.iter().map(|p| p.grid_thw).collect(),
            })
        };
        let batch = Batch {
            input_ids: vec![input_ids],
            attention_mask: None,
            images,
        };
        let settings = GenerationConfig {
            max_new_tokens,
            do_sample: temperature > 0.0,
            temperature,
            top_k: None,
            top_p: None,
            repetition_penalty: None,
            seed,
            eos: vec![self.im_end],
            pad: self.pad,
        };
        self.generate_calls.fetch_add(1, Ordering::Relaxed);
        let mut constraint = schema.map(|grammar| SchemaConstraint {
            grammar,
            pieces: &self.pieces,
            eos: self.im_end,
            budget: max_new_tokens,
            text: Vec::new(),
            emitted: 0,
            complete: false,
        });
        let out = generate_constrained(
            &self.model,
            &batch,
            &settings,
            constraint.as_mut().map(|c| c as &mut dyn Constraint),
            |_, _| {},
        )?;
        Ok(ChatAnswer {
            text: self.chat.decode(&out.tokens[0])?,
            prompt_tokens,
            completion_tokens: out.stats[0].len(),
            stopped_at_eos: out.stopped_at_eos[0],
        })
    }

    /// Decodes and preprocesses one photo (errors name it).
    fn prepare(&self, input: &Input, sha256: String) -> Result<(ProcessedImage, ImageInfo), Error> {
        prepare_image(&self.model.processor, input, sha256)
    }

    /// Active learning: for each photo, the greedy finding and its uncertainty (token margins
    /// on the decisive tokens, and disagreement among `samples` answers sampled at
    /// `temperature`). No cache: the statistics come from this run. A photo that cannot be
    /// decoded gets its own error.
    pub fn uncertainty(
        &self,
        inputs: &[Input],
        rules: &[Rule],
        samples: usize,
        temperature: f64,
        batch_size: usize,
        mut on_done: impl FnMut(usize),
    ) -> Vec<Result<(Finding, active::Uncertainty), Error>> {
        let mut out: Vec<Option<Result<(Finding, active::Uncertainty), Error>>> =
            (0..inputs.len()).map(|_| None).collect();
        let mut ready = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            match self.prepare(input, sha256_hex(&input.bytes)) {
                Ok((p, info)) => ready.push((i, p, info)),
                Err(e) => {
                    out[i] = Some(Err(e));
                    on_done(i);
                }
            }
        }
        for chunk in ready.chunks(batch_size.max(1)) {
            let images: Vec<&ProcessedImage> = chunk.iter().map(|c| &c.1).collect();
            let run = || -> Result<Vec<(RawAnswer, Vec<RawAnswer>)>, Error> {
                let greedy = self.generate(&images)?;
                let mut sampled: Vec<Vec<RawAnswer>> = vec![Vec::new(); images.len()];
                for k in 0..samples {
                    let config = DetectConfig {
                        temperature,
                        seed: self.config.seed.wrapping_add(k as u64 + 1),
                        ..self.config.clone()
                    };
                    for (slot, a) in sampled
                        .iter_mut()
                        .zip(self.generate_with(&images, &config)?)
                    {
                        slot.push(a);
                    }
                }
                Ok(greedy.into_iter().zip(sampled).collect())
            };
            match run() {
                Ok(answers) => {
                    for ((i, _, info), (greedy, sampled)) in chunk.iter().zip(answers) {
                        let raws: Vec<&str> = sampled.iter().map(|a| a.raw.as_str()).collect();
                        let u = active::Uncertainty::new(
                            active::token_uncertainty(&greedy),
                            (samples > 0).then(|| active::disagreement(&raws)),
                        );
                        let f = self.finding(&greedy, info.clone(), rules, Timings::default());
                        out[*i] = Some(Ok((f, u)));
                        on_done(*i);
                    }
                }
                Err(e) => {
                    for (i, ..) in chunk {
                        out[*i] = Some(Err(batch_failed(&inputs[*i], &e)));
                        on_done(*i);
                    }
                }
            }
        }
        out.into_iter()
            .map(|r| r.expect("every photo gets a result"))
            .collect()
    }

    /// Reads an answer into a finding for a photo of `image`'s size, resolving citations
    /// against `rules`.
    pub fn finding(
        &self,
        answer: &RawAnswer,
        image: ImageInfo,
        rules: &[Rule],
        timings: Timings,
    ) -> Finding {
        self.answer_cache().finding(answer, image, rules, timings)
    }

    /// Inspects photos: decodes each (an unreadable one gets its own error and the rest go
    /// on), answers cached photos from `cache`, runs the others in batches of `batch_size`,
    /// stores their answers, and calls `on_done(i)` as each photo is finished. A batch runs as
    /// soon as it is full, so memory holds one batch of decoded photos, however many inputs.
    pub fn inspect(
        &self,
        inputs: &[Input],
        rules: &[Rule],
        cache: Option<&dyn inspector_store::Store>,
        batch_size: usize,
        mut on_done: impl FnMut(usize),
    ) -> Vec<Result<Finding, Error>> {
        let mut results: Vec<Option<Result<Finding, Error>>> =
            (0..inputs.len()).map(|_| None).collect();
        let mut pending: Vec<(usize, ProcessedImage, ImageInfo, String, f64)> = Vec::new();
        let answers = self.answer_cache();
        for (i, input) in inputs.iter().enumerate() {
            let started = Instant::now();
            let sha = sha256_hex(&input.bytes);
            let key = answers.key(&sha, &self.citations_fingerprint);
            // A cache hit needs only the (EXIF-oriented) size, read from the header: a large
            // photo is not decoded again to answer from the cache.
            if let Some(store) = cache
                && let Ok((width, height)) = inspector_imaging::dimensions(&input.bytes)
            {
                let image = ImageInfo {
                    width,
                    height,
                    sha256: sha.clone(),
                };
                match answers.lookup(store, &key, image, rules, started) {
                    Ok(Some(finding)) => {
                        results[i] = Some(Ok(finding));
                        on_done(i);
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        results[i] = Some(Err(e));
                        on_done(i);
                        continue;
                    }
                }
            }
            match self.prepare(input, sha) {
                Ok((p, info)) => {
                    pending.push((i, p, info, key, started.elapsed().as_secs_f64() * 1e3));
                    if pending.len() >= batch_size.max(1) {
                        self.run_batch(&pending, inputs, rules, cache, &mut results, &mut on_done);
                        pending.clear();
                    }
                }
                Err(e) => {
                    results[i] = Some(Err(e));
                    on_done(i);
                }
            }
        }
        if !pending.is_empty() {
            self.run_batch(&pending, inputs, rules, cache, &mut results, &mut on_done);
        }
        results
            .into_iter()
            .map(|r| r.expect("every photo gets a result"))
            .collect()
    }

    /// Answers one batch of prepared photos, stores the answers in `cache` and fills their
    /// results.
    fn run_batch(
        &self,
        chunk: &[(usize, ProcessedImage, ImageInfo, String, f64)],
        inputs: &[Input],
        rules: &[Rule],
        cache: Option<&dyn inspector_store::Store>,
        results: &mut [Option<Result<Finding, Error>>],
        on_done: &mut impl FnMut(usize),
    ) {
        let started = Instant::now();
        let images: Vec<&ProcessedImage> = chunk.iter().map(|c| &c.1).collect();
        match self.generate(&images) {
            Ok(answers) => {
                let per_image = started.elapsed().as_secs_f64() * 1e3 / chunk.len() as f64;
                for ((i, _, info, key, decode_ms), answer) in chunk.iter().zip(answers) {
                    let stored = cache.map(|store| {
                        store.cache_answer(key, &serde_json::to_string(&answer).expect("JSON"))
                    });
                    let timings = Timings {
                        decode_ms: *decode_ms,
                        generate_ms: per_image,
                        total_ms: decode_ms + per_image,
                        cached: false,
                    };
                    results[*i] = Some(match stored {
                        Some(Err(e)) => Err(e.into()),
                        _ => Ok(self.finding(&answer, info.clone(), rules, timings)),
                    });
                    on_done(*i);
                }
            }
            Err(e) => {
                for (i, ..) in chunk {
                    results[*i] = Some(Err(batch_failed(&inputs[*i], &e)));
                    on_done(*i);
                }
            }
        }
    }
}

/// The error of a photo whose batch failed in the model.
fn batch_failed(input: &Input, e: &Error) -> Error {
    Error::Image {
        name: input.name.clone(),
        message: format!("inspection failed: {e}"),
    }
}

/// The citations constrained decoding allows for `rules` (`《title》第N条`), sorted, unique.
fn citations(rules: &[Rule]) -> Vec<String> {
    let mut citations: Vec<String> = rules
        .iter()
        .map(|r| format!("《{}》第{}条", r.document, r.clause))
        .collect();
    citations.sort();
    citations.dedup();
    citations
}

/// The hash of the citations allowed for `rules` (a part of the answer cache key; equal to
/// what [`Detector::set_citations`] keeps).
pub fn citations_fingerprint(rules: &[Rule]) -> String {
    sha256_hex(citations(rules).join("\n").as_bytes())
}

/// Decodes and preprocesses one photo with `processor` (errors name it).
fn prepare_image(
    processor: &ProcessorConfig,
    input: &Input,
    sha256: String,
) -> Result<(ProcessedImage, ImageInfo), Error> {
    let image_err = |message: String| Error::Image {
        name: input.name.clone(),
        message,
    };
    let rgb = inspector_qwen2vl::image::decode_rgb(&input.bytes, processor.max_decode_pixels)
        .map_err(|e| image_err(e.to_string()))?;
    let info = ImageInfo {
        width: rgb.width(),
        height: rgb.height(),
        sha256,
    };
    let processed = process_rgb(&rgb, processor).map_err(|e| image_err(e.to_string()))?;
    Ok((processed, info))
}

/// The answer cache's view of a detector ([`Detector::answer_cache`]): keys and findings
/// without the model.
#[derive(Debug, Clone)]
pub struct AnswerCache {
    pub model_fingerprint: String,
    pub adapter_fingerprint: Option<String>,
    prompt: Prompt,
    config: DetectConfig,
    pixels: [usize; 2],
    backend: String,
}

impl AnswerCache {
    /// The cache key of a photo under rules whose [`citations_fingerprint`] is given.
    pub fn key(&self, image_sha256: &str, citations_fingerprint: &str) -> String {
        let parts = serde_json::json!([
            image_sha256,
            self.model_fingerprint,
            self.adapter_fingerprint,
            self.prompt.version(),
            self.config,
            self.pixels,
            citations_fingerprint,
            self.backend,
        ]);
        sha256_hex(parts.to_string().as_bytes())
    }

    /// The finding of a photo answered before, from the answer cache in `store` under `key`
    /// ([`AnswerCache::key`]); `None` on a miss or an entry that no longer parses. `started`
    /// is when the photo's handling began (its timings).
    pub fn lookup(
        &self,
        store: &dyn inspector_store::Store,
        key: &str,
        image: ImageInfo,
        rules: &[Rule],
        started: Instant,
    ) -> Result<Option<Finding>, Error> {
        let Some(json) = store.cached_answer(key)? else {
            return Ok(None);
        };
        let Ok(answer) = serde_json::from_str::<RawAnswer>(&json) else {
            return Ok(None);
        };
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let timings = Timings {
            decode_ms: ms,
            generate_ms: 0.0,
            total_ms: ms,
            cached: true,
        };
        Ok(Some(self.finding(&answer, image, rules, timings)))
    }

    /// The finding of a cached answer, as the detector would report it.
    pub fn finding(
        &self,
        answer: &RawAnswer,
        image: ImageInfo,
        rules: &[Rule],
        timings: Timings,
    ) -> Finding {
        let mut f = finding(
            answer,
            image,
            rules,
            timings,
            &self.model_fingerprint,
            self.adapter_fingerprint.as_deref(),
        );
        f.prompt_version = self.prompt.version().to_string();
        f
    }
}

/// A chat turn rendered and tokenized, with its photos preprocessed, ready for
/// [`Detector::chat_prepared`].
pub struct PreparedChat {
    pub input_ids: Vec<u32>,
    images: Vec<ProcessedImage>,
}

/// Renders chat turns with the model's template and tokenizes them, without the model: the
/// server does this on its request threads, so a huge prompt never occupies the model.
#[derive(Clone)]
pub struct ChatPrompter {
    chat: Arc<ChatTokenizer>,
    processor: ProcessorConfig,
}

impl ChatPrompter {
    /// Decodes the photos, renders `messages` and tokenizes them; a prompt of more than
    /// `max_tokens` tokens is refused ([`Error::PromptTooLong`]).
    pub fn prepare(
        &self,
        messages: &serde_json::Value,
        images: &[Input],
        max_tokens: usize,
    ) -> Result<PreparedChat, Error> {
        let images: Vec<ProcessedImage> = images
            .iter()
            .map(|input| prepare_image(&self.processor, input, String::new()).map(|(p, _)| p))
            .collect::<Result<_, _>>()?;
        let text = self.chat.render(
            messages,
            inspector_qwen2vl::chat::RenderOptions {
                add_generation_prompt: true,
                ..Default::default()
            },
        )?;
        let counts: Vec<usize> = images
            .iter()
            .map(|p| p.n_tokens(self.processor.merge_size))
            .collect();
        let input_ids = self.chat.encode(&text, &counts)?;
        if input_ids.len() > max_tokens {
            return Err(Error::PromptTooLong {
                tokens: input_ids.len(),
                limit: max_tokens,
            });
        }
        Ok(PreparedChat { input_ids, images })
    }
}

/// Reads an answer into a finding (see [`Detector::finding`]).
pub fn finding(
    answer: &RawAnswer,
    image: ImageInfo,
    rules: &[Rule],
    timings: Timings,
    model_fingerprint: &str,
    adapter_fingerprint: Option<&str>,
) -> Finding {
    let reply = parse_reply(&answer.raw);
    let spans = violation_spans(&answer.raw);
    let score_of = |k: usize| -> Option<f64> {
        // Only when the spans line up one-to-one with the parsed violations.
        let span = spans
            .get(k)
            .filter(|_| spans.len() == reply.violations.len())?;
        let probs: Vec<f32> = answer
            .token_ends
            .iter()
            .zip(&answer.token_probs)
            .filter(|(end, _)| **end > span.start && **end <= span.end)
            .map(|(_, p)| *p)
            .collect();
        (!probs.is_empty())
            .then(|| probs.iter().map(|&p| p as f64).sum::<f64>() / probs.len() as f64)
    };
    let (w, h) = (image.width as f64, image.height as f64);
    let violations: Vec<FoundViolation> = reply
        .violations
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let resolved = v.rule.as_deref().and_then(|c| match resolve(c, rules) {
                Resolution::Found(r) => Some(ResolvedRule {
                    id: r.id.clone(),
                    citation: r.citation.clone(),
                    text: r.text.clone(),
                    categories: r.categories.clone(),
                }),
                _ => None,
            });
            FoundViolation {
                description: v.description.clone(),
                rule: v.rule.clone(),
                verified: resolved.is_some(),
                resolved,
                risk: v.risk,
                suggestion: v.suggestion.clone(),
                bbox: v.bbox.map(|[x1, y1, x2, y2]| {
                    let f = |v: f64, side: f64| (v / BOX_SCALE * side * 100.0).round() / 100.0;
                    [f(x1, w), f(y1, h), f(x2, w), f(y2, h)]
                }),
                score: score_of(k),
            }
        })
        .collect();
    let mut summary = Summary {
        total: violations.len(),
        ..Default::default()
    };
    for v in &violations {
        match v.risk {
            Some(Risk::High) => summary.high += 1,
            Some(Risk::Medium) => summary.medium += 1,
            Some(Risk::Low) => summary.low += 1,
            None => summary.unknown += 1,
        }
    }
    Finding {
        status: reply.status,
        violations,
        summary,
        raw: answer.raw.clone(),
        truncated: reply.truncated,
        format: reply.format,
        image,
        timings,
        model_fingerprint: model_fingerprint.to_string(),
        adapter_fingerprint: adapter_fingerprint.map(str::to_string),
        prompt_version: PROMPT_VERSION.to_string(),
    }
}

/// Findings counted by status, for run summaries.
pub fn count_by_status(findings: &[&Finding]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for f in findings {
        let k = match f.status {
            ReplyStatus::Safe => "safe",
            ReplyStatus::Violation => "violation",
            ReplyStatus::Unparsed => "unparsed",
        };
        *m.entry(k).or_insert(0) += 1;
    }
    m
}
