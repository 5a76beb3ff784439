//! Partition ownership across projector instances.
//!
//! Every instance announces itself in the bucket (`members.<instance>`, refreshed each tick) and
//! aims for an equal share of the partitions: `ceil(partitions / live instances)`. It takes
//! partitions whose lease is free or expired (compare-and-set, so two instances cannot both win)
//! and gives back partitions above its share, which a newcomer then picks up. So adding an
//! instance adds throughput, and the partitions of an instance that died are taken over once
//! their leases expire.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::partition::{self, Exit, ProjectorContext};
use crate::state::{self, PartitionState, StateError, Versioned};

#[derive(Debug, Serialize, Deserialize)]
struct Member {
    expires_ms: i64,
}

struct Owned {
    release: CancellationToken,
    task: JoinHandle<Exit>,
}

fn member_key(instance: &str) -> String {
    format!("members.{instance}")
}

/// Runs until `shutdown`; then releases every partition and waits for the workers.
pub async fn run(context: Arc<ProjectorContext>, partitions: u16, shutdown: CancellationToken) {
    let tick = (context.lease_ttl / 4).max(Duration::from_millis(250));
    let mut owned: BTreeMap<u16, Owned> = BTreeMap::new();
    // Instances start scanning at different partitions so that simultaneous starts spread.
    let offset = u16::try_from(
        context.instance_id.bytes().fold(0u32, |hash, byte| hash.wrapping_mul(31).wrapping_add(u32::from(byte)))
            % u32::from(partitions.max(1)),
    )
    .unwrap_or(0);
    loop {
        // Bounded: a KV call that never answers must not stop this instance from announcing
        // itself and rebalancing for good. A tick cut short is safe to repeat: a lease written
        // in our name but not yet run is taken back by the next tick.
        match tokio::time::timeout(context.lease_ttl, tick_once(&context, partitions, offset, &mut owned, &shutdown))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "partition coordination failed; retrying"),
            Err(_) => tracing::warn!("partition coordination did not finish within the lease; retrying"),
        }
        metrics::gauge!("stone_analytics_instances_partitions_target").set(owned.len() as f64);
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = shutdown.cancelled() => break,
        }
    }
    for worker in owned.values() {
        worker.release.cancel();
    }
    for (_, worker) in owned {
        let _ = worker.task.await;
    }
    let _ = context.store.delete(member_key(&context.instance_id)).await;
}

async fn tick_once(
    context: &Arc<ProjectorContext>,
    partitions: u16,
    offset: u16,
    owned: &mut BTreeMap<u16, Owned>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let now = state::now_ms();
    let ttl_ms = i64::try_from(context.lease_ttl.as_millis()).unwrap_or(i64::MAX);
    let me = Member { expires_ms: now + ttl_ms };
    context
        .store
        .put(member_key(&context.instance_id), Bytes::from(serde_json::to_vec(&me)?))
        .await
        .map_err(|error| anyhow::anyhow!("cannot announce instance: {error}"))?;

    owned.retain(|_, worker| !worker.task.is_finished());
    let live = live_members(context, now).await?.max(1);
    let share = usize::from(partitions).div_ceil(live);

    // Above our share: give back the highest partitions (they finish their batch first).
    let excess = owned.len().saturating_sub(share);
    for (partition, worker) in owned.iter().rev().take(excess) {
        tracing::info!(partition, share, "releasing partition to rebalance");
        worker.release.cancel();
    }
    if excess > 0 {
        return Ok(());
    }

    for step in 0..partitions {
        if owned.len() >= share || shutdown.is_cancelled() {
            break;
        }
        let partition = (offset + step) % partitions;
        if owned.contains_key(&partition) {
            continue;
        }
        match try_acquire(context, partition, now).await {
            Ok(Some(lease)) => {
                let release = shutdown.child_token();
                let task = tokio::spawn(partition::run(Arc::clone(context), partition, lease, release.clone()));
                owned.insert(partition, Owned { release, task });
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(partition, %error, "cannot acquire partition"),
        }
    }
    Ok(())
}

async fn live_members(context: &ProjectorContext, now: i64) -> anyhow::Result<usize> {
    let mut keys = context.store.keys().await.map_err(|error| anyhow::anyhow!("cannot list members: {error}"))?;
    let mut live = 0;
    while let Some(key) = keys.next().await {
        let Ok(key) = key else { continue };
        if !key.starts_with("members.") {
            continue;
        }
        let Ok(Some(value)) = context.store.get(&key).await else { continue };
        match serde_json::from_slice::<Member>(&value) {
            Ok(member) if member.expires_ms > now => live += 1,
            // A member that stopped without deleting its key; tidy up after a while.
            Ok(member) if member.expires_ms + 60_000 < now => {
                let _ = context.store.delete(&key).await;
            }
            _ => {}
        }
    }
    Ok(live)
}

/// Takes the partition if its lease is free or expired. A partition seen for the first time
/// starts at the highest stream sequence already in ClickHouse, so upgrading from a projector
/// without checkpoints neither loses nor repeats events.
async fn try_acquire(context: &ProjectorContext, partition: u16, now: i64) -> Result<Option<Versioned>, StateError> {
    let key = state::partition_key(partition);
    let expires = now + i64::try_from(context.lease_ttl.as_millis()).unwrap_or(i64::MAX);
    let Some(current) = state::read(&context.store, &key).await? else {
        let watermark = crate::sink::stored_watermark(&context.sink.clickhouse, partition)
            .await
            .map_err(|error| StateError::Store(format!("clickhouse watermark: {error}")))?;
        let initial = PartitionState {
            owner: context.instance_id.clone(),
            epoch: 1,
            lease_expires_ms: expires,
            committed_through: watermark,
            ..PartitionState::default()
        };
        return match state::create(&context.store, &key, initial).await {
            Ok(created) => Ok(Some(created)),
            Err(StateError::Conflict) => Ok(None),
            Err(error) => Err(error),
        };
    };
    // Our own name on a lease we do not run: a previous life of this instance; take it back.
    let ours = current.state.owner == context.instance_id;
    if !ours && !current.state.lease_expired(now) {
        return Ok(None);
    }
    let mut next = current.state.clone();
    next.owner = context.instance_id.clone();
    next.epoch += 1;
    next.lease_expires_ms = expires;
    match state::write(&context.store, &key, &current, next).await {
        Ok(acquired) => Ok(Some(acquired)),
        Err(StateError::Conflict) => Ok(None),
        Err(error) => Err(error),
    }
}
