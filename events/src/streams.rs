//! JetStream stream definitions as plain data; the runtime kit turns them into server calls.

use std::time::Duration;

use crate::subjects::Namespace;

/// How long a stream keeps messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Keep by age and size limits, discarding the oldest.
    Limits { max_age: Duration, max_bytes: i64 },
    /// Keep forever.
    Forever,
}

/// A stream's definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: String,
    pub subjects: Vec<String>,
    pub retention: Retention,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    pub duplicate_window: Duration,
    pub description: String,
}

/// Tunables for the EVENTS stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsRetention {
    /// The replay window.
    pub max_age: Duration,
    pub max_bytes: i64,
    pub duplicate_window: Duration,
}

impl Default for EventsRetention {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 8 * 1024 * 1024 * 1024,
            duplicate_window: Duration::from_secs(120),
        }
    }
}

pub const EVENTS: &str = "EVENTS";
pub const CONFIG: &str = "CONFIG";
pub const DEADLETTER: &str = "DEADLETTER";

/// Minimum duplicate window: a publisher retrying after a NATS restart must still be deduplicated.
pub const MIN_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// `EVENTS`: request, cache and health events, kept for the replay window.
pub fn events_stream(namespace: &Namespace, retention: EventsRetention) -> StreamSpec {
    StreamSpec {
        name: namespace.stream_name(EVENTS),
        subjects: vec![namespace.events_wildcard()],
        retention: Retention::Limits { max_age: retention.max_age, max_bytes: retention.max_bytes },
        duplicate_window: retention.duplicate_window.max(MIN_DUPLICATE_WINDOW),
        description: "Proxy Stone request, cache and health events".to_owned(),
    }
}

/// `CONFIG`: the configuration ledger, one subject per entity, never expires.
pub fn config_stream(namespace: &Namespace) -> StreamSpec {
    StreamSpec {
        name: namespace.stream_name(CONFIG),
        subjects: vec![namespace.config_wildcard()],
        retention: Retention::Forever,
        duplicate_window: MIN_DUPLICATE_WINDOW,
        description: "Proxy Stone configuration ledger".to_owned(),
    }
}

/// Size cap of DEADLETTER (JetStream reserves a stream's `max_bytes` when it is created).
pub const DEAD_LETTER_MAX_BYTES: i64 = 1024 * 1024 * 1024;

/// `DEADLETTER`: events a consumer could not process, with the reason in headers; 30 days.
pub fn dead_letter_stream(namespace: &Namespace) -> StreamSpec {
    StreamSpec {
        name: namespace.stream_name(DEADLETTER),
        subjects: vec![namespace.dead_letter_wildcard()],
        retention: Retention::Limits { max_age: Duration::from_secs(30 * 24 * 3600), max_bytes: DEAD_LETTER_MAX_BYTES },
        duplicate_window: MIN_DUPLICATE_WINDOW,
        description: "Proxy Stone events that could not be processed".to_owned(),
    }
}

/// Every stream of a deployment.
pub fn all_streams(namespace: &Namespace, retention: EventsRetention) -> Vec<StreamSpec> {
    let mut dead_letters = dead_letter_stream(namespace);
    // Never reserve more for dead letters than for the events they came from.
    if let Retention::Limits { max_bytes, .. } = &mut dead_letters.retention {
        *max_bytes = (*max_bytes).min(retention.max_bytes.max(1024 * 1024));
    }
    vec![events_stream(namespace, retention), config_stream(namespace), dead_letters]
}

/// Header names used on published messages.
pub mod headers {
    /// JetStream deduplication id; always the event id.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// Event type, so consumers can route without parsing the body.
    pub const EVENT_TYPE: &str = "Stone-Event-Type";
    /// Event version.
    pub const EVENT_VERSION: &str = "Stone-Event-Version";
    /// On dead letters: why the message was rejected.
    pub const DEAD_LETTER_REASON: &str = "Stone-Dead-Letter-Reason";
    /// On dead letters: the original subject and stream sequence.
    pub const ORIGINAL_SUBJECT: &str = "Stone-Original-Subject";
    pub const ORIGINAL_SEQUENCE: &str = "Stone-Original-Sequence";
}
