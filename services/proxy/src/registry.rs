//! The worker registry: each worker keeps a record in the NATS KV bucket `WORKERS` (per-entry
//! age limit, so a worker that dies silently disappears), which the gateway lists at
//! `GET /v1/workers`.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use serde::Serialize;
use stone_kit::admin::Readiness;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::service::ProxyService;

/// Base name of the bucket (prefixed per namespace).
pub const BUCKET: &str = "WORKERS";
/// How long a record outlives its worker's last beat.
pub const RECORD_TTL: Duration = Duration::from_secs(30);
/// How often a worker refreshes its record; a third of the TTL tolerates two lost beats.
pub const BEAT_INTERVAL: Duration = Duration::from_secs(10);
/// How often the worker looks for a status or config change to publish.
const CHANGE_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// One worker's record, as JSON in the bucket under the worker id.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerRecord {
    pub worker: String,
    /// `starting` (config not loaded yet), `ready`, or `draining`.
    pub status: &'static str,
    pub version: &'static str,
    pub config_seq: u64,
    /// RFC 3339.
    pub last_seen: String,
    pub started_at: String,
    pub listen: String,
    pub in_flight: u64,
    pub events_pending: u64,
}

/// Opens the bucket, creating it on first use: in memory, one record per live worker, each
/// lapsing after [`RECORD_TTL`] without a heartbeat.
pub async fn open_bucket(js: &jetstream::Context, name: &str) -> anyhow::Result<kv::Store> {
    stone_kit::nats::open_kv(
        js,
        name,
        "Proxy Stone workers, one record per live worker",
        RECORD_TTL,
        jetstream::stream::StorageType::Memory,
        1,
    )
    .await
}

/// Keys allow fewer characters than worker ids.
fn key_of(worker: &str) -> String {
    worker.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') { c } else { '_' }).collect()
}

/// What a worker's registration needs.
pub struct Registration {
    pub js: jetstream::Context,
    pub bucket: String,
    pub store: kv::Store,
    pub service: ProxyService,
    pub readiness: Readiness,
    pub worker: String,
    pub listen: SocketAddr,
}

/// Refreshes the record until shutdown, then marks it draining and removes it.
pub async fn run(registration: Registration, shutdown: CancellationToken) {
    let Registration { js, bucket, store, service, readiness, worker, listen } = registration;
    let started_at = stone_events::timestamp::format(OffsetDateTime::now_utc());
    let key = key_of(&worker);
    let record = |status: &'static str| WorkerRecord {
        worker: worker.clone(),
        status,
        version: stone_kit::BUILD_VERSION,
        config_seq: service.config_seq(),
        last_seen: stone_events::timestamp::format(OffsetDateTime::now_utc()),
        started_at: started_at.clone(),
        listen: listen.to_string(),
        in_flight: service.in_flight(),
        events_pending: service.events_pending() as u64,
    };
    let mut store = store;
    // Beats every BEAT_INTERVAL, and at once when the status or the config in force changes,
    // so the registry shows a config rollout as it happens.
    let mut last_written: Option<(bool, u64)> = None;
    let mut last_beat = tokio::time::Instant::now();
    loop {
        let state = (readiness.snapshot().0, service.config_seq());
        if last_written != Some(state) || last_beat.elapsed() >= BEAT_INTERVAL {
            last_beat = tokio::time::Instant::now();
            if put(&store, &key, &record(if state.0 { "ready" } else { "starting" })).await {
                last_written = Some(state);
            } else if let Ok(reopened) = open_bucket(&js, &bucket).await {
                // A NATS restart loses an in-memory bucket; open (re-create) it for the next beat.
                store = reopened;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(CHANGE_POLL_INTERVAL) => {}
            () = shutdown.cancelled() => break,
        }
    }
    put(&store, &key, &record("draining")).await;
    if let Err(error) = store.delete(&key).await {
        tracing::debug!(%error, "worker record not removed; it expires by itself");
    }
}

/// Writes the record; returns whether it was stored.
async fn put(store: &kv::Store, key: &str, record: &WorkerRecord) -> bool {
    let Ok(value) = serde_json::to_vec(record) else { return false };
    // Bounded: the registry is advisory and must not hold up shutdown while NATS is away.
    match tokio::time::timeout(Duration::from_secs(2), store.put(key, value.into())).await {
        Ok(Ok(_)) => true,
        Ok(Err(error)) => {
            tracing::debug!(%error, "worker record not refreshed");
            false
        }
        Err(_) => {
            tracing::debug!("worker record refresh timed out");
            false
        }
    }
}
