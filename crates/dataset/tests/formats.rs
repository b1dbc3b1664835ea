//! Round trips between tools: import → export → import keeps every violation, rule and risk,
//! and every box within one unit of the 0–1000 scale.

use std::path::Path;

use common::{RED, photo, rules, write_lines};
use inspector_core::{Annotation, Risk, Violation, answer::box_to_scale};
use inspector_dataset::{
    formats::{Format, export, import},
    load_file,
};

mod common;

/// Photos of several sizes (odd ones included, so that pixel ↔ 0–1000 rounding is
/// exercised) with boxes, a safe photo, and a violation without a box.
fn dataset(dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("photos")).unwrap();
    let sizes = [(640, 480), (333, 517), (1001, 99), (64, 64)];
    let mut lines = Vec::new();
    for (k, (w, h)) in sizes.into_iter().enumerate() {
        photo(w, h, k as u32, &[([1, 1, 20, 20], RED)])
            .save(dir.join(format!("photos/{k}.png")))
            .unwrap();
        let a = Annotation {
            image: format!("photos/{k}.png"),
            violations: vec![
                Violation {
                    description: "作业人员未佩戴安全帽".into(),
                    rule: "《安全作业规程》第3.1条".into(),
                    risk: Risk::High,
                    suggestion: Some("立即佩戴合格安全帽".into()),
                    bbox: Some([
                        w as f64 * 0.1234,
                        h as f64 * 0.0567,
                        w as f64 * 0.777,
                        h as f64 * 0.999,
                    ]),
                },
                Violation {
                    description: "通道堆放杂物".into(),
                    rule: "《现场管理标准》第2.2条".into(),
                    risk: Risk::Low,
                    suggestion: None,
                    bbox: if k == 2 {
                        None
                    } else {
                        Some([0.0, 0.0, w as f64, h as f64])
                    },
                },
            ],
        };
        lines.push(serde_json::to_string(&a).unwrap());
    }
    photo(100, 80, 7, &[])
        .save(dir.join("photos/safe.png"))
        .unwrap();
    lines.push(r#"{"image": "photos/safe.png", "violations": []}"#.into());
    write_lines(dir, "annotations.jsonl", &lines)
}

/// Compares two annotation files record by record: same violations, rules, risks, texts;
/// boxes within one unit on the 0–1000 scale of their image.
fn assert_same(a: &Path, b: &Path) {
    let (a, b) = (
        load_file(a, &rules()).unwrap(),
        load_file(b, &rules()).unwrap(),
    );
    assert_eq!(a.records.len(), b.records.len());
    for (ra, rb) in a.records.iter().zip(&b.records) {
        assert_eq!(ra.sha256, rb.sha256, "the same photo");
        assert_eq!(
            ra.annotation.violations.len(),
            rb.annotation.violations.len()
        );
        for (va, vb) in ra
            .annotation
            .violations
            .iter()
            .zip(&rb.annotation.violations)
        {
            assert_eq!(
                (&va.description, &va.rule, va.risk, &va.suggestion),
                (&vb.description, &vb.rule, vb.risk, &vb.suggestion)
            );
            match (va.bbox, vb.bbox) {
                (None, None) => {}
                (Some(x), Some(y)) => {
                    let (x, y) = (box_to_scale(&x, ra.size), box_to_scale(&y, rb.size));
                    for k in 0..4 {
                        assert!(x[k].abs_diff(y[k]) <= 1, "{x:?} vs {y:?}");
                    }
                }
                other => panic!("box lost or invented: {other:?}"),
            }
        }
    }
}

fn round_trip(format: Format) {
    let dir = tempfile::tempdir().unwrap();
    let original = dataset(dir.path());
    let dataset0 = load_file(&original, &rules()).unwrap();

    // export → import → export → import
    let out1 = dir.path().join("export1");
    export(&dataset0, format, &out1).unwrap();
    let data1 = match format {
        Format::LlamaFactory => out1.join("safety_inspector.json"),
        _ => out1.join("safety_inspector.jsonl"),
    };
    let back1 = dir.path().join("back1");
    std::fs::create_dir(&back1).unwrap();
    let imported = import(&data1, format, &back1).unwrap();
    let file1 = write_lines(
        &back1,
        "annotations.jsonl",
        &imported
            .iter()
            .map(|a| serde_json::to_string(a).unwrap())
            .collect::<Vec<_>>(),
    );
    assert_same(&original, &file1);

    let out2 = dir.path().join("export2");
    export(&load_file(&file1, &rules()).unwrap(), format, &out2).unwrap();
    let data2 = out2.join(data1.file_name().unwrap());
    let imported2 = import(&data2, format, &out2).unwrap();
    let file2 = write_lines(
        &out2,
        "annotations.jsonl",
        &imported2
            .iter()
            .map(|a| serde_json::to_string(a).unwrap())
            .collect::<Vec<_>>(),
    );
    assert_same(&original, &file2);
    if format == Format::LlamaFactory {
        // Two exports of the same data are the same conversations.
        assert_eq!(
            std::fs::read(&data1).unwrap(),
            std::fs::read(&data2).unwrap()
        );
        let info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out1.join("dataset_info.json")).unwrap())
                .unwrap();
        assert_eq!(
            info["safety_inspector"]["file_name"],
            "safety_inspector.json"
        );
        assert_eq!(info["safety_inspector"]["columns"]["images"], "images");
    }
}

#[test]
fn llamafactory_round_trip() {
    round_trip(Format::LlamaFactory);
}

#[test]
fn swift_round_trip() {
    round_trip(Format::Swift);
}

#[test]
fn dataset_info_keeps_other_entries() {
    let dir = tempfile::tempdir().unwrap();
    let original = dataset(dir.path());
    let out = dir.path().join("lf");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(
        out.join("dataset_info.json"),
        r#"{"alpaca_zh": {"file_name": "alpaca.json"}}"#,
    )
    .unwrap();
    export(
        &load_file(&original, &rules()).unwrap(),
        Format::LlamaFactory,
        &out,
    )
    .unwrap();
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("dataset_info.json")).unwrap()).unwrap();
    assert_eq!(info["alpaca_zh"]["file_name"], "alpaca.json");
    assert_eq!(info["safety_inspector"]["formatting"], "sharegpt");
}

/// The tutorial's article format: a JSON array with ShareGPT turns whose answer is the
/// numbered Chinese list. It has no boxes; everything else survives article → ours →
/// LLaMA-Factory → ours.
#[test]
fn article_import_and_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let article = serde_json::json!([
        {
            "image": "photos/0.png",
            "conversations": [
                {"from": "human", "value": "<image>请分析这张图片中的安全违规行为"},
                {"from": "gpt", "value": "根据制造业安全规章制度分析,发现以下问题:\n1. 作业人员未佩戴安全帽,头部缺乏有效防护\n   违反规定:《安全作业规程》第3.1条:进入作业区域必须佩戴安全帽\n   风险等级:高风险\n   改进建议:立即佩戴合格安全帽\n2. 通道堆放杂物\n   违反规定：《现场管理标准》第2.2条\n   风险等级：低风险"}
            ]
        },
        {
            "image": "photos/safe.png",
            "conversations": [
                {"from": "human", "value": "<image>请分析这张图片中的安全违规行为"},
                {"from": "assistant", "value": "经检查，未发现明显违规行为。"}
            ]
        }
    ]);
    let file = dir.path().join("article.json");
    std::fs::write(&file, serde_json::to_string_pretty(&article).unwrap()).unwrap();
    let ours = dir.path().join("ours");
    std::fs::create_dir(&ours).unwrap();
    let imported = import(&file, Format::Article, &ours).unwrap();
    assert_eq!(imported.len(), 2);
    assert_eq!(imported[0].image, "../photos/0.png");
    let v = &imported[0].violations;
    assert_eq!(v.len(), 2);
    assert_eq!(
        (
            v[0].description.as_str(),
            v[0].rule.as_str(),
            v[0].risk,
            v[0].suggestion.as_deref()
        ),
        (
            "作业人员未佩戴安全帽,头部缺乏有效防护",
            "《安全作业规程》第3.1条",
            Risk::High,
            Some("立即佩戴合格安全帽")
        )
    );
    assert_eq!(
        (v[1].rule.as_str(), v[1].risk, v[1].suggestion.as_deref()),
        ("《现场管理标准》第2.2条", Risk::Low, None)
    );
    assert!(imported[1].violations.is_empty());

    let file1 = write_lines(
        &ours,
        "annotations.jsonl",
        &imported
            .iter()
            .map(|a| serde_json::to_string(a).unwrap())
            .collect::<Vec<_>>(),
    );
    let lf = dir.path().join("lf");
    export(
        &load_file(&file1, &rules()).unwrap(),
        Format::LlamaFactory,
        &lf,
    )
    .unwrap();
    let back = import(&lf.join("safety_inspector.json"), Format::LlamaFactory, &lf).unwrap();
    let file2 = write_lines(
        &lf,
        "annotations.jsonl",
        &back
            .iter()
            .map(|a| serde_json::to_string(a).unwrap())
            .collect::<Vec<_>>(),
    );
    assert_same(&file1, &file2);
}

#[test]
fn bad_entries_are_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let lines = [
        r#"{"messages": [{"role": "user", "content": "<image>看图"}, {"role": "assistant", "content": "{\"status\":\"safe\",\"violations\":[]}"}], "images": ["photos/0.png"]}"#,
        r#"{"messages": [{"role": "user", "content": "<image>看图"}], "images": ["photos/0.png"]}"#,
        r#"{"messages": [{"role": "user", "content": "<image>看图"}, {"role": "assistant", "content": "图中是一台机器。"}], "images": ["photos/0.png"]}"#,
        r#"{"messages": [{"role": "user", "content": "<image>看图"}, {"role": "assistant", "content": "{\"status\":\"safe\",\"violations\":[]}"}], "images": ["photos/0.png", "photos/1.png"]}"#,
        r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "{\"status\":\"violation\",\"violations\":[{\"description\":\"a\",\"rule\":\"b\",\"risk\":\"高\",\"box\":[1,2,3,4]}]}"}], "images": ["photos/missing.png"]}"#,
        r#"{not json"#,
        r#"{"messages": [{"role": "user", "content": "<image>看图"}, {"role": "assistant", "content": "1. 未戴安全帽\n违反规定：《安全作业规程》第3.1条\n风险等级：危险"}], "images": ["photos/0.png"]}"#,
    ];
    let file = write_lines(dir.path(), "swift.jsonl", &lines.map(String::from));
    let err = import(&file, Format::Swift, dir.path()).unwrap_err();
    let inspector_dataset::Error::Invalid { report, .. } = err else {
        panic!("{err}")
    };
    let got: Vec<(usize, &str)> = report
        .errors
        .iter()
        .map(|p| (p.line, p.field.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (2, "messages"),
            (3, "answer"),
            (4, "images"),
            (5, "answer"),
            (6, ""),
            (7, "answer")
        ],
        "{:#?}",
        report.errors
    );
    assert!(
        report.errors[3].message.contains("missing.png"),
        "{}",
        report.errors[3].message
    );
    assert!(
        report.errors[5]
            .message
            .contains("`危险` is not a risk level")
    );
}
