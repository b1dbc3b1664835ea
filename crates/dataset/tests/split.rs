//! Split properties: no photo on both sides, strata within one record of the target, the same
//! seed giving the same split whatever the file order.

use std::{collections::HashSet, path::PathBuf};

use inspector_core::Annotation;
use inspector_dataset::{Record, split};

/// `n` records of `category`; every `dup_every`-th one repeats the previous photo's bytes.
fn records(spec: &[(&str, usize, usize)]) -> Vec<Record> {
    let mut out = Vec::new();
    let mut next_hash = 0u32;
    for (category, n, dup_every) in spec {
        for k in 0..*n {
            if *dup_every == 0 || k % dup_every != 0 || k == 0 {
                next_hash += 1;
            }
            let mut sha256 = [0u8; 32];
            sha256[..4].copy_from_slice(&next_hash.to_be_bytes());
            sha256[4] = 0xab;
            out.push(Record {
                line: out.len() + 1,
                annotation: Annotation {
                    image: format!("images/{next_hash}.png"),
                    violations: vec![],
                },
                path: PathBuf::from(format!("images/{next_hash}.png")),
                size: (640, 480),
                sha256,
                category: category.to_string(),
                rule_ids: vec![],
            });
        }
    }
    out
}

fn lines(rs: &[Record]) -> Vec<usize> {
    rs.iter().map(|r| r.line).collect()
}

#[test]
fn strata_are_within_one_record_of_the_target() {
    let data = records(&[
        ("safe", 37, 0),
        ("安全防护", 101, 0),
        ("现场管理", 9, 0),
        ("应急处理", 1, 0),
    ]);
    for ratio in [0.1, 0.2, 0.25, 0.33, 0.5] {
        for seed in [0, 1, 42, 9999] {
            let s = split(&data, ratio, seed).unwrap();
            assert_eq!(s.train.len() + s.eval.len(), data.len());
            for stratum in &s.strata {
                let want = stratum.records as f64 * ratio;
                let got = s
                    .eval
                    .iter()
                    .filter(|r| r.category == stratum.category)
                    .count();
                assert_eq!(got, stratum.eval);
                assert!(
                    (got as f64 - want).abs() <= 1.0,
                    "{} ratio {ratio} seed {seed}: {got} eval of {} (target {want})",
                    stratum.category,
                    stratum.records
                );
            }
        }
    }
}

#[test]
fn the_same_photo_never_lands_on_both_sides() {
    // Every third record repeats a photo; groups of two must stay together.
    let data = records(&[("safe", 60, 3), ("安全防护", 90, 3), ("现场管理", 30, 2)]);
    for seed in 0..20 {
        let s = split(&data, 0.2, seed).unwrap();
        let train: HashSet<[u8; 32]> = s.train.iter().map(|r| r.sha256).collect();
        let eval: HashSet<[u8; 32]> = s.eval.iter().map(|r| r.sha256).collect();
        assert!(train.is_disjoint(&eval), "seed {seed}");
        for stratum in &s.strata {
            // Whole groups of up to two records: still within one record of the target.
            assert!(
                stratum.eval.abs_diff(stratum.target) <= 1,
                "seed {seed}: {stratum:?}"
            );
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_split_in_any_file_order() {
    let data = records(&[("safe", 40, 0), ("安全防护", 60, 4), ("现场管理", 25, 0)]);
    let a = split(&data, 0.2, 7).unwrap();
    let b = split(&data, 0.2, 7).unwrap();
    assert_eq!(lines(&a.eval), lines(&b.eval));
    assert_eq!(lines(&a.train), lines(&b.train));

    let mut reversed = data.clone();
    reversed.reverse();
    let c = split(&reversed, 0.2, 7).unwrap();
    let mut c_eval = lines(&c.eval);
    c_eval.sort();
    assert_eq!(
        c_eval,
        lines(&a.eval),
        "file order must not change the split"
    );

    let d = split(&data, 0.2, 8).unwrap();
    assert_ne!(
        lines(&d.eval),
        lines(&a.eval),
        "another seed, another split"
    );
}

#[test]
fn bad_ratios_are_refused() {
    let data = records(&[("safe", 5, 0)]);
    for ratio in [0.0, 1.0, -0.5, f64::NAN] {
        assert!(split(&data, ratio, 1).is_err(), "{ratio}");
    }
}
