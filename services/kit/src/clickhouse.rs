//! ClickHouse client and migrations. Works the same against a ClickHouse server and against the
//! embedded chDB endpoint of the local stack: it uses only the HTTP interface's common ground.

use clickhouse::{Client, Compression};
use serde::Deserialize;

use crate::config::{ClickHouseCompression, StoneConfig};
use crate::dependency::DependencyError;
use crate::migrations::{CLICKHOUSE, checksum, statements};

/// A client bound to the configured database.
pub fn client(config: &StoneConfig) -> Client {
    server_client(config).with_database(&config.clickhouse_database)
}

/// A client without a default database (to create it).
fn server_client(config: &StoneConfig) -> Client {
    let compression = match config.clickhouse_compression {
        ClickHouseCompression::Lz4 => Compression::Lz4,
        ClickHouseCompression::None => Compression::None,
        ClickHouseCompression::Auto if on_this_host(&config.clickhouse_url) => Compression::None,
        ClickHouseCompression::Auto => Compression::Lz4,
    };
    let client = Client::default()
        .with_url(&config.clickhouse_url)
        .with_user(&config.clickhouse_user)
        .with_compression(compression);
    if config.clickhouse_password.0.is_empty() { client } else { client.with_password(&config.clickhouse_password.0) }
}

/// Whether the URL's host is a loopback name or address.
fn on_this_host(url: &str) -> bool {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = after_scheme.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let host = if let Some(bracketed) = host_port.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|address| address.is_loopback())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised() {
        assert!(on_this_host("http://127.0.0.1:8123"));
        assert!(on_this_host("http://localhost:8123/"));
        assert!(on_this_host("http://user:pw@[::1]:8123"));
        assert!(!on_this_host("https://clickhouse.internal:8443"));
        assert!(!on_this_host("http://10.0.0.5:8123"));
    }
}
