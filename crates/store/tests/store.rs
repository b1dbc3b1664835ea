//! The rules database: replacement semantics, filters, Chinese full-text search, migrations.

use std::path::PathBuf;

use inspector_rules::{Categorizer, Document, extract_bytes, extract_file};
use inspector_store::{DocumentRecord, RuleFilter, RuleStore, SqliteStore, StoreError};

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

fn store_all() -> SqliteStore {
    let mut store = SqliteStore::open_in_memory().unwrap();
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

#[test]
fn re_extracting_unchanged_keeps_the_count() {
    let mut store = store_all();
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

#[test]
fn a_changed_document_replaces_its_rules() {
    let mut store = store_all();
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

#[test]
fn chinese_search_finds_the_clause() {
    let store = store_all();
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

#[test]
fn filters_by_category_and_document() {
    let store = store_all();
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

#[test]
fn migrations_run_once_and_refuse_newer_databases() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inspector.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), 2);
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), 2);
    drop(store);
    rusqlite_set_version(&path, 99);
    match SqliteStore::open(&path) {
        Err(StoreError::TooNew { found: 99, .. }) => {}
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a newer database must be refused"),
    }
}

fn rusqlite_set_version(path: &std::path::Path, version: i64) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_update(None, "user_version", version).unwrap();
}

#[test]
fn the_answer_cache_stores_replaces_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inspector.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.cached_answer("k").unwrap(), None);
        store.cache_answer("k", "{\"raw\": 1}").unwrap();
        store.cache_answer("k", "{\"raw\": 2}").unwrap();
        store.cache_answer("other", "x").unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(
        store.cached_answer("k").unwrap().as_deref(),
        Some("{\"raw\": 2}")
    );
    assert_eq!(store.cached_answer("other").unwrap().as_deref(), Some("x"));
}
