//! Where an analytics question is answered: the per-hour or per-minute rollup when the range
//! falls on its bucket boundaries (the rollup then holds exactly the range's requests, at a
//! fraction of the rows), the raw `requests` table otherwise. One list of aggregate columns per
//! source, so every endpoint computes its numbers the same way.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::filter::TimeColumn;
use crate::time_range::TimeRange;

/// The table a response was computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `requests`: one row per request; exact quantiles of a sample.
    Raw,
    /// `requests_1m`: per-minute rollup; t-digest quantiles.
    Minute,
    /// `requests_1h`: per-hour rollup; t-digest quantiles.
    Hour,
}

/// Aggregate columns over `requests`; the names match [`AggregateRow`].
const RAW_AGGREGATES: &str = "count() AS requests, \
     countIf(status >= 500) AS errors, \
     countIf(status >= 400 AND status < 500) AS client_errors, \
     sum(bytes_in) AS bytes_in, \
     sum(bytes_out) AS bytes_out, \
     countIf(cache = 'hit') AS cache_hits, \
     countIf(cache = 'miss') AS cache_misses, \
     quantiles(0.5, 0.9, 0.95, 0.99)(total_us) AS latency_quantiles";

/// The same columns over a rollup, whose `status` and `cache` are dimensions. Columns are
/// qualified with the table alias `rollup`: unqualified, `requests` would name the `requests`
/// aggregate of this very list inside `sumIf`.
const ROLLUP_AGGREGATES: &str = "sum(rollup.requests) AS requests, \
     sumIf(rollup.requests, status >= 500) AS errors, \
     sumIf(rollup.requests, status >= 400 AND status < 500) AS client_errors, \
     sum(rollup.bytes_in) AS bytes_in, \
     sum(rollup.bytes_out) AS bytes_out, \
     sumIf(rollup.requests, cache = 'hit') AS cache_hits, \
     sumIf(rollup.requests, cache = 'miss') AS cache_misses, \
     arrayMap(value -> toFloat64(value), quantilesTDigestMerge(0.5, 0.9, 0.95, 0.99)(rollup.latency_us)) \
     AS latency_quantiles";

const MINUTE_MICROS: i64 = 60_000_000;
const HOUR_MICROS: i64 = 3_600_000_000;

impl Source {
    /// The coarsest source whose buckets the range's bounds fall on.
    pub fn for_range(range: &TimeRange) -> Self {
        let aligned = |unit: i64| range.from_unix_micros() % unit == 0 && range.to_unix_micros() % unit == 0;
        if aligned(HOUR_MICROS) {
            Self::Hour
        } else if aligned(MINUTE_MICROS) {
            Self::Minute
        } else {
            Self::Raw
        }
    }

    /// The rollup whose buckets divide `interval_seconds` (timeseries always align to buckets).
    pub fn for_interval(interval_seconds: u64) -> Self {
        if interval_seconds.is_multiple_of(3_600) { Self::Hour } else { Self::Minute }
    }

    /// The `FROM` target, aliased as [`Self::aggregates`] expects.
    pub fn table(self) -> &'static str {
        match self {
            Self::Raw => "requests",
            Self::Minute => "requests_1m AS rollup",
            Self::Hour => "requests_1h AS rollup",
        }
    }

    pub fn time_column(self) -> TimeColumn {
        match self {
            Self::Raw => TimeColumn::Time,
            Self::Minute | Self::Hour => TimeColumn::Bucket,
        }
    }

    /// The time expression to bucket by.
    pub fn time_expression(self) -> &'static str {
        match self {
            Self::Raw => "time",
            Self::Minute | Self::Hour => "bucket",
        }
    }

    pub fn aggregates(self) -> &'static str {
        match self {
            Self::Raw => RAW_AGGREGATES,
            Self::Minute | Self::Hour => ROLLUP_AGGREGATES,
        }
    }
}

/// The aggregate columns as read; every endpoint's row embeds these by name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Aggregates {
    pub requests: u64,
    pub errors: u64,
    pub client_errors: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub latency_quantiles: Vec<f64>,
}

/// Request counts, ratios and latency quantiles of a group of requests, as the API shows them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Metrics {
    pub requests: u64,
    /// Requests answered with a status of 500 or more.
    pub errors: u64,
    /// Requests answered with a 4xx status.
    pub client_errors: u64,
    /// `errors / requests`; 0 when there were no requests.
    pub error_rate: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// `cache_hits / (cache_hits + cache_misses)`; null when nothing was looked up.
    pub cache_hit_ratio: Option<f64>,
    /// Total duration quantiles in microseconds; null when there were no requests.
    pub p50_us: Option<f64>,
    pub p90_us: Option<f64>,
    pub p95_us: Option<f64>,
    pub p99_us: Option<f64>,
}

impl From<&Aggregates> for Metrics {
    fn from(row: &Aggregates) -> Self {
        let quantile = |index: usize| {
            row.latency_quantiles.get(index).copied().filter(|value| value.is_finite() && row.requests > 0)
        };
        Self {
            requests: row.requests,
            errors: row.errors,
            client_errors: row.client_errors,
            error_rate: ratio(row.errors, row.requests).unwrap_or(0.0),
            bytes_in: row.bytes_in,
            bytes_out: row.bytes_out,
            cache_hits: row.cache_hits,
            cache_misses: row.cache_misses,
            cache_hit_ratio: ratio(row.cache_hits, row.cache_hits + row.cache_misses),
            p50_us: quantile(0),
            p90_us: quantile(1),
            p95_us: quantile(2),
            p99_us: quantile(3),
        }
    }
}

pub fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn rollups_answer_only_ranges_on_their_boundaries() -> Result<(), crate::time_range::TimeRangeError> {
        let range = |from, to| TimeRange::new(from, to);
        assert_eq!(
            Source::for_range(&range(datetime!(2026-01-01 10:00 UTC), datetime!(2026-01-01 12:00 UTC))?),
            Source::Hour
        );
        assert_eq!(
            Source::for_range(&range(datetime!(2026-01-01 10:05 UTC), datetime!(2026-01-01 12:00 UTC))?),
            Source::Minute
        );
        assert_eq!(
            Source::for_range(&range(datetime!(2026-01-01 10:05:30 UTC), datetime!(2026-01-01 12:00 UTC))?),
            Source::Raw
        );
        assert_eq!(Source::for_interval(300), Source::Minute);
        assert_eq!(Source::for_interval(7_200), Source::Hour);
        Ok(())
    }
}
