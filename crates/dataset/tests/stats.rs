//! Stats: counts per category, risk and rule; warnings for thin categories, missing safe
//! photos and photos that max_pixels shrinks a lot.

use common::{photo, rules, write_lines};
use inspector_dataset::{load_file, stats};

mod common;

#[test]
fn counts_and_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    for k in 0..6u32 {
        let (w, h) = if k == 5 { (2400, 1800) } else { (120, 90) };
        photo(w, h, k, &[])
            .save(dir.path().join(format!("{k}.png")))
            .unwrap();
        let rule = if k < 4 {
            "《安全作业规程》第3.1条"
        } else {
            "《现场管理标准》第2.2条"
        };
        let risk = ["高", "中", "低"][k as usize % 3];
        lines.push(format!(
            r#"{{"image": "{k}.png", "violations": [{{"description": "d", "rule": "{rule}", "risk": "{risk}", "box": [1, 1, 20, 20]}}, {{"description": "e", "rule": "《安全作业规程》第3.2条", "risk": "高"}}]}}"#
        ));
    }
    let file = write_lines(dir.path(), "a.jsonl", &lines);
    let s = stats(&load_file(&file, &rules()).unwrap(), 1280 * 28 * 28, 3);
    assert_eq!(
        (s.records, s.safe, s.violations, s.violations_with_box),
        (6, 0, 12, 6)
    );
    assert_eq!(s.categories["安全防护"], 4);
    assert_eq!(s.categories["现场管理"], 2);
    assert_eq!((s.risks["高"], s.risks["中"], s.risks["低"]), (8, 2, 2));
    assert_eq!(s.rules["《安全作业规程》第3.2条"], 6);
    assert_eq!(s.shrunk_lines, [6]);
    assert_eq!(s.width.unwrap().max, 2400.0);
    assert_eq!(s.width.unwrap().median, 120.0);
    let w = s.warnings.join("\n");
    assert!(w.contains("category 现场管理 has only 2 record(s)"), "{w}");
    assert!(!w.contains("category 安全防护"), "{w}");
    assert!(w.contains("no safe photos"), "{w}");
    assert!(
        w.contains("1 image(s) are shrunk") && w.contains("lines 6"),
        "{w}"
    );
}
