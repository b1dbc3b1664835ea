//! Running `inspector serve` as a process on loopback and talking to it, for the CLI's
//! server tests (`serve_cli`, `scale_out`).
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn photo_path(i: usize) -> PathBuf {
    root().join(format!("crates/train/tests/fixtures/overfit/data/{i}.png"))
}

pub fn photo(i: usize) -> Vec<u8> {
    std::fs::read(photo_path(i)).unwrap()
}

pub struct Running {
    pub child: Child,
    pub base: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Running {
    /// Starts `inspector serve` on a free loopback port over `dir` (database and data dir) and
    /// waits until the model is loaded.
    pub fn start(dir: &Path, extra: &[&str]) -> Running {
        let mut args: Vec<std::ffi::OsString> = vec![
            "--model".into(),
            root().join("crates/qwen2vl/tests/fixtures/tiny-a").into(),
            "--adapter".into(),
            root()
                .join("crates/train/tests/fixtures/overfit/adapter")
                .into(),
            "--addr".into(),
            "127.0.0.1:0".into(),
            "--max-new-tokens".into(),
            "160".into(),
        ];
        args.extend(extra.iter().map(Into::into));
        Running::spawn(dir, &args)
    }

    /// Starts `inspector serve ARGS` over `dir` and waits until it is ready.
    /// The database and data dir are `dir`'s unless ARGS name others.
    pub fn spawn(dir: &Path, args: &[std::ffi::OsString]) -> Running {
        Running::spawn_with_env(dir, args, &[])
    }

    /// As [`Running::spawn`], with these environment variables set for the server.
    pub fn spawn_with_env(
        dir: &Path,
        args: &[std::ffi::OsString],
        env: &[(String, String)],
    ) -> Running {
        let mut command = Command::new(env!("CARGO_BIN_EXE_inspector"));
        command.arg("serve");
        command.envs(env.iter().map(|(k, v)| (k, v)));
        if !args.iter().any(|a| a == "--db") {
            command.arg("--db").arg(dir.join("inspector.db"));
        }
        if !args.iter().any(|a| a == "--data-dir") {
            command.arg("--data-dir").arg(dir.join("data"));
        }
        let mut child = command
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("serving on http://") {
                    let addr = rest.split_whitespace().next().unwrap().to_string();
                    let _ = tx.send(addr);
                }
                log2.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the server did not start: {:?}", log.lock().unwrap()));
        let running = Running {
            child,
            base: format!("http://{addr}"),
            log,
        };
        let started = Instant::now();
        while get(&running.url("/ready")).0 != 200 {
            assert!(started.elapsed() < Duration::from_secs(60), "not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        running
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

pub fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, String) {
    match r {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

pub fn get(url: &str) -> (u16, String) {
    answer(agent().get(url).call())
}

pub fn post(url: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    answer(
        agent()
            .post(url)
            .set("Content-Type", content_type)
            .send_bytes(body),
    )
}

/// A multipart body with one file field.
pub fn multipart(field: &str, filename: &str, bytes: &[u8]) -> (String, Vec<u8>) {
    crate::multipart_body::multipart(&[(field, Some(filename), bytes)])
}

pub fn inspect(server: &Running, i: usize) -> (u16, String) {
    let (ct, body) = multipart("image", &format!("{i}.png"), &photo(i));
    post(&server.url("/api/v1/inspections"), &ct, &body)
}

pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Every file under `dir`, relative.
pub fn files(dir: &Path) -> Vec<String> {
    pub fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The inspections `server` has stored (at most 200).
pub fn stored_ids(server: &Running) -> Vec<String> {
    let (code, body) = get(&server.url("/api/v1/inspections?limit=200"));
    assert_eq!(code, 200, "{body}");
    json(&body)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}
/// `inspector ARGS` to completion; panics with its output when it fails.
pub fn inspector_ok(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_inspector"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "inspector {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A camera `dock` watching the folder `dir/camera` (one frame every half second), written as
/// `dir/cameras.toml` for `serve --cameras cameras.toml`; returns the folder.
pub fn camera_folder(dir: &Path) -> PathBuf {
    let camera = dir.join("camera");
    std::fs::create_dir(&camera).unwrap();
    std::fs::write(
        dir.join("cameras.toml"),
        "[[camera]]\nname = \"dock\"\nsource = \"camera\"\ninterval = 0.5\n",
    )
    .unwrap();
    camera
}

/// Drops photo 3 (a high-risk violation) into the camera folder, a frame at a time, until the
/// server lists an event (2 of 3 frames make one); returns the newest event.
pub fn feed_until_event(server: &Running, camera: &Path) -> serde_json::Value {
    let started = Instant::now();
    let mut n = 0;
    loop {
        let events = json(&get(&server.url("/api/v1/events")).1);
        if let Some(e) = events["items"].as_array().unwrap().first() {
            return e.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no event: {}\n{}",
            get(&server.url("/api/v1/cameras")).1,
            server.log()
        );
        if n < 6 {
            let part = camera.join(format!("{n}.part"));
            std::fs::write(&part, photo(3)).unwrap();
            std::fs::rename(&part, camera.join(format!("{n}.png"))).unwrap();
            n += 1;
        }
        std::thread::sleep(Duration::from_millis(700));
    }
}
