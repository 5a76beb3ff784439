//! What the proxy tests share: an isolated configuration (own NATS namespace, port-0 listeners,
//! own spool folder), upstream servers whose answers a test can change, a client, and helpers to
//! publish config events and count events in the test's streams.

#![allow(dead_code, clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use stone_events::Envelope;
use stone_events::config::{ConfigChange, ConfigOp, EntitySpec, RouteSpec, TargetSpec, UpstreamSpec};
use stone_kit::{Shutdown, StoneConfig};

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A configuration isolated to one test (the kit's helper: own namespace, small streams, port-0
/// listeners) plus the proxy's own: a worker id and a spool folder of its own. Routes come from
/// the stream unless the test adds some.
pub fn isolated_config() -> StoneConfig {
    let mut config = stone_kit::testing::isolated("p");
    config.partitions = 2;
    config.shutdown_grace_ms = 3_000;
    config.proxy.worker_id = format!("worker-{}", config.namespace);
    config.proxy.spool_dir = std::env::temp_dir().join(format!("stone-proxy-test-{}", config.namespace));
    config
}

pub fn upstream_spec(name: &str, targets: &[(SocketAddr, u32)]) -> UpstreamSpec {
    UpstreamSpec {
        name: name.into(),
        algorithm: Default::default(),
        targets: targets
            .iter()
            .map(|(address, weight)| TargetSpec { url: format!("http://{address}"), weight: *weight })
            .collect(),
        health_check: None,
        hash_on: None,
        passive_health: None,
    }
}

pub fn route_spec(name: &str, paths: &[&str], upstream: &str) -> RouteSpec {
    RouteSpec {
        name: name.into(),
        hosts: vec![],
        paths: paths.iter().map(|path| (*path).to_owned()).collect(),
        methods: vec![],
        headers: Default::default(),
        upstream: upstream.into(),
        strip_prefix: false,
        timeout_ms: None,
        priority: 0,
        retries: None,
        max_body_bytes: None,
        auth: None,
        rate_limit: None,
        cache: None,
    }
}

/// An upstream server started by the test: answers with its name in `x-upstream` and the status
/// the test sets (also on `/healthz`), and counts the requests it served.
#[derive(Clone)]
pub struct TestUpstream {
    pub name: &'static str,
    pub address: SocketAddr,
    pub status: Arc<AtomicU16>,
    pub served: Arc<AtomicU64>,
}

impl TestUpstream {
    pub async fn start(name: &'static str, shutdown: &Shutdown) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let upstream = Self {
            name,
            address: listener.local_addr()?,
            status: Arc::new(AtomicU16::new(200)),
            served: Arc::new(AtomicU64::new(0)),
        };
        let token = shutdown.token();
        let state = upstream.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = token.cancelled() => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_request: Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            state.served.fetch_add(1, Ordering::Relaxed);
                            let mut response = Response::new(Full::new(Bytes::from(vec![b'x'; 64])));
                            *response.status_mut() =
                                hyper::StatusCode::from_u16(state.status.load(Ordering::Relaxed)).unwrap();
                            response
                                .headers_mut()
                                .insert("x-upstream", hyper::header::HeaderValue::from_static(state.name));
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(upstream)
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }
}

pub type TestClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Status and the `x-upstream` header of a GET.
pub async fn get(client: &TestClient, url: &str) -> Result<(u16, String), BoxError> {
    let response = client.request(Request::get(url).body(Empty::new())?).await?;
    let status = response.status().as_u16();
    let upstream =
        response.headers().get("x-upstream").and_then(|value| value.to_str().ok()).unwrap_or_default().to_owned();
    response.into_body().collect().await?;
    Ok((status, upstream))
}

pub async fn jetstream(config: &StoneConfig) -> Result<jetstream::Context, BoxError> {
    Ok(jetstream::new(async_nats::connect(config.nats_url.as_str()).await?))
}

/// Publishes one config change the way the config API does (one subject per entity).
pub async fn publish_config(
    js: &jetstream::Context,
    config: &StoneConfig,
    spec: EntitySpec,
    version: u64,
) -> Result<u64, BoxError> {
    let change = ConfigChange {
        kind: spec.kind(),
        name: spec.name().to_owned(),
        id: uuid::Uuid::now_v7(),
        version,
        op: ConfigOp::Upserted,
        actor: "test".to_owned(),
        spec: Some(spec),
        change_set: None,
    };
    let subject = config.namespace().config_subject(change.kind.as_str(), &change.name);
    let envelope = Envelope::new("test", 0, change);
    let ack = js.publish(subject, Bytes::from(envelope.to_json()?)).await?.await?;
    Ok(ack.sequence)
}

/// Messages in the test's EVENTS stream under `{ns}.ev.{filter}`.
pub async fn count_events(js: &jetstream::Context, config: &StoneConfig, filter: &str) -> Result<u64, BoxError> {
    let namespace = config.namespace();
    let stream = js.get_stream(namespace.stream_name("EVENTS")).await?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            filter_subject: format!("{}.ev.{filter}", namespace.root()),
            ..Default::default()
        })
        .await?;
    let mut consumer = consumer;
    let pending = consumer.info().await?.num_pending;
    let name = consumer.cached_info().name.clone();
    let _ = stream.delete_consumer(&name).await;
    Ok(pending)
}

/// Decoded events of the test's EVENTS stream under `{ns}.ev.{filter}`.
pub async fn read_events(
    js: &jetstream::Context,
    config: &StoneConfig,
    filter: &str,
) -> Result<Vec<stone_events::Event>, BoxError> {
    use futures::StreamExt;
    let namespace = config.namespace();
    let stream = js.get_stream(namespace.stream_name("EVENTS")).await?;
    let consumer = stream
        .create_consumer(jetstream::consumer::push::OrderedConfig {
            filter_subject: format!("{}.ev.{filter}", namespace.root()),
            deliver_subject: format!("_INBOX.{}", uuid::Uuid::now_v7().simple()),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut events = Vec::new();
    loop {
        let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(500), messages.next()).await else {
            break;
        };
        let message = message?;
        let pending = message.info()?.pending;
        events.push(stone_events::decode(&message.payload)?);
        if pending == 0 {
            break;
        }
    }
    Ok(events)
}

/// Waits (bounded) until `check` holds; returns whether it did.
pub async fn eventually<F, Fut>(attempts: u32, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..attempts {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Removes the test's streams, KV bucket and spool folder.
pub async fn cleanup(config: &StoneConfig) {
    stone_kit::testing::cleanup(config).await;
    let _ = std::fs::remove_dir_all(&config.proxy.spool_dir);
}

pub fn spool_dir(config: &StoneConfig) -> PathBuf {
    config.proxy.spool_dir.clone()
}
