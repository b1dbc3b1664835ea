//! A server on the tiny checkpoint with the overfitted adapter of the training tests (its
//! answers parse and carry boxes), over a fresh database holding the example regulations.

#![allow(dead_code)]

use std::{
    path::PathBuf,
    sync::mpsc::{Receiver, channel},
};

use axum::{
    Router,
    body::Body,
    http::{HeaderMap, Request, StatusCode},
};
use http_body_util::BodyExt;
use inspector_detect::{DetectConfig, Detector};
use inspector_server::{Server, ServerConfig};
use inspector_store::DocumentRecord;
use tower::ServiceExt;

#[path = "../../../imaging/tests/support/png_bomb.rs"]
mod png_bomb;
#[allow(unused_imports)]
pub use png_bomb::png_declaring;
mod multipart;
pub use multipart::{Part, multipart};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn photo(i: usize) -> Vec<u8> {
    std::fs::read(root().join(format!("crates/train/tests/fixtures/overfit/data/{i}.png"))).unwrap()
}

pub fn load_detector() -> anyhow::Result<Detector> {
    let tiny = root().join("crates/qwen2vl/tests/fixtures/tiny-a");
    let adapter = root().join("crates/train/tests/fixtures/overfit/adapter");
    let config = DetectConfig {
        max_new_tokens: 160,
        ..Default::default()
    };
    Ok(Detector::load(
        &tiny,
        Some(&adapter),
        &inspector_detect::Backend::cpu(),
        config,
    )?)
}

/// Stores an extracted document (replacing one of the same title).
pub fn store_document(store: &mut dyn inspector_store::Store, doc: &inspector_rules::Document) {
    let record = DocumentRecord {
        title: doc.title.clone(),
        file: doc.file.clone(),
        sha256: doc.sha256.clone(),
    };
    store
        .replace_document(&record, &doc.rules, &doc.diagnostics)
        .unwrap();
}

/// Fills a database with the bundled example regulations.
pub fn seed_rules(db: &str) {
    let mut store = inspector_store::open(db).unwrap();
    let c = inspector_rules::Categorizer::default();
    for e in std::fs::read_dir(root().join("examples/regulations")).unwrap() {
        let doc = inspector_rules::extract_file(&e.unwrap().path(), &c).unwrap();
        store_document(store.as_mut(), &doc);
    }
}

/// A fresh database for a test: a SQLite file in `dir`, or with `INSPECTOR_TEST_DB=postgres`
/// a database on the tests' PostgreSQL server.
pub fn test_database(dir: &std::path::Path) -> String {
    match std::env::var("INSPECTOR_TEST_DB").as_deref() {
        Ok("postgres") => inspector_store::testing::postgres().fresh_database(),
        Ok("sqlite") | Err(_) => dir.join("inspector.db").display().to_string(),
        Ok(other) => panic!("INSPECTOR_TEST_DB={other}: use sqlite or postgres"),
    }
}

/// Opens a test server's database (either kind).
pub fn open_db(db: &str) -> Box<dyn inspector_store::Store> {
    inspector_store::open(db).unwrap()
}

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub server: Server,
    pub app: Router,
}

impl TestServer {
    /// A server's settings over `dir`: its database is a SQLite file there, or with
    /// `INSPECTOR_TEST_DB=postgres` a fresh database on the tests' PostgreSQL server (`.ci/run`
    /// runs the API suites both ways).
    pub fn config(dir: &tempfile::TempDir) -> ServerConfig {
        let mut config = ServerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            dir.path().join("inspector.db"),
            dir.path().join("data"),
        );
        config.db = test_database(dir.path());
        config
    }

    /// A loaded server with `config` adjusted by `tweak`.
    pub fn start(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Self::config(&dir);
        tweak(&mut config);
        seed_rules(&config.db);
        let server = Server::start(config, load_detector).unwrap();
        server.wait_until_loaded().unwrap();
        let app = inspector_server::router(server.state());
        TestServer { dir, server, app }
    }

    /// A server whose model load waits until the returned sender is used.
    pub fn start_gated(
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> (TestServer, std::sync::mpsc::Sender<()>) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Self::config(&dir);
        tweak(&mut config);
        seed_rules(&config.db);
        let (go, wait): (_, Receiver<()>) = channel();
        let server = Server::start(config, move || {
            wait.recv().ok();
            load_detector()
        })
        .unwrap();
        let app = inspector_server::router(server.state());
        (TestServer { dir, server, app }, go)
    }

    pub async fn call(&self, req: Request<Body>) -> Reply {
        let response = self.app.clone().oneshot(req).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, uri: &str) -> Reply {
        self.call(Request::get(uri).body(Body::empty()).unwrap())
            .await
    }

    pub async fn post_json(&self, uri: &str, json: &str) -> Reply {
        self.call(
            Request::post(uri)
                .header("content-type", "application/json")
                .body(Body::from(json.to_string()))
                .unwrap(),
        )
        .await
    }

    pub async fn post_multipart(&self, uri: &str, parts: &[Part<'_>]) -> Reply {
        let (content_type, body) = multipart(parts);
        self.call(
            Request::post(uri)
                .header("content-type", content_type)
                .body(Body::from(body))
                .unwrap(),
        )
        .await
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}), status {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts an error answer: this status and a JSON body `{"error": {"code", "message"}}`.
    pub fn assert_error(&self, status: u16, code: &str) {
        let j = self.json();
        assert_eq!(self.status.as_u16(), status, "{j}");
        assert_eq!(j["error"]["code"], code, "{j}");
        assert!(!j["error"]["message"].as_str().unwrap().is_empty());
    }
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A JPEG whose scan is cut off (valid header, no end).
pub fn corrupt_jpeg() -> Vec<u8> {
    let mut jpeg = Vec::new();
    image::RgbImage::from_pixel(64, 64, image::Rgb([120, 30, 30]))
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    jpeg.truncate(jpeg.len() * 2 / 3);
    jpeg
}

/// Waits, when the calendar minute is about to end, until the next one has begun: limits
/// counted in the database (replicas on PostgreSQL) use one-minute windows, and a test of them
/// must not straddle two. The test gets at least 20 s (a slow machine's requests on PostgreSQL).
pub fn clear_of_a_minute_boundary() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into = now.as_millis() % 60_000;
    if into > 40_000 {
        std::thread::sleep(std::time::Duration::from_millis(
            (60_000 - into + 100) as u64,
        ));
    }
}
