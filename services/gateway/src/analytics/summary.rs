//! `GET /v1/analytics/summary`: totals, error and cache ratios and latency quantiles for one
//! filtered time range, from a rollup when the range falls on its buckets, else from raw rows.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::filter::{AnalyticsFilter, AnalyticsQuery};
use super::source::{Plan, Source, ratio};
use crate::AppState;
use crate::error::{ApiError, ErrorBody};

#[derive(Debug, clickhouse::Row, Deserialize)]
struct SummaryRow {
    requests: u64,
    errors: u64,
    client_errors: u64,
    bytes_in: u64,
    bytes_out: u64,
    cache_hits: u64,
    cache_misses: u64,
    latency_quantiles: Vec<f64>,
}

/// Traffic totals for a time range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Summary {
    /// Start of the range, inclusive.
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    /// End of the range, exclusive.
    #[serde(with = "time::serde::rfc3339")]
    pub to: OffsetDateTime,
    pub requests: u64,
    /// `requests` divided by the range's length in seconds.
    pub requests_per_second: f64,
    /// Requests answered with a status of 500 or more.
    pub errors: u64,
    /// Requests answered with a 4xx status.
    pub client_errors: u64,
    /// `errors / requests`; 0 when there were no requests.
    pub error_rate: f64,
    pub latency_us: LatencyQuantiles,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Requests served from the cache (`cache = hit`).
    pub cache_hits: u64,
    /// Cacheable requests the cache could not serve (`cache = miss`).
    pub cache_misses: u64,
    /// `cache_hits / (cache_hits + cache_misses)`; null when no request was looked up in the
    /// cache. Stale, revalidated, bypassed and uncacheable requests count in neither.
    pub cache_hit_ratio: Option<f64>,
    /// The table that answered: a rollup when `from` and `to` fall on its bucket boundaries
    /// (whole minutes or hours); for longer unaligned ranges the hour and minute rollups plus raw rows
    /// for the partial minutes at the ends (`mixed`); raw rows for short ranges.
    pub source: Source,
}

/// Total request duration quantiles in microseconds (ClickHouse `quantiles`, approximate on large
/// ranges); null when there were no requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LatencyQuantiles {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

/// Totals, ratios and latency quantiles of proxied requests.
#[utoipa::path(
    get,
    path = "/v1/analytics/summary",
    tag = "analytics",
    params(AnalyticsQuery),
    responses(
        (status = 200, description = "Totals for the range", body = Summary),
        (status = 400, description = "A parameter is invalid; `field` names it", body = ErrorBody),
        (status = 503, description = "ClickHouse is unavailable; retry later", body = ErrorBody),
    )
)]
pub async fn summary(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Summary>, ApiError> {
    let Query(pairs) =
        query.map_err(|rejection| ApiError::InvalidParameter { field: None, message: rejection.body_text() })?;
    let filter = AnalyticsFilter::from_pairs(&pairs, OffsetDateTime::now_utc())?;
    let plan = Plan::for_filter(&filter, None);
    let sql = format!("SELECT {} FROM {} WHERE {}", plan.source.aggregates(), plan.from, plan.clause.sql);
    let row: SummaryRow = super::fetch_one(plan.clause.bind_to(state.clickhouse.query(&sql))).await?;
    Ok(Json(Summary::from_row(&filter, plan.source, row)))
}

impl Summary {
    fn from_row(filter: &AnalyticsFilter, source: Source, row: SummaryRow) -> Self {
        let quantile = |index: usize| {
            row.latency_quantiles.get(index).copied().filter(|value| value.is_finite() && row.requests > 0)
        };
        let cache_lookups = row.cache_hits + row.cache_misses;
        Self {
            from: filter.range.from(),
            to: filter.range.to(),
            requests: row.requests,
            requests_per_second: row.requests as f64 / filter.range.seconds(),
            errors: row.errors,
            client_errors: row.client_errors,
            error_rate: ratio(row.errors, row.requests).unwrap_or(0.0),
            // An empty range yields NaN quantiles; null says "no data" where 0 would claim speed.
            latency_us: LatencyQuantiles { p50: quantile(0), p90: quantile(1), p95: quantile(2), p99: quantile(3) },
            bytes_in: row.bytes_in,
            bytes_out: row.bytes_out,
            cache_hits: row.cache_hits,
            cache_misses: row.cache_misses,
            cache_hit_ratio: ratio(row.cache_hits, cache_lookups),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn filter() -> Result<AnalyticsFilter, ApiError> {
        let pairs = [("from".to_owned(), "-10m".to_owned())];
        AnalyticsFilter::from_pairs(&pairs, datetime!(2025-06-15 12:00:00 UTC))
    }

    fn row(requests: u64, errors: u64, cache_hits: u64, cache_misses: u64, latency: Vec<f64>) -> SummaryRow {
        SummaryRow {
            requests,
            errors,
            client_errors: 0,
            latency_quantiles: latency,
            bytes_in: 0,
            bytes_out: 0,
            cache_hits,
            cache_misses,
        }
    }

    #[test]
    fn ratios_come_from_the_counts() -> Result<(), ApiError> {
        let summary = Summary::from_row(&filter()?, Source::Raw, row(60, 15, 3, 1, vec![1.0, 2.0, 3.0, 4.0]));
        assert_eq!(summary.requests_per_second, 0.1);
        assert_eq!(summary.error_rate, 0.25);
        assert_eq!(summary.cache_hit_ratio, Some(0.75));
        assert_eq!(
            summary.latency_us,
            LatencyQuantiles { p50: Some(1.0), p90: Some(2.0), p95: Some(3.0), p99: Some(4.0) }
        );
        Ok(())
    }

    #[test]
    fn an_empty_range_has_no_ratios_to_divide_by_zero() -> Result<(), ApiError> {
        let summary = Summary::from_row(&filter()?, Source::Raw, row(0, 0, 0, 0, vec![f64::NAN; 4]));
        assert_eq!(summary.error_rate, 0.0);
        assert_eq!(summary.cache_hit_ratio, None);
        assert_eq!(summary.latency_us.p99, None);
        let json = serde_json::to_value(&summary).map_err(|error| ApiError::Internal(error.into()))?;
        assert_eq!(json["latency_us"]["p50"], serde_json::Value::Null);
        assert_eq!(json["from"], "2025-06-15T11:50:00Z");
        Ok(())
    }
}
