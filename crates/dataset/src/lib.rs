//! Annotated images → validated, split, augmented training samples, and the formats other
//! tools use.
//!
//! An annotation file is JSONL, one record per image (`{"image", "violations": [...]}`, image
//! paths relative to the file; no violations marks a safe photo).
//!
//! - [`validate_file`] checks every line — JSON, fields, images (present, decodable, boxes
//!   inside them), rule citations (they must resolve; the nearest rule is suggested), risks,
//!   duplicates — and reports each problem with its line and field, never stopping at the
//!   first. [`load_file`] is the same check, refusing a file with any error, and is where every
//!   other step starts.
//! - [`conversation`] turns a record into the exact conversation the model is trained on (the
//!   canonical instruction and JSON answer of [`inspector_core::answer`]).
//! - [`split()`] (deterministic, stratified, grouped by image content), [`augment()`]
//!   (photometric and geometric, boxes transformed), [`stats()`], and [`formats`] (import and
//!   export: the tutorial's article format, LLaMA-Factory, ms-swift).
//!
//! Every file is written atomically ([`write_atomic`]). This crate loads no model.
//!
//! ```
//! use inspector_dataset::validate_text;
//!
//! let report = validate_text("{\"image\": \"missing.png\", \"violations\": []}\n{oops\n", std::path::Path::new("."), &[]);
//! assert_eq!(report.records, 2);
//! assert_eq!(report.errors.iter().map(|e| e.line).collect::<Vec<_>>(), [1, 2]);
//! ```

use std::{
    io::Write,
    path::{Path, PathBuf},
};

pub mod augment;
mod build;
pub mod formats;
mod split;
mod stats;
mod validate;

pub use augment::{AugmentOptions, AugmentSummary, augment};
pub use build::{
    IMAGE_PLACEHOLDER, Message, Sample, build_samples, conversation, conversation_with,
};
pub use split::{Split, split};
pub use stats::{Stats, stats};
pub use validate::{
    Dataset, Problem, Record, Report, SAFE_CATEGORY, load_file, load_generated, validate_file,
    validate_text,
};

/// What can go wrong in a dataset step. Every variant names the file (and line) at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The annotation file has errors; nothing was written. The report lists them all.
    #[error("{file}: {n} error(s); nothing was written (run `inspector dataset validate` for the full list)", n = report.errors.len())]
    Invalid { file: PathBuf, report: Box<Report> },
    /// A file in another tool's format that cannot be read.
    #[error("{file}: {location}: {message}")]
    Format {
        file: PathBuf,
        location: String,
        message: String,
    },
    #[error("{0}")]
    Refused(String),
}

impl Error {
    pub(crate) fn io(path: &Path, error: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// Writes a file atomically: a temporary file in the target's folder, flushed, then renamed
/// over the target. A reader never sees half a file and a failure leaves any old file as it
/// was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // 0666 less the umask, as an ordinary file (tempfile's default is 0600).
    let mut tmp = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(|e| Error::io(path, e))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// `path` as seen from the folder `dir` (both must exist), for writing image references that
/// stay valid from an output file's folder; absolute when no relative path exists.
pub fn relative_to(path: &Path, dir: &Path) -> Result<String, Error> {
    let dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    relative_to_canonical(path, &dir)
}

/// [`relative_to`] for a folder already canonicalised (once, for many paths).
pub fn relative_to_canonical(path: &Path, dir: &Path) -> Result<String, Error> {
    let abs = path.canonicalize().map_err(|e| Error::io(path, e))?;
    let rel = pathdiff::diff_paths(&abs, dir).unwrap_or(abs);
    Ok(rel.to_string_lossy().into_owned())
}

/// Serialises values as JSONL, one per line.
pub fn jsonl<T: serde::Serialize>(items: impl IntoIterator<Item = T>) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        serde_json::to_writer(&mut out, &item).expect("plain data serialises");
        out.push(b'\n');
    }
    out
}

/// Creates an output folder (and its parents).
pub(crate) fn create_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// Copies an image into `dir/images/`, named by content hash, and returns its name relative
/// to `dir` (`images/<hash>.<ext>`). A photo whose EXIF orientation turns it is stored upright
/// as PNG instead, since boxes refer to the upright image and not every reader applies EXIF.
pub(crate) fn store_image(source: &Path, bytes: &[u8], dir: &Path) -> Result<String, Error> {
    let (name, stored) = if inspector_imaging::is_reoriented(bytes) {
        let img =
            inspector_imaging::decode_rgb(bytes, inspector_imaging::DEFAULT_MAX_DECODE_PIXELS)
                .map_err(|e| Error::Format {
                    file: source.to_path_buf(),
                    location: "image".into(),
                    message: e.0,
                })?;
        let png = augment::encode_png(&img);
        (format!("images/{}.png", short_hash(&png)), png)
    } else {
        let ext = image::guess_format(bytes)
            .ok()
            .and_then(|f| f.extensions_str().first().copied())
            .unwrap_or("img");
        (
            format!("images/{}.{ext}", short_hash(bytes)),
            bytes.to_vec(),
        )
    };
    let path = dir.join(&name);
    if !path.exists() {
        write_atomic(&path, &stored)?;
    }
    Ok(name)
}

/// The first 20 hex digits of the SHA-256 of `bytes`: a content name.
pub(crate) fn short_hash(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    validate::hex(&Sha256::digest(bytes)[..10])
}
