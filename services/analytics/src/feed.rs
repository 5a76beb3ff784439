//! One ordered read of the EVENTS stream per projector instance, dispatched to the partition
//! workers this instance runs.
//!
//! Why one reader: on nats-server 2.9 a consumer filtered on one partition
//! (`{ns}.ev.*.*.*.{p}.>`) walks every message of the interleaved stream to find its own, so
//! N partition consumers cost N full scans (measured: 8 filtered consumers together read 7.7x
//! slower than one unfiltered consumer). The feed reads the stream once, through an ordered
//! consumer (ephemeral, no acknowledgements, recreated by the client on any gap), and hands each
//! message to its partition's worker through a bounded channel.
//!
//! The partition checkpoints in the `ANALYTICS` bucket stay the only record of progress: a worker
//! subscribes with its checkpoint, and the feed delivers it exactly the partition's messages after
//! that sequence, in stream order. The feed starts at the lowest sequence any subscriber needs; a
//! subscriber that needs less than the feed has already read (a partition acquired with an older
//! checkpoint, or a worker starting over from its checkpoint after an error) makes the feed
//! rewind: the ordered consumer is recreated at that sequence, and every other subscriber skips
//! what it has already been given. Messages of partitions this instance does not own are skipped.
//!
//! A watchdog guards the read: when the stream holds events after the last one read (the
//! delivery says how many) and the consumer yields nothing for [`STALL_AFTER`] while the reader
//! waits on it, the consumer is recreated at the reader's position, counted in
//! `stone_analytics_feed_stalls_total` and logged. The client's ordered consumer recovers from a
//! silent pull by itself only after two missed idle heartbeats (about 60 s); the projector
//! stood still for about that long in some benchmark runs, with the stream full and ClickHouse
//! idle (docs/benchmarks.md; the cause is not confirmed).
//!
//! Back-pressure: a full channel blocks the reader, so one slow partition (a long insert, a
//! ClickHouse outage, a rebuild pause) holds back the others of this instance. Memory is bounded
//! by the channels: at most `capacity` messages per owned partition are in flight.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self};
use futures::{FutureExt, StreamExt};
use stone_events::subjects::partition_in_subject;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One event for a partition worker, with the numbers it needs from the delivery. Only what the
/// worker reads is kept: a whole `jetstream::Message` (reply subject, headers map, a client
/// handle) is several times larger, and a batch holds tens of thousands of these, moved from the
/// channel to the buffer to the batch.
pub struct Delivered {
    pub subject: async_nats::Subject,
    pub payload: bytes::Bytes,
    pub stream_sequence: u64,
    /// Messages of the whole stream after this one that the feed has not read yet.
    pub stream_pending: u64,
    pub published: OffsetDateTime,
}

/// A partition's share of the feed.
pub struct Subscription {
    pub receiver: mpsc::Receiver<Delivered>,
    /// Every message of the partition with a sequence up to this one (and after the checkpoint
    /// subscribed with) has been put into `receiver`.
    scanned: Arc<AtomicU64>,
}

impl Subscription {
    /// The highest stream sequence the feed has read for this subscription.
    pub fn scanned(&self) -> u64 {
        self.scanned.load(Ordering::Acquire)
    }
}

struct Request {
    partition: u16,
    after: u64,
    sender: mpsc::Sender<Delivered>,
    scanned: Arc<AtomicU64>,
}

/// The handle workers subscribe through.
#[derive(Clone)]
pub struct Feed {
    requests: mpsc::Sender<Request>,
    capacity: usize,
}

/// The feed task has stopped (shutdown).
#[derive(Debug, thiserror::Error)]
#[error("the stream reader has stopped")]
pub struct FeedStopped;

impl Feed {
    /// Creates the handle and the reader task, which runs until `token` is cancelled.
    pub fn new(
        stream: jetstream::stream::Stream,
        filter_subject: String,
        partitions: u16,
        capacity: usize,
        token: CancellationToken,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (requests, receiver) = mpsc::channel(usize::from(partitions).max(1) * 2);
        let reader = Reader {
            stream,
            filter_subject,
            partitions,
            requests: receiver,
            targets: BTreeMap::new(),
            consumer: None,
            consumer_name: None,
            position: 0,
            reopen: false,
            behind: 0,
            waiting_since: None,
            dispatched: metrics::counter!("stone_analytics_feed_events_total"),
        };
        (Self { requests, capacity: capacity.max(1) }, reader.run(token))
    }

    /// The partition's messages after stream sequence `after`, in order. Replaces any earlier
    /// subscription of the partition (whose receiver should be dropped first).
    pub async fn subscribe(&self, partition: u16, after: u64) -> Result<Subscription, FeedStopped> {
        let (sender, receiver) = mpsc::channel(self.capacity);
        let scanned = Arc::new(AtomicU64::new(after));
        let request = Request { partition, after, sender, scanned: Arc::clone(&scanned) };
        self.requests.send(request).await.map_err(|_| FeedStopped)?;
        Ok(Subscription { receiver, scanned })
    }
}

struct Target {
    sender: mpsc::Sender<Delivered>,
    /// The lowest sequence not yet read for this subscriber.
    next: u64,
    scanned: Arc<AtomicU64>,
}

struct Reader {
    stream: jetstream::stream::Stream,
    filter_subject: String,
    partitions: u16,
    requests: mpsc::Receiver<Request>,
    targets: BTreeMap<u16, Target>,
    consumer: Option<pull::Ordered>,
    /// The server's name of the consumer as created (the client renames it when it recreates
    /// it after a gap; then this name is already gone).
    consumer_name: Option<String>,
    /// The sequence the open consumer delivers next.
    position: u64,
    /// A subscriber needs something else than `position`: recreate the consumer.
    reopen: bool,
    /// Events the stream holds after the last one read, as the last delivery (or the
    /// consumer's creation) said; the stall watchdog waits only while this is not zero.
    behind: u64,
    /// When the reader began waiting for the consumer's next delivery; cleared by a delivery
    /// and by closing the consumer. A subscription request handled meanwhile leaves it, so
    /// frequent re-subscriptions cannot keep the stall watchdog from firing.
    waiting_since: Option<Instant>,
    /// Events handed to partition workers (`stone_analytics_feed_events_total`).
    dispatched: metrics::Counter,
}

/// How long the reader waits for the next event while the stream is known to hold more before
/// it recreates the consumer.
pub const STALL_AFTER: Duration = Duration::from_secs(5);

/// When a wait for the consumer that starts at `now` becomes a stall: only while the stream
/// holds events after the last one read (`behind`), [`STALL_AFTER`] later.
fn stall_deadline(behind: u64, now: Instant) -> Option<Instant> {
    (behind > 0).then(|| now + STALL_AFTER)
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Bound on the reader's own calls to the server about its consumer.
const SERVER_CALL: Duration = Duration::from_secs(2);

impl Reader {
    async fn run(mut self, token: CancellationToken) {
        let mut delay = MIN_BACKOFF;
        loop {
            while let Ok(request) = self.requests.try_recv() {
                self.apply(request);
            }
            self.targets.retain(|_, target| !target.sender.is_closed());
            if self.targets.is_empty() {
                // Nothing to read for: close the consumer and wait for a subscriber.
                self.close().await;
                tokio::select! {
                    () = token.cancelled() => return,
                    request = self.requests.recv() => match request {
                        Some(request) => self.apply(request),
                        None => return,
                    },
                }
                continue;
            }
            if self.consumer.is_none() || self.reopen {
                self.close().await;
                let start = self.targets.values().map(|target| target.next).min().unwrap_or(1).max(1);
                match open(&self.stream, &self.filter_subject, start).await {
                    Ok((consumer, name, behind)) => {
                        tracing::debug!(start, behind, consumer = %name, "stream reader positioned");
                        self.consumer = Some(consumer);
                        self.consumer_name = Some(name);
                        self.behind = behind;
                        self.position = start;
                        self.reopen = false;
                        delay = MIN_BACKOFF;
                    }
                    Err(error) => {
                        metrics::counter!("stone_analytics_errors_total", "kind" => "nats").increment(1);
                        tracing::warn!(%error, start, "cannot open the stream reader; retrying");
                        tokio::select! {
                            () = token.cancelled() => return,
                            () = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
            if token.is_cancelled() {
                return;
            }
            let Some(consumer) = self.consumer.as_mut() else { continue };
            // In a backlog the client has the next message buffered: take it without arming the
            // cancellation and request wakers, which costs two lock round trips per message.
            // Requests are still seen at the top of every iteration.
            let next = match consumer.next().now_or_never() {
                Some(next) => next,
                None => {
                    // Only a wait counts: the reader is idle from here on. The clock is read
                    // only when a wait begins, not once per event, and a request handled
                    // during the wait does not start it over.
                    let since = *self.waiting_since.get_or_insert_with(Instant::now);
                    let stall = stall_deadline(self.behind, since);
                    tokio::select! {
                        biased;
                        () = token.cancelled() => return,
                        request = self.requests.recv() => {
                            match request {
                                Some(request) => self.apply(request),
                                None => return,
                            }
                            continue;
                        }
                        next = consumer.next() => next,
                        () = sleep_until(stall) => {
                            metrics::counter!("stone_analytics_feed_stalls_total").increment(1);
                            // What the server says of the consumer tells a client that stopped
                            // asking (no pull request waiting) from a server that stopped sending.
                            let server_view = server_view(&self.stream, self.consumer_name.as_deref()).await;
                            tracing::warn!(
                                position = self.position,
                                behind = self.behind,
                                waited_ms = STALL_AFTER.as_millis() as u64,
                                consumer = %server_view,
                                "stream reader received nothing while the stream holds more; recreating its consumer"
                            );
                            self.close().await;
                            continue;
                        }
                    }
                }
            };
            let message = match next {
                Some(Ok(message)) => {
                    self.waiting_since = None;
                    message
                }
                Some(Err(error)) => {
                    metrics::counter!("stone_analytics_errors_total", "kind" => "nats").increment(1);
                    tracing::warn!(%error, position = self.position, "stream reader failed; reopening");
                    self.close().await;
                    tokio::select! {
                        () = token.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(MAX_BACKOFF);
                    continue;
                }
                None => {
                    self.close().await;
                    continue;
                }
            };
            if !self.dispatch(message, &token).await {
                return;
            }
        }
    }

    /// Hands one message to its partition's subscriber, if any still needs it. `false` when
    /// cancelled while waiting for room.
    async fn dispatch(&mut self, message: jetstream::Message, token: &CancellationToken) -> bool {
        let info = match message.info() {
            Ok(info) => (info.stream_sequence, info.pending, info.published),
            Err(error) => {
                tracing::warn!(%error, subject = %message.subject, "delivery without JetStream metadata; skipped");
                return true;
            }
        };
        let (sequence, stream_pending, published) = info;
        self.position = sequence + 1;
        self.behind = stream_pending;
        let partition = partition_in_subject(&message.subject).filter(|partition| *partition < self.partitions);
        let wanted = partition
            .and_then(|partition| self.targets.get(&partition).map(|target| (partition, target)))
            .filter(|(_, target)| sequence >= target.next);
        if let Some((partition, target)) = wanted {
            let async_nats::Message { subject, payload, .. } = message.message;
            let delivered = Delivered { subject, payload, stream_sequence: sequence, stream_pending, published };
            // Room in the channel is the common case; waiting (with cancellation) only when full.
            let sent = match target.sender.try_send(delivered) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
                Err(mpsc::error::TrySendError::Full(delivered)) => {
                    let sender = target.sender.clone();
                    tokio::select! {
                        biased;
                        () = token.cancelled() => return false,
                        sent = sender.send(delivered) => sent.is_ok(),
                    }
                }
            };
            if sent {
                self.dispatched.increment(1);
            } else {
                // The worker stopped; a new subscription of the partition comes as a request.
                self.targets.remove(&partition);
            }
        }
        for target in self.targets.values_mut() {
            if target.next <= sequence {
                target.next = sequence + 1;
                target.scanned.fetch_max(sequence, Ordering::AcqRel);
            }
        }
        true
    }

    /// Drops the open consumer and deletes it on the server, best effort: an ordered consumer
    /// is ephemeral, but the server would keep it (and what it delivered into the void) until
    /// its inactivity threshold, one more for every rewind.
    async fn close(&mut self) {
        self.consumer = None;
        self.waiting_since = None;
        let Some(name) = self.consumer_name.take() else { return };
        match tokio::time::timeout(SERVER_CALL, self.stream.delete_consumer(&name)).await {
            Ok(Ok(_)) => {}
            // Already gone: the client recreated it under another name after a gap.
            Ok(Err(error)) => tracing::debug!(%error, consumer = %name, "stream reader's consumer not deleted"),
            Err(_) => tracing::debug!(consumer = %name, "no answer to deleting the stream reader's consumer"),
        }
    }

    fn apply(&mut self, request: Request) {
        self.targets.insert(
            request.partition,
            Target { sender: request.sender, next: request.after + 1, scanned: request.scanned },
        );
        // Every subscriber's `next` is at least `position` once it has been read for, so the
        // lowest differs from `position` only when the newcomer needs earlier messages (rewind)
        // or every subscriber is ahead of the consumer (jump instead of reading and skipping).
        let lowest = self.targets.values().map(|target| target.next).min();
        if self.consumer.is_some() && lowest.is_some_and(|lowest| lowest != self.position) {
            self.reopen = true;
        }
    }
}

/// An ordered consumer from stream sequence `start`, its name on the server, and how many
/// events it has to deliver.
async fn open(
    stream: &jetstream::stream::Stream,
    filter_subject: &str,
    start: u64,
) -> anyhow::Result<(pull::Ordered, String, u64)> {
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter_subject.to_owned(),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start },
            ..Default::default()
        })
        .await?;
    let info = consumer.cached_info();
    let (name, behind) = (info.name.clone(), info.num_pending);
    Ok((consumer.messages().await?, name, behind))
}

/// The server's account of the reader's consumer, for the stall warning.
async fn server_view(stream: &jetstream::stream::Stream, name: Option<&str>) -> String {
    let Some(name) = name else { return "unknown".to_owned() };
    match tokio::time::timeout(SERVER_CALL, stream.consumer_info(name)).await {
        Ok(Ok(info)) => format!(
            "{name}: delivered through stream sequence {}, {} pending, {} pull requests waiting",
            info.delivered.stream_sequence, info.num_pending, info.num_waiting
        ),
        Ok(Err(error)) => format!("{name}: {error}"),
        Err(_) => format!("{name}: no answer within {} ms", SERVER_CALL.as_millis()),
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_that_is_caught_up_never_stalls() {
        assert_eq!(stall_deadline(0, Instant::now()), None);
    }

    #[test]
    fn a_reader_behind_stalls_after_the_limit_from_the_start_of_its_wait() {
        let now = Instant::now();
        assert_eq!(stall_deadline(1, now), Some(now + STALL_AFTER));
        assert_eq!(stall_deadline(1_000_000, now), Some(now + STALL_AFTER));
    }
}
