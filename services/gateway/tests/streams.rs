//! `GET /v1/streams/events` over a real socket against real NATS: filters applied in the server,
//! `id:` is the stream sequence, `Last-Event-ID` resumes without gaps or duplicates, live events
//! arrive, bad filters get 400, and open streams are bounded.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use stone_events::request::{CacheStatus, RequestCompleted};
use stone_events::{Envelope, EventData};
use stone_kit::testing::{caught, rethrow};
use stone_kit::{Shutdown, StoneConfig};

fn request(route: &str, status: u16, total_us: u64) -> RequestCompleted {
    RequestCompleted {
        method: "GET".into(),
        host: "h".into(),
        route: route.into(),
        path_template: "/x".into(),
        path: "/x".into(),
        upstream: Some("u".into()),
        target: None,
        consumer: None,
        client_ip: None,
        protocol: "HTTP/1.1".into(),
        status,
        total_us,
        upstream_us: None,
        ttfb_us: None,
        bytes_in: 0,
        bytes_out: 10,
        cache: CacheStatus::None,
        error: None,
        rate_limit: None,
    }
}

struct App {
    config: StoneConfig,
    shutdown: Shutdown,
    base: String,
    js: jetstream::Context,
    /// A read-scope token.
    token: String,
    pool: sqlx::PgPool,
}

impl App {
    async fn start(max_streams: usize) -> App {
        let mut config = stone_kit::testing::isolated("s");
        stone_kit::testing::create_database(&config).await.unwrap();
        config.gateway.max_streams = max_streams;
        let shutdown = Shutdown::new();
        let gateway = stone_gateway::build(&config, &shutdown).await.unwrap();
        let js = jetstream::new(async_nats::connect(config.nats_url.as_str()).await.unwrap());
        let pool = sqlx::PgPool::connect(&config.database_url).await.unwrap();
        let token =
            stone_gateway::auth::create_token(&pool, "reader", stone_gateway::auth::Scope::Read).await.unwrap().token;
        App { base: format!("http://{}", gateway.local_addr()), config, shutdown, js, token, pool }
    }

    async fn publish<T: EventData>(&self, data: T) -> u64 {
        let envelope = Envelope::new("test", 0, data);
        let subject = self.config.namespace().event_subject(&envelope, self.config.partitions);
        let ack = self.js.publish(subject, envelope.to_json().unwrap().into()).await.unwrap();
        ack.await.unwrap().sequence
    }

    async fn open(&self, query: &str, last_event_id: Option<u64>) -> (u16, SseReader) {
        self.open_as(query, last_event_id, Some(&self.token)).await
    }

    async fn open_as(&self, query: &str, last_event_id: Option<u64>, token: Option<&str>) -> (u16, SseReader) {
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let mut builder = hyper::Request::get(format!("{}/v1/streams/events?{query}", self.base))
            .header("accept", "text/event-stream");
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        if let Some(id) = last_event_id {
            builder = builder.header("last-event-id", id.to_string());
        }
        let response = client.request(builder.body(Empty::new()).unwrap()).await.unwrap();
        (response.status().as_u16(), SseReader { body: response.into_body(), buffer: String::new() })
    }

    async fn finish(self) {
        self.pool.close().await;
        let _ = self.shutdown.drain(Duration::from_secs(5)).await;
        stone_kit::testing::cleanup(&self.config).await;
    }
}

/// A minimal SSE parser: enough to read `id`, `event` and `data` of each event.
struct SseReader {
    body: Incoming,
    buffer: String,
}

#[derive(Debug)]
struct Sse {
    id: Option<u64>,
    event: String,
    data: String,
}

impl SseReader {
    async fn next_event(&mut self) -> Sse {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Sse { id: None, event: "message".into(), data: String::new() };
                let mut comment_only = true;
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("id:") {
                        event.id = value.trim().parse().ok();
                        comment_only = false;
                    } else if let Some(value) = line.strip_prefix("event:") {
                        event.event = value.trim().to_owned();
                        comment_only = false;
                    } else if let Some(value) = line.strip_prefix("data:") {
                        event.data.push_str(value.trim_start());
                        comment_only = false;
                    }
                }
                if comment_only {
                    continue; // heartbeat
                }
                return event;
            }
            let frame = tokio::time::timeout(Duration::from_secs(20), self.body.frame())
                .await
                .expect("an event within 20 s")
                .expect("stream still open")
                .unwrap();
            if let Some(data) = frame.data_ref() {
                self.buffer.push_str(&String::from_utf8_lossy(data));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_stream_resumes_without_gaps_or_duplicates() {
    let app = App::start(8).await;
    let outcome = caught(async {
        let mut wanted = Vec::new();
        for index in 0..10u64 {
            let route = if index % 2 == 0 { "checkout" } else { "search" };
            let sequence = app.publish(request(route, 200 + (index as u16 % 2) * 300, 1_000 * index)).await;
            if route == "checkout" {
                wanted.push(sequence);
            }
        }

        let (status, mut reader) = app.open("route=checkout&from_seq=0", None).await;
        assert_eq!(status, 200);
        let mut seen = Vec::new();
        for _ in 0..3 {
            let event = reader.next_event().await;
            assert_eq!(event.event, "request.completed");
            let body: serde_json::Value = serde_json::from_str(&event.data).unwrap();
            assert_eq!(body["data"]["route"], "checkout");
            assert_eq!(body["version"], 2);
            seen.push(event.id.unwrap());
        }
        drop(reader);

        // Resume after the last one seen: exactly the rest, in order.
        let (status, mut resumed) = app.open("route=checkout", seen.last().copied()).await;
        assert_eq!(status, 200);
        for _ in 0..2 {
            seen.push(resumed.next_event().await.id.unwrap());
        }
        assert_eq!(seen, wanted);

        // Live: an event published now arrives on the open stream.
        let live = app.publish(request("checkout", 200, 5)).await;
        assert_eq!(resumed.next_event().await.id, Some(live));
        drop(resumed);

        // Post-decode filters: exact status and minimum latency.
        let (_, mut slow) = app.open("status=500&min_latency_ms=5&from_seq=0", None).await;
        let first = slow.next_event().await;
        let body: serde_json::Value = serde_json::from_str(&first.data).unwrap();
        assert_eq!(body["data"]["status"], 500);
        assert!(body["data"]["total_us"].as_u64().unwrap() >= 5_000);
        drop(slow);
    })
    .await;
    app.finish().await;
    rethrow(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_filters_and_too_many_streams_are_refused() {
    let app = App::start(1).await;
    let outcome = caught(async {
        // No token, a bad token, then the token as a query parameter (how browsers send it).
        assert_eq!(app.open_as("", None, None).await.0, 401);
        assert_eq!(app.open_as("", None, Some("stn_nope_nope")).await.0, 401);
        let (status, query_token_stream) = app.open_as(&format!("access_token={}", app.token), None, None).await;
        assert_eq!(status, 200);
        drop(query_token_stream);
        assert_eq!(app.open("route=bad.name", None).await.0, 400);
        assert_eq!(app.open("colour=blue", None).await.0, 400);
        // The slot comes back once the server notices the disconnect: wait for it, bounded.
        let mut first = None;
        for _ in 0..100 {
            let (status, stream) = app.open("", None).await;
            if status == 200 {
                first = Some(stream);
                break;
            }
            assert_eq!(status, 503);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(first.is_some(), "the stream slot was released");
        let (status, _) = app.open("", None).await;
        assert_eq!(status, 503, "only one stream may be open");
    })
    .await;
    app.finish().await;
    rethrow(outcome)
}
