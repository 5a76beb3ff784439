//! Keeps the `clickhouse` readiness condition current by pinging ClickHouse, so `/readyz` answers
//! from memory and a load balancer's probes never queue behind a slow database.

use std::time::Duration;

use stone_kit::StoneConfig;
use stone_kit::admin::Readiness;
use tokio_util::sync::CancellationToken;

/// The readiness condition this module owns.
pub const CLICKHOUSE_CONDITION: &str = "clickhouse";

const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Shorter than the interval so one hung ping cannot delay the next.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Pings at once, then every [`PROBE_INTERVAL`], until `token` is cancelled. Logs only changes,
/// so a long outage is one warning rather than one per probe.
pub(crate) async fn probe_clickhouse(config: StoneConfig, readiness: Readiness, token: CancellationToken) {
    let mut was_ready: Option<bool> = None;
    loop {
        let outcome = tokio::time::timeout(PROBE_TIMEOUT, stone_kit::clickhouse::ping(&config)).await;
        let is_ready = matches!(outcome, Ok(Ok(())));
        readiness.set(CLICKHOUSE_CONDITION, is_ready);
        if was_ready != Some(is_ready) {
            match outcome {
                Ok(Ok(())) => tracing::info!("clickhouse reachable, gateway ready"),
                Ok(Err(error)) => tracing::warn!(%error, "clickhouse unreachable, gateway not ready"),
                Err(_) => tracing::warn!(timeout = ?PROBE_TIMEOUT, "clickhouse ping timed out, gateway not ready"),
            }
            was_ready = Some(is_ready);
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}
