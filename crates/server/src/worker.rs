//! The inference worker: one model on one thread behind a bounded queue.
//!
//! Inspections that arrive together run as one batch: the worker takes the first job, then
//! whatever else arrives within `batch_wait`, up to `max_batch` photos. A job whose client has
//! gone (disconnected or timed out) before its batch starts is dropped unrun. Every answered
//! inspection is stored (photo file, then database row) before its reply is sent, so a 2xx
//! answer means the inspection is on disk. When the queue's last sender is dropped the worker
//! finishes what is queued and exits.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
    sync::{
        Arc, OnceLock, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant},
};

use inspector_core::{Risk, Rule, json_schema::SchemaGrammar, reply::ReplyStatus};
use inspector_detect::{
    AnswerCache, ChatAnswer, ChatPrompter, Detector, Finding, Input, PreparedChat,
    citations_fingerprint, remote::RemoteEngine,
};
use inspector_store::{InspectionViolation, NewInspection, Store};
use tokio::sync::oneshot;

use crate::{
    error::ApiError,
    images::{self, Probe},
    metrics::{Metrics, RiskLabels, StatusLabels},
    record::InspectionRecord,
};

/// What a client sent with a photo, checked.
#[derive(Debug, Clone)]
pub struct Upload {
    pub filename: Option<String>,
    pub source: Option<String>,
    pub probe: Probe,
}

/// A photo to inspect.
pub struct InspectJob {
    pub bytes: Vec<u8>,
    pub upload: Upload,
    pub reply: Reply,
}

/// Where an inspection's answer goes.
pub enum Reply {
    /// An upload: stored (photo, then row) before the record is sent.
    Stored(oneshot::Sender<Result<InspectionRecord, ApiError>>),
    /// A camera frame (`serve --cameras`): micro-batched with the uploads, answered with the
    /// finding alone (the camera loop stores events, not inspections).
    Finding(oneshot::Sender<Result<Finding, ApiError>>),
}

impl Reply {
    pub fn is_closed(&self) -> bool {
        match self {
            Reply::Stored(tx) => tx.is_closed(),
            Reply::Finding(tx) => tx.is_closed(),
        }
    }

    fn fail(self, error: ApiError) {
        match self {
            Reply::Stored(tx) => drop(tx.send(Err(error))),
            Reply::Finding(tx) => drop(tx.send(Err(error))),
        }
    }
}

/// A free chat turn (OpenAI-compatible endpoint), rendered and tokenized off the worker.
pub struct ChatJob {
    pub prepared: PreparedChat,
    pub max_tokens: usize,
    pub temperature: f64,
    pub seed: u64,
    /// `response_format`'s schema, when it asks for one.
    pub schema: Option<Arc<SchemaGrammar>>,
    pub reply: oneshot::Sender<Result<ChatAnswer, ApiError>>,
}

pub enum Job {
    Inspect(InspectJob),
    Chat(ChatJob),
    /// Holds the worker until the sender is dropped (tests of what must not wait for it).
    #[doc(hidden)]
    Pause(std::sync::mpsc::Receiver<()>),
}

impl Job {
    fn is_abandoned(&self) -> bool {
        match self {
            Job::Inspect(j) => j.reply.is_closed(),
            Job::Chat(j) => j.reply.is_closed(),
            Job::Pause(_) => false,
        }
    }
}

/// What the request threads use of the loaded model: the chat prompter (none with a remote
/// engine), the answer cache's keys and, with a remote engine, a handle to probe it. Published
/// by the worker once the model is loaded.
pub struct Front {
    pub prompter: Option<ChatPrompter>,
    pub cache: AnswerCache,
    pub remote: Option<Arc<RemoteEngine>>,
}

/// What the worker answers with: a model loaded in this process, or a remote engine
/// (`serve --backend openai`).
pub enum Engine {
    Local(Box<Detector>),
    Remote(Box<RemoteEngine>),
}

impl From<Detector> for Engine {
    fn from(d: Detector) -> Engine {
        Engine::Local(Box::new(d))
    }
}

impl From<RemoteEngine> for Engine {
    fn from(r: RemoteEngine) -> Engine {
        Engine::Remote(Box::new(r))
    }
}

impl Engine {
    fn set_citations(&mut self, rules: &[Rule]) {
        match self {
            Engine::Local(d) => d.set_citations(rules),
            Engine::Remote(r) => r.set_citations(rules),
        }
    }

    /// The model and adapter fingerprints stored with each inspection.
    fn fingerprints(&self) -> (&str, Option<&str>) {
        match self {
            Engine::Local(d) => (&d.model_fingerprint, d.adapter_fingerprint.as_deref()),
            Engine::Remote(r) => (&r.model_fingerprint, None),
        }
    }
}

/// Batching settings.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub max_batch: usize,
    pub batch_wait: Duration,
}

/// The rules citations are checked against; replaced when an admin uploads a document.
#[derive(Default)]
pub struct SharedRules {
    /// The rules and their citations' fingerprint (a part of the answer cache key).
    rules: RwLock<(Arc<Vec<Rule>>, Arc<str>)>,
    pub version: AtomicU64,
}

impl SharedRules {
    pub fn set(&self, rules: Vec<Rule>) {
        let fingerprint = citations_fingerprint(&rules);
        *self.rules.write().expect("rules lock") = (Arc::new(rules), fingerprint.into());
        self.version.fetch_add(1, Ordering::SeqCst);
    }

    pub fn get(&self) -> Arc<Vec<Rule>> {
        self.rules.read().expect("rules lock").0.clone()
    }

    /// The rules with their citations' fingerprint, read together.
    pub fn get_with_fingerprint(&self) -> (Arc<Vec<Rule>>, Arc<str>) {
        self.rules.read().expect("rules lock").clone()
    }
}

/// What the worker needs besides its queue.
pub struct WorkerContext {
    pub store: Box<dyn Store>,
    pub use_cache: bool,
    /// Where photos go (the data dir, or object storage).
    pub photos: Arc<inspector_photos::PhotoStore>,
    pub max_pixels: u64,
    pub batch: BatchConfig,
    pub metrics: Arc<Metrics>,
    pub rules: Arc<SharedRules>,
    pub ready: Arc<AtomicBool>,
    pub front: Arc<OnceLock<Front>>,
}

/// Runs the worker until the queue closes: loads the model with `load`, then answers jobs.
pub fn run(
    rx: Receiver<Job>,
    load: impl FnOnce() -> anyhow::Result<Engine>,
    mut ctx: WorkerContext,
    loaded: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let mut engine = match load() {
        Ok(d) => d,
        Err(e) => {
            let _ = loaded.send(Err(format!("{e:#}")));
            return;
        }
    };
    let front = match &mut engine {
        Engine::Local(detector) => {
            detector.model.processor.max_decode_pixels = ctx.max_pixels;
            Front {
                prompter: Some(detector.chat_prompter()),
                cache: detector.answer_cache(),
                remote: None,
            }
        }
        Engine::Remote(remote) => Front {
            prompter: None,
            cache: remote.answer_cache(),
            remote: Some(Arc::new(RemoteEngine::new(remote.config().clone()))),
        },
    };
    let mut rules_version = u64::MAX;
    let mut rules = Arc::new(Vec::new());
    let _ = ctx.front.set(front);
    ctx.ready.store(true, Ordering::SeqCst);
    let _ = loaded.send(Ok(()));
    let mut held: Option<Job> = None;
    loop {
        let job = match held.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => {
                    ctx.metrics.queue_depth.dec();
                    j
                }
                Err(_) => break,
            },
        };
        let version = ctx.rules.version.load(Ordering::SeqCst);
        if version != rules_version {
            rules = ctx.rules.get();
            engine.set_citations(&rules);
            rules_version = version;
        }
        match job {
            Job::Pause(until) => {
                let _ = until.recv();
            }
            Job::Chat(job) => {
                if job.reply.is_closed() {
                    ctx.metrics.cancelled.inc();
                    continue;
                }
                let (prepared, max_tokens, temperature, seed, schema) = (
                    job.prepared,
                    job.max_tokens,
                    job.temperature,
                    job.seed,
                    job.schema,
                );
                let Engine::Local(detector) = &engine else {
                    let _ = job.reply.send(Err(remote_chat()));
                    continue;
                };
                let answer = catch_unwind(AssertUnwindSafe(|| {
                    detector.chat_prepared(
                        prepared,
                        max_tokens,
                        temperature,
                        seed,
                        schema.as_deref(),
                    )
                }))
                .unwrap_or_else(|_| {
                    Err(inspector_detect::Error::Model {
                        path: PathBuf::new(),
                        message: "the model failed on this request".into(),
                    })
                })
                // The photos were decoded when the turn was prepared, off the worker.
                .map_err(|e| match e {
                    inspector_detect::Error::Qwen(inspector_qwen2vl_error) => {
                        ApiError::unprocessable(
                            "invalid_messages",
                            inspector_qwen2vl_error.to_string(),
                        )
                    }
                    e @ inspector_detect::Error::SchemaBudget { .. } => {
                        ApiError::bad_request("invalid_field", e.to_string())
                    }
                    other => ApiError::internal(other.to_string()),
                });
                let _ = job.reply.send(answer);
            }
            Job::Inspect(first) => {
                let mut batch = vec![first];
                let deadline = Instant::now() + ctx.batch.batch_wait;
                while batch.len() < ctx.batch.max_batch {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let next = if left.is_zero() {
                        rx.try_recv().map_err(|_| RecvTimeoutError::Timeout)
                    } else {
                        rx.recv_timeout(left)
                    };
                    match next {
                        Ok(job) => {
                            ctx.metrics.queue_depth.dec();
                            match job {
                                Job::Inspect(j) => batch.push(j),
                                other => {
                                    held = Some(other);
                                    break;
                                }
                            }
                        }
                        Err(_) => break,
                    }
                }
                let before = batch.len();
                batch.retain(|j| !j.reply.is_closed());
                ctx.metrics.cancelled.inc_by((before - batch.len()) as u64);
                if !batch.is_empty() {
                    inspect_batch(&engine, &rules, &mut ctx, batch);
                }
            }
        }
        if held.as_ref().is_some_and(Job::is_abandoned) {
            held = None;
            ctx.metrics.cancelled.inc();
        }
    }
}

/// The chat endpoint's answer when the model is remote: ask the engine itself.
pub fn remote_chat() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_IMPLEMENTED,
        "remote_model",
        "this server inspects through a remote model engine: send chat requests to the engine",
    )
}

/// An inspection's failure as the client gets it (`what`: "image" or "frame").
fn inspect_error(e: inspector_detect::Error, what: &str) -> ApiError {
    use inspector_detect::Error as E;
    match e {
        E::Image { message, .. } => ApiError::unprocessable(
            "corrupt_image",
            format!("the {what} could not be inspected: {message}"),
        ),
        E::Unavailable {
            message,
            retry_after,
        } => ApiError::unavailable(
            "engine_unavailable",
            message,
            retry_after.as_secs_f64().ceil().max(1.0) as u64,
        ),
        E::Remote(message) => {
            ApiError::new(axum::http::StatusCode::BAD_GATEWAY, "engine_error", message)
        }
        e => ApiError::internal(format!("inspection failed: {e}")),
    }
}

fn inspect_batch(
    engine: &Engine,
    rules: &[Rule],
    ctx: &mut WorkerContext,
    mut batch: Vec<InspectJob>,
) {
    ctx.metrics.batch_size.observe(batch.len() as f64);
    let inputs: Vec<Input> = batch
        .iter_mut()
        .map(|j| Input {
            name: j.upload.filename.clone().unwrap_or_else(|| "image".into()),
            bytes: std::mem::take(&mut j.bytes),
        })
        .collect();
    let cache = ctx.use_cache.then_some(ctx.store.as_ref());
    // A panic in the model answers this batch with 500s; the worker goes on.
    let results = match catch_unwind(AssertUnwindSafe(|| match engine {
        Engine::Local(detector) => detector.inspect(&inputs, rules, cache, batch.len(), |_| {}),
        Engine::Remote(remote) => remote.inspect(&inputs, rules, cache),
    })) {
        Ok(results) => results,
        Err(_) => {
            tracing::error!("the model panicked on a batch of {}", batch.len());
            for job in batch {
                job.reply
                    .fail(ApiError::internal("the model failed on this photo"));
            }
            return;
        }
    };
    for ((job, input), result) in batch.into_iter().zip(inputs).zip(results) {
        let tx = match job.reply {
            Reply::Stored(tx) => tx,
            Reply::Finding(tx) => {
                let _ = tx.send(result.map_err(|e| inspect_error(e, "frame")));
                continue;
            }
        };
        let reply = match result {
            Ok(finding) => persist(
                ctx.store.as_mut(),
                &ctx.photos,
                &ctx.metrics,
                &job.upload,
                &input.bytes,
                finding,
                engine.fingerprints(),
            ),
            Err(e) => Err(inspect_error(e, "image")),
        };
        let _ = tx.send(reply);
    }
}

/// A new inspection id: milliseconds then randomness, in hex (time-ordered, unguessable).
pub fn new_id(now_ms: i64) -> String {
    format!("{now_ms:012x}{:016x}", rand::random::<u64>())
}

/// Stores an answered inspection (the photo by content hash, then its row) and counts it;
/// the record is what the client gets.
pub fn persist(
    store: &mut dyn Store,
    photos: &inspector_photos::PhotoStore,
    metrics: &Metrics,
    upload: &Upload,
    bytes: &[u8],
    finding: Finding,
    fingerprints: (&str, Option<&str>),
) -> Result<InspectionRecord, ApiError> {
    let relative = store_photo(photos, upload, bytes, &finding)?;
    record(store, metrics, upload, relative, finding, fingerprints)
}

/// The first half of [`persist`]: the photo, stored durably under a name made from its
/// content hash (a file under the data dir, or an object); returns that name.
pub fn store_photo(
    photos: &inspector_photos::PhotoStore,
    upload: &Upload,
    bytes: &[u8],
    finding: &Finding,
) -> Result<String, ApiError> {
    let relative = images::relative_path(&finding.image.sha256, &upload.probe)?;
    photos
        .put(&relative, bytes)
        .map_err(|e| ApiError::internal(format!("storing the image: {e}")))?;
    Ok(relative)
}

/// The second half of [`persist`]: the inspection's row, once its photo is stored, and the
/// metrics.
pub fn record(
    store: &mut dyn Store,
    metrics: &Metrics,
    upload: &Upload,
    relative: String,
    finding: Finding,
    (model_fingerprint, adapter_fingerprint): (&str, Option<&str>),
) -> Result<InspectionRecord, ApiError> {
    if finding.timings.cached {
        metrics.cache_hits.inc();
    }
    let now = chrono::Utc::now();
    let created_ms = now.timestamp_millis();
    let id = new_id(created_ms);
    let status = match finding.status {
        ReplyStatus::Safe => "safe",
        ReplyStatus::Violation => "violation",
        ReplyStatus::Unparsed => "unparsed",
    }
    .to_string();
    let violations: Vec<InspectionViolation> = finding
        .violations
        .iter()
        .map(|v| InspectionViolation {
            rule_id: v.resolved.as_ref().map(|r| r.id.clone()),
            citation: v.rule.clone(),
            risk: v.risk.map(|r| r.as_str().to_string()),
        })
        .collect();
    let row = NewInspection {
        id: id.clone(),
        created_ms,
        filename: upload.filename.clone(),
        source: upload.source.clone(),
        image_sha256: finding.image.sha256.clone(),
        image_file: relative,
        status: status.clone(),
        finding: serde_json::to_string(&finding).expect("a finding is JSON"),
        model_fingerprint: model_fingerprint.to_string(),
        adapter_fingerprint: adapter_fingerprint.map(str::to_string),
    };
    store.insert_inspection(&row, &violations)?;
    metrics
        .inspections
        .get_or_create(&StatusLabels { status })
        .inc();
    for v in &finding.violations {
        let risk = v.risk.map_or("unknown", Risk::as_str).to_string();
        metrics.violations.get_or_create(&RiskLabels { risk }).inc();
    }
    Ok(InspectionRecord::new(
        id,
        created_ms,
        upload.filename.clone(),
        upload.source.clone(),
        finding,
    ))
}
