//! The Safety Inspector HTTP service (`inspector serve`).
//!
//! One model runs on one worker thread behind a bounded queue ([`worker`]); concurrent
//! inspections are micro-batched. Handlers ([`api`]) check every photo from its header before
//! queueing it (allow-listed formats sniffed from the bytes, a pixel budget, a body limit), and
//! the worker stores each answered inspection (photo by content hash under the data dir, row
//! in SQLite with WAL and full sync) before the reply leaves, so a 2xx answer survives a
//! `kill -9`. SIGTERM stops accepting connections, lets in-flight requests finish and drains
//! the queue. API keys, rate limits, security headers and CORS are in [`auth`] and [`router`].
//!
//! Endpoints: `POST/GET /api/v1/inspections`, `GET /api/v1/inspections/{id}[/image]`,
//! `GET /api/v1/rules[/{id}]`, `POST /api/v1/documents` (admin), the tutorial's `POST /detect`,
//! `POST /api/detect` and `POST /api/upload`, OpenAI-compatible `POST /v1/chat/completions`,
//! `GET /health`, `/ready`, `/metrics`, `/api/openapi.json`, and the web page at `/`.
//!
//! ```no_run
//! use inspector_server::{ServerConfig, Server};
//!
//! # async fn run() -> anyhow::Result<()> {
//! let config = ServerConfig::new("127.0.0.1:8080".parse()?, "inspector.db".into(), "data".into());
//! let load = || inspector_detect::Detector::load(
//!     "models/demo/base".as_ref(), Some("models/demo/adapter".as_ref()),
//!     &inspector_detect::Backend::cpu(), Default::default(),
//! ).map_err(Into::into);
//! let server = Server::start(config, load)?;
//! let listener = tokio::net::TcpListener::bind(server.config().addr).await?;
//! server.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod auth;
pub mod error;
pub mod images;
pub mod metrics;
pub mod record;
pub mod worker;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc::{SyncSender, TrySendError},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use axum::{
    Router,
    extract::{DefaultBodyLimit, MatchedPath, Request, State},
    http::{HeaderName, HeaderValue, Method, header},
    middleware::{self, Next},
    response::Response,
    routing::{get, post},
};
use inspector_detect::Detector;
use inspector_store::{RuleFilter, RuleStore, SqliteStore};
use tokio::sync::oneshot;
use tower_http::{
    cors::CorsLayer, set_header::SetResponseHeaderLayer, timeout::RequestBodyTimeoutLayer,
};
use utoipa::OpenApi;

use crate::{
    auth::Limiter,
    error::ApiError,
    metrics::{Metrics, RequestLabels, RouteLabels},
    worker::{BatchConfig, Job, SharedRules, WorkerContext},
};

/// The model name `/ready` and chat completions report.
pub const MODEL_NAME: &str = "safety-inspector";

/// How long a request body may take to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    pub db: PathBuf,
    pub data_dir: PathBuf,
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
    /// Origins allowed by CORS; empty: CORS off.
    pub cors_origins: Vec<String>,
}

impl ServerConfig {
    /// The defaults for an address: keys required off loopback.
    pub fn new(addr: SocketAddr, db: PathBuf, data_dir: PathBuf) -> Self {
        ServerConfig {
            require_keys: !addr.ip().is_loopback(),
            addr,
            db,
            data_dir,
            max_body: 48 << 20,
            max_pixels: inspector_imaging::DEFAULT_MAX_DECODE_PIXELS,
            queue: 64,
            batch: BatchConfig {
                max_batch: 8,
                batch_wait: Duration::from_millis(10),
            },
            request_timeout: api::DEFAULT_TIMEOUT,
            rate_per_minute: 600,
            cache: true,
            cors_origins: Vec::new(),
        }
    }
}

/// What every handler shares.
pub struct Inner {
    pub config: ServerConfig,
    /// Reads (and the rare admin write); the worker writes inspections on its own connection.
    pub reader: Mutex<SqliteStore>,
    queue: Mutex<Option<SyncSender<Job>>>,
    pub metrics: Arc<Metrics>,
    pub limiter: Limiter,
    pub rules: Arc<SharedRules>,
    ready: Arc<AtomicBool>,
    /// Drawing boxes decodes a whole photo (up to 100 MP): two at a time.
    pub drawing: tokio::sync::Semaphore,
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
        f: impl FnOnce(&SqliteStore) -> inspector_store::Result<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner.reader.lock().expect("reader lock")))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(ApiError::from)
    }

    /// Runs a write on the handlers' connection off the async threads.
    pub async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut SqliteStore) -> inspector_store::Result<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&mut inner.reader.lock().expect("reader lock")))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(ApiError::from)
    }
}

/// The OpenAPI document, generated from the handlers' annotations and types.
#[derive(OpenApi)]
#[openapi(
    info(title = "Safety Inspector", description = "Inspects site photos against the plant's safety regulations."),
    paths(
        api::create_inspection, api::list_inspections, api::get_inspection, api::get_image,
        api::list_rules, api::get_rule, api::upload_document,
        api::tutorial_detect, api::tutorial_api_detect, api::tutorial_upload,
        api::chat_completions, api::health, api::ready, api::metrics,
    ),
    components(schemas(error::ErrorBody, record::InspectionRecord, record::InspectionPage,
        api::RuleView, api::RuleList, api::DocumentUploaded, api::InspectJson, api::InspectOptions)),
    modifiers(&BearerAuth),
    security(("api_key" = [])),
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_default()
            .add_security_scheme(
                "api_key",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

async fn openapi_json() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

/// Counts requests and their latency by route pattern.
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    // A fixed set: invented methods must not create series.
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
    .to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let m = &state.inner.metrics;
    m.requests
        .get_or_create(&RequestLabels {
            method,
            route: route.clone(),
            status: response.status().as_u16(),
        })
        .inc();
    m.latency
        .get_or_create(&RouteLabels { route })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The router with every endpoint and layer.
pub fn router(state: AppState) -> Router {
    let config = &state.inner.config;
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
    let mut app = Router::new()
        .route("/", get(api::index))
        .route(
            "/api/v1/inspections",
            post(api::create_inspection).get(api::list_inspections),
        )
        .route("/api/v1/inspections/{id}", get(api::get_inspection))
        .route("/api/v1/inspections/{id}/image", get(api::get_image))
        .route("/api/v1/rules", get(api::list_rules))
        .route("/api/v1/rules/{id}", get(api::get_rule))
        .route("/api/v1/documents", post(api::upload_document))
        .route("/detect", post(api::tutorial_detect))
        .route("/api/detect", post(api::tutorial_api_detect))
        .route("/api/upload", post(api::tutorial_upload))
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/health", get(api::health))
        .route("/ready", get(api::ready))
        .route("/metrics", get(api::metrics))
        .route("/api/openapi.json", get(openapi_json))
        .fallback(api::not_found)
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not allowed on {}", req.method(), req.uri().path()),
            )
        })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .layer(DefaultBodyLimit::max(config.max_body))
        // A client that trickles its body cannot hold a connection (and a shutdown) forever.
        .layer(RequestBodyTimeoutLayer::new(BODY_TIMEOUT));
    for (name, value) in security_headers {
        app = app.layer(SetResponseHeaderLayer::overriding(
            name,
            HeaderValue::from_static(value),
        ));
    }
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
    app.layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
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
    pub fn start(
        config: ServerConfig,
        load: impl FnOnce() -> anyhow::Result<Detector> + Send + 'static,
    ) -> anyhow::Result<Server> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating the data dir {}", config.data_dir.display()))?;
        anyhow::ensure!(config.queue >= 1, "the queue must hold at least one job");
        anyhow::ensure!(
            config.batch.max_batch >= 1,
            "the batch size must be at least 1"
        );
        let reader = SqliteStore::open(&config.db)?;
        reader.enable_wal()?;
        let writer = SqliteStore::open(&config.db)?;
        writer.enable_wal()?;
        let rules = Arc::new(SharedRules::default());
        rules.set(reader.rules(&RuleFilter::default())?);
        let metrics = Arc::new(Metrics::new());
        let ready = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue);
        let (loaded_tx, loaded) = std::sync::mpsc::channel();
        let ctx = WorkerContext {
            store: writer,
            use_cache: config.cache,
            data_dir: config.data_dir.clone(),
            max_pixels: config.max_pixels,
            batch: config.batch,
            metrics: metrics.clone(),
            rules: rules.clone(),
            ready: ready.clone(),
        };
        let worker = std::thread::Builder::new()
            .name("inspector-model".into())
            .spawn(move || worker::run(rx, load, ctx, loaded_tx))
            .context("starting the model worker")?;
        let state = AppState {
            inner: Arc::new(Inner {
                limiter: Limiter::new(config.rate_per_minute),
                drawing: tokio::sync::Semaphore::new(2),
                config,
                reader: Mutex::new(reader),
                queue: Mutex::new(Some(tx)),
                metrics,
                rules,
                ready,
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
    /// requests finish, drains the queue and stops the worker. Fails when the model fails to
    /// load.
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
        let stopping = Arc::new(tokio::sync::Notify::new());
        let load_error = Arc::new(Mutex::new(None));
        let (load_error2, stopping2) = (load_error.clone(), stopping.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown => {}
                Ok(e) = failed_rx => { *load_error2.lock().expect("lock") = Some(e); }
            }
            stopping2.notify_one();
            let _ = stop_tx.send(());
        });
        let serving = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = stop_rx.await;
        });
        // Requests in flight get their full timeout (and a body its own) to finish; a client
        // that holds its connection longer does not hold the shutdown.
        let grace = state.inner.config.request_timeout + BODY_TIMEOUT;
        tokio::select! {
            served = serving => served.context("serving")?,
            _ = async { stopping.notified().await; tokio::time::sleep(grace).await } => {
                tracing::warn!("connections still open {} s after shutdown began; closing", grace.as_secs());
            }
        }
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
