//! Holding new requests during a cutover.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// Why a held request was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Too many requests were already waiting.
    QueueFull,
    /// The pause outlasted the wait bound.
    TimedOut,
}

/// A gate new requests pass through before they are routed.
///
/// The fast path is one atomic load. While paused, a request registers as a waiter (bounded) and
/// waits for `resume` (bounded in time); it is routed only afterwards, so it sees the split that
/// was applied during the pause.
pub(crate) struct PauseGate {
    paused: AtomicBool,
    waiting: AtomicUsize,
    tx: watch::Sender<bool>,
    held: AtomicU64,
    overflowed: AtomicU64,
    timed_out: AtomicU64,
}

/// What the pause did to requests since the proxy started (see
/// [`ProxySwitch::pause_counts`](crate::ProxySwitch::pause_counts)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PauseCounts {
    /// Requests held by a pause and let through on resume: they saw added latency, no error.
    pub held: u64,
    /// Requests answered 503 at once because `max_paused_requests` were already waiting.
    pub overflowed: u64,
    /// Requests answered 504 because the pause outlasted `max_pause_wait`.
    pub timed_out: u64,
}

impl PauseGate {
    pub(crate) fn new() -> Self {
        PauseGate {
            paused: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            tx: watch::Sender::new(false),
            held: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
        }
    }

    pub(crate) fn pause(&self) {
        self.tx.send_replace(true);
        self.paused.store(true, Ordering::SeqCst);
    }

    pub(crate) fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.tx.send_replace(false);
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Requests waiting right now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Returns once the proxy is not paused, or why the request must be refused.
    pub(crate) async fn pass(&self, max_waiting: usize, max_wait: Duration) -> Result<(), Refused> {
        if !self.paused.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _waiter = match Waiter::enter(&self.waiting, max_waiting) {
            Ok(w) => w,
            Err(refused) => {
                self.overflowed.fetch_add(1, Ordering::Relaxed);
                return Err(refused);
            }
        };
        let mut rx = self.tx.subscribe();
        // The sender lives as long as the gate, so `wait_for` only ends on resume.
        let resumed = tokio::time::timeout(max_wait, async {
            let _ = rx.wait_for(|paused| !paused).await;
        })
        .await;
        match resumed {
            Ok(()) => {
                self.held.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(_) => {
                self.timed_out.fetch_add(1, Ordering::Relaxed);
                Err(Refused::TimedOut)
            }
        }
    }

    /// What the pause did to requests so far.
    pub(crate) fn counts(&self) -> PauseCounts {
        PauseCounts {
            held: self.held.load(Ordering::Relaxed),
            overflowed: self.overflowed.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
        }
    }
}

struct Waiter<'a>(&'a AtomicUsize);

impl<'a> Waiter<'a> {
    fn enter(count: &'a AtomicUsize, max: usize) -> Result<Self, Refused> {
        let before = count.fetch_add(1, Ordering::SeqCst);
        let w = Waiter(count);
        if before >= max {
            return Err(Refused::QueueFull);
        }
        Ok(w)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn held_requests_pass_on_resume_and_the_queue_is_bounded() {
        let gate = Arc::new(PauseGate::new());
        assert_eq!(gate.pass(0, Duration::ZERO).await, Ok(()));
        gate.pause();
        let g = Arc::clone(&gate);
        let held = tokio::spawn(async move { g.pass(1, Duration::from_secs(30)).await });
        for _ in 0..500 {
            if gate.waiting() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(gate.waiting(), 1);
        assert_eq!(
            gate.pass(1, Duration::from_secs(30)).await,
            Err(Refused::QueueFull)
        );
        assert_eq!(
            gate.pass(2, Duration::from_millis(10)).await,
            Err(Refused::TimedOut)
        );
        gate.resume();
        assert_eq!(held.await.unwrap(), Ok(()));
        assert_eq!(gate.waiting(), 0);
        assert_eq!(
            gate.counts(),
            PauseCounts {
                held: 1,
                overflowed: 1,
                timed_out: 1
            }
        );
    }
}
