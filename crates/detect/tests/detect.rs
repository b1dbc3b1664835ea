//! Detection on the tiny checkpoint with the overfitted adapter of the training tests (so the
//! answers parse and carry boxes): findings, citations, batching, the cache, bad photos.

use std::path::{Path, PathBuf};

use inspector_core::{Risk, Rule, answer::Prompt, reply::ReplyStatus};
use inspector_detect::{DetectConfig, Detector, ImageInfo, Input, RawAnswer, Timings};
use inspector_store::SqliteStore;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny() -> PathBuf {
    root().join("crates/qwen2vl/tests/fixtures/tiny-a")
}

fn overfit() -> PathBuf {
    root().join("crates/train/tests/fixtures/overfit")
}

fn detector(adapter: &Path) -> Detector {
    Detector::load(
        &tiny(),
        Some(adapter),
        &inspector_detect::Backend::cpu(),
        DetectConfig::default(),
    )
    .unwrap()
}

/// The bundled example regulations.
fn rules() -> Vec<Rule> {
    let c = inspector_rules::Categorizer::default();
    std::fs::read_dir(root().join("examples/regulations"))
        .unwrap()
        .flat_map(|e| {
            inspector_rules::extract_file(&e.unwrap().path(), &c)
                .unwrap()
                .rules
        })
        .collect()
}

/// The eight photos the adapter learnt, and the gold annotations.
fn photos() -> (Vec<Input>, Vec<inspector_core::Annotation>) {
    let dir = overfit().join("data");
    let gold: Vec<inspector_core::Annotation> =
        std::fs::read_to_string(dir.join("annotations.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let inputs = gold
        .iter()
        .map(|a| Input {
            name: a.image.clone(),
            bytes: std::fs::read(dir.join(&a.image)).unwrap(),
        })
        .collect();
    (inputs, gold)
}

#[test]
fn findings_carry_verified_citations_pixel_boxes_and_scores() {
    let d = detector(&overfit().join("adapter"));
    let (inputs, gold) = photos();
    let rules = rules();
    let findings = d.inspect(&inputs, &rules, None, 4, |_| {});
    for (f, g) in findings.iter().zip(&gold) {
        let f = f.as_ref().unwrap();
        assert_eq!(f.model_fingerprint, d.model_fingerprint);
        assert_eq!(f.adapter_fingerprint, d.adapter_fingerprint);
        assert_eq!(f.prompt_version, "inspect-v1");
        assert_eq!((f.image.width, f.image.height), (56, 56));
        if g.violations.is_empty() {
            assert_eq!(f.status, ReplyStatus::Safe, "{}: {}", g.image, f.raw);
            assert_eq!(f.summary.total, 0);
            continue;
        }
        assert_eq!(f.status, ReplyStatus::Violation, "{}: {}", g.image, f.raw);
        let (v, want) = (&f.violations[0], &g.violations[0]);
        assert_eq!(v.description, want.description);
        assert!(v.verified, "{}: {:?} not verified", g.image, v.rule);
        let resolved = v.resolved.as_ref().unwrap();
        assert_eq!(resolved.citation, want.rule);
        assert!(!resolved.text.is_empty());
        assert_eq!(v.risk, Some(want.risk));
        // Boxes come back in pixels, within the 0–1000 grid's rounding.
        let (b, w) = (v.bbox.unwrap(), want.bbox.unwrap());
        for i in 0..4 {
            assert!(
                (b[i] - w[i]).abs() <= 0.1,
                "{}: box {b:?} vs {w:?}",
                g.image
            );
        }
        let score = v.score.unwrap();
        assert!(score > 0.5 && score <= 1.0, "score {score}");
        let mut want_summary = inspector_detect::Summary {
            total: 1,
            ..Default::default()
        };
        match want.risk {
            Risk::High => want_summary.high = 1,
            Risk::Medium => want_summary.medium = 1,
            Risk::Low => want_summary.low = 1,
        }
        assert_eq!(f.summary, want_summary);
    }
}

#[test]
fn a_hallucinated_clause_is_kept_but_unverified() {
    let answer = RawAnswer {
        raw: r#"{"status":"violation","violations":[{"description":"未戴安全帽","rule":"《安全作业规程》第99.9条","risk":"高","box":[0,0,500,500]},{"description":"未穿反光背心","rule":"《安全作业规程》第3.2条","risk":"中"}]}"#.into(),
        token_probs: vec![],
        token_margins: vec![],
        token_ends: vec![],
    };
    let image = ImageInfo {
        width: 200,
        height: 100,
        sha256: "x".into(),
    };
    let f = inspector_detect::finding(&answer, image, &rules(), Timings::default(), "m", None);
    assert_eq!(f.violations.len(), 2);
    assert!(!f.violations[0].verified && f.violations[0].resolved.is_none());
    assert_eq!(f.violations[0].bbox, Some([0.0, 0.0, 100.0, 50.0]));
    assert!(f.violations[1].verified);
    assert_eq!(f.summary.high + f.summary.medium, 2);
}

#[test]
fn batched_greedy_answers_equal_one_by_one() {
    let d = detector(&overfit().join("adapter"));
    let (mut inputs, _) = photos();
    // Mixed sizes: two more photos of other shapes.
    for (k, (w, h)) in [(84u32, 56u32), (56, 112)].into_iter().enumerate() {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 3) as u8, (y * 2) as u8, 40 * k as u8])
        });
        let mut bytes = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
        inputs.insert(
            3 * k + 1,
            Input {
                name: format!("odd{k}.png"),
                bytes,
            },
        );
    }
    let rules = rules();
    let one: Vec<String> = d
        .inspect(&inputs, &rules, None, 1, |_| {})
        .into_iter()
        .map(|f| f.unwrap().raw)
        .collect();
    for batch in [3, 10] {
        let many: Vec<String> = d
            .inspect(&inputs, &rules, None, batch, |_| {})
            .into_iter()
            .map(|f| f.unwrap().raw)
            .collect();
        assert_eq!(many, one, "batch size {batch}");
    }
}

#[test]
fn the_cache_skips_model_work_and_misses_when_the_key_changes() {
    let db = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(db.path().join("inspector.db")).unwrap();
    let rules = rules();
    let (inputs, _) = photos();
    let d = detector(&overfit().join("adapter"));
    let first = d.inspect(&inputs, &rules, Some(&store), 4, |_| {});
    let calls = d.generate_calls();
    assert_eq!(calls, 2, "8 photos in batches of 4");
    let second = d.inspect(&inputs, &rules, Some(&store), 4, |_| {});
    assert_eq!(
        d.generate_calls(),
        calls,
        "the second run did no model work"
    );
    for (a, b) in first.iter().zip(&second) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert!(!a.timings.cached && b.timings.cached);
        let strip = |f: &inspector_detect::Finding| {
            let mut f = f.clone();
            f.timings = Timings::default();
            f
        };
        assert_eq!(strip(a), strip(b));
    }
    // Another adapter, or other decoding settings, miss.
    let other = detector(&root().join("crates/train/tests/fixtures/peft/adapter"));
    assert_ne!(other.adapter_fingerprint, d.adapter_fingerprint);
    let again = other.inspect(&inputs[..2], &rules, Some(&store), 4, |_| {});
    assert!(again.iter().all(|f| !f.as_ref().unwrap().timings.cached));
    assert_eq!(other.generate_calls(), 1);
    let mut shorter = detector(&overfit().join("adapter"));
    shorter.config.max_new_tokens = 64;
    let again = shorter.inspect(&inputs[..2], &rules, Some(&store), 4, |_| {});
    assert!(again.iter().all(|f| !f.as_ref().unwrap().timings.cached));
}

/// A model or adapter that records the brief prompt is asked with it: its findings carry that
/// version, and its cache entries are not those of the full prompt. An unknown version is
/// refused, naming the file.
#[test]
fn the_recorded_prompt_is_the_one_asked_and_cached() {
    let full = detector(&overfit().join("adapter"));
    assert_eq!(full.prompt(), Prompt::Full);
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(overfit().join("adapter")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    std::fs::write(
        dir.path().join("inspector_adapter.json"),
        r#"{"prompt_version": "inspect-brief-v1"}"#,
    )
    .unwrap();
    let brief = detector(dir.path());
    assert_eq!(brief.prompt(), Prompt::Brief);
    let mut full_asked_brief = detector(&overfit().join("adapter"));
    full_asked_brief.set_prompt(Prompt::Brief);
    assert_ne!(full.cache_key("x"), full_asked_brief.cache_key("x"));
    let (inputs, _) = photos();
    let f = brief.inspect(&inputs[..1], &rules(), None, 1, |_| {});
    assert_eq!(f[0].as_ref().unwrap().prompt_version, "inspect-brief-v1");

    std::fs::write(
        dir.path().join("inspector_adapter.json"),
        r#"{"prompt_version": "inspect-v0"}"#,
    )
    .unwrap();
    let e = Detector::load(
        &tiny(),
        Some(dir.path()),
        &inspector_detect::Backend::cpu(),
        DetectConfig::default(),
    )
    .err()
    .expect("an unknown prompt version is refused")
    .to_string();
    assert!(
        e.contains("inspector_adapter.json") && e.contains("inspect-v0"),
        "{e}"
    );
}

#[test]
fn an_unreadable_photo_gets_its_own_error_and_the_rest_go_on() {
    let d = detector(&overfit().join("adapter"));
    let (mut inputs, _) = photos();
    inputs.truncate(2);
    inputs.insert(
        1,
        Input {
            name: "broken.jpg".into(),
            bytes: b"\xff\xd8\xff\xe0 not really a jpeg".to_vec(),
        },
    );
    let out = d.inspect(&inputs, &rules(), None, 4, |_| {});
    assert!(out[0].is_ok() && out[2].is_ok());
    let err = out[1].as_ref().unwrap_err().to_string();
    assert!(err.contains("broken.jpg"), "{err}");
}

/// Controlled uncertainty: blends of a learnt safe photo (0.png) and a learnt violation photo
/// (1.png). The pure photos are answered surely; somewhere between them the model must hesitate
/// between "safe" and "violation": that blend ranks first, by its status token's margin and
/// by the disagreement of six answers sampled at temperature 0.7.
#[test]
fn active_learning_ranks_ambiguous_blends_above_learnt_photos() {
    let d = detector(&overfit().join("adapter"));
    let dir = overfit().join("data");
    let a = image::open(dir.join("0.png")).unwrap().to_rgb8();
    let b = image::open(dir.join("1.png")).unwrap().to_rgb8();
    let alphas = [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0];
    let inputs: Vec<Input> = alphas
        .iter()
        .map(|&t| {
            let img = image::RgbImage::from_fn(56, 56, |x, y| {
                let (p, q) = (a.get_pixel(x, y), b.get_pixel(x, y));
                image::Rgb(std::array::from_fn(|c| {
                    (p[c] as f64 * (1.0 - t) + q[c] as f64 * t).round() as u8
                }))
            });
            let mut bytes = Vec::new();
            img.write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
            Input {
                name: format!("blend{t}"),
                bytes,
            }
        })
        .collect();
    let out = d.uncertainty(&inputs, &rules(), 6, 0.7, 7, |_| {});
    let u: Vec<inspector_detect::active::Uncertainty> =
        out.into_iter().map(|r| r.unwrap().1).collect();
    for (i, x) in u.iter().enumerate() {
        eprintln!("{}: {x:?}", inputs[i].name);
    }
    let order = inspector_detect::active::rank(&u, u.len());
    let last = alphas.len() - 1;
    let top = order[0];
    assert!(top != 0 && top != last, "a blend ranks first: {order:?}");
    assert!(
        u[top].token > 10.0 * u[0].token.max(u[last].token),
        "the top blend is far less sure than the learnt photos"
    );
    // Sampling agrees with itself on the learnt photos and not on the top blend.
    assert_eq!(
        (u[0].disagreement, u[last].disagreement),
        (Some(0.0), Some(0.0))
    );
    assert!(u[top].disagreement.unwrap() > 0.0);
}

/// The random checkpoint with no adapter writes junk; under the grammar every answer it writes
/// is a prefix of a valid answer, and a finished one parses and cites only rules that exist.
#[test]
fn constrained_decoding_keeps_a_random_model_inside_the_answer_grammar() {
    use inspector_core::grammar::{AnswerGrammar, Viability};
    let rules = rules();
    let (inputs, _) = photos();
    let inputs = &inputs[..4];
    let config = |constrained| DetectConfig {
        max_new_tokens: 160,
        constrained,
        ..DetectConfig::default()
    };
    let citations: Vec<String> = rules
        .iter()
        .map(|r| format!("《{}》第{}条", r.document, r.clause))
        .collect();
    let grammar = AnswerGrammar::new(citations);

    let mut free = Detector::load(
        &tiny(),
        None,
        &inspector_detect::Backend::cpu(),
        config(false),
    )
    .unwrap();
    free.set_citations(&rules);
    let junk = free.inspect(inputs, &rules, None, 4, |_| {});
    assert!(
        junk.iter()
            .any(|f| grammar.check(f.as_ref().unwrap().raw.as_bytes()) == Viability::Invalid),
        "the random model is expected to leave the grammar when free"
    );

    let mut d = Detector::load(
        &tiny(),
        None,
        &inspector_detect::Backend::cpu(),
        config(true),
    )
    .unwrap();
    d.set_citations(&rules);
    assert_ne!(d.cache_key("x"), free.cache_key("x"));
    let mut finished = 0;
    for f in d.inspect(inputs, &rules, None, 4, |_| {}) {
        let f = f.unwrap();
        match grammar.check(f.raw.as_bytes()) {
            Viability::Complete => {
                finished += 1;
                assert_ne!(f.status, ReplyStatus::Unparsed, "{}", f.raw);
                assert!(f.violations.iter().all(|v| v.verified), "{}", f.raw);
            }
            Viability::Prefix => assert!(f.truncated, "{}", f.raw),
            Viability::Invalid => panic!("left the grammar: {}", f.raw),
        }
    }
    eprintln!("{finished} of {} random answers finished", inputs.len());

    // The adapter that learnt the eight photos finishes every answer under the grammar, with
    // the same answers as free decoding.
    let (all, _) = photos();
    let mut learnt = detector(&overfit().join("adapter"));
    learnt.set_citations(&rules);
    let free = detector(&overfit().join("adapter"));
    let a = learnt.inspect(&all, &rules, None, 4, |_| {});
    let b = free.inspect(&all, &rules, None, 4, |_| {});
    for (a, b) in a.iter().zip(&b) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert_eq!(
            grammar.check(a.raw.as_bytes()),
            Viability::Complete,
            "{}",
            a.raw
        );
        assert_eq!(a.raw, b.raw);
    }
}
