//! Frames from camera sources, and the change gate.
//!
//! Video is decoded by the `ffmpeg` program from PATH (Debian's `ffmpeg` package), spawned per
//! source: no libav is linked, so a plain `cargo build` works and the binary carries no GPL
//! code. ffmpeg samples one frame every `interval` seconds of media time (its `fps` filter) and
//! writes them as PNG images to a pipe, which [`PngStream`] splits.

use std::{
    io::{BufReader, ErrorKind, Read},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    thread::JoinHandle,
};

/// The largest PNG chunk accepted from ffmpeg (a 8K RGB frame is about 100 MB raw).
const MAX_CHUNK: usize = 256 << 20;

/// Why a source stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error(
        "{program} was not found on PATH: install FFmpeg (Debian and Ubuntu: apt-get install \
         ffmpeg) or put its folder on PATH"
    )]
    MissingProgram { program: &'static str },
    #[error("{name}: {message}")]
    Failed { name: String, message: String },
}

/// A source's interval must be a positive number of seconds.
fn check_interval(name: &str, interval: f64) -> Result<(), SourceError> {
    if interval.is_finite() && interval > 0.0 {
        return Ok(());
    }
    Err(SourceError::Failed {
        name: name.to_string(),
        message: format!("the interval must be > 0 seconds, not {interval}"),
    })
}

/// Seconds since the epoch: a live source's frame time.
pub fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One sampled frame: its time in the source (seconds of media time for a file, since the
/// epoch for a live source) and the encoded image (PNG from ffmpeg; a folder's photos as they
/// are).
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub at: f64,
    pub png: Vec<u8>,
}

/// Splits a stream of concatenated PNG files.
pub struct PngStream<R> {
    reader: R,
}

impl<R: Read> PngStream<R> {
    pub fn new(reader: R) -> Self {
        PngStream { reader }
    }

    /// The next PNG, `None` at a clean end of the stream (between images).
    pub fn next_png(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
        let mut sig = [0u8; 8];
        match self.reader.read(&mut sig[..1])? {
            0 => return Ok(None),
            _ => self.reader.read_exact(&mut sig[1..])?,
        }
        if sig != SIGNATURE {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                "the decoder's output is not a PNG stream",
            ));
        }
        let mut png = sig.to_vec();
        loop {
            let mut head = [0u8; 8];
            self.reader.read_exact(&mut head)?;
            let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
            if len > MAX_CHUNK {
                return Err(std::io::Error::new(
                    ErrorKind::InvalidData,
                    format!("a PNG chunk of {len} bytes"),
                ));
            }
            png.extend_from_slice(&head);
            let start = png.len();
            png.resize(start + len + 4, 0);
            self.reader.read_exact(&mut png[start..])?;
            if &head[4..] == b"IEND" {
                return Ok(Some(png));
            }
        }
    }
}

/// Frames of a video file every `interval` seconds of media time, as fast as they are taken.
pub struct VideoFile {
    name: String,
    child: Child,
    frames: PngStream<BufReader<ChildStdout>>,
    stderr: Option<JoinHandle<String>>,
    interval: f64,
    index: usize,
    done: bool,
}

impl VideoFile {
    /// Starts ffmpeg on `path`. `name` is how errors name the source.
    pub fn open(path: &Path, name: &str, interval: f64) -> Result<VideoFile, SourceError> {
        let failed = |message: String| SourceError::Failed {
            name: name.to_string(),
            message,
        };
        check_interval(name, interval)?;
        if !path.is_file() {
            return Err(failed("no such file".into()));
        }
        let mut input = vec![std::ffi::OsString::from("-i")];
        input.push(path.as_os_str().to_owned());
        let ffmpeg = spawn_ffmpeg(&input, interval).map_err(|e| match e.kind() {
            ErrorKind::NotFound => SourceError::MissingProgram { program: "ffmpeg" },
            _ => failed(format!("could not start ffmpeg: {e}")),
        })?;
        Ok(VideoFile {
            name: name.to_string(),
            child: ffmpeg.child,
            frames: ffmpeg.frames,
            stderr: Some(ffmpeg.stderr),
            interval,
            index: 0,
            done: false,
        })
    }

    /// The next frame; `None` once the file has ended normally. An unreadable or corrupt file
    /// is an error with ffmpeg's own words.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.done {
            return Ok(None);
        }
        let read = self.frames.next_png();
        match read {
            Ok(Some(png)) => {
                let at = self.index as f64 * self.interval;
                self.index += 1;
                Ok(Some(Frame { at, png }))
            }
            Ok(None) => {
                self.done = true;
                self.finish(None).map(|_| None)
            }
            Err(e) => {
                self.done = true;
                self.finish(Some(e.to_string())).map(|_| None)
            }
        }
    }

    /// [`VideoFile::next_frame`] as a [`Next`].
    pub fn poll(&mut self) -> Result<Next, SourceError> {
        Ok(match self.next_frame()? {
            Some(f) => Next::Frame(f),
            None => Next::End,
        })
    }

    /// Waits for ffmpeg; its failure (or a broken stream) becomes the source's error.
    fn finish(&mut self, stream_error: Option<String>) -> Result<(), SourceError> {
        let status = self.child.wait();
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let said = last_line(&stderr);
        let ok = status.as_ref().is_ok_and(|s| s.success());
        if ok && stream_error.is_none() && self.index > 0 {
            return Ok(());
        }
        let message = if let Some(said) = said {
            format!("ffmpeg: {said}")
        } else if let Some(e) = stream_error {
            format!("reading ffmpeg's frames: {e}")
        } else if self.index == 0 {
            "no video frames in the file".to_string()
        } else {
            format!(
                "ffmpeg failed ({})",
                status.map_or_else(|e| e.to_string(), |s| s.to_string())
            )
        };
        Err(SourceError::Failed {
            name: self.name.clone(),
            message,
        })
    }
}

impl Drop for VideoFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a source has next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Frame(Frame),
    /// Nothing yet (a live source between frames).
    Wait,
    /// The source has ended (a file at its end).
    End,
}

/// Image extensions a folder source takes.
const PHOTO_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff"];

/// New photos in a folder as they arrive (cameras that upload snapshots, an NVR exporting
/// stills). Photos there when watching starts are not inspected. A photo is taken once its
/// size has stayed the same for one poll (so a file still being written is not read half), at
/// most one per `interval` seconds: the newest; older ones that arrived meanwhile are counted
/// in [`FolderSource::passed_over`]. Times are seconds since the epoch.
pub struct FolderSource {
    dir: PathBuf,
    name: String,
    interval: f64,
    /// Files already taken or passed over.
    seen: std::collections::HashSet<PathBuf>,
    /// Candidates and their size at the last poll.
    sizes: std::collections::HashMap<PathBuf, u64>,
    last_poll: Option<std::time::Instant>,
    last_frame: Option<std::time::Instant>,
    passed_over: usize,
}

impl FolderSource {
    pub fn open(dir: &Path, name: &str, interval: f64) -> Result<FolderSource, SourceError> {
        check_interval(name, interval)?;
        let mut src = FolderSource {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            interval,
            seen: Default::default(),
            sizes: Default::default(),
            last_poll: None,
            last_frame: None,
            passed_over: 0,
        };
        src.seen = src.photos()?.into_iter().map(|(p, _, _)| p).collect();
        Ok(src)
    }

    /// Photos that arrived but were not inspected (more than one per interval).
    pub fn passed_over(&self) -> usize {
        self.passed_over
    }

    /// The photo files in the folder: path, size, modification time.
    fn photos(&self) -> Result<Vec<(PathBuf, u64, std::time::SystemTime)>, SourceError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| SourceError::Failed {
            name: self.name.clone(),
            message: format!("cannot read the folder: {e}"),
        })?;
        let mut out = Vec::new();
        for e in entries.flatten() {
            let p = e.path();
            let photo = p
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| PHOTO_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()));
            let Ok(meta) = e.metadata() else { continue };
            if photo && meta.is_file() {
                out.push((
                    p,
                    meta.len(),
                    meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                ));
            }
        }
        Ok(out)
    }

    /// Polls the folder (at most every tenth of the interval).
    pub fn poll(&mut self) -> Result<Next, SourceError> {
        use std::time::{Duration, Instant};
        let now = Instant::now();
        if self
            .last_poll
            .is_some_and(|t| now - t < Duration::from_secs_f64(self.interval / 10.0))
        {
            return Ok(Next::Wait);
        }
        if self
            .last_frame
            .is_some_and(|t| now - t < Duration::from_secs_f64(self.interval))
        {
            return Ok(Next::Wait);
        }
        self.last_poll = Some(now);
        let mut stable = Vec::new();
        let mut sizes = std::collections::HashMap::new();
        for (p, size, modified) in self.photos()? {
            if self.seen.contains(&p) {
                continue;
            }
            if self.sizes.get(&p) == Some(&size) && size > 0 {
                stable.push((modified, p.clone()));
            }
            sizes.insert(p, size);
        }
        self.sizes = sizes;
        stable.sort();
        let Some((_, newest)) = stable.pop() else {
            return Ok(Next::Wait);
        };
        self.passed_over += stable.len();
        for (_, p) in stable {
            tracing::debug!(camera = %self.name, photo = %p.display(), "photo passed over");
            self.seen.insert(p);
        }
        tracing::debug!(camera = %self.name, photo = %newest.display(), "photo taken");
        self.seen.insert(newest.clone());
        self.sizes.remove(&newest);
        self.last_frame = Some(now);
        let bytes = std::fs::read(&newest).map_err(|e| SourceError::Failed {
            name: self.name.clone(),
            message: format!("{}: {e}", newest.display()),
        })?;
        Ok(Next::Frame(Frame {
            at: epoch_now(),
            png: bytes,
        }))
    }
}

/// What [`SnapshotUrl`] says of an URL that serves an MJPEG stream (`multipart/x-mixed-replace`)
/// instead of one image: [`SnapshotUrl::is_stream`] then holds, and the URL is to be read as a
/// [`LiveStream`].
const MJPEG: &str = "the URL serves an MJPEG stream";

/// The largest snapshot accepted.
const MAX_SNAPSHOT: u64 = 32 << 20;

/// A camera's snapshot URL (`http(s)://…/snapshot.jpg`), fetched every `interval` seconds.
/// A failed fetch is retried with backoff (1 s, doubling up to 60 s): the source is live and
/// never ends by itself. [`SnapshotUrl::status`] says whether it is up; `reconnects` counts the
/// outages. Times are seconds since the epoch.
pub struct SnapshotUrl {
    url: String,
    name: String,
    interval: f64,
    agent: ureq::Agent,
    next_try: std::time::Instant,
    backoff: f64,
    down_since: Option<std::time::Instant>,
    reconnects: usize,
    last_error: Option<String>,
}

/// What [`SnapshotUrl::poll`] has to report besides frames: a change of state.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Up,
    /// Down since this many seconds, with the last error; retrying in `retry_s`.
    Down {
        for_s: f64,
        error: String,
        retry_s: f64,
    },
}

impl SnapshotUrl {
    /// `name` is how messages name the source (credentials redacted).
    pub fn open(url: &str, name: &str, interval: f64) -> Result<SnapshotUrl, SourceError> {
        check_interval(name, interval)?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(15))
            .build();
        Ok(SnapshotUrl {
            url: url.to_string(),
            name: name.to_string(),
            interval,
            agent,
            next_try: std::time::Instant::now(),
            backoff: 1.0,
            down_since: None,
            reconnects: 0,
            last_error: None,
        })
    }

    /// Whether the URL turned out to serve an MJPEG stream: read it as a [`LiveStream`].
    pub fn is_stream(&self) -> bool {
        self.last_error.as_deref() == Some(MJPEG)
    }

    /// Outages so far (each ended or ongoing outage counts once).
    pub fn reconnects(&self) -> usize {
        self.reconnects
    }

    pub fn status(&self) -> Status {
        match (self.down_since, &self.last_error) {
            (Some(since), Some(e)) => Status::Down {
                for_s: since.elapsed().as_secs_f64(),
                error: e.clone(),
                retry_s: self
                    .next_try
                    .saturating_duration_since(std::time::Instant::now())
                    .as_secs_f64(),
            },
            _ => Status::Up,
        }
    }

    fn fetch(&self) -> Result<Vec<u8>, String> {
        let resp = self.agent.get(&self.url).call().map_err(|e| match e {
            ureq::Error::Status(code, _) => format!("HTTP {code}"),
            ureq::Error::Transport(t) => t.to_string().replace(&self.url, &self.name),
        })?;
        let kind = resp.content_type().to_ascii_lowercase();
        if kind.starts_with("multipart/") {
            return Err(MJPEG.into());
        }
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(MAX_SNAPSHOT + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("reading the snapshot: {e}"))?;
        if bytes.len() as u64 > MAX_SNAPSHOT {
            return Err(format!("the snapshot is larger than {MAX_SNAPSHOT} bytes"));
        }
        if bytes.is_empty() {
            return Err("the snapshot is empty".into());
        }
        Ok(bytes)
    }

    /// A frame when one is due and the fetch works; `Wait` between frames and while down
    /// (outages show in [`SnapshotUrl::status`]). A snapshot URL never ends by itself.
    pub fn poll(&mut self) -> Next {
        let now = std::time::Instant::now();
        if now < self.next_try {
            return Next::Wait;
        }
        match self.fetch() {
            Ok(png) => {
                self.down_since = None;
                self.last_error = None;
                self.backoff = 1.0;
                self.next_try = now + std::time::Duration::from_secs_f64(self.interval);
                Next::Frame(Frame {
                    at: epoch_now(),
                    png,
                })
            }
            Err(e) => {
                if self.down_since.is_none() {
                    self.down_since = Some(now);
                    self.reconnects += 1;
                }
                self.last_error = Some(e);
                self.next_try = now + std::time::Duration::from_secs_f64(self.backoff);
                self.backoff = (self.backoff * 2.0).min(60.0);
                Next::Wait
            }
        }
    }
}

/// A live stream, RTSP/RTSPS or an HTTP(S) MJPEG stream, decoded by ffmpeg on a thread of its
/// own: one frame every `interval` seconds, timed on arrival (seconds since the epoch).
///
/// - **Bounded, newest first.** Only the newest frame waits to be taken. When inspection falls
///   behind, the older waiting frame is dropped and counted ([`LiveStream::dropped`]), so memory
///   stays bounded whatever the camera sends and an alert is never about a stale frame.
/// - **Reconnection.** When the stream ends or fails (ffmpeg exits; a stalled connection times
///   out after 10 s), ffmpeg is started again after 1 s, doubling up to 60 s.
///   [`LiveStream::status`] says whether it is down, and `reconnects` counts the outages.
/// - **Never ends by itself.** Only dropping the source stops it; it kills ffmpeg then.
pub struct LiveStream {
    shared: std::sync::Arc<std::sync::Mutex<LiveShared>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct LiveShared {
    latest: Option<Frame>,
    dropped: usize,
    reconnects: usize,
    /// Since when, why, and when the next attempt is.
    down: Option<(std::time::Instant, String, std::time::Instant)>,
    /// The running ffmpeg: killed from [`LiveStream`]'s drop, waited for by the thread.
    child: Option<Child>,
    missing_program: bool,
}

impl LiveStream {
    /// Starts reading `url`; `name` is how messages name it (credentials redacted).
    pub fn open(url: &str, name: &str, interval: f64) -> Result<LiveStream, SourceError> {
        check_interval(name, interval)?;
        // Fail now, not in the thread, when ffmpeg is not there at all.
        match Command::new("ffmpeg")
            .arg("-version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(SourceError::MissingProgram { program: "ffmpeg" });
            }
            _ => {}
        }
        let shared = std::sync::Arc::new(std::sync::Mutex::new(LiveShared::default()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (url, name) = (url.to_string(), name.to_string());
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("live-stream".into())
                .spawn(move || live_loop(&url, &name, interval, &shared, &stop))
                .map_err(|e| SourceError::Failed {
                    name: "live stream".into(),
                    message: e.to_string(),
                })?
        };
        Ok(LiveStream {
            shared,
            stop,
            thread: Some(thread),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LiveShared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest frame not yet taken, or `Wait`.
    pub fn poll(&mut self) -> Result<Next, SourceError> {
        let mut s = self.lock();
        if s.missing_program {
            return Err(SourceError::MissingProgram { program: "ffmpeg" });
        }
        Ok(s.latest.take().map_or(Next::Wait, Next::Frame))
    }

    /// Frames dropped because a newer one arrived before they were taken.
    pub fn dropped(&self) -> usize {
        self.lock().dropped
    }

    pub fn reconnects(&self) -> usize {
        self.lock().reconnects
    }

    pub fn status(&self) -> Status {
        match &self.lock().down {
            Some((since, error, next)) => Status::Down {
                for_s: since.elapsed().as_secs_f64(),
                error: error.clone(),
                retry_s: next
                    .saturating_duration_since(std::time::Instant::now())
                    .as_secs_f64(),
            },
            None => Status::Up,
        }
    }
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(child) = self.lock().child.as_mut() {
            // Its stdout closes, which ends the thread's read.
            let _ = child.kill();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// ffmpeg's input options for a live `url`: RTSP over TCP (through NAT and firewalls, and no
/// lost packets smearing frames), and a 10 s I/O timeout so that a cut stream ends ffmpeg.
fn live_input(url: &str) -> Vec<std::ffi::OsString> {
    let options: &[&str] = if url.to_ascii_lowercase().starts_with("rtsp") {
        &["-rtsp_transport", "tcp", "-timeout", "10000000"]
    } else {
        &["-rw_timeout", "10000000"]
    };
    options
        .iter()
        .chain(&["-i", url])
        .map(std::ffi::OsString::from)
        .collect()
}

/// ffmpeg decoding one input, one frame every `interval` seconds as PNG on stdout.
struct Ffmpeg {
    child: Child,
    frames: PngStream<BufReader<ChildStdout>>,
    /// Its stderr, drained on its own thread so that a chatty ffmpeg never blocks on a full
    /// pipe.
    stderr: JoinHandle<String>,
}

/// Starts ffmpeg on `input` (`-i` with its options).
fn spawn_ffmpeg(input: &[std::ffi::OsString], interval: f64) -> std::io::Result<Ffmpeg> {
    let mut child = Command::new("ffmpeg")
        .args(["-nostdin", "-hide_banner", "-loglevel", "error"])
        .args(input)
        .args(["-an", "-sn", "-vf"])
        .arg(format!("fps=fps=1/{interval}"))
        .args(["-f", "image2pipe", "-c:v", "png", "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    Ok(Ffmpeg {
        child,
        frames: PngStream::new(BufReader::with_capacity(1 << 20, stdout)),
        stderr,
    })
}

/// The last thing ffmpeg said on stderr (its error, when it failed).
fn last_line(stderr: &str) -> Option<String> {
    stderr
        .trim()
        .lines()
        .last()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}

fn live_loop(
    url: &str,
    name: &str,
    interval: f64,
    shared: &std::sync::Mutex<LiveShared>,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering;
    let lock = || shared.lock().unwrap_or_else(|p| p.into_inner());
    let mut backoff = 1.0f64;
    while !stop.load(Ordering::SeqCst) {
        let Ffmpeg {
            child,
            mut frames,
            stderr,
        } = match spawn_ffmpeg(&live_input(url), interval) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                lock().missing_program = true;
                return;
            }
            Err(e) => {
                went_down(&lock, format!("could not start ffmpeg: {e}"), &mut backoff);
                sleep_unless(stop, backoff);
                continue;
            }
        };
        {
            let mut s = lock();
            s.child = Some(child);
            // A stop that came before the child was visible to drop: kill it here.
            if stop.load(Ordering::SeqCst)
                && let Some(c) = s.child.as_mut()
            {
                let _ = c.kill();
            }
        }
        let ended = loop {
            match frames.next_png() {
                Ok(Some(png)) => {
                    backoff = 1.0;
                    let mut s = lock();
                    s.down = None;
                    if s.latest.is_some() {
                        s.dropped += 1;
                    }
                    s.latest = Some(Frame {
                        at: epoch_now(),
                        png,
                    });
                }
                Ok(None) => break "the stream ended".to_string(),
                Err(e) => break format!("reading ffmpeg's frames: {e}"),
            }
        };
        if let Some(mut child) = lock().child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let said = stderr.join().unwrap_or_default();
        let reason = last_line(&said)
            .map(|l| format!("ffmpeg: {l}"))
            .unwrap_or(ended)
            .replace(url, name);
        if stop.load(Ordering::SeqCst) {
            break;
        }
        went_down(&lock, reason, &mut backoff);
        sleep_unless(stop, backoff);
        backoff = (backoff * 2.0).min(60.0);
    }
}

/// Records an outage (a new one counts as a reconnect) and when the next attempt is.
fn went_down<'a>(
    lock: &impl Fn() -> std::sync::MutexGuard<'a, LiveShared>,
    error: String,
    backoff: &mut f64,
) {
    let now = std::time::Instant::now();
    let mut s = lock();
    let since = match &s.down {
        Some((since, _, _)) => *since,
        None => {
            s.reconnects += 1;
            now
        }
    };
    s.down = Some((
        since,
        error,
        now + std::time::Duration::from_secs_f64(*backoff),
    ));
}

/// Sleeps `seconds` in short steps, returning early when `stop` is set.
fn sleep_unless(stop: &std::sync::atomic::AtomicBool, seconds: f64) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs_f64(seconds);
    while std::time::Instant::now() < until && !stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// What kind of source a command-line or config `source` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// http(s)://: a snapshot URL.
    Http(String),
    /// rtsp:// and rtsps://: a live stream.
    Rtsp(String),
    /// Any other scheme: not read.
    Url(String),
    File(PathBuf),
    Folder(PathBuf),
}

impl SourceKind {
    pub fn of(source: &str) -> SourceKind {
        let lower = source.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            return SourceKind::Http(source.to_string());
        }
        if lower.starts_with("rtsp://") || lower.starts_with("rtsps://") {
            return SourceKind::Rtsp(source.to_string());
        }
        if source.contains("://") {
            return SourceKind::Url(source.to_string());
        }
        let p = PathBuf::from(source);
        if p.is_dir() {
            SourceKind::Folder(p)
        } else {
            SourceKind::File(p)
        }
    }
}

/// Skips frames barely different from the last inspected one: the mean absolute difference of
/// 32 × 32 grey thumbnails, on a 0–255 scale, below `threshold`.
#[derive(Debug, Clone)]
pub struct ChangeGate {
    threshold: f64,
    last: Option<Vec<u8>>,
}

impl ChangeGate {
    /// 0 inspects every frame.
    pub fn new(threshold: f64) -> ChangeGate {
        ChangeGate {
            threshold,
            last: None,
        }
    }

    /// Whether `frame` differs enough from the last frame that passed to be inspected; if so it
    /// becomes the new reference.
    pub fn passes(&mut self, frame: &image::DynamicImage) -> bool {
        let thumb = frame
            .resize_exact(32, 32, image::imageops::FilterType::Triangle)
            .to_luma8()
            .into_raw();
        let differs = match &self.last {
            None => true,
            Some(last) => {
                let total: u64 = last
                    .iter()
                    .zip(&thumb)
                    .map(|(a, b)| u64::from(a.abs_diff(*b)))
                    .sum();
                total as f64 / thumb.len() as f64 >= self.threshold
            }
        };
        if differs {
            self.last = Some(thumb);
        }
        differs
    }
}
