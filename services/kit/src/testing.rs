//! Isolation for tests and benchmarks that share one NATS, Postgres and ClickHouse server: each
//! gets its own namespace (streams, KV buckets), database names and port-0 listeners, with small
//! stream limits so that many can exist at once (JetStream reserves `max_bytes` up front).
//! Compiled only with the `testing` feature.

use std::net::SocketAddr;

use crate::config::StoneConfig;

/// Small enough that dozens of test streams fit in a default JetStream store.
const TEST_STREAM_BYTES: i64 = 64 * 1024 * 1024;

/// A configuration of its own for one test: `tag` (letters) starts the names, for readability.
/// Server URLs come from the `STONE_*` variables that `infra/test.sh` exports.
pub fn isolated(tag: &str) -> StoneConfig {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let suffix = &id[id.len() - 10..];
    let name = format!("{tag}{suffix}");
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config = StoneConfig::default();
    for (key, slot) in [
        ("STONE_NATS_URL", &mut config.nats_url),
        ("STONE_CLICKHOUSE_URL", &mut config.clickhouse_url),
        ("STONE_DATABASE_URL", &mut config.database_url),
        ("STONE_REDIS_URL", &mut config.redis_url),
    ] {
        if let Ok(value) = std::env::var(key) {
            *slot = value;
        }
    }
    let server = config.database_url.rsplit_once('/').map(|(server, _)| server.to_owned()).unwrap_or_default();
    config.database_url = format!("{server}/{name}");
    config.namespace = name.clone();
    config.clickhouse_database = name;
    config.events.max_bytes = TEST_STREAM_BYTES;
    config.shutdown_grace_ms = 5_000;
    config.proxy.listen = any_port;
    config.proxy.admin_listen = any_port;
    config.proxy.tls.listen = any_port;
    config.gateway.listen = any_port;
    config.analytics.admin_listen = any_port;
    // A spool folder of its own: a worker locks its folder, so tests running side by side must
    // not share the default `.stone/spool`.
    config.proxy.spool_dir = std::env::temp_dir().join(format!("stone-spool-{}", config.namespace));
    config
}

/// Creates the (empty) Postgres database named in `config.database_url`.
pub async fn create_database(config: &StoneConfig) -> anyhow::Result<()> {
    let (server, database) = split(config)?;
    let admin = sqlx::PgPool::connect(&format!("{server}/postgres")).await?;
    sqlx::query(&format!("CREATE DATABASE \"{database}\"")).execute(&admin).await?;
    admin.close().await;
    Ok(())
}

/// Removes everything an isolated configuration may have created: its streams and KV buckets,
/// its ClickHouse database and its Postgres database. Errors are ignored: cleanup is best effort
/// and must not hide the test's own outcome.
pub async fn cleanup(config: &StoneConfig) {
    if let Ok(client) = async_nats::connect(config.nats_url.as_str()).await {
        crate::nats::delete_namespace(&async_nats::jetstream::new(client), &config.namespace()).await;
    }
    let clickhouse = clickhouse::Client::default().with_url(&config.clickhouse_url);
    let _ = clickhouse.query(&format!("DROP DATABASE IF EXISTS `{}`", config.clickhouse_database)).execute().await;
    if let Ok((server, database)) = split(config)
        && let Ok(admin) = sqlx::PgPool::connect(&format!("{server}/postgres")).await
    {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)")).execute(&admin).await;
        admin.close().await;
    }
    if config.proxy.spool_dir.starts_with(std::env::temp_dir()) {
        let _ = std::fs::remove_dir_all(&config.proxy.spool_dir);
    }
}

fn split(config: &StoneConfig) -> anyhow::Result<(String, String)> {
    let (server, database) =
        config.database_url.rsplit_once('/').ok_or_else(|| anyhow::anyhow!("database_url has no database name"))?;
    // Names come from `isolated`: letters and digits only, so quoting them is safe.
    anyhow::ensure!(
        database.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_'),
        "unexpected database name"
    );
    Ok((server.to_owned(), database.to_owned()))
}

/// Runs a test body, catching a panic (a failed assertion) so that the caller can clean up before
/// passing it on with [`rethrow`]: a test that panics must not leave its streams and databases
/// behind on the shared servers.
///
/// ```ignore
/// let outcome = stone_kit::testing::caught(async { /* assertions */ }).await;
/// app.finish().await;
/// stone_kit::testing::rethrow(outcome)
/// ```
pub async fn caught<T>(test: impl std::future::Future<Output = T>) -> std::thread::Result<T> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(test).catch_unwind().await
}

/// What [`caught`] caught: the body's value, or its panic resumed.
pub fn rethrow<T>(outcome: std::thread::Result<T>) -> T {
    match outcome {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
