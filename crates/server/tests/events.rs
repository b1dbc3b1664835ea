//! `/api/v1/events`: camera events that a watcher stored in the same database and data dir are
//! listed with filters, read, served with their frame, acknowledged once by the caller, and
//! followed live as server-sent events, resumable with `Last-Event-ID`.

mod common;

use std::time::Duration;

use axum::{body::Body, http::Request};
use common::*;
use http_body_util::BodyExt;
use inspector_store::NewEvent;
use tower::ServiceExt;

/// Stores an event as `inspector watch` does: its frame in `data/events/`, its row in the
/// database (a second connection, as the watcher is another process).
fn store_event(s: &TestServer, id: &str, camera: &str, rule: &str, risk: &str) {
    let data = s.dir.path().join("data/events");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join(format!("{id}.jpg")), b"\xff\xd8\xff\xe0 a frame").unwrap();
    let store = open_db(&s.server.config().db);
    let record = serde_json::json!({
        "id": id, "camera": camera, "rules": [rule], "risk": risk,
        "violations": [{"rule": rule, "risk": risk, "bbox": [10, 20, 30, 40]}],
    });
    assert!(
        store
            .insert_event(&NewEvent {
                id: id.into(),
                stored_ms: chrono_now_ms(),
                camera: camera.into(),
                source: "rtsp://***@10.0.0.5/s1".into(),
                at: 1_790_000_000.5,
                rule: rule.into(),
                risk: risk.into(),
                frame_file: format!("events/{id}.jpg"),
                record: record.to_string(),
            })
            .unwrap()
    );
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn events_are_listed_filtered_read_framed_and_acknowledged() {
    let s = TestServer::start(|_| {});
    store_event(
        &s,
        "00000000000000a1",
        "gate",
        "《安全生产管理规定》第3条",
        "高",
    );
    store_event(
        &s,
        "00000000000000b2",
        "bay",
        "《安全生产管理规定》第5条",
        "中",
    );
    let page = s.get("/api/v1/events").await.json();
    let ids: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["00000000000000b2", "00000000000000a1"],
        "newest first"
    );
    let first = &page["items"][1];
    assert_eq!(first["camera"], "gate");
    assert_eq!(first["risk"], "高");
    assert_eq!(first["violations"][0]["bbox"][2], 30);
    assert!(first["acked_at"].is_null());
    let gate = s.get("/api/v1/events?camera=gate&risk=high").await.json();
    assert_eq!(gate["items"].as_array().unwrap().len(), 1);
    s.get("/api/v1/events?risk=severe")
        .await
        .assert_error(400, "invalid_query");
    let page1 = s.get("/api/v1/events?limit=1").await.json();
    let cursor = page1["next_cursor"].as_str().unwrap();
    let page2 = s
        .get(&format!("/api/v1/events?limit=1&cursor={cursor}"))
        .await
        .json();
    assert_eq!(page2["items"][0]["id"], "00000000000000a1");

    let one = s.get("/api/v1/events/00000000000000a1").await;
    assert_eq!(one.status, 200);
    let frame = s.get(one.json()["frame_url"].as_str().unwrap()).await;
    assert_eq!(frame.status, 200);
    assert_eq!(frame.headers["content-type"], "image/jpeg");
    assert!(frame.body.starts_with(b"\xff\xd8"));
    s.get("/api/v1/events/../../etc/passwd")
        .await
        .assert_error(404, "not_found");
    s.get("/api/v1/events/ffffffffffffffff")
        .await
        .assert_error(404, "not_found");

    let ack = s
        .post_json("/api/v1/events/00000000000000a1/ack", "{}")
        .await;
    assert_eq!(ack.status, 200, "{:?}", ack.json());
    let acked_at = ack.json()["acked_at"].as_str().unwrap().to_string();
    assert_eq!(ack.json()["acked_by"], "local", "no key on loopback");
    let again = s
        .post_json("/api/v1/events/00000000000000a1/ack", "{}")
        .await;
    assert_eq!(
        again.json()["acked_at"],
        acked_at.as_str(),
        "the first ack stays"
    );
    let inbox = s.get("/api/v1/events?acked=false").await.json();
    assert_eq!(inbox["items"].as_array().unwrap().len(), 1);
    assert_eq!(inbox["items"][0]["id"], "00000000000000b2");
    s.post_json("/api/v1/events/00000000000000ff/ack", "{}")
        .await
        .assert_error(404, "not_found");
}

/// Reads server-sent events off `body` until `n` `alert` events came (within 10 s).
async fn alerts(body: &mut Body, n: usize) -> Vec<(String, serde_json::Value)> {
    let mut text = String::new();
    let mut out = Vec::new();
    while out.len() < n {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("an alert within 10 s")
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
            };
            if field("event:").as_deref() == Some("alert") {
                let data = serde_json::from_str(&field("data:").unwrap()).unwrap();
                out.push((field("id:").unwrap(), data));
            }
        }
    }
    out
}

#[tokio::test]
async fn new_events_arrive_as_server_sent_events_and_a_reconnect_resumes() {
    let s = TestServer::start(|_| {});
    store_event(&s, "00000000000000a1", "gate", "r1", "高");
    let open = |last: Option<&str>| {
        let mut req = Request::get("/api/v1/events/stream");
        if let Some(id) = last {
            req = req.header("Last-Event-ID", id);
        }
        s.app.clone().oneshot(req.body(Body::empty()).unwrap())
    };
    let response = open(None).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    // Only events stored from now on.
    store_event(&s, "00000000000000b2", "bay", "r2", "中");
    let got = alerts(&mut body, 1).await;
    assert_eq!(got[0].1["id"], "00000000000000b2");
    let position = got[0].0.clone();
    drop(body);
    // Missed while disconnected, then delivered on reconnecting with Last-Event-ID.
    store_event(&s, "00000000000000c3", "gate", "r3", "高");
    let mut body = open(Some(&position)).await.unwrap().into_body();
    let got = alerts(&mut body, 1).await;
    assert_eq!(got[0].1["id"], "00000000000000c3");
    assert_eq!(
        got[0].1["frame_url"],
        "/api/v1/events/00000000000000c3/frame"
    );
}
