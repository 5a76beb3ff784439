//! Table layouts a migration cannot give an existing table: the index granularity of the minute
//! rollup, and the latency state of both rollups. ClickHouse refuses `ALTER TABLE … MODIFY
//! SETTING index_granularity` (`READONLY_SETTING`) and cannot convert one aggregate state into
//! another, and a migration is plain SQL applied by whichever instance starts first, with no way
//! to hold the live projector still while it copies. So the projector brings each table to its
//! layout itself, at start, under the rebuild's pause:
//!
//! 1. claim the analytics rebuild record (one rebuild or re-layout at a time, cluster-wide);
//! 2. create `{table}__relayout` from the live table's own `CREATE` statement (columns, engine,
//!    keys, TTL and settings as they stand, retention included) with the new layout;
//! 3. pause every live partition worker at a batch boundary (`Rebuilder::pause_all`); if any
//!    partition has a batch in flight (`pending`, e.g. its owner died mid-insert), give up and
//!    retry later: that batch's retry is deduplicated by the old table's insert log, which the
//!    new table does not have;
//! 4. copy every row (`optimize_on_insert = 0`, so the copy holds the same rows, checked by the
//!    totals of the summed columns), `EXCHANGE TABLES`, drop the old table;
//! 5. for a new latency state, replace the table's materialized view (below), then lift the pause.
//!
//! Nothing is written to the table between the pause and the exchange, so the copy is exact; the
//! materialized views follow the table name and feed the new table once the workers resume. New
//! installs go through the same steps on an empty table. A crash before the exchange leaves the
//! live table as it was (the next start drops the staging table and starts over); after it, the
//! table already has its layout and only what is left (the view) is done.
//!
//! ## Latency state: t-digest to DDSketch
//!
//! The rollups were created (migration 0002) with a `quantilesTDigest` state of `total_us`.
//! Merging those states is what the analytics endpoints spent their time on: 8 µs per state,
//! ~60 ms for the ~7,600 minute rows of six hours (docs/benchmarks.md). A `quantilesDD` state
//! (DDSketch, 1% relative accuracy) merges about five times faster, takes 40% of the space and
//! bounds the error of every quantile relative to its value, tails included.
//!
//! A t-digest state cannot be turned into a DDSketch, so the copy recomputes the states from raw
//! rows: the rollup's rows are copied with an empty state, and for every bucket since the
//! rollup's oldest one a row with zero counts and the state of the raw rows of that group is
//! added; the table's engine merges the two. Buckets whose raw rows are gone (older than
//! `analytics.retention_days`, kept longer in the hourly rollup) keep their counts and lose their
//! quantiles (the API reports them as null).
//!
//! The view is replaced so that no insert can land in raw rows without reaching the rollup: with
//! the table exchanged, a view `{view}__relayout` (the live one rewritten for the new state) is
//! created, the old view dropped and the new one renamed into its place. Should the process die
//! between two of these steps, inserts fail loudly (a state of the wrong type, or no such table)
//! and are retried by the projector with their deduplication tokens until the next start
//! finishes the steps; they never land half-counted.

use std::time::{Duration, Instant};

use stone_kit::rebuild::{Phase, StartError, Tracker};
use tokio_util::sync::CancellationToken;

use crate::rebuild::Rebuilder;
use crate::state;

/// Tables whose index granularity differs from ClickHouse's default (8192 rows, capped at
/// 10 MB). A time slice of `requests_1m` inside a default granule (about three hours of minute
/// rows) would read and deserialise it whole; at 256 rows a granule is a few minutes
/// (docs/benchmarks.md).
pub const GRANULARITY: &[(&str, u64)] = &[("requests_1m", 256)];

/// Rollups whose latency state is a DDSketch, with the bucket of a raw row (see the module text).
pub const LATENCY_STATE: &[(&str, &str)] =
    &[("requests_1m", "toStartOfMinute(time)"), ("requests_1h", "toStartOfHour(time)")];
/// The dimensions of both rollups, in their sorting key order.
const ROLLUP_DIMENSIONS: &str = "route, path_template, upstream, consumer, status, cache";
/// The old state function and its replacement, as they appear in `CREATE` statements.
const TDIGEST: &str = "quantilesTDigest";
/// The state the rollups keep: DDSketch with 1% relative accuracy, the same quantiles.
pub const LATENCY_FUNCTION: &str = "quantilesDD(0.01, 0.5, 0.9, 0.95, 0.99)";

/// Suffix of the table (and view) a re-layout copies into.
pub const STAGING: &str = "__relayout";
/// How long to wait before trying again when the rebuild record is busy or a batch is in flight.
const RETRY: Duration = Duration::from_secs(2);

/// What a re-layout changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// `index_granularity` rows per granule.
    Granularity(u64),
    /// The latency state becomes [`LATENCY_FUNCTION`]; the string buckets a raw row's `time`.
    LatencyState(&'static str),
}

impl Change {
    fn describe(self, table: &str) -> String {
        match self {
            Self::Granularity(_) => format!("relayout {table}"),
            Self::LatencyState(_) => format!("latency state {table}"),
        }
    }

    /// Whether a table with this `CREATE` statement still needs the change.
    fn table_needs(self, create: &str) -> bool {
        match self {
            Self::Granularity(granularity) => setting(create, "index_granularity") != Some(granularity),
            Self::LatencyState(_) => create.contains(TDIGEST),
        }
    }
}

/// Every change, in the order they are made.
fn changes() -> impl Iterator<Item = (&'static str, Change)> {
    LATENCY_STATE
        .iter()
        .map(|(table, bucket)| (*table, Change::LatencyState(bucket)))
        .chain(GRANULARITY.iter().map(|(table, granularity)| (*table, Change::Granularity(*granularity))))
}

/// Why one attempt did not re-lay the table out; `Busy` is retried.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// What to do when a change cannot be made now: another rebuild holds the record, or a
/// partition has a batch in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenBusy {
    /// Try again every two seconds until it can be made.
    Wait,
    /// Return at once, leaving the change (and those after it) for later.
    Defer,
}

/// Brings every rollup to its latency state and every table of [`GRANULARITY`] to its
/// granularity. Returns `true` once all are done, `false` when one was busy and `when_busy` is
/// [`WhenBusy::Defer`], or the first hard error.
pub async fn ensure(rebuilder: &Rebuilder, when_busy: WhenBusy, cancel: &CancellationToken) -> anyhow::Result<bool> {
    for (table, change) in changes() {
        if apply(rebuilder, table, change, when_busy, cancel).await?.is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Re-lays `table` out with `granularity` rows per granule (see the module documentation),
/// waiting while busy; `false` when it already had it.
pub async fn set_granularity(
    rebuilder: &Rebuilder,
    table: &str,
    granularity: u64,
    cancel: &CancellationToken,
) -> anyhow::Result<bool> {
    let applied = apply(rebuilder, table, Change::Granularity(granularity), WhenBusy::Wait, cancel).await?;
    Ok(applied.unwrap_or_default())
}

/// Makes `change` to `table` (see the module documentation): `Some(true)` when it did,
/// `Some(false)` when there was nothing left to do, `None` when it was busy and `when_busy` says
/// to defer.
pub async fn apply(
    rebuilder: &Rebuilder,
    table: &str,
    change: Change,
    when_busy: WhenBusy,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<bool>> {
    loop {
        if !needs(&rebuilder.clickhouse, table, change).await? {
            drop_staging(&rebuilder.clickhouse, table).await?;
            return Ok(Some(false));
        }
        let busy = match rebuilder.claim(&change.describe(table)).await {
            Err(StartError::AlreadyRunning { id, phase, .. }) => {
                format!("a rebuild ({id}, {phase:?}) is running")
            }
            Err(StartError::Store(error)) => return Err(error),
            Ok(tracker) => {
                let attempt = stone_kit::rebuild::until_cancelled(
                    async { relayout(rebuilder, &tracker, table, change).await.map_err(Into::into) },
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
                    drop_staging(&rebuilder.clickhouse, table).await.ok();
                }
                let recorded = outcome.as_ref().map(|_| ()).map_err(|error| anyhow::anyhow!("{error}"));
                let recorded = tracker.settle(recorded).await;
                match outcome {
                    Ok(()) => {
                        recorded?;
                        return Ok(Some(true));
                    }
                    Err(AttemptError::Failed(error)) => return Err(error),
                    Err(AttemptError::Busy(reason)) => reason,
                }
            }
        };
        if when_busy == WhenBusy::Defer {
            tracing::info!(table, reason = %busy, "table re-layout deferred");
            return Ok(None);
        }
        tracing::info!(table, reason = %busy, "table re-layout waits");
        tokio::select! {
            () = tokio::time::sleep(RETRY) => {}
            () = cancel.cancelled() => anyhow::bail!("cancelled (shutdown)"),
        }
    }
}

/// Whether `table` (or, for a latency state, its view) still needs `change`.
async fn needs(client: &clickhouse::Client, table: &str, change: Change) -> anyhow::Result<bool> {
    if change.table_needs(&create_statement(client, table).await?) {
        return Ok(true);
    }
    Ok(match change {
        Change::Granularity(_) => false,
        Change::LatencyState(_) => {
            let view = format!("{table}_mv");
            let live = find_create(client, &view).await?;
            let staged = find_create(client, &format!("{view}{STAGING}")).await?;
            live.is_none_or(|create| create.contains(TDIGEST)) || staged.is_some()
        }
    })
}

/// One attempt, with the rebuild record claimed.
async fn relayout(rebuilder: &Rebuilder, tracker: &Tracker, table: &str, change: Change) -> Result<(), AttemptError> {
    let client = &rebuilder.clickhouse;
    let staged = stage(client, table, change).await?;
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
    let totals = swap(client, table, change, staged, Some(tracker)).await?;
    tracing::info!(
        table,
        change = ?change,
        totals = %totals,
        paused_ms = started.elapsed().as_millis() as u64,
        "table re-laid out under the rebuild pause"
    );
    Ok(())
}

/// Makes every change [`ensure`] makes, without claiming the rebuild record or pausing anyone:
/// only for a database no projector writes to (tests, tools that seed a database themselves).
pub async fn ensure_unpaused(client: &clickhouse::Client) -> anyhow::Result<()> {
    for (table, change) in changes() {
        if needs(client, table, change).await? {
            let staged = stage(client, table, change).await?;
            swap(client, table, change, staged, None).await?;
        }
    }
    Ok(())
}

/// Creates the staging table when the table itself needs the change; `true` when it did.
async fn stage(client: &clickhouse::Client, table: &str, change: Change) -> Result<bool, AttemptError> {
    let create = create_statement(client, table).await?;
    if !change.table_needs(&create) {
        return Ok(false);
    }
    let database: String = client.query("SELECT currentDatabase()").fetch_one().await.map_err(fail)?;
    let staging = format!("{table}{STAGING}");
    drop_staging(client, table).await?;
    let staged = crate::rebuild::rename_qualified(&create, &database, table, &staging);
    let staged = match change {
        Change::Granularity(granularity) => with_setting(&staged, "index_granularity", granularity),
        Change::LatencyState(_) => with_latency_state(&staged),
    };
    if change.table_needs(&staged) || !staged.contains(&staging) {
        return Err(fail(anyhow::anyhow!("cannot rewrite the CREATE statement of {table}: {create}")));
    }
    client.query(&staged).execute().await.map_err(fail)?;
    Ok(true)
}

/// With nothing writing: copies into the staging table (when [`stage`] created one) and exchanges
/// it in, then replaces the view for a latency state. Returns the copied totals.
async fn swap(
    client: &clickhouse::Client,
    table: &str,
    change: Change,
    staged: bool,
    tracker: Option<&Tracker>,
) -> Result<String, AttemptError> {
    let mut totals = String::new();
    if staged {
        let staging = format!("{table}{STAGING}");
        match change {
            Change::Granularity(_) => copy(client, &format!("INSERT INTO {staging} SELECT * FROM {table}")).await?,
            Change::LatencyState(bucket) => copy_recomputing_latency(client, table, &staging, bucket).await?,
        }
        totals = compare_totals(client, table, &staging).await?;
        if let Some(tracker) = tracker {
            tracker.check()?;
        }
        client.query(&format!("EXCHANGE TABLES {table} AND {staging}")).execute().await.map_err(fail)?;
        drop_staging(client, table).await?;
    }
    if let Change::LatencyState(_) = change {
        let database: String = client.query("SELECT currentDatabase()").fetch_one().await.map_err(fail)?;
        replace_view(client, &database, table).await?;
    }
    Ok(totals)
}

/// Runs one copying statement: every row as it is (no deduplication, no merging on insert).
async fn copy(client: &clickhouse::Client, sql: &str) -> Result<(), AttemptError> {
    client
        .query(sql)
        .with_setting("insert_deduplicate", "0")
        .with_setting("optimize_on_insert", "0")
        .execute()
        .await
        .map_err(fail)
}

/// The rollup's rows with an empty latency state, and the states of the raw rows of every bucket
/// since the rollup's oldest, with zero counts (see the module documentation).
async fn copy_recomputing_latency(
    client: &clickhouse::Client,
    table: &str,
    staging: &str,
    bucket: &str,
) -> Result<(), AttemptError> {
    let columns: Vec<String> = client
        .query("SELECT name FROM system.columns WHERE database = currentDatabase() AND table = ? ORDER BY position")
        .bind(table)
        .fetch_all()
        .await
        .map_err(fail)?;
    let empty = format!("arrayReduce('{}', emptyArrayUInt64())", state_function(LATENCY_FUNCTION));
    let select: Vec<String> = columns
        .iter()
        .map(|column| if column == "latency_us" { format!("{empty} AS latency_us") } else { column.clone() })
        .collect();
    copy(client, &format!("INSERT INTO {staging} SELECT {} FROM {table}", select.join(", "))).await?;
    copy(
        client,
        &format!(
            "INSERT INTO {staging} (bucket, {ROLLUP_DIMENSIONS}, latency_us) \
             SELECT {bucket} AS bucket, {ROLLUP_DIMENSIONS}, {}(total_us) FROM requests \
             WHERE bucket >= (SELECT min(bucket) FROM {table}) GROUP BY bucket, {ROLLUP_DIMENSIONS}",
            state_function(LATENCY_FUNCTION)
        ),
    )
    .await
}

/// `quantilesDD(…)` as the `…State(…)` combinator: `quantilesDDState(…)`.
fn state_function(function: &str) -> String {
    match function.split_once('(') {
        Some((name, arguments)) => format!("{name}State({arguments}"),
        None => format!("{function}State"),
    }
}

/// A `CREATE` statement (table or view) with every t-digest state or type of the latency
/// quantiles replaced by [`LATENCY_FUNCTION`]'s.
pub fn with_latency_state(create: &str) -> String {
    let (name, arguments) = LATENCY_FUNCTION.split_once('(').unwrap_or((LATENCY_FUNCTION, ""));
    let accuracy = arguments.split(',').next().unwrap_or_default();
    create
        .replace(&format!("{TDIGEST}State("), &format!("{name}State({accuracy}, "))
        .replace(&format!("{TDIGEST}("), &format!("{name}({accuracy}, "))
}

/// Replaces `{table}_mv` by the same view writing the new latency state, such that at every
/// point either the correct view exists or inserts fail (see the module documentation).
async fn replace_view(client: &clickhouse::Client, database: &str, table: &str) -> Result<(), AttemptError> {
    let view = format!("{table}_mv");
    let staged_view = format!("{view}{STAGING}");
    let live = find_create(client, &view).await?;
    let staged = find_create(client, &staged_view).await?;
    let execute = |sql: String| async move { client.query(&sql).execute().await.map_err(fail) };
    match (live, staged) {
        (Some(live), staged) if !live.contains(TDIGEST) => {
            if staged.is_some() {
                execute(format!("DROP VIEW IF EXISTS {staged_view} SYNC")).await?;
            }
        }
        (Some(live), staged) => {
            if staged.is_none() {
                let rewritten =
                    with_latency_state(&crate::rebuild::rename_qualified(&live, database, &view, &staged_view));
                if rewritten.contains(TDIGEST) || !rewritten.contains(&staged_view) {
                    return Err(fail(anyhow::anyhow!("cannot rewrite the CREATE statement of {view}: {live}")));
                }
                execute(rewritten).await?;
            }
            execute(format!("DROP VIEW {view} SYNC")).await?;
            execute(format!("RENAME TABLE {staged_view} TO {view}")).await?;
        }
        (None, Some(_)) => execute(format!("RENAME TABLE {staged_view} TO {view}")).await?,
        (None, None) => {
            return Err(fail(anyhow::anyhow!("no view {view} feeds {table}: have the migrations been applied?")));
        }
    }
    Ok(())
}

/// The totals of the summed columns of both tables, which merges cannot change; an error when
/// they differ.
async fn compare_totals(client: &clickhouse::Client, table: &str, staging: &str) -> Result<String, AttemptError> {
    // Merges may fold rows of either table at any moment, so compare what they cannot change:
    // the totals of the summed columns.
    let sums: Vec<String> = client
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
        async move { client.query(&sql).fetch_one::<String>().await.map_err(fail) }
    };
    let (live, copied) = (total(table.to_owned()).await?, total(staging.to_owned()).await?);
    if live != copied {
        return Err(fail(anyhow::anyhow!("{table}: the copy sums to {copied}, the table to {live}")));
    }
    Ok(copied)
}

fn fail(error: impl Into<anyhow::Error>) -> AttemptError {
    AttemptError::Failed(error.into())
}

async fn create_statement(client: &clickhouse::Client, table: &str) -> anyhow::Result<String> {
    find_create(client, table)
        .await?
        .ok_or_else(|| anyhow::anyhow!("table {table} does not exist: have the migrations been applied?"))
}

async fn find_create(client: &clickhouse::Client, name: &str) -> anyhow::Result<Option<String>> {
    Ok(client
        .query("SELECT create_table_query FROM system.tables WHERE database = currentDatabase() AND name = ?")
        .bind(name)
        .fetch_optional()
        .await?)
}

async fn drop_staging(client: &clickhouse::Client, table: &str) -> anyhow::Result<()> {
    client.query(&format!("DROP TABLE IF EXISTS {table}{STAGING} SYNC")).execute().await?;
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

    #[test]
    fn the_latency_state_is_rewritten_in_tables_and_views() {
        let table = "CREATE TABLE db.requests_1m (`bucket` DateTime('UTC'), `latency_us` \
                     AggregateFunction(quantilesTDigest(0.5, 0.9, 0.95, 0.99), UInt64)) ENGINE = AggregatingMergeTree \
                     ORDER BY bucket";
        let rewritten = with_latency_state(table);
        assert!(
            rewritten.contains("AggregateFunction(quantilesDD(0.01, 0.5, 0.9, 0.95, 0.99), UInt64)"),
            "{rewritten}"
        );
        assert!(!rewritten.contains(TDIGEST));
        let view = "CREATE MATERIALIZED VIEW db.requests_1m_mv TO db.requests_1m (`latency_us` \
                    AggregateFunction(quantilesTDigest(0.5, 0.9, 0.95, 0.99), UInt64)) AS SELECT \
                    quantilesTDigestState(0.5, 0.9, 0.95, 0.99)(total_us) AS latency_us FROM db.requests";
        let rewritten = with_latency_state(view);
        assert!(rewritten.contains("quantilesDDState(0.01, 0.5, 0.9, 0.95, 0.99)(total_us)"), "{rewritten}");
        assert!(rewritten.contains("AggregateFunction(quantilesDD(0.01, 0.5, 0.9, 0.95, 0.99), UInt64)"));
        assert_eq!(with_latency_state(&rewritten), rewritten, "a rewritten statement stays as it is");
        assert_eq!(state_function(LATENCY_FUNCTION), "quantilesDDState(0.01, 0.5, 0.9, 0.95, 0.99)");
        assert!(Change::LatencyState("toStartOfMinute(time)").table_needs(table));
        assert!(!Change::LatencyState("toStartOfMinute(time)").table_needs(&with_latency_state(table)));
    }
}
