//! The analytics projector through real NATS and ClickHouse: exact counts in raw rows and
//! rollups after N events, old versions upcast, poison events dead-lettered without blocking,
//! a projector killed with SIGKILL mid-batch, and overlapping instances.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod analytics_support;

use std::time::Duration;

use analytics_support::*;
use bytes::Bytes;
use futures::StreamExt;
use stone_events::streams::headers;
use stone_kit::Shutdown;
use time::OffsetDateTime;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_lands_once_with_rollups_agreeing_and_poison_is_dead_lettered() -> TestResult {
    let config = isolated_config();
    with_cleanup(&config, async {
        let js = jetstream(&config).await?;
        let mut publisher = publisher(&config, &js);
        let now = OffsetDateTime::now_utc();
        // Two days, so batches span two ClickHouse partitions.
        publish_requests(&mut publisher, 0, 2_000, now - time::Duration::days(1)).await?;
        publish_requests(&mut publisher, 2_000, 2_000, now).await?;
        // A v1 event (upcast on read), a poison message and an unknown future version, then more
        // events on the same partitions: the poison must not block them.
        let v1 = include_str!("../../../events/tests/fixtures/request.completed.v1.json")
            .replace("2026-11-02T10:15:30.123456Z", &stone_events::timestamp::format(now));
        let namespace = config.namespace();
        for partition in 0..config.partitions {
            let id = uuid::Uuid::now_v7();
            let poison_subject = format!("{}.ev.request.completed.v2.{partition}.x.5xx.none.-.-", namespace.root());
            publisher.publish_raw(poison_subject, id.to_string(), Bytes::from_static(b"{not json")).await?;
            let future = format!(
                r#"{{"id":"{}","type":"request.completed","version":9,"time":"2026-11-02T10:15:30.000000Z","source":"x","config_seq":1,"data":{{}}}}"#,
                uuid::Uuid::now_v7()
            );
            let future_subject = format!("{}.ev.request.completed.v9.{partition}.x.2xx.none.-.-", namespace.root());
            publisher.publish_raw(future_subject, uuid::Uuid::now_v7().to_string(), Bytes::from(future)).await?;
        }
        let v1_subject = format!("{}.ev.request.completed.v1.0.users.2xx.hit.-.-", namespace.root());
        let v1_id = uuid::Uuid::now_v7().to_string();
        let v1 = v1.replace("01936f0e-8a4b-7c3d-9e2f-5a6b7c8d9e0f", &v1_id);
        publisher.publish_raw(v1_subject, v1_id, Bytes::from(v1)).await?;
        publish_requests(&mut publisher, 4_000, 1_000, now).await?;
        let expected = 5_001;
        // Cache events land in their own table: a summed eviction report keeps its count.
        for (action, count) in [(stone_events::cache::CacheAction::Evicted, Some(7)), (stone_events::cache::CacheAction::Stored, None)] {
            let event = stone_events::cache::CacheEvent {
                action,
                route: "users".to_owned(),
                key: "api.test/users/1".to_owned(),
                tier: None,
                bytes: 1_024,
                ttl_s: None,
                tags: Vec::new(),
                actor: None,
                reason: Some("size".to_owned()),
                count,
            };
            publisher.publish(&stone_events::Envelope::new("test", 0, event)).await?;
        }
        publisher.flush().await?;

        let shutdown = Shutdown::new();
        stone_analytics::build(&config, &shutdown).await?;
        let count = wait_for_count(&config, expected, Duration::from_secs(60)).await;
        shutdown.trigger();
        let _ = shutdown.drain(Duration::from_secs(10)).await;
        assert_eq!(count, expected);
        assert_exactly_once(&config, expected).await?;

        let upcast: (u64, u64) = clickhouse(&config)
            .query("SELECT count(), sum(total_us) FROM requests WHERE path = '/users/7'")
            .fetch_one()
            .await?;
        assert_eq!(upcast, (1, 12_346), "v1 duration_ms 12.3456 upcast to microseconds");
        let counts: Vec<(String, u64)> = clickhouse(&config)
            .query("SELECT action, sum(count) FROM cache_events GROUP BY action ORDER BY action")
            .fetch_all()
            .await?;
        assert_eq!(counts, vec![("evicted".to_owned(), 7), ("stored".to_owned(), 1)]);

        // Every poison message is in DEADLETTER with its reason.
        let dead = js.get_stream(namespace.stream_name("DEADLETTER")).await?;
        let consumer = dead
            .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
            .await?;
        let mut messages = consumer.fetch().max_messages(100).expires(Duration::from_secs(1)).messages().await?;
        let mut reasons = Vec::new();
        while let Some(message) = messages.next().await {
            let message = message?;
            let reason = message.headers.as_ref().and_then(|h| h.get(headers::DEAD_LETTER_REASON)).map(|v| v.to_string());
            reasons.push(reason.unwrap_or_default());
        }
        assert_eq!(reasons.len(), 2 * usize::from(config.partitions), "{reasons:?}");
        assert_eq!(reasons.iter().filter(|reason| reason.starts_with("malformed envelope")).count(), 4, "{reasons:?}");
        assert_eq!(reasons.iter().filter(|reason| reason.contains("newer than this reader")).count(), 4, "{reasons:?}");
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_mid_batch_and_restarted_counts_every_event_once() -> TestResult {
    let mut config = isolated_config();
    config.analytics.batch_max_rows = 2_000;
    with_cleanup(&config, async {
        let js = jetstream(&config).await?;
        let mut publisher = publisher(&config, &js);
        let expected = 60_000;
        let now = OffsetDateTime::now_utc();
        publish_requests(&mut publisher, 0, expected, now).await?;

        // Kill the projector three times while it is writing, at different points.
        let mut kills = 0;
        for round in 0..3u64 {
            let mut projector = ProjectorProcess::start(&config, "killed")?;
            let target = expected * (round + 1) / 4;
            let started = std::time::Instant::now();
            while raw_count(&config).await < target && started.elapsed() < Duration::from_secs(60) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            projector.kill();
            kills += 1;
        }
        let killed_at = raw_count(&config).await;
        assert!(killed_at < expected, "the kills happened before the end ({killed_at})");

        let _survivor = ProjectorProcess::start(&config, "survivor")?;
        let count = wait_for_count(&config, expected, Duration::from_secs(90)).await;
        assert_eq!(count, expected, "after {kills} kills");
        // Let any late duplicate show up before the final check.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_exactly_once(&config, expected).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_instances_share_partitions_and_hand_them_over_without_double_counting() -> TestResult {
    let mut config = isolated_config();
    config.analytics.batch_max_rows = 1_000;
    config.analytics.lease_ttl_ms = 2_000;
    with_cleanup(&config, async {
        let js = jetstream(&config).await?;
        let mut publisher = publisher(&config, &js);
        let now = OffsetDateTime::now_utc();
        let mut first = ProjectorProcess::start(&config, "first")?;
        let _second = ProjectorProcess::start(&config, "second")?;
        publish_requests(&mut publisher, 0, 20_000, now).await?;
        // Both instances own partitions (once both processes are up: waited for, not assumed,
        // since starting two processes on a loaded machine takes a variable time).
        let started = std::time::Instant::now();
        let owners = loop {
            let mut owners = std::collections::BTreeSet::new();
            if let Ok(store) = js.get_key_value(config.namespace().bucket_name(stone_analytics::STATE_BUCKET)).await {
                for partition in 0..config.partitions {
                    if let Some(value) = store.get(stone_analytics::state::partition_key(partition)).await? {
                        let state: stone_analytics::state::PartitionState = serde_json::from_slice(&value)?;
                        owners.insert(state.owner);
                    }
                }
            }
            if owners.len() == 2 && !owners.contains("") || started.elapsed() > Duration::from_secs(30) {
                break owners;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(owners.len(), 2, "{owners:?}");
        assert!(!owners.contains(""), "{owners:?}");

        // One dies mid-stream; a third joins; the survivors take over its partitions.
        publish_requests(&mut publisher, 20_000, 20_000, now).await?;
        first.kill();
        let _third = ProjectorProcess::start(&config, "third")?;
        publish_requests(&mut publisher, 40_000, 10_000, now).await?;
        let count = wait_for_count(&config, 50_000, Duration::from_secs(90)).await;
        assert_eq!(count, 50_000);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_exactly_once(&config, 50_000).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await
}
