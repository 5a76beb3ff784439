//! The response cache: an RFC 9111 shared cache in front of the upstreams, in two tiers
//! (in-process, then Redis shared by the workers), with request coalescing, stale serving,
//! validation, and purge by key, prefix and tag.
//!
//! The component has a narrow interface so that the forwarding path stays the forwarding path:
//! [`Cache::serve`] takes a GET or HEAD request of a route with a [`CachePolicy`] and a
//! [`Fetcher`] (how to ask the upstream), and returns the response with its [`CacheStatus`];
//! [`Cache::invalidate_after`] is called after unsafe methods. The rules themselves are pure
//! functions in [`policy`]; keys in [`key`]; the tiers and the entry format in [`store`];
//! coalescing in [`coalesce`]; the purge listener in [`purge`].

pub mod coalesce;
pub mod key;
pub mod policy;
pub mod purge;
pub mod store;
mod tee;

use std::cell::RefCell;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, request};
use http_body_util::{BodyExt, Full};
use stone_events::Envelope;
use stone_events::cache::{CacheAction, CacheEvent, CacheTier, PurgeBy, PurgeCommand};
use stone_events::request::{CacheStatus, ErrorKind};

use crate::body::ProxyBody;
use crate::emitter::EventSink;

use self::coalesce::{Coalescer, LeaderGuard, Role};
pub use self::policy::CachePolicy;
use self::policy::{CacheControl, Reuse, StoreDecision};
use self::store::{EvictionTally, MemoryTier, RedisTier, Slot, StoredObject, unix_now};

/// `Cache-Status` (RFC 9211).
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
static SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
static CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");
/// The cache's name in Cache-Status.
const CACHE_NAME: &str = "proxy-stone";

/// Headers that describe a connection, never stored (RFC 9111 §3.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
];

/// How the cache asks the upstream: the request head (no body: only GET and HEAD come here)
/// in, the upstream's response or why there is none out.
pub type Fetcher = Arc<
    dyn Fn(request::Parts) -> Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, ErrorKind>> + Send>>
        + Send
        + Sync,
>;

/// Settings of the cache of one worker.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Bound of the in-process tier, in bytes.
    pub memory_max_bytes: u64,
    /// The Redis tier; `None` runs with the memory tier only.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key (the namespace, so test runs and deployments do not mix).
    pub redis_prefix: String,
    /// Bound of each Redis call.
    pub redis_timeout: Duration,
    /// Bound of connecting to Redis at start.
    pub redis_connect_timeout: Duration,
    /// How long a coalesced request waits for the leader's fetch.
    pub coalesce_wait: Duration,
    /// How often summed memory-tier evictions are reported as `cache.evicted` events.
    pub eviction_report_interval: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self::from_config(&stone_kit::config::ProxyCacheConfig::default(), None, "stone")
    }
}

impl CacheSettings {
    /// The settings of `[proxy.cache]`: Redis at `redis_url` (when the tier is on and the URL
    /// set) under `{namespace}:cache`.
    pub fn from_config(config: &stone_kit::config::ProxyCacheConfig, redis_url: Option<&str>, namespace: &str) -> Self {
        Self {
            memory_max_bytes: config.memory_max_bytes,
            redis_url: redis_url.filter(|url| config.redis && !url.is_empty()).map(str::to_owned),
            redis_prefix: format!("{namespace}:cache"),
            redis_timeout: Duration::from_millis(config.redis_timeout_ms),
            redis_connect_timeout: Duration::from_millis(config.redis_connect_timeout_ms),
            coalesce_wait: Duration::from_millis(config.coalesce_wait_ms),
            eviction_report_interval: Duration::from_millis(config.eviction_report_interval_ms),
        }
    }
}

/// Where cache events go.
#[derive(Clone)]
pub struct CacheEvents {
    pub sink: EventSink,
    pub source: Arc<str>,
    pub config_seq: Arc<AtomicU64>,
}

/// The request-side facts the cache needs besides the request head.
#[derive(Debug, Clone)]
pub struct CacheRequest {
    pub route: String,
    pub policy: Arc<CachePolicy>,
    /// The Host the request was routed by (never X-Forwarded-Host).
    pub host: String,
    /// The authenticated consumer, if any.
    pub consumer: Option<String>,
}

/// A response and what the cache did for it.
#[derive(Debug)]
pub struct Served {
    pub response: Response<ProxyBody>,
    pub status: CacheStatus,
}

/// One worker's cache; clones share it.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    memory: MemoryTier,
    redis: Option<RedisTier>,
    coalescer: Coalescer,
    coalesce_wait: Duration,
    events: Option<CacheEvents>,
    /// Publishes invalidations after unsafe methods to the other workers.
    invalidations: Option<(async_nats::Client, String)>,
    /// `stone_cache_lookups_total` handles by route: hit, miss, stale, revalidated, bypass.
    lookups: std::sync::RwLock<std::collections::HashMap<String, [metrics::Counter; 5]>>,
}

impl Cache {
    /// Builds the tiers. An unreachable Redis is logged and the worker runs with memory only:
    /// the cache is an optimisation, never a reason not to proxy.
    pub async fn new(settings: &CacheSettings, events: Option<CacheEvents>) -> Self {
        let redis = match &settings.redis_url {
            Some(url) => {
                let connecting = RedisTier::connect(
                    url,
                    &settings.redis_prefix,
                    settings.redis_timeout,
                    settings.redis_connect_timeout,
                );
                match connecting.await {
                    Ok(tier) => Some(tier),
                    Err(error) => {
                        tracing::warn!(%error, "redis cache tier unavailable, caching in memory only");
                        None
                    }
                }
            }
            None => None,
        };
        let evictions = Arc::new(EvictionTally::default());
        if let Some(events) = &events {
            tokio::spawn(report_evictions(
                Arc::downgrade(&evictions),
                events.clone(),
                settings.eviction_report_interval,
            ));
        }
        Self {
            inner: Arc::new(Inner {
                memory: MemoryTier::new(settings.memory_max_bytes, evictions),
                redis,
                coalescer: Coalescer::default(),
                coalesce_wait: settings.coalesce_wait,
                events,
                invalidations: None,
                lookups: std::sync::RwLock::default(),
            }),
        }
    }

    /// Sends invalidations after unsafe methods to every worker over NATS, like purges.
    pub fn with_invalidation_broadcast(mut self, client: async_nats::Client, subject: String) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.invalidations = Some((client, subject));
        }
        self
    }

    pub fn has_redis(&self) -> bool {
        self.inner.redis.is_some()
    }

    /// Bytes held by the memory tier.
    pub async fn memory_bytes(&self) -> u64 {
        self.inner.memory.weighted_size()
    }

    /// Serves a GET or HEAD request through the cache. `Err` only when the upstream failed and
    /// nothing stored may stand in for it; the caller answers that like any upstream failure.
    pub async fn serve(
        &self,
        request: CacheRequest,
        parts: request::Parts,
        fetch: Fetcher,
    ) -> Result<Served, ErrorKind> {
        let policy = Arc::clone(&request.policy);
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().map(str::to_owned);
        if !policy.enabled {
            let response = fetch(parts).await?;
            return Ok(Served { response, status: CacheStatus::None });
        }
        if let Some(reason) = policy::request_bypass(&policy, &parts.method, &path, query.as_deref(), &parts.headers) {
            let detail = match reason {
                policy::RequestBypass::Method => "method",
                policy::RequestBypass::Range => "range",
                policy::RequestBypass::Rule => "rule",
            };
            let mut response = fetch(parts).await?;
            set_cache_status(response.headers_mut(), format!("{CACHE_NAME}; fwd=bypass; detail={detail}"));
            self.count(&request.route, CacheStatus::Bypass);
            return Ok(Served { response, status: CacheStatus::Bypass });
        }
        let request_directives = CacheControl::parse_request(&parts.headers);
        let primary = key::primary_key(
            &policy,
            &request.host,
            &path,
            query.as_deref(),
            &parts.headers,
            request.consumer.as_deref(),
        );
        let mut waited = false;
        loop {
            let now = unix_now();
            let found = self.lookup(&primary, &parts.headers, now).await;
            if let Some((object, tier)) = &found {
                match policy::reuse(&object.freshness, &request_directives, now) {
                    Reuse::Fresh => {
                        let ttl = object.freshness.ttl(now);
                        let value = if *tier == CacheTier::Redis {
                            status_value(format!("{CACHE_NAME}; hit; ttl={ttl}; detail=redis"))
                        } else {
                            hit_status_value(ttl)
                        };
                        self.count(&request.route, CacheStatus::Hit);
                        return Ok(self.respond(&parts.headers, object, CacheStatus::Hit, value, now));
                    }
                    Reuse::StaleAllowed => {
                        return Ok(self.serve_stale(&request, &parts, &primary, object, "max-stale", now));
                    }
                    Reuse::StaleWhileRevalidate => {
                        if let Role::Leader(guard) = self.inner.coalescer.join(&primary) {
                            let cache = self.clone();
                            let (request, parts, primary, object) =
                                (request.clone(), parts.clone(), primary.clone(), Arc::clone(object));
                            let fetch = Arc::clone(&fetch);
                            tokio::spawn(async move {
                                cache.refresh_in_background(request, parts, fetch, primary, object, guard).await;
                            });
                        }
                        return Ok(self.serve_stale(&request, &parts, &primary, object, "stale-while-revalidate", now));
                    }
                    Reuse::Revalidate => {}
                }
            }
            if request_directives.only_if_cached {
                // RFC 9111 §5.2.1.7: nothing usable stored, and the client forbids asking upstream.
                self.count(&request.route, CacheStatus::Miss);
                let mut response = Response::new(empty_body());
                *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
                set_cache_status(response.headers_mut(), format!("{CACHE_NAME}; fwd=miss; detail=only-if-cached"));
                return Ok(Served { response, status: CacheStatus::Miss });
            }
            let stale = found.map(|(object, _)| object);
            if waited {
                return self.fetch_and_store(request, parts, &fetch, primary, stale, None).await;
            }
            match self.inner.coalescer.join(&primary) {
                Role::Leader(guard) => {
                    return self.fetch_and_store(request, parts, &fetch, primary, stale, Some(guard)).await;
                }
                Role::Follower(receiver) => {
                    metrics::counter!("stone_cache_coalesced_requests_total", "route" => request.route.clone())
                        .increment(1);
                    coalesce::wait(receiver, self.inner.coalesce_wait).await;
                    waited = true;
                }
            }
        }
    }

    /// The common hit, answered before any of the setup a miss needs: the in-process tier holds
    /// an object for this request that is fresh under the request's own directives. `None` for
    /// everything else (a miss, a Redis-tier object, anything stale, a bypass), which then goes
    /// through [`Self::serve`]; the lookup is repeated there, so this never changes an answer.
    ///
    /// `unprepared`: the headers are the client's as received, not yet prepared for the
    /// upstream, and the function tells which header names forwarding changes. A key header,
    /// bypass rule or `Vary` name among those must see the prepared headers, so such a lookup
    /// answers `None` and the caller asks again with them.
    #[allow(clippy::too_many_arguments)]
    pub async fn fresh_hit(
        &self,
        route: &str,
        policy: &CachePolicy,
        host: &str,
        consumer: Option<&str>,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        unprepared: Option<fn(&str) -> bool>,
    ) -> Option<Served> {
        if !policy.enabled {
            return None;
        }
        if let Some(changes) = unprepared
            && (policy.key_headers.iter().any(|name| changes(name.as_str()))
                || policy
                    .bypass
                    .iter()
                    .any(|rule| rule.header.as_deref().is_some_and(|name| changes(&name.trim().to_ascii_lowercase()))))
        {
            return None;
        }
        let (path, query) = (uri.path(), uri.query());
        if policy::request_bypass(policy, method, path, query, headers).is_some() {
            return None;
        }
        let primary = key::primary_key(policy, host, path, query, headers, consumer);
        let now = unix_now();
        let object = match self.inner.memory.get(&primary)? {
            Slot::Object(object) => object,
            Slot::Variants { names, generation, .. } => {
                if let Some(changes) = unprepared
                    && names.iter().any(|name| changes(&name.to_ascii_lowercase()))
                {
                    return None;
                }
                let variant = key::variant_key(&primary, generation, &policy::secondary_key(&names, headers));
                match self.inner.memory.get(&variant)? {
                    Slot::Object(object) => object,
                    Slot::Variants { .. } => return None,
                }
            }
        };
        let directives = CacheControl::parse_request(headers);
        if policy::reuse(&object.freshness, &directives, now) != Reuse::Fresh {
            return None;
        }
        let value = hit_status_value(object.freshness.ttl(now));
        self.count(route, CacheStatus::Hit);
        Some(self.respond(headers, &object, CacheStatus::Hit, value, now))
    }

    /// After a successful unsafe method, drops what is stored for the target URI and for
    /// Location / Content-Location on the same host (RFC 9111 §4.4), on every worker.
    pub async fn invalidate_after(
        &self,
        host: &str,
        method: &Method,
        uri: &http::Uri,
        status: StatusCode,
        response_headers: &HeaderMap,
    ) {
        if !policy::invalidates(method, status) {
            return;
        }
        let host = host.trim().to_ascii_lowercase();
        let mut keys = vec![url_key(&host, uri.path(), uri.query())];
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(target) = response_headers.get(&name).and_then(|value| value.to_str().ok()) else { continue };
            let Ok(target) = target.parse::<http::Uri>() else { continue };
            let same_host = target.host().is_none_or(|target_host| target_host.eq_ignore_ascii_case(host_only(&host)));
            if same_host && target.path().starts_with('/') {
                keys.push(url_key(&host, target.path(), target.query()));
            }
        }
        for key in keys {
            let command = PurgeCommand { by: PurgeBy::Key, value: key, actor: "invalidation".to_owned() };
            self.purge(&command).await;
            if let Some((client, subject)) = &self.inner.invalidations
                && let Ok(payload) = serde_json::to_vec(&command)
                && let Err(error) = client.publish(subject.clone(), payload.into()).await
            {
                tracing::warn!(%error, "cache invalidation could not be broadcast");
            }
        }
    }

    /// Applies a purge to this worker's memory tier and to Redis; returns the Redis objects
    /// deleted. Idempotent, so every worker applying the same command is harmless. The memory
    /// tier is purged before and again after Redis: a lookup that read Redis just before the
    /// delete would otherwise promote the purged object back into memory.
    pub async fn purge(&self, command: &PurgeCommand) -> u64 {
        self.purge_memory(command);
        metrics::counter!("stone_cache_purges_total", "by" => command.by.as_str()).increment(1);
        let Some(redis) = &self.inner.redis else { return 0 };
        let deleted = match command.by {
            PurgeBy::Key => redis.remove_key(&command.value).await,
            PurgeBy::Prefix => redis.remove_prefix(&command.value).await,
            PurgeBy::Tag => redis.remove_tag(&command.value).await,
        };
        self.purge_memory(command);
        match deleted {
            Ok(deleted) => deleted,
            Err(error) => {
                metrics::counter!("stone_cache_redis_errors_total", "op" => "purge").increment(1);
                tracing::warn!(%error, by = command.by.as_str(), "redis cache purge failed");
                0
            }
        }
    }

    fn purge_memory(&self, command: &PurgeCommand) {
        let value = command.value.clone();
        match command.by {
            PurgeBy::Key => self.inner.memory.remove_where(move |stored, _| key::belongs_to(stored, &value)),
            PurgeBy::Prefix => self.inner.memory.remove_where(move |stored, _| stored.starts_with(value.as_str())),
            PurgeBy::Tag => self.inner.memory.remove_where(move |_, slot| match slot {
                Slot::Object(object) => object.tags.contains(&value),
                Slot::Variants { .. } => false,
            }),
        }
    }

    /// The stored object for a request: memory, then Redis (promoting into memory), resolving
    /// Vary variants on the way.
    async fn lookup(
        &self,
        primary: &str,
        request_headers: &HeaderMap,
        now: u64,
    ) -> Option<(Arc<StoredObject>, CacheTier)> {
        let (slot, tier) = self.slot(primary, now).await?;
        match slot {
            Slot::Object(object) => Some((object, tier)),
            Slot::Variants { names, generation, .. } => {
                let variant = key::variant_key(primary, generation, &policy::secondary_key(&names, request_headers));
                match self.slot(&variant, now).await? {
                    (Slot::Object(object), tier) => Some((object, tier)),
                    (Slot::Variants { .. }, _) => None,
                }
            }
        }
    }

    async fn slot(&self, key: &str, now: u64) -> Option<(Slot, CacheTier)> {
        if let Some(slot) = self.inner.memory.get(key) {
            return Some((slot, CacheTier::Memory));
        }
        let redis = self.inner.redis.as_ref()?;
        match redis.get(key).await {
            Ok(Some(slot)) => {
                if let Slot::Object(object) = &slot
                    && object.keep_until <= now
                {
                    return None;
                }
                self.inner.memory.insert(key, slot.clone());
                Some((slot, CacheTier::Redis))
            }
            Ok(None) => None,
            Err(error) => {
                metrics::counter!("stone_cache_redis_errors_total", "op" => "get").increment(1);
                tracing::debug!(%error, "redis cache lookup failed");
                None
            }
        }
    }

    /// Stores an object under its primary key, or as a Vary variant under a marker.
    async fn insert(
        &self,
        primary: &str,
        secondary: Option<(Vec<String>, String)>,
        object: Arc<StoredObject>,
        now: u64,
    ) {
        let key = match secondary {
            None => primary.to_owned(),
            Some((names, secondary)) => {
                let generation = match self.slot(primary, now).await {
                    Some((Slot::Variants { names: current, generation, .. }, _)) if current == names => generation,
                    _ => {
                        let marker = Slot::variants(names, now);
                        let Slot::Variants { generation, .. } = marker else { return };
                        self.put(primary, marker).await;
                        generation
                    }
                };
                key::variant_key(primary, generation, &secondary)
            }
        };
        self.put(&key, Slot::Object(object)).await;
    }

    async fn put(&self, key: &str, slot: Slot) {
        self.inner.memory.insert(key, slot.clone());
        if let Some(redis) = &self.inner.redis
            && let Err(error) = redis.put(key, &slot, unix_now()).await
        {
            metrics::counter!("stone_cache_redis_errors_total", "op" => "put").increment(1);
            tracing::debug!(%error, "redis cache store failed");
        }
    }

    /// Asks the upstream (conditionally when a stale entry has validators), then stores what
    /// may be stored; falls back to the stale entry where stale-if-error allows.
    async fn fetch_and_store(
        &self,
        request: CacheRequest,
        parts: request::Parts,
        fetch: &Fetcher,
        primary: String,
        stale: Option<Arc<StoredObject>>,
        guard: Option<LeaderGuard>,
    ) -> Result<Served, ErrorKind> {
        let request_directives = CacheControl::parse_request(&parts.headers);
        let mut upstream_parts = parts.clone();
        // A HEAD miss is asked as a GET (like nginx's proxy_cache_convert_head), so the object is
        // stored for the GETs and HEADs that follow; the client gets the head only.
        let head_request = parts.method == Method::HEAD;
        upstream_parts.method = Method::GET;
        // The cache asks with its own validators (or none, to get a full response it can store)
        // and answers the client's conditions itself.
        upstream_parts.headers.remove(header::IF_NONE_MATCH);
        upstream_parts.headers.remove(header::IF_MODIFIED_SINCE);
        if let Some(object) = &stale {
            if let Some(etag) = object.headers.get(header::ETAG) {
                upstream_parts.headers.insert(header::IF_NONE_MATCH, etag.clone());
            }
            if let Some(last_modified) = object.headers.get(header::LAST_MODIFIED) {
                upstream_parts.headers.insert(header::IF_MODIFIED_SINCE, last_modified.clone());
            }
        }
        let request_time = unix_now();
        let outcome = fetch(upstream_parts).await;
        let response_time = unix_now();
        let upstream_failed = match &outcome {
            Err(_) => true,
            Ok(response) => matches!(response.status().as_u16(), 500 | 502 | 503 | 504),
        };
        if upstream_failed
            && let Some(object) = &stale
            && object.freshness.usable_on_error(&request_directives, response_time)
        {
            return Ok(self.serve_stale(&request, &parts, &primary, object, "stale-if-error", response_time));
        }
        let mut response = outcome?;
        if response.status() == StatusCode::NOT_MODIFIED
            && let Some(object) = stale
        {
            return Ok(self
                .refreshed(&request, &parts, &primary, &object, response.headers(), request_time, response_time)
                .await);
        }
        let was_stale = stale.is_some();
        let forward = if was_stale { "fwd=stale" } else { "fwd=miss" };
        self.count(&request.route, CacheStatus::Miss);
        let decision = policy::storable(
            &request.policy,
            &Method::GET,
            &parts.headers,
            response.status(),
            response.headers(),
            response_time,
        )
        .and_then(|decision| {
            let declared = response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<u64>().ok());
            if declared.is_some_and(|length| length > request.policy.max_object_bytes) {
                Err(policy::NotStorable::TooLarge)
            } else {
                Ok(decision)
            }
        });
        self.emit(CacheAction::Miss, &request.route, &primary, None, 0, None, Vec::new());
        let decision = match decision {
            Ok(decision) => decision,
            Err(reason) => {
                set_cache_status(
                    response.headers_mut(),
                    format!("{CACHE_NAME}; {forward}; detail={}", reason.detail()),
                );
                if was_stale {
                    // The upstream's answer replaces an entry it may no longer be allowed to keep.
                    self.purge(&PurgeCommand { by: PurgeBy::Key, value: primary.clone(), actor: "replace".to_owned() })
                        .await;
                }
                if head_request {
                    // The GET's body is not wanted: dropping it closes that upstream connection.
                    let (head, _body) = response.into_parts();
                    return Ok(Served {
                        response: Response::from_parts(head, empty_body()),
                        status: CacheStatus::Miss,
                    });
                }
                return Ok(Served { response, status: CacheStatus::Miss });
            }
        };
        let secondary = match policy::vary_names(response.headers()) {
            Ok(names) if names.is_empty() => None,
            Ok(names) => {
                let secondary = policy::secondary_key(&names, &parts.headers);
                Some((names, secondary))
            }
            // storable() already refused Vary: *.
            Err(policy::VaryAny) => return Ok(Served { response, status: CacheStatus::Miss }),
        };
        set_cache_status(response.headers_mut(), format!("{CACHE_NAME}; {forward}; stored"));
        let (head, body) = response.into_parts();
        let pending = tee::PendingStore {
            cache: self.clone(),
            route: request.route.clone(),
            primary,
            secondary,
            status: head.status,
            headers: storable_headers(&head.headers),
            decision,
            age_header: policy::age_header(&head.headers),
            date: policy::parse_http_date(&head.headers, &header::DATE),
            request_time,
            response_time,
            guard,
        };
        let body = tee::StoreBody::new(body, request.policy.max_object_bytes, pending);
        if head_request {
            // The body is read to its end off the request path (that is what stores it), whether
            // or not the HEAD's client is still there.
            tokio::spawn(async move {
                let _ = body.collect().await;
            });
            return Ok(Served { response: Response::from_parts(head, empty_body()), status: CacheStatus::Miss });
        }
        Ok(Served { response: Response::from_parts(head, body.boxed()), status: CacheStatus::Miss })
    }

    /// A 304 from the upstream: the stored response with the new headers and freshness
    /// (RFC 9111 §4.3.4), stored again and served.
    #[allow(clippy::too_many_arguments)]
    async fn refreshed(
        &self,
        request: &CacheRequest,
        parts: &request::Parts,
        primary: &str,
        object: &StoredObject,
        new_headers: &HeaderMap,
        request_time: u64,
        response_time: u64,
    ) -> Served {
        let mut headers = object.headers.clone();
        for name in new_headers.keys() {
            if policy::keeps_stored_value(name) || HOP_BY_HOP.contains(&name.as_str()) {
                continue;
            }
            headers.remove(name);
            for value in new_headers.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        headers.remove(header::AGE);
        let age = policy::age_header(new_headers);
        let date = policy::parse_http_date(new_headers, &header::DATE);
        let merged = match policy::storable(
            &request.policy,
            &Method::GET,
            &parts.headers,
            object.status,
            &headers,
            response_time,
        ) {
            Ok(decision) => {
                let refreshed = build_object(
                    object.status,
                    headers,
                    object.body.clone(),
                    decision,
                    age,
                    date,
                    request_time,
                    response_time,
                );
                let refreshed = Arc::new(refreshed);
                let secondary =
                    policy::vary_names(&refreshed.headers).ok().filter(|names| !names.is_empty()).map(|names| {
                        let secondary = policy::secondary_key(&names, &parts.headers);
                        (names, secondary)
                    });
                self.insert(primary, secondary, Arc::clone(&refreshed), response_time).await;
                refreshed
            }
            Err(_) => {
                // The new headers forbid keeping it (e.g. now no-store): serve once, then forget.
                self.purge(&PurgeCommand { by: PurgeBy::Key, value: primary.to_owned(), actor: "replace".to_owned() })
                    .await;
                Arc::new(StoredObject { headers, ..object.clone() })
            }
        };
        self.emit(
            CacheAction::Revalidated,
            &request.route,
            primary,
            None,
            merged.body.len() as u64,
            Some(merged.freshness.lifetime_s),
            merged.tags.clone(),
        );
        self.count(&request.route, CacheStatus::Revalidated);
        let value = status_value(format!("{CACHE_NAME}; fwd=stale; fwd-status=304"));
        self.respond(&parts.headers, &merged, CacheStatus::Revalidated, value, response_time)
    }

    fn serve_stale(
        &self,
        request: &CacheRequest,
        parts: &request::Parts,
        primary: &str,
        object: &StoredObject,
        why: &str,
        now: u64,
    ) -> Served {
        self.emit(CacheAction::StaleServed, &request.route, primary, None, object.body.len() as u64, None, Vec::new());
        self.count(&request.route, CacheStatus::Stale);
        let value = status_value(format!("{CACHE_NAME}; hit; ttl={}; detail={why}", object.freshness.ttl(now)));
        self.respond(&parts.headers, object, CacheStatus::Stale, value, now)
    }

    async fn refresh_in_background(
        &self,
        request: CacheRequest,
        parts: request::Parts,
        fetch: Fetcher,
        primary: String,
        object: Arc<StoredObject>,
        guard: LeaderGuard,
    ) {
        // Background refreshes ask unconditionally of client directives: the client already
        // has its (stale) answer.
        let mut refresh_parts = parts;
        refresh_parts.headers.remove(header::CACHE_CONTROL);
        refresh_parts.headers.remove(header::PRAGMA);
        match self.fetch_and_store(request, refresh_parts, &fetch, primary, Some(object), Some(guard)).await {
            // Reading the body to its end is what stores a full response.
            Ok(served) => {
                let _ = served.response.into_body().collect().await;
            }
            Err(kind) => tracing::debug!(error = kind.as_str(), "background revalidation failed"),
        }
    }

    /// A response from a stored object: 304 when the client's conditions match it, else the
    /// object with its current Age.
    fn respond(
        &self,
        request_headers: &HeaderMap,
        object: &StoredObject,
        status: CacheStatus,
        cache_status: HeaderValue,
        now: u64,
    ) -> Served {
        let age = object.freshness.age(now);
        let not_modified = object.status == StatusCode::OK && policy::not_modified(request_headers, &object.headers);
        let mut response = if not_modified {
            let mut response = Response::new(empty_body());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            for name in [
                header::CACHE_CONTROL,
                header::CONTENT_LOCATION,
                header::DATE,
                header::ETAG,
                header::EXPIRES,
                header::VARY,
                header::LAST_MODIFIED,
            ] {
                for value in object.headers.get_all(&name) {
                    response.headers_mut().append(name.clone(), value.clone());
                }
            }
            response
        } else {
            let mut response = Response::new(Full::new(object.body.clone()).map_err(|never| match never {}).boxed());
            *response.status_mut() = object.status;
            *response.headers_mut() = object.headers.clone();
            response
        };
        response.headers_mut().insert(header::AGE, age_value(age));
        response.headers_mut().insert(&CACHE_STATUS, cache_status);
        Served { response, status }
    }

    /// Counts a lookup in `stone_cache_lookups_total{route,result}`. The counter handles of a
    /// route are registered once and kept, so a hit pays an uncontended read lock and an atomic
    /// add rather than a label allocation and a registry lookup.
    fn count(&self, route: &str, status: CacheStatus) {
        let index = match status {
            CacheStatus::Hit => 0,
            CacheStatus::Miss => 1,
            CacheStatus::Stale => 2,
            CacheStatus::Revalidated => 3,
            CacheStatus::Bypass => 4,
            CacheStatus::None => return,
        };
        if let Ok(counters) = self.inner.lookups.read()
            && let Some(route_counters) = counters.get(route)
        {
            route_counters[index].increment(1);
            return;
        }
        let route_counters: [metrics::Counter; 5] = [
            CacheStatus::Hit,
            CacheStatus::Miss,
            CacheStatus::Stale,
            CacheStatus::Revalidated,
            CacheStatus::Bypass,
        ]
        .map(|status| {
            metrics::counter!("stone_cache_lookups_total", "route" => route.to_owned(), "result" => status.as_str())
        });
        route_counters[index].increment(1);
        if let Ok(mut counters) = self.inner.lookups.write() {
            // Bounded by the routes that cache; a renamed route leaves a few handles behind.
            counters.entry(route.to_owned()).or_insert(route_counters);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        action: CacheAction,
        route: &str,
        key: &str,
        tier: Option<CacheTier>,
        bytes: u64,
        ttl_s: Option<u64>,
        tags: Vec<String>,
    ) {
        let Some(events) = &self.inner.events else { return };
        let event = CacheEvent {
            action,
            route: route.to_owned(),
            key: event_key(key),
            tier,
            bytes,
            ttl_s,
            tags,
            actor: None,
            reason: None,
            count: None,
        };
        events.sink.emit(&Envelope::new(events.source.as_ref(), events.config_seq.load(Ordering::Acquire), event));
    }
}

/// Reports the memory tier's evictions as one `cache.evicted` event per reason and interval
/// (with the number of objects and their bytes), so a cache churning at any rate costs a few
/// events a minute. Ends when the cache is gone.
async fn report_evictions(tally: std::sync::Weak<EvictionTally>, events: CacheEvents, interval: Duration) {
    let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(tally) = tally.upgrade() else { return };
        for (reason, count, bytes) in tally.take() {
            if count == 0 {
                continue;
            }
            let event = CacheEvent {
                action: CacheAction::Evicted,
                route: stone_events::subjects::NONE_TOKEN.to_owned(),
                key: "*".to_owned(),
                tier: Some(CacheTier::Memory),
                bytes,
                ttl_s: None,
                tags: Vec::new(),
                actor: None,
                reason: Some(reason.to_owned()),
                count: Some(count),
            };
            events.sink.emit(&Envelope::new(events.source.as_ref(), events.config_seq.load(Ordering::Acquire), event));
        }
    }
}

/// The key as events show it: the URL part (key parts after it may hold header values or a
/// consumer name, which do not belong in an analytics store).
fn event_key(key: &str) -> String {
    let url = key.split([key::EXTRA_SEPARATOR, key::VARIANT_SEPARATOR]).next().unwrap_or(key);
    url.split('?').next().unwrap_or(url).to_owned()
}

fn host_only(host: &str) -> &str {
    host.rsplit_once(':')
        .map_or(host, |(name, port)| if port.bytes().all(|byte| byte.is_ascii_digit()) { name } else { host })
}

/// The URL part of a key (what invalidation and purge by key name).
fn url_key(host: &str, path: &str, query: Option<&str>) -> String {
    key::primary_key(&CachePolicy::with_defaults(), host, path, query, &HeaderMap::new(), None)
}

fn set_cache_status(headers: &mut HeaderMap, value: String) {
    headers.insert(&CACHE_STATUS, status_value(value));
}

/// A formatted `Cache-Status` as a header value, without another copy. Every value this module
/// formats is printable ASCII; the bare cache name stands in should one ever not be.
fn status_value(value: String) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::from(value)).unwrap_or_else(|_| HeaderValue::from_static(CACHE_NAME))
}

thread_local! {
    /// The `Age` and fresh-hit `Cache-Status` values this thread formatted last. A hot object
    /// is hit many times a second with the same two numbers, and formatting them anew was ~3% of
    /// an in-process hit's instructions (`infra/hit-instructions.sh`); equal numbers give equal
    /// text, so reuse can never show one object's figures on another.
    static LAST_AGE: RefCell<Option<(u64, HeaderValue)>> = const { RefCell::new(None) };
    static LAST_HIT_STATUS: RefCell<Option<(i64, HeaderValue)>> = const { RefCell::new(None) };
}

/// `Age: N` (RFC 9111 §5.1).
fn age_value(age: u64) -> HeaderValue {
    reuse(&LAST_AGE, age, HeaderValue::from)
}

/// `proxy-stone; hit; ttl=N`: a fresh hit from the in-process tier (RFC 9211).
fn hit_status_value(ttl: i64) -> HeaderValue {
    reuse(&LAST_HIT_STATUS, ttl, |ttl| {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(ttl);
        let mut text = String::with_capacity(CACHE_NAME.len() + 11 + digits.len());
        text.push_str(CACHE_NAME);
        text.push_str("; hit; ttl=");
        text.push_str(digits);
        status_value(text)
    })
}

/// The value `slot` holds for `number`, else `make(number)`, which the slot then keeps.
fn reuse<N: Copy + PartialEq>(
    slot: &'static std::thread::LocalKey<RefCell<Option<(N, HeaderValue)>>>,
    number: N,
    make: impl FnOnce(N) -> HeaderValue,
) -> HeaderValue {
    slot.with_borrow_mut(|last| match last {
        Some((kept, value)) if *kept == number => value.clone(),
        _ => {
            let value = make(number);
            *last = Some((number, value.clone()));
            value
        }
    })
}

fn empty_body() -> ProxyBody {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

/// The end-to-end headers worth storing: no hop-by-hop fields and no Age (recomputed on use).
fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    let mut stored = headers.clone();
    for name in HOP_BY_HOP {
        stored.remove(name);
    }
    stored.remove(header::AGE);
    stored.remove(&CACHE_STATUS);
    stored
}

/// Tags of a response: `Surrogate-Key` (space separated) and `Cache-Tag` (comma separated).
fn tags_of(headers: &HeaderMap) -> Vec<String> {
    let mut tags: Vec<String> = headers
        .get_all(&SURROGATE_KEY)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split_whitespace())
        .chain(
            headers
                .get_all(&CACHE_TAG)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .flat_map(|value| value.split(',')),
        )
        .map(|tag| tag.trim().to_owned())
        .filter(|tag| !tag.is_empty())
        .collect();
    tags.sort();
    tags.dedup();
    tags
}

#[allow(clippy::too_many_arguments)]
fn build_object(
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    decision: StoreDecision,
    age_header: u64,
    date: Option<u64>,
    request_time: u64,
    response_time: u64,
) -> StoredObject {
    let freshness = policy::EntryFreshness {
        corrected_initial_age: policy::corrected_initial_age(age_header, date, request_time, response_time),
        response_time,
        lifetime_s: decision.lifetime_s,
        stale_while_revalidate_s: decision.stale_while_revalidate_s,
        stale_if_error_s: decision.stale_if_error_s,
        must_revalidate: decision.must_revalidate,
        no_cache: decision.no_cache,
    };
    let has_validator = headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
    let keep_until = response_time.saturating_add(freshness.keep_s(has_validator));
    let tags = tags_of(&headers);
    let mut headers = headers;
    headers.reserve(store::SERVED_EXTRA_HEADERS);
    StoredObject { status, headers, body, freshness, keep_until, tags }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reused_age_and_status_values_always_match_their_numbers() {
        for (age, ttl) in [(0, 3_600), (0, 3_600), (1, 3_599), (0, 3_600), (86_400, -5), (86_400, -5)] {
            assert_eq!(age_value(age), age.to_string().as_str());
            assert_eq!(hit_status_value(ttl), format!("proxy-stone; hit; ttl={ttl}").as_str());
        }
    }

    #[test]
    fn tags_come_from_surrogate_key_and_cache_tag() {
        let mut headers = HeaderMap::new();
        headers.insert("surrogate-key", HeaderValue::from_static("user:1  users"));
        headers.insert("cache-tag", HeaderValue::from_static("users, catalog"));
        assert_eq!(tags_of(&headers), vec!["catalog", "user:1", "users"]);
    }

    #[test]
    fn event_keys_carry_no_query_or_key_parts() {
        let key = format!("h/x?token=secret{}consumer=alice", key::EXTRA_SEPARATOR);
        assert_eq!(event_key(&key), "h/x");
    }
}
