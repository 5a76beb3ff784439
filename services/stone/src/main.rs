//! `stone`: run a Proxy Stone service, or all of them with a demo (`stone dev`).
//!
//! `main` stays thin: parse arguments, load configuration, start telemetry, start the service,
//! wait for a signal, drain within the configured bound.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use stone_kit::{Shutdown, StoneConfig};

mod apply;
#[path = "bench/baseline.rs"]
mod bench_baseline;
#[path = "bench/cache.rs"]
mod bench_cache;
#[path = "bench/pipeline.rs"]
mod bench_pipeline;
#[path = "bench/proxy.rs"]
mod bench_proxy;
#[path = "bench/replay.rs"]
mod bench_replay;
mod config_cmd;
mod demo;
mod dev;
mod replay;
mod tail;

#[derive(Debug, Parser)]
#[command(name = "stone", version, about = "Proxy Stone: an event-sourced edge proxy")]
struct Cli {
    /// TOML configuration file; `STONE_*` environment variables override it.
    #[arg(long, short = 'c', env = "STONE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy worker.
    Proxy,
    /// Run the analytics projector (EVENTS → ClickHouse).
    Analytics,
    /// Run the gateway (analytics, config and stream APIs).
    Gateway,
    /// Run every service in one process with a demo upstream and demo traffic.
    Dev(dev::DevArgs),
    /// Follow the live event stream in the terminal (through the gateway).
    Tail(tail::TailArgs),
    /// Benchmarks (not tests), e.g. `stone bench proxy` against nginx.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run the config projector (CONFIG → Postgres state, history and checkpoint).
    ConfigProjector,
    /// Apply a declarative configuration file: show the diff, then apply it as one change set.
    Apply(apply::ApplyArgs),
    /// Configuration tools.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// Gateway API tokens (the bootstrap of the first admin token).
    #[command(subcommand)]
    Token(config_cmd::TokenCommand),
    /// Rebuild a projection from its stream into shadow tables, with a progress bar, and swap it
    /// in (through the gateway; needs an admin token).
    Replay(replay::ReplayArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// The proxy against nginx as a reverse proxy to the same upstream, as ratios.
    Proxy(bench_proxy::ProxyBenchArgs),
    /// The analytics pipeline against raw JetStream consumption, freshness through the API, and
    /// endpoint latency, as ratios.
    Pipeline(bench_pipeline::PipelineBenchArgs),
    /// Cache hits against nginx proxy_cache serving the same object, and Redis-tier hit latency.
    Cache(bench_cache::CacheBenchArgs),
    /// Projection rebuild rates (analytics against the raw JetStream read, config from 100k
    /// changes).
    Replay(bench_replay::ReplayBenchArgs),
    /// A minimal hyper server (static answer or plain forward): the reference row the proxy and
    /// cache benches start and measure beside nginx.
    #[command(hide = true)]
    HyperBaseline(bench_baseline::BaselineArgs),
}

/// mimalloc instead of glibc's malloc: the proxy allocates and frees small buffers per request
/// from several threads, where glibc spent about a fifth of the proxy's CPU time (`perf`, see
/// docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    stone_kit::exit_on_error(run());
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = StoneConfig::load(cli.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // Tools run once and exit; only services go through the telemetry and shutdown lifecycle.
    let command = match cli.command {
        Command::Bench(BenchCommand::Proxy(args)) => return bench_proxy::run(&config, args),
        Command::Bench(BenchCommand::Pipeline(args)) => return runtime.block_on(bench_pipeline::run(&config, args)),
        Command::Bench(BenchCommand::Cache(args)) => return bench_cache::run(&config, &runtime, args),
        Command::Bench(BenchCommand::Replay(args)) => return runtime.block_on(bench_replay::run(&config, args)),
        Command::Bench(BenchCommand::HyperBaseline(args)) => return bench_baseline::run(&runtime, args),
        Command::Apply(args) => return runtime.block_on(apply::run(args)),
        Command::Replay(args) => return runtime.block_on(replay::run(args)),
        Command::Config(command) => return runtime.block_on(config_cmd::run_config(command)),
        Command::Token(command) => return runtime.block_on(config_cmd::run_token(&config, command)),
        service => service,
    };
    runtime.block_on(async move {
        let service_name = match command {
            Command::Proxy => "stone-proxy",
            Command::Analytics => "stone-analytics",
            Command::Gateway => "stone-gateway",
            Command::Dev(_) => "stone-dev",
            Command::Tail(_) => "stone-tail",
            Command::ConfigProjector => "stone-config-projector",
            Command::Apply(_) | Command::Config(_) | Command::Token(_) | Command::Bench(_) | Command::Replay(_) => {
                "stone-tool"
            }
        };
        let _telemetry = stone_kit::telemetry::init(&config.telemetry, service_name)?;
        let shutdown = Shutdown::new();
        let started = match command {
            Command::Proxy => stone_proxy::build(&config, &shutdown).await.map(|_| ()),
            Command::Analytics => stone_analytics::build(&config, &shutdown).await.map(|_| ()),
            Command::Gateway => stone_gateway::build(&config, &shutdown).await.map(|_| ()),
            Command::Dev(args) => dev::start(config.clone(), args, &shutdown).await,
            Command::ConfigProjector => stone_config_projector::build(&config, &shutdown).await.map(|_| ()),
            Command::Apply(_) | Command::Config(_) | Command::Token(_) | Command::Bench(_) | Command::Replay(_) => {
                Ok(())
            }
            Command::Tail(args) => {
                // A client command: it runs until Ctrl-C or until it fails.
                let on_signal = shutdown.clone();
                tokio::spawn(async move {
                    stone_kit::shutdown::signal().await;
                    on_signal.trigger();
                });
                let outcome = tail::run(args, shutdown.clone()).await;
                shutdown.trigger();
                outcome
            }
        };
        if let Err(error) = started {
            shutdown.trigger();
            return Err(error);
        }
        let signal = tokio::select! {
            signal = stone_kit::shutdown::signal() => signal,
            () = shutdown.triggered() => "internal shutdown",
        };
        tracing::info!(signal, grace_ms = config.shutdown_grace_ms, "shutting down");
        if let Err(error) = shutdown.drain(config.shutdown_grace()).await {
            tracing::warn!(%error, "shutdown drain incomplete");
        }
        Ok(())
    })
}
