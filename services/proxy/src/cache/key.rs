//! Cache keys: `host/path?sorted-query`, then the route's keyed headers and consumer.
//!
//! The readable part comes first so that purges by key and by prefix are plain string
//! operations, and variants (other key parts, Vary) extend it after a separator byte that cannot
//! occur in a URL. Only the Host the request was routed by takes part: X-Forwarded-Host and
//! friends are client-controlled, so keying or trusting them would let one client poison the
//! entry every other client gets.

use http::HeaderMap;

use super::policy::CachePolicy;

/// Starts the route-specific key parts (headers, consumer).
pub const EXTRA_SEPARATOR: char = '\u{1e}';
/// Starts a Vary variant's secondary key.
pub const VARIANT_SEPARATOR: char = '\u{1f}';

/// The primary cache key of a request.
pub fn primary_key(
    policy: &CachePolicy,
    host: &str,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    consumer: Option<&str>,
) -> String {
    let host = host.trim().to_ascii_lowercase();
    let mut key = String::with_capacity(host.len() + path.len() + query.map_or(0, str::len) + 2);
    key.push_str(&host);
    key.push_str(path);
    if let Some(query) = query {
        let normalized = normalize_query(policy, query);
        if !normalized.is_empty() {
            key.push('?');
            key.push_str(&normalized);
        }
    }
    if !policy.key_headers.is_empty() || policy.key_consumer {
        key.push(EXTRA_SEPARATOR);
        for name in &policy.key_headers {
            key.push_str(name.as_str());
            key.push('=');
            let values: Vec<String> = headers
                .get_all(name)
                .iter()
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
                .collect();
            key.push_str(&values.join(","));
            key.push('\n');
        }
        if policy.key_consumer {
            key.push_str("consumer=");
            key.push_str(consumer.unwrap_or("-"));
        }
    }
    key
}

/// The storage key of one Vary variant of a primary key.
pub fn variant_key(primary: &str, generation: u64, secondary: &str) -> String {
    format!("{primary}{VARIANT_SEPARATOR}{generation:x}{VARIANT_SEPARATOR}{secondary}")
}

/// Whether `stored` is `key` itself or one of its variants (other key parts, Vary).
pub fn belongs_to(stored: &str, key: &str) -> bool {
    match stored.strip_prefix(key) {
        Some("") => true,
        Some(rest) => rest.starts_with([EXTRA_SEPARATOR, VARIANT_SEPARATOR]),
        None => false,
    }
}

/// Keeps the parameters the route keys on, in a stable order, so `?b=2&a=1` and `?a=1&b=2` are
/// one object.
fn normalize_query(policy: &CachePolicy, query: &str) -> String {
    let mut pairs: Vec<(&str, &str)> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .filter(|(name, _)| policy.query_include.is_empty() || policy.query_include.iter().any(|kept| kept == name))
        .filter(|(name, _)| !policy.query_exclude.iter().any(|dropped| dropped == name))
        .collect();
    pairs.sort();
    pairs.iter().map(|(name, value)| format!("{name}={value}")).collect::<Vec<_>>().join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn query_order_and_excluded_parameters_do_not_split_objects() {
        let mut policy = CachePolicy::with_defaults();
        policy.query_exclude = vec!["utm_source".into()];
        let headers = HeaderMap::new();
        let a = primary_key(&policy, "API.example.com", "/x", Some("b=2&a=1&utm_source=mail"), &headers, None);
        let b = primary_key(&policy, "api.example.com", "/x", Some("a=1&b=2"), &headers, None);
        assert_eq!(a, b);
        assert_eq!(a, "api.example.com/x?a=1&b=2");
        policy.query_include = vec!["a".into()];
        assert_eq!(primary_key(&policy, "h", "/x", Some("b=2&a=1"), &headers, None), "h/x?a=1");
    }

    #[test]
    fn keyed_headers_and_consumer_extend_the_key_but_unkeyed_headers_never_do() {
        let mut policy = CachePolicy::with_defaults();
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        headers.insert("accept-language", HeaderValue::from_static("de"));
        assert_eq!(primary_key(&policy, "h", "/", None, &headers, Some("alice")), "h/");
        policy.key_headers = vec![http::header::ACCEPT_LANGUAGE];
        policy.key_consumer = true;
        let key = primary_key(&policy, "h", "/", None, &headers, Some("alice"));
        assert!(belongs_to(&key, "h/"));
        assert!(key.contains("accept-language=de") && key.ends_with("consumer=alice"));
        assert!(!key.contains("evil"));
        assert!(!belongs_to("h/abc", "h/a"));
        assert!(belongs_to(&variant_key("h/a", 7, "accept=x"), "h/a"));
    }
}
