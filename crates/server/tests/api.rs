//! Every endpoint through the router (`oneshot`), with its error cases, on the tiny checkpoint.

mod common;

use axum::{body::Body, http::Request};
use common::*;
use serde_json::Value;

async fn inspect(s: &TestServer, i: usize) -> Value {
    let photo = photo(i);
    let name = format!("{i}.png");
    let r = s
        .post_multipart("/api/v1/inspections", &[("image", Some(&name), &photo)])
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

#[tokio::test]
async fn inspections_are_answered_stored_and_read_back() {
    let s = TestServer::start(|_| {});
    // Multipart: photo 1 shows a medium-risk violation with a box.
    let rec = inspect(&s, 1).await;
    let id = rec["id"].as_str().unwrap().to_string();
    assert_eq!(rec["filename"], "1.png");
    assert_eq!(rec["image_url"], format!("/api/v1/inspections/{id}/image"));
    let f = &rec["finding"];
    assert_eq!(f["status"], "violation", "{f}");
    let v = &f["violations"][0];
    assert_eq!(v["risk"], "中");
    assert_eq!(v["verified"], true);
    assert_eq!(v["resolved"]["citation"], "《安全作业规程》第3.2条");
    assert_eq!(v["box"].as_array().unwrap().len(), 4);
    assert_eq!(f["summary"]["medium"], 1);
    assert_eq!(f["image"]["width"], 56);

    // Read back by id: the same record.
    let got = s.get(&format!("/api/v1/inspections/{id}")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json(), rec);

    // The stored photo is the uploaded one, under the data dir by content hash.
    let img = s.get(&format!("/api/v1/inspections/{id}/image")).await;
    assert_eq!(img.status, 200);
    assert_eq!(img.headers["content-type"], "image/png");
    assert_eq!(img.body, photo(1));
    let sha = f["image"]["sha256"].as_str().unwrap();
    assert!(
        s.dir
            .path()
            .join(format!("data/images/{}/{sha}.png", &sha[..2]))
            .is_file()
    );

    // With boxes: a JPEG of the same size with the box drawn in the medium-risk orange.
    let boxed = s
        .get(&format!("/api/v1/inspections/{id}/image?boxes=1"))
        .await;
    assert_eq!(boxed.status, 200);
    assert_eq!(boxed.headers["content-type"], "image/jpeg");
    let drawn = image::load_from_memory(&boxed.body).unwrap().to_rgb8();
    assert_eq!(drawn.dimensions(), (56, 56));
    let b: Vec<f64> = v["box"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let edge = drawn.get_pixel(b[0].round() as u32, ((b[1] + b[3]) / 2.0) as u32);
    assert!(
        edge[0] > 180 && edge[1] > 70 && edge[1] < 180 && edge[2] < 90,
        "box edge pixel {edge:?} is not orange"
    );

    // JSON form, with a source, and a data-URI prefix.
    let body = serde_json::json!({
        "image_base64": format!("data:image/png;base64,{}", b64(&photo(0))),
        "filename": "0.png",
        "options": {"source": "3号车间 摄像头2"},
    });
    let r = s.post_json("/api/v1/inspections", &body.to_string()).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let safe = r.json();
    assert_eq!(safe["finding"]["status"], "safe");
    assert_eq!(safe["source"], "3号车间 摄像头2");

    // The same photo again comes from the answer cache.
    inspect(&s, 1).await;
    let metrics = String::from_utf8(s.get("/metrics").await.body).unwrap();
    assert!(
        metrics.contains("inspector_cache_hits_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_list_filters_and_pages() {
    let s = TestServer::start(|c| c.cache = false);
    let mut ids = Vec::new();
    for i in [0, 1, 3, 5] {
        ids.push(inspect(&s, i).await["id"].as_str().unwrap().to_string());
    }
    let list = |q: &'static str| {
        let s = &s;
        async move {
            let r = s.get(&format!("/api/v1/inspections{q}")).await;
            assert_eq!(r.status, 200, "{q}: {}", String::from_utf8_lossy(&r.body));
            let j = r.json();
            let items: Vec<String> = j["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["id"].as_str().unwrap().to_string())
                .collect();
            (items, j["next_cursor"].as_str().map(str::to_string))
        }
    };
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(list("").await.0, newest_first);
    assert_eq!(list("?status=safe").await.0, vec![ids[0].clone()]);
    assert_eq!(list("?status=violation").await.0.len(), 3);
    // Photo 3 is the high-risk one; 《安全作业规程》第3.1条 is photo 5's.
    assert_eq!(list("?risk=%E9%AB%98").await.0, vec![ids[2].clone()]);
    assert_eq!(list("?risk=high").await.0, vec![ids[2].clone()]);
    let cited = "?rule=%E3%80%8A%E5%AE%89%E5%85%A8%E4%BD%9C%E4%B8%9A%E8%A7%84%E7%A8%8B%E3%80%8B%E7%AC%AC3.1%E6%9D%A1";
    assert_eq!(list(cited).await.0, vec![ids[3].clone()]);
    assert_eq!(
        list("?since=2000-01-01T00:00:00Z&until=2001-01-01T00:00:00Z")
            .await
            .0
            .len(),
        0
    );
    assert_eq!(list("?since=2000-01-01T00:00:00Z").await.0.len(), 4);
    // Paging two at a time.
    let (first, cursor) = list("?limit=2").await;
    assert_eq!(first, newest_first[..2]);
    let cursor = cursor.unwrap();
    let r = s
        .get(&format!("/api/v1/inspections?limit=2&cursor={cursor}"))
        .await
        .json();
    let second: Vec<&str> = r["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(second, newest_first[2..]);
    assert!(r["next_cursor"].is_null());
    // Bad filters.
    for q in [
        "?status=maybe",
        "?risk=purple",
        "?since=yesterday",
        "?limit=0",
        "?limit=1000",
        "?cursor=nonsense",
        "?limit=abc",
    ] {
        let r = s.get(&format!("/api/v1/inspections{q}")).await;
        assert_eq!(r.status, 400, "{q}");
        assert!(r.json()["error"]["message"].is_string());
    }
}

#[tokio::test]
async fn rules_are_listed_searched_and_uploaded_by_admins_only() {
    let s = TestServer::start(|_| {});
    let all = s.get("/api/v1/rules").await.json();
    let items = all["items"].as_array().unwrap();
    assert!(items.len() > 20);
    let id = items[0]["id"].as_str().unwrap();
    let one = s.get(&format!("/api/v1/rules/{id}")).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["id"], id);
    s.get("/api/v1/rules/nope")
        .await
        .assert_error(404, "not_found");
    let found = s
        .get("/api/v1/rules?q=%E5%AE%89%E5%85%A8%E5%B8%BD")
        .await
        .json();
    let found = found["items"].as_array().unwrap();
    assert!(!found.is_empty());
    assert!(found[0]["text"].as_str().unwrap().contains("安全帽"));

    let doc = "# 临时用电管理规定\n\n第一条 临时用电线路必须架空敷设。\n第二条 配电箱必须上锁并悬挂警示牌。\n";
    let parts: &[Part] = &[("file", Some("../../../etc/临时用电.md"), doc.as_bytes())];
    // Anonymous callers may not upload.
    s.post_multipart("/api/v1/documents", parts)
        .await
        .assert_error(403, "forbidden");
    // A user key may not either; a wrong key is refused outright.
    let store = open_db(&s.server.config().db);
    let (_, user) = inspector_server::auth::create_key(store.as_ref(), "camera", false).unwrap();
    let (_, admin) = inspector_server::auth::create_key(store.as_ref(), "admin", true).unwrap();
    let with_key = |key: &str| {
        let (ct, body) = multipart(parts);
        Request::post("/api/v1/documents")
            .header("content-type", ct)
            .header("authorization", format!("Bearer {key}"))
            .body(Body::from(body))
            .unwrap()
    };
    s.call(with_key(&user)).await.assert_error(403, "forbidden");
    // Keyless loopback: an unknown key is no key, so anonymous, so not an admin.
    s.call(with_key("si_wrong"))
        .await
        .assert_error(403, "forbidden");
    let r = s.call(with_key(&admin)).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let up = r.json();
    assert_eq!(up["title"], "临时用电管理规定");
    assert_eq!(up["rules"], 2);
    let doc_rules = s
        .get("/api/v1/rules?document=%E4%B8%B4%E6%97%B6%E7%94%A8%E7%94%B5%E7%AE%A1%E7%90%86%E8%A7%84%E5%AE%9A")
        .await
        .json();
    assert_eq!(doc_rules["items"].as_array().unwrap().len(), 2);
    // Nothing was written under the client's path.
    assert!(!s.dir.path().join("etc").exists());
    // Not a regulation.
    let junk: &[Part] = &[("file", Some("x.pdf"), b"not a pdf")];
    let (ct, body) = multipart(junk);
    let r = s
        .call(
            Request::post("/api/v1/documents")
                .header("content-type", ct)
                .header("x-api-key", admin.as_str())
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
    r.assert_error(422, "unreadable_document");
}

#[tokio::test]
async fn the_tutorial_endpoints_keep_their_shapes() {
    let s = TestServer::start(|_| {});
    let body = serde_json::json!({"image": b64(&photo(3)), "filename": "site.png"});
    let r = s.post_json("/detect", &body.to_string()).await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["success"], true);
    assert_eq!(j["message"], "检测完成");
    let d = &j["data"];
    assert_eq!(d["status"], "violation_detected");
    assert_eq!(d["summary"]["total_violations"], 1);
    assert_eq!(d["summary"]["high_risk"], 1);
    assert_eq!(d["violations"][0]["risk_level"], "高风险");
    assert!(d["raw_response"].as_str().unwrap().contains("violation"));
    let ts = d["timestamp"].as_str().unwrap();
    assert!(
        chrono::NaiveDateTime::parse_from_str(ts, "%Y-%m-%d %H:%M:%S").is_ok(),
        "{ts}"
    );
    assert!(
        d["image_path"]
            .as_str()
            .unwrap()
            .starts_with("/api/v1/inspections/")
    );

    let body = serde_json::json!({"image": b64(&photo(0)), "options": {}});
    let j = s.post_json("/api/detect", &body.to_string()).await.json();
    assert_eq!(j["success"], true);
    assert_eq!(j["data"]["status"], "safe");
    assert_eq!(j["data"]["summary"]["total_violations"], 0);

    let photo5 = photo(5);
    let r = s
        .post_multipart("/api/upload", &[("file", Some("a.png"), &photo5)])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"]["violations"][0]["risk_level"], "低风险");

    // Failures: {"success": false, "error": "..."} with a 4xx.
    let fail = |r: Reply, status: u16| {
        assert_eq!(r.status.as_u16(), status);
        let j = r.json();
        assert_eq!(j["success"], false, "{j}");
        assert!(!j["error"].as_str().unwrap().is_empty());
    };
    fail(
        s.post_json("/detect", r#"{"image": "@@@not base64"}"#)
            .await,
        400,
    );
    fail(
        s.post_json("/detect", r#"{"filename": "a.png"}"#).await,
        422,
    );
    fail(
        s.post_json("/api/detect", r#"{"image": "aGVsbG8=", "options": 3}"#)
            .await,
        400,
    );
    fail(
        s.post_json("/api/detect", r#"{"image": "aGVsbG8="}"#).await,
        415,
    );
    fail(
        s.post_multipart("/api/upload", &[("image", Some("a.png"), &photo5)])
            .await,
        422,
    );
    fail(s.post_json("/api/upload", "{}").await, 415);
}

#[tokio::test]
async fn chat_completions_speak_openai_with_data_uris_only() {
    let s = TestServer::start(|_| {});
    let url = format!("data:image/png;base64,{}", b64(&photo(1)));
    let body = serde_json::json!({
        "model": "inspector",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "这张照片里有什么?"},
        ]}],
        "max_tokens": 16,
    });
    let r = s.post_json("/v1/chat/completions", &body.to_string()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    assert_eq!(j["object"], "chat.completion");
    assert_eq!(j["model"], "inspector");
    assert_eq!(j["choices"][0]["message"]["role"], "assistant");
    assert!(j["choices"][0]["message"]["content"].is_string());
    let usage = &j["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 16);
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=16).contains(&completion));
    assert!(matches!(
        j["choices"][0]["finish_reason"].as_str(),
        Some("stop" | "length")
    ));

    let bad = |body: Value| {
        let s = &s;
        async move { s.post_json("/v1/chat/completions", &body.to_string()).await }
    };
    let remote = serde_json::json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}]}]});
    bad(remote).await.assert_error(400, "invalid_messages");
    bad(serde_json::json!({"messages": []}))
        .await
        .assert_error(400, "invalid_messages");
    bad(serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .await
        .assert_error(400, "unsupported");
    bad(serde_json::json!({"messages": [{"role": "robot", "content": "hi"}]}))
        .await
        .assert_error(400, "invalid_messages");
    bad(serde_json::json!({"messages": "hi"}))
        .await
        .assert_error(422, "invalid_fields");
    // Text only works too.
    let r = bad(
        serde_json::json!({"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}),
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn operations_endpoints_answer() {
    let s = TestServer::start(|_| {});
    let h = s.get("/health").await.json();
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["service"], "safety-inspector");
    assert_eq!(s.get("/ready").await.status, 200);
    let page = s.get("/").await;
    assert_eq!(page.status, 200);
    let html = String::from_utf8(page.body).unwrap();
    // Served from the binary, with no external resources (plants are often offline).
    assert!(html.contains("id=\"file-input\""));
    for external in ["src=\"http", "href=\"http", "url(http", "@import", "//cdn"] {
        assert!(!html.contains(external), "the page loads {external}");
    }
    assert_eq!(page.headers["x-content-type-options"], "nosniff");
    assert_eq!(page.headers["x-frame-options"], "DENY");
    assert!(page.headers.contains_key("content-security-policy"));
    assert!(!page.headers.contains_key("access-control-allow-origin"));

    inspect(&s, 3).await;
    let m = String::from_utf8(s.get("/metrics").await.body).unwrap();
    for want in [
        "inspector_http_requests_total{method=\"POST\",route=\"/api/v1/inspections\",status=\"201\"} 1",
        "inspector_http_request_duration_seconds_bucket",
        "inspector_queue_depth 0",
        "inspector_batch_size_count 1",
        "inspector_cache_hits_total 0",
        "inspector_violations_total{risk=\"高\"} 1",
        "inspector_inspections_total{status=\"violation\"} 1",
    ] {
        assert!(m.contains(want), "missing {want} in\n{m}");
    }

    // The OpenAPI document lists every route.
    let doc = s.get("/api/openapi.json").await.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for (path, method) in [
        ("/api/v1/inspections", "post"),
        ("/api/v1/inspections", "get"),
        ("/api/v1/inspections/{id}", "get"),
        ("/api/v1/inspections/{id}/image", "get"),
        ("/api/v1/rules", "get"),
        ("/api/v1/rules/{id}", "get"),
        ("/api/v1/documents", "post"),
        ("/detect", "post"),
        ("/api/detect", "post"),
        ("/api/upload", "post"),
        ("/v1/chat/completions", "post"),
        ("/health", "get"),
        ("/ready", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing"
        );
    }
    assert!(doc["components"]["schemas"]["InspectionRecord"].is_object());

    s.get("/nowhere").await.assert_error(404, "not_found");
    s.call(Request::delete("/health").body(Body::empty()).unwrap())
        .await
        .assert_error(405, "method_not_allowed");
}

#[tokio::test]
async fn bad_input_gets_clear_4xx_errors() {
    let s = TestServer::start(|c| c.max_body = 1 << 20);
    let post = |parts: Vec<(&'static str, Option<&'static str>, Vec<u8>)>| {
        let s = &s;
        async move {
            let parts: Vec<Part> = parts
                .iter()
                .map(|(n, f, b)| (*n, *f, b.as_slice()))
                .collect();
            s.post_multipart("/api/v1/inspections", &parts).await
        }
    };
    post(vec![("image", Some("a.jpg"), corrupt_jpeg())])
        .await
        .assert_error(422, "corrupt_image");
    post(vec![(
        "image",
        Some("big.png"),
        png_declaring(50_000, 50_000),
    )])
    .await
    .assert_error(413, "image_too_large");
    post(vec![(
        "image",
        Some("a.png"),
        b"just some text, not a picture".to_vec(),
    )])
    .await
    .assert_error(415, "unsupported_image");
    post(vec![("image", Some("a.png"), vec![7u8; 2 << 20])])
        .await
        .assert_error(413, "body_too_large");
    post(vec![("image", Some("../../../../tmp/evil.png"), photo(0))]).await;
    assert!(!std::path::Path::new("/tmp/evil.png").exists());
    post(vec![("photo", Some("a.png"), photo(0))])
        .await
        .assert_error(422, "missing_field");
    post(vec![
        ("image", Some("a.png"), photo(0)),
        ("options", None, b"{\"colour\": 1}".to_vec()),
    ])
    .await
    .assert_error(422, "invalid_fields");
    s.post_json("/api/v1/inspections", r#"{"image_base64": "%%%"}"#)
        .await
        .assert_error(400, "invalid_base64");
    s.post_json("/api/v1/inspections", r#"{"image_base64": 42}"#)
        .await
        .assert_error(422, "invalid_fields");
    s.post_json("/api/v1/inspections", r#"{"image_base64": "aGVsbG8="#)
        .await
        .assert_error(400, "invalid_json");
    s.post_json("/api/v1/inspections", "{}")
        .await
        .assert_error(422, "invalid_fields");
    let long_name = "x".repeat(300);
    let body = serde_json::json!({"image_base64": b64(&photo(0)), "filename": long_name});
    s.post_json("/api/v1/inspections", &body.to_string())
        .await
        .assert_error(400, "invalid_field");
    s.call(
        Request::post("/api/v1/inspections")
            .header("content-type", "text/plain")
            .body(Body::from("hello"))
            .unwrap(),
    )
    .await
    .assert_error(415, "unsupported_media_type");
    s.get("/api/v1/inspections/does-not-exist")
        .await
        .assert_error(404, "not_found");
    s.get("/api/v1/inspections/does-not-exist/image")
        .await
        .assert_error(404, "not_found");
    // Without required keys a token that is no stored key is no key: served as anonymous.
    let unknown_key = Request::get("/api/v1/inspections")
        .header("authorization", "Bearer si_0000")
        .body(Body::empty())
        .unwrap();
    assert_eq!(s.call(unknown_key).await.status, 200);
    // Only files the server named exist under the data dir.
    for entry in walk(&s.dir.path().join("data")) {
        let name = entry.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            name.len() == 68 && name.ends_with(".png"),
            "unexpected file {}",
            entry.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn keys_are_required_off_loopback_and_rate_limits_apply() {
    let s = TestServer::start(|c| {
        c.require_keys = true;
        c.rate_per_minute = 3;
    });
    s.get("/api/v1/rules")
        .await
        .assert_error(401, "unauthorized");
    assert_eq!(s.get("/health").await.status, 200);
    assert_eq!(s.get("/").await.status, 200);
    let store = open_db(&s.server.config().db);
    let (id, key) = inspector_server::auth::create_key(store.as_ref(), "cam", false).unwrap();
    clear_of_a_minute_boundary();
    let get = |key: String| {
        Request::get("/api/v1/rules")
            .header("authorization", format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap()
    };
    for _ in 0..3 {
        assert_eq!(s.call(get(key.clone())).await.status, 200);
    }
    let limited = s.call(get(key.clone())).await;
    limited.assert_error(429, "rate_limited");
    assert!(limited.headers.contains_key("retry-after"));
    // Revoked keys are refused.
    assert!(store.revoke_api_key(&id).unwrap());
    s.call(get(key)).await.assert_error(401, "unauthorized");
}

#[tokio::test]
async fn keys_are_created_listed_and_revoked_over_http_by_admins() {
    let s = TestServer::start(|c| c.require_keys = true);
    let store = open_db(&s.server.config().db);
    let (_, admin) = inspector_server::auth::create_key(store.as_ref(), "安全员", true).unwrap();
    let (_, user) = inspector_server::auth::create_key(store.as_ref(), "cam", false).unwrap();
    let with = |method: &str, uri: &str, key: &str, body: &str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    // Only admin keys manage keys.
    s.call(with("GET", "/api/v1/keys", &user, ""))
        .await
        .assert_error(403, "forbidden");
    s.call(with("POST", "/api/v1/keys", &user, "{}"))
        .await
        .assert_error(403, "forbidden");
    s.call(with("POST", "/api/v1/keys", &admin, "{\"name\": 3}"))
        .await
        .assert_error(422, "invalid_fields");
    let long = format!("{{\"name\": \"{}\"}}", "x".repeat(201));
    s.call(with("POST", "/api/v1/keys", &admin, &long))
        .await
        .assert_error(400, "invalid_field");
    let created = s
        .call(with(
            "POST",
            "/api/v1/keys",
            &admin,
            "{\"name\": \"dock camera\"}",
        ))
        .await;
    assert_eq!(created.status, 201, "{}", created.json());
    let created = created.json();
    let (id, key) = (
        created["id"].as_str().unwrap().to_string(),
        created["key"].as_str().unwrap().to_string(),
    );
    assert_eq!(created["admin"], false);
    assert_eq!(
        s.call(with("GET", "/api/v1/rules", &key, "")).await.status,
        200
    );
    let listed = s.call(with("GET", "/api/v1/keys", &admin, "")).await.json();
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(ids.contains(&id.as_str()));
    assert!(!listed.to_string().contains(&key), "keys are never listed");
    // Revoked: refused from the next request on; revoking again is a 404.
    let revoked = s
        .call(with("DELETE", &format!("/api/v1/keys/{id}"), &admin, ""))
        .await;
    assert_eq!(revoked.status, 200, "{}", revoked.json());
    assert!(revoked.json()["revoked_at"].is_string());
    s.call(with("GET", "/api/v1/rules", &key, ""))
        .await
        .assert_error(401, "unauthorized");
    s.call(with("DELETE", &format!("/api/v1/keys/{id}"), &admin, ""))
        .await
        .assert_error(404, "not_found");
}

/// Two servers on one PostgreSQL database (replicas) share a key's request limit and an
/// address's failed authentications.
#[tokio::test]
async fn replicas_on_one_database_share_the_limits() {
    let db = inspector_store::testing::postgres().fresh_database();
    let on_shared = |c: &mut inspector_server::ServerConfig| {
        c.db = db.clone();
        c.require_keys = true;
        c.rate_per_minute = 3;
    };
    let a = TestServer::start(on_shared);
    let b = TestServer::start(on_shared);
    let store = open_db(&db);
    let (_, key) = inspector_server::auth::create_key(store.as_ref(), "cam", false).unwrap();
    let get = |key: &str| {
        Request::get("/api/v1/rules")
            .header("authorization", format!("Bearer {key}"))
            .extension(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                [10, 0, 0, 9],
                4000,
            ))))
            .body(Body::empty())
            .unwrap()
    };
    clear_of_a_minute_boundary();
    assert_eq!(a.call(get(&key)).await.status, 200);
    assert_eq!(b.call(get(&key)).await.status, 200);
    assert_eq!(a.call(get(&key)).await.status, 200);
    let limited = b.call(get(&key)).await;
    limited.assert_error(429, "rate_limited");
    let wait: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    a.call(get(&key)).await.assert_error(429, "rate_limited");

    // Wrong keys from one address: 20 a minute across both, then that address waits.
    clear_of_a_minute_boundary();
    for n in 0..inspector_server::auth::AUTH_FAILURES_PER_MINUTE {
        let server = if n % 2 == 0 { &a } else { &b };
        server
            .call(get(&format!("si_wrong{n}")))
            .await
            .assert_error(401, "unauthorized");
    }
    a.call(get("si_wrong"))
        .await
        .assert_error(429, "rate_limited");
    b.call(get("si_wrong"))
        .await
        .assert_error(429, "rate_limited");
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let (s, go) = TestServer::start_gated(|c| {
        c.queue = 1;
        c.batch.max_batch = 1;
    });
    // While the model loads, inspections are refused with 503 and readiness says so.
    assert_eq!(s.get("/ready").await.status, 503);
    let photo0 = photo(0);
    let r = s
        .post_multipart("/api/v1/inspections", &[("image", Some("a.png"), &photo0)])
        .await;
    r.assert_error(503, "not_ready");
    assert!(r.headers.contains_key("retry-after"));
    // Ready, but the worker has not started taking jobs: one job fills the queue.
    s.server.state().mark_ready_for_tests();
    let first = {
        let app = s.app.clone();
        let (ct, body) = multipart(&[("image", Some("a.png"), &photo0)]);
        tokio::spawn(async move {
            use tower::ServiceExt;
            app.oneshot(
                Request::post("/api/v1/inspections")
                    .header("content-type", ct)
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap()
            .status()
        })
    };
    // Wait until the first job is queued (polled for up to a minute).
    for _ in 0..6000 {
        let m = String::from_utf8(s.get("/metrics").await.body).unwrap();
        if m.contains("inspector_queue_depth 1") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let full = s
        .post_multipart(
            "/api/v1/inspections",
            &[("image", Some("b.png"), &photo(1))],
        )
        .await;
    full.assert_error(503, "queue_full");
    assert_eq!(full.headers["retry-after"], "1");
    go.send(()).unwrap();
    assert_eq!(first.await.unwrap(), 201);
}

#[tokio::test]
async fn a_request_that_times_out_is_not_run() {
    let (s, go) =
        TestServer::start_gated(|c| c.request_timeout = std::time::Duration::from_millis(50));
    s.server.state().mark_ready_for_tests();
    s.post_multipart(
        "/api/v1/inspections",
        &[("image", Some("a.png"), &photo(0))],
    )
    .await
    .assert_error(504, "timeout");
    go.send(()).unwrap();
    s.server.wait_until_loaded().unwrap();
    // The worker drops the abandoned job instead of inspecting it.
    let mut cancelled = false;
    for _ in 0..6000 {
        let m = String::from_utf8(s.get("/metrics").await.body).unwrap();
        if m.contains("inspector_cancelled_jobs_total 1") {
            cancelled = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(cancelled);
    let list = s.get("/api/v1/inspections").await.json();
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn a_client_that_disconnects_is_not_inspected() {
    use tokio::io::AsyncWriteExt;
    let (s, go) = TestServer::start_gated(|_| {});
    let state = s.server.state();
    state.mark_ready_for_tests();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let TestServer {
        dir: _dir,
        server,
        app: _,
    } = s;
    let serving = tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));
    // A request whose client hangs up while it waits in the queue.
    let body = serde_json::json!({"image_base64": b64(&photo(1))}).to_string();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /api/v1/inspections HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let metric = |name: &'static str| {
        let state = state.clone();
        async move {
            let text = state.inner.metrics.render();
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        }
    };
    for _ in 0..12000 {
        if metric("inspector_queue_depth ").await >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(metric("inspector_queue_depth ").await, 1.0);
    drop(conn);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    go.send(()).unwrap();
    for _ in 0..6000 {
        if metric("inspector_cancelled_jobs_total ").await >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(metric("inspector_cancelled_jobs_total ").await, 1.0);
    assert_eq!(metric("inspector_batch_size_count ").await, 0.0);
    stop.send(()).unwrap();
    serving.await.unwrap().unwrap();
}

/// A document replaced in the shared database by someone else (another replica, or
/// `inspector rules extract`) is cited from then on: the server reloads its rules when the
/// store's rules version moves, without a restart.
#[tokio::test]
async fn rules_replaced_elsewhere_in_the_database_are_picked_up() {
    use inspector_store::RuleFilter;
    let s = TestServer::start(|_| {});
    let state = s.server.state();
    let before = state.inner.rules.get().len();
    let text = "《车间补充规定》\n第一条 叉车作业区禁止行人穿行。\n";
    let doc = inspector_rules::extract_bytes(
        "supplement.txt",
        text.as_bytes(),
        &inspector_rules::Categorizer::default(),
    )
    .unwrap();
    let db = s.server.config().db.clone();
    tokio::task::spawn_blocking(move || {
        let mut other = open_db(&db);
        store_document(other.as_mut(), &doc);
        assert_eq!(
            other.rules(&RuleFilter::default()).unwrap().len(),
            before + 1
        );
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    while !state
        .inner
        .rules
        .get()
        .iter()
        .any(|r| r.citation == "《车间补充规定》第1条")
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the server did not reload its rules"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(state.inner.rules.get().len(), before + 1);
    // The API lists it too.
    let r = s.get("/api/v1/rules?q=叉车作业区").await.json();
    assert!(r.to_string().contains("车间补充规定"), "{r}");
}
