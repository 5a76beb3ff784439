//! Access control of a route, compiled with the routing table: who may call it (auth) and how
//! often (rate limits). Both come from the route's own `auth` / `rate_limit` and from the auth and
//! rate-limit policies attached to the route (`policy.routes`).
//!
//! [`check`] runs once per request before it is forwarded; its [`Gate`] either lets the request
//! pass (with the consumer and rate-limit decision for the event, and the `RateLimit-*` headers
//! for the response) or answers it: 401 with a challenge, 403, 429 with `Retry-After` and
//! `RateLimit-*`, or 503 when a shared limit cannot be checked and the failure mode is `closed`.
//!
//! `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (the separate fields of
//! draft-ietf-httpapi-ratelimit-headers, as most clients and gateways read them) go on every
//! response of a rate-limited route: the limit with the fewest requests left, and the seconds
//! until its whole budget is available again. A limit whose store did not answer adds none.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use stone_events::config::{ConsumerSpec, PolicySpec, RouteSpec};
use stone_events::request::{ErrorKind, RateLimitDecision};
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthOutcome, AuthRule, KeyRing};
use crate::ratelimit::{LimitBy, Limiter, RateLimit, Verdict};

/// Access rules of one route.
#[derive(Debug, Default)]
pub struct RouteAccess {
    pub auth: Option<AuthRule>,
    pub rate_limits: Vec<RateLimit>,
}

/// Access rules of every route that has any, and the API keys they check against.
#[derive(Debug, Default)]
pub struct AccessTable {
    routes: HashMap<String, Arc<RouteAccess>>,
    pub keys: KeyRing,
}

impl AccessTable {
    /// Compiles route-level rules and attached policies; errors name the entity and field.
    pub fn compile(routes: &[RouteSpec], consumers: &[ConsumerSpec], policies: &[PolicySpec]) -> Result<Self, String> {
        let mut table = Self::default();
        for consumer in consumers {
            for key in &consumer.api_keys {
                table.keys.insert(&key.sha256, &consumer.name);
            }
        }
        let mut access: HashMap<String, RouteAccess> = HashMap::new();
        for route in routes {
            let entry = access.entry(route.name.clone()).or_default();
            if let Some(spec) = route.auth.as_deref() {
                entry.auth =
                    Some(AuthRule::compile(spec).map_err(|message| format!("route {:?}: {message}", route.name))?);
            }
            if let Some(spec) = &route.rate_limit {
                let mut settings = std::collections::BTreeMap::new();
                settings.insert("requests".to_owned(), serde_json::json!(spec.requests));
                settings.insert("window_secs".to_owned(), serde_json::json!(spec.window_secs));
                if let Some(by) = &spec.by {
                    settings.insert("by".to_owned(), serde_json::json!(by));
                }
                let limit = RateLimit::from_settings(&route.name, &settings)
                    .map_err(|message| format!("route {:?}: rate_limit.{message}", route.name))?;
                entry.rate_limits.push(limit);
            }
        }
        for policy in policies {
            let fail = |message: String| format!("policy {:?}: {message}", policy.name);
            for route in &policy.routes {
                let Some(entry) = access.get_mut(route) else { continue };
                match policy.policy_type.as_str() {
                    // The route's own auth wins over an attached policy.
                    "auth" if entry.auth.is_none() => {
                        entry.auth = Some(AuthRule::from_policy_settings(&policy.settings).map_err(fail)?);
                    }
                    "rate_limit" => {
                        entry.rate_limits.push(RateLimit::from_settings(&policy.name, &policy.settings).map_err(fail)?)
                    }
                    _ => {}
                }
            }
        }
        table.routes = access
            .into_iter()
            .filter(|(_, rules)| rules.auth.is_some() || !rules.rate_limits.is_empty())
            .map(|(name, rules)| (name, Arc::new(rules)))
            .collect();
        Ok(table)
    }

    pub fn get(&self, route: &str) -> Option<&Arc<RouteAccess>> {
        if self.routes.is_empty() { None } else { self.routes.get(route) }
    }

    /// Starts the JWKS refreshers of the table's JWT rules, reading each JWKS `every`; they stop
    /// with `token`.
    pub fn spawn_refreshers(&self, token: &CancellationToken, every: std::time::Duration) {
        for rules in self.routes.values() {
            if let Some(AuthRule::Jwt { rule, .. }) = &rules.auth
                && let Some(source) = rule.jwks.clone()
            {
                tokio::spawn(crate::auth::refresh_jwks(
                    Arc::clone(&rule.keys),
                    source,
                    rule.algorithms.clone(),
                    every,
                    token.clone(),
                ));
            }
        }
    }
}

/// What to do with a request.
#[derive(Debug)]
pub enum Gate {
    Pass {
        consumer: Option<String>,
        rate_limit: Option<RateLimitDecision>,
        /// `RateLimit-*` for the response (empty when the route has no limit).
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    Answer {
        status: StatusCode,
        kind: ErrorKind,
        message: &'static str,
        headers: Vec<(HeaderName, HeaderValue)>,
        consumer: Option<String>,
        rate_limit: Option<RateLimitDecision>,
    },
}

static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Authenticates, then applies the rate limits in order; the first refusal answers.
pub async fn check(
    access: &RouteAccess,
    table: &AccessTable,
    limiter: &Limiter,
    route: &str,
    headers: &HeaderMap,
    query: Option<&str>,
    client: IpAddr,
) -> Gate {
    let mut consumer = None;
    if let Some(rule) = &access.auth {
        match rule.authenticate(headers, query, &table.keys) {
            AuthOutcome::Authenticated(name) => consumer = Some(name),
            AuthOutcome::Unauthenticated { challenge, reason } => {
                metrics::counter!("stone_proxy_auth_failures_total", "reason" => reason).increment(1);
                return Gate::Answer {
                    status: StatusCode::UNAUTHORIZED,
                    kind: ErrorKind::Unauthorized,
                    message: "valid credentials are required",
                    headers: vec![(http::header::WWW_AUTHENTICATE, crate::auth::challenge_header(&challenge))],
                    consumer: None,
                    rate_limit: None,
                };
            }
            AuthOutcome::Forbidden(name) => {
                metrics::counter!("stone_proxy_auth_failures_total", "reason" => "forbidden").increment(1);
                return Gate::Answer {
                    status: StatusCode::FORBIDDEN,
                    kind: ErrorKind::Unauthorized,
                    message: "this consumer may not use this route",
                    headers: Vec::new(),
                    consumer: Some(name),
                    rate_limit: None,
                };
            }
        }
    }
    let mut decision: Option<RateLimitDecision> = None;
    // The limit with the fewest requests left: (requests, remaining, reset).
    let mut tightest: Option<(u64, u64, std::time::Duration)> = None;
    let client_ip = client.to_string();
    for limit in &access.rate_limits {
        let subject = match limit.by {
            LimitBy::Consumer => {
                consumer.as_deref().map_or_else(|| format!("ip:{client_ip}"), |name| format!("consumer:{name}"))
            }
            LimitBy::Ip => format!("ip:{client_ip}"),
            LimitBy::Route => "route".to_owned(),
        };
        match limiter.check(limit, route, &subject).await {
            Verdict::Allowed { remaining, reset } => {
                if tightest.is_none_or(|(_, left, _)| remaining < left) {
                    tightest = Some((limit.requests, remaining, reset));
                    // A limit that could not be checked stays the recorded decision.
                    if !decision.as_ref().is_some_and(|recorded| recorded.store_unavailable) {
                        decision = Some(RateLimitDecision {
                            policy: limit.policy.clone(),
                            limited: false,
                            remaining,
                            store_unavailable: false,
                        });
                    }
                }
            }
            Verdict::FailedOpen => {
                decision = Some(RateLimitDecision {
                    policy: limit.policy.clone(),
                    limited: false,
                    remaining: 0,
                    store_unavailable: true,
                });
            }
            Verdict::FailedClosed => {
                return Gate::Answer {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    kind: ErrorKind::RateLimited,
                    message: "rate limit cannot be checked; retry later",
                    headers: vec![(http::header::RETRY_AFTER, HeaderValue::from_static("1"))],
                    consumer,
                    rate_limit: Some(RateLimitDecision {
                        policy: limit.policy.clone(),
                        limited: true,
                        remaining: 0,
                        store_unavailable: true,
                    }),
                };
            }
            Verdict::Limited { retry_after, reset } => {
                let mut headers = vec![(http::header::RETRY_AFTER, HeaderValue::from(seconds_up(retry_after)))];
                headers.extend(ratelimit_headers(limit.requests, 0, reset));
                return Gate::Answer {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    kind: ErrorKind::RateLimited,
                    message: "rate limit exceeded",
                    headers,
                    consumer,
                    rate_limit: Some(RateLimitDecision {
                        policy: limit.policy.clone(),
                        limited: true,
                        remaining: 0,
                        store_unavailable: false,
                    }),
                };
            }
        }
    }
    let headers = tightest
        .map(|(requests, remaining, reset)| ratelimit_headers(requests, remaining, reset).to_vec())
        .unwrap_or_default();
    Gate::Pass { consumer, rate_limit: decision, headers }
}

/// Whole seconds, rounded up (a client waiting the rounded-down figure would come back too early).
fn seconds_up(duration: std::time::Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

fn ratelimit_headers(requests: u64, remaining: u64, reset: std::time::Duration) -> [(HeaderName, HeaderValue); 3] {
    [
        (RATELIMIT_LIMIT.clone(), HeaderValue::from(requests)),
        (RATELIMIT_REMAINING.clone(), HeaderValue::from(remaining)),
        (RATELIMIT_RESET.clone(), HeaderValue::from(seconds_up(reset))),
    ]
}
