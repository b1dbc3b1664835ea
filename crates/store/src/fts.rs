//! Tokenising Chinese for SQLite FTS5: CJK runs become overlapping bigrams (a lone CJK
//! character stays a unigram), other runs of letters and digits become lowercased words.
//! The index also holds each CJK character alone, for one-character queries.

use inspector_core::text::{fold_width, is_cjk};

/// Tokens of `text`, in order.
pub fn tokens(text: &str) -> Vec<String> {
    let text = fold_width(text);
    let mut out = Vec::new();
    let mut cjk_run: Vec<char> = Vec::new();
    let mut word = String::new();
    let flush_cjk = |run: &mut Vec<char>, out: &mut Vec<String>| {
        match run.len() {
            0 => {}
            1 => out.push(run[0].to_string()),
            _ => out.extend(run.windows(2).map(|w| w.iter().collect::<String>())),
        }
        run.clear();
    };
    for c in text.chars() {
        if is_cjk(c) {
            if !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
            cjk_run.push(c);
        } else if c.is_alphanumeric() {
            flush_cjk(&mut cjk_run, &mut out);
            word.extend(c.to_lowercase());
        } else {
            flush_cjk(&mut cjk_run, &mut out);
            if !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
        }
    }
    flush_cjk(&mut cjk_run, &mut out);
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// The indexed form: the tokens of [`tokens`] plus every CJK character on its own (so that a
/// one-character query matches), separated by spaces; FTS5's unicode61 tokenizer then splits on
/// the spaces only, since every token is a run of letters.
pub fn index_text(text: &str) -> String {
    let mut out = tokens(text).join(" ");
    for c in fold_width(text).chars().filter(|&c| is_cjk(c)) {
        out.push(' ');
        out.push(c);
    }
    out
}

/// An FTS5 query that requires every token of `query`; `None` when it has none. Tokens are
/// quoted, so no user text is ever read as FTS syntax.
pub fn match_query(query: &str) -> Option<String> {
    let tokens = tokens(query);
    if tokens.is_empty() {
        return None;
    }
    Some(
        tokens
            .iter()
            .map(|t| format!("\"{}\"", t.replace('"', "\"\"")))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bigrams_and_words() {
        assert_eq!(tokens("佩戴安全帽"), ["佩戴", "戴安", "安全", "全帽"]);
        assert_eq!(tokens("帽"), ["帽"]);
        assert_eq!(tokens("5S管理 LOTO"), ["5s", "管理", "loto"]);
        assert_eq!(match_query("安全 \"x"), Some("\"安全\" \"x\"".into()));
        assert_eq!(match_query("，。"), None);
    }
}
