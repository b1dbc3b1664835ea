//! The Safety Inspector database.
//!
//! Regulation documents and their rules, the inspection answer cache, the inspections the
//! server answered, camera events, API keys (hashes only) and shared request counters, behind
//! the [`Store`] trait (with [`RuleStore`] as its rules half). Two implementations with the same
//! tables under one schema version: [`SqliteStore`], one file (`inspector.db` by default), the
//! embedded default; and [`PostgresStore`], a server that several `inspector serve` replicas
//! share (TLS as libpq's `sslmode` says). [`open`] picks one by the `--db` value and migrates
//! it; [`migrate`] copies one database into another.
//!
//! Full-text search works for Chinese: CJK runs are indexed as overlapping character bigrams
//! (the approach of Lucene's CJK analyser), Latin words as lowercased words, and queries are
//! split the same way, so `安全帽` finds `必须佩戴安全帽` without a dictionary.
//!
//! ```
//! use inspector_core::{Rule, SourceSpan};
//! use inspector_store::{DocumentRecord, RuleFilter, RuleStore, SqliteStore};
//!
//! let mut store = SqliteStore::open_in_memory().unwrap();
//! let rule = Rule::new("安全作业规程", "3.1", "进入作业区域必须佩戴安全帽。",
//!                      vec!["安全防护".into()], None, SourceSpan::default());
//! let doc = DocumentRecord { title: "安全作业规程".into(), file: "a.md".into(), sha256: "00".into() };
//! store.replace_document(&doc, &[rule], &[]).unwrap();
//! assert_eq!(store.rules(&RuleFilter::default()).unwrap().len(), 1);
//! assert_eq!(store.search("安全帽", 10).unwrap()[0].clause, "3.1");
//! ```

mod fts;
pub mod migrate;
mod pgpass;
mod pgtls;
mod postgres;
mod sqlite;
#[doc(hidden)]
pub mod testing;

use inspector_core::{Diagnostic, Rule};

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Everything the product keeps, behind one interface with two implementations: [`SqliteStore`]
/// (one file, the embedded default) and [`PostgresStore`] (a server shared by replicas).
/// [`open`] picks one by the `--db` value.
pub trait Store: RuleStore + Send {
    /// Makes every commit durable before it returns and lets readers go on while one writes
    /// (SQLite: write-ahead logging with a full sync; PostgreSQL always is). For the server.
    fn enable_wal(&self) -> Result<()> {
        Ok(())
    }
    /// The schema version this database is at (the same numbering on both dialects).
    fn schema_version(&self) -> Result<i64>;
    /// Increases whenever a document's rules are replaced (servers reload their rules when it
    /// changes, so a document uploaded through one replica is cited by all).
    fn rules_version(&self) -> Result<i64>;
    /// The cached model answer stored under `key`.
    fn cached_answer(&self, key: &str) -> Result<Option<String>>;
    /// Stores (or replaces) a model answer under `key`.
    fn cache_answer(&self, key: &str, answer: &str) -> Result<()>;
    /// Stores an answered inspection and its violations in one transaction.
    fn insert_inspection(
        &mut self,
        inspection: &NewInspection,
        violations: &[InspectionViolation],
    ) -> Result<i64>;
    fn inspection(&self, id: &str) -> Result<Option<InspectionRow>>;
    /// Newest first (with `after_seq` oldest first), at most `filter.limit`.
    fn inspections(&self, filter: &InspectionFilter) -> Result<Vec<InspectionRow>>;
    /// `false` when an event with its id is already stored (left as it is).
    fn insert_event(&self, event: &NewEvent) -> Result<bool>;
    fn event(&self, id: &str) -> Result<Option<EventRow>>;
    /// Newest first, or with `after_seq` oldest first (a stream).
    fn events(&self, filter: &EventFilter) -> Result<Vec<EventRow>>;
    /// `None`: no such event; `Some(false)`: acknowledged before (the first one stays).
    fn ack_event(&self, id: &str, by: &str, at_ms: i64) -> Result<Option<bool>>;
    fn create_api_key(&self, id: &str, name: &str, hash: &str, admin: bool) -> Result<()>;
    /// The live (not revoked) key with this hash.
    fn api_key_by_hash(&self, hash: &str) -> Result<Option<ApiKey>>;
    /// The key with this hash, revoked or not.
    fn api_key_with_hash(&self, hash: &str) -> Result<Option<ApiKey>>;
    /// Every key, oldest first.
    fn api_keys(&self) -> Result<Vec<ApiKey>>;
    /// `false` when no live key has this id.
    fn revoke_api_key(&self, id: &str) -> Result<bool>;

    // What `db migrate` reads and writes: every row with the times it was stored at.

    /// An inspection's violations, in the order they were stored.
    fn inspection_violations(&self, seq: i64) -> Result<Vec<InspectionViolation>>;
    /// Cached answers whose keys sort after `after` (bytewise), in that order, at most `limit`
    /// (1 to 1000).
    fn cached_answers(&self, after: &str, limit: usize) -> Result<Vec<CachedAnswer>>;
    /// Stores a cached answer with its time; `false` (and nothing written) when its key is
    /// there already.
    fn import_cached_answer(&self, entry: &CachedAnswer) -> Result<bool>;
    /// Every key with its hash, oldest first.
    fn api_key_hashes(&self) -> Result<Vec<(ApiKey, String)>>;
    /// Stores a key as another database holds it: its times and revocation are kept.
    fn import_api_key(&self, key: &ApiKey, hash: &str) -> Result<()>;
    /// Adds one to `key`'s counter of `minute` (minutes since the Unix epoch) and returns the
    /// new count: request limits that the servers of one database share.
    fn count_hit(&self, key: &str, minute: i64) -> Result<i64>;
    /// `key`'s count of `minute` (0 when none).
    fn hits(&self, key: &str, minute: i64) -> Result<i64>;
    /// Forgets the counts of minutes before `before_minute`.
    fn prune_hits(&self, before_minute: i64) -> Result<usize>;
    /// Stores a document with its rules and diagnostics as [`RuleStore::replace_document`] does
    /// (one transaction; the rules' version moves), keeping the time it was extracted.
    fn import_document(
        &mut self,
        doc: &DocumentRecord,
        extracted_at: &str,
        rules: &[Rule],
        diagnostics: &[Diagnostic],
    ) -> Result<()>;
}

/// A cached model answer with the time it was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedAnswer {
    pub key: String,
    pub answer: String,
    pub created_at: String,
}

/// Opens the database `db` names: a `postgres://` (or `postgresql://`) URL, or a SQLite file
/// (optionally written `sqlite:PATH`). PostgreSQL passwords come from the URL, `PGPASSWORD` or
/// the password file (`PGPASSFILE`, else `~/.pgpass`); errors never show them.
pub fn open(db: &str) -> Result<Box<dyn Store>> {
    if is_server_url(db) {
        return Ok(Box::new(PostgresStore::open(db)?));
    }
    let path = db.strip_prefix("sqlite:").unwrap_or(db);
    Ok(Box::new(SqliteStore::open(std::path::Path::new(path))?))
}

/// Whether `db` names a database server (PostgreSQL), which several processes may share,
/// rather than a SQLite file.
pub fn is_server_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// A database URL with its password (and user) hidden, for logs and errors.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            format!("{scheme}://{user}@{}", &rest[at + 1..])
        }
        None => url.to_string(),
    }
}

/// Errors from the store, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database {url}: {message}")]
    Postgres { url: String, message: String },
    #[error(
        "database {path} was written by a newer inspector (schema version {found}, this one knows {known})"
    )]
    TooNew {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("database error while {doing}: {source}")]
    Query {
        doing: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database error while {doing}: {source}")]
    PgQuery {
        doing: &'static str,
        #[source]
        source: ::postgres::Error,
    },
    #[error("the target database already holds {what} `{key}` with other contents: {message}")]
    Conflict {
        what: &'static str,
        key: String,
        message: String,
    },
    #[error("database holds an invalid value in {field}: {message}")]
    Corrupt {
        field: &'static str,
        message: String,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The identity of a stored document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentRecord {
    /// The title, which keys the document.
    pub title: String,
    /// The file it was last extracted from.
    pub file: String,
    /// SHA-256 of that file.
    pub sha256: String,
}

/// A stored document with its counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentSummary {
    pub record: DocumentRecord,
    pub extracted_at: String,
    pub rules: usize,
    pub diagnostics: usize,
}

/// What replacing a document did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplaceOutcome {
    /// Rules of the same title that were there before (0 for a new document).
    pub removed: usize,
    pub added: usize,
    /// True when the file's hash equals the one stored: nothing changed.
    pub unchanged: bool,
}

/// Which rules to list. Empty fields select everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleFilter {
    /// Rules having this category (anywhere in their list).
    pub category: Option<String>,
    /// Rules of this document (exact title, 《》 optional).
    pub document: Option<String>,
}

/// An answered inspection, as the server stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewInspection {
    /// Public id (time-ordered, random).
    pub id: String,
    /// Milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// The name the client gave the photo; metadata only, never a path.
    pub filename: Option<String>,
    /// Where the photo came from (a camera or place the client names); metadata only.
    pub source: Option<String>,
    pub image_sha256: String,
    /// Where the photo is, relative to the server's data dir (derived from its hash).
    pub image_file: String,
    /// `safe`, `violation` or `unparsed`.
    pub status: String,
    /// The finding as JSON.
    pub finding: String,
    pub model_fingerprint: String,
    pub adapter_fingerprint: Option<String>,
}

/// A stored inspection and its position (for cursors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectionRow {
    pub seq: i64,
    pub inspection: NewInspection,
}

/// One violation of an inspection, as indexed for filtering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectionViolation {
    pub rule_id: Option<String>,
    pub citation: Option<String>,
    /// 高, 中 or 低.
    pub risk: Option<String>,
}

/// Which inspections to list (newest first). Empty fields select everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InspectionFilter {
    pub status: Option<String>,
    /// Inspections with at least one violation of this risk.
    pub risk: Option<String>,
    /// Inspections citing this rule (by id or by citation).
    pub rule: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Only inspections stored before this position (the cursor).
    pub before_seq: Option<i64>,
    /// Oldest first, stored after this position (for reading everything in order).
    pub after_seq: Option<i64>,
    pub limit: usize,
}

/// A camera alert event, as `inspector watch` stores it (its frame is a file beside it).
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The event id (16 hex digits, derived from camera, source, time and rule).
    pub id: String,
    /// When it was stored, milliseconds since the Unix epoch.
    pub stored_ms: i64,
    pub camera: String,
    /// The source with credentials redacted.
    pub source: String,
    /// Seconds: of media time for a file, since the epoch for a live source.
    pub at: f64,
    /// The rule's canonical citation.
    pub rule: String,
    /// 高, 中 or 低.
    pub risk: String,
    /// The frame, relative to the data dir (`events/<id>.jpg`).
    pub frame_file: String,
    /// The whole event as JSON (violations and all).
    pub record: String,
}

/// A stored event, its position (for cursors and streams) and its acknowledgement.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub seq: i64,
    pub event: NewEvent,
    /// When and by whom it was acknowledged.
    pub acked: Option<(i64, String)>,
}

/// Which events to list. Empty fields select everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub camera: Option<String>,
    pub rule: Option<String>,
    pub risk: Option<String>,
    pub acked: Option<bool>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Newest first, stored before this position (the cursor).
    pub before_seq: Option<i64>,
    /// Oldest first, stored after this position (a stream's resumption point).
    pub after_seq: Option<i64>,
    pub limit: usize,
}

/// An API key's record (the key itself is never stored, only its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub admin: bool,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

/// The operations every store offers.
pub trait RuleStore {
    /// Replaces every rule and diagnostic of `doc.title` with these, in one transaction.
    fn replace_document(
        &mut self,
        doc: &DocumentRecord,
        rules: &[Rule],
        diagnostics: &[Diagnostic],
    ) -> Result<ReplaceOutcome>;
    fn documents(&self) -> Result<Vec<DocumentSummary>>;
    /// Rules in document order (documents by title, then as they appear).
    fn rules(&self, filter: &RuleFilter) -> Result<Vec<Rule>>;
    fn rule(&self, id: &str) -> Result<Option<Rule>>;
    /// Rules matching `query`, best first.
    fn search(&self, query: &str, limit: usize) -> Result<Vec<Rule>>;
    /// Diagnostics of one document, or of all, as (document title, diagnostic).
    fn diagnostics(&self, document: Option<&str>) -> Result<Vec<(String, Diagnostic)>>;
}
