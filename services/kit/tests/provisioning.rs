//! Provisioning against the real servers: streams, ClickHouse and Postgres migrations are
//! idempotent, and an edited ClickHouse migration is refused.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use stone_kit::StoneConfig;

fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}{}", &id[id.len() - 10..])
}

fn config() -> StoneConfig {
    let mut config = StoneConfig {
        namespace: unique("k"),
        nats_url: std::env::var("STONE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
        clickhouse_url: std::env::var("STONE_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into()),
        database_url: std::env::var("STONE_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        clickhouse_database: unique("kit_"),
        ..StoneConfig::default()
    };
    // JetStream reserves max_bytes per stream; keep test streams small.
    config.events.max_bytes = 64 * 1024 * 1024;
    config
}

#[tokio::test]
async fn streams_are_created_once_and_updated_when_settings_change() {
    let mut config = config();
    let (_client, js) = stone_kit::nats::connect_and_provision(&config, "kit-test").await.unwrap();
    // Second run: nothing to do, no error.
    stone_kit::nats::connect_and_provision(&config, "kit-test").await.unwrap();
    let events = config.namespace().stream_name("EVENTS");
    let mut stream = js.get_stream(&events).await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.duplicate_window, Duration::from_secs(120));
    assert_eq!(stream.info().await.unwrap().config.subjects, vec![format!("{}.ev.>", config.namespace)]);

    config.events.max_age_secs = 3600;
    stone_kit::nats::connect_and_provision(&config, "kit-test").await.unwrap();
    let mut stream = js.get_stream(&events).await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.max_age, Duration::from_secs(3600));

    let mut config_stream = js.get_stream(config.namespace().stream_name("CONFIG")).await.unwrap();
    assert_eq!(config_stream.info().await.unwrap().config.max_age, Duration::ZERO, "CONFIG never expires");
    for base in ["EVENTS", "CONFIG", "DEADLETTER"] {
        js.delete_stream(config.namespace().stream_name(base)).await.unwrap();
    }
}

#[tokio::test]
async fn clickhouse_migrations_apply_once_and_refuse_edited_history() {
    let config = config();
    let applied = stone_kit::clickhouse::migrate(&config).await.unwrap();
    assert_eq!(applied, stone_kit::migrations::CLICKHOUSE.len());
    assert_eq!(stone_kit::clickhouse::migrate(&config).await.unwrap(), 0, "second run applies nothing");

    let client = stone_kit::clickhouse::client(&config);
    let tables: u64 = client
        .query("SELECT count() FROM system.tables WHERE database = ? AND name = 'requests'")
        .bind(&config.clickhouse_database)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(tables, 1);

    // Pretend migration 1 had other text when it was applied.
    client
        .query("ALTER TABLE schema_migrations DELETE WHERE version = 1 SETTINGS mutations_sync = 1")
        .execute()
        .await
        .unwrap();
    client
        .query("INSERT INTO schema_migrations (version, name, checksum) VALUES (1, 'requests', 42)")
        .execute()
        .await
        .unwrap();
    let refused = stone_kit::clickhouse::migrate(&config).await.err().map(|error| error.to_string());
    assert!(refused.as_deref().is_some_and(|message| message.contains("edited after it was applied")), "{refused:?}");

    client.query(&format!("DROP DATABASE `{}`", config.clickhouse_database)).execute().await.unwrap();
}

#[tokio::test]
async fn postgres_migrations_are_idempotent() {
    let base = config();
    let admin = stone_kit::postgres::connect(&base, 1).await.unwrap();
    let database = unique("kit_");
    sqlx::query(&format!("CREATE DATABASE {database}")).execute(&admin).await.unwrap();
    let (prefix, _) = base.database_url.rsplit_once('/').unwrap();
    let config = StoneConfig { database_url: format!("{prefix}/{database}"), ..base };

    let pool = stone_kit::postgres::connect(&config, 2).await.unwrap();
    stone_kit::postgres::migrate(&pool).await.unwrap();
    stone_kit::postgres::migrate(&pool).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('config_entities', 'projection_checkpoints')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 2);
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE {database} WITH (FORCE)")).execute(&admin).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_server_is_a_dependency_error_with_a_hint() {
    let config = StoneConfig { nats_url: "nats://127.0.0.1:9".into(), ..config() };
    let error = stone_kit::nats::connect(&config, "kit-test").await.err().unwrap();
    assert_eq!(error.service, "NATS");
    assert!(error.to_string().contains("infra/stack.sh up"));
}

/// A subscription that does not keep up loses messages in the client; that is counted and
/// visible, never silent. 70k messages through the client's 64k-message subscription buffer,
/// read only afterwards.
#[tokio::test]
async fn a_slow_consumer_is_counted() {
    let config = config();
    stone_kit::telemetry::metrics_handle();
    let client = stone_kit::nats::connect(&config, "kit-slow-consumer").await.unwrap();
    let subject = format!("{}.slow", config.namespace);
    let mut subscription = client.subscribe(subject.clone()).await.unwrap();
    let publisher = stone_kit::nats::connect(&config, "kit-slow-publisher").await.unwrap();
    for _ in 0..70_000 {
        publisher.publish(subject.clone(), bytes::Bytes::from_static(b"x")).await.unwrap();
    }
    publisher.flush().await.unwrap();
    // The server routed every message before answering the publisher's ping; the subscriber's
    // pong comes after all of them on its connection, so its client has read (kept or dropped)
    // every one of them once this returns.
    client.flush().await.unwrap();
    let counted = || {
        stone_kit::telemetry::metrics_handle().render().lines().any(|line| {
            line.starts_with("stone_nats_events_total{")
                && line.contains("client=\"kit-slow-consumer\"")
                && line.contains("event=\"slow_consumer\"")
        })
    };
    let mut received = 0;
    while let Ok(Some(_)) =
        tokio::time::timeout(Duration::from_secs(2), futures::StreamExt::next(&mut subscription)).await
    {
        received += 1;
    }
    assert!(received < 70_000, "all {received} messages arrived: the buffer never overflowed");
    for _ in 0..50 {
        if counted() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no slow_consumer event counted after {received} of 70000 messages arrived");
}
