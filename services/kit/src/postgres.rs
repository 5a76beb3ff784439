//! Postgres connection pool and migrations (sqlx), applied at start.

use std::borrow::Cow;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::PgPool;
use sqlx::migrate::{Migration as SqlxMigration, MigrationSource, MigrationType, Migrator};
use sqlx::postgres::PgPoolOptions;

use crate::config::StoneConfig;
use crate::dependency::DependencyError;
use crate::migrations::POSTGRES;

/// Connects a pool, failing fast with a message that says how to start Postgres.
pub async fn connect(config: &StoneConfig, max_connections: u32) -> Result<PgPool, DependencyError> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&config.database_url)
        .await
        .map_err(|error| DependencyError::new("Postgres", &config.database_url, "STONE_DATABASE_URL", error))
}

/// The embedded migrations as a sqlx source.
#[derive(Debug)]
struct Embedded;

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<SqlxMigration>, sqlx::error::BoxDynError>> {
        Box::pin(async {
            Ok(POSTGRES
                .iter()
                .map(|migration| {
                    SqlxMigration::new(
                        i64::from(migration.version),
                        Cow::Borrowed(migration.name),
                        MigrationType::Simple,
                        Cow::Borrowed(migration.sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// Applies pending migrations (under sqlx's advisory lock, so concurrent starts are safe).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    let migrator = Migrator::new(Embedded).await?;
    migrator.run(pool).await.map_err(|error| anyhow::anyhow!("postgres migrations failed: {error}"))?;
    Ok(())
}
