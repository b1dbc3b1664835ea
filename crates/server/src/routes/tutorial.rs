//! The tutorial deployment's endpoints, in its shapes: `POST /detect`, `POST /api/detect` and
//! `POST /api/upload` answer `{"success", "data", "message"}`.

use axum::{
    Json,
    extract::{Request, State, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    error::ApiError,
    inspect::{decode_base64_blocking, inspect_bytes, is_multipart, read_upload},
    record::InspectionRecord,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(tutorial_detect))
        .routes(routes!(tutorial_api_detect))
        .routes(routes!(tutorial_upload))
}

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
