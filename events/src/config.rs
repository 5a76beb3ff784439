//! `config.*`: one event per change of a route, upstream, consumer or policy.
//!
//! The specs below are also the configuration model: the gateway validates them, the proxy builds
//! its routing table from them, and `stone apply` reads them from YAML.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::envelope::EventData;

pub mod document;
pub mod validation;

/// Load-balancing algorithm of an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LbAlgorithm {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// Power of two choices on in-flight requests.
    LeastRequest,
    /// Consistent hashing on a request attribute.
    ConsistentHash,
}

/// One upstream target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// `http://host:port` (a path prefix is allowed).
    pub url: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// Active health check of an upstream's targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_health_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_health_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_threshold")]
    pub healthy_threshold: u32,
    #[serde(default = "default_threshold")]
    pub unhealthy_threshold: u32,
}

fn default_health_path() -> String {
    "/healthz".to_owned()
}
fn default_health_interval_ms() -> u64 {
    5_000
}
fn default_health_timeout_ms() -> u64 {
    1_000
}
fn default_threshold() -> u32 {
    2
}

/// A pool of targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    pub name: String,
    #[serde(default)]
    pub algorithm: LbAlgorithm,
    pub targets: Vec<TargetSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSpec>,
    /// What `consistent_hash` hashes (default: the client IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    /// Ejection of targets after consecutive failures of real traffic (on by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive_health: Option<PassiveHealthSpec>,
}

/// The request attribute consistent hashing uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    /// A request header's value, e.g. `{"header": "x-user-id"}`.
    Header(String),
    /// A cookie's value, e.g. `{"cookie": "session"}`.
    Cookie(String),
    /// The client's IP address.
    ClientIp,
}

/// Passive health: eject a target after consecutive failures, for a backoff that doubles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealthSpec {
    /// Consecutive failures (connect errors, resets, 502/503/504) that eject a target; 0 turns ejection off.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// First ejection; each further ejection in a row doubles it.
    #[serde(default = "default_base_ejection_ms")]
    pub base_ejection_ms: u64,
    #[serde(default = "default_max_ejection_ms")]
    pub max_ejection_ms: u64,
}

impl Default for PassiveHealthSpec {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            base_ejection_ms: default_base_ejection_ms(),
            max_ejection_ms: default_max_ejection_ms(),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection_ms() -> u64 {
    10_000
}
fn default_max_ejection_ms() -> u64 {
    300_000
}

/// A route: which requests go to which upstream, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Unique name; also the `route` dimension of every event (letters, digits, `_`, `-`).
    pub name: String,
    /// Host names to match; empty matches any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Path patterns: `/exact`, `/prefix/*`, or templates like `/users/{id}`; empty matches `/*`.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Methods to match; empty matches any method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Headers that must be present with these exact values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Upstream name.
    pub upstream: String,
    /// Remove the matched prefix before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Upstream response timeout in milliseconds (default from the proxy's settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Higher wins among routes that match equally specifically.
    #[serde(default)]
    pub priority: i32,
    /// Extra attempts on another target when it is safe (connect failures; idempotent methods
    /// without a body); default 1, bounded by the worker's retry budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Largest request body in bytes (413 beyond); default from the proxy's settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    /// Authentication required by this route (auth policies attached to the route apply too).
    // Boxed like `cache`: most routes have none, and specs travel in enums.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Box<AuthSpec>>,
    /// Rate limit of this route (rate-limit policies attached to the route apply too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Response cache policy; absent means the route does not cache. Boxed: most routes have none,
    /// and specs travel in enums whose size is that of their largest variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Box<crate::cache::RouteCacheSpec>>,
}

/// How a route authenticates its consumers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthSpec {
    /// An API key of a consumer (stored hashed), from a header or a query parameter.
    ApiKey {
        /// Header carrying the key (default `x-api-key`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        header: Option<String>,
        /// Query parameter carrying the key, if keys may come that way.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        query: Option<String>,
        /// Consumers allowed on the route; empty allows every consumer with a valid key (403 otherwise).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        consumers: Vec<String>,
    },
    /// A JWT bearer token.
    Jwt(JwtSpec),
}

/// JWT validation of a route: HS256 with a shared secret, RS256/ES256 with a PEM public key or a
/// JWKS (file or URL, refreshed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtSpec {
    /// Accepted algorithms: `HS256`, `RS256`, `ES256`.
    pub algorithms: Vec<String>,
    /// HS256 shared secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// RS256/ES256 public key, PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_pem: Option<String>,
    /// Path of a JWKS document, re-read when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<String>,
    /// URL of a JWKS document, fetched periodically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Required `iss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Required `aud`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Claim naming the consumer (default `sub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_claim: Option<String>,
    /// Consumers allowed on the route; empty allows every valid token (403 otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<String>,
}

/// A rate limit: `requests` per `window_secs`, per consumer (default), client IP or route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    pub requests: u64,
    pub window_secs: u64,
    /// `consumer`, `ip` or `route`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// A consumer of the API (identified by API keys or JWT subject).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSpec {
    pub name: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Hashes of the consumer's API keys; the keys themselves are shown once and never stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<ApiKeyHash>,
}

/// One API key of a consumer, as stored: a public id (the key's prefix, for lookup and
/// revocation) and the SHA-256 of the whole key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyHash {
    pub id: String,
    /// Lower-case hex SHA-256 of the full key.
    pub sha256: String,
}

/// The public id of a presented API key (`sk_<id>_<secret>`), for finding its hash.
pub fn api_key_id(presented: &str) -> Option<&str> {
    let (id, secret) = presented.strip_prefix("sk_")?.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some(id)
}

/// Lower-case hex SHA-256 of a secret (API keys, admin tokens). Keys carry 256 random bits, so a
/// plain fast hash is enough: there is nothing to brute-force.
pub fn sha256_hex(secret: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(secret.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A named policy (auth, rate limit or cache settings) that routes refer to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub name: String,
    /// `auth`, `rate_limit` or `cache`. On the wire this is `type`: `kind` is the tag of
    /// [`EntitySpec`] (`"kind": "policy"`), and one object cannot carry two `kind` keys.
    #[serde(rename = "type")]
    pub policy_type: String,
    /// Routes the policy applies to (like a plugin attached to routes); a policy without routes
    /// applies nowhere until one is named.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
    /// Settings of the policy kind.
    #[serde(default)]
    pub settings: BTreeMap<String, serde_json::Value>,
}

/// The kind of a configuration entity; also the subject token of its CONFIG subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntityKind {
    Route,
    Upstream,
    Consumer,
    Policy,
}

impl EntityKind {
    pub const ALL: [EntityKind; 4] = [Self::Route, Self::Upstream, Self::Consumer, Self::Policy];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Route => "route",
            Self::Upstream => "upstream",
            Self::Consumer => "consumer",
            Self::Policy => "policy",
        }
    }

    /// The collection name used in URLs, documents and field paths (`routes`).
    pub fn plural(self) -> &'static str {
        match self {
            Self::Route => "routes",
            Self::Upstream => "upstreams",
            Self::Consumer => "consumers",
            Self::Policy => "policies",
        }
    }

    pub fn from_plural(plural: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.plural() == plural)
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

/// The desired state of one entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EntitySpec {
    Route(RouteSpec),
    Upstream(UpstreamSpec),
    Consumer(ConsumerSpec),
    Policy(PolicySpec),
}

impl EntitySpec {
    pub fn kind(&self) -> EntityKind {
        match self {
            Self::Route(_) => EntityKind::Route,
            Self::Upstream(_) => EntityKind::Upstream,
            Self::Consumer(_) => EntityKind::Consumer,
            Self::Policy(_) => EntityKind::Policy,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Route(spec) => &spec.name,
            Self::Upstream(spec) => &spec.name,
            Self::Consumer(spec) => &spec.name,
            Self::Policy(spec) => &spec.name,
        }
    }

    /// The spec without its `kind` tag, as the API and Postgres show it.
    pub fn to_body(&self) -> Result<serde_json::Value, serde_json::Error> {
        match self {
            Self::Route(spec) => serde_json::to_value(spec),
            Self::Upstream(spec) => serde_json::to_value(spec),
            Self::Consumer(spec) => serde_json::to_value(spec),
            Self::Policy(spec) => serde_json::to_value(spec),
        }
    }

    /// Reads a spec of a known kind from a body without `kind` tag.
    pub fn from_body(kind: EntityKind, body: serde_json::Value) -> Result<Self, serde_json::Error> {
        Ok(match kind {
            EntityKind::Route => Self::Route(serde_json::from_value(body)?),
            EntityKind::Upstream => Self::Upstream(serde_json::from_value(body)?),
            EntityKind::Consumer => Self::Consumer(serde_json::from_value(body)?),
            EntityKind::Policy => Self::Policy(serde_json::from_value(body)?),
        })
    }
}

/// What happened to the entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConfigOp {
    Upserted,
    Deleted,
}

/// Membership of a change in a multi-entity change set, applied all or nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ChangeSet {
    pub id: Uuid,
    /// Position of this event in the set, from 0.
    pub index: u32,
    pub size: u32,
}

/// `config.<kind>.<op>`, version 1: one change of one entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConfigChange {
    pub kind: EntityKind,
    pub name: String,
    /// Stable id of the entity across versions.
    pub id: Uuid,
    /// Entity version after this change, from 1.
    pub version: u64,
    pub op: ConfigOp,
    /// Who made the change (token name or `stone apply` user).
    pub actor: String,
    /// The new state; absent on delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<EntitySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_set: Option<ChangeSet>,
}

impl ConfigChange {
    /// Every config event type, in a stable order.
    pub const TYPES: [&'static str; 8] = [
        "config.route.upserted",
        "config.route.deleted",
        "config.upstream.upserted",
        "config.upstream.deleted",
        "config.consumer.upserted",
        "config.consumer.deleted",
        "config.policy.upserted",
        "config.policy.deleted",
    ];

    pub fn event_type_of(kind: EntityKind, op: ConfigOp) -> &'static str {
        let index = EntityKind::ALL.iter().position(|k| *k == kind).unwrap_or(0) * 2
            + match op {
                ConfigOp::Upserted => 0,
                ConfigOp::Deleted => 1,
            };
        Self::TYPES[index]
    }
}

impl EventData for ConfigChange {
    const VERSION: u32 = 1;

    fn event_type(&self) -> &'static str {
        Self::event_type_of(self.kind, self.op)
    }

    /// `kind.name` (CONFIG subjects are per entity: see [`crate::subjects::Namespace::config_subject`]).
    fn subject_dimensions(&self) -> Vec<&str> {
        vec![self.kind.as_str(), &self.name]
    }
}

/// The configuration as the fold of the CONFIG stream: what every worker and the Postgres
/// projection compute from the same events, so they agree by construction.
///
/// Events of a change set are held back until the whole set has arrived and are then applied
/// together, so no reader ever sees half of a multi-entity change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigState {
    entities: BTreeMap<(EntityKind, String), ConfigEntity>,
    pending_sets: BTreeMap<Uuid, Vec<(u64, ConfigChange)>>,
    /// Stream sequence of the last event that changed the state.
    pub applied_seq: u64,
}

/// A change that took effect, with the entity as it was before it.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedChange {
    pub stream_seq: u64,
    pub change: ConfigChange,
    pub before: Option<ConfigEntity>,
}

/// One entity's current state in a [`ConfigState`].
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigEntity {
    pub id: Uuid,
    pub version: u64,
    pub spec: EntitySpec,
    pub stream_seq: u64,
    pub actor: String,
}

impl ConfigState {
    /// Applies the event at `stream_seq`. Returns the changes that took effect now, in order
    /// (empty while a change set is incomplete).
    ///
    /// Writers publish a set's members back to back (each with the stream's expected last
    /// sequence), so an event that is not a member of the open set means the writer gave up
    /// half-way: the open set is abandoned for good and can never take effect later.
    pub fn apply(&mut self, stream_seq: u64, change: ConfigChange) -> Vec<(u64, ConfigChange)> {
        self.apply_tracked(stream_seq, change).into_iter().map(|applied| (applied.stream_seq, applied.change)).collect()
    }

    /// As [`Self::apply`], also returning each entity's state before the change (for history).
    pub fn apply_tracked(&mut self, stream_seq: u64, change: ConfigChange) -> Vec<AppliedChange> {
        let member_of = change.change_set.as_ref().filter(|set| set.size > 1).map(|set| set.id);
        self.pending_sets.retain(|set_id, _| Some(*set_id) == member_of);
        let ready = match &change.change_set {
            Some(set) if set.size > 1 => {
                let set_id = set.id;
                let size = set.size as usize;
                let pending = self.pending_sets.entry(set_id).or_default();
                pending.push((stream_seq, change));
                if pending.len() < size {
                    return Vec::new();
                }
                self.pending_sets.remove(&set_id).unwrap_or_default()
            }
            _ => vec![(stream_seq, change)],
        };
        ready
            .into_iter()
            .map(|(sequence, change)| {
                let before = self.apply_one(sequence, &change);
                AppliedChange { stream_seq: sequence, change, before }
            })
            .collect()
    }

    /// Applies one change and returns the entity as it was before.
    fn apply_one(&mut self, stream_seq: u64, change: &ConfigChange) -> Option<ConfigEntity> {
        let key = (change.kind, change.name.clone());
        self.applied_seq = self.applied_seq.max(stream_seq);
        match (&change.op, &change.spec) {
            (ConfigOp::Upserted, Some(spec)) => self.entities.insert(
                key,
                ConfigEntity {
                    id: change.id,
                    version: change.version,
                    spec: spec.clone(),
                    stream_seq,
                    actor: change.actor.clone(),
                },
            ),
            // An upsert without a spec cannot be applied; writers never produce one.
            (ConfigOp::Upserted, None) => self.entities.get(&key).cloned(),
            (ConfigOp::Deleted, _) => self.entities.remove(&key),
        }
    }

    /// Every applied entity, by kind then name.
    pub fn entities(&self) -> impl Iterator<Item = &ConfigEntity> {
        self.entities.values()
    }

    pub fn get(&self, kind: EntityKind, name: &str) -> Option<&ConfigEntity> {
        self.entities.get(&(kind, name.to_owned()))
    }

    /// Every entity of a kind, by name.
    pub fn of_kind(&self, kind: EntityKind) -> impl Iterator<Item = &ConfigEntity> {
        self.entities.iter().filter(move |((entity_kind, _), _)| *entity_kind == kind).map(|(_, entity)| entity)
    }

    pub fn routes(&self) -> Vec<RouteSpec> {
        self.of_kind(EntityKind::Route)
            .filter_map(|entity| match &entity.spec {
                EntitySpec::Route(spec) => Some(spec.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn upstreams(&self) -> Vec<UpstreamSpec> {
        self.of_kind(EntityKind::Upstream)
            .filter_map(|entity| match &entity.spec {
                EntitySpec::Upstream(spec) => Some(spec.clone()),
                _ => None,
            })
            .collect()
    }

    /// The consumer a presented API key belongs to, checked against the stored hash. Linear in
    /// the consumers; a worker that checks keys per request should index them by key id.
    pub fn consumer_by_api_key(&self, presented: &str) -> Option<&ConsumerSpec> {
        let id = api_key_id(presented)?;
        let hash = sha256_hex(presented);
        self.of_kind(EntityKind::Consumer).find_map(|entity| match &entity.spec {
            EntitySpec::Consumer(consumer) => {
                consumer.api_keys.iter().any(|key| key.id == id && key.sha256 == hash).then_some(consumer)
            }
            _ => None,
        })
    }

    /// Change sets still waiting for members.
    pub fn incomplete_change_sets(&self) -> usize {
        self.pending_sets.len()
    }

    pub fn len(&self) -> usize {
        self.entities.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entities.is_empty()
    }
}

#[cfg(test)]
mod fold_tests {
    use super::*;

    fn upsert(name: &str, version: u64, set: Option<(Uuid, u32, u32)>) -> ConfigChange {
        ConfigChange {
            kind: EntityKind::Consumer,
            name: name.to_owned(),
            id: Uuid::nil(),
            version,
            op: ConfigOp::Upserted,
            actor: "t".to_owned(),
            spec: Some(EntitySpec::Consumer(ConsumerSpec {
                name: name.to_owned(),
                metadata: BTreeMap::new(),
                api_keys: Vec::new(),
            })),
            change_set: set.map(|(id, index, size)| ChangeSet { id, index, size }),
        }
    }

    #[test]
    fn change_sets_apply_all_or_nothing() {
        let mut state = ConfigState::default();
        let set = Uuid::now_v7();
        assert!(state.apply(1, upsert("a", 1, Some((set, 0, 2)))).is_empty());
        assert!(state.is_empty(), "half a change set is invisible");
        assert_eq!(state.incomplete_change_sets(), 1);
        assert_eq!(state.apply(2, upsert("b", 1, Some((set, 1, 2)))).len(), 2);
        assert_eq!(state.len(), 2);
        assert_eq!(state.applied_seq, 2);
    }

    #[test]
    fn api_keys_are_found_by_id_and_hash() {
        let key = "sk_abc123_secretsecret";
        let mut change = upsert("acme", 1, None);
        if let Some(EntitySpec::Consumer(consumer)) = &mut change.spec {
            consumer.api_keys.push(ApiKeyHash { id: "abc123".to_owned(), sha256: sha256_hex(key) });
        }
        let mut state = ConfigState::default();
        state.apply(1, change);
        assert_eq!(state.consumer_by_api_key(key).map(|consumer| consumer.name.as_str()), Some("acme"));
        assert!(state.consumer_by_api_key("sk_abc123_wrong").is_none());
        assert!(state.consumer_by_api_key("sk_other_secretsecret").is_none());
        assert_eq!(api_key_id("nope"), None);
    }

    #[test]
    fn an_interrupted_change_set_is_abandoned() {
        let mut state = ConfigState::default();
        let set = Uuid::now_v7();
        assert!(state.apply(1, upsert("a", 1, Some((set, 0, 2)))).is_empty());
        assert_eq!(state.apply(2, upsert("c", 1, None)).len(), 1);
        assert_eq!(state.incomplete_change_sets(), 0, "the writer gave up: the set is gone");
        assert!(state.apply(3, upsert("b", 1, Some((set, 1, 2)))).is_empty(), "a late member never completes it");
        assert!(state.get(EntityKind::Consumer, "a").is_none());
    }

    #[test]
    fn deletes_remove_and_upserts_replace() {
        let mut state = ConfigState::default();
        state.apply(1, upsert("a", 1, None));
        state.apply(2, upsert("a", 2, None));
        assert_eq!(state.get(EntityKind::Consumer, "a").map(|entity| entity.version), Some(2));
        let delete = ConfigChange { op: ConfigOp::Deleted, spec: None, version: 3, ..upsert("a", 3, None) };
        state.apply(3, delete);
        assert!(state.get(EntityKind::Consumer, "a").is_none());
    }
}

/// Builders shared by the unit tests of this module's children.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub fn upsert(spec: EntitySpec, version: u64) -> ConfigChange {
        ConfigChange {
            kind: spec.kind(),
            name: spec.name().to_owned(),
            id: Uuid::nil(),
            version,
            op: ConfigOp::Upserted,
            actor: "test".to_owned(),
            spec: Some(spec),
            change_set: None,
        }
    }
}
