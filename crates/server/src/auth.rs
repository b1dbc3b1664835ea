//! API keys and rate limits.
//!
//! A key is `si_` and 40 random hex digits; the database keeps only its SHA-256 (keys are
//! random, so a fast hash is enough: there is nothing to guess from). A request presents it as
//! `Authorization: Bearer KEY` or `X-API-Key: KEY`. A presented key that is wrong or revoked is
//! refused with 401 on every address, loopback included. Without a key, a request is served as
//! anonymous only when keys are not required (the default on a loopback address); the page,
//! `/health`, `/ready` and the OpenAPI document never need one. Requests are rate-limited per
//! key (anonymous ones per client address).

use std::{net::SocketAddr, num::NonZeroU32};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::HeaderMap,
    middleware::Next,
    response::{IntoResponse, Response},
};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use inspector_store::{ApiKey, SqliteStore};

use crate::{AppState, error::ApiError};

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Caller {
    Anonymous,
    Key(ApiKey),
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Key(k) if k.admin)
    }
}

/// A new key: `(id, key, hash)`. Only the hash is stored.
pub fn generate_key() -> (String, String, String) {
    let bytes: [u8; 20] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let key = format!("si_{hex}");
    (hex[..8].to_string(), key.clone(), hash_key(&key))
}

pub fn hash_key(key: &str) -> String {
    inspector_detect::sha256_hex(key.as_bytes())
}

/// Creates a key in the database and returns `(id, key)`; the key is shown once.
pub fn create_key(
    store: &SqliteStore,
    name: &str,
    admin: bool,
) -> Result<(String, String), inspector_store::StoreError> {
    let (id, key, hash) = generate_key();
    store.create_api_key(&id, name, &hash, admin)?;
    Ok((id, key))
}

fn presented_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION) {
        let v = v
            .to_str()
            .map_err(|_| ApiError::unauthorized("the Authorization header is not text"))?;
        let key = v.strip_prefix("Bearer ").ok_or_else(|| {
            ApiError::unauthorized("the Authorization header must be `Bearer <key>`")
        })?;
        return Ok(Some(key.trim().to_string()));
    }
    if let Some(v) = headers.get("x-api-key") {
        let v = v
            .to_str()
            .map_err(|_| ApiError::unauthorized("the X-API-Key header is not text"))?;
        return Ok(Some(v.trim().to_string()));
    }
    Ok(None)
}

/// Paths anyone may read.
fn is_public(path: &str) -> bool {
    matches!(path, "/" | "/health" | "/ready" | "/api/openapi.json")
}

/// Per-key (or per-address) request limits.
pub struct Limiter {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    checks: std::sync::atomic::AtomicU64,
}

impl Limiter {
    /// `per_minute` requests a minute with bursts of the same size; 0 turns limits off.
    pub fn new(per_minute: u32) -> Self {
        Limiter {
            limiter: NonZeroU32::new(per_minute)
                .map(|n| RateLimiter::keyed(Quota::per_minute(n).allow_burst(n))),
            checks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn check(&self, who: &str) -> Result<(), ApiError> {
        let Some(l) = &self.limiter else {
            return Ok(());
        };
        // Forget callers whose allowance is full again, now and then, so that many addresses
        // cannot grow the table without bound.
        if self
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(4096)
        {
            l.retain_recent();
            l.shrink_to_fit();
        }
        l.check_key(&who.to_string()).map_err(|not_until| {
            let wait = not_until
                .wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ))
                .as_secs()
                + 1;
            ApiError {
                retry_after: Some(wait),
                ..ApiError::new(
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("too many requests: try again in {wait} s"),
                )
            }
        })
    }
}

/// The middleware: identifies the caller, enforces keys and limits, and hands the caller to
/// the handlers as a request extension.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let address = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip());
    let key = match presented_key(req.headers()) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    match identify(&state, &path, key, address).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

async fn identify(
    state: &AppState,
    path: &str,
    key: Option<String>,
    address: Option<std::net::IpAddr>,
) -> Result<Caller, ApiError> {
    let caller = match key {
        Some(key) => {
            let hash = hash_key(&key);
            let store = state.inner.clone();
            let found = tokio::task::spawn_blocking(move || {
                store
                    .reader
                    .lock()
                    .expect("reader lock")
                    .api_key_by_hash(&hash)
            })
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
            match found {
                Some(k) => Caller::Key(k),
                None => return Err(ApiError::unauthorized("unknown or revoked API key")),
            }
        }
        None if state.inner.config.require_keys && !is_public(path) => {
            return Err(ApiError::unauthorized(
                "an API key is required: send `Authorization: Bearer <key>` \
                 (create one with `inspector keys create`)",
            ));
        }
        None => Caller::Anonymous,
    };
    if !is_public(path) {
        let who = match &caller {
            Caller::Key(k) => format!("key:{}", k.id),
            Caller::Anonymous => match address {
                Some(ip) => format!("ip:{ip}"),
                None => "anonymous".to_string(),
            },
        };
        state.inner.limiter.check(&who)?;
    }
    Ok(caller)
}
