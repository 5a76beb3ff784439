//! Upstream pools and target selection (smooth weighted round robin).

use std::sync::Mutex;

use http::uri::{Authority, Scheme};
use stone_events::config::UpstreamSpec;

/// One target of an upstream.
#[derive(Debug)]
pub struct Target {
    /// As configured, e.g. `http://10.0.0.5:8000`; recorded in events.
    pub url: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path prefix of the target URL without a trailing `/` (often empty).
    pub base_path: String,
    pub weight: u32,
}

/// A pool of targets.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub targets: Vec<Target>,
    /// Current weights of smooth weighted round robin (nginx's algorithm): even spread, no bursts.
    current_weights: Mutex<Vec<i64>>,
}

impl Upstream {
    pub fn new(spec: &UpstreamSpec) -> Result<Self, String> {
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
                Ok(Target {
                    url: target.url.clone(),
                    scheme,
                    authority,
                    base_path: uri.path().trim_end_matches('/').to_owned(),
                    weight: target.weight,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let count = targets.len();
        Ok(Self { name: spec.name.clone(), targets, current_weights: Mutex::new(vec![0; count]) })
    }

    /// Picks the next target.
    pub fn pick(&self) -> Option<&Target> {
        if self.targets.len() == 1 {
            return self.targets.first();
        }
        let mut current = self.current_weights.lock().ok()?;
        let total: i64 = self.targets.iter().map(|target| i64::from(target.weight)).sum();
        let mut best = 0;
        for (index, target) in self.targets.iter().enumerate() {
            current[index] += i64::from(target.weight);
            if current[index] > current[best] {
                best = index;
            }
        }
        current[best] -= total;
        self.targets.get(best)
    }
}

#[cfg(test)]
mod tests {
    use stone_events::config::TargetSpec;

    use super::*;

    #[test]
    fn weighted_round_robin_follows_weights_smoothly() -> Result<(), String> {
        let spec = UpstreamSpec {
            name: "u".into(),
            algorithm: Default::default(),
            targets: vec![
                TargetSpec { url: "http://a:1".into(), weight: 5 },
                TargetSpec { url: "http://b:1".into(), weight: 1 },
                TargetSpec { url: "http://c:1".into(), weight: 1 },
            ],
            health_check: None,
            hash_on: None,
            passive_health: None,
        };
        let upstream = Upstream::new(&spec)?;
        let picks: Vec<&str> = (0..7).filter_map(|_| upstream.pick().map(|t| t.url.as_str())).collect();
        // nginx's documented sequence for weights 5,1,1: a a b a c a a
        assert_eq!(
            picks,
            ["http://a:1", "http://a:1", "http://b:1", "http://a:1", "http://c:1", "http://a:1", "http://a:1"]
        );
        Ok(())
    }

    #[test]
    fn invalid_targets_are_rejected() {
        let spec = |url: &str, weight| UpstreamSpec {
            name: "u".into(),
            algorithm: Default::default(),
            targets: vec![TargetSpec { url: url.into(), weight }],
            health_check: None,
            hash_on: None,
            passive_health: None,
        };
        assert!(Upstream::new(&spec("not a url", 1)).is_err());
        assert!(Upstream::new(&spec("https://a:1", 1)).is_err());
        assert!(Upstream::new(&spec("http://a:1", 0)).is_err());
        assert!(Upstream::new(&UpstreamSpec { targets: vec![], ..spec("http://a:1", 1) }).is_err());
    }
}
