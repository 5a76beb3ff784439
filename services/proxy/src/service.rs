//! The forwarding service: one request in, routed, sent to a target, streamed back, measured.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use stone_events::request::{CacheStatus, ErrorKind, RequestCompleted};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::body::{Completion, CountingBody, MeteredBody, ProxyBody, micros};
use crate::emitter::EventSink;
use crate::routing::RouteTable;

type UpstreamClient = Client<HttpConnector, CountingBody<Incoming>>;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 proxy-stone");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Settings the service needs from the proxy configuration.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub worker_id: Arc<str>,
    pub connect_timeout: Duration,
    pub default_timeout: Duration,
}

struct Shared {
    table: RwLock<Arc<RouteTable>>,
    config_seq: AtomicU64,
    client: UpstreamClient,
    sink: EventSink,
    settings: ServiceSettings,
    in_flight: AtomicU64,
}

/// The proxy's request handler; clones share state.
#[derive(Clone)]
pub struct ProxyService {
    shared: Arc<Shared>,
}

impl ProxyService {
    pub fn new(table: RouteTable, config_seq: u64, sink: EventSink, settings: ServiceSettings) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector);
        Self {
            shared: Arc::new(Shared {
                table: RwLock::new(Arc::new(table)),
                config_seq: AtomicU64::new(config_seq),
                client,
                sink,
                settings,
                in_flight: AtomicU64::new(0),
            }),
        }
    }

    /// Swaps the routing table; requests already routed keep the table they started with.
    pub fn replace_table(&self, table: RouteTable, config_seq: u64) {
        if let Ok(mut current) = self.shared.table.write() {
            *current = Arc::new(table);
            self.shared.config_seq.store(config_seq, Ordering::Release);
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    pub fn events_pending(&self) -> usize {
        self.shared.sink.pending()
    }

    pub fn sink(&self) -> &EventSink {
        &self.shared.sink
    }

    fn table(&self) -> Arc<RouteTable> {
        self.shared.table.read().map(|table| Arc::clone(&table)).unwrap_or_default()
    }

    /// Handles one request end to end. Never fails: every outcome is a response and an event.
    pub async fn handle(&self, request: Request<Incoming>, client: SocketAddr) -> Response<ProxyBody> {
        let started = Instant::now();
        let started_at = OffsetDateTime::now_utc();
        let event_id = Uuid::now_v7();
        let shared = &self.shared;
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlightGuard(&shared.in_flight);

        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .or_else(|| request.uri().authority().map(|authority| authority.as_str()))
            .unwrap_or_default()
            .to_owned();
        let path = request.uri().path().to_owned();
        let bytes_in = Arc::new(AtomicU64::new(0));
        let mut completion = Completion {
            sink: shared.sink.clone(),
            event_id,
            source: Arc::clone(&shared.settings.worker_id),
            config_seq: shared.config_seq.load(Ordering::Acquire),
            started_at,
            started,
            upstream_started: None,
            ttfb_us: None,
            bytes_in: Arc::clone(&bytes_in),
            data: RequestCompleted {
                method: request.method().as_str().to_owned(),
                host: host.clone(),
                route: stone_events::subjects::NONE_TOKEN.to_owned(),
                path_template: String::new(),
                path: path.clone(),
                upstream: None,
                target: None,
                consumer: None,
                client_ip: Some(client.ip().to_string()),
                protocol: protocol_name(request.version()).to_owned(),
                status: 0,
                total_us: 0,
                upstream_us: None,
                ttfb_us: None,
                bytes_in: 0,
                bytes_out: 0,
                cache: CacheStatus::None,
                error: None,
                rate_limit: None,
            },
        };

        let table = self.table();
        let Some(found) = table.find(&host, &path, request.method(), request.headers()) else {
            return local_response(
                completion,
                StatusCode::NOT_FOUND,
                ErrorKind::NoRoute,
                "no route matches this request",
            );
        };
        let route = Arc::clone(found.route);
        completion.data.route = route.name.clone();
        completion.data.path_template = found.pattern.template();
        completion.data.upstream = Some(route.upstream.name.clone());
        let Some(target) = route.upstream.pick() else {
            return local_response(
                completion,
                StatusCode::BAD_GATEWAY,
                ErrorKind::NoHealthyTarget,
                "no upstream target available",
            );
        };
        completion.data.target = Some(target.url.clone());

        let upstream_path = if route.strip_prefix { found.pattern.strip(&path) } else { path.clone() };
        let path_and_query = match request.uri().query() {
            Some(query) => format!("{}{upstream_path}?{query}", target.base_path),
            None => format!("{}{upstream_path}", target.base_path),
        };
        let uri = Uri::builder()
            .scheme(target.scheme.clone())
            .authority(target.authority.clone())
            .path_and_query(path_and_query)
            .build();
        let Ok(uri) = uri else {
            return local_response(
                completion,
                StatusCode::BAD_REQUEST,
                ErrorKind::BadRequest,
                "request path cannot be forwarded",
            );
        };

        let (mut parts, body) = request.into_parts();
        parts.uri = uri;
        // The upstream side speaks HTTP/1.1 whatever the client spoke.
        parts.version = Version::HTTP_11;
        prepare_request_headers(&mut parts.headers, client, &host, event_id);
        if let Ok(authority) = HeaderValue::from_str(target.authority.as_str()) {
            parts.headers.insert(header::HOST, authority);
        }
        let upstream_request = Request::from_parts(parts, CountingBody::new(body, bytes_in));

        let timeout = route.timeout.unwrap_or(shared.settings.default_timeout);
        completion.upstream_started = Some(Instant::now());
        let outcome = tokio::time::timeout(timeout, shared.client.request(upstream_request)).await;
        let upstream_response = match outcome {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                let kind = if error.is_connect() { ErrorKind::UpstreamConnect } else { ErrorKind::UpstreamReset };
                tracing::debug!(%error, target = %target.url, "upstream request failed");
                return local_response(completion, StatusCode::BAD_GATEWAY, kind, "upstream unavailable");
            }
            Err(_) => {
                return local_response(
                    completion,
                    StatusCode::GATEWAY_TIMEOUT,
                    ErrorKind::UpstreamTimeout,
                    "upstream timed out",
                );
            }
        };

        let (mut parts, body) = upstream_response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.append(header::VIA, VIA_VALUE.clone());
        if let Ok(value) = HeaderValue::from_str(&event_id.to_string()) {
            parts.headers.entry(&X_REQUEST_ID).or_insert(value);
        }
        completion.data.status = parts.status.as_u16();
        completion.ttfb_us = Some(micros(started.elapsed()));
        Response::from_parts(parts, MeteredBody::new(body.boxed(), completion).boxed())
    }
}

struct InFlightGuard<'a>(&'a AtomicU64);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

fn prepare_request_headers(headers: &mut HeaderMap, client: SocketAddr, host: &str, event_id: Uuid) {
    strip_hop_by_hop(headers);
    let client_ip = client.ip().to_string();
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|value| value.to_str().ok()) {
        Some(previous) => format!("{previous}, {client_ip}"),
        None => client_ip,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(&X_FORWARDED_FOR, value);
    }
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Ok(value) = HeaderValue::from_str(host) {
        headers.insert(&X_FORWARDED_HOST, value);
    }
    headers.append(header::VIA, VIA_VALUE.clone());
    if !headers.contains_key(&X_REQUEST_ID)
        && let Ok(value) = HeaderValue::from_str(&event_id.to_string())
    {
        headers.insert(&X_REQUEST_ID, value);
    }
}

/// A response the proxy makes itself (no route, upstream down, timeout), with its event.
fn local_response(
    mut completion: Completion,
    status: StatusCode,
    kind: ErrorKind,
    message: &str,
) -> Response<ProxyBody> {
    completion.data.status = status.as_u16();
    completion.data.error = Some(kind);
    let body = serde_json::json!({ "error": { "code": kind.as_str(), "message": message } }).to_string();
    completion.ttfb_us = Some(micros(completion.started.elapsed()));
    let request_id = completion.event_id.to_string();
    let full = Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed();
    let mut response = Response::new(MeteredBody::new(full, completion).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(&X_REQUEST_ID, value);
    }
    response
}
