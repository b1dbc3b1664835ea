//! `/api/v1/inspections`: inspect a photo, list, read back, and fetch the photo.

use axum::{
    Json,
    body::Body,
    extract::{Path, Query, Request, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::Engine;
use inspector_core::Risk;
use inspector_store::InspectionFilter;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    error::{ApiError, ErrorBody},
    images,
    inspect::{InspectJson, inspect_bytes, read_upload},
    record::{InspectionPage, InspectionRecord},
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_inspection, list_inspections))
        .routes(routes!(get_inspection))
        .routes(routes!(get_image))
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
    let photos = state.inner.photos.clone();
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
        let bytes = photos
            .get(&relative)
            .map_err(|e| ApiError::internal(format!("the stored image is unreadable: {e}")))?
            .ok_or_else(|| ApiError::internal(format!("the stored image {relative} is missing")))?;
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

/// The list parameters that inspections and events share, checked: the risk in its canonical
/// form, the time range in ms, the cursor's position and the page size.
pub(crate) struct ListCommon {
    pub risk: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub before_seq: Option<i64>,
    pub limit: usize,
}

impl ListCommon {
    pub fn check(
        risk: Option<&str>,
        since: Option<&str>,
        until: Option<&str>,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<ListCommon, ApiError> {
        let risk = risk
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
        let limit = limit.unwrap_or(50);
        if !(1..=200).contains(&limit) {
            return Err(ApiError::bad_request(
                "invalid_query",
                "`limit` must be 1 to 200",
            ));
        }
        Ok(ListCommon {
            risk,
            since_ms: since.map(|t| parse_time("since", t)).transpose()?,
            until_ms: until.map(|t| parse_time("until", t)).transpose()?,
            before_seq: cursor.map(decode_cursor).transpose()?,
            limit,
        })
    }
}

/// Cuts `rows`, fetched with one more than `limit`, to a page, with the cursor of the next
/// page when there is one.
pub(crate) fn page<T>(
    mut rows: Vec<T>,
    limit: usize,
    seq: impl Fn(&T) -> i64,
) -> (Vec<T>, Option<String>) {
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = more.then(|| encode_cursor(seq(rows.last().expect("limit ≥ 1"))));
    (rows, next)
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
    let common = ListCommon::check(
        q.risk.as_deref(),
        q.since.as_deref(),
        q.until.as_deref(),
        q.cursor.as_deref(),
        q.limit,
    )?;
    let limit = common.limit;
    let filter = InspectionFilter {
        status: q.status,
        risk: common.risk,
        rule: q.rule,
        since_ms: common.since_ms,
        until_ms: common.until_ms,
        before_seq: common.before_seq,
        after_seq: None,
        limit: limit + 1,
    };
    let rows = state.read(move |s| s.inspections(&filter)).await?;
    let (rows, next_cursor) = page(rows, limit, |r| r.seq);
    let items = rows
        .iter()
        .map(InspectionRecord::from_row)
        .collect::<Result<_, _>>()?;
    Ok(Json(InspectionPage { items, next_cursor }))
}
