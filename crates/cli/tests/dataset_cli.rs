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
