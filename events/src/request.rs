//! `request.*`: one `request.completed` per proxied request, whatever its outcome.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::envelope::EventData;
use crate::subjects::{NONE_TOKEN, status_class};

/// How the response cache took part in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CacheStatus {
    /// Caching is off for the route, or the request was not cacheable.
    #[default]
    None,
    /// Served from the cache without contacting the upstream.
    Hit,
    /// Not in the cache; fetched from the upstream.
    Miss,
    /// Served stale (stale-while-revalidate or stale-if-error).
    Stale,
    /// A stored entry was revalidated with the upstream (304).
    Revalidated,
    /// The request bypassed the cache by rule or directive.
    Bypass,
}

impl CacheStatus {
    /// The subject token and analytics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Stale => "stale",
            Self::Revalidated => "revalidated",
            Self::Bypass => "bypass",
        }
    }
}

/// Why a request did not get an upstream response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No route matched the request.
    NoRoute,
    /// The route's upstream had no healthy target.
    NoHealthyTarget,
    /// Connecting to the upstream target failed.
    UpstreamConnect,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The upstream connection broke mid-response.
    UpstreamReset,
    /// The client went away before the response completed.
    ClientAbort,
    /// The request was malformed or over a size limit.
    BadRequest,
    /// Authentication failed (401) or was refused (403).
    Unauthorized,
    /// A rate limit refused the request.
    RateLimited,
    /// Anything else inside the proxy.
    Internal,
}

impl ErrorKind {
    /// The analytics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::NoHealthyTarget => "no_healthy_target",
            Self::UpstreamConnect => "upstream_connect",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamReset => "upstream_reset",
            Self::ClientAbort => "client_abort",
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::RateLimited => "rate_limited",
            Self::Internal => "internal",
        }
    }
}

/// The outcome of rate limiting for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RateLimitDecision {
    /// The policy that applied.
    pub policy: String,
    /// Whether the request was refused.
    pub limited: bool,
    /// Requests left in the window after this one.
    pub remaining: u64,
    /// The shared store (Redis) did not answer in time, so the limit was not checked; `limited`
    /// then says what `proxy.rate_limit_failure` decided (false: failed open, true: failed
    /// closed). Omitted when false, and false in events written before the field existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub store_unavailable: bool,
}

/// `request.completed` version 2 (current).
///
/// Durations are integer microseconds; `route` and `path_template` are the low-cardinality
/// dimensions, `path` is the raw path kept for search and never used as a grouping key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RequestCompleted {
    pub method: String,
    pub host: String,
    /// Route name, or `-` when no route matched.
    pub route: String,
    /// The matched path pattern, e.g. `/users/{id}`.
    pub path_template: String,
    /// The raw request path without the query string.
    pub path: String,
    /// Upstream name, when a route matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// The target URL the request was sent to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Authenticated consumer, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Client address as seen by the proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: String,
    /// Status sent to the client.
    pub status: u16,
    /// From request head received to response body finished, microseconds.
    pub total_us: u64,
    /// From upstream request sent to upstream body finished, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_us: Option<u64>,
    /// From request head received to first response byte sent, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttfb_us: Option<u64>,
    /// Request body bytes received from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    #[serde(default)]
    pub cache: CacheStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitDecision>,
}

impl RequestCompleted {
    pub const TYPE: &'static str = "request.completed";
}

impl EventData for RequestCompleted {
    const VERSION: u32 = 2;

    fn event_type(&self) -> &'static str {
        Self::TYPE
    }

    /// `route.status_class.cache.upstream.consumer`
    fn subject_dimensions(&self) -> Vec<&str> {
        vec![
            &self.route,
            status_class(self.status),
            self.cache.as_str(),
            self.upstream.as_deref().unwrap_or(NONE_TOKEN),
            self.consumer.as_deref().unwrap_or(NONE_TOKEN),
        ]
    }
}

/// `request.completed` version 1, as the first walking skeleton published it: a float
/// millisecond latency, one cache flag, and the target URL without the upstream name.
/// Kept so that events from that era still decode; read through [`From`] into version 2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RequestCompletedV1 {
    pub method: String,
    pub host: String,
    pub route: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_target: Option<String>,
    pub status: u16,
    /// Total duration in milliseconds.
    pub duration_ms: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    #[serde(default)]
    pub cache_hit: bool,
}

impl From<RequestCompletedV1> for RequestCompleted {
    fn from(v1: RequestCompletedV1) -> Self {
        // v1 had no path templates: the raw path is the best template we know. Negative or
        // non-finite durations cannot come from a real clock; they become 0 rather than wrap.
        let total_us = if v1.duration_ms.is_finite() && v1.duration_ms > 0.0 {
            (v1.duration_ms * 1000.0).round() as u64
        } else {
            0
        };
        Self {
            method: v1.method,
            host: v1.host,
            route: v1.route,
            path_template: v1.path.clone(),
            path: v1.path,
            upstream: None,
            target: v1.upstream_target,
            consumer: None,
            client_ip: None,
            protocol: "HTTP/1.1".to_owned(),
            status: v1.status,
            total_us,
            upstream_us: None,
            ttfb_us: None,
            bytes_in: v1.bytes_in,
            bytes_out: v1.bytes_out,
            cache: if v1.cache_hit { CacheStatus::Hit } else { CacheStatus::None },
            error: None,
            rate_limit: None,
        }
    }
}
