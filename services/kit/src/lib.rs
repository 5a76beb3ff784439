//! The shared runtime kit: everything a Proxy Stone process needs before it does its own job.
//!
//! Every service builds on the same pieces so that they behave alike: layered [`config`],
//! [`telemetry`] (logs, traces, Prometheus metrics), a [`shutdown`] token with bounded drain,
//! [`nats`] stream provisioning, [`postgres`] and [`clickhouse`] migrations, and the [`admin`]
//! endpoints (`/healthz`, `/readyz`, `/metrics`).

pub mod admin;
pub mod clickhouse;
pub mod config;
pub mod config_stream;
pub mod dependency;
pub mod migrations;
pub mod nats;
pub mod postgres;
pub mod rebuild;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::StoneConfig;
pub use dependency::DependencyError;
pub use shutdown::Shutdown;

/// The software version every service reports.
pub const BUILD_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Binds a TCP listener, naming the configuration key in the error so a port clash is obvious.
pub async fn bind(address: std::net::SocketAddr, config_key: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| anyhow::anyhow!("cannot listen on {address} (config key `{config_key}`): {error}"))
}

/// Runs a service's `main`: on error prints one line naming the cause and exits with status 1.
/// Used by every binary so that a missing dependency never ends in a panic or a stack trace.
pub fn exit_on_error(result: anyhow::Result<()>) {
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
