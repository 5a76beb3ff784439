//! ClickHouse rows of the analytics tables, built from decoded (current-version) events.

use serde::Serialize;
use stone_events::Envelope;
use stone_events::request::RequestCompleted;
use time::OffsetDateTime;
use uuid::Uuid;

/// A row of `requests` (see `migrations/clickhouse/0001_requests.sql`).
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize)]
pub struct RequestRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    #[serde(with = "clickhouse::serde::time::datetime64::micros")]
    pub time: OffsetDateTime,
    pub source: String,
    pub config_seq: u64,
    pub partition: u16,
    pub stream_seq: u64,
    pub method: String,
    pub host: String,
    pub route: String,
    pub path_template: String,
    pub path: String,
    pub upstream: String,
    pub target: String,
    pub consumer: String,
    pub client_ip: String,
    pub protocol: String,
    pub status: u16,
    pub total_us: u64,
    pub upstream_us: u64,
    pub ttfb_us: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub cache: String,
    pub error: String,
    pub rate_limited: u8,
    pub traceparent: String,
}

impl RequestRow {
    pub fn new(envelope: Envelope<RequestCompleted>, partition: u16, stream_seq: u64) -> Self {
        let data = envelope.data;
        Self {
            event_id: envelope.id,
            time: envelope.time,
            source: envelope.source,
            config_seq: envelope.config_seq,
            partition,
            stream_seq,
            method: data.method,
            host: data.host,
            route: data.route,
            path_template: data.path_template,
            path: data.path,
            upstream: data.upstream.unwrap_or_default(),
            target: data.target.unwrap_or_default(),
            consumer: data.consumer.unwrap_or_default(),
            client_ip: data.client_ip.unwrap_or_default(),
            protocol: data.protocol,
            status: data.status,
            total_us: data.total_us,
            upstream_us: data.upstream_us.unwrap_or_default(),
            ttfb_us: data.ttfb_us.unwrap_or_default(),
            bytes_in: data.bytes_in,
            bytes_out: data.bytes_out,
            cache: data.cache.as_str().to_owned(),
            error: data.error.map(|kind| kind.as_str().to_owned()).unwrap_or_default(),
            rate_limited: u8::from(data.rate_limit.is_some_and(|decision| decision.limited)),
            traceparent: envelope.trace.traceparent.unwrap_or_default(),
        }
    }
}
