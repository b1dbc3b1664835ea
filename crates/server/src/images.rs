//! Photos: checked from their header before anything is queued, named by content hash (the
//! photo store keeps them), and drawn with their boxes.

use axum::http::StatusCode;
use image::ImageFormat;
use inspector_core::Risk;
use inspector_detect::Finding;

use crate::error::ApiError;

/// What the header of an accepted photo says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

impl Probe {
    /// The file extension photos of this format are stored with (`jpg`, `png`, …).
    pub fn extension(&self) -> &'static str {
        self.format.extensions_str()[0]
    }
}

/// Checks a photo from its header alone: an allowed format (sniffed from the bytes; the
/// Content-Type is not trusted), a readable header, at most `max_pixels` pixels, both sides at
/// least 28 px, and a JPEG's end marker. Nothing is decoded.
pub fn probe(bytes: &[u8], max_pixels: u64) -> Result<Probe, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad_request("empty_image", "the image is empty"));
    }
    let unsupported = |message: String| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_image",
            message,
        )
    };
    let format = image::guess_format(bytes).map_err(|_| {
        unsupported("not an image: accepted formats are JPEG, PNG, WebP, BMP, GIF and TIFF".into())
    })?;
    if !inspector_imaging::ALLOWED_FORMATS.contains(&format) {
        return Err(unsupported(format!(
            "{format:?} images are not accepted: use JPEG, PNG, WebP, BMP, GIF or TIFF"
        )));
    }
    let (width, height) = inspector_imaging::dimensions(bytes).map_err(|e| {
        ApiError::unprocessable("corrupt_image", format!("corrupt {format:?} image: {e}"))
    })?;
    if format == ImageFormat::Jpeg && !inspector_imaging::jpeg_is_complete(bytes) {
        return Err(ApiError::unprocessable(
            "corrupt_image",
            "truncated JPEG image: no end-of-image marker after the last scan",
        ));
    }
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(ApiError::too_large(
            "image_too_large",
            format!(
                "the image declares {width}×{height} = {:.1} megapixels, above the limit of {:.1}",
                pixels as f64 / 1e6,
                max_pixels as f64 / 1e6
            ),
        ));
    }
    let min = inspector_imaging::MIN_SIDE;
    if width < min || height < min {
        return Err(ApiError::unprocessable(
            "image_too_small",
            format!("the image is {width}×{height}: both sides must be at least {min} px"),
        ));
    }
    Ok(Probe {
        format,
        width,
        height,
    })
}

/// Where a photo with this hash is stored, relative to the data dir. Only the hash (hex) and
/// our own extension make the name: nothing a client sends becomes a path.
pub fn relative_path(sha256: &str, probe: &Probe) -> Result<String, ApiError> {
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::internal("an image hash is not 64 hex digits"));
    }
    Ok(format!(
        "images/{}/{sha256}.{}",
        &sha256[..2],
        probe.extension()
    ))
}

/// The content type of a stored photo, from the extension we gave it.
pub fn content_type(relative: &str) -> &'static str {
    relative
        .rsplit('.')
        .next()
        .and_then(ImageFormat::from_extension)
        .map(|f| f.to_mime_type())
        .unwrap_or("application/octet-stream")
}

/// The colour of a risk level: 高 red, 中 orange, 低 gold, unknown grey.
pub fn risk_colour(risk: Option<Risk>) -> [u8; 3] {
    match risk {
        Some(Risk::High) => [0xd3, 0x2f, 0x2f],
        Some(Risk::Medium) => [0xf5, 0x7c, 0x00],
        Some(Risk::Low) => [0xfb, 0xc0, 0x2d],
        None => [0x75, 0x75, 0x75],
    }
}

/// The photo (upright, as the model saw it) with each violation's box drawn in its risk's
/// colour, as a JPEG.
pub fn draw_boxes(bytes: &[u8], finding: &Finding, max_pixels: u64) -> Result<Vec<u8>, String> {
    let rgb = inspector_imaging::decode_rgb(bytes, max_pixels).map_err(|e| e.to_string())?;
    let (w, h) = rgb.dimensions();
    let mut pixmap = tiny_skia::Pixmap::new(w, h).ok_or("the image has no pixels")?;
    for (dst, src) in pixmap.data_mut().chunks_exact_mut(4).zip(rgb.pixels()) {
        dst.copy_from_slice(&[src[0], src[1], src[2], 255]);
    }
    let width = (w.min(h) as f32 / 150.0).max(2.0);
    let stroke = tiny_skia::Stroke {
        width,
        ..Default::default()
    };
    for v in &finding.violations {
        let Some([x1, y1, x2, y2]) = v.bbox else {
            continue;
        };
        let Some(rect) = tiny_skia::Rect::from_ltrb(
            x1.min(x2) as f32,
            y1.min(y2) as f32,
            x1.max(x2) as f32,
            y1.max(y2) as f32,
        ) else {
            continue;
        };
        let [r, g, b] = risk_colour(v.risk);
        let mut paint = tiny_skia::Paint::default();
        paint.set_color_rgba8(r, g, b, 255);
        let path = tiny_skia::PathBuilder::from_rect(rect);
        pixmap.stroke_path(
            &path,
            &paint,
            &stroke,
            tiny_skia::Transform::identity(),
            None,
        );
    }
    let out = image::RgbImage::from_fn(w, h, |x, y| {
        let p = pixmap.pixel(x, y).expect("inside").demultiply();
        image::Rgb([p.red(), p.green(), p.blue()])
    });
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&out)
        .map_err(|e| e.to_string())?;
    Ok(jpeg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::from_pixel(w, h, image::Rgb([10, 200, 10]))
            .write_to(&mut std::io::Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn probe_sorts_bad_photos_into_clear_errors() {
        let ok = probe(&png(64, 48), 100).err().unwrap();
        assert_eq!(ok.code, "image_too_large");
        let p = probe(&png(64, 48), 1_000_000).unwrap();
        assert_eq!((p.width, p.height, p.extension()), (64, 48, "png"));
        assert_eq!(
            probe(b"hello", 1 << 30).unwrap_err().code,
            "unsupported_image"
        );
        assert_eq!(
            probe(&png(8, 64), 1 << 30).unwrap_err().code,
            "image_too_small"
        );
        let mut cut = png(64, 48);
        cut.truncate(20);
        assert_eq!(probe(&cut, 1 << 30).unwrap_err().code, "corrupt_image");
        assert_eq!(probe(b"", 1 << 30).unwrap_err().code, "empty_image");
    }

    #[test]
    fn stored_names_come_from_the_hash_only() {
        let p = probe(&png(64, 48), 1 << 30).unwrap();
        let sha = "ab".repeat(32);
        assert_eq!(
            relative_path(&sha, &p).unwrap(),
            format!("images/ab/{sha}.png")
        );
        assert!(relative_path("../../etc/passwd", &p).is_err());
    }
}
