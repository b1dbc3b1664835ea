//! `/api/v1/keys`: API keys, for admin keys only. Keys live in the database, and every request
//! checks its key there, so a key revoked through one replica is refused by all of them at once.

use axum::{
    Extension, Json,
    extract::{Path, State},
    http::StatusCode,
};
use inspector_store::ApiKey;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    auth::{self, Caller},
    error::{ApiError, ErrorBody},
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_keys, create_key))
        .routes(routes!(revoke_key))
}

/// A key's record (never the key itself, which is shown once, when it is created).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub admin: bool,
    /// UTC, `YYYY-MM-DD HH:MM:SS`.
    pub created_at: String,
    pub revoked_at: Option<String>,
}

impl From<ApiKey> for KeyView {
    fn from(k: ApiKey) -> Self {
        KeyView {
            id: k.id,
            name: k.name,
            admin: k.admin,
            created_at: k.created_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// A new key: `key` is shown this once; only its hash is stored.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyCreated {
    pub id: String,
    pub key: String,
    pub name: String,
    pub admin: bool,
}

/// What a new key is for.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// What the key is for (a camera, a script, a person); at most 200 characters.
    #[serde(default)]
    pub name: String,
    /// Admin keys may also upload regulations and manage keys.
    #[serde(default)]
    pub admin: bool,
}

fn admin_only(caller: &Caller) -> Result<(), ApiError> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(ApiError::forbidden("managing API keys needs an admin key"))
    }
}

/// Every key, revoked ones included, oldest first (admin key).
#[utoipa::path(get, path = "/api/v1/keys", tag = "keys",
    responses((status = 200, body = [KeyView]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub async fn list_keys(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<KeyView>>, ApiError> {
    admin_only(&caller)?;
    let keys = state.read(|s| s.api_keys()).await?;
    Ok(Json(keys.into_iter().map(KeyView::from).collect()))
}

/// Create a key (admin key). The answer holds the key, which is not shown again.
#[utoipa::path(post, path = "/api/v1/keys", tag = "keys", request_body = NewKey,
    responses((status = 201, body = KeyCreated), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn create_key(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<NewKey>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<KeyCreated>), ApiError> {
    admin_only(&caller)?;
    let Json(new) = body?;
    if new.name.chars().count() > 200 {
        return Err(ApiError::bad_request(
            "invalid_field",
            "`name` is longer than 200 characters",
        ));
    }
    let (name, admin) = (new.name.clone(), new.admin);
    let (id, key) = state
        .read(move |s| auth::create_key(s, &name, admin))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(KeyCreated {
            id,
            key,
            name: new.name,
            admin: new.admin,
        }),
    ))
}

/// Revoke a key (admin key): every replica refuses it from the next request on.
#[utoipa::path(delete, path = "/api/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path)),
    responses((status = 200, body = KeyView), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn revoke_key(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    admin_only(&caller)?;
    let wanted = id.clone();
    let revoked = state
        .write(move |s| {
            if !s.revoke_api_key(&wanted)? {
                return Ok(None);
            }
            Ok(s.api_keys()?.into_iter().find(|k| k.id == wanted))
        })
        .await?;
    revoked
        .map(|k| Json(KeyView::from(k)))
        .ok_or_else(|| ApiError::not_found(format!("no live key with id `{id}`")))
}
