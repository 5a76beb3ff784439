//! The event contract from the outside: fixtures of every published version decode, old versions
//! upcast, unknown ones are rejected with a reason, and the checked-in schemas are current.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use stone_events::cache::CacheEvent;
use stone_events::config::{ConfigOp, EntityKind, EntitySpec};
use stone_events::request::{CacheStatus, RequestCompleted};
use stone_events::{DecodeError, Envelope, Event, EventData, KNOWN_EVENT_TYPES, Namespace, decode};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fixture(name: &str) -> Vec<u8> {
    let path = fixtures().join(name);
    std::fs::read(&path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()))
}

#[test]
fn request_completed_v1_upcasts_to_current() {
    let Ok(Event::RequestCompleted(envelope)) = decode(&fixture("request.completed.v1.json")) else {
        panic!("v1 fixture must decode into request.completed");
    };
    assert_eq!(envelope.version, RequestCompleted::VERSION);
    assert_eq!(envelope.config_seq, 42);
    assert_eq!(envelope.trace.traceparent.as_deref(), Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
    let data = envelope.data;
    assert_eq!(data.total_us, 12_346, "12.3456 ms rounds to 12346 µs");
    assert_eq!(data.cache, CacheStatus::Hit);
    assert_eq!(data.target.as_deref(), Some("http://10.0.0.5:8000"));
    assert_eq!(data.path_template, "/users/7");
    assert_eq!(data.upstream, None);
    assert_eq!(data.bytes_out, 1024);
}

#[test]
fn every_fixture_decodes_and_every_type_has_a_fixture_per_version_or_a_property_test() {
    let mut covered = Vec::new();
    for entry in std::fs::read_dir(fixtures()).unwrap_or_else(|error| panic!("{error}")) {
        let path = entry.unwrap_or_else(|error| panic!("{error}")).path();
        let bytes = std::fs::read(&path).unwrap_or_else(|error| panic!("{error}"));
        let event = decode(&bytes).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default().to_owned();
        assert!(name.starts_with(event.event_type()), "{name} decoded as {}", event.event_type());
        covered.push(name);
    }
    // Old versions must keep a fixture forever: that is what proves readers still accept them.
    for (event_type, versions) in KNOWN_EVENT_TYPES {
        for version in versions.iter().take(versions.len().saturating_sub(1)) {
            let name = format!("{event_type}.v{version}.json");
            assert!(covered.contains(&name), "old version {name} has no fixture");
        }
    }
}

#[test]
fn config_fixture_carries_a_typed_spec() {
    let Ok(Event::Config(envelope)) = decode(&fixture("config.upstream.upserted.v1.json")) else {
        panic!("config fixture must decode");
    };
    assert_eq!(envelope.data.kind, EntityKind::Upstream);
    assert_eq!(envelope.data.op, ConfigOp::Upserted);
    let Some(EntitySpec::Upstream(upstream)) = envelope.data.spec else {
        panic!("upstream spec expected");
    };
    assert_eq!(upstream.targets.first().map(|target| target.weight), Some(2));
    let subject = Namespace::default().config_subject(envelope.data.kind.as_str(), &envelope.data.name);
    assert_eq!(subject, "stone.config.upstream.users");
}

#[test]
fn future_and_unknown_versions_and_types_are_rejected_with_a_reason() {
    let mut value: serde_json::Value =
        serde_json::from_slice(&fixture("request.completed.v2.json")).unwrap_or_else(|error| panic!("{error}"));
    value["version"] = 3.into();
    let future = decode(&serde_json::to_vec(&value).unwrap_or_default());
    assert!(matches!(future, Err(DecodeError::FutureVersion { version: 3, newest: 2, .. })), "{future:?}");

    value["version"] = 0.into();
    let never = decode(&serde_json::to_vec(&value).unwrap_or_default());
    assert!(matches!(never, Err(DecodeError::UnknownVersion { version: 0, .. })), "{never:?}");

    value["version"] = 2.into();
    value["type"] = "request.teleported".into();
    let unknown = decode(&serde_json::to_vec(&value).unwrap_or_default());
    assert_eq!(unknown.map_err(|error| error.reason_code()).err(), Some("unknown_type"));

    value["type"] = "request.completed".into();
    value["data"]["status"] = "two hundred".into();
    let malformed = decode(&serde_json::to_vec(&value).unwrap_or_default());
    assert_eq!(malformed.map_err(|error| error.reason_code()).err(), Some("malformed_data"));

    assert_eq!(decode(b"not json").map_err(|error| error.reason_code()).err(), Some("malformed_envelope"));
}

#[test]
fn cache_type_and_action_must_agree() {
    let mut value: serde_json::Value =
        serde_json::from_slice(&fixture("cache.stored.v1.json")).unwrap_or_else(|error| panic!("{error}"));
    value["type"] = "cache.hit".into();
    let result = decode(&serde_json::to_vec(&value).unwrap_or_default());
    assert!(matches!(result, Err(DecodeError::MalformedData { .. })), "{result:?}");
}

#[test]
fn request_subject_carries_the_filter_dimensions() {
    let Ok(Event::RequestCompleted(envelope)) = decode(&fixture("request.completed.v2.json")) else {
        panic!("v2 fixture must decode");
    };
    let subject = Namespace::default().event_subject(&envelope, 8);
    let tokens: Vec<&str> = subject.split('.').collect();
    assert_eq!(tokens[..5], ["stone", "ev", "request", "completed", "v2"]);
    assert!(tokens[5].parse::<u16>().is_ok_and(|partition| partition < 8));
    assert_eq!(tokens[6..], ["orders", "5xx", "bypass", "orders", "acme"]);
}

#[test]
fn envelope_time_is_rfc3339_with_microseconds() {
    let envelope = Envelope::new(
        "proxy-a",
        1,
        CacheEvent {
            action: stone_events::cache::CacheAction::Purged,
            route: "-".into(),
            key: "k".into(),
            tier: None,
            bytes: 0,
            ttl_s: None,
            tags: vec![],
            actor: Some("admin".into()),
            reason: None,
            count: None,
        },
    );
    let json: serde_json::Value =
        serde_json::from_slice(&envelope.to_json().unwrap_or_default()).unwrap_or_else(|error| panic!("{error}"));
    let time = json["time"].as_str().unwrap_or_default();
    assert_eq!(time.len(), "2026-11-02T10:15:30.123456Z".len(), "{time}");
    assert!(time.ends_with('Z'));
    assert_eq!(json["type"], "cache.purged");
    assert_eq!(json["id"].as_str().map(|id| id.chars().nth(14)), Some(Some('7')), "UUIDv7");
}

#[test]
fn schemas_are_current() {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    let generated = stone_events::schema::all_schemas();
    let mut stale = Vec::new();
    for file in &generated {
        let on_disk = std::fs::read_to_string(directory.join(&file.file_name)).unwrap_or_default();
        if on_disk != stone_events::schema::render(&file.schema) {
            stale.push(file.file_name.clone());
        }
    }
    let on_disk_count = std::fs::read_dir(&directory)
        .map(|entries| {
            entries.filter_map(Result::ok).filter(|e| e.path().extension().is_some_and(|x| x == "json")).count()
        })
        .unwrap_or(0);
    assert!(stale.is_empty(), "schemas/ is stale for {stale:?}: run `just schemas` and commit the result");
    assert_eq!(on_disk_count, generated.len(), "schemas/ has files no type generates: run `just schemas`");
}
