//! Rebuilding the config projection from CONFIG into shadow tables while the live projector keeps
//! running, then swapping them in by renaming, in one transaction.
//!
//! 1. `config_entities__rebuild` and `config_history__rebuild` are created `LIKE` the live tables;
//! 2. CONFIG is folded from sequence 1 (the fold needs every event, and CONFIG never expires)
//!    with the same [`ConfigState`] and the same writes as the live projector, in transactions of
//!    up to [`EVENTS_PER_TRANSACTION`] events, up to the stream's head at the start;
//! 3. one transaction locks the live checkpoint row (the live projector's next write waits on it),
//!    folds the events between the shadow's position and the live checkpoint into the shadow, or,
//!    when the shadow is ahead, moves the checkpoint up to it (the live projector then skips what
//!    the shadow already holds), renames the live tables away and the shadow tables in, drops the
//!    old ones and commits. Readers see the old tables or the new ones, never a mix.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use sqlx::{PgPool, Postgres, Transaction};
use stone_events::Namespace;
use stone_events::config::ConfigState;
use stone_kit::StoneConfig;
use stone_kit::config_stream::{self, Followed};
use stone_kit::rebuild::{Phase, Tracker};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::{PROJECTION, Tables, to_i64, to_u64, write_change};

/// Events written per shadow transaction.
pub const EVENTS_PER_TRANSACTION: usize = 1_000;
/// The shadow tables.
const SHADOW: Tables = Tables { entities: "config_entities__rebuild", history: "config_history__rebuild" };
/// The record key of this projection's rebuilds.
pub const REBUILD_KEY: &str = "config";

/// The outcome of a finished rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigRebuildSummary {
    /// Events folded (including skipped ones).
    pub events: u64,
    /// Undecodable messages (the live projector dead-letters them).
    pub skipped: u64,
    /// The checkpoint after the swap.
    pub checkpoint: u64,
}

/// Everything a config rebuild needs; cheap to clone.
#[derive(Clone)]
pub struct ConfigRebuilder {
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub namespace: Namespace,
    pub rebuilds: kv::Store,
}

type Stream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Followed, config_stream::FollowError>> + Send>>;

impl ConfigRebuilder {
    pub async fn connect(config: &StoneConfig, pool: PgPool, js: jetstream::Context) -> anyhow::Result<Self> {
        let namespace = config.namespace();
        let rebuilds = stone_kit::rebuild::open(&js, &namespace, config.events.replicas).await?;
        Ok(Self { pool, js, namespace, rebuilds })
    }

    /// Claims the rebuild record; fails while another rebuild of the projection is alive.
    pub async fn claim(&self, actor: &str) -> Result<Tracker, stone_kit::rebuild::StartError> {
        Tracker::start(self.rebuilds.clone(), REBUILD_KEY, actor, 1).await
    }

    /// Runs a claimed rebuild to its end and records the outcome.
    pub async fn execute(&self, tracker: &Tracker, cancel: &CancellationToken) -> anyhow::Result<ConfigRebuildSummary> {
        let outcome = stone_kit::rebuild::until_cancelled(self.run(tracker), cancel).await;
        if outcome.is_err() {
            self.drop_shadow().await.ok();
        }
        let outcome = tracker.settle(outcome).await;
        if let Ok(summary) = &outcome {
            tracing::info!(events = summary.events, checkpoint = summary.checkpoint, "config rebuild done");
        }
        outcome
    }

    async fn drop_shadow(&self) -> Result<(), sqlx::Error> {
        sqlx::query("DROP TABLE IF EXISTS config_entities__rebuild, config_history__rebuild")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn run(&self, tracker: &Tracker) -> anyhow::Result<ConfigRebuildSummary> {
        self.drop_shadow().await?;
        sqlx::query("CREATE TABLE config_entities__rebuild (LIKE config_entities INCLUDING ALL)")
            .execute(&self.pool)
            .await?;
        sqlx::query("CREATE TABLE config_history__rebuild (LIKE config_history INCLUDING ALL)")
            .execute(&self.pool)
            .await?;

        let target = config_stream::last_sequence(&self.js, &self.namespace).await?;
        let mut fold = Fold {
            state: ConfigState::default(),
            position: 0,
            skipped: 0,
            records: Box::pin(config_stream::follow(&self.js, &self.namespace, 1).await?),
            started: Instant::now(),
        };
        tracker.progress(0, target, target, 0);
        while fold.position < target {
            tracker.check()?;
            let mut transaction = self.pool.begin().await?;
            let upto = target.min(fold.position + EVENTS_PER_TRANSACTION as u64);
            fold.advance(&mut transaction, upto).await?;
            transaction.commit().await?;
            tracker.progress(fold.position, target, target, fold.skipped);
        }

        tracker.phase(Phase::Swapping).await?;
        let mut transaction = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, stream_seq) VALUES ($1, 0) ON CONFLICT DO NOTHING",
        )
        .bind(PROJECTION)
        .execute(&mut *transaction)
        .await?;
        let live: i64 =
            sqlx::query_scalar("SELECT stream_seq FROM projection_checkpoints WHERE projection = $1 FOR UPDATE")
                .bind(PROJECTION)
                .fetch_one(&mut *transaction)
                .await?;
        let live = to_u64(live);
        if live > fold.position {
            // The live projector went on while we built: take the same events, under its lock.
            fold.advance(&mut transaction, live).await?;
        } else if live < fold.position {
            // We are ahead (the live projector is slow or stopped): it must not write these again.
            sqlx::query("UPDATE projection_checkpoints SET stream_seq = $2, updated_at = now() WHERE projection = $1")
                .bind(PROJECTION)
                .bind(to_i64(fold.position))
                .execute(&mut *transaction)
                .await?;
        }
        swap(&mut transaction).await?;
        transaction.commit().await?;
        tracker.progress(fold.position, fold.position, fold.position, fold.skipped);
        Ok(ConfigRebuildSummary { events: fold.position, skipped: fold.skipped, checkpoint: fold.position.max(live) })
    }
}

/// Renames the shadow tables (and their indexes) over the live ones.
async fn swap(transaction: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
    for statement in [
        "ALTER TABLE config_entities RENAME TO config_entities__old",
        "ALTER TABLE config_history RENAME TO config_history__old",
        "ALTER TABLE config_entities__rebuild RENAME TO config_entities",
        "ALTER TABLE config_history__rebuild RENAME TO config_history",
        "DROP TABLE config_entities__old, config_history__old",
    ] {
        sqlx::query(statement).execute(&mut **transaction).await?;
    }
    // `LIKE … INCLUDING ALL` named the indexes after the shadow tables; give them stable names
    // so the next rebuild's shadow indexes do not collide.
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() \
         AND tablename IN ('config_entities', 'config_history') AND indexname LIKE '%\\_\\_rebuild%'",
    )
    .fetch_all(&mut **transaction)
    .await?;
    for index in indexes {
        let renamed = index.replace("__rebuild", "");
        // Both names come from the catalog and are quoted as identifiers.
        sqlx::query(&format!("ALTER INDEX \"{}\" RENAME TO \"{}\"", index.replace('"', ""), renamed.replace('"', "")))
            .execute(&mut **transaction)
            .await?;
    }
    Ok(())
}

struct Fold {
    state: ConfigState,
    position: u64,
    skipped: u64,
    records: Stream,
    started: Instant,
}

impl Fold {
    /// Folds and writes into the shadow every event up to `upto`.
    async fn advance(&mut self, transaction: &mut Transaction<'_, Postgres>, upto: u64) -> anyhow::Result<()> {
        while self.position < upto {
            let next = tokio::time::timeout(Duration::from_secs(10), self.records.next())
                .await
                .map_err(|_| anyhow::anyhow!("CONFIG stopped delivering at sequence {}", self.position))?;
            let Some(followed) = next else { anyhow::bail!("CONFIG follower ended at sequence {}", self.position) };
            let followed = followed?;
            let stream_seq = followed.stream_seq();
            match followed {
                Followed::Change(record) => {
                    let effective_at: OffsetDateTime = record.envelope.time;
                    let applied = self.state.apply_tracked(stream_seq, record.envelope.data);
                    for change in &applied {
                        write_change(transaction, change, stream_seq, effective_at, SHADOW).await?;
                    }
                }
                Followed::Skipped(_) => self.skipped += 1,
            }
            self.position = stream_seq;
        }
        tracing::debug!(position = self.position, elapsed = ?self.started.elapsed(), "config rebuild progress");
        Ok(())
    }
}
