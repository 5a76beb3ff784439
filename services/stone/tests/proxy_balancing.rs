//! Load balancing, failover, ejection and recovery through real sockets: upstream servers started
//! by the test, the proxy in standalone mode, health transitions read back from JetStream.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod proxy_support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use proxy_support::*;
use stone_events::Event;
use stone_events::config::{HashOn, HealthCheckSpec, LbAlgorithm, PassiveHealthSpec, UpstreamSpec};
use stone_events::health::{HealthCheckKind, TargetState};
use stone_kit::testing::{caught, rethrow};
use stone_kit::{Shutdown, StoneConfig};

/// Builds a standalone proxy with one route `/*` to `upstream`, runs `body`, cleans up.
async fn with_proxy<F, Fut>(upstream: UpstreamSpec, body: F) -> TestResult
where
    F: FnOnce(StoneConfig, stone_proxy::RunningProxy) -> Fut,
    Fut: std::future::Future<Output = TestResult>,
{
    let shutdown = Shutdown::new();
    let mut config = isolated_config();
    config.proxy.routes = vec![route_spec("all", &[], &upstream.name)];
    config.proxy.upstreams = vec![upstream];
    // Caught, so that a failed assertion still drains the proxy and removes the test's streams.
    let outcome = caught(async {
        let proxy = stone_proxy::build(&config, &shutdown).await?;
        body(config.clone(), proxy).await
    })
    .await;
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    cleanup(&config).await;
    rethrow(outcome)
}

/// A local address nothing listens on.
async fn closed_port() -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    listener.local_addr()
}

fn health_events(events: &[Event], target: &SocketAddr) -> Vec<(TargetState, HealthCheckKind)> {
    let url = format!("http://{target}");
    events
        .iter()
        .filter_map(|event| match event {
            Event::TargetHealth(envelope) if envelope.data.target == url => {
                Some((envelope.data.state, envelope.data.check))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_spreads_requests_exactly_by_weight() -> TestResult {
    let upstreams = Shutdown::new();
    let heavy = TestUpstream::start("heavy", &upstreams).await?;
    let light = TestUpstream::start("light", &upstreams).await?;
    let spec = upstream_spec("pool", &[(heavy.address, 3), (light.address, 1)]);
    with_proxy(spec, |_config, proxy| async move {
        let client = client();
        let mut seen: BTreeMap<String, u32> = BTreeMap::new();
        for index in 0..400 {
            let (status, upstream) = get(&client, &format!("http://{}/r/{index}", proxy.listen_addr)).await?;
            assert_eq!(status, 200);
            *seen.entry(upstream).or_default() += 1;
        }
        assert_eq!(seen, BTreeMap::from([("heavy".to_owned(), 300), ("light".to_owned(), 100)]));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hashing_keeps_a_user_on_one_target_and_least_request_uses_all() -> TestResult {
    let upstreams = Shutdown::new();
    let a = TestUpstream::start("a", &upstreams).await?;
    let b = TestUpstream::start("b", &upstreams).await?;
    let c = TestUpstream::start("c", &upstreams).await?;
    let targets = [(a.address, 1), (b.address, 1), (c.address, 1)];
    let hashed = UpstreamSpec {
        algorithm: LbAlgorithm::ConsistentHash,
        hash_on: Some(HashOn::Header("x-user".into())),
        ..upstream_spec("pool", &targets)
    };
    with_proxy(hashed, |_config, proxy| async move {
        let client = client();
        let mut used = std::collections::BTreeSet::new();
        for user in 0..20 {
            let mut picks = std::collections::BTreeSet::new();
            for _ in 0..5 {
                let request = Request::get(format!("http://{}/profile", proxy.listen_addr))
                    .header("x-user", format!("user-{user}"))
                    .body(Empty::<Bytes>::new())?;
                let response = client.request(request).await?;
                picks.insert(response.headers()["x-upstream"].to_str()?.to_owned());
                response.into_body().collect().await?;
            }
            assert_eq!(picks.len(), 1, "user-{user} stays on one target");
            used.extend(picks);
        }
        assert_eq!(used.len(), 3, "20 users spread over the 3 targets: {used:?}");
        Ok(())
    })
    .await?;

    let least = UpstreamSpec { algorithm: LbAlgorithm::LeastRequest, ..upstream_spec("pool", &targets) };
    with_proxy(least, |_config, proxy| async move {
        let client = client();
        let mut used = std::collections::BTreeSet::new();
        for index in 0..60 {
            used.insert(get(&client, &format!("http://{}/r/{index}", proxy.listen_addr)).await?.1);
        }
        assert_eq!(used.len(), 3, "{used:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_target_fails_over_then_is_ejected_and_reported() -> TestResult {
    let upstreams = Shutdown::new();
    let live = TestUpstream::start("live", &upstreams).await?;
    let dead = closed_port().await?;
    let spec = UpstreamSpec {
        passive_health: Some(PassiveHealthSpec {
            consecutive_failures: 3,
            base_ejection_ms: 60_000,
            max_ejection_ms: 60_000,
        }),
        ..upstream_spec("pool", &[(dead, 1), (live.address, 1)])
    };
    with_proxy(spec, |config, proxy| async move {
        let client = client();
        for index in 0..40 {
            let (status, upstream) = get(&client, &format!("http://{}/r/{index}", proxy.listen_addr)).await?;
            assert_eq!((status, upstream.as_str()), (200, "live"), "request {index} failed over");
        }
        assert_eq!(live.served.load(Ordering::Relaxed), 40);
        let js = jetstream(&config).await?;
        let mut transitions = Vec::new();
        for _ in 0..50 {
            transitions = health_events(&read_events(&js, &config, "health.>").await?, &dead);
            if !transitions.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(transitions, vec![(TargetState::Down, HealthCheckKind::Passive)], "ejected once, reported once");
        // Every request event names the target that answered, never the dead one.
        let requests = read_events(&js, &config, "request.>").await?;
        assert_eq!(requests.len(), 40);
        let live_url = format!("http://{}", live.address);
        assert!(requests.iter().all(|event| matches!(event,
            Event::RequestCompleted(envelope) if envelope.data.target.as_deref() == Some(live_url.as_str()) && envelope.data.status == 200)));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_target_is_ejected_and_comes_back_when_healthy() -> TestResult {
    let upstreams = Shutdown::new();
    let flaky = TestUpstream::start("flaky", &upstreams).await?;
    let steady = TestUpstream::start("steady", &upstreams).await?;
    let spec = UpstreamSpec {
        passive_health: Some(PassiveHealthSpec {
            consecutive_failures: 3,
            base_ejection_ms: 300,
            max_ejection_ms: 300,
        }),
        ..upstream_spec("pool", &[(flaky.address, 1), (steady.address, 1)])
    };
    with_proxy(spec, |config, proxy| async move {
        let client = client();
        let url = format!("http://{}/r", proxy.listen_addr);
        flaky.set_status(503);
        for _ in 0..6 {
            get(&client, &url).await?;
        }
        assert_eq!(flaky.served.load(Ordering::Relaxed), 3, "ejected after 3 consecutive 503s");
        for _ in 0..10 {
            assert_eq!(get(&client, &url).await?, (200, "steady".to_owned()));
        }
        flaky.set_status(200);
        let back =
            eventually(100, || async { get(&client, &url).await.map(|(_, up)| up == "flaky").unwrap_or(false) }).await;
        assert!(back, "the target receives traffic again after its ejection");

        let js = jetstream(&config).await?;
        let mut transitions = Vec::new();
        for _ in 0..50 {
            transitions = health_events(&read_events(&js, &config, "health.>").await?, &flaky.address);
            if transitions.len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            transitions,
            vec![(TargetState::Down, HealthCheckKind::Passive), (TargetState::Up, HealthCheckKind::Passive)]
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_a_target_out_and_bring_it_back() -> TestResult {
    let upstreams = Shutdown::new();
    let flaky = TestUpstream::start("flaky", &upstreams).await?;
    let steady = TestUpstream::start("steady", &upstreams).await?;
    let spec = UpstreamSpec {
        health_check: Some(HealthCheckSpec {
            path: "/healthz".into(),
            interval_ms: 50,
            timeout_ms: 500,
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        }),
        // Passive ejection off, so only the probes decide.
        passive_health: Some(PassiveHealthSpec { consecutive_failures: 0, ..Default::default() }),
        ..upstream_spec("pool", &[(flaky.address, 1), (steady.address, 1)])
    };
    with_proxy(spec, |config, proxy| async move {
        let client = client();
        let url = format!("http://{}/r", proxy.listen_addr);
        flaky.set_status(503);
        let out = eventually(100, || async {
            let mut all_steady = true;
            for _ in 0..4 {
                all_steady &= get(&client, &url).await.map(|(_, up)| up == "steady").unwrap_or(false);
            }
            all_steady
        })
        .await;
        assert!(out, "probes took the failing target out");
        flaky.set_status(200);
        let back =
            eventually(100, || async { get(&client, &url).await.map(|(_, up)| up == "flaky").unwrap_or(false) }).await;
        assert!(back, "probes brought the target back");

        let js = jetstream(&config).await?;
        let mut transitions = Vec::new();
        for _ in 0..50 {
            transitions = health_events(&read_events(&js, &config, "health.>").await?, &flaky.address);
            if transitions.len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            transitions,
            vec![(TargetState::Down, HealthCheckKind::Active), (TargetState::Up, HealthCheckKind::Active)]
        );
        Ok(())
    })
    .await
}
