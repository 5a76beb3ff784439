//! One cancellation token and one task tracker per process: every spawned task is tracked, and a
//! shutdown waits for them within a bound.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The process's shutdown handle. Clones share the same token and tracker.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tasks: TaskTracker,
}

/// Tasks still running when the drain bound passed.
#[derive(Debug, thiserror::Error)]
#[error("{remaining} task(s) still running after the {grace:?} drain bound")]
pub struct DrainTimeout {
    pub remaining: usize,
    pub grace: Duration,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// The token tasks watch to learn that they should finish.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Spawns a tracked task; a shutdown waits for it.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(future)
    }

    /// Asks every task to finish.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once a shutdown has been triggered.
    pub async fn triggered(&self) {
        self.token.cancelled().await;
    }

    /// Triggers the shutdown and waits for every tracked task, at most `grace`.
    pub async fn drain(&self, grace: Duration) -> Result<(), DrainTimeout> {
        self.trigger();
        self.tasks.close();
        match tokio::time::timeout(grace, self.tasks.wait()).await {
            Ok(()) => Ok(()),
            Err(_) => Err(DrainTimeout { remaining: self.tasks.len(), grace }),
        }
    }
}

/// Waits for SIGINT or SIGTERM and names the one that came.
pub async fn signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_tasks_that_watch_the_token() {
        let shutdown = Shutdown::new();
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let token = shutdown.token();
        shutdown.spawn(async move {
            token.cancelled().await;
            let _ = sender.send("flushed");
        });
        assert!(shutdown.drain(Duration::from_secs(5)).await.is_ok());
        assert_eq!(receiver.await.ok(), Some("flushed"));
    }

    #[tokio::test]
    async fn drain_reports_tasks_that_do_not_finish() {
        let shutdown = Shutdown::new();
        shutdown.spawn(std::future::pending::<()>());
        let result = shutdown.drain(Duration::from_millis(20)).await;
        assert!(matches!(result, Err(DrainTimeout { remaining: 1, .. })), "{result:?}");
    }
}
