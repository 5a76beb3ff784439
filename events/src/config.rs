//! `config.*`: one event per change of a route, upstream, consumer or policy.
//!
//! The specs below are also the configuration model: the gateway validates them, the proxy builds
//! its routing table from them, and `stone apply` reads them from YAML.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::envelope::EventData;

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
}

/// A consumer of the API (identified by API keys or JWT subject).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSpec {
    pub name: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// A named policy (auth, rate limit or cache settings) that routes refer to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub name: String,
    /// `auth`, `rate_limit` or `cache`.
    pub kind: String,
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
