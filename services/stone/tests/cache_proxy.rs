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
                stone_events::Event::RequestCompleted(envelope) => Some((envelope.data.method, envelope.data.cache)),
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
    assert!(proxy_support::count_events(&js, &config, "cache.stored.>").await? >= 2);
    assert!(proxy_support::count_events(&js, &config, "cache.miss.>").await? >= 2);
    shutdown.trigger();
    proxy_support::cleanup(&config).await;
    Ok(())
}
