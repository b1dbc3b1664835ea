//! `cameras.toml`: a good file, and every error with its line.

use inspector_core::Risk;
use inspector_watch::config::{self, parse, redact};

const HELMET: &str = "《安全生产管理规定》第3条";

fn known(rule: &str) -> bool {
    rule == HELMET
}

#[test]
fn a_complete_file_with_defaults_overrides_zones_and_ignored_regions() {
    let text = format!(
        r#"
[defaults]
interval = 1.5
min_risk = "高"

[[camera]]
name = "crane-bay"
source = "rtsp://user:secret@10.0.0.5/stream1"
k = 3
m = 4

[[camera.zone]]
name = "crane bay"
polygon = [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]
rules = ["{HELMET}"]

[[camera.ignore]]
polygon = [[0.8, 0], [1, 0], [1, 0.3]]

[[camera]]
name = "gate"
source = "/srv/videos/gate.mp4"
cooldown = 60
"#
    );
    let cams = parse(&text, known).unwrap();
    assert_eq!(cams.len(), 2);
    let (a, b) = (&cams[0], &cams[1]);
    assert_eq!((a.name.as_str(), a.interval_s), ("crane-bay", 1.5));
    assert_eq!(
        (a.policy.k, a.policy.m, a.policy.min_risk),
        (3, 4, Risk::High)
    );
    assert_eq!(a.policy.cooldown_s, 300.0);
    assert_eq!(a.zones.zones[0].rules, vec![HELMET.to_string()]);
    assert!(a.zones.zones[0].polygon.contains([0.25, 0.5]));
    assert_eq!(a.zones.ignore.len(), 1);
    assert_eq!((b.policy.k, b.policy.m, b.policy.cooldown_s), (2, 3, 60.0));
    assert_eq!(b.interval_s, 1.5);
    assert!(b.zones.zones.is_empty());
}

/// The errors of `text`, as "line N: message".
fn errors(text: &str) -> Vec<String> {
    parse(text, known)
        .unwrap_err()
        .iter()
        .map(|e| e.to_string())
        .collect()
}

#[test]
fn every_error_is_reported_with_its_line() {
    let text = format!(
        r#"[[camera]]
name = "a"
source = "ftp://cam/1"
k = 5

[[camera.zone]]
name = "bay"
polygon = [[0, 0], [2, 0], [1, 1]]
rules = ["{HELMET}", "《不存在》第9条"]

[[camera]]
name = "a"
source = "rtsp://cam/2"
min_risk = "extreme"
interval = 0

[[camera.ignore]]
polygon = [[0, 0], [1, 1]]
"#
    );
    let e = errors(&text);
    let expect = [
        "line 3: camera \"a\": unsupported source ftp://cam/1",
        "line 4: k (5) must not exceed m (3)",
        "line 8: zone \"bay\": point 2 (2, 0) is not inside the frame",
        "line 9: zone \"bay\": unknown rule \"《不存在》第9条\"",
        "line 12: camera \"a\" is already defined on line 2",
        "line 15: interval must be a number of seconds > 0, not 0",
        "line 14: min_risk \"extreme\" is not 高, 中 or 低",
        "line 18: ignored region: a polygon needs at least 3 points",
    ];
    for want in expect {
        assert!(
            e.iter().any(|g| g.starts_with(want)),
            "missing {want:?} in {e:#?}"
        );
    }
    assert_eq!(e.len(), expect.len(), "{e:#?}");
}

#[test]
fn syntax_errors_and_unknown_keys_name_their_line() {
    let e = errors("[[camera]]\nname = \"a\"\nsource = \"x.mp4\"\nthreshold = 3\n");
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("line 4") && e[0].contains("threshold"),
        "{e:?}"
    );
    let e = errors("[[camera]]\nname = \"a\"\nsource = \n");
    assert!(e[0].starts_with("line 3"), "{e:?}");
    let e = errors("[defaults]\nk = 2\n");
    assert!(e[0].contains("no [[camera]]"), "{e:?}");
    let e = errors("[[camera]]\nsource = \"x.mp4\"\n");
    assert!(e[0].contains("name"), "{e:?}");
}

#[test]
fn credentials_in_urls_are_redacted() {
    assert_eq!(
        redact("rtsp://admin:hunter2@10.0.0.5:554/s1"),
        "rtsp://***@10.0.0.5:554/s1"
    );
    assert_eq!(
        redact("https://u@cam.local/snap.jpg?x=@"),
        "https://***@cam.local/snap.jpg?x=@"
    );
    assert_eq!(redact("rtsp://10.0.0.5/s1"), "rtsp://10.0.0.5/s1");
    assert_eq!(redact("/videos/a@b.mp4"), "/videos/a@b.mp4");
    let e = errors("[[camera]]\nname = \"a\"\nsource = \"ftp://me:pw@host/x\"\n");
    assert!(
        e[0].contains("ftp://***@host/x") && !e[0].contains("pw"),
        "{e:?}"
    );
    let _: fn(&str) -> String = config::redact;
}
