//! The analytics projector: request, cache and health events from JetStream into ClickHouse,
//! each exactly once; a partition's checkpoint moves only after ClickHouse committed its events.
//!
//! The EVENTS subjects carry a partition token. Projector instances share the partitions through
//! leases in a key-value bucket ([`coordinator`]). Each instance reads the stream once, in order
//! ([`feed`]), and hands every event to the worker of its partition, which writes batches whose
//! intent and checkpoint live in that bucket ([`state`], [`partition`]), with deterministic insert
//! deduplication tokens ([`sink`]) so a retried batch never counts twice, in raw rows or in the
//! rollups fed by materialized views.

pub mod coordinator;
pub mod feed;
pub mod layout;
pub mod native;
pub mod partition;
pub mod rebuild;
pub mod rows;
pub mod sink;
pub mod state;
pub mod synthetic;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use stone_events::streams::{DEADLETTER, EVENTS};
use stone_kit::admin::{self, Readiness};
use stone_kit::{Shutdown, StoneConfig};

use crate::partition::ProjectorContext;
use crate::sink::Sink;

/// Base name of the key-value bucket of partition leases and checkpoints.
pub const STATE_BUCKET: &str = "ANALYTICS";

/// A started projector.
#[derive(Debug, Clone)]
pub struct RunningProjector {
    pub admin_addr: SocketAddr,
    pub partitions: u16,
    pub instance_id: String,
}

/// The instance name in leases: configured, or `analytics-<hostname>-<pid>`.
pub fn instance_id(config: &StoneConfig) -> String {
    if !config.analytics.instance_id.is_empty() {
        return config.analytics.instance_id.clone();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    format!("analytics-{host}-{}", std::process::id())
}

/// Applies ClickHouse migrations and retention, provisions streams and the state bucket, and
/// starts the partition coordinator. Fails before binding anything if a dependency is missing.
pub async fn build(config: &StoneConfig, shutdown: &Shutdown) -> anyhow::Result<RunningProjector> {
    stone_kit::clickhouse::migrate(config).await?;
    let clickhouse = stone_kit::clickhouse::client(config);
    sink::apply_retention(config, &clickhouse).await?;
    let (_client, js) = stone_kit::nats::connect_and_provision(config, "stone-analytics").await?;
    let namespace = config.namespace();
    let store = state::open_bucket(&js, &namespace.bucket_name(STATE_BUCKET), config.events.replicas).await?;
    let rebuilds = stone_kit::rebuild::open(&js, &namespace, config.events.replicas).await?;
    let admin_listener = stone_kit::bind(config.analytics.admin_listen, "analytics.admin_listen").await?;
    let admin_addr = admin_listener.local_addr()?;
    let stream_name = namespace.stream_name(EVENTS);
    let stream = js.get_stream(&stream_name).await?;
    let instance = instance_id(config);
    let (feed, reader) = feed::Feed::new(
        stream.clone(),
        namespace.events_wildcard(),
        config.partitions,
        config.analytics.batch_max_rows,
        shutdown.token(),
    );
    shutdown.spawn(reader);

    let relayout = rebuild::Rebuilder {
        js: js.clone(),
        clickhouse: clickhouse.clone(),
        namespace: namespace.clone(),
        partitions: config.partitions,
        states: store.clone(),
        rebuilds: rebuilds.clone(),
    };
    let context = Arc::new(ProjectorContext {
        dead_letter_subject: namespace
            .dead_letter_subject(&namespace.stream_name(DEADLETTER), &config.analytics.consumer),
        js,
        stream,
        store,
        rebuilds,
        sink: Sink {
            clickhouse,
            token_prefix: format!("{}-{}", config.namespace, config.analytics.consumer),
            table_suffix: "",
        },
        namespace,
        stream_name,
        feed,
        partitions: config.partitions,
        consumer_prefix: config.analytics.consumer.clone(),
        instance_id: instance.clone(),
        batch_max_rows: config.analytics.batch_max_rows,
        batch_max_wait: Duration::from_millis(config.analytics.batch_max_wait_ms),
        lease_ttl: Duration::from_millis(config.analytics.lease_ttl_ms),
        inserts: Arc::new(tokio::sync::Semaphore::new(config.analytics.insert_concurrency)),
        insert_timeout: Duration::from_millis(config.analytics.insert_timeout_ms),
    });
    // Tables whose layout no migration can change (see `layout`): brought to it under the
    // rebuild pause before this instance's workers start, so that a new install never serves a
    // query against the old layout. Should another rebuild or a batch in flight make that wait,
    // the workers start and the change waits in the background.
    let token = shutdown.token();
    let laid_out = match layout::ensure(&relayout, layout::WhenBusy::Defer, &token).await {
        Ok(done) => done,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "table re-layout failed; trying again in the background");
            false
        }
    };
    shutdown.spawn(coordinator::run(context, config.partitions, shutdown.token()));
    if !laid_out {
        shutdown.spawn(async move {
            // Until done: a failure (ClickHouse unreachable, say) is tried again, since queries
            // against the old layout fail until it is done.
            loop {
                match layout::ensure(&relayout, layout::WhenBusy::Wait, &token).await {
                    Ok(_) => break,
                    Err(_) if token.is_cancelled() => break,
                    Err(error) => {
                        tracing::error!(error = %format!("{error:#}"), "table re-layout failed; retrying in 5 s")
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    () = token.cancelled() => break,
                }
            }
        });
    }

    let readiness = Readiness::new(&[]);
    let token = shutdown.token();
    shutdown.spawn(async move {
        if let Err(error) = admin::serve(admin_listener, admin::router(readiness), token).await {
            tracing::error!(%error, "analytics admin server failed");
        }
    });
    tracing::info!(admin = %admin_addr, partitions = config.partitions, instance = %instance, "analytics projector started");
    Ok(RunningProjector { admin_addr, partitions: config.partitions, instance_id: instance })
}
