//! Test videos made by ffmpeg's concat demuxer from still images, each shown for a number of
//! seconds. Shared with the CLI's camera tests (`#[path]`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Writes `dir/name` from `stills` (image, seconds shown) at `fps` frames/s. `lossless` keeps
/// the frames bit for bit (RGB PNG frames, for a `.mkv`); otherwise MPEG-4 in yuv420p.
pub fn slideshow(
    dir: &Path,
    name: &str,
    stills: &[(PathBuf, u32)],
    fps: u32,
    lossless: bool,
) -> PathBuf {
    let mut list = String::new();
    for (image, seconds) in stills {
        list.push_str(&format!("file '{}'\nduration {seconds}\n", image.display()));
    }
    // The concat demuxer needs the last file again for the last duration to count.
    let last = &stills.last().expect("at least one still").0;
    list.push_str(&format!("file '{}'\n", last.display()));
    let list_file = dir.join(format!("{name}.txt"));
    std::fs::write(&list_file, list).unwrap();
    let codec: &[&str] = if lossless {
        &["-c:v", "png", "-pix_fmt", "rgb24"]
    } else {
        &["-c:v", "mpeg4", "-q:v", "2", "-pix_fmt", "yuv420p"]
    };
    let out = dir.join(name);
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
        ])
        .arg(&list_file)
        .arg("-vf")
        .arg(format!("fps={fps}"))
        .args(codec)
        .arg(&out)
        .status()
        .expect("ffmpeg on PATH (Debian: apt-get install ffmpeg)");
    assert!(status.success());
    out
}
