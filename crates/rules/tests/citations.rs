//! Citation resolution against the three example regulations: the forms people and models write.

use std::path::PathBuf;

use inspector_core::{
    Rule,
    citation::{Resolution, Unknown, resolve},
};
use inspector_rules::{Categorizer, extract_file};

fn rules() -> Vec<Rule> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/regulations");
    [
        "safety-operation.md",
        "site-management.txt",
        "electrical-safety.docx",
    ]
    .iter()
    .flat_map(|f| {
        extract_file(&dir.join(f), &Categorizer::default())
            .unwrap()
            .rules
    })
    .collect()
}

/// What a case should resolve to.
enum Want {
    Found(&'static str),
    Ambiguous(usize),
    UnknownDocument,
    UnknownClause,
    NoClause,
}

#[test]
fn citation_table() {
    use Want::*;
    let rules = rules();
    let cases: &[(&str, Want)] = &[
        ("《安全作业规程》第3.1条", Found("《安全作业规程》第3.1条")),
        ("安全作业规程 3.1", Found("《安全作业规程》第3.1条")),
        ("安全作业规程第三条", Found("《安全作业规程》第3条")),
        (
            "《安全作业规程》第３．１条",
            Found("《安全作业规程》第3.1条"),
        ),
        ("安全作业规程　３.１", Found("《安全作业规程》第3.1条")),
        (
            "《安全作业规程》第3.1条：进入作业区域必须佩戴安全帽",
            Found("《安全作业规程》第3.1条"),
        ),
        (
            "违反《安全作业规程》第 3.2 条",
            Found("《安全作业规程》第3.2条"),
        ),
        ("安全作业规程的第十六条", Found("《安全作业规程》第16条")),
        ("公司安全作业规程第七条", Found("《安全作业规程》第7条")),
        ("第3.4条", Found("《安全作业规程》第3.4条")),
        ("第12.2.1条", Found("《电气安全规程》第12.2.1条")),
        ("《电气安全规程》第十二条", Found("《电气安全规程》第12条")),
        ("电气安全规程第１９条", Found("《电气安全规程》第19条")),
        ("《现场管理标准》2.3.1", Found("《现场管理标准》第2.3.1条")),
        ("现场管理标准 第二条", Found("《现场管理标准》第2条")),
        ("第3.1条", Ambiguous(2)),
        ("第十二条", Ambiguous(2)),
        ("《不存在的规程》第3.1条", UnknownDocument),
        ("《安全作业规程》第99条", UnknownClause),
        ("《安全作业规程》第一百零三条", UnknownClause),
        ("第88.8条", UnknownClause),
        ("进入作业区域必须佩戴安全帽", NoClause),
        ("", NoClause),
    ];
    for (input, want) in cases {
        let got = resolve(input, &rules);
        match (want, &got) {
            (Found(citation), Resolution::Found(rule)) => {
                assert_eq!(rule.citation, *citation, "{input}")
            }
            (Ambiguous(n), Resolution::Ambiguous(c)) => assert_eq!(c.len(), *n, "{input}"),
            (UnknownDocument, Resolution::Unknown(Unknown::Document(_)))
            | (UnknownClause, Resolution::Unknown(Unknown::Clause { .. }))
            | (NoClause, Resolution::Unknown(Unknown::NoClause)) => {}
            _ => panic!("{input}: got {got:?}"),
        }
    }
}
