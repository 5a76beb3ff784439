//! Event emission that never waits on NATS: requests hand encoded events to a bounded queue and
//! return; one publisher task pipelines them to JetStream with `Nats-Msg-Id` set to the event id.
//! When the queue is full the event is dropped and counted (`stone_events_dropped_total`), and a
//! `health.events_lost` event reports the loss once publishing works again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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

/// One encoded event waiting to be published.
#[derive(Debug)]
pub struct OutgoingEvent {
    pub subject: String,
    pub id: String,
    pub event_type: &'static str,
    pub version: u32,
    pub payload: Bytes,
}

/// Losses since the last report.
#[derive(Debug, Default)]
struct LossLedger {
    dropped: AtomicU64,
    first_micros: AtomicU64,
    last_micros: AtomicU64,
}

impl LossLedger {
    fn record(&self) {
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
            reason: "queue_full".to_owned(),
            first_at: format(first),
            last_at: format(last),
        })
    }
}

/// The request path's handle: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct EventSink {
    sender: mpsc::Sender<OutgoingEvent>,
    namespace: Namespace,
    partitions: u16,
    losses: Arc<LossLedger>,
}

impl EventSink {
    /// Encodes and enqueues an event; if the queue is full the event is dropped and counted.
    pub fn emit<T: EventData>(&self, envelope: &Envelope<T>) {
        let payload = match envelope.to_json() {
            Ok(payload) => payload,
            Err(error) => {
                metrics::counter!("stone_events_dropped_total", "reason" => "encode_error").increment(1);
                tracing::error!(%error, event_type = %envelope.event_type, "event could not be encoded");
                return;
            }
        };
        let event = OutgoingEvent {
            subject: self.namespace.event_subject(envelope, self.partitions),
            id: envelope.id.to_string(),
            event_type: envelope.data.event_type(),
            version: envelope.version,
            payload: Bytes::from(payload),
        };
        if self.sender.try_send(event).is_err() {
            self.losses.record();
            metrics::counter!("stone_events_dropped_total", "reason" => "queue_full").increment(1);
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
}

/// Creates the sink and the publisher task's future.
pub fn channel(
    js: jetstream::Context,
    settings: EmitterSettings,
    shutdown: CancellationToken,
) -> (EventSink, impl std::future::Future<Output = ()> + Send + 'static) {
    let (sender, receiver) = mpsc::channel(settings.capacity);
    let losses = Arc::new(LossLedger::default());
    let sink = EventSink {
        sender,
        namespace: settings.namespace.clone(),
        partitions: settings.partitions,
        losses: Arc::clone(&losses),
    };
    let publisher = publish_loop(js, receiver, sink.clone(), losses, settings, shutdown);
    (sink, publisher)
}

const PUBLISH_ATTEMPTS: u32 = 5;

async fn publish_one(js: &jetstream::Context, event: &OutgoingEvent) -> Result<(), String> {
    let mut delay = Duration::from_millis(50);
    let mut last_error = String::new();
    for _ in 0..PUBLISH_ATTEMPTS {
        // `header` adds to the map; `headers` would replace it and lose the Nats-Msg-Id.
        let publish = PublishMessage::build()
            .message_id(event.id.as_str())
            .header(headers::EVENT_TYPE, event.event_type)
            .header(headers::EVENT_VERSION, event.version.to_string().as_str())
            .payload(event.payload.clone());
        let attempt = match js.send_publish(event.subject.clone(), publish).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|error| error.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match attempt {
            Ok(()) => return Ok(()),
            Err(error) => last_error = error,
        }
        // The same Nats-Msg-Id makes a retry after a lost ack harmless.
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
    Err(last_error)
}

async fn publish_loop(
    js: jetstream::Context,
    mut receiver: mpsc::Receiver<OutgoingEvent>,
    sink: EventSink,
    losses: Arc<LossLedger>,
    settings: EmitterSettings,
    shutdown: CancellationToken,
) {
    // Loss reports go through the queue like any event, but the loop holds only a weak sender:
    // the channel closes, and the loop ends, once the request path has let go of every sink.
    let report_sender = sink.sender.downgrade();
    let EventSink { namespace, partitions, losses: sink_losses, sender: _ } = sink;
    let worker_id = settings.worker_id.clone();
    let report_sink = move |report: EventsLost| {
        if let Some(sender) = report_sender.upgrade() {
            let sink = EventSink { sender, namespace: namespace.clone(), partitions, losses: Arc::clone(&sink_losses) };
            sink.emit(&Envelope::new(worker_id.clone(), 0, report));
        }
    };

    let mut in_flight = FuturesUnordered::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let room = in_flight.len() < settings.max_in_flight;
        tokio::select! {
            received = receiver.recv(), if room => match received {
                Some(event) => {
                    let js = js.clone();
                    in_flight.push(async move {
                        let outcome = publish_one(&js, &event).await;
                        (event, outcome)
                    });
                }
                None if in_flight.is_empty() => break,
                None => {}
            },
            Some((event, outcome)) = in_flight.next(), if !in_flight.is_empty() => match outcome {
                Ok(()) => {
                    metrics::counter!("stone_events_published_total").increment(1);
                    if let Some(report) = losses.take(&settings.worker_id) {
                        tracing::warn!(dropped = report.dropped, "events were dropped; reporting the loss");
                        report_sink(report);
                    }
                }
                Err(error) => {
                    losses.record();
                    metrics::counter!("stone_events_dropped_total", "reason" => "publish_failed").increment(1);
                    tracing::warn!(%error, subject = %event.subject, "event dropped after retries");
                }
            },
            () = shutdown.cancelled(), if deadline.is_none() => {
                // Keep publishing while in-flight requests finish and drop their sinks.
                deadline = Some(tokio::time::Instant::now() + settings.drain_grace);
            }
            () = sleep_until_deadline(deadline), if deadline.is_some() => break,
        }
    }
    let abandoned = receiver.len() + in_flight.len();
    if abandoned > 0 {
        metrics::counter!("stone_events_dropped_total", "reason" => "shutdown").increment(abandoned as u64);
        tracing::warn!(abandoned, "publisher stopped with events unpublished");
    }
}

async fn sleep_until_deadline(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
