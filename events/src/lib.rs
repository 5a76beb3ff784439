//! The Proxy Stone event contract: what workers publish and what projectors read.
//!
//! Everything on the wire is defined here and nowhere else: the [`Envelope`], every event type
//! and each of its published versions, the NATS subjects that carry them, the JetStream stream
//! definitions, and the upcasters that turn any published version into the current one. The crate
//! does no I/O so that every service, test and tool can share it without pulling a runtime in.
//!
//! Rules that keep old data readable (see `docs/events.md`):
//! - a published version's wire type is append-only: new fields are optional with a default;
//! - a change that removes or reinterprets a field is a new version with an upcaster;
//! - writers always write the current version; readers accept every version ever published.

pub mod cache;
pub mod config;
mod decode;
mod envelope;
pub mod health;
pub mod request;
pub mod schema;
pub mod streams;
pub mod subjects;

pub use decode::{DecodeError, Event, KNOWN_EVENT_TYPES, decode};
pub use envelope::{Envelope, EventData, TraceContext, new_event_id, timestamp};
pub use subjects::Namespace;
