//! What the cache tests share: a scriptable upstream that counts its hits and records what it
//! was asked, a front server that answers through `stone_proxy::cache::Cache` the way the proxy
//! does (GET/HEAD through `serve`, other methods forwarded and then `invalidate_after`), and a
//! client. Every front has its own Redis prefix, so tests run in parallel against one Redis.

#![allow(dead_code, clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use stone_events::cache::RouteCacheSpec;
use stone_events::request::{CacheStatus, ErrorKind};
use stone_proxy::body::ProxyBody;
use stone_proxy::cache::{Cache, CachePolicy, CacheRequest, CacheSettings, Fetcher};

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// What the upstream answers: status, headers, body.
pub type Answer = (u16, Vec<(&'static str, String)>, Vec<u8>);
type Script = Arc<dyn Fn(&hyper::http::request::Parts, u64) -> Answer + Send + Sync>;

/// A scriptable upstream.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    hits: Arc<AtomicU64>,
    script: Arc<Mutex<Script>>,
    delay_ms: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let script: Script = Arc::new(|_, _| (200, vec![], b"hello".to_vec()));
        let upstream = Self {
            addr,
            hits: Arc::default(),
            script: Arc::new(Mutex::new(script)),
            delay_ms: Arc::default(),
            seen: Arc::default(),
            down: Arc::default(),
        };
        let server = upstream.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let server = server.clone();
                tokio::spawn(async move {
                    let handler = service_fn(move |request: Request<Incoming>| {
                        let server = server.clone();
                        async move {
                            let (parts, _body) = request.into_parts();
                            let hit = server.hits.fetch_add(1, Ordering::SeqCst) + 1;
                            server.seen.lock().unwrap().push(parts.headers.clone());
                            let delay = server.delay_ms.load(Ordering::SeqCst);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            let script = server.script.lock().unwrap().clone();
                            let (status, headers, body) = script(&parts, hit);
                            let mut response = Response::new(Full::new(Bytes::from(body)));
                            *response.status_mut() = StatusCode::from_u16(status).unwrap();
                            for (name, value) in headers {
                                response.headers_mut().append(name, HeaderValue::from_str(&value).unwrap());
                            }
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), handler)
                        .await;
                });
            }
        });
        upstream
    }

    /// Sets how the upstream answers; the closure gets the request head and the hit number.
    pub fn answer(&self, script: impl Fn(&hyper::http::request::Parts, u64) -> Answer + Send + Sync + 'static) {
        *self.script.lock().unwrap() = Arc::new(script);
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn set_delay(&self, millis: u64) {
        self.delay_ms.store(millis, Ordering::SeqCst);
    }

    /// Headers of the most recent upstream request.
    pub fn last_request(&self) -> HeaderMap {
        self.seen.lock().unwrap().last().cloned().unwrap_or_default()
    }

    /// While down, the front's fetcher fails as on a refused connection.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

/// A front server answering through a [`Cache`].
pub struct Front {
    pub addr: SocketAddr,
    pub cache: Cache,
    pub statuses: Arc<Mutex<Vec<CacheStatus>>>,
}

pub fn spec() -> RouteCacheSpec {
    serde_json::from_value(serde_json::json!({})).unwrap()
}

pub fn settings(prefix: &str) -> CacheSettings {
    CacheSettings {
        memory_max_bytes: 64 * 1024 * 1024,
        redis_url: Some(std::env::var("STONE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())),
        redis_prefix: prefix.to_owned(),
        redis_timeout: Duration::from_millis(500),
        redis_connect_timeout: Duration::from_secs(3),
        coalesce_wait: Duration::from_secs(5),
        eviction_report_interval: Duration::from_secs(1),
    }
}

pub fn unique_prefix() -> String {
    format!("stone-test:{}", uuid::Uuid::now_v7().simple())
}

impl Front {
    /// A front with its own Redis prefix.
    pub async fn start(upstream: &Upstream, spec: RouteCacheSpec) -> Self {
        Self::start_with(upstream, spec, settings(&unique_prefix())).await
    }

    pub async fn start_with(upstream: &Upstream, spec: RouteCacheSpec, settings: CacheSettings) -> Self {
        let cache = Cache::new(&settings, None).await;
        assert!(cache.has_redis(), "tests need the local Redis");
        Self::start_on(upstream, spec, cache).await
    }

    pub async fn start_on(upstream: &Upstream, spec: RouteCacheSpec, cache: Cache) -> Self {
        let policy = Arc::new(CachePolicy::compile(&spec).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let statuses: Arc<Mutex<Vec<CacheStatus>>> = Arc::default();
        let (front_cache, front_statuses, front_upstream) = (cache.clone(), Arc::clone(&statuses), upstream.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (cache, statuses, upstream, client, policy) = (
                    front_cache.clone(),
                    Arc::clone(&front_statuses),
                    front_upstream.clone(),
                    client.clone(),
                    Arc::clone(&policy),
                );
                tokio::spawn(async move {
                    let handler = service_fn(move |request: Request<Incoming>| {
                        let (cache, statuses, upstream, client, policy) = (
                            cache.clone(),
                            Arc::clone(&statuses),
                            upstream.clone(),
                            client.clone(),
                            Arc::clone(&policy),
                        );
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                handle(cache, statuses, upstream, client, policy, request).await,
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), handler)
                        .await;
                });
            }
        });
        Self { addr, cache, statuses }
    }

    pub fn last_status(&self) -> CacheStatus {
        self.statuses.lock().unwrap().last().copied().unwrap_or_default()
    }
}

fn upstream_uri(upstream: SocketAddr, parts: &hyper::http::request::Parts) -> hyper::Uri {
    let path = parts.uri.path_and_query().map_or("/", |value| value.as_str());
    format!("http://{upstream}{path}").parse().unwrap()
}

async fn handle(
    cache: Cache,
    statuses: Arc<Mutex<Vec<CacheStatus>>>,
    upstream: Upstream,
    client: Client<HttpConnector, Full<Bytes>>,
    policy: Arc<CachePolicy>,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let host = request.headers().get(header::HOST).and_then(|value| value.to_str().ok()).unwrap_or("").to_owned();
    let (mut parts, body) = request.into_parts();
    // As the proxy does: the client's X-Forwarded-Host is replaced, never passed on.
    parts.headers.insert(HeaderName::from_static("x-forwarded-host"), HeaderValue::from_str(&host).unwrap());
    if parts.method == Method::GET || parts.method == Method::HEAD {
        let fetch_client = client.clone();
        let fetch_upstream = upstream.clone();
        let fetcher: Fetcher = Arc::new(move |mut parts: hyper::http::request::Parts| {
            let client = fetch_client.clone();
            let upstream = fetch_upstream.clone();
            Box::pin(async move {
                if upstream.down.load(Ordering::SeqCst) {
                    return Err(ErrorKind::UpstreamConnect);
                }
                parts.uri = upstream_uri(upstream.addr, &parts);
                let response = client
                    .request(Request::from_parts(parts, Full::new(Bytes::new())))
                    .await
                    .map_err(|_| ErrorKind::UpstreamConnect)?;
                Ok(response.map(|body| body.boxed()))
            })
        });
        let request = CacheRequest { route: "r".into(), policy, host, consumer: None };
        return match cache.serve(request, parts, fetcher).await {
            Ok(served) => {
                statuses.lock().unwrap().push(served.status);
                served.response
            }
            Err(_) => {
                statuses.lock().unwrap().push(CacheStatus::None);
                let mut response = Response::new(
                    Full::new(Bytes::from_static(b"upstream down")).map_err(|never| match never {}).boxed(),
                );
                *response.status_mut() = StatusCode::BAD_GATEWAY;
                response
            }
        };
    }
    let body = body.collect().await.map(|collected| collected.to_bytes()).unwrap_or_default();
    let method = parts.method.clone();
    let uri = parts.uri.clone();
    parts.uri = upstream_uri(upstream.addr, &parts);
    let response = client.request(Request::from_parts(parts, Full::new(body))).await.unwrap();
    cache.invalidate_after(&host, &method, &uri, response.status(), response.headers()).await;
    response.map(|body| body.boxed())
}

/// A reply as the test sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    pub fn cache_status(&self) -> &str {
        self.header("cache-status").unwrap_or("")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(front: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder().method(method).uri(format!("http://{front}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client.request(request.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply { status: parts.status.as_u16(), headers: parts.headers, body }
}

pub async fn get(front: SocketAddr, path: &str) -> Reply {
    send(front, "GET", path, &[]).await
}

/// Waits until `check` holds (stores happen when a body ends, on a task).
pub async fn eventually(mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached in time");
}

/// The time a stored body needs to land in the tiers before the next request (a store runs on a
/// task once the client has read the body).
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

pub fn cc(value: &str) -> Vec<(&'static str, String)> {
    vec![("cache-control", value.to_owned())]
}
