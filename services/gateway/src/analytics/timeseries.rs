//! `GET /v1/analytics/timeseries`: the summary's numbers per time bucket, optionally per group
//! (route, status class, ...), always from a rollup: the range is widened to whole buckets so
//! every point covers its full interval.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::filter::{AnalyticsFilter, AnalyticsQuery, SqlValue};
use super::source::{Aggregates, Metrics, Source};
use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::time_range::TimeRange;

/// Most points one response may hold (buckets times groups are capped separately).
const MAX_BUCKETS: i64 = 1_500;
/// Most rows one response may hold; beyond it `truncated` is set.
const MAX_ROWS: u64 = 20_000;

/// The timeseries' own parameters (with every filter of the summary).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TimeseriesQuery {
    /// Bucket width: `1m`, `5m`, `15m`, `1h`, `6h` or `1d`. Default `1m`. The range is widened to
    /// whole buckets and may cover at most 1500 of them.
    #[param(example = "5m")]
    pub interval: Option<String>,
    /// Split each bucket by `route`, `path_template`, `upstream`, `consumer`, `status`,
    /// `status_class` or `cache`. Default: no split.
    #[param(example = "status_class")]
    pub group_by: Option<String>,
}

/// A dimension requests can be grouped by; the SQL is a constant per variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Route,
    PathTemplate,
    Upstream,
    Consumer,
    Status,
    StatusClass,
    Cache,
}

impl Dimension {
    pub const CHOICES: [(&'static str, Dimension); 7] = [
        ("route", Self::Route),
        ("path_template", Self::PathTemplate),
        ("upstream", Self::Upstream),
        ("consumer", Self::Consumer),
        ("status", Self::Status),
        ("status_class", Self::StatusClass),
        ("cache", Self::Cache),
    ];

    pub fn expression(self) -> &'static str {
        match self {
            Self::Route => "toString(route)",
            Self::PathTemplate => "toString(path_template)",
            Self::Upstream => "toString(upstream)",
            Self::Consumer => "toString(consumer)",
            Self::Status => "toString(status)",
            Self::StatusClass => "concat(toString(intDiv(status, 100)), 'xx')",
            Self::Cache => "toString(cache)",
        }
    }

    /// The stored column [`Self::expression`] reads.
    pub fn column(self) -> &'static str {
        match self {
            Self::Route => "route",
            Self::PathTemplate => "path_template",
            Self::Upstream => "upstream",
            Self::Consumer => "consumer",
            Self::Status | Self::StatusClass => "status",
            Self::Cache => "cache",
        }
    }

    pub fn name(self) -> &'static str {
        Self::CHOICES.iter().find(|(_, dimension)| *dimension == self).map_or("", |(name, _)| name)
    }
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct PointRow {
    bucket_start: u32,
    group_key: String,
    requests: u64,
    errors: u64,
    client_errors: u64,
    bytes_in: u64,
    bytes_out: u64,
    cache_hits: u64,
    cache_misses: u64,
    latency_quantiles: Vec<f64>,
}

/// One bucket of one group.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Point {
    /// Start of the bucket.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The group's value; absent without `group_by`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(flatten)]
    pub metrics: Metrics,
}

/// Buckets in time order (then group order). Buckets without requests are left out.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Timeseries {
    /// Start of the first bucket (the requested `from`, rounded down to the interval).
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    /// End of the last bucket (the requested `to`, rounded up).
    #[serde(with = "time::serde::rfc3339")]
    pub to: OffsetDateTime,
    pub interval_seconds: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_by: Option<String>,
    pub source: Source,
    pub points: Vec<Point>,
    /// Set when the result had more than 20000 points and was cut.
    pub truncated: bool,
}

/// Request metrics per time bucket, optionally split by a dimension.
#[utoipa::path(
    get,
    path = "/v1/analytics/timeseries",
    tag = "analytics",
    params(AnalyticsQuery, TimeseriesQuery),
    responses(
        (status = 200, description = "Points in time order", body = Timeseries),
        (status = 400, description = "A parameter is invalid; `field` names it", body = ErrorBody),
        (status = 503, description = "ClickHouse is unavailable; retry later", body = ErrorBody),
    )
)]
pub async fn timeseries(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Timeseries>, ApiError> {
    let Query(pairs) =
        query.map_err(|rejection| ApiError::InvalidParameter { field: None, message: rejection.body_text() })?;
    let (mut filter, extra) =
        AnalyticsFilter::from_pairs_with(&pairs, OffsetDateTime::now_utc(), &["interval", "group_by"])?;
    let interval_seconds = extra.choice(
        "interval",
        60,
        &[("1m", 60), ("5m", 300), ("15m", 900), ("1h", 3_600), ("6h", 21_600), ("1d", 86_400)],
    )?;
    let group_by =
        extra.get("group_by").map(|_| extra.choice("group_by", Dimension::Route, &Dimension::CHOICES)).transpose()?;
    filter.range = widen(&filter.range, interval_seconds)?;
    let seconds = i64::try_from(interval_seconds).unwrap_or(i64::MAX);
    if (filter.range.to_unix_micros() - filter.range.from_unix_micros()) / 1_000_000 / seconds > MAX_BUCKETS {
        return Err(ApiError::invalid(
            "interval",
            format!("the range holds more than {MAX_BUCKETS} buckets of {interval_seconds} s; use a wider interval"),
        ));
    }

    let source = Source::for_interval(interval_seconds);
    let mut clause = filter.where_clause_on(source.time_column());
    let group_expression = group_by.map_or("''", Dimension::expression);
    let sql = format!(
        "SELECT toUInt32(toUnixTimestamp(toStartOfInterval({time}, toIntervalSecond(?)))) AS bucket_start, \
         {group_expression} AS group_key, {aggregates} FROM {table} WHERE {condition} \
         GROUP BY bucket_start, group_key ORDER BY bucket_start, group_key LIMIT ?",
        time = source.time_expression(),
        aggregates = source.aggregates(),
        table = source.table(),
        condition = clause.sql,
    );
    // The interval placeholder comes first in the text, the limit last.
    clause.values.insert(0, SqlValue::UInt64(interval_seconds));
    clause.values.push(SqlValue::UInt64(MAX_ROWS + 1));
    let mut rows: Vec<PointRow> = super::fetch_all(clause.bind_to(state.clickhouse.query(&sql))).await?;
    let truncated = rows.len() as u64 > MAX_ROWS;
    rows.truncate(usize::try_from(MAX_ROWS).unwrap_or(usize::MAX));
    let points = rows
        .into_iter()
        .map(|row| Point {
            time: OffsetDateTime::from_unix_timestamp(i64::from(row.bucket_start))
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            group: group_by.map(|_| row.group_key.clone()),
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
        })
        .collect();
    Ok(Json(Timeseries {
        from: filter.range.from(),
        to: filter.range.to(),
        interval_seconds,
        group_by: group_by.map(|dimension| dimension.name().to_owned()),
        source,
        points,
        truncated,
    }))
}

/// The range rounded out to whole intervals (buckets start at multiples of the interval since
/// the Unix epoch, as `toStartOfInterval` places them).
fn widen(range: &TimeRange, interval_seconds: u64) -> Result<TimeRange, ApiError> {
    let unit = i64::try_from(interval_seconds).unwrap_or(i64::MAX).saturating_mul(1_000_000);
    let from = range.from_unix_micros().div_euclid(unit) * unit;
    let to = (range.to_unix_micros() + unit - 1).div_euclid(unit) * unit;
    let instant = |micros: i64| {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
            .map_err(|_| ApiError::invalid("to", "the range is outside the supported years"))
    };
    TimeRange::new(instant(from)?, instant(to)?).map_err(ApiError::from)
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn ranges_widen_to_whole_buckets() -> Result<(), ApiError> {
        let range = TimeRange::new(datetime!(2026-01-01 10:02:30 UTC), datetime!(2026-01-01 10:07:01 UTC))?;
        let widened = widen(&range, 300)?;
        assert_eq!(widened.from(), datetime!(2026-01-01 10:00 UTC));
        assert_eq!(widened.to(), datetime!(2026-01-01 10:10 UTC));
        let aligned = TimeRange::new(datetime!(2026-01-01 10:00 UTC), datetime!(2026-01-01 11:00 UTC))?;
        assert_eq!(widen(&aligned, 3_600)?, aligned);
        Ok(())
    }
}
