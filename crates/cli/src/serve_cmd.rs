//! `inspector serve` and `inspector keys`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use clap::{Args, Subcommand};
use inspector_detect::{
    DetectConfig,
    remote::{RemoteConfig, RemoteEngine, redact},
};
use inspector_server::{Server, ServerConfig, worker::BatchConfig};

use crate::{
    detect_cmd::load_detector,
    model_args::ModelArgs,
    model_cmd::PromptArg,
    rules_cmd::{DbArgs, open, open_with_rules},
};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on. Off loopback, every request needs an API key.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "HOST:PORT")]
    pub addr: SocketAddr,
    #[command(flatten)]
    pub db: DbArgs,
    /// Where photos are stored (by content hash), unless --photo-store names another place.
    #[arg(long, default_value = "data", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Keep photos and camera frames here instead: a folder the replicas share, or
    /// S3-compatible object storage, `s3://BUCKET[/PREFIX]` (endpoint, region and credentials
    /// from AWS_ENDPOINT, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; AWS_ALLOW_HTTP=true
    /// for a plain-HTTP endpoint).
    #[arg(long, value_name = "DIR|URL")]
    pub photo_store: Option<String>,
    /// Require API keys on loopback too.
    #[arg(long)]
    pub require_keys: bool,
    /// Largest request body in MiB.
    #[arg(long, default_value_t = 48, value_name = "MIB")]
    pub max_body_mib: usize,
    /// Largest photo in megapixels (read from the header; larger ones are refused).
    #[arg(long, default_value_t = 100.0, value_name = "MP")]
    pub max_megapixels: f64,
    /// Jobs that may wait for the model; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub queue: usize,
    /// Photos per model batch (micro-batching of concurrent requests).
    #[arg(long, default_value_t = 8, value_name = "B")]
    pub max_batch: usize,
    /// How long the worker waits for more photos to fill a batch, ms.
    #[arg(long, default_value_t = 10, value_name = "MS")]
    pub batch_wait_ms: u64,
    /// How long a request may wait for its answer, s.
    #[arg(long, default_value_t = 120, value_name = "S")]
    pub timeout_s: u64,
    /// Requests per minute per API key (anonymous: per address); 0 turns limits off.
    #[arg(long, default_value_t = 600, value_name = "N")]
    pub rate_limit: u32,
    /// A load balancer (nginx, …) in front: its `X-Forwarded-For` names the client for the
    /// per-address limits. Repeatable; from other peers the header is ignored.
    #[arg(long, value_name = "IP")]
    pub trusted_proxy: Vec<std::net::IpAddr>,
    /// Do not answer repeated photos from the answer cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Allow this origin by CORS, and to send state-changing requests (repeatable); CORS is
    /// off without it.
    #[arg(long, value_name = "URL")]
    pub cors_origin: Vec<String>,
    /// Answer keyless requests for this host name too (repeatable); without keys only
    /// 127.0.0.1, localhost and [::1] are answered, against DNS rebinding.
    #[arg(long, value_name = "NAME")]
    pub allowed_host: Vec<String>,
    /// Longest chat prompt in tokens; its text is also refused beyond 16 bytes a token.
    #[arg(long, default_value_t = 8192, value_name = "N")]
    pub max_prompt_tokens: usize,
    /// How long a client may take to send a request's headers, s (also how long an idle
    /// keep-alive connection stays open).
    #[arg(long, default_value_t = 10, value_name = "S")]
    pub header_timeout_s: u64,
    /// Open connections at most; more wait in the kernel's backlog.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_connections: usize,
    /// How long SIGTERM waits for requests in flight before closing every connection, s.
    #[arg(long, default_value_t = 20, value_name = "S")]
    pub shutdown_grace: u64,
    /// The log's format on stderr: `text`, or `json` (one object a line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Largest answer, in tokens.
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub max_new_tokens: usize,
    /// Watch the cameras of this file (as `inspector watch --config` does) inside the server:
    /// their frames go through the same queue and micro-batches as uploads, their events are
    /// stored in the database and `--data-dir`, and the page's 告警 tab shows each camera's
    /// latest frame and status (`GET /api/v1/cameras`).
    #[arg(long, value_name = "FILE")]
    pub cameras: Option<PathBuf>,
    /// With --cameras: POST every event to URL (repeatable; see `inspector watch --webhook`).
    #[arg(long, value_name = "URL", requires = "cameras")]
    pub webhook: Vec<String>,
    /// With --cameras: the change gate's threshold (see `inspector watch`).
    #[arg(long, default_value_t = 2.0, value_name = "LEVELS")]
    pub change_threshold: f64,
    /// Where the model runs: `local` (in this process, from --model) or `openai`: an engine that
    /// speaks OpenAI's chat API (vLLM, SGLang or TGI serving the merged fine-tuned model, or
    /// another `inspector serve`). With `openai`, photos go to the engine with the answer's JSON
    /// schema; this server still checks citations, caches, stores and reports.
    #[arg(long, value_enum, default_value_t = BackendKind::Local)]
    pub backend: BackendKind,
    /// With --backend openai: the API base, `/v1` included (e.g. http://gpu-1:8000/v1).
    #[arg(long, value_name = "URL", required_if_eq("backend", "openai"))]
    pub backend_url: Option<String>,
    /// With --backend openai: the model name the engine serves.
    #[arg(long, value_name = "NAME", required_if_eq("backend", "openai"))]
    pub backend_model: Option<String>,
    /// With --backend openai: the environment variable holding the engine's API key (never the
    /// key itself on the command line); a variable that is not set stops the server at start.
    #[arg(long, value_name = "VAR")]
    pub backend_key_env: Option<String>,
    /// With --backend openai: the instruction the engine's model was fine-tuned with.
    #[arg(long, value_enum, default_value_t = PromptArg::Full)]
    pub backend_prompt: PromptArg,
    /// With --backend openai: the longest wait for one answer from the engine.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    pub backend_timeout_s: u64,
}

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Local,
    Openai,
}

/// The remote engine `--backend openai` names, checked: an http(s) URL, and the key's variable
/// set when one is named.
fn remote_engine(args: &ServeArgs) -> anyhow::Result<Option<RemoteConfig>> {
    if args.backend == BackendKind::Local {
        anyhow::ensure!(
            args.backend_url.is_none()
                && args.backend_model.is_none()
                && args.backend_key_env.is_none(),
            "--backend-url, --backend-model and --backend-key-env go with --backend openai"
        );
        return Ok(None);
    }
    anyhow::ensure!(
        args.model.model.is_none() && args.model.adapter.is_none(),
        "--backend openai: the model is the engine's; --model and --adapter are not used"
    );
    let url = args.backend_url.as_deref().unwrap_or_default();
    anyhow::ensure!(
        url.starts_with("http://") || url.starts_with("https://"),
        "--backend-url {}: must be an http:// or https:// URL (the API base, /v1 included)",
        redact(url)
    );
    anyhow::ensure!(
        args.backend_timeout_s >= 1,
        "--backend-timeout-s must be at least 1"
    );
    let mut config = RemoteConfig::new(
        url,
        args.backend_model.as_deref().unwrap_or_default(),
        args.backend_prompt.into(),
    );
    config.max_tokens = args.max_new_tokens;
    config.timeout = Duration::from_secs(args.backend_timeout_s);
    if let Some(var) = &args.backend_key_env {
        let key = std::env::var(var).map_err(|_| {
            anyhow::anyhow!("--backend-key-env {var}: the environment variable is not set")
        })?;
        anyhow::ensure!(
            !key.trim().is_empty(),
            "--backend-key-env {var}: the variable is empty"
        );
        config.api_key = Some(key.trim().to_string());
    }
    Ok(Some(config))
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.max_batch >= 1, "--max-batch must be at least 1");
    anyhow::ensure!(
        args.max_prompt_tokens >= 1,
        "--max-prompt-tokens must be at least 1"
    );
    anyhow::ensure!(
        args.header_timeout_s >= 1,
        "--header-timeout-s must be at least 1"
    );
    anyhow::ensure!(
        args.max_connections >= 1,
        "--max-connections must be at least 1"
    );
    anyhow::ensure!(args.queue >= 1, "--queue must be at least 1");
    anyhow::ensure!(
        args.max_megapixels > 0.0,
        "--max-megapixels must be positive"
    );
    anyhow::ensure!(args.timeout_s >= 1, "--timeout-s must be at least 1");
    let remote = remote_engine(&args)?;
    // The bundled example regulations on a fresh database, as `detect` does.
    let store = open_with_rules(&args.db.db)?;
    // The cameras file is checked as a whole before anything starts.
    let cameras = match &args.cameras {
        Some(file) => {
            let rules = inspector_store::RuleStore::rules(
                store.as_ref(),
                &inspector_store::RuleFilter::default(),
            )?;
            let cameras = crate::watch_cmd::read_cameras(file, &rules)?;
            crate::watch_cmd::check_sources(&cameras)?;
            anyhow::ensure!(
                args.change_threshold.is_finite() && args.change_threshold >= 0.0,
                "--change-threshold must be ≥ 0"
            );
            let hooks = crate::watch_cmd::webhooks(&args.webhook)?;
            // This connection becomes the camera loop's, writing events; the server reads them.
            store.enable_wal()?;
            Some((cameras, hooks, store))
        }
        None => None,
    };
    let mut config = ServerConfig::new(args.addr, args.db.db.clone(), args.data_dir.clone());
    config.require_keys |= args.require_keys;
    config.max_body = args.max_body_mib << 20;
    config.max_pixels = (args.max_megapixels * 1e6) as u64;
    config.queue = args.queue;
    config.batch = BatchConfig {
        max_batch: args.max_batch,
        batch_wait: Duration::from_millis(args.batch_wait_ms),
    };
    config.request_timeout = Duration::from_secs(args.timeout_s);
    config.rate_per_minute = args.rate_limit;
    config.trusted_proxies = args.trusted_proxy.clone();
    config.photo_store = args.photo_store.clone();
    config.cache = !args.no_cache;
    config.cors_origins = args.cors_origin.clone();
    config.allowed_hosts = args.allowed_host.clone();
    config.max_prompt_tokens = args.max_prompt_tokens;
    config.header_timeout = Duration::from_secs(args.header_timeout_s);
    config.max_connections = args.max_connections;
    config.shutdown_grace = Duration::from_secs(args.shutdown_grace);
    if config.require_keys {
        let keys = open(&args.db.db)?.api_keys()?;
        if !keys.iter().any(|k| k.revoked_at.is_none()) {
            eprintln!(
                "warning: API keys are required on {} and {} holds none: create one with \
                 `inspector keys create --db {}`",
                args.addr,
                inspector_store::redact(&args.db.db),
                args.db.db
            );
        }
    }
    let detect = DetectConfig {
        max_new_tokens: args.max_new_tokens,
        ..Default::default()
    };
    let model = args.model.clone();
    // The worker gives the engine the database's citations before its first job.
    let server = match remote {
        Some(remote) => {
            eprintln!(
                "the model is {} at {}",
                remote.model,
                redact(&remote.base_url)
            );
            Server::start(config, move || Ok(RemoteEngine::new(remote)))?
        }
        None => Server::start(config, move || load_detector(&model, detect, &[]))?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let stop = Arc::new(AtomicBool::new(false));
    let camera_loop = match cameras {
        Some((cameras, hooks, store)) => Some(start_cameras(
            cameras,
            hooks,
            store,
            &args,
            server.state(),
            runtime.handle().clone(),
            stop.clone(),
        )?),
        None => None,
    };
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("listening on {}", args.addr))?;
        eprintln!(
            "serving on http://{} (database {}, photos in {}); the model is loading",
            listener.local_addr()?,
            inspector_store::redact(&args.db.db),
            args.data_dir.display()
        );
        server.serve(listener, shutdown_signal()).await
    });
    stop.store(true, Ordering::SeqCst);
    if let Some(cameras) = camera_loop {
        let _ = cameras.join();
    }
    served?;
    eprintln!("stopped: the queue is drained and every answered inspection is stored");
    Ok(ExitCode::SUCCESS)
}

/// The camera loop of `serve --cameras`, on a thread of its own: each round's fresh frames go
/// through the server's queue together (so the worker batches them with uploads), events are
/// stored as `inspector watch` stores them, and the cameras' state is published for
/// `/api/v1/cameras` after every round. It ends when `stop` is set or every source has ended.
fn start_cameras(
    cameras: Vec<inspector_watch::config::Camera>,
    hooks: Vec<inspector_watch::webhook::Webhook>,
    store: Box<dyn inspector_store::Store>,
    args: &ServeArgs,
    state: inspector_server::AppState,
    runtime: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    // Frames go to the data dir (the webhooks' outbox), and to object storage when photos are
    // kept there, so every replica can show them.
    let photos = state.inner.photos.clone();
    let mut cams = crate::watch_cmd::Cameras::open(
        cameras,
        args.change_threshold,
        crate::watch_cmd::EventSinks {
            data_dir: &args.data_dir,
            photos: photos.as_folder().is_none().then_some(photos),
            store,
            hooks,
            events: None,
        },
        true,
    )?;
    state.set_cameras(cams.views());
    let thread = std::thread::Builder::new()
        .name("cameras".into())
        .spawn(move || {
            while !state.is_ready() && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
            }
            while !stop.load(Ordering::SeqCst) {
                let going = cams.step(&mut |inputs| {
                    let answers = runtime.block_on(futures_util::future::join_all(
                        inputs.iter().map(|i| state.inspect_frame(i.bytes.clone())),
                    ));
                    answers
                        .into_iter()
                        .map(|r| r.map_err(|e| e.to_string()))
                        .collect()
                });
                state.set_cameras(cams.views());
                match going {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        eprintln!("error: the camera loop stopped: {e:#}");
                        break;
                    }
                }
            }
            cams.finish();
        })
        .context("starting the camera loop")?;
    Ok(thread)
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutting down: finishing the requests in flight");
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key; it is printed once and only its hash is stored.
    Create {
        /// Admin keys may also upload regulation documents.
        #[arg(long)]
        admin: bool,
        /// What the key is for (a camera, a script, a person).
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List keys (ids, names, roles; never the keys).
    List {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Revoke a key by id.
    Revoke {
        id: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

pub fn keys(cmd: KeysCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCommand::Create { admin, name, db } => {
            let store = open(&db.db)?;
            let (id, key) = inspector_server::auth::create_key(store.as_ref(), &name, admin)?;
            eprintln!(
                "created {} key {id}; it is shown once, store it now:",
                if admin { "an admin" } else { "a" }
            );
            println!("{key}");
        }
        KeysCommand::List { db } => {
            let store = open(&db.db)?;
            let keys = store.api_keys()?;
            if keys.is_empty() {
                eprintln!("no API keys in {}", inspector_store::redact(&db.db));
            }
            for k in keys {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    k.id,
                    if k.admin { "admin" } else { "user" },
                    k.created_at,
                    k.revoked_at
                        .map(|t| format!("revoked {t}"))
                        .unwrap_or_else(|| "active".into()),
                    k.name
                );
            }
        }
        KeysCommand::Revoke { id, db } => {
            let store = open(&db.db)?;
            if !store.revoke_api_key(&id)? {
                anyhow::bail!(
                    "no active key with id `{id}` in {}",
                    inspector_store::redact(&db.db)
                );
            }
            eprintln!("revoked {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
