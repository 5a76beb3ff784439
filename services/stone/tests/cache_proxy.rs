//! The response cache inside the proxy: a route with a cache policy answers repeated GETs from
//! the cache (Cache-Status, one upstream hit), every `request.completed` carries the cache
//! status, the cache emits `cache.*` events, and a POST through the proxy invalidates.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod cache_support;
mod proxy_support;

use stone_events::request::CacheStatus;
use stone_kit::Shutdown;

#[tokio::test]
async fn the_proxy_serves_hits_from_its_cache_and_records_the_cache_status() -> cache_support::TestResult {
    let upstream = cache_support::Upstream::start().await;
    upstream.answer(|parts, hit| {
        if parts.method == hyper::Method::POST {
            return (204, vec![], vec![]);
        }
        (200, cache_support::cc("max-age=60"), format!("v{hit}").into())
    });
    let mut config = proxy_support::isolated_config();
    let mut route = proxy_support::route_spec("cached", &["/*"], "origin");
    route.cache = Some(Box::new(cache_support::spec()));
    config.proxy.routes = vec![route];
    config.proxy.upstreams = vec![proxy_support::upstream_spec("origin", &[(upstream.addr, 1)])];
    let shutdown = Shutdown::new();
    // Caught, so that a failed assertion still stops the proxy and removes the test's streams.
    let outcome = stone_kit::testing::caught(async {
        let proxy = stone_proxy::build(&config, &shutdown).await?;

        let first = cache_support::get(proxy.listen_addr, "/item").await;
        assert_eq!(first.text(), "v1");
        assert!(first.cache_status().contains("fwd=miss; stored"), "{}", first.cache_status());
        cache_support::settle().await;
        let second = cache_support::get(proxy.listen_addr, "/item").await;
        assert_eq!(second.text(), "v1");
        assert!(second.cache_status().contains("hit"), "{}", second.cache_status());
        assert!(second.header("x-request-id").is_some() && second.header("age").is_some());
        assert_eq!(upstream.hits(), 1);

        // An unsafe method through the proxy invalidates the stored response.
        assert_eq!(cache_support::send(proxy.listen_addr, "POST", "/item", &[]).await.status, 204);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(cache_support::get(proxy.listen_addr, "/item").await.text(), "v3");

        let js = proxy_support::jetstream(&config).await?;
        let statuses = || async {
            let events = proxy_support::read_events(&js, &config, "request.completed.>").await.unwrap_or_default();
            events
                .into_iter()
                .filter_map(|event| match event {
                    stone_events::Event::RequestCompleted(envelope) => {
                        Some((envelope.data.method, envelope.data.cache))
                    }
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        assert!(proxy_support::eventually(50, || async { statuses().await.len() == 4 }).await);
        let mut recorded = statuses().await;
        recorded.sort_by_key(|(method, cache)| (method.clone(), cache.as_str()));
        assert_eq!(
            recorded,
            vec![
                ("GET".to_owned(), CacheStatus::Hit),
                ("GET".to_owned(), CacheStatus::Miss),
                ("GET".to_owned(), CacheStatus::Miss),
                ("POST".to_owned(), CacheStatus::None),
            ]
        );
        // The descriptive fields, hits included, are the request as received.
        let events = proxy_support::read_events(&js, &config, "request.completed.>").await?;
        for event in events {
            let stone_events::Event::RequestCompleted(envelope) = event else { continue };
            let data = envelope.data;
            assert_eq!(data.host, proxy.listen_addr.to_string());
            assert_eq!(
                (data.route.as_str(), data.path_template.as_str(), data.path.as_str()),
                ("cached", "/*", "/item")
            );
            assert_eq!(data.upstream.as_deref(), Some("origin"));
            assert_eq!(data.client_ip.as_deref(), Some("127.0.0.1"));
            assert_eq!(data.protocol, "HTTP/1.1");
        }
        // Cache events are published as the publisher drains its queue, independently of the
        // request events read above (a `cache.stored` only once the tee has stored the body), so
        // they are waited for rather than counted once.
        for (filter, least) in [("cache.stored.>", 2), ("cache.miss.>", 2)] {
            let arrived = proxy_support::eventually(100, || async {
                proxy_support::count_events(&js, &config, filter).await.unwrap_or(0) >= least
            })
            .await;
            assert!(arrived, "fewer than {least} {filter} events");
        }
        Ok(())
    })
    .await;
    shutdown.trigger();
    proxy_support::cleanup(&config).await;
    stone_kit::testing::rethrow(outcome)
}

/// `[proxy.cache]` reaches the worker: a memory tier of a few KiB (Redis off) evicts by size,
/// and the evictions arrive as `cache.evicted` events summed per reason and interval, never one
/// per object.
#[tokio::test]
async fn a_small_memory_tier_evicts_and_reports_evictions_summed() -> cache_support::TestResult {
    let upstream = cache_support::Upstream::start().await;
    upstream.answer(|_, _| (200, cache_support::cc("max-age=600"), vec![b'x'; 2048]));
    let mut config = proxy_support::isolated_config();
    config.proxy.cache.memory_max_bytes = 8 * 1024;
    config.proxy.cache.redis = false;
    config.proxy.cache.eviction_report_interval_ms = 1_000;
    let mut route = proxy_support::route_spec("cached", &["/*"], "origin");
    route.cache = Some(Box::new(cache_support::spec()));
    config.proxy.routes = vec![route];
    config.proxy.upstreams = vec![proxy_support::upstream_spec("origin", &[(upstream.addr, 1)])];
    let shutdown = Shutdown::new();
    // Caught, so that a failed assertion still stops the proxy and removes the test's streams.
    let outcome = stone_kit::testing::caught(async {
        let proxy = stone_proxy::build(&config, &shutdown).await?;
        let js = proxy_support::jetstream(&config).await?;

        let evicted = || async {
            let events = proxy_support::read_events(&js, &config, "cache.evicted.>").await.unwrap_or_default();
            events
                .into_iter()
                .filter_map(|event| match event {
                    stone_events::Event::Cache(envelope) => Some(envelope.data),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        // 40 objects of 2 KiB through an 8 KiB tier; evictions are reported once per interval, so
        // keep using the tier until a report arrives and objects were asked for again.
        let mut reports = Vec::new();
        for round in 0..20 {
            for object in 0..40 {
                let reply = cache_support::get(proxy.listen_addr, &format!("/o{object}")).await;
                assert_eq!(reply.body.len(), 2048);
            }
            reports = evicted().await;
            // A second round at least: only then must evicted objects be fetched again (a slow
            // first round can outlast the report interval on its own).
            if !reports.is_empty() && round > 0 {
                break;
            }
            assert!(round < 19, "no cache.evicted event after {} rounds", round + 1);
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        let by_size: Vec<_> = reports.iter().filter(|event| event.reason.as_deref() == Some("size")).collect();
        assert!(!by_size.is_empty(), "{reports:?}");
        for event in by_size {
            assert_eq!(event.tier, Some(stone_events::cache::CacheTier::Memory));
            // One event stands for many evictions, with their bytes.
            let count = event.count.unwrap_or(0);
            assert!(count >= 1, "{event:?}");
            assert!(event.bytes >= count * 2048, "{event:?}");
        }
        // Far fewer reports than evicted objects: at most one per reason and interval.
        let total: u64 = reports.iter().map(|event| event.count.unwrap_or(1)).sum();
        assert!(total > reports.len() as u64, "{reports:?}");
        assert!(upstream.hits() > 40, "an 8 KiB tier cannot hold 40 objects of 2 KiB");
        Ok(())
    })
    .await;
    shutdown.trigger();
    proxy_support::cleanup(&config).await;
    stone_kit::testing::rethrow(outcome)
}

/// A HEAD miss through the proxy asks the upstream with GET and stores the object.
#[tokio::test]
async fn a_head_miss_through_the_proxy_stores_the_get() -> cache_support::TestResult {
    let upstream = cache_support::Upstream::start().await;
    upstream.answer(|parts, _| (200, cache_support::cc("max-age=60"), parts.method.as_str().into()));
    let mut config = proxy_support::isolated_config();
    let mut route = proxy_support::route_spec("cached", &["/*"], "origin");
    route.cache = Some(Box::new(cache_support::spec()));
    config.proxy.routes = vec![route];
    config.proxy.upstreams = vec![proxy_support::upstream_spec("origin", &[(upstream.addr, 1)])];
    let shutdown = Shutdown::new();
    // Caught, so that a failed assertion still stops the proxy and removes the test's streams.
    let outcome = stone_kit::testing::caught(async {
        let proxy = stone_proxy::build(&config, &shutdown).await?;
        let head = cache_support::send(proxy.listen_addr, "HEAD", "/thing", &[]).await;
        assert_eq!((head.status, head.body.len()), (200, 0));
        assert_eq!(head.header("content-length"), Some("3"));
        let mut got = cache_support::get(proxy.listen_addr, "/thing").await;
        for _ in 0..50 {
            if got.cache_status().contains("; hit") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            got = cache_support::get(proxy.listen_addr, "/thing").await;
        }
        assert!(got.cache_status().contains("; hit"), "{}", got.cache_status());
        assert_eq!(got.text(), "GET");
        // The GETs after the HEAD waited for its fetch (coalesced) rather than asking again.
        assert_eq!(upstream.hits(), 1);
        Ok(())
    })
    .await;
    shutdown.trigger();
    proxy_support::cleanup(&config).await;
    stone_kit::testing::rethrow(outcome)
}

/// Hits are looked up before the request is prepared for the upstream, so a key part or `Vary`
/// name that forwarding sets must still be read as the upstream saw it. Here the upstream varies
/// on `X-Forwarded-For`: a client that sends the value another client's request was forwarded
/// with must not get that client's object, and a route keyed on `X-Forwarded-Proto` keys on the
/// value the proxy forwards, not on what the client claims.
#[tokio::test]
async fn keys_and_vary_on_forwarding_headers_see_what_the_upstream_saw() -> cache_support::TestResult {
    let upstream = cache_support::Upstream::start().await;
    upstream.answer(|parts, hit| {
        let header = |name: &str| parts.headers.get(name).map_or("-", |value| value.to_str().unwrap()).to_owned();
        if parts.uri.path() == "/by-client" {
            let headers = vec![("cache-control", "max-age=60".to_owned()), ("vary", "X-Forwarded-For".to_owned())];
            return (200, headers, format!("{} v{hit}", header("x-forwarded-for")).into());
        }
        (200, cache_support::cc("max-age=60"), format!("{} v{hit}", header("x-forwarded-proto")).into())
    });
    let mut config = proxy_support::isolated_config();
    let mut varying = proxy_support::route_spec("varying", &["/by-client"], "origin");
    varying.cache = Some(Box::new(cache_support::spec()));
    let mut keyed = proxy_support::route_spec("keyed", &["/*"], "origin");
    keyed.cache = Some(Box::new(serde_json::from_value(serde_json::json!({
        "key": { "headers": ["X-Forwarded-Proto"] }
    }))?));
    config.proxy.routes = vec![varying, keyed];
    config.proxy.upstreams = vec![proxy_support::upstream_spec("origin", &[(upstream.addr, 1)])];
    let shutdown = Shutdown::new();
    // Caught, so that a failed assertion still stops the proxy and removes the test's streams.
    let outcome = stone_kit::testing::caught(async {
        let proxy = stone_proxy::build(&config, &shutdown).await?;
        let send = |path: &'static str, headers: &'static [(&'static str, &'static str)]| {
            cache_support::send(proxy.listen_addr, "GET", path, headers)
        };

        assert_eq!(send("/by-client", &[]).await.text(), "127.0.0.1 v1");
        cache_support::settle().await;
        let repeated = send("/by-client", &[]).await;
        assert_eq!((repeated.text(), repeated.cache_status().contains("hit")), ("127.0.0.1 v1".to_owned(), true));
        // Received as "127.0.0.1", forwarded as "127.0.0.1, 127.0.0.1": another variant.
        let claimed = send("/by-client", &[("x-forwarded-for", "127.0.0.1")]).await;
        assert_eq!(claimed.text(), "127.0.0.1, 127.0.0.1 v2");
        assert_eq!(upstream.hits(), 2);

        assert_eq!(send("/page", &[]).await.text(), "http v3");
        cache_support::settle().await;
        // The proxy forwards `http` whatever the client claims: the same key, a hit.
        let spoofed = send("/page", &[("x-forwarded-proto", "https")]).await;
        assert_eq!(spoofed.text(), "http v3");
        assert!(spoofed.cache_status().contains("hit"), "{}", spoofed.cache_status());
        assert_eq!(upstream.hits(), 3);
        Ok(())
    })
    .await;
    shutdown.trigger();
    proxy_support::cleanup(&config).await;
    stone_kit::testing::rethrow(outcome)
}
