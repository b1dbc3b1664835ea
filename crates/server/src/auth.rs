//! API keys and rate limits.
//!
//! A key is `si_` and 40 random hex digits; the database keeps only its SHA-256 (keys are
//! random, so a fast hash is enough: there is nothing to guess from). A request presents it as
//! `Authorization: Bearer KEY` (the scheme in any case) or `X-API-Key: KEY`; both at once must
//! carry the same key. A revoked key is refused with 401 on every address, loopback included.
//! When keys are required (the default off loopback), an unknown key is refused too; when they
//! are not, a token that is no stored key counts as no key, and the request is served as
//! anonymous. Every 401 carries `WWW-Authenticate: Bearer`. Failed authentications are limited
//! per client address ([`AUTH_FAILURES_PER_MINUTE`]); requests are rate-limited per key
//! (anonymous ones per address). Both are counted in the process on SQLite, and in the
//! database on PostgreSQL, where replicas share them. The client address is the peer's, or
//! what a `--trusted-proxy` says in `X-Forwarded-For` ([`client_address`]). This is a layer on
//! the protected routers only: the page, `/health`, `/ready` and the OpenAPI document never
//! pass it.

use std::{
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    time::{Duration, Instant},
};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::HeaderMap,
    middleware::Next,
    response::{IntoResponse, Response},
};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use inspector_store::{ApiKey, Store};

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
    store: &dyn Store,
    name: &str,
    admin: bool,
) -> Result<(String, String), inspector_store::StoreError> {
    let (id, key, hash) = generate_key();
    store.create_api_key(&id, name, &hash, admin)?;
    Ok((id, key))
}

/// The key a request presents: `Authorization: Bearer KEY` (the scheme in any case, RFC 9110)
/// or `X-API-Key: KEY`. When both are sent they must carry the same key.
fn presented_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let bearer = match headers.get(axum::http::header::AUTHORIZATION) {
        Some(v) => {
            let v = v
                .to_str()
                .map_err(|_| ApiError::unauthorized("the Authorization header is not text"))?;
            let (scheme, key) = v.trim().split_once(' ').unwrap_or((v.trim(), ""));
            if !scheme.eq_ignore_ascii_case("bearer") || key.trim().is_empty() {
                return Err(ApiError::unauthorized(
                    "the Authorization header must be `Bearer <key>`",
                ));
            }
            Some(key.trim().to_string())
        }
        None => None,
    };
    let header = match headers.get("x-api-key") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::unauthorized("the X-API-Key header is not text"))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    match (bearer, header) {
        (Some(a), Some(b)) if a != b => Err(ApiError::unauthorized(
            "Authorization and X-API-Key carry different keys: send one key",
        )),
        (Some(a), _) => Ok(Some(a)),
        (None, b) => Ok(b),
    }
}

/// Failed authentications allowed per client address and minute; beyond them every request
/// from that address that presents a key gets 429 until the minute is over, so keys cannot be
/// guessed at speed.
pub const AUTH_FAILURES_PER_MINUTE: u32 = 20;

/// The current minute since the Unix epoch, and the seconds left in it.
pub(crate) fn minute_now() -> (i64, u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    ((now / 60) as i64, 60 - now % 60)
}

/// Failed authentications per client address, in fixed one-minute windows: in this process,
/// or in the database when replicas share one ([`AuthFailures::shared`]).
#[derive(Default)]
pub struct AuthFailures {
    windows: std::sync::Mutex<std::collections::HashMap<IpAddr, (Instant, u32)>>,
    shared: bool,
}

impl AuthFailures {
    const WINDOW: Duration = Duration::from_secs(60);

    /// Counted in the database, so that replicas sharing it share the limit.
    pub fn shared() -> Self {
        AuthFailures {
            shared: true,
            ..AuthFailures::default()
        }
    }

    /// Seconds until `ip` may try again, when it has failed too often.
    async fn blocked(&self, state: &AppState, ip: IpAddr) -> Result<Option<u64>, ApiError> {
        if self.shared {
            let (minute, left) = minute_now();
            let failures = state
                .read(move |s| s.hits(&format!("authfail:{ip}"), minute))
                .await?;
            return Ok((failures >= AUTH_FAILURES_PER_MINUTE as i64).then_some(left));
        }
        Ok(self.blocked_here(ip))
    }

    fn blocked_here(&self, ip: IpAddr) -> Option<u64> {
        let windows = self.windows.lock().expect("auth failures lock");
        let (start, count) = windows.get(&ip)?;
        let elapsed = start.elapsed();
        (elapsed < Self::WINDOW && *count >= AUTH_FAILURES_PER_MINUTE)
            .then(|| (Self::WINDOW - elapsed).as_secs() + 1)
    }

    async fn record(&self, state: &AppState, ip: IpAddr) {
        if self.shared {
            let (minute, _) = minute_now();
            if let Err(e) = state
                .read(move |s| s.count_hit(&format!("authfail:{ip}"), minute))
                .await
            {
                tracing::warn!("counting a failed authentication: {}", e.message);
            }
            return;
        }
        self.record_here(ip);
    }

    fn record_here(&self, ip: IpAddr) {
        let mut windows = self.windows.lock().expect("auth failures lock");
        // Bounded: old windows are dropped when the table grows.
        if windows.len() >= 10_000 {
            windows.retain(|_, (start, _)| start.elapsed() < Self::WINDOW);
        }
        let entry = windows.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= Self::WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

/// Per-key (or per-address) request limits: in this process (a token bucket), or counted in
/// the database when replicas share one ([`Limiter::shared`]), so that a key's limit holds
/// across all of them.
pub struct Limiter {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    /// `Some(per minute)` when counted in the database (fixed one-minute windows).
    shared: Option<u32>,
    checks: std::sync::atomic::AtomicU64,
}

fn rate_limited(wait: u64) -> ApiError {
    ApiError {
        retry_after: Some(wait),
        ..ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests: try again in {wait} s"),
        )
    }
}

impl Limiter {
    /// `per_minute` requests a minute with bursts of the same size; 0 turns limits off.
    pub fn new(per_minute: u32) -> Self {
        Limiter {
            limiter: NonZeroU32::new(per_minute)
                .map(|n| RateLimiter::keyed(Quota::per_minute(n).allow_burst(n))),
            shared: None,
            checks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `per_minute` requests in each calendar minute, counted in the database; 0 turns limits
    /// off.
    pub fn shared(per_minute: u32) -> Self {
        Limiter {
            limiter: None,
            shared: (per_minute > 0).then_some(per_minute),
            checks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    async fn check(&self, state: &AppState, who: &str) -> Result<(), ApiError> {
        if let Some(per_minute) = self.shared {
            let (minute, left) = minute_now();
            let who = who.to_string();
            let hits = state.read(move |s| s.count_hit(&who, minute)).await?;
            return if hits > per_minute as i64 {
                Err(rate_limited(left))
            } else {
                Ok(())
            };
        }
        self.check_here(who)
    }

    fn check_here(&self, who: &str) -> Result<(), ApiError> {
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
            rate_limited(
                not_until
                    .wait_time_from(governor::clock::Clock::now(
                        &governor::clock::DefaultClock::default(),
                    ))
                    .as_secs()
                    + 1,
            )
        })
    }
}

/// The layer on the protected routers: identifies the caller, enforces keys and limits, and
/// hands the caller to the handlers as a request extension.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip());
    let address =
        peer.map(|p| client_address(p, req.headers(), &state.inner.config.trusted_proxies));
    match identify(&state, req.headers(), address).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// The client's address: the peer's, or when the peer is a trusted load balancer, the last
/// address in `X-Forwarded-For` that is not one of the trusted proxies (the ones before it
/// may be forged by the client).
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    forwarded
        .into_iter()
        .rev()
        .find(|a| !trusted.contains(a))
        .unwrap_or(peer)
}

async fn identify(
    state: &AppState,
    headers: &HeaderMap,
    address: Option<IpAddr>,
) -> Result<Caller, ApiError> {
    let failures = &state.inner.auth_failures;
    let presented = headers.contains_key(axum::http::header::AUTHORIZATION)
        || headers.contains_key("x-api-key");
    if presented
        && let Some(ip) = address
        && let Some(wait) = failures.blocked(state, ip).await?
    {
        return Err(ApiError {
            retry_after: Some(wait),
            ..ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many failed authentications: try again in {wait} s"),
            )
        });
    }
    let caller = match caller(state, headers).await {
        Ok(caller) => caller,
        Err(e) => {
            if e.status == axum::http::StatusCode::UNAUTHORIZED
                && presented
                && let Some(ip) = address
            {
                failures.record(state, ip).await;
            }
            return Err(e);
        }
    };
    let who = match &caller {
        Caller::Key(k) => format!("key:{}", k.id),
        Caller::Anonymous => match address {
            Some(ip) => format!("ip:{ip}"),
            None => "anonymous".to_string(),
        },
    };
    state.inner.limiter.check(state, &who).await?;
    Ok(caller)
}

/// The caller the headers name; 401 for a bad, unknown (where keys are required) or revoked
/// key, or none where one is required.
async fn caller(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let key = presented_key(headers)?;
    let require_keys = state.inner.config.require_keys;
    Ok(match key {
        Some(key) => {
            let hash = hash_key(&key);
            let found = state.read(move |s| s.api_key_with_hash(&hash)).await?;
            match found {
                Some(k) if k.revoked_at.is_none() => Caller::Key(k),
                Some(_) => return Err(ApiError::unauthorized("this API key is revoked")),
                // Without required keys a token that is no key of ours is no key at all (the
                // OpenAI client always sends one).
                None if !require_keys => Caller::Anonymous,
                None => return Err(ApiError::unauthorized("unknown API key")),
            }
        }
        None if require_keys => {
            return Err(ApiError::unauthorized(
                "an API key is required: send `Authorization: Bearer <key>` \
                 (create one with `inspector keys create`)",
            ));
        }
        None => Caller::Anonymous,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_client_address_comes_from_trusted_proxies_only() {
        let lb: IpAddr = "127.0.0.1".parse().unwrap();
        let client: IpAddr = "10.0.0.7".parse().unwrap();
        let h = forwarded(&["10.0.0.7"]);
        // From the trusted load balancer: the client it names.
        assert_eq!(client_address(lb, &h, &[lb]), client);
        // From anyone else the header is ignored.
        assert_eq!(
            client_address(client, &forwarded(&["1.2.3.4"]), &[lb]),
            client
        );
        assert_eq!(client_address(lb, &h, &[]), lb);
        // A client that sends its own header cannot hide behind it: the last untrusted
        // address counts (nginx appends the peer it saw).
        let forged = forwarded(&["1.2.3.4, 10.0.0.7"]);
        assert_eq!(client_address(lb, &forged, &[lb]), client);
        let two_headers = forwarded(&["1.2.3.4", "10.0.0.7"]);
        assert_eq!(client_address(lb, &two_headers, &[lb]), client);
        // Chained proxies both trusted; garbage and an empty header fall back to the peer.
        let other_lb: IpAddr = "10.0.0.2".parse().unwrap();
        let chained = forwarded(&["10.0.0.7, 10.0.0.2"]);
        assert_eq!(client_address(lb, &chained, &[lb, other_lb]), client);
        assert_eq!(client_address(lb, &forwarded(&["junk"]), &[lb]), lb);
        assert_eq!(client_address(lb, &HeaderMap::new(), &[lb]), lb);
    }
}
