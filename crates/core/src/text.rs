//! Text normalisation shared by extraction and citation lookup.

/// Folds full-width ASCII (`３．１`, `Ａ`) to ASCII and the ideographic space to a space.
/// Everything else, CJK punctuation included, is kept as it is.
pub fn fold_width(s: &str) -> String {
    s.chars().map(fold_char).collect()
}

/// [`fold_width`] for one character.
pub fn fold_char(c: char) -> char {
    match c {
        '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
        '\u{3000}' => ' ',
        _ => c,
    }
}

/// True for the CJK ideographs (the unified block and extension A).
pub fn is_cjk(c: char) -> bool {
    matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}' | '\u{F900}'..='\u{FAFF}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_full_width_digits_and_space() {
        assert_eq!(fold_width("第１２．１条　ＡＢ"), "第12.1条 AB");
        assert_eq!(fold_width("《规程》：。"), "《规程》:。");
    }
}
