//! The router in-process (no socket, no ClickHouse): parameter errors, the error body shape, the
//! OpenAPI document and its checked-in snapshot, and the gateway's own metrics.
//!
//! The ClickHouse client points at a port nothing listens on, which also exercises the 503 path.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use stone_gateway::{AppState, router};
use stone_kit::admin::Readiness;
use tower::ServiceExt;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The checked-in OpenAPI document; regenerate with `STONE_UPDATE_SNAPSHOTS=1 cargo test -p stone-gateway`.
const OPENAPI_SNAPSHOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");

fn app() -> Router {
    // Port 9 (discard) on loopback: connections are refused at once.
    let clickhouse = clickhouse::Client::default().with_url("http://127.0.0.1:9");
    router(AppState::new(clickhouse, Readiness::new(&[stone_gateway::CLICKHOUSE_CONDITION])))
}

async fn get(app: &Router, uri: &str) -> Result<(StatusCode, String), Box<dyn std::error::Error>> {
    let response = app.clone().oneshot(Request::get(uri).body(Body::empty())?).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8(body.to_vec())?))
}

async fn get_json(app: &Router, uri: &str) -> Result<(StatusCode, Value), Box<dyn std::error::Error>> {
    let (status, body) = get(app, uri).await?;
    Ok((status, serde_json::from_str(&body)?))
}

#[tokio::test]
async fn bad_parameters_are_400_naming_the_field() -> TestResult {
    let app = app();
    for (query, field) in [
        ("from=yesterday", "from"),
        ("to=soon", "to"),
        ("from=-1h&to=-2h", "from"),
        ("from=-401d", "from"),
        ("status=6xx", "status"),
        ("cache=warm", "cache"),
        ("route=", "route"),
        ("route=a&route=b", "route"),
        ("rout=users", "rout"),
    ] {
        let (status, body) = get_json(&app, &format!("/v1/analytics/summary?{query}")).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(body["error"]["code"], "invalid_parameter", "{query}: {body}");
        assert_eq!(body["error"]["field"], field, "{query}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|message| !message.is_empty()), "{query}: {body}");
    }
    Ok(())
}

#[tokio::test]
async fn clickhouse_down_is_503_without_internal_details() -> TestResult {
    let (status, body) = get_json(&app(), "/v1/analytics/summary?from=-15m").await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.contains("127.0.0.1") && !message.contains("refused"), "leaks details: {message}");
    assert!(body["error"].get("field").is_none(), "{body}");
    Ok(())
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() -> TestResult {
    let app = app();
    let (status, body) = get_json(&app, "/v1/nope").await?;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    let response = app.clone().oneshot(Request::post("/v1/analytics/summary").body(Body::empty())?).await?;
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    Ok(())
}

#[tokio::test]
async fn health_and_readiness_are_served_next_to_the_api() -> TestResult {
    let app = app();
    assert_eq!(get(&app, "/healthz").await?.0, StatusCode::OK);
    let (status, body) = get_json(&app, "/readyz").await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "not ready before the first ping: {body}");
    assert_eq!(body["conditions"]["clickhouse"], false);
    Ok(())
}

#[tokio::test]
async fn openapi_documents_the_summary_and_matches_the_snapshot() -> TestResult {
    let (status, body) = get_json(&app(), "/v1/openapi.json").await?;
    assert_eq!(status, StatusCode::OK);
    let summary = &body["paths"]["/v1/analytics/summary"]["get"];
    let parameters: Vec<&str> = summary["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|parameter| parameter["name"].as_str())
        .collect();
    assert_eq!(parameters, ["from", "to", "route", "upstream", "consumer", "status", "cache"]);
    assert!(body["components"]["schemas"]["Summary"]["properties"]["cache_hit_ratio"].is_object(), "{body}");

    let generated = stone_gateway::openapi::document_json()?;
    assert_eq!(serde_json::from_str::<Value>(&generated)?, body, "served and generated documents differ");
    if std::env::var_os("STONE_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(OPENAPI_SNAPSHOT, &generated)?;
    }
    let checked_in = std::fs::read_to_string(OPENAPI_SNAPSHOT).unwrap_or_default();
    assert!(
        checked_in == generated,
        "services/gateway/openapi.json is stale; run `STONE_UPDATE_SNAPSHOTS=1 cargo test -p stone-gateway` and review the diff"
    );
    Ok(())
}

#[tokio::test]
async fn requests_are_counted_by_route_template_and_status() -> TestResult {
    let app = app();
    get(&app, "/v1/analytics/summary?from=nope").await?;
    get(&app, "/v1/does/not/exist").await?;
    let (_, metrics) = get(&app, "/metrics").await?;
    assert!(
        metrics.lines().any(|line| line.starts_with("stone_gateway_requests_total{")
            && line.contains("route=\"/v1/analytics/summary\"")
            && line.contains("status=\"400\"")),
        "{metrics}"
    );
    assert!(metrics.contains("route=\"unmatched\""), "{metrics}");
    assert!(!metrics.contains("/v1/does/not/exist"), "raw paths must not become labels");
    assert!(metrics.contains("stone_gateway_request_duration_seconds_bucket"), "{metrics}");
    Ok(())
}
