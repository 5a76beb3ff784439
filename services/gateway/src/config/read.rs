//! The read side of the config API: the Postgres projection (`config_entities`,
//! `config_history`) and read-your-writes by waiting for the projection's checkpoint.

use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;
use stone_events::config::{EntityKind, EntitySpec};
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::ConfigApiError;

/// The longest a read waits for `min_seq`; a read is a request, not a subscription.
pub const MAX_WAIT: Duration = Duration::from_secs(5);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The projector's checkpoint row.
const PROJECTION: &str = "config";

/// One entity as stored: its spec and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct EntityRecord {
    #[schema(value_type = String, example = "route")]
    pub kind: EntityKind,
    pub name: String,
    /// Stable across versions of the entity.
    pub id: Uuid,
    /// From 1, incremented by every change; also the `ETag`.
    pub version: u64,
    /// The CONFIG stream sequence of the change that produced this version.
    pub stream_seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
    pub updated_by: String,
    /// The entity's spec (route, upstream, consumer or policy fields).
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
}

impl EntityRecord {
    pub fn to_spec(&self) -> Result<EntitySpec, serde_json::Error> {
        EntitySpec::from_body(self.kind, self.spec.clone())
    }
}

/// The projection's checkpoint.
pub async fn checkpoint(pool: &PgPool) -> Result<u64, ConfigApiError> {
    let stored: Option<i64> = sqlx::query_scalar("SELECT stream_seq FROM projection_checkpoints WHERE projection = $1")
        .bind(PROJECTION)
        .fetch_optional(pool)
        .await
        .map_err(ConfigApiError::postgres)?;
    Ok(stored.map_or(0, to_u64))
}

/// Waits until the projection has applied `min_seq` (at most [`MAX_WAIT`]) and returns the
/// checkpoint it reached.
pub async fn wait_for(pool: &PgPool, min_seq: u64) -> Result<u64, ConfigApiError> {
    let deadline = tokio::time::Instant::now() + MAX_WAIT;
    loop {
        let reached = checkpoint(pool).await?;
        if reached >= min_seq {
            return Ok(reached);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ConfigApiError::Lagging { wanted: min_seq, reached });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

type EntityRow = (String, String, Uuid, i64, serde_json::Value, i64, OffsetDateTime, String);

const ENTITY_COLUMNS: &str = "kind, name, id, version, spec, stream_seq, updated_at, updated_by";

fn entity_from_row(row: EntityRow) -> Option<EntityRecord> {
    let (kind, name, id, version, spec, stream_seq, updated_at, updated_by) = row;
    Some(EntityRecord {
        kind: EntityKind::parse(&kind)?,
        name,
        id,
        version: to_u64(version),
        stream_seq: to_u64(stream_seq),
        updated_at,
        updated_by,
        spec,
    })
}

pub async fn entity(pool: &PgPool, kind: EntityKind, name: &str) -> Result<Option<EntityRecord>, ConfigApiError> {
    let row: Option<EntityRow> =
        sqlx::query_as(&format!("SELECT {ENTITY_COLUMNS} FROM config_entities WHERE kind = $1 AND name = $2"))
            .bind(kind.as_str())
            .bind(name)
            .fetch_optional(pool)
            .await
            .map_err(ConfigApiError::postgres)?;
    Ok(row.and_then(entity_from_row))
}

/// Every entity of a kind (or of every kind), by name.
pub async fn entities(pool: &PgPool, kind: Option<EntityKind>) -> Result<Vec<EntityRecord>, ConfigApiError> {
    let rows: Vec<EntityRow> = sqlx::query_as(&format!(
        "SELECT {ENTITY_COLUMNS} FROM config_entities WHERE $1::text IS NULL OR kind = $1 ORDER BY kind, name"
    ))
    .bind(kind.map(EntityKind::as_str))
    .fetch_all(pool)
    .await
    .map_err(ConfigApiError::postgres)?;
    Ok(rows.into_iter().filter_map(entity_from_row).collect())
}

/// One applied change: who, when, what, before and after.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct HistoryRecord {
    pub stream_seq: u64,
    /// Where the change took effect (the last member's sequence for a change set).
    pub effective_seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: OffsetDateTime,
    #[schema(value_type = String, example = "route")]
    pub kind: EntityKind,
    pub name: String,
    pub id: Uuid,
    pub version: u64,
    /// `upserted` or `deleted`.
    pub op: String,
    pub actor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_set: Option<Uuid>,
    /// Top-level spec fields that differ between `before` and `after`.
    pub changed_fields: Vec<String>,
    #[schema(value_type = Option<Object>)]
    pub before: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    pub after: Option<serde_json::Value>,
}

/// Filters of `GET /v1/config/history`.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    pub kind: Option<EntityKind>,
    pub name: Option<String>,
    /// Only changes before this sequence (the previous page's `next_cursor`).
    pub before_seq: Option<u64>,
    pub limit: u32,
}

type HistoryRow = (
    i64,
    i64,
    OffsetDateTime,
    String,
    String,
    Uuid,
    i64,
    String,
    String,
    Option<Uuid>,
    Option<serde_json::Value>,
    Option<serde_json::Value>,
);

/// Newest first.
pub async fn history(pool: &PgPool, filter: &HistoryFilter) -> Result<Vec<HistoryRecord>, ConfigApiError> {
    let rows: Vec<HistoryRow> = sqlx::query_as(
        "SELECT stream_seq, effective_seq, effective_at, kind, name, entity_id, version, op, actor, change_set, \
         before, after FROM config_history \
         WHERE ($1::text IS NULL OR kind = $1) AND ($2::text IS NULL OR name = $2) \
         AND ($3::bigint IS NULL OR stream_seq < $3) \
         ORDER BY stream_seq DESC LIMIT $4",
    )
    .bind(filter.kind.map(EntityKind::as_str))
    .bind(filter.name.as_deref())
    .bind(filter.before_seq.map(to_i64))
    .bind(i64::from(filter.limit))
    .fetch_all(pool)
    .await
    .map_err(ConfigApiError::postgres)?;
    Ok(rows
        .into_iter()
        .filter_map(|(stream_seq, effective_seq, at, kind, name, id, version, op, actor, change_set, before, after)| {
            Some(HistoryRecord {
                stream_seq: to_u64(stream_seq),
                effective_seq: to_u64(effective_seq),
                at,
                kind: EntityKind::parse(&kind)?,
                name,
                id,
                version: to_u64(version),
                op,
                actor,
                change_set,
                changed_fields: changed_fields(before.as_ref(), after.as_ref()),
                before,
                after,
            })
        })
        .collect())
}

fn changed_fields(before: Option<&serde_json::Value>, after: Option<&serde_json::Value>) -> Vec<String> {
    let empty = serde_json::Map::new();
    let before = before.and_then(serde_json::Value::as_object).unwrap_or(&empty);
    let after = after.and_then(serde_json::Value::as_object).unwrap_or(&empty);
    let mut fields: Vec<String> =
        before.keys().chain(after.keys()).filter(|key| before.get(*key) != after.get(*key)).cloned().collect();
    fields.sort();
    fields.dedup();
    fields
}

/// The last sequence that had taken effect at `at` (0 before the first change).
pub async fn seq_at(pool: &PgPool, at: OffsetDateTime) -> Result<u64, ConfigApiError> {
    let sequence: Option<i64> =
        sqlx::query_scalar("SELECT max(effective_seq) FROM config_history WHERE effective_at <= $1")
            .bind(at)
            .fetch_one(pool)
            .await
            .map_err(ConfigApiError::postgres)?;
    Ok(sequence.map_or(0, to_u64))
}

/// Every entity as it was once the change at `seq` had taken effect: the latest history row of
/// each entity up to there, unless that row is a delete.
pub async fn specs_at(pool: &PgPool, seq: u64) -> Result<Vec<EntitySpec>, ConfigApiError> {
    let rows: Vec<(String, String, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT DISTINCT ON (kind, name) kind, op, after FROM config_history WHERE effective_seq <= $1 \
         ORDER BY kind, name, stream_seq DESC",
    )
    .bind(to_i64(seq))
    .fetch_all(pool)
    .await
    .map_err(ConfigApiError::postgres)?;
    let mut specs = Vec::new();
    for (kind, op, after) in rows {
        let (Some(kind), "upserted", Some(after)) = (EntityKind::parse(&kind), op.as_str(), after) else { continue };
        let spec = EntitySpec::from_body(kind, after)
            .map_err(|error| ConfigApiError::Internal(anyhow::Error::new(error).context("stored spec")))?;
        specs.push(spec);
    }
    Ok(specs)
}

pub fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}
