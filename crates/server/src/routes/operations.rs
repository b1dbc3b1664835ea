//! Operations: the web page, liveness, readiness, metrics and the OpenAPI document.

use std::time::Duration;

use axum::{
    Json,
    extract::State,
    http::header,
    response::{Html, IntoResponse, Response},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    error::{ApiError, ErrorBody},
};

/// What anyone may read, keys or not.
pub fn public() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(index))
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(openapi_json))
}

/// What needs a key where keys are required.
pub fn protected() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// Liveness (the tutorial's shape).
#[utoipa::path(get, path = "/health", tag = "operations", security(()), responses((status = 200)))]
pub async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "healthy",
        "service": "safety-inspector",
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// Readiness: 200 once the model is loaded (with a remote engine: while the engine answers
/// `GET /v1/models` within a second), else 503.
#[utoipa::path(get, path = "/ready", tag = "operations", security(()),
    responses((status = 200), (status = 503, body = ErrorBody)))]
pub async fn ready(State(state): State<AppState>) -> Response {
    if !state.is_ready() {
        return ApiError::unavailable("not_ready", "the model is loading", 5).into_response();
    }
    if let Some(remote) = state.front().ok().and_then(|f| f.remote.clone()) {
        let probed = tokio::task::spawn_blocking(move || remote.probe(Duration::from_secs(1)))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = probed {
            return ApiError::unavailable(
                "engine_unavailable",
                format!("the model engine does not answer: {e}"),
                5,
            )
            .into_response();
        }
    }
    Json(serde_json::json!({"ready": true, "model": crate::MODEL_NAME})).into_response()
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

/// The web page (Chinese by default, English on request).
#[utoipa::path(get, path = "/", tag = "operations", security(()),
    responses((status = 200, content_type = "text/html")))]
pub async fn index() -> Html<&'static str> {
    Html(include_str!("../../assets/index.html"))
}

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", tag = "operations", security(()),
    responses((status = 200, content_type = "application/json")))]
pub async fn openapi_json(State(state): State<AppState>) -> Response {
    match state.inner.openapi.get() {
        Some(doc) => Json(doc.as_ref()).into_response(),
        None => ApiError::internal("the OpenAPI document was not assembled").into_response(),
    }
}
