//! Table layouts a migration cannot give an existing table: the index granularity of the minute
//! rollup. ClickHouse refuses `ALTER TABLE … MODIFY SETTING index_granularity`
//! (`READONLY_SETTING`), and a migration is plain SQL applied by whichever instance starts first,
//! with no way to hold the live projector still while it copies. So the projector brings each
//! table listed in [`GRANULARITY`] to its granularity itself, at start, under the rebuild's pause:
//!
//! 1. claim the analytics rebuild record (one rebuild or re-layout at a time, cluster-wide);
//! 2. create `{table}__relayout` from the live table's own `CREATE` statement (columns, engine,
//!    keys, TTL and settings as they stand, retention included) with the new granularity;
//! 3. pause every live partition worker at a batch boundary (`Rebuilder::pause_all`); if any
//!    partition has a batch in flight (`pending`, e.g. its owner died mid-insert), give up and
//!    retry later: that batch's retry is deduplicated by the old table's insert log, which the
//!    new table does not have;
//! 4. copy every row (`optimize_on_insert = 0`, so the copy holds the same rows, checked by
//!    count), `EXCHANGE TABLES`, drop the old table, lift the pause.
//!
//! Nothing is written to the table between the pause and the exchange, so the copy is exact; the
//! materialized views follow the table name and feed the new table once the workers resume. New
//! installs go through the same steps on an empty table. A crash before the exchange leaves the
//! live table as it was (the next start drops the staging table and starts over); after it, the
//! table already has its granularity and nothing is left to do.

use std::time::{Duration, Instant};

use stone_kit::rebuild::{Phase, StartError, Tracker};
use tokio_util::sync::CancellationToken;

use crate::rebuild::Rebuilder;
use crate::state;

/// Tables whose index granularity differs from ClickHouse's default (8192 rows, capped at
/// 10 MB). `requests_1m` rows carry a t-digest state of ~1.4 KB, so a default granule is
/// ~7k rows (about three hours of minute rows) that any time slice inside it reads and
/// deserialises whole; at 256 rows a granule is a few minutes (docs/benchmarks.md).
pub const GRANULARITY: &[(&str, u64)] = &[("requests_1m", 256)];

/// Suffix of the table a re-layout copies into.
pub const STAGING: &str = "__relayout";
/// How long to wait before trying again when the rebuild record is busy or a batch is in flight.
const RETRY: Duration = Duration::from_secs(2);

/// Why one attempt did not re-lay the table out; `Busy` is retried.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Brings every table of [`GRANULARITY`] to its granularity, waiting while another rebuild runs
/// or a batch is in flight. Returns once all are done, or with the first hard error.
pub async fn ensure(rebuilder: &Rebuilder, cancel: &CancellationToken) -> anyhow::Result<()> {
    for (table, granularity) in GRANULARITY {
        set_granularity(rebuilder, table, *granularity, cancel).await?;
    }
    Ok(())
}

/// Re-lays `table` out with `granularity` rows per granule (see the module documentation);
/// `false` when it already had it.
pub async fn set_granularity(
    rebuilder: &Rebuilder,
    table: &str,
    granularity: u64,
    cancel: &CancellationToken,
) -> anyhow::Result<bool> {
    loop {
        let current = create_statement(rebuilder, table).await?;
        if setting(&current, "index_granularity") == Some(granularity) {
            drop_staging(rebuilder, table).await?;
            return Ok(false);
        }
        let busy = match rebuilder.claim(&format!("relayout {table}")).await {
            Err(StartError::AlreadyRunning { id, phase, .. }) => {
                format!("a rebuild ({id}, {phase:?}) is running")
            }
            Err(StartError::Store(error)) => return Err(error),
            Ok(tracker) => {
                let attempt = stone_kit::rebuild::until_cancelled(
                    async { relayout(rebuilder, &tracker, table, &current, granularity).await.map_err(Into::into) },
                    cancel,
                );
                let outcome = match attempt.await {
                    Ok(()) => Ok(()),
                    Err(error) => match error.downcast::<AttemptError>() {
                        Ok(AttemptError::Busy(reason)) => Err(AttemptError::Busy(reason)),
                        Ok(AttemptError::Failed(error)) => Err(AttemptError::Failed(error)),
                        Err(error) => Err(AttemptError::Failed(error)),
                    },
                };
                if outcome.is_err() {
                    drop_staging(rebuilder, table).await.ok();
                }
                let recorded = outcome.as_ref().map(|_| ()).map_err(|error| anyhow::anyhow!("{error}"));
                let recorded = tracker.settle(recorded).await;
                match outcome {
                    Ok(()) => {
                        recorded?;
                        return Ok(true);
                    }
                    Err(AttemptError::Failed(error)) => return Err(error),
                    Err(AttemptError::Busy(reason)) => reason,
                }
            }
        };
        tracing::info!(table, reason = %busy, "table re-layout waits");
        tokio::select! {
            () = tokio::time::sleep(RETRY) => {}
            () = cancel.cancelled() => anyhow::bail!("cancelled (shutdown)"),
        }
    }
}

/// One attempt, with the rebuild record claimed.
async fn relayout(
    rebuilder: &Rebuilder,
    tracker: &Tracker,
    table: &str,
    create: &str,
    granularity: u64,
) -> Result<(), AttemptError> {
    let database: String = rebuilder.clickhouse.query("SELECT currentDatabase()").fetch_one().await.map_err(fail)?;
    let staging = format!("{table}{STAGING}");
    drop_staging(rebuilder, table).await?;
    let staged = crate::rebuild::rename_qualified(create, &database, table, &staging);
    let staged = with_setting(&staged, "index_granularity", granularity);
    if setting(&staged, "index_granularity") != Some(granularity) || !staged.contains(&staging) {
        return Err(fail(anyhow::anyhow!("cannot rewrite the CREATE statement of {table}: {create}")));
    }
    rebuilder.clickhouse.query(&staged).execute().await.map_err(fail)?;

    tracker.phase(Phase::Pausing).await?;
    let started = Instant::now();
    rebuilder.pause_all(tracker).await?;
    for partition in 0..rebuilder.partitions {
        let stored = state::read(&rebuilder.states, &state::partition_key(partition)).await.map_err(fail)?;
        if let Some(pending) = stored.and_then(|versioned| versioned.state.pending) {
            return Err(AttemptError::Busy(format!(
                "partition {partition} has a batch in flight ({}..={})",
                pending.first, pending.last
            )));
        }
    }
    tracker.phase(Phase::Swapping).await?;
    rebuilder
        .clickhouse
        .query(&format!("INSERT INTO {staging} SELECT * FROM {table}"))
        .with_setting("insert_deduplicate", "0")
        .with_setting("optimize_on_insert", "0")
        .execute()
        .await
        .map_err(fail)?;
    // Merges may fold rows of either table at any moment, so compare what they cannot change:
    // the totals of the summed columns.
    let sums: Vec<String> = rebuilder
        .clickhouse
        .query(
            "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = ? \
             AND startsWith(type, 'SimpleAggregateFunction(sum,') ORDER BY position",
        )
        .bind(table)
        .fetch_all()
        .await
        .map_err(fail)?;
    // Without summed columns (a plain MergeTree), merges keep the row count.
    let totals = if sums.is_empty() {
        "toString(count())".to_owned()
    } else {
        let parts: Vec<String> = sums.iter().map(|column| format!("toString(sum({column}))")).collect();
        format!("arrayStringConcat([{}], ' ')", parts.join(", "))
    };
    let total = |name: String| {
        let sql = format!("SELECT {totals} FROM {name}");
        async move { rebuilder.clickhouse.query(&sql).fetch_one::<String>().await.map_err(fail) }
    };
    let (live, copied) = (total(table.to_owned()).await?, total(staging.clone()).await?);
    if live != copied {
        return Err(fail(anyhow::anyhow!("{table}: the copy sums to {copied}, the table to {live}")));
    }
    tracker.check()?;
    rebuilder.clickhouse.query(&format!("EXCHANGE TABLES {table} AND {staging}")).execute().await.map_err(fail)?;
    drop_staging(rebuilder, table).await?;
    tracing::info!(
        table,
        granularity,
        totals = %copied,
        paused_ms = started.elapsed().as_millis() as u64,
        "table re-laid out under the rebuild pause"
    );
    Ok(())
}

fn fail(error: impl Into<anyhow::Error>) -> AttemptError {
    AttemptError::Failed(error.into())
}

async fn create_statement(rebuilder: &Rebuilder, table: &str) -> anyhow::Result<String> {
    let create: Option<String> = rebuilder
        .clickhouse
        .query("SELECT create_table_query FROM system.tables WHERE database = currentDatabase() AND name = ?")
        .bind(table)
        .fetch_optional()
        .await?;
    create.ok_or_else(|| anyhow::anyhow!("table {table} does not exist: have the migrations been applied?"))
}

async fn drop_staging(rebuilder: &Rebuilder, table: &str) -> anyhow::Result<()> {
    rebuilder.clickhouse.query(&format!("DROP TABLE IF EXISTS {table}{STAGING} SYNC")).execute().await?;
    Ok(())
}

/// Where the table-level `SETTINGS` clause of a `CREATE TABLE` statement starts (ClickHouse
/// prints it last, before an optional `COMMENT`), if there is one.
fn settings_clause(create: &str) -> Option<usize> {
    let position = create.rfind(" SETTINGS ")?;
    let clause = create[position..].split(" COMMENT ").next().unwrap_or_default();
    (!clause.contains(')')).then_some(position)
}

/// The value of a table-level setting in a `CREATE TABLE` statement.
pub fn setting(create: &str, name: &str) -> Option<u64> {
    let start = settings_clause(create)? + " SETTINGS ".len();
    let clause = create[start..].split(" COMMENT ").next().unwrap_or_default();
    clause.split(',').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key.trim() == name).then(|| value.trim().parse().ok()).flatten()
    })
}

/// The statement with `name = value` in its table-level settings, replacing any value there.
fn with_setting(create: &str, name: &str, value: u64) -> String {
    let Some(position) = settings_clause(create) else {
        return match create.find(" COMMENT ") {
            Some(comment) => format!("{} SETTINGS {name} = {value}{}", &create[..comment], &create[comment..]),
            None => format!("{create} SETTINGS {name} = {value}"),
        };
    };
    let start = position + " SETTINGS ".len();
    let (clause, comment) = match create[start..].find(" COMMENT ") {
        Some(offset) => (&create[start..start + offset], &create[start + offset..]),
        None => (&create[start..], ""),
    };
    let mut pairs: Vec<String> = clause
        .split(',')
        .map(str::trim)
        .filter(|pair| pair.split_once('=').is_none_or(|(key, _)| key.trim() != name))
        .map(str::to_owned)
        .collect();
    pairs.push(format!("{name} = {value}"));
    format!("{}{}{comment}", &create[..start], pairs.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = "CREATE TABLE db.requests_1m (`bucket` DateTime('UTC'), `route` LowCardinality(String)) \
                        ENGINE = AggregatingMergeTree PARTITION BY toYYYYMMDD(bucket) ORDER BY (bucket, route) \
                        TTL bucket + toIntervalDay(30) SETTINGS non_replicated_deduplication_window = 10000, \
                        index_granularity = 8192";

    #[test]
    fn the_granularity_is_read_and_replaced_in_the_settings_clause() {
        assert_eq!(setting(LIVE, "index_granularity"), Some(8192));
        assert_eq!(setting(LIVE, "non_replicated_deduplication_window"), Some(10_000));
        let relaid = with_setting(LIVE, "index_granularity", 256);
        assert_eq!(setting(&relaid, "index_granularity"), Some(256));
        assert_eq!(setting(&relaid, "non_replicated_deduplication_window"), Some(10_000));
        assert!(relaid.ends_with("SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 256"));
        assert!(relaid.starts_with(&LIVE[..LIVE.find(" SETTINGS ").unwrap()]), "{relaid}");
    }

    #[test]
    fn a_statement_without_settings_or_with_a_comment_gets_them_in_place() {
        let bare = "CREATE TABLE db.t (`x` UInt8) ENGINE = MergeTree ORDER BY x";
        assert_eq!(with_setting(bare, "index_granularity", 256), format!("{bare} SETTINGS index_granularity = 256"));
        let commented = format!("{LIVE} COMMENT 'minute rollup'");
        let relaid = with_setting(&commented, "index_granularity", 128);
        assert_eq!(setting(&relaid, "index_granularity"), Some(128));
        assert!(relaid.ends_with("index_granularity = 128 COMMENT 'minute rollup'"), "{relaid}");
        // A `SETTINGS` inside the column list is not the table's clause.
        assert_eq!(setting("CREATE TABLE t (`x` UInt8) ENGINE = MergeTree ORDER BY x", "index_granularity"), None);
    }
}
