//! `cache.*`: what the response cache did with an object.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::envelope::EventData;

/// The cache action; each is its own event type `cache.<action>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CacheAction {
    Stored,
    Hit,
    Miss,
    StaleServed,
    Revalidated,
    Evicted,
    Purged,
}

impl CacheAction {
    pub const ALL: [CacheAction; 7] =
        [Self::Stored, Self::Hit, Self::Miss, Self::StaleServed, Self::Revalidated, Self::Evicted, Self::Purged];

    /// The event type for this action.
    pub fn event_type(self) -> &'static str {
        match self {
            Self::Stored => "cache.stored",
            Self::Hit => "cache.hit",
            Self::Miss => "cache.miss",
            Self::StaleServed => "cache.stale_served",
            Self::Revalidated => "cache.revalidated",
            Self::Evicted => "cache.evicted",
            Self::Purged => "cache.purged",
        }
    }

    pub fn from_event_type(event_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|action| action.event_type() == event_type)
    }
}

/// Which cache tier an action concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CacheTier {
    Memory,
    Redis,
}

/// Payload of every `cache.*` event, version 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CacheEvent {
    pub action: CacheAction,
    /// Route the object belongs to (`-` for purges that span routes).
    pub route: String,
    /// The primary cache key (hashed, never carrying credentials).
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<CacheTier>,
    /// Object size in bytes, where known.
    #[serde(default)]
    pub bytes: u64,
    /// Freshness lifetime in seconds at store time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
    /// Surrogate keys (tags) of the object.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// For purges: who asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// For evictions and purges: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How many objects the event stands for, when it sums several (`cache.evicted` is reported
    /// per reason and interval, with `bytes` the total); absent means one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

impl EventData for CacheEvent {
    const VERSION: u32 = 1;

    fn event_type(&self) -> &'static str {
        self.action.event_type()
    }

    /// `route`
    fn subject_dimensions(&self) -> Vec<&str> {
        vec![&self.route]
    }
}

/// A route's cache policy (`route.cache`). Absent means the route does not cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheSpec {
    /// Caching on or off for the route (default on once `cache` is present).
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// What, besides method, host, path and query, makes two requests the same object.
    #[serde(default)]
    pub key: CacheKeySpec,
    /// Freshness in seconds for storable responses that carry no freshness information of their
    /// own; off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_ttl_s: Option<u64>,
    /// Allow heuristic freshness (10% of the time since Last-Modified) where RFC 9111 §4.2.2
    /// permits it.
    #[serde(default)]
    pub heuristic: bool,
    /// Objects larger than this pass through uncached, streamed (default 1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_object_bytes: Option<u64>,
    /// Requests matching any rule go straight to the upstream.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bypass: Vec<CacheBypassRule>,
    /// Store and share responses that set cookies (off: such responses are never stored).
    #[serde(default)]
    pub share_set_cookie: bool,
    /// `stale-while-revalidate` in seconds when the response does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_while_revalidate_s: Option<u64>,
    /// `stale-if-error` in seconds when the response does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_if_error_s: Option<u64>,
}

fn enabled_by_default() -> bool {
    true
}

/// Key composition of a route's cache.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheKeySpec {
    /// Request headers whose values are part of the key (case-insensitive names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    /// Query parameters that are part of the key; empty means all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_include: Vec<String>,
    /// Query parameters left out of the key (tracking parameters and the like).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_exclude: Vec<String>,
    /// Key by the authenticated consumer, so each consumer has its own copy.
    #[serde(default)]
    pub consumer: bool,
}

/// A bypass rule: a request bypasses the cache when every condition the rule sets holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheBypassRule {
    /// The request carries this header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The request carries this cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// The path starts with this prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// The query string has this parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// What a purge selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PurgeBy {
    /// One object (and its variants): `host/path?query`.
    Key,
    /// Every object whose key starts with the value, e.g. `api.example.com/users/`.
    Prefix,
    /// Every object tagged so by the upstream's `Surrogate-Key` or `Cache-Tag` header.
    Tag,
}

impl PurgeBy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Prefix => "prefix",
            Self::Tag => "tag",
        }
    }
}

/// The purge command every proxy worker subscribes to, on core NATS subject
/// [`purge_subject`] (fire and forget: a purge is idempotent and a worker that missed it
/// starts with an empty memory tier anyway).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgeCommand {
    pub by: PurgeBy,
    pub value: String,
    /// Who asked (token name or user), recorded in `cache.purged`.
    pub actor: String,
}

/// `{namespace}.cache.purge`
pub fn purge_subject(namespace: &crate::Namespace) -> String {
    format!("{}.cache.purge", namespace.root())
}
