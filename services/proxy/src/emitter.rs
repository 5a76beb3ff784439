//! Event emission that never waits on NATS: requests hand encoded events to a bounded queue and
//! return; one publisher task pipelines them to JetStream with `Nats-Msg-Id` set to the event id.
//!
//! Confirmation by barrier: asking JetStream to acknowledge every message doubles what
//! nats-server spends per event (measured: 11-14 µs with a reply subject against 6-8 µs
//! without) and costs the worker a reply subscription, a timer and a future per event. So the
//! publisher sends events as plain publishes and asks for an acknowledgement only on the last
//! event of each drained batch (at most every [`BARRIER_EVERY`] events). A stream stores one
//! connection's messages in the order they arrive, so a barrier's acknowledgement confirms every
//! event sent before it. Events stay in memory until a barrier confirms them; if a barrier fails
//! or is not acknowledged in time, every unconfirmed event goes to the spool, in order, and is
//! published again from there with one acknowledgement each. Some of them may already be stored:
//! the stream's duplicate window drops those by their `Nats-Msg-Id`, so nothing is stored twice.
//!
//! When NATS is unreachable (the client is disconnected, or a publish is not acknowledged in
//! time) the publisher switches to the disk [`Spool`]: from then on every event is appended
//! there, and the spool is published oldest first once NATS answers again, before the publisher
//! goes back to publishing directly. Whatever cannot be kept (memory queue full, spool full) is
//! dropped, counted in `stone_events_dropped_total{reason}`, and reported by a
//! `health.events_lost` event once publishing works again. At shutdown, what is still queued
//! goes to the spool, so a worker stopped with SIGTERM loses nothing it held.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use stone_events::health::EventsLost;
use stone_events::streams::headers;
use stone_events::{Envelope, EventData, Namespace};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::spool::{Spool, SpoolError};

/// One encoded event waiting to be published.
#[derive(Debug)]
pub struct OutgoingEvent {
    pub subject: String,
    pub id: String,
    pub event_type: Cow<'static, str>,
    pub version: u32,
    pub payload: Bytes,
}

/// Losses of one kind since the last report.
#[derive(Debug)]
struct LossLedger {
    reason: &'static str,
    dropped: AtomicU64,
    first_micros: AtomicU64,
    last_micros: AtomicU64,
}

impl LossLedger {
    fn new(reason: &'static str) -> Self {
        Self { reason, dropped: AtomicU64::new(0), first_micros: AtomicU64::new(0), last_micros: AtomicU64::new(0) }
    }

    fn record(&self) {
        metrics::counter!("stone_events_dropped_total", "reason" => self.reason).increment(1);
        let now = u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000).unwrap_or(0);
        let _ = self.first_micros.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        self.last_micros.store(now, Ordering::Relaxed);
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the pending loss report, if there is one.
    fn take(&self, worker: &str) -> Option<EventsLost> {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped == 0 {
            return None;
        }
        let format = |micros: u64| {
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
                .map(stone_events::timestamp::format)
                .unwrap_or_default()
        };
        let first = self.first_micros.swap(0, Ordering::Relaxed);
        let last = self.last_micros.load(Ordering::Relaxed);
        Some(EventsLost {
            worker: worker.to_owned(),
            dropped,
            reason: self.reason.to_owned(),
            first_at: format(first),
            last_at: format(last),
        })
    }
}

/// Bytes reserved for encoding one event.
const ENCODE_CAPACITY: usize = 768;

/// The request path's handle: cheap to clone (one shared allocation: every request's
/// completion holds a clone), never blocks.
#[derive(Debug, Clone)]
pub struct EventSink {
    inner: Arc<SinkInner>,
}

#[derive(Debug)]
struct SinkInner {
    sender: mpsc::Sender<OutgoingEvent>,
    namespace: Namespace,
    partitions: u16,
    losses: Arc<LossLedger>,
    /// `proxy.emit_events`; off only for benchmarks.
    enabled: bool,
}

impl EventSink {
    fn new(inner: SinkInner) -> Self {
        Self { inner: Arc::new(inner) }
    }

    /// Encodes and enqueues an event; if the queue is full the event is dropped and counted.
    pub fn emit<T: EventData>(&self, envelope: &Envelope<T>) {
        let sink = &*self.inner;
        if !sink.enabled {
            return;
        }
        // Sized for a typical request.completed (400-700 bytes), so encoding does not grow the
        // buffer step by step (each step a realloc and a copy, on the request path).
        let mut payload = Vec::with_capacity(ENCODE_CAPACITY);
        let payload = match serde_json::to_writer(&mut payload, envelope) {
            Ok(()) => payload,
            Err(error) => {
                metrics::counter!("stone_events_dropped_total", "reason" => "encode_error").increment(1);
                tracing::error!(%error, event_type = %envelope.event_type, "event could not be encoded");
                return;
            }
        };
        let event = OutgoingEvent {
            subject: sink.namespace.event_subject(envelope, sink.partitions),
            id: envelope.id.to_string(),
            event_type: Cow::Borrowed(envelope.data.event_type()),
            version: envelope.version,
            payload: Bytes::from(payload),
        };
        if sink.sender.try_send(event).is_err() {
            sink.losses.record();
        }
    }

    /// Whether events are emitted at all (`proxy.emit_events`).
    pub fn enabled(&self) -> bool {
        self.inner.enabled
    }

    /// Events waiting in memory.
    pub fn pending(&self) -> usize {
        self.inner.sender.max_capacity() - self.inner.sender.capacity()
    }
}

/// Settings of the publisher.
#[derive(Debug, Clone)]
pub struct EmitterSettings {
    pub namespace: Namespace,
    pub partitions: u16,
    pub capacity: usize,
    pub max_in_flight: usize,
    pub worker_id: String,
    /// How long the publisher keeps draining after shutdown began.
    pub drain_grace: Duration,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub enabled: bool,
}

/// Creates the sink and the publisher task's future. Fails if the spool cannot be opened, so a
/// misconfigured `proxy.spool_dir` stops the worker before it binds.
pub fn channel(
    client: async_nats::Client,
    js: jetstream::Context,
    settings: EmitterSettings,
    shutdown: CancellationToken,
) -> Result<(EventSink, impl std::future::Future<Output = ()> + Send + 'static), SpoolError> {
    let spool = Spool::open(&settings.spool_dir, settings.spool_max_bytes)?;
    let (sender, receiver) = mpsc::channel(settings.capacity);
    let sink = EventSink::new(SinkInner {
        sender,
        namespace: settings.namespace.clone(),
        partitions: settings.partitions,
        losses: Arc::new(LossLedger::new("queue_full")),
        enabled: settings.enabled,
    });
    let mut js = js;
    // A publish not acknowledged within this bound is treated as NATS being away: the event goes
    // to the spool instead of holding a slot (and memory) for the client's default 5 s.
    js.set_timeout(PUBLISH_ACK_TIMEOUT);
    let publisher = Publisher {
        client,
        js,
        spool,
        spool_losses: LossLedger::new("spool_full"),
        report_sender: sink.inner.sender.downgrade(),
        queue_losses: Arc::clone(&sink.inner.losses),
        namespace: settings.namespace.clone(),
        settings,
        published: metrics::counter!("stone_events_published_total"),
    };
    Ok((sink, publisher.run(receiver, shutdown)))
}

const PUBLISH_ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Events published from the spool per round; each round waits for all its acks before the
/// read offset moves, so order holds and a failed round is simply repeated.
const SPOOL_BATCH: usize = 1024;
/// How often a spooling publisher checks whether NATS is back.
const SPOOL_RETRY_INTERVAL: Duration = Duration::from_millis(250);

/// At most this many events are sent between two acknowledged publishes (barriers).
const BARRIER_EVERY: usize = 256;

/// The headers every event carries, acknowledged or not.
fn event_headers(event: &OutgoingEvent) -> async_nats::HeaderMap {
    let mut map = async_nats::HeaderMap::new();
    map.insert(async_nats::header::NATS_MESSAGE_ID, event.id.as_str());
    map.insert(headers::EVENT_TYPE, event.event_type.as_ref());
    map.insert(headers::EVENT_VERSION, event.version.to_string().as_str());
    map
}

type Barrier = Pin<Box<dyn std::future::Future<Output = (u64, Result<(), String>)> + Send>>;

/// Events sent but not yet confirmed by a barrier, oldest first. Positions count every event
/// ever sent, so a barrier names the events it confirms by the position after its own.
#[derive(Default)]
struct Unconfirmed {
    events: VecDeque<OutgoingEvent>,
    /// Position of `events[0]`.
    front: u64,
}

impl Unconfirmed {
    fn end(&self) -> u64 {
        self.front + self.events.len() as u64
    }

    fn len(&self) -> usize {
        self.events.len()
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Drops the events before `end`; returns how many were confirmed.
    fn confirm_until(&mut self, end: u64) -> usize {
        let mut confirmed = 0;
        while self.front < end && self.events.pop_front().is_some() {
            self.front += 1;
            confirmed += 1;
        }
        confirmed
    }

    /// Takes every unconfirmed event, oldest first.
    fn take_all(&mut self) -> VecDeque<OutgoingEvent> {
        self.front = self.end();
        std::mem::take(&mut self.events)
    }
}

/// Sends an event as a JetStream publish whose acknowledgement the returned future awaits.
async fn send_acknowledged(
    js: &jetstream::Context,
    event: &OutgoingEvent,
) -> Result<impl std::future::Future<Output = Result<(), String>> + Send + 'static, String> {
    let publish = PublishMessage::build().headers(event_headers(event)).payload(event.payload.clone());
    let ack = js.send_publish(event.subject.clone(), publish).await.map_err(|error| error.to_string())?;
    Ok(async move { ack.await.map(|_| ()).map_err(|error| error.to_string()) })
}

async fn publish_one(js: &jetstream::Context, event: &OutgoingEvent) -> Result<(), String> {
    send_acknowledged(js, event).await?.await
}

type SpoolRound = Pin<Box<dyn std::future::Future<Output = (u64, Result<usize, String>)> + Send>>;

/// Publishes one batch from the spool; resolves with the offset after the batch and how many
/// were published, or the first error.
fn spool_round(js: jetstream::Context, events: Vec<OutgoingEvent>, end_offset: u64) -> SpoolRound {
    Box::pin(async move {
        let count = events.len();
        let outcomes = futures::future::join_all(events.iter().map(|event| publish_one(&js, event))).await;
        match outcomes.into_iter().find_map(Result::err) {
            Some(error) => (end_offset, Err(error)),
            None => (end_offset, Ok(count)),
        }
    })
}

struct Publisher {
    client: async_nats::Client,
    js: jetstream::Context,
    spool: Spool,
    spool_losses: LossLedger,
    queue_losses: Arc<LossLedger>,
    /// Loss reports travel through the queue like any event, but the publisher holds only a weak
    /// sender: the channel closes, and the loop ends, once the request path let go of every sink.
    report_sender: mpsc::WeakSender<OutgoingEvent>,
    namespace: Namespace,
    settings: EmitterSettings,
    /// `stone_events_published_total`, registered once (it counts every event).
    published: metrics::Counter,
}

impl Publisher {
    fn nats_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Keeps an event on disk, or counts it as lost when the spool cannot take it.
    fn spool_event(&mut self, event: &OutgoingEvent) {
        match self.spool.append(event) {
            Ok(()) => {}
            Err(SpoolError::Full { .. }) => self.spool_losses.record(),
            Err(error) => {
                tracing::error!(%error, "event could not be spooled");
                self.spool_losses.record();
            }
        }
        metrics::gauge!("stone_proxy_spool_bytes").set(self.spool.pending_bytes() as f64);
    }

    fn report_losses(&self) {
        for ledger in [self.queue_losses.as_ref(), &self.spool_losses] {
            let Some(report) = ledger.take(&self.settings.worker_id) else { continue };
            tracing::warn!(dropped = report.dropped, reason = %report.reason, "events were dropped; reporting the loss");
            if let Some(sender) = self.report_sender.upgrade() {
                let sink = EventSink::new(SinkInner {
                    sender,
                    namespace: self.namespace.clone(),
                    partitions: self.settings.partitions,
                    losses: Arc::clone(&self.queue_losses),
                    enabled: true,
                });
                sink.emit(&Envelope::new(self.settings.worker_id.clone(), 0, report));
            }
        }
    }

    /// Moves every unconfirmed event to the spool, oldest first, ahead of anything newer.
    fn spool_unconfirmed(&mut self, unconfirmed: &mut Unconfirmed) {
        for event in unconfirmed.take_all() {
            self.spool_event(&event);
        }
    }

    /// Sends a batch: plain publishes, the last (and every [`BARRIER_EVERY`]th) one with an
    /// acknowledgement. Returns the first error; the events from the failed one on are not sent.
    async fn send_batch(
        &mut self,
        batch: &mut VecDeque<OutgoingEvent>,
        unconfirmed: &mut Unconfirmed,
        barriers: &mut FuturesUnordered<Barrier>,
        since_barrier: &mut usize,
    ) -> Result<(), String> {
        while let Some(event) = batch.pop_front() {
            let barrier = batch.is_empty() || *since_barrier + 1 >= BARRIER_EVERY;
            let sent = if barrier {
                match send_acknowledged(&self.js, &event).await {
                    Ok(ack) => {
                        let end = unconfirmed.end() + 1;
                        barriers.push(Box::pin(async move { (end, ack.await) }));
                        *since_barrier = 0;
                        Ok(())
                    }
                    Err(error) => Err(error),
                }
            } else {
                *since_barrier += 1;
                self.client
                    .publish_with_headers(event.subject.clone(), event_headers(&event), event.payload.clone())
                    .await
                    .map_err(|error| error.to_string())
            };
            if let Err(error) = sent {
                batch.push_front(event);
                return Err(error);
            }
            unconfirmed.events.push_back(event);
        }
        Ok(())
    }

    async fn run(mut self, mut receiver: mpsc::Receiver<OutgoingEvent>, shutdown: CancellationToken) {
        let mut unconfirmed = Unconfirmed::default();
        let mut barriers: FuturesUnordered<Barrier> = FuturesUnordered::new();
        let mut since_barrier = 0;
        let mut batch: Vec<OutgoingEvent> = Vec::with_capacity(BARRIER_EVERY);
        // Spooling while the spool holds anything, so that events keep their order.
        let mut spooling = !self.spool.is_empty();
        if spooling {
            tracing::info!(
                bytes = self.spool.pending_bytes(),
                "events spooled by an earlier run will be published first"
            );
        }
        let mut round: Option<SpoolRound> = None;
        let mut retry = tokio::time::interval(SPOOL_RETRY_INTERVAL);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut closed = false;
        loop {
            let room = self.settings.max_in_flight.saturating_sub(unconfirmed.len()).min(BARRIER_EVERY);
            tokio::select! {
                received = receiver.recv_many(&mut batch, room), if room > 0 && !closed => {
                    if received == 0 {
                        closed = true;
                    } else if spooling || !self.nats_connected() {
                        if !spooling {
                            tracing::warn!("NATS unreachable; spooling events to disk");
                            spooling = true;
                            self.spool_unconfirmed(&mut unconfirmed);
                        }
                        for event in batch.drain(..) {
                            self.spool_event(&event);
                        }
                    } else {
                        let mut sending: VecDeque<OutgoingEvent> = batch.drain(..).collect();
                        let sent =
                            self.send_batch(&mut sending, &mut unconfirmed, &mut barriers, &mut since_barrier).await;
                        if let Err(error) = sent {
                            tracing::warn!(%error, "publish failed; spooling events to disk");
                            spooling = true;
                            self.spool_unconfirmed(&mut unconfirmed);
                            for event in sending {
                                self.spool_event(&event);
                            }
                        }
                    }
                },
                Some((end, outcome)) = barriers.next(), if !barriers.is_empty() => match outcome {
                    Ok(()) => {
                        let confirmed = unconfirmed.confirm_until(end);
                        if confirmed > 0 {
                            self.published.increment(confirmed as u64);
                            self.report_losses();
                        }
                    }
                    Err(error) => {
                        // Events already moved to the spool are not in `unconfirmed` any more.
                        if end > unconfirmed.front {
                            if !spooling {
                                tracing::warn!(%error, "publish not acknowledged; spooling events to disk");
                                spooling = true;
                            }
                            self.spool_unconfirmed(&mut unconfirmed);
                        }
                    }
                },
                (end_offset, outcome) = poll_round(&mut round), if round.is_some() => {
                    round = None;
                    match outcome {
                        Ok(count) => {
                            self.published.increment(count as u64);
                            if let Err(error) = self.spool.commit(end_offset) {
                                tracing::error!(%error, "spool offset not saved");
                            }
                            metrics::gauge!("stone_proxy_spool_bytes").set(self.spool.pending_bytes() as f64);
                            if self.spool.is_empty() {
                                tracing::info!("spool published; publishing directly again");
                                spooling = false;
                                self.report_losses();
                            } else {
                                self.start_round(&mut round);
                            }
                        }
                        Err(error) => tracing::debug!(%error, "spool round failed; will retry"),
                    }
                },
                _ = retry.tick(), if spooling && round.is_none() => {
                    if self.nats_connected() && unconfirmed.is_empty() {
                        self.start_round(&mut round);
                    }
                },
                () = shutdown.cancelled(), if deadline.is_none() => {
                    // Keep publishing while in-flight requests finish and drop their sinks.
                    deadline = Some(tokio::time::Instant::now() + self.settings.drain_grace);
                }
                () = sleep_until_deadline(deadline), if deadline.is_some() => break,
            }
            if closed && unconfirmed.is_empty() && (!spooling || self.spool.is_empty() || !self.nats_connected()) {
                break;
            }
            if closed && unconfirmed.is_empty() && spooling && round.is_none() {
                // Shutting down with NATS back: publish the spool now rather than on the next tick.
                self.start_round(&mut round);
            }
        }
        // What is sent but unconfirmed waits for its barriers a little; what is still queued goes
        // to disk after it, and the next start publishes it.
        let confirmed = tokio::time::timeout(PUBLISH_ACK_TIMEOUT * 2, async {
            while !unconfirmed.is_empty() {
                match barriers.next().await {
                    Some((end, Ok(()))) => {
                        let confirmed = unconfirmed.confirm_until(end);
                        self.published.increment(confirmed as u64);
                    }
                    Some((_, Err(_))) | None => break,
                }
            }
        })
        .await;
        if confirmed.is_err() || !unconfirmed.is_empty() {
            tracing::warn!(events = unconfirmed.len(), "publishes still unconfirmed at shutdown; spooling them");
            self.spool_unconfirmed(&mut unconfirmed);
        }
        while let Ok(event) = receiver.try_recv() {
            self.spool_event(&event);
        }
        if !self.spool.is_empty() {
            tracing::warn!(bytes = self.spool.pending_bytes(), "events left in the spool for the next start");
        }
    }

    fn start_round(&mut self, round: &mut Option<SpoolRound>) {
        match self.spool.peek(SPOOL_BATCH) {
            Ok((events, end_offset)) if !events.is_empty() => {
                *round = Some(spool_round(self.js.clone(), events, end_offset));
            }
            Ok(_) => {}
            Err(error) => {
                tracing::error!(%error, "spool unreadable past this point; skipping the rest");
                self.spool_losses.record();
                let _ = self.spool.skip_rest();
            }
        }
    }
}

async fn poll_round(round: &mut Option<SpoolRound>) -> (u64, Result<usize, String>) {
    match round {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_deadline(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
