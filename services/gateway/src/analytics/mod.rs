//! The analytics REST API over the ClickHouse projection. Every endpoint shares the
//! [`filter`] parameters so that a dashboard can switch views without rewriting its query.

pub mod filter;
pub mod summary;

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

/// `/v1/analytics/*`.
pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/analytics/summary", get(summary::summary))
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
