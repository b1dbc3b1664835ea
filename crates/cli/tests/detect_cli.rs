//! `inspector detect` and `inspector eval` end to end on the tiny checkpoint with the
//! overfitted adapter of the training tests (its eight photos, so the answers parse and carry
//! boxes), and the HTML report in headless Chromium.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn inspector(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_inspector"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// The overfit photos and gold annotations, plus one broken photo, in a fresh folder.
fn setup(dir: &Path) {
    let data = root().join("crates/train/tests/fixtures/overfit/data");
    std::fs::create_dir(dir.join("photos")).unwrap();
    for e in std::fs::read_dir(&data).unwrap() {
        let p = e.unwrap().path();
        let to = if p.extension().is_some_and(|e| e == "png") {
            dir.join("photos").join(p.file_name().unwrap())
        } else {
            dir.join("photos/gold.jsonl")
        };
        std::fs::copy(&p, to).unwrap();
    }
    std::fs::write(
        dir.join("photos/broken.jpg"),
        b"\xff\xd8\xff\xe0 not a jpeg",
    )
    .unwrap();
}

fn detect(dir: &Path, extra: &[&str]) -> Output {
    let tiny = root().join("crates/qwen2vl/tests/fixtures/tiny-a");
    let adapter = root().join("crates/train/tests/fixtures/overfit/adapter");
    let mut args = vec![
        "detect",
        "photos",
        "--model",
        tiny.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--db",
        "inspector.db",
    ];
    args.extend(extra);
    inspector(&args, dir)
}

#[test]
fn detect_writes_report_jsonl_csv_html_and_eval_scores_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let o = detect(
        dir,
        &[
            "--jsonl",
            "out/pred.jsonl",
            "--csv",
            "out/report.csv",
            "--html",
            "out/report.html",
        ],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    // The broken photo is reported in its own row; the run goes on; the status says so.
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("9 photos: 8 inspected"), "{stderr}");
    assert!(
        stdout.contains("图片：photos/broken.jpg") && stdout.contains("无法检查"),
        "{stdout}"
    );
    // The Chinese report: a safe photo and a violation with its rule text and risk.
    assert!(stdout.contains("结论：未发现明显违规行为。"), "{stdout}");
    assert!(
        stdout.contains("违反规定：《安全作业规程》第3.2条：在车间内作业"),
        "{stdout}"
    );
    assert!(stdout.contains("风险等级：中风险"), "{stdout}");

    let jsonl = std::fs::read_to_string(dir.join("out/pred.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 9);
    assert_eq!(
        lines[1]["image"], "../photos/1.png",
        "relative to the JSONL's folder"
    );
    assert_eq!(lines[1]["finding"]["violations"][0]["verified"], true);
    assert!(lines[8]["error"].as_str().unwrap().contains("broken.jpg"));

    let csv = std::fs::read_to_string(dir.join("out/report.csv")).unwrap();
    assert!(csv.starts_with("image,status,violation,description,rule,verified"));
    assert!(
        csv.contains("photos/1.png,violation,1,未戴安全帽,《安全作业规程》第3.2条,true"),
        "{csv}"
    );
    assert!(csv.contains("photos/0.png,safe,"));
    assert!(csv.contains("photos/broken.jpg,error,"));

    let html = std::fs::read_to_string(dir.join("out/report.html")).unwrap();
    assert!(html.contains("data:image/png;base64,"));
    assert_eq!(
        html.matches("<rect class=\"box").count(),
        4,
        "one box per violation"
    );
    assert!(
        !html.contains("http://") || html.matches("http://").count() == 8,
        "nothing external but the SVG namespace"
    );

    // The second run answers every photo from the cache.
    let again = detect(dir, &["--json"]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("8 inspected (8 from the cache)"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 9);
    // --no-cache does the model work again.
    let fresh = detect(dir, &["--no-cache", "--json"]);
    assert!(String::from_utf8_lossy(&fresh.stderr).contains("8 inspected (0 from the cache)"));

    // eval reads the predictions back and scores them against the gold file.
    let o = inspector(
        &[
            "eval",
            "--data",
            "photos/gold.jsonl",
            "--predictions",
            "out/pred.jsonl",
            "--db",
            "inspector.db",
            "--json",
            "--out",
            "eval",
        ],
        dir,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["binary"]["f1"], 1.0);
    assert_eq!(r["citation_accuracy"], 1.0);
    assert_eq!(r["box"]["recall"], 1.0);
    assert_eq!(r["per_rule"].as_object().unwrap().len(), 4);
    assert_eq!(r["missing"], 0);
    for f in ["report.json", "images.csv", "precision_recall.png"] {
        assert!(dir.join("eval").join(f).exists(), "{f}");
    }
    // A raw-answer prediction file works too, and a malformed line is refused by line number.
    std::fs::write(
        dir.join("raw.jsonl"),
        "{\"image\": \"photos/0.png\", \"answer\": \"{\\\"status\\\": \\\"safe\\\", \\\"violations\\\": []}\"}\n{\"image\": \"photos/1.png\", \"answer\": \"看不懂\"}\n",
    )
    .unwrap();
    let o = inspector(
        &[
            "eval",
            "--data",
            "photos/gold.jsonl",
            "--predictions",
            "raw.jsonl",
            "--db",
            "inspector.db",
            "--json",
        ],
        dir,
    );
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["unparsed"], 1);
    assert_eq!(r["missing"], 6);
    std::fs::write(
        dir.join("bad.jsonl"),
        "{\"image\": \"photos/0.png\"}\nnot json\n",
    )
    .unwrap();
    let o = inspector(
        &[
            "eval",
            "--data",
            "photos/gold.jsonl",
            "--predictions",
            "bad.jsonl",
            "--db",
            "inspector.db",
        ],
        dir,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("bad.jsonl:1") && err.contains("bad.jsonl:2"),
        "{err}"
    );
}

/// Renders the HTML report in headless Chromium (Debian's `chromium`; `.ci/run` installs it)
/// and keeps the screenshot in `target/test-artifacts/detect-report.png`; the boxes' colours
/// must be on it. Run: `cargo test -p inspector-cli --test detect_cli -- --ignored`.
#[test]
#[ignore = "needs chromium (installed by .ci/run)"]
fn the_html_report_renders_with_boxes_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    detect(dir, &["--html", "report.html", "--no-cache"]);
    let artifacts = root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("detect-report.png");
    let _ = std::fs::remove_file(&shot);
    let o = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1100,4600",
            &format!("--screenshot={}", shot.display()),
        ])
        .arg(dir.join("report.html"))
        .output()
        .expect("chromium runs");
    assert!(shot.exists(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&shot).unwrap().to_rgb8();
    // Box outlines and number tags in the medium (#fb8c00) and low (#fdd835) risk colours,
    // which none of the photos has.
    let near = |p: &image::Rgb<u8>, c: [u8; 3]| {
        p.0.iter()
            .zip(c)
            .all(|(a, b)| (*a as i32 - b as i32).abs() < 12)
    };
    let orange = img.pixels().filter(|p| near(p, [0xfb, 0x8c, 0x00])).count();
    let yellow = img.pixels().filter(|p| near(p, [0xfd, 0xd8, 0x35])).count();
    assert!(
        orange > 200 && yellow > 200,
        "box colours on the screenshot: orange {orange}, yellow {yellow}"
    );
    eprintln!("screenshot: {}", shot.display());
}

#[test]
fn active_ranks_photos_and_exports_drafts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    std::fs::remove_file(dir.join("photos/broken.jpg")).unwrap();
    let tiny = root().join("crates/qwen2vl/tests/fixtures/tiny-a");
    let adapter = root().join("crates/train/tests/fixtures/overfit/adapter");
    let o = inspector(
        &[
            "active",
            "--images",
            "photos",
            "--model",
            tiny.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--db",
            "inspector.db",
            "--budget",
            "3",
            "--samples",
            "2",
            "--export",
            "queue/next.jsonl",
            "--json",
        ],
        dir,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ranked: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ranked.len(), 3);
    let scores: Vec<f64> = ranked
        .iter()
        .map(|r| r["uncertainty"]["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    let queue = std::fs::read_to_string(dir.join("queue/next.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(queue.lines().next().unwrap()).unwrap();
    assert_eq!(first["draft"], true);
    assert!(first["image"].as_str().unwrap().starts_with("../photos/"));
    assert_eq!(queue.lines().count(), 3);
}

#[test]
fn eval_runs_the_model_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let tiny = root().join("crates/qwen2vl/tests/fixtures/tiny-a");
    let adapter = root().join("crates/train/tests/fixtures/overfit/adapter");
    let o = inspector(
        &[
            "eval",
            "--data",
            "photos/gold.jsonl",
            "--model",
            tiny.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--db",
            "inspector.db",
            "--json",
        ],
        dir,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["images"], 8);
    assert_eq!(r["binary"]["f1"], 1.0);
    assert_eq!(r["citation_accuracy"], 1.0);
    // A model run carries scores, so AP50 is computed (pycocotools gives 1 − 2⁻⁵² here).
    assert!((r["box"]["ap50"].as_f64().unwrap() - 1.0).abs() < 1e-9);
}
