//! The PostgreSQL store: the same tables, queries and answers as [`crate::SqliteStore`], for a
//! database that several `inspector serve` replicas share.
//!
//! Migrations run in one transaction under a transaction-level advisory lock, so replicas
//! starting together migrate once: the others wait, then find the schema current. Chinese search
//! keeps each rule's tokens (the bigrams of [`crate::fts`]) in a `text[]` with a GIN index, finds
//! the rules holding every query token with `@>`, and ranks them with the BM25 that SQLite's FTS5
//! uses (k1 1.2, b 0.75), computed here from the same counts, so both stores return the same
//! rules in the same order.

use std::sync::Mutex;

use inspector_core::{Diagnostic, Rule, SourceSpan};
use postgres::{Client, NoTls, Row, types::ToSql};

use crate::{
    ApiKey, CachedAnswer, DocumentRecord, DocumentSummary, EventFilter, EventRow, InspectionFilter,
    InspectionRow, InspectionViolation, NewEvent, NewInspection, ReplaceOutcome, Result,
    RuleFilter, RuleStore, Store, StoreError, fts, sqlite::MIGRATIONS as SQLITE_MIGRATIONS,
};

/// Schema migrations, one for each of SQLite's (the same schema version on both dialects).
/// Append only.
const MIGRATIONS: &[&str] = &[
    // 1: documents, rules, diagnostics, the search index.
    "CREATE TABLE documents (
        title        TEXT PRIMARY KEY,
        file         TEXT NOT NULL,
        sha256       TEXT NOT NULL,
        extracted_at TEXT NOT NULL
            DEFAULT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')
    );
    CREATE TABLE rules (
        id          TEXT PRIMARY KEY,
        document    TEXT NOT NULL REFERENCES documents(title) ON DELETE CASCADE,
        ord         BIGINT NOT NULL,
        clause      TEXT NOT NULL,
        citation    TEXT NOT NULL,
        text        TEXT NOT NULL,
        categories  TEXT NOT NULL,
        parent      TEXT,
        chapter     TEXT,
        source_file TEXT NOT NULL,
        line_start  BIGINT NOT NULL,
        line_end    BIGINT NOT NULL,
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
        seq      BIGSERIAL PRIMARY KEY,
        document TEXT NOT NULL REFERENCES documents(title) ON DELETE CASCADE,
        kind     TEXT NOT NULL,
        line     BIGINT NOT NULL,
        message  TEXT NOT NULL
    );
    CREATE TABLE rules_fts (
        seq     BIGSERIAL PRIMARY KEY,
        rule_id TEXT NOT NULL REFERENCES rules(id) ON DELETE CASCADE,
        tokens  TEXT[] NOT NULL
    );
    CREATE INDEX rules_fts_tokens ON rules_fts USING GIN (tokens);",
    // 2: the inspection answer cache.
    "CREATE TABLE answer_cache (
        key        TEXT PRIMARY KEY,
        answer     TEXT NOT NULL,
        created_at TEXT NOT NULL
            DEFAULT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')
    );",
    // 3: inspections and their violations, API keys.
    "CREATE TABLE inspections (
        seq                 BIGSERIAL PRIMARY KEY,
        id                  TEXT NOT NULL UNIQUE,
        created_ms          BIGINT NOT NULL,
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
        inspection_seq BIGINT NOT NULL REFERENCES inspections(seq) ON DELETE CASCADE,
        rule_id        TEXT,
        citation       TEXT,
        risk           TEXT
    );
    CREATE INDEX inspection_violations_by_seq ON inspection_violations(inspection_seq);
    CREATE TABLE api_keys (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL,
        hash       TEXT NOT NULL UNIQUE,
        admin      BOOLEAN NOT NULL,
        created_at TEXT NOT NULL
            DEFAULT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'),
        revoked_at TEXT
    );",
    // 4: camera alert events.
    "CREATE TABLE camera_events (
        seq        BIGSERIAL PRIMARY KEY,
        id         TEXT NOT NULL UNIQUE,
        stored_ms  BIGINT NOT NULL,
        camera     TEXT NOT NULL,
        source     TEXT NOT NULL,
        at         DOUBLE PRECISION NOT NULL,
        rule       TEXT NOT NULL,
        risk       TEXT NOT NULL,
        frame_file TEXT NOT NULL,
        record     TEXT NOT NULL,
        acked_ms   BIGINT,
        acked_by   TEXT
    );
    CREATE INDEX camera_events_by_time ON camera_events(stored_ms);",
    // 5: the rules' version (bumped by every document replaced).
    "CREATE TABLE rules_version (
        one     BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
        version BIGINT NOT NULL
    );
    INSERT INTO rules_version (version) VALUES (0);",
    // 6: request counters per minute, shared by the replicas (rate limits). Unlogged: fast,
    // and a counter lost in a crash only forgives a minute.
    "CREATE UNLOGGED TABLE rate_counters (
        key    TEXT NOT NULL,
        minute BIGINT NOT NULL,
        hits   BIGINT NOT NULL,
        PRIMARY KEY (key, minute)
    );",
];

const _: () = assert!(MIGRATIONS.len() == SQLITE_MIGRATIONS.len());

/// The locked connection.
struct Conn<'a>(std::sync::MutexGuard<'a, Option<Client>>);

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.0
            .as_ref()
            .expect("the connection is only taken when the store is dropped")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.0
            .as_mut()
            .expect("the connection is only taken when the store is dropped")
    }
}

impl Drop for PostgresStore {
    /// The client's own runtime may not be dropped inside another: it goes on a thread.
    fn drop(&mut self) {
        let client = self.client.get_mut().ok().and_then(Option::take);
        if let Some(client) = client
            && tokio::runtime::Handle::try_current().is_ok()
        {
            let _ = std::thread::spawn(move || drop(client)).join();
        }
    }
}

/// The advisory lock key migrations hold ("inspect" in ASCII).
const MIGRATION_LOCK: i64 = 0x0069_6e73_7065_6374;

/// A PostgreSQL database (one connection; the server opens one store per thread that needs it).
pub struct PostgresStore {
    /// `None` only while the store is dropped.
    client: Mutex<Option<Client>>,
    /// The URL without its password, for errors.
    shown: String,
}

fn q(doing: &'static str) -> impl Fn(postgres::Error) -> StoreError {
    move |source| StoreError::PgQuery { doing, source }
}

const INSPECTION_COLUMNS: &str = "seq, id, created_ms, filename, source, image_sha256, \
     image_file, status, finding, model_fingerprint, adapter_fingerprint";

const EVENT_COLUMNS: &str =
    "seq, id, stored_ms, camera, source, at, rule, risk, frame_file, record, acked_ms, acked_by";

fn inspection_row(row: &Row) -> InspectionRow {
    InspectionRow {
        seq: row.get(0),
        inspection: NewInspection {
            id: row.get(1),
            created_ms: row.get(2),
            filename: row.get(3),
            source: row.get(4),
            image_sha256: row.get(5),
            image_file: row.get(6),
            status: row.get(7),
            finding: row.get(8),
            model_fingerprint: row.get(9),
            adapter_fingerprint: row.get(10),
        },
    }
}

fn event_row(r: &Row) -> EventRow {
    let acked_ms: Option<i64> = r.get(10);
    let acked_by: Option<String> = r.get(11);
    EventRow {
        seq: r.get(0),
        event: NewEvent {
            id: r.get(1),
            stored_ms: r.get(2),
            camera: r.get(3),
            source: r.get(4),
            at: r.get(5),
            rule: r.get(6),
            risk: r.get(7),
            frame_file: r.get(8),
            record: r.get(9),
        },
        acked: acked_ms.zip(acked_by),
    }
}

fn api_key_row(row: &Row) -> ApiKey {
    ApiKey {
        id: row.get(0),
        name: row.get(1),
        admin: row.get(2),
        created_at: row.get(3),
        revoked_at: row.get(4),
    }
}

/// `WHERE a AND b …` with `$n` placeholders numbered from 1.
struct Where {
    clauses: Vec<String>,
    args: Vec<Box<dyn ToSql + Sync>>,
}

impl Where {
    fn new() -> Where {
        Where {
            clauses: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Adds a clause whose `?`s take `values` in order.
    fn add(&mut self, clause: &str, values: Vec<Box<dyn ToSql + Sync>>) {
        let mut out = String::new();
        let mut values = values.into_iter();
        for part in clause.split('?').enumerate() {
            if part.0 > 0 {
                self.args.push(values.next().expect("a value for every ?"));
                out.push_str(&format!("${}", self.args.len()));
            }
            out.push_str(part.1);
        }
        self.clauses.push(out);
    }

    fn sql(&self) -> String {
        if self.clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", self.clauses.join(" AND "))
        }
    }

    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.args.iter().map(|a| a.as_ref()).collect()
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:port/db`) and migrates the database.
    pub fn open(url: &str) -> Result<PostgresStore> {
        if tokio::runtime::Handle::try_current().is_ok() {
            let url = url.to_string();
            return std::thread::spawn(move || Self::open(&url))
                .join()
                .expect("opening the database panicked");
        }
        let shown = crate::redact(url);
        let fail = |message: String| StoreError::Postgres {
            url: shown.clone(),
            message,
        };
        let (url, tls) = crate::pgtls::split(url).map_err(fail)?;
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e: postgres::Error| fail(format!("not a PostgreSQL URL: {e}")))?;
        config.ssl_mode(tls.negotiation());
        if config.get_password().is_none()
            && let Some(password) = crate::pgpass::password_for(&config)
        {
            config.password(password);
        }
        let connected = match crate::pgtls::connector(&tls).map_err(&fail)? {
            Some(tls) => config.connect(tls),
            None => config.connect(NoTls),
        };
        let mut client = connected.map_err(|e| fail(format!("cannot connect: {e}")))?;
        Self::migrate(&mut client).map_err(|e| match e {
            StoreError::PgQuery { doing, source } => fail(format!("{doing}: {source}")),
            other => other,
        })?;
        Ok(PostgresStore {
            client: Mutex::new(Some(client)),
            shown,
        })
    }

    fn migrate(client: &mut Client) -> Result<()> {
        let mut tx = client.transaction().map_err(q("starting the migration"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(q("waiting for the migration lock"))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS inspector_schema (
                one     BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
                version BIGINT NOT NULL
            );
            INSERT INTO inspector_schema (version) VALUES (0) ON CONFLICT DO NOTHING;",
        )
        .map_err(q("reading the schema version"))?;
        let version: i64 = tx
            .query_one("SELECT version FROM inspector_schema", &[])
            .map_err(q("reading the schema version"))?
            .get(0);
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                path: "PostgreSQL database".into(),
                found: version,
                known,
            });
        }
        for sql in &MIGRATIONS[version as usize..] {
            tx.batch_execute(sql).map_err(q("migrating the schema"))?;
        }
        tx.execute("UPDATE inspector_schema SET version = $1", &[&known])
            .map_err(q("recording the schema version"))?;
        tx.commit().map_err(q("committing the migration"))
    }

    /// The URL this store was opened with, password hidden.
    pub fn url(&self) -> &str {
        &self.shown
    }

    fn client(&self) -> Conn<'_> {
        // A panic while holding the connection leaves it usable: each call is one statement or
        // one transaction that PostgreSQL rolls back if it did not commit.
        Conn(self.client.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Runs `f` where the synchronous client may block: here, or on a thread of its own when
    /// this thread drives an async runtime (the client runs one of its own, which may not
    /// start inside another).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| s.spawn(f).join().expect("the database call panicked"))
        } else {
            f()
        }
    }

    fn rules_where(&self, sql_where: &str, args: &[&(dyn ToSql + Sync)]) -> Result<Vec<Rule>> {
        let sql = format!(
            "SELECT id, document, clause, citation, text, categories, parent, chapter,
                    source_file, line_start, line_end
             FROM rules {sql_where}"
        );
        let rows = self
            .client()
            .query(&sql, args)
            .map_err(q("listing rules"))?;
        rows.iter()
            .map(|row| {
                let categories: String = row.get(5);
                Ok(Rule {
                    id: row.get(0),
                    document: row.get(1),
                    clause: row.get(2),
                    citation: row.get(3),
                    text: row.get(4),
                    categories: serde_json::from_str(&categories).map_err(|e| {
                        StoreError::Corrupt {
                            field: "rules.categories",
                            message: e.to_string(),
                        }
                    })?,
                    parent: row.get(6),
                    chapter: row.get(7),
                    source: SourceSpan {
                        file: row.get(8),
                        line_start: row.get::<_, i64>(9) as usize,
                        line_end: row.get::<_, i64>(10) as usize,
                    },
                })
            })
            .collect()
    }
}

impl Store for PostgresStore {
    fn schema_version(&self) -> Result<i64> {
        self.run(|| {
            Ok(self
                .client()
                .query_one("SELECT version FROM inspector_schema", &[])
                .map_err(q("reading the schema version"))?
                .get(0))
        })
    }

    fn rules_version(&self) -> Result<i64> {
        self.run(|| {
            Ok(self
                .client()
                .query_one("SELECT version FROM rules_version", &[])
                .map_err(q("reading the rules' version"))?
                .get(0))
        })
    }

    fn cached_answer(&self, key: &str) -> Result<Option<String>> {
        self.run(|| {
            Ok(self
                .client()
                .query_opt("SELECT answer FROM answer_cache WHERE key = $1", &[&key])
                .map_err(q("reading the answer cache"))?
                .map(|r| r.get(0)))
        })
    }

    fn cache_answer(&self, key: &str, answer: &str) -> Result<()> {
        self.run(|| {
            self.client()
                .execute(
                    "INSERT INTO answer_cache (key, answer) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET answer = excluded.answer,
                         created_at = excluded.created_at",
                    &[&key, &answer],
                )
                .map(|_| ())
                .map_err(q("writing the answer cache"))
        })
    }

    fn insert_inspection(
        &mut self,
        inspection: &NewInspection,
        violations: &[InspectionViolation],
    ) -> Result<i64> {
        self.run(|| {
            let mut client = self.client();
            let mut tx = client.transaction().map_err(q("storing an inspection"))?;
            let seq: i64 = tx
                .query_one(
                    "INSERT INTO inspections (id, created_ms, filename, source, image_sha256,
                         image_file, status, finding, model_fingerprint, adapter_fingerprint)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING seq",
                    &[
                        &inspection.id,
                        &inspection.created_ms,
                        &inspection.filename,
                        &inspection.source,
                        &inspection.image_sha256,
                        &inspection.image_file,
                        &inspection.status,
                        &inspection.finding,
                        &inspection.model_fingerprint,
                        &inspection.adapter_fingerprint,
                    ],
                )
                .map_err(q("storing an inspection"))?
                .get(0);
            for v in violations {
                tx.execute(
                    "INSERT INTO inspection_violations (inspection_seq, rule_id, citation, risk)
                     VALUES ($1, $2, $3, $4)",
                    &[&seq, &v.rule_id, &v.citation, &v.risk],
                )
                .map_err(q("storing an inspection's violations"))?;
            }
            tx.commit().map_err(q("storing an inspection"))?;
            Ok(seq)
        })
    }

    fn inspection(&self, id: &str) -> Result<Option<InspectionRow>> {
        self.run(|| {
            Ok(self
                .client()
                .query_opt(
                    &format!("SELECT {INSPECTION_COLUMNS} FROM inspections WHERE id = $1"),
                    &[&id],
                )
                .map_err(q("reading an inspection"))?
                .as_ref()
                .map(inspection_row))
        })
    }

    fn inspections(&self, filter: &InspectionFilter) -> Result<Vec<InspectionRow>> {
        self.run(|| {
            let mut w = Where::new();
            if let Some(s) = &filter.status {
                w.add("status = ?", vec![Box::new(s.clone())]);
            }
            if let Some(r) = &filter.risk {
                w.add(
                    "EXISTS (SELECT 1 FROM inspection_violations v
                             WHERE v.inspection_seq = inspections.seq AND v.risk = ?)",
                    vec![Box::new(r.clone())],
                );
            }
            if let Some(r) = &filter.rule {
                w.add(
                    "EXISTS (SELECT 1 FROM inspection_violations v
                             WHERE v.inspection_seq = inspections.seq
                               AND (v.rule_id = ? OR v.citation = ?))",
                    vec![Box::new(r.clone()), Box::new(r.clone())],
                );
            }
            for (clause, value) in [
                ("created_ms >= ?", filter.since_ms),
                ("created_ms < ?", filter.until_ms),
                ("seq < ?", filter.before_seq),
                ("seq > ?", filter.after_seq),
            ] {
                if let Some(v) = value {
                    w.add(clause, vec![Box::new(v)]);
                }
            }
            let order = if filter.after_seq.is_some() {
                "ASC"
            } else {
                "DESC"
            };
            let sql = format!(
                "SELECT {INSPECTION_COLUMNS} FROM inspections{} ORDER BY seq {order} LIMIT {}",
                w.sql(),
                filter.limit.clamp(1, 1000)
            );
            Ok(self
                .client()
                .query(&sql, &w.refs())
                .map_err(q("listing inspections"))?
                .iter()
                .map(inspection_row)
                .collect())
        })
    }

    fn insert_event(&self, event: &NewEvent) -> Result<bool> {
        self.run(|| {
            let n = self
                .client()
                .execute(
                    "INSERT INTO camera_events
                         (id, stored_ms, camera, source, at, rule, risk, frame_file, record)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
                    &[
                        &event.id,
                        &event.stored_ms,
                        &event.camera,
                        &event.source,
                        &event.at,
                        &event.rule,
                        &event.risk,
                        &event.frame_file,
                        &event.record,
                    ],
                )
                .map_err(q("storing a camera event"))?;
            Ok(n == 1)
        })
    }

    fn event(&self, id: &str) -> Result<Option<EventRow>> {
        self.run(|| {
            Ok(self
                .client()
                .query_opt(
                    &format!("SELECT {EVENT_COLUMNS} FROM camera_events WHERE id = $1"),
                    &[&id],
                )
                .map_err(q("reading a camera event"))?
                .as_ref()
                .map(event_row))
        })
    }

    fn events(&self, filter: &EventFilter) -> Result<Vec<EventRow>> {
        self.run(|| {
            let mut w = Where::new();
            for (clause, value) in [
                ("camera = ?", &filter.camera),
                ("rule = ?", &filter.rule),
                ("risk = ?", &filter.risk),
            ] {
                if let Some(v) = value {
                    w.add(clause, vec![Box::new(v.clone())]);
                }
            }
            match filter.acked {
                Some(true) => w.add("acked_ms IS NOT NULL", vec![]),
                Some(false) => w.add("acked_ms IS NULL", vec![]),
                None => {}
            }
            for (clause, value) in [
                ("stored_ms >= ?", filter.since_ms),
                ("stored_ms < ?", filter.until_ms),
                ("seq < ?", filter.before_seq),
                ("seq > ?", filter.after_seq),
            ] {
                if let Some(v) = value {
                    w.add(clause, vec![Box::new(v)]);
                }
            }
            let order = if filter.after_seq.is_some() {
                "ASC"
            } else {
                "DESC"
            };
            let sql = format!(
                "SELECT {EVENT_COLUMNS} FROM camera_events{} ORDER BY seq {order} LIMIT {}",
                w.sql(),
                filter.limit.clamp(1, 1000)
            );
            Ok(self
                .client()
                .query(&sql, &w.refs())
                .map_err(q("listing camera events"))?
                .iter()
                .map(event_row)
                .collect())
        })
    }

    fn ack_event(&self, id: &str, by: &str, at_ms: i64) -> Result<Option<bool>> {
        self.run(|| {
            let n = self
                .client()
                .execute(
                    "UPDATE camera_events SET acked_ms = $2, acked_by = $3
                     WHERE id = $1 AND acked_ms IS NULL",
                    &[&id, &at_ms, &by],
                )
                .map_err(q("acknowledging a camera event"))?;
            if n == 1 {
                return Ok(Some(true));
            }
            Ok(self.event(id)?.map(|_| false))
        })
    }

    fn create_api_key(&self, id: &str, name: &str, hash: &str, admin: bool) -> Result<()> {
        self.run(|| {
            self.client()
                .execute(
                    "INSERT INTO api_keys (id, name, hash, admin) VALUES ($1, $2, $3, $4)",
                    &[&id, &name, &hash, &admin],
                )
                .map(|_| ())
                .map_err(q("storing an API key"))
        })
    }

    fn api_key_by_hash(&self, hash: &str) -> Result<Option<ApiKey>> {
        self.run(|| {
            Ok(self
                .client()
                .query_opt(
                    "SELECT id, name, admin, created_at, revoked_at FROM api_keys
                     WHERE hash = $1 AND revoked_at IS NULL",
                    &[&hash],
                )
                .map_err(q("checking an API key"))?
                .as_ref()
                .map(api_key_row))
        })
    }

    fn api_key_with_hash(&self, hash: &str) -> Result<Option<ApiKey>> {
        self.run(|| {
            Ok(self
                .client()
                .query_opt(
                    "SELECT id, name, admin, created_at, revoked_at FROM api_keys WHERE hash = $1",
                    &[&hash],
                )
                .map_err(q("checking an API key"))?
                .as_ref()
                .map(api_key_row))
        })
    }

    fn api_keys(&self) -> Result<Vec<ApiKey>> {
        self.run(|| {
            Ok(self
                .client()
                .query(
                    "SELECT id, name, admin, created_at, revoked_at FROM api_keys
                     ORDER BY created_at COLLATE \"C\", id COLLATE \"C\"",
                    &[],
                )
                .map_err(q("listing API keys"))?
                .iter()
                .map(api_key_row)
                .collect())
        })
    }

    fn revoke_api_key(&self, id: &str) -> Result<bool> {
        self.run(|| {
            self.client()
                .execute(
                    "UPDATE api_keys
                     SET revoked_at = to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')
                     WHERE id = $1 AND revoked_at IS NULL",
                    &[&id],
                )
                .map(|n| n > 0)
                .map_err(q("revoking an API key"))
        })
    }

    fn inspection_violations(&self, seq: i64) -> Result<Vec<InspectionViolation>> {
        self.run(|| {
            // Rows are only ever inserted (an inspection's violations in one transaction), so
            // their physical order is the order they were stored in.
            Ok(self
                .client()
                .query(
                    "SELECT rule_id, citation, risk FROM inspection_violations
                     WHERE inspection_seq = $1 ORDER BY ctid",
                    &[&seq],
                )
                .map_err(q("reading an inspection's violations"))?
                .iter()
                .map(|r| InspectionViolation {
                    rule_id: r.get(0),
                    citation: r.get(1),
                    risk: r.get(2),
                })
                .collect())
        })
    }

    fn cached_answers(&self, after: &str, limit: usize) -> Result<Vec<CachedAnswer>> {
        self.run(|| {
            Ok(self
                .client()
                .query(
                    "SELECT key, answer, created_at FROM answer_cache
                     WHERE key COLLATE \"C\" > $1 ORDER BY key COLLATE \"C\" LIMIT $2",
                    &[&after, &(limit.clamp(1, 1000) as i64)],
                )
                .map_err(q("listing the answer cache"))?
                .iter()
                .map(|r| CachedAnswer {
                    key: r.get(0),
                    answer: r.get(1),
                    created_at: r.get(2),
                })
                .collect())
        })
    }

    fn import_cached_answer(&self, entry: &CachedAnswer) -> Result<bool> {
        self.run(|| {
            self.client()
                .execute(
                    "INSERT INTO answer_cache (key, answer, created_at) VALUES ($1, $2, $3)
                     ON CONFLICT (key) DO NOTHING",
                    &[&entry.key, &entry.answer, &entry.created_at],
                )
                .map(|n| n == 1)
                .map_err(q("writing the answer cache"))
        })
    }

    fn api_key_hashes(&self) -> Result<Vec<(ApiKey, String)>> {
        self.run(|| {
            Ok(self
                .client()
                .query(
                    "SELECT id, name, admin, created_at, revoked_at, hash FROM api_keys
                     ORDER BY created_at COLLATE \"C\", id COLLATE \"C\"",
                    &[],
                )
                .map_err(q("listing API keys"))?
                .iter()
                .map(|r| (api_key_row(r), r.get(5)))
                .collect())
        })
    }

    fn import_api_key(&self, key: &ApiKey, hash: &str) -> Result<()> {
        self.run(|| {
            self.client()
                .execute(
                    "INSERT INTO api_keys (id, name, hash, admin, created_at, revoked_at)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[
                        &key.id,
                        &key.name,
                        &hash,
                        &key.admin,
                        &key.created_at,
                        &key.revoked_at,
                    ],
                )
                .map(|_| ())
                .map_err(q("storing an API key"))
        })
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
        self.run(|| {
            Ok(self
                .client()
                .query_one(
                    "INSERT INTO rate_counters (key, minute, hits) VALUES ($1, $2, 1)
                     ON CONFLICT (key, minute) DO UPDATE SET hits = rate_counters.hits + 1
                     RETURNING hits",
                    &[&key, &minute],
                )
                .map_err(q("counting a request"))?
                .get(0))
        })
    }

    fn hits(&self, key: &str, minute: i64) -> Result<i64> {
        self.run(|| {
            Ok(self
                .client()
                .query_opt(
                    "SELECT hits FROM rate_counters WHERE key = $1 AND minute = $2",
                    &[&key, &minute],
                )
                .map_err(q("reading a request count"))?
                .map(|r| r.get(0))
                .unwrap_or(0))
        })
    }

    fn prune_hits(&self, before_minute: i64) -> Result<usize> {
        self.run(|| {
            self.client()
                .execute(
                    "DELETE FROM rate_counters WHERE minute < $1",
                    &[&before_minute],
                )
                .map(|n| n as usize)
                .map_err(q("forgetting old request counts"))
        })
    }
}

impl PostgresStore {
    /// Replaces a document's rules and diagnostics in one transaction; `extracted_at` keeps the
    /// time another database extracted it (`db migrate`), else it is now.
    fn replace(
        &mut self,
        doc: &DocumentRecord,
        extracted_at: Option<&str>,
        rules: &[Rule],
        diagnostics: &[Diagnostic],
    ) -> Result<ReplaceOutcome> {
        self.run(|| {
            let mut client = self.client();
            let mut tx = client.transaction().map_err(q("starting a transaction"))?;
            let previous: Option<String> = tx
                .query_opt(
                    "SELECT sha256 FROM documents WHERE title = $1",
                    &[&doc.title],
                )
                .map_err(q("reading the document"))?
                .map(|r| r.get(0));
            let removed: i64 = tx
                .query_one(
                    "SELECT count(*) FROM rules WHERE document = $1",
                    &[&doc.title],
                )
                .map_err(q("counting old rules"))?
                .get(0);
            // Rules, categories, search entries and diagnostics go with the document (cascade).
            tx.execute("DELETE FROM documents WHERE title = $1", &[&doc.title])
                .map_err(q("removing the old document"))?;
            tx.execute(
                "INSERT INTO documents (title, file, sha256, extracted_at)
                 VALUES ($1, $2, $3, COALESCE($4,
                     to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')))",
                &[&doc.title, &doc.file, &doc.sha256, &extracted_at],
            )
            .map_err(q("storing the document"))?;
            let insert_rule = tx
                .prepare(
                    "INSERT INTO rules (id, document, ord, clause, citation, text, categories,
                                        parent, chapter, source_file, line_start, line_end)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                )
                .map_err(q("storing rules"))?;
            let insert_category = tx
                .prepare(
                    "INSERT INTO rule_categories (rule_id, category) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                )
                .map_err(q("storing categories"))?;
            let insert_fts = tx
                .prepare("INSERT INTO rules_fts (rule_id, tokens) VALUES ($1, $2)")
                .map_err(q("indexing rules"))?;
            for (ord, rule) in rules.iter().enumerate() {
                let categories = serde_json::to_string(&rule.categories).expect("strings serialise");
                tx.execute(
                    &insert_rule,
                    &[
                        &rule.id,
                        &doc.title,
                        &(ord as i64),
                        &rule.clause,
                        &rule.citation,
                        &rule.text,
                        &categories,
                        &rule.parent,
                        &rule.chapter,
                        &rule.source.file,
                        &(rule.source.line_start as i64),
                        &(rule.source.line_end as i64),
                    ],
                )
                .map_err(q("storing rules"))?;
                for category in &rule.categories {
                    tx.execute(&insert_category, &[&rule.id, category])
                        .map_err(q("storing categories"))?;
                }
                let tokens: Vec<String> = fts::index_text(&fts::rule_body(rule))
                    .split(' ')
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect();
                tx.execute(&insert_fts, &[&rule.id, &tokens])
                    .map_err(q("indexing rules"))?;
            }
            for d in diagnostics {
                tx.execute(
                    "INSERT INTO diagnostics (document, kind, line, message) VALUES ($1, $2, $3, $4)",
                    &[
                        &doc.title,
                        &crate::sqlite::kind_name(d.kind),
                        &(d.line as i64),
                        &d.message,
                    ],
                )
                .map_err(q("storing diagnostics"))?;
            }
            tx.execute("UPDATE rules_version SET version = version + 1", &[])
                .map_err(q("bumping the rules' version"))?;
            tx.commit().map_err(q("committing"))?;
            Ok(ReplaceOutcome {
                removed: removed as usize,
                added: rules.len(),
                unchanged: previous.as_deref() == Some(doc.sha256.as_str()),
            })
        })
    }
}

impl RuleStore for PostgresStore {
    fn replace_document(
        &mut self,
        doc: &DocumentRecord,
        rules: &[Rule],
        diagnostics: &[Diagnostic],
    ) -> Result<ReplaceOutcome> {
        self.replace(doc, None, rules, diagnostics)
    }

    fn documents(&self) -> Result<Vec<DocumentSummary>> {
        self.run(|| {
            Ok(self
                .client()
                .query(
                    "SELECT d.title, d.file, d.sha256, d.extracted_at,
                            (SELECT count(*) FROM rules r WHERE r.document = d.title),
                            (SELECT count(*) FROM diagnostics g WHERE g.document = d.title)
                     FROM documents d ORDER BY d.title COLLATE \"C\"",
                    &[],
                )
                .map_err(q("listing documents"))?
                .iter()
                .map(|row| DocumentSummary {
                    record: DocumentRecord {
                        title: row.get(0),
                        file: row.get(1),
                        sha256: row.get(2),
                    },
                    extracted_at: row.get(3),
                    rules: row.get::<_, i64>(4) as usize,
                    diagnostics: row.get::<_, i64>(5) as usize,
                })
                .collect())
        })
    }

    fn rules(&self, filter: &RuleFilter) -> Result<Vec<Rule>> {
        self.run(|| {
            let category = filter.category.clone().unwrap_or_default();
            let document = filter
                .document
                .as_deref()
                .map(crate::sqlite::bare_title)
                .unwrap_or_default()
                .to_string();
            self.rules_where(
                "WHERE ($1 = '' OR id IN (SELECT rule_id FROM rule_categories WHERE category = $1))
                   AND ($2 = '' OR document = $2)
                 ORDER BY document COLLATE \"C\", ord",
                &[&category, &document],
            )
        })
    }

    fn rule(&self, id: &str) -> Result<Option<Rule>> {
        self.run(|| {
            Ok(self
                .rules_where("WHERE id = $1", &[&id])?
                .into_iter()
                .next())
        })
    }

    fn search(&self, query: &str, limit: usize) -> Result<Vec<Rule>> {
        self.run(|| {
            let terms = fts::tokens(query);
            if terms.is_empty() {
                return Ok(Vec::new());
            }
            let (candidates, total, total_len, counts) = {
                let mut client = self.client();
                let candidates = client
                    .query(
                        "SELECT seq, rule_id, tokens FROM rules_fts WHERE tokens @> $1",
                        &[&terms],
                    )
                    .map_err(q("searching"))?;
                let stats = client
                    .query_one(
                        "SELECT count(*), COALESCE(sum(cardinality(tokens)), 0)::BIGINT
                         FROM rules_fts",
                        &[],
                    )
                    .map_err(q("searching"))?;
                let mut counts = Vec::with_capacity(terms.len());
                for t in &terms {
                    let n: i64 = client
                        .query_one(
                            "SELECT count(*) FROM rules_fts WHERE tokens @> ARRAY[$1]",
                            &[t],
                        )
                        .map_err(q("searching"))?
                        .get(0);
                    counts.push(n);
                }
                (
                    candidates,
                    stats.get::<_, i64>(0),
                    stats.get::<_, i64>(1),
                    counts,
                )
            };
            let mut scored: Vec<(f64, i64, String)> = candidates
                .iter()
                .map(|row| {
                    let tokens: Vec<String> = row.get(2);
                    let score = fts::bm25(&terms, &tokens, &counts, total, total_len);
                    (score, row.get::<_, i64>(0), row.get::<_, String>(1))
                })
                .collect();
            // FTS5 orders by bm25 (lower is better, so higher score first), then by row.
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut out = Vec::with_capacity(limit.min(scored.len()));
            for (_, _, id) in scored.into_iter().take(limit) {
                if let Some(rule) = self.rule(&id)? {
                    out.push(rule);
                }
            }
            Ok(out)
        })
    }

    fn diagnostics(&self, document: Option<&str>) -> Result<Vec<(String, Diagnostic)>> {
        self.run(|| {
            let document = document
                .map(crate::sqlite::bare_title)
                .unwrap_or_default()
                .to_string();
            let rows = self
                .client()
                .query(
                    "SELECT document, kind, line, message FROM diagnostics
                     WHERE $1 = '' OR document = $1 ORDER BY document COLLATE \"C\", line, seq",
                    &[&document],
                )
                .map_err(q("listing diagnostics"))?;
            rows.iter()
                .map(|row| {
                    let kind: String = row.get(1);
                    Ok((
                        row.get(0),
                        Diagnostic {
                            kind: crate::sqlite::kind_from(&kind).ok_or_else(|| {
                                StoreError::Corrupt {
                                    field: "diagnostics.kind",
                                    message: kind.clone(),
                                }
                            })?,
                            line: row.get::<_, i64>(2) as usize,
                            message: row.get(3),
                        },
                    ))
                })
                .collect()
        })
    }
}
