//! `analytics.insert_concurrency`: a partition whose batch is ready waits for one of the
//! instance's insert slots and adds what arrived meanwhile to that insert. While ClickHouse is slow
//! the projector then sends fewer, larger inserts, instead of one small insert per partition and
//! flush interval piling up in the server.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod analytics_support;

use std::time::Duration;

use analytics_support::*;
use stone_kit::Shutdown;
use stone_kit::telemetry::sample;
use time::OffsetDateTime;

const BURST: u64 = 400;

/// Polls `condition` every 50 ms for up to 30 s; `false` if it never held.
async fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    for _ in 0..600 {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A quick projector with one insert slot, whose leases outlast any hold of the gate (so no
/// lease lapses while an insert waits in it).
fn one_slot_config(prefix: &str) -> stone_kit::config::StoneConfig {
    let mut config = quick_projector_config(prefix);
    config.analytics.insert_concurrency = 1;
    config.analytics.lease_ttl_ms = 15_000;
    config
}

/// Starts a projector whose ClickHouse traffic goes through a [`Relay`], once the tables are
/// laid out and every partition is owned (so nothing but inserts is left to reach ClickHouse).
async fn start_behind_gate(
    config: &stone_kit::config::StoneConfig,
    js: &async_nats::jetstream::Context,
) -> TestResult<(Relay, Shutdown)> {
    let metrics = stone_kit::telemetry::metrics_handle();
    let gate = Relay::start(config).await?;
    let projector_config = gate.route(config);
    // A first start lays the tables out (`stone_analytics::layout`: a re-layout pauses the
    // partitions while it talks to ClickHouse, which a closed gate would hold forever).
    let first = Shutdown::new();
    stone_analytics::build(config, &first).await?;
    let rebuilds = stone_kit::rebuild::open(js, &config.namespace(), 1).await?;
    let laid_out = async {
        for _ in 0..600 {
            let create: String =
                clickhouse(config).query("SHOW CREATE TABLE requests_1m").fetch_one().await.unwrap_or_default();
            let record = stone_kit::rebuild::read(&rebuilds, stone_analytics::partition::REBUILD_KEY).await;
            let settled = record.is_ok_and(|record| record.is_none_or(|status| !status.phase.is_running()));
            if create.contains("index_granularity = 256") && settled {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(laid_out.await, "requests_1m was not laid out");
    first.trigger();
    let _ = first.drain(Duration::from_secs(10)).await;

    let shutdown = Shutdown::new();
    stone_analytics::build(&projector_config, &shutdown).await?;
    // Every partition owned: their watermarks have been read from ClickHouse.
    let partitions = f64::from(config.partitions);
    assert!(
        eventually(|| sample("stone_analytics_partitions_owned") == Some(partitions)).await,
        "partitions owned: {}",
        metrics.render()
    );
    Ok((gate, shutdown))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_batch_takes_what_arrived_while_clickhouse_was_busy() -> TestResult {
    let config = one_slot_config("slots");
    with_cleanup(&config, async {
        // The recorder must be in place before the projector records anything.
        let metrics = stone_kit::telemetry::metrics_handle();
        let js = jetstream(&config).await?;
        let mut publisher = publisher(&config, &js);
        let (gate, shutdown) = start_behind_gate(&config, &js).await?;
        let partitions = f64::from(config.partitions);

        // ClickHouse stops answering. The first ready batch takes the only slot and its insert
        // waits in the gate; the other partitions' batches wait for the slot.
        gate.set_open(false);
        let now = OffsetDateTime::now_utc();
        publish_requests(&mut publisher, 0, BURST, now).await?;
        assert!(
            eventually(|| sample("stone_analytics_insert_slot_wait_seconds_count").is_some_and(|taken| taken >= 1.0))
                .await,
            "no batch took the insert slot: {}",
            metrics.render()
        );
        assert!(eventually(|| gate.held() > 0).await, "no request reached ClickHouse");
        // More events arrive while the batches wait.
        publish_requests(&mut publisher, BURST, BURST, now).await?;
        let handed = (2 * BURST) as f64;
        assert!(
            eventually(|| sample("stone_analytics_feed_events_total").is_some_and(|events| events >= handed)).await,
            "the feed did not hand over both bursts: {}",
            metrics.render()
        );
        gate.set_open(true);

        assert_eq!(wait_for_count(&config, 2 * BURST, Duration::from_secs(60)).await, 2 * BURST);
        shutdown.trigger();
        let _ = shutdown.drain(Duration::from_secs(10)).await;

        let rendered = metrics.render();
        let inserts = sample("stone_analytics_batch_events_count").unwrap_or_else(|| panic!("{rendered}"));
        let events = sample("stone_analytics_batch_events_sum").unwrap_or_else(|| panic!("{rendered}"));
        assert_eq!(events, handed, "{rendered}");
        // The held insert (part of the first burst), then one insert per other partition
        // holding both bursts (their waiting batches took the second burst in), then the rest of
        // the first partition: 5 for 4 partitions. Batches that keep what they held when they
        // started waiting (or unbounded concurrent inserts) make 8: each partition once per burst.
        eprintln!("{inserts} inserts for {handed} events");
        assert!(
            inserts <= partitions + 1.0,
            "{inserts} inserts for two bursts on {partitions} partitions:\n{rendered}"
        );
        assert_exactly_once(&config, 2 * BURST).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_left_unanswered_is_abandoned_and_retried_without_double_counting() -> TestResult {
    let mut config = one_slot_config("hung");
    config.analytics.insert_timeout_ms = 500;
    with_cleanup(&config, async {
        let metrics = stone_kit::telemetry::metrics_handle();
        let js = jetstream(&config).await?;
        let mut publisher = publisher(&config, &js);
        let (gate, shutdown) = start_behind_gate(&config, &js).await?;

        // The only slot's insert hangs: without a timeout every partition would wait behind it
        // for as long as the connection stays silent.
        gate.set_open(false);
        publish_requests(&mut publisher, 0, BURST, OffsetDateTime::now_utc()).await?;
        assert!(
            eventually(|| sample("stone_analytics_insert_timeouts_total").is_some_and(|timeouts| timeouts >= 2.0))
                .await,
            "no insert was abandoned: {}",
            metrics.render()
        );
        // The abandoned requests still reach ClickHouse when the gate opens, next to the retry
        // that succeeds: the tokens make them one.
        gate.set_open(true);
        assert_eq!(wait_for_count(&config, BURST, Duration::from_secs(60)).await, BURST);
        shutdown.trigger();
        let _ = shutdown.drain(Duration::from_secs(10)).await;
        assert_exactly_once(&config, BURST).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await
}
