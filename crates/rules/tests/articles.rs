//! Article numbers 1–999 in Chinese numerals, through the whole extraction.

use inspector_rules::{Categorizer, extract_bytes};

fn chinese(n: u32) -> String {
    const D: [char; 10] = ['零', '一', '二', '三', '四', '五', '六', '七', '八', '九'];
    let (h, t, o) = (n / 100, n / 10 % 10, n % 10);
    let mut s = String::new();
    if h > 0 {
        s.push(D[h as usize]);
        s.push('百');
    }
    if t > 0 {
        if !(h == 0 && t == 1) {
            s.push(D[t as usize]);
        }
        s.push('十');
    } else if h > 0 && o > 0 {
        s.push('零');
    }
    if o > 0 {
        s.push(D[o as usize]);
    }
    s
}

#[test]
fn articles_one_to_999() {
    let mut text = String::from("《长规程》\n");
    for n in 1..=999 {
        text.push_str(&format!("第{}条 第{n}项要求。\n", chinese(n)));
    }
    let doc = extract_bytes("long.txt", text.as_bytes(), &Categorizer::default()).unwrap();
    assert!(
        doc.diagnostics.is_empty(),
        "{:?}",
        &doc.diagnostics[..3.min(doc.diagnostics.len())]
    );
    let clauses: Vec<String> = doc.rules.iter().map(|r| r.clause.clone()).collect();
    let want: Vec<String> = (1..=999).map(|n| n.to_string()).collect();
    assert_eq!(clauses, want);
}

#[test]
fn odd_content_becomes_diagnostics() {
    let text = "《规程》\n第一条 正常条款。\n第十十条 数字写错了。\n第一条 重复的编号。\n第二条\n第三条 最后一条。\n3.1 子条款。\n5.1 放错位置的子条款。\n";
    let doc = extract_bytes("odd.txt", text.as_bytes(), &Categorizer::default()).unwrap();
    let kinds: Vec<String> = doc
        .diagnostics
        .iter()
        .map(|d| format!("{}:{:?}", d.line, d.kind))
        .collect();
    assert_eq!(
        kinds,
        ["3:Unparsable", "4:Duplicate", "5:Empty", "8:Misplaced"]
    );
    let clauses: Vec<&str> = doc.rules.iter().map(|r| r.clause.as_str()).collect();
    assert_eq!(clauses, ["1", "3", "3.1", "5.1"]);
    // The unreadable line is kept as text of the unit above, not lost.
    assert!(doc.rules[0].text.contains("数字写错了"));
}
