use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where a rule came from: the file name as given and the 1-based lines it spans.
///
/// For a `.docx` or `.pdf` the lines are those of the extracted text (one paragraph per line for
/// Word, one text line per line for PDF), so they locate the clause within that text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceSpan {
    pub file: String,
    pub line_start: usize,
    pub line_end: usize,
}

/// One numbered unit of a regulation document: an article (`第十二条`), a section (`3`), or a
/// numbered clause (`12.1`, `3.1.2`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Stable across re-extraction: a hash of the document title and the clause number.
    pub id: String,
    /// The document title, without 《》.
    pub document: String,
    /// Arabic clause number: `"12"` or `"12.1"`.
    pub clause: String,
    /// `《标题》第12.1条`.
    pub citation: String,
    /// The clause's own text with its list items; for an article, its lead text.
    pub text: String,
    /// Categories, the primary one first; never empty.
    pub categories: Vec<String>,
    /// The clause number of the enclosing unit (`"12"` for `"12.1"`), if any.
    pub parent: Option<String>,
    /// The chapter (`第二章 个人防护`) the rule sits in, kept as context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chapter: Option<String>,
    pub source: SourceSpan,
}

impl Rule {
    pub fn new(
        document: &str,
        clause: &str,
        text: &str,
        categories: Vec<String>,
        parent: Option<String>,
        source: SourceSpan,
    ) -> Self {
        Rule {
            id: rule_id(document, clause),
            document: document.to_string(),
            clause: clause.to_string(),
            citation: format_citation(document, clause),
            text: text.to_string(),
            categories,
            parent,
            chapter: None,
            source,
        }
    }

    /// The primary category (the first one).
    pub fn primary_category(&self) -> &str {
        self.categories
            .first()
            .map(String::as_str)
            .unwrap_or(crate::OTHER_CATEGORY)
    }
}

/// `《安全作业规程》第3.1条`.
pub fn format_citation(document: &str, clause: &str) -> String {
    format!("《{document}》第{clause}条")
}

/// A stable rule id: the first 16 hex digits of SHA-256 over title, a separator and clause.
/// Re-extracting the same document gives the same ids, so annotations and stored findings that
/// point at a rule keep pointing at it.
pub fn rule_id(document: &str, clause: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(document.as_bytes());
    hasher.update([0x1f]);
    hasher.update(clause.as_bytes());
    let digest = hasher.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// What kind of oddity an extraction met. None of them aborts extraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiagnosticKind {
    /// A line that looks like a clause heading but whose number cannot be read.
    Unparsable,
    /// A clause number that was already used in the same document; the later one is dropped.
    Duplicate,
    /// A clause with no text and no sub-clauses; it is dropped.
    Empty,
    /// A clause whose number does not fit the unit it appears in (`5.1` inside `第三条`).
    Misplaced,
}

/// A problem found in a document, kept with the document and shown to the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    pub kind: DiagnosticKind,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}
