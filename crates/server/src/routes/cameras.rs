//! `/api/v1/cameras`: the cameras this server watches (`inspector serve --cameras FILE`): each
//! one's status, counters and latest inspected frame, as the camera loop last published them.

use std::sync::Arc;

use axum::{
    Json,
    body::Body,
    extract::{Path, State},
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    error::{ApiError, ErrorBody},
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_cameras))
        .routes(routes!(get_frame))
}

/// One camera's state.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct CameraView {
    /// Its position in the cameras file: `/api/v1/cameras/{index}/frame`.
    pub index: usize,
    pub name: String,
    /// The source, credentials redacted.
    pub source: String,
    /// `up`, `down` (reconnecting), `ended` (a file that ran to its end) or `failed`.
    pub status: String,
    /// Why it is down or failed.
    pub error: Option<String>,
    pub frames_read: usize,
    pub frames_inspected: usize,
    /// Frames that barely changed, which repeat the last result.
    pub frames_repeated: usize,
    /// Live frames dropped because newer ones came (or the queue was full).
    pub frames_dropped: usize,
    pub events: usize,
    pub reconnects: usize,
    /// Frame-to-event latency over its events, seconds.
    pub latency_p50_s: Option<f64>,
    pub latency_p99_s: Option<f64>,
    /// When its latest inspected frame arrived (RFC 3339).
    pub last_frame_at: Option<String>,
    /// `/api/v1/cameras/{index}/frame`, when there is a frame.
    pub frame_url: Option<String>,
    /// The latest inspected frame with its boxes drawn (a JPEG).
    #[serde(skip)]
    #[schema(ignore)]
    pub frame: Option<Arc<Vec<u8>>>,
}

/// The cameras and their state (an empty list when the server watches none).
#[utoipa::path(get, path = "/api/v1/cameras", tag = "cameras",
    responses((status = 200, body = [CameraView])))]
pub async fn list_cameras(State(state): State<AppState>) -> Json<Vec<CameraView>> {
    Json(
        state
            .inner
            .cameras
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    )
}

/// A camera's latest inspected frame with its boxes drawn (a JPEG).
#[utoipa::path(get, path = "/api/v1/cameras/{index}/frame", tag = "cameras",
    params(("index" = usize, Path)),
    responses((status = 200, content_type = "image/jpeg", body = [u8]),
        (status = 404, body = ErrorBody)))]
pub async fn get_frame(
    State(state): State<AppState>,
    Path(index): Path<String>,
) -> Result<Response, ApiError> {
    let frame = index.parse::<usize>().ok().and_then(|i| {
        state
            .inner
            .cameras
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(i)
            .and_then(|c| c.frame.clone())
    });
    let Some(frame) = frame else {
        return Err(ApiError::not_found(format!(
            "no frame of a camera `{index}`"
        )));
    };
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        Body::from(frame.as_ref().clone()),
    )
        .into_response())
}
