//! The canonical answer's grammar, for constrained decoding: whether a byte string can still
//! grow into a valid answer.
//!
//! The grammar is the canonical JSON answer (see [`crate::answer`]):
//! `{"status": "safe", "violations": []}` or `{"status": "violation", "violations": [V, …]}`,
//! each `V` being `{"description": S, "rule": R, "risk": K[, "suggestion": S][, "box": [n, n, n,
//! n]]}`. `S` is any string without quotes, backslashes or control characters; `K` is 高, 中 or
//! 低; box numbers are integers 0–1000; separators take at most one space. `R` is one of the
//! citations given (the rules in the database), so a constrained model cannot cite a clause that
//! does not exist; with no citations given, any string.
//!
//! The check works on bytes, so a prefix may end inside a multi-byte character (byte-level BPE
//! tokens split characters).
//!
//! ```
//! use inspector_core::grammar::{AnswerGrammar, Viability};
//!
//! let g = AnswerGrammar::new(vec!["《安全作业规程》第3.1条".into()]);
//! assert_eq!(g.check(br#"{"status": "sa"#), Viability::Prefix);
//! assert_eq!(g.check(br#"{"status": "safe", "violations": []}"#), Viability::Complete);
//! assert_eq!(g.check(br#"{"status": "unsure"#), Viability::Invalid);
//! assert_eq!(
//!     g.check(r#"{"status": "violation", "violations": [{"description": "x", "rule": "《电气"#.as_bytes()),
//!     Viability::Invalid,
//! );
//! ```

/// What a byte string is with respect to the grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Viability {
    /// A whole answer (nothing but whitespace may follow).
    Complete,
    /// Not an answer yet, but some continuation makes it one.
    Prefix,
    /// No continuation makes it an answer.
    Invalid,
}

/// The grammar, with the citations the `rule` field may take.
#[derive(Debug, Clone, Default)]
pub struct AnswerGrammar {
    citations: Vec<Vec<u8>>,
}

/// Parse result of one piece: consumed up to an index, ran out of input, or failed.
enum P {
    Ok(usize),
    More,
    Bad,
}

use P::{Bad, More, Ok as Done};

macro_rules! step {
    ($e:expr) => {
        match $e {
            Done(i) => i,
            More => return More,
            Bad => return Bad,
        }
    };
}

const RISKS: [&str; 3] = ["高", "中", "低"];

fn lit(s: &[u8], i: usize, l: &[u8]) -> P {
    let rest = &s[i.min(s.len())..];
    if rest.len() >= l.len() {
        if &rest[..l.len()] == l {
            Done(i + l.len())
        } else {
            Bad
        }
    } else if l.starts_with(rest) {
        More
    } else {
        Bad
    }
}

/// At most one space.
fn ws(s: &[u8], i: usize) -> usize {
    if s.get(i) == Some(&b' ') { i + 1 } else { i }
}

/// A quoted string of free text.
fn free_string(s: &[u8], i: usize) -> P {
    let mut i = step!(lit(s, i, b"\""));
    loop {
        match s.get(i) {
            None => return More,
            Some(b'"') => return Done(i + 1),
            Some(b'\\') => return Bad,
            Some(c) if *c < 0x20 => return Bad,
            Some(_) => i += 1,
        }
    }
}

/// A quoted string that is one of `choices`.
fn choice_string<T: AsRef<[u8]>>(s: &[u8], i: usize, choices: &[T]) -> P {
    let i = step!(lit(s, i, b"\""));
    let rest = &s[i.min(s.len())..];
    let mut more = false;
    for c in choices {
        let c = c.as_ref();
        let mut quoted = c.to_vec();
        quoted.push(b'"');
        match lit(rest, 0, &quoted) {
            Done(n) => return Done(i + n),
            More => more = true,
            Bad => {}
        }
    }
    if more { More } else { Bad }
}

/// An integer 0–1000 without leading zeros.
fn number(s: &[u8], i: usize) -> P {
    let mut j = i;
    while j < s.len() && s[j].is_ascii_digit() {
        j += 1;
    }
    if j == i {
        return if j == s.len() { More } else { Bad };
    }
    let digits = &s[i..j];
    if digits.len() > 4 || (digits.len() > 1 && digits[0] == b'0') {
        return Bad;
    }
    let v: u32 = std::str::from_utf8(digits).unwrap().parse().unwrap();
    if v > 1000 {
        return Bad;
    }
    if j == s.len() { More } else { Done(j) }
}

impl AnswerGrammar {
    /// `citations`: the values `rule` may take; empty allows any string.
    pub fn new(citations: Vec<String>) -> Self {
        AnswerGrammar {
            citations: citations.into_iter().map(String::into_bytes).collect(),
        }
    }

    /// Whether `s` is a whole answer, a prefix of one, or neither.
    pub fn check(&self, s: &[u8]) -> Viability {
        match self.answer(s) {
            Done(i) if s[i..].iter().all(|c| c.is_ascii_whitespace()) => Viability::Complete,
            Done(_) | Bad => Viability::Invalid,
            More => Viability::Prefix,
        }
    }

    fn key_value(&self, s: &[u8], i: usize, key: &[u8]) -> P {
        let i = step!(lit(s, i, b"\""));
        let i = step!(lit(s, i, key));
        let i = step!(lit(s, i, b"\":"));
        Done(ws(s, i))
    }

    fn answer(&self, s: &[u8]) -> P {
        let i = step!(lit(s, 0, b"{"));
        let i = step!(self.key_value(s, i, b"status"));
        let (i, safe) = match choice_string(s, i, &["safe", "violation"]) {
            Done(j) => (j, &s[i..j] == b"\"safe\""),
            other => return other,
        };
        let i = step!(lit(s, i, b","));
        let i = ws(s, i);
        let i = step!(self.key_value(s, i, b"violations"));
        let mut i = step!(lit(s, i, b"["));
        if safe {
            i = step!(lit(s, i, b"]"));
        } else {
            i = step!(self.violation(s, i));
            loop {
                match lit(s, i, b"]") {
                    Done(j) => {
                        i = j;
                        break;
                    }
                    More => return More,
                    Bad => {}
                }
                i = step!(lit(s, i, b","));
                i = ws(s, i);
                i = step!(self.violation(s, i));
            }
        }
        lit(s, i, b"}")
    }

    fn violation(&self, s: &[u8], i: usize) -> P {
        let i = step!(lit(s, i, b"{"));
        let i = step!(self.key_value(s, i, b"description"));
        let i = step!(free_string(s, i));
        let i = step!(lit(s, i, b","));
        let i = ws(s, i);
        let i = step!(self.key_value(s, i, b"rule"));
        let i = if self.citations.is_empty() {
            step!(free_string(s, i))
        } else {
            step!(choice_string(s, i, &self.citations))
        };
        let i = step!(lit(s, i, b","));
        let i = ws(s, i);
        let i = step!(self.key_value(s, i, b"risk"));
        let mut i = step!(choice_string(s, i, &RISKS));
        // Optional fields, in order: suggestion, box.
        let mut can_suggest = true;
        let mut can_box = true;
        loop {
            match lit(s, i, b"}") {
                Done(j) => return Done(j),
                More => return More,
                Bad => {}
            }
            i = step!(lit(s, i, b","));
            i = ws(s, i);
            let key_start = i;
            let suggestion = if can_suggest {
                self.key_value(s, key_start, b"suggestion")
            } else {
                Bad
            };
            let boxed = if can_box {
                self.key_value(s, key_start, b"box")
            } else {
                Bad
            };
            match (suggestion, boxed) {
                (Done(j), _) => {
                    i = step!(free_string(s, j));
                    can_suggest = false;
                }
                (_, Done(j)) => {
                    let mut j = step!(lit(s, j, b"["));
                    for k in 0..4 {
                        if k > 0 {
                            j = step!(lit(s, j, b","));
                            j = ws(s, j);
                        }
                        j = step!(number(s, j));
                    }
                    i = step!(lit(s, j, b"]"));
                    can_suggest = false;
                    can_box = false;
                }
                (More, _) | (_, More) => return More,
                (Bad, Bad) => return Bad,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g() -> AnswerGrammar {
        AnswerGrammar::new(vec![
            "《安全作业规程》第3.1条".into(),
            "《安全作业规程》第3.2条".into(),
        ])
    }

    const FULL: &str = r#"{"status": "violation", "violations": [{"description": "作业人员未佩戴安全帽", "rule": "《安全作业规程》第3.1条", "risk": "高", "suggestion": "立即佩戴", "box": [12, 40, 300, 1000]}, {"description": "未穿背心", "rule": "《安全作业规程》第3.2条", "risk": "中"}]}"#;

    #[test]
    fn every_prefix_of_a_valid_answer_is_viable_and_the_whole_is_complete() {
        let bytes = FULL.as_bytes();
        for n in 0..bytes.len() {
            assert_eq!(
                g().check(&bytes[..n]),
                Viability::Prefix,
                "prefix {:?}",
                String::from_utf8_lossy(&bytes[..n])
            );
        }
        assert_eq!(g().check(bytes), Viability::Complete);
        let safe = br#"{"status": "safe", "violations": []}"#;
        assert_eq!(g().check(safe), Viability::Complete);
        // Compact separators are fine too.
        assert_eq!(
            g().check(br#"{"status":"safe","violations":[]}"#),
            Viability::Complete
        );
    }

    #[test]
    fn the_canonical_serialisation_is_accepted() {
        let answer = crate::answer::Answer::from_annotation(
            &crate::Annotation {
                image: "x.png".into(),
                violations: vec![crate::Violation {
                    description: "作业人员未佩戴安全帽".into(),
                    rule: "《安全作业规程》第3.1条".into(),
                    risk: crate::Risk::High,
                    suggestion: Some("立即佩戴安全帽".into()),
                    bbox: Some([10.0, 20.0, 110.0, 220.0]),
                }],
            },
            (448, 336),
        );
        assert_eq!(g().check(answer.to_json().as_bytes()), Viability::Complete);
    }

    #[test]
    fn wrong_content_is_invalid_as_soon_as_it_appears() {
        for bad in [
            r#"["#,
            r#"{"state"#,
            r#"{"status": "safe", "violations": [{"#,
            r#"{"status": "violation", "violations": []"#,
            r#"{"status": "violation", "violations": [{"description": "a\"#,
            r#"{"status": "violation", "violations": [{"description": "a", "rule": "《安全作业规程》第9"#,
            r#"{"status": "violation", "violations": [{"description": "a", "rule": "《安全作业规程》第3.1条", "risk": "极"#,
            r#"{"status": "violation", "violations": [{"description": "a", "rule": "《安全作业规程》第3.1条", "risk": "高", "box": [1001"#,
            r#"{"status": "violation", "violations": [{"description": "a", "rule": "《安全作业规程》第3.1条", "risk": "高", "box": [01"#,
            r#"{"status": "violation", "violations": [{"description": "a", "rule": "《安全作业规程》第3.1条", "risk": "高", "box": [1, 2, 3]"#,
            r#"{"status": "safe", "violations": []}}"#,
            r#"{"status": "safe",  "violations""#,
        ] {
            assert_eq!(g().check(bad.as_bytes()), Viability::Invalid, "{bad}");
        }
    }

    #[test]
    fn a_prefix_may_end_inside_a_character() {
        let s = r#"{"status": "violation", "violations": [{"description": "作"#.as_bytes();
        assert_eq!(g().check(&s[..s.len() - 1]), Viability::Prefix);
        let r = r#"{"status": "violation", "violations": [{"description": "a", "rule": "《安"#
            .as_bytes();
        assert_eq!(g().check(&r[..r.len() - 2]), Viability::Prefix);
    }

    #[test]
    fn without_citations_any_rule_string_is_allowed() {
        let g = AnswerGrammar::new(vec![]);
        let s = r#"{"status": "violation", "violations": [{"description": "a", "rule": "anything", "risk": "低"}]}"#;
        assert_eq!(g.check(s.as_bytes()), Viability::Complete);
    }
}
