//! `POST /v1/cache/purge`: purges the proxies' response cache by exact key, key prefix or tag.
//!
//! The gateway does not touch a cache itself: it publishes the [`PurgeCommand`] on the core NATS
//! subject every proxy worker subscribes to (each applies it to its memory tier and to Redis),
//! and records a `cache.purged` event with the caller as actor on the EVENTS stream. Needs a
//! token with the `write` scope.

use std::time::Duration;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use stone_events::cache::{CacheAction, CacheEvent, PurgeBy, PurgeCommand, purge_subject};
use stone_events::streams::headers;
use stone_events::{Envelope, EventData, Namespace};
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::{RequireScope, Write};
use crate::error::ErrorBody;

/// Bound on publishing, so a NATS outage answers 503 instead of hanging.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest accepted request body.
const MAX_BODY_BYTES: usize = 16 * 1024;

/// What the purge route needs.
#[derive(Clone)]
pub struct PurgeState {
    /// For authentication (the token store).
    pub app: AppState,
    pub js: async_nats::jetstream::Context,
    pub namespace: Namespace,
    pub partitions: u16,
}

/// The request body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// `key` (one object and its variants, `host/path?query`), `prefix` (every key starting
    /// with the value, e.g. `api.example.com/users/`) or `tag` (Surrogate-Key / Cache-Tag).
    #[schema(example = "prefix")]
    pub by: String,
    #[schema(example = "api.example.com/users/")]
    pub value: String,
}

/// The answer: the purge was sent to every worker.
#[derive(Debug, Serialize, ToSchema)]
pub struct PurgeAccepted {
    pub by: String,
    pub value: String,
    /// The caller, as recorded in the `cache.purged` event.
    pub actor: String,
    /// The id of the `cache.purged` event.
    pub event_id: String,
}

pub fn routes(state: PurgeState) -> Router {
    Router::new().route("/v1/cache/purge", post(purge)).with_state(state)
}

/// Purges cached responses on every proxy worker and in Redis.
#[utoipa::path(
    post, path = "/v1/cache/purge", tag = "cache",
    request_body = PurgeRequest,
    responses(
        (status = 202, description = "sent to every worker; applied within a second", body = PurgeAccepted),
        (status = 400, description = "invalid field", body = ErrorBody),
        (status = 401, description = "no valid token", body = ErrorBody),
        (status = 403, description = "scope too small", body = ErrorBody),
        (status = 503, description = "NATS unavailable", body = ErrorBody),
    ),
    security(("bearer" = ["write"]))
)]
pub async fn purge(State(state): State<PurgeState>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let caller = match RequireScope::<Write>::from_request_parts(&mut parts, &state.app).await {
        Ok(RequireScope { caller, .. }) => caller,
        Err(rejection) => return rejection.into_response(),
    };
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return error(StatusCode::BAD_REQUEST, "invalid_parameter", "the body is unreadable or too large", None);
    };
    let request: PurgeRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(parse_error) => {
            return error(StatusCode::BAD_REQUEST, "invalid_parameter", &parse_error.to_string(), None);
        }
    };
    let by = match request.by.as_str() {
        "key" => PurgeBy::Key,
        "prefix" => PurgeBy::Prefix,
        "tag" => PurgeBy::Tag,
        _ => return error(StatusCode::BAD_REQUEST, "invalid_parameter", "by must be key, prefix or tag", Some("by")),
    };
    let value = request.value.trim().to_owned();
    // An empty prefix would purge everything; that deserves its own, explicit operation.
    if value.is_empty() || value.len() > 2048 || value.chars().any(char::is_control) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            "value must be 1 to 2048 characters without control characters",
            Some("value"),
        );
    }
    let command = PurgeCommand { by, value: value.clone(), actor: caller.name.clone() };
    let Ok(payload) = serde_json::to_vec(&command) else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error", None);
    };
    let client = state.js.client();
    // Flushed, so that the command has reached the server when the caller hears 202.
    let sent = tokio::time::timeout(PUBLISH_TIMEOUT, async {
        client.publish(purge_subject(&state.namespace), payload.into()).await.is_ok() && client.flush().await.is_ok()
    })
    .await;
    if !matches!(sent, Ok(true)) {
        tracing::warn!("cache purge could not be published");
        return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "NATS is unavailable; retry later", None);
    }
    let event = CacheEvent {
        action: CacheAction::Purged,
        route: stone_events::subjects::NONE_TOKEN.to_owned(),
        key: value.clone(),
        tier: None,
        bytes: 0,
        ttl_s: None,
        tags: if by == PurgeBy::Tag { vec![value.clone()] } else { Vec::new() },
        actor: Some(caller.name.clone()),
        reason: Some(format!("purge by {}", by.as_str())),
        count: None,
    };
    let envelope = Envelope::new("gateway", 0, event);
    let event_id = envelope.id.to_string();
    // The purge itself went out; failing to record it is logged, not reported as a failed purge.
    if let Err(record_error) = record(&state, &envelope).await {
        tracing::warn!(error = %record_error, "cache.purged event could not be recorded");
    }
    let accepted = PurgeAccepted { by: by.as_str().to_owned(), value, actor: caller.name, event_id };
    (StatusCode::ACCEPTED, Json(accepted)).into_response()
}

async fn record(state: &PurgeState, envelope: &Envelope<CacheEvent>) -> anyhow::Result<()> {
    let mut message_headers = async_nats::HeaderMap::new();
    message_headers.insert(headers::MSG_ID, envelope.id.to_string().as_str());
    message_headers.insert(headers::EVENT_TYPE, envelope.data.event_type());
    message_headers.insert(headers::EVENT_VERSION, envelope.version.to_string().as_str());
    let subject = state.namespace.event_subject(envelope, state.partitions);
    let acknowledgement = tokio::time::timeout(PUBLISH_TIMEOUT, async {
        let published = state.js.publish_with_headers(subject, message_headers, envelope.to_json()?.into()).await?;
        published.await?;
        anyhow::Ok(())
    })
    .await;
    acknowledgement.map_err(|_| anyhow::anyhow!("no acknowledgement within {PUBLISH_TIMEOUT:?}"))?
}

use crate::error::respond as error;
