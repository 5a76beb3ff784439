//! Event emission that never waits on NATS: requests hand encoded events to a bounded queue and
//! return; one publisher task pipelines them to JetStream with `Nats-Msg-Id` set to the event id.
//!
//! When NATS is unreachable (the client is disconnected, or a publish is not acknowledged in
//! time) the publisher switches to the disk [`Spool`]: from then on every event is appended
//! there, and the spool is published oldest first once NATS answers again, before the publisher
//! goes back to publishing directly. Whatever cannot be kept (memory queue full, spool full) is
//! dropped, counted in `stone_events_dropped_total{reason}`, and reported by a
//! `health.events_lost` event once publishing works again. At shutdown, what is still queued
//! goes to the spool, so a worker stopped with SIGTERM loses nothing it held.

use std::borrow::Cow;
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

/// The request path's handle: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct EventSink {
    sender: mpsc::Sender<OutgoingEvent>,
    namespace: Namespace,
    partitions: u16,
    losses: Arc<LossLedger>,
    /// `proxy.emit_events`; off only for benchmarks.
    enabled: bool,
}

impl EventSink {
    /// Encodes and enqueues an event; if the queue is full the event is dropped and counted.
    pub fn emit<T: EventData>(&self, envelope: &Envelope<T>) {
        if !self.enabled {
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
            subject: self.namespace.event_subject(envelope, self.partitions),
            id: envelope.id.to_string(),
            event_type: Cow::Borrowed(envelope.data.event_type()),
            version: envelope.version,
            payload: Bytes::from(payload),
        };
        if self.sender.try_send(event).is_err() {
            self.losses.record();
        }
    }

    /// Events waiting in memory.
    pub fn pending(&self) -> usize {
        self.sender.max_capacity() - self.sender.capacity()
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
    let sink = EventSink {
        sender,
        namespace: settings.namespace.clone(),
        partitions: settings.partitions,
        losses: Arc::new(LossLedger::new("queue_full")),
        enabled: settings.enabled,
    };
    let mut js = js;
    // A publish not acknowledged within this bound is treated as NATS being away: the event goes
    // to the spool instead of holding a slot (and memory) for the client's default 5 s.
    js.set_timeout(PUBLISH_ACK_TIMEOUT);
    let publisher = Publisher {
        client,
        js,
        spool,
        spool_losses: LossLedger::new("spool_full"),
        report_sender: sink.sender.downgrade(),
        queue_losses: Arc::clone(&sink.losses),
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

async fn publish_one(js: &jetstream::Context, event: &OutgoingEvent) -> Result<(), String> {
    // `header` adds to the map; `headers` would replace it and lose the Nats-Msg-Id.
    let publish = PublishMessage::build()
        .message_id(event.id.as_str())
        .header(headers::EVENT_TYPE, event.event_type.as_ref())
        .header(headers::EVENT_VERSION, event.version.to_string().as_str())
        .payload(event.payload.clone());
    match js.send_publish(event.subject.clone(), publish).await {
        Ok(ack) => ack.await.map(|_| ()).map_err(|error| error.to_string()),
        Err(error) => Err(error.to_string()),
    }
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
                let sink = EventSink {
                    sender,
                    namespace: self.namespace.clone(),
                    partitions: self.settings.partitions,
                    losses: Arc::clone(&self.queue_losses),
                    enabled: true,
                };
                sink.emit(&Envelope::new(self.settings.worker_id.clone(), 0, report));
            }
        }
    }

    async fn run(mut self, mut receiver: mpsc::Receiver<OutgoingEvent>, shutdown: CancellationToken) {
        let mut in_flight = FuturesUnordered::new();
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
            let room = in_flight.len() < self.settings.max_in_flight;
            tokio::select! {
                received = receiver.recv(), if room && !closed => match received {
                    Some(event) if spooling || !self.nats_connected() => {
                        if !spooling {
                            tracing::warn!("NATS unreachable; spooling events to disk");
                            spooling = true;
                        }
                        self.spool_event(&event);
                    }
                    Some(event) => {
                        let js = self.js.clone();
                        in_flight.push(async move {
                            let outcome = publish_one(&js, &event).await;
                            (event, outcome)
                        });
                    }
                    None => closed = true,
                },
                Some((event, outcome)) = in_flight.next(), if !in_flight.is_empty() => match outcome {
                    Ok(()) => {
                        self.published.increment(1);
                        self.report_losses();
                    }
                    Err(error) => {
                        if !spooling {
                            tracing::warn!(%error, "publish not acknowledged; spooling events to disk");
                            spooling = true;
                        }
                        self.spool_event(&event);
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
                    if self.nats_connected() && in_flight.is_empty() {
                        self.start_round(&mut round);
                    }
                },
                () = shutdown.cancelled(), if deadline.is_none() => {
                    // Keep publishing while in-flight requests finish and drop their sinks.
                    deadline = Some(tokio::time::Instant::now() + self.settings.drain_grace);
                }
                () = sleep_until_deadline(deadline), if deadline.is_some() => break,
            }
            if closed && in_flight.is_empty() && (!spooling || self.spool.is_empty() || !self.nats_connected()) {
                break;
            }
            if closed && in_flight.is_empty() && spooling && round.is_none() {
                // Shutting down with NATS back: publish the spool now rather than on the next tick.
                self.start_round(&mut round);
            }
        }
        // Whatever is still held goes to disk; the next start publishes it.
        while let Ok(event) = receiver.try_recv() {
            self.spool_event(&event);
        }
        let stragglers = tokio::time::timeout(PUBLISH_ACK_TIMEOUT * 2, async {
            while let Some((event, outcome)) = in_flight.next().await {
                if outcome.is_err() {
                    self.spool_event(&event);
                }
            }
        })
        .await;
        if stragglers.is_err() {
            tracing::warn!("publishes still unacknowledged at shutdown");
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
