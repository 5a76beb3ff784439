//! The forwarding service: one request in, routed, sent to a target, streamed back, measured.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::error::Error as _;

use stone_events::config::{HashOn, LbAlgorithm};
use stone_events::request::{CacheStatus, ErrorKind, RequestCompleted};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::access::Gate;
use crate::balancer::{Target, Upstream};
use crate::body::{BodyTooLarge, Completion, CountingBody, MeteredBody, ProxyBody, RequestFacts, micros};
use crate::cache::{Cache, CachePolicy, CacheRequest, Fetcher};
use crate::emitter::EventSink;
use crate::health::HealthReporter;
use crate::routing::{Route, RouteTable};

type UpstreamBody = Either<CountingBody<Incoming>, Empty<Bytes>>;
type UpstreamClient = Client<HttpConnector, UpstreamBody>;

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
    /// Request body bound when the route sets none.
    pub max_body_bytes: u64,
    /// Retries allowed per request, as a fraction.
    pub retry_budget_ratio: f64,
    /// Rate limits (shared through Redis, or local).
    pub limiter: crate::ratelimit::Limiter,
}

/// Retries as a budget shared by all requests: each request deposits `ratio` of a retry, each
/// retry withdraws one, so retries stay a bounded fraction of traffic when a whole upstream is
/// failing. Counted in thousandths to stay on one atomic.
struct RetryBudget {
    milli_tokens: AtomicU64,
    deposit: u64,
}

/// Retries available with no traffic yet, and the most that can be saved up.
const RETRY_BUDGET_FLOOR: u64 = 10_000;
const RETRY_BUDGET_CAP: u64 = 1_000_000;

impl RetryBudget {
    fn new(ratio: f64) -> Self {
        Self { milli_tokens: AtomicU64::new(RETRY_BUDGET_FLOOR), deposit: (ratio * 1000.0) as u64 }
    }

    fn deposit(&self) {
        if self.deposit > 0 {
            self.milli_tokens.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    fn try_withdraw(&self) -> bool {
        self.milli_tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tokens| {
                let tokens = tokens.min(RETRY_BUDGET_CAP);
                tokens.checked_sub(1000)
            })
            .is_ok()
    }
}

struct Shared {
    table: RwLock<Arc<RouteTable>>,
    config_seq: Arc<AtomicU64>,
    client: UpstreamClient,
    sink: EventSink,
    settings: ServiceSettings,
    in_flight: AtomicU64,
    health: HealthReporter,
    retry_budget: RetryBudget,
    /// The response cache, for routes with a cache policy.
    cache: Option<Cache>,
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
        let config_seq = Arc::new(AtomicU64::new(config_seq));
        let health = HealthReporter {
            sink: sink.clone(),
            worker: Arc::clone(&settings.worker_id),
            config_seq: Arc::clone(&config_seq),
        };
        Self {
            shared: Arc::new(Shared {
                table: RwLock::new(Arc::new(table)),
                config_seq,
                client,
                sink,
                retry_budget: RetryBudget::new(settings.retry_budget_ratio),
                settings,
                in_flight: AtomicU64::new(0),
                health,
                cache: None,
            }),
        }
    }

    /// Adds the response cache; call before the service is cloned (it is shared state).
    pub fn with_cache(mut self, cache: Cache) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.cache = Some(cache);
        }
        self
    }

    /// Where the cache sends its events: the request events' sink, source and config version.
    pub fn cache_events(&self) -> crate::cache::CacheEvents {
        crate::cache::CacheEvents {
            sink: self.shared.sink.clone(),
            source: Arc::clone(&self.shared.settings.worker_id),
            config_seq: Arc::clone(&self.shared.config_seq),
        }
    }

    /// Swaps the routing table; requests already routed keep the table they started with.
    pub fn replace_table(&self, table: RouteTable, config_seq: u64) {
        if let Ok(mut current) = self.shared.table.write() {
            *current = Arc::new(table);
            self.shared.config_seq.store(config_seq, Ordering::Release);
        }
    }

    /// The table in force.
    pub fn table(&self) -> Arc<RouteTable> {
        self.shared.table.read().map(|table| Arc::clone(&table)).unwrap_or_default()
    }

    /// The CONFIG stream sequence of the table in force (0 in standalone mode).
    pub fn config_seq(&self) -> u64 {
        self.shared.config_seq.load(Ordering::Acquire)
    }

    pub fn health_reporter(&self) -> &HealthReporter {
        &self.shared.health
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

    /// Handles one request of the plain listener; see [`Self::handle_from`].
    pub async fn handle(&self, request: Request<Incoming>, client: SocketAddr) -> Response<ProxyBody> {
        self.handle_from(request, client, false).await
    }

    /// Handles one request end to end. Never fails: every outcome is a response and an event.
    /// `secure`: the request came over TLS, which the upstream learns from `X-Forwarded-Proto`.
    pub async fn handle_from(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
        secure: bool,
    ) -> Response<ProxyBody> {
        let mut response_headers = Vec::new();
        let mut response = self.exchange(request, client, secure, &mut response_headers).await;
        // Whatever answered after the gate (upstream, cache, a 502), a rate-limited route's
        // response carries its `RateLimit-*`.
        for (name, value) in response_headers {
            response.headers_mut().insert(name, value);
        }
        response
    }

    async fn exchange(
        &self,
        mut request: Request<Incoming>,
        client: SocketAddr,
        secure: bool,
        response_headers: &mut Vec<(HeaderName, HeaderValue)>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let started_at = OffsetDateTime::now_utc();
        let event_id = event_id_at(started_at);
        let shared = &self.shared;
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlightGuard(&shared.in_flight);
        shared.retry_budget.deposit();

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
            target_health: None,
            metrics: None,
            facts: RequestFacts {
                method: request.method().clone(),
                host: host.clone(),
                uri: request.uri().clone(),
                version: request.version(),
                client: client.ip(),
                route: None,
            },
            // The descriptive fields are filled from `facts` when the event is emitted.
            data: RequestCompleted {
                method: String::new(),
                host: String::new(),
                route: String::new(),
                path_template: String::new(),
                path: String::new(),
                upstream: None,
                target: None,
                consumer: None,
                client_ip: None,
                protocol: String::new(),
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

        // Request smuggling: a message with both framings is read differently by different
        // parsers. hyper's HTTP/1 parser already discards the Content-Length, frames by chunked
        // and closes the connection after the response (RFC 9112 §6.1), and rejects other
        // conflicts (non-chunked final coding, differing lengths) with 400; this catches any
        // message that still carries both.
        if request.headers().contains_key(header::TRANSFER_ENCODING)
            && request.headers().contains_key(header::CONTENT_LENGTH)
        {
            return local_response(
                completion,
                StatusCode::BAD_REQUEST,
                ErrorKind::BadRequest,
                "both Content-Length and Transfer-Encoding are set",
            );
        }

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
        completion.metrics = Some(Arc::clone(&route.metrics));
        completion.facts.route = Some((Arc::clone(&route), Arc::clone(found.pattern.template())));
        if let Some(access) = table.access().get(&route.name) {
            let gate = crate::access::check(
                access,
                table.access(),
                &shared.settings.limiter,
                &route.name,
                request.headers(),
                request.uri().query(),
                client.ip(),
            )
            .await;
            match gate {
                Gate::Pass { consumer, rate_limit, headers } => {
                    completion.data.consumer = consumer;
                    completion.data.rate_limit = rate_limit;
                    *response_headers = headers;
                }
                Gate::Answer { status, kind, message, headers, consumer, rate_limit } => {
                    completion.data.consumer = consumer;
                    completion.data.rate_limit = rate_limit;
                    let mut response = local_response(completion, status, kind, message);
                    response.headers_mut().extend(headers);
                    return response;
                }
            }
        }

        let body_limit =
            route.max_body_bytes.unwrap_or(shared.settings.max_body_bytes).min(shared.settings.max_body_bytes);
        let declared_length = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared_length.is_some_and(|length| length > body_limit) {
            return local_response(
                completion,
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorKind::BadRequest,
                "request body is larger than this route accepts",
            );
        }

        let wants_upgrade = request.headers().contains_key(header::UPGRADE);
        // The common hit first, before the request is prepared for an upstream: a fresh object
        // in the in-process tier needs none of that, as long as nothing the key or the object's
        // Vary names would differ between the request as received and as forwarded.
        let mut hit_checked = false;
        if let (Some(cache), Some(policy)) = (&shared.cache, &route.cache)
            && matches!(*request.method(), Method::GET | Method::HEAD)
            && request.body().is_end_stream()
            && !wants_upgrade
            && connection_names_nothing_else(request.headers())
        {
            hit_checked = true;
            let consumer = completion.data.consumer.as_deref();
            let (method, uri, headers) = (request.method(), request.uri(), request.headers());
            let unprepared = Some(forwarding_changes as fn(&str) -> bool);
            if let Some(served) =
                cache.fresh_hit(&route.name, policy, &host, consumer, method, uri, headers, unprepared).await
            {
                return cached_response(completion, served);
            }
        }

        let upstream_path = if route.strip_prefix { found.pattern.strip(&path) } else { path.clone() };
        let upstream = Arc::clone(&route.upstream);
        let hash_key = match upstream.algorithm {
            LbAlgorithm::ConsistentHash => hash_key(&upstream.hash_on, request.headers(), client),
            _ => None,
        };
        let client_upgrade = if wants_upgrade { Some(hyper::upgrade::on(&mut request)) } else { None };
        let upgrade_protocol = request.headers().get(header::UPGRADE).cloned();

        let (mut parts, body) = request.into_parts();
        // The upstream side speaks HTTP/1.1 whatever the client spoke.
        parts.version = Version::HTTP_11;
        let client_ip = format_ip(client.ip());
        prepare_request_headers(&mut parts.headers, &client_ip, &host, &request_id_header(event_id), secure);
        if let Some(protocol) = upgrade_protocol {
            // Upgrades (WebSocket) are the one hop-by-hop exchange a proxy must carry through.
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol);
        }
        // A body that is already complete (GET, HEAD, most DELETEs) can be sent again, which is
        // what makes a retry possible at all.
        let replayable = body.is_end_stream();
        let mut body = if replayable { None } else { Some(CountingBody::new(body, Arc::clone(&bytes_in), body_limit)) };
        let idempotent = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
        );
        let timeout = route.timeout.unwrap_or(shared.settings.default_timeout);
        let exchange = Exchange {
            upstream: &upstream,
            upstream_path: &upstream_path,
            hash_key: hash_key.as_deref(),
            timeout,
            retries: route.retries,
            replayable,
            idempotent,
            body_limit,
            bytes_in: &bytes_in,
        };

        if let (Some(cache), Some(policy)) = (&shared.cache, &route.cache)
            && matches!(parts.method, Method::GET | Method::HEAD)
            && replayable
            && client_upgrade.is_none()
        {
            // When the early lookup was skipped (Connection names another header), a fresh hit
            // is still answered here without the setup a miss needs (an owned exchange, a
            // fetcher closure, the attempt trace). When it ran and refused, `serve` looks up
            // with the prepared headers.
            if !hit_checked
                && let Some(served) = cache
                    .fresh_hit(
                        &route.name,
                        policy,
                        &host,
                        completion.data.consumer.as_deref(),
                        &parts.method,
                        &parts.uri,
                        &parts.headers,
                        None,
                    )
                    .await
            {
                return cached_response(completion, served);
            }
            let cached = CachedExchange {
                route: Arc::clone(&route),
                policy: Arc::clone(policy),
                host,
                hash_key: hash_key.clone(),
                upstream_path: upstream_path.clone(),
                timeout,
                body_limit,
            };
            return self.serve_cached(cache, cached, parts, completion).await;
        }
        let invalidation = match (&shared.cache, &route.cache) {
            (Some(cache), Some(_)) => Some((cache.clone(), parts.method.clone(), parts.uri.clone())),
            _ => None,
        };

        let mut trace = AttemptTrace::default();
        let outcome = self.forward(&exchange, &parts, body.take(), &mut trace).await;
        completion.data.target = trace.target;
        completion.upstream_started = trace.upstream_started;
        completion.data.error = trace.error;
        let (target, upstream_response) = match outcome {
            Ok(exchanged) => exchanged,
            Err(failure) => return local_response(completion, failure.status, failure.kind, failure.message),
        };
        completion.data.error = None;
        completion.target_health = Some(Arc::clone(&target.health));
        let status = upstream_response.status();
        self.record_upstream_status(&upstream, target, status);
        if let Some((cache, method, uri)) = invalidation {
            // RFC 9111 §4.4: a successful unsafe method invalidates what is stored for the URI.
            let headers = upstream_response.headers().clone();
            let host = host.clone();
            tokio::spawn(async move { cache.invalidate_after(&host, &method, &uri, status, &headers).await });
        }

        let (mut parts, body) = upstream_response.into_parts();
        if status == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(Response::from_parts(parts.clone(), Empty::<Bytes>::new()));
            tokio::spawn(tunnel(client_upgrade, upstream_upgrade));
        } else {
            strip_hop_by_hop(&mut parts.headers);
        }
        parts.headers.append(header::VIA, VIA_VALUE.clone());
        if let Some(value) = request_id_header(event_id) {
            parts.headers.entry(&X_REQUEST_ID).or_insert(value);
        }
        completion.data.status = parts.status.as_u16();
        completion.ttfb_us = Some(micros(started.elapsed()));
        Response::from_parts(parts, MeteredBody::new(body.boxed(), completion).boxed())
    }
}

/// What one upstream exchange needs besides the request.
struct Exchange<'a> {
    upstream: &'a Arc<Upstream>,
    upstream_path: &'a str,
    hash_key: Option<&'a [u8]>,
    timeout: Duration,
    retries: u32,
    /// The body is complete (or absent), so the request can be sent again.
    replayable: bool,
    idempotent: bool,
    body_limit: u64,
    bytes_in: &'a AtomicU64,
}

/// What the attempts of an exchange leave for the request's event.
#[derive(Debug, Default, Clone)]
struct AttemptTrace {
    target: Option<String>,
    upstream_started: Option<Instant>,
    error: Option<ErrorKind>,
}

/// Why an exchange produced no upstream response, as the client will be told.
#[derive(Debug, Clone, Copy)]
struct Failure {
    status: StatusCode,
    kind: ErrorKind,
    message: &'static str,
}

impl Failure {
    fn new(status: StatusCode, kind: ErrorKind, message: &'static str) -> Self {
        Self { status, kind, message }
    }
}

/// A GET or HEAD of a caching route, owned so that the cache can fetch again later
/// (background revalidation).
struct CachedExchange {
    route: Arc<Route>,
    policy: Arc<CachePolicy>,
    host: String,
    hash_key: Option<Vec<u8>>,
    upstream_path: String,
    timeout: Duration,
    body_limit: u64,
}

impl ProxyService {
    /// Sends the request to a target of the upstream, trying another target where a retry is
    /// safe and the retry budget allows.
    async fn forward<'a>(
        &self,
        exchange: &Exchange<'a>,
        parts: &http::request::Parts,
        mut body: Option<CountingBody<Incoming>>,
        trace: &mut AttemptTrace,
    ) -> Result<(&'a Target, Response<Incoming>), Failure> {
        let shared = &self.shared;
        let upstream = exchange.upstream;
        let mut tried: Vec<usize> = Vec::new();
        loop {
            let Some((index, target)) = upstream.pick(exchange.hash_key, &tried) else {
                return Err(if tried.is_empty() {
                    Failure::new(StatusCode::BAD_GATEWAY, ErrorKind::NoHealthyTarget, "no upstream target available")
                } else {
                    Failure::new(
                        StatusCode::BAD_GATEWAY,
                        trace.error.unwrap_or(ErrorKind::UpstreamConnect),
                        "upstream unavailable",
                    )
                });
            };
            tried.push(index);
            trace.target = Some(target.url.clone());
            let upstream_path = exchange.upstream_path;
            let path_and_query = match parts.uri.query() {
                Some(query) => format!("{}{upstream_path}?{query}", target.base_path),
                None => format!("{}{upstream_path}", target.base_path),
            };
            let Ok(uri) = Uri::builder()
                .scheme(target.scheme.clone())
                .authority(target.authority.clone())
                .path_and_query(path_and_query)
                .build()
            else {
                return Err(Failure::new(
                    StatusCode::BAD_REQUEST,
                    ErrorKind::BadRequest,
                    "request path cannot be forwarded",
                ));
            };
            let mut attempt_parts = parts.clone();
            attempt_parts.uri = uri;
            attempt_parts.headers.insert(header::HOST, target.host_header.clone());
            let attempt_body = match body.take() {
                Some(streaming) => Either::Left(streaming),
                None => Either::Right(Empty::new()),
            };
            target.health.in_flight.fetch_add(1, Ordering::Relaxed);
            trace.upstream_started = Some(Instant::now());
            let outcome = tokio::time::timeout(
                exchange.timeout,
                shared.client.request(Request::from_parts(attempt_parts, attempt_body)),
            )
            .await;
            let failure = match outcome {
                Ok(Ok(response)) => return Ok((target, response)),
                Ok(Err(error)) => {
                    if error.source().is_some_and(|source| source.is::<BodyTooLarge>())
                        || exchange.bytes_in.load(Ordering::Relaxed) > exchange.body_limit
                    {
                        target.health.in_flight.fetch_sub(1, Ordering::Relaxed);
                        return Err(Failure::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            ErrorKind::BadRequest,
                            "request body is larger than this route accepts",
                        ));
                    }
                    let connect = error.is_connect();
                    tracing::debug!(%error, target = %target.url, "upstream request failed");
                    (if connect { ErrorKind::UpstreamConnect } else { ErrorKind::UpstreamReset }, connect)
                }
                Err(_) => (ErrorKind::UpstreamTimeout, false),
            };
            target.health.in_flight.fetch_sub(1, Ordering::Relaxed);
            let (kind, connect_failed) = failure;
            shared.health.record_failure(upstream, target, kind.as_str());
            trace.error = Some(kind);
            if kind == ErrorKind::UpstreamTimeout {
                return Err(Failure::new(StatusCode::GATEWAY_TIMEOUT, kind, "upstream timed out"));
            }
            // A connect failure never reached the upstream; a reset may have, so only methods
            // that are safe to repeat are retried after one. A streamed body is gone either way.
            let safe = exchange.replayable && (connect_failed || exchange.idempotent);
            let attempts_left = tried.len() <= exchange.retries as usize;
            if !(safe && attempts_left && shared.retry_budget.try_withdraw()) {
                return Err(Failure::new(StatusCode::BAD_GATEWAY, kind, "upstream unavailable"));
            }
            metrics::counter!("stone_proxy_retries_total").increment(1);
        }
    }

    /// Passive health from the upstream's status: gateway errors count as failures.
    fn record_upstream_status(&self, upstream: &Upstream, target: &Target, status: StatusCode) {
        if matches!(status, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT) {
            self.shared.health.record_failure(upstream, target, &format!("status {}", status.as_u16()));
        } else {
            self.shared.health.record_success(upstream, target);
        }
    }

    /// Answers a GET or HEAD of a caching route through the cache; the cache calls back into
    /// [`Self::forward`] when it needs the upstream.
    async fn serve_cached(
        &self,
        cache: &Cache,
        exchange: CachedExchange,
        parts: http::request::Parts,
        mut completion: Completion,
    ) -> Response<ProxyBody> {
        let trace: Arc<Mutex<AttemptTrace>> = Arc::default();
        let exchange = Arc::new(exchange);
        let fetcher: Fetcher = {
            let (service, exchange, trace) = (self.clone(), Arc::clone(&exchange), Arc::clone(&trace));
            Arc::new(move |parts: http::request::Parts| {
                let (service, exchange, trace) = (service.clone(), Arc::clone(&exchange), Arc::clone(&trace));
                Box::pin(async move {
                    let bytes_in = AtomicU64::new(0);
                    let attempt = Exchange {
                        upstream: &exchange.route.upstream,
                        upstream_path: &exchange.upstream_path,
                        hash_key: exchange.hash_key.as_deref(),
                        timeout: exchange.timeout,
                        retries: exchange.route.retries,
                        replayable: true,
                        idempotent: true,
                        body_limit: exchange.body_limit,
                        bytes_in: &bytes_in,
                    };
                    let mut attempt_trace = AttemptTrace::default();
                    let outcome = service.forward(&attempt, &parts, None, &mut attempt_trace).await;
                    if let Ok(mut shared_trace) = trace.lock() {
                        *shared_trace = attempt_trace;
                    }
                    let (target, response) = outcome.map_err(|failure| failure.kind)?;
                    service.record_upstream_status(&exchange.route.upstream, target, response.status());
                    // The cache may read the body long after the client is gone (a stored
                    // miss, a background refresh): the target's in-flight slot ends here.
                    target.health.in_flight.fetch_sub(1, Ordering::Relaxed);
                    let (mut head, body) = response.into_parts();
                    strip_hop_by_hop(&mut head.headers);
                    Ok(Response::from_parts(head, body.boxed()))
                })
            })
        };
        let request = CacheRequest {
            route: exchange.route.name.clone(),
            policy: Arc::clone(&exchange.policy),
            host: exchange.host.clone(),
            consumer: completion.data.consumer.clone(),
        };
        let served = cache.serve(request, parts, fetcher).await;
        if let Ok(attempt) = trace.lock() {
            completion.data.target = attempt.target.clone();
            completion.upstream_started = attempt.upstream_started;
        }
        let served = match served {
            Ok(served) => served,
            Err(ErrorKind::UpstreamTimeout) => {
                return local_response(
                    completion,
                    StatusCode::GATEWAY_TIMEOUT,
                    ErrorKind::UpstreamTimeout,
                    "upstream timed out",
                );
            }
            Err(kind) => return local_response(completion, StatusCode::BAD_GATEWAY, kind, "upstream unavailable"),
        };
        cached_response(completion, served)
    }
}

/// A response the cache answered (stored, fetched or stale), marked and metered like any other.
fn cached_response(mut completion: Completion, served: crate::cache::Served) -> Response<ProxyBody> {
    completion.data.cache = served.status;
    let (mut head, body) = served.response.into_parts();
    head.headers.append(header::VIA, VIA_VALUE.clone());
    if let Some(value) = request_id_header(completion.event_id) {
        head.headers.entry(&X_REQUEST_ID).or_insert(value);
    }
    completion.data.status = head.status.as_u16();
    completion.ttfb_us = Some(micros(completion.started.elapsed()));
    Response::from_parts(head, MeteredBody::new(body, completion).boxed())
}

/// Copies bytes both ways between an upgraded client connection and the upstream's (WebSocket).
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (Ok(client), Ok(upstream)) = (client.await, upstream.await) else {
        tracing::debug!("upgrade did not complete on both sides");
        return;
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%error, "upgraded connection ended with an error");
    }
}

/// The bytes consistent hashing uses for this request, if the attribute is present.
fn hash_key(hash_on: &HashOn, headers: &HeaderMap, client: SocketAddr) -> Option<Vec<u8>> {
    match hash_on {
        HashOn::Header(name) => headers.get(name.as_str()).map(|value| value.as_bytes().to_vec()),
        HashOn::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_bytes().to_vec()),
        HashOn::ClientIp => Some(client.ip().to_string().into_bytes()),
    }
}

struct InFlightGuard<'a>(&'a AtomicU64);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// Whether forwarding changes or drops a request header of this (lowercase) name: the
/// hop-by-hop headers and the ones [`prepare_request_headers`] sets. Headers a request's
/// `Connection` names are hop-by-hop too; [`connection_names_nothing_else`] covers those.
fn forwarding_changes(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|hop| hop.as_str() == name)
        || [&X_FORWARDED_FOR, &X_FORWARDED_PROTO, &X_FORWARDED_HOST, &X_REQUEST_ID]
            .iter()
            .any(|set| set.as_str() == name)
        || name == header::VIA.as_str()
        || name == header::UPGRADE.as_str()
}

/// Whether the request's `Connection` names no header beyond `keep-alive` (itself hop-by-hop)
/// and `close`, so that [`forwarding_changes`] is the whole list of what forwarding changes.
fn connection_names_nothing_else(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().all(|value| {
        value.to_str().is_ok_and(|value| {
            value.split(',').all(|token| {
                let token = token.trim();
                token.is_empty() || token.eq_ignore_ascii_case("keep-alive") || token.eq_ignore_ascii_case("close")
            })
        })
    })
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the few names present is cheaper than a hashed
    // removal of each hop-by-hop name.
    if !headers.keys().any(|name| name == header::UPGRADE || HOP_BY_HOP.contains(name)) {
        return;
    }
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

/// The client address as the event and `X-Forwarded-For` carry it; IPv4 without the
/// formatting machinery `to_string` goes through.
pub(crate) fn format_ip(ip: std::net::IpAddr) -> String {
    let std::net::IpAddr::V4(v4) = ip else { return ip.to_string() };
    let mut formatted = String::with_capacity(15);
    let mut digits = itoa::Buffer::new();
    for (index, octet) in v4.octets().into_iter().enumerate() {
        if index > 0 {
            formatted.push('.');
        }
        formatted.push_str(digits.format(octet));
    }
    formatted
}

/// A version 7 UUID for the request that started at `at`: its millisecond, then 74 random bits
/// from the thread's generator. `Uuid::now_v7` orders the ids of one millisecond through a
/// process-wide context behind a lock, which every request of every worker thread would take;
/// ids only have to be unique and roughly time-ordered (the stream sequence orders events).
fn event_id_at(at: OffsetDateTime) -> Uuid {
    let millis = u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or_default();
    uuid::Builder::from_unix_timestamp_millis(millis, &rand::random()).into_uuid()
}

/// `X-Request-Id` for an event id, formatted without an intermediate `String`.
fn request_id_header(event_id: Uuid) -> Option<HeaderValue> {
    let mut buffer = Uuid::encode_buffer();
    HeaderValue::from_str(event_id.hyphenated().encode_lower(&mut buffer)).ok()
}

fn prepare_request_headers(
    headers: &mut HeaderMap,
    client_ip: &str,
    host: &str,
    request_id: &Option<HeaderValue>,
    secure: bool,
) {
    strip_hop_by_hop(headers);
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|value| value.to_str().ok()) {
        Some(previous) => HeaderValue::from_str(&format!("{previous}, {client_ip}")),
        None => HeaderValue::from_str(client_ip),
    };
    if let Ok(value) = forwarded_for {
        headers.insert(&X_FORWARDED_FOR, value);
    }
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(if secure { "https" } else { "http" }));
    if let Ok(value) = HeaderValue::from_str(host) {
        headers.insert(&X_FORWARDED_HOST, value);
    }
    headers.append(header::VIA, VIA_VALUE.clone());
    if !headers.contains_key(&X_REQUEST_ID)
        && let Some(value) = request_id
    {
        headers.insert(&X_REQUEST_ID, value.clone());
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
    let request_id = request_id_header(completion.event_id);
    let full = Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed();
    let mut response = Response::new(MeteredBody::new(full, completion).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(value) = request_id {
        response.headers_mut().insert(&X_REQUEST_ID, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn ipv4_is_formatted_as_to_string_does(address in any::<u32>()) {
            let ip = IpAddr::V4(Ipv4Addr::from(address));
            prop_assert_eq!(format_ip(ip), ip.to_string());
        }
    }

    #[test]
    fn event_ids_are_version_7_with_the_request_time_and_distinct() {
        let at = time::macros::datetime!(2026-11-22 18:30:01.234_567 UTC);
        let ids: std::collections::HashSet<Uuid> = (0..1000).map(|_| event_id_at(at)).collect();
        assert_eq!(ids.len(), 1000);
        for id in ids {
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            let (seconds, nanos) = id.get_timestamp().map(|stamp| stamp.to_unix()).unwrap_or_default();
            assert_eq!((seconds, nanos), (at.unix_timestamp() as u64, 234_000_000));
        }
    }

    #[test]
    fn ipv6_is_formatted_as_to_string_does() {
        let ip = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0xff00, 0x42, 0x8329));
        assert_eq!(format_ip(ip), "2001:db8::ff00:42:8329");
    }

    #[test]
    fn forwarding_changes_names_what_preparation_touches() {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        headers.insert(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        let before = headers.clone();
        prepare_request_headers(&mut headers, "127.0.0.1", "example.test", &request_id_header(Uuid::now_v7()), false);
        let mut names: Vec<&HeaderName> = headers.keys().chain(before.keys()).collect();
        names.dedup();
        for name in names {
            let changed = headers.get_all(name).iter().ne(before.get_all(name).iter());
            assert!(!changed || forwarding_changes(name.as_str()), "{name} changed but is not listed");
        }
        assert!(!forwarding_changes("accept"));
    }

    #[test]
    fn only_keep_alive_and_close_in_connection_leave_the_list_complete() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONNECTION, HeaderValue::from_static(value));
            connection_names_nothing_else(&headers)
        };
        assert!(connection_names_nothing_else(&HeaderMap::new()));
        assert!(with("keep-alive") && with("Close") && with("keep-alive, close"));
        assert!(!with("keep-alive, x-secret"));
    }
}
