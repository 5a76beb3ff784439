//! The purge listener: every worker subscribes to `{namespace}.cache.purge` on core NATS and
//! applies each [`PurgeCommand`] to its memory tier and to Redis. Core NATS rather than
//! JetStream because a purge is only useful now: a worker that was away starts with an empty
//! memory tier, and Redis has been purged by the workers that were there.

use futures::StreamExt;
use stone_events::Namespace;
use stone_events::cache::{PurgeCommand, purge_subject};
use tokio_util::sync::CancellationToken;

use super::Cache;

/// Subscribes now (so no purge published after this returns is missed) and returns the task
/// that applies purges until shutdown.
pub async fn listen(
    client: async_nats::Client,
    namespace: &Namespace,
    cache: Cache,
    shutdown: CancellationToken,
) -> Result<impl Future<Output = ()> + Send + 'static, async_nats::SubscribeError> {
    let mut subscription = client.subscribe(purge_subject(namespace)).await?;
    // The subscription is registered once the server has seen it; a flush makes that so.
    if let Err(error) = client.flush().await {
        tracing::warn!(%error, "flush after cache purge subscription failed");
    }
    Ok(async move {
        loop {
            let message = tokio::select! {
                message = subscription.next() => message,
                () = shutdown.cancelled() => break,
            };
            let Some(message) = message else { break };
            let command: PurgeCommand = match serde_json::from_slice(&message.payload) {
                Ok(command) => command,
                Err(error) => {
                    tracing::warn!(%error, "undecodable cache purge command ignored");
                    continue;
                }
            };
            let deleted = cache.purge(&command).await;
            tracing::debug!(by = command.by.as_str(), value = %command.value, actor = %command.actor, deleted, "cache purged");
            if let Some(reply) = message.reply {
                let _ = client.publish(reply, deleted.to_string().into()).await;
            }
        }
    })
}
