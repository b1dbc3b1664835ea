//! Video files through ffmpeg: sampling in media time, the end of a file, a corrupt file; the
//! PNG splitter and the change gate. The video tests need `ffmpeg` on PATH and are ignored by
//! default: `.ci/run` installs FFmpeg and runs them (`cargo test -p inspector-watch --test video
//! -- --ignored`).

#[path = "common/slideshow.rs"]
mod slideshow;

use std::path::Path;

use inspector_watch::source::{ChangeGate, PngStream, SourceError, VideoFile};
use slideshow::slideshow;

/// A 6-second video at 10 frames/s: red for 2 s, then green for 2 s, then blue for 2 s.
fn three_colours(dir: &Path) -> std::path::PathBuf {
    for (i, rgb) in [[220u8, 20, 20], [20, 220, 20], [20, 20, 220]]
        .iter()
        .enumerate()
    {
        image::RgbImage::from_pixel(64, 48, image::Rgb(*rgb))
            .save(dir.join(format!("c{i}.png")))
            .unwrap();
    }
    let still = |i: usize| (dir.join(format!("c{i}.png")), 2);
    slideshow(
        dir,
        "colours.mp4",
        &[still(0), still(1), still(2)],
        10,
        false,
    )
}

fn mean_rgb(png: &[u8]) -> [f64; 3] {
    let img = image::load_from_memory(png).unwrap().to_rgb8();
    let mut sum = [0f64; 3];
    for p in img.pixels() {
        for c in 0..3 {
            sum[c] += f64::from(p[c]);
        }
    }
    sum.map(|s| s / f64::from(img.width() * img.height()))
}

#[test]
#[ignore = "needs ffmpeg on PATH; .ci/run installs it and runs this"]
fn a_file_is_sampled_every_interval_of_media_time_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let video = three_colours(dir.path());
    let mut src = VideoFile::open(&video, "colours.mp4", 1.0).unwrap();
    let mut frames = Vec::new();
    while let Some(f) = src.next_frame().unwrap() {
        frames.push(f);
    }
    assert!(src.next_frame().unwrap().is_none(), "the end stays the end");
    let times: Vec<f64> = frames.iter().map(|f| f.at).collect();
    assert_eq!(times, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    // Each second shows the colour the video has then.
    let dominant: Vec<usize> = frames
        .iter()
        .map(|f| {
            let m = mean_rgb(&f.png);
            (0..3).max_by(|&a, &b| m[a].total_cmp(&m[b])).unwrap()
        })
        .collect();
    assert_eq!(dominant, vec![0, 0, 1, 1, 2, 2]);
    // A longer interval takes fewer frames.
    let mut src = VideoFile::open(&video, "colours.mp4", 2.0).unwrap();
    let mut n = 0;
    while src.next_frame().unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 3);
}

#[test]
#[ignore = "needs ffmpeg on PATH; .ci/run installs it and runs this"]
fn a_file_that_is_not_a_video_fails_with_ffmpegs_words_and_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("notes.mp4");
    std::fs::write(&bad, b"this is not a video at all").unwrap();
    let mut src = VideoFile::open(&bad, "notes.mp4", 1.0).unwrap();
    let e = src.next_frame().unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("notes.mp4: ffmpeg: "), "{text}");
    assert!(matches!(e, SourceError::Failed { .. }));

    // A video cut in half: the frames before the cut, then the end or an error, never a hang.
    let video = three_colours(dir.path());
    let bytes = std::fs::read(&video).unwrap();
    let cut = dir.path().join("cut.mp4");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let mut src = VideoFile::open(&cut, "cut.mp4", 1.0).unwrap();
    let mut outcome = Ok(0);
    loop {
        match src.next_frame() {
            Ok(Some(_)) => outcome = outcome.map(|n| n + 1),
            Ok(None) => break,
            Err(e) => {
                outcome = Err(e.to_string());
                break;
            }
        }
    }
    match outcome {
        Ok(n) => assert!(n < 6, "{n} frames from half a file"),
        Err(e) => assert!(e.starts_with("cut.mp4: "), "{e}"),
    }

    let e = VideoFile::open(&dir.path().join("missing.mp4"), "missing.mp4", 1.0)
        .err()
        .unwrap();
    assert_eq!(e.to_string(), "missing.mp4: no such file");
}

#[test]
fn concatenated_pngs_are_split_and_a_cut_one_is_an_error() {
    let mut stream = Vec::new();
    let mut sizes = Vec::new();
    for v in [10u8, 200] {
        let mut one = Vec::new();
        image::RgbImage::from_pixel(8, 8, image::Rgb([v, v, v]))
            .write_to(&mut std::io::Cursor::new(&mut one), image::ImageFormat::Png)
            .unwrap();
        sizes.push(one.len());
        stream.extend_from_slice(&one);
    }
    let mut s = PngStream::new(&stream[..]);
    assert_eq!(s.next_png().unwrap().unwrap().len(), sizes[0]);
    assert_eq!(s.next_png().unwrap().unwrap().len(), sizes[1]);
    assert!(s.next_png().unwrap().is_none());
    let mut s = PngStream::new(&stream[..stream.len() - 5]);
    s.next_png().unwrap();
    assert!(s.next_png().is_err());
    let mut s = PngStream::new(&b"GIF89a and more bytes"[..]);
    assert!(s.next_png().is_err());
}

#[test]
fn the_change_gate_skips_frames_that_barely_change() {
    let grey = |v: u8| {
        image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(64, 48, image::Rgb([v, v, v])))
    };
    let mut gate = ChangeGate::new(2.0);
    assert!(gate.passes(&grey(100)), "the first frame");
    assert!(!gate.passes(&grey(101)), "1 level of difference");
    assert!(!gate.passes(&grey(101)));
    assert!(gate.passes(&grey(110)), "10 levels");
    assert!(
        !gate.passes(&grey(111)),
        "compared with the last frame that passed"
    );
    let mut every = ChangeGate::new(0.0);
    assert!(every.passes(&grey(5)) && every.passes(&grey(5)));
}
