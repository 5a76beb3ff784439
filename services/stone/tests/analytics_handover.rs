//! Partitions changing hands between instances while events keep arriving, through the shared
//! stream reader: each instance reads the stream once and skips the partitions it does not own,
//! so an instance that takes a partition over must rewind its reader to that partition's
//! checkpoint (below what it has already read) while its other partitions skip what they have.
//! Exact counts in raw rows and both rollups prove nothing was skipped or repeated.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod analytics_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use analytics_support::*;
use stone_analytics::state::{PartitionState, partition_key};
use stone_kit::{Shutdown, StoneConfig};
use time::OffsetDateTime;

/// Owner of every partition (empty when released or never taken).
async fn owners(config: &StoneConfig, js: &async_nats::jetstream::Context) -> TestResult<BTreeMap<u16, String>> {
    let store = js.get_key_value(config.namespace().bucket_name(stone_analytics::STATE_BUCKET)).await?;
    let mut owners = BTreeMap::new();
    for partition in 0..config.partitions {
        let owner = match store.get(partition_key(partition)).await? {
            Some(value) => serde_json::from_slice::<PartitionState>(&value)?.owner,
            None => String::new(),
        };
        owners.insert(partition, owner);
    }
    Ok(owners)
}

/// Waits until `check` holds for the owners (or 30 s pass) and returns the last owners seen.
async fn wait_for_owners(
    config: &StoneConfig,
    js: &async_nats::jetstream::Context,
    check: impl Fn(&BTreeMap<u16, String>) -> bool,
) -> TestResult<BTreeMap<u16, String>> {
    let started = Instant::now();
    loop {
        let current = owners(config, js).await?;
        if check(&current) || started.elapsed() > Duration::from_secs(30) {
            return Ok(current);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn instance(config: &StoneConfig, name: &str) -> StoneConfig {
    let mut config = config.clone();
    config.analytics.instance_id = name.to_owned();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_taken_over_while_events_flow_are_read_from_their_checkpoints() -> TestResult {
    let mut config = isolated_config();
    config.analytics.batch_max_rows = 500;
    config.analytics.lease_ttl_ms = 2_000;
    with_cleanup(&config, async {
        let js = jetstream(&config).await?;
        let mut publisher = publisher(&config, &js);
        let now = OffsetDateTime::now_utc();
        publish_requests(&mut publisher, 0, 10_000, now).await?;

        // A alone: it owns every partition and reads the whole stream.
        let first = Shutdown::new();
        stone_analytics::build(&instance(&config, "first"), &first).await?;
        let all_first = wait_for_owners(&config, &js, |owners| owners.values().all(|owner| owner == "first")).await?;
        assert!(all_first.values().all(|owner| owner == "first"), "{all_first:?}");
        wait_for_count(&config, 2_000, Duration::from_secs(60)).await;

        // Events keep arriving while the partitions move.
        let feeder = {
            let mut publisher = analytics_support::publisher(&config, &js);
            tokio::spawn(async move {
                for chunk in 0..40u64 {
                    publish_requests(&mut publisher, 10_000 + chunk * 750, 750, now).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };

        // B joins: A gives back half, B takes them from their checkpoints.
        let second = Shutdown::new();
        stone_analytics::build(&instance(&config, "second"), &second).await?;
        let shared = wait_for_owners(&config, &js, |owners| {
            owners.values().filter(|owner| *owner == "first").count() == 2
                && owners.values().filter(|owner| *owner == "second").count() == 2
        })
        .await?;
        assert_eq!(shared.values().filter(|owner| *owner == "second").count(), 2, "{shared:?}");

        // B leaves mid-stream: A takes its partitions back, at checkpoints below what A's reader
        // has already read (and skipped, not owning them), so A's reader rewinds.
        tokio::time::sleep(Duration::from_millis(800)).await;
        second.trigger();
        let _ = second.drain(Duration::from_secs(10)).await;
        let back = wait_for_owners(&config, &js, |owners| owners.values().all(|owner| owner == "first")).await?;
        assert!(back.values().all(|owner| owner == "first"), "{back:?}");

        feeder.await?;
        let expected = 40_000;
        let count = wait_for_count(&config, expected, Duration::from_secs(90)).await;
        first.trigger();
        let _ = first.drain(Duration::from_secs(10)).await;
        assert_eq!(count, expected);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_exactly_once(&config, expected).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await
}
