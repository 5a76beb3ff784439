//! One config API under test: a gateway on port 0 and a config projector, over their own NATS
//! namespace (own CONFIG stream) and their own Postgres database, both removed by `finish`.

#![allow(dead_code, clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use sqlx::PgPool;
use stone_events::config::ConfigState;
use stone_gateway::auth::{Scope, create_token};
use stone_kit::{Shutdown, StoneConfig};

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

pub struct ConfigApp {
    pub config: StoneConfig,
    pub shutdown: Shutdown,
    pub projector: Shutdown,
    pub base: String,
    pub http: Client<HttpConnector, Full<Bytes>>,
    pub admin: String,
    pub pool: PgPool,
    pub js: jetstream::Context,
}

/// A response: status, headers, JSON body (`Null` when empty or not JSON).
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    pub fn seq(&self) -> u64 {
        self.body["stream_seq"].as_u64().unwrap_or(0)
    }
}

impl ConfigApp {
    pub async fn spawn() -> TestResult<Self> {
        let config = stone_kit::testing::isolated("cfg");
        stone_kit::testing::create_database(&config).await?;
        let shutdown = Shutdown::new();
        let gateway = stone_gateway::build(&config, &shutdown).await?;
        let projector = Shutdown::new();
        stone_config_projector::build(&config, &projector).await?;
        let pool = PgPool::connect(&config.database_url).await?;
        let admin = create_token(&pool, "admin", Scope::Admin).await?.token;
        let js = jetstream::new(async_nats::connect(config.nats_url.as_str()).await?);
        Ok(Self {
            base: format!("http://{}", gateway.local_addr()),
            config,
            shutdown,
            projector,
            http: Client::builder(TokioExecutor::new()).build_http(),
            admin,
            pool,
            js,
        })
    }

    pub async fn token(&self, name: &str, scope: Scope) -> TestResult<String> {
        Ok(create_token(&self.pool, name, scope).await?.token)
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> TestResult<Answer> {
        let mut request = Request::builder().method(method).uri(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let payload = body.map(|value| Bytes::from(serde_json::to_vec(&value).unwrap())).unwrap_or_default();
        let response =
            self.http.request(request.header("content-type", "application/json").body(Full::new(payload))?).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await?.to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Answer { status, headers, body })
    }

    /// As the admin.
    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> TestResult<Answer> {
        self.call(method, path, Some(&self.admin.clone()), body, &[]).await
    }

    /// Stops the projector and starts a new one (a crash and restart, from its point of view).
    pub async fn restart_projector(&mut self) -> TestResult {
        let _ = self.projector.drain(Duration::from_secs(5)).await;
        self.projector = Shutdown::new();
        stone_config_projector::build(&self.config, &self.projector).await?;
        Ok(())
    }

    /// The last sequence of the CONFIG stream.
    pub async fn last_seq(&self) -> TestResult<u64> {
        Ok(stone_kit::config_stream::last_sequence(&self.js, &self.config.namespace()).await?)
    }

    /// Waits until the projection's checkpoint reaches `seq`.
    pub async fn wait_projected(&self, pool: &PgPool, seq: u64) -> TestResult {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while stone_config_projector::checkpoint(pool).await? < seq {
            assert!(tokio::time::Instant::now() < deadline, "projection did not reach {seq}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// The fold of the whole CONFIG stream, as every reader computes it.
    pub async fn fold(&self) -> TestResult<ConfigState> {
        let last = self.last_seq().await?;
        let mut state = ConfigState::default();
        if last == 0 {
            return Ok(state);
        }
        let mut records =
            std::pin::pin!(stone_kit::config_stream::follow(&self.js, &self.config.namespace(), 1).await?);
        while let Some(record) = tokio::time::timeout(Duration::from_secs(10), records.next()).await? {
            let record = record?;
            let sequence = record.stream_seq();
            if let stone_kit::config_stream::Followed::Change(change) = record {
                state.apply(sequence, change.envelope.data);
            }
            if sequence >= last {
                break;
            }
        }
        Ok(state)
    }

    /// The raw payloads of the CONFIG stream.
    pub async fn raw_stream(&self) -> TestResult<Vec<String>> {
        let last = self.last_seq().await?;
        let stream = self.js.get_stream(self.config.namespace().stream_name("CONFIG")).await?;
        let mut payloads = Vec::new();
        for sequence in 1..=last {
            let message = stream.get_raw_message(sequence).await?;
            payloads.push(String::from_utf8_lossy(&message.payload).into_owned());
        }
        Ok(payloads)
    }

    /// Stops the services; the streams and the database go when the app is dropped.
    pub async fn finish(self) {
        let _ = self.projector.drain(Duration::from_secs(5)).await;
        let _ = self.shutdown.drain(Duration::from_secs(5)).await;
        self.pool.close().await;
    }
}

impl Drop for ConfigApp {
    /// Cleans up also when a test fails half-way (the drop runs while unwinding): on a thread of
    /// its own with its own runtime, because the test's runtime may be the one unwinding.
    fn drop(&mut self) {
        self.shutdown.trigger();
        self.projector.trigger();
        let config = self.config.clone();
        let cleanup = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                runtime.block_on(stone_kit::testing::cleanup(&config));
            }
        });
        let _ = cleanup.join();
    }
}
