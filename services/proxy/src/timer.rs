//! A coarse timer for hyper's HTTP/1 header-read timeout (slowloris protection).
//!
//! hyper arms that timeout for every request head a keep-alive connection waits for, and drops
//! it as soon as the head is read. With tokio's timer each arming is a timer-wheel insert under
//! the driver's lock and each drop a removal under it again: about 1k instructions per request,
//! for a deadline seconds away that almost never fires. Here a timeout that has to wait is one
//! push onto a shared list, its drop one atomic store, and a sweeper task walks the list every
//! [`RESOLUTION`], waking what is due and forgetting what was dropped. A deadline fires up to one
//! resolution late, which a timeout of seconds does not notice.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;

/// How often due timeouts are looked for.
pub const RESOLUTION: Duration = Duration::from_millis(100);

/// One waiting timeout, shared by its future and the sweeper's list.
#[derive(Debug)]
struct Entry {
    deadline: Instant,
    waker: AtomicWaker,
    /// The sweeper found the deadline passed.
    fired: AtomicBool,
    /// The future is gone; the sweeper forgets the entry.
    dropped: AtomicBool,
}

#[derive(Debug, Default)]
struct Pending {
    entries: Mutex<Vec<Arc<Entry>>>,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}

/// A [`hyper::rt::Timer`] with [`RESOLUTION`]-coarse deadlines. Its sweeper runs on the tokio
/// runtime it was created in and ends when the last clone of the timer is dropped.
#[derive(Debug, Clone)]
pub struct CoarseTimer {
    pending: Arc<Pending>,
}

impl CoarseTimer {
    /// Starts the sweeper; call from within a tokio runtime.
    pub fn start() -> Self {
        let pending = Arc::new(Pending::default());
        tokio::spawn(sweep(Arc::downgrade(&pending)));
        Self { pending }
    }
}

async fn sweep(pending: Weak<Pending>) {
    let mut ticks = tokio::time::interval(RESOLUTION);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut walking = Vec::new();
    loop {
        ticks.tick().await;
        let Some(pending) = pending.upgrade() else { return };
        // Swapped out whole and walked outside the lock, so arming never waits for a walk.
        std::mem::swap(&mut *pending.lock(), &mut walking);
        let now = Instant::now();
        walking.retain(|entry| {
            if entry.dropped.load(Ordering::Acquire) {
                return false;
            }
            if entry.deadline <= now {
                entry.fired.store(true, Ordering::Release);
                entry.waker.wake();
                return false;
            }
            true
        });
        // What is still waiting goes back; `walking` keeps its allocation for the next swap.
        pending.lock().append(&mut walking);
    }
}

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(CoarseSleep { deadline, pending: Arc::downgrade(&self.pending), entry: None })
    }
}

/// A deadline of a [`CoarseTimer`]; registered with the sweeper only when first polled before
/// its deadline.
#[derive(Debug)]
struct CoarseSleep {
    deadline: Instant,
    pending: Weak<Pending>,
    entry: Option<Arc<Entry>>,
}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        if let Some(entry) = &self.entry {
            entry.waker.register(context.waker());
            if entry.fired.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            return Poll::Pending;
        }
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        let Some(pending) = self.pending.upgrade() else {
            // The timer is gone, and with it the sweeper: nothing would ever wake this.
            return Poll::Ready(());
        };
        let entry = Arc::new(Entry {
            deadline: self.deadline,
            waker: AtomicWaker::new(),
            fired: AtomicBool::new(false),
            dropped: AtomicBool::new(false),
        });
        entry.waker.register(context.waker());
        pending.lock().push(Arc::clone(&entry));
        self.entry = Some(entry);
        Poll::Pending
    }
}

impl Drop for CoarseSleep {
    fn drop(&mut self) {
        if let Some(entry) = &self.entry {
            entry.dropped.store(true, Ordering::Release);
        }
    }
}

impl hyper::rt::Sleep for CoarseSleep {}

#[cfg(test)]
mod tests {
    use hyper::rt::Timer;

    use super::*;

    #[tokio::test]
    async fn a_deadline_is_pending_first_then_fires() {
        let timer = CoarseTimer::start();
        let mut sleep = timer.sleep(Duration::from_millis(150));
        assert!(futures::poll!(sleep.as_mut()).is_pending());
        sleep.await;
        assert!(timer.pending.lock().is_empty());
    }

    #[tokio::test]
    async fn a_dropped_sleep_is_forgotten_and_others_still_fire() {
        let timer = CoarseTimer::start();
        let mut dropped = timer.sleep(Duration::from_secs(3600));
        // Registered by a first poll, then dropped long before its deadline.
        assert!(futures::poll!(dropped.as_mut()).is_pending());
        drop(dropped);
        timer.sleep(Duration::from_millis(150)).await;
        // The sweep that fired the second also walked past the first.
        assert!(timer.pending.lock().is_empty());
    }

    #[tokio::test]
    async fn a_past_deadline_is_ready_at_once() {
        let timer = CoarseTimer::start();
        let mut sleep = timer.sleep_until(Instant::now());
        assert!(futures::poll!(sleep.as_mut()).is_ready());
    }
}
