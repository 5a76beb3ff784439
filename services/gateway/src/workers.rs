//! `GET /v1/workers`: the proxy workers alive now, read from the NATS KV bucket `WORKERS` where
//! each worker keeps its record fresh (see `stone_proxy::registry`); a record older than the
//! bucket's age limit is gone, so a worker that died silently drops out by itself.

use std::time::Duration;

use async_nats::jetstream;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ErrorBody, ErrorDetail};

/// Base name of the bucket the workers write (prefixed per namespace).
const BUCKET: &str = "WORKERS";
/// Bound on reading the bucket, so a NATS outage answers 503 instead of hanging.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// What the workers route needs.
#[derive(Clone)]
pub struct WorkersState {
    pub js: jetstream::Context,
    pub namespace: stone_events::Namespace,
}

/// One worker, as it last reported itself.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Worker {
    /// The worker id, also the `source` of its events.
    pub worker: String,
    /// `starting` (configuration not loaded yet), `ready` or `draining`.
    pub status: String,
    /// Software version.
    pub version: String,
    /// The CONFIG stream sequence of the configuration in force.
    pub config_seq: u64,
    /// When the worker last refreshed its record (RFC 3339).
    pub last_seen: String,
    #[serde(default)]
    pub started_at: String,
    /// The worker's traffic listener.
    #[serde(default)]
    pub listen: String,
    #[serde(default)]
    pub in_flight: u64,
    /// Events waiting to be published (memory queue).
    #[serde(default)]
    pub events_pending: u64,
}

/// `GET /v1/workers`.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerList {
    /// Sorted by worker id.
    pub workers: Vec<Worker>,
}

/// `/v1/workers`.
pub fn routes(state: WorkersState) -> Router {
    Router::new().route("/v1/workers", get(list_workers)).with_state(state)
}

/// The live proxy workers with their status, version, config sequence and last beat.
#[utoipa::path(
    get,
    path = "/v1/workers",
    tag = "fleet",
    responses(
        (status = 200, description = "Workers alive now", body = WorkerList),
        (status = 503, description = "NATS is unavailable", body = ErrorBody)
    )
)]
pub async fn list_workers(State(state): State<WorkersState>) -> Response {
    match tokio::time::timeout(READ_TIMEOUT, read_workers(&state)).await {
        Ok(Ok(workers)) => Json(WorkerList { workers }).into_response(),
        Ok(Err(error)) => unavailable(error),
        Err(_) => unavailable(anyhow::anyhow!("timed out reading the worker registry")),
    }
}

async fn read_workers(state: &WorkersState) -> anyhow::Result<Vec<Worker>> {
    let bucket = state.namespace.bucket_name(BUCKET);
    // No bucket yet means no worker has started in this namespace.
    let Ok(store) = state.js.get_key_value(&bucket).await else {
        return Ok(Vec::new());
    };
    let mut keys = store.keys().await?;
    let mut workers = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        let Some(value) = store.get(&key).await? else { continue };
        match serde_json::from_slice::<Worker>(&value) {
            Ok(worker) => workers.push(worker),
            Err(error) => tracing::warn!(%key, %error, "unreadable worker record skipped"),
        }
    }
    workers.sort_by(|a, b| a.worker.cmp(&b.worker));
    Ok(workers)
}

fn unavailable(error: anyhow::Error) -> Response {
    tracing::warn!(error = format!("{error:#}"), "worker registry unavailable, answering 503");
    let detail = ErrorDetail {
        code: "unavailable",
        message: "the worker registry (NATS) is unavailable; retry later".to_owned(),
        field: None,
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(ErrorBody { error: detail })).into_response()
}
