//! Lines of a regulation → numbered units, their hierarchy and diagnostics.
//!
//! The grammar, line by line (after folding full-width digits):
//! - `第X章 …` / `第X节 …`: a chapter, kept as context for the rules under it;
//! - `第N条 …`: an article (`N` Arabic, full-width or Chinese);
//! - `3.1 …`, `3.1.2 …`: a numbered clause, nested under `3` / `3.1`;
//! - `3 标题`: a section heading of the GB style, when it is heading-like and in sequence;
//! - anything else (list items `（一）`, `(1)`, `1)`, `a)` included) continues the current unit.
//!
//! Numbers inside a line (`按本规程第十三条规定`, `1.5米`) are never headings.

use inspector_core::{
    Diagnostic, DiagnosticKind,
    numerals::{is_numeral_char, parse_numeral},
    text::fold_char,
};

use crate::decode::Line;

/// A numbered unit before categorisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub clause: String,
    pub parent: Option<String>,
    pub chapter: Option<String>,
    /// Lead text lines (the heading line's own text first), list items included.
    pub lines: Vec<String>,
    pub line_start: usize,
    pub line_end: usize,
    /// True for a section heading (`3 个人防护`): its first line is a title.
    pub is_section: bool,
}

/// The structure of one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The title found in the text, if any (`None`: the caller uses the file stem).
    pub title: Option<String>,
    pub units: Vec<Unit>,
    pub diagnostics: Vec<Diagnostic>,
}

enum Kind {
    Chapter,
    Article(u32),
    Clause(Vec<u32>),
    Section(u32),
    /// Looks like a heading but its number cannot be read.
    Unreadable(String),
    Text,
}

/// How many lines at the top may hold the title.
const TITLE_WINDOW: usize = 5;

pub fn parse(lines: &[Line]) -> Parsed {
    let mut parser = Parser::default();
    let title_line = find_title(lines);
    for (index, line) in lines.iter().enumerate() {
        let number = index + 1;
        if Some(index) == title_line.as_ref().map(|(i, _)| *i) {
            continue;
        }
        parser.line(number, line);
    }
    parser.finish(title_line.map(|(_, t)| t))
}

fn find_title(lines: &[Line]) -> Option<(usize, String)> {
    let top: Vec<(usize, &Line)> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.text.trim().is_empty())
        .take(TITLE_WINDOW)
        .take_while(|(_, l)| matches!(classify(&l.text, l.heading, &State::default()), Kind::Text))
        .collect();
    // 1. 《…》 opening one of the first lines.
    for &(i, line) in &top {
        let text = line.text.trim();
        if let Some(rest) = text.strip_prefix('《')
            && let Some(end) = rest.find('》')
        {
            let title = rest[..end].trim();
            if !title.is_empty() {
                return Some((i, title.to_string()));
            }
        }
    }
    // 2. The first heading.
    if let Some(&(i, line)) = top.iter().find(|(_, l)| l.heading) {
        return Some((i, line.text.trim().to_string()));
    }
    // 3. A plain first line that reads like a title: short, no sentence punctuation.
    let &(i, line) = top.first()?;
    let text = line.text.trim();
    (text.chars().count() <= 40 && !text.contains(['。', '；', ';', '，', ',', '：', ':']))
        .then(|| (i, text.to_string()))
}

#[derive(Default)]
struct State {
    last_section: u32,
    articles_seen: usize,
}

#[derive(Default)]
struct Parser {
    state: State,
    /// Clause numbers opened so far, for duplicate and parent checks.
    seen: std::collections::HashSet<String>,
    chapter: Option<String>,
    units: Vec<Unit>,
    /// Index into `units` of the unit receiving text; `None` before the first unit or after a
    /// dropped duplicate (whose text is then dropped with it).
    current: Option<usize>,
    /// The unit with no number prefix above it (an article or section), for placement checks.
    top: Option<String>,
    diagnostics: Vec<Diagnostic>,
}

impl Parser {
    fn line(&mut self, number: usize, line: &Line) {
        let text = line.text.trim();
        if text.is_empty() {
            return;
        }
        match classify(text, line.heading, &self.state) {
            Kind::Chapter => {
                self.chapter = Some(text.to_string());
                self.current = None;
            }
            Kind::Article(n) => {
                self.state.articles_seen += 1;
                let body = body_after(text, '条');
                self.open(number, n.to_string(), body, false);
            }
            Kind::Section(n) => {
                self.state.last_section = n;
                let body = text
                    .chars()
                    .skip_while(|c| c.is_ascii_digit())
                    .collect::<String>();
                self.open(number, n.to_string(), body.trim().to_string(), true);
            }
            Kind::Clause(parts) => {
                let clause = parts
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(".");
                let body = body_after_number(text);
                self.open(number, clause, body, false);
            }
            Kind::Unreadable(what) => {
                self.diagnostics.push(Diagnostic {
                    kind: DiagnosticKind::Unparsable,
                    line: number,
                    message: format!(
                        "{what} `{}`: its number cannot be read; kept as text of the unit above",
                        excerpt(text)
                    ),
                });
                self.push_text(number, text);
            }
            Kind::Text => {
                if line.heading {
                    // A heading that is neither chapter nor clause (`## 附则`) is context too.
                    self.chapter = Some(text.to_string());
                    self.current = None;
                } else {
                    self.push_text(number, text);
                }
            }
        }
    }

    fn push_text(&mut self, number: usize, text: &str) {
        if let Some(i) = self.current {
            self.units[i].lines.push(text.to_string());
            self.units[i].line_end = number;
        }
    }

    fn open(&mut self, number: usize, clause: String, body: String, is_section: bool) {
        if self.seen.contains(&clause) {
            self.diagnostics.push(Diagnostic {
                kind: DiagnosticKind::Duplicate,
                line: number,
                message: format!("clause {clause} appears again; the later one is dropped"),
            });
            self.current = None;
            return;
        }
        let parent = clause.rsplit_once('.').map(|(p, _)| p.to_string());
        if let Some(parent) = &parent {
            let root = clause.split('.').next().unwrap_or_default();
            let known = self.seen.contains(parent);
            if !known || self.top.as_deref() != Some(root) {
                self.diagnostics.push(Diagnostic {
                    kind: DiagnosticKind::Misplaced,
                    line: number,
                    message: match &self.top {
                        Some(top) => format!("clause {clause} appears inside unit {top}"),
                        None => format!("clause {clause} has no enclosing unit {parent}"),
                    },
                });
            }
        } else {
            self.top = Some(clause.clone());
        }
        let parent = parent.filter(|p| self.seen.contains(p));
        self.seen.insert(clause.clone());
        let lines = if body.is_empty() { vec![] } else { vec![body] };
        self.units.push(Unit {
            clause,
            parent,
            chapter: self.chapter.clone(),
            lines,
            line_start: number,
            line_end: number,
            is_section,
        });
        self.current = Some(self.units.len() - 1);
    }

    fn finish(mut self, title: Option<String>) -> Parsed {
        let parents: std::collections::HashSet<String> =
            self.units.iter().filter_map(|u| u.parent.clone()).collect();
        let mut kept = Vec::with_capacity(self.units.len());
        for unit in std::mem::take(&mut self.units) {
            if unit.lines.is_empty() && !parents.contains(&unit.clause) {
                self.diagnostics.push(Diagnostic {
                    kind: DiagnosticKind::Empty,
                    line: unit.line_start,
                    message: format!("clause {} has no text; it is dropped", unit.clause),
                });
            } else {
                kept.push(unit);
            }
        }
        self.diagnostics.sort_by_key(|d| d.line);
        Parsed {
            title,
            units: kept,
            diagnostics: self.diagnostics,
        }
    }
}

fn excerpt(s: &str) -> String {
    let mut out: String = s.chars().take(24).collect();
    if s.chars().count() > 24 {
        out.push('…');
    }
    out
}

/// Characters that, right after a leading number, show it is a quantity, not a clause number
/// (`1.5米以上`, `2.5mm`, `0.5%`).
fn is_unit_char(c: char) -> bool {
    matches!(
        c,
        '米' | '%'
            | '倍'
            | '个'
            | '人'
            | '名'
            | '吨'
            | '千'
            | '公'
            | '克'
            | '小'
            | '分'
            | '秒'
            | '度'
            | '℃'
            | '次'
            | '层'
            | '号'
            | '年'
            | '月'
            | '日'
            | '天'
            | '周'
            | '寸'
            | '厘'
            | '毫'
            | '伏'
            | '安'
            | '瓦'
            | '升'
            | '级'
            | '类'
            | '项'
            | '条'
            | '款'
            | '万'
            | '元'
            | '台'
            | '只'
    ) || c.is_ascii_alphabetic()
}

fn classify(text: &str, heading: bool, state: &State) -> Kind {
    let chars: Vec<char> = text.chars().map(fold_char).collect();
    if chars.first() == Some(&'第') {
        let mut j = 1;
        while j < chars.len() && chars[j] == ' ' {
            j += 1;
        }
        let start = j;
        while j < chars.len() && (is_numeral_char(chars[j]) || chars[j] == ' ') {
            j += 1;
        }
        if let Some(&marker) = chars.get(j) {
            let raw: String = chars[start..j].iter().filter(|c| **c != ' ').collect();
            match marker {
                '章' | '节' | '编' | '部' => {
                    return if parse_numeral(&raw).is_some() {
                        Kind::Chapter
                    } else {
                        Kind::Unreadable("chapter".into())
                    };
                }
                '条' => {
                    return match parse_numeral(&raw) {
                        Some(n) if n > 0 => Kind::Article(n),
                        _ => Kind::Unreadable("article".into()),
                    };
                }
                _ => {}
            }
        }
        return Kind::Text;
    }
    if !chars.first().is_some_and(char::is_ascii_digit) {
        return Kind::Text;
    }
    // Leading Arabic number, possibly dotted.
    let mut j = 0;
    let mut parts: Vec<String> = vec![String::new()];
    while j < chars.len() {
        let c = chars[j];
        if c.is_ascii_digit() {
            parts.last_mut().unwrap().push(c);
        } else if c == '.' && chars.get(j + 1).is_some_and(char::is_ascii_digit) {
            parts.push(String::new());
        } else {
            break;
        }
        j += 1;
    }
    // What follows the number decides: a separator or text means a heading; a unit means a
    // quantity; `)`, `、` after a single number mean a list item.
    let next = chars.get(j).copied();
    let after_trailing_dot = if next == Some('.') {
        chars.get(j + 1).copied()
    } else {
        next
    };
    let separated = matches!(next, Some(' ' | '\t' | '、' | ':' | '：')) || next.is_none();
    if parts.len() >= 2 {
        let numbers: Option<Vec<u32>> = parts.iter().map(|p| p.parse().ok()).collect();
        let Some(numbers) = numbers else {
            return Kind::Unreadable("clause".into());
        };
        if separated {
            return Kind::Clause(numbers);
        }
        return match after_trailing_dot {
            Some(c) if c == ' ' || (!is_unit_char(c) && !c.is_ascii_punctuation()) => {
                Kind::Clause(numbers)
            }
            _ => Kind::Text,
        };
    }
    // A single number: a GB-style section heading `3 个人防护` when heading-like and in order.
    if matches!(next, Some(' ' | '\t')) {
        let Ok(n) = parts[0].parse::<u32>() else {
            return Kind::Text;
        };
        let title: String = chars[j..].iter().collect();
        let title = title.trim();
        let heading_like = !title.is_empty()
            && title.chars().count() <= 30
            && !title.ends_with(['。', '；', ';', '，', ',', '：', ':']);
        let in_sequence =
            n == state.last_section + 1 || (state.last_section == 0 && state.articles_seen == 0);
        if heading_like && (heading || in_sequence) && n > state.last_section {
            return Kind::Section(n);
        }
    }
    Kind::Text
}

/// The text after the `marker` that closes a heading number (`第三条 为…` → `为…`).
fn body_after(text: &str, marker: char) -> String {
    let rest = text.split_once(marker).map_or("", |(_, r)| r);
    trim_separators(rest)
}

/// The text after a leading dotted number (`3.1 进入…` → `进入…`).
fn body_after_number(text: &str) -> String {
    let rest =
        text.trim_start_matches(|c: char| fold_char(c).is_ascii_digit() || fold_char(c) == '.');
    trim_separators(rest)
}

fn trim_separators(s: &str) -> String {
    s.trim_start_matches(|c: char| c.is_whitespace() || matches!(c, '、' | ':' | '：' | '.' | '．'))
        .trim_end()
        .to_string()
}
