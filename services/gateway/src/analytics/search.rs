//! `GET /v1/analytics/requests`: the raw requests of a range, newest first, with every filter
//! and keyset pagination: the cursor is the last row's `(time, event_id)`, so pages stay stable
//! while new requests arrive. `requests` is sorted by route first, so one query for the newest
//! rows of a long range across routes reads the whole range; a page is therefore read in time
//! slices back from its newest possible row (the last minute, 15 minutes, 2 hours, then the rest)
//! and stops once it is full, which returns exactly what the one query would.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::filter::{AnalyticsFilter, AnalyticsQuery, SqlValue};
use crate::AppState;
use crate::error::{ApiError, ErrorBody};

/// The search's own parameters (with every filter of the summary).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchQuery {
    /// Rows per page, 1 to 1000. Default 100.
    #[param(example = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page; absent for the first page.
    pub cursor: Option<String>,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct RequestRow {
    #[serde(with = "clickhouse::serde::uuid")]
    event_id: Uuid,
    time_us: i64,
    source: String,
    method: String,
    host: String,
    route: String,
    path_template: String,
    path: String,
    upstream: String,
    target: String,
    consumer: String,
    status: u16,
    total_us: u64,
    upstream_us: u64,
    bytes_in: u64,
    bytes_out: u64,
    cache: String,
    error: String,
    traceparent: String,
}

const COLUMNS: &str = "event_id, toUnixTimestamp64Micro(time) AS time_us, toString(source) AS source, \
     toString(method) AS method, toString(host) AS host, toString(route) AS route, \
     toString(path_template) AS path_template, path, toString(upstream) AS upstream, \
     toString(target) AS target, toString(consumer) AS consumer, status, total_us, upstream_us, \
     bytes_in, bytes_out, toString(cache) AS cache, toString(error) AS error, traceparent";

/// One proxied request.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RequestRecord {
    pub event_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The worker that proxied it.
    pub source: String,
    pub method: String,
    pub host: String,
    pub route: String,
    pub path_template: String,
    pub path: String,
    pub upstream: String,
    pub target: String,
    pub consumer: String,
    pub status: u16,
    pub total_us: u64,
    pub upstream_us: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub cache: String,
    /// Why the request got no upstream response; empty when it did.
    pub error: String,
    pub traceparent: String,
}

/// One page.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RequestPage {
    pub requests: Vec<RequestRecord>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// How far back from the newest possible row each slice of a search reaches, in microseconds;
/// the last slice reaches back to the range's start.
const SLICE_REACH_MICROS: [i64; 3] = [60_000_000, 900_000_000, 7_200_000_000];

/// The time slices `[start, end)` a search reads, newest first: back from `newest` by each of
/// [`SLICE_REACH_MICROS`], then the rest down to `oldest`. Consecutive, without overlap, and
/// together exactly `[oldest, newest)`.
fn slices(oldest: i64, newest: i64) -> Vec<(i64, i64)> {
    let mut slices = Vec::new();
    let mut end = newest;
    for reach in SLICE_REACH_MICROS {
        let start = newest.saturating_sub(reach);
        if start <= oldest {
            break;
        }
        if start < end {
            slices.push((start, end));
            end = start;
        }
    }
    if oldest < end {
        slices.push((oldest, end));
    }
    slices
}

/// A position in the newest-first order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    time_us: i64,
    event_id: Uuid,
}

impl Cursor {
    fn encode(self) -> String {
        format!("{}_{}", self.time_us, self.event_id.simple())
    }

    fn decode(text: &str) -> Result<Self, ApiError> {
        let invalid = || ApiError::invalid("cursor", "not a cursor from a previous page's next_cursor");
        let (time, id) = text.split_once('_').ok_or_else(invalid)?;
        let time_us = time.parse::<i64>().map_err(|_| invalid())?;
        let event_id = Uuid::try_parse(id).map_err(|_| invalid())?;
        Ok(Self { time_us, event_id })
    }
}

/// Raw requests, newest first, filtered and paginated.
#[utoipa::path(
    get,
    path = "/v1/analytics/requests",
    tag = "analytics",
    params(AnalyticsQuery, SearchQuery),
    responses(
        (status = 200, description = "One page of requests, newest first", body = RequestPage),
        (status = 400, description = "A parameter is invalid; `field` names it", body = ErrorBody),
        (status = 503, description = "ClickHouse is unavailable; retry later", body = ErrorBody),
    )
)]
pub async fn requests(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<RequestPage>, ApiError> {
    let Query(pairs) =
        query.map_err(|rejection| ApiError::InvalidParameter { field: None, message: rejection.body_text() })?;
    let (filter, extra) = AnalyticsFilter::from_pairs_with(&pairs, OffsetDateTime::now_utc(), &["limit", "cursor"])?;
    let limit = extra.integer("limit", 100, 1..=1_000)?;
    let cursor = extra.get("cursor").map(Cursor::decode).transpose()?;

    let mut clause = filter.where_clause();
    if let Some(cursor) = cursor {
        clause.condition(
            "(time, event_id) < (fromUnixTimestamp64Micro(toInt64(?), 'UTC'), toUUID(?))",
            [SqlValue::Int(cursor.time_us), SqlValue::Text(cursor.event_id.to_string())],
        );
    }
    let sql = format!(
        "SELECT {COLUMNS} FROM requests WHERE {} AND time >= fromUnixTimestamp64Micro(toInt64(?), 'UTC') \
         AND time < fromUnixTimestamp64Micro(toInt64(?), 'UTC') ORDER BY time DESC, event_id DESC LIMIT ?",
        clause.sql
    );
    // One more than the page: whether it exists decides if there is a next page.
    let wanted = usize::try_from(limit + 1).unwrap_or(usize::MAX);
    // The newest rows of the range lie in its last moments: read slices back from the newest
    // possible row until the page is full. Every row of a slice is older than every row of the
    // slices read before it, so appending keeps the order and the page is exactly what one query
    // over the whole range returns.
    let newest = cursor.map_or(filter.range.to_unix_micros(), |cursor| {
        filter.range.to_unix_micros().min(cursor.time_us.saturating_add(1))
    });
    let mut rows: Vec<RequestRow> = Vec::new();
    for (start, end) in slices(filter.range.from_unix_micros(), newest) {
        let mut slice = clause.clone();
        let missing = u64::try_from(wanted - rows.len()).unwrap_or(u64::MAX);
        slice.values.extend([SqlValue::Int(start), SqlValue::Int(end), SqlValue::UInt64(missing)]);
        rows.extend(super::fetch_all::<RequestRow>(slice.bind_to(state.clickhouse.query(&sql))).await?);
        if rows.len() >= wanted {
            break;
        }
    }
    let page_size = usize::try_from(limit).unwrap_or(usize::MAX);
    let has_more = rows.len() > page_size;
    rows.truncate(page_size);
    let next_cursor = if has_more {
        rows.last().map(|row| Cursor { time_us: row.time_us, event_id: row.event_id }.encode())
    } else {
        None
    };
    let requests = rows.into_iter().map(RequestRecord::from).collect();
    Ok(Json(RequestPage { requests, next_cursor }))
}

impl From<RequestRow> for RequestRecord {
    fn from(row: RequestRow) -> Self {
        Self {
            event_id: row.event_id,
            time: OffsetDateTime::from_unix_timestamp_nanos(i128::from(row.time_us) * 1_000)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            source: row.source,
            method: row.method,
            host: row.host,
            route: row.route,
            path_template: row.path_template,
            path: row.path,
            upstream: row.upstream,
            target: row.target,
            consumer: row.consumer,
            status: row.status,
            total_us: row.total_us,
            upstream_us: row.upstream_us,
            bytes_in: row.bytes_in,
            bytes_out: row.bytes_out,
            cache: row.cache,
            error: row.error,
            traceparent: row.traceparent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_range_newest_first_without_overlap() {
        let minute = 60_000_000;
        // Six hours: 1 min, 15 min, 2 h, then the rest.
        let six_hours = 360 * minute;
        assert_eq!(
            slices(0, six_hours),
            [
                (six_hours - minute, six_hours),
                (six_hours - 15 * minute, six_hours - minute),
                (six_hours - 120 * minute, six_hours - 15 * minute),
                (0, six_hours - 120 * minute),
            ]
        );
        // Ten minutes: 1 min, then the rest.
        assert_eq!(slices(0, 10 * minute), [(9 * minute, 10 * minute), (0, 9 * minute)]);
        // Shorter than the first reach: one slice; empty: none.
        assert_eq!(slices(5, 6), [(5, 6)]);
        assert_eq!(slices(7, 7), []);
        assert_eq!(slices(8, 7), []);
    }

    #[test]
    fn cursors_round_trip_and_garbage_names_the_field() -> Result<(), ApiError> {
        let cursor = Cursor { time_us: 1_767_261_600_000_000, event_id: Uuid::now_v7() };
        assert_eq!(Cursor::decode(&cursor.encode())?, cursor);
        for bad in ["", "x", "1_", "_abc", "12_not-a-uuid", "x_0193a1b2c3d4e5f60718293a4b5c6d7e"] {
            assert!(
                matches!(Cursor::decode(bad), Err(ApiError::InvalidParameter { field: Some(ref f), .. }) if f == "cursor"),
                "{bad:?}"
            );
        }
        Ok(())
    }
}
