//! `GET /v1/health/upstreams` (each target's state now) and `GET /v1/health/timeline` (its
//! transitions over a range), from the `health_events` the projector writes.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::filter::{SqlValue, WhereClause};
use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::time_range::TimeRange;

const TRANSITIONS: &str = "event_type IN ('health.target_up', 'health.target_down')";

/// Parameters of the health endpoints.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HealthQuery {
    /// Only this upstream's targets.
    pub upstream: Option<String>,
    /// Only this target (its URL).
    pub target: Option<String>,
    /// Timeline only: start of the range (RFC 3339 or relative, e.g. `-1h`). Default `-1h`.
    pub from: Option<String>,
    /// Timeline only: end of the range. Default `now`.
    pub to: Option<String>,
    /// Timeline only: most transitions returned, 1 to 5000. Default 1000.
    pub limit: Option<u32>,
}

fn parse(pairs: &[(String, String)], allowed: &[&str]) -> Result<HealthQuery, ApiError> {
    let mut query = HealthQuery::default();
    let mut limit = None;
    for (name, value) in pairs {
        if !allowed.contains(&name.as_str()) {
            return Err(ApiError::invalid(
                name.as_str(),
                format!("unknown parameter {name:?}; expected one of {}", allowed.join(", ")),
            ));
        }
        let slot = match name.as_str() {
            "upstream" => &mut query.upstream,
            "target" => &mut query.target,
            "from" => &mut query.from,
            "to" => &mut query.to,
            _ => &mut limit,
        };
        if slot.replace(value.clone()).is_some() {
            return Err(ApiError::invalid(name.as_str(), format!("parameter {name:?} is given more than once")));
        }
        if value.is_empty() || value.len() > 512 || value.chars().any(char::is_control) {
            return Err(ApiError::invalid(name.as_str(), format!("{name} must be 1 to 512 characters")));
        }
    }
    if let Some(text) = limit {
        match text.parse::<u32>() {
            Ok(value) if (1..=5_000).contains(&value) => query.limit = Some(value),
            _ => return Err(ApiError::invalid("limit", format!("{text:?} is not an integer from 1 to 5000"))),
        }
    }
    Ok(query)
}

fn target_conditions(query: &HealthQuery, clause: &mut WhereClause) {
    if let Some(upstream) = &query.upstream {
        clause.condition("upstream = ?", [SqlValue::Text(upstream.clone())]);
    }
    if let Some(target) = &query.target {
        clause.condition("target = ?", [SqlValue::Text(target.clone())]);
    }
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct TargetRow {
    upstream: String,
    target: String,
    state: String,
    check_kind: String,
    reason: String,
    since_us: i64,
    transitions: u64,
}

/// A target's latest known state.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TargetHealth {
    pub upstream: String,
    pub target: String,
    /// `up` or `down`.
    pub state: String,
    /// `active` (probe) or `passive` (real traffic).
    pub check: String,
    pub reason: String,
    /// When the target entered this state.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// Transitions on record (within the retention).
    pub transitions: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UpstreamHealth {
    /// Sorted by upstream, then target.
    pub targets: Vec<TargetHealth>,
}

fn instant(micros: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Each upstream target's current health, from its latest transition.
#[utoipa::path(
    get,
    path = "/v1/health/upstreams",
    tag = "health",
    params(("upstream" = Option<String>, Query, description = "Only this upstream's targets"),
           ("target" = Option<String>, Query, description = "Only this target")),
    responses(
        (status = 200, description = "Targets with their state", body = UpstreamHealth),
        (status = 400, description = "A parameter is invalid; `field` names it", body = ErrorBody),
        (status = 503, description = "ClickHouse is unavailable; retry later", body = ErrorBody),
    )
)]
pub async fn upstreams(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<UpstreamHealth>, ApiError> {
    let Query(pairs) =
        query.map_err(|rejection| ApiError::InvalidParameter { field: None, message: rejection.body_text() })?;
    let query = parse(&pairs, &["upstream", "target"])?;
    let mut clause = WhereClause { sql: TRANSITIONS.to_owned(), values: Vec::new() };
    target_conditions(&query, &mut clause);
    let sql = format!(
        "SELECT toString(upstream) AS upstream, toString(target) AS target, \
         toString(argMax(state, (time, event_id))) AS state, toString(argMax(check_kind, (time, event_id))) AS check_kind, \
         argMax(reason, (time, event_id)) AS reason, toUnixTimestamp64Micro(max(time)) AS since_us, count() AS transitions \
         FROM health_events WHERE {} GROUP BY upstream, target ORDER BY upstream, target LIMIT 10000",
        clause.sql
    );
    let rows: Vec<TargetRow> = super::fetch_all(clause.bind_to(state.clickhouse.query(&sql))).await?;
    let targets = rows
        .into_iter()
        .map(|row| TargetHealth {
            upstream: row.upstream,
            target: row.target,
            state: row.state,
            check: row.check_kind,
            reason: row.reason,
            since: instant(row.since_us),
            transitions: row.transitions,
        })
        .collect();
    Ok(Json(UpstreamHealth { targets }))
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct TransitionRow {
    time_us: i64,
    upstream: String,
    target: String,
    state: String,
    check_kind: String,
    reason: String,
    consecutive: u32,
    source: String,
}

/// One up or down transition of a target.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Transition {
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub upstream: String,
    pub target: String,
    pub state: String,
    pub check: String,
    pub reason: String,
    /// Consecutive check results that caused it.
    pub consecutive: u32,
    /// The worker that observed it.
    pub source: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HealthTimeline {
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub to: OffsetDateTime,
    /// Oldest first.
    pub transitions: Vec<Transition>,
}

/// Target health transitions in a range.
#[utoipa::path(
    get,
    path = "/v1/health/timeline",
    tag = "health",
    params(HealthQuery),
    responses(
        (status = 200, description = "Transitions, oldest first", body = HealthTimeline),
        (status = 400, description = "A parameter is invalid; `field` names it", body = ErrorBody),
        (status = 503, description = "ClickHouse is unavailable; retry later", body = ErrorBody),
    )
)]
pub async fn timeline(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<HealthTimeline>, ApiError> {
    let Query(pairs) =
        query.map_err(|rejection| ApiError::InvalidParameter { field: None, message: rejection.body_text() })?;
    let query = parse(&pairs, &["upstream", "target", "from", "to", "limit"])?;
    let range = TimeRange::parse(query.from.as_deref(), query.to.as_deref(), OffsetDateTime::now_utc())?;
    let mut clause = WhereClause {
        sql: format!(
            "{TRANSITIONS} AND time >= fromUnixTimestamp64Micro(toInt64(?), 'UTC') \
             AND time < fromUnixTimestamp64Micro(toInt64(?), 'UTC')"
        ),
        values: vec![SqlValue::Int(range.from_unix_micros()), SqlValue::Int(range.to_unix_micros())],
    };
    target_conditions(&query, &mut clause);
    let sql = format!(
        "SELECT toUnixTimestamp64Micro(time) AS time_us, toString(upstream) AS upstream, toString(target) AS target, \
         toString(state) AS state, toString(check_kind) AS check_kind, reason, consecutive, toString(source) AS source \
         FROM health_events WHERE {} ORDER BY time, event_id LIMIT ?",
        clause.sql
    );
    clause.values.push(SqlValue::UInt64(u64::from(query.limit.unwrap_or(1_000))));
    let rows: Vec<TransitionRow> = super::fetch_all(clause.bind_to(state.clickhouse.query(&sql))).await?;
    let transitions = rows
        .into_iter()
        .map(|row| Transition {
            time: instant(row.time_us),
            upstream: row.upstream,
            target: row.target,
            state: row.state,
            check: row.check_kind,
            reason: row.reason,
            consecutive: row.consecutive,
            source: row.source,
        })
        .collect();
    Ok(Json(HealthTimeline { from: range.from(), to: range.to(), transitions }))
}
