//! The inspection pipeline every upload endpoint shares: names and photos checked, cache hits
//! answered on the request's own thread, the rest queued for the model worker.

use std::time::Instant;

use axum::{
    Json,
    extract::{FromRequest, Multipart, Request},
    http::{StatusCode, header},
};
use base64::Engine;
use inspector_detect::ImageInfo;
use serde::Deserialize;
use tokio::sync::oneshot;
use utoipa::ToSchema;

use crate::{
    AppState,
    error::ApiError,
    images,
    record::InspectionRecord,
    worker::{self, InspectJob, Job, Reply, Upload},
};

/// How long a client-supplied name may be before it is refused.
const MAX_NAME: usize = 255;

/// Options of an inspection.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InspectOptions {
    /// Where the photo came from (a camera or place); stored with the inspection.
    pub source: Option<String>,
}

/// The JSON form of `POST /api/v1/inspections`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InspectJson {
    /// The photo, base64 (a `data:image/...;base64,` prefix is allowed).
    pub image_base64: String,
    /// A name for the photo (metadata only).
    pub filename: Option<String>,
    pub options: Option<InspectOptions>,
}

/// Bidirectional formatting controls: they make "照片\u{202e}gnp.exe" display as "照片exe.png".
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A client-supplied name: at most [`MAX_NAME`] characters, without control characters
/// (bidirectional controls included); blank means none.
pub fn check_name(what: &str, name: Option<String>) -> Result<Option<String>, ApiError> {
    match name {
        Some(n)
            if n.chars().count() > MAX_NAME
                || n.chars().any(|c| c.is_control() || is_bidi_control(c)) =>
        {
            Err(ApiError::bad_request(
                "invalid_field",
                format!(
                    "{what} must be at most {MAX_NAME} characters without control or \
                     bidirectional formatting characters"
                ),
            ))
        }
        Some(n) if n.trim().is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// [`decode_base64`] on the blocking pool (bodies reach 48 MiB).
pub async fn decode_base64_blocking(
    field: &'static str,
    text: String,
) -> Result<Vec<u8>, ApiError> {
    tokio::task::spawn_blocking(move || decode_base64(field, &text))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

/// Base64, optionally as a `data:…;base64,` URI, whitespace ignored, padding optional.
pub fn decode_base64(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    let text = text.trim();
    let payload = match text.strip_prefix("data:") {
        Some(rest) => {
            let (meta, data) = rest.split_once(',').ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_base64",
                    format!("`{field}`: a data URI without a comma"),
                )
            })?;
            if !meta.ends_with(";base64") {
                return Err(ApiError::bad_request(
                    "invalid_base64",
                    format!("`{field}`: only base64 data URIs are accepted"),
                ));
            }
            data
        }
        None => text,
    };
    let cleaned: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(cleaned.as_bytes()))
        .map_err(|e| {
            ApiError::bad_request(
                "invalid_base64",
                format!("`{field}` is not valid base64: {e}"),
            )
        })
}

/// Checks a photo, answers it from the cache or queues it, and waits for the stored
/// inspection.
pub async fn inspect_bytes(
    state: &AppState,
    bytes: Vec<u8>,
    filename: Option<String>,
    source: Option<String>,
) -> Result<InspectionRecord, ApiError> {
    let upload = Upload {
        filename: check_name("filename", filename)?,
        source: check_name("options.source", source)?,
        probe: images::probe(&bytes, state.inner.config.max_pixels)?,
    };
    let bytes = match from_cache(state, bytes, &upload).await? {
        Cached::Hit(record) => return Ok(*record),
        Cached::Miss(bytes) => bytes,
    };
    let (tx, rx) = oneshot::channel();
    state.enqueue(Job::Inspect(InspectJob {
        bytes,
        upload,
        reply: Reply::Stored(tx),
    }))?;
    state.wait(rx).await
}

enum Cached {
    Hit(Box<InspectionRecord>),
    Miss(Vec<u8>),
}

/// Answers a photo the model has answered before from the answer cache, on the blocking pool:
/// a repeated photo never waits behind the model worker.
async fn from_cache(state: &AppState, bytes: Vec<u8>, upload: &Upload) -> Result<Cached, ApiError> {
    let Some(front) = state.inner.front.get().filter(|_| state.inner.config.cache) else {
        return Ok(Cached::Miss(bytes));
    };
    let cache = front.cache.clone();
    let (rules, citations) = state.inner.rules.get_with_fingerprint();
    let inner = state.inner.clone();
    let upload = upload.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let sha = inspector_detect::sha256_hex(&bytes);
        let key = cache.key(&sha, &citations);
        let image = ImageInfo {
            width: upload.probe.width,
            height: upload.probe.height,
            sha256: sha,
        };
        let looked_up = {
            let store = inner.reader.lock().expect("reader lock");
            cache.lookup(store.as_ref(), &key, image, &rules, started)
        };
        let Some(finding) = looked_up.map_err(|e| match e {
            inspector_detect::Error::Store(e) => ApiError::from(e),
            other => ApiError::internal(format!("the answer cache: {other}")),
        })?
        else {
            return Ok(Cached::Miss(bytes));
        };
        // The photo is written without holding the database, which other requests read.
        let relative = worker::store_photo(&inner.photos, &upload, &bytes, &finding)?;
        let record = worker::record(
            inner.reader.lock().expect("reader lock").as_mut(),
            &inner.metrics,
            &upload,
            relative,
            finding,
            (
                &cache.model_fingerprint,
                cache.adapter_fingerprint.as_deref(),
            ),
        )?;
        Ok(Cached::Hit(Box::new(record)))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

pub fn is_multipart(req: &Request) -> bool {
    content_type_starts(req, "multipart/form-data")
}

/// `application/json` or a `+json` type, as axum's `Json` accepts.
fn is_json(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
        })
}

fn content_type_starts(req: &Request, prefix: &str) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with(prefix))
}

/// Reads a photo from a multipart field `field` (with an optional `options` field), or from
/// the JSON form.
pub async fn read_upload(
    state: &AppState,
    req: Request,
    field: &str,
) -> Result<(Vec<u8>, Option<String>, Option<String>), ApiError> {
    if is_multipart(&req) {
        let mut multipart = Multipart::from_request(req, state).await?;
        let mut image = None;
        let mut options = InspectOptions::default();
        while let Some(part) = multipart.next_field().await? {
            let name = part.name().unwrap_or_default().to_string();
            if name == field {
                if image.is_some() {
                    return Err(ApiError::bad_request(
                        "invalid_field",
                        format!("more than one `{field}` field: send one photo per request"),
                    ));
                }
                let filename = part.file_name().map(str::to_string);
                image = Some((part.bytes().await?.to_vec(), filename));
            } else if name == "options" {
                let text = part.text().await?;
                options = serde_json::from_str(&text).map_err(|e| {
                    ApiError::unprocessable("invalid_fields", format!("`options`: {e}"))
                })?;
            }
        }
        let (bytes, filename) = image.ok_or_else(|| {
            ApiError::unprocessable(
                "missing_field",
                format!("the multipart field `{field}` is missing"),
            )
        })?;
        Ok((bytes, filename, options.source))
    } else if is_json(&req) {
        let Json(body): Json<InspectJson> = Json::from_request(req, state).await?;
        let bytes = decode_base64_blocking("image_base64", body.image_base64).await?;
        Ok((bytes, body.filename, body.options.and_then(|o| o.source)))
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "send multipart/form-data with the photo in field `{field}`, or application/json \
                 with `image_base64`"
            ),
        ))
    }
}
