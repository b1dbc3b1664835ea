//! What an outside probe of `inspector serve` found (issue 23), one test per finding: cache
//! hits and chat limits that do not wait for the model, slow clients and the shutdown
//! deadline on a real socket, keep-alive after early refusals, Host and Origin checks, stale
//! temp files, authentication details, error shapes, filenames, and a real OpenAI client.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::ConnectInfo,
    http::{Method, Request},
};
use common::*;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A server on a real loopback socket.
struct Live {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    state: inspector_server::AppState,
    _dir: tempfile::TempDir,
}

impl Live {
    async fn start(tweak: impl FnOnce(&mut inspector_server::ServerConfig)) -> Live {
        Self::from(TestServer::start(tweak)).await
    }

    async fn from(s: TestServer) -> Live {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let TestServer { dir, server, .. } = s;
        let state = server.state();
        let serving = tokio::spawn(server.serve(listener, async {
            let _ = stopped.await;
        }));
        Live {
            addr,
            stop: Some(stop),
            serving: Some(serving),
            state,
            _dir: dir,
        }
    }

    /// Stops the server and says how long `serve` took to return.
    async fn shut_down(&mut self) -> Duration {
        let started = Instant::now();
        self.stop.take().unwrap().send(()).unwrap();
        self.serving.take().unwrap().await.unwrap().unwrap();
        started.elapsed()
    }
}

/// An answer read off a raw connection.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}\n{}",
                self.head,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.head);
        assert_eq!(self.json()["error"]["code"], code, "{}", self.head);
    }
}

/// Reads one answer (head, then `content-length` bytes) within 10 s.
async fn read_answer(conn: &mut TcpStream) -> Raw {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "closed before an answer: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let status = head[9..12].parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < length {
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed inside a body");
            body.extend_from_slice(&chunk[..n]);
        }
        Raw { status, head, body }
    })
    .await
    .expect("an answer within 10 s")
}

async fn send(addr: SocketAddr, request: &[u8]) -> (TcpStream, Raw) {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(request).await.unwrap();
    let answer = read_answer(&mut conn).await;
    (conn, answer)
}

/// Whether the server closes `conn` within `within` (reading nothing but the end).
async fn closed_within(conn: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, conn.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn chat_body(text: &str) -> String {
    json!({"model": "anything", "messages": [{"role": "user", "content": text}], "max_tokens": 8})
        .to_string()
}

/// Finding 1: a repeated photo is answered from the cache, and an over-long prompt refused,
/// while the model worker is busy.
#[tokio::test]
async fn cache_hits_and_prompt_limits_do_not_wait_for_the_model() {
    let s = TestServer::start(|c| {
        c.max_prompt_tokens = 64;
        // Long enough for a slow machine's inference; what waits for the held worker gets 504
        // after it, so a 201 or 400 below is an answer that did not wait for the model.
        c.request_timeout = Duration::from_secs(10);
    });
    let first = s
        .post_multipart(
            "/api/v1/inspections",
            &[("image", Some("1.png"), &photo(1))],
        )
        .await;
    assert_eq!(first.status, 201);
    let first = first.json();
    // The worker is held from now on: only what needs no model can be answered.
    let hold = s.server.state().pause_worker_for_tests();
    let again = s
        .post_multipart(
            "/api/v1/inspections",
            &[("image", Some("1.png"), &photo(1))],
        )
        .await;
    assert_eq!(
        again.status,
        201,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    let again = again.json();
    assert_eq!(again["finding"]["timings"]["cached"], true);
    assert_ne!(again["id"], first["id"], "a new inspection is stored");
    assert_eq!(
        again["finding"]["violations"],
        first["finding"]["violations"]
    );
    let stored = s
        .get(&format!(
            "/api/v1/inspections/{}",
            again["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(stored.status, 200);
    // Text beyond 16 bytes a token is refused unread; below that, by its token count.
    s.post_json(
        "/v1/chat/completions",
        &chat_body(&"安全帽 ".repeat(200_000)),
    )
    .await
    .assert_error(400, "prompt_too_long");
    let r = s
        .post_json("/v1/chat/completions", &chat_body(&"安全帽 ".repeat(60)))
        .await;
    r.assert_error(400, "prompt_too_long");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens")
    );
    // A short prompt waits for the model, which is held: it times out.
    s.post_json("/v1/chat/completions", &chat_body("你好"))
        .await
        .assert_error(504, "timeout");
    drop(hold);
    let r = s
        .post_json("/v1/chat/completions", &chat_body("你好"))
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["model"], "anything");
}

/// Finding 2: headers must arrive in time; connections are capped; /health keeps answering.
#[tokio::test]
async fn slow_clients_are_cut_off_and_connections_are_capped() {
    let mut live = Live::start(|c| {
        c.header_timeout = Duration::from_secs(1);
        c.max_connections = 2;
    })
    .await;
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut conn = TcpStream::connect(live.addr).await.unwrap();
        conn.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .await
            .unwrap();
        slow.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Both slots are held: a third client waits in the backlog...
    let started = Instant::now();
    let mut third = TcpStream::connect(live.addr).await.unwrap();
    third
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut third).await;
    assert_eq!(answer.status, 200);
    // ...until the slow ones are cut off at the header timeout.
    let waited = started.elapsed();
    assert!(
        // Not at once, and well before the slow clients would give up on their own.
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    for mut conn in slow {
        assert!(closed_within(&mut conn, Duration::from_secs(3)).await);
    }
    // Four times as many slow clients as slots: each is cut off in turn, and /health still
    // answers (after about four header timeouts).
    let mut many = Vec::new();
    for _ in 0..8 {
        let mut conn = TcpStream::connect(live.addr).await.unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        many.push(conn);
    }
    let (_, health) = send(
        live.addr,
        b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert_eq!(health.status, 200);
    live.shut_down().await;
}

/// Finding 2: shutdown ends within the grace however many idle or half-open connections.
#[tokio::test]
async fn shutdown_ends_within_the_grace() {
    let mut live = Live::start(|c| {
        c.header_timeout = Duration::from_secs(60);
        c.shutdown_grace = Duration::from_secs(1);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut conn = TcpStream::connect(live.addr).await.unwrap();
        conn.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0")
            .await
            .unwrap();
        held.push(conn);
    }
    // An idle keep-alive connection after a complete request.
    let (idle, answer) = send(
        live.addr,
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, 200);
    held.push(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took = live.shut_down().await;
    // The grace (1 s) and some slack for a slow machine, far below the 60 s header timeout.
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    for mut conn in held {
        assert!(closed_within(&mut conn, Duration::from_secs(1)).await);
    }
}

/// Finding 3: an answer given before the body was read says `Connection: close`; one given
/// after keeps the connection.
#[tokio::test]
async fn early_refusals_close_the_connection_and_say_so() {
    let mut live = Live::start(|_| {}).await;
    // 415 before the body is read.
    let body = "x".repeat(100_000);
    let request = format!(
        "POST /api/v1/inspections HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (mut conn, answer) = send(live.addr, request.as_bytes()).await;
    answer.assert_error(415, "unsupported_media_type");
    assert_eq!(answer.header("connection").as_deref(), Some("close"));
    assert!(closed_within(&mut conn, Duration::from_secs(2)).await);
    // 401 (a revoked key) before the body is read.
    let store = open_db(&live.state.inner.config.db);
    let (id, key) = inspector_server::auth::create_key(store.as_ref(), "old", false).unwrap();
    store.revoke_api_key(&id).unwrap();
    let request = format!(
        "POST /api/v1/inspections HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (_, answer) = send(live.addr, request.as_bytes()).await;
    answer.assert_error(401, "unauthorized");
    assert_eq!(answer.header("connection").as_deref(), Some("close"));
    // A refusal after the whole body was read keeps the connection for the next request.
    let json = r#"{"image_base64": "%%%"}"#;
    let request = format!(
        "POST /api/v1/inspections HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{json}",
        json.len()
    );
    let (mut conn, answer) = send(live.addr, request.as_bytes()).await;
    answer.assert_error(400, "invalid_base64");
    assert_eq!(answer.header("connection"), None);
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut conn).await.status, 200);
    live.shut_down().await;
}

fn with_host(method: Method, uri: &str, host: &str) -> axum::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("host", host)
}

/// Finding 4: keyless servers answer only their own names; foreign origins cannot write.
#[tokio::test]
async fn foreign_hosts_and_origins_are_refused() {
    let s = TestServer::start(|c| c.allowed_hosts = vec!["inspector.plant.lan".into()]);
    let get = |host: &str| {
        with_host(Method::GET, "/api/v1/inspections?limit=1", host)
            .body(Body::empty())
            .unwrap()
    };
    s.call(get("attacker.example"))
        .await
        .assert_error(403, "forbidden_host");
    s.call(get("attacker.example:8080"))
        .await
        .assert_error(403, "forbidden_host");
    for ok in [
        "127.0.0.1:8080",
        "localhost",
        "[::1]:9",
        "inspector.plant.lan:8080",
    ] {
        assert_eq!(s.call(get(ok)).await.status, 200, "{ok}");
    }
    let post = |origin: &str| {
        let (ct, body) = multipart(&[("image", Some("0.png"), &photo(0))]);
        with_host(Method::POST, "/api/v1/inspections", "127.0.0.1:8080")
            .header("content-type", ct)
            .header("origin", origin)
            .body(Body::from(body))
            .unwrap()
    };
    s.call(post("https://evil.example"))
        .await
        .assert_error(403, "forbidden_origin");
    s.call(post("null"))
        .await
        .assert_error(403, "forbidden_origin");
    let listed = s.get("/api/v1/inspections").await.json();
    assert_eq!(
        listed["items"].as_array().unwrap().len(),
        0,
        "nothing was created"
    );
    assert_eq!(s.call(post("http://127.0.0.1:8080")).await.status, 201);
    // With keys required, any Host is answered (keys protect it) but origins are still checked.
    let keyed = TestServer::start(|c| {
        c.require_keys = true;
        c.cors_origins = vec!["https://portal.plant.lan".into()];
    });
    let store = open_db(&keyed.server.config().db);
    let (_, key) = inspector_server::auth::create_key(store.as_ref(), "cam", false).unwrap();
    let keyed_post = |origin: &str| {
        let (ct, body) = multipart(&[("image", Some("0.png"), &photo(0))]);
        with_host(Method::POST, "/api/v1/inspections", "inspector.example.com")
            .header("content-type", ct)
            .header("authorization", format!("Bearer {key}"))
            .header("origin", origin)
            .body(Body::from(body))
            .unwrap()
    };
    keyed
        .call(keyed_post("https://evil.example"))
        .await
        .assert_error(403, "forbidden_origin");
    assert_eq!(
        keyed
            .call(keyed_post("https://portal.plant.lan"))
            .await
            .status,
        201
    );
}

/// Finding 6: temp files a killed process left are swept at start when older than an hour.
#[test]
fn stale_temp_files_are_swept_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("data/images/0c");
    std::fs::create_dir_all(&images).unwrap();
    let old = images.join(".tmpAbC123");
    let young = images.join(".tmpXyZ789");
    let photo_file = images.join(format!("{}.png", "0c".repeat(32)));
    for f in [&old, &young, &photo_file] {
        std::fs::write(f, b"partial").unwrap();
    }
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    for f in [&old, &photo_file] {
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
    }
    let config = TestServer::config(&dir);
    seed_rules(&config.db);
    let _server = inspector_server::Server::start(config, load_detector).unwrap();
    assert!(!old.exists(), "an old temp file is removed");
    assert!(
        young.exists(),
        "a young one may be a replica's upload in progress"
    );
    assert!(photo_file.exists(), "stored photos are never touched");
}

fn from(ip: [u8; 4], req: Request<Body>) -> Request<Body> {
    let mut req = req;
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from((ip, 40000))));
    req
}

/// Finding 7: both key headers must agree, schemes are case-insensitive, 401s say how to
/// authenticate, and failed authentications are limited per address.
#[tokio::test]
async fn authentication_details() {
    let s = TestServer::start(|c| {
        c.require_keys = true;
        c.rate_per_minute = 0;
    });
    let store = open_db(&s.server.config().db);
    let (_, good) = inspector_server::auth::create_key(store.as_ref(), "good", false).unwrap();
    let (old_id, old) = inspector_server::auth::create_key(store.as_ref(), "old", false).unwrap();
    store.revoke_api_key(&old_id).unwrap();
    let req = |headers: &[(&str, &str)]| {
        let mut b = Request::get("/api/v1/rules");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).unwrap()
    };
    let bearer = |k: &str| format!("Bearer {k}");
    // A valid Bearer key with a revoked X-API-Key is refused.
    let r = s
        .call(req(&[
            ("authorization", &bearer(&good)),
            ("x-api-key", &old),
        ]))
        .await;
    r.assert_error(401, "unauthorized");
    assert_eq!(
        r.headers["www-authenticate"],
        "Bearer realm=\"safety-inspector\""
    );
    assert_eq!(
        s.call(req(&[
            ("authorization", &bearer(&good)),
            ("x-api-key", &good)
        ]))
        .await
        .status,
        200
    );
    // Schemes are case-insensitive.
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let h = format!("{scheme} {good}");
        assert_eq!(
            s.call(req(&[("authorization", &h)])).await.status,
            200,
            "{scheme}"
        );
    }
    s.call(req(&[("authorization", &format!("Basic {good}"))]))
        .await
        .assert_error(401, "unauthorized");
    s.call(req(&[])).await.assert_error(401, "unauthorized");
    // Wrong keys from one address: 401 until the limit, then 429 even for the right key;
    // another address is not affected.
    let attacker = [10, 0, 0, 7];
    let mut codes = Vec::new();
    for i in 0..inspector_server::auth::AUTH_FAILURES_PER_MINUTE + 5 {
        let wrong = format!("Bearer si_{i:040}");
        codes.push(
            s.call(from(attacker, req(&[("authorization", &wrong)])))
                .await
                .status
                .as_u16(),
        );
    }
    let limit = inspector_server::auth::AUTH_FAILURES_PER_MINUTE as usize;
    assert!(codes[..limit].iter().all(|&c| c == 401), "{codes:?}");
    assert!(codes[limit..].iter().all(|&c| c == 429), "{codes:?}");
    let blocked = s
        .call(from(attacker, req(&[("authorization", &bearer(&good))])))
        .await;
    blocked.assert_error(429, "rate_limited");
    assert!(blocked.headers.contains_key("retry-after"));
    let other = s
        .call(from(
            [10, 0, 0, 8],
            req(&[("authorization", &bearer(&good))]),
        ))
        .await;
    assert_eq!(other.status, 200);
}

/// Finding 8: every refusal is the JSON error, hyper's own included; URIs up to 16 KiB pass;
/// a declared oversize body is refused at once; unknown query parameters are ignored.
#[tokio::test]
async fn every_refusal_is_json_and_limits_are_as_documented() {
    let mut live = Live::start(|c| c.max_body = 1 << 20).await;
    let get = |target: String, extra: String| {
        format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n").into_bytes()
    };
    // A 16 KiB target passes; longer ones get 414 from us, far longer ones from hyper.
    let query = "q=".to_string() + &"a".repeat(16 * 1024 - "/api/v1/rules?q=".len());
    let (_, ok) = send(
        live.addr,
        &get(format!("/api/v1/rules?{query}"), String::new()),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.head);
    for len in [20 * 1024, 70 * 1024] {
        let target = format!("/api/v1/rules?q={}", "a".repeat(len));
        let (_, r) = send(live.addr, &get(target, String::new())).await;
        r.assert_error(414, "uri_too_long");
    }
    // Too many header fields: ours at 101, hyper's past 400.
    for n in [150, 500] {
        let extra: String = (0..n).map(|i| format!("x-h{i}: v\r\n")).collect();
        let (_, r) = send(live.addr, &get("/health".into(), extra)).await;
        r.assert_error(431, "headers_too_large");
    }
    // Not HTTP at all: hyper's 400, as JSON.
    let (_, r) = send(live.addr, b"HELLO\r\n\r\n").await;
    r.assert_error(400, "bad_request");
    // A declared Content-Length over the limit: 413 at once, no body sent.
    let started = Instant::now();
    let (_, r) = send(
        live.addr,
        b"POST /api/v1/inspections HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n",
    )
    .await;
    r.assert_error(413, "body_too_large");
    assert!(started.elapsed() < Duration::from_secs(2));
    // The 415 names both accepted forms.
    let (_, r) = send(
        live.addr,
        b"POST /api/v1/inspections HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    r.assert_error(415, "unsupported_media_type");
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("multipart/form-data") && message.contains("application/json"));
    // Cache-busters are ignored everywhere.
    for target in [
        "/api/v1/inspections?_=1733370000000",
        "/api/v1/rules?_=1&colour=red",
        "/health?_=1",
        "/api/v1/rules/none?_=1",
    ] {
        let (_, r) = send(live.addr, &get(target.into(), String::new())).await;
        assert!(r.status == 200 || r.status == 404, "{target}: {}", r.head);
        if r.status == 404 {
            r.assert_error(404, "not_found");
        }
    }
    live.shut_down().await;
}

/// Finding 9: names with bidirectional controls are refused like other control characters.
#[tokio::test]
async fn bidirectional_controls_in_names_are_refused() {
    let s = TestServer::start(|_| {});
    for name in ["照片 \u{202e}gnp.exe", "a\u{2066}b.png", "a\u{202a}.png"] {
        let body = json!({"image_base64": b64(&photo(0)), "filename": name});
        s.post_json("/api/v1/inspections", &body.to_string())
            .await
            .assert_error(400, "invalid_field");
        s.post_multipart("/api/v1/inspections", &[("image", Some(name), &photo(0))])
            .await
            .assert_error(400, "invalid_field");
        let body = json!({"image_base64": b64(&photo(0)), "options": {"source": name}});
        s.post_json("/api/v1/inspections", &body.to_string())
            .await
            .assert_error(400, "invalid_field");
    }
    // Plain Chinese names with spaces pass.
    let body = json!({"image_base64": b64(&photo(0)), "filename": "3号车间 照片.png"});
    assert_eq!(
        s.post_json("/api/v1/inspections", &body.to_string())
            .await
            .status,
        201
    );
}

/// Finding 10: the OpenAI client works against keyless loopback, with any key it sends.
#[tokio::test]
async fn the_openai_client_talks_to_keyless_loopback() {
    use async_openai::{
        Client,
        config::OpenAIConfig,
        types::{ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs},
    };
    let mut live = Live::start(|_| {}).await;
    let base = format!("http://{}/v1", live.addr);
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(&base)
            .with_api_key("unused"),
    );
    let models = client.models().list().await.unwrap();
    assert_eq!(models.data.len(), 1);
    assert_eq!(models.data[0].id, inspector_server::MODEL_NAME);
    let model = client
        .models()
        .retrieve(inspector_server::MODEL_NAME)
        .await
        .unwrap();
    assert_eq!(model.id, inspector_server::MODEL_NAME);
    let request = CreateChatCompletionRequestArgs::default()
        .model("gpt-4o")
        .max_tokens(8u32)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("这张照片里有什么隐患？")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let answer = client.chat().create(request.clone()).await.unwrap();
    assert_eq!(answer.model, "gpt-4o");
    assert_eq!(answer.choices.len(), 1);
    assert!(answer.choices[0].message.content.is_some());
    assert!(answer.usage.unwrap().prompt_tokens > 0);
    // A revoked key is still refused, through the client too.
    let store = open_db(&live.state.inner.config.db);
    let (id, key) = inspector_server::auth::create_key(store.as_ref(), "old", false).unwrap();
    store.revoke_api_key(&id).unwrap();
    let revoked = Client::with_config(OpenAIConfig::new().with_api_base(&base).with_api_key(key));
    let err = revoked.chat().create(request).await.unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");
    live.shut_down().await;
}

/// `response_format` with a JSON schema, through a real OpenAI client: the answer about a photo
/// is an instance of the schema (checked by an independent validator), with `rule` one of the
/// database's citations, closed within `max_tokens` even when that is barely enough; a schema
/// outside the subset is refused with a 400 that names the keyword.
#[tokio::test]
async fn response_format_json_schema_gives_schema_valid_answers() {
    use async_openai::{
        Client,
        config::OpenAIConfig,
        error::OpenAIError,
        types::{
            ChatCompletionRequestMessageContentPartImageArgs,
            ChatCompletionRequestMessageContentPartTextArgs, ChatCompletionRequestUserMessageArgs,
            CreateChatCompletionRequestArgs, FinishReason, ImageUrlArgs, ResponseFormat,
            ResponseFormatJsonSchema,
        },
    };
    let mut live = Live::start(|_| {}).await;
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("http://{}/v1", live.addr))
            .with_api_key("unused"),
    );
    let store = open_db(&live.state.inner.config.db);
    let citations: Vec<String> = store
        .rules(&Default::default())
        .unwrap()
        .into_iter()
        .map(|r| r.citation)
        .collect();
    assert!(citations.len() > 5);
    let schema = inspector_core::answer::json_schema(&citations);
    let schema_value: Value = serde_json::from_str(&schema.to_json()).unwrap();
    let validator = jsonschema::validator_for(&schema_value).unwrap();
    let request = |schema: Value, max_tokens: u32| {
        CreateChatCompletionRequestArgs::default()
            .model("inspector")
            .max_tokens(max_tokens)
            .messages([ChatCompletionRequestUserMessageArgs::default()
                .content(vec![
                    ChatCompletionRequestMessageContentPartImageArgs::default()
                        .image_url(
                            ImageUrlArgs::default()
                                .url(format!("data:image/png;base64,{}", b64(&photo(1))))
                                .build()
                                .unwrap(),
                        )
                        .build()
                        .unwrap()
                        .into(),
                    ChatCompletionRequestMessageContentPartTextArgs::default()
                        .text(inspector_core::answer::INSTRUCTION)
                        .build()
                        .unwrap()
                        .into(),
                ])
                .build()
                .unwrap()
                .into()])
            .response_format(ResponseFormat::JsonSchema {
                json_schema: ResponseFormatJsonSchema {
                    name: "inspection".into(),
                    description: None,
                    schema: Some(schema),
                    strict: Some(true),
                },
            })
            .build()
            .unwrap()
    };
    // The shortest answer is `{"status":"safe","violations":[]}` (34 bytes), and the eos.
    let shortest = r#"{"status":"safe","violations":[]}"#.len() as u32 + 1;
    for max_tokens in [shortest, shortest + 6, 48, 160] {
        let answer = client
            .chat()
            .create(request(schema_value.clone(), max_tokens))
            .await
            .unwrap();
        let choice = &answer.choices[0];
        let content = choice.message.content.clone().unwrap();
        let instance: Value = serde_json::from_str(&content)
            .unwrap_or_else(|e| panic!("not JSON at max_tokens {max_tokens}: {e}: {content}"));
        let errors: Vec<String> = validator
            .iter_errors(&instance)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{content}: {errors:?}");
        assert_eq!(choice.finish_reason, Some(FinishReason::Stop), "{content}");
        let usage = answer.usage.unwrap();
        assert!(usage.completion_tokens <= max_tokens, "{usage:?}");
        // The photo has a violation: with room, the adapter writes it; with too little room
        // the answer still closes (at the shortest, only `safe` fits).
        if max_tokens == shortest {
            assert_eq!(content, r#"{"status":"safe","violations":[]}"#);
        }
        if max_tokens == 160 {
            assert_eq!(
                instance["violations"][0]["description"], "未戴安全帽",
                "{content}"
            );
        }
    }
    // Outside the subset: refused, naming the keyword; so is a budget no answer fits in.
    let mut pattern = schema_value.clone();
    pattern["properties"]["violations"]["items"]["properties"]["description"]["pattern"] =
        json!("^.+$");
    for (schema, max_tokens, words) in [
        (
            pattern,
            160,
            "`pattern` at /properties/violations/items/properties/description/pattern",
        ),
        (
            json!({"type": "object", "properties": {"a": {"type": ["string", "null"]}}}),
            160,
            "`type`",
        ),
        (schema_value.clone(), shortest - 1, "too small"),
    ] {
        match client.chat().create(request(schema, max_tokens)).await {
            Err(OpenAIError::ApiError(e)) => assert!(e.message.contains(words), "{e:?}"),
            other => panic!("{words}: {other:?}"),
        }
    }
    // The code and the message, as a raw client sees them.
    let body = json!({"messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x",
            "schema": {"type": "object", "patternProperties": {}}}}})
    .to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        live.addr,
        body.len()
    );
    let (_, raw) = send(live.addr, &[head.as_bytes(), body.as_bytes()].concat()).await;
    raw.assert_error(400, "unsupported_schema");
    assert!(
        raw.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`patternProperties` at /patternProperties")
    );
    live.shut_down().await;
}

/// The OpenAPI document and the router come from the same modules: every documented
/// operation is served, and no module adds a route around the document.
#[tokio::test]
async fn every_route_is_in_the_openapi_document() {
    let s = TestServer::start(|_| {});
    let doc = s.get("/api/openapi.json").await.json();
    let paths = doc["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let uri = path
                .replace("{id}", "none")
                .replace("{model}", "none")
                .replace("{index}", "0");
            let req = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(&uri)
                .body(Body::empty())
                .unwrap();
            if path.ends_with("/stream") {
                // A server-sent-events stream never ends: its head is what is checked.
                use tower::ServiceExt;
                let response = s.app.clone().oneshot(req).await.unwrap();
                assert_eq!(response.status(), 200, "{method} {path}");
                assert_eq!(response.headers()["content-type"], "text/event-stream");
                operations += 1;
                continue;
            }
            let r = s.call(req).await;
            let text = String::from_utf8_lossy(&r.body);
            assert!(
                !text.contains("no endpoint at") && !text.contains("method_not_allowed"),
                "{method} {path} is documented but not served: {text}"
            );
            operations += 1;
        }
    }
    assert_eq!(operations, 28, "{:?}", paths.keys().collect::<Vec<_>>());
    // Routes are added only through `routes!`, which documents them.
    let dir = root().join("crates/server/src/routes");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(".route("),
            "{} adds a route without documenting it",
            path.display()
        );
    }
    let lib = std::fs::read_to_string(root().join("crates/server/src/lib.rs")).unwrap();
    assert!(
        !lib.contains(".route("),
        "lib.rs adds a route without documenting it"
    );
}

/// An open event stream (the alerts page keeps one) ends when shutdown begins, instead of
/// holding the shutdown for its whole grace.
#[tokio::test]
async fn an_open_event_stream_does_not_hold_the_shutdown() {
    let mut live = Live::start(|c| c.shutdown_grace = Duration::from_secs(120)).await;
    let mut conn = TcpStream::connect(live.addr).await.unwrap();
    conn.write_all(b"GET /api/v1/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = conn.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    let took = live.shut_down().await;
    // Far below the grace, with room for a slow machine.
    assert!(took < Duration::from_secs(30), "shutdown took {took:?}");
}
