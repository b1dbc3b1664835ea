//! `db migrate`'s copy between the two stores: everything arrives with its times, the
//! summaries (counts and checksums) of both sides are equal, a second run changes nothing, an
//! interrupted run goes on where it stopped, and a row that differs in the target stops the
//! copy without overwriting it.

use std::path::PathBuf;

use inspector_core::{Diagnostic, DiagnosticKind};
use inspector_rules::{Categorizer, extract_file};
use inspector_store::{
    CachedAnswer, DocumentRecord, InspectionViolation, NewEvent, NewInspection, SqliteStore, Store,
    StoreError, migrate,
};

const INSPECTIONS: usize = 620;
const EVENTS: usize = 530;
const ANSWERS: usize = 510;

fn sqlite(dir: &tempfile::TempDir, name: &str) -> Box<dyn Store> {
    Box::new(SqliteStore::open(dir.path().join(name)).unwrap())
}

fn postgres() -> Box<dyn Store> {
    inspector_store::open(&inspector_store::testing::postgres().fresh_database()).unwrap()
}

fn inspection(n: usize) -> (NewInspection, Vec<InspectionViolation>) {
    let sha: String = format!("{n:064x}");
    let status = if n.is_multiple_of(3) {
        "safe"
    } else {
        "violation"
    };
    let violations = (0..n % 3)
        .map(|k| InspectionViolation {
            rule_id: Some(format!("rule-{k}")),
            citation: Some(format!("《安全作业规程》第{k}条")),
            risk: Some(["高", "中", "低"][(n + k) % 3].into()),
        })
        .collect();
    (
        NewInspection {
            id: format!("ins-{n:05}"),
            created_ms: 1_700_000_000_000 + n as i64 * 997,
            filename: n.is_multiple_of(2).then(|| format!("照片{n}.jpg")),
            source: Some("camera 3".into()),
            image_sha256: sha.clone(),
            image_file: format!("images/{}/{sha}.jpg", &sha[..2]),
            status: status.into(),
            finding: format!("{{\"n\":{n},\"说明\":\"现场\"}}"),
            model_fingerprint: "model-1".into(),
            adapter_fingerprint: n.is_multiple_of(5).then(|| "adapter-1".into()),
        },
        violations,
    )
}

fn event(n: usize) -> NewEvent {
    let id = format!("{n:016x}");
    NewEvent {
        id: id.clone(),
        stored_ms: 1_700_000_000_000 + n as i64,
        camera: format!("gate-{}", n % 4),
        source: "rtsp://***@10.0.0.5/s1".into(),
        at: n as f64 / 3.0,
        rule: "《现场管理标准》第3.2条".into(),
        risk: "高".into(),
        frame_file: format!("events/{id}.jpg"),
        record: format!("{{\"id\":\"{id}\"}}"),
    }
}

/// A single box's database with some of everything.
fn fill(store: &mut dyn Store) {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/regulations");
    for name in [
        "safety-operation.md",
        "site-management.txt",
        "electrical-safety.docx",
    ] {
        let doc = extract_file(&examples.join(name), &Categorizer::default()).unwrap();
        let record = DocumentRecord {
            title: doc.title.clone(),
            file: doc.file.clone(),
            sha256: doc.sha256.clone(),
        };
        // Diagnostics as an odd document has them (the examples are clean).
        let mut diagnostics = doc.diagnostics.clone();
        for (line, kind) in [(9, DiagnosticKind::Duplicate), (4, DiagnosticKind::Empty)] {
            diagnostics.push(Diagnostic {
                kind,
                line,
                message: format!("第{line}行：条款编号重复"),
            });
        }
        store
            .replace_document(&record, &doc.rules, &diagnostics)
            .unwrap();
    }
    for n in 0..INSPECTIONS {
        let (i, v) = inspection(n);
        store.insert_inspection(&i, &v).unwrap();
    }
    for n in 0..EVENTS {
        store.insert_event(&event(n)).unwrap();
        if n % 7 == 0 {
            store
                .ack_event(&format!("{n:016x}"), "值班员", 1_700_000_100_000 + n as i64)
                .unwrap();
        }
    }
    store
        .create_api_key("k1", "gate camera", "h1", false)
        .unwrap();
    store.create_api_key("k2", "admin", "h2", true).unwrap();
    store.create_api_key("k3", "old", "h3", false).unwrap();
    store.revoke_api_key("k3").unwrap();
    for n in 0..ANSWERS {
        store
            .cache_answer(&format!("key-{n:04}"), &format!("{{\"answer\":{n}}}"))
            .unwrap();
    }
}

#[test]
fn sqlite_to_postgres_and_back_copies_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut source = sqlite(&dir, "inspector.db");
    source.enable_wal().unwrap();
    fill(source.as_mut());
    let before = migrate::summary(source.as_ref()).unwrap();
    for (entity, count) in [
        ("documents", 3),
        ("inspections", INSPECTIONS as u64),
        (
            "violations",
            (0..INSPECTIONS).map(|n| n % 3).sum::<usize>() as u64,
        ),
        ("events", EVENTS as u64),
        ("api keys", 3),
        ("cached answers", ANSWERS as u64),
    ] {
        assert_eq!(before.get(entity).unwrap().count, count, "{entity}");
    }
    assert!(before.get("rules").unwrap().count > 50);
    assert!(before.get("diagnostics").unwrap().count > 0);

    // An earlier run stopped after 100 inspections: they are found, the rest are added.
    let mut target = postgres();
    assert!(migrate::is_empty(target.as_ref()).unwrap());
    let rules_version = target.rules_version().unwrap();
    for n in 0..100 {
        let (i, v) = inspection(n);
        target.insert_inspection(&i, &v).unwrap();
    }
    let mut rows = 0;
    assert!(!migrate::is_empty(target.as_ref()).unwrap());
    let report = migrate::copy(source.as_ref(), target.as_mut(), &mut |p| rows += p.rows).unwrap();
    assert_eq!(rows, before.total());
    assert_eq!(report.present("inspections"), 100);
    assert_eq!(report.added("inspections"), INSPECTIONS as u64 - 100);
    assert_eq!(report.added("documents"), 3);
    assert_eq!(report.added("cached answers"), ANSWERS as u64);
    let after = migrate::summary(target.as_ref()).unwrap();
    assert_eq!(after, before, "counts and checksums equal");
    assert!(
        target.rules_version().unwrap() > rules_version,
        "replicas reload the rules"
    );

    // Times, hashes, revocations and acknowledgements came along.
    assert_eq!(source.api_keys().unwrap(), target.api_keys().unwrap());
    assert!(
        target.api_key_by_hash("h3").unwrap().is_none(),
        "k3 stays revoked"
    );
    assert_eq!(source.documents().unwrap(), target.documents().unwrap());
    let acked = |s: &dyn Store| {
        let row = s.event(&format!("{:016x}", 14)).unwrap().unwrap();
        (row.event, row.acked)
    };
    assert!(acked(target.as_ref()).1.is_some());
    assert_eq!(acked(source.as_ref()), acked(target.as_ref()));
    assert_eq!(
        source.search("安全帽", 5).unwrap(),
        target.search("安全帽", 5).unwrap(),
        "the search index is built on the target"
    );

    // A second run changes nothing.
    let again = migrate::copy(source.as_ref(), target.as_mut(), &mut |_| {}).unwrap();
    assert_eq!(again.total_added(), 0, "{again:?}");
    assert_eq!(again.present("inspections"), INSPECTIONS as u64);
    assert_eq!(migrate::summary(target.as_ref()).unwrap(), before);

    // And back into a new SQLite file: the same again.
    let mut back = sqlite(&dir, "back.db");
    migrate::copy(target.as_ref(), back.as_mut(), &mut |_| {}).unwrap();
    assert_eq!(migrate::summary(back.as_ref()).unwrap(), before);
}

#[test]
fn a_row_that_differs_in_the_target_stops_the_copy_and_stays() {
    let dir = tempfile::tempdir().unwrap();
    let mut source = sqlite(&dir, "inspector.db");
    for n in 0..3 {
        let (i, v) = inspection(n);
        source.insert_inspection(&i, &v).unwrap();
    }
    let mut target = postgres();
    let (mut theirs, v) = inspection(1);
    theirs.status = "unparsed".into();
    target.insert_inspection(&theirs, &v).unwrap();
    let err = migrate::copy(source.as_ref(), target.as_mut(), &mut |_| {}).unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { what: "inspection", key, .. } if key == "ins-00001"),
        "{err}"
    );
    assert!(err.to_string().contains("ins-00001"), "{err}");
    assert_eq!(
        target.inspection("ins-00001").unwrap().unwrap().inspection,
        theirs,
        "not overwritten"
    );

    // A key revoked at the source but live in the target is named, not silently left live.
    let source = sqlite(&dir, "keys.db");
    source.create_api_key("k1", "gate", "h1", false).unwrap();
    let mut target = postgres();
    let (key, hash) = source.api_key_hashes().unwrap().remove(0);
    target.import_api_key(&key, &hash).unwrap();
    source.revoke_api_key("k1").unwrap();
    let err = migrate::copy(source.as_ref(), target.as_mut(), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("keys revoke"), "{err}");

    // A cached answer is not a record: the target's stays, and counts as present.
    let source = sqlite(&dir, "cache.db");
    source.cache_answer("k", "{\"a\":1}").unwrap();
    let mut target = postgres();
    target
        .import_cached_answer(&CachedAnswer {
            key: "k".into(),
            answer: "{\"a\":2}".into(),
            created_at: "2026-01-01 00:00:00".into(),
        })
        .unwrap();
    let report = migrate::copy(source.as_ref(), target.as_mut(), &mut |_| {}).unwrap();
    assert_eq!(report.present("cached answers"), 1);
    assert_eq!(
        target.cached_answer("k").unwrap().as_deref(),
        Some("{\"a\":2}")
    );
}

#[test]
fn photo_paths_from_the_database_are_checked_before_use() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = sqlite(&dir, "inspector.db");
    let (i, v) = inspection(7);
    store.insert_inspection(&i, &v).unwrap();
    store.insert_event(&event(9)).unwrap();
    let photos = migrate::photos(store.as_ref()).unwrap();
    assert_eq!(
        photos
            .iter()
            .map(|p| p.relative.as_str())
            .collect::<Vec<_>>(),
        [format!("events/{:016x}.jpg", 9), i.image_file.clone()]
    );
    assert_eq!(photos[1].sha256.as_deref(), Some(i.image_sha256.as_str()));

    let (mut bad, _) = inspection(8);
    bad.image_file = "../../etc/passwd".into();
    store.insert_inspection(&bad, &[]).unwrap();
    let err = migrate::photos(store.as_ref()).unwrap_err();
    assert!(err.to_string().contains("../../etc/passwd"), "{err}");
}
