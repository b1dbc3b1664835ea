//! The reply parser on a table of what models write, and a time-bounded fuzz run.
//!
//! The fuzz run lasts `REPLY_FUZZ_SECS` seconds (default 3; the acceptance run uses 60):
//! `REPLY_FUZZ_SECS=60 cargo test --release -p inspector-core --test reply`.

use inspector_core::{
    Risk,
    reply::{ReplyFormat, ReplyStatus, parse_reply},
};

/// (name, reply text, status, violations, truncated, first rule, first risk, first box)
type Case = (
    &'static str,
    &'static str,
    ReplyStatus,
    usize,
    bool,
    Option<&'static str>,
    Option<Risk>,
    Option<[f64; 4]>,
);

use ReplyStatus::{Safe, Unparsed, Violation};

const CANON: &str = r#"{"status":"violation","violations":[{"description":"未戴安全帽","rule":"《安全作业规程》第3.1条","risk":"高","suggestion":"立即佩戴","box":[10,20,300,400]},{"description":"通道堆放杂物","rule":"《安全作业规程》第5.2条","risk":"中","box":[500,600,700,900]}]}"#;

fn cases() -> Vec<Case> {
    let b = Some([10.0, 20.0, 300.0, 400.0]);
    let r31 = Some("《安全作业规程》第3.1条");
    vec![
        (
            "canonical",
            CANON,
            Violation,
            2,
            false,
            r31,
            Some(Risk::High),
            b,
        ),
        (
            "canonical safe",
            r#"{"status":"safe","violations":[]}"#,
            Safe,
            0,
            false,
            None,
            None,
            None,
        ),
        (
            "spaced safe",
            "{ \"status\" : \"safe\" ,\n \"violations\" : [ ] }",
            Safe,
            0,
            false,
            None,
            None,
            None,
        ),
        (
            "fenced json",
            "```json\n{\"status\":\"safe\",\"violations\":[]}\n```",
            Safe,
            0,
            false,
            None,
            None,
            None,
        ),
        (
            "fenced plain",
            "```\n{\"status\":\"violation\",\"violations\":[{\"description\":\"未戴安全帽\",\"rule\":\"第3.1条\",\"risk\":\"高\"}]}\n```",
            Violation,
            1,
            false,
            Some("第3.1条"),
            Some(Risk::High),
            None,
        ),
        (
            "prose before",
            "好的，以下是检查结果：\n{\"status\":\"safe\",\"violations\":[]}",
            Safe,
            0,
            false,
            None,
            None,
            None,
        ),
        (
            "prose both sides",
            "分析如下 {\"status\":\"violation\",\"violations\":[{\"description\":\"x\",\"rule\":\"第3.1条\",\"risk\":\"低\"}]} 以上。",
            Violation,
            1,
            false,
            Some("第3.1条"),
            Some(Risk::Low),
            None,
        ),
        (
            "braces in prose first",
            "格式 {x} 如下：{\"status\":\"safe\",\"violations\":[]}",
            Safe,
            0,
            false,
            None,
            None,
            None,
        ),
        (
            "trailing commas",
            "{\"status\":\"violation\",\"violations\":[{\"description\":\"未戴安全帽\",\"rule\":\"第3.1条\",\"risk\":\"高\",\"box\":[10,20,300,400],},],}",
            Violation,
            1,
            false,
            Some("第3.1条"),
            Some(Risk::High),
            b,
        ),
        (
            "full-width colon and comma",
            "{\"status\"：\"violation\"，\"violations\"：[{\"description\"：\"未戴安全帽\"，\"rule\"：\"第3.1条\"，\"risk\"：\"高\"}]}",
            Violation,
            1,
            false,
            Some("第3.1条"),
            Some(Risk::High),
            None,
        ),
        (
            "braces inside strings",
            "{\"status\":\"violation\",\"violations\":[{\"description\":\"标志 {缺失} ]\",\"rule\":\"第3.1条\",\"risk\":\"中\"}]}",
            Violation,
            1,
            false,
            Some("第3.1条"),
            Some(Risk::Medium),
            None,
        ),
        (
            "escaped quote",
            "{\"status\":\"violation\",\"violations\":[{\"description\":\"写着\\\"危险\\\"\",\"rule\":\"第3.1条\",\"risk\":\"高\"}]}",
            Violation,
            1,
            false,
            Some("第3.1条"),
            Some(Risk::High),
            None,
        ),
        (
            "truncated mid second",
            &CANON[..CANON.len() - 40],
            Violation,
            1,
            true,
            r31,
            Some(Risk::High),
            b,
        ),
        (
            "truncated mid first",
            &CANON[..58],
            Violation,
            0,
            true,
            None,
            None,
            None,
        ),
        (
            "truncated after status safe",
            "{\"status\":\"safe\",\"violations\":[",
            Safe,
            0,
            true,
            None,
            None,
            None,
        ),
        (
            "truncated before list",
            "{\"status\":\"violation\",\"viol",
            Violation,
            0,
            true,
            None,
            None,
            None,
        ),
        (
            "truncated inside string",
            "{\"status\":\"violation\",\"violations\":[{\"description\":\"未戴安全帽\",\"rule\":\"第3.1条\",\"risk\":\"高\"},{\"description\":\"未穿",
            Violation,
            1,
            true,
            Some("第3.1条"),
            Some(Risk::High),
            None,
        ),
        (
            "risk synonym 高风险",
            "{\"status\":\"violation\",\"violations\":[{\"description\":\"x\",\"rule\":\"第3.1条\",\"risk\":\"高风险\"}]}",
            Violation,
            1,
            false,
            Some("第3.1条"),
            Some(Risk::High),
            None,
        ),
        (
            "risk synonym high",
            "{\"status\":\"violation\",\"violations\":[{\"description\":\"x\",\"rule\":\"第3.1条\",\"risk\":\"High\"}]}",
            Violation,
            1,
            false,
            Some("第3.1条"),
            Some(Risk::High),
            None,
        ),
        (
            "risk synonym 一般",
            "{\"status\":\"violation\",\"violations\":[{\"description\":\"x\",\"rule\":\"第3.1条\",\"risk\":\"一般\"}]}",
            Violation,
            1,
            false,
            Some("第3.1条"),
            Some(Risk::Medium),
            None,
        ),
        (
            "risk unknown",
            "{\"status\":\"violation\",\"violations\":[{\"description\":\"x\",\"rule\":\"第3.1条\",\"risk\":\"紫色\"}]}",
            Violation,
            1,
            false,
            Some("第3.1条"),
            None,
            None,
        ),
        (
            "hallucinated clause kept as written",
            "{\"status\":\"violation\",\"violations\":[{\"description\":\"x\",\"rule\":\"《不存在的规程》第99.9条\",\"risk\":\"高\"}]}",
            Violation,
            1,
            false,
            Some("《不存在的规程》第99.9条"),
            Some(Risk::High),
            None,
        ),
        (
            "box reversed and out of range",
            "{\"status\":\"violation\",\"violations\":[{\"description\":\"x\",\"rule\":\"第3.1条\",\"risk\":\"高\",\"box\":[300,400,10,1200]}]}",
            Violation,
            1,
            false,
            Some("第3.1条"),
            Some(Risk::High),
            Some([10.0, 400.0, 300.0, 1000.0]),
        ),
        (
            "box wrong arity",
            "{\"status\":\"violation\",\"violations\":[{\"description\":\"x\",\"rule\":\"第3.1条\",\"risk\":\"高\",\"box\":[1,2,3]}]}",
            Violation,
            1,
            false,
            Some("第3.1条"),
            Some(Risk::High),
            None,
        ),
        (
            "bbox_2d float strings",
            "{\"status\":\"violation\",\"violations\":[{\"description\":\"x\",\"rule\":\"第3.1条\",\"risk\":\"高\",\"bbox_2d\":[\"10\",\"20.5\",300,400]}]}",
            Violation,
            1,
            false,
            Some("第3.1条"),
            Some(Risk::High),
            Some([10.0, 20.5, 300.0, 400.0]),
        ),
        (
            "chinese keys",
            "{\"status\":\"violation\",\"violations\":[{\"描述\":\"未戴安全帽\",\"违反规定\":\"第3.1条\",\"风险等级\":\"高\"}]}",
            Violation,
            1,
            false,
            Some("第3.1条"),
            Some(Risk::High),
            None,
        ),
        (
            "no status, empty list",
            "{\"violations\":[]}",
            Safe,
            0,
            false,
            None,
            None,
            None,
        ),
        (
            "violation status, empty list",
            "{\"status\":\"violation\",\"violations\":[]}",
            Violation,
            0,
            false,
            None,
            None,
            None,
        ),
        (
            "safe status but a violation listed",
            "{\"status\":\"safe\",\"violations\":[{\"description\":\"x\",\"rule\":\"第3.1条\",\"risk\":\"低\"}]}",
            Violation,
            1,
            false,
            Some("第3.1条"),
            Some(Risk::Low),
            None,
        ),
        (
            "unrelated json",
            "{\"answer\": 42}",
            Unparsed,
            0,
            false,
            None,
            None,
            None,
        ),
        (
            "numbered list",
            "根据制造业安全规章制度分析，发现以下问题：\n1. 作业人员未佩戴安全帽\n   违反规定：《安全作业规程》第3.1条：进入作业区域必须佩戴安全帽\n   风险等级：高风险\n   改进建议：立即佩戴安全帽\n2. 通道堆放杂物\n   违反规定:《安全作业规程》第5.2条\n   风险等级:中风险",
            Violation,
            2,
            false,
            r31,
            Some(Risk::High),
            None,
        ),
        (
            "numbered list ascii colons",
            "1、未戴安全帽\n违反规定: 第3.1条\n风险等级: 低",
            Violation,
            1,
            false,
            Some("第3.1条"),
            Some(Risk::Low),
            None,
        ),
        (
            "numbered list safe",
            "根据制造业安全规章制度分析，未发现明显违规行为。",
            Safe,
            0,
            false,
            None,
            None,
            None,
        ),
        ("empty", "", Unparsed, 0, false, None, None, None),
        (
            "whitespace",
            "  \n\t ",
            Unparsed,
            0,
            false,
            None,
            None,
            None,
        ),
        (
            "prose only",
            "这张图片显示了一个工厂车间。",
            Unparsed,
            0,
            false,
            None,
            None,
            None,
        ),
        ("lone brace", "{", Unparsed, 0, false, None, None, None),
        ("closing junk", "}]}]", Unparsed, 0, false, None, None, None),
    ]
}

#[test]
fn the_table() {
    let cases = cases();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let mut failures = Vec::new();
    for (name, text, status, n, truncated, rule, risk, bbox) in cases {
        let r = parse_reply(text);
        let first = r.violations.first();
        let got = (
            r.status,
            r.violations.len(),
            r.truncated,
            first.and_then(|v| v.rule.as_deref()),
            first.and_then(|v| v.risk),
            first.and_then(|v| v.bbox),
        );
        if got != (status, n, truncated, rule, risk, bbox) {
            failures.push(format!(
                "{name}: got {got:?}, want {:?}",
                (status, n, truncated, rule, risk, bbox)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn formats_and_descriptions() {
    let r = parse_reply(CANON);
    assert_eq!(r.format, ReplyFormat::Json);
    assert_eq!(r.violations[0].description, "未戴安全帽");
    assert_eq!(r.violations[0].suggestion.as_deref(), Some("立即佩戴"));
    assert_eq!(r.violations[1].suggestion, None);
    let list = parse_reply("1. 未戴安全帽\n违反规定：第3.1条\n风险等级：高");
    assert_eq!(list.format, ReplyFormat::NumberedList);
    assert_eq!(list.violations[0].description, "未戴安全帽");
    assert_eq!(parse_reply("???").format, ReplyFormat::None);
    assert!(ReplyStatus::Unparsed.predicts_violation());
    assert!(!ReplyStatus::Safe.predicts_violation());
}

#[test]
fn every_prefix_of_an_answer_parses_without_panic_and_salvages_monotonically() {
    // Cut the canonical answer at every character: the salvaged count never exceeds the
    // violations completed so far, and never goes down as the text grows.
    let mut last = 0;
    for (i, _) in CANON.char_indices().chain([(CANON.len(), ' ')]) {
        let r = parse_reply(&CANON[..i]);
        assert!(r.violations.len() <= 2);
        assert!(r.violations.len() >= last, "at {i}: {r:?}");
        last = r.violations.len();
    }
    assert_eq!(last, 2);
}

/// A small xorshift generator: the fuzz run needs no dependency and is reproducible per seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn fuzz_never_panics() {
    let secs: u64 = std::env::var("REPLY_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let pieces: Vec<&str> = vec![
        "{",
        "}",
        "[",
        "]",
        "\"",
        "\\",
        ",",
        "，",
        ":",
        "：",
        "status",
        "violation",
        "safe",
        "violations",
        "description",
        "rule",
        "risk",
        "box",
        "高",
        "中",
        "低",
        "第3.1条",
        "1.",
        "违反规定：",
        "风险等级：",
        "未发现明显违规",
        "```json",
        "```",
        "\n",
        " ",
        "null",
        "1e999",
        "-5",
        "12345678901234567890",
        "\u{0}",
        "é",
        "🦀",
    ];
    let seeds: Vec<String> = cases().iter().map(|c| c.1.to_string()).collect();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut runs = 0u64;
    while std::time::Instant::now() < deadline {
        let mut s: Vec<char> = seeds[rng.below(seeds.len())].chars().collect();
        for _ in 0..1 + rng.below(8) {
            match rng.below(4) {
                0 if !s.is_empty() => {
                    let at = rng.below(s.len());
                    s.remove(at);
                }
                1 => {
                    let at = rng.below(s.len() + 1);
                    let p: Vec<char> = pieces[rng.below(pieces.len())].chars().collect();
                    s.splice(at..at, p);
                }
                2 if !s.is_empty() => {
                    let at = rng.below(s.len());
                    s.truncate(at);
                }
                _ => {
                    let at = rng.below(s.len() + 1);
                    s.insert(at, char::from_u32(rng.below(0x3000) as u32).unwrap_or('x'));
                }
            }
        }
        let text: String = s.into_iter().collect();
        let r = parse_reply(&text);
        // Invariants of any result.
        assert!(
            r.status != ReplyStatus::Safe || r.violations.is_empty(),
            "{text:?}"
        );
        for v in &r.violations {
            if let Some([x1, y1, x2, y2]) = v.bbox {
                assert!(
                    x1 <= x2 && y1 <= y2 && x2 <= 1000.0 && x1 >= 0.0,
                    "{text:?}"
                );
            }
        }
        runs += 1;
    }
    eprintln!("fuzz: {runs} mutated replies in {secs} s, no panic");
}
