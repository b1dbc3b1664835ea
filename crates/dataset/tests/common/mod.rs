//! Shared test helpers: the bundled example rules, and photos with coloured boxes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use inspector_core::Rule;
use inspector_rules::{Categorizer, extract_file};

pub fn rules() -> Vec<Rule> {
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

pub const RED: Rgb<u8> = Rgb([230, 20, 20]);
pub const BLUE: Rgb<u8> = Rgb([20, 20, 230]);

/// A grey, lightly textured photo of `w`×`h` (distinct per `seed`) with filled rectangles
/// `[x1, y1, x2, y2)` in the given colours.
pub fn photo(w: u32, h: u32, seed: u32, boxes: &[([u32; 4], Rgb<u8>)]) -> RgbImage {
    let mut img = RgbImage::from_fn(w, h, |x, y| {
        let v = 110 + ((x * 7 + y * 13 + seed * 31) % 23) as u8;
        Rgb([v, v, v])
    });
    for ([x1, y1, x2, y2], colour) in boxes {
        for y in *y1..*y2 {
            for x in *x1..*x2 {
                img.put_pixel(x, y, *colour);
            }
        }
    }
    img
}

/// Whether a pixel is clearly `colour` (its channel dominates as in the drawn box, even
/// after brightness, contrast and blur).
pub fn is(p: &Rgb<u8>, colour: Rgb<u8>) -> bool {
    let [r, g, b] = p.0.map(i32::from);
    if colour == RED {
        r > g + 80 && r > b + 80
    } else {
        b > r + 80 && b > g + 80
    }
}

/// The bounding box `[x1, y1, x2, y2]` (pixel edges) of the pixels of `colour`, if any.
pub fn extent(img: &RgbImage, colour: Rgb<u8>) -> Option<[f64; 4]> {
    let mut b: Option<[u32; 4]> = None;
    for (x, y, p) in img.enumerate_pixels() {
        if is(p, colour) {
            b = Some(match b {
                None => [x, y, x + 1, y + 1],
                Some([a, c, d, e]) => [a.min(x), c.min(y), d.max(x + 1), e.max(y + 1)],
            });
        }
    }
    b.map(|b| b.map(f64::from))
}

/// Writes annotation lines to `dir/name`.
pub fn write_lines(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}
