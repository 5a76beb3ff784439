//! `GET /v1/analytics/summary` end to end: a real ClickHouse (or the embedded chDB endpoint) at
//! `STONE_CLICKHOUSE_URL`, a database of its own per test, the gateway built as the `stone` CLI
//! builds it on port 0, and HTTP over a real socket.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::StatusCode;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use stone_analytics::rows::RequestRow;
use stone_gateway::RunningGateway;
use stone_kit::{Shutdown, StoneConfig};
use time::OffsetDateTime;
use uuid::Uuid;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// One running gateway over a fresh database; [`TestApp::finish`] stops it and drops the database.
struct TestApp {
    config: StoneConfig,
    shutdown: Shutdown,
    gateway: RunningGateway,
    base_url: String,
    http: HttpClient<HttpConnector, Empty<Bytes>>,
}

impl TestApp {
    async fn spawn() -> TestResult<Self> {
        Self::spawn_with_schema(true).await
    }

    /// `migrated: false` starts the gateway before any projector created the tables.
    async fn spawn_with_schema(migrated: bool) -> TestResult<Self> {
        let mut config = StoneConfig::default();
        if let Ok(url) = std::env::var("STONE_CLICKHOUSE_URL") {
            config.clickhouse_url = url;
        }
        config.clickhouse_database = format!("gw_test_{}", Uuid::now_v7().simple());
        // Its own NATS namespace too: the gateway provisions streams at start.
        let unique = Uuid::now_v7().simple().to_string();
        config.namespace = format!("g{}", &unique[unique.len() - 10..]);
        config.gateway.listen = "127.0.0.1:0".parse()?;
        if migrated {
            stone_kit::clickhouse::migrate(&config).await?;
            // What the projector does at start (`stone_analytics::layout`); no projector runs here.
            stone_analytics::layout::ensure_unpaused(&stone_kit::clickhouse::client(&config)).await?;
        }
        let shutdown = Shutdown::new();
        let gateway = stone_gateway::build(&config, &shutdown).await?;
        Ok(Self {
            base_url: format!("http://{}", gateway.local_addr()),
            config,
            shutdown,
            gateway,
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
        })
    }

    async fn insert(&self, rows: &[RequestRow]) -> TestResult {
        let client = stone_kit::clickhouse::client(&self.config);
        let mut insert = client.insert::<RequestRow>("requests").await?;
        for row in rows {
            insert.write(row).await?;
        }
        insert.end().await?;
        Ok(())
    }

    async fn get(&self, path_and_query: &str) -> TestResult<(StatusCode, Value)> {
        let response = self.http.get(format!("{}{path_and_query}", self.base_url).parse()?).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, serde_json::from_slice(&body)?))
    }

    async fn summary(&self, query: &str) -> TestResult<Value> {
        let (status, body) = self.get(&format!("/v1/analytics/summary?{query}")).await?;
        assert_eq!(status, StatusCode::OK, "{query}: {body}");
        Ok(body)
    }

    async fn finish(self) -> TestResult {
        self.shutdown.drain(Duration::from_secs(5)).await?;
        self.gateway.stopped().await?;
        if let Ok(client) = async_nats::connect(self.config.nats_url.as_str()).await {
            // Every stream and bucket of the namespace: the gateway also creates the REBUILDS
            // and ANALYTICS buckets, which a list of stream names left behind on every run.
            stone_kit::nats::delete_namespace(&async_nats::jetstream::new(client), &self.config.namespace()).await;
        }
        let server = stone_kit::clickhouse::client(&StoneConfig {
            clickhouse_database: "default".to_owned(),
            ..self.config.clone()
        });
        // The name is our own generated identifier, so quoting it is safe.
        server.query(&format!("DROP DATABASE IF EXISTS `{}`", self.config.clickhouse_database)).execute().await?;
        Ok(())
    }
}

fn row(time: OffsetDateTime, route: &str, consumer: &str, status: u16, total_us: u64, cache: &str) -> RequestRow {
    RequestRow {
        event_id: Uuid::now_v7(),
        time,
        source: "proxy-test".to_owned(),
        config_seq: 1,
        partition: 0,
        stream_seq: 0,
        method: "GET".to_owned(),
        host: "api.example.com".to_owned(),
        route: route.to_owned(),
        path_template: format!("/{route}"),
        path: format!("/{route}"),
        upstream: format!("{route}-svc"),
        target: "http://127.0.0.1:9000".to_owned(),
        consumer: consumer.to_owned(),
        client_ip: "127.0.0.1".to_owned(),
        protocol: "HTTP/1.1".to_owned(),
        status,
        total_us,
        upstream_us: total_us / 2,
        ttfb_us: total_us / 4,
        bytes_in: 100,
        bytes_out: 1_000,
        cache: cache.to_owned(),
        error: String::new(),
        rate_limited: 0,
        traceparent: String::new(),
    }
}

/// The window the tests query: ten minutes ending a minute ago, on whole seconds so the bounds
/// print simply. Recent, because the table's TTL removes rows older than 30 days.
fn window() -> TestResult<(OffsetDateTime, OffsetDateTime)> {
    let to = OffsetDateTime::now_utc().replace_nanosecond(0)? - time::Duration::minutes(1);
    Ok((to - time::Duration::minutes(10), to))
}

fn rfc3339(instant: OffsetDateTime) -> TestResult<String> {
    Ok(instant.format(&time::format_description::well_known::Rfc3339)?)
}

/// Ten rows inside the window, one just before it and one exactly at its exclusive end.
fn fixture_rows(from: OffsetDateTime, to: OffsetDateTime) -> Vec<RequestRow> {
    let at = |seconds: i64| from + time::Duration::seconds(seconds);
    vec![
        row(at(0), "users", "acme", 200, 1_000, "hit"),
        row(at(10), "users", "acme", 200, 2_000, "hit"),
        row(at(20), "users", "acme", 200, 3_000, "miss"),
        row(at(30), "users", "globex", 404, 4_000, "none"),
        row(at(40), "users", "globex", 500, 5_000, "miss"),
        row(at(50), "users", "globex", 503, 6_000, "none"),
        row(at(60), "orders", "acme", 200, 7_000, "miss"),
        row(at(70), "orders", "acme", 201, 8_000, "none"),
        row(at(80), "orders", "globex", 429, 9_000, "bypass"),
        row(to - time::Duration::microseconds(1), "orders", "globex", 502, 10_000, "hit"),
        row(from - time::Duration::microseconds(1), "users", "acme", 500, 99_000, "miss"),
        row(to, "users", "acme", 500, 99_000, "miss"),
    ]
}

#[tokio::test]
async fn summary_counts_exactly_and_filters_narrow() -> TestResult {
    let app = TestApp::spawn().await?;
    let outcome = stone_kit::testing::caught(summary_scenario(&app)).await;
    app.finish().await?;
    stone_kit::testing::rethrow(outcome)
}

async fn summary_scenario(app: &TestApp) -> TestResult {
    let (from, to) = window()?;
    app.insert(&fixture_rows(from, to)).await?;
    let range = format!("from={}&to={}", rfc3339(from)?, rfc3339(to)?);

    let all = app.summary(&range).await?;
    assert_eq!(all["from"], rfc3339(from)?);
    assert_eq!(all["to"], rfc3339(to)?);
    assert_eq!(all["requests"], 10, "bounds are [from, to): {all}");
    assert_eq!(all["requests_per_second"], 10.0 / 600.0);
    assert_eq!(all["errors"], 3);
    assert_eq!(all["client_errors"], 2);
    assert_eq!(all["error_rate"], 0.3);
    assert_eq!(all["bytes_in"], 1_000);
    assert_eq!(all["bytes_out"], 10_000);
    assert_eq!(all["cache_hits"], 3);
    assert_eq!(all["cache_misses"], 3);
    assert_eq!(all["cache_hit_ratio"], 0.5);
    // Check order and bounds rather than one algorithm's interpolation: raw rows (the usual
    // source of this unaligned window) give ClickHouse's `quantiles`, exact interpolations for ten
    // values; a window that happens to fall on whole minutes (now at :00) is answered from the
    // minute rollup, whose DDSketch gives a value within 1% of an element (4,965 for the median).
    let quantiles: Vec<f64> =
        ["p50", "p90", "p95", "p99"].iter().filter_map(|name| all["latency_us"][name].as_f64()).collect();
    assert_eq!(quantiles.len(), 4, "{all}");
    assert!(quantiles.windows(2).all(|pair| pair[0] <= pair[1]), "{quantiles:?}");
    assert!((4_950.0..=6_000.0).contains(&quantiles[0]) && quantiles[3] <= 10_100.0, "{quantiles:?}");

    let users = app.summary(&format!("{range}&route=users")).await?;
    assert_eq!(
        (users["requests"].as_u64(), users["errors"].as_u64(), users["client_errors"].as_u64()),
        (Some(6), Some(2), Some(1))
    );
    assert_eq!(users["cache_hit_ratio"], 0.5);

    let server_errors = app.summary(&format!("{range}&status=5xx")).await?;
    assert_eq!((server_errors["requests"].as_u64(), server_errors["error_rate"].as_f64()), (Some(3), Some(1.0)));

    let users_server_errors = app.summary(&format!("{range}&route=users&status=5xx")).await?;
    assert_eq!(users_server_errors["requests"], 2);

    let not_found = app.summary(&format!("{range}&status=404")).await?;
    assert_eq!((not_found["requests"].as_u64(), not_found["client_errors"].as_u64()), (Some(1), Some(1)));

    let hits = app.summary(&format!("{range}&cache=hit")).await?;
    assert_eq!((hits["requests"].as_u64(), hits["cache_hit_ratio"].as_f64()), (Some(3), Some(1.0)));

    let orders_by_upstream = app.summary(&format!("{range}&upstream=orders-svc&consumer=globex")).await?;
    assert_eq!(orders_by_upstream["requests"], 2);

    // A value that would break out of a spliced string literal is just a route nobody has.
    let hostile = app.summary(&format!("{range}&route=x%27%20OR%201%3D1%20--")).await?;
    assert_eq!(hostile["requests"], 0);
    assert_eq!(hostile["cache_hit_ratio"], Value::Null);
    assert_eq!(hostile["latency_us"]["p50"], Value::Null);
    assert_eq!(hostile["error_rate"], 0.0);

    // Relative defaults (the last hour) reach rows inserted a few minutes ago.
    let last_hour = app.summary("").await?;
    assert_eq!(last_hour["requests"], 12, "every inserted row is within the last hour: {last_hour}");
    Ok(())
}

#[tokio::test]
async fn readiness_follows_clickhouse_and_errors_are_json() -> TestResult {
    let app = TestApp::spawn().await?;
    let outcome = stone_kit::testing::caught(readiness_scenario(&app)).await;
    app.finish().await?;
    stone_kit::testing::rethrow(outcome)
}

async fn readiness_scenario(app: &TestApp) -> TestResult {
    // The probe pings as soon as the gateway starts; give it a moment.
    let mut ready = (StatusCode::SERVICE_UNAVAILABLE, Value::Null);
    for _ in 0..50 {
        ready = app.get("/readyz").await?;
        if ready.0 == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready.0, StatusCode::OK, "{}", ready.1);
    assert_eq!(ready.1["conditions"]["clickhouse"], true);

    let (status, body) = app.get("/v1/analytics/summary?from=-1h&to=-2h").await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["field"], "from");
    Ok(())
}

#[tokio::test]
async fn an_unmigrated_database_is_503_until_the_projector_creates_it() -> TestResult {
    let app = TestApp::spawn_with_schema(false).await?;
    let outcome = app.get("/v1/analytics/summary").await;
    app.finish().await?;
    let (status, body) = outcome?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(!body.to_string().contains("UNKNOWN"), "no server error text for clients: {body}");
    Ok(())
}
