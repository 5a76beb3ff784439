//! Rebuilding the analytics projection from the retained EVENTS stream into shadow tables while
//! the live projection keeps running, then swapping them in with `EXCHANGE TABLES`.
//!
//! The tables: the raw tables (`requests`, `cache_events`, `health_events`) and every rollup fed
//! from them by a materialized view named `{rollup}_mv` (found in `system.tables`, so a rollup
//! added by a later migration is rebuilt, and thereby backfilled, too). Each gets a shadow
//! `{name}__rebuild` with the same definition.
//!
//! Exactness: the shadow must end up holding, for each partition `p`, exactly the events with
//! stream sequence up to the live checkpoint `committed_p`, because after the swap the live
//! workers go on from `committed_p` into the swapped-in tables. So:
//! 1. seed: raw rows below the replay start are copied from the live tables (the materialized
//!    views recompute the rollups from them); at the end, once every shadow insert has landed,
//!    rollup rows of days older than any raw row are copied as they are (they summarise events
//!    that are gone from raw and stream alike);
//! 2. build: the stream is read in order with an ordered consumer; an event is taken once the
//!    live projection has committed it (`seq <= committed_p`, re-read as the live one advances),
//!    otherwise the reader waits for it;
//! 3. pause: the record's phase becomes `pausing`; every live worker finishes its batch, marks its
//!    partition `paused_by` this rebuild and holds still (the rebuild marks partitions nobody
//!    owns itself). The checkpoints are then final; the shadow takes the rest of the events up to
//!    them and skips later ones (the live workers write those after the swap);
//! 4. swap: `EXCHANGE TABLES` per pair, then the old tables are dropped and the pause ends.
//!
//! A rebuild that dies stops renewing its pause and the live projection resumes within
//! `stone_kit::rebuild::PAUSE_LEASE`; its shadow tables are dropped by the next rebuild. Each
//! exchange is atomic per table; a crash between two exchanges leaves some tables rebuilt and some
//! not, each exact up to the same checkpoints, and a new rebuild completes it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use stone_events::streams::EVENTS;
use stone_events::subjects::partition_in_subject;
use stone_events::{Namespace, decode};
use stone_kit::StoneConfig;
use stone_kit::rebuild::{Phase, Tracker};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::rows::Rows;
use crate::sink::Sink;
use crate::state::{self, PartitionState, PendingBatch, StateError};

/// Suffix of the shadow tables.
pub const SHADOW: &str = "__rebuild";
/// The raw tables the projector writes.
pub const RAW_TABLES: [&str; 3] = ["requests", "cache_events", "health_events"];
/// How long live workers get to reach a batch boundary and pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the reader waits for the live projection before pausing it.
const STALL_BEFORE_PAUSE: Duration = Duration::from_secs(1);
/// Once the reader waits on the live projection with at most this many events left to the
/// stream's head, the live projection is paused and the rest is read during the pause.
const CATCH_UP_GAP: u64 = 20_000;
/// How often the live checkpoints are re-read while building.
const CHECKPOINT_REFRESH: Duration = Duration::from_millis(250);

/// Where to start replaying; without either, the start of the retained stream.
#[derive(Debug, Clone, Default)]
pub struct RebuildOptions {
    pub from_seq: Option<u64>,
    pub from_time: Option<OffsetDateTime>,
    /// Rows per insert into the shadow tables.
    pub batch_rows: usize,
}

/// The outcome of a finished rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildSummary {
    pub from_seq: u64,
    /// Events read from the stream (including skipped ones).
    pub events: u64,
    /// Undecodable events (already in the dead-letter stream).
    pub skipped: u64,
    /// The tables swapped in.
    pub tables: Vec<String>,
}

/// Everything a rebuild needs; cheap to clone.
#[derive(Clone)]
pub struct Rebuilder {
    pub js: jetstream::Context,
    pub clickhouse: clickhouse::Client,
    pub namespace: Namespace,
    pub partitions: u16,
    /// The projector's partition states (`ANALYTICS` bucket).
    pub states: kv::Store,
    /// Rebuild records (`REBUILDS` bucket).
    pub rebuilds: kv::Store,
}

impl Rebuilder {
    /// Connects to what the configuration names. The tables must exist (the projector applies the
    /// migrations), so this does not migrate.
    pub async fn connect(config: &StoneConfig, js: jetstream::Context) -> anyhow::Result<Self> {
        let namespace = config.namespace();
        let states =
            state::open_bucket(&js, &namespace.bucket_name(crate::STATE_BUCKET), config.events.replicas).await?;
        let rebuilds = stone_kit::rebuild::open(&js, &namespace, config.events.replicas).await?;
        Ok(Self {
            js,
            clickhouse: stone_kit::clickhouse::client(config),
            namespace,
            partitions: config.partitions,
            states,
            rebuilds,
        })
    }

    /// Claims the rebuild record; fails while another rebuild of the projection is alive.
    pub async fn claim(&self, actor: &str) -> Result<Tracker, stone_kit::rebuild::StartError> {
        Tracker::start(self.rebuilds.clone(), crate::partition::REBUILD_KEY, actor, 0).await
    }

    /// Runs a claimed rebuild to its end and records the outcome (which lifts any pause).
    pub async fn execute(
        &self,
        tracker: &Tracker,
        options: &RebuildOptions,
        cancel: &CancellationToken,
    ) -> anyhow::Result<RebuildSummary> {
        let outcome = stone_kit::rebuild::until_cancelled(self.run(tracker, options), cancel).await;
        if outcome.is_err() {
            self.drop_shadow().await.ok();
        }
        let outcome = tracker.settle(outcome).await;
        if let Ok(summary) = &outcome {
            tracing::info!(events = summary.events, tables = ?summary.tables, "analytics rebuild done");
        }
        outcome
    }

    async fn run(&self, tracker: &Tracker, options: &RebuildOptions) -> anyhow::Result<RebuildSummary> {
        let tables = self.discover().await?;
        self.drop_shadow().await?;
        self.create_shadow(&tables).await?;

        let stream = self.js.get_stream(self.namespace.stream_name(EVENTS)).await?;
        // Rows below the replay start are copied from the live tables, so they must be final
        // there: never start above what every partition has committed.
        let requested = self.start_sequence(&stream, options).await?;
        let lowest_committed = self.checkpoints().await?.into_iter().min().unwrap_or(0);
        let first = stream.get_info().await?.state.first_sequence.max(1);
        let from_seq = requested.min(lowest_committed + 1).max(first);
        tracker.set_from_seq(from_seq);
        self.seed(from_seq).await?;
        tracing::info!(from_seq, tables = ?tables.all(), "analytics rebuild: shadow tables created and seeded");

        let (to_inserter, inserts) = spawn_inserter(Sink {
            clickhouse: self.clickhouse.clone(),
            token_prefix: format!("rebuild-{}", tracker.status().id),
            table_suffix: SHADOW,
        });
        let (decoder, decoding) = spawn_decoder(to_inserter);
        let mut reader = Reader {
            rebuilder: self,
            tracker,
            consumer: self.open_reader(&stream, from_seq).await?,
            held: None,
            from_seq,
            last_read: from_seq.saturating_sub(1),
            skipped: 0,
            raw: Vec::new(),
            batch_first: None,
            batch_started: Instant::now(),
            batch_rows: options.batch_rows.max(1_000),
            decoder,
            stream,
            target_seq: 0,
        };
        reader.refresh_target().await?;

        // 2. Build while the live projection runs.
        let mut committed = self.checkpoints().await?;
        reader.build(&mut committed).await?;
        reader.flush().await?;

        // 3. Pause the live projection and take exactly what it committed.
        tracker.phase(Phase::Pausing).await?;
        let committed = self.pause_all(tracker).await?;
        reader.finish(&committed).await?;
        reader.flush().await?;
        let Reader { decoder, skipped, last_read, target_seq, .. } = reader;
        drop(decoder);
        let undecodable = decoding.await.map_err(|error| anyhow::anyhow!("decode task: {error}"))??;
        inserts.await.map_err(|error| anyhow::anyhow!("insert task: {error}"))??;
        let skipped = skipped + undecodable;
        let done = last_read.saturating_sub(from_seq.saturating_sub(1));
        tracker.progress(done, done, target_seq, skipped);
        tracker.check()?;
        // Rollup history older than every raw row: only now is the shadow's oldest raw row known.
        self.carry_over_rollups(&tables).await?;

        // 4. Swap.
        tracker.phase(Phase::Swapping).await?;
        for table in tables.all() {
            self.clickhouse.query(&format!("EXCHANGE TABLES {table} AND {table}{SHADOW}")).execute().await?;
        }
        self.drop_shadow().await?;
        Ok(RebuildSummary {
            from_seq,
            events: last_read.saturating_sub(from_seq.saturating_sub(1)),
            skipped,
            tables: tables.all(),
        })
    }

    /// The raw tables and the rollups fed from them.
    async fn discover(&self) -> anyhow::Result<Tables> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Listed {
            name: String,
            engine: String,
            create_table_query: String,
            dependencies_table: Vec<String>,
        }
        let listed: Vec<Listed> = self
            .clickhouse
            .query(
                "SELECT name, engine, create_table_query, dependencies_table FROM system.tables \
                 WHERE database = currentDatabase()",
            )
            .fetch_all()
            .await?;
        let database: String = self.clickhouse.query("SELECT currentDatabase()").fetch_one().await?;
        let by_name: BTreeMap<&str, &Listed> = listed.iter().map(|table| (table.name.as_str(), table)).collect();
        let mut tables = Tables { database, raw: Vec::new(), views: Vec::new() };
        for raw in RAW_TABLES {
            let Some(table) = by_name.get(raw) else {
                anyhow::bail!("table {raw} does not exist: has the analytics projector applied its migrations?");
            };
            tables.raw.push(raw.to_owned());
            for view in &table.dependencies_table {
                if view.ends_with(SHADOW) {
                    continue;
                }
                let Some(listed_view) = by_name.get(view.as_str()).filter(|view| view.engine == "MaterializedView")
                else {
                    continue;
                };
                let target =
                    view.strip_suffix("_mv").filter(|target| by_name.contains_key(target)).ok_or_else(|| {
                        anyhow::anyhow!(
                            "materialized view {view} on {raw} does not follow the `{{rollup}}_mv` naming, so its \
                         rollup table cannot be rebuilt"
                        )
                    })?;
                tables.views.push(View {
                    name: view.clone(),
                    source: raw.to_owned(),
                    target: target.to_owned(),
                    create: listed_view.create_table_query.clone(),
                });
            }
        }
        Ok(tables)
    }

    /// Drops shadow views and tables (left over from a failed rebuild, or holding the old data
    /// after a swap).
    async fn drop_shadow(&self) -> anyhow::Result<()> {
        let shadows: Vec<(String, String)> = self
            .clickhouse
            .query("SELECT name, engine FROM system.tables WHERE database = currentDatabase() AND endsWith(name, ?)")
            .bind(SHADOW)
            .fetch_all()
            .await?;
        // Views first, so no insert into a shadow table fires into one being dropped.
        let (views, tables): (Vec<_>, Vec<_>) =
            shadows.into_iter().partition(|(_, engine)| engine == "MaterializedView");
        for (name, _) in views.into_iter().chain(tables) {
            self.clickhouse.query(&format!("DROP TABLE IF EXISTS {name} SYNC")).execute().await?;
        }
        Ok(())
    }

    async fn create_shadow(&self, tables: &Tables) -> anyhow::Result<()> {
        for table in tables.all() {
            self.clickhouse.query(&format!("CREATE TABLE {table}{SHADOW} AS {table}")).execute().await?;
        }
        for view in &tables.views {
            let mut create = view.create.clone();
            for name in [&view.name, &view.target, &view.source] {
                create = rename_qualified(&create, &tables.database, name, &format!("{name}{SHADOW}"));
            }
            self.clickhouse.query(&create).execute().await?;
        }
        Ok(())
    }

    /// The first sequence to replay.
    async fn start_sequence(
        &self,
        stream: &jetstream::stream::Stream,
        options: &RebuildOptions,
    ) -> anyhow::Result<u64> {
        let info = stream.get_info().await?;
        let first = info.state.first_sequence.max(1);
        if let Some(from_seq) = options.from_seq {
            return Ok(from_seq.max(first));
        }
        let Some(from_time) = options.from_time else { return Ok(first) };
        if info.state.messages == 0 {
            return Ok(info.state.last_sequence + 1);
        }
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: self.namespace.events_wildcard(),
                deliver_policy: DeliverPolicy::ByStartTime { start_time: from_time },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        match tokio::time::timeout(Duration::from_secs(2), messages.next()).await {
            Ok(Some(Ok(message))) => Ok(message.info().map_err(|error| anyhow::anyhow!("{error}"))?.stream_sequence),
            Ok(Some(Err(error))) => Err(anyhow::anyhow!("reading the stream at {from_time}: {error}")),
            // Nothing at or after that time.
            Ok(None) | Err(_) => Ok(info.state.last_sequence + 1),
        }
    }

    /// Copies raw rows below the replay start; the shadow views compute their rollups.
    async fn seed(&self, from_seq: u64) -> anyhow::Result<()> {
        for table in RAW_TABLES {
            self.clickhouse
                .query(&format!("INSERT INTO {table}{SHADOW} SELECT * FROM {table} WHERE stream_seq < ?"))
                .bind(from_seq)
                .with_setting("insert_deduplicate", "0")
                .execute()
                .await?;
        }
        Ok(())
    }

    /// Copies rollup rows of whole days before the oldest raw row of their source: those events
    /// are gone from the raw table and the stream, the rollup is all that is left of them.
    async fn carry_over_rollups(&self, tables: &Tables) -> anyhow::Result<()> {
        for view in &tables.views {
            let has_bucket: u64 = self
                .clickhouse
                .query(
                    "SELECT count() FROM system.columns WHERE database = currentDatabase() AND table = ? \
                     AND name = 'bucket' AND type LIKE 'DateTime%'",
                )
                .bind(&view.target)
                .fetch_one()
                .await?;
            if has_bucket == 0 {
                tracing::warn!(rollup = %view.target, "rollup has no DateTime `bucket` column; history older than the raw rows is not carried over");
                continue;
            }
            let sql = format!(
                "INSERT INTO {target}{SHADOW} SELECT * FROM {target} WHERE bucket < \
                 (SELECT toStartOfDay(ifNull(minOrNull(time), now64(6))) FROM {source}{SHADOW})",
                target = view.target,
                source = view.source,
            );
            self.clickhouse.query(&sql).with_setting("insert_deduplicate", "0").execute().await?;
        }
        Ok(())
    }

    async fn open_reader(
        &self,
        stream: &jetstream::stream::Stream,
        from_seq: u64,
    ) -> anyhow::Result<jetstream::consumer::pull::Ordered> {
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: self.namespace.events_wildcard(),
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from_seq.max(1) },
                ..Default::default()
            })
            .await?;
        Ok(consumer.messages().await?)
    }

    /// The live checkpoint of every partition (0 where none exists yet).
    async fn checkpoints(&self) -> anyhow::Result<Vec<u64>> {
        let mut committed = Vec::with_capacity(usize::from(self.partitions));
        for partition in 0..self.partitions {
            let stored = state::read(&self.states, &state::partition_key(partition)).await?;
            committed.push(stored.map_or(0, |versioned| versioned.state.committed_through));
        }
        Ok(committed)
    }

    /// Waits until every partition is paused for this rebuild, marking unowned ones itself, and
    /// returns the final checkpoints.
    pub(crate) async fn pause_all(&self, tracker: &Tracker) -> anyhow::Result<Vec<u64>> {
        let id = tracker.status().id;
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut committed = vec![0; usize::from(self.partitions)];
        for partition in 0..self.partitions {
            let key = state::partition_key(partition);
            loop {
                tracker.check()?;
                let now = state::now_ms();
                let marked = match state::read(&self.states, &key).await? {
                    Some(current) if current.state.paused_by == id => Some(current.state.committed_through),
                    Some(current) if current.state.lease_expired(now) => {
                        let mut next = current.state.clone();
                        next.paused_by = id.clone();
                        match state::write(&self.states, &key, &current, next).await {
                            Ok(written) => Some(written.state.committed_through),
                            Err(StateError::Conflict) => None,
                            Err(error) => return Err(error.into()),
                        }
                    }
                    Some(_) => None,
                    None => {
                        // Never projected: start it where ClickHouse stands, as the coordinator would.
                        let watermark = crate::sink::stored_watermark(&self.clickhouse, partition).await?;
                        let initial = PartitionState {
                            committed_through: watermark,
                            paused_by: id.clone(),
                            ..Default::default()
                        };
                        match state::create(&self.states, &key, initial).await {
                            Ok(created) => Some(created.state.committed_through),
                            Err(StateError::Conflict) => None,
                            Err(error) => return Err(error.into()),
                        }
                    }
                };
                if let Some(through) = marked {
                    committed[usize::from(partition)] = through;
                    break;
                }
                if Instant::now() > deadline {
                    anyhow::bail!("partition {partition} did not pause within {PAUSE_TIMEOUT:?}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tracing::info!(?committed, "live analytics projection paused");
        Ok(committed)
    }
}

/// The tables of the projection.
struct Tables {
    database: String,
    raw: Vec<String>,
    views: Vec<View>,
}

impl Tables {
    /// Raw tables then rollup tables: every table that gets a shadow and is exchanged.
    fn all(&self) -> Vec<String> {
        let mut all = self.raw.clone();
        for view in &self.views {
            if !all.contains(&view.target) {
                all.push(view.target.clone());
            }
        }
        all
    }
}

struct View {
    name: String,
    source: String,
    target: String,
    create: String,
}

/// Replaces `database.name` (as a whole identifier, optionally back-quoted) with
/// `database.renamed` in a `CREATE` statement.
pub(crate) fn rename_qualified(sql: &str, database: &str, name: &str, renamed: &str) -> String {
    let mut out = sql.to_owned();
    for (from, to) in [
        (format!("{database}.{name}"), format!("{database}.{renamed}")),
        (format!("`{database}`.`{name}`"), format!("`{database}`.`{renamed}`")),
    ] {
        let mut result = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(position) = rest.find(&from) {
            let after = &rest[position + from.len()..];
            let boundary = !after.starts_with(|character: char| character.is_ascii_alphanumeric() || character == '_');
            let before_ok = rest[..position]
                .chars()
                .next_back()
                .is_none_or(|character| !(character.is_ascii_alphanumeric() || character == '_' || character == '.'));
            result.push_str(&rest[..position]);
            result.push_str(if boundary && before_ok { &to } else { &from });
            rest = after;
        }
        result.push_str(rest);
        out = result;
    }
    out
}

type InsertJob = (PendingBatch, Rows);
/// Undecoded messages of one batch: sequence, partition, payload.
type DecodeJob = (PendingBatch, Vec<(u64, u16, bytes::Bytes)>);

/// Decodes batches on the blocking pool, so reading the stream goes on meanwhile; returns how
/// many events could not be decoded (the live projection dead-lettered them).
fn spawn_decoder(
    inserter: mpsc::Sender<InsertJob>,
) -> (mpsc::Sender<DecodeJob>, tokio::task::JoinHandle<anyhow::Result<u64>>) {
    let (sender, mut receiver) = mpsc::channel::<DecodeJob>(2);
    let task = tokio::spawn(async move {
        let mut undecodable = 0u64;
        while let Some((range, messages)) = receiver.recv().await {
            let (rows, skipped) = tokio::task::spawn_blocking(move || {
                let mut rows = Rows::with_capacity(messages.len());
                let mut skipped = 0u64;
                for (sequence, partition, payload) in messages {
                    match decode(&payload) {
                        Ok(event) => crate::partition::push_event(&mut rows, event, partition, sequence),
                        Err(_) => skipped += 1,
                    }
                }
                (rows, skipped)
            })
            .await
            .map_err(|error| anyhow::anyhow!("decoding: {error}"))?;
            undecodable += skipped;
            if !rows.is_empty() {
                inserter.send((range, rows)).await.map_err(|_| anyhow::anyhow!("the insert task stopped"))?;
            }
        }
        Ok(undecodable)
    });
    (sender, task)
}

/// Inserts batches on their own task, so reading and decoding go on while ClickHouse writes.
fn spawn_inserter(sink: Sink) -> (mpsc::Sender<InsertJob>, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let (sender, mut receiver) = mpsc::channel::<InsertJob>(2);
    let task = tokio::spawn(async move {
        while let Some((range, rows)) = receiver.recv().await {
            let mut attempt = 0;
            loop {
                match sink.insert(0, range, &rows).await {
                    Ok(()) => break,
                    // The same tokens make a retry idempotent.
                    Err(error) if attempt < 5 => {
                        attempt += 1;
                        tracing::warn!(%error, attempt, "shadow insert failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                    }
                    Err(error) => return Err(anyhow::anyhow!("inserting into the shadow tables: {error}")),
                }
            }
        }
        Ok(())
    });
    (sender, task)
}

/// The ordered read of the stream into the shadow tables.
struct Reader<'a> {
    rebuilder: &'a Rebuilder,
    tracker: &'a Tracker,
    consumer: jetstream::consumer::pull::Ordered,
    stream: jetstream::stream::Stream,
    /// A message read but not yet taken (the live projection has not committed it yet).
    held: Option<(u64, Option<u16>, jetstream::Message)>,
    from_seq: u64,
    /// Highest sequence read and decided on.
    last_read: u64,
    /// Events without a partition token (not the projector's; the live projection skips them).
    skipped: u64,
    raw: Vec<(u64, u16, bytes::Bytes)>,
    batch_first: Option<u64>,
    batch_started: Instant,
    batch_rows: usize,
    decoder: mpsc::Sender<DecodeJob>,
    target_seq: u64,
}

impl Reader<'_> {
    async fn refresh_target(&mut self) -> anyhow::Result<()> {
        let info = self.stream.get_info().await?;
        self.target_seq = info.state.last_sequence;
        self.report();
        Ok(())
    }

    fn report(&self) {
        let total = self.target_seq.max(self.last_read).saturating_sub(self.from_seq.saturating_sub(1));
        let done = self.last_read.saturating_sub(self.from_seq.saturating_sub(1));
        self.tracker.progress(done, total, self.target_seq, self.skipped);
    }

    /// The next message, or `None` when nothing arrives within `wait`.
    async fn next(&mut self, wait: Duration) -> anyhow::Result<Option<(u64, Option<u16>, jetstream::Message)>> {
        if let Some(held) = self.held.take() {
            return Ok(Some(held));
        }
        match tokio::time::timeout(wait, self.consumer.next()).await {
            Err(_) | Ok(None) => Ok(None),
            Ok(Some(Err(error))) => Err(anyhow::anyhow!("reading the stream: {error}")),
            Ok(Some(Ok(message))) => {
                let sequence = message.info().map_err(|error| anyhow::anyhow!("{error}"))?.stream_sequence;
                let partition = partition_in_subject(&message.subject).filter(|p| *p < self.rebuilder.partitions);
                Ok(Some((sequence, partition, message)))
            }
        }
    }

    /// Reads while the live projection runs: takes what it has committed, waits for the rest,
    /// and returns once it has waited [`STALL_BEFORE_PAUSE`] for the live projection (or the
    /// stream) without progress.
    async fn build(&mut self, committed: &mut Vec<u64>) -> anyhow::Result<()> {
        let mut refreshed = Instant::now();
        let mut stalled_since: Option<Instant> = None;
        loop {
            self.tracker.check()?;
            if refreshed.elapsed() >= CHECKPOINT_REFRESH {
                *committed = self.rebuilder.checkpoints().await?;
                self.refresh_target().await?;
                refreshed = Instant::now();
            }
            let next = self.next(CHECKPOINT_REFRESH).await?;
            let Some((sequence, partition, message)) = next else {
                // Nothing more in the stream: caught up with its head, so pause now.
                self.refresh_target().await?;
                if self.last_read >= self.target_seq
                    || stalled_since.get_or_insert_with(Instant::now).elapsed() >= STALL_BEFORE_PAUSE
                {
                    return Ok(());
                }
                continue;
            };
            let live_has_it = partition.is_none_or(|p| sequence <= committed[usize::from(p)]);
            if !live_has_it {
                self.held = Some((sequence, partition, message));
                // Waiting on the live projection: pause it once the rest is small, or when it does
                // not move (under steady traffic the reader would otherwise trail it for ever).
                if self.target_seq.saturating_sub(self.last_read) <= CATCH_UP_GAP
                    || stalled_since.get_or_insert_with(Instant::now).elapsed() >= STALL_BEFORE_PAUSE
                {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            stalled_since = None;
            self.take(sequence, partition, &message).await?;
        }
    }

    /// With the live projection paused at `committed`: takes every event up to its partition's
    /// checkpoint, skips the rest, and stops after the highest checkpoint.
    async fn finish(&mut self, committed: &[u64]) -> anyhow::Result<()> {
        let last = committed.iter().copied().max().unwrap_or(0);
        while self.last_read < last {
            self.tracker.check()?;
            let Some((sequence, partition, message)) = self.next(Duration::from_secs(5)).await? else {
                // The stream's head can be below a checkpoint only if messages were removed.
                let info = self.stream.get_info().await?;
                if info.state.last_sequence <= self.last_read {
                    break;
                }
                continue;
            };
            if sequence > last {
                break;
            }
            let take = partition.is_some_and(|p| sequence <= committed[usize::from(p)]);
            if take {
                self.take(sequence, partition, &message).await?;
            } else {
                self.last_read = sequence;
            }
            if sequence.is_multiple_of(4096) {
                self.report();
            }
        }
        self.report();
        Ok(())
    }

    /// Decodes one event into the batch; undecodable ones are counted (the live projection sent
    /// them to the dead-letter stream) and skipped.
    async fn take(
        &mut self,
        sequence: u64,
        partition: Option<u16>,
        message: &jetstream::Message,
    ) -> anyhow::Result<()> {
        self.last_read = sequence;
        let Some(partition) = partition else {
            self.skipped += 1;
            return Ok(());
        };
        self.raw.push((sequence, partition, message.payload.clone()));
        self.batch_first.get_or_insert(sequence);
        if self.raw.len() >= self.batch_rows || self.batch_started.elapsed() >= Duration::from_secs(2) {
            self.flush().await?;
        }
        if sequence.is_multiple_of(4096) {
            self.report();
        }
        Ok(())
    }

    /// Hands the batch to the decode task (which hands it on to the insert task).
    async fn flush(&mut self) -> anyhow::Result<()> {
        self.batch_started = Instant::now();
        let Some(first) = self.batch_first.take() else { return Ok(()) };
        let raw = std::mem::replace(&mut self.raw, Vec::with_capacity(self.batch_rows));
        let range = PendingBatch { first, last: self.last_read };
        self.decoder.send((range, raw)).await.map_err(|_| anyhow::anyhow!("the decode task stopped"))?;
        self.report();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::rename_qualified;

    #[test]
    fn renames_only_whole_qualified_names() {
        let create = "CREATE MATERIALIZED VIEW db.requests_1m_mv TO db.requests_1m (`bucket` DateTime) AS SELECT \
                      toStartOfMinute(time) AS bucket FROM db.requests GROUP BY bucket";
        let step1 = rename_qualified(create, "db", "requests_1m_mv", "requests_1m_mv__rebuild");
        let step2 = rename_qualified(&step1, "db", "requests_1m", "requests_1m__rebuild");
        let step3 = rename_qualified(&step2, "db", "requests", "requests__rebuild");
        assert_eq!(
            step3,
            "CREATE MATERIALIZED VIEW db.requests_1m_mv__rebuild TO db.requests_1m__rebuild (`bucket` DateTime) AS \
             SELECT toStartOfMinute(time) AS bucket FROM db.requests__rebuild GROUP BY bucket"
        );
        assert_eq!(rename_qualified("FROM xdb.requests", "db", "requests", "r2"), "FROM xdb.requests");
    }
}
