//! Rebuilding the analytics projection with `stone replay analytics` (the CLI → gateway
//! `POST /v1/projections/analytics/rebuild` → progress SSE) while the live projector runs and
//! events keep arriving steadily until the rebuild is done: afterwards every event is in the raw table once and every rollup agrees
//! with it — damage done to the live tables is repaired, a rollup added later (the
//! `consumer_usage_1h` backfill example) is filled from the stream, and the record of the
//! rebuild is visible in `GET /v1/projections`.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod analytics_support;

use std::time::Duration;

use analytics_support::{
    TestResult, assert_exactly_once, clickhouse, jetstream, publish_requests, publisher, wait_for_count, with_cleanup,
};
use stone_kit::{Shutdown, StoneConfig};
use time::OffsetDateTime;

fn config() -> StoneConfig {
    analytics_support::quick_projector_config("rb")
}

/// Groups of `consumer_usage_1h` that disagree with an aggregate over the raw rows.
async fn usage_disagreements(config: &StoneConfig) -> TestResult<(u64, u64)> {
    let client = clickhouse(config);
    let total: u64 = client.query("SELECT sum(requests) FROM consumer_usage_1h").fetch_one().await?;
    let disagreeing: u64 = client
        .query(
            "SELECT count() FROM ( \
               SELECT bucket, consumer, route, sum(requests) AS requests, sum(server_errors) AS errors, \
                      sum(bytes_out) AS bytes_out FROM consumer_usage_1h GROUP BY bucket, consumer, route \
             ) AS rolled FULL OUTER JOIN ( \
               SELECT toStartOfHour(time) AS bucket, consumer, route, count() AS requests, \
                      countIf(status >= 500) AS errors, sum(bytes_out) AS bytes_out \
               FROM requests GROUP BY bucket, consumer, route \
             ) AS raw USING (bucket, consumer, route) \
             WHERE rolled.requests != raw.requests OR rolled.errors != raw.errors OR rolled.bytes_out != raw.bytes_out",
        )
        .fetch_one()
        .await?;
    Ok((total, disagreeing))
}

/// POSTs a rebuild request; returns the status and the JSON body.
async fn post(gateway_url: &str, token: &str, body: &'static str) -> TestResult<(u16, serde_json::Value)> {
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let request = hyper::Request::post(format!("{gateway_url}/v1/projections/analytics/rebuild"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes())))?;
    let response = http.request(request).await?;
    let status = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body()).await?.to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stone_replay_rebuilds_analytics_exactly_while_the_live_projection_runs() -> TestResult {
    let config = config();
    with_cleanup(&config, async {
        stone_kit::testing::create_database(&config).await?;
        let js = jetstream(&config).await?;
        let mut publisher = publisher(&config, &js);
        let now = OffsetDateTime::now_utc();
        publish_requests(&mut publisher, 0, 3_000, now - time::Duration::days(1)).await?;
        publish_requests(&mut publisher, 3_000, 3_000, now).await?;

        let shutdown = Shutdown::new();
        stone_analytics::build(&config, &shutdown).await?;
        let gateway = stone_gateway::build(&config, &shutdown).await?;
        assert_eq!(wait_for_count(&config, 6_000, Duration::from_secs(60)).await, 6_000);
        assert_exactly_once(&config, 6_000).await?;

        // Damage the live tables, and pretend the usage rollup was added after these events.
        let client = clickhouse(&config);
        client.query("TRUNCATE TABLE requests_1h").execute().await?;
        client.query("TRUNCATE TABLE consumer_usage_1h").execute().await?;
        client.query("DELETE FROM requests WHERE stream_seq % 10 = 0").execute().await?;
        assert!(analytics_support::raw_count(&config).await < 6_000);

        let pool = sqlx::PgPool::connect(&config.database_url).await?;
        let token =
            stone_gateway::auth::create_token(&pool, "operator", stone_gateway::auth::Scope::Admin).await?.token;
        let gateway_url = format!("http://{}", gateway.local_addr());
        let log = std::env::temp_dir().join(format!("stone-replay-{}.log", config.namespace));
        let mut replay = std::process::Command::new(env!("CARGO_BIN_EXE_stone"))
            .args(["replay", "analytics", "--plain", "--gateway", &gateway_url, "--token", &token])
            .env("STONE_TELEMETRY__LOG", "warn")
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        // Events keep arriving, steadily, for as long as the rebuild runs: the rebuild must still
        // catch up with the live projection and pause it (bounded: two minutes).
        let mut published = 6_000u64;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = replay.try_wait()? {
                break status;
            }
            if tokio::time::Instant::now() > deadline {
                let _ = replay.kill();
                panic!("stone replay did not finish within two minutes of steady traffic");
            }
            publish_requests(&mut publisher, published, 20, now).await?;
            published += 20;
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let stderr = std::fs::read_to_string(&log)?;
        let _ = std::fs::remove_file(&log);
        assert!(status.success(), "stone replay failed: {stderr}");
        assert!(stderr.contains("rebuild of analytics done"), "{stderr}");
        assert!(stderr.contains("events/s"), "progress lines are printed: {stderr}");
        let total = published;

        // The live projection resumed after the swap and took the rest.
        assert_eq!(wait_for_count(&config, total, Duration::from_secs(60)).await, total);
        assert_exactly_once(&config, total).await?;
        assert_eq!(usage_disagreements(&config).await?, (total, 0), "the usage rollup was backfilled");
        let shadows: u64 = client
            .query(
                "SELECT count() FROM system.tables WHERE database = currentDatabase() AND endsWith(name, '__rebuild')",
            )
            .fetch_one()
            .await?;
        assert_eq!(shadows, 0, "the old tables are dropped after the swap");

        // The record: done, visible through the API.
        let listed: serde_json::Value = {
            let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
            let response = http.get(format!("{gateway_url}/v1/projections").parse()?).await?;
            let body = http_body_util::BodyExt::collect(response.into_body()).await?.to_bytes();
            serde_json::from_slice(&body)?
        };
        let analytics = &listed["projections"][0];
        assert_eq!(analytics["name"], "analytics");
        assert_eq!(analytics["rebuild"]["phase"], "done", "{analytics}");
        assert_eq!(analytics["rebuild"]["actor"], "operator");
        assert!(analytics["rebuild"]["done"].as_u64().unwrap() >= 6_000, "{analytics}");
        assert!(
            analytics["partitions"].as_array().unwrap().iter().all(|p| p["owned"] == true),
            "every partition is owned again: {analytics}"
        );

        // A partial rebuild over HTTP: sequences from 4,000 on are replayed, older rows copied.
        let bad = post(&gateway_url, &token, r#"{"from_time": "soon"}"#).await?;
        assert_eq!((bad.0, bad.1["error"]["field"].as_str()), (400, Some("from_time")), "{}", bad.1);
        let started = post(&gateway_url, &token, r#"{"from_seq": 4000}"#).await?;
        assert_eq!(started.0, 202, "{}", started.1);
        let id = started.1["id"].as_str().unwrap().to_owned();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let record = loop {
            let record = stone_kit::rebuild::read(
                &stone_kit::rebuild::open(&js, &config.namespace(), 1).await?,
                stone_analytics::partition::REBUILD_KEY,
            )
            .await?
            .unwrap();
            if record.id == id && !record.phase.is_running() {
                break record;
            }
            assert!(tokio::time::Instant::now() < deadline, "partial rebuild did not finish: {record:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(record.phase, stone_kit::rebuild::Phase::Done, "{record:?}");
        assert_eq!(record.from_seq, 4_000, "{record:?}");
        assert_eq!(record.done, total - 4_000 + 1, "only the sequences from 4,000 on were read: {record:?}");
        assert_exactly_once(&config, total).await?;
        assert_eq!(usage_disagreements(&config).await?, (total, 0));

        shutdown.trigger();
        let _ = shutdown.drain(Duration::from_secs(10)).await;
        pool.close().await;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await
}
