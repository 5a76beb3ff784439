//! Projection rebuilds: the status record every rebuild keeps in the `REBUILDS` key-value bucket
//! (one key per projection), and the [`Tracker`] that writes it.
//!
//! The record is the rebuild's lock (one rebuild per projection at a time), its progress (done,
//! total, rate, ETA; read by `GET /v1/projections`, the SSE progress stream and `stone replay`),
//! and, for the analytics projection, the pause signal: while the phase is `pausing` or
//! `swapping` and `pause_until_ms` lies ahead, live partition workers finish their batch and hold
//! still. The tracker renews `pause_until_ms` every second, so a rebuild that dies releases the
//! live projection within [`PAUSE_LEASE`] on its own.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// Base name of the bucket (per namespace, see `Namespace::bucket_name`).
pub const BUCKET: &str = "REBUILDS";
/// How long a pause outlives the last renewal by its rebuild.
pub const PAUSE_LEASE: Duration = Duration::from_secs(15);
/// A running rebuild whose record was not written for this long is taken to be dead.
pub const STALE_AFTER: Duration = Duration::from_secs(15);
/// How often the tracker writes progress.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// Where a rebuild stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reading the stream into the shadow tables while the live projection runs.
    Building,
    /// The live projection holds still at a batch boundary; the shadow catches up to it exactly.
    Pausing,
    /// The shadow tables are being swapped in.
    Swapping,
    Done,
    Failed,
}

impl Phase {
    pub fn is_running(self) -> bool {
        matches!(self, Self::Building | Self::Pausing | Self::Swapping)
    }
}

/// The record of one rebuild.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct RebuildStatus {
    pub id: String,
    pub projection: String,
    pub phase: Phase,
    /// Who asked for it (the token's name, or `cli`).
    pub actor: String,
    /// First stream sequence replayed; what lies before it was copied from the live projection.
    pub from_seq: u64,
    /// The stream sequence the rebuild reads up to at the moment (it moves while the live
    /// projection advances).
    pub target_seq: u64,
    /// Events read so far.
    pub done: u64,
    /// Events to read in all, as known now.
    pub total: u64,
    /// Events per second since the start.
    pub rate: f64,
    /// Seconds to go at the current rate; absent until there is a rate.
    pub eta_seconds: Option<f64>,
    /// Events that could not be decoded (they are in the dead-letter stream already).
    pub skipped: u64,
    pub started_ms: i64,
    pub updated_ms: i64,
    pub finished_ms: Option<i64>,
    /// While pausing or swapping: the live projection holds still until this time unless renewed.
    pub pause_until_ms: i64,
    pub error: Option<String>,
}

impl Default for RebuildStatus {
    fn default() -> Self {
        Self {
            id: String::new(),
            projection: String::new(),
            phase: Phase::Done,
            actor: String::new(),
            from_seq: 0,
            target_seq: 0,
            done: 0,
            total: 0,
            rate: 0.0,
            eta_seconds: None,
            skipped: 0,
            started_ms: 0,
            updated_ms: 0,
            finished_ms: None,
            pause_until_ms: 0,
            error: None,
        }
    }
}

impl RebuildStatus {
    /// Whether live writers must hold still now.
    pub fn pauses_live(&self, now_ms: i64) -> bool {
        matches!(self.phase, Phase::Pausing | Phase::Swapping) && self.pause_until_ms > now_ms
    }

    /// Whether the rebuild is running and alive (its record is being renewed).
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.phase.is_running() && now_ms - self.updated_ms < millis(STALE_AFTER)
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Opens (creating if needed) the bucket of rebuild records.
pub async fn open(
    js: &jetstream::Context,
    namespace: &stone_events::Namespace,
    replicas: usize,
) -> anyhow::Result<kv::Store> {
    crate::nats::open_kv(
        js,
        &namespace.bucket_name(BUCKET),
        "Proxy Stone projection rebuilds: progress, lock and pause signal",
        Duration::ZERO,
        async_nats::jetstream::stream::StorageType::File,
        replicas,
    )
    .await
}

/// The latest record of a projection's rebuild, if there ever was one.
pub async fn read(store: &kv::Store, projection: &str) -> anyhow::Result<Option<RebuildStatus>> {
    Ok(read_versioned(store, projection).await?.map(|(status, _)| status))
}

async fn read_versioned(store: &kv::Store, projection: &str) -> anyhow::Result<Option<(RebuildStatus, u64)>> {
    let entry = store.entry(projection).await.map_err(|error| anyhow::anyhow!("reading rebuild record: {error}"))?;
    match entry {
        Some(entry) if entry.operation == kv::Operation::Put => {
            let status = serde_json::from_slice(&entry.value)
                .map_err(|error| anyhow::anyhow!("rebuild record of {projection} is not valid: {error}"))?;
            Ok(Some((status, entry.revision)))
        }
        _ => Ok(None),
    }
}

/// Runs a rebuild's work until it ends or `cancel` fires (shutdown), which fails it.
pub async fn until_cancelled<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
    cancel: &CancellationToken,
) -> anyhow::Result<T> {
    tokio::select! {
        outcome = work => outcome,
        () = cancel.cancelled() => Err(anyhow::anyhow!("cancelled (shutdown)")),
    }
}

/// Why a rebuild could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("a rebuild of {projection} is already running (id {id}, phase {phase:?})")]
    AlreadyRunning { projection: String, id: String, phase: Phase },
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

#[derive(Debug)]
struct Inner {
    status: RebuildStatus,
    revision: u64,
    dirty: bool,
    /// Set when the record was changed by someone else: this rebuild no longer owns it.
    lost: bool,
    started: Instant,
}

/// Writes a rebuild's record: progress every half second, phase changes at once, and the pause
/// renewal. Dropping the last clone stops the background writer, so a rebuild task that is
/// cancelled or panics stops renewing its pause and the live projection resumes on its own.
#[derive(Debug, Clone)]
pub struct Tracker {
    writer: Writer,
    _stop_on_drop: Arc<tokio_util::sync::DropGuard>,
}

/// The record writer behind a [`Tracker`].
#[derive(Debug, Clone)]
pub struct Writer {
    store: kv::Store,
    key: String,
    inner: Arc<Mutex<Inner>>,
    /// One write at a time: each write is a compare-and-set on the revision the previous one
    /// returned, so two concurrent writes would fail each other.
    writing: Arc<tokio::sync::Mutex<()>>,
    stop: CancellationToken,
}

impl std::ops::Deref for Tracker {
    type Target = Writer;
    fn deref(&self) -> &Writer {
        &self.writer
    }
}

impl Tracker {
    /// Claims the projection's record for a new rebuild: fails while another one is alive.
    pub async fn start(store: kv::Store, projection: &str, actor: &str, from_seq: u64) -> Result<Self, StartError> {
        let now = now_ms();
        let status = RebuildStatus {
            id: uuid::Uuid::now_v7().to_string(),
            projection: projection.to_owned(),
            phase: Phase::Building,
            actor: actor.to_owned(),
            from_seq,
            started_ms: now,
            updated_ms: now,
            ..RebuildStatus::default()
        };
        let value = Bytes::from(serde_json::to_vec(&status).map_err(anyhow::Error::from)?);
        let revision = match read_versioned(&store, projection).await? {
            Some((current, _)) if current.is_live(now) => {
                return Err(StartError::AlreadyRunning {
                    projection: projection.to_owned(),
                    id: current.id,
                    phase: current.phase,
                });
            }
            Some((_, revision)) => store.update(projection, value, revision).await.map_err(|error| {
                anyhow::anyhow!("another rebuild of {projection} started at the same moment: {error}")
            })?,
            None => store.create(projection, value).await.map_err(|error| {
                anyhow::anyhow!("another rebuild of {projection} started at the same moment: {error}")
            })?,
        };
        let stop = CancellationToken::new();
        let writer = Writer {
            store,
            key: projection.to_owned(),
            inner: Arc::new(Mutex::new(Inner { status, revision, dirty: false, lost: false, started: Instant::now() })),
            writing: Arc::new(tokio::sync::Mutex::new(())),
            stop: stop.clone(),
        };
        tokio::spawn(writer.clone().flush_loop());
        Ok(Self { writer, _stop_on_drop: Arc::new(stop.drop_guard()) })
    }
}

impl Writer {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The record as it stands.
    pub fn status(&self) -> RebuildStatus {
        self.lock().status.clone()
    }

    /// Fails when the record was taken over (this rebuild was presumed dead): stop at once.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.lock().lost {
            anyhow::bail!("the rebuild record was taken over by another rebuild; stopping");
        }
        Ok(())
    }

    /// Records where the replay starts.
    pub fn set_from_seq(&self, from_seq: u64) {
        let mut inner = self.lock();
        inner.status.from_seq = from_seq;
        inner.dirty = true;
    }

    /// Records progress (written within half a second).
    pub fn progress(&self, done: u64, total: u64, target_seq: u64, skipped: u64) {
        let mut inner = self.lock();
        let elapsed = inner.started.elapsed().as_secs_f64().max(1e-3);
        let status = &mut inner.status;
        status.done = done;
        status.total = total.max(done);
        status.target_seq = target_seq;
        status.skipped = skipped;
        status.rate = done as f64 / elapsed;
        status.eta_seconds = (status.rate > 0.0).then(|| (status.total.saturating_sub(done)) as f64 / status.rate);
        inner.dirty = true;
    }

    /// Moves to `phase` and writes the record now.
    pub async fn phase(&self, phase: Phase) -> anyhow::Result<()> {
        {
            let mut inner = self.lock();
            inner.status.phase = phase;
            if matches!(phase, Phase::Pausing | Phase::Swapping) {
                inner.status.pause_until_ms = now_ms() + millis(PAUSE_LEASE);
            }
            inner.dirty = true;
        }
        self.flush().await
    }

    /// Records `outcome` as the rebuild's end (logging a failure) and hands it back.
    pub async fn settle<T>(&self, outcome: anyhow::Result<T>) -> anyhow::Result<T> {
        let recorded = outcome.as_ref().map(|_| ()).map_err(|error| anyhow::anyhow!("{error:#}"));
        if let Err(error) = self.finish(&recorded).await {
            tracing::warn!(%error, "cannot record the rebuild's outcome");
        }
        if let Err(error) = &outcome {
            tracing::warn!(projection = %self.key, error = %format!("{error:#}"), "rebuild failed");
        }
        outcome
    }

    /// Ends the rebuild: `Done`, or `Failed` with the error. Lifts any pause.
    pub async fn finish(&self, outcome: &anyhow::Result<()>) -> anyhow::Result<()> {
        {
            let mut inner = self.lock();
            let elapsed = inner.started.elapsed().as_secs_f64().max(1e-3);
            let status = &mut inner.status;
            status.phase = if outcome.is_ok() { Phase::Done } else { Phase::Failed };
            status.error = outcome.as_ref().err().map(|error| format!("{error:#}"));
            status.pause_until_ms = 0;
            status.finished_ms = Some(now_ms());
            status.eta_seconds = outcome.is_ok().then_some(0.0);
            status.rate = status.done as f64 / elapsed;
            if outcome.is_ok() {
                status.total = status.done;
            }
            inner.dirty = true;
        }
        let written = self.flush().await;
        self.stop.cancel();
        written
    }

    async fn flush_loop(self) {
        let mut ticker = tokio::time::interval(FLUSH_EVERY);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = self.stop.cancelled() => return,
            }
            if let Err(error) = self.flush().await {
                tracing::warn!(%error, projection = %self.key, "cannot write rebuild progress");
            }
        }
    }

    /// Writes the record (renewing the pause while pausing or swapping).
    async fn flush(&self) -> anyhow::Result<()> {
        let _writing = self.writing.lock().await;
        let (value, revision) = {
            let mut inner = self.lock();
            if inner.lost {
                anyhow::bail!("the rebuild record was taken over");
            }
            let now = now_ms();
            if matches!(inner.status.phase, Phase::Pausing | Phase::Swapping) {
                inner.status.pause_until_ms = now + millis(PAUSE_LEASE);
            }
            inner.status.updated_ms = now;
            inner.dirty = false;
            (Bytes::from(serde_json::to_vec(&inner.status)?), inner.revision)
        };
        match self.store.update(&self.key, value, revision).await {
            Ok(revision) => {
                self.lock().revision = revision;
                Ok(())
            }
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                self.lock().lost = true;
                anyhow::bail!("the rebuild record was taken over")
            }
            Err(error) => {
                self.lock().dirty = true;
                Err(anyhow::anyhow!("writing rebuild record: {error}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_fresh_running_record_pauses_or_counts_as_live() {
        let status =
            RebuildStatus { phase: Phase::Pausing, pause_until_ms: 2_000, updated_ms: 1_000, ..Default::default() };
        assert!(status.pauses_live(1_999));
        assert!(!status.pauses_live(2_000));
        assert!(status.is_live(1_000 + millis(STALE_AFTER) - 1));
        assert!(!status.is_live(1_000 + millis(STALE_AFTER)));
        let done = RebuildStatus { phase: Phase::Done, pause_until_ms: 9_000, updated_ms: 1_000, ..Default::default() };
        assert!(!done.pauses_live(1_500));
        assert!(!done.is_live(1_500));
    }
}
