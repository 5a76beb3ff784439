//! Layered configuration: defaults, then a TOML file, then `STONE_*` environment variables.
//!
//! Nested keys use a double underscore in the environment: `proxy.listen` is
//! `STONE_PROXY__LISTEN`. Unknown keys are rejected (a typo must not silently fall back to a
//! default), and every error names the key so the process can stop before anything binds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use stone_events::Namespace;
use stone_events::config::{RouteSpec, UpstreamSpec};
use stone_events::streams::EventsRetention;

/// A secret value: serialised as itself (configuration must round-trip) but never shown by Debug.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// Every setting of every service. One type keeps `stone dev` (all services in one process) and
/// the separate binaries reading the same keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoneConfig {
    /// Subject root and stream-name prefix; change it only to run several deployments on one NATS.
    pub namespace: String,
    pub nats_url: String,
    /// Postgres URL; may carry a password, so it is only ever logged redacted.
    pub database_url: String,
    pub clickhouse_url: String,
    pub clickhouse_database: String,
    pub clickhouse_user: String,
    pub clickhouse_password: Secret,
    /// Compression of ClickHouse request and response bodies: `lz4`, `none`, or `auto` (none
    /// when the server is on this host, where compressing only costs CPU; LZ4 otherwise).
    pub clickhouse_compression: ClickHouseCompression,
    pub redis_url: String,
    /// Partitions of the EVENTS subjects; projector instances split them between themselves.
    pub partitions: u16,
    /// How long in-flight work may take to finish after a shutdown signal.
    pub shutdown_grace_ms: u64,
    pub events: EventsStreamConfig,
    pub telemetry: TelemetryConfig,
    pub proxy: ProxyConfig,
    pub gateway: GatewayConfig,
    pub analytics: AnalyticsConfig,
}

impl Default for StoneConfig {
    fn default() -> Self {
        Self {
            namespace: "stone".to_owned(),
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            database_url: "postgres://postgres@127.0.0.1:5432/postgres".to_owned(),
            clickhouse_url: "http://127.0.0.1:8123".to_owned(),
            clickhouse_database: "stone".to_owned(),
            clickhouse_user: "default".to_owned(),
            clickhouse_password: Secret::default(),
            clickhouse_compression: ClickHouseCompression::Auto,
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            partitions: stone_events::subjects::DEFAULT_PARTITIONS,
            shutdown_grace_ms: 10_000,
            events: EventsStreamConfig::default(),
            telemetry: TelemetryConfig::default(),
            proxy: ProxyConfig::default(),
            gateway: GatewayConfig::default(),
            analytics: AnalyticsConfig::default(),
        }
    }
}

/// The EVENTS stream: the replay window and its limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsStreamConfig {
    pub max_age_secs: u64,
    pub max_bytes: i64,
    pub duplicate_window_secs: u64,
    /// Stream replicas: 1 on a single server, 3 on a cluster.
    pub replicas: usize,
}

impl Default for EventsStreamConfig {
    fn default() -> Self {
        let retention = EventsRetention::default();
        Self {
            max_age_secs: retention.max_age.as_secs(),
            max_bytes: retention.max_bytes,
            duplicate_window_secs: retention.duplicate_window.as_secs(),
            replicas: 1,
        }
    }
}

/// Output format of logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// A `tracing` filter, e.g. `info` or `info,stone_proxy=debug`.
    pub log: String,
    pub log_format: LogFormat,
    /// OTLP/HTTP traces endpoint, e.g. `http://127.0.0.1:4318/v1/traces`; off when empty.
    pub otlp_endpoint: String,
    /// Fraction of root traces sampled when exporting, 0.0 to 1.0.
    pub trace_sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log: "info".to_owned(),
            log_format: LogFormat::Text,
            otlp_endpoint: String::new(),
            trace_sample_ratio: 0.01,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Worker id in events; `proxy-<hostname>-<pid>` when empty.
    pub worker_id: String,
    pub connect_timeout_ms: u64,
    /// Default upstream response timeout; routes may override it.
    pub upstream_timeout_ms: u64,
    /// Events held in memory waiting for NATS; beyond it events are dropped and counted.
    pub event_queue_capacity: usize,
    /// Publishes awaiting a JetStream ack at once.
    pub publish_max_in_flight: usize,
    /// Routes and upstreams used when running from a file (standalone mode).
    pub routes: Vec<RouteSpec>,
    pub upstreams: Vec<UpstreamSpec>,
    /// Where routing comes from: the CONFIG stream, the file's `routes`/`upstreams`, or `auto`
    /// (the file when it defines any, else the stream).
    pub config_source: ConfigSource,
    /// Folder of the disk spool that holds events while NATS is unreachable (one worker per folder).
    pub spool_dir: PathBuf,
    /// Size bound of the disk spool; beyond it events are dropped, counted and reported.
    pub spool_max_bytes: u64,
    /// What a shared rate limit does when Redis cannot answer in time.
    pub rate_limit_failure: RateLimitFailureMode,
    /// Bound on one Redis rate-limit call; past it the failure mode decides.
    pub rate_limit_timeout_ms: u64,
    /// Largest request body accepted (413 beyond); routes may lower it.
    pub max_request_body_bytes: u64,
    /// Retries allowed as a fraction of requests (plus a small floor), so retries cannot amplify an outage.
    pub retry_budget_ratio: f64,
    /// Emit events; off only for benchmarks that compare against a proxy without logging.
    pub emit_events: bool,
    /// The TLS listener, beside the plain one; off while no certificate is configured.
    pub tls: ProxyTlsConfig,
    /// How often a JWT route's JWKS (file or URL) is read again; a failed refresh keeps the keys.
    pub jwks_refresh_secs: u64,
    /// The response cache of routes with a cache policy (`[proxy.cache]`).
    pub cache: ProxyCacheConfig,
}

/// The response cache's tiers and bounds (the per-route policy is the route's `cache` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyCacheConfig {
    /// Bound of the in-process tier of each worker, in bytes (keys, headers and bodies); 0 keeps
    /// nothing in memory, so every lookup goes to Redis.
    pub memory_max_bytes: u64,
    /// Use the Redis tier at `redis_url`, shared by every worker (memory only when off or
    /// unreachable at start).
    pub redis: bool,
    /// Bound on one Redis cache call; past it a lookup is a miss and a store is skipped.
    pub redis_timeout_ms: u64,
    /// Bound on connecting to Redis at start; past it the worker caches in memory only.
    pub redis_connect_timeout_ms: u64,
    /// How long concurrent misses for one key wait for the one fetch in flight before fetching
    /// themselves.
    pub coalesce_wait_ms: u64,
    /// Evictions from the memory tier are summed and reported as one `cache.evicted` event per
    /// reason per this interval (never one event per eviction).
    pub eviction_report_interval_ms: u64,
}

impl Default for ProxyCacheConfig {
    fn default() -> Self {
        Self {
            memory_max_bytes: 256 * 1024 * 1024,
            redis: true,
            redis_timeout_ms: 200,
            redis_connect_timeout_ms: 3_000,
            coalesce_wait_ms: 5_000,
            eviction_report_interval_ms: 10_000,
        }
    }
}

impl ProxyCacheConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.memory_max_bytes > 1 << 40 {
            return Err(invalid("proxy.cache.memory_max_bytes", "must be at most 1 TiB (1099511627776)"));
        }
        if !(1..=10_000).contains(&self.redis_timeout_ms) {
            return Err(invalid("proxy.cache.redis_timeout_ms", "must be between 1 and 10000"));
        }
        if !(1..=60_000).contains(&self.redis_connect_timeout_ms) {
            return Err(invalid("proxy.cache.redis_connect_timeout_ms", "must be between 1 and 60000"));
        }
        if self.coalesce_wait_ms > 60_000 {
            return Err(invalid("proxy.cache.coalesce_wait_ms", "must be at most 60000"));
        }
        if !(1_000..=3_600_000).contains(&self.eviction_report_interval_ms) {
            return Err(invalid("proxy.cache.eviction_report_interval_ms", "must be between 1000 and 3600000"));
        }
        Ok(())
    }
}

/// The proxy's TLS listener (rustls): HTTP/2 or HTTP/1.1, as ALPN negotiates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyTlsConfig {
    pub listen: SocketAddr,
    /// PEM file with the certificate chain, leaf first; empty keeps TLS off.
    pub cert_path: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_path: PathBuf,
}

impl ProxyTlsConfig {
    /// Whether the TLS listener runs: a certificate and a key are configured.
    pub fn enabled(&self) -> bool {
        !self.cert_path.as_os_str().is_empty()
    }
}

impl Default for ProxyTlsConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 8443)), cert_path: PathBuf::new(), key_path: PathBuf::new() }
    }
}

/// See [`StoneConfig::clickhouse_compression`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClickHouseCompression {
    #[default]
    Auto,
    Lz4,
    None,
}

/// Source of a worker's routing configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigSource {
    #[default]
    Auto,
    Stream,
    File,
}

/// Behaviour of shared rate limits while Redis is unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitFailureMode {
    /// Let requests through (counted as `rate_limit` decision `fail_open`).
    #[default]
    Open,
    /// Answer 503 while the limit cannot be checked.
    Closed,
}

impl ProxyConfig {
    /// Whether routing comes from the file rather than the CONFIG stream.
    pub fn uses_file_routes(&self) -> bool {
        match self.config_source {
            ConfigSource::File => true,
            ConfigSource::Stream => false,
            ConfigSource::Auto => !self.routes.is_empty() || !self.upstreams.is_empty(),
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9180)),
            worker_id: String::new(),
            connect_timeout_ms: 2_000,
            upstream_timeout_ms: 30_000,
            event_queue_capacity: 16_384,
            publish_max_in_flight: 4_096,
            routes: Vec::new(),
            upstreams: Vec::new(),
            config_source: ConfigSource::Auto,
            spool_dir: PathBuf::from(".stone/spool"),
            spool_max_bytes: 1024 * 1024 * 1024,
            rate_limit_failure: RateLimitFailureMode::Open,
            rate_limit_timeout_ms: 50,
            max_request_body_bytes: 16 * 1024 * 1024,
            retry_budget_ratio: 0.2,
            emit_events: true,
            tls: ProxyTlsConfig::default(),
            jwks_refresh_secs: 300,
            cache: ProxyCacheConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// Live event streams (SSE) open at once; more are refused with 503.
    pub max_streams: usize,
    /// Events buffered per stream for a slow client; past it the client gets a `lagged` event.
    pub stream_buffer: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 8081)), max_streams: 256, stream_buffer: 1024 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalyticsConfig {
    pub admin_listen: SocketAddr,
    /// Durable consumer name prefix.
    pub consumer: String,
    /// A batch is inserted when it has this many rows…
    pub batch_max_rows: usize,
    /// …or when its oldest event has waited this long.
    pub batch_max_wait_ms: u64,
    /// Inserts this instance runs at once, across its partitions. A partition whose batch is
    /// ready waits for a slot and meanwhile keeps adding what arrives (up to `batch_max_rows`),
    /// so a slow ClickHouse receives fewer, larger inserts instead of more concurrent small ones.
    pub insert_concurrency: usize,
    /// An insert without an answer this long is abandoned and retried with the same rows and
    /// deduplication tokens, so a connection that hangs cannot hold an insert slot forever.
    pub insert_timeout_ms: u64,
    /// This instance's name in partition leases; `analytics-<hostname>-<pid>` when empty.
    pub instance_id: String,
    /// A partition lease not renewed for this long may be taken over by another instance.
    pub lease_ttl_ms: u64,
    /// Days raw rows (`requests`, `cache_events`, `health_events`) and minute rollups are kept.
    pub retention_days: u32,
    /// Days hourly rollups are kept.
    pub rollup_retention_days: u32,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        Self {
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9181)),
            consumer: "analytics".to_owned(),
            batch_max_rows: 20_000,
            batch_max_wait_ms: 200,
            insert_concurrency: 2,
            insert_timeout_ms: 30_000,
            instance_id: String::new(),
            lease_ttl_ms: 10_000,
            retention_days: 30,
            rollup_retention_days: 400,
        }
    }
}

/// A configuration error that names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Figment(String),
    #[error("invalid configuration: key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("configuration file {path}: {message}")]
    File { path: PathBuf, message: String },
}

/// `STONE_*` variables read by the command-line clients (`--config`, `stone apply`, `stone tail`),
/// not by the services: the loader must not reject them as unknown keys.
const CLIENT_VARIABLES: [&str; 3] = ["config", "gateway_url", "token"];

impl StoneConfig {
    /// Loads defaults, then `file` (if given, it must exist), then `STONE_*` variables, and
    /// validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, Env::prefixed("STONE_").split("__").ignore(&CLIENT_VARIABLES))
    }

    /// As [`Self::load`] with an explicit environment provider (tests pass their own).
    pub fn load_from(file: Option<&Path>, environment: Env) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(StoneConfig::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::File { path: path.to_owned(), message: "no such file".to_owned() });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let config: StoneConfig = figment.merge(environment).extract().map_err(|error| {
            // figment reports every error with the key path and the source that set it.
            let messages: Vec<String> = error.into_iter().map(|error| error.to_string()).collect();
            ConfigError::Figment(messages.join("; "))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Namespace::new(&self.namespace).map_err(|error| invalid("namespace", error))?;
        check_url("nats_url", &self.nats_url, &["nats", "tls", "ws", "wss"])?;
        check_url("database_url", &self.database_url, &["postgres", "postgresql"])?;
        check_url("clickhouse_url", &self.clickhouse_url, &["http", "https"])?;
        check_url("redis_url", &self.redis_url, &["redis", "rediss"])?;
        check_identifier("clickhouse_database", &self.clickhouse_database)?;
        if !(1..=1024).contains(&self.partitions) {
            return Err(invalid("partitions", "must be between 1 and 1024"));
        }
        if self.events.duplicate_window_secs < stone_events::streams::MIN_DUPLICATE_WINDOW.as_secs() {
            return Err(invalid(
                "events.duplicate_window_secs",
                "must be at least 120 (publishers retry across restarts)",
            ));
        }
        if self.events.max_age_secs == 0 {
            return Err(invalid("events.max_age_secs", "must be positive: it is the replay window"));
        }
        if !(0.0..=1.0).contains(&self.telemetry.trace_sample_ratio) {
            return Err(invalid("telemetry.trace_sample_ratio", "must be between 0.0 and 1.0"));
        }
        if !self.telemetry.otlp_endpoint.is_empty() {
            check_url("telemetry.otlp_endpoint", &self.telemetry.otlp_endpoint, &["http", "https"])?;
        }
        tracing_subscriber::EnvFilter::try_new(&self.telemetry.log).map_err(|error| invalid("telemetry.log", error))?;
        if self.proxy.event_queue_capacity == 0 {
            return Err(invalid("proxy.event_queue_capacity", "must be positive"));
        }
        if self.proxy.publish_max_in_flight == 0 {
            return Err(invalid("proxy.publish_max_in_flight", "must be positive"));
        }
        if !(0.0..=1.0).contains(&self.proxy.retry_budget_ratio) {
            return Err(invalid("proxy.retry_budget_ratio", "must be between 0.0 and 1.0"));
        }
        if self.proxy.spool_dir.as_os_str().is_empty() {
            return Err(invalid("proxy.spool_dir", "must name a folder"));
        }
        let tls = &self.proxy.tls;
        match (tls.cert_path.as_os_str().is_empty(), tls.key_path.as_os_str().is_empty()) {
            (true, false) => return Err(invalid("proxy.tls.cert_path", "must be set with proxy.tls.key_path")),
            (false, true) => return Err(invalid("proxy.tls.key_path", "must be set with proxy.tls.cert_path")),
            _ => {}
        }
        if tls.enabled() && tls.listen == self.proxy.listen {
            return Err(invalid("proxy.tls.listen", "must differ from proxy.listen"));
        }
        if self.proxy.jwks_refresh_secs == 0 {
            return Err(invalid("proxy.jwks_refresh_secs", "must be positive"));
        }
        self.proxy.cache.validate()?;
        if !(1..=1_000_000).contains(&self.analytics.batch_max_rows) {
            // One batch must stay one ClickHouse block per table and day (max_insert_block_size).
            return Err(invalid("analytics.batch_max_rows", "must be between 1 and 1000000"));
        }
        if !(1..=64).contains(&self.analytics.insert_concurrency) {
            return Err(invalid("analytics.insert_concurrency", "must be between 1 and 64"));
        }
        if !(100..=3_600_000).contains(&self.analytics.insert_timeout_ms) {
            return Err(invalid("analytics.insert_timeout_ms", "must be between 100 and 3600000"));
        }
        if self.analytics.lease_ttl_ms < 1_000 {
            return Err(invalid("analytics.lease_ttl_ms", "must be at least 1000"));
        }
        if self.analytics.retention_days == 0 || self.analytics.rollup_retention_days == 0 {
            let key = if self.analytics.retention_days == 0 { "retention_days" } else { "rollup_retention_days" };
            return Err(invalid(&format!("analytics.{key}"), "must be positive"));
        }
        check_identifier("analytics.consumer", &self.analytics.consumer)?;
        Ok(())
    }

    pub fn namespace(&self) -> Namespace {
        // validate() has checked it; the default namespace is the only sane fallback.
        Namespace::new(&self.namespace).unwrap_or_default()
    }

    pub fn events_retention(&self) -> EventsRetention {
        EventsRetention {
            max_age: Duration::from_secs(self.events.max_age_secs),
            max_bytes: self.events.max_bytes,
            duplicate_window: Duration::from_secs(self.events.duplicate_window_secs),
        }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

fn invalid(key: &str, message: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid { key: key.to_owned(), message: message.to_string() }
}

fn check_url(key: &str, value: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let scheme = value.split_once("://").map(|(scheme, _)| scheme);
    let host_present = value.split_once("://").is_some_and(|(_, rest)| !rest.is_empty());
    match scheme {
        Some(scheme) if schemes.contains(&scheme) && host_present => Ok(()),
        _ => Err(invalid(key, format!("{value:?} is not a URL with scheme {}", schemes.join(" or ")))),
    }
}

fn check_identifier(key: &str, value: &str) -> Result<(), ConfigError> {
    let valid = !value.is_empty()
        && value.len() <= 64
        && value.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
        && !value.as_bytes()[0].is_ascii_digit();
    if valid {
        Ok(())
    } else {
        Err(invalid(key, format!("{value:?} must be letters, digits and '_', not starting with a digit")))
    }
}

#[cfg(test)]
mod tests {
    use figment::Jail;

    use super::*;

    /// Loads through the real providers inside a `Jail`, which sandboxes the working directory
    /// and environment variables.
    #[allow(clippy::result_large_err)] // figment::Jail fixes the closure's error type
    fn load_in_jail(toml: Option<&str>, env: &[(&str, &str)]) -> Result<StoneConfig, String> {
        let mut outcome = Err(String::new());
        Jail::expect_with(|jail| {
            // The suite runs with the local stack's STONE_* variables exported; start clean.
            jail.clear_env();
            if let Some(text) = toml {
                jail.create_file("stone.toml", text)?;
            }
            for (key, value) in env {
                jail.set_env(key, value);
            }
            outcome = StoneConfig::load(toml.map(|_| Path::new("stone.toml"))).map_err(|error| error.to_string());
            Ok(())
        });
        outcome
    }

    #[test]
    fn defaults_are_valid_and_match_the_documented_ports() -> Result<(), String> {
        let config = load_in_jail(None, &[])?;
        assert_eq!(config.proxy.listen.port(), 8080);
        assert_eq!(config.proxy.admin_listen.port(), 9180);
        assert_eq!(config.gateway.listen.port(), 8081);
        assert_eq!(config.namespace().stream_name("EVENTS"), "EVENTS");
        Ok(())
    }

    #[test]
    fn file_then_environment_override_defaults() -> Result<(), String> {
        let config = load_in_jail(
            Some("nats_url = \"nats://10.0.0.1:4222\"\n[proxy]\nlisten = \"0.0.0.0:9000\"\n"),
            &[
                ("STONE_PROXY__LISTEN", "127.0.0.1:9001"),
                ("STONE_CONFIG", "ignored.toml"),
                // Read by `stone apply`/`stone tail`, not by the services.
                ("STONE_GATEWAY_URL", "http://127.0.0.1:8081"),
                ("STONE_TOKEN", "stn_x_y"),
            ],
        )?;
        assert_eq!(config.nats_url, "nats://10.0.0.1:4222");
        assert_eq!(config.proxy.listen.port(), 9001);
        assert!(!config.proxy.tls.enabled(), "TLS is off by default");
        let tls = load_in_jail(
            Some("[proxy.tls]\nlisten = \"0.0.0.0:8443\"\ncert_path = \"cert.pem\"\n"),
            &[("STONE_PROXY__TLS__KEY_PATH", "key.pem")],
        )?;
        assert!(tls.proxy.tls.enabled());
        assert_eq!(tls.proxy.tls.key_path, Path::new("key.pem"));
        Ok(())
    }

    #[test]
    fn errors_name_the_key() {
        let unknown = load_in_jail(Some("[proxy]\nlistne = \"0.0.0.0:9000\"\n"), &[]).err();
        assert!(unknown.as_deref().is_some_and(|m| m.contains("listne")), "{unknown:?}");
        let bad_type = load_in_jail(Some("[proxy]\nlisten = \"not an address\"\n"), &[]).err();
        assert!(bad_type.as_deref().is_some_and(|m| m.contains("proxy.listen")), "{bad_type:?}");
        let bad_url = load_in_jail(None, &[("STONE_NATS_URL", "localhost")]).err();
        assert!(bad_url.as_deref().is_some_and(|m| m.contains("nats_url")), "{bad_url:?}");
        let bad_window = load_in_jail(Some("[events]\nduplicate_window_secs = 5\n"), &[]).err();
        assert!(bad_window.as_deref().is_some_and(|m| m.contains("events.duplicate_window_secs")), "{bad_window:?}");
        let half_tls = load_in_jail(Some("[proxy.tls]\ncert_path = \"cert.pem\"\n"), &[]).err();
        assert!(half_tls.as_deref().is_some_and(|m| m.contains("proxy.tls.key_path")), "{half_tls:?}");
        let no_inserts = load_in_jail(Some("[analytics]\ninsert_concurrency = 0\n"), &[]).err();
        assert!(no_inserts.as_deref().is_some_and(|m| m.contains("analytics.insert_concurrency")), "{no_inserts:?}");
        let no_timeout = load_in_jail(None, &[("STONE_ANALYTICS__INSERT_TIMEOUT_MS", "0")]).err();
        assert!(no_timeout.as_deref().is_some_and(|m| m.contains("analytics.insert_timeout_ms")), "{no_timeout:?}");
        let bad_env_type = load_in_jail(None, &[("STONE_PARTITIONS", "many")]).err();
        assert!(
            bad_env_type.as_deref().is_some_and(|m| m.contains("STONE_") && m.contains("PARTITIONS")),
            "{bad_env_type:?}"
        );
    }

    #[test]
    fn cache_settings_are_keys_with_checked_bounds() -> Result<(), String> {
        let config = load_in_jail(
            Some("[proxy.cache]\nmemory_max_bytes = 1048576\ncoalesce_wait_ms = 250\n"),
            &[("STONE_PROXY__CACHE__REDIS_TIMEOUT_MS", "20"), ("STONE_PROXY__CACHE__REDIS", "false")],
        )?;
        assert_eq!(config.proxy.cache.memory_max_bytes, 1_048_576);
        assert_eq!(config.proxy.cache.coalesce_wait_ms, 250);
        assert_eq!(config.proxy.cache.redis_timeout_ms, 20);
        assert!(!config.proxy.cache.redis);
        assert_eq!(config.proxy.cache.eviction_report_interval_ms, 10_000);
        let zero_timeout = load_in_jail(Some("[proxy.cache]\nredis_timeout_ms = 0\n"), &[]).err();
        assert!(
            zero_timeout.as_deref().is_some_and(|m| m.contains("proxy.cache.redis_timeout_ms")),
            "{zero_timeout:?}"
        );
        let long_wait = load_in_jail(None, &[("STONE_PROXY__CACHE__COALESCE_WAIT_MS", "600000")]).err();
        assert!(long_wait.as_deref().is_some_and(|m| m.contains("proxy.cache.coalesce_wait_ms")), "{long_wait:?}");
        let typo = load_in_jail(Some("[proxy.cache]\nmemory_max_byte = 1\n"), &[]).err();
        assert!(typo.as_deref().is_some_and(|m| m.contains("memory_max_byte")), "{typo:?}");
        let chatty = load_in_jail(Some("[proxy.cache]\neviction_report_interval_ms = 10\n"), &[]).err();
        assert!(chatty.as_deref().is_some_and(|m| m.contains("proxy.cache.eviction_report_interval_ms")), "{chatty:?}");
        Ok(())
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let config = StoneConfig { clickhouse_password: Secret("hunter2".into()), ..StoneConfig::default() };
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn missing_file_is_an_error() {
        let result = StoneConfig::load_from(Some(Path::new("/nonexistent/stone.toml")), Env::prefixed("STONE_NOPE_"));
        assert!(matches!(result, Err(ConfigError::File { .. })));
    }
}
