//! The envelope every event travels in, and the trait that ties a payload to its type and version.

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// A payload that can be published: it knows its event type name, its version, and the subject
/// dimensions that subscribers filter on.
pub trait EventData: Serialize + DeserializeOwned + JsonSchema + Clone + PartialEq + std::fmt::Debug {
    /// The version writers produce today.
    const VERSION: u32;

    /// The event type, e.g. `request.completed`. One payload struct may serve several types
    /// (all `cache.*` events share [`crate::cache::CacheEvent`]).
    fn event_type(&self) -> &'static str;

    /// Subject tokens after the partition token, in order (see [`crate::subjects`]).
    fn subject_dimensions(&self) -> Vec<&str>;
}

/// W3C trace context carried with an event so a request's trace continues in the projectors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TraceContext {
    /// W3C `traceparent` header value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// W3C `tracestate` header value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// The wire envelope. `id` is a UUIDv7 and doubles as the JetStream `Nats-Msg-Id`, so a
/// republished event is dropped by the stream's duplicate window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Envelope<T> {
    /// UUIDv7: time-ordered, unique, the deduplication key everywhere.
    pub id: Uuid,
    /// Event type, e.g. `request.completed`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Version of `data`'s shape for this type.
    pub version: u32,
    /// When the event happened, RFC 3339 in UTC with microseconds.
    #[serde(with = "timestamp")]
    #[schemars(with = "String")]
    pub time: OffsetDateTime,
    /// The worker or service that emitted the event.
    pub source: String,
    /// The sequence of the CONFIG stream the emitter had applied when the event happened.
    pub config_seq: u64,
    /// Trace context of the operation that caused the event.
    #[serde(default, flatten)]
    pub trace: TraceContext,
    /// The payload.
    pub data: T,
}

impl<T: EventData> Envelope<T> {
    /// A new envelope in the current version with a fresh UUIDv7 and the current time.
    pub fn new(source: impl Into<String>, config_seq: u64, data: T) -> Self {
        Self::with_id(new_event_id(), OffsetDateTime::now_utc(), source, config_seq, data)
    }

    /// An envelope with a caller-chosen id and time (the proxy uses the request id as event id).
    /// The time is truncated to microseconds, the wire's precision, so an envelope equals itself
    /// after a round trip.
    pub fn with_id(id: Uuid, time: OffsetDateTime, source: impl Into<String>, config_seq: u64, data: T) -> Self {
        let micros = time.nanosecond() / 1_000 * 1_000;
        Self {
            id,
            event_type: data.event_type().to_owned(),
            version: T::VERSION,
            time: time.replace_nanosecond(micros).unwrap_or(time),
            source: source.into(),
            config_seq,
            trace: TraceContext::default(),
            data,
        }
    }

    /// JSON bytes as published.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}

impl<T> Envelope<T> {
    /// The same envelope carrying other data; used by upcasters, which keep every envelope field.
    pub fn map_data<U>(self, version: u32, map: impl FnOnce(T) -> U) -> Envelope<U> {
        Envelope {
            id: self.id,
            event_type: self.event_type,
            version,
            time: self.time,
            source: self.source,
            config_seq: self.config_seq,
            trace: self.trace,
            data: map(self.data),
        }
    }
}

/// A new UUIDv7 event id.
pub fn new_event_id() -> Uuid {
    Uuid::now_v7()
}

/// RFC 3339 timestamps with exactly six fractional digits in UTC on write; any RFC 3339 on read.
pub mod timestamp {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::format_description::BorrowedFormatItem;
    use time::format_description::well_known::Rfc3339;
    use time::macros::format_description;
    use time::{OffsetDateTime, UtcOffset};

    const MICROS: &[BorrowedFormatItem<'static>] =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

    /// Formats a time the way envelopes carry it.
    pub fn format(time: OffsetDateTime) -> String {
        let utc = time.to_offset(UtcOffset::UTC);
        // The description has no component that can fail for a valid OffsetDateTime in UTC; fall
        // back to RFC 3339 rather than panic should that ever change.
        utc.format(MICROS).or_else(|_| utc.format(&Rfc3339)).unwrap_or_else(|_| utc.unix_timestamp().to_string())
    }

    /// Parses any RFC 3339 time.
    pub fn parse(text: &str) -> Result<OffsetDateTime, time::error::Parse> {
        match parse_written(text) {
            Some(time) => Ok(time),
            None => OffsetDateTime::parse(text, &Rfc3339),
        }
    }

    /// The shape [`format`] writes (`2026-11-22T16:00:46.359610Z`), read digit by digit: the
    /// general RFC 3339 parser costs a tenth of a projector's decoding per event. Anything else,
    /// including out-of-range fields, is left to that parser.
    fn parse_written(text: &str) -> Option<OffsetDateTime> {
        let bytes = text.as_bytes();
        if bytes.len() != 27
            || [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.'), (26, b'Z')]
                .iter()
                .any(|&(at, expected)| bytes[at] != expected)
        {
            return None;
        }
        let number = |from: usize, to: usize| -> Option<u32> {
            bytes[from..to]
                .iter()
                .try_fold(0u32, |value, &byte| byte.is_ascii_digit().then(|| value * 10 + u32::from(byte - b'0')))
        };
        let year = i32::try_from(number(0, 4)?).ok()?;
        let month = time::Month::try_from(u8::try_from(number(5, 7)?).ok()?).ok()?;
        let date = time::Date::from_calendar_date(year, month, u8::try_from(number(8, 10)?).ok()?).ok()?;
        let clock = time::Time::from_hms_micro(
            u8::try_from(number(11, 13)?).ok()?,
            u8::try_from(number(14, 16)?).ok()?,
            u8::try_from(number(17, 19)?).ok()?,
            number(20, 26)?,
        )
        .ok()?;
        Some(time::PrimitiveDateTime::new(date, clock).assume_utc())
    }

    pub fn serialize<S: Serializer>(time: &OffsetDateTime, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format(*time))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<OffsetDateTime, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}
