//! Keep-alive HTTP/1.1 connections to the upstreams, pooled per endpoint.
//!
//! Each [`Upstream`](crate::routing::Upstream) of the routing table holds its endpoint's
//! [`HostPool`], so a request reaches its idle connections through the table it already loaded:
//! no map lookup, no hashing, one uncontended lock. Tables built by later changes get the same
//! pool for the same endpoint ([`Pools::attach`]), so a switch or a canary step keeps the warm
//! connections of the endpoints that stay.
//!
//! A connection goes back to its pool when the response body it carried was read to its end
//! ([`Checkin`]); a response cut short closes it instead. Connections idle for longer than the
//! proxy's `upstream_idle_timeout` are closed when next seen, so the proxy never reuses a
//! connection the upstream is about to close. A request that a pooled connection could not even
//! send (the upstream had just closed it) is sent again on another connection: nothing reached
//! the upstream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Most idle connections kept per endpoint; more are closed when they come back.
const MAX_IDLE: usize = 1024;

/// How many idle connections a checkout looks at for one that is ready.
const SCAN: usize = 4;

/// One endpoint's idle connections, most recently used last.
#[derive(Debug)]
pub(crate) struct HostPool {
    /// The address to connect to: host (without IPv6 brackets) and port.
    host: String,
    port: u16,
    idle: Mutex<Vec<Idle>>,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<Incoming>,
    since: Instant,
}

/// A connection checked out of a pool.
pub(crate) struct Checkout {
    pub(crate) sender: SendRequest<Incoming>,
    /// Taken from the pool (it may have been closed by the upstream meanwhile), not new.
    pub(crate) reused: bool,
}

/// Why no connection could be had.
#[derive(Debug)]
pub(crate) struct ConnectError(pub(crate) String);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl HostPool {
    pub(crate) fn new(host: &str, port: u16) -> Arc<Self> {
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Arc::new(HostPool {
            host: host.to_string(),
            port,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection that is ready for a request, else a new one.
    pub(crate) async fn checkout(
        &self,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Result<Checkout, ConnectError> {
        // A connection whose previous response just ended may need a moment before it takes
        // the next request (its task has not run yet): one such is waited for, briefly.
        let mut pending = None;
        {
            let mut idle = self.lock();
            let now = Instant::now();
            // Oldest first: drop the expired ones.
            let expired = idle
                .iter()
                .take_while(|i| now.duration_since(i.since) >= idle_timeout)
                .count();
            idle.drain(..expired);
            // The most recently used first; one that is still finishing its last response is
            // passed over for a ready one among the next few.
            let mut looked = 0;
            let mut at = idle.len();
            while at > 0 && looked < SCAN {
                at -= 1;
                if idle[at].sender.is_closed() {
                    idle.remove(at);
                    continue;
                }
                looked += 1;
                if idle[at].sender.is_ready() {
                    return Ok(Checkout {
                        sender: idle.remove(at).sender,
                        reused: true,
                    });
                }
            }
            while let Some(i) = idle.pop() {
                if !i.sender.is_closed() {
                    pending = Some(i.sender);
                    break;
                }
            }
        }
        if let Some(mut sender) = pending {
            let ready = tokio::time::timeout(PENDING_WAIT, sender.ready()).await;
            if matches!(ready, Ok(Ok(()))) {
                return Ok(Checkout {
                    sender,
                    reused: true,
                });
            }
        }
        self.fresh(connect_timeout).await
    }

    /// A new connection (never a pooled one), its task spawned.
    pub(crate) async fn fresh(&self, connect_timeout: Duration) -> Result<Checkout, ConnectError> {
        let connected = tokio::time::timeout(
            connect_timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await;
        let stream = match connected {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ConnectError(format!("connecting: {e}"))),
            Err(_) => {
                return Err(ConnectError(format!(
                    "connecting: timed out after {connect_timeout:?}"
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError(format!("HTTP handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Checkout {
            sender,
            reused: false,
        })
    }

    /// Puts a connection whose last response was read to its end back.
    pub(crate) fn put(&self, sender: SendRequest<Incoming>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() >= MAX_IDLE {
            return;
        }
        idle.push(Idle {
            sender,
            since: Instant::now(),
        });
    }
}

/// How long a checkout waits for a pooled connection that is finishing its previous response.
const PENDING_WAIT: Duration = Duration::from_millis(50);

/// A connection travelling with the response it carries; back to its pool once the body ended.
pub(crate) struct Checkin {
    pub(crate) sender: SendRequest<Incoming>,
    pub(crate) pool: Arc<HostPool>,
}

impl Checkin {
    pub(crate) fn done(self) {
        self.pool.put(self.sender);
    }
}

/// The pools of every endpoint the routing tables name, so a new table reuses the pools (and
/// warm connections) of the endpoints it shares with the one before.
#[derive(Default)]
pub(crate) struct Pools {
    by_addr: Mutex<HashMap<(String, u16), Weak<HostPool>>>,
}

impl Pools {
    /// The pool for `host:port`: the live one if a table still holds it, else `fresh`.
    pub(crate) fn attach(&self, fresh: &Arc<HostPool>) -> Arc<HostPool> {
        let mut map = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        let key = (fresh.host.clone(), fresh.port);
        if let Some(live) = map.get(&key).and_then(Weak::upgrade) {
            return live;
        }
        map.insert(key, Arc::downgrade(fresh));
        Arc::clone(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_table_gets_the_live_pool_of_its_endpoint_and_a_fresh_one_after_it_is_gone() {
        let pools = Pools::default();
        let first = pools.attach(&HostPool::new("127.0.0.1", 8080));
        let again = pools.attach(&HostPool::new("127.0.0.1", 8080));
        assert!(Arc::ptr_eq(&first, &again));
        let other = pools.attach(&HostPool::new("127.0.0.1", 8081));
        assert!(!Arc::ptr_eq(&first, &other));
        // IPv6 literals are keyed without their brackets.
        let v6 = pools.attach(&HostPool::new("[::1]", 80));
        assert!(Arc::ptr_eq(&v6, &pools.attach(&HostPool::new("::1", 80))));
        drop((first, again));
        let fresh = HostPool::new("127.0.0.1", 8080);
        assert!(Arc::ptr_eq(&pools.attach(&fresh), &fresh));
    }
}
