//! RFC 9111 behaviour of the response cache through real sockets: client → front (the cache) →
//! scriptable upstream, counting upstream hits. One test per directive or rule.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod cache_support;

use cache_support::*;
use stone_events::request::CacheStatus;

#[tokio::test]
async fn max_age_is_served_fresh_with_age_and_cache_status() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|_, hit| (200, cc("max-age=60"), format!("v{hit}").into_bytes()));
    let front = Front::start(&upstream, spec()).await;
    let first = get(front.addr, "/a").await;
    assert_eq!(first.text(), "v1");
    assert!(first.cache_status().contains("fwd=miss; stored"), "{}", first.cache_status());
    settle().await;
    let second = get(front.addr, "/a").await;
    assert_eq!(second.text(), "v1");
    assert_eq!(upstream.hits(), 1);
    assert!(second.cache_status().starts_with("proxy-stone; hit; ttl="), "{}", second.cache_status());
    assert!(second.header("age").is_some());
    assert_eq!(front.last_status(), CacheStatus::Hit);
    Ok(())
}

#[tokio::test]
async fn upstream_age_counts_against_freshness() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|_, hit| {
        (200, vec![("cache-control", "max-age=60".into()), ("age", "100".into())], format!("v{hit}").into())
    });
    let front = Front::start(&upstream, spec()).await;
    get(front.addr, "/old").await;
    settle().await;
    let second = get(front.addr, "/old").await;
    // Already older than its lifetime when it arrived: never served without validation.
    assert_eq!(second.text(), "v2");
    assert_eq!(upstream.hits(), 2);
    Ok(())
}

#[tokio::test]
async fn responses_that_must_not_be_shared_are_never_stored() -> TestResult {
    for (name, headers) in [
        ("no-store", cc("no-store, max-age=60")),
        ("private", cc("private, max-age=60")),
        ("vary-star", vec![("cache-control", "max-age=60".into()), ("vary", "*".into())]),
        ("set-cookie", vec![("cache-control", "max-age=60".into()), ("set-cookie", "session=abc".into())]),
    ] {
        let upstream = Upstream::start().await;
        let answer = headers.clone();
        upstream.answer(move |_, hit| (200, answer.clone(), format!("v{hit}").into()));
        let front = Front::start(&upstream, spec()).await;
        get(front.addr, "/x").await;
        settle().await;
        let second = get(front.addr, "/x").await;
        assert_eq!(second.text(), "v2", "{name} was served from the cache");
        assert!(second.cache_status().contains("detail="), "{name}: {}", second.cache_status());
    }
    Ok(())
}

#[tokio::test]
async fn set_cookie_is_shared_only_when_the_route_says_so() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|_, hit| {
        (200, vec![("cache-control", "max-age=60".into()), ("set-cookie", "a=b".into())], format!("v{hit}").into())
    });
    let mut route = spec();
    route.share_set_cookie = true;
    let front = Front::start(&upstream, route).await;
    get(front.addr, "/c").await;
    settle().await;
    assert_eq!(get(front.addr, "/c").await.text(), "v1");
    Ok(())
}

#[tokio::test]
async fn authorized_requests_are_stored_only_where_the_rfc_allows() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|parts, hit| {
        let control = if parts.uri.path() == "/public" { "public, max-age=60" } else { "max-age=60" };
        (200, cc(control), format!("v{hit}").into())
    });
    let front = Front::start(&upstream, spec()).await;
    let alice = [("authorization", "Bearer alice")];
    send(front.addr, "GET", "/secret", &alice).await;
    settle().await;
    // Another user (or anyone) never gets alice's response.
    assert_eq!(send(front.addr, "GET", "/secret", &[("authorization", "Bearer bob")]).await.text(), "v2");
    assert_eq!(get(front.addr, "/secret").await.text(), "v3");
    send(front.addr, "GET", "/public", &alice).await;
    settle().await;
    assert_eq!(get(front.addr, "/public").await.text(), "v4");
    Ok(())
}

#[tokio::test]
async fn s_maxage_wins_over_max_age_and_expires_uses_date() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|parts, hit| {
        let headers = if parts.uri.path() == "/s" {
            cc("max-age=0, s-maxage=60")
        } else {
            let now = std::time::SystemTime::now();
            vec![("date", httpdate_fmt(now)), ("expires", httpdate_fmt(now + std::time::Duration::from_secs(60)))]
        };
        (200, headers, format!("v{hit}").into())
    });
    let front = Front::start(&upstream, spec()).await;
    get(front.addr, "/s").await;
    get(front.addr, "/e").await;
    settle().await;
    assert_eq!(get(front.addr, "/s").await.text(), "v1");
    assert_eq!(get(front.addr, "/e").await.text(), "v2");
    assert_eq!(upstream.hits(), 2);
    Ok(())
}

fn httpdate_fmt(time: std::time::SystemTime) -> String {
    let seconds = time.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    stone_proxy::cache::policy::format_http_date(seconds)
}

#[tokio::test]
async fn heuristic_freshness_only_when_the_route_enables_it() -> TestResult {
    let now = std::time::SystemTime::now();
    let last_modified = httpdate_fmt(now - std::time::Duration::from_secs(10 * 3600));
    for (heuristic, expected_hits) in [(false, 2), (true, 1)] {
        let upstream = Upstream::start().await;
        let modified = last_modified.clone();
        upstream.answer(move |_, hit| (200, vec![("last-modified", modified.clone())], format!("v{hit}").into()));
        let mut route = spec();
        route.heuristic = heuristic;
        let front = Front::start(&upstream, route).await;
        get(front.addr, "/h").await;
        settle().await;
        get(front.addr, "/h").await;
        assert_eq!(upstream.hits(), expected_hits, "heuristic {heuristic}");
    }
    Ok(())
}

#[tokio::test]
async fn default_ttl_applies_only_when_the_upstream_says_nothing() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|parts, hit| {
        let headers = if parts.uri.path() == "/silent" { vec![] } else { cc("max-age=0") };
        (200, headers, format!("v{hit}").into())
    });
    let mut route = spec();
    route.default_ttl_s = Some(60);
    let front = Front::start(&upstream, route).await;
    get(front.addr, "/silent").await;
    get(front.addr, "/explicit").await;
    settle().await;
    assert_eq!(get(front.addr, "/silent").await.text(), "v1");
    assert_eq!(get(front.addr, "/explicit").await.text(), "v3");
    Ok(())
}

#[tokio::test]
async fn stale_entries_are_revalidated_and_a_304_refreshes_them() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|parts, hit| {
        if parts.headers.get("if-none-match").is_some_and(|tag| tag == "\"v1\"") {
            return (304, vec![("cache-control", "max-age=60".into()), ("x-refreshed", format!("{hit}"))], vec![]);
        }
        (200, vec![("cache-control", "max-age=0".into()), ("etag", "\"v1\"".into())], b"body-v1".to_vec())
    });
    let front = Front::start(&upstream, spec()).await;
    get(front.addr, "/r").await;
    settle().await;
    let revalidated = get(front.addr, "/r").await;
    assert_eq!(revalidated.status, 200);
    assert_eq!(revalidated.text(), "body-v1");
    assert_eq!(revalidated.header("x-refreshed"), Some("2"));
    assert!(revalidated.cache_status().contains("fwd-status=304"), "{}", revalidated.cache_status());
    assert_eq!(front.last_status(), CacheStatus::Revalidated);
    assert_eq!(upstream.last_request().get("if-none-match").unwrap(), "\"v1\"");
    settle().await;
    // The 304's max-age=60 now applies: fresh, no upstream call.
    let hit = get(front.addr, "/r").await;
    assert_eq!(hit.text(), "body-v1");
    assert_eq!(hit.header("x-refreshed"), Some("2"));
    assert_eq!(upstream.hits(), 2);
    Ok(())
}

#[tokio::test]
async fn response_no_cache_means_validate_every_time() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|parts, _| {
        if parts.headers.contains_key("if-modified-since") {
            return (304, vec![], vec![]);
        }
        (
            200,
            vec![
                ("cache-control", "no-cache, max-age=60".into()),
                ("last-modified", "Sat, 21 Nov 2026 09:00:00 GMT".into()),
            ],
            b"x".to_vec(),
        )
    });
    let front = Front::start(&upstream, spec()).await;
    get(front.addr, "/n").await;
    settle().await;
    get(front.addr, "/n").await;
    get(front.addr, "/n").await;
    assert_eq!(upstream.hits(), 3);
    assert_eq!(front.last_status(), CacheStatus::Revalidated);
    Ok(())
}

#[tokio::test]
async fn client_conditionals_get_304_from_the_cache() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|_, _| {
        (
            200,
            vec![
                ("cache-control", "max-age=60".into()),
                ("etag", "W/\"e1\"".into()),
                ("last-modified", "Sat, 21 Nov 2026 09:00:00 GMT".into()),
            ],
            b"x".to_vec(),
        )
    });
    let front = Front::start(&upstream, spec()).await;
    get(front.addr, "/cond").await;
    settle().await;
    let by_etag = send(front.addr, "GET", "/cond", &[("if-none-match", "\"e1\"")]).await;
    assert_eq!(by_etag.status, 304);
    assert!(by_etag.body.is_empty());
    assert_eq!(by_etag.header("etag"), Some("W/\"e1\""));
    let by_date = send(front.addr, "GET", "/cond", &[("if-modified-since", "Sat, 21 Nov 2026 10:00:00 GMT")]).await;
    assert_eq!(by_date.status, 304);
    let changed = send(front.addr, "GET", "/cond", &[("if-none-match", "\"other\"")]).await;
    assert_eq!(changed.status, 200);
    assert_eq!(upstream.hits(), 1);
    Ok(())
}

#[tokio::test]
async fn vary_keeps_one_variant_per_request_header_value() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|parts, _| {
        let language = parts.headers.get("accept-language").map_or("none", |value| value.to_str().unwrap()).to_owned();
        (200, vec![("cache-control", "max-age=60".into()), ("vary", "Accept-Language".into())], language.into_bytes())
    });
    let front = Front::start(&upstream, spec()).await;
    assert_eq!(send(front.addr, "GET", "/v", &[("accept-language", "de")]).await.text(), "de");
    settle().await;
    assert_eq!(send(front.addr, "GET", "/v", &[("accept-language", "fr")]).await.text(), "fr");
    settle().await;
    assert_eq!(send(front.addr, "GET", "/v", &[("accept-language", "de")]).await.text(), "de");
    assert_eq!(send(front.addr, "GET", "/v", &[("accept-language", "fr")]).await.text(), "fr");
    assert_eq!(get(front.addr, "/v").await.text(), "none");
    assert_eq!(upstream.hits(), 3);
    Ok(())
}

#[tokio::test]
async fn head_is_answered_from_a_stored_get() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|_, _| (200, cc("max-age=60"), b"twelve bytes".to_vec()));
    let front = Front::start(&upstream, spec()).await;
    get(front.addr, "/head").await;
    settle().await;
    let head = send(front.addr, "HEAD", "/head", &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some("12"));
    assert_eq!(upstream.hits(), 1);
    Ok(())
}

#[tokio::test]
async fn a_head_miss_is_fetched_as_get_and_stored_for_what_follows() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|parts, hit| {
        // The body names the method the upstream was asked with, so a stored HEAD would show.
        let body = format!("{} {hit:02}", parts.method);
        (200, vec![("cache-control", "max-age=60".into()), ("etag", "\"e1\"".into())], body.into())
    });
    let front = Front::start(&upstream, spec()).await;
    let head = send(front.addr, "HEAD", "/h", &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some("6"));
    assert!(head.cache_status().contains("fwd=miss; stored"), "{}", head.cache_status());
    assert_eq!(front.last_status(), CacheStatus::Miss);
    // The object is stored off the request path once the GET's body has been read.
    for _ in 0..200 {
        if front.cache.memory_bytes().await > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let got = get(front.addr, "/h").await;
    assert_eq!(got.text(), "GET 01");
    assert!(got.cache_status().contains("; hit"), "{}", got.cache_status());
    let head_again = send(front.addr, "HEAD", "/h", &[]).await;
    assert!(head_again.cache_status().contains("; hit") && head_again.body.is_empty());
    assert_eq!(head_again.header("etag"), Some("\"e1\""));
    assert_eq!(upstream.hits(), 1);
    Ok(())
}

#[tokio::test]
async fn a_head_miss_of_an_uncacheable_response_is_answered_without_a_body_and_not_stored() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|_, hit| (200, cc("no-store"), format!("v{hit}").into()));
    let front = Front::start(&upstream, spec()).await;
    let head = send(front.addr, "HEAD", "/n", &[]).await;
    assert_eq!((head.status, head.body.len()), (200, 0));
    assert!(head.cache_status().contains("detail=no-store"), "{}", head.cache_status());
    settle().await;
    assert_eq!(get(front.addr, "/n").await.text(), "v2");
    assert_eq!(upstream.hits(), 2);
    Ok(())
}

#[tokio::test]
async fn unsafe_methods_invalidate_the_uri_and_location() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|parts, hit| {
        if parts.method == hyper::Method::POST {
            return (201, vec![("location", "/items/7".into())], vec![]);
        }
        (200, cc("max-age=60"), format!("v{hit}").into())
    });
    let front = Front::start(&upstream, spec()).await;
    get(front.addr, "/items").await;
    get(front.addr, "/items/7").await;
    settle().await;
    assert_eq!(get(front.addr, "/items").await.text(), "v1");
    send(front.addr, "POST", "/items", &[]).await;
    assert_eq!(get(front.addr, "/items").await.text(), "v4");
    assert_eq!(get(front.addr, "/items/7").await.text(), "v5");
    Ok(())
}

#[tokio::test]
async fn range_requests_bypass_the_cache() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|parts, _| {
        if parts.headers.contains_key("range") {
            return (206, vec![("content-range", "bytes 0-1/10".into())], b"01".to_vec());
        }
        (200, cc("max-age=60"), b"0123456789".to_vec())
    });
    let front = Front::start(&upstream, spec()).await;
    get(front.addr, "/range").await;
    settle().await;
    let partial = send(front.addr, "GET", "/range", &[("range", "bytes=0-1")]).await;
    assert_eq!(partial.status, 206);
    assert_eq!(partial.text(), "01");
    assert!(partial.cache_status().contains("fwd=bypass"));
    assert_eq!(front.last_status(), CacheStatus::Bypass);
    assert_eq!(get(front.addr, "/range").await.text(), "0123456789");
    assert_eq!(upstream.hits(), 2);
    Ok(())
}

#[tokio::test]
async fn request_directives_max_age_min_fresh_max_stale_no_cache_only_if_cached() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|_, hit| (200, cc("max-age=1"), format!("v{hit}").into()));
    let front = Front::start(&upstream, spec()).await;
    let missing = send(front.addr, "GET", "/d", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(missing.status, 504);
    assert_eq!(upstream.hits(), 0);
    get(front.addr, "/d").await;
    settle().await;
    assert_eq!(send(front.addr, "GET", "/d", &[("cache-control", "no-cache")]).await.text(), "v2");
    settle().await;
    assert_eq!(send(front.addr, "GET", "/d", &[("cache-control", "min-fresh=30")]).await.text(), "v3");
    settle().await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let stale = send(front.addr, "GET", "/d", &[("cache-control", "max-stale=60")]).await;
    assert_eq!(stale.text(), "v3");
    assert_eq!(front.last_status(), CacheStatus::Stale);
    assert_eq!(send(front.addr, "GET", "/d", &[("cache-control", "only-if-cached")]).await.status, 504);
    assert_eq!(get(front.addr, "/d").await.text(), "v4");
    Ok(())
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_and_refreshes_in_the_background() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|_, hit| (200, cc("max-age=1, stale-while-revalidate=60"), format!("v{hit}").into()));
    let front = Front::start(&upstream, spec()).await;
    get(front.addr, "/swr").await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let stale = get(front.addr, "/swr").await;
    assert_eq!(stale.text(), "v1");
    assert!(stale.cache_status().contains("stale-while-revalidate"), "{}", stale.cache_status());
    eventually(|| upstream.hits() == 2).await;
    settle().await;
    assert_eq!(get(front.addr, "/swr").await.text(), "v2");
    Ok(())
}

#[tokio::test]
async fn stale_if_error_serves_stored_content_on_errors_unless_must_revalidate() -> TestResult {
    for (control, served_stale) in
        [("max-age=1, stale-if-error=60", true), ("max-age=1, stale-if-error=60, must-revalidate", false)]
    {
        let upstream = Upstream::start().await;
        let control = control.to_owned();
        upstream.answer(move |_, hit| {
            if hit == 1 { (200, cc(&control), b"good".to_vec()) } else { (503, vec![], b"broken".to_vec()) }
        });
        let front = Front::start(&upstream, spec()).await;
        get(front.addr, "/sie").await;
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        let on_503 = get(front.addr, "/sie").await;
        upstream.set_down(true);
        let on_connect_error = get(front.addr, "/sie").await;
        if served_stale {
            assert_eq!((on_503.status, on_503.text().as_str()), (200, "good"));
            assert_eq!((on_connect_error.status, on_connect_error.text().as_str()), (200, "good"));
            assert_eq!(front.last_status(), CacheStatus::Stale);
        } else {
            assert_eq!(on_503.status, 503);
            assert_eq!(on_connect_error.status, 502);
        }
    }
    Ok(())
}

#[tokio::test]
async fn objects_over_the_size_limit_stream_through_uncached() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|_, _| (200, cc("max-age=60"), vec![b'x'; 10_000]));
    let mut route = spec();
    route.max_object_bytes = Some(1_000);
    let front = Front::start(&upstream, route).await;
    assert_eq!(get(front.addr, "/big").await.body.len(), 10_000);
    settle().await;
    let second = get(front.addr, "/big").await;
    assert_eq!(second.body.len(), 10_000);
    assert!(second.cache_status().contains("too-large"), "{}", second.cache_status());
    assert_eq!(upstream.hits(), 2);
    Ok(())
}

#[tokio::test]
async fn unkeyed_headers_neither_split_nor_poison_the_cache() -> TestResult {
    let upstream = Upstream::start().await;
    // An upstream that reflects X-Forwarded-Host into its content, the classic poisoning setup.
    upstream.answer(|parts, _| {
        let host = parts.headers.get("x-forwarded-host").map_or("", |value| value.to_str().unwrap()).to_owned();
        (200, cc("max-age=60"), format!("<script src=//{host}/app.js>").into_bytes())
    });
    let front = Front::start(&upstream, spec()).await;
    let poisoned = send(front.addr, "GET", "/page", &[("x-forwarded-host", "evil.example")]).await;
    assert!(!poisoned.text().contains("evil"), "{}", poisoned.text());
    settle().await;
    let victim = get(front.addr, "/page").await;
    assert!(!victim.text().contains("evil"));
    assert_eq!(upstream.hits(), 1);
    Ok(())
}

#[tokio::test]
async fn bypass_rules_and_query_normalisation() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|_, hit| (200, cc("max-age=60"), format!("v{hit}").into()));
    let route: stone_events::cache::RouteCacheSpec = serde_json::from_value(serde_json::json!({
        "key": { "query_exclude": ["utm_source"] },
        "bypass": [{ "cookie": "session" }, { "path_prefix": "/admin/" }]
    }))?;
    let front = Front::start(&upstream, route).await;
    get(front.addr, "/q?b=2&a=1&utm_source=x").await;
    settle().await;
    assert_eq!(get(front.addr, "/q?a=1&b=2").await.text(), "v1");
    let with_session = send(front.addr, "GET", "/q?a=1&b=2", &[("cookie", "theme=dark; session=s1")]).await;
    assert_eq!(with_session.text(), "v2");
    assert_eq!(front.last_status(), CacheStatus::Bypass);
    get(front.addr, "/admin/x").await;
    settle().await;
    assert_eq!(get(front.addr, "/admin/x").await.text(), "v4");
    Ok(())
}
