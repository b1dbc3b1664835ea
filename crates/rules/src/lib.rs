//! Regulation documents → clause-level rules.
//!
//! A plant's regulations arrive as text, Markdown, Word or PDF files, in UTF-8 or GB18030, with
//! articles (`第十二条`), numbered clauses (`12.1`, `3.1.2`), chapters and list items. This crate
//! turns one such file into a [`Document`]: its title, one [`Rule`] per numbered unit with its
//! parent, chapter, categories and source lines, and [`Diagnostic`]s for whatever looked odd.
//! Odd content never aborts an extraction; only a file that cannot be read at all is an error.
//!
//! ```
//! use inspector_rules::{Categorizer, extract_bytes};
//!
//! let text = "《安全作业规程》\n第三条 进入现场应正确佩戴劳动防护用品。\n3.1 进入作业区域必须佩戴安全帽。\n";
//! let doc = extract_bytes("rules.txt", text.as_bytes(), &Categorizer::default()).unwrap();
//! assert_eq!(doc.title, "安全作业规程");
//! assert_eq!(doc.rules[1].citation, "《安全作业规程》第3.1条");
//! assert_eq!(doc.rules[1].parent.as_deref(), Some("3"));
//! assert_eq!(doc.rules[1].primary_category(), "安全防护");
//! ```

mod categorize;
pub mod decode;
pub mod parse;

use std::path::Path;

pub use categorize::{Categorizer, Category};
pub use decode::Format;
use inspector_core::{Diagnostic, OTHER_CATEGORY, Rule, SourceSpan};

/// A regulation document after extraction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The title (without 《》), which keys the document in the database.
    pub title: String,
    /// The file name as given.
    pub file: String,
    /// SHA-256 of the file's bytes, hex.
    pub sha256: String,
    pub rules: Vec<Rule>,
    pub diagnostics: Vec<Diagnostic>,
}

/// Why a file could not be extracted at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    #[error("cannot read: {0}")]
    Io(String),
    #[error("is a directory, not a document")]
    Directory,
    #[error("is empty")]
    Empty,
    #[error("is not a text document ({0})")]
    Binary(&'static str),
    #[error("{0}")]
    Corrupt(String),
    #[error("is a PDF with no text layer (a scanned document?): run OCR on it first")]
    NoTextLayer,
    #[error("contains no numbered clauses (第N条, 3.1, …)")]
    NoClauses,
    #[error("unsupported file type `.{0}`: use .txt, .md, .docx or .pdf")]
    Unsupported(String),
    #[error("invalid categories file: {0}")]
    Config(String),
}

/// An extraction failure, naming the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {kind}")]
pub struct ExtractError {
    pub file: String,
    pub kind: ErrorKind,
}

/// Reads and extracts one file. The format comes from the extension (`.txt`, `.md`, `.docx`,
/// `.pdf`), or from the content when the extension says nothing.
pub fn extract_file(path: &Path, categorizer: &Categorizer) -> Result<Document, ExtractError> {
    let file = path.display().to_string();
    let err = |kind| ExtractError {
        file: file.clone(),
        kind,
    };
    if path.is_dir() {
        return Err(err(ErrorKind::Directory));
    }
    let bytes = std::fs::read(path).map_err(|e| err(ErrorKind::Io(e.to_string())))?;
    extract_bytes(&file, &bytes, categorizer)
}

/// Extracts a document from its bytes; `file` names it in errors and sources and gives the
/// format by its extension.
pub fn extract_bytes(
    file: &str,
    bytes: &[u8],
    categorizer: &Categorizer,
) -> Result<Document, ExtractError> {
    let err = |kind| ExtractError {
        file: file.to_string(),
        kind,
    };
    let path = Path::new(file);
    let format = match path.extension().and_then(|e| e.to_str()) {
        Some(ext) => Format::from_extension(ext)
            .ok_or_else(|| err(ErrorKind::Unsupported(ext.to_string())))?,
        None => Format::sniff(bytes),
    };
    if bytes.is_empty() {
        return Err(err(ErrorKind::Empty));
    }
    let lines = decode::decode(bytes, format).map_err(err)?;
    let parsed = parse::parse(&lines);
    if parsed.units.is_empty() {
        return Err(err(ErrorKind::NoClauses));
    }
    let title = parsed.title.clone().unwrap_or_else(|| {
        path.file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(file)
            .to_string()
    });
    let rules = build_rules(&title, file, &parsed, categorizer);
    Ok(Document {
        title,
        file: file.to_string(),
        sha256: sha256_hex(bytes),
        rules,
        diagnostics: parsed.diagnostics,
    })
}

fn build_rules(
    title: &str,
    file: &str,
    parsed: &parse::Parsed,
    categorizer: &Categorizer,
) -> Vec<Rule> {
    let mut rules: Vec<Rule> = Vec::with_capacity(parsed.units.len());
    for unit in &parsed.units {
        let mut text = unit.lines.join("\n");
        if text.is_empty() {
            // An article that is only a number above its sub-clauses takes their text, so that
            // citing it still shows what it says.
            text = parsed
                .units
                .iter()
                .filter(|u| u.parent.as_deref() == Some(unit.clause.as_str()))
                .map(|u| format!("{} {}", u.clause, u.lines.join("\n")))
                .collect::<Vec<_>>()
                .join("\n");
        }
        let mut categories = categorizer.categorize(&text);
        if categories.is_empty()
            && let Some(parent) = unit.parent.as_deref()
            && let Some(p) = rules.iter().find(|r| r.clause == parent)
        {
            categories = p.categories.clone();
        }
        if categories.is_empty()
            && let Some(chapter) = &unit.chapter
        {
            categories = categorizer.categorize(chapter);
        }
        if categories.is_empty() {
            categories.push(OTHER_CATEGORY.to_string());
        }
        let mut rule = Rule::new(
            title,
            &unit.clause,
            &text,
            categories,
            unit.parent.clone(),
            SourceSpan {
                file: file.to_string(),
                line_start: unit.line_start,
                line_end: unit.line_end,
            },
        );
        rule.chapter = unit.chapter.clone();
        rules.push(rule);
    }
    rules
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
