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

/// The text a rule is indexed under: its citation, text and categories.
pub fn rule_body(rule: &inspector_core::Rule) -> String {
    format!(
        "{} {} {}",
        rule.citation,
        rule.text,
        rule.categories.join(" ")
    )
}

/// FTS5's `bm25()` score, negated (higher is better), for a row holding `tokens`: each query
/// term weighs `idf × tf(k1 + 1) / (tf + k1(1 − b + b·len/avglen))` with k1 1.2 and b 0.75, and
/// `idf = ln((rows − hits + 0.5) / (hits + 0.5))`, at least 1e-6. `hits[i]` is how many rows
/// hold `terms[i]`; `rows` and `total_tokens` are the index's.
pub fn bm25(
    terms: &[String],
    tokens: &[String],
    hits: &[i64],
    rows: i64,
    total_tokens: i64,
) -> f64 {
    const K1: f64 = 1.2;
    const B: f64 = 0.75;
    let rows_f = rows as f64;
    let avg = total_tokens as f64 / rows_f;
    let len = tokens.len() as f64;
    let mut score = 0.0;
    for (term, &n) in terms.iter().zip(hits) {
        let n = n as f64;
        let mut idf = ((rows_f - n + 0.5) / (n + 0.5)).ln();
        if idf <= 0.0 {
            idf = 1e-6;
        }
        let tf = tokens.iter().filter(|t| *t == term).count() as f64;
        score += idf * (tf * (K1 + 1.0)) / (tf + K1 * (1.0 - B + B * len / avg));
    }
    score
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
