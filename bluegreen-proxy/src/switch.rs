//! The public handle: [`ProxySwitch`].

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::check_cookie_name;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bluegreen_core::{
    Capabilities, Endpoints, Error, PerSlot, Result, Slot, SlotMetrics, SwitchCounters,
    TrafficSplit, TrafficSwitch, TrafficSwitchExt,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ProxyConfig;
use crate::pause::PauseCounts;
use crate::proxy::{serve, State};
use crate::routing::{Preview, Table, Upstream};
use crate::shadow::ShadowReport;
use crate::NAME;

/// An in-process reverse proxy that is a [`TrafficSwitch`].
///
/// Cheap to clone: clones share the same listener, routing table and counters. The proxy stops
/// (gracefully) on [`shutdown`](ProxySwitch::shutdown) or when the last clone is dropped.
#[derive(Clone)]
pub struct ProxySwitch {
    inner: Arc<Inner>,
}

struct Inner {
    state: Arc<State>,
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for ProxySwitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = self.inner.state.table.load();
        f.debug_struct("ProxySwitch")
            .field("local_addr", &self.inner.local_addr)
            .field("split", &table.split)
            .field("preview", &table.preview.as_ref().map(|p| p.slot))
            .field("paused", &self.inner.state.gate.is_paused())
            .finish()
    }
}

/// What the proxy can do; its remote client declares the same.
pub(crate) fn capabilities() -> Capabilities {
    Capabilities::basic()
        .with_weights(true)
        .with_sticky(true)
        .with_preview(true)
        .with_pause(true)
        .with_drain(true)
        .with_metrics(true)
}

impl ProxySwitch {
    /// Binds `config.listen` and starts serving in a background task of the current Tokio
    /// runtime. Until a split is applied every request is answered 503.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a malformed header or cookie name in `config`;
    /// [`Error::Io`] when the address cannot be bound.
    pub async fn bind(config: ProxyConfig) -> Result<ProxySwitch> {
        config.validate()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::io(format!("binding the proxy to {}", config.listen), e))?;
        Self::serve(listener, config)
    }

    /// Serves on an already bound `listener` (e.g. one handed over by a supervisor);
    /// `config.listen` is ignored. Must be called within a Tokio runtime.
    ///
    /// # Errors
    /// As [`bind`](ProxySwitch::bind).
    pub fn from_listener(listener: TcpListener, config: ProxyConfig) -> Result<ProxySwitch> {
        config.validate()?;
        Self::serve(listener, config)
    }

    fn serve(listener: TcpListener, config: ProxyConfig) -> Result<ProxySwitch> {
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::io("reading the proxy's bound address", e))?;
        let restored = match &config.routing_file {
            Some(path) => crate::persist::load(path)?,
            None => None,
        };
        let state = Arc::new(State::new(config));
        if let Some(mut table) = restored {
            table.attach_pools(&state.pools);
            if let Some(split) = &table.split {
                tracing::info!(%split, "proxy routing restored from its routing file");
            }
            state.table.store(Arc::new(table));
        }
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::clone(&state), rx));
        tracing::info!(%local_addr, "bluegreen proxy listening");
        Ok(ProxySwitch {
            inner: Arc::new(Inner {
                state,
                local_addr,
                shutdown: tx,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// `http://<local_addr><path>`.
    pub fn url(&self, path: &str) -> String {
        let sep = if path.starts_with('/') { "" } else { "/" };
        format!("http://{}{sep}{path}", self.inner.local_addr)
    }

    /// The configuration the proxy was bound with.
    pub fn config(&self) -> &ProxyConfig {
        &self.inner.state.config
    }

    /// Stops accepting connections and waits (at most `shutdown_timeout`) for open requests to
    /// finish. Idempotent; clones see the proxy stopped.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Requests in flight to `slot` now (the synchronous twin of
    /// [`TrafficSwitch::in_flight`]). A request counts from the moment it is routed until its
    /// response body is finished or dropped; an upgraded connection until it closes.
    pub fn in_flight_now(&self, slot: Slot) -> u64 {
        self.inner.state.stats.in_flight(slot)
    }

    /// Waits until no request is in flight to `slot`, at most `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`] naming how many requests were still in flight.
    pub async fn wait_drained(&self, slot: Slot, timeout: Duration) -> Result<()> {
        match self.inner.state.stats.wait_drained(slot, timeout).await {
            0 => Ok(()),
            left => Err(Error::Timeout {
                what: format!("draining slot {slot} ({left} requests still in flight)"),
                after: timeout,
            }),
        }
    }

    /// The proxy's own counters since it started (the synchronous twin of
    /// [`TrafficSwitch::counters`]): requests per slot, failures by cause (refused, timeout, the
    /// application's 5xx, the proxy's own 5xx), requests buffered by a pause and a latency
    /// histogram per slot, and the long-lived connections per slot it closed gracefully (see
    /// [`long_lived_closed`](ProxySwitch::long_lived_closed); a measured 0 when none were).
    pub fn counters_now(&self) -> SwitchCounters {
        let state = &self.inner.state;
        state
            .stats
            .counters(state.gate.counts().held, &state.long_lived)
    }

    /// The counters in the Prometheus text exposition format, as the admin API's `GET /metrics`
    /// serves them: `bluegreen_proxy_requests_total{slot}`,
    /// `bluegreen_proxy_failed_requests_total{slot,cause}`, `bluegreen_proxy_unrouted_errors_total`,
    /// `bluegreen_proxy_buffered_requests_total`, `bluegreen_proxy_long_lived_closed_total{slot}`,
    /// `bluegreen_proxy_in_flight{slot}` and the histogram
    /// `bluegreen_proxy_request_duration_seconds{slot}`.
    pub fn prometheus_metrics(&self) -> String {
        let state = &self.inner.state;
        state
            .stats
            .prometheus(state.gate.counts().held, &state.long_lived)
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.inner.state.gate.is_paused()
    }

    /// Long-lived connections to `slot` now: WebSocket and other upgraded connections (not
    /// requests in flight: [`in_flight_now`](ProxySwitch::in_flight_now) does not count them),
    /// and HTTP/2 client connections with streams in flight to `slot`.
    pub fn long_lived_now(&self, slot: Slot) -> u64 {
        self.inner.state.long_lived.open_now(slot) + self.inner.state.connections.http2_to(slot)
    }

    /// Long-lived connections to `slot` the proxy closed (a WebSocket with a close frame `1001
    /// going away` sent at a frame boundary, another upgraded protocol by closing it, an HTTP/2
    /// connection with GOAWAY) since it started.
    pub fn long_lived_closed(&self, slot: Slot) -> u64 {
        self.inner.state.long_lived.closed(slot)
    }

    /// Closes every long-lived connection open to `slot` (see
    /// [`long_lived_closed`](ProxySwitch::long_lived_closed)) and waits until they are gone, at
    /// most a few seconds; returns how many were closed gracefully.
    pub async fn close_long_lived_now(&self, slot: Slot) -> u64 {
        let ll = &self.inner.state.long_lived;
        let before = ll.closed(slot);
        // HTTP/2: GOAWAY; the streams in flight finish where they are.
        let goaway = self.inner.state.connections.goaway(slot);
        ll.add_closed(slot, goaway);
        ll.close_all(slot);
        let deadline = tokio::time::Instant::now() + 3 * crate::long_lived::CLOSE_GRACE;
        while ll.open_now(slot) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ll.closed(slot) - before
    }

    /// What pausing did to requests since the proxy started: held and let through, refused
    /// with 503 because too many were waiting, or with 504 because the pause lasted too long.
    pub fn pause_counts(&self) -> PauseCounts {
        self.inner.state.gate.counts()
    }

    /// How shadow traffic went since preview routing last turned on; `None` without
    /// [`ProxyConfig::shadow`](crate::ProxyConfig::shadow).
    pub fn shadow_report(&self) -> Option<ShadowReport> {
        self.inner.state.shadow.as_ref().map(|s| s.snapshot())
    }

    /// Requests held by the pause right now.
    pub fn paused_requests(&self) -> usize {
        self.inner.state.gate.waiting()
    }

    /// The slot preview traffic goes to, if preview is on.
    pub fn preview_slot(&self) -> Option<Slot> {
        self.inner
            .state
            .table
            .load()
            .preview
            .as_ref()
            .map(|p| p.slot)
    }

    /// The endpoints of both slots as last applied.
    pub fn endpoints(&self) -> Endpoints {
        self.inner.state.table.load().endpoints.clone()
    }

    /// Builds a new table from the current one and swaps it in; writers are serialized so no
    /// update is lost, readers never wait. With a routing file, the new table is written first
    /// (a small synchronous write under the writer lock, so the file's order is the tables'
    /// order); if that fails nothing changes.
    fn update(&self, change: impl FnOnce(&Table) -> Option<Table>) -> Result<()> {
        let state = &self.inner.state;
        let _writer = state.writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = state.table.load_full();
        if let Some(mut next) = change(&current) {
            if let Some(path) = &state.config.routing_file {
                crate::persist::save(path, &next)?;
            }
            next.attach_pools(&state.pools);
            state.table.store(Arc::new(next));
        }
        Ok(())
    }

    fn table(&self) -> &ArcSwap<Table> {
        &self.inner.state.table
    }
}

#[async_trait]
impl TrafficSwitch for ProxySwitch {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        // Not (yet) through the admin API: only the in-process proxy closes long-lived
        // connections.
        capabilities().with_close_long_lived(true)
    }

    async fn apply(&self, split: &TrafficSplit, endpoints: &Endpoints) -> Result<()> {
        self.check_split(split, endpoints)?;
        if let Some(sticky) = &split.sticky {
            if !sticky.cookie.is_empty() {
                check_cookie_name("sticky cookie", &sticky.cookie)?;
            }
        }
        let upstreams = PerSlot::new(
            Upstream::all(&endpoints.blue)?,
            Upstream::all(&endpoints.green)?,
        );
        self.update(|current| {
            if current.split.as_ref() == Some(split) && current.endpoints == *endpoints {
                return None;
            }
            Some(Table {
                split: Some(split.clone()),
                upstreams,
                endpoints: endpoints.clone(),
                preview: current.preview.clone(),
            })
        })?;
        tracing::info!(%split, "proxy split applied");
        Ok(())
    }

    async fn current(&self) -> Result<Option<TrafficSplit>> {
        Ok(self.table().load().split.clone())
    }

    async fn preview(&self, slot: Option<Slot>, endpoints: &Endpoints) -> Result<()> {
        let preview = match slot {
            Some(slot) => {
                let eps = endpoints.get(slot);
                if eps.is_empty() {
                    return Err(Error::invalid(
                        "preview",
                        slot.to_string(),
                        format!("slot {slot} has no endpoints to preview"),
                    ));
                }
                Some(Preview {
                    slot,
                    upstreams: Upstream::all(eps)?,
                })
            }
            None => None,
        };
        let turning_on = preview.is_some() && self.table().load().preview.is_none();
        self.update(|current| {
            if current.preview == preview {
                return None;
            }
            let mut next = current.clone();
            next.preview = preview;
            Some(next)
        })?;
        if turning_on {
            if let Some(shadow) = &self.inner.state.shadow {
                shadow.reset();
            }
        }
        Ok(())
    }

    async fn in_flight(&self, slot: Slot) -> Result<u64> {
        Ok(self.in_flight_now(slot))
    }

    async fn metrics(&self, slot: Slot) -> Result<SlotMetrics> {
        Ok(self.inner.state.stats.metrics(slot))
    }

    async fn counters(&self) -> Result<SwitchCounters> {
        Ok(self.counters_now())
    }

    async fn long_lived(&self, slot: Slot) -> Result<u64> {
        Ok(self.long_lived_now(slot))
    }

    async fn close_long_lived(&self, slot: Slot) -> Result<u64> {
        Ok(self.close_long_lived_now(slot).await)
    }

    async fn pause(&self) -> Result<()> {
        self.inner.state.gate.pause();
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        self.inner.state.gate.resume();
        Ok(())
    }
}
