//! ClickHouse client and migrations. Works the same against a ClickHouse server and against the
//! embedded chDB endpoint of the local stack: it uses only the HTTP interface's common ground.

use clickhouse::Client;
use serde::Deserialize;

use crate::config::StoneConfig;
use crate::dependency::DependencyError;
use crate::migrations::{CLICKHOUSE, checksum, statements};

/// A client bound to the configured database.
pub fn client(config: &StoneConfig) -> Client {
    server_client(config).with_database(&config.clickhouse_database)
}

/// A client without a default database (to create it).
fn server_client(config: &StoneConfig) -> Client {
    let client = Client::default().with_url(&config.clickhouse_url).with_user(&config.clickhouse_user);
    if config.clickhouse_password.0.is_empty() { client } else { client.with_password(&config.clickhouse_password.0) }
}

/// Checks that the server answers.
pub async fn ping(config: &StoneConfig) -> Result<(), DependencyError> {
    server_client(config)
        .query("SELECT 1")
        .fetch_one::<u8>()
        .await
        .map(|_| ())
        .map_err(|error| DependencyError::new("ClickHouse", &config.clickhouse_url, "STONE_CLICKHOUSE_URL", error))
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct Applied {
    version: u32,
    checksum: u64,
}

#[derive(Debug, clickhouse::Row, serde::Serialize)]
struct AppliedRow<'a> {
    version: u32,
    name: &'a str,
    checksum: u64,
}

/// Creates the database if needed and applies pending migrations in order. Migrations use
/// `IF NOT EXISTS` so that two processes starting at once cannot break each other; an applied
/// migration whose text changed is an error, as in sqlx.
pub async fn migrate(config: &StoneConfig) -> anyhow::Result<usize> {
    ping(config).await?;
    // The database name was validated as an identifier, so it can be quoted safely.
    server_client(config)
        .query(&format!("CREATE DATABASE IF NOT EXISTS `{}`", config.clickhouse_database))
        .execute()
        .await?;
    let database = client(config);
    database
        .query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, checksum UInt64, \
             applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = MergeTree ORDER BY version",
        )
        .execute()
        .await?;
    let applied: Vec<Applied> =
        database.query("SELECT version, checksum FROM schema_migrations ORDER BY version").fetch_all().await?;

    let mut count = 0;
    for migration in CLICKHOUSE {
        let text_checksum = checksum(migration.sql);
        if let Some(done) = applied.iter().find(|done| done.version == migration.version) {
            if done.checksum != text_checksum {
                anyhow::bail!(
                    "clickhouse migration {:04}_{} was edited after it was applied; add a new migration instead",
                    migration.version,
                    migration.name
                );
            }
            continue;
        }
        for statement in statements(migration.sql) {
            database.query(&statement).execute().await.map_err(|error| {
                anyhow::anyhow!("clickhouse migration {:04}_{} failed: {error}", migration.version, migration.name)
            })?;
        }
        let mut insert = database.insert::<AppliedRow<'_>>("schema_migrations").await?;
        insert.write(&AppliedRow { version: migration.version, name: migration.name, checksum: text_checksum }).await?;
        insert.end().await?;
        tracing::info!(version = migration.version, name = migration.name, "clickhouse migration applied");
        count += 1;
    }
    Ok(count)
}
