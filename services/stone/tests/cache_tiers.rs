//! The two tiers, coalescing and purge: a second worker (its own memory tier, the same Redis
//! prefix) is served from Redis and promotes; concurrent misses make one upstream fetch; purges
//! by key, prefix and tag published on NATS reach both workers and Redis.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod cache_support;

use std::time::Duration;

use cache_support::*;
use stone_events::Namespace;
use stone_events::cache::{PurgeBy, PurgeCommand, purge_subject};
use stone_proxy::cache::{Cache, purge};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_second_worker_is_served_from_redis_and_promotes_into_memory() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|_, hit| (200, cc("max-age=60"), format!("v{hit}").into()));
    let prefix = unique_prefix();
    let first = Front::start_with(&upstream, spec(), settings(&prefix)).await;
    let second = Front::start_with(&upstream, spec(), settings(&prefix)).await;
    get_h(first.addr, "/shared").await;
    settle().await;
    let from_redis = get_h(second.addr, "/shared").await;
    assert_eq!(from_redis.text(), "v1");
    assert!(from_redis.cache_status().contains("detail=redis"), "{}", from_redis.cache_status());
    let from_memory = get_h(second.addr, "/shared").await;
    assert!(!from_memory.cache_status().contains("redis"), "{}", from_memory.cache_status());
    assert_eq!(upstream.hits(), 1);
    Ok(())
}

#[tokio::test]
async fn memory_tier_alone_serves_when_redis_is_unreachable() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|_, hit| (200, cc("max-age=60"), format!("v{hit}").into()));
    let mut no_redis = settings(&unique_prefix());
    no_redis.redis_url = Some("redis://127.0.0.1:1".to_owned());
    let cache = Cache::new(&no_redis, None).await;
    assert!(!cache.has_redis());
    let front = Front::start_on(&upstream, spec(), cache).await;
    get_h(front.addr, "/m").await;
    settle().await;
    assert_eq!(get_h(front.addr, "/m").await.text(), "v1");
    Ok(())
}

#[tokio::test]
async fn concurrent_misses_make_one_upstream_fetch() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|_, hit| (200, cc("max-age=60"), format!("v{hit}").into()));
    upstream.set_delay(300);
    let front = Front::start(&upstream, spec()).await;
    let requests: Vec<_> = (0..50).map(|_| tokio::spawn(get_h(front.addr, "/hot"))).collect();
    for request in requests {
        assert_eq!(request.await?.text(), "v1");
    }
    assert_eq!(upstream.hits(), 1);
    Ok(())
}

#[tokio::test]
async fn coalesced_waiters_give_up_after_the_bound() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|_, hit| (200, cc("max-age=60"), format!("v{hit}").into()));
    upstream.set_delay(1_000);
    let mut bounded = settings(&unique_prefix());
    bounded.coalesce_wait = Duration::from_millis(100);
    let front = Front::start_with(&upstream, spec(), bounded).await;
    let leader = tokio::spawn(get_h(front.addr, "/slow"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let follower = get_h(front.addr, "/slow").await;
    let leader = leader.await?;
    // The follower gave up waiting after the bound and fetched for itself: two upstream fetches,
    // two different answers (had it waited for the leader's fetch, it would share its answer).
    assert_eq!((leader.status, follower.status), (200, 200));
    assert_ne!(leader.text(), follower.text());
    assert_eq!(upstream.hits(), 2);
    Ok(())
}

/// Two workers listening for purges on one test namespace.
async fn two_workers(upstream: &Upstream) -> (Front, Front, async_nats::Client, Namespace, CancellationToken) {
    let nats_url = std::env::var("STONE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let client = async_nats::connect(nats_url).await.unwrap();
    let namespace = Namespace::new(&format!("c{}", &uuid::Uuid::now_v7().simple().to_string()[22..])).unwrap();
    let prefix = unique_prefix();
    let token = CancellationToken::new();
    let first = Front::start_with(upstream, spec(), settings(&prefix)).await;
    let second = Front::start_with(upstream, spec(), settings(&prefix)).await;
    for front in [&first, &second] {
        let listener = purge::listen(client.clone(), &namespace, front.cache.clone(), token.clone()).await.unwrap();
        tokio::spawn(listener);
    }
    (first, second, client, namespace, token)
}

async fn publish(client: &async_nats::Client, namespace: &Namespace, by: PurgeBy, value: &str) {
    let command = PurgeCommand { by, value: value.to_owned(), actor: "test".to_owned() };
    client.publish(purge_subject(namespace), serde_json::to_vec(&command).unwrap().into()).await.unwrap();
    client.flush().await.unwrap();
}

#[tokio::test]
async fn purges_by_key_prefix_and_tag_reach_every_worker_and_redis_within_a_second() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|parts, hit| {
        let tag = if parts.uri.path().starts_with("/users/") { "users" } else { "other" };
        (
            200,
            vec![("cache-control", "max-age=600".into()), ("surrogate-key", format!("{tag} all"))],
            format!("v{hit}").into(),
        )
    });
    let (first, second, client, namespace, token) = two_workers(&upstream).await;
    let warm = |paths: &'static [&'static str]| {
        let (a, b) = (first.addr, second.addr);
        async move {
            for path in paths {
                get_h(a, path).await;
                settle().await;
                get_h(b, path).await;
            }
            settle().await;
        }
    };
    let cached_everywhere = |path: &'static str| {
        let (a, b) = (first.addr, second.addr);
        async move {
            get_h(a, path).await.cache_status().contains("hit") && get_h(b, path).await.cache_status().contains("hit")
        }
    };

    warm(&["/users/1", "/users/2", "/docs"]).await;
    assert!(cached_everywhere("/users/1").await && cached_everywhere("/docs").await);
    publish(&client, &namespace, PurgeBy::Key, "api.test/users/1").await;
    // Bounded: about a second of polling, the purge's promise.
    eventually_async(|| async { !get_h(first.addr, "/users/1").await.cache_status().contains("hit") }).await;
    assert!(get_h(second.addr, "/users/2").await.cache_status().contains("hit"));

    // After a purge, the first request (on either worker) fetches anew and the object is
    // shared again; what must never come back is the purged version.
    warm(&["/users/1", "/users/2"]).await;
    let before_prefix = [get_h(first.addr, "/users/1").await.text(), get_h(first.addr, "/users/2").await.text()];
    let docs = get_h(first.addr, "/docs").await.text();
    publish(&client, &namespace, PurgeBy::Prefix, "api.test/users/").await;
    for front in [&second, &first] {
        for (path, old) in ["/users/1", "/users/2"].iter().zip(&before_prefix) {
            eventually_async(|| async { &get_h(front.addr, path).await.text() != old }).await;
        }
        assert_eq!(get_h(front.addr, "/docs").await.text(), docs);
    }

    settle().await;
    let before_tag = get_h(second.addr, "/users/1").await.text();
    publish(&client, &namespace, PurgeBy::Tag, "users").await;
    for front in [&first, &second] {
        eventually_async(|| async { get_h(front.addr, "/users/1").await.text() != before_tag }).await;
        assert_eq!(get_h(front.addr, "/docs").await.text(), docs);
    }
    token.cancel();
    Ok(())
}

#[tokio::test]
async fn a_purge_reaches_redis_so_a_fresh_worker_does_not_resurrect_the_object() -> TestResult {
    let upstream = Upstream::start().await;
    upstream.answer(|_, hit| (200, cc("max-age=600"), format!("v{hit}").into()));
    let (first, _second, client, namespace, token) = two_workers(&upstream).await;
    get_h(first.addr, "/gone").await;
    settle().await;
    publish(&client, &namespace, PurgeBy::Key, "api.test/gone").await;
    eventually_async(|| async { get_h(first.addr, "/gone").await.text() == "v2" }).await;
    token.cancel();
    Ok(())
}

/// Both fronts are reached under one Host, as workers behind one load balancer are.
async fn get_h(front: std::net::SocketAddr, path: &str) -> Reply {
    send(front, "GET", path, &[("host", "api.test")]).await
}

async fn eventually_async<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached in time");
}
