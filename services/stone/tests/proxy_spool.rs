//! Events survive NATS outages: the proxy keeps answering, spools events to disk, publishes them
//! once NATS is back with exact counts (no loss, no duplicates), and a worker stopped while NATS
//! is down leaves its events in the spool for the next start. A spool folder belongs to one
//! worker at a time.
//!
//! The outage tests run their own nats-server on a free port so that they can stop and restart it.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod proxy_support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use proxy_support::*;
use stone_kit::testing::{caught, rethrow};
use stone_kit::{Shutdown, StoneConfig};

/// A private nats-server with JetStream; its store survives restarts.
struct PrivateNats {
    port: u16,
    store: PathBuf,
    child: Option<Child>,
}

impl PrivateNats {
    async fn start() -> Result<Self, BoxError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let store = std::env::temp_dir().join(format!("stone-nats-test-{}", uuid::Uuid::now_v7().simple()));
        let mut nats = Self { port, store, child: None };
        nats.restart().await?;
        Ok(nats)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn restart(&mut self) -> Result<(), BoxError> {
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("nats-server did not start".into())
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

fn config_for(nats: &PrivateNats, upstream: &TestUpstream) -> StoneConfig {
    let mut config = isolated_config();
    config.nats_url = nats.url();
    config.proxy.upstreams = vec![upstream_spec("backend", &[(upstream.address, 1)])];
    config.proxy.routes = vec![route_spec("items", &["/items/{id}"], "backend")];
    config
}

async fn send(client: &TestClient, proxy: &stone_proxy::RunningProxy, count: usize) -> TestResult {
    for index in 0..count {
        let (status, _) = get(client, &format!("http://{}/items/{index}", proxy.listen_addr)).await?;
        assert_eq!(status, 200, "requests never wait on NATS");
    }
    Ok(())
}

/// Waits until the stream holds `expected` request events, then checks it stays there.
async fn assert_request_events(config: &StoneConfig, expected: u64) -> TestResult {
    let mut count = 0;
    for _ in 0..300 {
        if let Ok(js) = jetstream(config).await {
            count = count_events(&js, config, "request.>").await.unwrap_or(0);
            if count >= expected {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count, expected);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let js = jetstream(config).await?;
    assert_eq!(count_events(&js, config, "request.>").await?, expected, "no duplicates arrive later");
    assert_eq!(count_events(&js, config, "health.events_lost.>").await?, 0, "nothing was lost");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_survive_a_nats_outage_through_the_disk_spool() -> TestResult {
    let mut nats = PrivateNats::start().await?;
    let shutdown = Shutdown::new();
    let upstream = TestUpstream::start("backend", &shutdown).await?;
    let config = config_for(&nats, &upstream);
    let outcome = caught(async {
        let proxy = stone_proxy::build(&config, &shutdown).await?;
        let client = client();
        send(&client, &proxy, 50).await?;
        nats.stop();
        send(&client, &proxy, 100).await?;
        let spool = config.proxy.spool_dir.join("events.spool");
        let spooled =
            eventually(100, || async { std::fs::metadata(&spool).map(|meta| meta.len() > 0).unwrap_or(false) }).await;
        assert!(spooled, "events went to the disk spool while NATS was down");
        nats.restart().await?;
        assert_request_events(&config, 150).await?;
        let drained =
            eventually(100, || async { std::fs::metadata(&spool).map(|meta| meta.len() == 0).unwrap_or(false) }).await;
        assert!(drained, "the spool is emptied once published");
        Ok(())
    })
    .await;
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&config.proxy.spool_dir);
    rethrow(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_during_an_outage_keeps_its_events_for_the_next_start() -> TestResult {
    let mut nats = PrivateNats::start().await?;
    let upstreams = Shutdown::new();
    let upstream = TestUpstream::start("backend", &upstreams).await?;
    let config = config_for(&nats, &upstream);
    let outcome = caught(async {
        let first = Shutdown::new();
        let proxy = stone_proxy::build(&config, &first).await?;
        let client = client();
        send(&client, &proxy, 10).await?;
        let js = jetstream(&config).await?;
        assert!(eventually(100, || async { count_events(&js, &config, "request.>").await.unwrap_or(0) == 10 }).await);
        nats.stop();
        send(&client, &proxy, 30).await?;
        // SIGTERM equivalent: stop accepting, finish, flush what is held.
        first.drain(Duration::from_secs(10)).await?;
        let spool = config.proxy.spool_dir.join("events.spool");
        assert!(std::fs::metadata(&spool)?.len() > 0, "the stopped worker left its events in the spool");

        nats.restart().await?;
        let second = Shutdown::new();
        let restarted = stone_proxy::build(&config, &second).await;
        let checked = match restarted {
            Ok(_) => assert_request_events(&config, 40).await,
            Err(error) => Err(error.into()),
        };
        let _ = second.drain(Duration::from_secs(10)).await;
        checked
    })
    .await;
    let _ = upstreams.drain(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(&config.proxy.spool_dir);
    rethrow(outcome)
}

/// The publisher sends most events without asking for an acknowledgement and confirms them by a
/// barrier (an acknowledged publish) at the end of each batch. With NATS connected but the
/// stream gone (deleted, or JetStream without quorum), plain publishes vanish without an error:
/// only the refused barrier says so. Every event since the last confirmed barrier must then go
/// to the spool and arrive, each once, when the stream is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_refused_by_a_missing_stream_are_spooled_and_arrive_once_it_is_back() -> TestResult {
    let shutdown = Shutdown::new();
    let upstream = TestUpstream::start("backend", &shutdown).await?;
    let mut config = isolated_config();
    config.proxy.upstreams = vec![upstream_spec("backend", &[(upstream.address, 1)])];
    config.proxy.routes = vec![route_spec("items", &["/items/{id}"], "backend")];
    let outcome = caught(async {
        let proxy = stone_proxy::build(&config, &shutdown).await?;
        let client = client();
        send(&client, &proxy, 20).await?;
        let js = jetstream(&config).await?;
        assert!(eventually(100, || async { count_events(&js, &config, "request.>").await.unwrap_or(0) == 20 }).await);

        let events_stream = config.namespace().stream_name("EVENTS");
        js.delete_stream(&events_stream).await?;
        send(&client, &proxy, 30).await?;
        let spool = config.proxy.spool_dir.join("events.spool");
        let spooled =
            eventually(100, || async { std::fs::metadata(&spool).map(|meta| meta.len() > 0).unwrap_or(false) }).await;
        assert!(spooled, "events refused by JetStream went to the disk spool");

        let specs = stone_events::streams::all_streams(&config.namespace(), config.events_retention());
        stone_kit::nats::ensure_streams(&js, &specs, 1).await?;
        // The stream came back empty: exactly the 30 requests made while it was gone.
        assert_request_events(&config, 30).await?;
        Ok(())
    })
    .await;
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    cleanup(&config).await;
    rethrow(outcome)
}

/// Sums `dropped` over the `health.events_lost` events in the stream.
async fn reported_losses(config: &StoneConfig) -> Result<(u64, Vec<String>), BoxError> {
    let js = jetstream(config).await?;
    let mut dropped = 0;
    let mut reasons = Vec::new();
    for event in read_events(&js, config, "health.events_lost.>").await? {
        if let stone_events::Event::EventsLost(envelope) = event {
            dropped += envelope.data.dropped;
            reasons.push(envelope.data.reason);
        }
    }
    Ok((dropped, reasons))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_spool_cap_events_are_dropped_counted_and_reported() -> TestResult {
    let mut nats = PrivateNats::start().await?;
    let shutdown = Shutdown::new();
    let upstream = TestUpstream::start("backend", &shutdown).await?;
    let mut config = config_for(&nats, &upstream);
    // Room for a few request events only.
    config.proxy.spool_max_bytes = 3_000;
    let outcome = caught(async {
        let proxy = stone_proxy::build(&config, &shutdown).await?;
        let client = client();
        send(&client, &proxy, 5).await?;
        let js = jetstream(&config).await?;
        assert!(eventually(100, || async { count_events(&js, &config, "request.>").await.unwrap_or(0) == 5 }).await);
        nats.stop();
        // Let the client notice, so every event of the outage takes the spool path.
        tokio::time::sleep(Duration::from_millis(500)).await;
        send(&client, &proxy, 20).await?;
        nats.restart().await?;
        // Every request is either in the stream or in a loss report: nothing vanishes silently.
        let mut seen = (0, 0);
        for _ in 0..300 {
            let published = match jetstream(&config).await {
                Ok(js) => count_events(&js, &config, "request.>").await.unwrap_or(0),
                Err(_) => 0,
            };
            let (dropped, _) = reported_losses(&config).await.unwrap_or_default();
            seen = (published, dropped);
            if published + dropped >= 25 && dropped > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (published, dropped) = seen;
        assert_eq!(published + dropped, 25, "published {published}, reported lost {dropped}");
        assert!(published > 5, "some events fit in the spool and were published: {published}");
        let (_, reasons) = reported_losses(&config).await?;
        assert!(reasons.iter().all(|reason| reason == "spool_full"), "{reasons:?}");
        Ok(())
    })
    .await;
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&config.proxy.spool_dir);
    rethrow(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_on_the_same_spool_folder_is_refused_naming_it() -> TestResult {
    let config = isolated_config();
    let first = Shutdown::new();
    let second = Shutdown::new();
    let outcome = caught(async {
        let proxy = stone_proxy::build(&config, &first).await?;
        let mut other = config.clone();
        other.proxy.worker_id = format!("{}-other", config.proxy.worker_id);
        let refused = stone_proxy::build(&other, &second).await;
        let message = refused.as_ref().err().map(|error| format!("{error:#}")).unwrap_or_default();
        assert!(refused.is_err(), "two workers must not share a spool folder");
        assert!(message.contains(&config.proxy.spool_dir.display().to_string()), "{message}");
        assert!(message.contains("another worker"), "{message}");
        // The first worker is unaffected.
        assert_eq!(get(&client(), &format!("http://{}/x", proxy.listen_addr)).await?.0, 404);

        // Once the first worker has stopped, the folder is free again.
        first.drain(Duration::from_secs(10)).await?;
        let third = Shutdown::new();
        let restarted = stone_proxy::build(&other, &third).await.map(|_| ());
        let _ = third.drain(Duration::from_secs(10)).await;
        restarted?;
        Ok(())
    })
    .await;
    let _ = first.drain(Duration::from_secs(10)).await;
    let _ = second.drain(Duration::from_secs(10)).await;
    cleanup(&config).await;
    rethrow(outcome)
}
