//! `inspector serve` as a real process on loopback: the bad-input battery, `kill -9`
//! durability, graceful shutdown on SIGTERM, keys, and (with chromium) the web page.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

#[path = "../../server/tests/common/multipart.rs"]
mod multipart_body;

#[path = "support/serve.rs"]
mod serve;
use serve::*;

#[path = "../../imaging/tests/support/png_bomb.rs"]
mod png_bomb;
use png_bomb::png_declaring;

#[test]
fn the_bad_input_battery_gets_4xx_json_and_the_server_stays_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let s = Running::start(dir, &[]);
    let inspections = s.url("/api/v1/inspections");
    let mut jpeg = Vec::new();
    image::RgbImage::from_pixel(64, 64, image::Rgb([120, 30, 30]))
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let cut = jpeg[..jpeg.len() * 2 / 3].to_vec();
    let forty_mb: Vec<u8> = (0..40_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let b64 = |b: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(b)
    };
    type Case = (
        &'static str,
        Box<dyn Fn() -> (u16, String)>,
        u16,
        &'static str,
    );
    let url = inspections.clone();
    let mp = move |field: &'static str, name: &'static str, bytes: Vec<u8>| {
        let url = url.clone();
        Box::new(move || {
            let (ct, body) = multipart(field, name, &bytes);
            post(&url, &ct, &body)
        }) as Box<dyn Fn() -> (u16, String)>
    };
    let url = inspections.clone();
    let js = move |body: String| {
        let url = url.clone();
        Box::new(move || post(&url, "application/json", body.as_bytes()))
            as Box<dyn Fn() -> (u16, String)>
    };
    let base = s.base.clone();
    let cases: Vec<Case> = vec![
        (
            "a corrupt JPEG",
            mp("image", "a.jpg", cut),
            422,
            "corrupt_image",
        ),
        (
            "a PNG declaring 50000×50000",
            mp("image", "big.png", png_declaring(50_000, 50_000)),
            413,
            "image_too_large",
        ),
        (
            "text sent as image/png",
            mp("image", "a.png", b"GET / HTTP/1.1 this is text".to_vec()),
            415,
            "unsupported_image",
        ),
        (
            "bad base64",
            js(r#"{"image_base64": "!!! not base64 ???"}"#.into()),
            400,
            "invalid_base64",
        ),
        (
            "a 40 MB body",
            mp("image", "big.bin", forty_mb),
            415,
            "unsupported_image",
        ),
        (
            "a path-traversal file name (accepted, name kept as metadata only)",
            mp("image", "../../../../../tmp/inspector-evil.png", photo(0)),
            201,
            "",
        ),
        (
            "a missing field",
            mp("photo", "a.png", photo(0)),
            422,
            "missing_field",
        ),
        (
            "wrong JSON types",
            js(format!(r#"{{"image_base64": ["{}"]}}"#, b64(&photo(0)))),
            422,
            "invalid_fields",
        ),
        (
            "truncated JSON",
            js(format!(r#"{{"image_base64": "{}"#, b64(&photo(0)))),
            400,
            "invalid_json",
        ),
        (
            "an unknown id",
            Box::new(move || get(&format!("{base}/api/v1/inspections/0000deadbeef"))),
            404,
            "not_found",
        ),
    ];
    for (what, run, status, code) in &cases {
        let (got, body) = run();
        assert_eq!(got, *status, "{what}: {body}");
        if !code.is_empty() {
            let j = json(&body);
            assert_eq!(j["error"]["code"], *code, "{what}: {body}");
            assert!(
                j["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
        assert_eq!(
            get(&s.url("/health")).0,
            200,
            "the server fell over after {what}"
        );
    }
    // On keyless loopback a token that is no stored key is no key (the OpenAI client always
    // sends one): served as anonymous.
    let (code, body) = answer(
        agent()
            .get(&s.url("/api/v1/inspections"))
            .set("Authorization", "Bearer si_not-a-key")
            .call(),
    );
    assert_eq!(code, 200, "{body}");
    // Nothing appeared outside the data dir: the database and hash-named photos only.
    assert!(!Path::new("/tmp/inspector-evil.png").exists());
    for f in files(dir) {
        let ok = f.starts_with("inspector.db")
            || (f.starts_with("data/images/")
                && f.ends_with(".png")
                && f.len() == "data/images/ab/".len() + 68);
        assert!(ok, "unexpected file {f}");
    }
    assert!(s.log().contains("serving on"), "{}", s.log());
    // The access log, in text without colours (stderr is a pipe here).
    let log = s.log();
    assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log}");
    assert!(
        log.lines().any(|l| l.contains("access")
            && l.contains("path=\"/api/v1/inspections\"")
            && l.contains("status=415")),
        "{log}"
    );
}

#[test]
fn the_json_log_has_an_access_line_per_request_and_every_5xx_with_its_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let s = Running::start(dir, &["--log-format", "json"]);
    let (code, body) = inspect(&s, 1);
    assert_eq!(code, 201, "{body}");
    let id = json(&body)["id"].as_str().unwrap().to_string();
    // The stored photo disappears behind the server's back: its download is a 500.
    for f in files(&dir.join("data")) {
        std::fs::remove_file(dir.join("data").join(f)).unwrap();
    }
    let (code, body) = get(&s.url(&format!("/api/v1/inspections/{id}/image")));
    assert_eq!(code, 500, "{body}");
    assert_eq!(get(&s.url("/health?probe=1")).0, 200);
    let started = Instant::now();
    let lines = loop {
        let log = s.log();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(json)
            .collect();
        if lines.iter().any(|l| l["path"] == "/health")
            || started.elapsed() > Duration::from_secs(10)
        {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!s.log().contains('\u{1b}'));
    let access = |method: &str, path: &str, status: u64| {
        lines.iter().any(|l| {
            l["target"] == "access"
                && l["method"] == method
                && l["path"] == path
                && l["status"] == status
                && l["client"] == "127.0.0.1"
                && l["ms"].is_number()
        })
    };
    assert!(access("POST", "/api/v1/inspections", 201), "{lines:?}");
    assert!(
        access("GET", &format!("/api/v1/inspections/{id}/image"), 500),
        "{lines:?}"
    );
    assert!(access("GET", "/health", 200), "{lines:?}");
    // The 500's cause, for the operator (the client got a short message).
    assert!(
        lines.iter().any(|l| l["level"] == "ERROR"
            && l["status"] == 500
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("the stored image") && m.contains("is missing"))),
        "{lines:?}"
    );
}

#[test]
fn kill_9_under_load_loses_no_answered_inspection() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut s = Running::start(dir, &["--no-cache"]);
    let answered = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = s.url("/api/v1/inspections");
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let (answered, stop, url) = (answered.clone(), stop.clone(), url.clone());
            std::thread::spawn(move || {
                let mut i = c;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let (ct, body) = multipart("image", "x.png", &photo(i % 8));
                    let (code, text) = post(&url, &ct, &body);
                    if code == 201 {
                        answered
                            .lock()
                            .unwrap()
                            .push(json(&text)["id"].as_str().unwrap().to_string());
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let started = Instant::now();
    while answered.lock().unwrap().len() < 12 {
        assert!(started.elapsed() < Duration::from_secs(120), "too slow");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL while requests are in flight.
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let ids = answered.lock().unwrap().clone();
    assert!(ids.len() >= 12);
    let s = Running::start(dir, &[]);
    for id in &ids {
        let (code, body) = get(&s.url(&format!("/api/v1/inspections/{id}")));
        assert_eq!(
            code, 200,
            "answered inspection {id} lost after kill -9: {body}"
        );
        assert_eq!(
            get(&s.url(&format!("/api/v1/inspections/{id}/image"))).0,
            200
        );
    }
    eprintln!("{} answered inspections all survived kill -9", ids.len());
}

#[test]
fn sigterm_drains_the_requests_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut s = Running::start(
        dir,
        // A grace that six one-photo inspections fit in on a slow machine.
        &[
            "--no-cache",
            "--max-batch",
            "1",
            "--batch-wait-ms",
            "0",
            "--shutdown-grace",
            "300",
        ],
    );
    let url = s.url("/api/v1/inspections");
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let (ct, body) = multipart("image", "x.png", &photo(i));
                post(&url, &ct, &body)
            })
        })
        .collect();
    // Wait until every request has reached the server (queued, or already answered) with some
    // still queued behind the model, then ask the server to stop.
    let started = Instant::now();
    loop {
        let (_, m) = get(&s.url("/metrics"));
        let sum = |prefix: &str| -> f64 {
            m.lines()
                .filter(|l| l.starts_with(prefix))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let (queued, stored) = (
            sum("inspector_queue_depth "),
            sum("inspector_inspections_total"),
        );
        if queued >= 1.0 && queued + stored >= 5.0 {
            eprintln!("SIGTERM with {queued} queued and {stored} answered");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no queue formed: {m}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let pid = s.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut ids = Vec::new();
    for c in clients {
        let (code, body) = c.join().unwrap();
        assert_eq!(code, 201, "an in-flight request was not finished: {body}");
        ids.push(json(&body)["id"].as_str().unwrap().to_string());
    }
    let status = s.child.wait().unwrap();
    assert!(status.success(), "exit {status:?}: {}", s.log());
    assert!(s.log().contains("shutting down"), "{}", s.log());
    let s = Running::start(dir, &[]);
    for id in &ids {
        assert_eq!(get(&s.url(&format!("/api/v1/inspections/{id}"))).0, 200);
    }
}

#[test]
fn a_model_that_fails_to_load_stops_the_server_with_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("not-a-model")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_inspector"))
        .arg("serve")
        .arg("--model")
        .arg(dir.join("not-a-model"))
        .args(["--addr", "127.0.0.1:0"])
        .arg("--db")
        .arg(dir.join("inspector.db"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("loading the model") && err.contains("not-a-model"),
        "{err}"
    );
}

#[test]
fn keys_are_created_listed_revoked_and_enforced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let db = dir.join("inspector.db");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_inspector"))
            .args(args)
            .arg("--db")
            .arg(&db)
            .output()
            .unwrap()
    };
    let o = run(&["keys", "create", "--name", "gate camera"]);
    assert!(o.status.success());
    let key = String::from_utf8(o.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("si_") && key.len() == 43, "{key}");
    let listed = String::from_utf8(run(&["keys", "list"]).stdout).unwrap();
    assert!(
        listed.contains("gate camera") && listed.contains("active"),
        "{listed}"
    );
    assert!(!listed.contains(&key), "the key itself must not be listed");
    // The database holds only the hash.
    let raw = std::fs::read(&db).unwrap();
    assert!(!raw.windows(key.len()).any(|w| w == key.as_bytes()));

    let s = Running::start(dir, &["--require-keys"]);
    assert_eq!(get(&s.url("/api/v1/rules")).0, 401);
    let with = |k: &str| {
        answer(
            agent()
                .get(&s.url("/api/v1/rules"))
                .set("X-API-Key", k)
                .call(),
        )
        .0
    };
    assert_eq!(with(&key), 200);
    let id = listed.split_whitespace().next().unwrap();
    assert!(run(&["keys", "revoke", id]).status.success());
    assert_eq!(with(&key), 401);
    assert!(!run(&["keys", "revoke", "nope"]).status.success());
    // Anonymous inspections are refused too.
    assert_eq!(inspect(&s, 0).0, 401);
}

/// Headless Chromium driven through chromedriver's WebDriver API (Debian's `chromium` and
/// `chromium-driver`; `.ci/run` installs them).
struct Browser {
    driver: Child,
    wd: String,
    sid: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn open(url: &str) -> Browser {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs");
        let wd = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while get(&format!("{wd}/status")).0 != 200 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let mut b = Browser {
            driver,
            wd,
            sid: String::new(),
            _profile: profile,
        };
        let session = b.call(
            "POST",
            "/session",
            serde_json::json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": "/usr/bin/chromium",
                    "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync",
                             "--window-size=1200,1100",
                             format!("--user-data-dir={}", b._profile.path().display())],
                },
            }}}),
        );
        b.sid = session["sessionId"].as_str().unwrap().to_string();
        b.call("POST", &b.p("/url"), serde_json::json!({ "url": url }));
        b
    }

    fn p(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.sid)
    }

    fn call(&self, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
        let url = format!("{}{path}", self.wd);
        let r = match method {
            "GET" => agent().get(&url).call(),
            "DELETE" => agent().delete(&url).call(),
            _ => agent().post(&url).send_json(body),
        };
        let (code, text) = answer(r);
        assert_eq!(code, 200, "{method} {path}: {text}");
        json(&text)["value"].clone()
    }

    /// The first element matching `css`.
    fn find(&self, css: &str) -> Option<String> {
        let url = format!("{}{}", self.wd, self.p("/elements"));
        let (_, text) = answer(
            agent()
                .post(&url)
                .send_json(serde_json::json!({"using": "css selector", "value": css})),
        );
        json(&text)["value"]
            .as_array()
            .and_then(|a| a.first().cloned())
            .and_then(|e| e.as_object().and_then(|o| o.values().next().cloned()))
            .and_then(|v| v.as_str().map(str::to_string))
    }

    /// Waits until `css` matches (within `seconds`), calling `meanwhile` between looks.
    fn wait_for(&self, css: &str, seconds: u64, mut meanwhile: impl FnMut()) -> String {
        let started = Instant::now();
        loop {
            if let Some(id) = self.find(css) {
                return id;
            }
            assert!(
                started.elapsed() < Duration::from_secs(seconds),
                "nothing matched {css} within {seconds} s"
            );
            meanwhile();
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `js` in the page and returns its result (for what must not hold an element across
    /// a re-render).
    fn script(&self, js: &str) -> serde_json::Value {
        self.call(
            "POST",
            &self.p("/execute/sync"),
            serde_json::json!({ "script": js, "args": [] }),
        )
    }

    fn click(&self, element: &str) {
        self.call(
            "POST",
            &self.p(&format!("/element/{element}/click")),
            serde_json::json!({}),
        );
    }

    fn text(&self, css: &str) -> String {
        let id = self.find(css).unwrap_or_else(|| panic!("no {css}"));
        self.call(
            "GET",
            &self.p(&format!("/element/{id}/text")),
            serde_json::json!({}),
        )
        .as_str()
        .unwrap()
        .to_string()
    }

    /// A screenshot, kept as `target/test-artifacts/NAME`.
    fn screenshot(&self, name: &str) -> Vec<u8> {
        let shot = self.call("GET", &self.p("/screenshot"), serde_json::json!({}));
        let png = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(shot.as_str().unwrap())
                .unwrap()
        };
        let artifacts = root().join("target/test-artifacts");
        std::fs::create_dir_all(&artifacts).unwrap();
        let path = artifacts.join(name);
        std::fs::write(&path, &png).unwrap();
        eprintln!("screenshot: {}", path.display());
        png
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.sid.is_empty() {
            let _ = agent().delete(&format!("{}{}", self.wd, self.p(""))).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Pixels of the risk-high red (#d32f2f) on a screenshot.
fn red_pixels(png: &[u8]) -> usize {
    image::load_from_memory(png)
        .unwrap()
        .to_rgb8()
        .pixels()
        .filter(|p| {
            (p[0] as i32 - 0xd3).abs() < 20
                && (p[1] as i32 - 0x2f).abs() < 20
                && (p[2] as i32 - 0x2f).abs() < 20
        })
        .count()
}

/// Drives the web page in headless Chromium: uploads a photo with the page's file input and
/// waits for the result card with its boxes. The screenshot is kept in
/// `target/test-artifacts/serve-page.png`.
/// Run: `cargo test -p inspector-cli --test serve_cli -- --ignored`.
#[test]
#[ignore = "needs chromium and chromedriver (installed by .ci/run)"]
fn the_web_page_uploads_a_photo_and_shows_its_boxes_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Running::start(tmp.path(), &[]);
    let b = Browser::open(&s.url("/"));
    let input = b.find("#file-input").expect("the page has a file input");
    let photo = photo_path(3).canonicalize().unwrap();
    b.call(
        "POST",
        &b.p(&format!("/element/{input}/value")),
        serde_json::json!({"text": photo.display().to_string()}),
    );
    b.wait_for(".result.done svg rect.box", 60, || {
        assert!(
            b.find(".result.failed").is_none(),
            "the upload failed on the page"
        );
    });
    // The rule text opens on click.
    let rule = b
        .find(".result.done button.rule-link")
        .expect("a cited rule");
    b.click(&rule);
    std::thread::sleep(Duration::from_millis(300));
    let png = b.screenshot("serve-page.png");
    // Chinese by default; the toggle switches the page to English.
    assert_eq!(b.text("#tab-inspect"), "检测");
    b.click(&b.find("#lang-toggle").expect("a language toggle"));
    assert_eq!(b.text("#tab-inspect"), "Inspect");
    // Photo 3's violation is high risk: its red box is on the screenshot.
    let red = red_pixels(&png);
    assert!(red > 100, "red box pixels on the screenshot: {red}");
}

/// The alert page: a real `inspector watch` stores events in the server's database and data
/// dir while the page is open; the alert arrives live over the event stream with its frame,
/// and acknowledging it takes it out of the inbox. The screenshot of the alert as it arrived
/// is kept in `target/test-artifacts/alerts-page.png`.
#[test]
#[ignore = "needs chromium and chromedriver (installed by .ci/run)"]
fn the_alert_page_shows_a_live_alert_arriving_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Running::start(tmp.path(), &[]);
    let b = Browser::open(&s.url("/#/alerts"));
    assert_eq!(b.text("#tab-alerts"), "告警");
    b.wait_for("#alerts-live.on", 30, || {});
    assert!(
        b.find(".alert-card").is_none(),
        "no alert before the camera sees one"
    );
    // A camera uploading snapshots into a folder, watched with the bundled demo model.
    let photos = tmp.path().join("camera");
    std::fs::create_dir(&photos).unwrap();
    let mut watcher = Command::new(env!("CARGO_BIN_EXE_inspector"))
        .args(["watch", "camera", "--interval", "0.5"])
        .arg("--db")
        .arg(tmp.path().join("inspector.db"))
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .current_dir(tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut n = 0;
    b.wait_for(".alert-card", 180, || {
        if n < 60 && (n % 10) == 0 {
            let scene = root().join(format!("examples/scenes/images/{:05}.png", (n / 10) % 2));
            let part = photos.join(format!("{n}.part"));
            std::fs::copy(&scene, &part).unwrap();
            std::fs::rename(&part, photos.join(format!("{n}.png"))).unwrap();
        }
        n += 1;
    });
    b.wait_for(".alert-card .alert-frame img[src^='blob:']", 30, || {});
    b.wait_for("#camera-wall .tile", 10, || {});
    std::thread::sleep(Duration::from_millis(500));
    let png = b.screenshot("alerts-page.png");
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert!(
        red_pixels(&png) > 50,
        "the alert's boxes and badge are on the screenshot"
    );
    // The list is re-rendered as alerts arrive: read and click through scripts, not element
    // references that a re-render makes stale.
    let id = b
        .script("return document.querySelector('.alert-card').dataset.id")
        .as_str()
        .unwrap()
        .to_string();
    let (code, text) = get(&s.url(&format!("/api/v1/events/{id}")));
    assert_eq!(code, 200, "{text}");
    assert!(json(&text)["acked_at"].is_null());
    b.script(&format!(
        "document.querySelector(\".alert-card[data-id='{id}'] button\").click()"
    ));
    let started = Instant::now();
    while b.find(&format!(".alert-card[data-id='{id}']")).is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still in the inbox"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, text) = get(&s.url(&format!("/api/v1/events/{id}")));
    assert_eq!(json(&text)["acked_by"], "local", "{text}");
}

/// `serve --cameras`: the server watches a camera itself (here a folder a camera uploads
/// snapshots into), through its own queue; `/api/v1/cameras` shows the camera's status,
/// counters and latest frame, and its events are served by `/api/v1/events`.
#[test]
fn serve_watches_the_cameras_of_a_cameras_file() {
    let tmp = tempfile::tempdir().unwrap();
    let camera = camera_folder(tmp.path());
    let s = Running::start(tmp.path(), &["--cameras", "cameras.toml"]);
    let cameras = || json(&get(&s.url("/api/v1/cameras")).1);
    let c = cameras();
    assert_eq!(c[0]["name"], "dock");
    assert_eq!(c[0]["status"], "up");
    // Photo 3 (a high-risk violation) arrives twice: 2 of 3 frames make an event.
    let event = feed_until_event(&s, &camera);
    assert_eq!(event["camera"], "dock");
    let c = cameras();
    assert!(c[0]["frames_inspected"].as_u64().unwrap() >= 1, "{c}");
    assert!(c[0]["events"].as_u64().unwrap() >= 1, "{c}");
    assert!(c[0]["last_frame_at"].is_string(), "{c}");
    let frame_url = c[0]["frame_url"].as_str().unwrap();
    let frame = agent().get(&s.url(frame_url)).call().unwrap();
    assert_eq!(frame.content_type(), "image/jpeg");
    let (code, _) = get(&s.url("/api/v1/cameras/7/frame"));
    assert_eq!(code, 404);
    // The same per camera in Prometheus' format.
    let (_, metrics) = get(&s.url("/metrics"));
    let value = |line_start: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in\n{metrics}"))
    };
    assert!(value("inspector_camera_frames{camera=\"dock\",kind=\"inspected\"}") >= 1.0);
    assert!(value("inspector_camera_events{camera=\"dock\"}") >= 1.0);
    assert_eq!(value("inspector_camera_up{camera=\"dock\"}"), 1.0);
    assert!(
        value("inspector_camera_event_latency_seconds{camera=\"dock\",quantile=\"0.5\"}") > 0.0
    );
}

/// What a finding says, for comparing two servers' answers about one photo.
fn violations_of(finding: &serde_json::Value) -> Vec<serde_json::Value> {
    finding["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            serde_json::json!([
                v["description"],
                v["rule"],
                v["risk"],
                v["suggestion"],
                v["box"],
                v["resolved"]["id"]
            ])
        })
        .collect()
}

/// `serve --backend openai` with another `inspector serve` (the bundled demo model) as its
/// engine: the same findings as the engine's own local inspection of the example scenes; with
/// the engine killed, inspections answer 503 within a second and nothing is stored, and `/ready`
/// says so; once the engine is back, inspections succeed again.
#[test]
fn a_remote_engine_gives_the_local_findings_and_an_outage_answers_503() {
    let engine_dir = tempfile::tempdir().unwrap();
    let front_dir = tempfile::tempdir().unwrap();
    let local = ["--addr", "127.0.0.1:0"].map(std::ffi::OsString::from);
    let mut engine = Running::spawn(engine_dir.path(), &local);
    let port = engine.base.rsplit(':').next().unwrap().to_string();
    let remote: Vec<std::ffi::OsString> = [
        "--addr",
        "127.0.0.1:0",
        "--backend",
        "openai",
        "--backend-url",
        &format!("{}/v1", engine.base),
        "--backend-model",
        "demo",
        "--backend-prompt",
        "brief",
    ]
    .map(Into::into)
    .to_vec();
    let front = Running::spawn(front_dir.path(), &remote);
    assert!(
        front.log().contains("the model is demo at"),
        "{}",
        front.log()
    );
    let scenes = root().join("examples/scenes/images");
    let mut names: Vec<_> = std::fs::read_dir(&scenes)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut violations = 0;
    for name in &names {
        let bytes = std::fs::read(scenes.join(name)).unwrap();
        let (ct, body) = multipart("image", name, &bytes);
        let (code, here) = post(&engine.url("/api/v1/inspections"), &ct, &body);
        assert_eq!(code, 201, "{here}");
        let (code, there) = post(&front.url("/api/v1/inspections"), &ct, &body);
        assert_eq!(code, 201, "{there}");
        let (here, there) = (json(&here), json(&there));
        assert_eq!(
            here["finding"]["status"], there["finding"]["status"],
            "{name}"
        );
        assert_eq!(
            violations_of(&here["finding"]),
            violations_of(&there["finding"]),
            "{name}: {}\nvs\n{}",
            here["finding"]["raw"],
            there["finding"]["raw"]
        );
        violations += here["finding"]["violations"].as_array().unwrap().len();
    }
    assert!(violations > 0, "the scenes show violations");
    // The engine goes down: fresh photos (not in the cache) fail fast, and nothing is stored.
    let fresh = front_dir.path().join("fresh");
    let made = Command::new(env!("CARGO_BIN_EXE_inspector"))
        .args([
            "synth", "--n", "3", "--seed", "4242", "--size", "320", "--out",
        ])
        .arg(&fresh)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let fresh_photo = |i: usize| std::fs::read(fresh.join(format!("images/{i:05}.png"))).unwrap();
    let before = stored_ids(&front);
    engine.child.kill().unwrap();
    engine.child.wait().unwrap();
    for i in 0..2 {
        let (ct, body) = multipart("image", "fresh.png", &fresh_photo(i));
        let started = Instant::now();
        let response = agent()
            .post(&front.url("/api/v1/inspections"))
            .set("Content-Type", &ct)
            .send_bytes(&body);
        let took = started.elapsed();
        match response {
            Err(ureq::Error::Status(503, r)) => {
                assert!(r.header("Retry-After").is_some());
                let text = r.into_string().unwrap();
                assert_eq!(json(&text)["error"]["code"], "engine_unavailable", "{text}");
            }
            other => panic!("expected 503, got {:?}", other.map(|r| r.status())),
        }
        // At once, not after the engine client's 120 s timeout (retries and connects included:
        // a slow machine takes a few seconds).
        assert!(took < Duration::from_secs(10), "503 after {took:?}");
    }
    assert_eq!(get(&front.url("/ready")).0, 503);
    assert_eq!(
        stored_ids(&front),
        before,
        "nothing is stored while the engine is down"
    );
    // The engine returns on the same port: inspections succeed again.
    let again: Vec<std::ffi::OsString> = ["--addr", &format!("127.0.0.1:{port}")]
        .map(Into::into)
        .to_vec();
    let _engine = Running::spawn(engine_dir.path(), &again);
    // Ready once its probe of the engine (1 s timeout) answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&front.url("/ready")).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready 60 s after the engine returned"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let started = Instant::now();
    loop {
        let (ct, body) = multipart("image", "fresh.png", &fresh_photo(2));
        let (code, text) = post(&front.url("/api/v1/inspections"), &ct, &body);
        if code == 201 {
            break;
        }
        assert_eq!(code, 503, "{text}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still failing after the engine returned: {text}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(stored_ids(&front).len(), before.len() + 1);
}
