//! What the analytics tests share: an isolated configuration (own NATS namespace, own ClickHouse
//! database, port 0), synthetic events published straight to JetStream, bounded waits for exact
//! counts, the rollups-agree-with-raw check, and cleanup.

#![allow(dead_code, clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stone_analytics::synthetic::{self, Publisher};
use stone_kit::StoneConfig;
use time::OffsetDateTime;

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

/// A configuration isolated to one test.
pub fn isolated_config() -> StoneConfig {
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let suffix = &unique[unique.len() - 10..];
    let mut config = StoneConfig {
        namespace: format!("a{suffix}"),
        nats_url: env_or("STONE_NATS_URL", "nats://127.0.0.1:4222"),
        clickhouse_url: env_or("STONE_CLICKHOUSE_URL", "http://127.0.0.1:8123"),
        clickhouse_database: format!("analytics_{suffix}"),
        partitions: 4,
        shutdown_grace_ms: 5_000,
        ..StoneConfig::default()
    };
    // Small, so parallel tests do not exhaust the server's JetStream storage reservations.
    config.events.max_bytes = 256 * 1024 * 1024;
    config.analytics.batch_max_wait_ms = 50;
    config.analytics.batch_max_rows = 5_000;
    config.analytics.lease_ttl_ms = 3_000;
    config.analytics.admin_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.gateway.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config
}

/// The environment that makes a `stone` child process use `config`.
pub fn child_env(config: &StoneConfig) -> Vec<(String, String)> {
    vec![
        ("STONE_NAMESPACE".into(), config.namespace.clone()),
        ("STONE_NATS_URL".into(), config.nats_url.clone()),
        ("STONE_CLICKHOUSE_URL".into(), config.clickhouse_url.clone()),
        ("STONE_CLICKHOUSE_DATABASE".into(), config.clickhouse_database.clone()),
        ("STONE_PARTITIONS".into(), config.partitions.to_string()),
        ("STONE_EVENTS__MAX_BYTES".into(), config.events.max_bytes.to_string()),
        ("STONE_ANALYTICS__ADMIN_LISTEN".into(), "127.0.0.1:0".into()),
        ("STONE_ANALYTICS__BATCH_MAX_ROWS".into(), config.analytics.batch_max_rows.to_string()),
        ("STONE_ANALYTICS__BATCH_MAX_WAIT_MS".into(), config.analytics.batch_max_wait_ms.to_string()),
        ("STONE_ANALYTICS__LEASE_TTL_MS".into(), config.analytics.lease_ttl_ms.to_string()),
        ("STONE_TELEMETRY__LOG".into(), "warn,stone_analytics=info".into()),
    ]
}

/// Connects to NATS and provisions the test's streams.
pub async fn jetstream(config: &StoneConfig) -> TestResult<async_nats::jetstream::Context> {
    let (_client, js) = stone_kit::nats::connect_and_provision(config, "analytics-test").await?;
    Ok(js)
}

pub fn publisher(config: &StoneConfig, js: &async_nats::jetstream::Context) -> Publisher {
    Publisher::new(js.clone(), config.namespace(), config.partitions, 2_048)
}

/// Publishes synthetic requests `first..first + count`, timed `time`.
pub async fn publish_requests(publisher: &mut Publisher, first: u64, count: u64, time: OffsetDateTime) -> TestResult {
    for index in first..first + count {
        publisher.publish(&synthetic::request(index, time)).await?;
    }
    publisher.flush().await?;
    Ok(())
}

pub fn clickhouse(config: &StoneConfig) -> clickhouse::Client {
    stone_kit::clickhouse::client(config)
}

/// Rows in `requests` (0 while the table does not exist yet).
pub async fn raw_count(config: &StoneConfig) -> u64 {
    clickhouse(config).query("SELECT count() FROM requests").fetch_one::<u64>().await.unwrap_or(0)
}

/// Waits until `requests` has `expected` rows (or `timeout` passes) and returns the last count.
pub async fn wait_for_count(config: &StoneConfig, expected: u64, timeout: Duration) -> u64 {
    let started = Instant::now();
    loop {
        let count = raw_count(config).await;
        if count >= expected || started.elapsed() > timeout {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asserts exactly-once in raw rows and rollups: `expected` rows, `expected` distinct event ids,
/// and every rollup agreeing with an aggregate over the raw rows, group by group.
pub async fn assert_exactly_once(config: &StoneConfig, expected: u64) -> TestResult {
    let client = clickhouse(config);
    let (rows, distinct): (u64, u64) =
        client.query("SELECT count(), uniqExact(event_id) FROM requests").fetch_one().await?;
    assert_eq!((rows, distinct), (expected, expected), "raw rows and distinct event ids");
    for rollup in ["requests_1m", "requests_1h"] {
        let bucket = if rollup == "requests_1m" { "toStartOfMinute(time)" } else { "toStartOfHour(time)" };
        // One insert writes the raw part first and its views' blocks after it, so a reader can see
        // the raw rows of the last insert before its rollup rows: wait for them (bounded).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let total = loop {
            let total: u64 = client.query(&format!("SELECT sum(requests) FROM {rollup}")).fetch_one().await?;
            if total >= expected || tokio::time::Instant::now() > deadline {
                break total;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(total, expected, "{rollup} total");
        // Groups where the rollup and the raw aggregate disagree on count or bytes.
        let sql = format!(
            "SELECT count() FROM ( \
               SELECT bucket, route, path_template, upstream, consumer, status, cache, \
                      sum(requests) AS requests, sum(bytes_out) AS bytes_out \
               FROM {rollup} GROUP BY bucket, route, path_template, upstream, consumer, status, cache \
             ) AS rolled FULL OUTER JOIN ( \
               SELECT {bucket} AS bucket, route, path_template, upstream, consumer, status, cache, \
                      count() AS requests, sum(bytes_out) AS bytes_out \
               FROM requests GROUP BY bucket, route, path_template, upstream, consumer, status, cache \
             ) AS raw USING (bucket, route, path_template, upstream, consumer, status, cache) \
             WHERE rolled.requests != raw.requests OR rolled.bytes_out != raw.bytes_out"
        );
        let disagreeing: u64 = client.query(&sql).fetch_one().await?;
        assert_eq!(disagreeing, 0, "{rollup} groups disagreeing with raw rows");
    }
    Ok(())
}

/// An isolated configuration (namespace and database named from `prefix`) for a projector that
/// commits small batches quickly and hands partitions over within seconds.
pub fn quick_projector_config(prefix: &str) -> StoneConfig {
    let mut config = stone_kit::testing::isolated(prefix);
    config.partitions = 4;
    config.analytics.batch_max_wait_ms = 50;
    config.analytics.batch_max_rows = 2_000;
    config.analytics.lease_ttl_ms = 3_000;
    config
}

/// Runs a test's body, then deletes its streams, KV buckets and databases
/// (`stone_kit::testing::cleanup`) whether the body returned or panicked: a failed assertion
/// must not leave a namespace (and its stream reservations) behind on the shared server.
pub async fn with_cleanup(config: &StoneConfig, test: impl std::future::Future<Output = TestResult>) -> TestResult {
    let outcome = stone_kit::testing::caught(test).await;
    stone_kit::testing::cleanup(config).await;
    stone_kit::testing::rethrow(outcome)
}

/// A `stone analytics` child process, killed (SIGKILL) when dropped.
pub struct ProjectorProcess {
    pub child: std::process::Child,
}

impl ProjectorProcess {
    pub fn start(config: &StoneConfig, instance: &str) -> TestResult<Self> {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_stone"));
        command.arg("analytics").envs(child_env(config)).env("STONE_ANALYTICS__INSTANCE_ID", instance);
        command.stdout(std::process::Stdio::null());
        Ok(Self { child: command.spawn()? })
    }

    /// SIGKILL: no drain, no release, no flush.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProjectorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP relay in front of ClickHouse that a test can switch off (`set_up(false)`: every open
/// connection is cut and new ones are closed at once, as a crashed or unreachable server would)
/// or close (`set_open(false)`: bytes from clients wait in the relay, neither failed nor answered,
/// as a server that stops answering, until it opens again).
pub struct Relay {
    pub address: SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<std::sync::Mutex<tokio_util::sync::CancellationToken>>,
    open: tokio::sync::watch::Sender<bool>,
    /// Client reads currently held by a closed relay.
    held: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
}

impl Relay {
    /// A relay to the ClickHouse of `config`, up and open.
    pub async fn start(config: &StoneConfig) -> TestResult<Self> {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_util::sync::CancellationToken;

        let upstream = config.clickhouse_url.trim_start_matches("http://").trim_end_matches('/').to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let up = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let (open, _) = tokio::sync::watch::channel(true);
        let held = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let relay = Self { address, up, connections, open, held, stop };
        let (up, connections, open, held, stop) =
            (relay.up.clone(), relay.connections.clone(), relay.open.clone(), relay.held.clone(), relay.stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = stop.cancelled() => return,
                };
                let Ok((client, _)) = accepted else { continue };
                if !up.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let cut = connections.lock().unwrap().clone();
                let (upstream, mut open, held, stop) = (upstream.clone(), open.subscribe(), held.clone(), stop.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let down = tokio::io::copy(&mut server_read, &mut client_write);
                    let up = async {
                        let mut buffer = vec![0u8; 64 * 1024];
                        loop {
                            let read = client_read.read(&mut buffer).await?;
                            if read == 0 {
                                return server_write.shutdown().await;
                            }
                            if !*open.borrow_and_update() {
                                held.fetch_add(1, Ordering::SeqCst);
                                let opened = open.wait_for(|open| *open).await.map(|_| ());
                                held.fetch_sub(1, Ordering::SeqCst);
                                opened.map_err(std::io::Error::other)?;
                            }
                            server_write.write_all(&buffer[..read]).await?;
                        }
                    };
                    tokio::select! {
                        _ = down => {}
                        _ = up => {}
                        () = cut.cancelled() => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
        });
        Ok(relay)
    }

    /// This configuration with ClickHouse reached through the relay.
    pub fn route(&self, config: &StoneConfig) -> StoneConfig {
        let mut routed = config.clone();
        routed.clickhouse_url = format!("http://{}", self.address);
        routed
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            let mut connections = self.connections.lock().unwrap();
            connections.cancel();
            *connections = tokio_util::sync::CancellationToken::new();
        }
    }

    pub fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }

    /// Client reads the closed relay is holding.
    pub fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
