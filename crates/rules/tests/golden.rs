//! Golden tests over the bundled example regulations: every numbered unit is found, with the
//! right parent, exactly once. The `.expected.tsv` lists were written by hand from the
//! documents; the `.rules.txt` snapshots record everything else (text, categories, lines) and
//! are refreshed with `UPDATE_EXPECT=1`.

use std::path::PathBuf;

use inspector_rules::{Categorizer, Document, extract_file};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn expected(stem: &str) -> (String, Vec<(String, Option<String>)>) {
    let path = repo().join(format!("crates/rules/tests/golden/{stem}.expected.tsv"));
    let text = std::fs::read_to_string(&path).unwrap();
    let mut title = String::new();
    let mut units = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (a, b) = line.split_once('\t').unwrap();
        if a == "# title" {
            title = b.to_string();
        } else {
            units.push((a.to_string(), (b != "-").then(|| b.to_string())));
        }
    }
    (title, units)
}

/// A readable dump of every field that matters, one rule per block.
fn render(doc: &Document) -> String {
    let mut out = format!("title: {}\n", doc.title);
    for d in &doc.diagnostics {
        out.push_str(&format!("diagnostic: {d}\n"));
    }
    for r in &doc.rules {
        out.push_str(&format!(
            "\n{} parent={} lines={}-{} categories={}\n  chapter: {}\n",
            r.citation,
            r.parent.as_deref().unwrap_or("-"),
            r.source.line_start,
            r.source.line_end,
            r.categories.join(","),
            r.chapter.as_deref().unwrap_or("-"),
        ));
        for line in r.text.lines() {
            out.push_str(&format!("  | {line}\n"));
        }
    }
    out
}

fn check(file: &str, stem: &str) {
    let doc = extract_file(
        &repo().join("examples/regulations").join(file),
        &Categorizer::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (title, units) = expected(stem);
    assert_eq!(doc.title, title);
    let got: Vec<(String, Option<String>)> = doc
        .rules
        .iter()
        .map(|r| (r.clause.clone(), r.parent.clone()))
        .collect();
    assert_eq!(got, units, "clauses and parents of {file}");
    assert!(doc.diagnostics.is_empty(), "{:?}", doc.diagnostics);
    // Nothing counted twice: ids are unique and no rule's text holds another rule's heading.
    let mut ids: Vec<&str> = doc.rules.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), doc.rules.len());
    for r in &doc.rules {
        assert!(!r.text.trim().is_empty(), "{} has no text", r.citation);
        for other in doc
            .rules
            .iter()
            .filter(|o| o.parent.as_deref() == Some(r.clause.as_str()))
        {
            assert!(
                !r.text.contains(&other.text),
                "{} repeats the text of its sub-clause {}",
                r.citation,
                other.clause
            );
        }
    }
    expect_test::expect_file![repo().join(format!("crates/rules/tests/golden/{stem}.rules.txt"))]
        .assert_eq(&render(&doc));
}

#[test]
fn safety_operation_markdown() {
    check("safety-operation.md", "safety-operation");
}

#[test]
fn site_management_gb18030() {
    check("site-management.txt", "site-management");
}

#[test]
fn electrical_safety_docx() {
    check("electrical-safety.docx", "electrical-safety");
}

#[test]
fn list_items_stay_inside_their_clause() {
    let doc = extract_file(
        &repo().join("examples/regulations/safety-operation.md"),
        &Categorizer::default(),
    )
    .unwrap();
    let six = doc.rules.iter().find(|r| r.clause == "6").unwrap();
    assert_eq!(six.text.lines().count(), 4, "{}", six.text);
    assert!(six.text.contains("（三）"));
}
