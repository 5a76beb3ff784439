//! The routing table: which route a request belongs to, and which upstream serves it.
//!
//! Matching order, most specific first: host (exact before wildcard-any), then path kind (exact,
//! then template, then prefix; longer patterns first within a kind), then the route's `priority`,
//! then its name so the order is total and stable. The table is immutable; a config change builds
//! a new one and swaps it in.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use http::{HeaderMap, Method};
use stone_events::config::{RouteSpec, UpstreamSpec};

use crate::access::AccessTable;
use crate::balancer::{HealthRegistry, Upstream};

/// A path pattern of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// `/health`
    Exact(Arc<str>),
    /// `/users/{id}/orders`: segments, `None` where a parameter stands.
    Template { pattern: Arc<str>, segments: Vec<Option<String>> },
    /// `/static/*` (`prefix` without the `*`, with a trailing `/`), or `/*` for everything;
    /// `template` is the pattern as written, kept for every request's event.
    Prefix { prefix: String, template: Arc<str> },
}

impl PathPattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if !pattern.starts_with('/') {
            return Err(format!("path {pattern:?} must start with '/'"));
        }
        if let Some(prefix) = pattern.strip_suffix('*') {
            if !prefix.ends_with('/') || prefix.contains(['*', '{', '}']) {
                return Err(format!("path {pattern:?}: a prefix pattern looks like /api/*"));
            }
            return Ok(Self::Prefix { prefix: prefix.to_owned(), template: Arc::from(pattern) });
        }
        if pattern.contains('*') {
            return Err(format!("path {pattern:?}: '*' is only allowed at the end, after '/'"));
        }
        if !pattern.contains('{') {
            return Ok(Self::Exact(Arc::from(pattern)));
        }
        let mut segments = Vec::new();
        for segment in pattern.trim_start_matches('/').split('/') {
            if segment.starts_with('{') && segment.ends_with('}') && segment.len() > 2 {
                segments.push(None);
            } else if segment.contains(['{', '}']) {
                return Err(format!("path {pattern:?}: a parameter must fill a whole segment, like /users/{{id}}"));
            } else {
                segments.push(Some(segment.to_owned()));
            }
        }
        Ok(Self::Template { pattern: Arc::from(pattern), segments })
    }

    fn kind_rank(&self) -> u8 {
        match self {
            Self::Exact(_) => 0,
            Self::Template { .. } => 1,
            Self::Prefix { .. } => 2,
        }
    }

    fn length(&self) -> usize {
        match self {
            Self::Exact(path) => path.len(),
            Self::Prefix { prefix, .. } => prefix.len(),
            Self::Template { pattern, .. } => pattern.len(),
        }
    }

    /// The template recorded in events: the pattern itself, never the raw path; shared, so a
    /// request's event takes it without a copy.
    pub fn template(&self) -> &Arc<str> {
        match self {
            Self::Exact(path) => path,
            Self::Template { pattern, .. } => pattern,
            Self::Prefix { template, .. } => template,
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(exact) => path == &**exact,
            Self::Prefix { prefix, .. } => path.starts_with(prefix.as_str()) || path == prefix.trim_end_matches('/'),
            Self::Template { segments, .. } => {
                let mut parts = path.trim_start_matches('/').split('/');
                let all_match = segments.iter().all(|segment| match (segment, parts.next()) {
                    (Some(literal), Some(part)) => literal == part,
                    (None, Some(part)) => !part.is_empty(),
                    (_, None) => false,
                });
                all_match && parts.next().is_none()
            }
        }
    }

    /// What remains of `path` after the matched prefix (for `strip_prefix`), always starting with `/`.
    pub fn strip(&self, path: &str) -> String {
        let rest = match self {
            Self::Prefix { prefix, .. } => path.strip_prefix(prefix.trim_end_matches('/')).unwrap_or(path),
            Self::Exact(exact) => path.strip_prefix(&**exact).unwrap_or(path),
            Self::Template { .. } => path,
        };
        if rest.starts_with('/') { rest.to_owned() } else { format!("/{rest}") }
    }
}

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    hosts: Vec<String>,
    methods: Vec<Method>,
    headers: Vec<(http::HeaderName, String)>,
    pub upstream: Arc<Upstream>,
    pub strip_prefix: bool,
    pub timeout: Option<std::time::Duration>,
    priority: i32,
    /// Extra attempts allowed where a retry is safe.
    pub retries: u32,
    /// Body size bound of this route, if it lowers the worker's.
    pub max_body_bytes: Option<u64>,
    /// The route's response cache policy; `None` when the route does not cache.
    pub cache: Option<Arc<crate::cache::CachePolicy>>,
    /// Request metric handles of the route.
    pub metrics: Arc<crate::body::RouteMetrics>,
}

/// One (route, path pattern) pair; a route with several paths has several entries.
#[derive(Debug)]
struct Entry {
    route: Arc<Route>,
    pattern: PathPattern,
}

/// The outcome of matching a request.
#[derive(Debug, Clone)]
pub struct RouteMatch<'a> {
    pub route: &'a Arc<Route>,
    pub pattern: &'a PathPattern,
}

/// The immutable routing table.
#[derive(Debug, Default)]
pub struct RouteTable {
    entries: Vec<Entry>,
    upstreams: HashMap<String, Arc<Upstream>>,
    access: AccessTable,
}

impl RouteTable {
    /// Compiles specs into a table; errors name the entity and field.
    pub fn build(routes: &[RouteSpec], upstreams: &[UpstreamSpec], health: &HealthRegistry) -> Result<Self, String> {
        let mut compiled_upstreams = HashMap::new();
        for spec in upstreams {
            let upstream =
                Upstream::new(spec, health).map_err(|message| format!("upstream {:?}: {message}", spec.name))?;
            if compiled_upstreams.insert(spec.name.clone(), Arc::new(upstream)).is_some() {
                return Err(format!("upstream {:?}: defined twice", spec.name));
            }
        }
        let mut entries = Vec::new();
        let mut seen = BTreeMap::new();
        for spec in routes {
            let route = Arc::new(compile_route(spec, &compiled_upstreams)?);
            if seen.insert(spec.name.clone(), ()).is_some() {
                return Err(format!("route {:?}: defined twice", spec.name));
            }
            let paths = if spec.paths.is_empty() { vec!["/*".to_owned()] } else { spec.paths.clone() };
            for path in paths {
                let pattern =
                    PathPattern::parse(&path).map_err(|message| format!("route {:?}: paths: {message}", spec.name))?;
                entries.push(Entry { route: Arc::clone(&route), pattern });
            }
        }
        entries.sort_by(|a, b| {
            let host_rank = |entry: &Entry| u8::from(entry.route.hosts.is_empty());
            host_rank(a)
                .cmp(&host_rank(b))
                .then(a.pattern.kind_rank().cmp(&b.pattern.kind_rank()))
                .then(b.pattern.length().cmp(&a.pattern.length()))
                .then(b.route.priority.cmp(&a.route.priority))
                .then(a.route.name.cmp(&b.route.name))
        });
        Ok(Self { entries, upstreams: compiled_upstreams, access: AccessTable::default() })
    }

    /// The first entry, in specificity order, that matches the request.
    pub fn find(&self, host: &str, path: &str, method: &Method, headers: &HeaderMap) -> Option<RouteMatch<'_>> {
        let host = host_without_port(host);
        self.entries
            .iter()
            .find(|entry| {
                let route = &entry.route;
                (route.hosts.is_empty() || route.hosts.iter().any(|candidate| candidate.eq_ignore_ascii_case(host)))
                    && (route.methods.is_empty() || route.methods.contains(method))
                    && route
                        .headers
                        .iter()
                        .all(|(name, value)| headers.get(name).is_some_and(|actual| actual == value.as_str()))
                    && entry.pattern.matches(path)
            })
            .map(|entry| RouteMatch { route: &entry.route, pattern: &entry.pattern })
    }

    pub fn upstreams(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.upstreams.values()
    }

    /// Adds the routes' access rules (auth, rate limits) from route specs, consumers and policies.
    pub fn with_access(
        mut self,
        routes: &[RouteSpec],
        consumers: &[stone_events::config::ConsumerSpec],
        policies: &[stone_events::config::PolicySpec],
    ) -> Result<Self, String> {
        self.access = AccessTable::compile(routes, consumers, policies)?;
        Ok(self)
    }

    pub fn access(&self) -> &AccessTable {
        &self.access
    }

    /// Every (upstream, target URL) of the table, to prune health state of removed targets.
    pub fn target_keys(&self) -> Vec<(String, String)> {
        self.upstreams
            .values()
            .flat_map(|upstream| upstream.targets.iter().map(|target| (upstream.name.clone(), target.url.clone())))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn compile_route(spec: &RouteSpec, upstreams: &HashMap<String, Arc<Upstream>>) -> Result<Route, String> {
    let fail = |field: &str, message: String| format!("route {:?}: {field}: {message}", spec.name);
    if spec.name.is_empty()
        || !spec.name.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
    {
        return Err(fail("name", "use letters, digits, '_' and '-'".to_owned()));
    }
    let upstream = upstreams
        .get(&spec.upstream)
        .cloned()
        .ok_or_else(|| fail("upstream", format!("no upstream named {:?}", spec.upstream)))?;
    let methods = spec
        .methods
        .iter()
        .map(|method| {
            Method::from_bytes(method.to_ascii_uppercase().as_bytes())
                .map_err(|_| fail("methods", format!("{method:?} is not a method")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let headers = spec
        .headers
        .iter()
        .map(|(name, value)| {
            http::HeaderName::from_bytes(name.as_bytes())
                .map(|name| (name, value.clone()))
                .map_err(|_| fail("headers", format!("{name:?} is not a header name")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Route {
        metrics: Arc::new(crate::body::RouteMetrics::new(&spec.name)),
        name: spec.name.clone(),
        hosts: spec.hosts.iter().map(|host| host.to_ascii_lowercase()).collect(),
        methods,
        headers,
        upstream,
        strip_prefix: spec.strip_prefix,
        timeout: spec.timeout_ms.map(std::time::Duration::from_millis),
        priority: spec.priority,
        retries: spec.retries.unwrap_or(1),
        max_body_bytes: spec.max_body_bytes,
        cache: match spec.cache.as_deref() {
            Some(cache) if cache.enabled => {
                Some(Arc::new(crate::cache::CachePolicy::compile(cache).map_err(|message| fail("cache", message))?))
            }
            _ => None,
        },
    })
}

fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(address, _)| address.trim_start_matches('['));
    }
    host.rsplit_once(':')
        .map_or(host, |(name, port)| if port.bytes().all(|b| b.is_ascii_digit()) { name } else { host })
}

#[cfg(test)]
mod tests {
    use stone_events::config::TargetSpec;

    use super::*;

    fn upstream(name: &str) -> UpstreamSpec {
        UpstreamSpec {
            name: name.into(),
            algorithm: Default::default(),
            targets: vec![TargetSpec { url: "http://127.0.0.1:1".into(), weight: 1 }],
            health_check: None,
            hash_on: None,
            passive_health: None,
        }
    }

    fn route(name: &str, hosts: &[&str], paths: &[&str]) -> RouteSpec {
        RouteSpec {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
            methods: vec![],
            headers: Default::default(),
            upstream: "u".into(),
            strip_prefix: false,
            timeout_ms: None,
            priority: 0,
            retries: None,
            max_body_bytes: None,
            auth: None,
            rate_limit: None,
            cache: None,
        }
    }

    fn find<'a>(table: &'a RouteTable, host: &str, path: &str) -> Option<(&'a str, String)> {
        table
            .find(host, path, &Method::GET, &HeaderMap::new())
            .map(|found| (found.route.name.as_str(), found.pattern.template().to_string()))
    }

    #[test]
    fn most_specific_route_wins() -> Result<(), String> {
        let table = RouteTable::build(
            &[
                route("catch-all", &[], &[]),
                route("api", &[], &["/api/*"]),
                route("user", &[], &["/api/users/{id}"]),
                route("health", &[], &["/api/health"]),
                route("host", &["example.com"], &["/*"]),
            ],
            &[upstream("u")],
            &HealthRegistry::default(),
        )?;
        assert_eq!(find(&table, "other", "/api/health"), Some(("health", "/api/health".into())));
        assert_eq!(find(&table, "other", "/api/users/7"), Some(("user", "/api/users/{id}".into())));
        assert_eq!(find(&table, "other", "/api/users/7/x"), Some(("api", "/api/*".into())));
        assert_eq!(find(&table, "other", "/api"), Some(("api", "/api/*".into())));
        assert_eq!(find(&table, "other", "/elsewhere"), Some(("catch-all", "/*".into())));
        assert_eq!(find(&table, "EXAMPLE.com:8080", "/api/health"), Some(("host", "/*".into())));
        Ok(())
    }

    #[test]
    fn bad_specs_are_rejected_with_the_field() {
        let missing = RouteTable::build(&[route("r", &[], &[])], &[], &HealthRegistry::default()).err();
        assert!(missing.as_deref().is_some_and(|m| m.contains("upstream")), "{missing:?}");
        let bad_path =
            RouteTable::build(&[route("r", &[], &["/a*b"])], &[upstream("u")], &HealthRegistry::default()).err();
        assert!(bad_path.as_deref().is_some_and(|m| m.contains("paths")), "{bad_path:?}");
        let bad_name = RouteTable::build(&[route("a.b", &[], &[])], &[upstream("u")], &HealthRegistry::default()).err();
        assert!(bad_name.as_deref().is_some_and(|m| m.contains("name")), "{bad_name:?}");
    }

    #[test]
    fn strip_prefix_keeps_a_leading_slash() -> Result<(), String> {
        let pattern = PathPattern::parse("/api/*")?;
        assert_eq!(pattern.strip("/api/users"), "/users");
        assert_eq!(pattern.strip("/api"), "/");
        Ok(())
    }
}
