//! `inspector watch`

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use anyhow::Context;
use clap::Args;
use inspector_detect::{DetectConfig, Finding, Input, sha256_hex};
use inspector_store::RuleFilter;
use inspector_watch::{
    Alerter, Policy, Seen, Trigger, Zones,
    config::{self, Camera},
    source::{
        self, ChangeGate, FolderSource, LiveStream, Next, SnapshotUrl, SourceKind, Status,
        VideoFile,
    },
    webhook,
};

/// An open source.
enum Reader {
    Video(VideoFile),
    Folder(FolderSource),
    Snapshot(SnapshotUrl),
    Stream(LiveStream),
}

impl Reader {
    fn poll(&mut self) -> Result<Next, inspector_watch::source::SourceError> {
        match self {
            Reader::Video(v) => v.poll(),
            Reader::Folder(f) => f.poll(),
            Reader::Snapshot(u) => Ok(u.poll()),
            Reader::Stream(s) => s.poll(),
        }
    }

    fn is_live(&self) -> bool {
        !matches!(self, Reader::Video(_))
    }

    /// Whether the source is down now (a URL between retries), and its reconnects.
    fn status(&self) -> (Option<Status>, usize) {
        match self {
            Reader::Snapshot(u) => (Some(u.status()), u.reconnects()),
            Reader::Stream(s) => (Some(s.status()), s.reconnects()),
            _ => (None, 0),
        }
    }

    /// Frames dropped because newer ones came before they were inspected (live streams), and
    /// photos passed over because newer ones arrived in the same interval (folders).
    fn dropped(&self) -> usize {
        match self {
            Reader::Stream(s) => s.dropped(),
            Reader::Folder(f) => f.passed_over(),
            _ => 0,
        }
    }
}

use crate::{
    detect_cmd::load_detector,
    model_args::ModelArgs,
    output::{folder_of, write_atomic},
    rules_cmd::{DbArgs, open_with_rules},
};

/// Watch camera sources: sample one frame every `--interval` seconds of each source, inspect it,
/// and raise an alert event when a rule is broken in K of the source's last M frames (at or
/// above a risk threshold, outside ignored regions and inside the zones that name the rule),
/// then not again for that rule until a cooldown has passed. Defaults: 2 of 3 frames, 中, 300 s;
/// a `--config` file sets them per camera, with zones.
///
/// Each event's frame is stored with its boxes drawn under `--data-dir`/events before the event
/// is written out. Video files and streams are decoded by the `ffmpeg` program (Debian:
/// `apt-get install ffmpeg`): files as fast as the model keeps up, timed in media time; streams
/// in real time, keeping only the newest frame (older ones are dropped and counted) and
/// reconnecting with backoff when they drop. A folder is watched for new photos (at most one
/// per interval, the newest). Live sources run until SIGINT or SIGTERM, which finish the frames
/// in flight.
///
/// Exit status: 0 when every source ran to its end (or was stopped by a signal), 1 when any
/// failed (named on stderr; the others go on).
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Video files, folders (new photos as they arrive), RTSP/RTSPS streams (`rtsp://`), and
    /// `http(s)://` URLs: a snapshot URL (one image a request) or an MJPEG stream. Each is a
    /// camera with the default policy and no zones.
    #[arg(value_name = "SOURCE")]
    pub sources: Vec<String>,
    /// A cameras file (`cameras.toml`): cameras with their sources, policies and zones, checked
    /// as a whole before anything starts.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Seconds between inspected frames of each SOURCE given on the command line.
    #[arg(long, default_value_t = 2.0, value_name = "S")]
    pub interval: f64,
    /// Append one JSON line per event: id, camera, source (credentials redacted), at (seconds of
    /// media time for a file), rules, risk, frame (relative to FILE's folder), violations.
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Where events are stored: `events/<id>.json` (the record) and `events/<id>.jpg` (the
    /// frame, boxes drawn), and the webhooks' delivery state (`webhooks/`).
    #[arg(long, default_value = "data", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Also store each event's frame here, where `inspector serve --photo-store` reads it: a
    /// folder, or `s3://BUCKET[/PREFIX]` (credentials from AWS_* variables).
    #[arg(long, value_name = "DIR|URL")]
    pub photo_store: Option<String>,
    /// POST every event as JSON to URL (repeatable), at least once: retried with backoff while
    /// the watcher runs, and what is undelivered at exit is sent on the next start. With
    /// INSPECTOR_WEBHOOK_SECRET set, each request is signed (`X-Inspector-Signature: sha256=`,
    /// HMAC-SHA256 of `<X-Inspector-Timestamp>.<body>`); `X-Inspector-Event` is the event id.
    #[arg(long, value_name = "URL")]
    pub webhook: Vec<String>,
    /// Mean grey-level change (0–255, on 32 × 32 thumbnails) below which a frame repeats the
    /// last result instead of being inspected; 0 inspects every frame.
    #[arg(long, default_value_t = 2.0, value_name = "LEVELS")]
    pub change_threshold: f64,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub db: DbArgs,
}

/// One camera being read.
struct Watched {
    camera: Camera,
    frames: Option<Reader>,
    live: bool,
    down: bool,
    reconnects: usize,
    alerter: Alerter,
    gate: ChangeGate,
    /// The last inspected frame's violations and finding: what a skipped frame repeats.
    last: Option<(Vec<Seen>, Finding)>,
    read: usize,
    inspected: usize,
    skipped: usize,
    /// Live frames dropped because newer ones came before they were inspected, and a folder's
    /// photos passed over because newer ones arrived in the same interval.
    dropped: usize,
    /// Seconds from a live frame's arrival to its event being stored, per event.
    latencies: Vec<f64>,
    /// Frames whose inspection failed or was refused (a full queue): counted as dropped.
    refused: usize,
    /// The latest inspected frame with its boxes drawn, when the cameras keep frames.
    frame: Option<Arc<Vec<u8>>>,
    /// When the latest inspected frame arrived (epoch ms; media time for a file is not a time).
    last_frame_ms: Option<i64>,
    events: usize,
    error: Option<String>,
}

impl Watched {
    /// Opens `camera`'s source; one that cannot be opened is reported and marked failed.
    fn open(camera: Camera, change_threshold: f64) -> Watched {
        let name = config::redact(&camera.source);
        let opened = match SourceKind::of(&camera.source) {
            SourceKind::Folder(dir) => {
                FolderSource::open(&dir, &name, camera.interval_s).map(Reader::Folder)
            }
            SourceKind::Http(url) => {
                SnapshotUrl::open(&url, &name, camera.interval_s).map(Reader::Snapshot)
            }
            SourceKind::Rtsp(url) => {
                LiveStream::open(&url, &name, camera.interval_s).map(Reader::Stream)
            }
            _ => VideoFile::open(Path::new(&camera.source), &name, camera.interval_s)
                .map(Reader::Video),
        };
        let (frames, error) = match opened {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let live = frames.as_ref().is_some_and(Reader::is_live);
        if let Some(e) = &error {
            eprintln!("camera {:?}: {e}", camera.name);
        }
        Watched {
            alerter: Alerter::new(camera.policy.clone(), camera.zones.clone()),
            camera,
            frames,
            live,
            down: false,
            reconnects: 0,
            gate: ChangeGate::new(change_threshold),
            last: None,
            read: 0,
            inspected: 0,
            skipped: 0,
            dropped: 0,
            latencies: Vec::new(),
            refused: 0,
            frame: None,
            last_frame_ms: None,
            events: 0,
            error,
        }
    }

    fn view(&self, index: usize) -> inspector_server::routes::cameras::CameraView {
        let status = match (&self.frames, &self.error) {
            (_, Some(_)) => "failed",
            (None, None) => "ended",
            (Some(_), None) if self.down => "down",
            (Some(_), None) => "up",
        };
        let down_error = match self.frames.as_ref().map(Reader::status) {
            Some((Some(Status::Down { error, .. }), _)) => Some(error),
            _ => None,
        };
        let mut sorted = self.latencies.clone();
        sorted.sort_by(f64::total_cmp);
        inspector_server::routes::cameras::CameraView {
            index,
            name: self.camera.name.clone(),
            source: config::redact(&self.camera.source),
            status: status.into(),
            error: self.error.clone().or(down_error),
            frames_read: self.read,
            frames_inspected: self.inspected,
            frames_repeated: self.skipped,
            frames_dropped: self.dropped,
            events: self.events,
            reconnects: self.reconnects,
            latency_p50_s: (!sorted.is_empty()).then(|| nearest_rank(&sorted, 0.50)),
            latency_p99_s: (!sorted.is_empty()).then(|| nearest_rank(&sorted, 0.99)),
            last_frame_at: self.last_frame_ms.map(inspector_server::record::rfc3339),
            frame_url: self
                .frame
                .is_some()
                .then(|| format!("/api/v1/cameras/{index}/frame")),
            frame: self.frame.clone(),
        }
    }
}

/// Nearest rank: the smallest value with at least `q` of the (sorted) samples at or below it.
fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

pub fn run(args: WatchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.interval.is_finite() && args.interval > 0.0,
        "--interval must be a number of seconds > 0, not {}",
        args.interval
    );
    anyhow::ensure!(
        args.change_threshold.is_finite() && args.change_threshold >= 0.0,
        "--change-threshold must be ≥ 0"
    );
    let hooks = webhooks(&args.webhook)?;
    let store = open_with_rules(&args.db.db)?;
    // `inspector serve` reads the events while the watcher writes them.
    store.enable_wal()?;
    let rules = store.rules(&RuleFilter::default())?;
    let mut cameras: Vec<Camera> = match &args.config {
        Some(file) => read_cameras(file, &rules)?,
        None => Vec::new(),
    };
    for (i, source) in args.sources.iter().enumerate() {
        cameras.push(Camera {
            name: format!("source-{}", i + 1),
            source: source.clone(),
            interval_s: args.interval,
            policy: Policy::default(),
            zones: Zones::default(),
        });
    }
    anyhow::ensure!(
        !cameras.is_empty(),
        "give a SOURCE or a --config with cameras"
    );
    check_sources(&cameras)?;
    let detector = load_detector(&args.model, DetectConfig::default(), &rules)?;
    let photos = match &args.photo_store {
        Some(spec) => Some(Arc::new(
            inspector_photos::PhotoStore::open(spec)
                .with_context(|| format!("--photo-store {spec}"))?,
        )),
        None => None,
    };
    let mut cams = Cameras::open(
        cameras,
        args.change_threshold,
        EventSinks {
            data_dir: &args.data_dir,
            photos,
            store,
            hooks,
            events: args.events.as_deref(),
        },
        false,
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed))
            .context("installing the SIGINT/SIGTERM handler")?;
    }
    // Round-robin: one frame from each open source per step, inspected as one batch.
    loop {
        if stop.load(Ordering::Relaxed) {
            eprintln!("stopping: the frames in flight are done");
            break;
        }
        let going = cams.step(&mut |inputs| {
            detector
                .inspect(inputs, &rules, None, inputs.len().max(1), |_| {})
                .into_iter()
                .map(|r| r.map_err(|e| e.to_string()))
                .collect()
        })?;
        if !going {
            break;
        }
    }
    Ok(if cams.finish() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Reads and checks a cameras file as a whole against the database's rules; every error is
/// printed with its line and nothing starts.
pub fn read_cameras(file: &Path, rules: &[inspector_core::Rule]) -> anyhow::Result<Vec<Camera>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let citations: std::collections::HashSet<&str> =
        rules.iter().map(|r| r.citation.as_str()).collect();
    match config::parse(&text, |c| citations.contains(c)) {
        Ok(c) => Ok(c),
        Err(errors) => {
            for e in &errors {
                eprintln!("{}: {e}", file.display());
            }
            anyhow::bail!(
                "{} has {} error(s); nothing was started",
                file.display(),
                errors.len()
            );
        }
    }
}

/// Refuses a source of a scheme that no reader takes, naming the camera and what is taken.
pub fn check_sources(cameras: &[Camera]) -> anyhow::Result<()> {
    for c in cameras {
        if let SourceKind::Url(_) = SourceKind::of(&c.source) {
            anyhow::bail!(
                "camera {:?}: unsupported source {}: expected rtsp:// or rtsps:// (a stream), \
                 http(s):// (an MJPEG stream or a snapshot URL), a video file or a folder",
                c.name,
                config::redact(&c.source)
            );
        }
    }
    Ok(())
}

/// Webhooks from `--webhook` URLs, signed with INSPECTOR_WEBHOOK_SECRET when it is set.
pub fn webhooks(urls: &[String]) -> anyhow::Result<Vec<webhook::Webhook>> {
    for url in urls {
        let lower = url.to_ascii_lowercase();
        anyhow::ensure!(
            lower.starts_with("http://") || lower.starts_with("https://"),
            "--webhook {}: expected an http:// or https:// URL",
            config::redact(url)
        );
    }
    let secret = std::env::var("INSPECTOR_WEBHOOK_SECRET")
        .ok()
        .filter(|s| !s.is_empty())
        .map(String::into_bytes);
    if !urls.is_empty() && secret.is_none() {
        eprintln!("note: INSPECTOR_WEBHOOK_SECRET is not set: webhook requests are not signed");
    }
    Ok(urls
        .iter()
        .map(|url| webhook::Webhook {
            url: url.clone(),
            secret: secret.clone(),
        })
        .collect())
}

/// What inspects a round's fresh frames: the detector itself (`watch`), or the server's queue
/// (`serve --cameras`). One result per input, in order.
pub type Inspect<'a> = dyn FnMut(&[Input]) -> Vec<Result<Finding, String>> + 'a;

/// The cameras being watched, and where their events go: one round at a time ([`Cameras::step`]).
pub struct Cameras {
    watched: Vec<Watched>,
    events_dir: PathBuf,
    /// A second home for event frames (object storage the servers read), besides `events_dir`.
    photos: Option<Arc<inspector_photos::PhotoStore>>,
    store: Box<dyn inspector_store::Store>,
    events_file: Option<(std::fs::File, PathBuf)>,
    deliverer: webhook::Deliverer,
    /// Whether to keep each camera's latest inspected frame with its boxes drawn (a server
    /// shows it; the command line does not need it).
    keep_frames: bool,
    started: Instant,
}

/// Where the cameras' events go.
pub struct EventSinks<'a> {
    /// `events/` (records and frames, the webhooks' outbox) and `webhooks/` go here.
    pub data_dir: &'a Path,
    /// A second home for frames (object storage the servers read).
    pub photos: Option<Arc<inspector_photos::PhotoStore>>,
    /// The database the servers list events from.
    pub store: Box<dyn inspector_store::Store>,
    pub hooks: Vec<webhook::Webhook>,
    /// The events file (`watch --events`).
    pub events: Option<&'a Path>,
}

impl Cameras {
    /// Opens every camera's source (one that cannot be opened is reported and marked failed;
    /// the others go on) and the event sinks: `data_dir/events`, the photo store, the
    /// database, the webhooks and the events file.
    pub fn open(
        cameras: Vec<Camera>,
        change_threshold: f64,
        sinks: EventSinks,
        keep_frames: bool,
    ) -> anyhow::Result<Cameras> {
        let EventSinks {
            data_dir,
            photos,
            store,
            hooks,
            events,
        } = sinks;
        let events_dir = data_dir.join("events");
        std::fs::create_dir_all(&events_dir)
            .with_context(|| format!("creating {}", events_dir.display()))?;
        let deliverer =
            webhook::Deliverer::start(hooks, &events_dir, &data_dir.join("webhooks"))
                .with_context(|| format!("starting the webhooks in {}", data_dir.display()))?;
        let events_file = match events {
            Some(f) => Some((
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(f)
                    .with_context(|| format!("opening {}", f.display()))?,
                folder_of(f)?.to_path_buf(),
            )),
            None => None,
        };
        let watched: Vec<Watched> = cameras
            .into_iter()
            .map(|camera| Watched::open(camera, change_threshold))
            .collect();
        let names: Vec<String> = watched
            .iter()
            .map(|w| format!("{:?} ({})", w.camera.name, config::redact(&w.camera.source)))
            .collect();
        eprintln!("watching {}", names.join(", "));
        Ok(Cameras {
            watched,
            events_dir,
            photos,
            store,
            events_file,
            deliverer,
            keep_frames,
            started: Instant::now(),
        })
    }

    /// One round: a frame from each source that has one, the fresh ones inspected as one batch
    /// by `inspect`, events raised and stored. `false` once every source has ended.
    pub fn step(&mut self, inspect: &mut Inspect) -> anyhow::Result<bool> {
        if self.watched.iter().all(|w| w.frames.is_none()) {
            return Ok(false);
        }
        let mut batch: Vec<(usize, f64, Vec<u8>, image::DynamicImage)> = Vec::new();
        for (i, w) in self.watched.iter_mut().enumerate() {
            let Some(frames) = w.frames.as_mut() else {
                continue;
            };
            match frames.poll() {
                Ok(Next::Frame(frame)) => {
                    w.read += 1;
                    match image::load_from_memory(&frame.png) {
                        Ok(img) => batch.push((i, frame.at, frame.png, img)),
                        // One unreadable photo in a watched folder is reported and
                        // passed over; a video whose decoder writes one has failed.
                        Err(e) if w.live => {
                            eprintln!("camera {:?}: a photo could not be read: {e}", w.camera.name)
                        }
                        Err(e) => {
                            w.error = Some(format!("frame at {} s: {e}", frame.at));
                            w.frames = None;
                        }
                    }
                }
                Ok(Next::Wait) => {}
                Ok(Next::End) => w.frames = None,
                Err(e) => {
                    eprintln!("camera {:?}: {e}", w.camera.name);
                    w.error = Some(e.to_string());
                    w.frames = None;
                }
            }
            // A snapshot URL that serves an MJPEG stream is read as the stream it is.
            if let Some(Reader::Snapshot(u)) = &w.frames
                && u.is_stream()
            {
                let name = config::redact(&w.camera.source);
                eprintln!(
                    "camera {:?}: an MJPEG stream; reading it as one",
                    w.camera.name
                );
                match LiveStream::open(&w.camera.source, &name, w.camera.interval_s) {
                    Ok(s) => w.frames = Some(Reader::Stream(s)),
                    Err(e) => {
                        w.error = Some(e.to_string());
                        w.frames = None;
                    }
                }
            }
            if let Some(f) = &w.frames {
                w.dropped = w.refused + f.dropped();
            }
            if let Some((Some(status), reconnects)) = w.frames.as_ref().map(Reader::status) {
                w.reconnects = reconnects;
                match status {
                    Status::Down { error, retry_s, .. } if !w.down => {
                        w.down = true;
                        eprintln!(
                            "camera {:?}: down: {error}; retrying in {retry_s:.0} s",
                            w.camera.name
                        );
                    }
                    Status::Up if w.down => {
                        w.down = false;
                        eprintln!("camera {:?}: back up", w.camera.name);
                    }
                    _ => {}
                }
            }
        }
        if batch.is_empty() {
            // Only live sources are left, between frames.
            std::thread::sleep(std::time::Duration::from_millis(50));
            return Ok(true);
        }
        let fresh: Vec<usize> = batch
            .iter()
            .enumerate()
            .filter(|(_, (i, _, _, img))| {
                let w = &mut self.watched[*i];
                // The gate sees every frame, so that its reference is the last inspected one.
                let changed = w.gate.passes(img);
                changed || w.last.is_none()
            })
            .map(|(k, _)| k)
            .collect();
        let inputs: Vec<Input> = fresh
            .iter()
            .map(|&k| Input {
                name: format!(
                    "{} at {} s",
                    self.watched[batch[k].0].camera.name, batch[k].1
                ),
                bytes: batch[k].2.clone(),
            })
            .collect();
        let findings = inspect(&inputs);
        for (&k, result) in fresh.iter().zip(findings) {
            let w = &mut self.watched[batch[k].0];
            match result {
                Ok(f) => {
                    w.inspected += 1;
                    if self.keep_frames {
                        // What the camera wall shows: the frame with its boxes drawn.
                        w.frame =
                            inspector_server::images::draw_boxes(&batch[k].2, &f, 100_000_000)
                                .ok()
                                .map(Arc::new);
                        w.last_frame_ms = w.live.then(|| (batch[k].1 * 1000.0) as i64);
                    }
                    w.last = Some((seen_in(&f), f));
                }
                Err(e) => {
                    w.refused += 1;
                    w.dropped += 1;
                    eprintln!("camera {:?}: frame at {} s: {e}", w.camera.name, batch[k].1)
                }
            }
        }
        for (k, (i, at, png, img)) in batch.iter().enumerate() {
            let w = &mut self.watched[*i];
            if !fresh.contains(&k) {
                w.skipped += 1;
            }
            let Some((seen, finding)) = &w.last else {
                continue;
            };
            let size = (img.width(), img.height());
            for trigger in w.alerter.observe(*at, size, seen) {
                let id = raise(
                    &w.camera,
                    w.live,
                    &trigger,
                    png,
                    finding,
                    &self.events_dir,
                    self.photos.as_deref(),
                    self.store.as_ref(),
                    self.events_file.as_mut(),
                )?;
                self.deliverer.stored(&id);
                w.events += 1;
                if w.live {
                    // From the frame's arrival to the event stored (live sources' clocks are
                    // the epoch; a file's media time says nothing of waiting).
                    w.latencies.push(source::epoch_now() - trigger.at);
                }
            }
        }
        Ok(true)
    }

    /// The cameras' state, for the server's camera wall.
    pub fn views(&self) -> Vec<inspector_server::routes::cameras::CameraView> {
        self.watched
            .iter()
            .enumerate()
            .map(|(index, w)| w.view(index))
            .collect()
    }

    /// Gives the webhooks their grace, prints each camera's summary, and returns how many
    /// cameras failed.
    pub fn finish(self) -> usize {
        // Deliveries in flight get a short grace; the rest stay pending for the next start.
        for hook in self.deliverer.finish(std::time::Duration::from_secs(10)) {
            eprintln!(
                "webhook {}: {} delivered, {} failed attempts, {} pending",
                hook.url, hook.delivered, hook.failures, hook.pending
            );
        }
        let mut failed = 0;
        for w in &self.watched {
            eprintln!(
                "camera {:?} ({}): {} frames read, {} inspected, {} repeated by the change gate, \
                 {} dropped, {} events, {} reconnects{}{}",
                w.camera.name,
                config::redact(&w.camera.source),
                w.read,
                w.inspected,
                w.skipped,
                w.dropped,
                w.events,
                w.reconnects,
                latency_summary(&w.latencies),
                w.error
                    .as_ref()
                    .map(|e| format!("; failed: {e}"))
                    .unwrap_or_default()
            );
            failed += usize::from(w.error.is_some());
        }
        eprintln!(
            "watched {} sources in {:.1} s",
            self.watched.len(),
            self.started.elapsed().as_secs_f64()
        );
        failed
    }
}

/// `; frame-to-event latency p50 X s, p99 Y s` over a camera's events (nothing without any).
fn latency_summary(latencies: &[f64]) -> String {
    if latencies.is_empty() {
        return String::new();
    }
    let mut sorted = latencies.to_vec();
    sorted.sort_by(f64::total_cmp);
    format!(
        "; frame-to-event latency p50 {:.2} s, p99 {:.2} s",
        nearest_rank(&sorted, 0.50),
        nearest_rank(&sorted, 0.99)
    )
}

/// The violations of a finding whose citation names a rule of the database (the others cannot
/// be alerted on as a rule) and that have a risk.
fn seen_in(finding: &Finding) -> Vec<Seen> {
    finding
        .violations
        .iter()
        .filter_map(|v| {
            Some(Seen {
                rule: v.resolved.as_ref()?.citation.clone(),
                risk: v.risk?,
                bbox: v.bbox,
            })
        })
        .collect()
}

/// Stores an event (its frame with the boxes drawn, then its record `<id>.json`), then
/// writes it to the events file. Returns its id; notifications go out only after this.
#[allow(clippy::too_many_arguments)]
fn raise(
    camera: &Camera,
    live: bool,
    trigger: &Trigger,
    png: &[u8],
    finding: &Finding,
    events_dir: &Path,
    photos: Option<&inspector_photos::PhotoStore>,
    store: &dyn inspector_store::Store,
    events_file: Option<&mut (std::fs::File, PathBuf)>,
) -> anyhow::Result<String> {
    let source = config::redact(&camera.source);
    // The same camera, time and rule give the same id: a receiver can drop repeats.
    let id = sha256_hex(
        format!(
            "{}\n{}\n{}\n{}",
            camera.name, source, trigger.at, trigger.rule
        )
        .as_bytes(),
    )[..16]
        .to_string();
    let frame = events_dir.join(format!("{id}.jpg"));
    let jpeg = inspector_server::images::draw_boxes(png, finding, 100_000_000)
        .map_err(|e| anyhow::anyhow!("drawing the event frame: {e}"))?;
    write_atomic(&frame, &jpeg)?;
    if let Some(photos) = photos {
        photos.put(&format!("events/{id}.jpg"), &jpeg)?;
    }
    eprintln!(
        "event {id}: camera {:?} at {} s: {} ({})",
        camera.name,
        trigger.at,
        trigger.rule,
        trigger.risk.as_str()
    );
    let mut event = serde_json::json!({
        "id": id,
        "camera": camera.name,
        "source": source,
        "at": trigger.at,
        "rules": [trigger.rule],
        "risk": trigger.risk,
        "frame": format!("{id}.jpg"),
        "violations": trigger.seen,
    });
    if live {
        event["time"] =
            inspector_server::record::rfc3339((trigger.at * 1000.0).round() as i64).into();
    }
    // The record, beside its frame: what webhooks deliver, and what survives a crash.
    let stored_ms = (source::epoch_now() * 1000.0) as u64;
    let mut record = event.clone();
    record["stored_at_ms"] = stored_ms.into();
    write_atomic(
        &webhook::record_path(events_dir, &id),
        record.to_string().as_bytes(),
    )?;
    // And in the database, where `inspector serve` lists, streams and acknowledges it.
    store.insert_event(&inspector_store::NewEvent {
        id: id.clone(),
        stored_ms: stored_ms as i64,
        camera: camera.name.clone(),
        source: source.clone(),
        at: trigger.at,
        rule: trigger.rule.clone(),
        risk: trigger.risk.as_str().to_string(),
        frame_file: format!("events/{id}.jpg"),
        record: event.to_string(),
    })?;
    if let Some((file, dir)) = events_file {
        event["frame"] = inspector_dataset::relative_to(&frame, dir)
            .unwrap_or_else(|_| frame.display().to_string())
            .into();
        writeln!(file, "{event}").context("writing the events file")?;
        file.sync_data().context("writing the events file")?;
    }
    Ok(id)
}
