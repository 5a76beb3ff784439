//! Validation of configuration entities against the configuration they would live in.
//!
//! Pure functions so that the gateway (before it appends a change), `stone apply` (before it sends
//! a file) and the proxy (before it builds a routing table) reject the same things with the same
//! words. Every error names the field as `<kind plural>.<path>`, e.g. `routes.paths[0]`.
//!
//! A change set is validated as a whole: the changes are applied to a copy of the state and every
//! touched entity is checked against the result, so the order of changes inside one apply does not
//! matter (a route may come before the upstream it names).

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};

use super::{
    AuthSpec, ConfigState, EntityKind, EntitySpec, HashOn, HealthCheckSpec, JwtSpec, PolicySpec, RateLimitSpec,
    RouteSpec, UpstreamSpec,
};

/// Longest entity name; names are subject tokens and metric labels, so they stay short.
pub const MAX_NAME_LEN: usize = 64;
/// Upper bound of timeouts and intervals (one hour), in milliseconds.
pub const MAX_DURATION_MS: u64 = 3_600_000;
/// Upper bound of a target's weight.
pub const MAX_WEIGHT: u32 = 1_000;
/// Upper bound of body and object sizes (16 GiB).
pub const MAX_BYTES: u64 = 16 * 1024 * 1024 * 1024;
/// Upper bound of cache lifetimes (one year), in seconds.
pub const MAX_TTL_SECS: u64 = 31_536_000;
/// Upper bound of a route's retries.
pub const MAX_RETRIES: u32 = 10;
/// Upper bound of list sizes (targets, hosts, paths…), to keep one entity a small event.
pub const MAX_LIST_LEN: usize = 256;

const METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"];

/// A rejected configuration value and where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// `routes.paths[0]`, `upstreams.targets[1].url`, …
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// An entity that cannot be deleted because others refer to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} {name:?} is referenced by {} {referrer:?}", kind.as_str(), referrer_kind.as_str())]
pub struct InUseError {
    pub kind: EntityKind,
    pub name: String,
    pub referrer_kind: EntityKind,
    pub referrer: String,
}

/// Why a change or a change set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error(transparent)]
    Field(#[from] FieldError),
    #[error(transparent)]
    InUse(#[from] InUseError),
}

/// One change to validate: the new state of an entity, or its removal.
#[derive(Debug, Clone, PartialEq)]
pub enum ProposedChange {
    /// Boxed: a route spec is large, a delete small.
    Upsert(Box<EntitySpec>),
    Delete {
        kind: EntityKind,
        name: String,
    },
}

impl ProposedChange {
    pub fn upsert(spec: EntitySpec) -> Self {
        Self::Upsert(Box::new(spec))
    }

    pub fn kind(&self) -> EntityKind {
        match self {
            Self::Upsert(spec) => spec.kind(),
            Self::Delete { kind, .. } => *kind,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Upsert(spec) => spec.name(),
            Self::Delete { name, .. } => name,
        }
    }
}

/// The entities as they would be after the changes, keyed by kind and name.
pub type EntityMap = BTreeMap<(EntityKind, String), EntitySpec>;

/// The applied entities of a state as a plain map.
pub fn entity_map(state: &ConfigState) -> EntityMap {
    state.entities().map(|entity| ((entity.spec.kind(), entity.spec.name().to_owned()), entity.spec.clone())).collect()
}

/// Validates changes that will be applied together against the current state.
pub fn validate_changes(state: &ConfigState, changes: &[ProposedChange]) -> Result<(), ValidationError> {
    let mut after = entity_map(state);
    let mut seen = BTreeSet::new();
    for change in changes {
        let key = (change.kind(), change.name().to_owned());
        if !seen.insert(key.clone()) {
            let field = format!("{}.name", change.kind().plural());
            return Err(
                FieldError::new(field, format!("{:?} is changed twice in one change set", change.name())).into()
            );
        }
        match change {
            ProposedChange::Upsert(spec) => {
                after.insert(key, spec.as_ref().clone());
            }
            ProposedChange::Delete { .. } => {
                after.remove(&key);
            }
        }
    }
    for change in changes {
        match change {
            ProposedChange::Upsert(spec) => validate_spec(spec, &after)?,
            ProposedChange::Delete { kind, name } => check_unreferenced(*kind, name, &after)?,
        }
    }
    Ok(())
}

/// Validates one entity against the configuration it will live in (`after` includes it).
pub fn validate_spec(spec: &EntitySpec, after: &EntityMap) -> Result<(), FieldError> {
    let prefix = spec.kind().plural();
    check_name(&format!("{prefix}.name"), spec.name())?;
    match spec {
        EntitySpec::Upstream(upstream) => validate_upstream(upstream),
        EntitySpec::Route(route) => validate_route(route, after),
        EntitySpec::Consumer(consumer) => validate_consumer(consumer),
        EntitySpec::Policy(policy) => validate_policy(policy, after),
    }
}

/// Names are subject tokens: 1 to 64 of `[A-Za-z0-9_-]`.
pub fn check_name(field: &str, name: &str) -> Result<(), FieldError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(FieldError::new(field, format!("must be 1 to {MAX_NAME_LEN} characters")));
    }
    if !name.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-') {
        return Err(FieldError::new(field, format!("{name:?} may contain only letters, digits, '_' and '-'")));
    }
    Ok(())
}

fn check_range(field: &str, value: u64, min: u64, max: u64) -> Result<(), FieldError> {
    if value < min || value > max {
        return Err(FieldError::new(field, format!("{value} is out of range {min}..={max}")));
    }
    Ok(())
}

fn check_len<T>(field: &str, list: &[T]) -> Result<(), FieldError> {
    if list.len() > MAX_LIST_LEN {
        return Err(FieldError::new(field, format!("at most {MAX_LIST_LEN} entries")));
    }
    Ok(())
}

fn validate_upstream(upstream: &UpstreamSpec) -> Result<(), FieldError> {
    if upstream.targets.is_empty() {
        return Err(FieldError::new("upstreams.targets", "at least one target is required"));
    }
    check_len("upstreams.targets", &upstream.targets)?;
    let mut urls = BTreeSet::new();
    for (index, target) in upstream.targets.iter().enumerate() {
        let field = format!("upstreams.targets[{index}].url");
        check_target_url(&field, &target.url)?;
        if !urls.insert(target.url.trim_end_matches('/')) {
            return Err(FieldError::new(field, format!("{:?} is listed twice", target.url)));
        }
        check_range(&format!("upstreams.targets[{index}].weight"), u64::from(target.weight), 1, u64::from(MAX_WEIGHT))?;
    }
    if let Some(health_check) = &upstream.health_check {
        validate_health_check(health_check)?;
    }
    match &upstream.hash_on {
        Some(HashOn::Header(name)) if !is_header_name(name) => {
            return Err(FieldError::new("upstreams.hash_on.header", format!("{name:?} is not a header name")));
        }
        Some(HashOn::Cookie(name)) if name.is_empty() || !is_header_name(name) => {
            return Err(FieldError::new("upstreams.hash_on.cookie", format!("{name:?} is not a cookie name")));
        }
        _ => {}
    }
    if let Some(passive) = &upstream.passive_health {
        check_range(
            "upstreams.passive_health.consecutive_failures",
            u64::from(passive.consecutive_failures),
            0,
            1_000,
        )?;
        check_range("upstreams.passive_health.base_ejection_ms", passive.base_ejection_ms, 1, MAX_DURATION_MS)?;
        let max_ejection = passive.max_ejection_ms;
        check_range(
            "upstreams.passive_health.max_ejection_ms",
            max_ejection,
            passive.base_ejection_ms,
            24 * MAX_DURATION_MS,
        )?;
    }
    Ok(())
}

fn validate_health_check(health_check: &HealthCheckSpec) -> Result<(), FieldError> {
    check_path_chars("upstreams.health_check.path", &health_check.path)?;
    check_range("upstreams.health_check.interval_ms", health_check.interval_ms, 100, MAX_DURATION_MS)?;
    check_range("upstreams.health_check.timeout_ms", health_check.timeout_ms, 1, health_check.interval_ms.max(1))?;
    check_range("upstreams.health_check.healthy_threshold", u64::from(health_check.healthy_threshold), 1, 100)?;
    check_range("upstreams.health_check.unhealthy_threshold", u64::from(health_check.unhealthy_threshold), 1, 100)?;
    Ok(())
}

/// `http(s)://host[:port][/path]`, no query, fragment or credentials.
pub fn check_target_url(field: &str, url: &str) -> Result<(), FieldError> {
    let invalid = |why: &str| FieldError::new(field, format!("{url:?} {why}"));
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| invalid("must start with http:// or https://"))?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err(invalid("must not carry credentials"));
    }
    if url.contains(['?', '#', ' ']) {
        return Err(invalid("must not have a query, fragment or spaces"));
    }
    let (host, port) = split_host_port(authority).ok_or_else(|| invalid("has an invalid port"))?;
    if host.is_empty() || !host.bytes().all(|byte| byte.is_ascii_alphanumeric() || b".-_[]:".contains(&byte)) {
        return Err(invalid("has an invalid host"));
    }
    if port == Some(0) {
        return Err(invalid("has port 0"));
    }
    if !path.is_empty() {
        check_path_chars(field, path)?;
    }
    Ok(())
}

/// Splits `host:port` (with `[v6]:port`), checking the port is a number.
fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    if let Some(v6_end) = authority.strip_prefix('[').and_then(|rest| rest.find(']')) {
        let host = &authority[..v6_end + 2];
        return match &authority[v6_end + 2..] {
            "" => Some((host, None)),
            port => port.strip_prefix(':').and_then(|port| port.parse().ok()).map(|port| (host, Some(port))),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => port.parse().ok().map(|port| (host, Some(port))),
        None => Some((authority, None)),
    }
}

fn check_path_chars(field: &str, path: &str) -> Result<(), FieldError> {
    if !path.starts_with('/') {
        return Err(FieldError::new(field, format!("{path:?} must start with '/'")));
    }
    if path.len() > 1024 || !path.bytes().all(|byte| byte.is_ascii_graphic()) || path.contains(['?', '#']) {
        return Err(FieldError::new(
            field,
            format!("{path:?} must be at most 1024 visible characters without '?' or '#'"),
        ));
    }
    Ok(())
}

/// A path pattern in the form the proxy matches, normalised so that two patterns that match the
/// same requests compare equal (`/users/{id}` and `/users/{user}`).
pub fn normalise_path_pattern(field: &str, pattern: &str) -> Result<String, FieldError> {
    check_path_chars(field, pattern)?;
    if let Some(prefix) = pattern.strip_suffix('*') {
        if !prefix.ends_with('/') || prefix.contains(['*', '{', '}']) {
            return Err(FieldError::new(field, format!("{pattern:?}: a prefix pattern looks like /api/*")));
        }
        return Ok(pattern.to_owned());
    }
    if pattern.contains('*') {
        return Err(FieldError::new(field, format!("{pattern:?}: '*' is only allowed at the end, after '/'")));
    }
    let mut names = BTreeSet::new();
    let mut normalised = String::new();
    for segment in pattern.trim_start_matches('/').split('/') {
        normalised.push('/');
        if let Some(name) = segment.strip_prefix('{').and_then(|rest| rest.strip_suffix('}')) {
            if name.is_empty() || !name.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_') {
                return Err(FieldError::new(
                    field,
                    format!("{pattern:?}: parameter names are letters, digits and '_'"),
                ));
            }
            if !names.insert(name) {
                return Err(FieldError::new(field, format!("{pattern:?}: parameter {{{name}}} appears twice")));
            }
            normalised.push_str("{}");
        } else if segment.contains(['{', '}']) {
            return Err(FieldError::new(
                field,
                format!("{pattern:?}: a parameter must fill a whole segment, like /users/{{id}}"),
            ));
        } else {
            normalised.push_str(segment);
        }
    }
    Ok(normalised)
}

fn check_host(field: &str, host: &str) -> Result<(), FieldError> {
    let bare = host.strip_prefix("*.").unwrap_or(host);
    let valid = !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if valid { Ok(()) } else { Err(FieldError::new(field, format!("{host:?} is not a host name"))) }
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte))
}

/// What makes two routes indistinguishable to the proxy: same hosts, methods and headers, and a
/// path pattern in common.
fn match_key(route: &RouteSpec) -> (BTreeSet<String>, BTreeSet<String>, BTreeMap<String, String>) {
    (
        route.hosts.iter().map(|host| host.to_ascii_lowercase()).collect(),
        route.methods.iter().map(|method| method.to_ascii_uppercase()).collect(),
        route.headers.iter().map(|(name, value)| (name.to_ascii_lowercase(), value.clone())).collect(),
    )
}

fn normalised_paths(route: &RouteSpec) -> Vec<String> {
    if route.paths.is_empty() {
        return vec!["/*".to_owned()];
    }
    route
        .paths
        .iter()
        .map(|path| normalise_path_pattern("routes.paths", path).unwrap_or_else(|_| path.clone()))
        .collect()
}

fn validate_route(route: &RouteSpec, after: &EntityMap) -> Result<(), FieldError> {
    check_len("routes.hosts", &route.hosts)?;
    check_len("routes.paths", &route.paths)?;
    for (index, host) in route.hosts.iter().enumerate() {
        check_host(&format!("routes.hosts[{index}]"), host)?;
    }
    let mut own_paths = BTreeSet::new();
    for (index, path) in route.paths.iter().enumerate() {
        let field = format!("routes.paths[{index}]");
        let normalised = normalise_path_pattern(&field, path)?;
        if !own_paths.insert(normalised) {
            return Err(FieldError::new(field, format!("{path:?} matches the same requests as an earlier path")));
        }
    }
    for (index, method) in route.methods.iter().enumerate() {
        if !METHODS.contains(&method.as_str()) {
            let field = format!("routes.methods[{index}]");
            return Err(FieldError::new(field, format!("{method:?} is not one of {}", METHODS.join(", "))));
        }
    }
    for (name, value) in &route.headers {
        let field = format!("routes.headers.{name}");
        if !is_header_name(name) {
            return Err(FieldError::new(field, format!("{name:?} is not a header name")));
        }
        if value.len() > 1024 || !value.bytes().all(|byte| byte == b' ' || byte.is_ascii_graphic()) {
            return Err(FieldError::new(field, "value must be at most 1024 visible ASCII characters"));
        }
    }
    if let Some(timeout_ms) = route.timeout_ms {
        check_range("routes.timeout_ms", timeout_ms, 1, MAX_DURATION_MS)?;
    }
    if let Some(retries) = route.retries {
        check_range("routes.retries", u64::from(retries), 0, u64::from(MAX_RETRIES))?;
    }
    if let Some(max_body_bytes) = route.max_body_bytes {
        check_range("routes.max_body_bytes", max_body_bytes, 1, MAX_BYTES)?;
    }
    if let Some(cache) = &route.cache {
        let lifetimes = [
            ("routes.cache.default_ttl_s", cache.default_ttl_s),
            ("routes.cache.stale_while_revalidate_s", cache.stale_while_revalidate_s),
            ("routes.cache.stale_if_error_s", cache.stale_if_error_s),
        ];
        for (field, lifetime) in lifetimes {
            if let Some(seconds) = lifetime {
                check_range(field, seconds, 0, MAX_TTL_SECS)?;
            }
        }
        if let Some(max_object_bytes) = cache.max_object_bytes {
            check_range("routes.cache.max_object_bytes", max_object_bytes, 1, MAX_BYTES)?;
        }
    }
    if let Some(auth) = &route.auth {
        validate_route_auth(auth, after)?;
    }
    if let Some(limit) = &route.rate_limit {
        validate_rate_limit(limit)?;
    }
    if !(-10_000..=10_000).contains(&route.priority) {
        return Err(FieldError::new("routes.priority", format!("{} is out of range -10000..=10000", route.priority)));
    }
    check_name("routes.upstream", &route.upstream)?;
    if !after.contains_key(&(EntityKind::Upstream, route.upstream.clone())) {
        return Err(FieldError::new("routes.upstream", format!("no upstream named {:?}", route.upstream)));
    }
    let key = match_key(route);
    for other in after.values() {
        let EntitySpec::Route(other) = other else { continue };
        if other.name == route.name || match_key(other) != key {
            continue;
        }
        let other_paths = normalised_paths(other);
        for (index, path) in normalised_paths(route).iter().enumerate() {
            if other_paths.contains(path) {
                let field =
                    if route.paths.is_empty() { "routes.paths".to_owned() } else { format!("routes.paths[{index}]") };
                return Err(FieldError::new(
                    field,
                    format!("route {:?} already matches the same hosts, methods, headers and path", other.name),
                ));
            }
        }
    }
    Ok(())
}

fn check_consumers(field: &str, consumers: &[String], after: &EntityMap) -> Result<(), FieldError> {
    check_len(field, consumers)?;
    for (index, consumer) in consumers.iter().enumerate() {
        if !after.contains_key(&(EntityKind::Consumer, consumer.clone())) {
            return Err(FieldError::new(format!("{field}[{index}]"), format!("no consumer named {consumer:?}")));
        }
    }
    Ok(())
}

fn validate_route_auth(auth: &AuthSpec, after: &EntityMap) -> Result<(), FieldError> {
    match auth {
        AuthSpec::ApiKey { header, query, consumers } => {
            if header.as_deref().is_some_and(|name| !is_header_name(name)) {
                return Err(FieldError::new("routes.auth.header", "must be a header name"));
            }
            if query.as_deref().is_some_and(|name| name.is_empty() || name.contains(['&', '=', '#', ' '])) {
                return Err(FieldError::new("routes.auth.query", "must be a query parameter name"));
            }
            check_consumers("routes.auth.consumers", consumers, after)
        }
        AuthSpec::Jwt(jwt) => validate_jwt(jwt, after),
    }
}

fn validate_jwt(jwt: &JwtSpec, after: &EntityMap) -> Result<(), FieldError> {
    if jwt.algorithms.is_empty() {
        return Err(FieldError::new("routes.auth.algorithms", "at least one of HS256, RS256, ES256"));
    }
    for (index, algorithm) in jwt.algorithms.iter().enumerate() {
        if !matches!(algorithm.as_str(), "HS256" | "RS256" | "ES256") {
            let field = format!("routes.auth.algorithms[{index}]");
            return Err(FieldError::new(field, format!("{algorithm:?} is not one of HS256, RS256, ES256")));
        }
    }
    // The CONFIG stream is the record, replayed and copied everywhere: no shared secret goes in.
    if jwt.secret.is_some() {
        return Err(FieldError::new(
            "routes.auth.secret",
            "shared secrets are not stored in the config ledger; use RS256/ES256 with public_key_pem or a JWKS",
        ));
    }
    let asymmetric = jwt.algorithms.iter().any(|algorithm| algorithm != "HS256");
    if asymmetric && jwt.public_key_pem.is_none() && jwt.jwks_file.is_none() && jwt.jwks_url.is_none() {
        return Err(FieldError::new(
            "routes.auth.public_key_pem",
            "RS256/ES256 need public_key_pem, jwks_file or jwks_url",
        ));
    }
    if let Some(url) = &jwt.jwks_url {
        check_target_url("routes.auth.jwks_url", url.split('?').next().unwrap_or(url))?;
    }
    check_consumers("routes.auth.consumers", &jwt.consumers, after)
}

fn validate_rate_limit(limit: &RateLimitSpec) -> Result<(), FieldError> {
    check_range("routes.rate_limit.requests", limit.requests, 1, 1_000_000_000)?;
    check_range("routes.rate_limit.window_secs", limit.window_secs, 1, 86_400)?;
    if limit.by.as_deref().is_some_and(|by| !matches!(by, "consumer" | "ip" | "route")) {
        return Err(FieldError::new("routes.rate_limit.by", "must be \"consumer\", \"ip\" or \"route\""));
    }
    Ok(())
}

fn validate_consumer(consumer: &super::ConsumerSpec) -> Result<(), FieldError> {
    if consumer.metadata.len() > 64 {
        return Err(FieldError::new("consumers.metadata", "at most 64 entries"));
    }
    for (key, value) in &consumer.metadata {
        if key.is_empty() || key.len() > 64 || value.len() > 1024 {
            return Err(FieldError::new(
                format!("consumers.metadata.{key}"),
                "keys are 1 to 64 characters, values at most 1024",
            ));
        }
    }
    check_len("consumers.api_keys", &consumer.api_keys)?;
    let mut ids = BTreeSet::new();
    for (index, key) in consumer.api_keys.iter().enumerate() {
        check_name(&format!("consumers.api_keys[{index}].id"), &key.id)?;
        if !ids.insert(key.id.as_str()) {
            return Err(FieldError::new(format!("consumers.api_keys[{index}].id"), "key ids must be unique"));
        }
        let is_hash = key.sha256.len() == 64 && key.sha256.bytes().all(|byte| byte.is_ascii_hexdigit());
        if !is_hash {
            return Err(FieldError::new(
                format!("consumers.api_keys[{index}].sha256"),
                "must be a hex SHA-256; keys themselves are never stored",
            ));
        }
    }
    Ok(())
}

fn setting_u64(policy: &PolicySpec, key: &str) -> Result<Option<u64>, FieldError> {
    match policy.settings.get(key) {
        None => Ok(None),
        Some(value) => value
            .as_u64()
            .map(Some)
            .ok_or_else(|| FieldError::new(format!("policies.settings.{key}"), "must be a non-negative integer")),
    }
}

fn require_u64(policy: &PolicySpec, key: &str, min: u64, max: u64) -> Result<u64, FieldError> {
    let field = format!("policies.settings.{key}");
    let value = setting_u64(policy, key)?.ok_or_else(|| FieldError::new(&field, "is required"))?;
    check_range(&field, value, min, max)?;
    Ok(value)
}

fn check_known_settings(policy: &PolicySpec, known: &[&str]) -> Result<(), FieldError> {
    match policy.settings.keys().find(|key| !known.contains(&key.as_str())) {
        Some(unknown) => Err(FieldError::new(
            format!("policies.settings.{unknown}"),
            format!("unknown setting for a {} policy (known: {})", policy.policy_type, known.join(", ")),
        )),
        None => Ok(()),
    }
}

fn validate_policy(policy: &PolicySpec, after: &EntityMap) -> Result<(), FieldError> {
    match policy.policy_type.as_str() {
        "auth" => {
            check_known_settings(policy, &["type", "header"])?;
            match policy.settings.get("type") {
                None => {}
                Some(value) if value.as_str() == Some("api_key") => {}
                Some(_) => return Err(FieldError::new("policies.settings.type", "must be \"api_key\" (the default)")),
            }
            if policy.settings.get("header").is_some_and(|header| !header.as_str().is_some_and(is_header_name)) {
                return Err(FieldError::new("policies.settings.header", "must be a header name"));
            }
        }
        "rate_limit" => {
            check_known_settings(policy, &["requests", "window_secs", "by"])?;
            require_u64(policy, "requests", 1, 1_000_000_000)?;
            require_u64(policy, "window_secs", 1, 86_400)?;
            if policy.settings.get("by").is_some_and(|by| !matches!(by.as_str(), Some("consumer" | "ip" | "route"))) {
                return Err(FieldError::new("policies.settings.by", "must be \"consumer\", \"ip\" or \"route\""));
            }
        }
        "cache" => {
            check_known_settings(policy, &["enabled", "ttl_secs", "stale_secs"])?;
            if policy.settings.get("enabled").is_some_and(|value| !value.is_boolean()) {
                return Err(FieldError::new("policies.settings.enabled", "must be true or false"));
            }
            require_u64(policy, "ttl_secs", 1, 31_536_000)?;
            if let Some(stale) = setting_u64(policy, "stale_secs")? {
                check_range("policies.settings.stale_secs", stale, 0, 31_536_000)?;
            }
        }
        other => {
            return Err(FieldError::new("policies.type", format!("{other:?} is not one of auth, rate_limit, cache")));
        }
    }
    check_len("policies.routes", &policy.routes)?;
    for (index, route) in policy.routes.iter().enumerate() {
        if !after.contains_key(&(EntityKind::Route, route.clone())) {
            return Err(FieldError::new(format!("policies.routes[{index}]"), format!("no route named {route:?}")));
        }
    }
    Ok(())
}

/// Refuses to remove an entity that another entity still names.
fn check_unreferenced(kind: EntityKind, name: &str, after: &EntityMap) -> Result<(), InUseError> {
    for spec in after.values() {
        let refers = match (kind, spec) {
            (EntityKind::Upstream, EntitySpec::Route(route)) => route.upstream == name,
            (EntityKind::Route, EntitySpec::Policy(policy)) => policy.routes.iter().any(|route| route == name),
            // `Borrow` reads the auth spec whether the route stores it inline or boxed.
            (EntityKind::Consumer, EntitySpec::Route(route)) => {
                match route.auth.as_ref().map(Borrow::<AuthSpec>::borrow) {
                    Some(AuthSpec::ApiKey { consumers, .. }) => consumers.iter().any(|consumer| consumer == name),
                    Some(AuthSpec::Jwt(jwt)) => jwt.consumers.iter().any(|consumer| consumer == name),
                    None => false,
                }
            }
            _ => false,
        };
        if refers {
            return Err(InUseError {
                kind,
                name: name.to_owned(),
                referrer_kind: spec.kind(),
                referrer: spec.name().to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    // Specs are built from JSON so that fields added later (with defaults) need no test changes.
    fn spec(kind: EntityKind, body: serde_json::Value) -> EntitySpec {
        EntitySpec::from_body(kind, body).unwrap_or_else(|error| unreachable!("test spec: {error}"))
    }

    fn upstream(name: &str) -> EntitySpec {
        spec(EntityKind::Upstream, json!({"name": name, "targets": [{"url": "http://127.0.0.1:8000"}]}))
    }

    fn route(name: &str, paths: &[&str]) -> EntitySpec {
        spec(EntityKind::Route, json!({"name": name, "paths": paths, "upstream": "u"}))
    }

    fn route_with(name: &str, extra: serde_json::Value) -> EntitySpec {
        let mut body = json!({"name": name, "paths": ["/a"], "upstream": "u"});
        if let (Some(target), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            target.extend(extra.clone());
        }
        spec(EntityKind::Route, body)
    }

    fn field_of(result: Result<(), ValidationError>) -> String {
        match result {
            Err(ValidationError::Field(error)) => error.field,
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn a_policy_round_trips_through_the_kind_tagged_spec() {
        let policy = spec(EntityKind::Policy, json!({"name": "p", "type": "cache", "settings": {"ttl_secs": 5}}));
        let text = serde_json::to_string(&policy).unwrap_or_default();
        assert_eq!(serde_json::from_str::<EntitySpec>(&text).ok(), Some(policy), "{text}");
    }

    #[test]
    fn references_and_order_inside_a_set() {
        let state = ConfigState::default();
        let route_first = [ProposedChange::upsert(route("r", &["/a"])), ProposedChange::upsert(upstream("u"))];
        assert_eq!(validate_changes(&state, &route_first), Ok(()));
        let missing = [ProposedChange::upsert(route("r", &["/a"]))];
        assert_eq!(field_of(validate_changes(&state, &missing)), "routes.upstream");
    }

    #[test]
    fn fields_are_named() {
        let state = ConfigState::default();
        let check = |spec: EntitySpec| {
            field_of(validate_changes(&state, &[ProposedChange::upsert(upstream("u")), ProposedChange::upsert(spec)]))
        };
        assert_eq!(check(route("r", &["/a", "no-slash"])), "routes.paths[1]");
        assert_eq!(check(route("r", &["/a/*/b"])), "routes.paths[0]");
        assert_eq!(check(route("r", &["/a/{id}/{id}"])), "routes.paths[0]");
        assert_eq!(check(route("r.x", &["/a"])), "routes.name");
        assert_eq!(check(route_with("r", json!({"methods": ["FETCH"]}))), "routes.methods[0]");
        assert_eq!(check(route_with("r", json!({"timeout_ms": 0}))), "routes.timeout_ms");
        assert_eq!(check(route_with("r", json!({"hosts": ["bad host"]}))), "routes.hosts[0]");
        assert_eq!(check(route_with("r", json!({"retries": 99}))), "routes.retries");
        assert_eq!(check(route_with("r", json!({"max_body_bytes": 0}))), "routes.max_body_bytes");
        assert_eq!(
            check(route_with("r", json!({"cache": {"default_ttl_s": 999_999_999u64}}))),
            "routes.cache.default_ttl_s"
        );
        assert_eq!(
            check(route_with("r", json!({"auth": {"type": "api_key", "consumers": ["ghost"]}}))),
            "routes.auth.consumers[0]"
        );
        assert_eq!(
            check(route_with("r", json!({"auth": {"type": "api_key", "header": "x key"}}))),
            "routes.auth.header"
        );
        let hs256 = json!({"auth": {"type": "jwt", "algorithms": ["HS256"], "secret": "s3cret"}});
        assert_eq!(check(route_with("r", hs256)), "routes.auth.secret");
        let keyless = json!({"auth": {"type": "jwt", "algorithms": ["RS256"]}});
        assert_eq!(check(route_with("r", keyless)), "routes.auth.public_key_pem");
        let jwks =
            json!({"auth": {"type": "jwt", "algorithms": ["RS256"], "jwks_url": "https://id.example.com/jwks.json"}});
        assert_eq!(check(route_with("r", jwks)), "Ok(())");
        assert_eq!(
            check(route_with("r", json!({"rate_limit": {"requests": 0, "window_secs": 1}}))),
            "routes.rate_limit.requests"
        );
        assert_eq!(
            check(route_with("r", json!({"rate_limit": {"requests": 5, "window_secs": 1, "by": "moon"}}))),
            "routes.rate_limit.by"
        );
        let hashed = json!({"name": "v", "targets": [{"url": "http://a:1"}], "hash_on": {"header": "bad header"}});
        assert_eq!(check(spec(EntityKind::Upstream, hashed)), "upstreams.hash_on.header");
        let ejection = json!({"name": "v", "targets": [{"url": "http://a:1"}],
            "passive_health": {"base_ejection_ms": 5000, "max_ejection_ms": 1000}});
        assert_eq!(check(spec(EntityKind::Upstream, ejection)), "upstreams.passive_health.max_ejection_ms");
        let bad_target = json!({"name": "v", "targets": [{"url": "ftp://x"}]});
        assert_eq!(check(spec(EntityKind::Upstream, bad_target)), "upstreams.targets[0].url");
        let heavy = json!({"name": "v", "targets": [{"url": "http://x:80/base", "weight": 5000}]});
        assert_eq!(check(spec(EntityKind::Upstream, heavy)), "upstreams.targets[0].weight");
        assert_eq!(check(spec(EntityKind::Upstream, json!({"name": "v", "targets": []}))), "upstreams.targets");
        let policy = |kind: &str, settings: serde_json::Value| {
            spec(EntityKind::Policy, json!({"name": "p", "type": kind, "settings": settings}))
        };
        assert_eq!(check(policy("rate_limit", json!({"requests": 0, "window_secs": 1}))), "policies.settings.requests");
        assert_eq!(check(policy("magic", json!({}))), "policies.type");
        assert_eq!(check(policy("cache", json!({"ttl_secs": 60, "speed": 1}))), "policies.settings.speed");
        assert_eq!(check(policy("cache", json!({"ttl_secs": 60}))), "Ok(())");
        let dangling = json!({"name": "p", "type": "cache", "routes": ["nope"], "settings": {"ttl_secs": 5}});
        assert_eq!(check(spec(EntityKind::Policy, dangling)), "policies.routes[0]");
    }

    #[test]
    fn two_routes_with_the_same_match_are_refused() {
        let mut state = ConfigState::default();
        for (seq, spec) in [upstream("u"), route("a", &["/users/{id}"])].into_iter().enumerate() {
            let seq = seq as u64 + 1;
            state.apply(seq, super::super::tests_support::upsert(spec, seq));
        }
        let clash = [ProposedChange::upsert(route("b", &["/x", "/users/{user}"]))];
        assert_eq!(field_of(validate_changes(&state, &clash)), "routes.paths[1]");
        let other_method = route_with("b", json!({"paths": ["/users/{user}"], "methods": ["POST"]}));
        assert_eq!(validate_changes(&state, &[ProposedChange::upsert(other_method)]), Ok(()));
        let delete_upstream = [ProposedChange::Delete { kind: EntityKind::Upstream, name: "u".into() }];
        assert!(matches!(validate_changes(&state, &delete_upstream), Err(ValidationError::InUse(_))));
        let consumer = spec(EntityKind::Consumer, json!({"name": "c"}));
        assert_eq!(validate_changes(&state, &[ProposedChange::upsert(consumer.clone())]), Ok(()));
        // A route naming a consumer keeps it from being deleted.
        let guarded = route_with("g", json!({"paths": ["/g"], "auth": {"type": "api_key", "consumers": ["c"]}}));
        let both = [ProposedChange::upsert(consumer), ProposedChange::upsert(guarded)];
        assert_eq!(validate_changes(&state, &both), Ok(()));
        let mut with_route = state.clone();
        for (offset, change) in both.iter().enumerate() {
            if let ProposedChange::Upsert(spec) = change {
                let seq = 10 + offset as u64;
                with_route.apply(seq, super::super::tests_support::upsert(spec.as_ref().clone(), seq));
            }
        }
        let delete_consumer = [ProposedChange::Delete { kind: EntityKind::Consumer, name: "c".into() }];
        assert!(matches!(validate_changes(&with_route, &delete_consumer), Err(ValidationError::InUse(_))));
    }
}
