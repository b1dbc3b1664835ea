//! `inspector dataset …`

use std::{io::Write, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Subcommand;
use inspector_store::{RuleFilter, RuleStore};

use crate::rules_cmd::{DbArgs, open_with_rules};

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Check an annotation file (JSONL) and report every problem with its line and field:
    /// invalid JSON, missing fields, missing or unreadable images, citations that do not
    /// resolve in the rules database (with the nearest rule), unknown risks, boxes outside the
    /// image, inverted or empty, empty descriptions; repeated image bytes are warnings.
    /// Exits non-zero when there are errors.
    Validate {
        file: PathBuf,
        /// Print `{"records", "errors": [{"line", "field", "message"}], "warnings": [...]}`.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
}

pub fn run(cmd: DatasetCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DatasetCommand::Validate { file, json, db } => {
            let store = open_with_rules(&db.db)?;
            let rules = store.rules(&RuleFilter::default())?;
            let report = inspector_dataset::validate_file(&file, &rules)
                .with_context(|| format!("{}: cannot read", file.display()))?;
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                for (kind, problems) in [("error", &report.errors), ("warning", &report.warnings)] {
                    for p in problems {
                        let field = if p.field.is_empty() {
                            String::new()
                        } else {
                            format!(" {}:", p.field)
                        };
                        writeln!(
                            out,
                            "{}:{}: {kind}:{field} {}",
                            file.display(),
                            p.line,
                            p.message
                        )?;
                    }
                }
                writeln!(
                    out,
                    "{} records, {} errors, {} warnings",
                    report.records,
                    report.errors.len(),
                    report.warnings.len()
                )?;
            }
            Ok(if report.errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
