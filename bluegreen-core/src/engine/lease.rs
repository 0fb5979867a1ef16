//! The deployment lock's lease, renewed in the background while a run lasts, and the fence every
//! change is checked against.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::state::{Lease, LockOwner};
use crate::traits::StateStore;

/// What the renewal task and the run share.
struct Held {
    /// The lease as last granted or renewed (its epoch is the fencing token).
    lease: Lease,
    /// When the lease expires at the latest, by this process's monotonic clock: the start of the
    /// last successful acquire or renew plus the TTL (clock-skew free).
    deadline: Instant,
    /// Why the lease is no longer ours, once it is not.
    lost: Option<String>,
}

/// Holds the lock's lease and renews it in the background while a run lasts.
pub(super) struct LeaseKeeper {
    store: Arc<dyn StateStore>,
    held: Arc<Mutex<Held>>,
    task: tokio::task::JoinHandle<()>,
}

fn held(h: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    h.lock().unwrap_or_else(|p| p.into_inner())
}

impl LeaseKeeper {
    /// Takes the lock, waiting up to `wait` for a holder to release it.
    pub(super) async fn acquire(
        store: Arc<dyn StateStore>,
        owner: LockOwner,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Self> {
        let deadline = Instant::now() + wait;
        let (lease, asked) = loop {
            let asked = Instant::now();
            match store.acquire(&owner, ttl).await {
                Ok(l) => break (l, asked),
                Err(Error::Locked { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200).min(ttl / 4)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let held = Arc::new(Mutex::new(Held {
            lease,
            deadline: asked + ttl,
            lost: None,
        }));
        let task = {
            let (store, held) = (store.clone(), held.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    let lease = self::held(&held).lease.clone();
                    let asked = Instant::now();
                    match store.renew(&lease, ttl).await {
                        Ok(renewed) => {
                            let mut h = self::held(&held);
                            h.lease = renewed;
                            h.deadline = asked + ttl;
                        }
                        Err(e) => {
                            // A run that cannot prove it holds the lock stops at its next step.
                            tracing::warn!(error = %e, "renewing the deployment lock failed; the run stops at its next step");
                            self::held(&held).lost = Some(match e {
                                Error::LockLost { reason } => reason,
                                e => format!("renewing the lease failed: {e}"),
                            });
                            return;
                        }
                    }
                }
            })
        };
        Ok(LeaseKeeper { store, held, task })
    }

    /// The lease as last renewed: what saves present.
    pub(super) fn lease(&self) -> Lease {
        held(&self.held).lease.clone()
    }

    /// Why the lease is no longer this run's, without asking the store: lost by the renewal
    /// task, or past its deadline.
    pub(super) fn lost(&self) -> Option<String> {
        let h = held(&self.held);
        if let Some(why) = &h.lost {
            return Some(why.clone());
        }
        (Instant::now() >= h.deadline).then(|| {
            format!(
                "the lease expired (epoch {}, last renewed before {})",
                h.lease.epoch, h.lease.expires
            )
        })
    }

    /// Proves, by asking the store, that this run still holds the lock (same token and epoch,
    /// unexpired). Called before every change a run makes.
    ///
    /// # Errors
    /// [`Error::LockLost`] saying why.
    pub(super) async fn check(&self) -> Result<()> {
        if let Some(why) = self.lost() {
            return Err(Error::LockLost { reason: why });
        }
        let mine = self.lease();
        let why = match self.store.lock_info().await {
            Ok(Some(now)) if now.same_lease(&mine) => return Ok(()),
            Ok(Some(other)) => format!("now held by {other} (epoch {})", other.epoch),
            Ok(None) => "the lock was broken or released".to_string(),
            Err(e) => format!("the lock could not be checked: {e}"),
        };
        held(&self.held).lost = Some(why.clone());
        Err(Error::LockLost { reason: why })
    }

    /// Stops renewing and releases the lock.
    pub(super) async fn release(self) {
        self.task.abort();
        if let Err(e) = self.store.release(&self.lease()).await {
            tracing::warn!(error = %e, "releasing the deployment lock failed; it expires on its own");
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}
