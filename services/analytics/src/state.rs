//! Partition state in a JetStream key-value bucket: who owns a partition (the lease), how far its
//! events are in ClickHouse (the checkpoint), and the batch being written (the intent).
//!
//! One key per partition holds all three, so every write is one compare-and-set on that key's
//! revision. That makes the revision a fencing token: an instance that lost its lease (paused,
//! partitioned, slow) fails its next write and stops, and it can never move a checkpoint that
//! another instance advanced. The bucket has no TTL because the checkpoint must never expire;
//! a lease expires by its `lease_expires_ms`, which any instance can read.

use async_nats::jetstream::kv::{self, CreateErrorKind, Store, UpdateErrorKind};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A batch whose inserts may have started: its stream-sequence range within the partition.
/// Whoever owns the partition next re-reads exactly this range and inserts it again with the
/// same deduplication tokens, so a batch cut short by a crash is completed, never doubled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingBatch {
    /// First stream sequence of the batch (the first event after the checkpoint).
    pub first: u64,
    /// Last stream sequence of the batch, inclusive.
    pub last: u64,
}

/// The value of a partition's key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PartitionState {
    /// Instance holding the lease; empty when released.
    pub owner: String,
    /// Incremented on every change of owner; names the owner's consumer.
    pub epoch: u64,
    /// Unix milliseconds after which another instance may take the partition.
    pub lease_expires_ms: i64,
    /// Every event of the partition up to this stream sequence is in ClickHouse.
    pub committed_through: u64,
    pub pending: Option<PendingBatch>,
    /// Events of the partition in the stream after `committed_through`, as last seen.
    pub pending_events: u64,
    /// Age of the oldest event not yet in ClickHouse, as last seen (0 when caught up).
    pub seconds_behind: f64,
    /// Events of the partition the projection has committed since the key was created.
    pub committed_events: u64,
    /// Unix milliseconds of the last write.
    pub updated_ms: i64,
    /// Id of the rebuild this partition is paused for: set by the owner at a batch boundary
    /// (or by the rebuild itself for a partition nobody owns) and cleared once the rebuild has
    /// swapped its tables in. While set, nothing of the partition is written to ClickHouse.
    pub paused_by: String,
}

impl PartitionState {
    pub fn lease_expired(&self, now_ms: i64) -> bool {
        self.owner.is_empty() || self.lease_expires_ms <= now_ms
    }
}

/// A state read together with the revision it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub state: PartitionState,
    pub revision: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Another instance wrote the key since we read it: we are no longer the owner.
    #[error("partition state changed under us (lease lost)")]
    Conflict,
    #[error("partition state is not valid JSON: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("key-value store: {0}")]
    Store(String),
}

impl StateError {
    /// Whether retrying the same write can succeed (a conflict never can).
    pub fn is_retriable(&self) -> bool {
        matches!(self, Self::Store(_))
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// The key of a partition.
pub fn partition_key(partition: u16) -> String {
    format!("p{partition}")
}

/// Opens (creating if needed) the bucket. No TTL: checkpoints must never expire.
pub async fn open_bucket(js: &async_nats::jetstream::Context, bucket: &str, replicas: usize) -> anyhow::Result<Store> {
    stone_kit::nats::open_kv(
        js,
        bucket,
        "Proxy Stone analytics projector: partition leases and checkpoints",
        std::time::Duration::ZERO,
        async_nats::jetstream::stream::StorageType::File,
        replicas,
    )
    .await
}

/// Reads a key's state, if it exists.
pub async fn read(store: &Store, key: &str) -> Result<Option<Versioned>, StateError> {
    let entry = store.entry(key).await.map_err(|error| StateError::Store(error.to_string()))?;
    match entry {
        Some(entry) if entry.operation == kv::Operation::Put => {
            let state: PartitionState = serde_json::from_slice(&entry.value)?;
            Ok(Some(Versioned { state, revision: entry.revision }))
        }
        _ => Ok(None),
    }
}

/// Creates a key that must not exist yet.
pub async fn create(store: &Store, key: &str, state: PartitionState) -> Result<Versioned, StateError> {
    let value = Bytes::from(serde_json::to_vec(&state)?);
    match store.create(key, value).await {
        Ok(revision) => Ok(Versioned { state, revision }),
        Err(error) if error.kind() == CreateErrorKind::AlreadyExists => Err(StateError::Conflict),
        Err(error) => Err(StateError::Store(error.to_string())),
    }
}

/// Writes `state` if the key is still at `current.revision`; returns the new version.
pub async fn write(
    store: &Store,
    key: &str,
    current: &Versioned,
    mut state: PartitionState,
) -> Result<Versioned, StateError> {
    state.updated_ms = now_ms();
    let value = Bytes::from(serde_json::to_vec(&state)?);
    match store.update(key, value, current.revision).await {
        Ok(revision) => Ok(Versioned { state, revision }),
        Err(error) if error.kind() == UpdateErrorKind::WrongLastRevision => Err(StateError::Conflict),
        Err(error) => Err(StateError::Store(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_or_stale_lease_is_expired() {
        let mut state = PartitionState { owner: "a".into(), lease_expires_ms: 1_000, ..Default::default() };
        assert!(!state.lease_expired(999));
        assert!(state.lease_expired(1_000));
        state.owner.clear();
        assert!(state.lease_expired(0));
    }

    #[test]
    fn state_round_trips_and_tolerates_older_values() -> Result<(), serde_json::Error> {
        let state = PartitionState {
            owner: "a".into(),
            epoch: 3,
            committed_through: 42,
            pending: Some(PendingBatch { first: 43, last: 50 }),
            ..Default::default()
        };
        let json = serde_json::to_vec(&state)?;
        assert_eq!(serde_json::from_slice::<PartitionState>(&json)?, state);
        let minimal: PartitionState = serde_json::from_str(
            r#"{"owner":"","epoch":0,"lease_expires_ms":0,"committed_through":7,"pending":null,"pending_events":0,"seconds_behind":0.0,"committed_events":0,"updated_ms":0}"#,
        )?;
        assert_eq!(minimal.committed_through, 7);
        Ok(())
    }
}
