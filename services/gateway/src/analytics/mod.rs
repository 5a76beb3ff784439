//! The analytics REST API over the ClickHouse projection. Every endpoint shares the
//! [`filter`] parameters so that a dashboard can switch views without rewriting its query.

pub mod filter;
pub mod health;
pub mod projections;
pub mod search;
pub mod source;
pub mod summary;
pub mod timeseries;
pub mod top;

use std::time::Duration;

use axum::Router;
use axum::routing::get;

use crate::AppState;
use crate::error::ApiError;

/// How long ClickHouse may work on one analytics query (its `max_execution_time` setting), so a
/// wide range cannot keep the server busy after the client gave up.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Our own bound, a little longer, for when the server does not answer at all.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(35);

/// `/v1/analytics/*` and `/v1/health/*` (both read ClickHouse; `/v1/projections` reads NATS and
/// is mounted by [`crate::build`] with its own state).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/analytics/summary", get(summary::summary))
        .route("/v1/analytics/timeseries", get(timeseries::timeseries))
        .route("/v1/analytics/top", get(top::top))
        .route("/v1/analytics/requests", get(search::requests))
        .route("/v1/health/upstreams", get(health::upstreams))
        .route("/v1/health/timeline", get(health::timeline))
}

/// A ClickHouse client for the analytics endpoints: read queries bounded by [`QUERY_TIMEOUT`].
pub fn clickhouse_client(config: &stone_kit::StoneConfig) -> clickhouse::Client {
    stone_kit::clickhouse::client(config).with_setting("max_execution_time", QUERY_TIMEOUT.as_secs().to_string())
}

/// Runs a query expected to return exactly one row, within [`CLIENT_TIMEOUT`].
pub(crate) async fn fetch_one<T>(query: clickhouse::query::Query) -> Result<T, ApiError>
where
    T: clickhouse::RowOwned + clickhouse::RowRead,
{
    match tokio::time::timeout(CLIENT_TIMEOUT, query.fetch_one::<T>()).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(clickhouse::error::Error::TimedOut.into()),
    }
}

/// Runs a query returning any number of rows, within [`CLIENT_TIMEOUT`].
pub(crate) async fn fetch_all<T>(query: clickhouse::query::Query) -> Result<Vec<T>, ApiError>
where
    T: clickhouse::RowOwned + clickhouse::RowRead,
{
    match tokio::time::timeout(CLIENT_TIMEOUT, query.fetch_all::<T>()).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(clickhouse::error::Error::TimedOut.into()),
    }
}
