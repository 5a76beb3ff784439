//! NATS subject layout. Subjects carry the dimensions subscribers filter on, so filtering happens
//! in the server rather than in clients.
//!
//! ```text
//! {ns}.ev.{family}.{name}.v{version}.{partition}.{dimensions…}     stream EVENTS
//! {ns}.config.{kind}.{entity name}                                 stream CONFIG (one subject per entity)
//! {ns}.dlq.{source stream}.{consumer}                              stream DEADLETTER
//! ```
//!
//! Dimensions per type (see each payload's `subject_dimensions`):
//! - `request.completed`: `route.status_class.cache.upstream.consumer`
//! - `cache.*`: `route`
//! - `health.target_*`: `upstream`; `health.worker_heartbeat`, `health.events_lost`: `worker`
//!
//! The partition token is computed by the publisher from the event id (see [`partition_of`]) so
//! projector instances can own disjoint partitions on NATS versions without subject transforms.

use uuid::Uuid;

use crate::envelope::{Envelope, EventData};

/// Token used for an absent dimension (no consumer, no upstream).
pub const NONE_TOKEN: &str = "-";

/// Default number of partitions of the EVENTS subjects.
pub const DEFAULT_PARTITIONS: u16 = 8;

/// The subject root and stream names of one deployment. Tests use their own namespace so that
/// they can run in parallel against one NATS server and leave nothing behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    root: String,
}

impl Default for Namespace {
    fn default() -> Self {
        Self { root: "stone".to_owned() }
    }
}

impl Namespace {
    /// A namespace with this subject root. The root must be a single subject token.
    pub fn new(root: &str) -> Result<Self, InvalidNamespace> {
        let valid = !root.is_empty()
            && root.len() <= 32
            && root.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
        if valid { Ok(Self { root: root.to_owned() }) } else { Err(InvalidNamespace(root.to_owned())) }
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    /// Stream names: `EVENTS`, `CONFIG`, `DEADLETTER` in the default namespace, otherwise
    /// prefixed with the upper-cased root (`T1F2_EVENTS`).
    pub fn stream_name(&self, base: &str) -> String {
        if self.root == "stone" {
            base.to_owned()
        } else {
            format!("{}_{base}", self.root.to_ascii_uppercase().replace('-', "_"))
        }
    }

    /// Name of a KV bucket in this namespace.
    pub fn bucket_name(&self, base: &str) -> String {
        self.stream_name(base)
    }

    /// The subject an event is published on.
    pub fn event_subject<T: EventData>(&self, envelope: &Envelope<T>, partitions: u16) -> String {
        let partition = partition_of(&envelope.id, partitions);
        let (family, name) = split_type(&envelope.event_type);
        let mut subject = format!("{}.ev.{family}.{name}.v{}.{partition}", self.root, envelope.version);
        for dimension in envelope.data.subject_dimensions() {
            subject.push('.');
            push_token(&mut subject, dimension);
        }
        subject
    }

    /// Wildcard for everything in stream EVENTS.
    pub fn events_wildcard(&self) -> String {
        format!("{}.ev.>", self.root)
    }

    /// Filter for one event family (`request`, `cache`, `health`) across versions and partitions.
    pub fn family_filter(&self, family: &str) -> String {
        format!("{}.ev.{family}.>", self.root)
    }

    /// Filter for one partition of one family, across types and versions.
    pub fn family_partition_filter(&self, family: &str, partition: u16) -> String {
        format!("{}.ev.{family}.*.*.{partition}.>", self.root)
    }

    /// Filter for one partition of every family and type.
    pub fn partition_filter(&self, partition: u16) -> String {
        format!("{}.ev.*.*.*.{partition}.>", self.root)
    }

    /// The per-entity subject in stream CONFIG.
    pub fn config_subject(&self, kind: &str, name: &str) -> String {
        let mut subject = format!("{}.config.{kind}.", self.root);
        push_token(&mut subject, name);
        subject
    }

    /// Wildcard for everything in stream CONFIG.
    pub fn config_wildcard(&self) -> String {
        format!("{}.config.>", self.root)
    }

    /// Where a message that could not be processed goes.
    pub fn dead_letter_subject(&self, source_stream: &str, consumer: &str) -> String {
        let mut subject = format!("{}.dlq.", self.root);
        push_token(&mut subject, source_stream);
        subject.push('.');
        push_token(&mut subject, consumer);
        subject
    }

    /// Wildcard for everything in stream DEADLETTER.
    pub fn dead_letter_wildcard(&self) -> String {
        format!("{}.dlq.>", self.root)
    }
}

/// A namespace root that is not a single subject token.
#[derive(Debug, Clone, thiserror::Error)]
#[error("namespace {0:?} must be 1 to 32 letters, digits, '_' or '-'")]
pub struct InvalidNamespace(pub String);

/// `request.completed` → (`request`, `completed`). Types without a dot get family `other`.
fn split_type(event_type: &str) -> (&str, String) {
    match event_type.split_once('.') {
        Some((family, rest)) => (family, rest.replace('.', "_")),
        None => ("other", event_type.to_owned()),
    }
}

/// Appends `value` as one subject token: characters outside `[A-Za-z0-9_-]` become `_` and an
/// empty value becomes [`NONE_TOKEN`]. Config validation keeps real names inside that set, so the
/// mapping is only lossy for names that could not be configured anyway.
pub fn push_token(subject: &mut String, value: &str) {
    if value.is_empty() {
        subject.push_str(NONE_TOKEN);
        return;
    }
    subject.extend(value.chars().map(|character| {
        if character.is_ascii_alphanumeric() || character == '_' || character == '-' { character } else { '_' }
    }));
}

/// `2xx`, `4xx`, …; anything outside 100..=599 is `other`.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// The partition of an event: FNV-1a over the id's bytes, modulo the partition count. Stable
/// across releases because projectors' partition ownership depends on it.
pub fn partition_of(id: &Uuid, partitions: u16) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u16
}

/// The partition token of an EVENTS subject (`{ns}.ev.{family}.{name}.v{version}.{partition}…`),
/// if the subject has that shape.
pub fn partition_in_subject(subject: &str) -> Option<u16> {
    let mut tokens = subject.split('.');
    let events = tokens.nth(1)?;
    if events != "ev" {
        return None;
    }
    tokens.nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_is_read_back_from_the_subject() {
        assert_eq!(partition_in_subject("stone.ev.request.completed.v2.5.r.2xx.miss.u.-"), Some(5));
        assert_eq!(partition_in_subject("stone.ev.health.worker_heartbeat.v1.0.w1"), Some(0));
        assert_eq!(partition_in_subject("stone.config.route.a"), None);
        assert_eq!(partition_in_subject("stone.ev.request"), None);
    }

    #[test]
    fn tokens_are_sanitised() {
        let mut subject = String::new();
        push_token(&mut subject, "a.b c>*");
        assert_eq!(subject, "a_b_c__");
        let mut empty = String::new();
        push_token(&mut empty, "");
        assert_eq!(empty, NONE_TOKEN);
    }

    #[test]
    fn stream_names_are_prefixed_outside_the_default_namespace() {
        assert_eq!(Namespace::default().stream_name("EVENTS"), "EVENTS");
        let test_namespace = Namespace::new("t-1a").ok();
        assert_eq!(test_namespace.map(|ns| ns.stream_name("EVENTS")), Some("T_1A_EVENTS".to_owned()));
        assert!(Namespace::new("a.b").is_err());
        assert!(Namespace::new("").is_err());
    }

    #[test]
    fn partitions_spread_and_stay_in_range() {
        let mut counts = [0u32; 8];
        for _ in 0..8_000 {
            let partition = partition_of(&Uuid::now_v7(), 8);
            counts[usize::from(partition)] += 1;
        }
        assert!(counts.iter().all(|count| *count > 700), "{counts:?}");
        assert_eq!(partition_of(&Uuid::nil(), 1), 0);
        assert_eq!(partition_of(&Uuid::nil(), 0), 0);
    }
}
