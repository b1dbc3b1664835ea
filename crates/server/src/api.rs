//! The handlers.

use std::time::Duration;

use axum::{
    Extension, Json,
    body::Body,
    extract::{FromRequest, Multipart, Path, Query, Request, State, rejection::JsonRejection},
    http::{HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Response},
};
use base64::Engine;
use inspector_core::{Risk, Rule};
use inspector_store::{InspectionFilter, RuleFilter, RuleStore};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use utoipa::{IntoParams, ToSchema};

use crate::{
    AppState,
    auth::Caller,
    error::{ApiError, ErrorBody},
    images,
    record::{InspectionPage, InspectionRecord},
    worker::{ChatJob, InspectJob, Job},
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

fn check_name(what: &str, name: Option<String>) -> Result<Option<String>, ApiError> {
    match name {
        Some(n) if n.chars().count() > MAX_NAME || n.chars().any(char::is_control) => {
            Err(ApiError::bad_request(
                "invalid_field",
                format!("{what} must be at most {MAX_NAME} characters without control characters"),
            ))
        }
        Some(n) if n.trim().is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// [`decode_base64`] on the blocking pool (bodies reach 48 MiB).
async fn decode_base64_blocking(field: &'static str, text: String) -> Result<Vec<u8>, ApiError> {
    tokio::task::spawn_blocking(move || decode_base64(field, &text))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

fn decode_base64(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
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

/// Checks a photo, queues it and waits for the stored inspection.
pub async fn inspect_bytes(
    state: &AppState,
    bytes: Vec<u8>,
    filename: Option<String>,
    source: Option<String>,
) -> Result<InspectionRecord, ApiError> {
    let filename = check_name("filename", filename)?;
    let source = check_name("options.source", source)?;
    let probe = images::probe(&bytes, state.inner.config.max_pixels)?;
    let (tx, rx) = oneshot::channel();
    state.enqueue(Job::Inspect(InspectJob {
        bytes,
        probe,
        filename,
        source,
        reply: tx,
    }))?;
    state.wait(rx).await
}

/// Inspect a photo.
///
/// Multipart with the photo in field `image` (and optionally `options`, a JSON object), or
/// JSON `{"image_base64", "filename"?, "options"?}`. Image URLs are not accepted: the server
/// fetches nothing. The inspection and the photo are stored before the answer is sent.
#[utoipa::path(post, path = "/api/v1/inspections", tag = "inspections",
    request_body(content = InspectJson, description = "JSON, or multipart/form-data with field `image`"),
    responses(
        (status = 201, body = InspectionRecord),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody, description = "queue full or model loading (Retry-After)"),
        (status = 504, body = ErrorBody),
    ))]
pub async fn create_inspection(
    State(state): State<AppState>,
    req: Request,
) -> Result<(StatusCode, Json<InspectionRecord>), ApiError> {
    let (bytes, filename, source) = read_upload(&state, req, "image").await?;
    let record = inspect_bytes(&state, bytes, filename, source).await?;
    Ok((StatusCode::CREATED, Json(record)))
}

fn is_multipart(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"))
}

/// Reads a photo from a multipart field `field` (with an optional `options` field), or from
/// the JSON form.
async fn read_upload(
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
    } else {
        let Json(body): Json<InspectJson> = Json::from_request(req, state).await?;
        let bytes = decode_base64_blocking("image_base64", body.image_base64).await?;
        Ok((bytes, body.filename, body.options.and_then(|o| o.source)))
    }
}

/// One inspection.
#[utoipa::path(get, path = "/api/v1/inspections/{id}", tag = "inspections",
    params(("id" = String, Path)),
    responses((status = 200, body = InspectionRecord), (status = 404, body = ErrorBody)))]
pub async fn get_inspection(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<InspectionRecord>, ApiError> {
    let wanted = id.clone();
    match state.read(move |s| s.inspection(&wanted)).await? {
        Some(row) => Ok(Json(InspectionRecord::from_row(&row)?)),
        None => Err(ApiError::not_found(format!("no inspection with id `{id}`"))),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ImageQuery {
    /// `1` draws the violations' boxes (a JPEG).
    pub boxes: Option<u8>,
}

/// The photo of an inspection, as stored or with its boxes drawn.
#[utoipa::path(get, path = "/api/v1/inspections/{id}/image", tag = "inspections",
    params(("id" = String, Path), ImageQuery),
    responses((status = 200, content_type = "image/*", body = [u8]), (status = 404, body = ErrorBody)))]
pub async fn get_image(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<ImageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let wanted = id.clone();
    let row = state
        .read(move |s| s.inspection(&wanted))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no inspection with id `{id}`")))?;
    let record = InspectionRecord::from_row(&row)?;
    let relative = row.inspection.image_file.clone();
    let path = state.inner.config.data_dir.join(&relative);
    let max_pixels = state.inner.config.max_pixels;
    let boxes = query.boxes.unwrap_or(0) != 0;
    let _permit = if boxes {
        Some(
            state
                .inner
                .drawing
                .acquire()
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?,
        )
    } else {
        None
    };
    let (bytes, content_type) = tokio::task::spawn_blocking(move || {
        let bytes = std::fs::read(&path)
            .map_err(|e| ApiError::internal(format!("the stored image is unreadable: {e}")))?;
        if boxes {
            images::draw_boxes(&bytes, &record.finding, max_pixels)
                .map(|b| (b, "image/jpeg"))
                .map_err(|e| ApiError::internal(format!("drawing the boxes: {e}")))
        } else {
            Ok((bytes, images::content_type(&relative)))
        }
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=86400"),
            ),
        ],
        Body::from(bytes),
    )
        .into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `violation`, `safe` or `unparsed`.
    pub status: Option<String>,
    /// Inspections with a violation of this risk: 高/中/低 (or high/medium/low).
    pub risk: Option<String>,
    /// Inspections citing this rule (rule id or citation).
    pub rule: Option<String>,
    /// RFC 3339; inclusive.
    pub since: Option<String>,
    /// RFC 3339; exclusive.
    pub until: Option<String>,
    /// 1–200, default 50.
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

fn parse_time(field: &str, text: &str) -> Result<i64, ApiError> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            ApiError::bad_request(
                "invalid_query",
                format!("`{field}` must be an RFC 3339 time such as 2026-11-26T08:00:00Z: {e}"),
            )
        })
}

fn encode_cursor(seq: i64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("seq:{seq}"))
}

fn decode_cursor(cursor: &str) -> Result<i64, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.strip_prefix("seq:").and_then(|n| n.parse().ok()))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_cursor",
                "`cursor` is not a cursor this server gave",
            )
        })
}

/// Inspections, newest first, filtered and paged.
#[utoipa::path(get, path = "/api/v1/inspections", tag = "inspections", params(ListQuery),
    responses((status = 200, body = InspectionPage), (status = 400, body = ErrorBody)))]
pub async fn list_inspections(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<InspectionPage>, ApiError> {
    let Query(q) = query?;
    if let Some(s) = &q.status
        && !matches!(s.as_str(), "violation" | "safe" | "unparsed")
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`status` must be violation, safe or unparsed",
        ));
    }
    let risk = q
        .risk
        .as_deref()
        .map(|r| {
            Risk::parse(r)
                .map(|r| r.as_str().to_string())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_query",
                        "`risk` must be 高, 中 or 低 (high, medium, low)",
                    )
                })
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`limit` must be 1 to 200",
        ));
    }
    let filter = InspectionFilter {
        status: q.status,
        risk,
        rule: q.rule,
        since_ms: q
            .since
            .as_deref()
            .map(|t| parse_time("since", t))
            .transpose()?,
        until_ms: q
            .until
            .as_deref()
            .map(|t| parse_time("until", t))
            .transpose()?,
        before_seq: q.cursor.as_deref().map(decode_cursor).transpose()?,
        limit: limit + 1,
    };
    let mut rows = state.read(move |s| s.inspections(&filter)).await?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_cursor = more.then(|| encode_cursor(rows.last().expect("limit ≥ 1").seq));
    let items = rows
        .iter()
        .map(InspectionRecord::from_row)
        .collect::<Result<_, _>>()?;
    Ok(Json(InspectionPage { items, next_cursor }))
}

/// A rule as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RuleView {
    pub id: String,
    pub document: String,
    pub clause: String,
    pub citation: String,
    pub text: String,
    pub categories: Vec<String>,
    pub parent: Option<String>,
    pub chapter: Option<String>,
}

impl From<Rule> for RuleView {
    fn from(r: Rule) -> Self {
        RuleView {
            id: r.id,
            document: r.document,
            clause: r.clause,
            citation: r.citation,
            text: r.text,
            categories: r.categories,
            parent: r.parent,
            chapter: r.chapter,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RuleList {
    pub items: Vec<RuleView>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RuleQuery {
    /// Full-text search (Chinese works without a dictionary).
    pub q: Option<String>,
    /// Only this document's rules (exact title).
    pub document: Option<String>,
    /// Only rules of this category.
    pub category: Option<String>,
}

/// The rules inspections cite.
#[utoipa::path(get, path = "/api/v1/rules", tag = "rules", params(RuleQuery),
    responses((status = 200, body = RuleList), (status = 400, body = ErrorBody)))]
pub async fn list_rules(
    State(state): State<AppState>,
    query: Result<Query<RuleQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RuleList>, ApiError> {
    let Query(q) = query?;
    let rules = state
        .read(move |s| {
            let filter = RuleFilter {
                category: q.category.clone(),
                document: q.document.clone(),
            };
            match q.q.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
                // Filters apply to the hits, so take many of them when there are filters.
                Some(text) => s
                    .search(
                        text,
                        if filter == RuleFilter::default() {
                            200
                        } else {
                            5000
                        },
                    )
                    .map(|found| {
                        found
                            .into_iter()
                            .filter(|r| {
                                filter.document.as_deref().is_none_or(|d| {
                                    r.document == d.trim_start_matches('《').trim_end_matches('》')
                                }) && filter
                                    .category
                                    .as_ref()
                                    .is_none_or(|c| r.categories.contains(c))
                            })
                            .collect()
                    }),
                None => s.rules(&filter),
            }
        })
        .await?;
    Ok(Json(RuleList {
        items: rules.into_iter().map(RuleView::from).collect(),
    }))
}

/// One rule.
#[utoipa::path(get, path = "/api/v1/rules/{id}", tag = "rules", params(("id" = String, Path)),
    responses((status = 200, body = RuleView), (status = 404, body = ErrorBody)))]
pub async fn get_rule(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RuleView>, ApiError> {
    let wanted = id.clone();
    state
        .read(move |s| s.rule(&wanted))
        .await?
        .map(|r| Json(r.into()))
        .ok_or_else(|| ApiError::not_found(format!("no rule with id `{id}`")))
}

/// What uploading a regulation did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DocumentUploaded {
    pub title: String,
    pub rules: usize,
    pub diagnostics: usize,
    /// Rules of the same title replaced.
    pub replaced: usize,
    pub unchanged: bool,
}

/// Upload a regulation document (admin key): multipart field `file` (.txt, .md, .docx or
/// .pdf; UTF-8 or GB18030). Its rules replace those of the same title; inspections cite them
/// from then on.
#[utoipa::path(post, path = "/api/v1/documents", tag = "rules",
    request_body(content_type = "multipart/form-data", description = "field `file`"),
    responses((status = 201, body = DocumentUploaded), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn upload_document(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<(StatusCode, Json<DocumentUploaded>), ApiError> {
    if !caller.is_admin() {
        return Err(ApiError::forbidden(
            "uploading regulations needs an admin key",
        ));
    }
    let mut multipart = multipart?;
    let mut file = None;
    while let Some(part) = multipart.next_field().await? {
        if part.name() == Some("file") {
            // Only the extension of the client's name is used, to pick the format.
            let ext = part
                .file_name()
                .and_then(|n| n.rsplit(['/', '\\']).next())
                .and_then(|n| n.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()))
                .filter(|e| matches!(e.as_str(), "txt" | "md" | "docx" | "pdf"));
            file = Some((part.bytes().await?.to_vec(), ext));
        }
    }
    let (bytes, ext) = file.ok_or_else(|| {
        ApiError::unprocessable("missing_field", "the multipart field `file` is missing")
    })?;
    let name = match ext {
        Some(e) => format!("upload.{e}"),
        None => "upload".to_string(),
    };
    // Extraction (which may take a while on a long PDF) runs without holding the database.
    let (doc, sha) = tokio::task::spawn_blocking(move || {
        let sha = inspector_detect::sha256_hex(&bytes);
        inspector_rules::extract_bytes(&name, &bytes, &inspector_rules::Categorizer::default())
            .map(|doc| (doc, sha))
            .map_err(|e| ApiError::unprocessable("unreadable_document", e.kind.to_string()))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    let shared = state.inner.clone();
    let uploaded = state
        .write(move |s| {
            let record = inspector_store::DocumentRecord {
                title: doc.title.clone(),
                file: format!("(uploaded, sha256 {})", &sha[..12]),
                sha256: sha,
            };
            let outcome = s.replace_document(&record, &doc.rules, &doc.diagnostics)?;
            // Under the same lock, so concurrent uploads publish their rules in order.
            shared.rules.set(s.rules(&RuleFilter::default())?);
            Ok(DocumentUploaded {
                title: doc.title,
                rules: doc.rules.len(),
                diagnostics: doc.diagnostics.len(),
                replaced: outcome.removed,
                unchanged: outcome.unchanged,
            })
        })
        .await?;
    Ok((StatusCode::CREATED, Json(uploaded)))
}

// ---- The tutorial deployment's endpoints --------------------------------------------------

/// `POST /detect`'s body.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TutorialDetect {
    /// The photo, base64.
    pub image: String,
    pub filename: Option<String>,
}

/// `POST /api/detect`'s body.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TutorialApiDetect {
    pub image: String,
    #[schema(value_type = Object)]
    pub options: Option<serde_json::Value>,
}

fn tutorial_ok(record: &InspectionRecord) -> Response {
    Json(serde_json::json!({"success": true, "data": record.tutorial(), "message": "检测完成"}))
        .into_response()
}

fn tutorial(result: Result<InspectionRecord, ApiError>) -> Response {
    match result {
        Ok(r) => tutorial_ok(&r),
        Err(e) => e.into_tutorial_response(),
    }
}

/// The tutorial's `POST /detect`: `{"image": base64, "filename"?}` →
/// `{"success", "data", "message"}`.
#[utoipa::path(post, path = "/detect", tag = "compatibility", request_body = TutorialDetect,
    responses((status = 200, description = "`{success: true, data: RESULT, message}`"),
        (status = 400, description = "`{success: false, error}`")))]
pub async fn tutorial_detect(
    State(state): State<AppState>,
    body: Result<Json<TutorialDetect>, JsonRejection>,
) -> Response {
    let run = async {
        let Json(body) = body?;
        let bytes = decode_base64_blocking("image", body.image).await?;
        inspect_bytes(&state, bytes, body.filename, None).await
    };
    tutorial(run.await)
}

/// The tutorial's `POST /api/detect`: `{"image": base64, "options"?}`.
#[utoipa::path(post, path = "/api/detect", tag = "compatibility", request_body = TutorialApiDetect,
    responses((status = 200, description = "`{success: true, data: RESULT, message}`"),
        (status = 400, description = "`{success: false, error}`")))]
pub async fn tutorial_api_detect(
    State(state): State<AppState>,
    body: Result<Json<TutorialApiDetect>, JsonRejection>,
) -> Response {
    let run = async {
        let Json(body) = body?;
        if let Some(o) = &body.options
            && !o.is_object()
        {
            return Err(ApiError::bad_request(
                "invalid_field",
                "`options` must be an object",
            ));
        }
        let bytes = decode_base64_blocking("image", body.image).await?;
        inspect_bytes(&state, bytes, None, None).await
    };
    tutorial(run.await)
}

/// The tutorial's `POST /api/upload`: multipart field `file`, which must be an image.
#[utoipa::path(post, path = "/api/upload", tag = "compatibility",
    request_body(content_type = "multipart/form-data", description = "field `file`"),
    responses((status = 200, description = "`{success: true, data: RESULT, message}`"),
        (status = 400, description = "`{success: false, error}`")))]
pub async fn tutorial_upload(State(state): State<AppState>, req: Request) -> Response {
    let run = async {
        if !is_multipart(&req) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send multipart/form-data with the photo in field `file`",
            ));
        }
        let (bytes, filename, _) = read_upload(&state, req, "file").await?;
        inspect_bytes(&state, bytes, filename, None).await
    };
    tutorial(run.await)
}

// ---- OpenAI-compatible chat ---------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatRequest {
    pub model: Option<String>,
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<serde_json::Value>,
    /// Default 256, at most 2048.
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    /// 0 (the default) decodes greedily.
    pub temperature: Option<f64>,
    pub seed: Option<u64>,
    /// Streaming is not offered; `true` is refused.
    pub stream: Option<bool>,
}

/// Turns OpenAI messages into transformers' form, taking out the images (data URIs only).
fn convert_messages(
    messages: &[serde_json::Value],
) -> Result<(serde_json::Value, Vec<Vec<u8>>), ApiError> {
    use serde_json::{Value, json};
    let bad = |m: String| ApiError::bad_request("invalid_messages", m);
    if messages.is_empty() {
        return Err(bad("`messages` is empty".into()));
    }
    let mut out = Vec::new();
    let mut images = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .filter(|r| matches!(*r, "system" | "user" | "assistant"))
            .ok_or_else(|| {
                bad(format!(
                    "messages[{i}].role must be system, user or assistant"
                ))
            })?;
        let content = match m.get("content") {
            Some(Value::String(s)) => json!([{"type": "text", "text": s}]),
            Some(Value::Array(parts)) => {
                let mut converted = Vec::new();
                for (k, p) in parts.iter().enumerate() {
                    match p.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            let text = p.get("text").and_then(Value::as_str).ok_or_else(|| {
                                bad(format!("messages[{i}].content[{k}].text must be a string"))
                            })?;
                            converted.push(json!({"type": "text", "text": text}));
                        }
                        Some("image_url") => {
                            let url = match p.get("image_url") {
                                Some(Value::String(u)) => Some(u.as_str()),
                                Some(o) => o.get("url").and_then(Value::as_str),
                                None => None,
                            }
                            .ok_or_else(|| {
                                bad(format!(
                                    "messages[{i}].content[{k}].image_url.url is missing"
                                ))
                            })?;
                            if !url.starts_with("data:") {
                                return Err(bad(format!(
                                    "messages[{i}].content[{k}]: only data: URIs are accepted \
                                     (the server fetches nothing)"
                                )));
                            }
                            images.push(decode_base64("image_url", url)?);
                            converted.push(json!({"type": "image"}));
                        }
                        _ => {
                            return Err(bad(format!(
                                "messages[{i}].content[{k}].type must be text or image_url"
                            )));
                        }
                    }
                }
                Value::Array(converted)
            }
            _ => {
                return Err(bad(format!(
                    "messages[{i}].content must be a string or a list"
                )));
            }
        };
        out.push(json!({"role": role, "content": content}));
    }
    Ok((Value::Array(out), images))
}

/// OpenAI-compatible chat completions (no streaming; images as data URIs only).
#[utoipa::path(post, path = "/v1/chat/completions", tag = "compatibility", request_body = ChatRequest,
    responses((status = 200, description = "an OpenAI `chat.completion` object"),
        (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body?;
    if req.stream == Some(true) {
        return Err(ApiError::bad_request(
            "unsupported",
            "streaming is not supported: send `stream: false`",
        ));
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or(256);
    if !(1..=2048).contains(&max_tokens) {
        return Err(ApiError::bad_request(
            "invalid_field",
            "`max_tokens` must be 1 to 2048",
        ));
    }
    let temperature = req.temperature.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(
            "invalid_field",
            "`temperature` must be 0 to 2",
        ));
    }
    let (messages, images) = convert_messages(&req.messages)?;
    for bytes in &images {
        images::probe(bytes, state.inner.config.max_pixels)?;
    }
    let (tx, rx) = oneshot::channel();
    state.enqueue(Job::Chat(ChatJob {
        messages,
        images,
        max_tokens,
        temperature,
        seed: req.seed.unwrap_or(0),
        reply: tx,
    }))?;
    let answer = state.wait(rx).await?;
    let created = chrono::Utc::now().timestamp();
    Ok(Json(serde_json::json!({
        "id": format!("chatcmpl-{}", crate::worker::new_id(created * 1000)),
        "object": "chat.completion",
        "created": created,
        "model": req.model.unwrap_or_else(|| crate::MODEL_NAME.to_string()),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer.text},
            "finish_reason": if answer.stopped_at_eos { "stop" } else { "length" },
        }],
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        },
    })))
}

// ---- Operations ---------------------------------------------------------------------------

/// Liveness (the tutorial's shape).
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200)))]
pub async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "healthy",
        "service": "safety-inspector",
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// Readiness: 200 once the model is loaded, else 503.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses((status = 200), (status = 503, body = ErrorBody)))]
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.is_ready() {
        Json(serde_json::json!({"ready": true, "model": crate::MODEL_NAME})).into_response()
    } else {
        ApiError::unavailable("not_ready", "the model is loading", 5).into_response()
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.inner.metrics.render(),
    )
        .into_response()
}

/// The web page.
pub async fn index() -> Html<&'static str> {
    Html(include_str!("../assets/index.html"))
}

/// Unknown paths.
pub async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no endpoint at {}", req.uri().path()))
}

/// The waiting time a request may spend on the model, for docs.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
