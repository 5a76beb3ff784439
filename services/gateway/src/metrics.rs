//! The gateway's own metrics, per the house naming `stone_<noun>_<unit>[_total]`. Labels stay
//! low-cardinality: `route` is the matched route template (never the raw path), `status` the code.

use std::sync::Once;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

pub const REQUESTS_TOTAL: &str = "stone_gateway_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "stone_gateway_request_duration_seconds";

/// The `route` label of requests no route matched, so scanners cannot mint label values.
const UNMATCHED_ROUTE: &str = "unmatched";

/// Installs the Prometheus recorder (if nothing did yet) and describes our metrics. Idempotent,
/// so every router built in tests can call it.
pub fn install() {
    static DESCRIBED: Once = Once::new();
    stone_kit::telemetry::metrics_handle();
    DESCRIBED.call_once(|| {
        metrics::describe_counter!(REQUESTS_TOTAL, "Gateway HTTP requests answered, by route template and status.");
        metrics::describe_histogram!(
            REQUEST_DURATION_SECONDS,
            metrics::Unit::Seconds,
            "Time from receiving a gateway request to sending its response headers."
        );
    });
}

/// Middleware recording one count and one duration per request. Added with `Router::layer`
/// after the routes, so [`MatchedPath`] is already in the request's extensions.
pub async fn record(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED_ROUTE.to_owned(), |matched| matched.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(REQUEST_DURATION_SECONDS, "route" => route.clone()).record(started.elapsed().as_secs_f64());
    metrics::counter!(REQUESTS_TOTAL, "route" => route, "status" => status).increment(1);
    response
}
