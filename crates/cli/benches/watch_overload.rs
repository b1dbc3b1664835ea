//! Camera overload: 8 RTSP streams at 5 frames a second into `inspector watch` with the bundled
//! demo model, for a minute (`WATCH_BENCH_SECONDS`), far more frames than 2 cores inspect.
//! Reported: frames read, inspected and dropped per camera, events, the frame-to-event latency
//! (p50 and p99 over every event; the cameras file sets k = 1 of 1 and a 1 s cooldown, so that
//! a minute gives many events), and the watcher's peak RSS, sampled at the start of the load and
//! at its end: bounded memory means the two stay close while frames keep coming.
//!
//! Needs ffmpeg and the RTSP test server:
//!
//! ```text
//! cargo build -p inspector-rtsp-test-server --features gst
//! cargo bench -p inspector-cli --bench watch_overload
//! ```

use std::{
    io::BufRead,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const STREAMS: usize = 8;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// VmHWM (peak resident set) and VmRSS of a process, in MB.
fn memory_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds: u64 = std::env::var("WATCH_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let server = std::env::var_os("RTSP_TEST_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/debug/inspector-rtsp-test-server"));
    assert!(
        server.is_file(),
        "build the RTSP test server first: cargo build -p inspector-rtsp-test-server --features gst"
    );
    let work = tempfile::tempdir().unwrap();
    // Eight cameras, each its own server process, looking at different example scenes.
    let mut servers = Vec::new();
    let mut urls = Vec::new();
    for i in 0..STREAMS {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let image = root().join(format!("examples/scenes/images/{:05}.png", i % 6));
        let mut child = Command::new(&server)
            .arg(port.to_string())
            .arg(&image)
            .arg("5")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("rtsp://"), "{line}");
        urls.push(line.trim().to_string());
        servers.push(child);
    }
    let mut config = String::from("[defaults]\ninterval = 0.2\nk = 1\nm = 1\ncooldown = 1\n");
    for (i, url) in urls.iter().enumerate() {
        config.push_str(&format!(
            "\n[[camera]]\nname = \"cam-{i}\"\nsource = \"{url}\"\n"
        ));
    }
    std::fs::write(work.path().join("cameras.toml"), config).unwrap();
    let mut watcher = Command::new(env!("CARGO_BIN_EXE_inspector"))
        .args([
            "watch",
            "--config",
            "cameras.toml",
            "--events",
            "events.jsonl",
        ])
        // Still images: without this the change gate would repeat nearly every frame.
        .args(["--change-threshold", "0"])
        .current_dir(work.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = watcher.id();
    let stderr = watcher.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // The load starts with the first event (the model is loaded and frames flow).
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(300))
            .expect("an event within 5 minutes");
        if line.starts_with("event ") {
            break;
        }
    }
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let (early_peak, early_rss) = memory_mb(pid);
    std::thread::sleep(Duration::from_secs(seconds.saturating_sub(10)));
    let (peak, rss) = memory_mb(pid);
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = watcher.wait().unwrap();
    let stderr = reader.join().unwrap();
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    assert!(status.success(), "{stderr}");
    let load_s = started.elapsed().as_secs_f64();

    // Per camera: the summary line; overall: every event's latency from the events file.
    let summaries: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("camera \"cam-") && l.contains(" frames read"))
        .collect();
    assert_eq!(summaries.len(), STREAMS, "{stderr}");
    let number_before = |line: &str, what: &str| -> usize {
        let i = line
            .find(what)
            .unwrap_or_else(|| panic!("{what} in {line}"));
        line[..i]
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let total = |what: &str| -> usize { summaries.iter().map(|l| number_before(l, what)).sum() };
    let (read, inspected, dropped) = (
        total(" frames read"),
        total(" inspected"),
        total(" dropped"),
    );
    let events = std::fs::read_to_string(work.path().join("events.jsonl")).unwrap();
    // The latency of each event: from the frame's arrival (`at`) to the event's record.
    let mut latencies: Vec<f64> = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|e| {
            let id = e["id"].as_str()?;
            let record: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(work.path().join(format!("data/events/{id}.json")))
                    .ok()?,
            )
            .ok()?;
            Some(record["stored_at_ms"].as_f64()? / 1000.0 - e["at"].as_f64()?)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    assert!(!latencies.is_empty(), "no events:\n{stderr}");
    println!(
        "{STREAMS} RTSP streams at 5 frames/s for {load_s:.0} s into the demo model \
         (k = 1 of 1, cooldown 1 s)"
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!("| frames read (taken from the streams' newest-frame slots) | {read} |");
    println!("| frames inspected | {inspected} |");
    println!("| frames dropped (a newer one came first) | {dropped} |");
    println!("| events | {} |", latencies.len());
    println!(
        "| frame-to-event latency p50 / p99 | {:.2} s / {:.2} s |",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    println!("| watcher RSS 10 s into the load / at its end | {early_rss:.0} MB / {rss:.0} MB |");
    println!(
        "| watcher peak RSS 10 s into the load / at its end | {early_peak:.0} MB / {peak:.0} MB |"
    );
    for l in &summaries {
        println!("{l}");
    }
}
