//! Citation resolution: turning a citation as a person or a model writes it into one rule.
//!
//! Accepted forms include `《安全作业规程》第3.1条`, `安全作业规程 3.1`, `安全作业规程第三条`,
//! full-width digits (`第３．１条`), and a bare `第3.1条` when only one document has that
//! clause. Text after the clause (`…第3.1条：进入作业区域必须佩戴安全帽`) is ignored.

use crate::{
    Rule,
    numerals::{is_numeral_char, parse_numeral},
    text::fold_width,
};

/// Why a citation names no rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unknown {
    /// No clause number could be read from the text.
    NoClause,
    /// The document named is not in the database.
    Document(String),
    /// The document exists (or none was named) but has no such clause.
    Clause {
        document: Option<String>,
        clause: String,
    },
}

impl std::fmt::Display for Unknown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unknown::NoClause => write!(f, "no clause number found"),
            Unknown::Document(d) => write!(f, "unknown document 《{d}》"),
            Unknown::Clause {
                document: Some(d),
                clause,
            } => write!(f, "《{d}》 has no clause {clause}"),
            Unknown::Clause {
                document: None,
                clause,
            } => write!(f, "no document has clause {clause}"),
        }
    }
}

/// The outcome of [`resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution<'a> {
    Found(&'a Rule),
    Ambiguous(Vec<&'a Rule>),
    Unknown(Unknown),
}

/// A citation split into its parts, before looking anything up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCitation {
    /// The document name as written, without 《》; `None` when the citation names none.
    pub document: Option<String>,
    /// The clause in Arabic form (`"3.1"`, `"3"`).
    pub clause: String,
}

/// Splits a citation into document and clause. Returns `None` when no clause can be read.
pub fn parse(citation: &str) -> Option<ParsedCitation> {
    let text = fold_width(citation);
    let text = text.trim();
    let (document, rest) = match (text.find('《'), text.find('》')) {
        (Some(open), Some(close)) if open < close => {
            let name = text[open + '《'.len_utf8()..close].trim();
            (Some(name.to_string()), &text[close + '》'.len_utf8()..])
        }
        _ => (None, text),
    };
    let (clause_start, clause_end, clause) = find_clause(rest)?;
    let document = document.or_else(|| {
        // Without 《》 the document is whatever precedes the clause: `安全作业规程第三条`.
        let name = rest[..clause_start]
            .trim()
            .trim_end_matches(['的', ',', ',', ' ', ':'])
            .trim();
        (!name.is_empty()).then(|| name.to_string())
    });
    let _ = clause_end;
    Some(ParsedCitation { document, clause })
}

/// Finds the first clause token: `第<numeral>[.<n>…]条` or a bare dotted/undotted Arabic
/// number. Returns its byte range and its Arabic form.
fn find_clause(s: &str) -> Option<(usize, usize, String)> {
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    // First preference: 第…条 (or 第…款/项, which people also write).
    for (k, &(start, c)) in chars.iter().enumerate() {
        if c != '第' {
            continue;
        }
        let mut j = k + 1;
        while j < chars.len() && chars[j].1 == ' ' {
            j += 1;
        }
        let num_start = j;
        while j < chars.len() && (is_numeral_char(chars[j].1) || chars[j].1 == '.') {
            j += 1;
        }
        let raw: String = chars[num_start..j].iter().map(|&(_, c)| c).collect();
        let mut end = j;
        while end < chars.len() && chars[end].1 == ' ' {
            end += 1;
        }
        if end < chars.len() && matches!(chars[end].1, '条' | '款' | '项' | '章' | '节') {
            if chars[end].1 == '章' || chars[end].1 == '节' {
                continue;
            }
            if let Some(clause) = arabic_clause(&raw) {
                let end_byte = chars[end].0 + chars[end].1.len_utf8();
                return Some((start, end_byte, clause));
            }
        }
    }
    // Else a bare Arabic number, `3.1` or `12`, not glued to other digits.
    for (k, &(start, c)) in chars.iter().enumerate() {
        if !c.is_ascii_digit()
            || (k > 0 && (chars[k - 1].1.is_ascii_digit() || chars[k - 1].1 == '.'))
        {
            continue;
        }
        let mut j = k;
        while j < chars.len() && (chars[j].1.is_ascii_digit() || chars[j].1 == '.') {
            j += 1;
        }
        let raw: String = chars[k..j].iter().map(|&(_, c)| c).collect();
        let raw = raw.trim_end_matches('.');
        if let Some(clause) = arabic_clause(raw) {
            let end_byte = chars.get(j).map_or(s.len(), |&(b, _)| b);
            return Some((start, end_byte, clause));
        }
    }
    None
}

/// `十二` → `12`, `3.1` → `3.1`, `３.１` → `3.1`; the first part may be Chinese, the rest must
/// be Arabic.
fn arabic_clause(raw: &str) -> Option<String> {
    let mut parts = raw.split('.');
    let head = parse_numeral(parts.next()?)?;
    let mut out = head.to_string();
    for part in parts {
        let n: u32 = part.parse().ok()?;
        out.push('.');
        out.push_str(&n.to_string());
    }
    Some(out)
}

fn normalise_title(s: &str) -> String {
    fold_width(s)
        .chars()
        .filter(|c| !c.is_whitespace() && !matches!(c, '《' | '》'))
        .collect()
}

/// Resolves `citation` against `rules`.
///
/// A document name matches a title when they are equal ignoring spaces and 《》, or, failing
/// that, when one contains the other (`公司安全作业规程` → 《安全作业规程》).
pub fn resolve<'a>(citation: &str, rules: &'a [Rule]) -> Resolution<'a> {
    let Some(parsed) = parse(citation) else {
        return Resolution::Unknown(Unknown::NoClause);
    };
    let mut titles: Vec<&str> = rules.iter().map(|r| r.document.as_str()).collect();
    titles.sort_unstable();
    titles.dedup();
    let documents: Vec<&str> = match &parsed.document {
        None => titles,
        Some(name) => {
            let want = normalise_title(name);
            let exact: Vec<&str> = titles
                .iter()
                .copied()
                .filter(|t| normalise_title(t) == want)
                .collect();
            if !exact.is_empty() {
                exact
            } else {
                let near: Vec<&str> = titles
                    .iter()
                    .copied()
                    .filter(|t| {
                        let t = normalise_title(t);
                        !want.is_empty() && (t.contains(&want) || want.contains(&t))
                    })
                    .collect();
                if near.is_empty() {
                    return Resolution::Unknown(Unknown::Document(name.clone()));
                }
                near
            }
        }
    };
    let found: Vec<&Rule> = rules
        .iter()
        .filter(|r| r.clause == parsed.clause && documents.contains(&r.document.as_str()))
        .collect();
    match found.len() {
        0 => Resolution::Unknown(Unknown::Clause {
            document: (documents.len() == 1).then(|| documents[0].to_string()),
            clause: parsed.clause,
        }),
        1 => Resolution::Found(found[0]),
        _ => Resolution::Ambiguous(found),
    }
}
