//! Rate limits with GCRA (the generic cell rate algorithm): one timestamp per key, the
//! theoretical arrival time (TAT), so a limit costs one small value whatever its size.
//!
//! `requests` per `window` gives an emission interval `T = window / requests`; a request at `now`
//! is allowed when `max(TAT, now) + T - window <= now`, and then moves TAT forward by `T`. That
//! allows a burst of `requests` and a steady `requests / window` after it.
//!
//! Limits are shared by every worker through Redis, where one Lua script reads and moves the TAT
//! atomically with Redis' own clock (so worker clocks do not matter). When Redis does not answer
//! within `proxy.rate_limit_timeout_ms`, `proxy.rate_limit_failure` decides: `open` (default)
//! lets the request through, `closed` answers 503; both are counted. Without a Redis URL the
//! limits are local to the worker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use stone_kit::config::RateLimitFailureMode;
use tokio::sync::OnceCell;

/// What a limit key is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitBy {
    /// The authenticated consumer (the client IP for anonymous requests).
    Consumer,
    Ip,
    /// One budget for the whole route.
    Route,
}

/// A compiled rate-limit policy.
#[derive(Debug, Clone)]
pub struct RateLimit {
    /// The policy name, recorded in events.
    pub policy: String,
    pub requests: u64,
    pub window: Duration,
    pub by: LimitBy,
}

impl RateLimit {
    /// Parses a `rate_limit` policy's settings: `requests`, `window_secs`, `by`.
    pub fn from_settings(
        policy: &str,
        settings: &std::collections::BTreeMap<String, serde_json::Value>,
    ) -> Result<Self, String> {
        let number = |key: &str| settings.get(key).and_then(serde_json::Value::as_u64);
        let requests = number("requests").filter(|value| *value > 0).ok_or("settings.requests: a positive integer")?;
        let window_secs =
            number("window_secs").filter(|value| *value > 0).ok_or("settings.window_secs: a positive integer")?;
        let by = match settings.get("by").and_then(serde_json::Value::as_str) {
            None | Some("consumer") => LimitBy::Consumer,
            Some("ip") => LimitBy::Ip,
            Some("route") => LimitBy::Route,
            Some(other) => return Err(format!("settings.by: {other:?} is not consumer, ip or route")),
        };
        Ok(Self { policy: policy.to_owned(), requests, window: Duration::from_secs(window_secs), by })
    }

    fn interval_micros(&self) -> u64 {
        (u64::try_from(self.window.as_micros()).unwrap_or(u64::MAX) / self.requests).max(1)
    }

    fn window_micros(&self) -> u64 {
        u64::try_from(self.window.as_micros()).unwrap_or(u64::MAX)
    }
}

/// The outcome for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed {
        remaining: u64,
        /// Until the whole budget is available again (the TAT minus now).
        reset: Duration,
    },
    Limited {
        retry_after: Duration,
        /// Until the whole budget is available again.
        reset: Duration,
    },
    /// The shared store did not answer; the failure mode let the request through.
    FailedOpen,
    /// The shared store did not answer; the failure mode refused the request.
    FailedClosed,
}

/// One GCRA step: the decision and the new TAT (all in microseconds).
fn gcra(tat: Option<u64>, now: u64, interval: u64, window: u64) -> (Verdict, Option<u64>) {
    let start = tat.unwrap_or(now).max(now);
    let new_tat = start.saturating_add(interval);
    let allow_at = new_tat.saturating_sub(window);
    if now < allow_at {
        let (retry_after, reset) = (Duration::from_micros(allow_at - now), Duration::from_micros(start - now));
        return (Verdict::Limited { retry_after, reset }, None);
    }
    let used = new_tat - now;
    let remaining = window.saturating_sub(used) / interval;
    (Verdict::Allowed { remaining, reset: Duration::from_micros(used) }, Some(new_tat))
}

/// GCRA in Redis: KEYS[1] the key; ARGV interval and window in microseconds. Returns
/// `{allowed, retry_after_us, remaining, reset_us}`. The key expires when its TAT has passed.
const GCRA_SCRIPT: &str = r"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - window
if now < allow_at then
  return {0, allow_at - now, 0, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0, math.floor((window - (new_tat - now)) / interval), new_tat - now}
";

/// Local TATs: sharded so workers' threads rarely meet on one lock.
struct LocalStore {
    shards: Vec<Mutex<HashMap<String, u64>>>,
    epoch: Instant,
}

const LOCAL_SHARDS: usize = 16;
/// Past this many keys in a shard, expired ones are swept on the next insert.
const LOCAL_SWEEP_AT: usize = 10_000;

impl LocalStore {
    fn check(&self, key: &str, limit: &RateLimit) -> Verdict {
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let shard_index = (fnv(key.as_bytes()) % LOCAL_SHARDS as u64) as usize;
        let Some(Ok(mut shard)) = self.shards.get(shard_index).map(|shard| shard.lock()) else {
            return Verdict::FailedOpen;
        };
        let (verdict, new_tat) = gcra(shard.get(key).copied(), now, limit.interval_micros(), limit.window_micros());
        if let Some(tat) = new_tat {
            if shard.len() > LOCAL_SWEEP_AT {
                shard.retain(|_, tat| *tat > now);
            }
            shard.insert(key.to_owned(), tat);
        }
        verdict
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

/// Settings of the limiter.
#[derive(Debug, Clone)]
pub struct LimiterSettings {
    /// Redis for shared limits; `None` keeps limits local to the worker.
    pub redis_url: Option<String>,
    pub timeout: Duration,
    pub failure_mode: RateLimitFailureMode,
    /// Key prefix, so deployments (and tests) sharing a Redis do not share budgets.
    pub key_prefix: String,
}

/// The worker's rate limiter; clones share state.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<LimiterInner>,
}

struct LimiterInner {
    settings: LimiterSettings,
    local: LocalStore,
    redis_client: Option<redis::Client>,
    /// Connected lazily so a worker starts (and proxies) while Redis is down.
    redis: OnceCell<ConnectionManager>,
    script: redis::Script,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Limiter")
            .field("shared", &self.inner.redis_client.is_some())
            .field("failure_mode", &self.inner.settings.failure_mode)
            .finish()
    }
}

impl Limiter {
    pub fn new(settings: LimiterSettings) -> Result<Self, String> {
        let redis_client = match &settings.redis_url {
            Some(url) => Some(redis::Client::open(url.as_str()).map_err(|error| format!("redis_url: {error}"))?),
            None => None,
        };
        Ok(Self {
            inner: Arc::new(LimiterInner {
                local: LocalStore {
                    shards: (0..LOCAL_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                    epoch: Instant::now(),
                },
                redis_client,
                redis: OnceCell::new(),
                script: redis::Script::new(GCRA_SCRIPT),
                settings,
            }),
        })
    }

    /// Decides for one request; never waits longer than the configured timeout.
    pub async fn check(&self, limit: &RateLimit, route: &str, subject: &str) -> Verdict {
        let key = format!("{}:rl:{}:{route}:{subject}", self.inner.settings.key_prefix, limit.policy);
        let verdict = match &self.inner.redis_client {
            None => self.inner.local.check(&key, limit),
            Some(client) => {
                match tokio::time::timeout(self.inner.settings.timeout, self.shared(client, &key, limit)).await {
                    Ok(Ok(verdict)) => verdict,
                    Ok(Err(error)) => self.failed(&error.to_string()),
                    Err(_) => self.failed("timeout"),
                }
            }
        };
        let outcome = match verdict {
            Verdict::Allowed { .. } => "allowed",
            Verdict::Limited { .. } => "limited",
            Verdict::FailedOpen => "fail_open",
            Verdict::FailedClosed => "fail_closed",
        };
        metrics::counter!("stone_proxy_rate_limit_decisions_total", "outcome" => outcome).increment(1);
        verdict
    }

    fn failed(&self, reason: &str) -> Verdict {
        tracing::debug!(reason, "rate-limit store unavailable");
        match self.inner.settings.failure_mode {
            RateLimitFailureMode::Open => Verdict::FailedOpen,
            RateLimitFailureMode::Closed => Verdict::FailedClosed,
        }
    }

    async fn shared(&self, client: &redis::Client, key: &str, limit: &RateLimit) -> redis::RedisResult<Verdict> {
        let connection = self.inner.redis.get_or_try_init(|| ConnectionManager::new(client.clone())).await?;
        let mut connection = connection.clone();
        let (allowed, retry_after_us, remaining, reset_us): (i64, i64, i64, i64) = self
            .inner
            .script
            .key(key)
            .arg(limit.interval_micros())
            .arg(limit.window_micros())
            .invoke_async(&mut connection)
            .await?;
        Ok(if allowed == 1 {
            Verdict::Allowed {
                remaining: u64::try_from(remaining).unwrap_or(0),
                reset: Duration::from_micros(u64::try_from(reset_us).unwrap_or(0)),
            }
        } else {
            Verdict::Limited {
                retry_after: Duration::from_micros(u64::try_from(retry_after_us).unwrap_or(0)),
                reset: Duration::from_micros(u64::try_from(reset_us).unwrap_or(0)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_allows_a_burst_then_the_steady_rate() {
        // 4 requests per 4 s: interval 1 s.
        let (interval, window) = (1_000_000, 4_000_000);
        let mut tat = None;
        let mut remaining = Vec::new();
        for _ in 0..4 {
            let (verdict, new_tat) = gcra(tat, 0, interval, window);
            let Verdict::Allowed { remaining: left, reset } = verdict else { panic!("{verdict:?}") };
            remaining.push(left);
            assert_eq!(reset, Duration::from_secs(4 - left), "the budget is whole again one interval per use");
            tat = new_tat;
        }
        assert_eq!(remaining, [3, 2, 1, 0]);
        let (verdict, _) = gcra(tat, 0, interval, window);
        assert_eq!(verdict, Verdict::Limited { retry_after: Duration::from_secs(1), reset: Duration::from_secs(4) });
        let (verdict, _) = gcra(tat, 1_000_000, interval, window);
        assert!(matches!(verdict, Verdict::Allowed { remaining: 0, .. }), "one more after one interval: {verdict:?}");
    }

    #[test]
    fn settings_are_parsed_with_the_field_in_errors() {
        let settings = |value: serde_json::Value| -> std::collections::BTreeMap<String, serde_json::Value> {
            serde_json::from_value(value).unwrap_or_default()
        };
        let limit = RateLimit::from_settings(
            "p",
            &settings(serde_json::json!({"requests": 10, "window_secs": 60, "by": "ip"})),
        );
        assert!(matches!(limit, Ok(RateLimit { requests: 10, by: LimitBy::Ip, .. })));
        let missing = RateLimit::from_settings("p", &settings(serde_json::json!({"window_secs": 60}))).err();
        assert!(missing.is_some_and(|message| message.contains("requests")));
    }
}
