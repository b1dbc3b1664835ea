//! Chinese numerals 1–999, table-tested against an independent writer of the canonical form
//! (and its common variants: 一十, 两, 〇-positional, financial, full-width Arabic).

use inspector_core::numerals::parse_numeral;

const DIGITS: [char; 10] = ['零', '一', '二', '三', '四', '五', '六', '七', '八', '九'];
const FINANCIAL: [char; 10] = ['零', '壹', '贰', '叁', '肆', '伍', '陆', '柒', '捌', '玖'];

/// The canonical reading: 十二, 一百零三, 一百一十, 九百九十九.
fn canonical(n: u32, digits: &[char; 10], ten: char, hundred: char) -> String {
    let (h, t, o) = (n / 100, n / 10 % 10, n % 10);
    let mut s = String::new();
    if h > 0 {
        s.push(digits[h as usize]);
        s.push(hundred);
    }
    if t > 0 {
        if !(h == 0 && t == 1) {
            s.push(digits[t as usize]);
        }
        s.push(ten);
    } else if h > 0 && o > 0 {
        s.push('零');
    }
    if o > 0 {
        s.push(digits[o as usize]);
    }
    s
}

#[test]
fn canonical_chinese_1_to_999() {
    for n in 1..=999 {
        let s = canonical(n, &DIGITS, '十', '百');
        assert_eq!(parse_numeral(&s), Some(n), "{s}");
    }
}

#[test]
fn variants_1_to_999() {
    for n in 1..=999u32 {
        let financial = canonical(n, &FINANCIAL, '拾', '佰');
        assert_eq!(parse_numeral(&financial), Some(n), "{financial}");
        let positional: String = n
            .to_string()
            .chars()
            .map(|d| {
                ['〇', '一', '二', '三', '四', '五', '六', '七', '八', '九']
                    [d as usize - '0' as usize]
            })
            .collect();
        if n >= 10 {
            assert_eq!(parse_numeral(&positional), Some(n), "{positional}");
        }
        let full_width: String = n
            .to_string()
            .chars()
            .map(|d| char::from_u32(d as u32 + 0xFEE0).unwrap())
            .collect();
        assert_eq!(parse_numeral(&full_width), Some(n), "{full_width}");
        assert_eq!(parse_numeral(&n.to_string()), Some(n));
    }
    // 一十二 and 两百 are common too.
    assert_eq!(parse_numeral("一十二"), Some(12));
    assert_eq!(parse_numeral("两百零三"), Some(203));
}
