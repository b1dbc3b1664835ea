//! `inspector watch` end to end: a video of the bundled example scenes through the demo model,
//! events with their stored frames; a broken source beside it; a bad cameras file and stream
//! sources refused before anything starts.

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

#[test]
fn a_bad_cameras_file_is_reported_line_by_line_and_nothing_starts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cameras.toml"),
        "[[camera]]\nname = \"gate\"\nsource = \"gate.mp4\"\nk = 9\n\n[[camera.zone]]\nname = \"bay\"\npolygon = [[0, 0], [1, 1]]\nrules = [\"《不存在的规定》第1条\"]\n",
    )
    .unwrap();
    let out = inspector(&["watch", "--config", "cameras.toml"], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for want in [
        "cameras.toml: line 4: k (9) must not exceed m (3)",
        "cameras.toml: line 8: zone \"bay\": a polygon needs at least 3 points",
        "cameras.toml: line 9: zone \"bay\": unknown rule \"《不存在的规定》第1条\"",
        "nothing was started",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in\n{stderr}");
    }
    assert!(
        !stderr.contains("demo model"),
        "the model must not load:\n{stderr}"
    );
}

#[test]
fn streams_are_refused_by_this_version_with_credentials_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let out = inspector(&["watch", "rtsp://admin:hunter2@10.0.0.5/s1"], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rtsp://***@10.0.0.5/s1"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// A 15-second video: five example scenes, 3 s each.
fn scenes_video(dir: &Path) -> PathBuf {
    let images = root().join("examples/scenes/images");
    let mut list = String::new();
    for i in 0..5 {
        list.push_str(&format!(
            "file '{}'\nduration 3\n",
            images.join(format!("{i:05}.png")).display()
        ));
    }
    list.push_str(&format!("file '{}'\n", images.join("00004.png").display()));
    std::fs::write(dir.join("list.txt"), list).unwrap();
    let status = Command::new("ffmpeg")
        .args([
            "-nostdin",
            "-loglevel",
            "error",
            "-f",
            "concat",
            "-safe",
            "0",
            "-i",
            "list.txt",
        ])
        .args([
            "-vf",
            "fps=5",
            "-c:v",
            "mpeg4",
            "-q:v",
            "2",
            "-pix_fmt",
            "yuv420p",
            "scenes.mp4",
        ])
        .current_dir(dir)
        .status()
        .expect("ffmpeg on PATH (Debian: apt-get install ffmpeg)");
    assert!(status.success());
    dir.join("scenes.mp4")
}

#[test]
#[ignore = "needs ffmpeg on PATH; .ci/run installs it and runs this"]
fn a_video_becomes_events_with_stored_frames_and_a_broken_source_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    scenes_video(dir.path());
    std::fs::write(dir.path().join("broken.mp4"), b"not a video").unwrap();
    let out = inspector(
        &[
            "watch",
            "scenes.mp4",
            "broken.mp4",
            "--interval",
            "1",
            "--events",
            "events.jsonl",
            "--data-dir",
            "data",
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the broken source fails:\n{stderr}"
    );
    assert!(stderr.contains("broken.mp4: ffmpeg: "), "{stderr}");
    assert!(
        stderr.contains("camera \"source-1\" (scenes.mp4): 15 frames read"),
        "{stderr}"
    );
    let text = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!events.is_empty(), "{stderr}");
    let mut ids = std::collections::HashSet::new();
    for e in &events {
        let id = e["id"].as_str().unwrap();
        assert!(
            id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{e}"
        );
        assert!(ids.insert(id.to_string()), "ids are unique: {e}");
        assert_eq!(e["camera"], "source-1");
        assert_eq!(e["source"], "scenes.mp4");
        // Frames are sampled each second of media time; the first event needs 2 of 3 frames.
        let at = e["at"].as_f64().unwrap();
        assert!((1.0..15.0).contains(&at) && at.fract() == 0.0, "{e}");
        let rule = e["rules"][0].as_str().unwrap();
        assert!(rule.starts_with('《') && rule.contains('条'), "{e}");
        assert!(
            ["高", "中", "低"].contains(&e["risk"].as_str().unwrap()),
            "{e}"
        );
        let frame = std::fs::read(dir.path().join(e["frame"].as_str().unwrap())).unwrap();
        assert_eq!(&frame[..3], b"\xff\xd8\xff", "a JPEG: {e}");
    }
    // The same run again gives the same events, under the same ids.
    let again = inspector(
        &[
            "watch",
            "scenes.mp4",
            "--interval",
            "1",
            "--events",
            "again.jsonl",
            "--data-dir",
            "data",
        ],
        dir.path(),
    );
    assert_eq!(
        again.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let again = std::fs::read_to_string(dir.path().join("again.jsonl")).unwrap();
    assert_eq!(again, text);
}
