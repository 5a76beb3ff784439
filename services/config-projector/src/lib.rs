//! The config projector: folds the CONFIG stream into Postgres (`config_entities`,
//! `config_history`) with [`ConfigState`], the same fold every proxy worker runs.
//!
//! Exactly-once effect: each event's effects and the checkpoint
//! (`projection_checkpoints.projection = 'config'`) are written in one transaction, so a crash at
//! any point leaves either all of an event or none of it. On start the projector replays CONFIG
//! from sequence 1 into memory without writing, up to the checkpoint, and writes only after it:
//! the in-memory fold (including members of a change set that is still open) is then exactly what
//! it was before the crash. CONFIG is small (one event per config change) and never expires, so
//! the replay is cheap and always possible.
//!
//! Several instances may run: the checkpoint row is locked in each transaction and an event at or
//! below it is skipped, so a second instance only ever writes what the first did not.

use std::time::Duration;

use futures::StreamExt;
use sqlx::{PgPool, Postgres, Transaction};
use stone_events::Namespace;
use stone_events::config::{AppliedChange, ConfigOp, ConfigState, EntitySpec};
use stone_kit::config_stream::{self, Followed};
use stone_kit::{Shutdown, StoneConfig};

pub mod rebuild;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// The checkpoint row's name.
pub const PROJECTION: &str = "config";

const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Why a projection step failed; both are retried from the checkpoint with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error(transparent)]
    Nats(#[from] config_stream::FollowError),
    #[error("encoding a spec: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("dead-lettering: {0}")]
    DeadLetter(String),
}

/// A running projector's handle.
#[derive(Debug)]
pub struct RunningProjector {
    pub task: tokio::task::JoinHandle<()>,
}

/// Connects Postgres (applying migrations) and NATS (provisioning streams), then runs the
/// projection on a task tracked by `shutdown`.
pub async fn build(config: &StoneConfig, shutdown: &Shutdown) -> anyhow::Result<RunningProjector> {
    let pool = stone_kit::postgres::connect(config, 4).await?;
    stone_kit::postgres::migrate(&pool).await?;
    let (_client, js) = stone_kit::nats::connect_and_provision(config, "stone-config-projector").await?;
    let task = shutdown.spawn(run(pool, js, config.namespace(), shutdown.token()));
    tracing::info!(namespace = %config.namespace, "config projector started");
    Ok(RunningProjector { task })
}

/// Runs until `token` is cancelled, restarting from the checkpoint after any failure.
pub async fn run(pool: PgPool, js: async_nats::jetstream::Context, namespace: Namespace, token: CancellationToken) {
    let mut delay = Duration::from_millis(100);
    while !token.is_cancelled() {
        let outcome = tokio::select! {
            outcome = project(&pool, &js, &namespace, &mut delay) => outcome,
            () = token.cancelled() => return,
        };
        if let Err(error) = outcome {
            metrics::counter!("stone_config_projector_errors_total").increment(1);
            tracing::warn!(%error, "config projection failed; restarting from the checkpoint");
            tokio::select! {
                () = tokio::time::sleep(delay) => delay = (delay * 2).min(MAX_BACKOFF),
                () = token.cancelled() => return,
            }
        }
    }
}

/// The stored checkpoint (0 before the first event).
pub async fn checkpoint(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let stored: Option<i64> = sqlx::query_scalar("SELECT stream_seq FROM projection_checkpoints WHERE projection = $1")
        .bind(PROJECTION)
        .fetch_optional(pool)
        .await?;
    Ok(stored.map_or(0, to_u64))
}

/// Empties the projection so that it is rebuilt from the stream by the next (re)start.
pub async fn reset(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut transaction = pool.begin().await?;
    sqlx::query("DELETE FROM config_entities").execute(&mut *transaction).await?;
    sqlx::query("DELETE FROM config_history").execute(&mut *transaction).await?;
    sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1")
        .bind(PROJECTION)
        .execute(&mut *transaction)
        .await?;
    transaction.commit().await
}

/// One pass: replay to the checkpoint in memory, then write every later event.
async fn project(
    pool: &PgPool,
    js: &async_nats::jetstream::Context,
    namespace: &Namespace,
    delay: &mut Duration,
) -> Result<(), ProjectError> {
    sqlx::query("INSERT INTO projection_checkpoints (projection, stream_seq) VALUES ($1, 0) ON CONFLICT DO NOTHING")
        .bind(PROJECTION)
        .execute(pool)
        .await?;
    let stored = checkpoint(pool).await?;
    let mut state = ConfigState::default();
    let mut records = std::pin::pin!(config_stream::follow(js, namespace, 1).await?);
    tracing::info!(checkpoint = stored, "config projector replaying to its checkpoint");
    while let Some(followed) = records.next().await {
        let followed = followed?;
        let stream_seq = followed.stream_seq();
        let (applied, effective_at, skipped) = match followed {
            Followed::Change(record) => {
                (state.apply_tracked(stream_seq, record.envelope.data), record.envelope.time, None)
            }
            Followed::Skipped(skipped) => (Vec::new(), OffsetDateTime::now_utc(), Some(skipped)),
        };
        if stream_seq <= stored {
            continue;
        }
        if let Some(skipped) = skipped {
            // Before the checkpoint moves past it, so a crash in between sends it again (the
            // message id makes the repeat a duplicate the stream drops).
            dead_letter(js, namespace, &skipped).await?;
        }
        write(pool, stream_seq, effective_at, &applied).await?;
        *delay = Duration::from_millis(100);
        metrics::gauge!("stone_config_projector_checkpoint").set(stream_seq as f64);
    }
    Ok(())
}

/// Sends a CONFIG message that no reader can apply to DEADLETTER, with the reason in headers.
async fn dead_letter(
    js: &async_nats::jetstream::Context,
    namespace: &Namespace,
    skipped: &config_stream::SkippedMessage,
) -> Result<(), ProjectError> {
    use async_nats::jetstream::message::PublishMessage;
    use stone_events::streams::{CONFIG, headers};
    let source = namespace.stream_name(CONFIG);
    let publish = PublishMessage::build()
        .message_id(format!("{source}-config-projector-{}", skipped.stream_seq))
        .header(headers::DEAD_LETTER_REASON, skipped.reason.as_str())
        .header(headers::ORIGINAL_SUBJECT, skipped.subject.as_str())
        .header(headers::ORIGINAL_SEQUENCE, skipped.stream_seq.to_string().as_str())
        .payload(skipped.payload.clone());
    let subject = namespace.dead_letter_subject(&source, "config-projector");
    let failed = |error: &dyn std::fmt::Display| ProjectError::DeadLetter(error.to_string());
    let ack = js.send_publish(subject, publish).await.map_err(|error| failed(&error))?;
    ack.await.map_err(|error| failed(&error))?;
    metrics::counter!("stone_config_projector_dead_letters_total", "reason" => skipped.reason_code).increment(1);
    tracing::warn!(stream_seq = skipped.stream_seq, reason = %skipped.reason, "config event sent to the dead-letter stream");
    Ok(())
}

/// Writes one event's effects and the checkpoint in one transaction.
async fn write(
    pool: &PgPool,
    stream_seq: u64,
    effective_at: OffsetDateTime,
    applied: &[AppliedChange],
) -> Result<(), ProjectError> {
    let mut transaction = pool.begin().await?;
    let locked: i64 =
        sqlx::query_scalar("SELECT stream_seq FROM projection_checkpoints WHERE projection = $1 FOR UPDATE")
            .bind(PROJECTION)
            .fetch_one(&mut *transaction)
            .await?;
    if to_u64(locked) >= stream_seq {
        // Another instance wrote this event already.
        transaction.rollback().await?;
        return Ok(());
    }
    for change in applied {
        write_change(&mut transaction, change, stream_seq, effective_at, LIVE).await?;
    }
    sqlx::query("UPDATE projection_checkpoints SET stream_seq = $2, updated_at = now() WHERE projection = $1")
        .bind(PROJECTION)
        .bind(to_i64(stream_seq))
        .execute(&mut *transaction)
        .await?;
    transaction.commit().await?;
    metrics::counter!("stone_config_projector_events_total").increment(1);
    Ok(())
}

fn body(spec: Option<&EntitySpec>) -> Result<Option<serde_json::Value>, serde_json::Error> {
    spec.map(EntitySpec::to_body).transpose()
}

/// The tables a projection writes: the live ones, or a rebuild's shadow tables.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tables {
    pub entities: &'static str,
    pub history: &'static str,
}

pub(crate) const LIVE: Tables = Tables { entities: "config_entities", history: "config_history" };

pub(crate) async fn write_change(
    transaction: &mut Transaction<'_, Postgres>,
    applied: &AppliedChange,
    effective_seq: u64,
    effective_at: OffsetDateTime,
    tables: Tables,
) -> Result<(), ProjectError> {
    let change = &applied.change;
    let kind = change.kind.as_str();
    let before = body(applied.before.as_ref().map(|entity| &entity.spec))?;
    let after = match change.op {
        ConfigOp::Upserted => body(change.spec.as_ref())?,
        ConfigOp::Deleted => None,
    };
    match (&change.op, &after) {
        (ConfigOp::Upserted, Some(spec)) => {
            // Table names are constants of ours, never input.
            sqlx::query(&format!(
                "INSERT INTO {} (kind, name, id, version, spec, stream_seq, updated_at, updated_by) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (kind, name) DO UPDATE SET id = EXCLUDED.id, version = EXCLUDED.version, \
                 spec = EXCLUDED.spec, stream_seq = EXCLUDED.stream_seq, updated_at = EXCLUDED.updated_at, \
                 updated_by = EXCLUDED.updated_by",
                tables.entities
            ))
            .bind(kind)
            .bind(&change.name)
            .bind(change.id)
            .bind(to_i64(change.version))
            .bind(spec)
            .bind(to_i64(applied.stream_seq))
            .bind(effective_at)
            .bind(&change.actor)
            .execute(&mut **transaction)
            .await?;
        }
        (ConfigOp::Upserted, None) => {}
        (ConfigOp::Deleted, _) => {
            sqlx::query(&format!("DELETE FROM {} WHERE kind = $1 AND name = $2", tables.entities))
                .bind(kind)
                .bind(&change.name)
                .execute(&mut **transaction)
                .await?;
        }
    }
    let op = match change.op {
        ConfigOp::Upserted => "upserted",
        ConfigOp::Deleted => "deleted",
    };
    sqlx::query(&format!(
        "INSERT INTO {} (stream_seq, effective_seq, effective_at, kind, name, entity_id, version, op, \
         actor, change_set, before, after) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (stream_seq) DO NOTHING",
        tables.history
    ))
    .bind(to_i64(applied.stream_seq))
    .bind(to_i64(effective_seq))
    .bind(effective_at)
    .bind(kind)
    .bind(&change.name)
    .bind(change.id)
    .bind(to_i64(change.version))
    .bind(op)
    .bind(&change.actor)
    .bind(change.change_set.as_ref().map(|set| set.id))
    .bind(before)
    .bind(after)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// One row of `config_entities`, for comparisons with a fold.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectedEntity {
    pub kind: String,
    pub name: String,
    pub id: uuid::Uuid,
    pub version: u64,
    pub spec: serde_json::Value,
    pub stream_seq: u64,
    pub updated_by: String,
}

/// Every projected entity, by kind and name.
pub async fn projected_entities(pool: &PgPool) -> Result<Vec<ProjectedEntity>, sqlx::Error> {
    let rows: Vec<(String, String, uuid::Uuid, i64, serde_json::Value, i64, String)> = sqlx::query_as(
        "SELECT kind, name, id, version, spec, stream_seq, updated_by FROM config_entities ORDER BY kind, name",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(kind, name, id, version, spec, stream_seq, updated_by)| ProjectedEntity {
            kind,
            name,
            id,
            version: to_u64(version),
            spec,
            stream_seq: to_u64(stream_seq),
            updated_by,
        })
        .collect())
}

/// The same rows computed from a fold, to compare with [`projected_entities`].
pub fn folded_entities(state: &ConfigState) -> Result<Vec<ProjectedEntity>, serde_json::Error> {
    let mut rows = state
        .entities()
        .map(|entity| {
            Ok(ProjectedEntity {
                kind: entity.spec.kind().as_str().to_owned(),
                name: entity.spec.name().to_owned(),
                id: entity.id,
                version: entity.version,
                spec: entity.spec.to_body()?,
                stream_seq: entity.stream_seq,
                updated_by: entity.actor.clone(),
            })
        })
        .collect::<Result<Vec<_>, serde_json::Error>>()?;
    rows.sort_by(|a, b| (&a.kind, &a.name).cmp(&(&b.kind, &b.name)));
    Ok(rows)
}

/// Postgres has no unsigned integers; sequences and versions stay far below `i64::MAX`.
pub fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}
