//! The live stream in a real browser: headless Chromium (Debian's package, installed by
//! `infra/test.sh`) opens the gateway's `/ui/live` page, whose `EventSource` must receive the
//! events published to the stream.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::jetstream;
use stone_events::Envelope;
use stone_events::request::{CacheStatus, RequestCompleted};
use stone_kit::Shutdown;

fn request(index: u64) -> RequestCompleted {
    RequestCompleted {
        method: "GET".into(),
        host: "browser.test".into(),
        route: "web".into(),
        path_template: "/page/{n}".into(),
        path: format!("/page/{index}"),
        upstream: Some("site".into()),
        target: None,
        consumer: None,
        client_ip: None,
        protocol: "HTTP/2".into(),
        status: 200,
        total_us: 1_500,
        upstream_us: None,
        ttfb_us: None,
        bytes_in: 0,
        bytes_out: 512,
        cache: CacheStatus::Hit,
        error: None,
        rate_limit: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_source_in_headless_chromium_receives_the_stream() {
    let config = stone_kit::testing::isolated("b");
    stone_kit::testing::create_database(&config).await.unwrap();
    let shutdown = Shutdown::new();
    let gateway = stone_gateway::build(&config, &shutdown).await.unwrap();
    let js = jetstream::new(async_nats::connect(config.nats_url.as_str()).await.unwrap());
    const PUBLISHED: u64 = 12;
    for index in 0..PUBLISHED {
        let envelope = Envelope::new("browser-test", 0, request(index));
        let subject = config.namespace().event_subject(&envelope, config.partitions);
        js.publish(subject, envelope.to_json().unwrap().into()).await.unwrap().await.unwrap();
    }

    let pool = sqlx::PgPool::connect(&config.database_url).await.unwrap();
    let token =
        stone_gateway::auth::create_token(&pool, "browser", stone_gateway::auth::Scope::Read).await.unwrap().token;
    pool.close().await;
    let url =
        format!("http://{}/ui/live?route=web&from_seq=0&limit={PUBLISHED}&access_token={token}", gateway.local_addr());
    let profile = std::env::temp_dir().join(format!("stone-chromium-{}", config.namespace));
    // coreutils' `timeout` bounds a hung browser; std's Command runs on a blocking thread.
    let arguments = [
        "60".to_owned(),
        "chromium".to_owned(),
        "--headless".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--disable-quic".to_owned(),
        "--no-first-run".to_owned(),
        "--disable-background-networking".to_owned(),
        "--disable-component-update".to_owned(),
        "--disable-sync".to_owned(),
        "--virtual-time-budget=5000".to_owned(),
        "--dump-dom".to_owned(),
        format!("--user-data-dir={}", profile.display()),
        url,
    ];
    let output = tokio::task::spawn_blocking(move || std::process::Command::new("timeout").args(arguments).output())
        .await
        .unwrap()
        .expect("chromium is installed (infra/test.sh installs Debian's package)");
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&output.stdout);

    let received = dom
        .split("data-received=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|count| count.parse::<u64>().ok());
    assert_eq!(received, Some(PUBLISHED), "the page's EventSource got every event; DOM: {dom}");
    assert!(dom.contains("/page/11"), "the last event is rendered");

    let _ = shutdown.drain(Duration::from_secs(5)).await;
    stone_kit::testing::cleanup(&config).await;
}
