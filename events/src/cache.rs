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
