//! The Safety Inspector HTTP service (`inspector serve`).
//!
//! One model runs on one worker thread behind a bounded queue ([`worker`]); concurrent
//! inspections are micro-batched. Handlers check every photo from its header before queueing it
//! (allow-listed formats sniffed from the bytes, a pixel budget, a body limit); a photo already
//! answered is answered from the cache on the request's own thread ([`inspect`]), and chat
//! prompts are bounded and tokenized there too, so only model work waits for the worker. Every
//! answered inspection is stored (photo by content hash under the data dir, row in SQLite with
//! WAL and full sync) before the reply leaves, so a 2xx answer survives a `kill -9`.
//!
//! The HTTP layer: one module per resource under [`routes`], each with its own router, the
//! OpenAPI document assembled from the same routers, authentication ([`auth`]) a layer on the
//! protected ones; [`guard`] (limits, Host and Origin checks, the access log) in front of all;
//! our own accept loop ([`http`]) with a header-read timeout, a connection cap and a shutdown
//! deadline. SIGTERM stops accepting connections, lets in-flight requests finish within the
//! grace and drains the queue.
//!
//! Endpoints: `POST/GET /api/v1/inspections`, `GET /api/v1/inspections/{id}[/image]`,
//! `GET /api/v1/rules[/{id}]`, `POST /api/v1/documents` (admin), the tutorial's `POST /detect`,
//! `POST /api/detect` and `POST /api/upload`, OpenAI-compatible `POST /v1/chat/completions` and
//! `GET /v1/models`, `GET /health`, `/ready`, `/metrics`, `/api/openapi.json`, and the web page
//! at `/`.
//!
//! ```no_run
//! use inspector_server::{ServerConfig, Server};
//!
//! # async fn run() -> anyhow::Result<()> {
//! let config = ServerConfig::new("127.0.0.1:8080".parse()?, "inspector.db", "data".into());
//! let load = || inspector_detect::Detector::load(
//!     "models/demo/base".as_ref(), Some("models/demo/adapter".as_ref()),
//!     &inspector_detect::Backend::cpu(), Default::default(),
//! ).map_err(Into::into);
//! let server = Server::start(config, load)?;
//! let listener = tokio::net::TcpListener::bind(server.config().addr).await?;
//! server.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

pub mod auth;
pub mod error;
pub mod guard;
pub mod http;
pub mod images;
pub mod inspect;
pub mod metrics;
pub mod record;
pub mod routes;
pub mod worker;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
        mpsc::{SyncSender, TrySendError},
    },
    time::Duration,
};

use anyhow::Context;
use axum::{
    Router,
    extract::{DefaultBodyLimit, Request},
    http::{HeaderName, HeaderValue, Method, header},
    middleware,
};
use inspector_store::{RuleFilter, Store};
use tokio::sync::oneshot;
use tower_http::{
    catch_panic::CatchPanicLayer, cors::CorsLayer, set_header::SetResponseHeaderLayer,
    timeout::RequestBodyTimeoutLayer,
};

use crate::{
    auth::{AuthFailures, Limiter},
    error::ApiError,
    metrics::Metrics,
    worker::{BatchConfig, Front, Job, SharedRules, WorkerContext},
};

/// The model name `/ready` and chat completions report.
pub const MODEL_NAME: &str = "safety-inspector";

/// How long a request may wait for its answer by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a request body may take to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    /// The database: a SQLite file, or a `postgres://` URL (see [`inspector_store::open`]).
    pub db: String,
    pub data_dir: PathBuf,
    /// Where photos are kept: `None` for the data dir, else a folder or `s3://BUCKET[/PREFIX]`
    /// ([`inspector_photos::PhotoStore::open`]).
    pub photo_store: Option<String>,
    /// Refuse requests without a key (always true off loopback).
    pub require_keys: bool,
    /// Largest request body, bytes (48 MiB: a 50-megapixel photo in base64 fits).
    pub max_body: usize,
    /// Largest photo, pixels (from the header, before decoding). Smaller photos are downscaled
    /// by the processor.
    pub max_pixels: u64,
    /// Jobs waiting for the model before requests get 503.
    pub queue: usize,
    pub batch: BatchConfig,
    /// How long a request may wait for its answer.
    pub request_timeout: Duration,
    /// Requests per minute per key (anonymous: per address); 0: no limit.
    pub rate_per_minute: u32,
    /// Answer repeated photos from the answer cache.
    pub cache: bool,
    /// Origins allowed by CORS (and to send state-changing requests); empty: CORS off.
    pub cors_origins: Vec<String>,
    /// Host names a keyless server answers to besides 127.0.0.1, localhost and [::1].
    pub allowed_hosts: Vec<String>,
    /// Longest chat prompt, in tokens (its text is also bounded by bytes before tokenizing).
    pub max_prompt_tokens: usize,
    /// How long a client may take to send a request's headers (and an idle keep-alive
    /// connection may wait for its next request).
    pub header_timeout: Duration,
    /// Open connections at most; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// How long a shutdown waits for requests in flight before closing every connection.
    pub shutdown_grace: Duration,
    /// Load balancers whose `X-Forwarded-For` names the client (for the per-address limits);
    /// from any other peer the header is ignored.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

impl ServerConfig {
    /// The defaults for an address: keys required off loopback.
    pub fn new(addr: SocketAddr, db: impl AsRef<std::path::Path>, data_dir: PathBuf) -> Self {
        ServerConfig {
            require_keys: !addr.ip().is_loopback(),
            addr,
            db: db.as_ref().to_string_lossy().into_owned(),
            data_dir,
            photo_store: None,
            max_body: 48 << 20,
            max_pixels: inspector_imaging::DEFAULT_MAX_DECODE_PIXELS,
            queue: 64,
            batch: BatchConfig {
                max_batch: 8,
                batch_wait: Duration::from_millis(10),
            },
            request_timeout: DEFAULT_TIMEOUT,
            rate_per_minute: 600,
            cache: true,
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            max_prompt_tokens: 8192,
            header_timeout: Duration::from_secs(10),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(20),
            trusted_proxies: Vec::new(),
        }
    }
}

/// What every handler shares.
pub struct Inner {
    pub config: ServerConfig,
    /// Where photos and camera frames are kept.
    pub photos: Arc<inspector_photos::PhotoStore>,
    /// Reads (and the rare admin write); the worker writes inspections on its own connection.
    pub reader: Mutex<Box<dyn Store>>,
    queue: Mutex<Option<SyncSender<Job>>>,
    pub metrics: Arc<Metrics>,
    pub limiter: Limiter,
    pub rules: Arc<SharedRules>,
    ready: Arc<AtomicBool>,
    /// Drawing boxes decodes a whole photo (up to 100 MP): two at a time.
    pub drawing: tokio::sync::Semaphore,
    /// The loaded model's prompter and cache keys (set once the model is loaded).
    pub front: Arc<OnceLock<Front>>,
    pub auth_failures: AuthFailures,
    /// The OpenAPI document of the routes served (set by [`router`]).
    pub openapi: OnceLock<Arc<utoipa::openapi::OpenApi>>,
    /// The cameras this server watches (`serve --cameras`), as their loop last published them.
    pub cameras: std::sync::RwLock<Vec<routes::cameras::CameraView>>,
    /// Set when shutdown begins: endless responses (the event stream) end, so that they do
    /// not hold the shutdown for its whole grace.
    pub stopping: AtomicBool,
}

/// The handlers' state.
#[derive(Clone)]
pub struct AppState {
    pub inner: Arc<Inner>,
}

impl AppState {
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::SeqCst)
    }

    /// Marks the model as loaded without waiting for the worker (tests of the queue use a
    /// worker whose model load is held back).
    #[doc(hidden)]
    pub fn mark_ready_for_tests(&self) {
        self.inner.ready.store(true, Ordering::SeqCst);
    }

    /// Holds the model worker (after what is queued) until the returned sender is dropped:
    /// tests of what must not wait for the worker.
    #[doc(hidden)]
    pub fn pause_worker_for_tests(&self) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let queue = self.inner.queue.lock().expect("queue lock");
        self.inner.metrics.queue_depth.inc();
        queue
            .as_ref()
            .expect("the server is running")
            .send(Job::Pause(rx))
            .expect("the worker is running");
        tx
    }

    /// The loaded model's request-side parts, or 503 while it loads.
    pub fn front(&self) -> Result<&Front, ApiError> {
        self.inner.front.get().ok_or_else(|| {
            ApiError::unavailable("not_ready", "the model is loading; try again shortly", 5)
        })
    }

    /// Inspects a camera frame through the same queue and micro-batches as uploads, storing
    /// nothing (`serve --cameras`): the finding, or why not (503 when the queue is full: the
    /// camera loop drops the frame and counts it).
    pub async fn inspect_frame(
        &self,
        bytes: Vec<u8>,
    ) -> Result<inspector_detect::Finding, ApiError> {
        let probe = images::probe(&bytes, self.inner.config.max_pixels)?;
        let (tx, rx) = oneshot::channel();
        self.enqueue(Job::Inspect(worker::InspectJob {
            bytes,
            upload: worker::Upload {
                filename: None,
                source: None,
                probe,
            },
            reply: worker::Reply::Finding(tx),
        }))?;
        self.wait(rx).await
    }

    /// Publishes the cameras' state (the camera loop calls it after every round).
    pub fn set_cameras(&self, cameras: Vec<routes::cameras::CameraView>) {
        let m = &self.inner.metrics.cameras;
        for c in &cameras {
            let camera = || metrics::CameraLabels {
                camera: c.name.clone(),
            };
            for (kind, n) in [
                ("read", c.frames_read),
                ("inspected", c.frames_inspected),
                ("repeated", c.frames_repeated),
                ("dropped", c.frames_dropped),
            ] {
                m.frames
                    .get_or_create(&metrics::CameraFrameLabels {
                        camera: c.name.clone(),
                        kind: kind.into(),
                    })
                    .set(n as i64);
            }
            m.events.get_or_create(&camera()).set(c.events as i64);
            m.reconnects
                .get_or_create(&camera())
                .set(c.reconnects as i64);
            m.up.get_or_create(&camera())
                .set(i64::from(c.status == "up"));
            for (quantile, value) in [("0.5", c.latency_p50_s), ("0.99", c.latency_p99_s)] {
                if let Some(v) = value {
                    m.latency
                        .get_or_create(&metrics::CameraQuantileLabels {
                            camera: c.name.clone(),
                            quantile: quantile.into(),
                        })
                        .set(v);
                }
            }
        }
        *self
            .inner
            .cameras
            .write()
            .unwrap_or_else(|p| p.into_inner()) = cameras;
    }

    /// Queues a job, or answers 503 (queue full, model loading, shutting down).
    pub fn enqueue(&self, job: Job) -> Result<(), ApiError> {
        if !self.is_ready() {
            return Err(ApiError::unavailable(
                "not_ready",
                "the model is loading; try again shortly",
                5,
            ));
        }
        let queue = self.inner.queue.lock().expect("queue lock");
        let Some(sender) = queue.as_ref() else {
            return Err(ApiError::unavailable(
                "shutting_down",
                "the server is shutting down",
                5,
            ));
        };
        // Counted before sending, so the worker's decrement never runs ahead of it.
        self.inner.metrics.queue_depth.inc();
        match sender.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.inner.metrics.queue_depth.dec();
                match e {
                    TrySendError::Full(_) => {
                        self.inner.metrics.queue_full.inc();
                        Err(ApiError::unavailable(
                            "queue_full",
                            "the inspection queue is full; try again shortly",
                            1,
                        ))
                    }
                    TrySendError::Disconnected(_) => Err(ApiError::unavailable(
                        "shutting_down",
                        "the model worker has stopped",
                        5,
                    )),
                }
            }
        }
    }

    /// Waits for a job's answer, at most the request timeout (the job is then dropped unrun
    /// if it has not started).
    pub async fn wait<T>(&self, rx: oneshot::Receiver<Result<T, ApiError>>) -> Result<T, ApiError> {
        match tokio::time::timeout(self.inner.config.request_timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(ApiError::internal("the model worker stopped")),
            Err(_) => Err(ApiError::new(
                axum::http::StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "no answer within {} s",
                    self.inner.config.request_timeout.as_secs()
                ),
            )),
        }
    }

    /// Runs a read on the database off the async threads.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> inspector_store::Result<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(inner.reader.lock().expect("reader lock").as_ref()))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(ApiError::from)
    }

    /// Runs a write on the handlers' connection off the async threads.
    pub async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Store) -> inspector_store::Result<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(inner.reader.lock().expect("reader lock").as_mut()))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(ApiError::from)
    }
}

/// Reloads the rules whenever the store's rules version moves (a document replaced through
/// another replica sharing the database, or `inspector rules extract`), checking twice a second
/// on a connection of its own, and forgets request counts of past minutes once a minute; ends
/// when the server is gone.
fn watch_rules(store: Box<dyn Store>, rules: Arc<SharedRules>) -> anyhow::Result<()> {
    let mut seen = store.rules_version()?;
    std::thread::Builder::new()
        .name("inspector-rules".into())
        .spawn(move || {
            let mut pruned = std::time::Instant::now();
            while Arc::strong_count(&rules) > 1 {
                std::thread::sleep(Duration::from_millis(500));
                if pruned.elapsed() >= Duration::from_secs(60) {
                    pruned = std::time::Instant::now();
                    let (minute, _) = auth::minute_now();
                    if let Err(e) = store.prune_hits(minute - 1) {
                        tracing::warn!("forgetting old request counts: {e}");
                    }
                }
                match store.rules_version() {
                    Ok(v) if v != seen => match store.rules(&RuleFilter::default()) {
                        Ok(current) => {
                            rules.set(current);
                            seen = v;
                        }
                        Err(e) => tracing::warn!("reloading the rules: {e}"),
                    },
                    Ok(_) => {}
                    Err(e) => tracing::warn!("reading the rules' version: {e}"),
                }
            }
        })
        .context("starting the rules watcher")?;
    Ok(())
}

/// The router with every endpoint and layer.
pub fn router(state: AppState) -> Router {
    let config = &state.inner.config;
    let (routes, doc) = routes::assemble(&state);
    let _ = state.inner.openapi.set(Arc::new(doc));
    let security_headers = [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; \
             script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
        ),
        (
            HeaderName::from_static("cross-origin-resource-policy"),
            "same-origin",
        ),
    ];
    let mut app = routes
        .fallback(|req: Request| async move {
            ApiError::not_found(format!("no endpoint at {}", req.uri().path()))
        })
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not allowed on {}", req.method(), req.uri().path()),
            )
        })
        // A handler that panics answers the JSON 500 (logged); the guard and the headers
        // around it still apply.
        .layer(CatchPanicLayer::custom(guard::panic_response))
        .layer(DefaultBodyLimit::max(config.max_body))
        // A client that trickles its body cannot hold a connection (and a shutdown) forever.
        .layer(RequestBodyTimeoutLayer::new(BODY_TIMEOUT))
        .layer(middleware::from_fn_with_state(state.clone(), guard::guard));
    if !config.cors_origins.is_empty() {
        let origins: Vec<HeaderValue> = config
            .cors_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    HeaderName::from_static("x-api-key"),
                ]),
        );
    }
    for (name, value) in security_headers {
        app = app.layer(SetResponseHeaderLayer::overriding(
            name,
            HeaderValue::from_static(value),
        ));
    }
    app.layer(middleware::from_fn_with_state(state.clone(), guard::track))
        .with_state(state)
}

/// Temp files older than this under the data dir are left over from a killed process.
const STALE_TEMP: Duration = Duration::from_secs(3600);

/// Removes the temp files (`.tmp…`) that a killed process left under `dir`, when older than
/// an hour: a younger one may belong to a replica sharing the folder. Returns how many.
pub fn sweep_temp_files(dir: &Path) -> usize {
    let mut removed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file()
                && entry.file_name().to_string_lossy().starts_with(".tmp")
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_TEMP)
            {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::warn!("removing {}: {e}", entry.path().display()),
                }
            }
        }
    }
    removed
}

/// A started server: the state, and the worker loading or running the model.
pub struct Server {
    state: AppState,
    worker: std::thread::JoinHandle<()>,
    loaded: std::sync::mpsc::Receiver<Result<(), String>>,
}

impl Server {
    /// Opens the database and data dir and starts the worker, which loads the model with
    /// `load` (the server answers `/health` meanwhile; `/ready` says when it is done).
    pub fn start<E: Into<worker::Engine>>(
        config: ServerConfig,
        load: impl FnOnce() -> anyhow::Result<E> + Send + 'static,
    ) -> anyhow::Result<Server> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating the data dir {}", config.data_dir.display()))?;
        anyhow::ensure!(config.queue >= 1, "the queue must hold at least one job");
        anyhow::ensure!(
            config.batch.max_batch >= 1,
            "the batch size must be at least 1"
        );
        let swept = sweep_temp_files(&config.data_dir);
        if swept > 0 {
            tracing::warn!(
                "removed {swept} temp files older than an hour from {} (left by a killed process)",
                config.data_dir.display()
            );
        }
        let photos = Arc::new(match &config.photo_store {
            Some(spec) => inspector_photos::PhotoStore::open(spec)?,
            None => inspector_photos::PhotoStore::folder(&config.data_dir),
        });
        let reader = inspector_store::open(&config.db)?;
        reader.enable_wal()?;
        let writer = inspector_store::open(&config.db)?;
        writer.enable_wal()?;
        let rules = Arc::new(SharedRules::default());
        rules.set(reader.rules(&RuleFilter::default())?);
        watch_rules(inspector_store::open(&config.db)?, rules.clone())?;
        let metrics = Arc::new(Metrics::new());
        let ready = Arc::new(AtomicBool::new(false));
        let front = Arc::new(OnceLock::new());
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue);
        let (loaded_tx, loaded) = std::sync::mpsc::channel();
        let ctx = WorkerContext {
            store: writer,
            use_cache: config.cache,
            photos: photos.clone(),
            max_pixels: config.max_pixels,
            batch: config.batch,
            metrics: metrics.clone(),
            rules: rules.clone(),
            ready: ready.clone(),
            front: front.clone(),
        };
        let worker = std::thread::Builder::new()
            .name("inspector-model".into())
            .spawn(move || worker::run(rx, || load().map(Into::into), ctx, loaded_tx))
            .context("starting the model worker")?;
        let shared_db = inspector_store::is_server_url(&config.db);
        let state = AppState {
            inner: Arc::new(Inner {
                // Replicas sharing a database share their limits through it.
                limiter: if shared_db {
                    Limiter::shared(config.rate_per_minute)
                } else {
                    Limiter::new(config.rate_per_minute)
                },
                drawing: tokio::sync::Semaphore::new(2),
                photos,
                config,
                reader: Mutex::new(reader),
                queue: Mutex::new(Some(tx)),
                metrics,
                rules,
                ready,
                front,
                auth_failures: if shared_db {
                    AuthFailures::shared()
                } else {
                    AuthFailures::default()
                },
                openapi: OnceLock::new(),
                cameras: std::sync::RwLock::new(Vec::new()),
                stopping: AtomicBool::new(false),
            }),
        };
        Ok(Server {
            state,
            worker,
            loaded,
        })
    }

    pub fn config(&self) -> &ServerConfig {
        &self.state.inner.config
    }

    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Blocks until the model is loaded (or failed to load).
    pub fn wait_until_loaded(&self) -> anyhow::Result<()> {
        match self.loaded.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("loading the model: {e}")),
            Err(_) => Err(anyhow::anyhow!("the model worker stopped")),
        }
    }

    /// Serves until `shutdown` resolves, then stops accepting connections, lets in-flight
    /// requests finish within the shutdown grace, drains the queue and stops the worker. Fails
    /// when the model fails to load.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Server {
            state,
            worker,
            loaded,
        } = self;
        let local = listener
            .local_addr()
            .context("reading the listening address")?;
        anyhow::ensure!(
            state.inner.config.require_keys || local.ip().is_loopback(),
            "{local} is not a loopback address: API keys must be required"
        );
        let app = router(state.clone());
        // A model that fails to load stops the server.
        let (failed_tx, failed_rx) = oneshot::channel::<String>();
        std::thread::spawn(move || {
            if let Ok(Err(e)) = loaded.recv() {
                let _ = failed_tx.send(e);
            }
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let load_error = Arc::new(Mutex::new(None));
        let load_error2 = load_error.clone();
        let stopping = state.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown => {}
                Ok(e) = failed_rx => { *load_error2.lock().expect("lock") = Some(e); }
            }
            stopping.inner.stopping.store(true, Ordering::SeqCst);
            let _ = stop_tx.send(());
        });
        let config = &state.inner.config;
        let transport = http::Transport {
            header_timeout: config.header_timeout,
            max_connections: config.max_connections,
            shutdown_grace: config.shutdown_grace,
        };
        http::serve(listener, app, transport, async {
            let _ = stop_rx.await;
        })
        .await;
        // Every connection has finished: close the queue and let the worker drain it.
        state.inner.queue.lock().expect("queue lock").take();
        tokio::task::spawn_blocking(move || worker.join())
            .await
            .context("joining the model worker")?
            .map_err(|_| anyhow::anyhow!("the model worker panicked"))?;
        if let Some(e) = load_error.lock().expect("lock").take() {
            anyhow::bail!("loading the model: {e}");
        }
        Ok(())
    }
}
