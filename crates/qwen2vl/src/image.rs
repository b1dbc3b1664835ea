//! The Qwen2-VL image processor: image file → `pixel_values` `[n_patches, 3·2·14·14]` and its
//! `grid_thw`, equivalent to the one transformers' `AutoProcessor` loads.
//!
//! Steps, as transformers does them: decode (EXIF orientation applied, as `load_image` does),
//! convert to RGB (alpha dropped, palette expanded, grey replicated), `smart_resize` to
//! multiples of 28 within the pixel limits, bicubic resize (Pillow's convolution, ported
//! exactly), rescale by 1/255, normalise with the config's
//! mean/std, repeat the still image to 2 frames and flatten patches in the reference's order.
//!
//! Untrusted input is checked from the header before any pixel memory is allocated: the format
//! is sniffed from the bytes (an allow-list), and the declared dimensions are checked against a
//! pixel budget, so a "decompression bomb" is refused cheaply.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
pub use inspector_imaging::{DEFAULT_MAX_DECODE_PIXELS, MIN_SIDE};

/// Decodes image bytes to RGB under the project's one decoding policy
/// ([`inspector_imaging::decode_rgb`]).
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, Error> {
    inspector_imaging::decode_rgb(bytes, max_pixels).map_err(|e| Error::Image(e.0))
}
use serde_json::Value;

use crate::Error;

/// Pixel settings of the processor (`preprocessor_config.json` / `processor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    /// Images declaring more pixels than this are refused before decoding.
    pub max_decode_pixels: u64,
}

impl Default for ProcessorConfig {
    /// Qwen2-VL's published settings.
    fn default() -> Self {
        ProcessorConfig {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 16384,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
            max_decode_pixels: DEFAULT_MAX_DECODE_PIXELS,
        }
    }
}

impl ProcessorConfig {
    /// Reads the processor settings of a model directory: `preprocessor_config.json` (the hub's)
    /// or the `image_processor` section of `processor_config.json` (transformers 5's). With
    /// neither, the published defaults.
    pub fn from_model_dir(dir: &Path) -> Result<Self, Error> {
        for (name, section) in [
            ("preprocessor_config.json", None),
            ("processor_config.json", Some("image_processor")),
        ] {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let json: Value = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
                path: path.clone(),
                message: format!("not valid JSON: {e}"),
            })?;
            let value = match section {
                Some(s) => json.get(s).cloned().unwrap_or(json),
                None => json,
            };
            return Self::from_json(&value).map_err(|message| Error::Checkpoint { path, message });
        }
        Ok(Self::default())
    }

    /// Writes these pixel limits into the model directory `dir`'s processor config (the
    /// file [`ProcessorConfig::from_model_dir`] reads; a `size` object gets them too), or
    /// writes a `preprocessor_config.json` with every setting when there is none.
    pub fn write_pixels(&self, dir: &Path) -> Result<(), Error> {
        let set = |v: &mut Value| {
            if let Some(obj) = v.as_object_mut() {
                obj.insert("min_pixels".into(), self.min_pixels.into());
                obj.insert("max_pixels".into(), self.max_pixels.into());
                if let Some(size) = obj.get_mut("size").and_then(Value::as_object_mut) {
                    for (key, n) in [
                        ("min_pixels", self.min_pixels),
                        ("shortest_edge", self.min_pixels),
                        ("max_pixels", self.max_pixels),
                        ("longest_edge", self.max_pixels),
                    ] {
                        if size.contains_key(key) {
                            size.insert(key.into(), n.into());
                        }
                    }
                }
            }
        };
        let mut target = None;
        for (name, section) in [
            ("preprocessor_config.json", None),
            ("processor_config.json", Some("image_processor")),
        ] {
            let path = dir.join(name);
            if path.exists() {
                target = Some((path, section));
                break;
            }
        }
        let (path, json) = match target {
            Some((path, section)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                let mut json: Value =
                    serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
                        path: path.clone(),
                        message: format!("not valid JSON: {e}"),
                    })?;
                match section.and_then(|s| json.get_mut(s)) {
                    Some(inner) => set(inner),
                    None => set(&mut json),
                }
                (path, json)
            }
            None => (
                dir.join("preprocessor_config.json"),
                serde_json::json!({
                    "image_processor_type": "Qwen2VLImageProcessor",
                    "min_pixels": self.min_pixels,
                    "max_pixels": self.max_pixels,
                    "patch_size": self.patch_size,
                    "temporal_patch_size": self.temporal_patch_size,
                    "merge_size": self.merge_size,
                    "image_mean": self.image_mean,
                    "image_std": self.image_std,
                }),
            ),
        };
        let bytes = serde_json::to_vec_pretty(&json).expect("JSON");
        inspector_lora::write_atomic(&path, |tmp| {
            std::fs::write(tmp, &bytes).map_err(candle_core::Error::wrap)
        })?;
        Ok(())
    }

    fn from_json(v: &Value) -> Result<Self, String> {
        let mut c = Self::default();
        let num = |key: &str| -> Result<Option<usize>, String> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| format!("{key}: expected an integer, found {x}")),
            }
        };
        let size = v.get("size");
        let size_num = |key: &str| {
            size.and_then(|s| s.get(key))
                .and_then(Value::as_u64)
                .map(|n| n as usize)
        };
        c.min_pixels = num("min_pixels")?
            .or(size_num("min_pixels"))
            .or(size_num("shortest_edge"))
            .unwrap_or(c.min_pixels);
        c.max_pixels = num("max_pixels")?
            .or(size_num("max_pixels"))
            .or(size_num("longest_edge"))
            .unwrap_or(c.max_pixels);
        c.patch_size = num("patch_size")?.unwrap_or(c.patch_size);
        c.temporal_patch_size = num("temporal_patch_size")?.unwrap_or(c.temporal_patch_size);
        c.merge_size = num("merge_size")?.unwrap_or(c.merge_size);
        for (key, target) in [
            ("image_mean", &mut c.image_mean),
            ("image_std", &mut c.image_std),
        ] {
            if let Some(x) = v.get(key) {
                let values: Option<Vec<f32>> = x
                    .as_array()
                    .and_then(|a| a.iter().map(|n| n.as_f64().map(|f| f as f32)).collect());
                match values {
                    Some(vals) if vals.len() == 3 => target.copy_from_slice(&vals),
                    _ => return Err(format!("{key}: expected three numbers, found {x}")),
                }
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// Overrides the pixel limits (the `--min-pixels` / `--max-pixels` options).
    pub fn with_pixels(
        mut self,
        min_pixels: Option<usize>,
        max_pixels: Option<usize>,
    ) -> Result<Self, Error> {
        if let Some(n) = min_pixels {
            self.min_pixels = n;
        }
        if let Some(n) = max_pixels {
            self.max_pixels = n;
        }
        self.validate().map_err(Error::Image)?;
        Ok(self)
    }

    fn validate(&self) -> Result<(), String> {
        let factor = self.factor();
        if self.patch_size == 0 || self.merge_size == 0 || self.temporal_patch_size == 0 {
            return Err("patch_size, merge_size and temporal_patch_size must be positive".into());
        }
        if self.max_pixels < factor * factor {
            return Err(format!(
                "max_pixels {} is below one {factor}×{factor} block",
                self.max_pixels
            ));
        }
        if self.min_pixels > self.max_pixels {
            return Err(format!(
                "min_pixels {} exceeds max_pixels {}",
                self.min_pixels, self.max_pixels
            ));
        }
        if self.image_std.contains(&0.0) {
            return Err("image_std has a zero".into());
        }
        Ok(())
    }

    /// The side multiple images are resized to: patch × merge (28).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }
}

/// An image turned into model input.
#[derive(Debug, Clone)]
pub struct ProcessedImage {
    /// `[grid_t · grid_h · grid_w, C · T · P · P]`, f32.
    pub pixel_values: Tensor,
    /// (grid_t, grid_h, grid_w) in patches.
    pub grid_thw: [usize; 3],
    /// The size the image was resized to, (height, width).
    pub resized_hw: (usize, usize),
}

impl ProcessedImage {
    /// How many `<|image_pad|>` tokens the image takes: one per merged 2×2 block.
    pub fn n_tokens(&self, merge_size: usize) -> usize {
        self.grid_thw.iter().product::<usize>() / (merge_size * merge_size)
    }
}

/// Qwen2-VL's resize rule: both sides multiples of `factor`, total pixels within
/// [min_pixels, max_pixels], aspect ratio kept as well as possible. Matches transformers,
/// including Python's round-half-to-even.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), Error> {
    if height == 0 || width == 0 {
        return Err(Error::Image(format!(
            "image has no pixels ({width}×{height})"
        )));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(Error::Image(format!(
            "aspect ratio {ratio:.1} is above 200 ({width}×{height})"
        )));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// An image resized to its model input size but not yet normalised: 3 bytes a pixel, an
/// eighth of its f32 patches. Training keeps photos in memory in this form and patches them
/// for each batch ([`ResizedImage::to_processed`]), which gives the same pixels as
/// [`process_rgb`].
#[derive(Debug, Clone)]
pub struct ResizedImage {
    /// The resized image, (height, width) a multiple of the patch size times the merge size.
    pub rgb: RgbImage,
    /// (grid_t, grid_h, grid_w) in patches.
    pub grid_thw: [usize; 3],
}

impl ResizedImage {
    /// How many `<|image_pad|>` tokens the image takes: one per merged 2×2 block.
    pub fn n_tokens(&self, merge_size: usize) -> usize {
        self.grid_thw.iter().product::<usize>() / (merge_size * merge_size)
    }

    /// Bytes of pixels held.
    pub fn bytes(&self) -> usize {
        self.rgb.as_raw().len()
    }

    /// Normalises and flattens the image into patches, as [`process_rgb`] does after resizing.
    pub fn to_processed(&self, config: &ProcessorConfig) -> Result<ProcessedImage, Error> {
        let (rw, rh) = (self.rgb.width() as usize, self.rgb.height() as usize);
        let (p, tp, m) = (
            config.patch_size,
            config.temporal_patch_size,
            config.merge_size,
        );
        let (gh, gw) = (rh / p, rw / p);
        if [1, gh, gw] != self.grid_thw || gh * p != rh || gw * p != rw || gh % m + gw % m != 0 {
            return Err(Error::Image(format!(
                "a {rw}×{rh} image does not make the patch grid {:?} of these processor settings",
                self.grid_thw
            )));
        }
        let channels = 3;
        // (x − 255·mean) / (255·std), as the torchvision processor fuses rescale and normalise.
        let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * config.image_std[c]));
        let shift: [f32; 3] = std::array::from_fn(|c| 255.0 * config.image_mean[c]);
        let raw = self.rgb.as_raw();
        // Patch order: for each merged block (row-major), its 2×2 patches (row-major); each
        // patch is [C, T, P, P] with the still frame repeated T times.
        let patch_len = channels * tp * p * p;
        let n_patches = gh * gw;
        let mut out = Vec::with_capacity(n_patches * patch_len);
        let mut frame = vec![0f32; p * p];
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (py, px) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        for c in 0..channels {
                            for y in 0..p {
                                let row = ((py + y) * rw + px) * 3 + c;
                                for x in 0..p {
                                    frame[y * p + x] =
                                        (raw[row + x * 3] as f32 - shift[c]) * scale[c];
                                }
                            }
                            for _t in 0..tp {
                                out.extend_from_slice(&frame);
                            }
                        }
                    }
                }
            }
        }
        let pixel_values = Tensor::from_vec(out, (n_patches, patch_len), &Device::Cpu)?;
        Ok(ProcessedImage {
            pixel_values,
            grid_thw: self.grid_thw,
            resized_hw: (rh, rw),
        })
    }
}

/// Reads and processes an image file.
pub fn process_file(path: &Path, config: &ProcessorConfig) -> Result<ProcessedImage, Error> {
    resize_file(path, config)?.to_processed(config)
}

/// Reads an image file and resizes it to its model input size (see [`ResizedImage`]). Errors
/// name the file.
pub fn resize_file(path: &Path, config: &ProcessorConfig) -> Result<ResizedImage, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_rgb(&bytes, config.max_decode_pixels)
        .and_then(|rgb| resize_rgb(&rgb, config))
        .map_err(|e| match e {
            Error::Image(message) => Error::ImageFile {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
}

/// Processes image bytes.
pub fn process_bytes(bytes: &[u8], config: &ProcessorConfig) -> Result<ProcessedImage, Error> {
    let rgb = decode_rgb(bytes, config.max_decode_pixels)?;
    process_rgb(&rgb, config)
}

/// Bicubic resize exactly as Pillow's `Image.resize(size, BICUBIC)` computes it (the PIL
/// processor's path; torchvision's antialiased bicubic differs from it by at most one level on
/// a few pixels): separable convolution with the a = −0.5 cubic, support widened by the scale
/// when shrinking, coefficients in 22-bit fixed point summed in 32-bit integers as Pillow's
/// 8-bit path does, the horizontal pass first with a rounded 8-bit intermediate. General-purpose
/// resizers (the `image` crate, fast_image_resize) were measured here to differ from Pillow by
/// up to 5 levels, hence this port. The vertical pass runs along whole rows so that it
/// vectorises.
pub fn resize_bicubic(rgb: &RgbImage, height: usize, width: usize) -> Result<RgbImage, Error> {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    if height == 0 || width == 0 {
        return Err(Error::Image("cannot resize to zero pixels".into()));
    }
    let horizontal;
    let (data, cur_w): (&[u8], usize) = if width != w {
        let coeffs = pillow_coeffs(w, width);
        let mut out = vec![0u8; width * h * 3];
        for (row, out_row) in rgb
            .as_raw()
            .chunks_exact(w * 3)
            .zip(out.chunks_exact_mut(width * 3))
        {
            for ((start, k), px) in coeffs.iter().zip(out_row.chunks_exact_mut(3)) {
                let taps = &row[start * 3..(start + k.len()) * 3];
                let mut ss = [ROUNDING; 3];
                for (tap, &kk) in taps.chunks_exact(3).zip(k) {
                    ss[0] += tap[0] as i32 * kk;
                    ss[1] += tap[1] as i32 * kk;
                    ss[2] += tap[2] as i32 * kk;
                }
                px[0] = clip8(ss[0]);
                px[1] = clip8(ss[1]);
                px[2] = clip8(ss[2]);
            }
        }
        horizontal = out;
        (&horizontal, width)
    } else {
        (rgb.as_raw(), w)
    };
    let out = if height != h {
        let coeffs = pillow_coeffs(h, height);
        let row_len = cur_w * 3;
        let mut out = vec![0u8; row_len * height];
        let mut ss = vec![0i32; row_len];
        for ((start, k), out_row) in coeffs.iter().zip(out.chunks_exact_mut(row_len)) {
            ss.fill(ROUNDING);
            for (i, &kk) in k.iter().enumerate() {
                let row = &data[(start + i) * row_len..(start + i + 1) * row_len];
                for (acc, &v) in ss.iter_mut().zip(row) {
                    *acc += v as i32 * kk;
                }
            }
            for (o, &acc) in out_row.iter_mut().zip(&ss) {
                *o = clip8(acc);
            }
        }
        out
    } else {
        data.to_vec()
    };
    RgbImage::from_raw(width as u32, height as u32, out)
        .ok_or_else(|| Error::Image("resize produced a wrong buffer".into()))
}

/// Pillow's fixed-point precision for 8-bit images: 32 − 8 − 2 bits.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Half a unit of the fixed point, added before truncating.
const ROUNDING: i32 = 1 << (PRECISION_BITS - 1);

fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: for each output index, the first
/// input index and the fixed-point weights.
fn pillow_coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filter_scale;
            // C's (int) cast truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut k: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic_filter((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = k.iter().sum();
            if total != 0.0 {
                k.iter_mut().for_each(|v| *v /= total);
            }
            let fixed = k
                .iter()
                .map(|&v| {
                    let scaled = v * (1u64 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (scaled - 0.5) as i32
                    } else {
                        (scaled + 0.5) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// Resizes an RGB image to its model input size ([`smart_resize`], Pillow's bicubic).
pub fn resize_rgb(rgb: &RgbImage, config: &ProcessorConfig) -> Result<ResizedImage, Error> {
    let (w, h) = rgb.dimensions();
    let (rh, rw) = smart_resize(
        h as usize,
        w as usize,
        config.factor(),
        config.min_pixels,
        config.max_pixels,
    )?;
    let p = config.patch_size;
    Ok(ResizedImage {
        rgb: resize_bicubic(rgb, rh, rw)?,
        grid_thw: [1, rh / p, rw / p],
    })
}

/// Resizes, normalises and flattens an RGB image.
pub fn process_rgb(rgb: &RgbImage, config: &ProcessorConfig) -> Result<ProcessedImage, Error> {
    resize_rgb(rgb, config)?.to_processed(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Pillow's convolution written out directly: every output value sums its taps in 64 bits.
    fn reference_resize(rgb: &RgbImage, height: usize, width: usize) -> RgbImage {
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let round = |ss: i64| (ss >> PRECISION_BITS).clamp(0, 255) as u8;
        let mut data = rgb.as_raw().clone();
        let mut cur_w = w;
        if width != w {
            let coeffs = pillow_coeffs(w, width);
            let mut out = vec![0u8; width * h * 3];
            for y in 0..h {
                for (x, (start, k)) in coeffs.iter().enumerate() {
                    for c in 0..3 {
                        let mut ss = ROUNDING as i64;
                        for (i, &kk) in k.iter().enumerate() {
                            ss += data[(y * w + start + i) * 3 + c] as i64 * kk as i64;
                        }
                        out[(y * width + x) * 3 + c] = round(ss);
                    }
                }
            }
            (data, cur_w) = (out, width);
        }
        if height != h {
            let coeffs = pillow_coeffs(h, height);
            let mut out = vec![0u8; cur_w * height * 3];
            for (y, (start, k)) in coeffs.iter().enumerate() {
                for x in 0..cur_w * 3 {
                    let mut ss = ROUNDING as i64;
                    for (i, &kk) in k.iter().enumerate() {
                        ss += data[(start + i) * cur_w * 3 + x] as i64 * kk as i64;
                    }
                    out[y * cur_w * 3 + x] = round(ss);
                }
            }
            data = out;
        }
        RgbImage::from_raw(width as u32, height as u32, data).unwrap()
    }

    #[test]
    fn the_row_wise_resize_equals_the_direct_convolution() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Shrinking, enlarging, one side only, and extreme values (black/white edges push the
        // sums furthest from the middle).
        for (w, h, tw, th) in [
            (320, 240, 280, 196),
            (97, 61, 224, 140),
            (50, 300, 50, 112),
            (300, 50, 84, 50),
            (640, 480, 56, 56),
            (33, 33, 33, 33),
        ] {
            let pixels: Vec<u8> = (0..w * h * 3)
                .map(|_| {
                    if rng.random_bool(0.3) {
                        255 * rng.random_range(0..2u8)
                    } else {
                        rng.random()
                    }
                })
                .collect();
            let img = RgbImage::from_raw(w as u32, h as u32, pixels).unwrap();
            let ours = resize_bicubic(&img, th, tw).unwrap();
            assert_eq!(ours, reference_resize(&img, th, tw), "{w}×{h} → {tw}×{th}");
        }
    }

    #[test]
    fn resized_images_patch_into_the_processed_pixels() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let pixels: Vec<u8> = (0..320 * 240 * 3).map(|_| rng.random()).collect();
        let img = RgbImage::from_raw(320, 240, pixels).unwrap();
        let config = ProcessorConfig::default()
            .with_pixels(Some(3136), Some(60000))
            .unwrap();
        let resized = resize_rgb(&img, &config).unwrap();
        assert_eq!(resized.grid_thw, [1, 14, 20]);
        assert_eq!(resized.bytes(), 280 * 196 * 3);
        let processed = resized.to_processed(&config).unwrap();
        // Patch 0 is the top-left 14×14 block: channel 0, frame 0, row 0, column 1.
        let v: Vec<Vec<f32>> = processed.pixel_values.to_vec2().unwrap();
        assert_eq!((v.len(), v[0].len()), (280, 3 * 2 * 14 * 14));
        let expect = (resized.rgb.get_pixel(1, 0)[0] as f32 - 255.0 * config.image_mean[0])
            / (255.0 * config.image_std[0]);
        assert!((v[0][1] - expect).abs() < 1e-6);
        // Frame 1 repeats frame 0.
        assert_eq!(v[5][..196], v[5][196..392]);
        // Another processor's grid is refused, not patched wrongly.
        let other = ProcessorConfig {
            patch_size: 16,
            ..config.clone()
        };
        assert!(resized.to_processed(&other).is_err());
    }
}
