//! Copying one database into another (`inspector db migrate`): a single box's SQLite file into
//! the PostgreSQL server that replicas share, or back.
//!
//! Everything is copied with the times it was stored at: documents with their rules and
//! diagnostics, inspections with their violations, camera events with their acknowledgements,
//! API keys (hashes, creation and revocation times) and cached answers. Rows go in the order the
//! source stored them, each inspection or document in one transaction with its parts.
//!
//! What the target holds already is compared, never overwritten: an equal row is skipped (so a
//! second run, or one after an interruption, changes nothing), and a row that differs stops the
//! copy with [`StoreError::Conflict`] naming it. Where the target is simply further along (an
//! event acknowledged there, a key revoked there), the target's row stays.
//!
//! [`summary`] reads a store entity by entity in the canonical order and gives each entity's
//! count and SHA-256 over canonical JSON lines, the same for both dialects: equal summaries
//! mean equal contents.
//!
//! ```
//! use inspector_store::{SqliteStore, Store, migrate};
//!
//! let from = SqliteStore::open_in_memory().unwrap();
//! let mut to = SqliteStore::open_in_memory().unwrap();
//! from.create_api_key("k1", "gate camera", "ab12", false).unwrap();
//! let report = migrate::copy(&from, &mut to, &mut |_| {}).unwrap();
//! assert_eq!(report.added("api keys"), 1);
//! assert_eq!(migrate::summary(&from).unwrap(), migrate::summary(&to).unwrap());
//! // A second run changes nothing.
//! assert_eq!(migrate::copy(&from, &mut to, &mut |_| {}).unwrap().added("api keys"), 0);
//! ```

use std::collections::BTreeMap;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{
    CachedAnswer, EventFilter, EventRow, InspectionFilter, InspectionRow, InspectionViolation,
    Result, RuleFilter, Store, StoreError,
};

/// The entities, in the order they are copied and summarised.
pub const ENTITIES: &[&str] = &[
    "documents",
    "rules",
    "diagnostics",
    "inspections",
    "violations",
    "events",
    "api keys",
    "cached answers",
];

const PAGE: usize = 500;

/// One entity's count and checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntitySummary {
    pub name: &'static str,
    pub count: u64,
    /// SHA-256 (hex) over the entity's canonical JSON lines, in canonical order.
    pub sha256: String,
}

/// Every entity's count and checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub entities: Vec<EntitySummary>,
}

impl Summary {
    pub fn get(&self, name: &str) -> Option<&EntitySummary> {
        self.entities.iter().find(|e| e.name == name)
    }

    /// Rows in all.
    pub fn total(&self) -> u64 {
        self.entities.iter().map(|e| e.count).sum()
    }
}

/// What a copy did, by entity: rows added, and rows the target held already.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    pub added: BTreeMap<&'static str, u64>,
    pub present: BTreeMap<&'static str, u64>,
}

impl CopyReport {
    pub fn added(&self, entity: &str) -> u64 {
        self.added.get(entity).copied().unwrap_or(0)
    }

    pub fn present(&self, entity: &str) -> u64 {
        self.present.get(entity).copied().unwrap_or(0)
    }

    /// Rows added in all (0 for a run that changed nothing).
    pub fn total_added(&self) -> u64 {
        self.added.values().sum()
    }

    fn count(&mut self, entity: &'static str, added: bool, n: u64) {
        let map = if added {
            &mut self.added
        } else {
            &mut self.present
        };
        *map.entry(entity).or_default() += n;
    }
}

/// What the copy tells its caller as it goes: rows of `entity` done (added or found).
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub entity: &'static str,
    pub rows: u64,
}

/// Copies everything `from` holds into `to` (see the module's documentation).
pub fn copy(
    from: &dyn Store,
    to: &mut dyn Store,
    progress: &mut dyn FnMut(Progress),
) -> Result<CopyReport> {
    let mut report = CopyReport::default();
    copy_documents(from, to, &mut report, progress)?;
    copy_inspections(from, to, &mut report, progress)?;
    copy_events(from, to, &mut report, progress)?;
    copy_keys(from, to, &mut report, progress)?;
    copy_cache(from, to, &mut report, progress)?;
    Ok(report)
}

fn conflict(what: &'static str, key: &str, message: impl Into<String>) -> StoreError {
    StoreError::Conflict {
        what,
        key: key.to_string(),
        message: message.into(),
    }
}

fn copy_documents(
    from: &dyn Store,
    to: &mut dyn Store,
    report: &mut CopyReport,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    let there: BTreeMap<String, _> = to
        .documents()?
        .into_iter()
        .map(|d| (d.record.title.clone(), d))
        .collect();
    for doc in from.documents()? {
        let title = &doc.record.title;
        let filter = RuleFilter {
            document: Some(title.clone()),
            ..RuleFilter::default()
        };
        let rules = from.rules(&filter)?;
        let diagnostics: Vec<_> = from
            .diagnostics(Some(title))?
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        let added = match there.get(title) {
            Some(theirs) => {
                if theirs.record != doc.record || theirs.extracted_at != doc.extracted_at {
                    return Err(conflict(
                        "document",
                        title,
                        format!(
                            "extracted from {} ({}) at {} there, from {} ({}) at {} here",
                            theirs.record.file,
                            short(&theirs.record.sha256),
                            theirs.extracted_at,
                            doc.record.file,
                            short(&doc.record.sha256),
                            doc.extracted_at
                        ),
                    ));
                }
                let their_diagnostics: Vec<_> = to
                    .diagnostics(Some(title))?
                    .into_iter()
                    .map(|(_, d)| d)
                    .collect();
                if to.rules(&filter)? != rules || their_diagnostics != diagnostics {
                    return Err(conflict(
                        "document",
                        title,
                        "the same file, but other rules or diagnostics",
                    ));
                }
                false
            }
            None => {
                to.import_document(&doc.record, &doc.extracted_at, &rules, &diagnostics)?;
                true
            }
        };
        report.count("documents", added, 1);
        report.count("rules", added, rules.len() as u64);
        report.count("diagnostics", added, diagnostics.len() as u64);
        progress(Progress {
            entity: "documents",
            rows: 1 + rules.len() as u64 + diagnostics.len() as u64,
        });
    }
    Ok(())
}

/// Every row a paged listing gives, oldest first: `page(after)` lists rows stored after
/// position `after`, `seq` tells a row's position.
fn each_row<T>(
    mut page: impl FnMut(i64) -> Result<Vec<T>>,
    seq: impl Fn(&T) -> i64,
    mut f: impl FnMut(T) -> Result<()>,
) -> Result<()> {
    let mut after = 0;
    loop {
        let rows = page(after)?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = seq(last);
        for row in rows {
            f(row)?;
        }
    }
}

/// Every inspection, oldest first, a page at a time.
fn each_inspection(store: &dyn Store, f: impl FnMut(InspectionRow) -> Result<()>) -> Result<()> {
    each_row(
        |after| {
            store.inspections(&InspectionFilter {
                after_seq: Some(after),
                limit: PAGE,
                ..InspectionFilter::default()
            })
        },
        |r| r.seq,
        f,
    )
}

fn copy_inspections(
    from: &dyn Store,
    to: &mut dyn Store,
    report: &mut CopyReport,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    each_inspection(from, |row| {
        let violations = from.inspection_violations(row.seq)?;
        let id = &row.inspection.id;
        let added = match to.inspection(id)? {
            Some(theirs) => {
                if theirs.inspection != row.inspection
                    || to.inspection_violations(theirs.seq)? != violations
                {
                    return Err(conflict("inspection", id, "its record differs"));
                }
                false
            }
            None => {
                to.insert_inspection(&row.inspection, &violations)?;
                true
            }
        };
        report.count("inspections", added, 1);
        report.count("violations", added, violations.len() as u64);
        progress(Progress {
            entity: "inspections",
            rows: 1 + violations.len() as u64,
        });
        Ok(())
    })
}

fn each_event(store: &dyn Store, f: impl FnMut(EventRow) -> Result<()>) -> Result<()> {
    each_row(
        |after| {
            store.events(&EventFilter {
                after_seq: Some(after),
                limit: PAGE,
                ..EventFilter::default()
            })
        },
        |r| r.seq,
        f,
    )
}

fn copy_events(
    from: &dyn Store,
    to: &mut dyn Store,
    report: &mut CopyReport,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    each_event(from, |row| {
        let id = &row.event.id;
        let added = match to.event(id)? {
            Some(theirs) => {
                if theirs.event != row.event {
                    return Err(conflict("event", id, "its record differs"));
                }
                match (&theirs.acked, &row.acked) {
                    (None, Some((at, by))) => {
                        to.ack_event(id, by, *at)?;
                        true
                    }
                    (Some(a), Some(b)) if a != b => {
                        return Err(conflict(
                            "event",
                            id,
                            format!("acknowledged by {} there, by {} here", a.1, b.1),
                        ));
                    }
                    _ => false,
                }
            }
            None => {
                to.insert_event(&row.event)?;
                if let Some((at, by)) = &row.acked {
                    to.ack_event(id, by, *at)?;
                }
                true
            }
        };
        report.count("events", added, 1);
        progress(Progress {
            entity: "events",
            rows: 1,
        });
        Ok(())
    })
}

fn copy_keys(
    from: &dyn Store,
    to: &mut dyn Store,
    report: &mut CopyReport,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    let there: BTreeMap<String, _> = to
        .api_key_hashes()?
        .into_iter()
        .map(|(k, h)| (k.id.clone(), (k, h)))
        .collect();
    for (key, hash) in from.api_key_hashes()? {
        let added = match there.get(&key.id) {
            Some((theirs, their_hash)) => {
                let same = theirs.name == key.name
                    && their_hash == &hash
                    && theirs.admin == key.admin
                    && theirs.created_at == key.created_at;
                let revocation_ok = theirs.revoked_at == key.revoked_at
                    || (key.revoked_at.is_none() && theirs.revoked_at.is_some());
                if !same {
                    return Err(conflict("API key", &key.id, "another key has this id"));
                }
                if !revocation_ok {
                    return Err(conflict(
                        "API key",
                        &key.id,
                        "revoked here but live there: revoke it there with `inspector keys \
                         revoke`",
                    ));
                }
                false
            }
            None => {
                to.import_api_key(&key, &hash)?;
                true
            }
        };
        report.count("api keys", added, 1);
        progress(Progress {
            entity: "api keys",
            rows: 1,
        });
    }
    Ok(())
}

fn each_cached(store: &dyn Store, mut f: impl FnMut(CachedAnswer) -> Result<()>) -> Result<()> {
    let mut after = String::new();
    loop {
        let page = store.cached_answers(&after, PAGE)?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = last.key.clone();
        for entry in page {
            f(entry)?;
        }
    }
}

fn copy_cache(
    from: &dyn Store,
    to: &mut dyn Store,
    report: &mut CopyReport,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    // A cached answer is reproducible, not a record: one the target holds under the same key
    // stays as it is.
    each_cached(from, |entry| {
        let added = to.import_cached_answer(&entry)?;
        report.count("cached answers", added, 1);
        progress(Progress {
            entity: "cached answers",
            rows: 1,
        });
        Ok(())
    })
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// Lines hashed into one entity's checksum.
#[derive(Default)]
struct Tally {
    count: u64,
    hash: Sha256,
}

impl Tally {
    fn add(&mut self, value: serde_json::Value) {
        self.count += 1;
        self.hash.update(value.to_string().as_bytes());
        self.hash.update(b"\n");
    }
}

/// Whether the store holds nothing [`copy`] would copy (one row of each kind looked up, not
/// every row read).
pub fn is_empty(store: &dyn Store) -> Result<bool> {
    Ok(store.documents()?.is_empty()
        && store
            .inspections(&InspectionFilter {
                limit: 1,
                ..InspectionFilter::default()
            })?
            .is_empty()
        && store
            .events(&EventFilter {
                limit: 1,
                ..EventFilter::default()
            })?
            .is_empty()
        && store.api_key_hashes()?.is_empty()
        && store.cached_answers("", 1)?.is_empty())
}

/// Each entity's count and checksum (see the module's documentation).
pub fn summary(store: &dyn Store) -> Result<Summary> {
    let mut tallies: BTreeMap<&'static str, Tally> = BTreeMap::new();
    let mut tally = |name: &'static str, value| tallies.entry(name).or_default().add(value);
    for doc in store.documents()? {
        let r = &doc.record;
        tally(
            "documents",
            json!([r.title, r.file, r.sha256, doc.extracted_at]),
        );
        let filter = RuleFilter {
            document: Some(r.title.clone()),
            ..RuleFilter::default()
        };
        for rule in store.rules(&filter)? {
            tally(
                "rules",
                serde_json::to_value(&rule).expect("rules serialise"),
            );
        }
        for (title, d) in store.diagnostics(Some(&r.title))? {
            tally(
                "diagnostics",
                json!([
                    title,
                    serde_json::to_value(&d).expect("diagnostics serialise")
                ]),
            );
        }
    }
    each_inspection(store, |row| {
        let i = &row.inspection;
        tally(
            "inspections",
            json!([
                i.id,
                i.created_ms,
                i.filename,
                i.source,
                i.image_sha256,
                i.image_file,
                i.status,
                i.finding,
                i.model_fingerprint,
                i.adapter_fingerprint
            ]),
        );
        for InspectionViolation {
            rule_id,
            citation,
            risk,
        } in store.inspection_violations(row.seq)?
        {
            tally("violations", json!([i.id, rule_id, citation, risk]));
        }
        Ok(())
    })?;
    each_event(store, |row| {
        let e = &row.event;
        tally(
            "events",
            json!([
                e.id,
                e.stored_ms,
                e.camera,
                e.source,
                e.at,
                e.rule,
                e.risk,
                e.frame_file,
                e.record,
                row.acked
            ]),
        );
        Ok(())
    })?;
    for (k, hash) in store.api_key_hashes()? {
        tally(
            "api keys",
            json!([k.id, k.name, hash, k.admin, k.created_at, k.revoked_at]),
        );
    }
    each_cached(store, |c| {
        tally("cached answers", json!([c.key, c.answer, c.created_at]));
        Ok(())
    })?;
    Ok(Summary {
        entities: ENTITIES
            .iter()
            .map(|&name| {
                let t = tallies.remove(name).unwrap_or_default();
                EntitySummary {
                    name,
                    count: t.count,
                    sha256: hex(&t.hash.finalize()),
                }
            })
            .collect(),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A photo or frame file a store refers to, relative to the data dir.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PhotoRef {
    /// `images/ab/<sha256>.<ext>` or `events/<id>.jpg`, checked to have exactly that form.
    pub relative: String,
    /// The SHA-256 its bytes must have (inspections' photos are named by it).
    pub sha256: Option<String>,
}

/// Every photo file the store's inspections and events refer to, once each, sorted. A stored
/// path of any other form is an error: a path from the database never reaches the file
/// system unchecked.
pub fn photos(store: &dyn Store) -> Result<Vec<PhotoRef>> {
    let mut out = std::collections::BTreeSet::new();
    each_inspection(store, |row| {
        let i = &row.inspection;
        if !is_image_path(&i.image_file, &i.image_sha256) {
            return Err(StoreError::Corrupt {
                field: "inspections.image_file",
                message: format!("inspection {}: `{}`", i.id, i.image_file),
            });
        }
        out.insert(PhotoRef {
            relative: i.image_file.clone(),
            sha256: Some(i.image_sha256.clone()),
        });
        Ok(())
    })?;
    each_event(store, |row| {
        let e = &row.event;
        let expected = format!("events/{}.jpg", e.id);
        let id_ok = e.id.len() == 16 && e.id.bytes().all(|b| b.is_ascii_hexdigit());
        if !id_ok || e.frame_file != expected {
            return Err(StoreError::Corrupt {
                field: "camera_events.frame_file",
                message: format!("event {}: `{}`", e.id, e.frame_file),
            });
        }
        out.insert(PhotoRef {
            relative: expected,
            sha256: None,
        });
        Ok(())
    })?;
    Ok(out.into_iter().collect())
}

/// `images/<first two>/<sha256>.<ext>` with a lowercase extension of letters.
fn is_image_path(path: &str, sha256: &str) -> bool {
    let hex_ok = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
    let Some(rest) = path.strip_prefix("images/") else {
        return false;
    };
    let Some((dir, file)) = rest.split_once('/') else {
        return false;
    };
    let Some((stem, ext)) = file.split_once('.') else {
        return false;
    };
    hex_ok
        && dir == &sha256[..2]
        && stem == sha256
        && !ext.is_empty()
        && ext.len() <= 5
        && ext.bytes().all(|b| b.is_ascii_lowercase())
}
