//! RFC 9111 shared-cache rules as pure functions: Cache-Control parsing, storability, freshness
//! lifetime, age, reuse decisions, conditional requests and invalidation. No I/O and no clock:
//! every function takes `now` in Unix seconds, so the arithmetic is property-tested.

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, StatusCode};
use stone_events::cache::{CacheBypassRule, RouteCacheSpec};

/// Values above this are treated as this (RFC 9111 §1.2.2: delta-seconds saturate at 2^31).
pub const DELTA_SECONDS_MAX: u64 = 2_147_483_648;
/// Heuristic freshness never exceeds a day, however old the Last-Modified is.
pub const HEURISTIC_MAX_S: u64 = 86_400;
/// Entries stay this long past their stale windows at least.
pub const STALE_GRACE_S: u64 = 60;
/// Objects above this pass through when the route sets no limit.
pub const DEFAULT_MAX_OBJECT_BYTES: u64 = 1024 * 1024;

/// The directives of a Cache-Control header (request or response).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub immutable: bool,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    /// `max-stale` without a value accepts any staleness.
    pub max_stale: Option<u64>,
    pub min_fresh: Option<u64>,
    pub only_if_cached: bool,
}

impl CacheControl {
    /// Parses every Cache-Control field line. Unknown directives are ignored (§5.2.3); a
    /// duplicated or invalid freshness directive makes the response stale (§4.2.1).
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut directives = Self::default();
        let mut seen_max_age = false;
        let mut seen_s_maxage = false;
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(text) = value.to_str() else { continue };
            for (name, argument) in split_directives(text) {
                let seconds = || argument.as_deref().map(parse_delta_seconds);
                match name.as_str() {
                    "max-age" => {
                        directives.max_age = if seen_max_age { Some(0) } else { Some(seconds().unwrap_or(0)) };
                        seen_max_age = true;
                    }
                    "s-maxage" => {
                        directives.s_maxage = if seen_s_maxage { Some(0) } else { Some(seconds().unwrap_or(0)) };
                        seen_s_maxage = true;
                    }
                    "no-store" => directives.no_store = true,
                    // The qualified forms (`no-cache="Set-Cookie"`) are treated like the plain
                    // ones: stricter than required, never wrong.
                    "no-cache" => directives.no_cache = true,
                    "private" => directives.private = true,
                    "public" => directives.public = true,
                    "must-revalidate" => directives.must_revalidate = true,
                    "proxy-revalidate" => directives.proxy_revalidate = true,
                    "immutable" => directives.immutable = true,
                    "stale-while-revalidate" => directives.stale_while_revalidate = seconds(),
                    "stale-if-error" => directives.stale_if_error = seconds(),
                    "max-stale" => directives.max_stale = Some(seconds().unwrap_or(DELTA_SECONDS_MAX)),
                    "min-fresh" => directives.min_fresh = seconds(),
                    "only-if-cached" => directives.only_if_cached = true,
                    _ => {}
                }
            }
        }
        directives
    }

    /// Request directives, with `Pragma: no-cache` honoured when there is no Cache-Control
    /// (RFC 9111 §5.4, for HTTP/1.0 clients).
    pub fn parse_request(headers: &HeaderMap) -> Self {
        let mut directives = Self::parse(headers);
        if !headers.contains_key(header::CACHE_CONTROL)
            && headers
                .get_all(header::PRAGMA)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .any(|value| value.split(',').any(|token| token.trim().eq_ignore_ascii_case("no-cache")))
        {
            directives.no_cache = true;
        }
        directives
    }
}

fn parse_delta_seconds(text: &str) -> u64 {
    let digits = text.trim();
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        // Invalid values are treated as 0 (stale), the conservative reading of §4.2.1.
        return 0;
    }
    digits.parse::<u64>().unwrap_or(DELTA_SECONDS_MAX).min(DELTA_SECONDS_MAX)
}

/// Splits `a, b=1, c="x, y"` into lowercase names and unquoted arguments.
fn split_directives(text: &str) -> Vec<(String, Option<String>)> {
    let mut directives = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for character in text.chars() {
        if quoted {
            if escaped {
                escaped = false;
            } else if character == '\\' {
                escaped = true;
                continue;
            } else if character == '"' {
                quoted = false;
                continue;
            }
            current.push(character);
            continue;
        }
        match character {
            '"' => quoted = true,
            ',' => directives.push(std::mem::take(&mut current)),
            _ => current.push(character),
        }
    }
    directives.push(current);
    directives
        .into_iter()
        .filter_map(|directive| {
            let directive = directive.trim();
            if directive.is_empty() {
                return None;
            }
            Some(match directive.split_once('=') {
                Some((name, argument)) => (name.trim().to_ascii_lowercase(), Some(argument.trim().to_owned())),
                None => (directive.to_ascii_lowercase(), None),
            })
        })
        .collect()
}

/// Parses an HTTP-date (IMF-fixdate and the two obsolete forms) into Unix seconds.
pub fn parse_http_date(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    let text = headers.get(name)?.to_str().ok()?;
    let time = httpdate::parse_http_date(text.trim()).ok()?;
    time.duration_since(std::time::UNIX_EPOCH).ok().map(|duration| duration.as_secs())
}

/// Formats Unix seconds as an IMF-fixdate.
pub fn format_http_date(seconds: u64) -> String {
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
}

/// Status codes a shared cache may store without explicit freshness (RFC 9110 §15.1), less
/// 206: partial content is never stored here.
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501)
}

/// Status codes this cache understands well enough to store with explicit freshness.
fn understood(status: StatusCode) -> bool {
    heuristically_cacheable(status) || matches!(status.as_u16(), 302 | 303 | 307 | 400 | 403 | 500 | 502 | 503 | 504)
}

/// A route's cache policy, compiled from its [`RouteCacheSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachePolicy {
    pub enabled: bool,
    pub key_headers: Vec<HeaderName>,
    pub query_include: Vec<String>,
    pub query_exclude: Vec<String>,
    pub key_consumer: bool,
    pub default_ttl_s: Option<u64>,
    pub heuristic: bool,
    pub max_object_bytes: u64,
    pub bypass: Vec<CacheBypassRule>,
    pub share_set_cookie: bool,
    pub stale_while_revalidate_s: u64,
    pub stale_if_error_s: u64,
}

impl CachePolicy {
    /// Compiles a spec; errors name the field.
    pub fn compile(spec: &RouteCacheSpec) -> Result<Self, String> {
        let mut key_headers = Vec::new();
        for name in &spec.key.headers {
            let header = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| format!("cache.key.headers: {name:?} is not a header name"))?;
            key_headers.push(header);
        }
        key_headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        key_headers.dedup();
        Ok(Self {
            enabled: spec.enabled,
            key_headers,
            query_include: spec.key.query_include.clone(),
            query_exclude: spec.key.query_exclude.clone(),
            key_consumer: spec.key.consumer,
            default_ttl_s: spec.default_ttl_s,
            heuristic: spec.heuristic,
            max_object_bytes: spec.max_object_bytes.unwrap_or(DEFAULT_MAX_OBJECT_BYTES),
            bypass: spec.bypass.clone(),
            share_set_cookie: spec.share_set_cookie,
            stale_while_revalidate_s: spec.stale_while_revalidate_s.unwrap_or(0),
            stale_if_error_s: spec.stale_if_error_s.unwrap_or(0),
        })
    }

    /// A policy with everything at its default (tests and benchmarks).
    pub fn with_defaults() -> Self {
        let spec = RouteCacheSpec {
            enabled: true,
            key: Default::default(),
            default_ttl_s: None,
            heuristic: false,
            max_object_bytes: None,
            bypass: Vec::new(),
            share_set_cookie: false,
            stale_while_revalidate_s: None,
            stale_if_error_s: None,
        };
        // The default spec has no header names to reject.
        Self::compile(&spec).unwrap_or(Self {
            enabled: true,
            key_headers: Vec::new(),
            query_include: Vec::new(),
            query_exclude: Vec::new(),
            key_consumer: false,
            default_ttl_s: None,
            heuristic: false,
            max_object_bytes: DEFAULT_MAX_OBJECT_BYTES,
            bypass: Vec::new(),
            share_set_cookie: false,
            stale_while_revalidate_s: 0,
            stale_if_error_s: 0,
        })
    }

    /// Whether a bypass rule matches the request.
    pub fn bypassed(&self, path: &str, query: Option<&str>, headers: &HeaderMap) -> bool {
        self.bypass.iter().any(|rule| {
            let any_condition =
                rule.header.is_some() || rule.cookie.is_some() || rule.path_prefix.is_some() || rule.query.is_some();
            any_condition
                && rule.header.as_deref().is_none_or(|name| headers.contains_key(name.trim()))
                && rule.cookie.as_deref().is_none_or(|name| has_cookie(headers, name))
                && rule.path_prefix.as_deref().is_none_or(|prefix| path.starts_with(prefix))
                && rule.query.as_deref().is_none_or(|name| {
                    query.is_some_and(|query| {
                        query.split('&').any(|pair| pair.split('=').next().is_some_and(|key| key == name))
                    })
                })
        })
    }
}

fn has_cookie(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .any(|pair| pair.trim().split('=').next().is_some_and(|key| key == name))
}

/// Why a request is not looked up in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBypass {
    /// Not GET or HEAD: never served from the cache.
    Method,
    /// `Range`: partial content is never served from or stored in the cache.
    Range,
    /// A route bypass rule matched.
    Rule,
}

/// Whether the request may be answered from (and fill) the cache at all.
pub fn request_bypass(
    policy: &CachePolicy,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Option<RequestBypass> {
    if method != Method::GET && method != Method::HEAD {
        return Some(RequestBypass::Method);
    }
    if headers.contains_key(header::RANGE) {
        return Some(RequestBypass::Range);
    }
    if policy.bypassed(path, query, headers) {
        return Some(RequestBypass::Rule);
    }
    None
}

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    Method,
    Status,
    NoStore,
    Private,
    Authorization,
    SetCookie,
    VaryStar,
    NoFreshness,
    TooLarge,
}

impl NotStorable {
    /// The `detail` of the Cache-Status header.
    pub fn detail(self) -> &'static str {
        match self {
            Self::Method => "method",
            Self::Status => "status",
            Self::NoStore => "no-store",
            Self::Private => "private",
            Self::Authorization => "authorization",
            Self::SetCookie => "set-cookie",
            Self::VaryStar => "vary-star",
            Self::NoFreshness => "no-freshness",
            Self::TooLarge => "too-large",
        }
    }
}

/// The freshness a response gets when stored, and the windows it may be served stale in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreDecision {
    pub lifetime_s: u64,
    pub stale_while_revalidate_s: u64,
    pub stale_if_error_s: u64,
    /// must-revalidate, proxy-revalidate or s-maxage: never served stale (§5.2.2.2, §5.2.2.10).
    pub must_revalidate: bool,
    /// Response no-cache: every reuse needs a successful validation (§5.2.2.4).
    pub no_cache: bool,
}

/// RFC 9111 §3: may a shared cache store this response, and with which freshness.
pub fn storable(
    policy: &CachePolicy,
    method: &Method,
    request_headers: &HeaderMap,
    status: StatusCode,
    response_headers: &HeaderMap,
    now: u64,
) -> Result<StoreDecision, NotStorable> {
    if method != Method::GET {
        return Err(NotStorable::Method);
    }
    if !understood(status) || status == StatusCode::PARTIAL_CONTENT {
        return Err(NotStorable::Status);
    }
    let request = CacheControl::parse_request(request_headers);
    let response = CacheControl::parse(response_headers);
    if request.no_store || response.no_store {
        return Err(NotStorable::NoStore);
    }
    if response.private {
        return Err(NotStorable::Private);
    }
    if request_headers.contains_key(header::AUTHORIZATION)
        && !(response.must_revalidate || response.public || response.s_maxage.is_some())
    {
        return Err(NotStorable::Authorization);
    }
    if response_headers.contains_key(header::SET_COOKIE) && !policy.share_set_cookie {
        return Err(NotStorable::SetCookie);
    }
    if vary_names(response_headers).is_err() {
        return Err(NotStorable::VaryStar);
    }
    let explicit =
        response.s_maxage.is_some() || response.max_age.is_some() || response_headers.contains_key(header::EXPIRES);
    if !explicit && !response.public && !heuristically_cacheable(status) {
        return Err(NotStorable::Status);
    }
    let lifetime_s = freshness_lifetime(policy, status, &response, response_headers, now);
    let has_validator =
        response_headers.contains_key(header::ETAG) || response_headers.contains_key(header::LAST_MODIFIED);
    let stale_while_revalidate_s = response.stale_while_revalidate.unwrap_or(policy.stale_while_revalidate_s);
    let stale_if_error_s = response.stale_if_error.unwrap_or(policy.stale_if_error_s);
    if lifetime_s == 0 && !has_validator && stale_while_revalidate_s == 0 && stale_if_error_s == 0 {
        // Nothing could ever be served from such an entry: storing it only costs memory.
        return Err(NotStorable::NoFreshness);
    }
    Ok(StoreDecision {
        lifetime_s,
        stale_while_revalidate_s,
        stale_if_error_s,
        must_revalidate: response.must_revalidate || response.proxy_revalidate || response.s_maxage.is_some(),
        no_cache: response.no_cache,
    })
}

/// RFC 9111 §4.2.1: s-maxage, then max-age, then Expires − Date; without those, the route's
/// default TTL, then (if the route allows it) the heuristic of §4.2.2; else 0.
pub fn freshness_lifetime(
    policy: &CachePolicy,
    status: StatusCode,
    response: &CacheControl,
    headers: &HeaderMap,
    response_time: u64,
) -> u64 {
    if let Some(seconds) = response.s_maxage {
        return seconds;
    }
    if let Some(seconds) = response.max_age {
        return seconds;
    }
    if headers.contains_key(header::EXPIRES) {
        // An invalid Expires (often "0" or "-1") means already expired.
        let Some(expires) = parse_http_date(headers, &header::EXPIRES) else { return 0 };
        let date = parse_http_date(headers, &header::DATE).unwrap_or(response_time);
        return expires.saturating_sub(date);
    }
    if !heuristically_cacheable(status) {
        return 0;
    }
    if let Some(seconds) = policy.default_ttl_s {
        return seconds;
    }
    if policy.heuristic
        && let Some(last_modified) = parse_http_date(headers, &header::LAST_MODIFIED)
    {
        let date = parse_http_date(headers, &header::DATE).unwrap_or(response_time);
        return (date.saturating_sub(last_modified) / 10).min(HEURISTIC_MAX_S);
    }
    0
}

/// RFC 9111 §4.2.3: the age a response had when it arrived, corrected for the time in flight.
pub fn corrected_initial_age(age_header: u64, date: Option<u64>, request_time: u64, response_time: u64) -> u64 {
    let apparent_age = date.map_or(0, |date| response_time.saturating_sub(date));
    let response_delay = response_time.saturating_sub(request_time);
    let corrected_age_value = age_header.saturating_add(response_delay);
    apparent_age.max(corrected_age_value)
}

/// RFC 9111 §4.2.3: the current age of a stored response.
pub fn current_age(corrected_initial_age: u64, response_time: u64, now: u64) -> u64 {
    corrected_initial_age.saturating_add(now.saturating_sub(response_time))
}

/// The Age header value of a response (invalid values count as absent).
pub fn age_header(headers: &HeaderMap) -> u64 {
    headers
        .get(header::AGE)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .min(DELTA_SECONDS_MAX)
}

/// The parts of a stored entry that reuse decisions need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryFreshness {
    pub corrected_initial_age: u64,
    pub response_time: u64,
    pub lifetime_s: u64,
    pub stale_while_revalidate_s: u64,
    pub stale_if_error_s: u64,
    pub must_revalidate: bool,
    pub no_cache: bool,
}

impl EntryFreshness {
    pub fn age(&self, now: u64) -> u64 {
        current_age(self.corrected_initial_age, self.response_time, now)
    }

    pub fn is_fresh(&self, now: u64) -> bool {
        self.lifetime_s > self.age(now)
    }

    /// Seconds left of freshness; negative once stale (the `ttl` of Cache-Status).
    pub fn ttl(&self, now: u64) -> i64 {
        let lifetime = i64::try_from(self.lifetime_s).unwrap_or(i64::MAX);
        let age = i64::try_from(self.age(now)).unwrap_or(i64::MAX);
        lifetime.saturating_sub(age)
    }

    /// How long the entry is worth keeping: while fresh, while it may be served stale, and a
    /// while longer: with validators so that it can be revalidated instead of fetched again,
    /// without them for clients that accept stale content (max-stale). The tiers are bounded by
    /// bytes, so what is kept longer than needed costs only what nothing fresher wants.
    pub fn keep_s(&self, has_validator: bool) -> u64 {
        let stale_window = self.stale_while_revalidate_s.max(self.stale_if_error_s);
        let revalidation_window =
            if has_validator { self.lifetime_s.clamp(STALE_GRACE_S, 86_400) } else { STALE_GRACE_S };
        self.lifetime_s.saturating_add(stale_window).saturating_add(revalidation_window).max(1)
    }

    /// Whether the entry may answer a request that failed upstream (RFC 5861 §4).
    pub fn usable_on_error(&self, request: &CacheControl, now: u64) -> bool {
        if self.is_fresh(now) {
            return true;
        }
        if self.must_revalidate {
            return false;
        }
        let staleness = self.age(now).saturating_sub(self.lifetime_s);
        let window = self.stale_if_error_s.max(request.stale_if_error.unwrap_or(0));
        window > 0 && staleness <= window
    }
}

/// What to do with a stored response for a request (RFC 9111 §4, RFC 5861).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Serve it as it is.
    Fresh,
    /// Serve it stale, as the client allows with max-stale.
    StaleAllowed,
    /// Serve it stale and refresh it in the background.
    StaleWhileRevalidate,
    /// Ask the upstream first (conditionally if the entry has validators).
    Revalidate,
}

pub fn reuse(entry: &EntryFreshness, request: &CacheControl, now: u64) -> Reuse {
    if entry.no_cache || request.no_cache {
        return Reuse::Revalidate;
    }
    let age = entry.age(now);
    if request.max_age.is_some_and(|max_age| age > max_age) {
        return Reuse::Revalidate;
    }
    if entry.lifetime_s > age {
        let remaining = entry.lifetime_s - age;
        if request.min_fresh.is_some_and(|min_fresh| remaining < min_fresh) {
            return Reuse::Revalidate;
        }
        return Reuse::Fresh;
    }
    if entry.must_revalidate {
        return Reuse::Revalidate;
    }
    let staleness = age - entry.lifetime_s;
    if request.max_stale.is_some_and(|max_stale| staleness <= max_stale) {
        return Reuse::StaleAllowed;
    }
    if entry.stale_while_revalidate_s > 0 && staleness <= entry.stale_while_revalidate_s {
        return Reuse::StaleWhileRevalidate;
    }
    Reuse::Revalidate
}

/// `Vary: *` (or an unreadable Vary): the response matches no later request (RFC 9111 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaryAny;

/// The header names a response varies on, lowercase and sorted.
pub fn vary_names(headers: &HeaderMap) -> Result<Vec<String>, VaryAny> {
    let mut names = Vec::new();
    for value in headers.get_all(header::VARY) {
        let Ok(text) = value.to_str() else { return Err(VaryAny) };
        for name in text.split(',') {
            let name = name.trim().to_ascii_lowercase();
            if name == "*" {
                return Err(VaryAny);
            }
            if !name.is_empty() {
                names.push(name);
            }
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// The secondary key of a request for the given Vary names (RFC 9111 §4.1): each header's
/// values joined, with whitespace around commas normalised so equivalent requests match.
pub fn secondary_key(names: &[String], headers: &HeaderMap) -> String {
    let mut key = String::new();
    for name in names {
        key.push_str(name);
        key.push('=');
        let values: Vec<String> = headers
            .get_all(name.as_str())
            .iter()
            .map(|value| {
                String::from_utf8_lossy(value.as_bytes()).split(',').map(str::trim).collect::<Vec<_>>().join(",")
            })
            .collect();
        key.push_str(&values.join(","));
        key.push('\n');
    }
    key
}

/// Whether a client's conditional GET/HEAD is answered by 304 given the stored validators
/// (RFC 9110 §13.1.2, §13.1.3: If-None-Match wins over If-Modified-Since).
pub fn not_modified(request_headers: &HeaderMap, stored_headers: &HeaderMap) -> bool {
    // Most requests carry neither condition.
    if !request_headers.contains_key(header::IF_NONE_MATCH) && !request_headers.contains_key(header::IF_MODIFIED_SINCE)
    {
        return false;
    }
    let if_none_match: Vec<&str> = request_headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|tag| !tag.is_empty())
        .collect();
    if !if_none_match.is_empty() {
        let Some(stored) = stored_headers.get(header::ETAG).and_then(|value| value.to_str().ok()) else {
            return if_none_match.contains(&"*");
        };
        return if_none_match.iter().any(|tag| *tag == "*" || weak_match(tag, stored));
    }
    // The stored date is parsed only for a request that asks (most do not).
    let Some(since) = parse_http_date(request_headers, &header::IF_MODIFIED_SINCE) else { return false };
    parse_http_date(stored_headers, &header::LAST_MODIFIED).is_some_and(|last_modified| last_modified <= since)
}

/// Weak comparison of entity tags (RFC 9110 §8.8.3.2).
fn weak_match(a: &str, b: &str) -> bool {
    let opaque = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    opaque(a) == opaque(b)
}

/// Whether a response to an unsafe method invalidates stored responses (RFC 9111 §4.4).
pub fn invalidates(method: &Method, status: StatusCode) -> bool {
    let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE);
    !safe && (status.is_success() || status.is_redirection())
}

/// Headers a 304 must not overwrite in the stored response (RFC 9111 §3.2).
pub fn keeps_stored_value(name: &HeaderName) -> bool {
    matches!(
        *name,
        header::CONTENT_LENGTH | header::CONTENT_ENCODING | header::TRANSFER_ENCODING | header::CONTENT_RANGE
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn parses_directives_with_quotes_case_and_duplicates() {
        let parsed = CacheControl::parse(&headers(&[
            ("cache-control", "Public, MAX-AGE=60, no-cache=\"Set-Cookie, X\""),
            ("cache-control", "stale-while-revalidate=30, max-stale"),
        ]));
        assert!(parsed.public && parsed.no_cache);
        assert_eq!(parsed.max_age, Some(60));
        assert_eq!(parsed.stale_while_revalidate, Some(30));
        assert_eq!(parsed.max_stale, Some(DELTA_SECONDS_MAX));
        let duplicated = CacheControl::parse(&headers(&[("cache-control", "max-age=60, max-age=120")]));
        assert_eq!(duplicated.max_age, Some(0));
        let invalid = CacheControl::parse(&headers(&[("cache-control", "max-age=abc")]));
        assert_eq!(invalid.max_age, Some(0));
        let huge = CacheControl::parse(&headers(&[("cache-control", "max-age=99999999999999999999999")]));
        assert_eq!(huge.max_age, Some(DELTA_SECONDS_MAX));
    }

    #[test]
    fn pragma_no_cache_only_without_cache_control() {
        assert!(CacheControl::parse_request(&headers(&[("pragma", "no-cache")])).no_cache);
        assert!(
            !CacheControl::parse_request(&headers(&[("pragma", "no-cache"), ("cache-control", "max-age=5")])).no_cache
        );
    }

    #[test]
    fn storability_follows_the_rfc() {
        let policy = CachePolicy::with_defaults();
        let get = Method::GET;
        let none = HeaderMap::new();
        let ok = |response: &[(&str, &str)]| storable(&policy, &get, &none, StatusCode::OK, &headers(response), 1_000);
        assert!(ok(&[("cache-control", "max-age=60")]).is_ok());
        assert_eq!(ok(&[("cache-control", "max-age=60, private")]), Err(NotStorable::Private));
        assert_eq!(ok(&[("cache-control", "no-store, max-age=60")]), Err(NotStorable::NoStore));
        assert_eq!(ok(&[("cache-control", "max-age=60"), ("vary", "Accept, *")]), Err(NotStorable::VaryStar));
        assert_eq!(ok(&[("cache-control", "max-age=60"), ("set-cookie", "a=b")]), Err(NotStorable::SetCookie));
        assert_eq!(ok(&[]), Err(NotStorable::NoFreshness));
        // A validator alone makes it worth storing for revalidation.
        assert_eq!(ok(&[("etag", "\"x\"")]).map(|decision| decision.lifetime_s), Ok(0));
        let authorized = headers(&[("authorization", "Bearer x")]);
        let with_auth =
            |response: &[(&str, &str)]| storable(&policy, &get, &authorized, StatusCode::OK, &headers(response), 0);
        assert_eq!(with_auth(&[("cache-control", "max-age=60")]), Err(NotStorable::Authorization));
        assert!(with_auth(&[("cache-control", "max-age=60, public")]).is_ok());
        assert!(with_auth(&[("cache-control", "s-maxage=60")]).is_ok());
        assert!(with_auth(&[("cache-control", "max-age=60, must-revalidate")]).is_ok());
        let post =
            storable(&policy, &Method::POST, &none, StatusCode::OK, &headers(&[("cache-control", "max-age=60")]), 0);
        assert_eq!(post, Err(NotStorable::Method));
        let partial = storable(
            &policy,
            &get,
            &none,
            StatusCode::PARTIAL_CONTENT,
            &headers(&[("cache-control", "max-age=60")]),
            0,
        );
        assert_eq!(partial, Err(NotStorable::Status));
        // 302 only with explicit freshness.
        let found =
            |response: &[(&str, &str)]| storable(&policy, &get, &none, StatusCode::FOUND, &headers(response), 0);
        assert_eq!(found(&[("etag", "\"x\"")]), Err(NotStorable::Status));
        assert!(found(&[("cache-control", "max-age=5")]).is_ok());
        let request_no_store = headers(&[("cache-control", "no-store")]);
        let refused =
            storable(&policy, &get, &request_no_store, StatusCode::OK, &headers(&[("cache-control", "max-age=5")]), 0);
        assert_eq!(refused, Err(NotStorable::NoStore));
    }

    #[test]
    fn lifetime_precedence_and_heuristics() {
        let mut policy = CachePolicy::with_defaults();
        let cc = |text: &str| CacheControl::parse(&headers(&[("cache-control", text)]));
        let date = "Sat, 21 Nov 2026 10:00:00 GMT";
        let expires = headers(&[("date", date), ("expires", "Sat, 21 Nov 2026 10:05:00 GMT")]);
        assert_eq!(freshness_lifetime(&policy, StatusCode::OK, &cc("s-maxage=7, max-age=3"), &expires, 0), 7);
        assert_eq!(freshness_lifetime(&policy, StatusCode::OK, &cc("max-age=3"), &expires, 0), 3);
        assert_eq!(freshness_lifetime(&policy, StatusCode::OK, &CacheControl::default(), &expires, 0), 300);
        let bad_expires = headers(&[("expires", "0")]);
        assert_eq!(freshness_lifetime(&policy, StatusCode::OK, &CacheControl::default(), &bad_expires, 0), 0);
        let last_modified = headers(&[("date", date), ("last-modified", "Sat, 21 Nov 2026 09:00:00 GMT")]);
        assert_eq!(freshness_lifetime(&policy, StatusCode::OK, &CacheControl::default(), &last_modified, 0), 0);
        policy.heuristic = true;
        assert_eq!(freshness_lifetime(&policy, StatusCode::OK, &CacheControl::default(), &last_modified, 0), 360);
        assert_eq!(freshness_lifetime(&policy, StatusCode::FOUND, &CacheControl::default(), &last_modified, 0), 0);
        policy.default_ttl_s = Some(42);
        assert_eq!(freshness_lifetime(&policy, StatusCode::OK, &CacheControl::default(), &last_modified, 0), 42);
    }

    #[test]
    fn reuse_honours_request_and_response_directives() {
        let entry = EntryFreshness {
            corrected_initial_age: 0,
            response_time: 100,
            lifetime_s: 60,
            stale_while_revalidate_s: 30,
            stale_if_error_s: 300,
            must_revalidate: false,
            no_cache: false,
        };
        let none = CacheControl::default();
        assert_eq!(reuse(&entry, &none, 150), Reuse::Fresh);
        assert_eq!(reuse(&entry, &none, 170), Reuse::StaleWhileRevalidate);
        assert_eq!(reuse(&entry, &none, 200), Reuse::Revalidate);
        let max_stale = CacheControl { max_stale: Some(100), ..Default::default() };
        assert_eq!(reuse(&entry, &max_stale, 200), Reuse::StaleAllowed);
        let max_age = CacheControl { max_age: Some(10), ..Default::default() };
        assert_eq!(reuse(&entry, &max_age, 120), Reuse::Revalidate);
        let min_fresh = CacheControl { min_fresh: Some(30), ..Default::default() };
        assert_eq!(reuse(&entry, &min_fresh, 140), Reuse::Revalidate);
        assert_eq!(reuse(&entry, &CacheControl { no_cache: true, ..Default::default() }, 101), Reuse::Revalidate);
        let strict = EntryFreshness { must_revalidate: true, ..entry };
        assert_eq!(reuse(&strict, &max_stale, 170), Reuse::Revalidate);
        assert!(!strict.usable_on_error(&none, 170));
        assert!(entry.usable_on_error(&none, 400));
        assert!(!entry.usable_on_error(&none, 500));
    }

    #[test]
    fn conditional_requests() {
        let stored = headers(&[("etag", "W/\"v1\""), ("last-modified", "Sat, 21 Nov 2026 09:00:00 GMT")]);
        assert!(not_modified(&headers(&[("if-none-match", "\"v0\", \"v1\"")]), &stored));
        assert!(!not_modified(&headers(&[("if-none-match", "\"v2\"")]), &stored));
        assert!(not_modified(&headers(&[("if-none-match", "*")]), &stored));
        assert!(not_modified(&headers(&[("if-modified-since", "Sat, 21 Nov 2026 09:00:00 GMT")]), &stored));
        assert!(!not_modified(&headers(&[("if-modified-since", "Sat, 21 Nov 2026 08:59:59 GMT")]), &stored));
        // If-None-Match wins over If-Modified-Since.
        let both = headers(&[("if-none-match", "\"v2\""), ("if-modified-since", "Sat, 21 Nov 2026 09:00:00 GMT")]);
        assert!(!not_modified(&both, &stored));
    }

    #[test]
    fn vary_and_secondary_keys() {
        assert_eq!(
            vary_names(&headers(&[("vary", "Accept-Encoding, accept")])),
            Ok(vec!["accept".into(), "accept-encoding".into()])
        );
        assert!(vary_names(&headers(&[("vary", "*")])).is_err());
        let names = vec!["accept-encoding".to_owned()];
        let a = secondary_key(&names, &headers(&[("accept-encoding", "gzip,  br")]));
        let b = secondary_key(&names, &headers(&[("accept-encoding", "gzip, br")]));
        let c = secondary_key(&names, &headers(&[("accept-encoding", "br")]));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn only_unsafe_successes_invalidate() {
        assert!(invalidates(&Method::POST, StatusCode::CREATED));
        assert!(invalidates(&Method::DELETE, StatusCode::MOVED_PERMANENTLY));
        assert!(!invalidates(&Method::POST, StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!invalidates(&Method::GET, StatusCode::OK));
    }

    proptest! {
        #[test]
        fn age_never_decreases_and_never_undercounts(
            age_header in 0u64..1_000_000,
            date_offset in 0u64..1_000_000,
            request_time in 0u64..2_000_000_000,
            delay in 0u64..10_000,
            resident in 0u64..10_000_000,
            later in 0u64..10_000_000,
        ) {
            let response_time = request_time + delay;
            let date = response_time.saturating_sub(date_offset);
            let initial = corrected_initial_age(age_header, Some(date), request_time, response_time);
            prop_assert!(initial >= age_header);
            prop_assert!(initial >= response_time - date);
            let now = response_time + resident;
            let age = current_age(initial, response_time, now);
            prop_assert_eq!(age, initial + resident);
            prop_assert!(current_age(initial, response_time, now + later) >= age);
        }

        #[test]
        fn freshness_is_lifetime_greater_than_age(
            initial in 0u64..100_000,
            lifetime in 0u64..100_000,
            swr in 0u64..1_000,
            elapsed in 0u64..200_000,
        ) {
            let entry = EntryFreshness {
                corrected_initial_age: initial, response_time: 1_000, lifetime_s: lifetime,
                stale_while_revalidate_s: swr, stale_if_error_s: 0, must_revalidate: false, no_cache: false,
            };
            let now = 1_000 + elapsed;
            let fresh = lifetime > initial + elapsed;
            prop_assert_eq!(entry.is_fresh(now), fresh);
            prop_assert_eq!(entry.ttl(now) > 0, fresh);
            let decision = reuse(&entry, &CacheControl::default(), now);
            prop_assert_eq!(decision == Reuse::Fresh, fresh);
            if !fresh {
                let staleness = initial + elapsed - lifetime;
                prop_assert_eq!(decision == Reuse::StaleWhileRevalidate, swr > 0 && staleness <= swr);
            }
            // Keeping an entry covers at least its freshness and stale window.
            prop_assert!(entry.keep_s(false) >= lifetime.max(1));
            prop_assert!(entry.keep_s(false) >= lifetime + swr);
        }

        #[test]
        fn directive_parsing_never_panics(text in "[ -~]{0,80}") {
            let mut map = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(&text) {
                map.insert(header::CACHE_CONTROL, value);
            }
            let parsed = CacheControl::parse(&map);
            prop_assert!(parsed.max_age.is_none_or(|age| age <= DELTA_SECONDS_MAX));
        }
    }
}
