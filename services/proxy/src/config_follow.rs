//! Live configuration: the worker replays the CONFIG stream from its first message, folds it with
//! the shared [`ConfigState`] (change sets apply all or nothing), builds a routing table and swaps
//! it in, then follows the stream so that a change reaches the worker as soon as NATS delivers it.
//!
//! The worker reports ready only once the replay has caught up with the stream as it was at
//! start, so a fresh worker never serves traffic with a partial table. The config sequence in
//! every event is the stream sequence of the last change the table in force includes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::push::OrderedConfig};
use futures::StreamExt;
use stone_events::config::ConfigState;
use stone_events::{Event, Namespace};
use stone_kit::admin::Readiness;
use tokio_util::sync::CancellationToken;

use crate::balancer::HealthRegistry;
use crate::health;
use crate::routing::RouteTable;
use crate::service::ProxyService;

/// Readiness condition that holds once the initial replay is done.
pub const CONFIG_CONDITION: &str = "config";

/// Pause before re-subscribing after the subscription failed (NATS down, stream missing).
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);

/// Everything the follower needs; [`ConfigFollower::run`] is its task.
pub struct ConfigFollower {
    pub js: jetstream::Context,
    pub namespace: Namespace,
    pub service: ProxyService,
    pub health: Arc<HealthRegistry>,
    pub readiness: Readiness,
    pub shutdown: CancellationToken,
    /// How often JWKS documents are read again (`proxy.jwks_refresh_secs`).
    pub jwks_refresh: std::time::Duration,
}

impl ConfigFollower {
    pub async fn run(self) {
        let mut state = ConfigState::default();
        let mut next_sequence = 1u64;
        let mut ready = false;
        let mut checks = self.shutdown.child_token();
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            match self.follow(&mut state, &mut next_sequence, &mut ready, &mut checks).await {
                Ok(()) => tracing::warn!("config subscription ended; resubscribing"),
                Err(error) => tracing::warn!(%error, "config subscription failed; retrying"),
            }
            tokio::select! {
                () = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
                () = self.shutdown.cancelled() => break,
            }
        }
        checks.cancel();
    }

    /// One subscription from `next_sequence`; returns when it ends or fails.
    async fn follow(
        &self,
        state: &mut ConfigState,
        next_sequence: &mut u64,
        ready: &mut bool,
        checks: &mut CancellationToken,
    ) -> anyhow::Result<()> {
        let stream_name = self.namespace.stream_name(stone_events::streams::CONFIG);
        let mut stream = self.js.get_stream(&stream_name).await?;
        let last_sequence = stream.info().await?.state.last_sequence;
        if !*ready && last_sequence < *next_sequence {
            // Nothing (more) to replay: the table in force is the whole configuration.
            self.install(state, checks);
            self.mark_ready(ready, state);
        }
        let deliver_policy = if *next_sequence <= 1 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence { start_sequence: *next_sequence }
        };
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: self.namespace.config_wildcard(),
                // Push consumers need an inbox of their own; async-nats does not fill it in.
                deliver_subject: format!("_INBOX.{}", uuid::Uuid::now_v7().simple()),
                deliver_policy,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                () = self.shutdown.cancelled() => return Ok(()),
            };
            let Some(message) = message else { return Ok(()) };
            let message = message?;
            let info = message.info().map_err(|error| anyhow::anyhow!("message info: {error}"))?;
            let (sequence, pending) = (info.stream_sequence, info.pending);
            *next_sequence = sequence + 1;
            let changed = match stone_events::decode(&message.payload) {
                Ok(Event::Config(envelope)) => !state.apply(sequence, envelope.data).is_empty(),
                Ok(other) => {
                    tracing::warn!(sequence, event_type = other.event_type(), "non-config event in CONFIG; skipped");
                    false
                }
                Err(error) => {
                    metrics::counter!("stone_proxy_config_events_rejected_total", "reason" => "undecodable")
                        .increment(1);
                    tracing::warn!(sequence, %error, "undecodable config event skipped");
                    false
                }
            };
            // During the replay the table is built once at the end, not once per historic change.
            let replaying = !*ready && pending > 0;
            if changed && !replaying {
                self.install(state, checks);
            }
            if !*ready && pending == 0 {
                self.install(state, checks);
                self.mark_ready(ready, state);
            }
        }
    }

    fn mark_ready(&self, ready: &mut bool, state: &ConfigState) {
        *ready = true;
        self.readiness.set(CONFIG_CONDITION, true);
        tracing::info!(
            config_seq = state.applied_seq,
            entities = state.len(),
            "configuration loaded from the CONFIG stream"
        );
    }

    /// Builds a table from the folded state and swaps it in; an unusable state keeps the table
    /// in force (and says why) rather than taking the worker down.
    fn install(&self, state: &ConfigState, checks: &mut CancellationToken) {
        let upstreams = state.upstreams();
        let upstream_names: HashSet<&str> = upstreams.iter().map(|upstream| upstream.name.as_str()).collect();
        // A route whose upstream was deleted cannot serve; it is left out (404) instead of
        // rejecting the whole configuration.
        let (routes, orphans): (Vec<_>, Vec<_>) =
            state.routes().into_iter().partition(|route| upstream_names.contains(route.upstream.as_str()));
        for orphan in &orphans {
            tracing::warn!(route = %orphan.name, upstream = %orphan.upstream, "route refers to a missing upstream; not routed");
        }
        let consumers: Vec<_> = state
            .of_kind(stone_events::config::EntityKind::Consumer)
            .filter_map(|entity| match &entity.spec {
                stone_events::config::EntitySpec::Consumer(spec) => Some(spec.clone()),
                _ => None,
            })
            .collect();
        let policies: Vec<_> = state
            .of_kind(stone_events::config::EntityKind::Policy)
            .filter_map(|entity| match &entity.spec {
                stone_events::config::EntitySpec::Policy(spec) => Some(spec.clone()),
                _ => None,
            })
            .collect();
        let built = RouteTable::build(&routes, &upstreams, &self.health)
            .and_then(|table| table.with_access(&routes, &consumers, &policies));
        match built {
            Ok(table) => {
                self.health.retain(&table.target_keys());
                checks.cancel();
                *checks = self.shutdown.child_token();
                health::spawn_active_checks(&table, self.service.health_reporter(), checks);
                table.access().spawn_refreshers(checks, self.jwks_refresh);
                self.service.replace_table(table, state.applied_seq);
                metrics::gauge!("stone_proxy_config_seq").set(state.applied_seq as f64);
                tracing::info!(config_seq = state.applied_seq, routes = routes.len(), "routing table replaced");
            }
            Err(message) => {
                metrics::counter!("stone_proxy_config_events_rejected_total", "reason" => "invalid").increment(1);
                tracing::error!(config_seq = state.applied_seq, %message, "configuration rejected; keeping the table in force");
            }
        }
    }
}
