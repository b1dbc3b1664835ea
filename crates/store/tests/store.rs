//! The database, on both stores (SQLite, and a PostgreSQL server the tests start): replacement
//! semantics, filters, Chinese full-text search (the same answers on both), migrations, the
//! answer cache, inspections, keys and camera events.

use std::path::PathBuf;

use inspector_rules::{Categorizer, Document, extract_bytes, extract_file};
use inspector_store::{DocumentRecord, RuleFilter, SqliteStore, Store, StoreError};

/// A fresh database of one kind, reopenable by its location.
struct Db {
    location: String,
    _dir: Option<tempfile::TempDir>,
}

impl Db {
    fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        Db {
            location: dir.path().join("inspector.db").display().to_string(),
            _dir: Some(dir),
        }
    }

    fn postgres() -> Db {
        Db {
            location: inspector_store::testing::postgres().fresh_database(),
            _dir: None,
        }
    }

    fn is_postgres(&self) -> bool {
        self.location.starts_with("postgres://")
    }

    fn open(&self) -> Box<dyn Store> {
        inspector_store::open(&self.location).unwrap()
    }
}

/// Each test `name(db: &Db)` runs as `sqlite::name` and `postgres::name`.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { super::$name(&super::Db::sqlite()) })*
        }
        mod postgres {
            $(#[test] fn $name() { super::$name(&super::Db::postgres()) })*
        }
    };
}

on_both!(
    re_extracting_unchanged_keeps_the_count,
    a_changed_document_replaces_its_rules,
    chinese_search_finds_the_clause,
    filters_by_category_and_document,
    migrations_run_once_and_refuse_newer_databases,
    the_answer_cache_stores_replaces_and_survives_reopening,
    inspections_filter_page_and_survive_reopening,
    api_keys_are_found_by_hash_listed_and_revoked,
    camera_events_are_stored_once_filtered_streamed_and_acknowledged_once,
    the_rules_version_moves_with_every_document,
    request_counters_count_per_minute_and_are_pruned,
);

fn example(name: &str) -> Document {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/regulations")
        .join(name);
    extract_file(&path, &Categorizer::default()).unwrap()
}

fn record(doc: &Document) -> DocumentRecord {
    DocumentRecord {
        title: doc.title.clone(),
        file: doc.file.clone(),
        sha256: doc.sha256.clone(),
    }
}

fn store_all(db: &Db) -> Box<dyn Store> {
    let mut store = db.open();
    for name in [
        "safety-operation.md",
        "site-management.txt",
        "electrical-safety.docx",
    ] {
        let doc = example(name);
        store
            .replace_document(&record(&doc), &doc.rules, &doc.diagnostics)
            .unwrap();
    }
    store
}

fn re_extracting_unchanged_keeps_the_count(db: &Db) {
    let mut store = store_all(db);
    let before = store.rules(&RuleFilter::default()).unwrap();
    let doc = example("safety-operation.md");
    let outcome = store
        .replace_document(&record(&doc), &doc.rules, &doc.diagnostics)
        .unwrap();
    assert!(outcome.unchanged);
    assert_eq!(outcome.removed, outcome.added);
    let after = store.rules(&RuleFilter::default()).unwrap();
    assert_eq!(before, after);
    assert_eq!(after.len(), 26 + 24 + 25);
}

fn a_changed_document_replaces_its_rules(db: &Db) {
    let mut store = store_all(db);
    let text = "《安全作业规程》\n第一条 新的第一条。\n第二条 新的第二条，佩戴安全帽。\n";
    let doc = extract_bytes("new.txt", text.as_bytes(), &Categorizer::default()).unwrap();
    let outcome = store
        .replace_document(&record(&doc), &doc.rules, &doc.diagnostics)
        .unwrap();
    assert!(!outcome.unchanged);
    assert_eq!((outcome.removed, outcome.added), (26, 2));
    let filter = RuleFilter {
        document: Some("《安全作业规程》".into()),
        ..Default::default()
    };
    let rules = store.rules(&filter).unwrap();
    assert_eq!(
        rules.iter().map(|r| r.clause.as_str()).collect::<Vec<_>>(),
        ["1", "2"]
    );
    assert_eq!(rules[0].text, "新的第一条。");
    // The other documents are untouched and the search index forgot the old rules.
    assert_eq!(
        store.rules(&RuleFilter::default()).unwrap().len(),
        2 + 24 + 25
    );
    assert!(store.search("下颏带", 10).unwrap().is_empty());
    assert_eq!(store.search("新的第二条", 10).unwrap()[0].clause, "2");
}

fn chinese_search_finds_the_clause(db: &Db) {
    let store = store_all(db);
    let top = |q: &str| {
        store
            .search(q, 5)
            .unwrap()
            .first()
            .map(|r| r.citation.clone())
    };
    assert_eq!(top("安全帽").as_deref(), Some("《安全作业规程》第3.1条"));
    assert_eq!(top("反光背心").as_deref(), Some("《安全作业规程》第3.2条"));
    assert_eq!(
        top("上锁挂牌 配电柜").as_deref(),
        Some("《电气安全规程》第12条")
    );
    assert_eq!(top("杂物 通道").as_deref(), Some("《现场管理标准》第2.2条"));
    // A single character and a two-character word both work; nonsense finds nothing.
    assert!(!store.search("帽", 5).unwrap().is_empty());
    assert!(!store.search("消防", 5).unwrap().is_empty());
    assert!(store.search("量子计算", 5).unwrap().is_empty());
    assert!(store.search("\" OR *", 5).unwrap().is_empty());
}

fn filters_by_category_and_document(db: &Db) {
    let store = store_all(db);
    let by_category = store
        .rules(&RuleFilter {
            category: Some("应急处理".into()),
            ..Default::default()
        })
        .unwrap();
    assert!(!by_category.is_empty());
    assert!(
        by_category
            .iter()
            .all(|r| r.categories.iter().any(|c| c == "应急处理"))
    );
    let docs = store.documents().unwrap();
    assert_eq!(docs.len(), 3);
    assert_eq!(docs.iter().map(|d| d.rules).sum::<usize>(), 75);
}

fn migrations_run_once_and_refuse_newer_databases(db: &Db) {
    // Replicas starting together: every one opens, the schema is migrated once.
    let openers: Vec<_> = (0..4)
        .map(|_| {
            let location = db.location.clone();
            std::thread::spawn(move || {
                inspector_store::open(&location)
                    .unwrap()
                    .schema_version()
                    .unwrap()
            })
        })
        .collect();
    for o in openers {
        assert_eq!(o.join().unwrap(), 6);
    }
    assert_eq!(db.open().schema_version().unwrap(), 6);
    if db.is_postgres() {
        let mut c = ::postgres::Client::connect(&db.location, ::postgres::NoTls).unwrap();
        c.execute("UPDATE inspector_schema SET version = 99", &[])
            .unwrap();
    } else {
        let conn = rusqlite::Connection::open(&db.location).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    match inspector_store::open(&db.location) {
        Err(StoreError::TooNew { found: 99, .. }) => {}
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a newer database must be refused"),
    }
}

fn the_rules_version_moves_with_every_document(db: &Db) {
    let mut store = db.open();
    assert_eq!(store.rules_version().unwrap(), 0);
    let doc = example("safety-operation.md");
    store
        .replace_document(&record(&doc), &doc.rules, &doc.diagnostics)
        .unwrap();
    // Another connection (another replica) sees it.
    assert_eq!(db.open().rules_version().unwrap(), 1);
    store
        .replace_document(&record(&doc), &doc.rules, &doc.diagnostics)
        .unwrap();
    assert_eq!(db.open().rules_version().unwrap(), 2);
}

/// The bundled regulations' search queries give the same rules in the same order on PostgreSQL
/// as on SQLite's FTS5 (whose BM25 the PostgreSQL store computes itself).
#[test]
fn search_answers_the_same_on_both_stores() {
    let sqlite = Db::sqlite();
    let postgres = Db::postgres();
    let (a, b) = (store_all(&sqlite), store_all(&postgres));
    let mut compared = 0;
    for query in [
        "安全帽",
        "反光背心",
        "上锁挂牌 配电柜",
        "杂物 通道",
        "帽",
        "消防",
        "安全",
        "作业",
        "电气 安全",
        "高处作业 安全带",
        "叉车",
        "应急 疏散 通道",
        "5S",
        "LOTO",
        "量子计算",
        "检修",
        "配电",
        "安全 安全",
    ] {
        let ids = |s: &dyn Store| -> Vec<String> {
            s.search(query, 20)
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect()
        };
        assert_eq!(ids(a.as_ref()), ids(b.as_ref()), "{query}");
        compared += ids(a.as_ref()).len();
    }
    assert!(compared > 50, "the queries find rules ({compared})");
}

fn the_answer_cache_stores_replaces_and_survives_reopening(db: &Db) {
    {
        let store = db.open();
        assert_eq!(store.cached_answer("k").unwrap(), None);
        store.cache_answer("k", "{\"raw\": 1}").unwrap();
        store.cache_answer("k", "{\"raw\": 2}").unwrap();
        store.cache_answer("other", "x").unwrap();
    }
    let store = db.open();
    assert_eq!(
        store.cached_answer("k").unwrap().as_deref(),
        Some("{\"raw\": 2}")
    );
    assert_eq!(store.cached_answer("other").unwrap().as_deref(), Some("x"));
}

fn inspection(id: &str, ms: i64, status: &str) -> inspector_store::NewInspection {
    inspector_store::NewInspection {
        id: id.into(),
        created_ms: ms,
        filename: Some("../../etc/passwd".into()),
        source: Some("camera 3".into()),
        image_sha256: "ab".repeat(32),
        image_file: format!("images/ab/{}.jpg", "ab".repeat(32)),
        status: status.into(),
        finding: "{}".into(),
        model_fingerprint: "m".into(),
        adapter_fingerprint: None,
    }
}

fn inspections_filter_page_and_survive_reopening(db: &Db) {
    use inspector_store::{InspectionFilter, InspectionViolation};
    if !db.is_postgres() {
        SqliteStore::open(&db.location)
            .unwrap()
            .enable_wal()
            .unwrap();
    }
    {
        let mut store = db.open();
        let v = |rule: &str, risk: &str| InspectionViolation {
            rule_id: Some(rule.into()),
            citation: Some(format!("《规程》第{rule}条")),
            risk: Some(risk.into()),
        };
        store
            .insert_inspection(&inspection("a", 1_000, "violation"), &[v("r1", "高")])
            .unwrap();
        store
            .insert_inspection(&inspection("b", 2_000, "safe"), &[])
            .unwrap();
        store
            .insert_inspection(
                &inspection("c", 3_000, "violation"),
                &[v("r2", "低"), v("r1", "中")],
            )
            .unwrap();
        // Ids are unique.
        assert!(
            store
                .insert_inspection(&inspection("c", 4_000, "safe"), &[])
                .is_err()
        );
    }
    let store = db.open();
    let ids = |f: InspectionFilter| -> Vec<String> {
        store
            .inspections(&InspectionFilter { limit: 10, ..f })
            .unwrap()
            .into_iter()
            .map(|r| r.inspection.id)
            .collect()
    };
    assert_eq!(ids(InspectionFilter::default()), ["c", "b", "a"]);
    let status = Some("violation".to_string());
    assert_eq!(
        ids(InspectionFilter {
            status,
            ..Default::default()
        }),
        ["c", "a"]
    );
    let risk = Some("高".to_string());
    assert_eq!(
        ids(InspectionFilter {
            risk,
            ..Default::default()
        }),
        ["a"]
    );
    let rule = Some("r1".to_string());
    assert_eq!(
        ids(InspectionFilter {
            rule,
            ..Default::default()
        }),
        ["c", "a"]
    );
    let rule = Some("《规程》第2条".to_string());
    assert_eq!(
        ids(InspectionFilter {
            rule,
            ..Default::default()
        }),
        [] as [&str; 0]
    );
    let rule = Some("《规程》第r2条".to_string());
    assert_eq!(
        ids(InspectionFilter {
            rule,
            ..Default::default()
        }),
        ["c"]
    );
    let window = InspectionFilter {
        since_ms: Some(2_000),
        until_ms: Some(3_000),
        ..Default::default()
    };
    assert_eq!(ids(window), ["b"]);
    // Paging: two at a time, then the rest from the cursor.
    let first = store
        .inspections(&InspectionFilter {
            limit: 2,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(first.len(), 2);
    let before_seq = Some(first[1].seq);
    assert_eq!(
        ids(InspectionFilter {
            before_seq,
            ..Default::default()
        }),
        ["a"]
    );
    let a = store.inspection("a").unwrap().unwrap();
    assert_eq!(a.inspection, inspection("a", 1_000, "violation"));
    assert!(store.inspection("nope").unwrap().is_none());
}

fn api_keys_are_found_by_hash_listed_and_revoked(db: &Db) {
    let store = db.open();
    store.create_api_key("k1", "camera 3", "h1", false).unwrap();
    store.create_api_key("k2", "admin", "h2", true).unwrap();
    assert!(store.create_api_key("k3", "dup", "h1", false).is_err());
    let k = store.api_key_by_hash("h2").unwrap().unwrap();
    assert_eq!((k.id.as_str(), k.admin), ("k2", true));
    assert!(store.api_key_by_hash("nope").unwrap().is_none());
    assert!(store.revoke_api_key("k1").unwrap());
    assert!(!store.revoke_api_key("k1").unwrap());
    assert!(store.api_key_by_hash("h1").unwrap().is_none());
    let keys = store.api_keys().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().any(|k| k.id == "k1" && k.revoked_at.is_some()));
}

fn camera_events_are_stored_once_filtered_streamed_and_acknowledged_once(db: &Db) {
    use inspector_store::{EventFilter, NewEvent};
    let store = db.open();
    let event = |id: &str, camera: &str, rule: &str, ms: i64| NewEvent {
        id: id.into(),
        stored_ms: ms,
        camera: camera.into(),
        source: "rtsp://***@10.0.0.5/s1".into(),
        at: ms as f64 / 1000.0,
        rule: rule.into(),
        risk: "高".into(),
        frame_file: format!("events/{id}.jpg"),
        record: format!("{{\"id\":\"{id}\"}}"),
    };
    assert!(
        store
            .insert_event(&event("a1", "gate", "r1", 1000))
            .unwrap()
    );
    assert!(store.insert_event(&event("b2", "bay", "r2", 2000)).unwrap());
    assert!(
        store
            .insert_event(&event("c3", "gate", "r2", 3000))
            .unwrap()
    );
    // The same id again (a rerun of the same video) is left as it is.
    assert!(
        !store
            .insert_event(&event("a1", "other", "r9", 9000))
            .unwrap()
    );
    let ids = |f: EventFilter| -> Vec<String> {
        store
            .events(&EventFilter { limit: 10, ..f })
            .unwrap()
            .into_iter()
            .map(|r| r.event.id)
            .collect()
    };
    assert_eq!(
        ids(EventFilter::default()),
        ["c3", "b2", "a1"],
        "newest first"
    );
    assert_eq!(
        ids(EventFilter {
            camera: Some("gate".into()),
            ..Default::default()
        }),
        ["c3", "a1"]
    );
    assert_eq!(
        ids(EventFilter {
            rule: Some("r2".into()),
            since_ms: Some(2500),
            ..Default::default()
        }),
        ["c3"]
    );
    let first = store.event("a1").unwrap().unwrap();
    assert_eq!(first.event.camera, "gate", "the first store of an id stays");
    assert_eq!(
        ids(EventFilter {
            after_seq: Some(first.seq),
            ..Default::default()
        }),
        ["b2", "c3"],
        "a stream resumes after a position, oldest first"
    );
    assert_eq!(store.ack_event("b2", "officer", 5000).unwrap(), Some(true));
    assert_eq!(
        store.ack_event("b2", "someone else", 6000).unwrap(),
        Some(false)
    );
    assert_eq!(store.ack_event("zz", "officer", 5000).unwrap(), None);
    assert_eq!(
        store.event("b2").unwrap().unwrap().acked,
        Some((5000, "officer".to_string()))
    );
    assert_eq!(
        ids(EventFilter {
            acked: Some(false),
            ..Default::default()
        }),
        ["c3", "a1"]
    );
}

fn request_counters_count_per_minute_and_are_pruned(db: &Db) {
    let a = db.open();
    let b = db.open();
    // Two servers on one database count together.
    assert_eq!(a.count_hit("key:k1", 100).unwrap(), 1);
    assert_eq!(b.count_hit("key:k1", 100).unwrap(), 2);
    assert_eq!(a.count_hit("key:k1", 100).unwrap(), 3);
    assert_eq!(b.count_hit("key:k2", 100).unwrap(), 1);
    assert_eq!(a.count_hit("key:k1", 101).unwrap(), 1, "a new minute");
    assert_eq!(b.hits("key:k1", 100).unwrap(), 3);
    assert_eq!(b.hits("key:nope", 100).unwrap(), 0);
    // Concurrent hits are all counted.
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let location = db.location.clone();
            std::thread::spawn(move || {
                let s = inspector_store::open(&location).unwrap();
                for _ in 0..25 {
                    s.count_hit("key:busy", 7).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(a.hits("key:busy", 7).unwrap(), 100);
    assert_eq!(a.prune_hits(101).unwrap(), 3);
    assert_eq!(a.hits("key:k1", 100).unwrap(), 0);
    assert_eq!(a.hits("key:k1", 101).unwrap(), 1);
}
