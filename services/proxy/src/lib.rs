//! The Proxy Stone data plane: accepts HTTP/1.1 and HTTP/2 (h2c, and over TLS as ALPN
//! negotiates when `proxy.tls` is configured), routes each request to an
//! upstream target, streams the response back, and emits one `request.completed` per request to
//! JetStream without ever waiting on it.
//!
//! [`build`] binds the listeners and spawns the work on the process's [`Shutdown`]; tests call it
//! with port 0, the `stone` command with the configured addresses.

pub mod access;
pub mod auth;
pub mod balancer;
pub mod body;
pub mod cache;
pub mod config_follow;
pub mod emitter;
pub mod health;
pub mod ratelimit;
pub mod registry;
pub mod routing;
pub mod service;
pub mod spool;
pub mod timer;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use stone_events::Envelope;
use stone_events::health::WorkerHeartbeat;
use stone_kit::admin::{self, Readiness};
use stone_kit::{Shutdown, StoneConfig};

use crate::balancer::HealthRegistry;
use crate::emitter::EmitterSettings;
use crate::routing::RouteTable;
use crate::service::{ProxyService, ServiceSettings};

/// Largest request head (request line and headers) accepted; beyond it the answer is 431.
const MAX_REQUEST_HEAD_BYTES: usize = 64 * 1024;
/// Time a client has to send a complete request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a worker announces itself.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

/// A started proxy.
#[derive(Debug, Clone)]
pub struct RunningProxy {
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The TLS listener's address, when `proxy.tls` is configured.
    pub tls_addr: Option<SocketAddr>,
    pub worker_id: String,
}

/// The worker id: configured, or `proxy-<hostname>-<pid>`.
pub fn worker_id(config: &StoneConfig) -> String {
    if !config.proxy.worker_id.is_empty() {
        return config.proxy.worker_id.clone();
    }
    let host = std::fs::read_to_string("/etc/hostname").map(|name| name.trim().to_owned()).unwrap_or_default();
    let host = if host.is_empty() { "local".to_owned() } else { host };
    format!("proxy-{host}-{}", std::process::id())
}

/// Validates the routing configuration, connects to NATS, binds both listeners and spawns the
/// proxy. Everything that can fail does so before the first request is accepted.
///
/// With routes in the configuration file (standalone mode) the table is in force at once; otherwise
/// the worker replays the CONFIG stream and reports ready on `/readyz` only when it has caught up.
pub async fn build(config: &StoneConfig, shutdown: &Shutdown) -> anyhow::Result<RunningProxy> {
    // Routes and the publisher hold metric handles made when they are built: the recorder must
    // be in place first (it is when the process initialised telemetry; embedded uses may not have).
    stone_kit::telemetry::metrics_handle();
    let health_registry = Arc::new(HealthRegistry::default());
    let from_file = config.proxy.uses_file_routes();
    let table = if from_file {
        let table = RouteTable::build(&config.proxy.routes, &config.proxy.upstreams, &health_registry)
            .and_then(|table| table.with_access(&config.proxy.routes, &[], &[]))
            .map_err(|message| anyhow::anyhow!("invalid configuration: proxy: {message}"))?;
        if table.is_empty() {
            tracing::warn!("no routes configured: every request will get 404");
        }
        table
    } else {
        RouteTable::default()
    };
    let (client, js) = stone_kit::nats::connect_and_provision(config, "stone-proxy").await?;
    let namespace = config.namespace();
    let registry_bucket = namespace.bucket_name(registry::BUCKET);
    let registry_store = registry::open_bucket(&js, &registry_bucket).await?;
    let listener = stone_kit::bind(config.proxy.listen, "proxy.listen").await?;
    let admin_listener = stone_kit::bind(config.proxy.admin_listen, "proxy.admin_listen").await?;
    let tls_listener = if config.proxy.tls.enabled() {
        let acceptor = tls::acceptor(&config.proxy.tls, shutdown.token())?;
        Some((stone_kit::bind(config.proxy.tls.listen, "proxy.tls.listen").await?, acceptor))
    } else {
        None
    };
    let tls_addr = tls_listener.as_ref().map(|(listener, _)| listener.local_addr()).transpose()?;
    let listen_addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let worker = worker_id(config);

    let (sink, publisher) = emitter::channel(
        client,
        js.clone(),
        EmitterSettings {
            namespace: namespace.clone(),
            partitions: config.partitions,
            capacity: config.proxy.event_queue_capacity,
            max_in_flight: config.proxy.publish_max_in_flight,
            worker_id: worker.clone(),
            drain_grace: config.shutdown_grace(),
            spool_dir: config.proxy.spool_dir.clone(),
            spool_max_bytes: config.proxy.spool_max_bytes,
            enabled: config.proxy.emit_events,
        },
        shutdown.token(),
    )?;
    shutdown.spawn(publisher);

    let service = ProxyService::new(
        table,
        0,
        sink,
        ServiceSettings {
            worker_id: Arc::from(worker.as_str()),
            connect_timeout: Duration::from_millis(config.proxy.connect_timeout_ms),
            default_timeout: Duration::from_millis(config.proxy.upstream_timeout_ms),
            max_body_bytes: config.proxy.max_request_body_bytes,
            retry_budget_ratio: config.proxy.retry_budget_ratio,
            limiter: ratelimit::Limiter::new(ratelimit::LimiterSettings {
                redis_url: (!config.redis_url.is_empty()).then(|| config.redis_url.clone()),
                timeout: Duration::from_millis(config.proxy.rate_limit_timeout_ms),
                failure_mode: config.proxy.rate_limit_failure,
                key_prefix: config.namespace.clone(),
            })
            .map_err(|message| anyhow::anyhow!("invalid configuration: {message}"))?,
        },
    );

    // The response cache: memory tier, Redis tier shared by the workers (memory only when Redis
    // is unreachable), purges and invalidations from every worker over NATS.
    let cache_settings =
        cache::CacheSettings::from_config(&config.proxy.cache, Some(&config.redis_url), &config.namespace);
    let response_cache = cache::Cache::new(&cache_settings, Some(service.cache_events()))
        .await
        .with_invalidation_broadcast(js.client(), stone_events::cache::purge_subject(&namespace));
    let purges = cache::purge::listen(js.client(), &namespace, response_cache.clone(), shutdown.token()).await?;
    shutdown.spawn(purges);
    let service = service.with_cache(response_cache);

    let readiness = Readiness::new(&[config_follow::CONFIG_CONDITION]);
    if from_file {
        readiness.set(config_follow::CONFIG_CONDITION, true);
        let checks = shutdown.token();
        let table = service.table();
        health::spawn_active_checks(&table, service.health_reporter(), &checks);
        table.access().spawn_refreshers(&checks, Duration::from_secs(config.proxy.jwks_refresh_secs));
    } else {
        let follower = config_follow::ConfigFollower {
            js: js.clone(),
            namespace: namespace.clone(),
            service: service.clone(),
            health: Arc::clone(&health_registry),
            readiness: readiness.clone(),
            shutdown: shutdown.token(),
            jwks_refresh: Duration::from_secs(config.proxy.jwks_refresh_secs),
        };
        shutdown.spawn(follower.run());
    }
    let token = shutdown.token();
    let admin_readiness = readiness.clone();
    shutdown.spawn(async move {
        if let Err(error) = admin::serve(admin_listener, admin::router(admin_readiness), token).await {
            tracing::error!(%error, "proxy admin server failed");
        }
    });
    let registration = registry::Registration {
        js: js.clone(),
        bucket: registry_bucket,
        store: registry_store,
        service: service.clone(),
        readiness,
        worker: worker.clone(),
        listen: listen_addr,
    };
    shutdown.spawn(registry::run(registration, shutdown.token()));
    shutdown.spawn(heartbeat(service.clone(), worker.clone(), shutdown.clone()));
    if let Some((tls_listener, acceptor)) = tls_listener {
        let tls_loop =
            accept_loop(tls_listener, Some(acceptor), service.clone(), shutdown.clone(), config.shutdown_grace());
        shutdown.spawn(tls_loop);
    }
    shutdown.spawn(accept_loop(listener, None, service, shutdown.clone(), config.shutdown_grace()));
    tracing::info!(listen = %listen_addr, tls = ?tls_addr, admin = %admin_addr, worker = %worker, from_file, "proxy started");
    Ok(RunningProxy { listen_addr, admin_addr, tls_addr, worker_id: worker })
}

/// Accepts connections until shutdown, then lets open connections finish within the grace
/// period. The service (and with it the event sink) is dropped at the end, which lets the
/// publisher flush and stop. With `tls`, each connection's handshake runs in its own task (a slow
/// client cannot hold up the others) and its requests are marked secure.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    service: ProxyService,
    shutdown: Shutdown,
    grace: Duration,
) {
    let secure = tls.is_some();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Oversized heads get 431 from hyper; a client that trickles its head is cut off rather than
    // holding a connection forever (slowloris).
    builder
        .http1()
        .max_buf_size(MAX_REQUEST_HEAD_BYTES)
        .timer(crate::timer::CoarseTimer::start())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(MAX_REQUEST_HEAD_BYTES as u32);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.triggered() => break,
        };
        let (stream, client) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let handler = service_fn(move |request| {
            let service = service.clone();
            async move { Ok::<_, std::convert::Infallible>(service.handle_from(request, client, secure).await) }
        });
        if let Some(acceptor) = &tls {
            let handshake = acceptor.accept(stream);
            let (builder, watcher) = (builder.clone(), graceful.watcher());
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(HEADER_READ_TIMEOUT, handshake).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        metrics::counter!("stone_proxy_tls_handshake_failures_total").increment(1);
                        tracing::debug!(%error, %client, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics::counter!("stone_proxy_tls_handshake_failures_total").increment(1);
                        tracing::debug!(%client, "TLS handshake timed out");
                        return;
                    }
                };
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), handler).into_owned();
                if let Err(error) = watcher.watch(connection).await {
                    tracing::debug!(error = %error, "connection ended with an error");
                }
            });
            continue;
        }
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), handler).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    drop(service);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after the shutdown grace period");
    }
}

async fn heartbeat(service: ProxyService, worker: String, shutdown: Shutdown) {
    let started = Instant::now();
    let mut interval = tokio::time::interval(HEARTBEAT_INTERVAL);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.triggered() => return,
        }
        let beat = WorkerHeartbeat {
            worker: worker.clone(),
            build: stone_kit::BUILD_VERSION.to_owned(),
            uptime_s: started.elapsed().as_secs(),
            in_flight: service.in_flight(),
            events_pending: service.events_pending() as u64,
        };
        service.sink().emit(&Envelope::new(worker.clone(), service.config_seq(), beat));
    }
}
