//! Request coalescing: of concurrent misses for one key, the first (the leader) fetches from the
//! upstream; the others wait, with a bound, until the leader has stored the object (or given up)
//! and then look again. A waiter whose bound runs out fetches on its own, so a slow upstream
//! delays followers by at most the bound, never indefinitely.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// The in-flight fetches of one worker, by key.
#[derive(Clone, Default)]
pub struct Coalescer {
    in_flight: Arc<Mutex<HashMap<String, watch::Receiver<()>>>>,
}

/// What a request should do about its miss.
pub enum Role {
    /// Fetch, and keep the guard until the object is stored (or known not to be).
    Leader(LeaderGuard),
    /// Someone else is fetching: wait on this, then look again.
    Follower(watch::Receiver<()>),
}

impl Coalescer {
    pub fn join(&self, key: &str) -> Role {
        let Ok(mut in_flight) = self.in_flight.lock() else {
            // A poisoned map only loses coalescing, never correctness: everyone fetches.
            let (sender, _) = watch::channel(());
            return Role::Leader(LeaderGuard { key: String::new(), sender, owner: None });
        };
        if let Some(receiver) = in_flight.get(key) {
            return Role::Follower(receiver.clone());
        }
        let (sender, receiver) = watch::channel(());
        in_flight.insert(key.to_owned(), receiver);
        Role::Leader(LeaderGuard { key: key.to_owned(), sender, owner: Some(self.clone()) })
    }

    /// Number of fetches in flight (tests, metrics).
    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().map_or(0, |in_flight| in_flight.len())
    }
}

/// Held by the leader; dropping it (stored, not storable, failed, client gone) wakes the
/// followers.
pub struct LeaderGuard {
    key: String,
    sender: watch::Sender<()>,
    owner: Option<Coalescer>,
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.take()
            && let Ok(mut in_flight) = owner.in_flight.lock()
        {
            in_flight.remove(&self.key);
        }
        // Dropping the sender ends `changed()` for every receiver with an error: the wake-up.
        let _ = &self.sender;
    }
}

/// Waits until the leader is done or the bound passes; returns whether the leader finished.
pub async fn wait(mut receiver: watch::Receiver<()>, bound: Duration) -> bool {
    tokio::time::timeout(bound, async {
        // `changed` errors once the sender is gone, which is the only signal sent.
        while receiver.changed().await.is_ok() {}
    })
    .await
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_and_followers_wake_when_it_is_done() {
        let coalescer = Coalescer::default();
        let Role::Leader(guard) = coalescer.join("k") else { panic!("first is the leader") };
        let Role::Follower(receiver) = coalescer.join("k") else { panic!("second follows") };
        assert!(matches!(coalescer.join("other"), Role::Leader(_)));
        let waiter = tokio::spawn(wait(receiver, Duration::from_secs(5)));
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(guard);
        assert!(waiter.await.unwrap());
        assert_eq!(coalescer.in_flight(), 0);
        assert!(matches!(coalescer.join("k"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn followers_give_up_after_the_bound() {
        let coalescer = Coalescer::default();
        let _leader = coalescer.join("k");
        let Role::Follower(receiver) = coalescer.join("k") else { panic!("second follows") };
        assert!(!wait(receiver, Duration::from_millis(30)).await);
    }
}
