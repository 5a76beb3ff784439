//! A projector that starts behind (events already in the stream) writes the backlog in full
//! batches of `analytics.batch_max_rows`, not in whatever arrived within `batch_max_wait_ms`:
//! every insert costs ClickHouse a part in the raw table and in each rollup, so a backlog cut
//! into small inserts is what keeps a projector behind.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod analytics_support;

use std::time::Duration;

use analytics_support::*;
use stone_kit::Shutdown;
use stone_kit::telemetry::sample;
use time::OffsetDateTime;

const EVENTS: u64 = 24_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_written_in_full_batches_and_counted_once() -> TestResult {
    let mut config = quick_projector_config("cu");
    config.partitions = 2;
    config.analytics.batch_max_rows = 2_000;
    // Far shorter than reading a partition's share of the backlog takes.
    config.analytics.batch_max_wait_ms = 1;
    with_cleanup(&config, async {
        // The recorder must be in place before the projector records anything.
        let metrics = stone_kit::telemetry::metrics_handle();
        stone_kit::nats::connect_and_provision(&config, "catch-up-test").await?;
        let js = jetstream(&config).await?;
        let mut publisher = publisher(&config, &js);
        publish_requests(&mut publisher, 0, EVENTS, OffsetDateTime::now_utc()).await?;

        let shutdown = Shutdown::new();
        stone_analytics::build(&config, &shutdown).await?;
        assert_eq!(wait_for_count(&config, EVENTS, Duration::from_secs(60)).await, EVENTS);
        shutdown.trigger();
        let _ = shutdown.drain(Duration::from_secs(10)).await;

        let rendered = metrics.render();
        let batches = sample("stone_analytics_batch_events_count").unwrap_or_else(|| panic!("{rendered}"));
        let events = sample("stone_analytics_batch_events_sum").unwrap_or_else(|| panic!("{rendered}"));
        assert_eq!(events, EVENTS as f64, "{rendered}");
        // 12 full batches of 2,000 (6 per partition). Once a partition's share of what is left
        // in the stream is less than a batch it is caught up and flushes what it has, so each
        // partition may end on a few short batches (14-15 inserts here). Without the catch-up
        // wait, batches hold what arrived during the previous insert: 21-23 inserts here.
        let full = (EVENTS / 2_000) as f64;
        eprintln!("{batches} inserts for {EVENTS} events");
        assert!(batches <= full + 5.0, "{batches} inserts for {EVENTS} events in batches of 2,000:\n{rendered}");
        assert_exactly_once(&config, EVENTS).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await
}
