//! `/api/v1/events`: the camera alert events that `inspector watch` stores in the same database
//! (and data dir): list and filter them, read one, fetch its frame, acknowledge it, and follow
//! new ones as server-sent events.

use std::{convert::Infallible, time::Duration};

use axum::{
    Extension, Json,
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use inspector_store::{EventFilter, EventRow};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    auth::Caller,
    error::{ApiError, ErrorBody},
    record::rfc3339,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_events))
        .routes(routes!(stream_events))
        .routes(routes!(get_event))
        .routes(routes!(get_frame))
        .routes(routes!(ack_event))
}

/// A camera alert event.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventRecord {
    pub id: String,
    pub camera: String,
    /// The source, credentials redacted.
    pub source: String,
    /// Seconds: of media time for a video file, since the epoch for a live source.
    pub at: f64,
    /// When the event was stored (RFC 3339).
    pub stored_at: String,
    /// The rule's canonical citation.
    pub rule: String,
    /// 高, 中 or 低.
    pub risk: String,
    /// The frame with the boxes drawn (a JPEG): `/api/v1/events/{id}/frame`.
    pub frame_url: String,
    /// The violations seen on the frame that raised it, with their boxes.
    #[schema(value_type = Object)]
    pub violations: serde_json::Value,
    /// When it was acknowledged (RFC 3339), and by whom (the API key's name).
    pub acked_at: Option<String>,
    pub acked_by: Option<String>,
}

impl EventRecord {
    fn from_row(row: &EventRow) -> EventRecord {
        let e = &row.event;
        let record: serde_json::Value = serde_json::from_str(&e.record).unwrap_or_default();
        EventRecord {
            id: e.id.clone(),
            camera: e.camera.clone(),
            source: e.source.clone(),
            at: e.at,
            stored_at: rfc3339(e.stored_ms),
            rule: e.rule.clone(),
            risk: e.risk.clone(),
            frame_url: format!("/api/v1/events/{}/frame", e.id),
            violations: record["violations"].clone(),
            acked_at: row.acked.as_ref().map(|(ms, _)| rfc3339(*ms)),
            acked_by: row.acked.as_ref().map(|(_, by)| by.clone()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    pub items: Vec<EventRecord>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct EventQuery {
    /// Events of this camera (its name in the cameras file, or `source-N`).
    pub camera: Option<String>,
    /// Events of this rule (its canonical citation).
    pub rule: Option<String>,
    /// 高/中/低 (or high/medium/low).
    pub risk: Option<String>,
    /// `true`: acknowledged ones only; `false`: the open ones (the inbox).
    pub acked: Option<bool>,
    /// RFC 3339, inclusive (the time it was stored).
    pub since: Option<String>,
    /// RFC 3339, exclusive.
    pub until: Option<String>,
    /// 1–200, default 50.
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// An event id is 16 hex digits; anything else is refused before the database is asked, and
/// never becomes a path.
fn checked_id(id: &str) -> Result<&str, ApiError> {
    if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(id)
    } else {
        Err(ApiError::not_found(format!("no event with id `{id}`")))
    }
}

fn filter(q: EventQuery) -> Result<(EventFilter, usize), ApiError> {
    let common = super::inspections::ListCommon::check(
        q.risk.as_deref(),
        q.since.as_deref(),
        q.until.as_deref(),
        q.cursor.as_deref(),
        q.limit,
    )?;
    Ok((
        EventFilter {
            camera: q.camera,
            rule: q.rule,
            risk: common.risk,
            acked: q.acked,
            since_ms: common.since_ms,
            until_ms: common.until_ms,
            before_seq: common.before_seq,
            after_seq: None,
            limit: common.limit + 1,
        },
        common.limit,
    ))
}

/// Camera events, newest first, filtered and paged (as inspections are).
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventQuery),
    responses((status = 200, body = EventPage), (status = 400, body = ErrorBody)))]
pub async fn list_events(
    State(state): State<AppState>,
    query: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<EventPage>, ApiError> {
    let Query(q) = query?;
    let (filter, limit) = filter(q)?;
    let rows = state.read(move |s| s.events(&filter)).await?;
    let (rows, next_cursor) = super::inspections::page(rows, limit, |r| r.seq);
    Ok(Json(EventPage {
        items: rows.iter().map(EventRecord::from_row).collect(),
        next_cursor,
    }))
}

/// One event.
#[utoipa::path(get, path = "/api/v1/events/{id}", tag = "events",
    params(("id" = String, Path)),
    responses((status = 200, body = EventRecord), (status = 404, body = ErrorBody)))]
pub async fn get_event(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<EventRecord>, ApiError> {
    let wanted = checked_id(&id)?.to_string();
    match state.read(move |s| s.event(&wanted)).await? {
        Some(row) => Ok(Json(EventRecord::from_row(&row))),
        None => Err(ApiError::not_found(format!("no event with id `{id}`"))),
    }
}

/// The frame that raised an event, with its boxes drawn (a JPEG).
#[utoipa::path(get, path = "/api/v1/events/{id}/frame", tag = "events",
    params(("id" = String, Path)),
    responses((status = 200, content_type = "image/jpeg", body = [u8]),
        (status = 404, body = ErrorBody)))]
pub async fn get_frame(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let wanted = checked_id(&id)?.to_string();
    let row = state
        .read(move |s| s.event(&wanted))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no event with id `{id}`")))?;
    // The name comes from the checked id, not from the database's text.
    let name = format!("events/{}.jpg", row.event.id);
    let photos = state.inner.photos.clone();
    let bytes = tokio::task::spawn_blocking(move || photos.get(&name))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("reading the frame of event `{id}`: {e}")))?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "the frame of event `{id}` is not in this server's photo store ({}); give \
                 `serve` the watcher's --data-dir or --photo-store",
                state.inner.photos.describe()
            ))
        })?;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg")),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=86400"),
            ),
        ],
        Body::from(bytes),
    )
        .into_response())
}

/// Acknowledge an event (the alert inbox): by the calling key's name. Acknowledging it again
/// keeps the first acknowledgement.
#[utoipa::path(post, path = "/api/v1/events/{id}/ack", tag = "events",
    params(("id" = String, Path)),
    responses((status = 200, body = EventRecord), (status = 404, body = ErrorBody)))]
pub async fn ack_event(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Json<EventRecord>, ApiError> {
    let wanted = checked_id(&id)?.to_string();
    let by = match caller.as_deref() {
        Some(Caller::Key(k)) => k.name.clone(),
        _ => "local".to_string(),
    };
    let now = chrono::Utc::now().timestamp_millis();
    let row = state
        .write(move |s| {
            s.ack_event(&wanted, &by, now)?;
            s.event(&wanted)
        })
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no event with id `{id}`")))?;
    Ok(Json(EventRecord::from_row(&row)))
}

/// New events as they are stored, as server-sent events (`event: alert`, the record as JSON,
/// `id:` its position). A client that reconnects with `Last-Event-ID` gets what it missed;
/// without it the stream starts with events stored from now on. Filters as for the list
/// (`camera`, `rule`, `risk`).
#[utoipa::path(get, path = "/api/v1/events/stream", tag = "events", params(EventQuery),
    responses((status = 200, content_type = "text/event-stream", body = String)))]
pub async fn stream_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(q) = query?;
    let (mut base, _) = filter(q)?;
    base.before_seq = None;
    base.limit = 100;
    let resume: Option<i64> = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let start = match resume {
        Some(seq) => seq,
        // From now on: after the newest event stored so far.
        None => state
            .read(|s| {
                s.events(&EventFilter {
                    limit: 1,
                    ..Default::default()
                })
            })
            .await?
            .first()
            .map_or(0, |r| r.seq),
    };
    // The watcher is another process: the database is polled (each poll one indexed query).
    let stream = futures_util::stream::unfold(
        (state, base, start, Vec::<EventRow>::new()),
        |(state, base, mut last, mut ready)| async move {
            loop {
                if let Some(row) = ready.pop() {
                    last = last.max(row.seq);
                    let event = Event::default()
                        .event("alert")
                        .id(row.seq.to_string())
                        .json_data(EventRecord::from_row(&row))
                        .unwrap_or_else(|_| Event::default().comment("unserialisable"));
                    return Some((Ok(event), (state, base, last, ready)));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                if state
                    .inner
                    .stopping
                    .load(std::sync::atomic::Ordering::SeqCst)
                {
                    // The server is shutting down: end the stream (clients reconnect).
                    return None;
                }
                let filter = EventFilter {
                    after_seq: Some(last),
                    ..base.clone()
                };
                let mut rows = state
                    .read(move |s| s.events(&filter))
                    .await
                    .unwrap_or_default();
                rows.reverse(); // popped from the back: oldest first
                ready = rows;
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
