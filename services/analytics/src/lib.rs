//! The analytics projector: request events from JetStream into ClickHouse, acknowledged only
//! after ClickHouse committed them.
//!
//! Each EVENTS partition has its own durable pull consumer and its own loop ([`partition`]), so
//! partitions progress independently and a poison event only detours through the dead-letter
//! stream.

pub mod partition;
pub mod rows;

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use stone_events::streams::{DEADLETTER, EVENTS};
use stone_kit::admin::{self, Readiness};
use stone_kit::{Shutdown, StoneConfig};

use crate::partition::PartitionContext;

/// A started projector.
#[derive(Debug, Clone)]
pub struct RunningProjector {
    pub admin_addr: SocketAddr,
    pub partitions: u16,
}

/// Applies ClickHouse migrations, provisions streams and consumers, and spawns one loop per
/// partition. Fails before binding anything if a dependency is missing.
pub async fn build(config: &StoneConfig, shutdown: &Shutdown) -> anyhow::Result<RunningProjector> {
    stone_kit::clickhouse::migrate(config).await?;
    let (_client, js) = stone_kit::nats::connect_and_provision(config, "stone-analytics").await?;
    let admin_listener = stone_kit::bind(config.analytics.admin_listen, "analytics.admin_listen").await?;
    let admin_addr = admin_listener.local_addr()?;
    let namespace = config.namespace();
    let stream_name = namespace.stream_name(EVENTS);
    let stream = js.get_stream(&stream_name).await?;
    let clickhouse = stone_kit::clickhouse::client(config);

    for partition in 0..config.partitions {
        let consumer_name = format!("{}-requests-p{partition}", config.analytics.consumer);
        let consumer = stream
            .get_or_create_consumer(
                &consumer_name,
                pull::Config {
                    durable_name: Some(consumer_name.clone()),
                    description: Some(format!("analytics projector, requests, partition {partition}")),
                    filter_subject: namespace.family_partition_filter("request", partition),
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::All,
                    ack_wait: Duration::from_secs(60),
                    max_ack_pending: 200_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|error| anyhow::anyhow!("cannot create consumer {consumer_name}: {error}"))?;
        let context = PartitionContext {
            partition,
            consumer,
            dead_letter_subject: namespace.dead_letter_subject(&namespace.stream_name(DEADLETTER), &consumer_name),
            consumer_name,
            stream_name: stream_name.clone(),
            js: js.clone(),
            clickhouse: clickhouse.clone(),
            batch_max_rows: config.analytics.batch_max_rows,
            batch_max_wait: Duration::from_millis(config.analytics.batch_max_wait_ms),
        };
        shutdown.spawn(partition::run(context, shutdown.token()));
    }

    let readiness = Readiness::new(&[]);
    let token = shutdown.token();
    shutdown.spawn(async move {
        if let Err(error) = admin::serve(admin_listener, admin::router(readiness), token).await {
            tracing::error!(%error, "analytics admin server failed");
        }
    });
    tracing::info!(admin = %admin_addr, partitions = config.partitions, "analytics projector started");
    Ok(RunningProjector { admin_addr, partitions: config.partitions })
}
