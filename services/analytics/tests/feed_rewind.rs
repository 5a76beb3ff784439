//! The stream reader against a real NATS server: a subscriber that needs events the reader has
//! already read makes it rewind, and the consumer it replaces is deleted on the server rather
//! than left there until its inactivity threshold.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use stone_analytics::feed::{Feed, Subscription};
use stone_analytics::synthetic::{self, Publisher};
use stone_events::subjects::partition_in_subject;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const EVENTS: u64 = 400;

/// Receives until the reader has read the whole stream for `subscription`; the stream sequences
/// received, each checked to belong to `partition`.
async fn read_through(subscription: &mut Subscription, partition: u16, last: u64) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sequences = Vec::new();
    loop {
        while let Ok(delivered) = subscription.receiver.try_recv() {
            assert_eq!(partition_in_subject(&delivered.subject), Some(partition), "{}", delivered.subject);
            sequences.push(delivered.stream_sequence);
        }
        if subscription.scanned() >= last && subscription.receiver.is_empty() {
            return sequences;
        }
        assert!(Instant::now() < deadline, "the reader did not read through sequence {last}");
        if let Ok(Some(delivered)) = tokio::time::timeout(Duration::from_millis(50), subscription.receiver.recv()).await
        {
            assert_eq!(partition_in_subject(&delivered.subject), Some(partition), "{}", delivered.subject);
            sequences.push(delivered.stream_sequence);
        }
    }
}

#[tokio::test]
async fn a_rewind_replaces_the_readers_consumer_and_deletes_the_old_one() -> TestResult {
    let config = stone_kit::testing::isolated("feed");
    let outcome = stone_kit::testing::caught(async {
        let (_client, js) = stone_kit::nats::connect_and_provision(&config, "feed-test").await?;
        let namespace = config.namespace();
        let mut publisher = Publisher::new(js.clone(), namespace.clone(), config.partitions, 256);
        let now = OffsetDateTime::now_utc();
        for index in 0..EVENTS {
            publisher.publish(&synthetic::request(index, now)).await?;
        }
        publisher.flush().await?;
        let stream = js.get_stream(namespace.stream_name("EVENTS")).await?;
        let token = CancellationToken::new();
        let (feed, reader) =
            Feed::new(stream.clone(), namespace.events_wildcard(), config.partitions, 1_000, token.clone());
        let reader = tokio::spawn(reader);

        // Partition 0 from the start: the reader reads the whole stream for it.
        let mut first = feed.subscribe(0, 0).await?;
        let first_sequences = read_through(&mut first, 0, EVENTS).await;
        assert!(!first_sequences.is_empty(), "partition 0 has events among {EVENTS}");
        assert!(first_sequences.windows(2).all(|pair| pair[0] < pair[1]), "in stream order");

        // Partition 1 from the start too: the reader has to go back to sequence 1.
        let mut second = feed.subscribe(1, 0).await?;
        let second_sequences = read_through(&mut second, 1, EVENTS).await;
        assert!(!second_sequences.is_empty(), "partition 1 has events among {EVENTS}");
        assert!(second_sequences.windows(2).all(|pair| pair[0] < pair[1]), "in stream order");
        assert!(first.receiver.is_empty(), "partition 0 is not given its events a second time");

        // One consumer on the server: the one the rewind created.
        let names: Vec<String> = stream.consumer_names().try_collect().await?;
        assert_eq!(names.len(), 1, "the replaced consumer is deleted, not left behind: {names:?}");

        token.cancel();
        reader.await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await;
    stone_kit::testing::cleanup(&config).await;
    stone_kit::testing::rethrow(outcome)
}
