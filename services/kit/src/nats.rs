//! NATS connection and idempotent JetStream provisioning from the contract's stream definitions.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use stone_events::streams::{Retention, StreamSpec};

use crate::config::StoneConfig;
use crate::dependency::DependencyError;

/// Connects to NATS, failing fast with a message that says how to start it.
pub async fn connect(config: &StoneConfig, client_name: &str) -> Result<async_nats::Client, DependencyError> {
    let client: Arc<str> = Arc::from(client_name);
    async_nats::ConnectOptions::new()
        .name(client_name)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let client = Arc::clone(&client);
            async move { report_event(&client, &event) }
        })
        .connect(config.nats_url.as_str())
        .await
        .map_err(|error| DependencyError::new("NATS", &config.nats_url, "STONE_NATS_URL", error))
}

/// Makes the client's connection events visible: they are otherwise dropped. A slow consumer
/// matters most: the client drops messages for a subscription whose buffer is full (a core NATS
/// subscription, e.g. cache invalidations or live streams, loses them for good), so it is
/// counted in `stone_nats_events_total{client,event}` and logged as a warning like every
/// disconnect and error.
fn report_event(client: &Arc<str>, event: &async_nats::Event) {
    use async_nats::Event;
    let kind = match event {
        Event::Connected => "connected",
        Event::Disconnected => "disconnected",
        Event::LameDuckMode => "lame_duck_mode",
        Event::Draining => "draining",
        Event::Closed => "closed",
        Event::SlowConsumer(_) => "slow_consumer",
        Event::ServerError(_) => "server_error",
        Event::ClientError(_) => "client_error",
    };
    metrics::counter!("stone_nats_events_total", "client" => client.to_string(), "event" => kind).increment(1);
    match event {
        Event::Connected | Event::Draining | Event::Closed => tracing::info!(client = %client, %event, "NATS"),
        Event::SlowConsumer(subscription) => tracing::warn!(
            client = %client,
            subscription,
            "NATS subscription is a slow consumer: the client dropped messages for it"
        ),
        Event::Disconnected | Event::LameDuckMode | Event::ServerError(_) | Event::ClientError(_) => {
            tracing::warn!(client = %client, %event, "NATS")
        }
    }
}

/// The server-side configuration of a stream.
pub fn stream_config(spec: &StreamSpec, replicas: usize) -> stream::Config {
    let (max_age, max_bytes) = match spec.retention {
        Retention::Limits { max_age, max_bytes } => (max_age, max_bytes),
        Retention::Forever => (Duration::ZERO, -1),
    };
    stream::Config {
        name: spec.name.clone(),
        description: Some(spec.description.clone()),
        subjects: spec.subjects.clone(),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_age,
        max_bytes,
        duplicate_window: spec.duplicate_window,
        num_replicas: replicas.max(1),
        allow_direct: true,
        ..Default::default()
    }
}

/// Creates each stream, or updates it when the settings we own have changed. Safe to run from
/// every process at every start.
pub async fn ensure_streams(js: &jetstream::Context, specs: &[StreamSpec], replicas: usize) -> anyhow::Result<()> {
    for spec in specs {
        let wanted = stream_config(spec, replicas);
        let mut existing = js
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|error| anyhow::anyhow!("cannot create stream {}: {error}", spec.name))?;
        let current =
            existing.info().await.map_err(|error| anyhow::anyhow!("stream {}: {error}", spec.name))?.config.clone();
        let differs = current.subjects != wanted.subjects
            || current.max_age != wanted.max_age
            || current.max_bytes != wanted.max_bytes
            || current.duplicate_window != wanted.duplicate_window
            || current.description != wanted.description;
        if differs {
            js.update_stream(&wanted)
                .await
                .map_err(|error| anyhow::anyhow!("cannot update stream {}: {error}", spec.name))?;
            tracing::info!(stream = %spec.name, "stream settings updated");
        }
    }
    Ok(())
}

/// Deletes every stream and KV bucket of a namespace (`<NS>_…` and `KV_<NS>_…`): what tests and
/// benchmarks created under their own namespace. Refuses the default namespace, whose streams
/// carry no prefix (it would match everything). Best effort: failures are ignored.
pub async fn delete_namespace(js: &jetstream::Context, namespace: &stone_events::Namespace) {
    let prefix = namespace.stream_name("");
    if prefix.is_empty() {
        return;
    }
    let bucket_prefix = format!("KV_{prefix}");
    let mut names = js.stream_names();
    let mut mine = Vec::new();
    while let Some(Ok(name)) = futures::StreamExt::next(&mut names).await {
        if name.starts_with(&prefix) || name.starts_with(&bucket_prefix) {
            mine.push(name);
        }
    }
    for name in mine {
        let _ = js.delete_stream(name).await;
    }
}

/// Connects and provisions every stream of the configured namespace.
pub async fn connect_and_provision(
    config: &StoneConfig,
    client_name: &str,
) -> anyhow::Result<(async_nats::Client, jetstream::Context)> {
    let client = connect(config, client_name).await?;
    let js = jetstream::new(client.clone());
    let specs = stone_events::streams::all_streams(&config.namespace(), config.events_retention());
    ensure_streams(&js, &specs, config.events.replicas).await.map_err(|error| {
        anyhow::anyhow!(
            "{error:#}; is JetStream enabled on {} (nats-server -js)?",
            crate::dependency::redact_url(&config.nats_url)
        )
    })?;
    Ok((client, js))
}

/// Opens a key-value bucket, creating it if needed.
///
/// The bucket's stream is created directly with the KV conventions (`KV_<bucket>`, subjects
/// `$KV.<bucket>.>`, one message per key) because async-nats' `create_key_value` sends fields
/// that nats-server 2.9 answers in a shape the client cannot parse. `max_age` of zero keeps
/// values forever (checkpoints); a TTL makes keys lapse (heartbeats), and such short-lived values
/// can live in memory.
pub async fn open_kv(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    max_age: Duration,
    storage: stream::StorageType,
    replicas: usize,
) -> anyhow::Result<jetstream::kv::Store> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.to_owned()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage,
        discard: stream::DiscardPolicy::New,
        num_replicas: replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .map_err(|error| anyhow::anyhow!("cannot create key-value bucket {bucket}: {error}"))?;
    js.get_key_value(bucket).await.map_err(|error| anyhow::anyhow!("cannot open key-value bucket {bucket}: {error}"))
}
