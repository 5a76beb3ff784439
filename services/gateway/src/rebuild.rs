//! Projection rebuilds over HTTP:
//!
//! - `POST /v1/projections/{analytics|config}/rebuild` (admin scope) starts a rebuild into shadow
//!   tables on this gateway and answers 202 at once; 409 while one is running anywhere;
//! - `GET /v1/projections/{name}/rebuild` returns the latest rebuild record (phase, done, total,
//!   rate, ETA, error), kept in NATS so every gateway sees it;
//! - `GET /v1/projections/{name}/rebuild/events` streams that record as Server-Sent Events
//!   (`progress` events, then one `done` or `failed`) — what `stone replay` draws its bar from.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use stone_analytics::rebuild::{RebuildOptions, Rebuilder};
use stone_config_projector::rebuild::ConfigRebuilder;
use stone_kit::rebuild::{RebuildStatus, StartError};
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::{Admin, Read, RequireScope};
use crate::error::{ErrorBody, respond};

/// Largest accepted request body.
const MAX_BODY_BYTES: usize = 4 * 1024;
/// How often the progress stream reads the record.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// What the rebuild routes need.
#[derive(Clone)]
pub struct RebuildState {
    /// For authentication (the token store).
    pub app: AppState,
    pub analytics: Rebuilder,
    pub config: ConfigRebuilder,
    /// Rows per shadow insert of the analytics rebuild.
    pub batch_rows: usize,
    /// Rebuilds run on tasks of the process, cancelled (and their pause lifted) at shutdown.
    pub shutdown: stone_kit::Shutdown,
}

impl axum::extract::FromRef<RebuildState> for AppState {
    fn from_ref(state: &RebuildState) -> Self {
        state.app.clone()
    }
}

/// Query of the progress stream.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgressQuery {
    /// Follow this rebuild (the id `POST` answered); records of other rebuilds are not sent.
    pub id: Option<String>,
}

/// The request body (optional; `{}` or no body rebuilds from the start of the retained stream).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RebuildRequest {
    /// First stream sequence to replay (analytics only); rows before it are copied from the live
    /// tables.
    pub from_seq: Option<u64>,
    /// First event time to replay (analytics only): RFC 3339 or relative (`-6h`).
    #[schema(example = "-24h")]
    pub from_time: Option<String>,
}

/// The answer to a started rebuild.
#[derive(Debug, Serialize, ToSchema)]
pub struct RebuildAccepted {
    pub id: String,
    pub projection: String,
    /// Where the record is (`GET`).
    pub status_url: String,
    /// The progress stream (`GET`, Server-Sent Events).
    pub events_url: String,
}

pub fn routes(state: RebuildState) -> Router {
    Router::new()
        .route("/v1/projections/{name}/rebuild", post(start).get(status))
        .route("/v1/projections/{name}/rebuild/events", get(progress))
        .with_state(state)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Projection {
    Analytics,
    Config,
}

impl Projection {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "analytics" => Some(Self::Analytics),
            "config" => Some(Self::Config),
            _ => None,
        }
    }

    fn unknown(name: &str) -> Response {
        respond(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no projection named {name:?}; there are `analytics` and `config`"),
            Some("name"),
        )
    }

    fn key(self) -> &'static str {
        match self {
            Self::Analytics => stone_analytics::partition::REBUILD_KEY,
            Self::Config => stone_config_projector::rebuild::REBUILD_KEY,
        }
    }
}

/// Starts a rebuild of a projection into shadow tables, swapped in atomically when complete.
#[utoipa::path(
    post, path = "/v1/projections/{name}/rebuild", tag = "projections",
    params(("name" = String, Path, description = "`analytics` or `config`")),
    request_body(content = RebuildRequest, description = "optional start of the replay"),
    responses(
        (status = 202, description = "started; follow `events_url`", body = RebuildAccepted),
        (status = 400, description = "invalid field", body = ErrorBody),
        (status = 401, description = "no valid token", body = ErrorBody),
        (status = 403, description = "scope too small (admin needed)", body = ErrorBody),
        (status = 404, description = "no such projection", body = ErrorBody),
        (status = 409, description = "a rebuild of this projection is running", body = ErrorBody),
        (status = 503, description = "NATS unavailable", body = ErrorBody),
    ),
    security(("bearer" = ["admin"]))
)]
pub async fn start(State(state): State<RebuildState>, Path(name): Path<String>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let caller = match RequireScope::<Admin>::from_request_parts(&mut parts, &state.app).await {
        Ok(RequireScope { caller, .. }) => caller,
        Err(rejection) => return rejection.into_response(),
    };
    let Some(projection) = Projection::parse(&name) else { return Projection::unknown(&name) };
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return respond(StatusCode::BAD_REQUEST, "invalid_parameter", "the body is unreadable or too large", None);
    };
    let request: RebuildRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RebuildRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(error) => return respond(StatusCode::BAD_REQUEST, "invalid_parameter", &error.to_string(), None),
        }
    };
    let from_time = match request.from_time.as_deref() {
        Some(value) => match crate::time_range::parse_instant("from_time", value, time::OffsetDateTime::now_utc()) {
            Ok(instant) => Some(instant),
            Err(error) => {
                return respond(StatusCode::BAD_REQUEST, "invalid_parameter", &error.to_string(), Some("from_time"));
            }
        },
        None => None,
    };
    if request.from_seq.is_some() && from_time.is_some() {
        return respond(StatusCode::BAD_REQUEST, "invalid_parameter", "give from_seq or from_time, not both", None);
    }
    if projection == Projection::Config && (request.from_seq.is_some() || from_time.is_some()) {
        return respond(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            "the config projection always rebuilds from sequence 1 (its fold needs every event; CONFIG never expires)",
            Some(if request.from_seq.is_some() { "from_seq" } else { "from_time" }),
        );
    }
    let claimed = match projection {
        Projection::Analytics => state.analytics.claim(&caller.name).await,
        Projection::Config => state.config.claim(&caller.name).await,
    };
    let tracker = match claimed {
        Ok(tracker) => tracker,
        Err(StartError::AlreadyRunning { id, .. }) => {
            return respond(
                StatusCode::CONFLICT,
                "conflict",
                &format!("a rebuild of {name} is already running (id {id}); follow it or wait for it to end"),
                None,
            );
        }
        Err(StartError::Store(error)) => {
            tracing::warn!(%error, "cannot claim the rebuild record");
            return respond(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "NATS is unavailable; retry later", None);
        }
    };
    let id = tracker.status().id;
    tracing::info!(projection = %name, id = %id, actor = %caller.name, "rebuild started");
    let cancel = state.shutdown.token();
    match projection {
        Projection::Analytics => {
            let rebuilder = state.analytics.clone();
            let options = RebuildOptions { from_seq: request.from_seq, from_time, batch_rows: state.batch_rows };
            state.shutdown.spawn(async move {
                let _ = rebuilder.execute(&tracker, &options, &cancel).await;
            });
        }
        Projection::Config => {
            let rebuilder = state.config.clone();
            state.shutdown.spawn(async move {
                let _ = rebuilder.execute(&tracker, &cancel).await;
            });
        }
    }
    let accepted = RebuildAccepted {
        status_url: format!("/v1/projections/{name}/rebuild"),
        events_url: format!("/v1/projections/{name}/rebuild/events"),
        id,
        projection: name,
    };
    (StatusCode::ACCEPTED, Json(accepted)).into_response()
}

/// The latest rebuild of a projection.
#[utoipa::path(
    get, path = "/v1/projections/{name}/rebuild", tag = "projections",
    params(("name" = String, Path, description = "`analytics` or `config`")),
    responses(
        (status = 200, description = "the latest rebuild's record", body = RebuildStatus),
        (status = 401, description = "no valid token", body = ErrorBody),
        (status = 403, description = "scope too small (read needed)", body = ErrorBody),
        (status = 404, description = "no such projection, or never rebuilt", body = ErrorBody),
        (status = 503, description = "NATS unavailable", body = ErrorBody),
    ),
    security(("bearer" = ["read"]))
)]
pub async fn status(
    _caller: RequireScope<Read>,
    State(state): State<RebuildState>,
    Path(name): Path<String>,
) -> Response {
    let Some(projection) = Projection::parse(&name) else { return Projection::unknown(&name) };
    match stone_kit::rebuild::read(&state.analytics.rebuilds, projection.key()).await {
        Ok(Some(record)) => Json(record).into_response(),
        Ok(None) => respond(StatusCode::NOT_FOUND, "not_found", &format!("{name} was never rebuilt"), None),
        Err(error) => {
            tracing::warn!(%error, "cannot read the rebuild record");
            respond(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "NATS is unavailable; retry later", None)
        }
    }
}

/// The latest rebuild's progress as Server-Sent Events: `progress` (the record, as JSON) whenever
/// it changes, then `done` or `failed`, and the stream ends.
#[utoipa::path(
    get, path = "/v1/projections/{name}/rebuild/events", tag = "projections",
    params(
        ("name" = String, Path, description = "`analytics` or `config`"),
        ("id" = Option<String>, Query, description = "only this rebuild's records"),
    ),
    responses(
        (status = 200, description = "`text/event-stream` of `progress`, then `done` or `failed` (data: the record)", content_type = "text/event-stream", body = String),
        (status = 401, description = "no valid token", body = ErrorBody),
        (status = 403, description = "scope too small (read needed)", body = ErrorBody),
        (status = 404, description = "no such projection", body = ErrorBody),
    ),
    security(("bearer" = ["read"]))
)]
pub async fn progress(
    _caller: RequireScope<Read>,
    State(state): State<RebuildState>,
    Path(name): Path<String>,
    axum::extract::Query(query): axum::extract::Query<ProgressQuery>,
) -> Response {
    let Some(projection) = Projection::parse(&name) else { return Projection::unknown(&name) };
    let store = state.analytics.rebuilds.clone();
    let shutdown = state.shutdown.token();
    let key = projection.key();
    let wanted = query.id;
    let events = async_stream(move |sender| async move {
        let mut last: Option<RebuildStatus> = None;
        let mut ticker = tokio::time::interval(PROGRESS_EVERY);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let record = match stone_kit::rebuild::read(&store, key).await {
                Ok(Some(record)) if wanted.as_ref().is_none_or(|id| *id == record.id) => record,
                Ok(_) => continue,
                Err(error) => {
                    tracing::debug!(%error, "progress stream cannot read the record");
                    continue;
                }
            };
            let changed = last.as_ref().is_none_or(|previous| {
                previous.id != record.id || previous.phase != record.phase || previous.done != record.done
            });
            if !changed {
                continue;
            }
            let kind = match record.phase {
                stone_kit::rebuild::Phase::Done => "done",
                stone_kit::rebuild::Phase::Failed => "failed",
                _ => "progress",
            };
            let Ok(data) = serde_json::to_string(&record) else { return };
            if sender.send(SseEvent::default().event(kind).data(data)).await.is_err() {
                return;
            }
            if kind != "progress" {
                return;
            }
            last = Some(record);
        }
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("heartbeat")).into_response()
}

/// A stream fed by a task through a small channel; the task stops when the client goes away.
fn async_stream<F, Fut>(producer: F) -> impl futures::Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<SseEvent>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(producer(sender));
    futures::stream::unfold(
        receiver,
        |mut receiver| async move { receiver.recv().await.map(|event| (Ok(event), receiver)) },
    )
}
