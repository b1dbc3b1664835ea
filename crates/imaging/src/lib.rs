//! How Safety Inspector reads a photo, in one place, so that the boxes people draw, the
//! augmentations made from them and the pixels the model sees all refer to the same image.
//!
//! [`decode_rgb`] sniffs the format from the bytes (an allow-list), checks the declared size
//! against a pixel budget before allocating anything (decompression bombs are refused
//! cheaply), refuses truncated JPEGs (whose missing scan the decoder would fill with grey),
//! applies the EXIF orientation as transformers' `load_image` does, and converts to RGB the
//! way PIL's `convert("RGB")` does (alpha dropped, grey replicated).
//!
//! ```
//! use inspector_imaging::{decode_rgb, DEFAULT_MAX_DECODE_PIXELS};
//!
//! let mut png = Vec::new();
//! image::RgbImage::from_pixel(64, 32, image::Rgb([200, 10, 10]))
//!     .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
//!     .unwrap();
//! let rgb = decode_rgb(&png, DEFAULT_MAX_DECODE_PIXELS).unwrap();
//! assert_eq!(rgb.dimensions(), (64, 32));
//! assert!(decode_rgb(b"GIF89a nonsense", DEFAULT_MAX_DECODE_PIXELS).is_err());
//! ```

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

/// Why an image was refused; the message is meant for the user, without the file name (the
/// caller adds it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// The default pixel budget: 100 megapixels, above any phone camera.
pub const DEFAULT_MAX_DECODE_PIXELS: u64 = 100_000_000;

/// The formats accepted, sniffed from the bytes.
pub const ALLOWED_FORMATS: [ImageFormat; 6] = [
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::WebP,
    ImageFormat::Bmp,
    ImageFormat::Gif,
    ImageFormat::Tiff,
];

/// The smallest side accepted: one merged 28-px block.
pub const MIN_SIDE: u32 = 28;

/// Decodes image bytes to RGB, refusing anything that is not an allowed image or that
/// declares more than `max_pixels` pixels (checked from the header, before decoding).
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError(format!("cannot read: {e}")))?;
    let format = reader
        .format()
        .ok_or_else(|| DecodeError("not an image (unknown format)".into()))?;
    if !ALLOWED_FORMATS.contains(&format) {
        return Err(DecodeError(format!("format {format:?} is not accepted")));
    }
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // The JPEG decoder fills a cut-off scan with grey rather than failing; a model must
        // never be shown invented pixels, so a truncated file is refused.
        return Err(DecodeError(
            "truncated Jpeg image (no end-of-image marker after the last scan)".into(),
        ));
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| DecodeError(format!("not a valid {format:?} image: {e}")))?;
    let (w, h) = decoder.dimensions();
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(DecodeError(format!(
            "declares {w}×{h} = {pixels} pixels, above the limit of {max_pixels}; refused before decoding"
        )));
    }
    if w < MIN_SIDE || h < MIN_SIDE {
        return Err(DecodeError(format!(
            "{w}×{h} is too small: both sides must be at least {MIN_SIDE} px"
        )));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // The decoded buffer (up to 16-bit RGBA) plus working room.
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(64 << 20));
    decoder
        .set_limits(limits)
        .map_err(|e| DecodeError(format!("refused: {e}")))?;
    let orientation = decoder
        .orientation()
        .map_err(|e| DecodeError(format!("cannot read orientation: {e}")))?;
    let mut img = DynamicImage::from_decoder(decoder)
        .map_err(|e| DecodeError(format!("corrupt {format:?} image: {e}")))?;
    img.apply_orientation(orientation);
    // PIL's convert("RGB"): alpha is dropped (not composited), grey replicated.
    Ok(img.to_rgb8())
}

/// True when the last scan of a JPEG (`FF DA`) is followed by an end-of-image marker
/// (`FF D9`). Inside entropy-coded data 0xFF is always stuffed, so the pair cannot occur by
/// chance; an EXIF thumbnail's own marker comes before the main scan and does not count.
pub fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last = |marker: u8| {
        bytes
            .windows(2)
            .rposition(|w| w[0] == 0xFF && w[1] == marker)
    };
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi > sos,
        _ => false,
    }
}

/// The width and height of an image as [`decode_rgb`] would return it (EXIF orientation
/// applied), read from the header alone.
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32), DecodeError> {
    let mut decoder = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError(format!("cannot read: {e}")))?
        .into_decoder()
        .map_err(|e| DecodeError(format!("not a readable image: {e}")))?;
    let (w, h) = decoder.dimensions();
    let orientation = decoder
        .orientation()
        .map_err(|e| DecodeError(format!("cannot read orientation: {e}")))?;
    use image::metadata::Orientation as O;
    Ok(match orientation {
        O::Rotate90 | O::Rotate270 | O::Rotate90FlipH | O::Rotate270FlipH => (h, w),
        _ => (w, h),
    })
}

/// True when the file carries an EXIF orientation that turns or mirrors it, so that a reader
/// ignoring EXIF would see other pixels than [`decode_rgb`] returns.
pub fn is_reoriented(bytes: &[u8]) -> bool {
    let Ok(reader) = ImageReader::new(Cursor::new(bytes)).with_guessed_format() else {
        return false;
    };
    let Ok(mut decoder) = reader.into_decoder() else {
        return false;
    };
    !matches!(
        decoder.orientation(),
        Ok(image::metadata::Orientation::NoTransforms) | Err(_)
    )
}
