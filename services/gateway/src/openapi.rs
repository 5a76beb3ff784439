//! The OpenAPI document, generated from the handlers' annotations so that it cannot drift from
//! the code. A test compares it with the checked-in `openapi.json` so that API changes show up in
//! review.

use axum::Json;
use utoipa::OpenApi;

use crate::analytics::summary::{LatencyQuantiles, Summary};
use crate::error::{ErrorBody, ErrorDetail};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Proxy Stone gateway",
        description = "Traffic analytics, configuration and live streams of a Proxy Stone deployment."
    ),
    paths(
        crate::analytics::summary::summary,
        crate::analytics::timeseries::timeseries,
        crate::analytics::top::top,
        crate::analytics::search::requests,
        crate::analytics::health::upstreams,
        crate::analytics::health::timeline,
        crate::analytics::projections::projections,
        crate::rebuild::start,
        crate::rebuild::status,
        crate::rebuild::progress,
        crate::streams::stream_events,
        crate::workers::list_workers,
        crate::cache_purge::purge
    ),
    components(schemas(
        Summary,
        LatencyQuantiles,
        ErrorBody,
        ErrorDetail,
        crate::workers::Worker,
        crate::workers::WorkerList,
        crate::cache_purge::PurgeRequest,
        crate::cache_purge::PurgeAccepted,
        crate::analytics::source::Source,
        crate::analytics::source::Metrics,
        crate::analytics::timeseries::Timeseries,
        crate::analytics::timeseries::Point,
        crate::analytics::top::TopList,
        crate::analytics::top::TopEntry,
        crate::analytics::search::RequestPage,
        crate::analytics::search::RequestRecord,
        crate::analytics::health::UpstreamHealth,
        crate::analytics::health::TargetHealth,
        crate::analytics::health::HealthTimeline,
        crate::analytics::health::Transition,
        crate::analytics::projections::ProjectionList,
        crate::analytics::projections::Projection,
        crate::analytics::projections::PartitionLag,
        crate::rebuild::RebuildRequest,
        crate::rebuild::RebuildAccepted,
        stone_kit::rebuild::RebuildStatus,
        stone_kit::rebuild::Phase
    )),
    tags(
        (name = "analytics", description = "Traffic analytics from the ClickHouse projection"),
        (name = "health", description = "Upstream target health from health events"),
        (name = "projections", description = "How far each projection is behind the stream, and rebuilds from it"),
        (name = "streams", description = "Live, resumable event streams (Server-Sent Events)"),
        (name = "fleet", description = "Proxy workers and their state"),
        (name = "cache", description = "The proxies' response cache")
    )
)]
struct ApiDoc;

/// The document as a value.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi().merge_from(crate::config::openapi::document())
}

/// The document as pretty JSON with a trailing newline, as checked in.
pub fn document_json() -> Result<String, serde_json::Error> {
    let mut text = document().to_pretty_json()?;
    text.push('\n');
    Ok(text)
}

/// `GET /v1/openapi.json`.
pub async fn serve_document() -> Json<utoipa::openapi::OpenApi> {
    Json(document())
}
