//! Property tests: whatever a writer encodes, a reader decodes to the same value; no input makes
//! the decoder panic.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use stone_events::cache::{CacheAction, CacheEvent, CacheTier};
use stone_events::config::{ConfigChange, ConfigOp, EntityKind, EntitySpec, LbAlgorithm, TargetSpec, UpstreamSpec};
use stone_events::health::{HealthCheckKind, TargetHealthChanged, TargetState};
use stone_events::request::{CacheStatus, ErrorKind, RateLimitDecision, RequestCompleted, RequestCompletedV1};
use stone_events::{Envelope, Event, EventData, TraceContext, decode};
use time::OffsetDateTime;
use uuid::Uuid;

fn text() -> impl Strategy<Value = String> {
    "[ -~]{0,24}"
}

fn time_micros() -> impl Strategy<Value = OffsetDateTime> {
    // Microsecond precision is what the wire keeps; 1970..2100.
    (0i64..4_102_444_800_000_000).prop_map(|micros| {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    })
}

fn cache_status() -> impl Strategy<Value = CacheStatus> {
    prop_oneof![
        Just(CacheStatus::None),
        Just(CacheStatus::Hit),
        Just(CacheStatus::Miss),
        Just(CacheStatus::Stale),
        Just(CacheStatus::Revalidated),
        Just(CacheStatus::Bypass),
    ]
}

fn error_kind() -> impl Strategy<Value = Option<ErrorKind>> {
    prop::option::of(prop_oneof![
        Just(ErrorKind::NoRoute),
        Just(ErrorKind::UpstreamConnect),
        Just(ErrorKind::UpstreamTimeout),
        Just(ErrorKind::ClientAbort),
        Just(ErrorKind::RateLimited),
    ])
}

prop_compose! {
    fn request_completed()(
        method in "[A-Z]{3,7}", host in text(), route in text(), path in text(),
        upstream in prop::option::of(text()), consumer in prop::option::of(text()),
        status in 100u16..600, total_us in any::<u64>(), upstream_us in prop::option::of(any::<u64>()),
        bytes_in in any::<u64>(), bytes_out in any::<u64>(), cache in cache_status(), error in error_kind(),
        limited in prop::option::of((text(), any::<bool>(), any::<u64>(), any::<bool>())),
    ) -> RequestCompleted {
        RequestCompleted {
            method, host, route, path_template: path.clone(), path, upstream: upstream.clone(),
            target: upstream.map(|u| format!("http://{u}")), consumer, client_ip: None,
            protocol: "HTTP/1.1".into(), status, total_us, upstream_us, ttfb_us: upstream_us,
            bytes_in, bytes_out, cache, error,
            rate_limit: limited.map(|(policy, limited, remaining, store_unavailable)| {
                RateLimitDecision { policy, limited, remaining, store_unavailable }
            }),
        }
    }
}

prop_compose! {
    fn cache_event()(action in prop::sample::select(CacheAction::ALL.to_vec()), route in text(), key in text(),
        bytes in any::<u64>(), ttl_s in prop::option::of(any::<u64>()), tags in prop::collection::vec(text(), 0..4),
        memory in any::<bool>()) -> CacheEvent {
        CacheEvent { action, route, key, tier: Some(if memory { CacheTier::Memory } else { CacheTier::Redis }),
            bytes, ttl_s, tags, actor: None, reason: None, count: None }
    }
}

fn envelope<T: EventData>(data: T) -> impl Strategy<Value = Envelope<T>> {
    let trace = (prop::option::of(text()), prop::option::of(text()));
    (any::<u128>(), time_micros(), text(), any::<u64>(), trace).prop_map(
        move |(id, time, source, config_seq, (traceparent, tracestate))| {
            let mut envelope = Envelope::with_id(Uuid::from_u128(id), time, source, config_seq, data.clone());
            envelope.trace = TraceContext { traceparent, tracestate };
            envelope
        },
    )
}

proptest! {
    #[test]
    fn request_completed_roundtrips(envelope in request_completed().prop_flat_map(envelope)) {
        let bytes = envelope.to_json().unwrap_or_default();
        prop_assert_eq!(decode(&bytes).ok(), Some(Event::RequestCompleted(envelope)));
    }

    #[test]
    fn cache_events_roundtrip(envelope in cache_event().prop_flat_map(envelope)) {
        let bytes = envelope.to_json().unwrap_or_default();
        prop_assert_eq!(decode(&bytes).ok(), Some(Event::Cache(envelope)));
    }

    #[test]
    fn health_events_roundtrip(upstream in text(), target in text(), up in any::<bool>(), consecutive in any::<u32>()) {
        let data = TargetHealthChanged {
            upstream, target, state: if up { TargetState::Up } else { TargetState::Down },
            check: HealthCheckKind::Passive, reason: "status 503".into(), consecutive,
        };
        let envelope = Envelope::new("w", 0, data);
        prop_assert_eq!(decode(&envelope.to_json().unwrap_or_default()).ok(), Some(Event::TargetHealth(envelope)));
    }

    #[test]
    fn config_changes_roundtrip(name in "[a-z][a-z0-9-]{0,12}", version in 1u64..1000, weight in 1u32..100, delete in any::<bool>()) {
        let spec = UpstreamSpec { name: name.clone(), algorithm: LbAlgorithm::ConsistentHash,
            targets: vec![TargetSpec { url: "http://127.0.0.1:9".into(), weight }], health_check: None, hash_on: None, passive_health: None };
        let data = ConfigChange { kind: EntityKind::Upstream, name, id: Uuid::now_v7(), version,
            op: if delete { ConfigOp::Deleted } else { ConfigOp::Upserted }, actor: "test".into(),
            spec: (!delete).then_some(EntitySpec::Upstream(spec)), change_set: None };
        let envelope = Envelope::new("gateway", version, data);
        prop_assert_eq!(decode(&envelope.to_json().unwrap_or_default()).ok(), Some(Event::Config(envelope)));
    }

    #[test]
    fn v1_upcast_keeps_what_v1_knew(method in "[A-Z]{3,7}", status in 100u16..600, duration_ms in 0.0f64..1e9,
        bytes_out in any::<u64>(), cache_hit in any::<bool>()) {
        let v1 = RequestCompletedV1 { method: method.clone(), host: "h".into(), route: "r".into(), path: "/p".into(),
            upstream_target: None, status, duration_ms, bytes_in: 0, bytes_out, cache_hit };
        let current = RequestCompleted::from(v1);
        prop_assert_eq!(current.method, method);
        prop_assert_eq!(current.status, status);
        prop_assert_eq!(current.bytes_out, bytes_out);
        prop_assert_eq!(current.cache == CacheStatus::Hit, cache_hit);
        prop_assert!((current.total_us as f64 - duration_ms * 1000.0).abs() <= 0.5 + duration_ms * 1e-9);
    }

    /// The timestamp reader's digit-by-digit path for the written shape agrees with the general
    /// RFC 3339 parser on every written time, and on the same text with one byte changed (out of
    /// range fields, a leap second, other separators), where it must hand over or agree.
    #[test]
    fn timestamps_parse_as_rfc3339_parses_them(time in time_micros(), at in 0usize..27, byte in prop::sample::select(b"0123456789:-TZ.+ 6".to_vec())) {
        let written = stone_events::timestamp::format(time);
        prop_assert_eq!(stone_events::timestamp::parse(&written).ok(), Some(time));
        let mut changed = written.into_bytes();
        changed[at] = byte;
        let changed = String::from_utf8(changed).unwrap_or_default();
        let general = OffsetDateTime::parse(&changed, &time::format_description::well_known::Rfc3339).ok();
        prop_assert_eq!(stone_events::timestamp::parse(&changed).ok(), general, "{}", changed);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(&bytes);
    }
}
