//! The deployment lock's lease, renewed in the background while a run lasts.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::state::{Lease, LockOwner};
use crate::traits::StateStore;

/// Holds the lock's lease and renews it in the background while a run lasts.
pub(super) struct LeaseKeeper {
    store: Arc<dyn StateStore>,
    lease: Lease,
    lost: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
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
        let lease = loop {
            match store.acquire(&owner, ttl).await {
                Ok(l) => break l,
                Err(Error::Locked { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200).min(ttl / 4)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let lost = Arc::new(Mutex::new(None));
        let task = {
            let (store, lease, lost) = (store.clone(), lease.clone(), lost.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    match store.renew(&lease, ttl).await {
                        Ok(_) => {}
                        Err(e @ Error::LockLost { .. }) => {
                            *lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "renewing the deployment lock failed; retrying")
                        }
                    }
                }
            })
        };
        Ok(LeaseKeeper {
            store,
            lease,
            lost,
            task,
        })
    }

    /// Why the lease was lost, once it has been.
    pub(super) fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops renewing and releases the lock.
    pub(super) async fn release(self) {
        self.task.abort();
        if let Err(e) = self.store.release(&self.lease).await {
            tracing::warn!(error = %e, "releasing the deployment lock failed; it expires on its own");
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}
