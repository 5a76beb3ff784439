//! Target health: passive ejection from real traffic, active probes on an interval, and one
//! `health.target_up` / `health.target_down` event per transition, with the reason.
//!
//! Passive: consecutive failures (connect errors, resets, 502/503/504) eject a target for a
//! backoff that doubles with each ejection in a row; once the ejection ends the target is tried
//! again, and its first success reports it up. Active: each target of an upstream with a
//! `health_check` is probed; `unhealthy_threshold` failures in a row take it down,
//! `healthy_threshold` successes bring it back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use stone_events::Envelope;
use stone_events::health::{HealthCheckKind, TargetHealthChanged, TargetState};
use tokio_util::sync::CancellationToken;

use crate::balancer::{Target, Upstream};
use crate::emitter::EventSink;
use crate::routing::RouteTable;

/// Emits health transitions with the worker's identity and config sequence in force.
#[derive(Debug, Clone)]
pub struct HealthReporter {
    pub sink: EventSink,
    pub worker: Arc<str>,
    pub config_seq: Arc<AtomicU64>,
}

impl HealthReporter {
    fn report(
        &self,
        upstream: &str,
        target: &str,
        state: TargetState,
        check: HealthCheckKind,
        reason: String,
        consecutive: u32,
    ) {
        let label = match state {
            TargetState::Up => "up",
            TargetState::Down => "down",
        };
        metrics::counter!("stone_proxy_target_transitions_total", "state" => label).increment(1);
        tracing::info!(upstream, target, state = label, %reason, "target health changed");
        let data = TargetHealthChanged {
            upstream: upstream.to_owned(),
            target: target.to_owned(),
            state,
            check,
            reason,
            consecutive,
        };
        self.sink.emit(&Envelope::new(self.worker.as_ref(), self.config_seq.load(Ordering::Acquire), data));
    }

    /// A request to `target` succeeded.
    pub fn record_success(&self, upstream: &Upstream, target: &Target) {
        let health = &target.health;
        if health.consecutive_failures.load(Ordering::Relaxed) != 0 {
            health.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if health.passive_down_reported.load(Ordering::Relaxed)
            && health.passive_down_reported.swap(false, Ordering::AcqRel)
        {
            health.ejections.store(0, Ordering::Relaxed);
            self.report(
                &upstream.name,
                &target.url,
                TargetState::Up,
                HealthCheckKind::Passive,
                "request succeeded after ejection".to_owned(),
                1,
            );
        }
    }

    /// A request to `target` failed in a way that says something about the target.
    pub fn record_failure(&self, upstream: &Upstream, target: &Target, reason: &str) {
        let threshold = upstream.passive.consecutive_failures;
        if threshold == 0 {
            return;
        }
        let health = &target.health;
        let failures = health.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures < threshold {
            return;
        }
        health.consecutive_failures.store(0, Ordering::Relaxed);
        let ejections_before = health.ejections.fetch_add(1, Ordering::AcqRel);
        let backoff = upstream
            .passive
            .base_ejection_ms
            .saturating_mul(1u64 << ejections_before.min(20))
            .min(upstream.passive.max_ejection_ms.max(upstream.passive.base_ejection_ms));
        health.eject_for(Duration::from_millis(backoff));
        metrics::counter!("stone_proxy_target_ejections_total").increment(1);
        if !health.passive_down_reported.swap(true, Ordering::AcqRel) {
            self.report(
                &upstream.name,
                &target.url,
                TargetState::Down,
                HealthCheckKind::Passive,
                format!("{failures} consecutive failures, last: {reason}; ejected for {backoff} ms"),
                failures,
            );
        }
    }
}

/// Starts the active probes of every upstream in `table` that has a health check; they stop when
/// `token` is cancelled (a newer table replaced this one, or the worker shuts down).
pub fn spawn_active_checks(table: &RouteTable, reporter: &HealthReporter, token: &CancellationToken) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    for upstream in table.upstreams() {
        let Some(check) = upstream.health_check.clone() else { continue };
        for index in 0..upstream.targets.len() {
            let probe = Probe {
                upstream: Arc::clone(upstream),
                index,
                check: check.clone(),
                client: client.clone(),
                reporter: reporter.clone(),
            };
            tokio::spawn(probe.run(token.clone()));
        }
    }
}

struct Probe {
    upstream: Arc<Upstream>,
    index: usize,
    check: stone_events::config::HealthCheckSpec,
    client: Client<HttpConnector, Empty<Bytes>>,
    reporter: HealthReporter,
}

impl Probe {
    async fn run(self, token: CancellationToken) {
        let Some(target) = self.upstream.targets.get(self.index) else { return };
        let uri = format!("http://{}{}{}", target.authority, target.base_path, self.check.path);
        let Ok(uri) = uri.parse::<Uri>() else {
            tracing::warn!(%uri, "health check path cannot form a URL; probe disabled");
            return;
        };
        let mut interval = tokio::time::interval(Duration::from_millis(self.check.interval_ms.max(10)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut successes, mut failures) = (0u32, 0u32);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                () = token.cancelled() => return,
            }
            let outcome = self.probe_once(&uri).await;
            let health = &target.health;
            match outcome {
                Ok(()) => {
                    successes += 1;
                    failures = 0;
                    if health.active_down.load(Ordering::Relaxed) && successes >= self.check.healthy_threshold {
                        health.active_down.store(false, Ordering::Relaxed);
                        self.reporter.report(
                            &self.upstream.name,
                            &target.url,
                            TargetState::Up,
                            HealthCheckKind::Active,
                            format!("{successes} consecutive successful probes"),
                            successes,
                        );
                    }
                }
                Err(reason) => {
                    failures += 1;
                    successes = 0;
                    if !health.active_down.load(Ordering::Relaxed) && failures >= self.check.unhealthy_threshold {
                        health.active_down.store(true, Ordering::Relaxed);
                        self.reporter.report(
                            &self.upstream.name,
                            &target.url,
                            TargetState::Down,
                            HealthCheckKind::Active,
                            format!("{failures} consecutive failed probes, last: {reason}"),
                            failures,
                        );
                    }
                }
            }
        }
    }

    async fn probe_once(&self, uri: &Uri) -> Result<(), String> {
        let request = Request::get(uri.clone())
            .header(http::header::USER_AGENT, "proxy-stone-health-check")
            .body(Empty::new())
            .map_err(|error| error.to_string())?;
        let timeout = Duration::from_millis(self.check.timeout_ms.max(1));
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(response)) if response.status().is_success() || response.status().is_redirection() => Ok(()),
            Ok(Ok(response)) => Err(format!("status {}", response.status().as_u16())),
            Ok(Err(error)) if error.is_connect() => Err("connect failed".to_owned()),
            Ok(Err(_)) => Err("connection reset".to_owned()),
            Err(_) => Err(format!("timeout after {} ms", timeout.as_millis())),
        }
    }
}
