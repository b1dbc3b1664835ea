//! Webhooks: every stored event is POSTed as JSON to each webhook URL, at least once, signed.
//!
//! Delivery is derived from what is stored, so nothing is lost when the watcher dies (even by
//! `kill -9`):
//! - an event is first stored as `EVENTS/<id>.json` (with its frame, `EVENTS/<id>.jpg`);
//! - each webhook keeps `WEBHOOKS/<h>.since` (when it was first configured, epoch ms) and
//!   `WEBHOOKS/<h>.delivered` (the ids it acknowledged with a 2xx, one a line, synced), where
//!   `<h>` is a hash of its URL;
//! - an event is pending for a webhook when it was stored at or after `since` and its id is not
//!   in `delivered`. On start the pending ones are sent first, oldest first.
//!
//! A failed POST (no answer in 10 s, or a status other than 2xx) is retried after 1 s, 2 s, 4 s,
//! … up to 60 s, for as long as the watcher runs; the receiver may get an id more than once (a
//! crash between its 2xx and our record) and drops repeats by `X-Inspector-Event`.
//!
//! Each request carries:
//! - `X-Inspector-Event: <id>`;
//! - `X-Inspector-Timestamp: <seconds since the epoch>`;
//! - with a secret, `X-Inspector-Signature: sha256=<hex>`, the HMAC-SHA256 under the secret
//!   of `<timestamp>.<body>`. The receiver recomputes it over the raw body and compares in
//!   constant time, and refuses old timestamps to stop replays.

use std::{
    collections::HashSet,
    io::Write,
    path::{Path, PathBuf},
    sync::mpsc::{self, Receiver, RecvTimeoutError, Sender},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// One webhook: where events go and the secret that signs them.
#[derive(Clone)]
pub struct Webhook {
    pub url: String,
    pub secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret, and never the URL's credentials.
        f.debug_struct("Webhook")
            .field("url", &crate::config::redact(&self.url))
            .field("signed", &self.secret.is_some())
            .finish()
    }
}

/// `sha256=<hex>`: HMAC-SHA256 under `secret` of `<timestamp>.<body>`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    format!("sha256={}", hex(&tag))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> u64 {
    (crate::source::epoch_now() * 1000.0) as u64
}

/// What one webhook did in a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// The URL, credentials redacted.
    pub url: String,
    pub delivered: usize,
    /// Failed attempts (each retried later).
    pub failures: usize,
    /// Events still undelivered when the run ended (sent on the next start).
    pub pending: usize,
}

/// The delivery threads, one per webhook.
pub struct Deliverer {
    senders: Vec<Sender<Msg>>,
    threads: Vec<JoinHandle<Stats>>,
}

enum Msg {
    Stored(String),
    Finish(Instant),
}

/// The stored record of event `id` in `events_dir`.
pub fn record_path(events_dir: &Path, id: &str) -> PathBuf {
    events_dir.join(format!("{id}.json"))
}

impl Deliverer {
    /// Starts delivering to `webhooks` the events stored in `events_dir`, keeping each
    /// webhook's state in `state_dir`. Events stored before a webhook was first configured
    /// are not sent to it; undelivered ones from earlier runs are sent first.
    pub fn start(
        webhooks: Vec<Webhook>,
        events_dir: &Path,
        state_dir: &Path,
    ) -> std::io::Result<Deliverer> {
        std::fs::create_dir_all(state_dir)?;
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        for hook in webhooks {
            let key = hex(&Sha256::digest(hook.url.as_bytes()))[..16].to_string();
            let since_path = state_dir.join(format!("{key}.since"));
            let since: u64 = match std::fs::read_to_string(&since_path) {
                Ok(text) => text.trim().parse().map_err(|_| {
                    std::io::Error::other(format!("{}: not a time", since_path.display()))
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let now = now_ms();
                    std::fs::write(&since_path, format!("{now}\n"))?;
                    now
                }
                Err(e) => return Err(e),
            };
            let log_path = state_dir.join(format!("{key}.delivered"));
            let delivered: HashSet<String> = match std::fs::read_to_string(&log_path) {
                Ok(text) => text.lines().map(str::to_string).collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
                Err(e) => return Err(e),
            };
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)?;
            let backlog = pending(events_dir, since, &delivered)?;
            let (tx, rx) = mpsc::channel();
            let worker = Worker {
                agent: ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(10))
                    .build(),
                name: crate::config::redact(&hook.url),
                hook,
                events_dir: events_dir.to_path_buf(),
                log,
                queue: backlog.into(),
                stats: Stats::default(),
            };
            threads.push(
                std::thread::Builder::new()
                    .name("webhook".into())
                    .spawn(move || worker.run(rx))?,
            );
            senders.push(tx);
        }
        Ok(Deliverer { senders, threads })
    }

    /// Queues event `id`, already stored as [`record_path`], for every webhook.
    pub fn stored(&self, id: &str) {
        for tx in &self.senders {
            // A worker that is gone has panicked; its thread's join reports it.
            let _ = tx.send(Msg::Stored(id.to_string()));
        }
    }

    /// Delivers what it can until `grace` has passed, then stops; what is left stays pending
    /// for the next start.
    pub fn finish(self, grace: Duration) -> Vec<Stats> {
        let deadline = Instant::now() + grace;
        for tx in &self.senders {
            let _ = tx.send(Msg::Finish(deadline));
        }
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap_or_default())
            .collect()
    }
}

/// The ids of stored events at or after `since` (epoch ms) not in `delivered`, oldest first.
fn pending(
    events_dir: &Path,
    since: u64,
    delivered: &HashSet<String>,
) -> std::io::Result<Vec<String>> {
    let mut found: Vec<(u64, String)> = Vec::new();
    let entries = match std::fs::read_dir(events_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        if delivered.contains(id) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let stored_at = record["stored_at_ms"].as_u64().unwrap_or(0);
        if stored_at >= since {
            found.push((stored_at, id.to_string()));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, id)| id).collect())
}

struct Worker {
    agent: ureq::Agent,
    hook: Webhook,
    name: String,
    events_dir: PathBuf,
    log: std::fs::File,
    queue: std::collections::VecDeque<String>,
    stats: Stats,
}

impl Worker {
    fn run(mut self, rx: Receiver<Msg>) -> Stats {
        let mut backoff = Duration::from_secs(1);
        let mut retry_at: Option<Instant> = None;
        let mut deadline: Option<Instant> = None;
        loop {
            // Asked to finish and nothing left to send: done, without waiting out the grace.
            if deadline.is_some() && self.queue.is_empty() {
                break;
            }
            // Take in newly stored events; wait when there is nothing to do now.
            let wait = match (self.queue.front(), retry_at) {
                (None, _) => deadline.map(|d| d.saturating_duration_since(Instant::now())),
                (Some(_), Some(at)) => Some(at.saturating_duration_since(Instant::now())),
                (Some(_), None) => Some(Duration::ZERO),
            };
            let msg = match wait {
                Some(w) => rx.recv_timeout(w),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match msg {
                Ok(Msg::Stored(id)) => {
                    if !self.queue.contains(&id) {
                        self.queue.push_back(id);
                    }
                    continue;
                }
                Ok(Msg::Finish(d)) => {
                    deadline = Some(d);
                    // Retry at once in the grace period, not after a long backoff.
                    retry_at = retry_at.map(|at| at.min(d));
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) if deadline.is_none() => {
                    deadline = Some(Instant::now());
                }
                Err(_) => {}
            }
            if deadline.is_some_and(|d| Instant::now() >= d) || self.queue.is_empty() {
                if deadline.is_some() {
                    break;
                }
                continue;
            }
            if retry_at.is_some_and(|at| Instant::now() < at) {
                continue;
            }
            let id = self.queue.front().expect("checked above").clone();
            match self.send(&id) {
                Ok(()) => {
                    self.queue.pop_front();
                    self.stats.delivered += 1;
                    backoff = Duration::from_secs(1);
                    retry_at = None;
                }
                Err(e) => {
                    self.stats.failures += 1;
                    eprintln!(
                        "webhook {}: event {id}: {e}; retrying in {} s",
                        self.name,
                        backoff.as_secs()
                    );
                    let at = Instant::now() + backoff;
                    retry_at = Some(deadline.map_or(at, |d| at.min(d)));
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
        self.stats.url = self.name.clone();
        self.stats.pending = self.queue.len();
        self.stats
    }

    /// One POST of event `id`; on a 2xx the id is recorded (synced) as delivered.
    fn send(&mut self, id: &str) -> Result<(), String> {
        let path = record_path(&self.events_dir, id);
        let body = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let timestamp = now_ms() / 1000;
        let mut request = self
            .agent
            .post(&self.hook.url)
            .set("Content-Type", "application/json")
            .set("X-Inspector-Event", id)
            .set("X-Inspector-Timestamp", &timestamp.to_string());
        if let Some(secret) = &self.hook.secret {
            request = request.set(
                "X-Inspector-Signature",
                &signature(secret, timestamp, &body),
            );
        }
        match request.send_bytes(&body) {
            Ok(_) => {
                writeln!(self.log, "{id}")
                    .and_then(|()| self.log.sync_data())
                    .map_err(|e| format!("recording the delivery: {e}"))?;
                Ok(())
            }
            Err(ureq::Error::Status(code, _)) => Err(format!("HTTP {code}")),
            Err(ureq::Error::Transport(t)) => {
                Err(t.to_string().replace(&self.hook.url, &self.name))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2 ("Jefe"), with the message split as `<timestamp>.<body>`
        // would not be a standard vector; so check against a direct computation instead.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            "RFC 4231, test case 2"
        );
        let s = signature(b"key", 1_700_000_000, b"{\"id\":\"x\"}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        mac.update(b"1700000000.{\"id\":\"x\"}");
        assert_eq!(s, format!("sha256={}", hex(&mac.finalize().into_bytes())));
    }

    #[test]
    fn pending_events_are_those_stored_since_and_not_delivered_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        for (id, at) in [("b", 2000u64), ("a", 3000), ("old", 500), ("done", 2500)] {
            std::fs::write(
                record_path(dir.path(), id),
                serde_json::json!({"id": id, "stored_at_ms": at}).to_string(),
            )
            .unwrap();
        }
        std::fs::write(dir.path().join("b.jpg"), b"jpeg").unwrap();
        let delivered = HashSet::from(["done".to_string()]);
        assert_eq!(pending(dir.path(), 1000, &delivered).unwrap(), ["b", "a"]);
    }
}
