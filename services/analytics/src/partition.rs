//! One partition's projection while this instance holds its lease: take the partition's events
//! from the instance's stream reader ([`crate::feed`]) in stream order, decode them (upcasting old
//! versions), insert them into ClickHouse, and only then advance the checkpoint.
//!
//! Per batch, in this order:
//! 0. the worker takes one of the instance's insert slots (`analytics.insert_concurrency`) and
//!    adds to the batch what arrived while it waited, so a slow ClickHouse receives fewer, larger
//!    inserts rather than one small insert per partition and flush interval;
//! 1. the batch's range is written to the partition state as `pending` (a compare-and-set that
//!    also proves we still own the partition and extends the lease);
//! 2. undecodable events go to DEADLETTER (idempotent: the message id is the stream sequence);
//! 3. rows are inserted per table and day with deterministic deduplication tokens, retried with
//!    backoff for as long as ClickHouse fails;
//! 4. the checkpoint moves to the batch's last sequence and `pending` is cleared (compare-and-set).
//!
//! Nothing is acknowledged: the stream is read by an ordered consumer without acknowledgements,
//! and the checkpoint is the only record of progress. A crash anywhere leaves either nothing or a
//! `pending` range; the next owner subscribes from the checkpoint, re-reads exactly that range and
//! inserts it with the same tokens, so every event lands once in the raw tables and once in every
//! rollup. A paused former owner cannot take anything from the new owner: each instance reads
//! the stream on its own, and the former owner's next write fails its compare-and-set.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, kv};
use stone_events::streams::headers;
use stone_events::{Event, Namespace, decode};
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::feed::{Delivered, Feed, Subscription};
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
    /// The instance's one reader of the stream, shared by its partition workers.
    pub feed: Feed,
    /// Partitions of the stream (all instances together).
    pub partitions: u16,
    /// Name of the projection in deduplication tokens and dead-letter ids (`analytics`).
    pub consumer_prefix: String,
    pub dead_letter_subject: String,
    pub instance_id: String,
    pub batch_max_rows: usize,
    pub batch_max_wait: Duration,
    pub lease_ttl: Duration,
    /// The instance's insert slots (`analytics.insert_concurrency`): a batch is inserted only
    /// while its worker holds one.
    pub inserts: Arc<Semaphore>,
    /// How long an insert may go unanswered before it is abandoned and retried.
    pub insert_timeout: Duration,
}

impl ProjectorContext {
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
    #[error(transparent)]
    State(#[from] StateError),
}

impl StepError {
    fn kind(&self) -> &'static str {
        match self {
            Self::ClickHouse(_) => "clickhouse",
            Self::Nats(_) => "nats",
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
/// How long a batch may wait to fill while its partition is behind. A backlog (a projector
/// catching up after an outage, a restart or a burst) is then written in batches of
/// `analytics.batch_max_rows`: each insert costs ClickHouse a part in the raw table and in every
/// rollup whatever its size, so many small inserts are what keeps a projector behind.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);
/// How long one round of a replay waits for the pending range to be read back.
const REPLAY_WAIT: Duration = Duration::from_secs(1);
/// Rounds after which a pending range that does not come back is an error (the worker starts
/// over from its checkpoint, which makes the reader rewind).
const REPLAY_ROUNDS: u32 = 30;

/// The partition's events from the feed, with what was taken from the channel but not yet put
/// into a batch (at most one batch plus one event).
struct Reader {
    subscription: Subscription,
    buffer: VecDeque<Delivered>,
}

impl Reader {
    async fn open(context: &ProjectorContext, partition: u16, after: u64) -> Result<Self, StepError> {
        let subscription = context.feed.subscribe(partition, after).await.map_err(nats_error)?;
        Ok(Self { subscription, buffer: VecDeque::new() })
    }

    /// Events received but not yet projected: the buffer and the channel.
    fn backlog(&self) -> u64 {
        (self.buffer.len() + self.subscription.receiver.len()) as u64
    }

    /// Moves what the channel holds into the buffer, without waiting, up to `max` buffered.
    fn drain(&mut self, max: usize) -> Result<(), StepError> {
        while self.buffer.len() < max {
            match self.subscription.receiver.try_recv() {
                Ok(delivered) => self.buffer.push_back(delivered),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    return Err(StepError::Nats("the stream reader stopped".to_owned()));
                }
            }
        }
        Ok(())
    }

    /// Waits until something arrives (into the buffer), `deadline` passes or `token` is cancelled.
    async fn receive_until(&mut self, deadline: Instant, token: &CancellationToken) -> Result<(), StepError> {
        let received = tokio::select! {
            received = self.subscription.receiver.recv() => received,
            () = tokio::time::sleep_until(deadline.into()) => return Ok(()),
            () = token.cancelled() => return Ok(()),
        };
        match received {
            Some(delivered) => {
                self.buffer.push_back(delivered);
                Ok(())
            }
            None => Err(StepError::Nats("the stream reader stopped".to_owned())),
        }
    }

    /// Up to `max` events, waiting at most `wait` for more when fewer are there; while the
    /// partition is behind (the stream already holds enough of its events to fill the batch),
    /// waiting up to `catch_up_wait` instead, so a backlog is written in full batches.
    async fn next_batch(
        &mut self,
        max: usize,
        wait: Duration,
        catch_up_wait: Duration,
        partitions: u16,
        token: &CancellationToken,
    ) -> Result<Vec<Delivered>, StepError> {
        let started = Instant::now();
        let mut deadline = started + wait;
        loop {
            self.drain(max)?;
            if self.buffer.len() >= max || token.is_cancelled() {
                break;
            }
            if Instant::now() >= deadline {
                let behind = self.buffer.back().is_some_and(|newest| {
                    // This partition's share of what the stream holds after the newest event
                    // received (event ids, hence partitions, are uniform).
                    let ours = newest.stream_pending / u64::from(partitions.max(1));
                    ours >= (max - self.buffer.len()) as u64
                });
                let longest = started + catch_up_wait.max(wait);
                if !behind || deadline >= longest {
                    break;
                }
                deadline = longest;
                metrics::counter!("stone_analytics_catch_up_waits_total").increment(1);
                continue;
            }
            self.receive_until(deadline, token).await?;
        }
        let take = self.buffer.len().min(max);
        Ok(self.buffer.drain(..take).collect())
    }

    /// Adds to `batch` what arrived since it was taken, up to `max` events in all. The batch and
    /// the buffer are consecutive in stream order, so the batch stays one range.
    fn top_up(&mut self, batch: &mut Vec<Delivered>, max: usize) -> Result<(), StepError> {
        let room = max.saturating_sub(batch.len());
        self.drain(room)?;
        let take = self.buffer.len().min(room);
        batch.extend(self.buffer.drain(..take));
        Ok(())
    }

    /// Buffers every event up to stream sequence `last`; `true` once they all are (the feed has
    /// read past `last`), `false` if `wait` passed first.
    async fn fill_through(&mut self, last: u64, wait: Duration, token: &CancellationToken) -> Result<bool, StepError> {
        let deadline = Instant::now() + wait;
        loop {
            // Read `scanned` before draining: everything it covers is in the channel by then.
            let scanned = self.subscription.scanned();
            self.drain(usize::MAX)?;
            if scanned >= last || self.buffer.back().is_some_and(|delivered| delivered.stream_sequence >= last) {
                return Ok(true);
            }
            if Instant::now() >= deadline || token.is_cancelled() {
                return Ok(false);
            }
            // `scanned` moves without a message for us when other partitions' messages are read.
            let poll = (Instant::now() + Duration::from_millis(20)).min(deadline);
            self.receive_until(poll, token).await?;
        }
    }

    /// Takes the buffered events up to stream sequence `last`.
    fn take_through(&mut self, last: u64) -> Vec<Delivered> {
        let count = self.buffer.iter().take_while(|delivered| delivered.stream_sequence <= last).count();
        self.buffer.drain(..count).collect()
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
        let mut delay = MIN_BACKOFF;
        tracing::info!(
            partition = self.partition,
            epoch = self.current.state.epoch,
            committed_through = self.current.state.committed_through,
            pending = ?self.current.state.pending,
            "partition acquired"
        );
        loop {
            if release.is_cancelled() {
                return self.release().await;
            }
            // The subscription is dropped before backing off, so the reader never waits on a
            // channel nobody empties; the next one starts again from the checkpoint (the reader
            // rewinds for it), rather than reasoning about what the old one had buffered.
            let error = match Reader::open(self.context, self.partition, self.current.state.committed_through).await {
                Ok(mut reader) => match self.work(&mut reader, &mut delay, release).await {
                    Ok(()) => return self.release().await,
                    Err(error) => error,
                },
                Err(error) => error,
            };
            if let Some(exit) = self.failed(&error, &mut delay, release).await {
                return exit;
            }
        }
    }

    /// Batches until released (`Ok`) or a step fails.
    async fn work(
        &mut self,
        reader: &mut Reader,
        delay: &mut Duration,
        release: &CancellationToken,
    ) -> Result<(), StepError> {
        let mut replay_rounds = 0u32;
        loop {
            // Between batches only: a rebuild that is swapping its tables in needs every
            // partition to hold still with nothing in flight.
            self.honor_pause(release).await?;
            if release.is_cancelled() {
                return Ok(());
            }
            match self.current.state.pending {
                Some(pending) => {
                    if self.replay(reader, pending, release).await? {
                        replay_rounds = 0;
                    } else {
                        replay_rounds += 1;
                        if replay_rounds >= REPLAY_ROUNDS {
                            return Err(StepError::Nats(format!(
                                "pending range {}..={} cannot be re-read",
                                pending.first, pending.last
                            )));
                        }
                    }
                }
                None => self.step(reader, release).await?,
            }
            *delay = MIN_BACKOFF;
            if release.is_cancelled() {
                return Ok(());
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
        let lease_lost = matches!(error, StepError::State(StateError::Conflict));
        if release.is_cancelled() && !lease_lost {
            // Shutting down (or handing the partition over): the stream reader stops with
            // everything else, which is not a failure to count or to warn about.
            return Some(self.release().await);
        }
        metrics::counter!("stone_analytics_errors_total", "kind" => error.kind()).increment(1);
        if lease_lost {
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

    /// One batch: read, record the intent, write, commit.
    async fn step(&mut self, reader: &mut Reader, release: &CancellationToken) -> Result<(), StepError> {
        let mut batch = reader
            .next_batch(
                self.context.batch_max_rows,
                self.context.batch_max_wait,
                CATCH_UP_WAIT,
                self.context.partitions,
                release,
            )
            .await?;
        // An empty batch only renews the lease. A batch waits for an insert slot, and what
        // arrived while the slot was busy joins it instead of waiting for the next insert: a slow
        // ClickHouse gets fewer, larger inserts.
        let _slot = if batch.is_empty() {
            None
        } else {
            let Some(slot) = self.insert_slot(release).await? else { return Ok(()) };
            reader.top_up(&mut batch, self.context.batch_max_rows)?;
            Some(slot)
        };
        let backlog = reader.backlog();
        self.project_range(batch, None, backlog, release).await
    }

    /// Waits for one of the instance's insert slots, keeping the lease (and the lag on record)
    /// meanwhile; `None` when the partition is released first.
    async fn insert_slot(&mut self, release: &CancellationToken) -> Result<Option<OwnedSemaphorePermit>, StepError> {
        let started = Instant::now();
        let acquire = Arc::clone(&self.context.inserts).acquire_owned();
        tokio::pin!(acquire);
        loop {
            tokio::select! {
                slot = &mut acquire => {
                    metrics::histogram!("stone_analytics_insert_slot_wait_seconds")
                        .record(started.elapsed().as_secs_f64());
                    // The semaphore is never closed; kept as an error rather than a panic.
                    let slot = slot.map_err(|_| StepError::Nats("the insert slots are closed".to_owned()))?;
                    return Ok(Some(slot));
                }
                () = tokio::time::sleep(self.context.lease_ttl / 3) => self.renew().await?,
                () = release.cancelled() => return Ok(None),
            }
        }
    }

    /// Re-reads the range an earlier attempt recorded as pending and writes it again; `false`
    /// when the range is not complete yet (the worker goes round, honouring a pause, and waits
    /// again with what it has buffered).
    async fn replay(
        &mut self,
        reader: &mut Reader,
        pending: PendingBatch,
        release: &CancellationToken,
    ) -> Result<bool, StepError> {
        let wait = self.context.batch_max_wait.max(REPLAY_WAIT);
        if !reader.fill_through(pending.last, wait, release).await? {
            self.keep_lease().await?;
            return Ok(false);
        }
        if release.is_cancelled() {
            return Ok(true);
        }
        // Events of the range that expired from the stream are simply not there: the feed has
        // read past `last`, so nothing more of the range can arrive.
        let batch = reader.take_through(pending.last);
        tracing::info!(
            partition = self.partition,
            first = pending.first,
            last = pending.last,
            events = batch.len(),
            "replaying pending batch"
        );
        let Some(_slot) = self.insert_slot(release).await? else { return Ok(true) };
        let backlog = reader.backlog();
        self.project_range(batch, Some(pending), backlog, release).await?;
        Ok(true)
    }

    async fn project_range(
        &mut self,
        batch: Vec<Delivered>,
        recorded: Option<PendingBatch>,
        backlog: u64,
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
            // Only what is already committed (cannot come from the feed, which starts after the
            // checkpoint; kept as a guard): move on.
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
        let mut rows = Rows::with_capacity(fresh.len());
        let mut dead_letters = 0u64;
        for delivered in &fresh {
            match decode(&delivered.payload) {
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
            let timeout = self.context.insert_timeout;
            let outcome =
                match tokio::time::timeout(timeout, self.context.sink.insert(self.partition, range, &rows)).await {
                    Ok(outcome) => outcome.map_err(|error| error.to_string()),
                    Err(_) => {
                        // Abandoned, not failed: ClickHouse may still commit it, and the retry's
                        // tokens make that harmless.
                        metrics::counter!("stone_analytics_insert_timeouts_total").increment(1);
                        Err(format!("no answer within {} ms", timeout.as_millis()))
                    }
                };
            match outcome {
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
                    let pending_events = self.pending_estimate(last.stream_pending, backlog) + fresh.len() as u64;
                    self.renew_with_lag(pending_events, behind).await?;
                }
            }
        }

        // 4. Commit.
        let lag = Some((self.pending_estimate(last.stream_pending, backlog), last.published));
        self.commit(Some(last_sequence), fresh.len() as u64, lag).await?;
        metrics::histogram!("stone_analytics_batch_events").record(fresh.len() as f64);
        tracing::debug!(partition = self.partition, events = fresh.len(), "batch committed");
        metrics::counter!("stone_analytics_events_total", "outcome" => "committed")
            .increment(fresh.len() as u64 - dead_letters);
        metrics::counter!("stone_analytics_events_total", "outcome" => "dead_lettered").increment(dead_letters);
        Ok(())
    }

    /// Events of this partition in the stream after the batch: what the worker has received
    /// but not projected, plus this partition's share of what the instance's reader has not
    /// read yet (the reader reads all partitions; event ids, hence partitions, are uniform).
    /// Exact when caught up (zero).
    fn pending_estimate(&self, stream_pending: u64, backlog: u64) -> u64 {
        backlog + stream_pending.div_ceil(u64::from(self.context.partitions.max(1)))
    }

    /// Extends the lease when a third of it has passed, leaving the recorded lag as it is.
    async fn keep_lease(&mut self) -> Result<(), StateError> {
        let third = i64::try_from(self.context.lease_ttl.as_millis() / 3).unwrap_or(i64::MAX);
        if self.current.state.lease_expires_ms - state::now_ms() > 2 * third {
            return Ok(());
        }
        self.renew().await
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

    /// Extends the lease when a third of it has passed. An idle wait found nothing, so the
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
            .header(headers::ORIGINAL_SUBJECT, delivered.subject.as_str())
            .header(headers::ORIGINAL_SEQUENCE, sequence.to_string().as_str())
            .payload(delivered.payload.clone());
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
