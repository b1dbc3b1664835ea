//! The GB18030, .docx and PDF twins of a document extract the same rules as its UTF-8 text
//! (compared without `source`, whose line numbers belong to each format's own text).

mod common;

use std::path::PathBuf;

use inspector_core::Rule;
use inspector_rules::{Categorizer, extract_bytes};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn without_source(rules: &[Rule]) -> Vec<Rule> {
    rules
        .iter()
        .cloned()
        .map(|mut r| {
            r.source = Default::default();
            r
        })
        .collect()
}

fn check_twins(utf8_path: &str) {
    let text = std::fs::read_to_string(repo().join(utf8_path)).unwrap();
    let categorizer = Categorizer::default();
    let reference = extract_bytes("doc.md", text.as_bytes(), &categorizer).unwrap();
    assert!(reference.rules.len() >= 15);
    for (name, bytes) in [
        ("doc.txt", common::gb18030(&text)),
        ("doc.docx", common::docx(&text)),
        ("doc.pdf", common::pdf(&text)),
    ] {
        let twin = extract_bytes(name, &bytes, &categorizer).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(twin.title, reference.title, "{utf8_path} as {name}");
        assert_eq!(
            twin.diagnostics, reference.diagnostics,
            "{utf8_path} as {name}"
        );
        let (got, want) = (
            without_source(&twin.rules),
            without_source(&reference.rules),
        );
        assert_eq!(got.len(), want.len(), "{utf8_path} as {name}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w, "{utf8_path} as {name}");
        }
    }
}

#[test]
fn safety_operation_twins() {
    check_twins("examples/regulations/safety-operation.md");
}

#[test]
fn site_management_twins() {
    check_twins("crates/rules/tests/data/site-management.utf8.txt");
}

#[test]
fn electrical_safety_twins() {
    check_twins("crates/rules/tests/data/electrical-safety.utf8.md");
}

/// The committed GB18030 and .docx examples are the masters' twins too.
#[test]
fn committed_examples_match_their_masters() {
    let categorizer = Categorizer::default();
    for (example, master) in [
        (
            "examples/regulations/site-management.txt",
            "crates/rules/tests/data/site-management.utf8.txt",
        ),
        (
            "examples/regulations/electrical-safety.docx",
            "crates/rules/tests/data/electrical-safety.utf8.md",
        ),
    ] {
        let bytes = std::fs::read(repo().join(example)).unwrap();
        assert!(
            std::str::from_utf8(&bytes).is_err(),
            "{example} should not be UTF-8"
        );
        let a = extract_bytes(example, &bytes, &categorizer).unwrap();
        let text = std::fs::read(repo().join(master)).unwrap();
        let b = extract_bytes(master, &text, &categorizer).unwrap();
        assert_eq!(a.title, b.title);
        assert_eq!(
            without_source(&a.rules),
            without_source(&b.rules),
            "{example}"
        );
    }
}
