//! The alerting rules of one camera: threshold, zones, K-of-M debouncing and cooldown.

use inspector_core::Risk;
use inspector_watch::{Alerter, Policy, Polygon, Seen, Zone, Zones};

const SIZE: (u32, u32) = (1000, 500);
const HELMET: &str = "《安全生产管理规定》第3条";
const CABINET: &str = "《电气安全规程》第12条";

fn seen(rule: &str, risk: Risk, bbox: Option<[f64; 4]>) -> Seen {
    Seen {
        rule: rule.into(),
        risk,
        bbox,
    }
}

/// Runs frames `(time, violations)` and returns `(time, rule)` of every event.
fn run(alerter: &mut Alerter, frames: &[(f64, Vec<Seen>)]) -> Vec<(f64, String)> {
    frames
        .iter()
        .flat_map(|(at, v)| alerter.observe(*at, SIZE, v))
        .map(|t| (t.at, t.rule))
        .collect()
}

fn square(x0: f64, y0: f64, x1: f64, y1: f64) -> Polygon {
    Polygon(vec![[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
}

#[test]
fn an_event_after_k_of_m_frames_then_a_cooldown_per_rule() {
    let mut a = Alerter::new(Policy::default(), Zones::default());
    let h = || seen(HELMET, Risk::High, None);
    let c = || seen(CABINET, Risk::Medium, None);
    // The hazard appears at t = 10 s, sampled every 2 s, and stays until t = 20 s; a safe
    // stretch follows; the cabinet opens at 30 s; the helmet hazard returns after the cooldown.
    let mut frames: Vec<(f64, Vec<Seen>)> = Vec::new();
    for i in 0..60 {
        let t = i as f64 * 2.0;
        let mut v = Vec::new();
        if (10.0..=20.0).contains(&t) || t >= 112.0 {
            v.push(h());
        }
        if (30.0..=34.0).contains(&t) {
            v.push(c());
        }
        frames.push((t, v));
    }
    // The helmet returns at 112 s, 102 s after its event at 12 s: within the 300 s cooldown.
    assert_eq!(
        run(&mut a, &frames),
        vec![(12.0, HELMET.to_string()), (32.0, CABINET.to_string())]
    );
    // At 312 s the cooldown is over and the hazard is still there: a second event.
    let events = a.observe(312.0, SIZE, &[h()]);
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].at, events[0].risk), (312.0, Risk::High));
}

#[test]
fn k_of_m_counts_frames_not_runs() {
    let policy = Policy {
        k: 2,
        m: 3,
        cooldown_s: 0.0,
        ..Policy::default()
    };
    let h = || vec![seen(HELMET, Risk::High, None)];
    // A gap of one frame still leaves 2 of the last 3.
    let mut a = Alerter::new(policy.clone(), Zones::default());
    assert_eq!(
        run(&mut a, &[(0.0, h()), (1.0, vec![]), (2.0, h())]).len(),
        1
    );
    // A gap of two frames does not: each sighting is alone in its window.
    let mut a = Alerter::new(policy.clone(), Zones::default());
    let frames = [(0.0, h()), (1.0, vec![]), (2.0, vec![]), (3.0, h())];
    assert!(run(&mut a, &frames).is_empty());
    // k = 1 alerts on the first sighting; with no cooldown, on every one.
    let mut a = Alerter::new(Policy { k: 1, ..policy }, Zones::default());
    assert_eq!(run(&mut a, &[(0.0, h()), (1.0, h())]).len(), 2);
}

#[test]
fn violations_below_the_risk_threshold_raise_nothing() {
    let low = || vec![seen(HELMET, Risk::Low, None)];
    let mut a = Alerter::new(Policy::default(), Zones::default());
    assert!(run(&mut a, &[(0.0, low()), (1.0, low()), (2.0, low())]).is_empty());
    let high_only = Policy {
        min_risk: Risk::High,
        ..Policy::default()
    };
    let medium = || vec![seen(HELMET, Risk::Medium, None)];
    let mut a = Alerter::new(high_only, Zones::default());
    assert!(run(&mut a, &[(0.0, medium()), (1.0, medium())]).is_empty());
    let all = Policy {
        min_risk: Risk::Low,
        ..Policy::default()
    };
    let mut a = Alerter::new(all, Zones::default());
    assert_eq!(run(&mut a, &[(0.0, low()), (1.0, low())]).len(), 1);
    // The event carries the highest risk seen for the rule on its frame.
    let mut a = Alerter::new(Policy::default(), Zones::default());
    a.observe(0.0, SIZE, &[seen(HELMET, Risk::Medium, None)]);
    let e = a.observe(
        1.0,
        SIZE,
        &[
            seen(HELMET, Risk::Medium, None),
            seen(HELMET, Risk::High, None),
        ],
    );
    assert_eq!(e[0].risk, Risk::High);
    assert_eq!(e[0].seen.len(), 2);
}

#[test]
fn zones_restrict_the_rules_they_name_and_ignored_regions_drop_everything() {
    // The left half of the frame is the crane bay, where the helmet rule applies; the top
    // right corner is a poster of a worker, ignored.
    let zones = Zones {
        zones: vec![Zone {
            name: "crane bay".into(),
            polygon: square(0.0, 0.0, 0.5, 1.0),
            rules: vec![HELMET.into()],
        }],
        ignore: vec![square(0.8, 0.0, 1.0, 0.3)],
    };
    let policy = Policy {
        k: 1,
        cooldown_s: 0.0,
        ..Policy::default()
    };
    let mut a = Alerter::new(policy, zones);
    let mut fires = |rule: &str, bbox: Option<[f64; 4]>| {
        !a.observe(0.0, SIZE, &[seen(rule, Risk::High, bbox)])
            .is_empty()
    };
    // Pixels of a 1000 × 500 frame: centre (100, 250) is in the bay, (700, 250) is not.
    assert!(fires(HELMET, Some([50.0, 200.0, 150.0, 300.0])));
    assert!(!fires(HELMET, Some([650.0, 200.0, 750.0, 300.0])));
    assert!(
        !fires(HELMET, None),
        "an unplaced violation of a zoned rule"
    );
    // A rule no zone names applies everywhere, placed or not ...
    assert!(fires(CABINET, Some([650.0, 200.0, 750.0, 300.0])));
    assert!(fires(CABINET, None));
    // ... but not in the ignored region: centre (900, 50).
    assert!(!fires(CABINET, Some([850.0, 0.0, 950.0, 100.0])));

    // A zone without rules restricts every rule to it.
    let everything = Zones {
        zones: vec![Zone {
            name: "floor".into(),
            polygon: square(0.0, 0.5, 1.0, 1.0),
            rules: vec![],
        }],
        ignore: vec![],
    };
    assert!(everything.admits(CABINET, Some(&[0.0, 300.0, 100.0, 400.0]), SIZE));
    assert!(!everything.admits(CABINET, Some(&[0.0, 0.0, 100.0, 100.0]), SIZE));
}

#[test]
fn a_concave_polygon_contains_what_it_encloses() {
    // An L: the bottom strip and the left strip.
    let l = Polygon(vec![
        [0.0, 0.0],
        [0.2, 0.0],
        [0.2, 0.8],
        [1.0, 0.8],
        [1.0, 1.0],
        [0.0, 1.0],
    ]);
    assert!(l.validate().is_ok());
    assert!(l.contains([0.1, 0.1]));
    assert!(l.contains([0.9, 0.9]));
    assert!(!l.contains([0.5, 0.5]), "the notch");
    assert!((l.area() - (0.2 * 0.8 + 1.0 * 0.2)).abs() < 1e-12);
}

#[test]
fn bad_polygons_and_policies_are_refused_with_what_is_wrong() {
    let e = Polygon(vec![[0.0, 0.0], [1.0, 1.0]])
        .validate()
        .unwrap_err();
    assert!(e.contains("at least 3 points"), "{e}");
    let e = Polygon(vec![[0.0, 0.0], [1.5, 0.0], [1.0, 1.0]])
        .validate()
        .unwrap_err();
    assert!(e.contains("point 2") && e.contains("from 0 to 1"), "{e}");
    let e = Polygon(vec![[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]])
        .validate()
        .unwrap_err();
    assert!(e.contains("no area"), "{e}");
    let e = Polygon(vec![[0.0, f64::NAN], [0.5, 0.5], [1.0, 0.0]])
        .validate()
        .unwrap_err();
    assert!(e.contains("point 1"), "{e}");

    assert!(Policy::default().validate().is_ok());
    for (policy, field) in [
        (
            Policy {
                k: 4,
                ..Policy::default()
            },
            "k must be between 1 and m (3), not 4",
        ),
        (
            Policy {
                k: 0,
                ..Policy::default()
            },
            "k must be",
        ),
        (
            Policy {
                m: 0,
                ..Policy::default()
            },
            "m must be at least 1",
        ),
        (
            Policy {
                cooldown_s: -1.0,
                ..Policy::default()
            },
            "cooldown",
        ),
    ] {
        let e = policy.validate().unwrap_err();
        assert!(e.contains(field), "{e}");
    }
}

#[test]
fn a_trigger_serialises_with_its_box_named_box() {
    let mut a = Alerter::new(
        Policy {
            k: 1,
            ..Policy::default()
        },
        Zones::default(),
    );
    let t = a.observe(
        5.0,
        SIZE,
        &[seen(HELMET, Risk::High, Some([1.0, 2.0, 3.0, 4.0]))],
    );
    let v = serde_json::to_value(&t[0]).unwrap();
    assert_eq!(v["rule"], HELMET);
    assert_eq!(v["risk"], "高");
    assert_eq!(v["at"], 5.0);
    assert_eq!(v["seen"][0]["box"], serde_json::json!([1.0, 2.0, 3.0, 4.0]));
}
