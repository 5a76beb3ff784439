//! Where an analytics question is answered: the per-hour or per-minute rollup when the range
//! falls on its bucket boundaries (the rollup then holds exactly the range's requests, at a
//! fraction of the rows); for a longer range that does not (`from=-6h`), the hourly rollup for
//! its whole hours, the per-minute rollup for the whole minutes around them and raw rows for the
//! partial minutes at either end; the raw `requests` table for short ranges. One list of aggregate columns per source, so every endpoint computes
//! its numbers the same way.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::filter::{AnalyticsFilter, TimeColumn, WhereClause};
use super::timeseries::Dimension;
use crate::time_range::TimeRange;

/// The table a response was computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `requests`: one row per request; exact quantiles of a sample.
    Raw,
    /// `requests_1m`: per-minute rollup; DDSketch quantiles (1% relative accuracy).
    Minute,
    /// `requests_1h`: per-hour rollup; DDSketch quantiles (1% relative accuracy).
    Hour,
    /// `requests_1h` for the range's whole hours, `requests_1m` for the whole minutes around
    /// them and `requests` for the partial minutes at its ends, merged (DDSketch quantiles).
    Mixed,
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

/// The same columns over a rollup, whose `status` and `cache` are dimensions and whose latency
/// is a `quantilesDD(0.01, …)` state (`stone_analytics::layout::LATENCY_FUNCTION`). Columns are
/// qualified with the table alias `rollup`: unqualified, `requests` would name the `requests`
/// aggregate of this very list inside `sumIf`.
const ROLLUP_AGGREGATES: &str = "sum(rollup.requests) AS requests, \
     sumIf(rollup.requests, status >= 500) AS errors, \
     sumIf(rollup.requests, status >= 400 AND status < 500) AS client_errors, \
     sum(rollup.bytes_in) AS bytes_in, \
     sum(rollup.bytes_out) AS bytes_out, \
     sumIf(rollup.requests, cache = 'hit') AS cache_hits, \
     sumIf(rollup.requests, cache = 'miss') AS cache_misses, \
     quantilesDDMerge(0.01, 0.5, 0.9, 0.95, 0.99)(rollup.latency_us) AS latency_quantiles";

const MINUTE_MICROS: i64 = 60_000_000;
/// Below this many whole minutes a range is answered from raw rows alone.
const MIXED_MIN_MINUTES: i64 = 10;
/// The dimensions every part of [`Source::Mixed`] provides: those [`ROLLUP_AGGREGATES`] reads.
/// A question grouped by another dimension adds its column (see [`Plan::for_filter`]); the
/// filter's own conditions apply inside each part. Carrying only these instead of all six
/// dimensions took a tenth off the engine's CPU for a `-6h` summary (docs/benchmarks.md).
const MIXED_DIMENSIONS: &str = "status, cache";
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
            Self::Minute | Self::Mixed => "requests_1m AS rollup",
            Self::Hour => "requests_1h AS rollup",
        }
    }

    pub fn time_column(self) -> TimeColumn {
        match self {
            Self::Raw => TimeColumn::Time,
            Self::Minute | Self::Hour | Self::Mixed => TimeColumn::Bucket,
        }
    }

    /// The time expression to bucket by.
    pub fn time_expression(self) -> &'static str {
        match self {
            Self::Raw => "time",
            Self::Minute | Self::Hour | Self::Mixed => "bucket",
        }
    }

    pub fn aggregates(self) -> &'static str {
        match self {
            Self::Raw => RAW_AGGREGATES,
            Self::Minute | Self::Hour | Self::Mixed => ROLLUP_AGGREGATES,
        }
    }
}

/// How a filtered question over one range is answered: `SELECT {aggregates} FROM {from} WHERE
/// {clause.sql}`, binding `clause.values` (which include those of a subquery in `from`, in order).
#[derive(Debug, Clone)]
pub struct Plan {
    pub source: Source,
    pub from: String,
    pub clause: WhereClause,
}

impl Plan {
    /// The cheapest exact way to answer `filter` (see the module's text), for a question grouped
    /// by `group_by` if any.
    pub fn for_filter(filter: &AnalyticsFilter, group_by: Option<Dimension>) -> Self {
        let source = Source::for_range(&filter.range);
        if source == Source::Raw
            && let Some(plan) = Self::mixed(filter, group_by)
        {
            return plan;
        }
        Self { source, from: source.table().to_owned(), clause: filter.where_clause_on(source.time_column()) }
    }

    /// Whole hours from `requests_1h`, the whole minutes around them from `requests_1m`, the
    /// partial minutes at the ends from raw rows: one table shaped like a rollup.
    fn mixed(filter: &AnalyticsFilter, group_by: Option<Dimension>) -> Option<Self> {
        let (from, to) = (filter.range.from_unix_micros(), filter.range.to_unix_micros());
        let ceil =
            |value: i64, unit: i64| value.div_euclid(unit) * unit + if value.rem_euclid(unit) == 0 { 0 } else { unit };
        let floor = |value: i64, unit: i64| value.div_euclid(unit) * unit;
        let (first_minute, last_minute) = (ceil(from, MINUTE_MICROS), floor(to, MINUTE_MICROS));
        if last_minute - first_minute < MIXED_MIN_MINUTES * MINUTE_MICROS {
            return None;
        }
        let (first_hour, last_hour) = (ceil(first_minute, HOUR_MICROS), floor(last_minute, HOUR_MICROS));
        // One scan per table: its ranges are OR-ed (each with the filter's other conditions),
        // which saves the engine a scan's fixed cost per range.
        let parts: [(&str, Vec<(i64, i64)>); 3] = if first_hour < last_hour {
            [
                ("requests_1h", vec![(first_hour, last_hour)]),
                ("requests_1m", vec![(first_minute, first_hour), (last_hour, last_minute)]),
                ("requests", vec![(from, first_minute), (last_minute, to)]),
            ]
        } else {
            [
                ("requests_1h", Vec::new()),
                ("requests_1m", vec![(first_minute, last_minute)]),
                ("requests", vec![(from, first_minute), (last_minute, to)]),
            ]
        };

        let dimensions = match group_by.map(Dimension::column) {
            Some(column) if !MIXED_DIMENSIONS.split(", ").any(|dimension| dimension == column) => {
                format!("{MIXED_DIMENSIONS}, {column}")
            }
            _ => MIXED_DIMENSIONS.to_owned(),
        };
        let mut selects = Vec::new();
        let mut values = Vec::new();
        for (table, ranges) in parts {
            let column = if table == "requests" { TimeColumn::Time } else { TimeColumn::Bucket };
            let mut conditions = Vec::new();
            for (start, end) in ranges {
                if start >= end {
                    continue;
                }
                let range = TimeRange::new(instant(start)?, instant(end)?).ok()?;
                let clause = AnalyticsFilter { range, ..filter.clone() }.where_clause_on(column);
                values.extend(clause.values);
                conditions.push(format!("({})", clause.sql));
            }
            if conditions.is_empty() {
                continue;
            }
            let condition = conditions.join(" OR ");
            selects.push(if table == "requests" {
                format!(
                    "SELECT {dimensions}, count() AS requests, sum(bytes_in) AS bytes_in, \
                     sum(bytes_out) AS bytes_out, quantilesDDState(0.01, 0.5, 0.9, 0.95, 0.99)(total_us) AS latency_us \
                     FROM requests WHERE {condition} GROUP BY {dimensions}"
                )
            } else {
                format!("SELECT {dimensions}, requests, bytes_in, bytes_out, latency_us FROM {table} WHERE {condition}")
            });
        }
        let from_sql = format!("({}) AS rollup", selects.join(" UNION ALL "));
        Some(Self { source: Source::Mixed, from: from_sql, clause: WhereClause { sql: "1".to_owned(), values } })
    }
}

fn instant(micros: i64) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000).ok()
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

    fn filter(from: time::OffsetDateTime, to: time::OffsetDateTime) -> AnalyticsFilter {
        let pairs = [
            ("from".to_owned(), from.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()),
            ("to".to_owned(), to.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()),
            ("route".to_owned(), "users".to_owned()),
        ];
        AnalyticsFilter::from_pairs(&pairs, datetime!(2026-01-02 00:00 UTC)).unwrap_or_else(|error| panic!("{error}"))
    }

    #[test]
    #[allow(clippy::panic)]
    fn a_long_unaligned_range_takes_hours_minutes_and_raw_edges() {
        let plan =
            Plan::for_filter(&filter(datetime!(2026-01-01 10:05:30 UTC), datetime!(2026-01-01 16:02:15 UTC)), None);
        assert_eq!(plan.source, Source::Mixed);
        // 1h [11:00, 16:00), 1m [10:06, 11:00) and [16:00, 16:02), raw [10:05:30, 10:06) and
        // [16:02, 16:02:15): five ranges in one scan per table, each bound by its time range and
        // the route.
        assert_eq!(plan.from.matches(" UNION ALL ").count(), 2, "{}", plan.from);
        assert_eq!(plan.from.matches("FROM requests_1h ").count(), 1);
        assert_eq!(plan.from.matches("FROM requests_1m ").count(), 1);
        assert_eq!(plan.from.matches(") OR (").count(), 2, "{}", plan.from);
        assert_eq!(plan.clause.values.len(), 5 * 3);
        assert_eq!(plan.from.matches('?').count(), plan.clause.values.len());
        assert_eq!(plan.clause.sql, "1");
        // Only the dimensions the aggregates read, plus the one a question groups by.
        assert_eq!(plan.from.matches("SELECT status, cache, ").count(), 3, "{}", plan.from);
        assert!(!plan.from.contains("consumer"), "{}", plan.from);
        let by_consumer = Plan::for_filter(
            &filter(datetime!(2026-01-01 10:05:30 UTC), datetime!(2026-01-01 16:02:15 UTC)),
            Some(Dimension::Consumer),
        );
        assert_eq!(by_consumer.from.matches("SELECT status, cache, consumer, ").count(), 3, "{}", by_consumer.from);
        assert!(by_consumer.from.contains("GROUP BY status, cache, consumer"), "{}", by_consumer.from);
        let by_status = Plan::for_filter(
            &filter(datetime!(2026-01-01 10:05:30 UTC), datetime!(2026-01-01 16:02:15 UTC)),
            Some(Dimension::StatusClass),
        );
        assert_eq!(by_status.from, plan.from);

        let short =
            Plan::for_filter(&filter(datetime!(2026-01-01 10:05:30 UTC), datetime!(2026-01-01 10:12:00 UTC)), None);
        assert_eq!((short.source, short.from.as_str()), (Source::Raw, "requests"));
        let within_an_hour =
            Plan::for_filter(&filter(datetime!(2026-01-01 10:05:30 UTC), datetime!(2026-01-01 10:40:00 UTC)), None);
        assert_eq!(within_an_hour.source, Source::Mixed);
        assert!(!within_an_hour.from.contains("requests_1h"), "{}", within_an_hour.from);
    }

    #[test]
    fn rollup_queries_use_the_state_the_projector_keeps() {
        let function = stone_analytics::layout::LATENCY_FUNCTION;
        let (name, arguments) = function.split_once('(').unwrap_or_default();
        assert!(
            ROLLUP_AGGREGATES.contains(&format!("{name}Merge({arguments}(rollup.latency_us)")),
            "{ROLLUP_AGGREGATES}"
        );
        let plan =
            Plan::for_filter(&filter(datetime!(2026-01-01 10:05:30 UTC), datetime!(2026-01-01 16:02:15 UTC)), None);
        assert!(plan.from.contains(&format!("{name}State({arguments}(total_us)")), "{}", plan.from);
    }

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
