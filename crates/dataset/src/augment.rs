//! `inspector dataset augment`: more training photos from the same annotations.
//!
//! Each augmented copy applies a random subset of: horizontal flip, rotation (up to ±15°, on
//! an expanded canvas so nothing is cut off), random crop, then brightness, contrast and
//! Gaussian blur. Boxes go through the same geometry as the pixels: a flip mirrors them, a
//! rotation maps their corners with the very projection that warps the image (and takes the
//! enclosing box), a crop shifts and clips them.
//!
//! Crops are chosen so that every box is either well inside (at least 60 % of its area, then
//! clipped) or entirely outside, in which case its violation is removed from that copy: a label
//! is never kept for a hazard that was cut away, and never dropped for one still half visible.
//! A violation without a box forbids cropping, since nobody knows where it is.
//!
//! Outputs are named by content hash and listed in `manifest.jsonl` with their source and
//! operations; the annotation file is written last, atomically.

use std::{collections::HashSet, io::Cursor, path::Path};

use image::{Rgb, RgbImage, codecs::png::PngEncoder};
use imageproc::geometric_transformations::{Border, Interpolation, Projection, warp_into};
use inspector_core::{Annotation, BBox, Violation};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{Dataset, Error, create_dir, jsonl, short_hash, store_image, write_atomic};

/// One operation, with the parameters it was applied with (as the manifest records them).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    /// Mirror left–right.
    Flip,
    /// Rotate clockwise by `degrees` about the centre, on a canvas enlarged to hold the whole
    /// rotated photo; the new corners are black.
    Rotate { degrees: f32 },
    /// Keep the `width`×`height` window at (`x`, `y`).
    Crop {
        x: u32,
        y: u32,
        width: u32,
        height: u32,
    },
    /// Multiply every channel by `factor` (Pillow's `ImageEnhance.Brightness`).
    Brightness { factor: f32 },
    /// Scale the distance of every channel from the mean grey level by `factor` (Pillow's
    /// `ImageEnhance.Contrast`).
    Contrast { factor: f32 },
    /// Gaussian blur of standard deviation `sigma` pixels.
    Blur { sigma: f32 },
}

/// The smallest side a crop may leave (one merged 28-px block of the model).
const MIN_CROP_SIDE: u32 = inspector_imaging::MIN_SIDE;

/// A kept box must keep at least this share of its area inside a crop.
const MIN_VISIBLE: f64 = 0.6;

/// The projection of a clockwise rotation by `degrees` about the image centre onto an expanded
/// canvas, and that canvas's size. It maps pixel-index coordinates, as `warp_into` uses them.
fn rotation(size: (u32, u32), degrees: f32) -> (Projection, (u32, u32)) {
    let (w, h) = (size.0 as f32, size.1 as f32);
    let theta = degrees.to_radians();
    let (s, c) = (theta.sin().abs(), theta.cos().abs());
    let out = (
        (h * s + w * c).ceil().max(1.0) as u32,
        (h * c + w * s).ceil().max(1.0) as u32,
    );
    // Rotate about the continuous centre (w/2, h/2) onto (W/2, H/2); pixel index i covers
    // [i, i+1), so index coordinates are shifted by half a pixel on both sides.
    let p = Projection::translate(out.0 as f32 / 2.0 - 0.5, out.1 as f32 / 2.0 - 0.5)
        * Projection::rotate(theta)
        * Projection::translate(0.5 - w / 2.0, 0.5 - h / 2.0);
    (p, out)
}

/// Maps a box (continuous pixel edges) through a rotation: the enclosing box of its four
/// rotated corners, clamped to the canvas.
fn rotate_box(b: &BBox, p: &Projection, out: (u32, u32)) -> BBox {
    // Continuous point q ↦ index space q − ½ ↦ projected ↦ continuous + ½.
    let corners = [(b[0], b[1]), (b[2], b[1]), (b[0], b[3]), (b[2], b[3])].map(|(x, y)| {
        let (px, py) = *p * ((x - 0.5) as f32, (y - 0.5) as f32);
        (px as f64 + 0.5, py as f64 + 0.5)
    });
    let xs = corners.map(|c| c.0);
    let ys = corners.map(|c| c.1);
    let min = |v: [f64; 4]| v.into_iter().fold(f64::INFINITY, f64::min);
    let max = |v: [f64; 4]| v.into_iter().fold(f64::NEG_INFINITY, f64::max);
    [
        min(xs).max(0.0),
        min(ys).max(0.0),
        max(xs).min(out.0 as f64),
        max(ys).min(out.1 as f64),
    ]
}

fn area(b: &BBox) -> f64 {
    (b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0)
}

fn intersect(b: &BBox, x: u32, y: u32, w: u32, h: u32) -> BBox {
    [
        b[0].max(x as f64),
        b[1].max(y as f64),
        b[2].min((x + w) as f64),
        b[3].min((y + h) as f64),
    ]
}

/// Rounds a transformed box to 1/100 px, as annotations store them.
fn tidy(b: BBox) -> BBox {
    b.map(|v| (v * 100.0).round() / 100.0)
}

/// Applies one operation to an image and its violations. A crop removes the violations whose
/// box lies entirely outside it and clips the others.
pub fn apply(img: &RgbImage, violations: &[Violation], op: &Op) -> (RgbImage, Vec<Violation>) {
    let (w, h) = img.dimensions();
    let pixels = match *op {
        Op::Flip => image::imageops::flip_horizontal(img),
        Op::Rotate { degrees } => {
            let (p, out) = rotation((w, h), degrees);
            let mut rotated = RgbImage::new(out.0, out.1);
            warp_into(
                img,
                p,
                Interpolation::Bilinear,
                Border::Constant(Rgb([0, 0, 0])),
                &mut rotated,
            );
            rotated
        }
        Op::Crop {
            x,
            y,
            width,
            height,
        } => image::imageops::crop_imm(img, x, y, width, height).to_image(),
        Op::Brightness { factor } => map_pixels(img, |c| c as f32 * factor),
        Op::Contrast { factor } => {
            let mean = grey_mean(img);
            map_pixels(img, |c| mean + (c as f32 - mean) * factor)
        }
        Op::Blur { sigma } => image::imageops::fast_blur(img, sigma),
    };
    (pixels, transform(img.dimensions(), violations, op).1)
}

/// What one operation does to an image's size and its violations' boxes, without touching
/// pixels: the geometry [`apply`] uses, also used to draw crops cheaply.
fn transform(size: (u32, u32), violations: &[Violation], op: &Op) -> ((u32, u32), Vec<Violation>) {
    let map_boxes = |f: &dyn Fn(&BBox) -> BBox| -> Vec<Violation> {
        violations
            .iter()
            .map(|v| Violation {
                bbox: v.bbox.as_ref().map(|b| tidy(f(b))),
                ..v.clone()
            })
            .collect()
    };
    let w = size.0 as f64;
    match *op {
        Op::Flip => (size, map_boxes(&|b| [w - b[2], b[1], w - b[0], b[3]])),
        Op::Rotate { degrees } => {
            let (p, out) = rotation(size, degrees);
            (out, map_boxes(&|b| rotate_box(b, &p, out)))
        }
        Op::Crop {
            x,
            y,
            width,
            height,
        } => {
            let kept = violations
                .iter()
                .filter_map(|v| match &v.bbox {
                    None => Some(v.clone()),
                    Some(b) => {
                        let inside = intersect(b, x, y, width, height);
                        (area(&inside) > 0.0).then(|| Violation {
                            bbox: Some(tidy([
                                inside[0] - x as f64,
                                inside[1] - y as f64,
                                inside[2] - x as f64,
                                inside[3] - y as f64,
                            ])),
                            ..v.clone()
                        })
                    }
                })
                .collect();
            ((width, height), kept)
        }
        Op::Brightness { .. } | Op::Contrast { .. } | Op::Blur { .. } => {
            (size, violations.to_vec())
        }
    }
}

fn map_pixels(img: &RgbImage, f: impl Fn(u8) -> f32) -> RgbImage {
    let lut: [u8; 256] = std::array::from_fn(|c| f(c as u8).round().clamp(0.0, 255.0) as u8);
    let mut out = img.clone();
    for c in out.iter_mut() {
        *c = lut[*c as usize];
    }
    out
}

/// The mean of the ITU-R 601 luma (Pillow's `convert("L")`), rounded to an integer as
/// `ImageEnhance.Contrast` does.
fn grey_mean(img: &RgbImage) -> f32 {
    let n = (img.width() as u64 * img.height() as u64).max(1);
    let sum: u64 = img
        .pixels()
        .map(|Rgb([r, g, b])| (*r as u64 * 299 + *g as u64 * 587 + *b as u64 * 114 + 500) / 1000)
        .sum();
    (sum as f64 / n as f64 + 0.5).floor() as f32
}

/// Draws a random pipeline for one copy. Geometry first (flip, rotate, crop), then colour.
/// A crop is only drawn when every violation has a box, and only one that leaves each box
/// either ≥ 60 % inside or entirely outside; after 20 failed draws the copy is not cropped.
fn sample_ops(rng: &mut ChaCha8Rng, img: &RgbImage, violations: &[Violation]) -> Vec<Op> {
    let mut ops = Vec::new();
    if rng.random_bool(0.5) {
        ops.push(Op::Flip);
    }
    if rng.random_bool(0.5) {
        let degrees = rng.random_range(-15.0f32..=15.0);
        ops.push(Op::Rotate {
            degrees: (degrees * 100.0).round() / 100.0,
        });
    }
    if violations.iter().all(|v| v.bbox.is_some()) && rng.random_bool(0.5) {
        // The size and boxes after the geometry drawn so far (no pixels needed).
        let (mut size, mut cur) = (img.dimensions(), violations.to_vec());
        for op in &ops {
            (size, cur) = transform(size, &cur, op);
        }
        let (w, h) = size;
        for _ in 0..20 {
            let cw = ((w as f64 * rng.random_range(0.7..1.0)) as u32).max(MIN_CROP_SIDE);
            let ch = ((h as f64 * rng.random_range(0.7..1.0)) as u32).max(MIN_CROP_SIDE);
            if cw > w || ch > h {
                break;
            }
            let x = rng.random_range(0..=w - cw);
            let y = rng.random_range(0..=h - ch);
            let clean = cur.iter().filter_map(|v| v.bbox.as_ref()).all(|b| {
                let visible = area(&intersect(b, x, y, cw, ch)) / area(b).max(f64::MIN_POSITIVE);
                visible == 0.0 || visible >= MIN_VISIBLE
            });
            if clean {
                ops.push(Op::Crop {
                    x,
                    y,
                    width: cw,
                    height: ch,
                });
                break;
            }
        }
    }
    let round = |v: f32| (v * 100.0).round() / 100.0;
    if rng.random_bool(0.5) {
        ops.push(Op::Brightness {
            factor: round(rng.random_range(0.7..=1.3)),
        });
    }
    if rng.random_bool(0.5) {
        ops.push(Op::Contrast {
            factor: round(rng.random_range(0.7..=1.3)),
        });
    }
    if rng.random_bool(0.3) {
        ops.push(Op::Blur {
            sigma: round(rng.random_range(0.5..=1.5)),
        });
    }
    if ops.is_empty() {
        ops.push(Op::Flip);
    }
    ops
}

/// Applies a pipeline of operations in order.
pub fn apply_all(
    img: &RgbImage,
    violations: &[Violation],
    ops: &[Op],
) -> (RgbImage, Vec<Violation>) {
    let mut cur = (img.clone(), violations.to_vec());
    for op in ops {
        cur = apply(&cur.0, &cur.1, op);
    }
    cur
}

/// Options of [`augment()`].
#[derive(Debug, Clone)]
pub struct AugmentOptions {
    /// Augmented copies per original.
    pub factor: usize,
    pub seed: u64,
}

/// What an augmentation run wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AugmentSummary {
    pub originals: usize,
    pub copies: usize,
    /// Violations removed because a crop cut their box away.
    pub removed_violations: usize,
    /// Copies whose pixels equalled an earlier output and were drawn again.
    pub redrawn: usize,
}

#[derive(Serialize)]
struct ManifestEntry {
    file: String,
    source: String,
    source_sha256: String,
    line: usize,
    ops: Vec<Op>,
}

/// Encodes an image as PNG (fast compression: augmented copies are written once, read a few
/// times).
pub fn encode_png(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    let encoder = PngEncoder::new_with_quality(
        Cursor::new(&mut out),
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    );
    img.write_with_encoder(encoder)
        .expect("PNG encoding into memory cannot fail");
    out
}

/// Writes `dir/name` unless a file with that content-hash name is already there.
fn write_named(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), Error> {
    let path = dir.join(name);
    if path.exists() {
        return Ok(());
    }
    write_atomic(&path, bytes)
}

/// Augments a dataset into `out_dir`: `images/` (originals copied, copies as PNG, all named by
/// content hash), `annotations.jsonl` (originals, then their copies, each original followed by
/// its copies) and `manifest.jsonl`. Refuses to run when any image also appears in `exclude`
/// (the eval split): augmenting it would leak eval photos into training.
///
/// Deterministic: a copy's operations depend on the seed, the source's content and the copy
/// number only, not on thread scheduling. `progress` is called once per original.
pub fn augment(
    dataset: &Dataset,
    options: &AugmentOptions,
    exclude: Option<&Dataset>,
    out_dir: &Path,
    progress: &(dyn Fn() + Sync),
) -> Result<AugmentSummary, Error> {
    if let Some(eval) = exclude {
        let eval_hashes: std::collections::HashMap<[u8; 32], usize> =
            eval.records.iter().map(|r| (r.sha256, r.line)).collect();
        let clashes: Vec<String> = dataset
            .records
            .iter()
            .filter_map(|r| {
                eval_hashes.get(&r.sha256).map(|l| {
                    format!(
                        "line {} ({}) is line {l} of {}",
                        r.line,
                        r.annotation.image,
                        eval.file.display()
                    )
                })
            })
            .collect();
        if !clashes.is_empty() {
            return Err(Error::Refused(format!(
                "{}: {} image(s) also appear in the eval file, and augmenting them would leak eval photos into training: {}",
                dataset.file.display(),
                clashes.len(),
                clashes.join("; ")
            )));
        }
    }
    let images_dir = out_dir.join("images");
    create_dir(&images_dir)?;

    struct Output {
        annotations: Vec<Annotation>,
        manifest: Vec<ManifestEntry>,
        removed: usize,
        redrawn: usize,
    }
    let per_record: Vec<Result<Output, Error>> = dataset
        .records
        .par_iter()
        .map(|r| {
            let bytes = std::fs::read(&r.path).map_err(|e| Error::io(&r.path, e))?;
            let img =
                inspector_imaging::decode_rgb(&bytes, inspector_imaging::DEFAULT_MAX_DECODE_PIXELS)
                    .map_err(|e| Error::Format {
                        file: r.path.clone(),
                        location: format!("line {}", r.line),
                        message: e.0,
                    })?;
            let source = crate::relative_to(&r.path, out_dir)?;
            let name = store_image(&r.path, &bytes, out_dir)?;
            let mut out = Output {
                annotations: vec![Annotation {
                    image: name.clone(),
                    violations: r.annotation.violations.clone(),
                }],
                manifest: vec![ManifestEntry {
                    file: name,
                    source: source.clone(),
                    source_sha256: r.sha256_hex(),
                    line: r.line,
                    ops: vec![],
                }],
                removed: 0,
                redrawn: 0,
            };
            let mut seen = HashSet::new();
            for k in 0..options.factor {
                let mut attempt = 0u64;
                let (png, violations, ops) = loop {
                    let seed: [u8; 32] = Sha256::new()
                        .chain_update(options.seed.to_le_bytes())
                        .chain_update(r.sha256)
                        .chain_update((r.line as u64).to_le_bytes())
                        .chain_update((k as u64).to_le_bytes())
                        .chain_update(attempt.to_le_bytes())
                        .finalize()
                        .into();
                    let mut rng = ChaCha8Rng::from_seed(seed);
                    let ops = sample_ops(&mut rng, &img, &r.annotation.violations);
                    let (aug, violations) = apply_all(&img, &r.annotation.violations, &ops);
                    let png = encode_png(&aug);
                    if seen.insert(Sha256::digest(&png)) || attempt >= 4 {
                        break (png, violations, ops);
                    }
                    attempt += 1;
                    out.redrawn += 1;
                };
                out.removed += r.annotation.violations.len() - violations.len();
                let name = format!("images/{}.png", short_hash(&png));
                write_named(out_dir, &name, &png)?;
                out.annotations.push(Annotation {
                    image: name.clone(),
                    violations,
                });
                out.manifest.push(ManifestEntry {
                    file: name,
                    source: source.clone(),
                    source_sha256: r.sha256_hex(),
                    line: r.line,
                    ops,
                });
            }
            progress();
            Ok(out)
        })
        .collect();

    let mut summary = AugmentSummary {
        originals: dataset.records.len(),
        ..Default::default()
    };
    let (mut annotations, mut manifest) = (Vec::new(), Vec::new());
    for out in per_record {
        let out = out?;
        summary.copies += out.annotations.len() - 1;
        summary.removed_violations += out.removed;
        summary.redrawn += out.redrawn;
        annotations.extend(out.annotations);
        manifest.extend(out.manifest);
    }
    write_atomic(&out_dir.join("manifest.jsonl"), &jsonl(&manifest))?;
    write_atomic(&out_dir.join("annotations.jsonl"), &jsonl(&annotations))?;
    Ok(summary)
}
