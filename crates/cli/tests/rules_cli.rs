//! The `inspector rules` commands, run as a user runs them: bad input gives a clear message
//! naming the file and a non-zero exit and leaves the database untouched; re-extraction
//! replaces without duplicating; export and show work.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use sha2::{Digest, Sha256};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn examples() -> Vec<PathBuf> {
    [
        "safety-operation.md",
        "site-management.txt",
        "electrical-safety.docx",
    ]
    .iter()
    .map(|f| repo().join("examples/regulations").join(f))
    .collect()
}

fn inspector(args: &[&str], db: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_inspector"))
        .args(args)
        .arg("--db")
        .arg(db)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn hash(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A database holding the three examples.
fn loaded_db(dir: &Path) -> PathBuf {
    let db = dir.join("inspector.db");
    let mut args = vec!["rules", "extract"];
    let files = examples();
    let names: Vec<&str> = files.iter().map(|p| p.to_str().unwrap()).collect();
    args.extend(names);
    let out = inspector(&args, &db);
    assert!(out.status.success(), "{}", stderr(&out));
    db
}

fn rule_count(db: &Path) -> usize {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("SELECT count(*) FROM rules", [], |r| r.get::<_, i64>(0))
        .unwrap() as usize
}

/// Runs `extract` on one bad file against a loaded database and checks the contract.
fn check_bad(file: &Path, expected_message: &str) {
    let dir = file.parent().unwrap();
    let db = loaded_db(dir);
    let before = hash(&db);
    let out = inspector(&["rules", "extract", file.to_str().unwrap()], &db);
    assert!(!out.status.success(), "must fail: {}", file.display());
    let err = stderr(&out);
    assert!(
        err.contains(&file.display().to_string()),
        "names the file: {err}"
    );
    assert!(
        err.contains(expected_message),
        "says `{expected_message}`: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(hash(&db), before, "database untouched");
    // And with no database yet, none is created.
    let fresh = dir.join("fresh.db");
    let out = inspector(&["rules", "extract", file.to_str().unwrap()], &fresh);
    assert!(!out.status.success());
    assert!(
        !fresh.exists(),
        "a failed extraction must not create a database"
    );
}

#[test]
fn bad_input_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    check_bad(&dir.path().join("missing.txt"), "cannot read");
}

#[test]
fn bad_input_directory() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("folder.md");
    std::fs::create_dir(&sub).unwrap();
    check_bad(&sub, "is a directory");
}

#[test]
fn bad_input_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("empty.txt");
    std::fs::write(&f, b"").unwrap();
    check_bad(&f, "is empty");
    let blank = dir.path().join("blank.md");
    std::fs::write(&blank, b"  \n\n\t\n").unwrap();
    check_bad(&blank, "is empty");
}

#[test]
fn bad_input_binary_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("garbage.txt");
    // Deterministic pseudo-random bytes.
    let mut x: u32 = 12345;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    std::fs::write(&f, bytes).unwrap();
    check_bad(&f, "not a text document");
}

#[test]
fn bad_input_pdf_without_text_layer() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("scan.pdf");
    std::fs::write(&f, pdf_without_text()).unwrap();
    check_bad(&f, "no text layer");
}

#[test]
fn bad_input_corrupt_docx() {
    let dir = tempfile::tempdir().unwrap();
    // The real example, cut in half: the zip's central directory is gone.
    let bytes = std::fs::read(repo().join("examples/regulations/electrical-safety.docx")).unwrap();
    let f = dir.path().join("broken.docx");
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    check_bad(&f, "not a valid .docx");
    // A zip that is not a Word document.
    let g = dir.path().join("notword.docx");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&g).unwrap());
    zip.start_file("hello.txt", zip::write::SimpleFileOptions::default())
        .unwrap();
    zip.write_all(b"hi").unwrap();
    zip.finish().unwrap();
    check_bad(&g, "word/document.xml");
}

#[test]
fn a_document_without_clauses_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("prose.txt");
    std::fs::write(&f, "这是一段普通的说明文字，没有任何条款编号。\n").unwrap();
    check_bad(&f, "no numbered clauses");
}

#[test]
fn one_bad_file_does_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("x.db");
    let missing = dir.path().join("missing.md");
    let good = &examples()[0];
    let out = inspector(
        &[
            "rules",
            "extract",
            missing.to_str().unwrap(),
            good.to_str().unwrap(),
        ],
        &db,
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("1 of 2 files could not be extracted"));
    assert_eq!(rule_count(&db), 26);
}

#[test]
fn re_extraction_replaces_and_never_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let db = loaded_db(dir.path());
    assert_eq!(rule_count(&db), 75);
    let again = loaded_db(dir.path());
    assert_eq!(rule_count(&again), 75);
    // A changed version of one document (same title) replaces its rules.
    let changed = dir.path().join("safety-v2.md");
    let text = std::fs::read_to_string(&examples()[0]).unwrap();
    let cut: String = text.split("## 第五章").next().unwrap().to_string();
    std::fs::write(&changed, cut).unwrap();
    let out = inspector(&["rules", "extract", changed.to_str().unwrap()], &db);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("replaced 26 rules"),
        "{}",
        stdout(&out)
    );
    let n = rule_count(&db);
    assert!(n < 75 && n > 49, "{n}");
}

#[test]
fn export_json_and_csv() {
    let dir = tempfile::tempdir().unwrap();
    let db = loaded_db(dir.path());
    let out_json = dir.path().join("rules.json");
    let out = inspector(
        &[
            "rules",
            "export",
            "--format",
            "json",
            "--out",
            out_json.to_str().unwrap(),
        ],
        &db,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out_json).unwrap()).unwrap();
    let rules = v["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 75);
    let r = rules
        .iter()
        .find(|r| r["citation"] == "《安全作业规程》第3.1条")
        .unwrap();
    for field in [
        "id",
        "document",
        "clause",
        "citation",
        "text",
        "categories",
        "parent",
        "source",
    ] {
        assert!(!r[field].is_null(), "field {field}");
    }
    assert_eq!(r["parent"], "3");
    assert_eq!(r["source"]["line_start"], 14);
    let out = inspector(&["rules", "export", "--format", "csv"], &db);
    let mut reader = csv::Reader::from_reader(out.stdout.as_slice());
    assert_eq!(reader.records().count(), 75);
}

#[test]
fn show_list_and_search() {
    let dir = tempfile::tempdir().unwrap();
    let db = loaded_db(dir.path());
    let out = inspector(&["rules", "show", "安全作业规程 3.1"], &db);
    assert!(out.status.success());
    assert!(stdout(&out).contains("进入作业区域必须佩戴安全帽"));
    let out = inspector(&["rules", "show", "第3.1条"], &db);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("ambiguous"));
    assert!(stderr(&out).contains("《现场管理标准》第3.1条"));
    let out = inspector(&["rules", "show", "《没有的规程》第1条"], &db);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown document"));
    let out = inspector(
        &[
            "rules",
            "list",
            "--doc",
            "电气安全规程",
            "--category",
            "操作规范",
        ],
        &db,
    );
    assert!(out.status.success());
    let lines = stdout(&out);
    assert!(lines.lines().count() > 3);
    assert!(
        lines
            .lines()
            .all(|l| l.starts_with("《电气安全规程》") && l.contains("操作规范"))
    );
    let out = inspector(&["rules", "search", "安全带"], &db);
    assert!(
        stdout(&out)
            .lines()
            .next()
            .unwrap()
            .starts_with("《安全作业规程》第9.1条")
    );
}

#[test]
fn a_fresh_database_gets_the_bundled_examples() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("new.db");
    let out = inspector(&["rules", "show", "《安全作业规程》第3.1条"], &db);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("loaded the 3 bundled example regulations"));
    assert_eq!(rule_count(&db), 75);
}

#[test]
fn categories_file_adds_a_category() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("cats.toml");
    std::fs::write(
        &toml,
        "[[category]]\nname = \"电气安全\"\nkeywords = [\"配电\", \"触电\", \"漏电\"]\n",
    )
    .unwrap();
    let db = dir.path().join("c.db");
    let file = examples()[2].clone();
    let out = inspector(
        &[
            "rules",
            "extract",
            file.to_str().unwrap(),
            "--categories",
            toml.to_str().unwrap(),
        ],
        &db,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = inspector(&["rules", "list", "--category", "电气安全"], &db);
    assert!(stdout(&out).lines().count() >= 5, "{}", stdout(&out));
    // A broken categories file stops before anything is written.
    std::fs::write(&toml, "[[category]]\nname = 3\n").unwrap();
    let db2 = dir.path().join("d.db");
    let out = inspector(
        &[
            "rules",
            "extract",
            file.to_str().unwrap(),
            "--categories",
            toml.to_str().unwrap(),
        ],
        &db2,
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cats.toml"));
    assert!(!db2.exists());
}

/// A one-page PDF with a grey rectangle and no text, like a scan without OCR.
fn pdf_without_text() -> Vec<u8> {
    use lopdf::{Document, Object, Stream, dictionary};
    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let content = doc.add_object(Stream::new(
        dictionary! {},
        b"0.5 g 50 50 200 300 re f\n".to_vec(),
    ));
    let page = doc.add_object(dictionary! {
        "Type" => "Page",
        "Parent" => pages_id,
        "Contents" => content,
        "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
    });
    doc.objects.insert(
        pages_id,
        Object::Dictionary(
            dictionary! { "Type" => "Pages", "Kids" => vec![page.into()], "Count" => 1 },
        ),
    );
    let catalog = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages_id });
    doc.trailer.set("Root", catalog);
    let mut out = Vec::new();
    doc.save_to(&mut out).unwrap();
    out
}

/// `--db` takes a PostgreSQL URL on the rules commands too: extraction lands there, listing and
/// search read it back as from SQLite, and a password in the URL is never printed.
#[test]
fn the_rules_commands_work_on_postgresql_and_hide_the_password() {
    let pg = inspector_store::testing::postgres();
    let url = pg.fresh_database();
    // Trust authentication ignores the password; it only has to stay out of every output.
    let with_password = url.replacen("postgres@", "postgres:s3cret-pw@", 1);
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_inspector"))
            .args(args)
            .args(["--db", &with_password])
            .output()
            .unwrap();
        let (o, e) = (stdout(&out), stderr(&out));
        assert!(!o.contains("s3cret") && !e.contains("s3cret"), "{o}{e}");
        (out.status.success(), o, e)
    };
    let (ok, _, e) = run(&["rules", "docs"]);
    assert!(ok, "{e}");
    let files = examples();
    let mut args = vec!["rules", "extract"];
    args.extend(files.iter().map(|p| p.to_str().unwrap()));
    let (ok, _, e) = run(&args);
    assert!(ok, "{e}");
    let (ok, listed, e) = run(&["rules", "list", "--json"]);
    assert!(ok, "{e}");
    let rules: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(rules["rules"].as_array().unwrap().len(), 26 + 24 + 25);
    let (ok, found, e) = run(&["rules", "search", "上锁挂牌"]);
    assert!(ok, "{e}");
    assert!(found.contains("《电气安全规程》第12条"), "{found}");
    // The same listing from a SQLite database.
    let dir = tempfile::tempdir().unwrap();
    let db = loaded_db(dir.path());
    let sqlite = inspector(&["rules", "list", "--json"], &db);
    assert_eq!(stdout(&sqlite), listed);
    // A server that cannot be reached is a clear error, password hidden.
    let unreachable = "postgres://me:s3cret-pw@127.0.0.1:1/none";
    let out = Command::new(env!("CARGO_BIN_EXE_inspector"))
        .args(["rules", "docs", "--db", unreachable])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("postgres://me@127.0.0.1:1/none") && !e.contains("s3cret"),
        "{e}"
    );
}
