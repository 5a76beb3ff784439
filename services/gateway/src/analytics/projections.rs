//! `GET /v1/projections`: how far each projection is behind its stream — the analytics projection
//! per partition, read from the projector's state bucket (owner, checkpoint, pending events,
//! seconds behind), the config projection from its Postgres checkpoint — and each one's latest
//! rebuild (phase, done, total, rate, ETA), so lag and rebuilds are visible without scraping
//! every projector's metrics.

use std::time::Duration;

use async_nats::jetstream;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::error::{ErrorBody, ErrorDetail};

/// Base name of the projector's bucket.
const ANALYTICS_BUCKET: &str = stone_analytics::STATE_BUCKET;
/// Bound on reading the bucket, so a NATS outage answers 503 instead of hanging.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// What the projections route needs.
#[derive(Clone)]
pub struct ProjectionsState {
    pub js: jetstream::Context,
    pub namespace: stone_events::Namespace,
    pub partitions: u16,
    /// The config projection's checkpoint is read here; `None` leaves it out.
    pub pool: Option<sqlx::PgPool>,
}

/// The value the projector writes per partition (`stone_analytics::state::PartitionState`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StoredPartition {
    owner: String,
    epoch: u64,
    lease_expires_ms: i64,
    committed_through: u64,
    pending: Option<serde_json::Value>,
    pending_events: u64,
    seconds_behind: f64,
    committed_events: u64,
    updated_ms: i64,
}

/// One partition of a projection.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PartitionLag {
    pub partition: u16,
    /// Projector instance holding the partition; empty when none does.
    pub owner: String,
    /// Whether the owner's lease is current.
    pub owned: bool,
    /// Ownership changes so far.
    pub epoch: u64,
    /// Stream sequence up to which every event of the partition is in ClickHouse.
    pub committed_through: u64,
    /// Events of the partition not yet in ClickHouse, as last reported.
    pub pending_events: u64,
    /// Age of the oldest event not yet in ClickHouse, as last reported (0 when caught up).
    pub seconds_behind: f64,
    /// A batch was being written when this was reported (it is completed by whoever owns the
    /// partition next).
    pub batch_in_flight: bool,
    pub committed_events: u64,
    /// Milliseconds since the owner last reported.
    pub report_age_ms: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Projection {
    /// `analytics` or `config`.
    pub name: String,
    pub pending_events: u64,
    /// The largest lag over the partitions (analytics; 0 for config, which reports only counts).
    pub seconds_behind: f64,
    /// Per partition (analytics; empty for config, which has one checkpoint).
    pub partitions: Vec<PartitionLag>,
    /// Stream sequence up to which the projection is written (config only).
    pub checkpoint: Option<u64>,
    /// The latest rebuild, running or finished.
    pub rebuild: Option<stone_kit::rebuild::RebuildStatus>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProjectionList {
    pub projections: Vec<Projection>,
}

/// `/v1/projections`.
pub fn routes(state: ProjectionsState) -> Router {
    Router::new().route("/v1/projections", get(projections)).with_state(state)
}

fn now_ms() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Lag of every projection, per partition.
#[utoipa::path(
    get,
    path = "/v1/projections",
    tag = "projections",
    responses(
        (status = 200, description = "Projections with their lag", body = ProjectionList),
        (status = 503, description = "NATS is unavailable; retry later", body = ErrorBody),
    )
)]
pub async fn projections(State(state): State<ProjectionsState>) -> Result<Json<ProjectionList>, Response> {
    let read = async {
        let bucket = state.namespace.bucket_name(ANALYTICS_BUCKET);
        // No bucket yet: no projector ever ran; every partition is simply unowned.
        let store = state.js.get_key_value(bucket).await.ok();
        let mut partitions = Vec::with_capacity(usize::from(state.partitions));
        let now = now_ms();
        for partition in 0..state.partitions {
            let stored = match &store {
                Some(store) => match store.get(format!("p{partition}")).await? {
                    Some(value) => serde_json::from_slice::<StoredPartition>(&value).unwrap_or_default(),
                    None => StoredPartition::default(),
                },
                None => StoredPartition::default(),
            };
            partitions.push(PartitionLag {
                partition,
                owned: !stored.owner.is_empty() && stored.lease_expires_ms > now,
                owner: stored.owner,
                epoch: stored.epoch,
                committed_through: stored.committed_through,
                pending_events: stored.pending_events,
                seconds_behind: stored.seconds_behind,
                batch_in_flight: stored.pending.is_some_and(|pending| !pending.is_null()),
                committed_events: stored.committed_events,
                report_age_ms: if stored.updated_ms > 0 { (now - stored.updated_ms).max(0) } else { 0 },
            });
        }
        Ok::<_, async_nats::jetstream::kv::EntryError>(partitions)
    };
    let partitions = match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(partitions)) => partitions,
        Ok(Err(error)) => return Err(unavailable(&error.to_string())),
        Err(_) => return Err(unavailable("timed out")),
    };
    let rebuilds = match tokio::time::timeout(READ_TIMEOUT, rebuild_records(&state)).await {
        Ok(Ok(records)) => records,
        Ok(Err(error)) => return Err(unavailable(&error.to_string())),
        Err(_) => return Err(unavailable("timed out")),
    };
    let analytics = Projection {
        name: "analytics".to_owned(),
        pending_events: partitions.iter().map(|partition| partition.pending_events).sum(),
        seconds_behind: partitions.iter().map(|partition| partition.seconds_behind).fold(0.0, f64::max),
        partitions,
        checkpoint: None,
        rebuild: rebuilds.0,
    };
    let mut projections = vec![analytics];
    if let Some(pool) = &state.pool {
        let read = async {
            let checkpoint = stone_config_projector::checkpoint(pool).await.map_err(|error| error.to_string())?;
            let head = stone_kit::config_stream::last_sequence(&state.js, &state.namespace)
                .await
                .map_err(|error| error.to_string())?;
            Ok::<_, String>((checkpoint, head))
        };
        let (checkpoint, head) = match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(Ok(read)) => read,
            Ok(Err(error)) => return Err(unavailable(&error)),
            Err(_) => return Err(unavailable("timed out")),
        };
        projections.push(Projection {
            name: "config".to_owned(),
            pending_events: head.saturating_sub(checkpoint),
            seconds_behind: 0.0,
            partitions: Vec::new(),
            checkpoint: Some(checkpoint),
            rebuild: rebuilds.1,
        });
    }
    Ok(Json(ProjectionList { projections }))
}

type Records = (Option<stone_kit::rebuild::RebuildStatus>, Option<stone_kit::rebuild::RebuildStatus>);

/// The latest rebuild record of the analytics and the config projection.
async fn rebuild_records(state: &ProjectionsState) -> anyhow::Result<Records> {
    let bucket = state.namespace.bucket_name(stone_kit::rebuild::BUCKET);
    // No bucket yet: nothing was ever rebuilt.
    let Ok(store) = state.js.get_key_value(bucket).await else { return Ok((None, None)) };
    let analytics = stone_kit::rebuild::read(&store, stone_analytics::partition::REBUILD_KEY).await?;
    let config = stone_kit::rebuild::read(&store, stone_config_projector::rebuild::REBUILD_KEY).await?;
    Ok((analytics, config))
}

fn unavailable(error: &str) -> Response {
    tracing::warn!(error, "projection state unavailable, answering 503");
    let detail = ErrorDetail {
        code: "unavailable",
        message: "the projection state (NATS) is unavailable; retry later".to_owned(),
        field: None,
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(ErrorBody { error: detail })).into_response()
}
