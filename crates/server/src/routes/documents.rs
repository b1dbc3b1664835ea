//! `/api/v1/documents`: regulation uploads (admin keys only).

use axum::{
    Extension, Json,
    extract::{Multipart, State},
    http::StatusCode,
};
use inspector_store::RuleFilter;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    auth::Caller,
    error::{ApiError, ErrorBody},
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(upload_document))
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
