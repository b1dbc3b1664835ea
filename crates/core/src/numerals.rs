//! Numerals as they appear in clause numbers: Arabic (`12`), full-width (`１２`) and Chinese
//! (`十二`, `一百零三`, `两百`, `一〇三`, and the financial forms `壹佰零叁`).

use crate::text::fold_char;

fn digit_value(c: char) -> Option<u32> {
    Some(match c {
        '零' | '〇' => 0,
        '一' | '壹' => 1,
        '二' | '两' | '贰' => 2,
        '三' | '叁' => 3,
        '四' | '肆' => 4,
        '五' | '伍' => 5,
        '六' | '陆' => 6,
        '七' | '柒' => 7,
        '八' | '捌' => 8,
        '九' | '玖' => 9,
        _ => return None,
    })
}

fn unit_value(c: char) -> Option<u32> {
    Some(match c {
        '十' | '拾' => 10,
        '百' | '佰' => 100,
        '千' | '仟' => 1000,
        _ => return None,
    })
}

/// True if `c` can be part of a numeral this module reads.
pub fn is_numeral_char(c: char) -> bool {
    let c = fold_char(c);
    c.is_ascii_digit() || digit_value(c).is_some() || unit_value(c).is_some()
}

/// Reads a numeral below 10 000 in any of the supported forms. Returns `None` for anything
/// malformed (`十十`, `百`, `一百一`, `1二`) rather than guessing.
pub fn parse_numeral(s: &str) -> Option<u32> {
    let chars: Vec<char> = s.chars().map(fold_char).collect();
    if chars.is_empty() {
        return None;
    }
    if chars.iter().all(|c| c.is_ascii_digit()) {
        return s.chars().map(fold_char).collect::<String>().parse().ok();
    }
    // `一〇三`: digits written positionally with no units.
    if chars.len() > 1 && chars.iter().all(|&c| digit_value(c).is_some()) {
        return chars.iter().try_fold(0u32, |acc, &c| {
            acc.checked_mul(10)?.checked_add(digit_value(c)?)
        });
    }
    parse_with_units(&chars)
}

/// The positional-unit grammar: `[d千][d百][d十|十][d]`, with `零` standing for skipped places
/// (`一百零三`, `一千零五十`), a bare leading `十` meaning ten (`十二`), and `两` for two.
fn parse_with_units(chars: &[char]) -> Option<u32> {
    let mut value = 0u32;
    let mut last_unit = 10_000u32;
    let mut i = 0;
    let mut saw_zero = false;
    while i < chars.len() {
        let c = chars[i];
        if let Some(d) = digit_value(c) {
            if d == 0 {
                // A zero marks a skipped place; it needs a unit before it and a digit after it.
                if value == 0 || saw_zero {
                    return None;
                }
                saw_zero = true;
                i += 1;
                continue;
            }
            match chars.get(i + 1).and_then(|&u| unit_value(u)) {
                Some(unit) => {
                    if unit >= last_unit {
                        return None;
                    }
                    // Without a zero, the place must be the next one down (一百一十, not 一百一).
                    if !saw_zero && last_unit != 10_000 && unit * 10 != last_unit {
                        return None;
                    }
                    if saw_zero && unit * 10 == last_unit {
                        return None;
                    }
                    value += d * unit;
                    last_unit = unit;
                    saw_zero = false;
                    i += 2;
                }
                None => {
                    // The ones digit: it must end the numeral, and follow 十 or a zero.
                    if i + 1 != chars.len() {
                        return None;
                    }
                    if last_unit != 10_000 && last_unit != 10 && !saw_zero {
                        return None;
                    }
                    if saw_zero && last_unit == 10 {
                        return None;
                    }
                    value += d;
                    return Some(value);
                }
            }
        } else if let Some(unit) = unit_value(c) {
            // Only `十` may stand without a digit, and only at the start: 十二 = 12.
            if unit != 10 || i != 0 {
                return None;
            }
            value = 10;
            last_unit = 10;
            i += 1;
        } else {
            return None;
        }
    }
    if saw_zero || value == 0 {
        return None;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::parse_numeral;

    #[test]
    fn table() {
        let cases: &[(&str, Option<u32>)] = &[
            ("1", Some(1)),
            ("12", Some(12)),
            ("１２", Some(12)),
            ("十", Some(10)),
            ("十二", Some(12)),
            ("一十二", Some(12)),
            ("二十", Some(20)),
            ("一百", Some(100)),
            ("一百零三", Some(103)),
            ("一百一十", Some(110)),
            ("两百", Some(200)),
            ("一〇三", Some(103)),
            ("壹佰零叁", Some(103)),
            ("一千零五十", Some(1050)),
            ("九百九十九", Some(999)),
            ("", None),
            ("十十", None),
            ("百", None),
            ("一百一", None),
            ("一百零", None),
            ("零", None),
            ("1二", None),
            ("二十百", None),
            ("一百零十", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_numeral(input), *want, "{input}");
        }
    }
}
