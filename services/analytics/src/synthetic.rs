//! Synthetic events for tests and `stone bench pipeline`: realistic `request.completed` shapes
//! with a known distribution, published straight to JetStream as a proxy would publish them.

use std::collections::VecDeque;

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use bytes::Bytes;
use stone_events::request::{CacheStatus, ErrorKind, RequestCompleted};
use stone_events::{Envelope, EventData, Namespace};
use time::OffsetDateTime;

/// Routes the generator cycles through (index modulo the length).
pub const ROUTES: [&str; 4] = ["users", "orders", "search", "static"];
/// Consumers the generator cycles through.
pub const CONSUMERS: [&str; 3] = ["acme", "globex", "initech"];

/// The `index`-th synthetic request at `time`. Deterministic in `index`: status 500 every 50th,
/// 404 every 20th (unless 500), cache hit every 3rd, miss every 3rd + 1, latency `1000 + index % 997`
/// microseconds, 200 bytes in and 2000 out.
pub fn request(index: u64, time: OffsetDateTime) -> Envelope<RequestCompleted> {
    let route = ROUTES[(index % ROUTES.len() as u64) as usize];
    let status = if index.is_multiple_of(50) {
        500
    } else if index.is_multiple_of(20) {
        404
    } else {
        200
    };
    let cache = match index % 3 {
        0 => CacheStatus::Hit,
        1 => CacheStatus::Miss,
        _ => CacheStatus::None,
    };
    let data = RequestCompleted {
        method: "GET".to_owned(),
        host: "api.example.com".to_owned(),
        route: route.to_owned(),
        path_template: format!("/{route}/{{id}}"),
        path: format!("/{route}/{index}"),
        upstream: Some(format!("{route}-svc")),
        target: Some("http://10.0.0.5:8000".to_owned()),
        consumer: Some(CONSUMERS[(index % CONSUMERS.len() as u64) as usize].to_owned()),
        client_ip: Some("10.1.2.3".to_owned()),
        protocol: "HTTP/1.1".to_owned(),
        status,
        total_us: 1_000 + index % 997,
        upstream_us: Some(800 + index % 997),
        ttfb_us: Some(500),
        bytes_in: 200,
        bytes_out: 2_000,
        cache,
        error: (status == 500).then_some(ErrorKind::UpstreamReset),
        rate_limit: None,
    };
    Envelope::new("proxy-synthetic", 1, data).with_time(time)
}

trait WithTime {
    fn with_time(self, time: OffsetDateTime) -> Self;
}

impl<T: EventData> WithTime for Envelope<T> {
    fn with_time(self, time: OffsetDateTime) -> Self {
        Envelope::with_id(self.id, time, self.source, self.config_seq, self.data)
    }
}

/// Publishes envelopes with the event id as `Nats-Msg-Id`, keeping up to `in_flight` acks
/// outstanding (what the proxy's publisher does).
pub struct Publisher {
    js: jetstream::Context,
    namespace: Namespace,
    partitions: u16,
    in_flight: usize,
    acks: VecDeque<PublishAckFuture>,
}

impl Publisher {
    pub fn new(js: jetstream::Context, namespace: Namespace, partitions: u16, in_flight: usize) -> Self {
        Self { js, namespace, partitions, in_flight: in_flight.max(1), acks: VecDeque::new() }
    }

    pub async fn publish<T: EventData>(&mut self, envelope: &Envelope<T>) -> anyhow::Result<()> {
        let subject = self.namespace.event_subject(envelope, self.partitions);
        self.publish_raw(subject, envelope.id.to_string(), Bytes::from(envelope.to_json()?)).await
    }

    /// Publishes arbitrary bytes on a subject (tests use it for poison messages).
    pub async fn publish_raw(&mut self, subject: String, message_id: String, payload: Bytes) -> anyhow::Result<()> {
        let message = PublishMessage::build().message_id(message_id).payload(payload);
        let ack = self.js.send_publish(subject, message).await?;
        self.acks.push_back(ack);
        while self.acks.len() >= self.in_flight {
            if let Some(ack) = self.acks.pop_front() {
                ack.await?;
            }
        }
        Ok(())
    }

    /// Waits for every outstanding acknowledgement.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        while let Some(ack) = self.acks.pop_front() {
            ack.await?;
        }
        Ok(())
    }
}
