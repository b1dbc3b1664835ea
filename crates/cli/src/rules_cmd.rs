//! `inspector rules …`

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use inspector_core::{
    Rule,
    citation::{self, Resolution},
};
use inspector_rules::{Categorizer, Document, extract_file};
use inspector_store::{DocumentRecord, RuleFilter, Store};

use crate::{bundled, output::write_atomic};

/// `println!` that returns write errors (a closed pipe) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)?
    };
}

/// The database option every command that touches the database takes.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// The project database: a SQLite file (created if missing), or a PostgreSQL server
    /// (`postgres://user@host:port/db`; the password from PGPASSWORD or ~/.pgpass, never the
    /// command line).
    #[arg(long, value_name = "PATH|URL", default_value = "inspector.db")]
    pub db: String,
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Extract rules from regulation documents (.txt, .md, .docx, .pdf; UTF-8 or GB18030).
    ///
    /// Each file is one transaction: a document whose title is already in the database has
    /// its rules replaced; a file that fails leaves the database as it was. Odd content
    /// (unreadable numbers, duplicate or empty clauses) is reported as diagnostics and stored.
    Extract {
        /// Regulation documents.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// A TOML file overriding or adding rule categories and their keywords.
        #[arg(long, value_name = "FILE")]
        categories: Option<PathBuf>,
        /// List all rules afterwards.
        #[arg(long)]
        list: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List rules, optionally of one category or document.
    List {
        /// Only rules in this category (e.g. 安全防护).
        #[arg(long)]
        category: Option<String>,
        /// Only rules of this document (its title, 《》 optional).
        #[arg(long = "doc", value_name = "TITLE")]
        document: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Show one rule, by id or by citation as a person or a model writes it
    /// (《安全作业规程》第3.1条, 安全作业规程 3.1, 安全作业规程第三条, 第3.1条).
    Show {
        query: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Full-text search over rules (works for Chinese).
    Search {
        text: String,
        #[arg(long, default_value_t = 10)]
        limit: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Export all rules as JSON (`{"rules": [...]}`) or CSV.
    Export {
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Write here (atomically) instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List stored documents and their diagnostics.
    Docs {
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    Json,
    Csv,
}

pub fn run(cmd: RulesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RulesCommand::Extract {
            files,
            categories,
            list,
            db,
        } => extract(&files, categories.as_deref(), list, &db.db),
        RulesCommand::List {
            category,
            document,
            json,
            db,
        } => {
            let store = open_with_rules(&db.db)?;
            let rules = store.rules(&RuleFilter { category, document })?;
            print_rules(&rules, json)?;
            Ok(ExitCode::SUCCESS)
        }
        RulesCommand::Show { query, json, db } => show(&query, json, &db.db),
        RulesCommand::Search {
            text,
            limit,
            json,
            db,
        } => {
            let store = open_with_rules(&db.db)?;
            let rules = store.search(&text, limit)?;
            if rules.is_empty() && !json {
                eprintln!("no rule matches `{text}`");
            }
            print_rules(&rules, json)?;
            Ok(ExitCode::SUCCESS)
        }
        RulesCommand::Export { format, out, db } => {
            let store = open_with_rules(&db.db)?;
            let rules = store.rules(&RuleFilter::default())?;
            let bytes = match format {
                ExportFormat::Json => {
                    let mut s =
                        serde_json::to_string_pretty(&serde_json::json!({ "rules": rules }))?;
                    s.push('\n');
                    s.into_bytes()
                }
                ExportFormat::Csv => to_csv(&rules)?,
            };
            match out {
                Some(path) => {
                    write_atomic(&path, &bytes)?;
                    eprintln!("wrote {} rules to {}", rules.len(), path.display());
                }
                None => std::io::stdout().lock().write_all(&bytes)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        RulesCommand::Docs { db } => {
            let store = open(&db.db)?;
            let docs = store.documents()?;
            if docs.is_empty() {
                out!("no documents in {}", inspector_store::redact(&db.db));
            }
            for d in docs {
                out!(
                    "《{}》 {} rules, {} diagnostics, from {} at {}",
                    d.record.title,
                    d.rules,
                    d.diagnostics,
                    d.record.file,
                    d.extracted_at
                );
                for (_, diag) in store.diagnostics(Some(&d.record.title))? {
                    out!("  warning: {diag}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn open(db: &str) -> anyhow::Result<Box<dyn Store>> {
    if Path::new(db).is_dir() {
        bail!("{db}: is a directory, not a database file");
    }
    Ok(inspector_store::open(db)?)
}

/// Opens the database; when it holds no documents, loads the bundled example regulations
/// first, and says so, so that citations resolve on a fresh clone.
pub fn open_with_rules(db: &str) -> anyhow::Result<Box<dyn Store>> {
    let mut store = open(db)?;
    if store.documents()?.is_empty() {
        let docs = bundled::documents(&Categorizer::default())?;
        for doc in &docs {
            store.replace_document(&record(doc), &doc.rules, &doc.diagnostics)?;
        }
        eprintln!(
            "note: {} had no rules; loaded the {} bundled example regulations",
            inspector_store::redact(db),
            docs.len()
        );
    }
    Ok(store)
}

fn record(doc: &Document) -> DocumentRecord {
    DocumentRecord {
        title: doc.title.clone(),
        file: doc.file.clone(),
        sha256: doc.sha256.clone(),
    }
}

fn extract(
    files: &[PathBuf],
    categories: Option<&Path>,
    list: bool,
    db: &str,
) -> anyhow::Result<ExitCode> {
    let categorizer = match categories {
        None => Categorizer::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read the categories file", path.display()))?;
            Categorizer::with_overrides(&text).with_context(|| path.display().to_string())?
        }
    };
    // The database is opened only once a file has extracted, so that a run where every file
    // fails leaves no trace, not even a new empty database.
    let mut store: Option<Box<dyn Store>> = None;
    let mut failed = 0;
    for file in files {
        let doc = match extract_file(file, &categorizer) {
            Ok(doc) => doc,
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
                continue;
            }
        };
        let store = match &mut store {
            Some(s) => s,
            None => store.insert(open(db)?),
        };
        let outcome = store
            .replace_document(&record(&doc), &doc.rules, &doc.diagnostics)
            .with_context(|| format!("{}: storing its rules", file.display()))?;
        let action = if outcome.removed == 0 {
            "new".to_string()
        } else if outcome.unchanged {
            format!("unchanged, {} rules refreshed", outcome.removed)
        } else {
            format!("replaced {} rules", outcome.removed)
        };
        out!(
            "《{}》 {}: {} rules, {} diagnostics ({action})",
            doc.title,
            file.display(),
            doc.rules.len(),
            doc.diagnostics.len()
        );
        for d in &doc.diagnostics {
            out!("  warning: {}:{}: {}", file.display(), d.line, d.message);
        }
    }
    if list && let Some(store) = &store {
        print_rules(&store.rules(&RuleFilter::default())?, false)?;
    }
    if failed > 0 {
        eprintln!("{failed} of {} files could not be extracted", files.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn show(query: &str, json: bool, db: &str) -> anyhow::Result<ExitCode> {
    let store = open_with_rules(db)?;
    if let Some(rule) = store.rule(query.trim())? {
        print_rule(&rule, json)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rules = store.rules(&RuleFilter::default())?;
    match citation::resolve(query, &rules) {
        Resolution::Found(rule) => {
            print_rule(rule, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Resolution::Ambiguous(candidates) => {
            eprintln!("`{query}` is ambiguous; it could be:");
            for r in candidates {
                eprintln!("  {}  {}", r.citation, r.id);
            }
            Ok(ExitCode::FAILURE)
        }
        Resolution::Unknown(why) => {
            eprintln!("`{query}`: {why}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn print_rule(rule: &Rule, json: bool) -> anyhow::Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(rule)?);
        return Ok(());
    }
    out!("{}", rule.citation);
    out!("id:         {}", rule.id);
    out!("categories: {}", rule.categories.join(", "));
    if let Some(parent) = &rule.parent {
        out!(
            "parent:     {}",
            inspector_core::format_citation(&rule.document, parent)
        );
    }
    if let Some(chapter) = &rule.chapter {
        out!("chapter:    {chapter}");
    }
    out!(
        "source:     {}:{}-{}",
        rule.source.file,
        rule.source.line_start,
        rule.source.line_end
    );
    out!("");
    out!("{}", rule.text);
    Ok(())
}

fn print_rules(rules: &[Rule], json: bool) -> anyhow::Result<()> {
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "rules": rules }))?
        );
        return Ok(());
    }
    for r in rules {
        let first_line = r.text.lines().next().unwrap_or_default();
        let mut excerpt: String = first_line.chars().take(40).collect();
        if first_line.chars().count() > 40 || r.text.lines().count() > 1 {
            excerpt.push('…');
        }
        out!("{}  [{}]  {}", r.citation, r.categories.join(","), excerpt);
    }
    Ok(())
}

fn to_csv(rules: &[Rule]) -> anyhow::Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "id",
        "document",
        "clause",
        "citation",
        "text",
        "categories",
        "parent",
        "chapter",
        "source_file",
        "line_start",
        "line_end",
    ])?;
    for r in rules {
        w.write_record([
            r.id.as_str(),
            &r.document,
            &r.clause,
            &r.citation,
            &r.text,
            &r.categories.join(";"),
            r.parent.as_deref().unwrap_or(""),
            r.chapter.as_deref().unwrap_or(""),
            &r.source.file,
            &r.source.line_start.to_string(),
            &r.source.line_end.to_string(),
        ])?;
    }
    Ok(w.into_inner()?)
}
