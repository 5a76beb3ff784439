//! ClickHouse rows of the analytics tables, built from decoded (current-version) events, and the
//! [`Rows`] of one batch grouped the way they are inserted: per table and per day.

use std::collections::BTreeMap;

use serde::Serialize;
use stone_events::Envelope;
use stone_events::cache::{CacheEvent, CacheTier};
use stone_events::health::{EventsLost, HealthCheckKind, TargetHealthChanged, TargetState, WorkerHeartbeat};
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

/// A row of `cache_events` (see `migrations/clickhouse/0002_analytics.sql`).
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize)]
pub struct CacheRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    #[serde(with = "clickhouse::serde::time::datetime64::micros")]
    pub time: OffsetDateTime,
    pub source: String,
    pub partition: u16,
    pub stream_seq: u64,
    pub action: String,
    pub route: String,
    pub key: String,
    pub tier: String,
    pub bytes: u64,
    pub ttl_s: u64,
    pub tags: Vec<String>,
    pub actor: String,
    pub reason: String,
    /// Objects the event stands for (a summed `cache.evicted`), else 1.
    pub count: u64,
}

impl CacheRow {
    pub fn new(envelope: Envelope<CacheEvent>, partition: u16, stream_seq: u64) -> Self {
        let data = envelope.data;
        let tier = match data.tier {
            Some(CacheTier::Memory) => "memory",
            Some(CacheTier::Redis) => "redis",
            None => "",
        };
        // The event type is `cache.<action>`; the action is the part after the family.
        let action = envelope.event_type.strip_prefix("cache.").unwrap_or(&envelope.event_type).to_owned();
        Self {
            event_id: envelope.id,
            time: envelope.time,
            source: envelope.source,
            partition,
            stream_seq,
            action,
            route: data.route,
            key: data.key,
            tier: tier.to_owned(),
            bytes: data.bytes,
            ttl_s: data.ttl_s.unwrap_or_default(),
            tags: data.tags,
            actor: data.actor.unwrap_or_default(),
            reason: data.reason.unwrap_or_default(),
            count: data.count.unwrap_or(1),
        }
    }
}

/// A row of `health_events`: every `health.*` type in one table, unused columns left empty.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize)]
pub struct HealthRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    #[serde(with = "clickhouse::serde::time::datetime64::micros")]
    pub time: OffsetDateTime,
    pub source: String,
    pub partition: u16,
    pub stream_seq: u64,
    pub event_type: String,
    pub upstream: String,
    pub target: String,
    pub state: String,
    pub check_kind: String,
    pub reason: String,
    pub consecutive: u32,
    pub worker: String,
    pub build: String,
    pub uptime_s: u64,
    pub in_flight: u64,
    pub events_pending: u64,
    pub dropped: u64,
}

impl HealthRow {
    fn base<T>(envelope: &Envelope<T>, partition: u16, stream_seq: u64) -> Self {
        Self {
            event_id: envelope.id,
            time: envelope.time,
            source: envelope.source.clone(),
            partition,
            stream_seq,
            event_type: envelope.event_type.clone(),
            ..Self::empty()
        }
    }

    fn empty() -> Self {
        Self {
            event_id: Uuid::nil(),
            time: OffsetDateTime::UNIX_EPOCH,
            source: String::new(),
            partition: 0,
            stream_seq: 0,
            event_type: String::new(),
            upstream: String::new(),
            target: String::new(),
            state: String::new(),
            check_kind: String::new(),
            reason: String::new(),
            consecutive: 0,
            worker: String::new(),
            build: String::new(),
            uptime_s: 0,
            in_flight: 0,
            events_pending: 0,
            dropped: 0,
        }
    }

    pub fn target(envelope: Envelope<TargetHealthChanged>, partition: u16, stream_seq: u64) -> Self {
        let base = Self::base(&envelope, partition, stream_seq);
        let data = envelope.data;
        Self {
            upstream: data.upstream,
            target: data.target,
            state: match data.state {
                TargetState::Up => "up",
                TargetState::Down => "down",
            }
            .to_owned(),
            check_kind: match data.check {
                HealthCheckKind::Active => "active",
                HealthCheckKind::Passive => "passive",
            }
            .to_owned(),
            reason: data.reason,
            consecutive: data.consecutive,
            ..base
        }
    }

    pub fn heartbeat(envelope: Envelope<WorkerHeartbeat>, partition: u16, stream_seq: u64) -> Self {
        let base = Self::base(&envelope, partition, stream_seq);
        let data = envelope.data;
        Self {
            worker: data.worker,
            build: data.build,
            uptime_s: data.uptime_s,
            in_flight: data.in_flight,
            events_pending: data.events_pending,
            ..base
        }
    }

    pub fn events_lost(envelope: Envelope<EventsLost>, partition: u16, stream_seq: u64) -> Self {
        let base = Self::base(&envelope, partition, stream_seq);
        let data = envelope.data;
        Self { worker: data.worker, reason: data.reason, dropped: data.dropped, ..base }
    }
}

/// The UTC day (`YYYYMMDD`) of a time: the tables' partition key. One insert per table and day
/// makes each insert exactly one ClickHouse part, which commits or not as a whole.
pub fn day_of(time: OffsetDateTime) -> u32 {
    let date = time.to_offset(time::UtcOffset::UTC).date();
    // Years are 1970..=2299 for anything DateTime64 stores, so this cannot overflow.
    (date.year().max(0) as u32) * 10_000 + u32::from(u8::from(date.month())) * 100 + u32::from(date.day())
}

/// The rows of one batch, per table and day, in stream order within each group.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Rows {
    pub requests: BTreeMap<u32, Vec<RequestRow>>,
    pub cache: BTreeMap<u32, Vec<CacheRow>>,
    pub health: BTreeMap<u32, Vec<HealthRow>>,
    /// Capacity of a day's request rows when its first row arrives.
    request_capacity: usize,
}

impl Rows {
    /// Rows for a batch of up to `events` events, most of them requests: a day's request rows
    /// are allocated for all of them at once. Growing a vector of 20,000 rows by doubling copied
    /// each row about twice and touched fresh pages each time, ~5% of a backlog's pipeline
    /// throughput (docs/benchmarks.md); untouched capacity costs only address space.
    pub fn with_capacity(events: usize) -> Self {
        Self { request_capacity: events, ..Self::default() }
    }

    pub fn push_request(&mut self, row: RequestRow) {
        let capacity = self.request_capacity;
        self.requests.entry(day_of(row.time)).or_insert_with(|| Vec::with_capacity(capacity)).push(row);
    }

    pub fn push_cache(&mut self, row: CacheRow) {
        self.cache.entry(day_of(row.time)).or_default().push(row);
    }

    pub fn push_health(&mut self, row: HealthRow) {
        self.health.entry(day_of(row.time)).or_default().push(row);
    }

    pub fn len(&self) -> usize {
        self.requests.values().map(Vec::len).sum::<usize>()
            + self.cache.values().map(Vec::len).sum::<usize>()
            + self.health.values().map(Vec::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn days_are_utc_calendar_days() {
        assert_eq!(day_of(datetime!(2026-11-21 23:59:59.999999 UTC)), 20261121);
        assert_eq!(day_of(datetime!(2026-11-22 00:00:00 UTC)), 20261122);
        assert_eq!(day_of(datetime!(2026-11-22 01:00:00 +02:00)), 20261121);
    }
}
