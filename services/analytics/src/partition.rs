//! One partition's projection while this instance holds its lease: read the partition's events
//! in stream order, decode them (upcasting old versions), insert them into ClickHouse, and only
//! then advance the checkpoint and acknowledge.
//!
//! Per batch, in this order:
//! 1. the batch's range is written to the partition state as `pending` (a compare-and-set that
//!    also proves we still own the partition and extends the lease);
//! 2. undecodable events go to DEADLETTER (idempotent: the message id is the stream sequence);
//! 3. rows are inserted per table and day with deterministic deduplication tokens, retried with
//!    backoff for as long as ClickHouse fails;
//! 4. the checkpoint moves to the batch's last sequence and `pending` is cleared (compare-and-set);
//! 5. the last message is acknowledged, which acknowledges the whole batch (`AckPolicy::All`).
//!
//! A crash anywhere leaves either nothing or a `pending` range; the next owner re-reads exactly
//! that range from the stream and inserts it with the same tokens, so every event lands once in
//! the raw tables and once in every rollup. Each ownership epoch reads through its own durable
//! consumer, so a paused former owner cannot pull (and strand) messages the new owner needs.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use stone_events::streams::headers;
use stone_events::{Event, Namespace, decode};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::rows::{CacheRow, HealthRow, RequestRow, Rows};
use crate::sink::Sink;
use crate::state::{self, PendingBatch, StateError, Versioned};

/// What every partition worker of one projector shares.
pub struct ProjectorContext {
    pub js: jetstream::Context,
    pub stream: jetstream::stream::Stream,
    pub store: kv::Store,
    /// Rebuild records (`stone_kit::rebuild`): a rebuild of this projection pauses the workers.
    pub rebuilds: kv::Store,
    pub sink: Sink,
    pub namespace: Namespace,
    pub stream_name: String,
    /// Durable consumer name prefix (`analytics`).
    pub consumer_prefix: String,
    pub dead_letter_subject: String,
    pub instance_id: String,
    pub batch_max_rows: usize,
    pub batch_max_wait: Duration,
    pub lease_ttl: Duration,
}

impl ProjectorContext {
    /// The consumer of one ownership epoch of a partition.
    pub fn consumer_name(&self, partition: u16, epoch: u64) -> String {
        format!("{}-p{partition}-e{epoch}", self.consumer_prefix)
    }

    fn lease_expiry(&self) -> i64 {
        state::now_ms().saturating_add(i64::try_from(self.lease_ttl.as_millis()).unwrap_or(i64::MAX))
    }
}

/// Why a worker stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Asked to (rebalance or shutdown); the lease was released.
    Released,
    /// Another instance owns the partition now.
    LeaseLost,
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("nats: {0}")]
    Nats(String),
    /// A delivery was skipped (consumer sequence jumped): the buffer cannot be trusted to be
    /// the partition's events in order, so the consumer is recreated from the checkpoint.
    #[error("delivery gap: consumer sequence {expected} expected, {got} received")]
    Gap { expected: u64, got: u64 },
    #[error(transparent)]
    State(#[from] StateError),
}

impl StepError {
    fn kind(&self) -> &'static str {
        match self {
            Self::ClickHouse(_) => "clickhouse",
            Self::Nats(_) => "nats",
            Self::Gap { .. } => "gap",
            Self::State(StateError::Conflict) => "lease_lost",
            Self::State(_) => "state",
        }
    }
}

fn nats_error(error: impl std::fmt::Display) -> StepError {
    StepError::Nats(error.to_string())
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// How often a paused worker looks whether the rebuild is over.
const PAUSE_POLL: Duration = Duration::from_millis(200);
/// The key of this projection's rebuild record.
pub const REBUILD_KEY: &str = "analytics";
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A delivered message with the numbers we need from its reply subject.
struct Delivered {
    message: jetstream::Message,
    stream_sequence: u64,
    pending: u64,
    published: OffsetDateTime,
}

/// Reads one partition in stream order through one durable consumer, keeping messages delivered
/// beyond the current batch for the next one (dropping them would leave them unacknowledged
/// below a later acknowledgement, which `AckPolicy::All` would then acknowledge unread).
struct Reader {
    consumer: PullConsumer,
    buffer: VecDeque<Delivered>,
    last_consumer_sequence: Option<u64>,
}

impl Reader {
    async fn open(context: &ProjectorContext, name: &str, partition: u16, after: u64) -> Result<Self, StepError> {
        // A consumer of this name can only be left over from an earlier attempt of this very
        // epoch; starting over at the checkpoint is always right.
        let _ = context.stream.delete_consumer(name).await;
        let consumer = context
            .stream
            .create_consumer(pull::Config {
                durable_name: Some(name.to_owned()),
                description: Some(format!("analytics projector, partition {partition}")),
                filter_subject: context.namespace.partition_filter(partition),
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: after + 1 },
                ack_policy: AckPolicy::All,
                ack_wait: Duration::from_secs(300),
                max_ack_pending: i64::try_from(context.batch_max_rows.saturating_mul(4)).unwrap_or(i64::MAX),
                // Consumers of past epochs disappear on their own once nobody pulls.
                inactive_threshold: Duration::from_secs(600),
                ..Default::default()
            })
            .await
            .map_err(|error| StepError::Nats(format!("cannot create consumer {name}: {error}")))?;
        Ok(Self { consumer, buffer: VecDeque::new(), last_consumer_sequence: None })
    }

    /// Up to `max` messages, waiting at most `wait` for more when the buffer has too few;
    /// with `through`, only messages up to that stream sequence.
    async fn next_batch(
        &mut self,
        max: usize,
        wait: Duration,
        through: Option<u64>,
        token: &CancellationToken,
    ) -> Result<Vec<Delivered>, StepError> {
        let within = |delivered: &Delivered| through.is_none_or(|last| delivered.stream_sequence <= last);
        let buffered_enough = self.buffer.len() >= max || self.buffer.back().is_some_and(|last| !within(last));
        if !buffered_enough {
            self.fetch(max.saturating_sub(self.buffer.len()).max(1), wait, token).await?;
        }
        let mut batch = Vec::new();
        while batch.len() < max && self.buffer.front().is_some_and(within) {
            if let Some(delivered) = self.buffer.pop_front() {
                batch.push(delivered);
            }
        }
        Ok(batch)
    }

    async fn fetch(&mut self, max: usize, wait: Duration, token: &CancellationToken) -> Result<(), StepError> {
        let mut messages =
            self.consumer.batch().max_messages(max).expires(wait).messages().await.map_err(nats_error)?;
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                () = token.cancelled() => return Ok(()),
            };
            let Some(message) = next else { return Ok(()) };
            let message = message.map_err(nats_error)?;
            let info = message.info().map_err(nats_error)?;
            let (stream_sequence, consumer_sequence, pending, published) =
                (info.stream_sequence, info.consumer_sequence, info.pending, info.published);
            if let Some(previous) = self.last_consumer_sequence
                && consumer_sequence != previous + 1
            {
                return Err(StepError::Gap { expected: previous + 1, got: consumer_sequence });
            }
            self.last_consumer_sequence = Some(consumer_sequence);
            self.buffer.push_back(Delivered { message, stream_sequence, pending, published });
        }
    }
}

/// One partition worker: what it owns and where it stands.
struct Worker<'a> {
    context: &'a ProjectorContext,
    partition: u16,
    key: String,
    current: Versioned,
    label: String,
}

/// Runs one partition until `release` is cancelled (rebalance or shutdown) or the lease is lost.
pub async fn run(context: Arc<ProjectorContext>, partition: u16, lease: Versioned, release: CancellationToken) -> Exit {
    let mut worker = Worker {
        context: &context,
        partition,
        key: state::partition_key(partition),
        current: lease,
        label: partition.to_string(),
    };
    metrics::gauge!("stone_analytics_partitions_owned").increment(1.0);
    let exit = worker.run(&release).await;
    metrics::gauge!("stone_analytics_partitions_owned").decrement(1.0);
    tracing::info!(partition, ?exit, "partition worker stopped");
    exit
}

impl Worker<'_> {
    async fn run(&mut self, release: &CancellationToken) -> Exit {
        let epoch = self.current.state.epoch;
        let consumer_name = self.context.consumer_name(self.partition, epoch);
        if epoch > 1 {
            // The previous owner's consumer; it would expire anyway, this only tidies sooner.
            let _ = self.context.stream.delete_consumer(&self.context.consumer_name(self.partition, epoch - 1)).await;
        }
        let mut delay = MIN_BACKOFF;
        tracing::info!(
            partition = self.partition,
            epoch,
            committed_through = self.current.state.committed_through,
            pending = ?self.current.state.pending,
            "partition acquired"
        );
        'reopen: loop {
            if release.is_cancelled() {
                return self.release().await;
            }
            let mut reader =
                match Reader::open(self.context, &consumer_name, self.partition, self.current.state.committed_through)
                    .await
                {
                    Ok(reader) => reader,
                    Err(error) => {
                        if let Some(exit) = self.failed(&error, &mut delay, release).await {
                            return exit;
                        }
                        continue 'reopen;
                    }
                };
            loop {
                // Between batches only: a rebuild that is swapping its tables in needs every
                // partition to hold still with nothing in flight.
                if let Err(error) = self.honor_pause(release).await {
                    if let Some(exit) = self.failed(&error, &mut delay, release).await {
                        return exit;
                    }
                    continue 'reopen;
                }
                if release.is_cancelled() {
                    return self.release().await;
                }
                let outcome = match self.current.state.pending {
                    Some(pending) => self.replay(&mut reader, pending, release).await,
                    None => self.step(&mut reader, release).await,
                };
                match outcome {
                    Ok(()) => delay = MIN_BACKOFF,
                    Err(error) => {
                        if let Some(exit) = self.failed(&error, &mut delay, release).await {
                            return exit;
                        }
                        // Delivered but unprocessed messages are in the old reader's buffer:
                        // start over from the checkpoint rather than reason about them.
                        continue 'reopen;
                    }
                }
                if release.is_cancelled() {
                    return self.release().await;
                }
            }
        }
    }

    /// The analytics rebuild that asks live writers to hold still now, if any.
    async fn active_pause(&self) -> Result<Option<String>, StepError> {
        let entry = self.context.rebuilds.get(REBUILD_KEY).await.map_err(nats_error)?;
        let Some(value) = entry else { return Ok(None) };
        let status: stone_kit::rebuild::RebuildStatus = match serde_json::from_slice(&value) {
            Ok(status) => status,
            Err(error) => {
                tracing::warn!(%error, "unreadable rebuild record; not pausing");
                return Ok(None);
            }
        };
        Ok(status.pauses_live(state::now_ms()).then_some(status.id))
    }

    /// Holds still while a rebuild asks for it: records `paused_by` (so the rebuild knows this
    /// partition's checkpoint is final), keeps the lease, and clears the mark when the pause ends.
    async fn honor_pause(&mut self, release: &CancellationToken) -> Result<(), StepError> {
        let mut pause = self.active_pause().await?;
        if pause.is_none() && self.current.state.paused_by.is_empty() {
            return Ok(());
        }
        while let Some(id) = pause {
            if self.current.state.paused_by != id {
                let mut next = self.current.state.clone();
                next.paused_by = id.clone();
                next.lease_expires_ms = self.context.lease_expiry();
                self.current = state::write(&self.context.store, &self.key, &self.current, next).await?;
                tracing::info!(partition = self.partition, rebuild = %id, "paused for a rebuild");
            }
            tokio::select! {
                () = tokio::time::sleep(PAUSE_POLL) => {}
                () = release.cancelled() => return Ok(()),
            }
            self.renew_if_due().await?;
            pause = self.active_pause().await?;
        }
        let mut next = self.current.state.clone();
        next.paused_by.clear();
        next.lease_expires_ms = self.context.lease_expiry();
        self.current = state::write(&self.context.store, &self.key, &self.current, next).await?;
        tracing::info!(partition = self.partition, "resumed after a rebuild");
        Ok(())
    }

    /// Counts and logs a failure and backs off; `Some` when the worker must stop.
    async fn failed(&mut self, error: &StepError, delay: &mut Duration, release: &CancellationToken) -> Option<Exit> {
        metrics::counter!("stone_analytics_errors_total", "kind" => error.kind()).increment(1);
        if matches!(error, StepError::State(StateError::Conflict)) {
            tracing::warn!(partition = self.partition, "lease lost to another instance");
            return Some(Exit::LeaseLost);
        }
        tracing::warn!(partition = self.partition, %error, "projection step failed; backing off");
        tokio::select! {
            () = tokio::time::sleep(*delay) => {}
            () = release.cancelled() => return Some(self.release().await),
        }
        *delay = (*delay * 2).min(MAX_BACKOFF);
        // Keep the lease alive while a dependency is down, or another instance would take
        // over only to hit the same outage.
        match self.renew().await {
            Err(StateError::Conflict) => Some(Exit::LeaseLost),
            _ => None,
        }
    }

    /// One batch: read, record the intent, write, commit, acknowledge.
    async fn step(&mut self, reader: &mut Reader, release: &CancellationToken) -> Result<(), StepError> {
        let batch = reader.next_batch(self.context.batch_max_rows, self.context.batch_max_wait, None, release).await?;
        self.project(batch, release).await
    }

    /// Re-reads the range an earlier attempt recorded as pending and writes it again.
    async fn replay(
        &mut self,
        reader: &mut Reader,
        pending: PendingBatch,
        release: &CancellationToken,
    ) -> Result<(), StepError> {
        let mut batch: Vec<Delivered> = Vec::new();
        let mut idle_fetches = 0;
        while batch.last().is_none_or(|last| last.stream_sequence < pending.last) && !release.is_cancelled() {
            let more = reader
                .next_batch(self.context.batch_max_rows, self.context.batch_max_wait, Some(pending.last), release)
                .await?;
            if more.is_empty() {
                idle_fetches += 1;
                // The range's tail is gone (expired from the stream, or only skipped sequences
                // of other partitions remain): nothing more of it can ever arrive.
                if idle_fetches >= 10 && reader.buffer.front().is_some_and(|next| next.stream_sequence > pending.last) {
                    break;
                }
                if idle_fetches >= 50 {
                    return Err(StepError::Nats(format!(
                        "pending range {}..={} cannot be re-read",
                        pending.first, pending.last
                    )));
                }
            }
            batch.extend(more);
        }
        if release.is_cancelled() {
            return Ok(());
        }
        tracing::info!(
            partition = self.partition,
            first = pending.first,
            last = pending.last,
            events = batch.len(),
            "replaying pending batch"
        );
        self.project_range(batch, Some(pending), release).await
    }

    async fn project(&mut self, batch: Vec<Delivered>, release: &CancellationToken) -> Result<(), StepError> {
        self.project_range(batch, None, release).await
    }

    async fn project_range(
        &mut self,
        batch: Vec<Delivered>,
        recorded: Option<PendingBatch>,
        release: &CancellationToken,
    ) -> Result<(), StepError> {
        let committed = self.current.state.committed_through;
        let Some(last) = batch.last() else {
            if recorded.is_some() {
                // Nothing of the recorded range exists any more; clear it.
                return self.commit(None, 0, None).await;
            }
            return self.renew_if_due().await;
        };
        let last_sequence = last.stream_sequence;
        let fresh: Vec<&Delivered> = batch.iter().filter(|delivered| delivered.stream_sequence > committed).collect();
        let Some(first) = fresh.first() else {
            // Only redeliveries of what is already committed: acknowledge them and move on.
            let _ = last.message.ack().await;
            metrics::counter!("stone_analytics_events_total", "outcome" => "skipped").increment(batch.len() as u64);
            return self.renew_if_due().await;
        };
        let range = recorded.unwrap_or(PendingBatch { first: first.stream_sequence, last: last_sequence });

        // 1. Intent, fenced by the lease.
        if recorded.is_none() {
            let mut next = self.current.state.clone();
            next.pending = Some(range);
            next.lease_expires_ms = self.context.lease_expiry();
            self.current = state::write(&self.context.store, &self.key, &self.current, next).await?;
        }

        // 2. Decode; park what cannot be decoded.
        let mut rows = Rows::default();
        let mut dead_letters = 0u64;
        for delivered in &fresh {
            match decode(&delivered.message.payload) {
                Ok(event) => push_event(&mut rows, event, self.partition, delivered.stream_sequence),
                Err(error) => {
                    self.dead_letter(delivered, &error).await?;
                    dead_letters += 1;
                }
            }
        }

        // 3. Insert until ClickHouse takes it, renewing the lease meanwhile.
        let mut delay = MIN_BACKOFF;
        loop {
            match self.context.sink.insert(self.partition, range, &rows).await {
                Ok(()) => break,
                Err(error) => {
                    metrics::counter!("stone_analytics_errors_total", "kind" => "clickhouse").increment(1);
                    tracing::warn!(partition = self.partition, %error, "insert failed; retrying the same batch");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        // Leave the range pending: the next owner finishes it with the same tokens.
                        () = release.cancelled() => return Ok(()),
                    }
                    delay = (delay * 2).min(MAX_BACKOFF);
                    // Stalled: everything from this batch on is behind, and says so.
                    let behind = (OffsetDateTime::now_utc() - first.published).as_seconds_f64().max(0.0);
                    self.renew_with_lag(last.pending + fresh.len() as u64, behind).await?;
                }
            }
        }

        // 4. Commit, 5. acknowledge.
        let lag = Some((last.pending, last.published));
        self.commit(Some(last_sequence), fresh.len() as u64, lag).await?;
        if let Err(error) = last.message.ack().await {
            // The checkpoint is what counts; a lost ack only means redelivery, which is skipped.
            tracing::debug!(partition = self.partition, %error, "ack failed");
        }
        metrics::counter!("stone_analytics_events_total", "outcome" => "committed")
            .increment(fresh.len() as u64 - dead_letters);
        metrics::counter!("stone_analytics_events_total", "outcome" => "dead_lettered").increment(dead_letters);
        Ok(())
    }

    /// Moves the checkpoint (when `through` is given) and clears `pending`.
    async fn commit(
        &mut self,
        through: Option<u64>,
        events: u64,
        lag: Option<(u64, OffsetDateTime)>,
    ) -> Result<(), StepError> {
        let mut next = self.current.state.clone();
        if let Some(through) = through {
            next.committed_through = next.committed_through.max(through);
        }
        next.pending = None;
        next.committed_events += events;
        next.lease_expires_ms = self.context.lease_expiry();
        if let Some((pending_events, published)) = lag {
            next.pending_events = pending_events;
            next.seconds_behind = if pending_events == 0 {
                0.0
            } else {
                (OffsetDateTime::now_utc() - published).as_seconds_f64().max(0.0)
            };
        }
        self.current = state::write(&self.context.store, &self.key, &self.current, next).await?;
        self.publish_lag();
        Ok(())
    }

    fn publish_lag(&self) {
        metrics::gauge!("stone_analytics_pending_events", "partition" => self.label.clone())
            .set(self.current.state.pending_events as f64);
        metrics::gauge!("stone_analytics_lag_seconds", "partition" => self.label.clone())
            .set(self.current.state.seconds_behind);
    }

    /// Extends the lease when a third of it has passed. An idle fetch found nothing, so the
    /// partition is caught up.
    async fn renew_if_due(&mut self) -> Result<(), StepError> {
        let third = i64::try_from(self.context.lease_ttl.as_millis() / 3).unwrap_or(i64::MAX);
        let lag_recorded = self.current.state.pending_events != 0 || self.current.state.seconds_behind != 0.0;
        if self.current.state.lease_expires_ms - state::now_ms() > 2 * third && !lag_recorded {
            return Ok(());
        }
        let mut next = self.current.state.clone();
        next.lease_expires_ms = self.context.lease_expiry();
        next.pending_events = 0;
        next.seconds_behind = 0.0;
        self.current = state::write(&self.context.store, &self.key, &self.current, next).await?;
        self.publish_lag();
        Ok(())
    }

    async fn renew(&mut self) -> Result<(), StateError> {
        let mut next = self.current.state.clone();
        next.lease_expires_ms = self.context.lease_expiry();
        self.current = state::write(&self.context.store, &self.key, &self.current, next).await?;
        Ok(())
    }

    /// Extends the lease and records the lag while a batch cannot be written.
    async fn renew_with_lag(&mut self, pending_events: u64, seconds_behind: f64) -> Result<(), StateError> {
        let mut next = self.current.state.clone();
        next.lease_expires_ms = self.context.lease_expiry();
        next.pending_events = pending_events;
        next.seconds_behind = seconds_behind;
        self.current = state::write(&self.context.store, &self.key, &self.current, next).await?;
        self.publish_lag();
        Ok(())
    }

    /// Gives the partition up, keeping the checkpoint and any pending range for the next owner.
    async fn release(&mut self) -> Exit {
        let mut next = self.current.state.clone();
        next.owner.clear();
        next.lease_expires_ms = 0;
        match state::write(&self.context.store, &self.key, &self.current, next).await {
            Ok(versioned) => {
                self.current = versioned;
                Exit::Released
            }
            Err(StateError::Conflict) => Exit::LeaseLost,
            Err(error) => {
                // The lease simply expires instead.
                tracing::warn!(partition = self.partition, %error, "cannot release lease");
                Exit::Released
            }
        }
    }

    /// Parks an event that can never be decoded, with the reason, so the partition moves on.
    /// The message id makes a replayed batch's dead letters duplicates JetStream drops.
    async fn dead_letter(&self, delivered: &Delivered, error: &stone_events::DecodeError) -> Result<(), StepError> {
        let reason = error.to_string();
        let sequence = delivered.stream_sequence;
        let publish = PublishMessage::build()
            .message_id(format!("{}-{}-{sequence}", self.context.stream_name, self.context.consumer_prefix))
            .header(headers::DEAD_LETTER_REASON, reason.as_str())
            .header(headers::ORIGINAL_SUBJECT, delivered.message.subject.as_str())
            .header(headers::ORIGINAL_SEQUENCE, sequence.to_string().as_str())
            .payload(delivered.message.payload.clone());
        let ack = self
            .context
            .js
            .send_publish(self.context.dead_letter_subject.clone(), publish)
            .await
            .map_err(nats_error)?;
        ack.await.map_err(nats_error)?;
        metrics::counter!("stone_analytics_dead_letters_total", "reason" => error.reason_code()).increment(1);
        tracing::warn!(partition = self.partition, sequence, reason = %reason, "event sent to the dead-letter stream");
        Ok(())
    }
}

/// Adds a decoded event to the rows of its table. Config events never travel on EVENTS.
pub(crate) fn push_event(rows: &mut Rows, event: Event, partition: u16, sequence: u64) {
    match event {
        Event::RequestCompleted(envelope) => rows.push_request(RequestRow::new(envelope, partition, sequence)),
        Event::Cache(envelope) => rows.push_cache(CacheRow::new(envelope, partition, sequence)),
        Event::TargetHealth(envelope) => rows.push_health(HealthRow::target(envelope, partition, sequence)),
        Event::WorkerHeartbeat(envelope) => rows.push_health(HealthRow::heartbeat(envelope, partition, sequence)),
        Event::EventsLost(envelope) => rows.push_health(HealthRow::events_lost(envelope, partition, sequence)),
        Event::Config(_) => {}
    }
}
