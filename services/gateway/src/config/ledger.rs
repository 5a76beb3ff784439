//! The write side of the config API: an in-memory fold of CONFIG (the same [`ConfigState`] the
//! projector and the proxies run) to validate commands against, and the append path with
//! optimistic concurrency.
//!
//! Every append carries two expectations: `Nats-Expected-Last-Sequence` (the stream's last
//! sequence the command was validated against) and `Nats-Expected-Last-Subject-Sequence` (the
//! entity subject's last sequence). The first makes validation across entities sound (nobody
//! deleted the upstream a new route names in between); the second is the per-entity guard the
//! contract promises. A command that loses the race is validated again on the new state, a few
//! times, so writers to different entities do not fail each other; a writer whose precondition no
//! longer holds gets 409 or 412.
//!
//! A change set is published member after member, each expecting the previous member's sequence,
//! so its members are contiguous. NATS 2.9 has no atomic batch publish: if a member fails, the
//! members already published stay in the stream as an incomplete set, which every reader ignores
//! and the next event abandons for good (see [`ConfigState::apply`]). Workers and the projection
//! therefore see all of a set or none of it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use futures::StreamExt;
use stone_events::config::validation::{ProposedChange, validate_changes};
use stone_events::config::{ChangeSet, ConfigChange, ConfigOp, ConfigState, EntityKind};
use stone_events::streams::headers;
use stone_events::{Envelope, EventData, Namespace};
use stone_kit::config_stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::error::ConfigApiError;

/// How long a command waits for the fold to reach the stream's end before giving up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts of a command that keeps losing races before it answers 409.
const MAX_ATTEMPTS: usize = 5;

/// The fold and what the append path needs besides it.
#[derive(Debug, Default, Clone)]
pub struct LedgerState {
    pub config: ConfigState,
    /// Last sequence seen in the stream (the fold's position, including incomplete sets).
    pub last_seq: u64,
    /// Last sequence of each entity subject.
    subject_seq: HashMap<(EntityKind, String), u64>,
    /// Last version each entity had, deletes included, so versions never repeat on a subject.
    last_version: HashMap<(EntityKind, String), u64>,
}

impl LedgerState {
    fn record(&mut self, followed: config_stream::Followed) {
        let record = match followed {
            config_stream::Followed::Change(record) => *record,
            config_stream::Followed::Skipped(skipped) => {
                self.last_seq = skipped.stream_seq;
                return;
            }
        };
        let key = (record.envelope.data.kind, record.envelope.data.name.clone());
        self.subject_seq.insert(key, record.stream_seq);
        for applied in self.config.apply_tracked(record.stream_seq, record.envelope.data) {
            let key = (applied.change.kind, applied.change.name.clone());
            let version = self.last_version.entry(key).or_default();
            *version = (*version).max(applied.change.version);
        }
        self.last_seq = record.stream_seq;
    }

    pub fn subject_seq(&self, kind: EntityKind, name: &str) -> u64 {
        self.subject_seq.get(&(kind, name.to_owned())).copied().unwrap_or(0)
    }

    /// The version the next change of an entity gets.
    pub fn next_version(&self, kind: EntityKind, name: &str) -> u64 {
        self.last_version.get(&(kind, name.to_owned())).copied().unwrap_or(0) + 1
    }
}

/// What a committed command wrote.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The events, with their stream sequences, in order.
    pub events: Vec<(u64, ConfigChange)>,
    pub change_set: Option<Uuid>,
}

impl Committed {
    /// The sequence to wait for when reading one's own write.
    pub fn last_seq(&self) -> u64 {
        self.events.last().map_or(0, |(seq, _)| *seq)
    }
}

/// The gateway's handle on the config ledger. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    js: jetstream::Context,
    namespace: Namespace,
    source: String,
    state: Arc<RwLock<LedgerState>>,
    seen: watch::Receiver<u64>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Ledger").field("namespace", &self.namespace).finish_non_exhaustive()
    }
}

impl Ledger {
    /// Starts following CONFIG from the beginning on a task that stops with `token`.
    pub fn start(
        js: jetstream::Context,
        namespace: Namespace,
        source: String,
        token: CancellationToken,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let state = Arc::new(RwLock::new(LedgerState::default()));
        let (seen_sender, seen) = watch::channel(0);
        let follower = follow(js.clone(), namespace.clone(), Arc::clone(&state), seen_sender, token);
        (Self { js, namespace, source, state, seen }, follower)
    }

    /// A copy of the fold as of now.
    pub fn snapshot(&self) -> LedgerState {
        self.state.read().map(|state| state.clone()).unwrap_or_default()
    }

    /// A copy of the fold once it has caught up with the stream's end.
    pub async fn current(&self) -> Result<LedgerState, ConfigApiError> {
        let last = config_stream::last_sequence(&self.js, &self.namespace).await.map_err(ConfigApiError::nats)?;
        let mut seen = self.seen.clone();
        let reached = tokio::time::timeout(CATCH_UP_TIMEOUT, seen.wait_for(|position| *position >= last)).await;
        match reached {
            Ok(Ok(_)) => Ok(self.snapshot()),
            Ok(Err(_)) => Err(ConfigApiError::Internal(anyhow::anyhow!("config follower stopped"))),
            Err(_) => Err(ConfigApiError::Lagging { wanted: last, reached: *self.seen.borrow() }),
        }
    }

    /// Validates and appends the changes `decide` asks for, as one change set when there are
    /// several. `decide` sees the current state and may refuse (404, 409, 412); it runs again
    /// when another writer got in first.
    pub async fn commit<F>(&self, actor: &str, mut decide: F) -> Result<Committed, ConfigApiError>
    where
        F: FnMut(&LedgerState) -> Result<Vec<ProposedChange>, ConfigApiError>,
    {
        for _attempt in 0..MAX_ATTEMPTS {
            let state = self.current().await?;
            let proposed = decide(&state)?;
            if proposed.is_empty() {
                return Ok(Committed { events: Vec::new(), change_set: None });
            }
            validate_changes(&state.config, &proposed)?;
            match self.append(&state, actor, &proposed).await? {
                Some(committed) => return Ok(committed),
                None => continue,
            }
        }
        Err(ConfigApiError::Conflict("the configuration kept changing concurrently; nothing was applied".to_owned()))
    }

    /// Publishes the changes; `None` when the first one lost a race (nothing was written).
    async fn append(
        &self,
        state: &LedgerState,
        actor: &str,
        proposed: &[ProposedChange],
    ) -> Result<Option<Committed>, ConfigApiError> {
        let size = u32::try_from(proposed.len()).unwrap_or(u32::MAX);
        let set_id = (size > 1).then(Uuid::now_v7);
        let mut previous_seq = state.last_seq;
        let mut events = Vec::with_capacity(proposed.len());
        for (index, change) in proposed.iter().enumerate() {
            let kind = change.kind();
            let name = change.name().to_owned();
            let existing = state.config.get(kind, &name);
            let (op, spec) = match change {
                ProposedChange::Upsert(spec) => (ConfigOp::Upserted, Some(spec.as_ref().clone())),
                ProposedChange::Delete { .. } => (ConfigOp::Deleted, None),
            };
            let event = ConfigChange {
                kind,
                name: name.clone(),
                id: existing.map_or_else(Uuid::now_v7, |entity| entity.id),
                version: state.next_version(kind, &name),
                op,
                actor: actor.to_owned(),
                spec,
                change_set: set_id.map(|id| ChangeSet { id, index: u32::try_from(index).unwrap_or(u32::MAX), size }),
            };
            let subject_seq = state.subject_seq(kind, &name);
            match self.publish(&event, previous_seq, subject_seq).await {
                Ok(sequence) => {
                    previous_seq = sequence;
                    events.push((sequence, event));
                }
                Err(PublishOutcome::LostRace) if index == 0 => return Ok(None),
                Err(PublishOutcome::LostRace) => {
                    metrics::counter!("stone_config_change_sets_abandoned_total").increment(1);
                    return Err(ConfigApiError::Conflict(
                        "another writer interrupted this change set; none of it was applied, retry".to_owned(),
                    ));
                }
                Err(PublishOutcome::Failed(error)) => {
                    if index > 0 {
                        metrics::counter!("stone_config_change_sets_abandoned_total").increment(1);
                    }
                    return Err(error);
                }
            }
        }
        metrics::counter!("stone_config_events_appended_total").increment(events.len() as u64);
        Ok(Some(Committed { events, change_set: set_id }))
    }

    async fn publish(
        &self,
        event: &ConfigChange,
        expected_last: u64,
        expected_subject: u64,
    ) -> Result<u64, PublishOutcome> {
        let envelope = Envelope::new(self.source.clone(), expected_last, event.clone());
        let payload =
            envelope.to_json().map_err(|error| PublishOutcome::Failed(ConfigApiError::Internal(error.into())))?;
        let message = PublishMessage::build()
            .payload(payload.into())
            .message_id(envelope.id.to_string())
            .header(headers::EVENT_TYPE, event.event_type())
            .header(headers::EVENT_VERSION, ConfigChange::VERSION.to_string().as_str())
            .expected_last_sequence(expected_last)
            .expected_last_subject_sequence(expected_subject);
        let subject = self.namespace.config_subject(event.kind.as_str(), &event.name);
        let ack = self
            .js
            .send_publish(subject, message)
            .await
            .map_err(|error| PublishOutcome::Failed(ConfigApiError::nats(error)))?;
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => Err(PublishOutcome::LostRace),
            Err(error) => Err(PublishOutcome::Failed(ConfigApiError::nats(error))),
        }
    }
}

enum PublishOutcome {
    LostRace,
    Failed(ConfigApiError),
}

/// Keeps the fold current; after an error it resumes after the last sequence it saw.
async fn follow(
    js: jetstream::Context,
    namespace: Namespace,
    state: Arc<RwLock<LedgerState>>,
    seen: watch::Sender<u64>,
    token: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    while !token.is_cancelled() {
        let start = state.read().map(|state| state.last_seq).unwrap_or(0) + 1;
        let stream = match config_stream::follow(&js, &namespace, start).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "cannot follow the config stream; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => delay = (delay * 2).min(Duration::from_secs(5)),
                    () = token.cancelled() => return,
                }
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                () = token.cancelled() => return,
            };
            match next {
                Some(Ok(record)) => {
                    delay = Duration::from_millis(100);
                    let sequence = record.stream_seq();
                    if let Ok(mut state) = state.write() {
                        if sequence <= state.last_seq {
                            continue;
                        }
                        state.record(record);
                    }
                    seen.send_replace(sequence);
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "config stream follower failed; resuming");
                    break;
                }
                None => break,
            }
        }
    }
}
