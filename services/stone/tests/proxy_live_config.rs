//! Live configuration: a worker replays the CONFIG stream at start, reports ready only then,
//! follows changes as they are published, stamps events with the config sequence in force, and
//! registers itself in the WORKERS bucket.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod proxy_support;

use std::time::Duration;

use futures::StreamExt;
use proxy_support::*;
use stone_events::config::EntitySpec;
use stone_kit::Shutdown;
use stone_kit::testing::{caught, rethrow};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_change_published_to_the_stream_reroutes_traffic_live() -> TestResult {
    let shutdown = Shutdown::new();
    let config = isolated_config();
    let outcome = caught(run(&config, &shutdown)).await;
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    cleanup(&config).await;
    rethrow(outcome)
}

async fn run(config: &stone_kit::StoneConfig, shutdown: &Shutdown) -> TestResult {
    let blue = TestUpstream::start("blue", shutdown).await?;
    let green = TestUpstream::start("green", shutdown).await?;
    let client = client();

    // The history the worker must replay: the upstream first pointed elsewhere, then at blue.
    let (_nats, js) = stone_kit::nats::connect_and_provision(config, "proxy-test").await?;
    publish_config(&js, config, EntitySpec::Upstream(upstream_spec("app", &[(green.address, 1)])), 1).await?;
    publish_config(&js, config, EntitySpec::Upstream(upstream_spec("app", &[(blue.address, 1)])), 2).await?;
    let replayed_seq = publish_config(&js, config, EntitySpec::Route(route_spec("api", &["/api/*"], "app")), 1).await?;

    let proxy = stone_proxy::build(config, shutdown).await?;
    let readyz = format!("http://{}/readyz", proxy.admin_addr);
    assert!(
        eventually(100, || async { get(&client, &readyz).await.ok().map(|(status, _)| status) == Some(200) }).await
    );
    let url = format!("http://{}/api/items/1", proxy.listen_addr);
    assert_eq!(get(&client, &url).await?, (200, "blue".to_owned()), "the replayed state is in force when ready");

    // A change published now reaches the worker without a restart.
    let live_seq =
        publish_config(&js, config, EntitySpec::Upstream(upstream_spec("app", &[(green.address, 1)])), 3).await?;
    let switched = eventually(100, || async {
        get(&client, &url).await.map(|(_, upstream)| upstream == "green").unwrap_or(false)
    })
    .await;
    assert!(switched, "traffic moved to green after the live change");

    // Each request event carries the config sequence that routed it.
    let mut sequences: Vec<u64> = Vec::new();
    for _ in 0..50 {
        sequences = read_events(&js, config, "request.>")
            .await?
            .iter()
            .filter_map(|event| match event {
                stone_events::Event::RequestCompleted(envelope) => Some(envelope.config_seq),
                _ => None,
            })
            .collect();
        if sequences.last() == Some(&live_seq) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sequences.last(), Some(&live_seq), "{sequences:?}");
    assert_eq!(sequences.first(), Some(&replayed_seq), "{sequences:?}");

    // The worker is in the registry with its status and config sequence.
    let bucket = js.get_key_value(config.namespace().bucket_name("WORKERS")).await?;
    let mut record = serde_json::Value::Null;
    for _ in 0..150 {
        if let Ok(Some(value)) = bucket.get(&proxy.worker_id).await {
            record = serde_json::from_slice(&value)?;
        }
        if record["status"] == "ready" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(record["status"], "ready", "{record}");
    assert_eq!(record["worker"], proxy.worker_id.as_str());

    // The gateway lists it at GET /v1/workers, with the config sequence in force.
    let workers_state = stone_gateway::workers::WorkersState { js: js.clone(), namespace: config.namespace() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gateway_addr = listener.local_addr()?;
    let token = shutdown.token();
    tokio::spawn(stone_kit::admin::serve(listener, stone_gateway::workers::routes(workers_state), token));
    let mut listed = serde_json::Value::Null;
    for _ in 0..150 {
        let response = client
            .request(hyper::Request::get(format!("http://{gateway_addr}/v1/workers")).body(Default::default())?)
            .await?;
        listed = serde_json::from_slice(&http_body_util::BodyExt::collect(response.into_body()).await?.to_bytes())?;
        if listed["workers"][0]["config_seq"] == live_seq {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listed["workers"].as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed["workers"][0]["worker"], proxy.worker_id.as_str(), "{listed}");
    assert_eq!(listed["workers"][0]["status"], "ready", "{listed}");
    assert_eq!(listed["workers"][0]["config_seq"], live_seq, "{listed}");
    let keys: Vec<String> = bucket.keys().await?.filter_map(|key| async move { key.ok() }).collect().await;
    assert_eq!(keys, vec![proxy.worker_id.clone()]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_config_stream_is_ready_at_once_and_answers_404() -> TestResult {
    let shutdown = Shutdown::new();
    let config = isolated_config();
    let outcome = caught(async {
        let proxy = stone_proxy::build(&config, &shutdown).await?;
        let client = client();
        let readyz = format!("http://{}/readyz", proxy.admin_addr);
        assert!(
            eventually(100, || async { get(&client, &readyz).await.ok().map(|(status, _)| status) == Some(200) }).await
        );
        assert_eq!(get(&client, &format!("http://{}/anything", proxy.listen_addr)).await?.0, 404);
        Ok(())
    })
    .await;
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    cleanup(&config).await;
    rethrow(outcome)
}
