//! The Proxy Stone gateway: the REST API over the projections (analytics from ClickHouse now;
//! configuration, health and live streams to come), its OpenAPI document, and the admin endpoints
//! (`/healthz`, `/readyz`, `/metrics`) on the same listener.
//!
//! There is no binary here: the `stone` CLI is the composition root and calls [`build`], which
//! binds, spawns the server on the process's [`Shutdown`] and returns at once. Tests use the same
//! [`build`] on port 0, or [`router`] in-process.

#![forbid(unsafe_code)]

pub mod analytics;
pub mod auth;
pub mod cache_purge;
pub mod config;
pub mod error;
pub mod metrics;
pub mod openapi;
mod readiness;
pub mod rebuild;
pub mod streams;
pub mod time_range;
pub mod workers;

use std::net::SocketAddr;

use axum::Router;
use axum::routing::get;
use stone_kit::StoneConfig;
use stone_kit::admin::Readiness;
use stone_kit::shutdown::Shutdown;
use tokio::task::JoinHandle;

pub use crate::error::ApiError;
pub use crate::readiness::CLICKHOUSE_CONDITION;

/// What every handler shares. Cheap to clone: the ClickHouse client and the readiness map are
/// handles.
#[derive(Clone)]
pub struct AppState {
    pub clickhouse: clickhouse::Client,
    pub readiness: Readiness,
    /// The config API's projection and ledger; `None` serves 503 on `/v1/config/*`.
    pub config: Option<config::ConfigContext>,
}

impl AppState {
    pub fn new(clickhouse: clickhouse::Client, readiness: Readiness) -> Self {
        Self { clickhouse, readiness, config: None }
    }

    /// Enables the config API and token authentication.
    pub fn with_config(mut self, context: config::ConfigContext) -> Self {
        self.config = Some(context);
        self
    }

    /// Where bearer tokens are checked (see [`auth::RequireScope`]).
    pub fn token_store(&self) -> Option<&sqlx::PgPool> {
        self.config.as_ref().map(|context| &context.pool)
    }

    /// A client on the configured database and readiness waiting for the first ClickHouse ping.
    pub fn from_config(config: &StoneConfig) -> Self {
        Self::new(analytics::clickhouse_client(config), Readiness::new(&[CLICKHOUSE_CONDITION]))
    }
}

/// Every route of the gateway, with the metrics middleware over all of them.
pub fn router(state: AppState) -> Router {
    metrics::install();
    let admin = stone_kit::admin::router(state.readiness.clone());
    Router::new()
        .route("/v1/openapi.json", get(openapi::serve_document))
        .merge(analytics::routes())
        .merge(config::routes())
        .fallback(|uri: axum::http::Uri| async move { ApiError::NotFound { path: uri.path().to_owned() } })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
        .merge(admin)
        .layer(axum::middleware::from_fn(metrics::record))
}

/// A gateway serving on its own task until the process's shutdown is triggered.
#[derive(Debug)]
pub struct RunningGateway {
    local_addr: SocketAddr,
    server: JoinHandle<std::io::Result<()>>,
}

impl RunningGateway {
    /// The bound address: the configured one, or the port the OS chose for port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Resolves when the server has stopped: after a shutdown once in-flight requests finished,
    /// or early if serving failed.
    pub async fn stopped(self) -> anyhow::Result<()> {
        self.server.await??;
        Ok(())
    }
}

/// Applies the Postgres migrations (the gateway owns the configuration read side), binds
/// `gateway.listen`, starts the ClickHouse readiness probe and the server as tasks tracked by
/// `shutdown`, and returns once the listener is bound. ClickHouse migrations are not run here:
/// the analytics projector owns that schema.
pub async fn build(config: &StoneConfig, shutdown: &Shutdown) -> anyhow::Result<RunningGateway> {
    let postgres = stone_kit::postgres::connect(config, 8).await?;
    stone_kit::postgres::migrate(&postgres).await?;
    let listener = stone_kit::bind(config.gateway.listen, "gateway.listen").await?;
    let local_addr = listener.local_addr()?;
    let (_nats, js) = stone_kit::nats::connect_and_provision(config, "stone-gateway").await?;
    let (ledger, follower) =
        config::Ledger::start(js.clone(), config.namespace(), "gateway".to_owned(), shutdown.token());
    shutdown.spawn(follower);
    let state = AppState::from_config(config).with_config(config::ConfigContext { pool: postgres.clone(), ledger });
    let stream_state = streams::StreamState {
        js,
        namespace: config.namespace(),
        buffer: config.gateway.stream_buffer,
        slots: std::sync::Arc::new(tokio::sync::Semaphore::new(config.gateway.max_streams)),
        shutdown: shutdown.token(),
        tokens: postgres,
    };
    shutdown.spawn(readiness::probe_clickhouse(config.clone(), state.readiness.clone(), shutdown.token()));
    let workers_state = workers::WorkersState { js: stream_state.js.clone(), namespace: config.namespace() };
    let projections_state = analytics::projections::ProjectionsState {
        js: stream_state.js.clone(),
        namespace: config.namespace(),
        partitions: config.partitions,
        pool: state.token_store().cloned(),
    };
    let purge_state = cache_purge::PurgeState {
        app: state.clone(),
        js: stream_state.js.clone(),
        namespace: config.namespace(),
        partitions: config.partitions,
    };
    let rebuild_state = rebuild::RebuildState {
        app: state.clone(),
        analytics: stone_analytics::rebuild::Rebuilder::connect(config, stream_state.js.clone()).await?,
        config: stone_config_projector::rebuild::ConfigRebuilder::connect(
            config,
            state.token_store().cloned().ok_or_else(|| anyhow::anyhow!("no Postgres pool"))?,
            stream_state.js.clone(),
        )
        .await?,
        batch_rows: config.analytics.batch_max_rows.max(50_000),
        shutdown: shutdown.clone(),
    };
    let app = router(state)
        .merge(cache_purge::routes(purge_state))
        .merge(streams::routes(stream_state))
        .merge(workers::routes(workers_state))
        .merge(analytics::projections::routes(projections_state))
        .merge(rebuild::routes(rebuild_state));
    let serving = stone_kit::admin::serve(listener, app, shutdown.token());
    let process_shutdown = shutdown.clone();
    let server = shutdown.spawn(async move {
        let outcome = serving.await;
        // The caller may have dropped the handle; a gateway that stopped serving on its own must
        // still stop the process rather than leave it running without its API.
        if let Err(error) = &outcome {
            tracing::error!(%error, "gateway server failed, shutting down");
            process_shutdown.trigger();
        }
        outcome
    });
    tracing::info!(address = %local_addr, "gateway listening");
    Ok(RunningGateway { local_addr, server })
}
