//! The scaled-out setup, for real on loopback: PostgreSQL (a private server the tests start),
//! three `inspector serve` replicas sharing it and one photo folder, and nginx (Debian's) in
//! front; and `inspector db migrate`, which moves a single box into it. nginx is required: the
//! tests fail, not skip, without it (`.ci/run` installs it).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

#[path = "../../server/tests/common/multipart.rs"]
mod multipart_body;
#[path = "support/serve.rs"]
mod serve;
use serve::*;

/// nginx in front of `upstreams`, on a free loopback port, with its files in `dir`.
struct Nginx {
    child: Child,
    base: String,
    dir: PathBuf,
}

impl Nginx {
    fn start(dir: &Path, upstreams: &[&str]) -> Nginx {
        let bin = ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .expect("these tests need nginx (apt-get install nginx-light; .ci/run does)");
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let root = unsafe_is_root();
        // A replica that failed once stays out for the rest of the test: with 30 s, a slow
        // machine's load phase outlasted it and nginx tried the killed replica again.
        let servers: String = upstreams
            .iter()
            .map(|u| format!("        server {u} max_fails=1 fail_timeout=600s;\n"))
            .collect();
        let d = dir.display();
        // `proxy_next_upstream error timeout` without `non_idempotent`: a POST that reached a
        // replica is never sent to another (no inspection runs twice); one refused at connect
        // goes to the next replica.
        let conf = format!(
            "{user}worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
                 log_format up '$upstream_addr $status $request_method $uri';\n\
                 access_log {d}/logs/access.log up;\n\
                 client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
                 client_max_body_size 48m;\n\
                 upstream inspector {{\n{servers}    }}\n\
                 server {{\n\
                     listen 127.0.0.1:{port};\n\
                     location / {{\n\
                         proxy_pass http://inspector;\n\
                         proxy_http_version 1.1;\n\
                         proxy_set_header Host $host;\n\
                         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
                         proxy_next_upstream error timeout;\n\
                         proxy_connect_timeout 2s;\n\
                         proxy_read_timeout 120s;\n\
                         proxy_buffering off;\n\
                     }}\n\
                 }}\n\
             }}\n",
            user = if root { "user root;\n" } else { "" },
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let nginx = Nginx {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir: dir.to_path_buf(),
        };
        let started = Instant::now();
        while get(&nginx.url("/health")).0 != 200 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "nginx did not start: {}",
                std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The access log: (upstream, status, method, uri) per request.
    fn access_log(&self) -> Vec<(String, u16, String, String)> {
        std::fs::read_to_string(self.dir.join("logs/access.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (
                    f[0].to_string(),
                    f[1].parse().unwrap_or(0),
                    f[2].to_string(),
                    f[3].to_string(),
                )
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its worker leaves with the master's pipe; make sure.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("nginx.pid")) {
            let _ = Command::new("kill")
                .arg(pid.trim())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn unsafe_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Photo `n % 8` of the fixtures with one pixel set from `n`: a photo no replica has seen, so
/// the model runs (the answer cache, shared through the database, would answer a repeat).
fn unique_photo(n: usize) -> Vec<u8> {
    let mut img = image::load_from_memory(&photo(n % 8)).unwrap().to_rgb8();
    img.put_pixel(
        0,
        0,
        image::Rgb([(n % 256) as u8, (n / 256 % 256) as u8, 7]),
    );
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// POSTs a photo to `base`'s inspections with `key`.
fn inspect_with(base: &str, key: &str, name: &str, bytes: &[u8]) -> (u16, String) {
    let (ct, body) = multipart("image", name, bytes);
    answer(
        agent()
            .post(&format!("{base}/api/v1/inspections"))
            .set("Content-Type", &ct)
            .set("Authorization", &format!("Bearer {key}"))
            .send_bytes(&body),
    )
}

fn get_with(url: &str, key: &str) -> (u16, String) {
    answer(
        agent()
            .get(url)
            .set("Authorization", &format!("Bearer {key}"))
            .call(),
    )
}

fn os(s: impl AsRef<std::ffi::OsStr>) -> std::ffi::OsString {
    s.as_ref().to_os_string()
}

fn regulation(name: &str) -> PathBuf {
    root().join("examples/regulations").join(name)
}

/// The arguments of a replica of the scaled setup: the test model, the shared database, keys
/// required; `storage` says where photos go.
fn replica_args(db: &str, storage: &[std::ffi::OsString]) -> Vec<std::ffi::OsString> {
    let mut args = vec![os("--db"), os(db)];
    args.extend(storage.iter().cloned());
    args.extend([
        os("--model"),
        os(root().join("crates/qwen2vl/tests/fixtures/tiny-a")),
        os("--adapter"),
        os(root().join("crates/train/tests/fixtures/overfit/adapter")),
        os("--addr"),
        os("127.0.0.1:0"),
        os("--max-new-tokens"),
        os("160"),
        os("--require-keys"),
    ]);
    args
}

/// A replica behind nginx, with photos in the shared folder.
fn replica(dir: &Path, db: &str, shared: &Path, extra: &[&str]) -> Running {
    let mut args = replica_args(
        db,
        &[
            os("--data-dir"),
            os(shared),
            os("--trusted-proxy"),
            os("127.0.0.1"),
        ],
    );
    args.extend(extra.iter().map(os));
    Running::spawn(dir, &args)
}

/// The first violation of an inspection record: (cited rule, verified, resolved id).
fn first_violation(record: &serde_json::Value) -> (String, bool, Option<String>) {
    let v = &record["finding"]["violations"][0];
    (
        v["rule"].as_str().unwrap_or_default().to_string(),
        v["verified"].as_bool().unwrap_or(false),
        v["resolved"]["id"].as_str().map(str::to_string),
    )
}

#[test]
fn three_replicas_behind_nginx_share_records_keys_rules_and_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let db = inspector_store::testing::postgres().fresh_database();
    let shared = tmp.path().join("shared");
    // The database starts with two of the three regulations; 《安全作业规程》 comes later,
    // uploaded through one replica.
    inspector_ok(&[
        os("rules").as_os_str(),
        os("extract").as_os_str(),
        regulation("site-management.txt").as_os_str(),
        regulation("electrical-safety.docx").as_os_str(),
        os("--db").as_os_str(),
        os(&db).as_os_str(),
    ]);
    let key = |admin: bool| {
        let mut args = vec![os("keys"), os("create"), os("--db"), os(&db)];
        if admin {
            args.push(os("--admin"));
        }
        inspector_ok(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>())
            .trim()
            .to_string()
    };
    let (admin, user) = (key(true), key(false));
    let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("r{i}"))).collect();
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    // Replica 1 takes one photo at a time, so a second one in flight shows in its queue.
    let mut replicas: Vec<Option<Running>> = vec![
        Some(replica(&dirs[0], &db, &shared, &[])),
        Some(replica(&dirs[1], &db, &shared, &["--max-batch", "1"])),
        Some(replica(&dirs[2], &db, &shared, &[])),
    ];
    let base: Vec<String> = replicas
        .iter()
        .map(|r| r.as_ref().unwrap().base.clone())
        .collect();
    let upstreams: Vec<&str> = base
        .iter()
        .map(|b| b.trim_start_matches("http://"))
        .collect();
    let nginx = Nginx::start(&tmp.path().join("nginx"), &upstreams);

    // An inspection created through replica 0 is listed and fetched through 1 and 2.
    let (code, body) = inspect_with(&base[0], &user, "1.png", &photo(1));
    assert_eq!(code, 201, "{body}");
    let created = json(&body);
    let id = created["id"].as_str().unwrap().to_string();
    // The decoder may only cite rules in the database: not yet 《安全作业规程》.
    let (rule, _, _) = first_violation(&created);
    assert!(!rule.contains("安全作业规程"), "{rule}");
    for b in &base[1..] {
        let (code, body) = get_with(&format!("{b}/api/v1/inspections/{id}"), &user);
        assert_eq!(code, 200, "{body}");
        assert_eq!(json(&body)["finding"], created["finding"]);
        let (_, list) = get_with(&format!("{b}/api/v1/inspections?limit=5"), &user);
        assert_eq!(json(&list)["items"][0]["id"], id.as_str());
        let image = agent()
            .get(&format!("{b}/api/v1/inspections/{id}/image"))
            .set("Authorization", &format!("Bearer {user}"))
            .call()
            .unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut image.into_reader(), &mut bytes).unwrap();
        assert_eq!(bytes, photo(1), "the photo, from the shared folder");
    }

    // A regulation uploaded through replica 0 is cited by 1 and 2.
    let (ct, upload) = multipart(
        "file",
        "safety-operation.md",
        &std::fs::read(regulation("safety-operation.md")).unwrap(),
    );
    let (code, body) = answer(
        agent()
            .post(&format!("{}/api/v1/documents", base[0]))
            .set("Content-Type", &ct)
            .set("Authorization", &format!("Bearer {admin}"))
            .send_bytes(&upload),
    );
    assert_eq!(code, 201, "{body}");
    for (i, b) in base.iter().enumerate().skip(1) {
        let started = Instant::now();
        for attempt in 0.. {
            // Photo 1 again, new to the cache each time.
            let n = 8 * (100 + 50 * i + attempt) + 1;
            let (code, body) = inspect_with(b, &user, "1.png", &unique_photo(n));
            assert_eq!(code, 201, "{body}");
            let (rule, verified, resolved) = first_violation(&json(&body));
            if rule == "《安全作业规程》第3.2条" {
                assert!(verified && resolved.is_some(), "{body}");
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "replica {i} never cited the uploaded regulation"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // A key created through replica 0 and revoked through replica 2 is refused by all three.
    let (code, body) = answer(
        agent()
            .post(&format!("{}/api/v1/keys", base[0]))
            .set("Authorization", &format!("Bearer {admin}"))
            .send_json(serde_json::json!({"name": "dock camera"})),
    );
    assert_eq!(code, 201, "{body}");
    let created_key = json(&body);
    let (key_id, camera_key) = (
        created_key["id"].as_str().unwrap().to_string(),
        created_key["key"].as_str().unwrap().to_string(),
    );
    for b in &base {
        assert_eq!(get_with(&format!("{b}/api/v1/rules"), &camera_key).0, 200);
    }
    let (code, body) = answer(
        agent()
            .delete(&format!("{}/api/v1/keys/{key_id}", base[2]))
            .set("Authorization", &format!("Bearer {admin}"))
            .call(),
    );
    assert_eq!(code, 200, "{body}");
    for b in &base {
        assert_eq!(get_with(&format!("{b}/api/v1/rules"), &camera_key).0, 401);
    }

    let (_, list) = get_with(&format!("{}/api/v1/inspections?limit=200", base[0]), &user);
    let before_load = json(&list)["items"].as_array().unwrap().len();

    // A bounded load through nginx (6 clients, 8 new photos each); replica 1 is killed with -9
    // while it holds photos in flight.
    let outcomes: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let (url, user, outcomes) = (nginx.base.clone(), user.clone(), outcomes.clone());
            std::thread::spawn(move || {
                for k in 0..8 {
                    let n = c * 100 + k;
                    let r = inspect_with(&url, &user, &format!("{n}.png"), &unique_photo(n));
                    outcomes.lock().unwrap().push(r);
                }
            })
        })
        .collect();
    let victim = replicas[1].as_ref().unwrap();
    let started = Instant::now();
    loop {
        let (_, metrics) = get_with(&victim.url("/metrics"), &admin);
        let queued = metrics
            .lines()
            .find(|l| l.starts_with("inspector_queue_depth"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if queued >= 1.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "replica 1 never held two photos"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut victim = replicas[1].take().unwrap();
    victim.child.kill().unwrap(); // SIGKILL
    victim.child.wait().unwrap();
    for c in clients {
        c.join().unwrap();
    }
    let outcomes = outcomes.lock().unwrap().clone();
    let acknowledged: Vec<String> = outcomes
        .iter()
        .filter(|(code, _)| *code == 201)
        .map(|(_, body)| json(body)["id"].as_str().unwrap().to_string())
        .collect();
    let failed: Vec<&(u16, String)> = outcomes.iter().filter(|(c, _)| *c != 201).collect();
    // The clients in flight on the killed replica got an error (nginx's 502: it does not send
    // a POST that reached a replica to another one); nobody else did.
    let victim_addr = upstreams[1];
    let lost_on_victim = nginx
        .access_log()
        .iter()
        .filter(|(up, status, method, uri)| {
            up.contains(victim_addr)
                && *status == 502
                && method == "POST"
                && uri == "/api/v1/inspections"
        })
        .count();
    assert!(lost_on_victim >= 2, "{:?}", nginx.access_log());
    assert_eq!(failed.len(), lost_on_victim, "{failed:?}");
    assert!(failed.iter().all(|(code, _)| *code == 502), "{failed:?}");
    assert_eq!(acknowledged.len() + failed.len(), 48);

    // No acknowledged inspection is lost, and everything stored is whole: its record and its
    // photo are there, through the replicas that live.
    let (_, list) = get_with(&format!("{}/api/v1/inspections?limit=200", base[0]), &user);
    let stored: Vec<String> = json(&list)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    for id in &acknowledged {
        assert!(stored.contains(id), "acknowledged {id} is lost");
    }
    for id in &stored {
        let (code, body) = get_with(&format!("{}/api/v1/inspections/{id}", base[2]), &user);
        assert_eq!(code, 200, "{body}");
        let image = get_with(&format!("{}/api/v1/inspections/{id}/image", base[2]), &user);
        assert_eq!(image.0, 200, "the photo of {id}");
    }
    // The stored inspections beyond the acknowledged ones (the first checks above, and any the
    // killed replica committed before its answer went out) are at most those it held.
    let extra = stored.len() - acknowledged.len() - before_load;
    assert!(extra <= lost_on_victim, "{extra} unexplained inspections");

    eprintln!(
        "load: {} acknowledged, {} failed (502, in flight on the killed replica), {} stored \
         beyond the acknowledged ones",
        acknowledged.len(),
        failed.len(),
        extra
    );

    // nginx routes the next requests around the dead replica.
    for n in 0..9 {
        let (code, body) = inspect_with(&nginx.base, &user, "next.png", &unique_photo(5000 + n));
        assert_eq!(code, 201, "request {n} after the kill: {body}");
    }
    let after_kill: Vec<_> = nginx.access_log().into_iter().rev().take(9).collect();
    assert!(
        after_kill
            .iter()
            .all(|(up, status, _, _)| *status == 201 && !up.ends_with(victim_addr)),
        "{after_kill:?}"
    );
}
#[test]
fn db_migrate_moves_an_installation_into_postgresql_once() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("inspector.db");
    let os = |s: &str| std::ffi::OsString::from(s);
    // A single box: the bundled regulations, keys (one revoked), inspections with their photos
    // and answers cached, a camera's events with their frames, one acknowledged.
    let mut extract = vec![os("rules"), os("extract")];
    for e in std::fs::read_dir(root().join("examples/regulations")).unwrap() {
        extract.push(e.unwrap().path().into());
    }
    extract.extend([os("--db"), db.clone().into()]);
    inspector_ok(&extract.iter().map(|s| s.as_os_str()).collect::<Vec<_>>());
    let keys = |args: &[&str]| {
        let mut v: Vec<std::ffi::OsString> = vec![os("keys")];
        v.extend(args.iter().map(|a| os(a)));
        v.extend([os("--db"), db.clone().into()]);
        inspector_ok(&v.iter().map(|s| s.as_os_str()).collect::<Vec<_>>())
    };
    keys(&["create", "--name", "gate camera"]);
    keys(&["create", "--admin", "--name", "安全员"]);
    let listed = keys(&["list"]);
    let first_id = listed.split('\t').next().unwrap().to_string();
    keys(&["revoke", &first_id]);
    let camera = camera_folder(tmp.path());
    let ids = {
        let s = Running::start(tmp.path(), &["--cameras", "cameras.toml"]);
        for i in 0..4 {
            assert_eq!(inspect(&s, i).0, 201, "{}", s.log());
        }
        let event = feed_until_event(&s, &camera)["id"]
            .as_str()
            .unwrap()
            .to_string();
        let (code, body) = post(
            &s.url(&format!("/api/v1/events/{event}/ack")),
            "text/plain",
            b"",
        );
        assert_eq!(code, 200, "{body}");
        stored_ids(&s)
    };
    assert!(ids.len() >= 4);

    let url = inspector_store::testing::postgres().fresh_database();
    let shared = tmp.path().join("shared");
    let migrate = || {
        let text = inspector_ok(&[
            "db".as_ref(),
            "migrate".as_ref(),
            "--from".as_ref(),
            format!("sqlite:{}", db.display()).as_ref(),
            "--to".as_ref(),
            url.as_ref(),
            "--from-data-dir".as_ref(),
            tmp.path().join("data").as_os_str(),
            "--to-data-dir".as_ref(),
            shared.as_os_str(),
            "--json".as_ref(),
        ]);
        json(&text)
    };
    let first = migrate();
    for e in first["entities"].as_array().unwrap() {
        assert_eq!(e["equal"], true, "{e}");
        assert_eq!(e["source"], e["target"], "{e}");
        assert_eq!(e["added"], e["source"], "{e}");
        if e["entity"] != "diagnostics" {
            assert!(e["source"].as_u64().unwrap() > 0, "{e}");
        }
    }
    assert_eq!(first["photos"]["equal"], true, "{first}");
    let photos = first["photos"]["count"].as_u64().unwrap();
    assert!(
        photos >= 5,
        "the inspections' photos and the event frames: {first}"
    );
    assert_eq!(first["photos"]["copied"].as_u64().unwrap(), photos);
    let inspections = |v: &serde_json::Value| {
        v["entities"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["entity"] == "inspections")
            .unwrap()["target"]
            .clone()
    };
    assert_eq!(inspections(&first), ids.len() as u64);

    // A second run changes nothing.
    let second = migrate();
    assert_eq!(second["added"], 0, "{second}");
    assert_eq!(second["photos"]["copied"], 0, "{second}");
    assert_eq!(
        second["entities"],
        first["entities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e["present"] = e["added"].clone();
                e["added"] = 0.into();
                e
            })
            .collect::<serde_json::Value>()
    );

    // The migrated installation serves: the same inspections, photos, acknowledgement and keys.
    let s = Running::spawn(
        tmp.path(),
        &[
            os("--db"),
            os(&url),
            os("--data-dir"),
            shared.clone().into(),
            os("--model"),
            root().join("crates/qwen2vl/tests/fixtures/tiny-a").into(),
            os("--addr"),
            os("127.0.0.1:0"),
        ],
    );
    assert_eq!(stored_ids(&s), ids);
    let one = &ids[0];
    let image = agent()
        .get(&s.url(&format!("/api/v1/inspections/{one}/image")))
        .call()
        .unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut image.into_reader(), &mut bytes).unwrap();
    assert!(photo_bytes_known(&bytes), "the photo came along");
    let events = json(&get(&s.url("/api/v1/events")).1);
    assert!(
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["acked_by"] == "local"),
        "{events}"
    );
}

/// Whether `bytes` are one of the fixture photos.
fn photo_bytes_known(bytes: &[u8]) -> bool {
    (0..4).any(|i| photo(i) == bytes)
}

/// Replicas that keep photos in S3-compatible object storage (an s3s-fs server on loopback):
/// a single box is migrated into PostgreSQL and the bucket, and every replica then serves its
/// photos and the ones uploaded through the others, with nothing under their data dirs.
#[test]
fn replicas_keep_photos_in_s3_and_db_migrate_moves_them_there() {
    let tmp = tempfile::tempdir().unwrap();
    let s3 =
        inspector_s3_test_server::S3TestServer::start(&tmp.path().join("s3"), &["photos"]).unwrap();
    let env: Vec<(String, String)> = [
        ("AWS_ENDPOINT", s3.endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", s3.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let bucket = "s3://photos/plant-7";

    // A single box with two inspections.
    let single = tmp.path().join("single");
    std::fs::create_dir_all(&single).unwrap();
    let old_ids = {
        let s = Running::start(&single, &[]);
        for i in [1, 3] {
            assert_eq!(inspect(&s, i).0, 201, "{}", s.log());
        }
        stored_ids(&s)
    };
    let db = inspector_store::testing::postgres().fresh_database();
    let migrate = || {
        let out = Command::new(env!("CARGO_BIN_EXE_inspector"))
            .args(["db", "migrate", "--from"])
            .arg(single.join("inspector.db"))
            .args(["--to", &db, "--from-photos"])
            .arg(single.join("data"))
            .args(["--to-photos", bucket, "--json"])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        json(&String::from_utf8(out.stdout).unwrap())
    };
    let first = migrate();
    assert_eq!(first["photos"]["copied"], 2, "{first}");
    assert_eq!(first["photos"]["equal"], true, "{first}");
    let second = migrate();
    assert_eq!(second["added"], 0, "{second}");
    assert_eq!(second["photos"]["present"], 2, "{second}");

    let user = inspector_ok(&[
        os("keys").as_os_str(),
        os("create").as_os_str(),
        os("--db").as_os_str(),
        os(&db).as_os_str(),
    ])
    .trim()
    .to_string();
    let replicas: Vec<Running> = (0..2)
        .map(|i| {
            let dir = tmp.path().join(format!("r{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let args = replica_args(&db, &[os("--photo-store"), os(bucket)]);
            Running::spawn_with_env(&dir, &args, &env)
        })
        .collect();
    let image = |r: &Running, id: &str| -> Vec<u8> {
        let response = agent()
            .get(&r.url(&format!("/api/v1/inspections/{id}/image")))
            .set("Authorization", &format!("Bearer {user}"))
            .call()
            .unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut response.into_reader(), &mut bytes).unwrap();
        bytes
    };
    // The migrated photos, from the bucket.
    assert_eq!(image(&replicas[1], &old_ids[1]), photo(1));
    assert_eq!(image(&replicas[0], &old_ids[0]), photo(3));
    // A new photo through one replica, read through the other.
    let fresh = unique_photo(8 * 40 + 5);
    let (code, body) = inspect_with(&replicas[0].base, &user, "5.png", &fresh);
    assert_eq!(code, 201, "{body}");
    let id = json(&body)["id"].as_str().unwrap().to_string();
    assert_eq!(image(&replicas[1], &id), fresh);
    let sha = json(&body)["finding"]["image"]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        tmp.path()
            .join(format!("s3/photos/plant-7/images/{}/{sha}.png", &sha[..2]))
            .is_file(),
        "the object is in the bucket"
    );
    for i in 0..2 {
        assert!(
            !tmp.path().join(format!("r{i}/data/images")).exists(),
            "no photo under replica {i}'s data dir"
        );
    }
}
