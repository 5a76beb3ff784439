//! `stone bench replay`: how fast projections are rebuilt from their streams, side by side with
//! the raw JetStream read of the same events on the same machine.
//!
//! It uses the configured NATS, ClickHouse and Postgres with a namespace and databases of its
//! own, removed afterwards (unless `--keep`):
//! 1. analytics: publish `--events` synthetic `request.completed` events, let the live projector
//!    store them all (a rebuild is exact to the live checkpoints, so the live projection must be
//!    caught up for the rebuild to take every event), read them once with an ordered consumer doing
//!    nothing else, then rebuild the analytics projection (shadow tables, pause, swap) and check it
//!    holds every event once;
//! 2. config: publish `--config-events` config changes to CONFIG, time the live projector's
//!    catch-up from empty, then time a rebuild of the config projection.

use std::io::Write;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use stone_analytics::rebuild::{RebuildOptions, Rebuilder};
use stone_analytics::synthetic::{self, Publisher};
use stone_config_projector::rebuild::ConfigRebuilder;
use stone_events::Envelope;
use stone_events::config::{ConfigChange, ConfigOp, EntitySpec};
use stone_kit::{Shutdown, StoneConfig};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct ReplayBenchArgs {
    /// Request events for the analytics rebuild.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Config changes for the config rebuild.
    #[arg(long, default_value_t = 100_000)]
    config_events: u64,
    /// Rows per insert into the shadow tables.
    #[arg(long, default_value_t = 100_000)]
    batch_rows: usize,
    /// Keep the bench's streams and databases afterwards.
    #[arg(long)]
    keep: bool,
}

pub async fn run(base: &StoneConfig, args: ReplayBenchArgs) -> anyhow::Result<()> {
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let suffix = &unique[unique.len() - 8..];
    let mut config = base.clone();
    config.namespace = format!("replay{suffix}");
    config.clickhouse_database = format!("replay_{suffix}");
    let server = config.database_url.rsplit_once('/').map(|(server, _)| server.to_owned()).unwrap_or_default();
    config.database_url = format!("{server}/replay_{suffix}");
    config.analytics.admin_listen = "127.0.0.1:0".parse()?;
    config.analytics.instance_id = format!("replay-{suffix}");
    config.analytics.batch_max_rows = config.analytics.batch_max_rows.max(20_000);
    config.events.max_bytes = i64::try_from(args.events.saturating_mul(1_200).max(256 << 20)).unwrap_or(i64::MAX);
    let outcome = measure(&config, &server, &args).await;
    if !args.keep {
        cleanup(&config, &server).await;
    }
    let report = outcome?;
    std::io::stdout().lock().write_all(report.as_bytes())?;
    Ok(())
}

fn line(report: &mut String, text: String) {
    report.push_str(&text);
    report.push('\n');
    let _ = writeln!(std::io::stderr(), "{text}");
}

async fn measure(config: &StoneConfig, server: &str, args: &ReplayBenchArgs) -> anyhow::Result<String> {
    let mut report = String::new();
    stone_kit::clickhouse::migrate(config).await?;
    let (_client, js) = stone_kit::nats::connect_and_provision(config, "stone-bench-replay").await?;

    // 1. Analytics.
    let started = Instant::now();
    let mut publisher = Publisher::new(js.clone(), config.namespace(), config.partitions, 4_096);
    let now = OffsetDateTime::now_utc();
    for index in 0..args.events {
        let offset = i64::try_from(index % 21_600).unwrap_or(0);
        publisher.publish(&synthetic::request(index, now - time::Duration::seconds(offset))).await?;
    }
    publisher.flush().await?;
    line(
        &mut report,
        format!("published {} events at {:.0} ev/s", args.events, args.events as f64 / started.elapsed().as_secs_f64()),
    );

    let shutdown = Shutdown::new();
    let started = Instant::now();
    stone_analytics::build(config, &shutdown).await?;
    let clickhouse = stone_kit::clickhouse::client(config);
    wait_until(Duration::from_secs(1_800), || async {
        let count: u64 = clickhouse.query("SELECT count() FROM requests").fetch_one().await?;
        Ok(count >= args.events)
    })
    .await?;
    line(
        &mut report,
        format!(
            "live projector caught up: {:.0} ev/s (for reference)",
            args.events as f64 / started.elapsed().as_secs_f64()
        ),
    );

    let raw_rate = raw_read(config, &js, args.events).await?;
    line(&mut report, format!("raw JetStream read, one ordered consumer, no work: {raw_rate:.0} ev/s"));

    let rebuilder = Rebuilder::connect(config, js.clone()).await?;
    let tracker = rebuilder.claim("bench").await?;
    let started = Instant::now();
    let options = RebuildOptions { batch_rows: args.batch_rows, ..RebuildOptions::default() };
    let summary = rebuilder.execute(&tracker, &options, &CancellationToken::new()).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let rebuild_rate = summary.events as f64 / elapsed;
    let rows: u64 = clickhouse.query("SELECT count() FROM requests").fetch_one().await?;
    let rolled: u64 = clickhouse.query("SELECT sum(requests) FROM requests_1h").fetch_one().await?;
    anyhow::ensure!(
        rows == args.events && rolled == args.events,
        "after the rebuild: {rows} raw rows and {rolled} in the hourly rollup, {} expected",
        args.events
    );
    line(
        &mut report,
        format!(
            "analytics rebuild ({} tables, shadow + pause + EXCHANGE): {} events in {elapsed:.1} s = {rebuild_rate:.0} ev/s, ratio to raw read {:.2}",
            summary.tables.len(),
            summary.events,
            rebuild_rate / raw_rate
        ),
    );
    shutdown.trigger();
    let _ = shutdown.drain(Duration::from_secs(10)).await;

    // 2. Config.
    let admin = sqlx::PgPool::connect(&format!("{server}/postgres")).await?;
    sqlx::query(&format!("CREATE DATABASE \"replay_{}\"", &config.namespace["replay".len()..])).execute(&admin).await?;
    admin.close().await;
    let pool = stone_kit::postgres::connect(config, 4).await?;
    stone_kit::postgres::migrate(&pool).await?;
    let started = Instant::now();
    publish_config(config, &js, args.config_events).await?;
    line(
        &mut report,
        format!(
            "published {} config changes at {:.0} ev/s",
            args.config_events,
            args.config_events as f64 / started.elapsed().as_secs_f64()
        ),
    );
    let last = stone_kit::config_stream::last_sequence(&js, &config.namespace()).await?;
    let projector = Shutdown::new();
    let started = Instant::now();
    stone_config_projector::build(config, &projector).await?;
    wait_until(Duration::from_secs(1_800), || async { Ok(stone_config_projector::checkpoint(&pool).await? >= last) })
        .await?;
    let live_seconds = started.elapsed().as_secs_f64();
    line(&mut report, format!("live config projector from empty: {live_seconds:.1} s (one transaction per event)"));
    let rebuilder = ConfigRebuilder::connect(config, pool.clone(), js.clone()).await?;
    let tracker = rebuilder.claim("bench").await?;
    let started = Instant::now();
    let summary = rebuilder.execute(&tracker, &CancellationToken::new()).await?;
    let rebuild_seconds = started.elapsed().as_secs_f64();
    line(
        &mut report,
        format!(
            "config rebuild of {} events (shadow tables + rename): {rebuild_seconds:.1} s = {:.0} ev/s, {:.2}x the live projector's time",
            summary.events,
            summary.events as f64 / rebuild_seconds,
            rebuild_seconds / live_seconds
        ),
    );
    projector.trigger();
    let _ = projector.drain(Duration::from_secs(10)).await;
    pool.close().await;
    Ok(report)
}

async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let started = Instant::now();
    while !check().await? {
        anyhow::ensure!(started.elapsed() < limit, "not done within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Reads every event once with one ordered consumer (what the rebuild reads through), parsing
/// each message's sequence as the rebuild does, and nothing else.
async fn raw_read(config: &StoneConfig, js: &async_nats::jetstream::Context, events: u64) -> anyhow::Result<f64> {
    let stream = js.get_stream(config.namespace().stream_name("EVENTS")).await?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: config.namespace().events_wildcard(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let started = Instant::now();
    let mut read = 0u64;
    let mut last = 0u64;
    while read < events {
        let Some(message) = tokio::time::timeout(Duration::from_secs(10), messages.next()).await? else { break };
        let message = message.map_err(|error| anyhow::anyhow!("{error}"))?;
        last = last.max(message.info().map_err(|error| anyhow::anyhow!("{error}"))?.stream_sequence);
        read += 1;
    }
    anyhow::ensure!(read == events, "read {read} of {events} events (last sequence {last})");
    Ok(read as f64 / started.elapsed().as_secs_f64())
}

/// Publishes `count` upserts of 1,000 upstreams (so versions climb), acknowledgements pipelined.
async fn publish_config(config: &StoneConfig, js: &async_nats::jetstream::Context, count: u64) -> anyhow::Result<()> {
    let namespace = config.namespace();
    let mut acks = Vec::with_capacity(4_096);
    let ids: Vec<uuid::Uuid> = (0..1_000).map(|_| uuid::Uuid::now_v7()).collect();
    for index in 0..count {
        let slot = usize::try_from(index % 1_000).unwrap_or(0);
        let name = format!("pool{slot}");
        let spec: EntitySpec = serde_json::from_value(serde_json::json!({
            "kind": "upstream",
            "name": name,
            "targets": [{"url": format!("http://10.0.{}.{}:8080", index % 200, index % 250 + 1), "weight": 1}],
        }))?;
        let change = ConfigChange {
            kind: spec.kind(),
            name: name.clone(),
            id: ids[slot],
            version: index / 1_000 + 1,
            op: ConfigOp::Upserted,
            actor: "bench".to_owned(),
            spec: Some(spec),
            change_set: None,
        };
        let subject = namespace.config_subject(change.kind.as_str(), &name);
        let envelope = Envelope::new("bench", 0, change);
        acks.push(js.publish(subject, Bytes::from(envelope.to_json()?)).await?);
        if acks.len() >= 4_096 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    Ok(())
}

async fn cleanup(config: &StoneConfig, server: &str) {
    if let Ok(client) = async_nats::connect(config.nats_url.as_str()).await {
        stone_kit::nats::delete_namespace(&async_nats::jetstream::new(client), &config.namespace()).await;
    }
    let clickhouse = clickhouse::Client::default().with_url(&config.clickhouse_url);
    let _ = clickhouse.query(&format!("DROP DATABASE IF EXISTS `{}`", config.clickhouse_database)).execute().await;
    if let Ok(admin) = sqlx::PgPool::connect(&format!("{server}/postgres")).await {
        let name = config.database_url.rsplit_once('/').map(|(_, name)| name.to_owned()).unwrap_or_default();
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&admin).await;
        admin.close().await;
    }
}
