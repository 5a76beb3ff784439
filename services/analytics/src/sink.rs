//! ClickHouse writes of the projector: one insert per table and day, each with a deterministic
//! `insert_deduplication_token`, plus the retention the configuration asks for.
//!
//! The token is `{consumer}-p{partition}-{first}-{last}-{table}-{day}`: the same batch always
//! yields the same tokens, whoever retries it and whenever. ClickHouse drops a block whose token
//! it has seen (raw tables and, with `deduplicate_blocks_in_dependent_materialized_views`, each
//! rollup separately), so a retry completes what a failed or interrupted attempt left undone and
//! never inserts anything twice.

use serde::Serialize;
use stone_kit::StoneConfig;

use crate::rows::{RequestRow, Rows};
use crate::state::PendingBatch;

/// Where a batch goes and under which names.
#[derive(Clone)]
pub struct Sink {
    pub clickhouse: clickhouse::Client,
    /// Prefix of every token (the consumer prefix, so two deployments sharing a database differ).
    pub token_prefix: String,
    /// Appended to every table name: empty for the live projection, `__rebuild` for a rebuild's
    /// shadow tables.
    pub table_suffix: &'static str,
}

impl Sink {
    /// Inserts every group of `rows`. Idempotent for a given `batch` and `rows`.
    pub async fn insert(
        &self,
        partition: u16,
        batch: PendingBatch,
        rows: &Rows,
    ) -> Result<(), clickhouse::error::Error> {
        let started = std::time::Instant::now();
        for (day, group) in &rows.requests {
            self.insert_requests(partition, batch, *day, group).await?;
        }
        for (day, group) in &rows.cache {
            self.insert_group("cache_events", partition, batch, *day, group).await?;
        }
        for (day, group) in &rows.health {
            self.insert_group("health_events", partition, batch, *day, group).await?;
        }
        metrics::histogram!("stone_analytics_insert_duration_seconds").record(started.elapsed().as_secs_f64());
        Ok(())
    }

    pub fn token(&self, table: &str, partition: u16, batch: PendingBatch, day: u32) -> String {
        format!("{}-p{partition}-{}-{}-{table}-{day}", self.token_prefix, batch.first, batch.last)
    }

    /// The settings that make an insert of `table`'s rows of `day` from `batch` repeatable: the
    /// same batch always gets the same token, whichever format carries it.
    fn idempotent(&self, table: &str, partition: u16, batch: PendingBatch, day: u32) -> [(&'static str, String); 3] {
        [
            ("insert_deduplicate", "1".to_owned()),
            ("deduplicate_blocks_in_dependent_materialized_views", "1".to_owned()),
            ("insert_deduplication_token", self.token(table, partition, batch, day)),
        ]
    }

    /// The request rows of one day, as one Native block (see [`crate::native`]): the bulk of
    /// every batch, and the format the server parses fastest.
    async fn insert_requests(
        &self,
        partition: u16,
        batch: PendingBatch,
        day: u32,
        rows: &[RequestRow],
    ) -> Result<(), clickhouse::error::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let block = crate::native::requests_block(rows);
        // The table name is ours (a constant and a constant suffix), not input.
        let mut insert =
            self.clickhouse.insert_formatted_with(format!("INSERT INTO requests{} FORMAT Native", self.table_suffix));
        for (name, value) in self.idempotent("requests", partition, batch, day) {
            insert = insert.with_setting(name, value);
        }
        insert.send(block).await?;
        insert.end().await?;
        metrics::counter!("stone_analytics_rows_written_total", "table" => "requests").increment(rows.len() as u64);
        Ok(())
    }

    async fn insert_group<T>(
        &self,
        table: &'static str,
        partition: u16,
        batch: PendingBatch,
        day: u32,
        rows: &[T],
    ) -> Result<(), clickhouse::error::Error>
    where
        T: clickhouse::RowOwned + clickhouse::RowWrite + Serialize,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let name = format!("{table}{}", self.table_suffix);
        let mut insert = self.clickhouse.insert::<T>(&name).await?;
        for (name, value) in self.idempotent(table, partition, batch, day) {
            insert = insert.with_setting(name, value);
        }
        for row in rows {
            insert.write(row).await?;
        }
        insert.end().await?;
        metrics::counter!("stone_analytics_rows_written_total", "table" => table).increment(rows.len() as u64);
        Ok(())
    }
}

/// The highest stream sequence of `partition` in any raw table: where a partition without a
/// checkpoint resumes (a deployment upgraded from the watermark-only projector, or a lost bucket).
pub async fn stored_watermark(
    clickhouse: &clickhouse::Client,
    partition: u16,
) -> Result<u64, clickhouse::error::Error> {
    let mut highest = 0;
    for table in ["requests", "cache_events", "health_events"] {
        let sql = format!("SELECT max(stream_seq) FROM {table} WHERE partition = ?");
        let table_highest: u64 = clickhouse.query(&sql).bind(partition).fetch_one().await?;
        highest = highest.max(table_highest);
    }
    Ok(highest)
}

/// The tables whose TTL follows the configuration, with the time expression of their TTL.
const RETENTION: [(&str, &str, Retention); 6] = [
    ("requests", "toDateTime(time)", Retention::Raw),
    ("cache_events", "toDateTime(time)", Retention::Raw),
    ("health_events", "toDateTime(time)", Retention::Raw),
    ("requests_1m", "bucket", Retention::Raw),
    ("requests_1h", "bucket", Retention::Rollup),
    ("consumer_usage_1h", "bucket", Retention::Rollup),
];

#[derive(Clone, Copy)]
enum Retention {
    Raw,
    Rollup,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct TableDefinition {
    engine_full: String,
}

/// Sets each table's TTL to the configured days when it differs. A migration cannot read the
/// configuration, so migrations create the default TTL and this brings it in line at start.
/// `materialize_ttl_after_modify = 0` keeps it a metadata change: existing parts follow the new
/// TTL at their next merge instead of being rewritten now.
pub async fn apply_retention(config: &StoneConfig, clickhouse: &clickhouse::Client) -> anyhow::Result<()> {
    for (table, time_expression, retention) in RETENTION {
        let days = match retention {
            Retention::Raw => config.analytics.retention_days,
            Retention::Rollup => config.analytics.rollup_retention_days,
        };
        let definition: TableDefinition = clickhouse
            .query("SELECT engine_full FROM system.tables WHERE database = currentDatabase() AND name = ?")
            .bind(table)
            .fetch_one()
            .await?;
        if definition.engine_full.contains(&format!("toIntervalDay({days})")) {
            continue;
        }
        // Identifiers and the integer are ours (constants and a validated u32), not user input.
        clickhouse
            .query(&format!("ALTER TABLE {table} MODIFY TTL {time_expression} + INTERVAL {days} DAY"))
            .with_setting("materialize_ttl_after_modify", "0")
            .execute()
            .await?;
        tracing::info!(table, days, "retention applied");
    }
    Ok(())
}
