//! The walking skeleton through real sockets and real services: requests through the proxy,
//! events through JetStream, rows in ClickHouse, counts from the gateway's analytics API.
//!
//! Each test runs in its own NATS namespace (its own streams) and its own ClickHouse database,
//! so tests run in parallel against the shared local stack and leave nothing behind.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use stone_events::config::{RouteSpec, TargetSpec, UpstreamSpec};
use stone_kit::{Shutdown, StoneConfig};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A configuration isolated to one test (own namespace, databases, port-0 listeners) routing
/// `/items/{id}` to the test's upstream.
fn isolated_config(upstream: SocketAddr) -> StoneConfig {
    let mut config = stone_kit::testing::isolated("t");
    config.partitions = 4;
    config.analytics.batch_max_wait_ms = 100;
    config.proxy.upstreams = vec![UpstreamSpec {
        name: "backend".into(),
        algorithm: Default::default(),
        targets: vec![TargetSpec { url: format!("http://{upstream}"), weight: 1 }],
        health_check: None,
        hash_on: None,
        passive_health: None,
    }];
    config.proxy.routes = vec![RouteSpec {
        name: "items".into(),
        hosts: vec![],
        paths: vec!["/items/{id}".into()],
        methods: vec![],
        headers: Default::default(),
        upstream: "backend".into(),
        strip_prefix: false,
        timeout_ms: None,
        priority: 0,
        retries: None,
        max_body_bytes: None,
        auth: None,
        rate_limit: None,
        cache: None,
    }];
    config
}

/// An upstream that answers every request with 1 KiB and echoes the path in a header.
async fn start_upstream(shutdown: &Shutdown) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let token = shutdown.token();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = token.cancelled() => return,
            };
            let Ok((stream, _)) = accepted else { continue };
            tokio::spawn(async move {
                let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                    let mut response = Response::new(Full::new(Bytes::from(vec![b'x'; 1024])));
                    let path = request.uri().path().to_owned();
                    if let Ok(value) = hyper::header::HeaderValue::from_str(&path) {
                        response.headers_mut().insert("x-upstream-path", value);
                    }
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(address)
}

async fn get(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: &str,
) -> Result<(u16, Bytes), Box<dyn std::error::Error + Send + Sync>> {
    let response = client.request(Request::get(url).body(Empty::new())?).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_proxied_request_is_counted_exactly_once_in_the_analytics_api() -> TestResult {
    let shutdown = Shutdown::new();
    let upstream = start_upstream(&shutdown).await?;
    let config = isolated_config(upstream);
    stone_kit::testing::create_database(&config).await.map_err(|error| error.to_string())?;
    // Caught, so that a failed assertion still removes the test's streams and databases.
    let outcome = stone_kit::testing::caught(run_skeleton(&config, &shutdown)).await;
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    stone_kit::testing::cleanup(&config).await;
    stone_kit::testing::rethrow(outcome)
}

async fn run_skeleton(config: &StoneConfig, shutdown: &Shutdown) -> TestResult {
    let projector = stone_analytics::build(config, shutdown).await?;
    let gateway = stone_gateway::build(config, shutdown).await?;
    let proxy = stone_proxy::build(config, shutdown).await?;
    assert_eq!(projector.partitions, 4);

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    const ROUTED: usize = 150;
    const UNROUTED: usize = 50;
    for index in 0..ROUTED {
        let (status, body) = get(&client, &format!("http://{}/items/{index}", proxy.listen_addr)).await?;
        assert_eq!(status, 200);
        assert_eq!(body.len(), 1024);
    }
    for index in 0..UNROUTED {
        let (status, _) = get(&client, &format!("http://{}/elsewhere/{index}", proxy.listen_addr)).await?;
        assert_eq!(status, 404, "no route matches /elsewhere");
    }

    // Wait (bounded) until the projector has caught up, then demand the exact count.
    let summary_url = format!("http://{}/v1/analytics/summary?from=-1h", gateway.local_addr());
    let mut summary = serde_json::Value::Null;
    for _ in 0..150 {
        let (status, body) = get(&client, &summary_url).await?;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        summary = serde_json::from_slice(&body)?;
        if summary["requests"].as_u64() >= Some((ROUTED + UNROUTED) as u64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(summary["requests"], (ROUTED + UNROUTED) as u64, "{summary}");
    assert_eq!(summary["client_errors"], UNROUTED as u64, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");
    assert_eq!(summary["bytes_out"].as_u64().map(|bytes| bytes >= (ROUTED * 1024) as u64), Some(true), "{summary}");

    let routed_url = format!("http://{}/v1/analytics/summary?from=-1h&route=items", gateway.local_addr());
    let routed: serde_json::Value = serde_json::from_slice(&get(&client, &routed_url).await?.1)?;
    assert_eq!(routed["requests"], ROUTED as u64, "{routed}");

    // Exactly once at the row level, and every row carries a template, never the raw path.
    let clickhouse = stone_kit::clickhouse::client(config);
    let (rows, distinct, templates): (u64, u64, u64) = clickhouse
        .query("SELECT count(), uniqExact(event_id), uniqExact(path_template) FROM requests WHERE route = 'items'")
        .fetch_one()
        .await?;
    assert_eq!((rows, distinct, templates), (ROUTED as u64, ROUTED as u64, 1));
    Ok(())
}

#[test]
fn a_missing_dependency_gives_one_clear_line() -> TestResult {
    // Nothing listens on port 9 of the loopback address.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stone"))
        .arg("proxy")
        .env("STONE_NATS_URL", "nats://127.0.0.1:9")
        .env("STONE_PROXY__LISTEN", "127.0.0.1:0")
        .env("STONE_PROXY__ADMIN_LISTEN", "127.0.0.1:0")
        .env("STONE_TELEMETRY__LOG", "off")
        .output()?;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|line| !line.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("error: cannot reach NATS at nats://127.0.0.1:9"), "{stderr}");
    assert!(lines[0].contains("infra/stack.sh up"), "{stderr}");
    Ok(())
}

#[test]
fn invalid_configuration_names_the_key_before_anything_binds() -> TestResult {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stone"))
        .arg("gateway")
        .env("STONE_GATEWAY__LISTEN", "not-an-address")
        .output()?;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("GATEWAY") && stderr.contains("LISTEN"), "{stderr}");
    Ok(())
}
