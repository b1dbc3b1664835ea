//! The embedded SQLite store.

use std::path::Path;

use inspector_core::{Diagnostic, DiagnosticKind, Rule, SourceSpan};
use rusqlite::{Connection, OptionalExtension, params};

use crate::{
    ApiKey, CachedAnswer, DocumentRecord, DocumentSummary, EventFilter, EventRow, InspectionFilter,
    InspectionRow, InspectionViolation, NewEvent, NewInspection, ReplaceOutcome, Result,
    RuleFilter, RuleStore, Store, StoreError, fts,
};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran. Append
/// only: a released migration never changes.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: documents, rules, diagnostics, full-text index.
    "CREATE TABLE documents (
        title        TEXT PRIMARY KEY,
        file         TEXT NOT NULL,
        sha256       TEXT NOT NULL,
        extracted_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%S', 'now'))
    );
    CREATE TABLE rules (
        id          TEXT PRIMARY KEY,
        document    TEXT NOT NULL REFERENCES documents(title) ON DELETE CASCADE,
        ord         INTEGER NOT NULL,
        clause      TEXT NOT NULL,
        citation    TEXT NOT NULL,
        text        TEXT NOT NULL,
        categories  TEXT NOT NULL,
        parent      TEXT,
        chapter     TEXT,
        source_file TEXT NOT NULL,
        line_start  INTEGER NOT NULL,
        line_end    INTEGER NOT NULL,
        UNIQUE (document, clause)
    );
    CREATE INDEX rules_by_document ON rules(document, ord);
    CREATE TABLE rule_categories (
        rule_id  TEXT NOT NULL REFERENCES rules(id) ON DELETE CASCADE,
        category TEXT NOT NULL,
        PRIMARY KEY (rule_id, category)
    );
    CREATE INDEX rule_categories_by_category ON rule_categories(category);
    CREATE TABLE diagnostics (
        document TEXT NOT NULL REFERENCES documents(title) ON DELETE CASCADE,
        kind     TEXT NOT NULL,
        line     INTEGER NOT NULL,
        message  TEXT NOT NULL
    );
    CREATE VIRTUAL TABLE rules_fts USING fts5(rule_id UNINDEXED, body, tokenize = 'unicode61');",
    // 2: the inspection answer cache (key: image hash + model + adapter + prompt + decoding).
    "CREATE TABLE answer_cache (
        key        TEXT PRIMARY KEY,
        answer     TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%S', 'now'))
    );",
    // 3: inspections answered by the server, with their violations for filtering, and API keys.
    "CREATE TABLE inspections (
        seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
        id                  TEXT NOT NULL UNIQUE,
        created_ms          INTEGER NOT NULL,
        filename            TEXT,
        source              TEXT,
        image_sha256        TEXT NOT NULL,
        image_file          TEXT NOT NULL,
        status              TEXT NOT NULL,
        finding             TEXT NOT NULL,
        model_fingerprint   TEXT NOT NULL,
        adapter_fingerprint TEXT
    );
    CREATE INDEX inspections_by_time ON inspections(created_ms);
    CREATE TABLE inspection_violations (
        inspection_seq INTEGER NOT NULL REFERENCES inspections(seq) ON DELETE CASCADE,
        rule_id        TEXT,
        citation       TEXT,
        risk           TEXT
    );
    CREATE INDEX inspection_violations_by_seq ON inspection_violations(inspection_seq);
    CREATE TABLE api_keys (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL,
        hash       TEXT NOT NULL UNIQUE,
        admin      INTEGER NOT NULL,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%S', 'now')),
        revoked_at TEXT
    );",
    // 4: camera alert events (`inspector watch`), with their acknowledgement.
    "CREATE TABLE camera_events (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        id         TEXT NOT NULL UNIQUE,
        stored_ms  INTEGER NOT NULL,
        camera     TEXT NOT NULL,
        source     TEXT NOT NULL,
        at         REAL NOT NULL,
        rule       TEXT NOT NULL,
        risk       TEXT NOT NULL,
        frame_file TEXT NOT NULL,
        record     TEXT NOT NULL,
        acked_ms   INTEGER,
        acked_by   TEXT
    );
    CREATE INDEX camera_events_by_time ON camera_events(stored_ms);",
    // 5: the rules' version (bumped by every document replaced), for servers sharing a database.
    "CREATE TABLE rules_version (
        one     INTEGER PRIMARY KEY CHECK (one = 1),
        version INTEGER NOT NULL
    );
    INSERT INTO rules_version (one, version) VALUES (1, 0);",
    // 6: request counters per minute, shared by the servers of one database (rate limits).
    "CREATE TABLE rate_counters (
        key    TEXT NOT NULL,
        minute INTEGER NOT NULL,
        hits   INTEGER NOT NULL,
        PRIMARY KEY (key, minute)
    ) WITHOUT ROWID;",
];

const EVENT_COLUMNS: &str =
    "seq, id, stored_ms, camera, source, at, rule, risk, frame_file, record, acked_ms, acked_by";

fn event_row(r: &rusqlite::Row) -> rusqlite::Result<EventRow> {
    let acked_ms: Option<i64> = r.get(10)?;
    let acked_by: Option<String> = r.get(11)?;
    Ok(EventRow {
        seq: r.get(0)?,
        event: NewEvent {
            id: r.get(1)?,
            stored_ms: r.get(2)?,
            camera: r.get(3)?,
            source: r.get(4)?,
            at: r.get(5)?,
            rule: r.get(6)?,
            risk: r.get(7)?,
            frame_file: r.get(8)?,
            record: r.get(9)?,
        },
        acked: acked_ms.map(|ms| (ms, acked_by.unwrap_or_default())),
    })
}

/// Rules, documents and diagnostics in one SQLite file.
pub struct SqliteStore {
    conn: Connection,
}

fn q(doing: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { doing, source }
}

impl SqliteStore {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let open_err = |source| StoreError::Open {
            path: name.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        Self::init(conn, &name)
    }

    pub fn open_in_memory() -> Result<Self> {
        let conn = Connection::open_in_memory().map_err(|source| StoreError::Open {
            path: ":memory:".into(),
            source,
        })?;
        Self::init(conn, ":memory:")
    }

    fn init(mut conn: Connection, name: &str) -> Result<Self> {
        let open_err = |source| StoreError::Open {
            path: name.to_string(),
            source,
        };
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        // The version is read inside a write transaction, so processes opening a new database
        // together migrate it once: the others wait on the lock, then find it current.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(open_err)?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open_err)?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                path: name.to_string(),
                found: version,
                known,
            });
        }
        if version < known {
            for sql in &MIGRATIONS[version as usize..] {
                tx.execute_batch(sql).map_err(open_err)?;
            }
            tx.pragma_update(None, "user_version", known)
                .map_err(open_err)?;
        }
        tx.commit().map_err(open_err)?;
        Ok(SqliteStore { conn })
    }

    /// Write-ahead logging with a full sync at every commit: readers never wait for the writer,
    /// and a committed transaction survives a killed process and a power cut. For the server.
    pub fn enable_wal(&self) -> Result<()> {
        self.conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))
            .map_err(q("switching to write-ahead logging"))?;
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(q("setting synchronous=FULL"))
    }

    /// The schema version this database is at.
    pub fn schema_version(&self) -> Result<i64> {
        self.conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(q("reading the schema version"))
    }

    /// The cached model answer stored under `key` (a JSON document the detector wrote).
    pub fn cached_answer(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT answer FROM answer_cache WHERE key = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()
            .map_err(q("reading the answer cache"))
    }

    /// Stores (or replaces) a model answer under `key`.
    pub fn cache_answer(&self, key: &str, answer: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO answer_cache (key, answer) VALUES (?1, ?2)",
                params![key, answer],
            )
            .map(|_| ())
            .map_err(q("writing the answer cache"))
    }

    fn rules_where(&self, sql_where: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<Rule>> {
        let sql = format!(
            "SELECT id, document, clause, citation, text, categories, parent, chapter,
                    source_file, line_start, line_end
             FROM rules {sql_where}"
        );
        let mut stmt = self.conn.prepare(&sql).map_err(q("listing rules"))?;
        let rows = stmt
            .query_map(args, |row| {
                Ok((
                    Rule {
                        id: row.get(0)?,
                        document: row.get(1)?,
                        clause: row.get(2)?,
                        citation: row.get(3)?,
                        text: row.get(4)?,
                        categories: Vec::new(),
                        parent: row.get(6)?,
                        chapter: row.get(7)?,
                        source: SourceSpan {
                            file: row.get(8)?,
                            line_start: row.get::<_, i64>(9)? as usize,
                            line_end: row.get::<_, i64>(10)? as usize,
                        },
                    },
                    row.get::<_, String>(5)?,
                ))
            })
            .map_err(q("listing rules"))?;
        let mut rules = Vec::new();
        for row in rows {
            let (mut rule, categories) = row.map_err(q("listing rules"))?;
            rule.categories =
                serde_json::from_str(&categories).map_err(|e| StoreError::Corrupt {
                    field: "rules.categories",
                    message: e.to_string(),
                })?;
            rules.push(rule);
        }
        Ok(rules)
    }
}

const INSPECTION_COLUMNS: &str = "seq, id, created_ms, filename, source, image_sha256, \
     image_file, status, finding, model_fingerprint, adapter_fingerprint";

fn inspection_row(row: &rusqlite::Row) -> rusqlite::Result<InspectionRow> {
    Ok(InspectionRow {
        seq: row.get(0)?,
        inspection: NewInspection {
            id: row.get(1)?,
            created_ms: row.get(2)?,
            filename: row.get(3)?,
            source: row.get(4)?,
            image_sha256: row.get(5)?,
            image_file: row.get(6)?,
            status: row.get(7)?,
            finding: row.get(8)?,
            model_fingerprint: row.get(9)?,
            adapter_fingerprint: row.get(10)?,
        },
    })
}

fn api_key_row(row: &rusqlite::Row) -> rusqlite::Result<ApiKey> {
    Ok(ApiKey {
        id: row.get(0)?,
        name: row.get(1)?,
        admin: row.get(2)?,
        created_at: row.get(3)?,
        revoked_at: row.get(4)?,
    })
}

impl SqliteStore {
    /// Stores an answered inspection and its violations in one transaction.
    pub fn insert_inspection(
        &mut self,
        inspection: &NewInspection,
        violations: &[InspectionViolation],
    ) -> Result<i64> {
        let tx = self
            .conn
            .transaction()
            .map_err(q("storing an inspection"))?;
        tx.execute(
            "INSERT INTO inspections (id, created_ms, filename, source, image_sha256, image_file,
                                      status, finding, model_fingerprint, adapter_fingerprint)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                inspection.id,
                inspection.created_ms,
                inspection.filename,
                inspection.source,
                inspection.image_sha256,
                inspection.image_file,
                inspection.status,
                inspection.finding,
                inspection.model_fingerprint,
                inspection.adapter_fingerprint,
            ],
        )
        .map_err(q("storing an inspection"))?;
        let seq = tx.last_insert_rowid();
        for v in violations {
            tx.execute(
                "INSERT INTO inspection_violations (inspection_seq, rule_id, citation, risk)
                 VALUES (?1, ?2, ?3, ?4)",
                params![seq, v.rule_id, v.citation, v.risk],
            )
            .map_err(q("storing an inspection's violations"))?;
        }
        tx.commit().map_err(q("storing an inspection"))?;
        Ok(seq)
    }

    /// The inspection with this id.
    pub fn inspection(&self, id: &str) -> Result<Option<InspectionRow>> {
        self.conn
            .query_row(
                &format!("SELECT {INSPECTION_COLUMNS} FROM inspections WHERE id = ?1"),
                [id],
                inspection_row,
            )
            .optional()
            .map_err(q("reading an inspection"))
    }

    /// Inspections matching `filter`, newest first, at most `filter.limit`.
    pub fn inspections(&self, filter: &InspectionFilter) -> Result<Vec<InspectionRow>> {
        let mut clauses: Vec<&str> = Vec::new();
        let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
        if let Some(s) = &filter.status {
            clauses.push("status = ?");
            args.push(Box::new(s.clone()));
        }
        if let Some(r) = &filter.risk {
            clauses.push(
                "EXISTS (SELECT 1 FROM inspection_violations v
                         WHERE v.inspection_seq = inspections.seq AND v.risk = ?)",
            );
            args.push(Box::new(r.clone()));
        }
        if let Some(r) = &filter.rule {
            clauses.push(
                "EXISTS (SELECT 1 FROM inspection_violations v
                         WHERE v.inspection_seq = inspections.seq
                           AND (v.rule_id = ? OR v.citation = ?))",
            );
            args.push(Box::new(r.clone()));
            args.push(Box::new(r.clone()));
        }
        if let Some(t) = filter.since_ms {
            clauses.push("created_ms >= ?");
            args.push(Box::new(t));
        }
        if let Some(t) = filter.until_ms {
            clauses.push("created_ms < ?");
            args.push(Box::new(t));
        }
        if let Some(seq) = filter.before_seq {
            clauses.push("seq < ?");
            args.push(Box::new(seq));
        }
        if let Some(seq) = filter.after_seq {
            clauses.push("seq > ?");
            args.push(Box::new(seq));
        }
        let sql_where = if clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", clauses.join(" AND "))
        };
        let order = if filter.after_seq.is_some() {
            "ASC"
        } else {
            "DESC"
        };
        let sql = format!(
            "SELECT {INSPECTION_COLUMNS} FROM inspections{sql_where} ORDER BY seq {order} LIMIT {}",
            filter.limit.clamp(1, 1000)
        );
        let mut stmt = self.conn.prepare(&sql).map_err(q("listing inspections"))?;
        let refs: Vec<&dyn rusqlite::ToSql> = args.iter().map(|a| a.as_ref()).collect();
        let rows = stmt
            .query_map(refs.as_slice(), inspection_row)
            .map_err(q("listing inspections"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(q("listing inspections"))
    }

    /// Stores a camera event; `false` when one with its id is already stored (a rerun of the
    /// same video gives the same ids), which is left as it is.
    pub fn insert_event(&self, event: &NewEvent) -> Result<bool> {
        let n = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO camera_events
                     (id, stored_ms, camera, source, at, rule, risk, frame_file, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    event.id,
                    event.stored_ms,
                    event.camera,
                    event.source,
                    event.at,
                    event.rule,
                    event.risk,
                    event.frame_file,
                    event.record,
                ],
            )
            .map_err(q("storing a camera event"))?;
        Ok(n == 1)
    }

    /// The event with this id.
    pub fn event(&self, id: &str) -> Result<Option<EventRow>> {
        self.conn
            .query_row(
                &format!("SELECT {EVENT_COLUMNS} FROM camera_events WHERE id = ?1"),
                [id],
                event_row,
            )
            .optional()
            .map_err(q("reading a camera event"))
    }

    /// Events matching `filter`: newest first, or with `after_seq` oldest first (a stream).
    pub fn events(&self, filter: &EventFilter) -> Result<Vec<EventRow>> {
        let mut clauses: Vec<&str> = Vec::new();
        let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
        for (clause, value) in [
            ("camera = ?", &filter.camera),
            ("rule = ?", &filter.rule),
            ("risk = ?", &filter.risk),
        ] {
            if let Some(v) = value {
                clauses.push(clause);
                args.push(Box::new(v.clone()));
            }
        }
        match filter.acked {
            Some(true) => clauses.push("acked_ms IS NOT NULL"),
            Some(false) => clauses.push("acked_ms IS NULL"),
            None => {}
        }
        for (clause, value) in [
            ("stored_ms >= ?", filter.since_ms),
            ("stored_ms < ?", filter.until_ms),
            ("seq < ?", filter.before_seq),
            ("seq > ?", filter.after_seq),
        ] {
            if let Some(v) = value {
                clauses.push(clause);
                args.push(Box::new(v));
            }
        }
        let sql_where = if clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", clauses.join(" AND "))
        };
        let order = if filter.after_seq.is_some() {
            "ASC"
        } else {
            "DESC"
        };
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM camera_events{sql_where} ORDER BY seq {order} LIMIT {}",
            filter.limit.clamp(1, 1000)
        );
        let mut stmt = self
            .conn
            .prepare(&sql)
            .map_err(q("listing camera events"))?;
        let refs: Vec<&dyn rusqlite::ToSql> = args.iter().map(|a| a.as_ref()).collect();
        let rows = stmt
            .query_map(refs.as_slice(), event_row)
            .map_err(q("listing camera events"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(q("listing camera events"))
    }

    /// Acknowledges an event: `None` if there is no such event; `Some(false)` if it was
    /// already acknowledged (the first acknowledgement stays).
    pub fn ack_event(&self, id: &str, by: &str, at_ms: i64) -> Result<Option<bool>> {
        let n = self
            .conn
            .execute(
                "UPDATE camera_events SET acked_ms = ?2, acked_by = ?3
                 WHERE id = ?1 AND acked_ms IS NULL",
                params![id, at_ms, by],
            )
            .map_err(q("acknowledging a camera event"))?;
        if n == 1 {
            return Ok(Some(true));
        }
        Ok(self.event(id)?.map(|_| false))
    }

    /// Stores a new API key under its hash (the key itself is never stored).
    pub fn create_api_key(&self, id: &str, name: &str, hash: &str, admin: bool) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO api_keys (id, name, hash, admin) VALUES (?1, ?2, ?3, ?4)",
                params![id, name, hash, admin],
            )
            .map(|_| ())
            .map_err(q("storing an API key"))
    }

    /// The live (not revoked) key with this hash.
    pub fn api_key_by_hash(&self, hash: &str) -> Result<Option<ApiKey>> {
        self.conn
            .query_row(
                "SELECT id, name, admin, created_at, revoked_at FROM api_keys
                 WHERE hash = ?1 AND revoked_at IS NULL",
                [hash],
                api_key_row,
            )
            .optional()
            .map_err(q("checking an API key"))
    }

    /// The key with this hash, revoked or not (a revoked key is refused by name, not taken
    /// for an unknown one).
    pub fn api_key_with_hash(&self, hash: &str) -> Result<Option<ApiKey>> {
        self.conn
            .query_row(
                "SELECT id, name, admin, created_at, revoked_at FROM api_keys WHERE hash = ?1",
                [hash],
                api_key_row,
            )
            .optional()
            .map_err(q("checking an API key"))
    }

    /// Every key, revoked ones included, oldest first.
    pub fn api_keys(&self) -> Result<Vec<ApiKey>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, name, admin, created_at, revoked_at FROM api_keys
                 ORDER BY created_at, id",
            )
            .map_err(q("listing API keys"))?;
        let rows = stmt
            .query_map([], api_key_row)
            .map_err(q("listing API keys"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(q("listing API keys"))
    }

    /// Revokes a key; false when no live key has this id.
    pub fn revoke_api_key(&self, id: &str) -> Result<bool> {
        self.conn
            .execute(
                "UPDATE api_keys SET revoked_at = strftime('%Y-%m-%d %H:%M:%S', 'now')
                 WHERE id = ?1 AND revoked_at IS NULL",
                [id],
            )
            .map(|n| n > 0)
            .map_err(q("revoking an API key"))
    }
}

pub(crate) fn kind_name(kind: DiagnosticKind) -> &'static str {
    match kind {
        DiagnosticKind::Unparsable => "unparsable",
        DiagnosticKind::Duplicate => "duplicate",
        DiagnosticKind::Empty => "empty",
        DiagnosticKind::Misplaced => "misplaced",
    }
}

pub(crate) fn kind_from(name: &str) -> Option<DiagnosticKind> {
    Some(match name {
        "unparsable" => DiagnosticKind::Unparsable,
        "duplicate" => DiagnosticKind::Duplicate,
        "empty" => DiagnosticKind::Empty,
        "misplaced" => DiagnosticKind::Misplaced,
        _ => return None,
    })
}

pub(crate) fn bare_title(s: &str) -> &str {
    s.trim().trim_start_matches('《').trim_end_matches('》')
}

impl SqliteStore {
    /// Increases whenever a document's rules are replaced.
    pub fn rules_version(&self) -> Result<i64> {
        self.conn
            .query_row("SELECT version FROM rules_version", [], |r| r.get(0))
            .map_err(q("reading the rules' version"))
    }
}

/// [`Store`] by the inherent methods of the same names.
impl Store for SqliteStore {
    fn enable_wal(&self) -> Result<()> {
        SqliteStore::enable_wal(self)
    }
    fn schema_version(&self) -> Result<i64> {
        SqliteStore::schema_version(self)
    }
    fn rules_version(&self) -> Result<i64> {
        SqliteStore::rules_version(self)
    }
    fn cached_answer(&self, key: &str) -> Result<Option<String>> {
        SqliteStore::cached_answer(self, key)
    }
    fn cache_answer(&self, key: &str, answer: &str) -> Result<()> {
        SqliteStore::cache_answer(self, key, answer)
    }
    fn insert_inspection(
        &mut self,
        inspection: &NewInspection,
        violations: &[InspectionViolation],
    ) -> Result<i64> {
        SqliteStore::insert_inspection(self, inspection, violations)
    }
    fn inspection(&self, id: &str) -> Result<Option<InspectionRow>> {
        SqliteStore::inspection(self, id)
    }
    fn inspections(&self, filter: &InspectionFilter) -> Result<Vec<InspectionRow>> {
        SqliteStore::inspections(self, filter)
    }
    fn insert_event(&self, event: &NewEvent) -> Result<bool> {
        SqliteStore::insert_event(self, event)
    }
    fn event(&self, id: &str) -> Result<Option<EventRow>> {
        SqliteStore::event(self, id)
    }
    fn events(&self, filter: &EventFilter) -> Result<Vec<EventRow>> {
        SqliteStore::events(self, filter)
    }
    fn ack_event(&self, id: &str, by: &str, at_ms: i64) -> Result<Option<bool>> {
        SqliteStore::ack_event(self, id, by, at_ms)
    }
    fn create_api_key(&self, id: &str, name: &str, hash: &str, admin: bool) -> Result<()> {
        SqliteStore::create_api_key(self, id, name, hash, admin)
    }
    fn api_key_by_hash(&self, hash: &str) -> Result<Option<ApiKey>> {
        SqliteStore::api_key_by_hash(self, hash)
    }
    fn api_key_with_hash(&self, hash: &str) -> Result<Option<ApiKey>> {
        SqliteStore::api_key_with_hash(self, hash)
    }
    fn api_keys(&self) -> Result<Vec<ApiKey>> {
        SqliteStore::api_keys(self)
    }
    fn revoke_api_key(&self, id: &str) -> Result<bool> {
        SqliteStore::revoke_api_key(self, id)
    }

    fn inspection_violations(&self, seq: i64) -> Result<Vec<InspectionViolation>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT rule_id, citation, risk FROM inspection_violations
                 WHERE inspection_seq = ?1 ORDER BY rowid",
            )
            .map_err(q("reading an inspection's violations"))?;
        let rows = stmt
            .query_map([seq], |r| {
                Ok(InspectionViolation {
                    rule_id: r.get(0)?,
                    citation: r.get(1)?,
                    risk: r.get(2)?,
                })
            })
            .map_err(q("reading an inspection's violations"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(q("reading an inspection's violations"))
    }

    fn cached_answers(&self, after: &str, limit: usize) -> Result<Vec<CachedAnswer>> {
        // SQLite compares TEXT bytewise (BINARY collation), as PostgreSQL does under "C".
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT key, answer, created_at FROM answer_cache WHERE key > ?1
                 ORDER BY key LIMIT ?2",
            )
            .map_err(q("listing the answer cache"))?;
        let rows = stmt
            .query_map(params![after, limit.clamp(1, 1000) as i64], |r| {
                Ok(CachedAnswer {
                    key: r.get(0)?,
                    answer: r.get(1)?,
                    created_at: r.get(2)?,
                })
            })
            .map_err(q("listing the answer cache"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(q("listing the answer cache"))
    }

    fn import_cached_answer(&self, entry: &CachedAnswer) -> Result<bool> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO answer_cache (key, answer, created_at) VALUES (?1, ?2, ?3)",
                params![entry.key, entry.answer, entry.created_at],
            )
            .map(|n| n == 1)
            .map_err(q("writing the answer cache"))
    }

    fn api_key_hashes(&self) -> Result<Vec<(ApiKey, String)>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, name, admin, created_at, revoked_at, hash FROM api_keys
                 ORDER BY created_at, id",
            )
            .map_err(q("listing API keys"))?;
        let rows = stmt
            .query_map([], |r| Ok((api_key_row(r)?, r.get(5)?)))
            .map_err(q("listing API keys"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(q("listing API keys"))
    }

    fn import_api_key(&self, key: &ApiKey, hash: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO api_keys (id, name, hash, admin, created_at, revoked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    key.id,
                    key.name,
                    hash,
                    key.admin,
                    key.created_at,
                    key.revoked_at
                ],
            )
            .map(|_| ())
            .map_err(q("storing an API key"))
    }

    fn import_document(
        &mut self,
        doc: &DocumentRecord,
        extracted_at: &str,
        rules: &[Rule],
        diagnostics: &[Diagnostic],
    ) -> Result<()> {
        self.replace(doc, Some(extracted_at), rules, diagnostics)
            .map(|_| ())
    }

    fn count_hit(&self, key: &str, minute: i64) -> Result<i64> {
        self.conn
            .query_row(
                "INSERT INTO rate_counters (key, minute, hits) VALUES (?1, ?2, 1)
                 ON CONFLICT (key, minute) DO UPDATE SET hits = hits + 1 RETURNING hits",
                params![key, minute],
                |r| r.get(0),
            )
            .map_err(q("counting a request"))
    }

    fn hits(&self, key: &str, minute: i64) -> Result<i64> {
        self.conn
            .query_row(
                "SELECT hits FROM rate_counters WHERE key = ?1 AND minute = ?2",
                params![key, minute],
                |r| r.get(0),
            )
            .optional()
            .map(|n| n.unwrap_or(0))
            .map_err(q("reading a request count"))
    }

    fn prune_hits(&self, before_minute: i64) -> Result<usize> {
        self.conn
            .execute(
                "DELETE FROM rate_counters WHERE minute < ?1",
                [before_minute],
            )
            .map_err(q("forgetting old request counts"))
    }
}

impl SqliteStore {
    /// Replaces a document's rules and diagnostics in one transaction; `extracted_at` keeps the
    /// time another database extracted it (`db migrate`), else it is now.
    fn replace(
        &mut self,
        doc: &DocumentRecord,
        extracted_at: Option<&str>,
        rules: &[Rule],
        diagnostics: &[Diagnostic],
    ) -> Result<ReplaceOutcome> {
        let tx = self
            .conn
            .transaction()
            .map_err(q("starting a transaction"))?;
        let previous: Option<String> = tx
            .query_row(
                "SELECT sha256 FROM documents WHERE title = ?1",
                [&doc.title],
                |r| r.get(0),
            )
            .optional()
            .map_err(q("reading the document"))?;
        let removed: usize = tx
            .query_row(
                "SELECT count(*) FROM rules WHERE document = ?1",
                [&doc.title],
                |r| r.get::<_, i64>(0),
            )
            .map_err(q("counting old rules"))? as usize;
        tx.execute(
            "DELETE FROM rules_fts WHERE rule_id IN (SELECT id FROM rules WHERE document = ?1)",
            [&doc.title],
        )
        .map_err(q("removing old search entries"))?;
        tx.execute("DELETE FROM documents WHERE title = ?1", [&doc.title])
            .map_err(q("removing the old document"))?;
        tx.execute(
            "INSERT INTO documents (title, file, sha256, extracted_at)
             VALUES (?1, ?2, ?3, COALESCE(?4, strftime('%Y-%m-%d %H:%M:%S', 'now')))",
            params![doc.title, doc.file, doc.sha256, extracted_at],
        )
        .map_err(q("storing the document"))?;
        {
            let mut insert_rule = tx
                .prepare(
                    "INSERT INTO rules (id, document, ord, clause, citation, text, categories,
                                        parent, chapter, source_file, line_start, line_end)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )
                .map_err(q("storing rules"))?;
            let mut insert_category = tx
                .prepare(
                    "INSERT OR IGNORE INTO rule_categories (rule_id, category) VALUES (?1, ?2)",
                )
                .map_err(q("storing categories"))?;
            let mut insert_fts = tx
                .prepare("INSERT INTO rules_fts (rule_id, body) VALUES (?1, ?2)")
                .map_err(q("indexing rules"))?;
            for (ord, rule) in rules.iter().enumerate() {
                let categories =
                    serde_json::to_string(&rule.categories).expect("strings serialise");
                insert_rule
                    .execute(params![
                        rule.id,
                        doc.title,
                        ord as i64,
                        rule.clause,
                        rule.citation,
                        rule.text,
                        categories,
                        rule.parent,
                        rule.chapter,
                        rule.source.file,
                        rule.source.line_start as i64,
                        rule.source.line_end as i64,
                    ])
                    .map_err(q("storing rules"))?;
                for category in &rule.categories {
                    insert_category
                        .execute(params![rule.id, category])
                        .map_err(q("storing categories"))?;
                }
                let body = fts::index_text(&fts::rule_body(rule));
                insert_fts
                    .execute(params![rule.id, body])
                    .map_err(q("indexing rules"))?;
            }
            let mut insert_diag = tx
                .prepare("INSERT INTO diagnostics (document, kind, line, message) VALUES (?1, ?2, ?3, ?4)")
                .map_err(q("storing diagnostics"))?;
            for d in diagnostics {
                insert_diag
                    .execute(params![
                        doc.title,
                        kind_name(d.kind),
                        d.line as i64,
                        d.message
                    ])
                    .map_err(q("storing diagnostics"))?;
            }
        }
        tx.execute("UPDATE rules_version SET version = version + 1", [])
            .map_err(q("bumping the rules' version"))?;
        tx.commit().map_err(q("committing"))?;
        Ok(ReplaceOutcome {
            removed,
            added: rules.len(),
            unchanged: previous.as_deref() == Some(doc.sha256.as_str()),
        })
    }
}

impl RuleStore for SqliteStore {
    fn replace_document(
        &mut self,
        doc: &DocumentRecord,
        rules: &[Rule],
        diagnostics: &[Diagnostic],
    ) -> Result<ReplaceOutcome> {
        self.replace(doc, None, rules, diagnostics)
    }

    fn documents(&self) -> Result<Vec<DocumentSummary>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT d.title, d.file, d.sha256, d.extracted_at,
                        (SELECT count(*) FROM rules r WHERE r.document = d.title),
                        (SELECT count(*) FROM diagnostics g WHERE g.document = d.title)
                 FROM documents d ORDER BY d.title",
            )
            .map_err(q("listing documents"))?;
        let rows = stmt
            .query_map([], |row| {
                Ok(DocumentSummary {
                    record: DocumentRecord {
                        title: row.get(0)?,
                        file: row.get(1)?,
                        sha256: row.get(2)?,
                    },
                    extracted_at: row.get(3)?,
                    rules: row.get::<_, i64>(4)? as usize,
                    diagnostics: row.get::<_, i64>(5)? as usize,
                })
            })
            .map_err(q("listing documents"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(q("listing documents"))
    }

    fn rules(&self, filter: &RuleFilter) -> Result<Vec<Rule>> {
        let category = filter.category.clone().unwrap_or_default();
        let document = filter
            .document
            .as_deref()
            .map(bare_title)
            .unwrap_or_default()
            .to_string();
        self.rules_where(
            "WHERE (?1 = '' OR id IN (SELECT rule_id FROM rule_categories WHERE category = ?1))
               AND (?2 = '' OR document = ?2)
             ORDER BY document, ord",
            &[&category, &document],
        )
    }

    fn rule(&self, id: &str) -> Result<Option<Rule>> {
        Ok(self
            .rules_where("WHERE id = ?1", &[&id])?
            .into_iter()
            .next())
    }

    fn search(&self, query: &str, limit: usize) -> Result<Vec<Rule>> {
        let Some(fts_query) = fts::match_query(query) else {
            return Ok(Vec::new());
        };
        let mut stmt = self
            .conn
            .prepare("SELECT rule_id FROM rules_fts WHERE rules_fts MATCH ?1 ORDER BY bm25(rules_fts) LIMIT ?2")
            .map_err(q("searching"))?;
        let ids = stmt
            .query_map(params![fts_query, limit as i64], |r| r.get::<_, String>(0))
            .map_err(q("searching"))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(q("searching"))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(rule) = self.rule(&id)? {
                out.push(rule);
            }
        }
        Ok(out)
    }

    fn diagnostics(&self, document: Option<&str>) -> Result<Vec<(String, Diagnostic)>> {
        let document = document.map(bare_title).unwrap_or_default().to_string();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT document, kind, line, message FROM diagnostics
                 WHERE ?1 = '' OR document = ?1 ORDER BY document, line",
            )
            .map_err(q("listing diagnostics"))?;
        let rows = stmt
            .query_map([&document], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, String>(3)?,
                ))
            })
            .map_err(q("listing diagnostics"))?;
        let mut out = Vec::new();
        for row in rows {
            let (doc, kind, line, message) = row.map_err(q("listing diagnostics"))?;
            let kind = kind_from(&kind).ok_or_else(|| StoreError::Corrupt {
                field: "diagnostics.kind",
                message: kind.clone(),
            })?;
            out.push((
                doc,
                Diagnostic {
                    kind,
                    line: line as usize,
                    message,
                },
            ));
        }
        Ok(out)
    }
}
