//! `GET /v1/analytics/top`: the busiest, most failing or slowest routes, path templates,
//! consumers, upstreams or statuses of a range, from a rollup when the range allows.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::filter::{AnalyticsFilter, AnalyticsQuery, SqlValue};
use super::source::{Aggregates, Metrics, Plan, Source};
use super::timeseries::Dimension;
use crate::AppState;
use crate::error::{ApiError, ErrorBody};

/// The top list's own parameters (with every filter of the summary).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TopQuery {
    /// What to rank: `route`, `path_template`, `consumer`, `upstream`, `status`, `status_class`
    /// or `cache`. Default `route`.
    #[param(example = "path_template")]
    pub by: Option<String>,
    /// Rank by `requests`, `errors` (5xx) or `p99` latency. Default `requests`.
    #[param(example = "errors")]
    pub order: Option<String>,
    /// How many entries, 1 to 100. Default 10.
    #[param(example = 10)]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    Requests,
    Errors,
    P99,
}

impl Order {
    fn expression(self) -> &'static str {
        match self {
            Self::Requests => "requests DESC",
            Self::Errors => "errors DESC, requests DESC",
            // Index 4 of [p50, p90, p95, p99]; ClickHouse arrays count from 1.
            Self::P99 => "latency_quantiles[4] DESC",
        }
    }
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct TopRow {
    key: String,
    requests: u64,
    errors: u64,
    client_errors: u64,
    bytes_in: u64,
    bytes_out: u64,
    cache_hits: u64,
    cache_misses: u64,
    latency_quantiles: Vec<f64>,
}

/// One ranked value.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopEntry {
    /// The route, template, consumer, upstream, status or class (empty: requests without one).
    pub key: String,
    #[serde(flatten)]
    pub metrics: Metrics,
}

/// The ranking.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopList {
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub to: OffsetDateTime,
    pub by: String,
    pub order: String,
    pub source: Source,
    pub entries: Vec<TopEntry>,
}

/// The top values of a dimension by requests, errors or p99 latency.
#[utoipa::path(
    get,
    path = "/v1/analytics/top",
    tag = "analytics",
    params(AnalyticsQuery, TopQuery),
    responses(
        (status = 200, description = "Entries, highest first", body = TopList),
        (status = 400, description = "A parameter is invalid; `field` names it", body = ErrorBody),
        (status = 503, description = "ClickHouse is unavailable; retry later", body = ErrorBody),
    )
)]
pub async fn top(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<TopList>, ApiError> {
    let Query(pairs) =
        query.map_err(|rejection| ApiError::InvalidParameter { field: None, message: rejection.body_text() })?;
    let (filter, extra) =
        AnalyticsFilter::from_pairs_with(&pairs, OffsetDateTime::now_utc(), &["by", "order", "limit"])?;
    let by = extra.choice("by", Dimension::Route, &Dimension::CHOICES)?;
    let order_choices = [("requests", Order::Requests), ("errors", Order::Errors), ("p99", Order::P99)];
    let order = extra.choice("order", Order::Requests, &order_choices)?;
    let limit = extra.integer("limit", 10, 1..=100)?;

    let Plan { source, from, mut clause } = Plan::for_filter(&filter, Some(by));
    let sql = format!(
        "SELECT {key} AS key, {aggregates} FROM {from} WHERE {condition} GROUP BY key ORDER BY {order}, key LIMIT ?",
        key = by.expression(),
        aggregates = source.aggregates(),
        condition = clause.sql,
        order = order.expression(),
    );
    clause.values.push(SqlValue::UInt64(limit));
    let rows: Vec<TopRow> = super::fetch_all(clause.bind_to(state.clickhouse.query(&sql))).await?;
    let entries = rows
        .into_iter()
        .map(|row| TopEntry {
            metrics: Metrics::from(&Aggregates {
                requests: row.requests,
                errors: row.errors,
                client_errors: row.client_errors,
                bytes_in: row.bytes_in,
                bytes_out: row.bytes_out,
                cache_hits: row.cache_hits,
                cache_misses: row.cache_misses,
                latency_quantiles: row.latency_quantiles,
            }),
            key: row.key,
        })
        .collect();
    let order_name = order_choices.iter().find(|(_, value)| *value == order).map_or("", |(name, _)| name);
    Ok(Json(TopList {
        from: filter.range.from(),
        to: filter.range.to(),
        by: by.name().to_owned(),
        order: order_name.to_owned(),
        source,
        entries,
    }))
}
