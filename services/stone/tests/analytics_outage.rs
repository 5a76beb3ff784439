//! ClickHouse unavailable, then back: the projector stops acknowledging, reports its lag, keeps
//! retrying with backoff, and catches up with exact counts once ClickHouse answers again.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod analytics_support;

use std::time::Duration;

use analytics_support::*;
use stone_kit::Shutdown;
use time::OffsetDateTime;
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_down_then_back_loses_nothing_and_doubles_nothing() -> TestResult {
    let config = isolated_config();
    with_cleanup(&config, async {
        let switch = Relay::start(&config).await?;
        let projector_config = switch.route(&config);

        let js = jetstream(&config).await?;
        let mut publisher = publisher(&config, &js);
        let now = OffsetDateTime::now_utc();
        let shutdown = Shutdown::new();
        stone_analytics::build(&projector_config, &shutdown).await?;
        publish_requests(&mut publisher, 0, 5_000, now).await?;
        assert_eq!(wait_for_count(&config, 5_000, Duration::from_secs(30)).await, 5_000);

        switch.set_up(false);
        publish_requests(&mut publisher, 5_000, 10_000, now).await?;

        // The lag is on record while the projector waits, and the gateway shows it.
        let api_shutdown = Shutdown::new();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let api = listener.local_addr()?;
        let projections = stone_gateway::analytics::projections::ProjectionsState {
            js: js.clone(),
            namespace: config.namespace(),
            partitions: config.partitions,
            pool: None,
        };
        api_shutdown.spawn(stone_kit::admin::serve(
            listener,
            stone_gateway::analytics::projections::routes(projections),
            api_shutdown.token(),
        ));
        // The projector records the lag when an insert fails and again at every retry; a busy
        // machine may take a while to get there, so poll (bounded) instead of reading once.
        let mut lag = serde_json::Value::Null;
        for _ in 0..150 {
            lag = get_json(&format!("http://{api}/v1/projections")).await?;
            if outage_is_reported(&lag) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let analytics = &lag["projections"][0];
        assert_eq!(analytics["name"], "analytics", "{lag}");
        assert!(analytics["pending_events"].as_u64().unwrap_or(0) > 0, "pending events during the outage: {lag}");
        assert!(analytics["seconds_behind"].as_f64().unwrap_or(0.0) > 0.0, "{lag}");
        let partitions = analytics["partitions"].as_array().cloned().unwrap_or_default();
        assert_eq!(partitions.len(), usize::from(config.partitions));
        // Known weakness (see the issue notes): a partition whose worker is idle when ClickHouse
        // goes away can let its lease lapse during the outage; ownership is fenced by
        // compare-and-set, so counts stay exact, which is what this test is about.
        assert!(partitions.iter().any(|partition| partition["owned"] == true), "{lag}");
        assert!(partitions.iter().any(|partition| partition["batch_in_flight"] == true), "{lag}");
        assert_eq!(raw_count(&config).await, 5_000, "nothing can be written while ClickHouse is down");

        switch.set_up(true);
        let count = wait_for_count(&config, 15_000, Duration::from_secs(60)).await;
        // Caught up: the next commit or idle renewal reports no lag.
        let mut caught_up = serde_json::Value::Null;
        for _ in 0..50 {
            caught_up = get_json(&format!("http://{api}/v1/projections")).await?;
            if caught_up["projections"][0]["pending_events"] == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(caught_up["projections"][0]["pending_events"], 0, "{caught_up}");
        api_shutdown.trigger();
        let _ = api_shutdown.drain(Duration::from_secs(5)).await;
        shutdown.trigger();
        let _ = shutdown.drain(Duration::from_secs(10)).await;
        assert_eq!(count, 15_000);
        assert_exactly_once(&config, 15_000).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await
}

/// Lag on record, a partition owned and a batch waiting for ClickHouse.
fn outage_is_reported(lag: &serde_json::Value) -> bool {
    let analytics = &lag["projections"][0];
    let partitions = analytics["partitions"].as_array().cloned().unwrap_or_default();
    analytics["pending_events"].as_u64().unwrap_or(0) > 0
        && analytics["seconds_behind"].as_f64().unwrap_or(0.0) > 0.0
        && partitions.iter().any(|partition| partition["owned"] == true)
        && partitions.iter().any(|partition| partition["batch_in_flight"] == true)
}

async fn get_json(url: &str) -> TestResult<serde_json::Value> {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let response = client.get(url.parse()?).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    serde_json::from_slice(&body)
        .map_err(|error| format!("GET {url}: {status}, not JSON ({error}): {}", String::from_utf8_lossy(&body)).into())
}
