//! Upstream pools and target selection: smooth weighted round robin, least-request (power of two
//! choices) and consistent hashing, all skipping targets that health checks have taken out.
//!
//! A target's health lives in a [`TargetHealth`] shared through the [`HealthRegistry`], not in
//! the target itself, so that a config change which rebuilds the routing table keeps what the
//! worker has learnt about each target.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use stone_events::config::{HashOn, LbAlgorithm, PassiveHealthSpec, UpstreamSpec};

/// What one worker knows about one target's health; shared across routing-table generations.
#[derive(Debug)]
pub struct TargetHealth {
    /// Requests to this target still in progress (least-request uses it).
    pub in_flight: AtomicU64,
    /// Set by the active checker; a target it declared down gets no traffic.
    pub active_down: AtomicBool,
    /// Consecutive failures of real traffic.
    pub consecutive_failures: AtomicU32,
    /// Ejections in a row without a success in between; doubles the ejection time.
    pub ejections: AtomicU32,
    /// Milliseconds since the registry's epoch until which the target is ejected (0: not ejected).
    ejected_until_ms: AtomicU64,
    /// Whether a `health.target_down` (passive) is outstanding, so recovery reports `target_up` once.
    pub passive_down_reported: AtomicBool,
    epoch: Instant,
}

impl TargetHealth {
    fn new(epoch: Instant) -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            active_down: AtomicBool::new(false),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            passive_down_reported: AtomicBool::new(false),
            epoch,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the target may receive traffic now.
    pub fn is_available(&self) -> bool {
        !self.active_down.load(Ordering::Relaxed) && self.ejected_until_ms.load(Ordering::Relaxed) <= self.now_ms()
    }

    /// Takes the target out of rotation for `duration`.
    pub fn eject_for(&self, duration: Duration) {
        let until = self.now_ms().saturating_add(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
        self.ejected_until_ms.store(until, Ordering::Relaxed);
    }
}

/// Health of every target this worker routes to, by (upstream, target URL).
#[derive(Debug)]
pub struct HealthRegistry {
    targets: Mutex<HashMap<(String, String), Arc<TargetHealth>>>,
    epoch: Instant,
}

impl Default for HealthRegistry {
    fn default() -> Self {
        Self { targets: Mutex::new(HashMap::new()), epoch: Instant::now() }
    }
}

impl HealthRegistry {
    /// The health record of a target, created healthy on first sight.
    pub fn get(&self, upstream: &str, target: &str) -> Arc<TargetHealth> {
        let Ok(mut targets) = self.targets.lock() else {
            return Arc::new(TargetHealth::new(self.epoch));
        };
        Arc::clone(
            targets
                .entry((upstream.to_owned(), target.to_owned()))
                .or_insert_with(|| Arc::new(TargetHealth::new(self.epoch))),
        )
    }

    /// Forgets targets that are no longer configured.
    pub fn retain(&self, keep: &[(String, String)]) {
        if let Ok(mut targets) = self.targets.lock() {
            targets.retain(|key, _| keep.contains(key));
        }
    }
}

/// One target of an upstream.
#[derive(Debug)]
pub struct Target {
    /// As configured, e.g. `http://10.0.0.5:8000`; recorded in events.
    pub url: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// `Host` of requests sent to this target (the authority), built once.
    pub host_header: http::HeaderValue,
    /// Path prefix of the target URL without a trailing `/` (often empty).
    pub base_path: String,
    pub weight: u32,
    pub health: Arc<TargetHealth>,
}

/// Virtual nodes per unit of weight on the consistent-hash ring: enough for an even spread,
/// few enough that building the ring on a config change stays cheap.
const RING_POINTS_PER_WEIGHT: u32 = 64;

/// A pool of targets.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub targets: Vec<Target>,
    pub algorithm: LbAlgorithm,
    pub hash_on: HashOn,
    pub passive: PassiveHealthSpec,
    pub health_check: Option<stone_events::config::HealthCheckSpec>,
    /// Current weights of smooth weighted round robin (nginx's algorithm): even spread, no bursts.
    current_weights: Mutex<Vec<i64>>,
    /// Consistent-hash ring: (point, target index), sorted by point.
    ring: Vec<(u64, usize)>,
}

impl Upstream {
    pub fn new(spec: &UpstreamSpec, registry: &HealthRegistry) -> Result<Self, String> {
        if spec.targets.is_empty() {
            return Err("targets: at least one target is required".to_owned());
        }
        let targets = spec
            .targets
            .iter()
            .map(|target| {
                let uri: http::Uri =
                    target.url.parse().map_err(|_| format!("targets: {:?} is not a URL", target.url))?;
                let scheme = uri.scheme().cloned().ok_or_else(|| format!("targets: {:?} needs http://", target.url))?;
                if scheme != Scheme::HTTP {
                    return Err(format!("targets: {:?}: only http:// targets are supported", target.url));
                }
                let authority =
                    uri.authority().cloned().ok_or_else(|| format!("targets: {:?} has no host", target.url))?;
                if target.weight == 0 || target.weight > 10_000 {
                    return Err(format!("targets: {:?}: weight must be 1..=10000", target.url));
                }
                let host_header = http::HeaderValue::from_str(authority.as_str())
                    .map_err(|_| format!("targets: {:?} has a host that is not a valid header", target.url))?;
                Ok(Target {
                    url: target.url.clone(),
                    scheme,
                    host_header,
                    authority,
                    base_path: uri.path().trim_end_matches('/').to_owned(),
                    weight: target.weight,
                    health: registry.get(&spec.name, &target.url),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut ring = Vec::new();
        if spec.algorithm == LbAlgorithm::ConsistentHash {
            for (index, target) in targets.iter().enumerate() {
                for point in 0..target.weight.saturating_mul(RING_POINTS_PER_WEIGHT) {
                    ring.push((fnv1a(format!("{}#{point}", target.url).as_bytes()), index));
                }
            }
            ring.sort_unstable();
        }
        let count = targets.len();
        Ok(Self {
            name: spec.name.clone(),
            targets,
            algorithm: spec.algorithm,
            hash_on: spec.hash_on.clone().unwrap_or(HashOn::ClientIp),
            passive: spec.passive_health.clone().unwrap_or_default(),
            health_check: spec.health_check.clone(),
            current_weights: Mutex::new(vec![0; count]),
            ring,
        })
    }

    /// Picks a target that is available and not in `exclude` (targets already tried by this
    /// request). `hash_key` is the request's hash input for consistent hashing.
    pub fn pick(&self, hash_key: Option<&[u8]>, exclude: &[usize]) -> Option<(usize, &Target)> {
        let eligible = |index: usize| {
            !exclude.contains(&index) && self.targets.get(index).is_some_and(|target| target.health.is_available())
        };
        let index = match self.algorithm {
            _ if self.targets.len() == 1 => eligible(0).then_some(0),
            LbAlgorithm::RoundRobin => self.pick_round_robin(&eligible),
            LbAlgorithm::LeastRequest => self.pick_least_request(&eligible),
            LbAlgorithm::ConsistentHash => self.pick_hashed(hash_key, &eligible),
        }?;
        self.targets.get(index).map(|target| (index, target))
    }

    fn pick_round_robin(&self, eligible: &dyn Fn(usize) -> bool) -> Option<usize> {
        let mut current = self.current_weights.lock().ok()?;
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for (index, target) in self.targets.iter().enumerate() {
            if !eligible(index) {
                continue;
            }
            let weight = i64::from(target.weight);
            current[index] += weight;
            total += weight;
            if best.is_none_or(|best_index| current[index] > current[best_index]) {
                best = Some(index);
            }
        }
        let chosen = best?;
        current[chosen] -= total;
        Some(chosen)
    }

    /// Power of two choices: two random eligible targets, the one with fewer requests in flight
    /// per unit of weight wins. Nearly as good as a full scan, without its contention.
    fn pick_least_request(&self, eligible: &dyn Fn(usize) -> bool) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.targets.len()).filter(|index| eligible(*index)).collect();
        match candidates.len() {
            0 => None,
            1 => candidates.first().copied(),
            count => {
                let first = rand::random_range(0..count);
                let mut second = rand::random_range(0..count - 1);
                if second >= first {
                    second += 1;
                }
                let load = |index: usize| {
                    let target = &self.targets[index];
                    target.health.in_flight.load(Ordering::Relaxed) as f64 / f64::from(target.weight)
                };
                let (a, b) = (candidates[first], candidates[second]);
                Some(if load(b) < load(a) { b } else { a })
            }
        }
    }

    /// The first eligible target clockwise from the key's point on the ring; without a key (the
    /// header or cookie is missing) any eligible target by round robin.
    fn pick_hashed(&self, hash_key: Option<&[u8]>, eligible: &dyn Fn(usize) -> bool) -> Option<usize> {
        let Some(key) = hash_key else {
            return self.pick_round_robin(eligible);
        };
        let point = fnv1a(key);
        let start = self.ring.partition_point(|(ring_point, _)| *ring_point < point);
        let ring_len = self.ring.len();
        (0..ring_len).map(|offset| self.ring[(start + offset) % ring_len].1).find(|index| eligible(*index))
    }
}

/// FNV-1a, then a final avalanche (splitmix64) so that nearby keys land far apart on the ring.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use stone_events::config::TargetSpec;

    use super::*;

    fn spec(algorithm: LbAlgorithm, targets: &[(&str, u32)]) -> UpstreamSpec {
        UpstreamSpec {
            name: "u".into(),
            algorithm,
            targets: targets.iter().map(|(url, weight)| TargetSpec { url: (*url).into(), weight: *weight }).collect(),
            health_check: None,
            hash_on: None,
            passive_health: None,
        }
    }

    fn url_of(upstream: &Upstream, key: Option<&[u8]>) -> Option<String> {
        upstream.pick(key, &[]).map(|(_, target)| target.url.clone())
    }

    #[test]
    fn weighted_round_robin_follows_weights_smoothly() -> Result<(), String> {
        let registry = HealthRegistry::default();
        let upstream = Upstream::new(
            &spec(LbAlgorithm::RoundRobin, &[("http://a:1", 5), ("http://b:1", 1), ("http://c:1", 1)]),
            &registry,
        )?;
        let picks: Vec<String> = (0..7).filter_map(|_| url_of(&upstream, None)).collect();
        // nginx's documented sequence for weights 5,1,1: a a b a c a a
        assert_eq!(
            picks,
            ["http://a:1", "http://a:1", "http://b:1", "http://a:1", "http://c:1", "http://a:1", "http://a:1"]
        );
        Ok(())
    }

    #[test]
    fn unavailable_and_excluded_targets_are_skipped() -> Result<(), String> {
        let registry = HealthRegistry::default();
        let upstream =
            Upstream::new(&spec(LbAlgorithm::RoundRobin, &[("http://a:1", 1), ("http://b:1", 1)]), &registry)?;
        registry.get("u", "http://a:1").eject_for(Duration::from_secs(60));
        assert!((0..10).all(|_| url_of(&upstream, None).as_deref() == Some("http://b:1")));
        assert!(upstream.pick(None, &[1]).is_none(), "a ejected, b excluded");
        registry.get("u", "http://a:1").eject_for(Duration::ZERO);
        assert_eq!(upstream.pick(None, &[1]).map(|(index, _)| index), Some(0));
        Ok(())
    }

    #[test]
    fn least_request_prefers_the_idle_target() -> Result<(), String> {
        let registry = HealthRegistry::default();
        let upstream =
            Upstream::new(&spec(LbAlgorithm::LeastRequest, &[("http://a:1", 1), ("http://b:1", 1)]), &registry)?;
        registry.get("u", "http://a:1").in_flight.store(10, Ordering::Relaxed);
        assert!((0..20).all(|_| url_of(&upstream, None).as_deref() == Some("http://b:1")));
        Ok(())
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_only_the_lost_targets_keys() -> Result<(), String> {
        let registry = HealthRegistry::default();
        let targets = [("http://a:1", 1), ("http://b:1", 1), ("http://c:1", 1)];
        let upstream = Upstream::new(&spec(LbAlgorithm::ConsistentHash, &targets), &registry)?;
        let keys: Vec<String> = (0..300).map(|index| format!("user-{index}")).collect();
        let before: Vec<Option<String>> = keys.iter().map(|key| url_of(&upstream, Some(key.as_bytes()))).collect();
        let again: Vec<Option<String>> = keys.iter().map(|key| url_of(&upstream, Some(key.as_bytes()))).collect();
        assert_eq!(before, again);
        for url in ["http://a:1", "http://b:1", "http://c:1"] {
            let share = before.iter().filter(|picked| picked.as_deref() == Some(url)).count();
            assert!((50..=150).contains(&share), "{url}: {share} of 300");
        }
        registry.get("u", "http://c:1").active_down.store(true, Ordering::Relaxed);
        for (key, previous) in keys.iter().zip(&before) {
            let now = url_of(&upstream, Some(key.as_bytes()));
            if previous.as_deref() != Some("http://c:1") {
                assert_eq!(&now, previous, "keys of healthy targets stay put");
            } else {
                assert_ne!(now.as_deref(), Some("http://c:1"));
            }
        }
        Ok(())
    }

    #[test]
    fn invalid_targets_are_rejected() {
        let registry = HealthRegistry::default();
        let one = |url: &str, weight| spec(LbAlgorithm::RoundRobin, &[(url, weight)]);
        assert!(Upstream::new(&one("not a url", 1), &registry).is_err());
        assert!(Upstream::new(&one("https://a:1", 1), &registry).is_err());
        assert!(Upstream::new(&one("http://a:1", 0), &registry).is_err());
        assert!(Upstream::new(&UpstreamSpec { targets: vec![], ..one("http://a:1", 1) }, &registry).is_err());
    }
}
