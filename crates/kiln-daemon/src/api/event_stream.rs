//! StreamEvents: the lifecycle events as server-sent events, as they are recorded (the
//! store's insert hook wakes the streams; nothing polls).

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use kiln_api::{ErrorBody, EventStreamQuery, EventStreamSse, MAX_EVENT_STREAMS};
use tokio::sync::mpsc;

use super::system::event_view;
use super::ApiQuery;
use crate::error::{ApiError, ApiResult};
use crate::files::Channel;
use crate::manager::Manager;

/// Events read from the store at a time.
const BATCH: i64 = 200;

#[utoipa::path(
    get, path = "/v1/events/stream", operation_id = "StreamEvents", tag = "system", security(("bearer" = [])),
    description = "The lifecycle events as server-sent events as they happen: one `event` \
        event per Event, its SSE id the event's seq. From now on by default; `since` (or the \
        SSE `Last-Event-ID`) sends the kept ones after it first, so a client that reconnects \
        misses nothing. At most 16 open at once.",
    params(EventStreamQuery),
    responses(
        (status = 200, description = "The event stream", body = EventStreamSse, content_type = "text/event-stream"),
        (status = 400, description = "A malformed cursor", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 429, description = "16 event streams are open", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn stream_events(
    State(m): State<Arc<Manager>>,
    ApiQuery(q): ApiQuery<EventStreamQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let resume = super::last_event_id::<i64>(&headers, "an event's seq")?;
    let mut cursor = match resume.or(q.since) {
        Some(n) if n < 0 => {
            return Err(ApiError::bad_request(format!(
                "since {n} must be 0 or more"
            )))
        }
        Some(n) => n,
        None => *m.events.borrow(),
    };
    let permit = m.event_streams.clone().try_acquire_owned().map_err(|_| {
        ApiError::quota(format!(
            "{MAX_EVENT_STREAMS} event streams are open: close one first"
        ))
    })?;
    let mut changed = m.events.clone();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let _permit = permit;
        loop {
            let read = m.store().events_since(cursor, BATCH);
            let rows = match read {
                Ok(rows) => rows,
                Err(e) => {
                    let why = format!("reading events: {}", crate::manager::error_chain(&e));
                    let _ = tx
                        .send(Ok(SseEvent::default().event("error").data(why)))
                        .await;
                    return;
                }
            };
            let full = rows.len() as i64 == BATCH;
            for row in rows {
                cursor = row.seq;
                let ev = SseEvent::default()
                    .event("event")
                    .id(row.seq.to_string())
                    .json_data(event_view(row))
                    .unwrap_or_default();
                if tx
                    .send(Ok::<_, std::convert::Infallible>(ev))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if full {
                continue;
            }
            // Anything recorded after the read above changed the value since it was seen.
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                () = tx.closed() => return,
            }
        }
    });
    Ok(Sse::new(Channel(rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}
