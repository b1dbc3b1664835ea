//! Validation reports exactly the bad lines of a mixed file, each with its field, and never
//! stops early.

use std::path::Path;

use common::rules;
use inspector_dataset::{Problem, load_file, validate_file};

mod common;

fn png(path: &Path, w: u32, h: u32, shade: u8) {
    image::RgbImage::from_pixel(w, h, image::Rgb([shade, 100, 50]))
        .save(path)
        .unwrap();
}

#[test]
fn exactly_the_bad_lines_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("images")).unwrap();
    png(&dir.path().join("images/a.png"), 200, 100, 10);
    for k in 0..16u8 {
        png(
            &dir.path().join(format!("images/b{k}.png")),
            200,
            100,
            20 + k,
        );
    }
    std::fs::copy(
        dir.path().join("images/a.png"),
        dir.path().join("images/a-copy.png"),
    )
    .unwrap();
    std::fs::write(dir.path().join("images/broken.png"), "not an image at all").unwrap();
    let good = r#"{"image": "images/a.png", "violations": [{"description": "作业人员未佩戴安全帽", "rule": "《安全作业规程》第3.1条", "risk": "高风险", "suggestion": "立即佩戴安全帽", "box": [10, 10, 60, 90]}]}"#;
    // Each record its own photo, so that only line 13 repeats one.
    let next = std::cell::Cell::new(0);
    let image = || {
        next.set(next.get() + 1);
        format!("images/b{}.png", next.get())
    };
    let v = |desc: &str, rule: &str, risk: &str, bbox: &str| {
        format!(
            r#"{{"image": "{}", "violations": [{{"description": "{desc}", "rule": "{rule}", "risk": "{risk}", "box": {bbox}}}]}}"#,
            image()
        )
    };
    let lines = [
        good.to_string(),                                                  // 1 ok
        r#"{"image": "images/b0.png", "violations": []}"#.to_string(),     // 2 ok, safe
        r#"{"image": "images/b0.png", "violations": [ "#.to_string(),      // 3 JSON
        r#"{"image": "images/b15.png"}"#.to_string(),                      // 4 missing field
        r#"{"image": "images/nope.png", "violations": []}"#.to_string(),   // 5 missing image
        r#"{"image": "images/broken.png", "violations": []}"#.to_string(), // 6 corrupt image
        v(
            "未穿反光背心",
            "《安全做业规程》第3.2条",
            "中",
            "[1, 1, 50, 50]",
        ), // 7 unknown rule
        v(
            "未穿反光背心",
            "《安全作业规程》第3.2条",
            "危险",
            "[1, 1, 50, 50]",
        ), // 8 risk
        v(
            "未穿反光背心",
            "《安全作业规程》第3.2条",
            "中",
            "[150, 10, 250, 90]",
        ), // 9 outside
        v(
            "未穿反光背心",
            "《安全作业规程》第3.2条",
            "中",
            "[60, 10, 20, 90]",
        ), // 10 inverted
        v(
            "未穿反光背心",
            "《安全作业规程》第3.2条",
            "中",
            "[20, 10, 20, 90]",
        ), // 11 empty
        v("  ", "《安全作业规程》第3.2条", "low", "[1, 1, 50, 50]"),       // 12 description
        good.replace("images/a.png", "images/a-copy.png"),                 // 13 duplicate (warning)
        String::new(),                                                     // blank: skipped
        v("通道堆放杂物", "现场管理标准 2.2", "L", "null"),                // 15 ok, no box
    ];
    let file = dir.path().join("annotations.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let report = validate_file(&file, &rules()).unwrap();
    assert_eq!(report.records, 14);
    let got: Vec<(usize, &str)> = report
        .errors
        .iter()
        .map(|p| (p.line, p.field.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (3, ""),
            (4, "violations"),
            (5, "image"),
            (6, "image"),
            (7, "violations[0].rule"),
            (8, "violations[0].risk"),
            (9, "violations[0].box"),
            (10, "violations[0].box"),
            (11, "violations[0].box"),
            (12, "violations[0].description"),
        ],
        "{:#?}",
        report.errors
    );
    let msg = |line: usize| -> &Problem { report.errors.iter().find(|p| p.line == line).unwrap() };
    assert!(msg(3).message.contains("not valid JSON"));
    assert!(msg(5).message.contains("nope.png"));
    assert!(msg(6).message.contains("not a readable image"));
    assert!(
        msg(7)
            .message
            .contains("did you mean 《安全作业规程》第3.2条"),
        "{}",
        msg(7).message
    );
    assert!(msg(9).message.contains("outside the 200×100 image"));
    assert!(msg(10).message.contains("inverted"));
    assert!(msg(11).message.contains("empty box"));
    assert_eq!(report.warnings.len(), 1);
    assert_eq!(report.warnings[0].line, 13);
    assert!(
        report.warnings[0]
            .message
            .contains("same image bytes as line 1")
    );

    // Every other step refuses the file, with the same full report.
    match load_file(&file, &rules()) {
        Err(inspector_dataset::Error::Invalid { report: r, .. }) => assert_eq!(*r, report),
        other => panic!("{other:?}"),
    }
    // The good lines alone load, citations canonical and risks normalised.
    let good_lines: Vec<&str> = [1usize, 2, 13, 15]
        .iter()
        .map(|&l| lines[l - 1].as_str())
        .collect();
    std::fs::write(&file, good_lines.join("\n")).unwrap();
    let dataset = load_file(&file, &rules()).unwrap();
    let got: Vec<(usize, &str, Vec<&str>)> = dataset
        .records
        .iter()
        .map(|r| {
            (
                r.line,
                r.category.as_str(),
                r.annotation
                    .violations
                    .iter()
                    .map(|v| v.rule.as_str())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (1, "安全防护", vec!["《安全作业规程》第3.1条"]),
            (2, "safe", vec![]),
            (3, "安全防护", vec!["《安全作业规程》第3.1条"]),
            (4, "现场管理", vec!["《现场管理标准》第2.2条"]),
        ]
    );
    assert_eq!(
        dataset.records[3].annotation.violations[0].risk,
        inspector_core::Risk::Low
    );
    assert_eq!(dataset.records[0].size, (200, 100));
    assert_eq!(dataset.warnings.len(), 1);
}
