//! The minute rollup's small granules (`stone_analytics::layout`): a migration cannot change
//! `index_granularity`, so the projector re-lays `requests_1m` out at start under the rebuild's
//! pause. Through real NATS and ClickHouse, with events arriving all along: a new install gets
//! the small granules; a table with the default granularity and data in it (an install from
//! before the change) is re-laid out when a projector instance starts next to a running one,
//! and afterwards every event is counted exactly once in raw rows and in both rollups, group by
//! group, and the views feed the new table.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod analytics_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use analytics_support::{
    TestResult, assert_exactly_once, clickhouse, jetstream, publish_requests, publisher, wait_for_count, with_cleanup,
};
use stone_analytics::layout;
use stone_kit::{Shutdown, StoneConfig};
use time::OffsetDateTime;

fn config() -> StoneConfig {
    analytics_support::quick_projector_config("rl")
}

fn instance(config: &StoneConfig, name: &str) -> StoneConfig {
    let mut config = config.clone();
    config.analytics.instance_id = name.to_owned();
    config
}

/// `index_granularity` of `requests_1m` as its `CREATE` statement says.
async fn granularity(config: &StoneConfig) -> TestResult<Option<u64>> {
    let create: String = clickhouse(config)
        .query("SELECT create_table_query FROM system.tables WHERE database = currentDatabase() AND name = ?")
        .bind("requests_1m")
        .fetch_one()
        .await?;
    Ok(layout::setting(&create, "index_granularity"))
}

/// Publishes 50 events every 20 ms from index `first` on, at the last `minutes` minutes before
/// `now`, until the flag is set; the task returns the index after the last one published.
fn feed(
    mut publisher: stone_analytics::synthetic::Publisher,
    first: u64,
    minutes: u64,
    now: OffsetDateTime,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let feeder = tokio::spawn(async move {
        let mut next = first;
        while !flag.load(Ordering::Relaxed) {
            let ago = time::Duration::minutes(i64::try_from(next % minutes).unwrap());
            publish_requests(&mut publisher, next, 50, now - ago).await.unwrap();
            next += 50;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        next
    });
    (stop, feeder)
}

async fn wait_for_granularity(config: &StoneConfig, expected: u64) -> TestResult<Option<u64>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let current = granularity(config).await?;
        if current == Some(expected) || tokio::time::Instant::now() > deadline {
            return Ok(current);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_minute_rollup_is_re_laid_out_exactly_while_events_flow() -> TestResult {
    let config = config();
    with_cleanup(&config, async {
        stone_kit::testing::create_database(&config).await?;
        let js = jetstream(&config).await?;
        let mut first_batch = publisher(&config, &js);
        let now = OffsetDateTime::now_utc();
        publish_requests(&mut first_batch, 0, 3_000, now - time::Duration::hours(3)).await?;
        publish_requests(&mut first_batch, 3_000, 3_000, now).await?;

        // A new install: the migrations create the default granularity, the first start fixes it.
        let first = Shutdown::new();
        stone_analytics::build(&instance(&config, "first"), &first).await?;
        assert_eq!(wait_for_granularity(&config, 256).await?, Some(256), "a new install gets small granules");
        assert_eq!(wait_for_count(&config, 6_000, Duration::from_secs(60)).await, 6_000);
        assert_exactly_once(&config, 6_000).await?;

        // Events keep arriving, at several minutes, for the rest of the test.
        let (stop, feeder) = feed(publisher(&config, &js), 6_000, 7, now);

        // An install from before the change: the default granularity, with rows in it (put back
        // by the same mechanism, under live inserts, so it is exact too).
        let rebuilder = stone_analytics::rebuild::Rebuilder::connect(&config, js.clone()).await?;
        let cancel = tokio_util::sync::CancellationToken::new();
        assert!(layout::set_granularity(&rebuilder, "requests_1m", 8_192, &cancel).await?);
        assert_eq!(granularity(&config).await?, Some(8_192));
        let stored: u64 = clickhouse(&config).query("SELECT sum(requests) FROM requests_1m").fetch_one().await?;
        assert!(stored >= 6_000, "the old layout holds the rows: {stored}");

        // A second instance starts (an upgrade rolling out) while the first one writes.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let second = Shutdown::new();
        stone_analytics::build(&instance(&config, "second"), &second).await?;
        assert_eq!(wait_for_granularity(&config, 256).await?, Some(256), "an existing table is re-laid out");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!layout::set_granularity(&rebuilder, "requests_1m", 256, &cancel).await?, "nothing left to do");

        stop.store(true, Ordering::Relaxed);
        let total = feeder.await?;
        assert!(total > 6_000, "events arrived during the re-layouts");
        assert_eq!(wait_for_count(&config, total, Duration::from_secs(60)).await, total);
        // The views feed the new table: every event, before, during and after, exactly once.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let rolled: u64 = clickhouse(&config).query("SELECT sum(requests) FROM requests_1m").fetch_one().await?;
            if rolled >= total || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_exactly_once(&config, total).await?;
        let left: u64 = clickhouse(&config)
            .query("SELECT count() FROM system.tables WHERE database = currentDatabase() AND endsWith(name, ?)")
            .bind(layout::STAGING)
            .fetch_one()
            .await?;
        assert_eq!(left, 0, "the old table is dropped after the exchange");
        let record =
            stone_kit::rebuild::read(&rebuilder.rebuilds, stone_analytics::partition::REBUILD_KEY).await?.unwrap();
        assert_eq!(record.phase, stone_kit::rebuild::Phase::Done, "the pause is lifted: {record:?}");
        assert_eq!(record.actor, "relayout requests_1m", "{record:?}");

        second.trigger();
        first.trigger();
        let _ = second.drain(Duration::from_secs(10)).await;
        let _ = first.drain(Duration::from_secs(10)).await;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await
}

/// A batch in flight (a `pending` range, here left by an owner that died) would be retried into
/// the new table without the old table's deduplication log, so the re-layout waits: it pauses,
/// sees the range, lifts the pause and tries again, and copies only once the range is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_in_flight_makes_the_re_layout_wait() -> TestResult {
    use stone_analytics::state::{self, PartitionState, PendingBatch};
    let config = config();
    with_cleanup(&config, async {
        stone_kit::clickhouse::migrate(&config).await?;
        assert_eq!(granularity(&config).await?, Some(8_192), "the migrations create the default granularity");
        let js = jetstream(&config).await?;
        let rebuilder = stone_analytics::rebuild::Rebuilder::connect(&config, js.clone()).await?;
        let key = state::partition_key(0);
        let left = PartitionState {
            owner: "gone".to_owned(),
            committed_through: 10,
            pending: Some(PendingBatch { first: 11, last: 20 }),
            ..Default::default()
        };
        state::create(&rebuilder.states, &key, left).await?;

        let cancel = tokio_util::sync::CancellationToken::new();
        let relayout = {
            let rebuilder = rebuilder.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move { layout::set_granularity(&rebuilder, "requests_1m", 256, &cancel).await })
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!relayout.is_finished(), "the re-layout waits for the batch in flight");
        assert_eq!(granularity(&config).await?, Some(8_192));
        // Between two attempts the record says why (each attempt claims it afresh).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let record = stone_kit::rebuild::read(&rebuilder.rebuilds, stone_analytics::partition::REBUILD_KEY).await?;
            let error = record.as_ref().and_then(|record| record.error.clone()).unwrap_or_default();
            if error.contains("partition 0 has a batch in flight (11..=20)") {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the record never named the batch: {record:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The batch is finished (as the partition's next owner would), and the re-layout goes on.
        loop {
            let current = state::read(&rebuilder.states, &key).await?.unwrap();
            let mut next = current.state.clone();
            next.pending = None;
            next.committed_through = 20;
            match state::write(&rebuilder.states, &key, &current, next).await {
                Ok(_) => break,
                Err(state::StateError::Conflict) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        let done = tokio::time::timeout(Duration::from_secs(60), relayout).await??;
        assert!(done?, "the table was re-laid out");
        assert_eq!(granularity(&config).await?, Some(256));
        let record =
            stone_kit::rebuild::read(&rebuilder.rebuilds, stone_analytics::partition::REBUILD_KEY).await?.unwrap();
        assert_eq!(record.phase, stone_kit::rebuild::Phase::Done, "{record:?}");
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await
}

/// The `CREATE` statements of both rollups and their views.
async fn rollup_statements(config: &StoneConfig) -> TestResult<Vec<String>> {
    Ok(clickhouse(config)
        .query(
            "SELECT create_table_query FROM system.tables WHERE database = currentDatabase() \
             AND name IN ('requests_1m', 'requests_1h', 'requests_1m_mv', 'requests_1h_mv') ORDER BY name",
        )
        .fetch_all()
        .await?)
}

/// An install from before the DDSketch latency state: rollups of t-digest states with rows in
/// them. A projector starts while events flow; afterwards both rollups and their views keep
/// DDSketch states, every event is counted once, and every group's quantiles are exactly those
/// of a sketch of its raw rows: the old rows' states were recomputed from raw rows, and the new
/// rows' states written by the new views, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t_digest_rollups_get_ddsketch_states_exactly_while_events_flow() -> TestResult {
    let config = config();
    with_cleanup(&config, async {
        stone_kit::testing::create_database(&config).await?;
        stone_kit::clickhouse::migrate(&config).await?;
        let old = rollup_statements(&config).await?;
        assert_eq!(old.len(), 4);
        assert!(old.iter().all(|create| create.contains("quantilesTDigest")), "migration 0002 creates t-digests");
        // Rows written before the upgrade, over the last three hours, through the old views.
        clickhouse(&config)
            .query(
                "INSERT INTO requests (event_id, time, source, route, path_template, upstream, consumer, status, \
                   cache, total_us, bytes_out) \
                 SELECT generateUUIDv4(number), now64(6) - toIntervalSecond(number * 5), 'before-upgrade', \
                   ['users', 'orders'][number % 2 + 1], '/x/{id}', 'svc', 'acme', if(number % 10 = 0, 500, 200), \
                   'none', 100 + (number * 7919) % 50000, 10 \
                 FROM numbers(2000)",
            )
            .execute()
            .await?;
        let js = jetstream(&config).await?;
        let mut first_batch = publisher(&config, &js);
        let now = OffsetDateTime::now_utc();
        publish_requests(&mut first_batch, 0, 1_000, now - time::Duration::hours(1)).await?;

        let (stop, feeder) = feed(publisher(&config, &js), 1_000, 5, now);
        let projector = Shutdown::new();
        stone_analytics::build(&instance(&config, "upgraded"), &projector).await?;
        assert_eq!(wait_for_granularity(&config, 256).await?, Some(256), "every layout change is done");
        let new = rollup_statements(&config).await?;
        assert_eq!(new.len(), 4, "both rollups and both views: {new:?}");
        for create in &new {
            assert!(!create.contains("quantilesTDigest"), "{create}");
            assert!(create.contains("quantilesDD(0.01, 0.5, 0.9, 0.95, 0.99)"), "{create}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        let published = feeder.await?;
        let total = 2_000 + published;
        assert_eq!(wait_for_count(&config, total, Duration::from_secs(60)).await, total);
        assert_exactly_once(&config, total).await?;

        let client = clickhouse(&config);
        for (rollup, bucket) in stone_analytics::layout::LATENCY_STATE {
            let sql = format!(
                "SELECT count(), countIf(rolled.q != raw.q) FROM ( \
                   SELECT bucket, route, status, quantilesDDMerge(0.01, 0.5, 0.9, 0.95, 0.99)(latency_us) AS q \
                   FROM {rollup} GROUP BY bucket, route, status \
                 ) AS rolled FULL OUTER JOIN ( \
                   SELECT {bucket} AS bucket, route, status, quantilesDD(0.01, 0.5, 0.9, 0.95, 0.99)(total_us) AS q \
                   FROM requests GROUP BY bucket, route, status \
                 ) AS raw USING (bucket, route, status)"
            );
            let (groups, differing): (u64, u64) = client.query(&sql).fetch_one().await?;
            assert!(groups > 4, "{rollup}: {groups} groups");
            assert_eq!(differing, 0, "{rollup}: groups whose quantiles are not those of their raw rows");
        }
        // And the sketch is within its 1% of the exact quantiles.
        let both: Vec<f64> = client
            .query(
                "SELECT arrayConcat((SELECT quantilesDDMerge(0.01, 0.5, 0.99)(latency_us) FROM requests_1h), \
                   (SELECT arrayMap(value -> toFloat64(value), quantilesExact(0.5, 0.99)(total_us)) FROM requests))",
            )
            .fetch_one()
            .await?;
        let (sketch, exact) = both.split_at(2);
        for (sketch, exact) in sketch.iter().zip(exact) {
            assert!((sketch - exact).abs() <= 0.02 * exact, "sketch {sketch} against exact {exact}");
        }

        projector.trigger();
        let _ = projector.drain(Duration::from_secs(10)).await;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await
}
