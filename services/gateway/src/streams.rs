//! `GET /v1/streams/events`: a live, filtered, resumable tail of the EVENTS stream as
//! Server-Sent Events.
//!
//! - Filters become a NATS subject, so the server does the filtering; only `min_latency_ms` and
//!   an exact `status` code are checked here, after decoding.
//! - Each event's SSE `id:` is its stream sequence: reconnecting with `Last-Event-ID` (or
//!   `from_seq`) starts an ordered consumer right after it, so a client resumes without gaps or
//!   duplicates. `from_time` starts at a time.
//! - Every client has a bounded buffer. A client that cannot keep up loses events at the gateway,
//!   never memory: it then receives one `lagged` event saying how many it missed and from which
//!   sequences, and can reconnect with `Last-Event-ID` to fetch them from the stream.
//! - Open streams are bounded (`gateway.max_streams`); a heartbeat comment goes out every 15 s.
//! - A token with the read scope is required: `Authorization: Bearer …`, or `access_token` in the
//!   query for browsers, whose `EventSource` cannot set headers (prefer short-lived read tokens
//!   there: URLs end up in histories and proxy logs).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use axum::Router;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::routing::get;
use futures::StreamExt;
use serde::Deserialize;
use stone_events::streams::EVENTS;
use stone_events::{Event, Namespace, decode};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use utoipa::IntoParams;

use crate::error::ApiError;

/// What the stream endpoint shares.
#[derive(Clone)]
pub struct StreamState {
    pub js: jetstream::Context,
    pub namespace: Namespace,
    pub buffer: usize,
    pub slots: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    /// Where read tokens are checked.
    pub tokens: sqlx::PgPool,
}

pub fn routes(state: StreamState) -> Router {
    Router::new().route("/v1/streams/events", get(stream_events)).route("/ui/live", get(live_page)).with_state(state)
}

/// A minimal page that tails the stream with the browser's `EventSource`; filters are its query.
async fn live_page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("ui/live.html"))
}

/// Filters of the live stream. Dimension filters are exact names; unset means any.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamFilter {
    /// Event type (`request.completed`, `cache.hit`) or family (`request`, `cache`, `health`).
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// Route name (request and cache events).
    pub route: Option<String>,
    /// Upstream name (request and health events).
    pub upstream: Option<String>,
    /// Consumer name (request events).
    pub consumer: Option<String>,
    /// Status class (`5xx`) or exact code (`503`) (request events).
    pub status: Option<String>,
    /// Cache status: `hit`, `miss`, `stale`, `revalidated`, `bypass`, `none` (request events).
    pub cache: Option<String>,
    /// Only requests at least this slow, in milliseconds.
    pub min_latency_ms: Option<u64>,
    /// Start after this stream sequence (like `Last-Event-ID`).
    pub from_seq: Option<u64>,
    /// Start at this time (RFC 3339).
    pub from_time: Option<String>,
    /// A read token, for clients that cannot send `Authorization` (browsers' `EventSource`).
    #[param(value_type = Option<String>)]
    pub access_token: Option<stone_kit::config::Secret>,
}

fn token<'a>(field: &str, value: &'a Option<String>) -> Result<&'a str, ApiError> {
    match value.as_deref() {
        None => Ok("*"),
        Some(text) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') => {
            Ok(text)
        }
        Some(_) => Err(ApiError::invalid(field, "must be a name of letters, digits, '_' or '-'")),
    }
}

/// Where the stream starts and which subject it filters; also the checks done after decoding.
#[derive(Debug, PartialEq)]
pub struct StreamPlan {
    pub subject: String,
    pub exact_status: Option<u16>,
    pub min_latency_us: Option<u64>,
}

impl StreamFilter {
    /// Turns the filters into a subject, rejecting combinations the family does not carry.
    pub fn plan(&self, namespace: &Namespace) -> Result<StreamPlan, ApiError> {
        let (family, name) = match self.event_type.as_deref() {
            None if self.has_request_dimensions() => ("request", "completed"),
            None => ("*", "*"),
            Some(text) => match text.split_once('.') {
                Some((family, name)) => (family, name),
                None => (text, "*"),
            },
        };
        if !matches!(family, "*" | "request" | "cache" | "health") || name.contains(['.', ' ', '>']) || name.is_empty()
        {
            return Err(ApiError::invalid(
                "type",
                "must be an event type like request.completed, or request, cache, health",
            ));
        }
        let name = name.replace('.', "_");
        let root = namespace.root();
        let (status_class, exact_status) = match self.status.as_deref() {
            None => ("*".to_owned(), None),
            Some(class)
                if class.len() == 3
                    && class.ends_with("xx")
                    && ('1'..='5').contains(&class.chars().next().unwrap_or('0')) =>
            {
                (class.to_owned(), None)
            }
            Some(code) => match code.parse::<u16>() {
                Ok(code) if (100..=599).contains(&code) => {
                    (stone_events::subjects::status_class(code).to_owned(), Some(code))
                }
                _ => return Err(ApiError::invalid("status", "must be a class like 5xx or a code like 503")),
            },
        };
        let only_for = |field: &str, allowed: &[&str]| -> Result<(), ApiError> {
            if allowed.contains(&family) {
                Ok(())
            } else {
                Err(ApiError::invalid(field, format!("does not apply to {family} events")))
            }
        };
        let subject = match family {
            "request" => {
                let route = token("route", &self.route)?;
                let cache = token("cache", &self.cache)?;
                let upstream = token("upstream", &self.upstream)?;
                let consumer = token("consumer", &self.consumer)?;
                format!("{root}.ev.request.{name}.*.*.{route}.{status_class}.{cache}.{upstream}.{consumer}")
            }
            "cache" => {
                for (field, value) in [
                    ("upstream", &self.upstream),
                    ("consumer", &self.consumer),
                    ("cache", &self.cache),
                    ("status", &self.status),
                ] {
                    if value.is_some() {
                        only_for(field, &["request"])?;
                    }
                }
                format!("{root}.ev.cache.{name}.*.*.{}", token("route", &self.route)?)
            }
            "health" => {
                for (field, value) in [
                    ("route", &self.route),
                    ("consumer", &self.consumer),
                    ("cache", &self.cache),
                    ("status", &self.status),
                ] {
                    if value.is_some() {
                        only_for(field, &["request"])?;
                    }
                }
                if self.upstream.is_some() {
                    format!("{root}.ev.health.{name}.*.*.{}", token("upstream", &self.upstream)?)
                } else {
                    format!("{root}.ev.health.{name}.>")
                }
            }
            _ => format!("{root}.ev.>"),
        };
        Ok(StreamPlan { subject, exact_status, min_latency_us: self.min_latency_ms.map(|ms| ms.saturating_mul(1000)) })
    }

    fn has_request_dimensions(&self) -> bool {
        self.upstream.is_some()
            || self.consumer.is_some()
            || self.status.is_some()
            || self.cache.is_some()
            || self.min_latency_ms.is_some()
            || self.route.is_some()
    }

    fn deliver_policy(&self, headers: &HeaderMap) -> Result<DeliverPolicy, ApiError> {
        if let Some(last) = headers.get("last-event-id") {
            let sequence = last
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::invalid("Last-Event-ID", "must be a stream sequence"))?;
            return Ok(DeliverPolicy::ByStartSequence { start_sequence: sequence + 1 });
        }
        if let Some(sequence) = self.from_seq {
            return Ok(DeliverPolicy::ByStartSequence { start_sequence: sequence + 1 });
        }
        if let Some(text) = &self.from_time {
            let start_time = stone_events::timestamp::parse(text)
                .map_err(|_| ApiError::invalid("from_time", "must be an RFC 3339 time"))?;
            return Ok(DeliverPolicy::ByStartTime { start_time });
        }
        Ok(DeliverPolicy::New)
    }
}

impl StreamPlan {
    fn keeps(&self, event: &Event) -> bool {
        let Event::RequestCompleted(envelope) = event else { return true };
        self.exact_status.is_none_or(|status| envelope.data.status == status)
            && self.min_latency_us.is_none_or(|minimum| envelope.data.total_us >= minimum)
    }
}

/// Live tail of the event stream.
#[utoipa::path(
    get,
    path = "/v1/streams/events",
    tag = "streams",
    params(StreamFilter),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "text/event-stream: `id:` is the stream sequence, `event:` the event type, `data:` the envelope (current version); also `lagged` and `undecodable` events", content_type = "text/event-stream"),
        (status = 400, description = "Invalid filter", body = crate::error::ErrorBody),
        (status = 401, description = "Missing or invalid token", body = crate::error::ErrorBody),
        (status = 403, description = "The token lacks the read scope", body = crate::error::ErrorBody),
        (status = 503, description = "Too many open streams", body = crate::error::ErrorBody),
    )
)]
pub async fn stream_events(
    State(state): State<StreamState>,
    headers: HeaderMap,
    Query(filter): Query<StreamFilter>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let token = bearer(&headers).or(filter.access_token.as_ref().map(|secret| secret.0.as_str()));
    let Some(token) = token else {
        return crate::auth::AuthError::Missing.into_response();
    };
    match crate::auth::authenticate(&state.tokens, token).await {
        Ok(caller) if caller.scope >= crate::auth::Scope::Read => {}
        Ok(caller) => {
            return crate::auth::AuthError::InsufficientScope { required: "read", held: caller.scope.as_str() }
                .into_response();
        }
        Err(error) => return error.into_response(),
    }
    match open_stream(state, &headers, &filter).await {
        Ok(stream) => stream.into_response(),
        Err(error) => error.into_response(),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|token| !token.is_empty())
}

async fn open_stream(
    state: StreamState,
    headers: &HeaderMap,
    filter: &StreamFilter,
) -> Result<Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>> + use<>>, ApiError> {
    let plan = filter.plan(&state.namespace)?;
    let deliver_policy = filter.deliver_policy(headers)?;
    let permit = Arc::clone(&state.slots)
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded { message: "too many live streams are open; retry later".to_owned() })?;
    let stream = state
        .js
        .get_stream(state.namespace.stream_name(EVENTS))
        .await
        .map_err(|error| ApiError::Internal(anyhow::anyhow!("get EVENTS stream: {error}")))?;
    let consumer = stream
        .create_consumer(OrderedConfig { filter_subject: plan.subject.clone(), deliver_policy, ..Default::default() })
        .await
        .map_err(|error| ApiError::Internal(anyhow::anyhow!("create ordered consumer: {error}")))?;
    let messages =
        consumer.messages().await.map_err(|error| ApiError::Internal(anyhow::anyhow!("consume: {error}")))?;

    let (sender, receiver) = mpsc::channel(state.buffer.max(1));
    let shutdown = state.shutdown.clone();
    metrics::gauge!("stone_gateway_streams_open").increment(1.0);
    tokio::spawn(async move {
        let _permit = permit;
        forward(messages.map(|message| message.map_err(|error| error.to_string())), plan, sender, shutdown).await;
        metrics::gauge!("stone_gateway_streams_open").decrement(1.0);
    });
    let events = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|event| (Ok(event), receiver))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("heartbeat")))
}

/// Gap accounting for a client that fell behind.
#[derive(Debug, Default)]
struct Lag {
    missed: u64,
    first: u64,
    last: u64,
}

/// Moves messages from the ordered consumer to the client's bounded buffer until the client
/// leaves or the gateway shuts down.
async fn forward<S>(mut messages: S, plan: StreamPlan, sender: mpsc::Sender<SseEvent>, shutdown: CancellationToken)
where
    S: futures::Stream<Item = Result<jetstream::Message, String>> + Unpin,
{
    let mut lag = Lag::default();
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            () = sender.closed() => return,
            () = shutdown.cancelled() => return,
        };
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                tracing::warn!(%error, "live stream consumer failed");
                return;
            }
            None => return,
        };
        let Ok(info) = message.info() else { continue };
        let sequence = info.stream_sequence;
        let Some(event) = to_sse(sequence, &message.payload, &plan) else { continue };
        if !deliver(&sender, &mut lag, sequence, event) {
            return;
        }
    }
}

/// The SSE event for a message, or `None` when a post-decode filter drops it.
fn to_sse(sequence: u64, payload: &[u8], plan: &StreamPlan) -> Option<SseEvent> {
    let event = match decode(payload) {
        Ok(event) => event,
        Err(error) => {
            let data =
                serde_json::json!({ "sequence": sequence, "reason": error.to_string(), "code": error.reason_code() });
            return Some(SseEvent::default().id(sequence.to_string()).event("undecodable").data(data.to_string()));
        }
    };
    if !plan.keeps(&event) {
        return None;
    }
    let data = event.to_json().ok()?;
    Some(SseEvent::default().id(sequence.to_string()).event(event.event_type()).data(data))
}

/// Offers an event to the client's buffer. A full buffer drops it and records the gap, which is
/// reported as a `lagged` event as soon as there is room. Returns false when the client is gone.
fn deliver(sender: &mpsc::Sender<SseEvent>, lag: &mut Lag, sequence: u64, event: SseEvent) -> bool {
    if lag.missed > 0 {
        let report = serde_json::json!({ "missed": lag.missed, "first_seq": lag.first, "last_seq": lag.last });
        match sender.try_send(SseEvent::default().event("lagged").data(report.to_string())) {
            Ok(()) => *lag = Lag::default(),
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            // Still no room: this event joins the gap, so nothing overtakes the report.
            Err(mpsc::error::TrySendError::Full(_)) => {
                lag.record(sequence);
                return true;
            }
        }
    }
    match sender.try_send(event) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => false,
        Err(mpsc::error::TrySendError::Full(_)) => {
            lag.record(sequence);
            true
        }
    }
}

impl Lag {
    fn record(&mut self, sequence: u64) {
        metrics::counter!("stone_gateway_stream_events_dropped_total").increment(1);
        if self.missed == 0 {
            self.first = sequence;
        }
        self.missed += 1;
        self.last = sequence;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(query: &str) -> Result<StreamPlan, ApiError> {
        let filter: StreamFilter = serde_urlencoded_from(query);
        filter.plan(&Namespace::default())
    }

    fn serde_urlencoded_from(query: &str) -> StreamFilter {
        let uri: axum::http::Uri = format!("/?{query}").parse().unwrap_or_default();
        Query::<StreamFilter>::try_from_uri(&uri).map(|query| query.0).unwrap_or_default()
    }

    #[test]
    fn filters_become_subjects() {
        assert_eq!(plan("").map(|p| p.subject).ok(), Some("stone.ev.>".into()));
        assert_eq!(
            plan("route=checkout&status=5xx").map(|p| p.subject).ok(),
            Some("stone.ev.request.completed.*.*.checkout.5xx.*.*.*".into())
        );
        let exact = plan("status=503&min_latency_ms=20").ok();
        assert_eq!(exact.as_ref().map(|p| p.subject.as_str()), Some("stone.ev.request.completed.*.*.*.5xx.*.*.*"));
        assert_eq!(exact.as_ref().and_then(|p| p.exact_status), Some(503));
        assert_eq!(exact.and_then(|p| p.min_latency_us), Some(20_000));
        assert_eq!(plan("type=cache.hit&route=r").map(|p| p.subject).ok(), Some("stone.ev.cache.hit.*.*.r".into()));
        assert_eq!(plan("type=health").map(|p| p.subject).ok(), Some("stone.ev.health.*.>".into()));
    }

    #[test]
    fn invalid_filters_name_the_field() {
        let field = |query: &str| match plan(query) {
            Err(ApiError::InvalidParameter { field, .. }) => field,
            _ => None,
        };
        assert_eq!(field("route=a.b"), Some("route".into()));
        assert_eq!(field("status=6xx"), Some("status".into()));
        assert_eq!(field("type=nope"), Some("type".into()));
        assert_eq!(field("type=health&route=r"), Some("route".into()));
    }

    #[tokio::test]
    async fn a_slow_client_gets_a_lagged_event_not_unbounded_memory() {
        let (sender, mut receiver) = mpsc::channel(2);
        let mut lag = Lag::default();
        for sequence in 1..=5 {
            assert!(deliver(&sender, &mut lag, sequence, SseEvent::default().id(sequence.to_string()).data("x")));
        }
        assert_eq!((lag.missed, lag.first, lag.last), (3, 3, 5));
        // The client catches up: the next delivery reports the gap first.
        assert!(receiver.recv().await.is_some());
        assert!(receiver.recv().await.is_some());
        assert!(deliver(&sender, &mut lag, 6, SseEvent::default().id("6").data("x")));
        assert_eq!(lag.missed, 0);
        drop(sender);
        let mut remaining = 0;
        while receiver.recv().await.is_some() {
            remaining += 1;
        }
        assert_eq!(remaining, 2, "the lagged report and event 6");
    }
}
