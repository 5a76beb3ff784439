//! Reading the CONFIG stream in order, from a given sequence, as decoded config changes.
//!
//! Every reader of the configuration (the Postgres projector, the gateway's write-side view, the
//! proxy workers) folds the same events with [`stone_events::config::ConfigState`]; this module is
//! the one way to get those events, so they all see the same sequence and skip the same
//! undecodable messages.

use async_nats::jetstream::{self, consumer};
use futures::{Stream, StreamExt};
use stone_events::config::ConfigChange;
use stone_events::streams::CONFIG;
use stone_events::{Envelope, Event, Namespace};

/// One decoded CONFIG event and where it is in the stream.
#[derive(Debug, Clone)]
pub struct ConfigRecord {
    pub stream_seq: u64,
    pub envelope: Envelope<ConfigChange>,
}

/// What a follower gets for each stream position.
#[derive(Debug, Clone)]
pub enum Followed {
    Change(Box<ConfigRecord>),
    /// A message that is not a decodable config change (logged and counted). Readers still
    /// advance past it, so a checkpoint or a read-your-writes wait is never stuck behind it; the
    /// projector sends it to DEADLETTER.
    Skipped(Box<SkippedMessage>),
}

/// A CONFIG message no reader can apply, and why.
#[derive(Debug, Clone)]
pub struct SkippedMessage {
    pub stream_seq: u64,
    pub subject: String,
    /// The `DecodeError` text (or why a decodable event does not belong in CONFIG).
    pub reason: String,
    pub reason_code: &'static str,
    pub payload: bytes::Bytes,
}

impl Followed {
    pub fn stream_seq(&self) -> u64 {
        match self {
            Self::Change(record) => record.stream_seq,
            Self::Skipped(skipped) => skipped.stream_seq,
        }
    }
}

/// Why following the stream failed; every variant is worth a retry from the last good sequence.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("config stream {stream}: {message}")]
    Nats { stream: String, message: String },
}

fn nats_error(stream: &str, error: impl std::fmt::Display) -> FollowError {
    FollowError::Nats { stream: stream.to_owned(), message: error.to_string() }
}

/// The sequence of the last message in CONFIG (0 when empty).
pub async fn last_sequence(js: &jetstream::Context, namespace: &Namespace) -> Result<u64, FollowError> {
    let name = namespace.stream_name(CONFIG);
    let stream = js.get_stream(&name).await.map_err(|error| nats_error(&name, error))?;
    let info = stream.get_info().await.map_err(|error| nats_error(&name, error))?;
    Ok(info.state.last_sequence)
}

/// Every CONFIG event from `start_seq` (1 for all), in stream order, through an ordered
/// consumer (ephemeral, flow-controlled, recreated by the client on gaps). The stream never ends;
/// events that do not decode as a config change are logged, counted and reported as skipped.
pub async fn follow(
    js: &jetstream::Context,
    namespace: &Namespace,
    start_seq: u64,
) -> Result<impl Stream<Item = Result<Followed, FollowError>> + use<>, FollowError> {
    let name = namespace.stream_name(CONFIG);
    let stream = js.get_stream(&name).await.map_err(|error| nats_error(&name, error))?;
    let ordered = stream
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: js.client().new_inbox(),
            filter_subject: namespace.config_wildcard(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: start_seq.max(1) },
            ..Default::default()
        })
        .await
        .map_err(|error| nats_error(&name, error))?;
    let messages = ordered.messages().await.map_err(|error| nats_error(&name, error))?;
    let stream_name = name.clone();
    Ok(messages.then(move |message| {
        let stream_name = stream_name.clone();
        async move {
            let message = match message {
                Ok(message) => message,
                Err(error) => return Err(nats_error(&stream_name, error)),
            };
            let stream_seq = match message.info() {
                Ok(info) => info.stream_sequence,
                Err(error) => return Err(nats_error(&stream_name, error)),
            };
            let skipped = |reason: String, reason_code: &'static str| {
                Followed::Skipped(Box::new(SkippedMessage {
                    stream_seq,
                    subject: message.subject.to_string(),
                    reason,
                    reason_code,
                    payload: message.payload.clone(),
                }))
            };
            match stone_events::decode(&message.payload) {
                Ok(Event::Config(envelope)) => Ok(Followed::Change(Box::new(ConfigRecord { stream_seq, envelope }))),
                Ok(other) => {
                    tracing::warn!(stream_seq, event_type = other.event_type(), "non-config event in CONFIG, skipped");
                    metrics::counter!("stone_config_events_skipped_total", "reason" => "wrong_family").increment(1);
                    Ok(skipped(format!("{} is not a config event", other.event_type()), "wrong_family"))
                }
                Err(error) => {
                    tracing::warn!(stream_seq, %error, "undecodable config event, skipped");
                    metrics::counter!("stone_config_events_skipped_total", "reason" => error.reason_code())
                        .increment(1);
                    Ok(skipped(error.to_string(), error.reason_code()))
                }
            }
        }
    }))
}
