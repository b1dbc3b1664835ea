//! `inspector dataset validate`: the JSON report, the exit code, and a clean file passing.

use std::process::Command;

fn validate(file: &std::path::Path, db: &std::path::Path, json: bool) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_inspector"));
    cmd.args(["dataset", "validate"])
        .arg(file)
        .arg("--db")
        .arg(db);
    if json {
        cmd.arg("--json");
    }
    cmd.output().unwrap()
}

#[test]
fn json_report_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    image::RgbImage::from_pixel(64, 48, image::Rgb([1, 2, 3]))
        .save(dir.path().join("a.png"))
        .unwrap();
    let db = dir.path().join("inspector.db");
    let file = dir.path().join("ann.jsonl");
    std::fs::write(
        &file,
        "{\"image\": \"a.png\", \"violations\": [{\"description\": \"未戴安全帽\", \"rule\": \"《安全作业规程》第3.1条\", \"risk\": \"high\", \"box\": [1, 1, 30, 40]}]}\n\
         {\"image\": \"a.png\", \"violations\": [{\"description\": \"未戴安全帽\", \"rule\": \"《安全作业规程》第99条\", \"risk\": \"高\"}]}\n",
    )
    .unwrap();
    let o = validate(&file, &db, true);
    assert!(!o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["records"], 2);
    assert_eq!(v["errors"][0]["line"], 2);
    assert_eq!(v["errors"][0]["field"], "violations[0].rule");
    assert_eq!(v["warnings"][0]["line"], 2, "the same photo twice");
    // The text form names file and line.
    let o = validate(&file, &db, false);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("ann.jsonl:2: error: violations[0].rule:"),
        "{text}"
    );
    // A clean file exits 0.
    std::fs::write(&file, "{\"image\": \"a.png\", \"violations\": []}\n").unwrap();
    assert!(validate(&file, &db, false).status.success());
    // A missing annotation file is a clear error.
    let o = validate(&dir.path().join("none.jsonl"), &db, false);
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("none.jsonl: cannot read")
    );
}

fn inspector(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_inspector"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// A small valid dataset in `dir`: photos under `photos/`, annotations in `ann.jsonl`.
fn small_dataset(dir: &std::path::Path) {
    std::fs::create_dir_all(dir.join("photos")).unwrap();
    let mut lines = Vec::new();
    for k in 0..12u8 {
        image::RgbImage::from_pixel(100 + k as u32, 80, image::Rgb([k * 9, 50, 60]))
            .save(dir.join(format!("photos/{k}.png")))
            .unwrap();
        lines.push(if k % 3 == 0 {
            format!(r#"{{"image": "photos/{k}.png", "violations": []}}"#)
        } else {
            format!(
                r#"{{"image": "photos/{k}.png", "violations": [{{"description": "未戴安全帽", "rule": "安全作业规程 3.1", "risk": "高风险", "box": [10, 8, 50, 40]}}]}}"#
            )
        });
    }
    std::fs::write(dir.join("ann.jsonl"), lines.join("\n") + "\n").unwrap();
}

fn ok(o: &std::process::Output) {
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn build_writes_the_canonical_conversations() {
    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    let o = inspector(
        &[
            "dataset",
            "build",
            "ann.jsonl",
            "--out",
            "out/samples.jsonl",
            "--db",
            "x.db",
        ],
        dir.path(),
    );
    ok(&o);
    let text = std::fs::read_to_string(dir.path().join("out/samples.jsonl")).unwrap();
    let samples: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 12);
    let s = &samples[1];
    assert_eq!(
        s["messages"][0]["content"],
        format!("<image>{}", inspector_core::answer::INSTRUCTION)
    );
    // Boxes on the 0–1000 scale, citations canonical, risks normalised.
    assert_eq!(
        s["messages"][1]["content"],
        r#"{"status":"violation","violations":[{"description":"未戴安全帽","rule":"《安全作业规程》第3.1条","risk":"高","box":[99,100,495,500]}]}"#
    );
    assert_eq!(
        samples[0]["messages"][1]["content"],
        r#"{"status":"safe","violations":[]}"#
    );
    // Image paths are valid from the output file's folder.
    for s in &samples {
        let image = s["images"][0].as_str().unwrap();
        assert!(dir.path().join("out").join(image).is_file(), "{image}");
    }
}

#[test]
fn split_paths_are_valid_from_the_output_folder() {
    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    let o = inspector(
        &[
            "dataset",
            "split",
            "ann.jsonl",
            "--eval-ratio",
            "0.25",
            "--seed",
            "5",
            "--out-dir",
            "splits/a",
            "--db",
            "x.db",
        ],
        dir.path(),
    );
    ok(&o);
    let mut n = 0;
    for side in ["train.jsonl", "eval.jsonl"] {
        let text = std::fs::read_to_string(dir.path().join("splits/a").join(side)).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(
                dir.path()
                    .join("splits/a")
                    .join(v["image"].as_str().unwrap())
                    .is_file()
            );
            n += 1;
        }
    }
    assert_eq!(n, 12);
    // And they validate where they are.
    for side in ["train.jsonl", "eval.jsonl"] {
        ok(&inspector(
            &[
                "dataset",
                "validate",
                &format!("splits/a/{side}"),
                "--db",
                "x.db",
            ],
            dir.path(),
        ));
    }
    let stats = inspector(
        &["dataset", "stats", "ann.jsonl", "--json", "--db", "x.db"],
        dir.path(),
    );
    ok(&stats);
    let v: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(
        (v["records"].as_u64(), v["safe"].as_u64()),
        (Some(12), Some(4))
    );
    assert_eq!(v["categories"]["安全防护"], 8);
    assert_eq!(v["risks"]["高"], 8);
}

/// Each command refuses a file with a bad line: non-zero exit, the line named, and no output
/// written (an existing output is left as it was).
#[test]
fn bad_input_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    let mut text = std::fs::read_to_string(dir.path().join("ann.jsonl")).unwrap();
    text.push_str(r#"{"image": "photos/1.png", "violations": [{"description": "x", "rule": "《安全作业规程》第3.1条", "risk": "高", "box": [50, 50, 9999, 60]}]}"#);
    text.push('\n');
    std::fs::write(dir.path().join("bad.jsonl"), &text).unwrap();
    std::fs::write(dir.path().join("old.jsonl"), "OLD").unwrap();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["dataset", "build", "bad.jsonl", "--out", "old.jsonl"],
            vec![],
        ),
        (
            vec!["dataset", "build", "bad.jsonl", "--out", "new.jsonl"],
            vec!["new.jsonl"],
        ),
        (
            vec!["dataset", "split", "bad.jsonl", "--out-dir", "sp"],
            vec!["sp/train.jsonl", "sp/eval.jsonl"],
        ),
        (
            vec!["dataset", "augment", "bad.jsonl", "--out-dir", "aug"],
            vec!["aug/annotations.jsonl", "aug/manifest.jsonl", "aug/images"],
        ),
        (
            vec![
                "dataset",
                "export",
                "bad.jsonl",
                "--format",
                "swift",
                "--out-dir",
                "ex",
            ],
            vec!["ex/safety_inspector.jsonl", "ex/images"],
        ),
        (vec!["dataset", "stats", "bad.jsonl"], vec![]),
    ];
    for (args, outputs) in cases {
        let mut args = args.clone();
        args.extend(["--db", "x.db"]);
        let o = inspector(&args, dir.path());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            err.contains("bad.jsonl:13: error: violations[0].box:"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        for out in outputs {
            assert!(!dir.path().join(out).exists(), "{args:?} wrote {out}");
        }
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("old.jsonl")).unwrap(),
        "OLD"
    );

    // Import: a bad entry refuses the whole file; every bad entry is named.
    std::fs::write(
        dir.path().join("lf.json"),
        r#"[{"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "{\"status\":\"safe\",\"violations\":[]}"}], "images": ["photos/0.png"]},
            {"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "不知道"}], "images": ["photos/1.png"]},
            {"messages": [], "images": ["photos/nope.png"]}]"#,
    )
    .unwrap();
    let o = inspector(
        &[
            "dataset",
            "import",
            "lf.json",
            "--format",
            "llamafactory",
            "--out",
            "old.jsonl",
        ],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("lf.json:2: error: answer:"), "{err}");
    assert!(err.contains("lf.json:3: error: messages:"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("old.jsonl")).unwrap(),
        "OLD"
    );
    let o = inspector(
        &[
            "dataset", "import", "lf.json", "--format", "nonsense", "--out", "x.jsonl",
        ],
        dir.path(),
    );
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("unknown format"));
}
