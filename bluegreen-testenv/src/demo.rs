//! The demo backends every switch suite and benchmark routes between: in-process
//! `bluegreen-demo` apps on port 0 (v1 on blue, v2 on green; one per slot, or several), and a
//! builder of the core testkit's [`SwitchSuite`] around them.

use std::net::SocketAddr;
use std::sync::Arc;

use bluegreen_core::testkit::{AnsweredByFn, BoxFuture, ReopenFn, ServedByFn, SwitchSuite};
use bluegreen_core::{Endpoint, Endpoints, Error, Slot, TrafficSwitch};
use bluegreen_demo::{DemoConfig, DemoServer};

use crate::load::{Load, LoadOptions, LoadStats};

/// Demo apps: `v1` answering as blue, `v2` as green, one per slot or several
/// ([`DemoBackends::start_several`]). Keep it alive while the switch routes to them.
#[derive(Debug)]
pub struct DemoBackends {
    /// The (first) blue app (`v1`).
    pub blue: DemoServer,
    /// The (first) green app (`v2`).
    pub green: DemoServer,
    /// The other blue apps (`v1`), with [`DemoBackends::start_several`].
    pub more_blue: Vec<DemoServer>,
    /// The other green apps (`v2`), with [`DemoBackends::start_several`].
    pub more_green: Vec<DemoServer>,
}

async fn demo(version: &str, slot: Slot) -> DemoServer {
    DemoServer::start(DemoConfig::new(version, slot.to_string()))
        .await
        .unwrap_or_else(|e| panic!("starting a {slot} demo app: {e}"))
}

impl DemoBackends {
    /// Starts one app per slot on loopback port 0.
    ///
    /// # Panics
    /// An app cannot bind a loopback port.
    pub async fn start() -> DemoBackends {
        DemoBackends::start_several(1, 1).await
    }

    /// Starts `blue` apps for blue and `green` for green (at least one each) on loopback port 0:
    /// slots of several endpoints. Each answers `x-bluegreen-instance` with its address, so a
    /// request through a switch says which endpoint served it ([`answered_by`]).
    ///
    /// # Panics
    /// An app cannot bind a loopback port.
    pub async fn start_several(blue: usize, green: usize) -> DemoBackends {
        let mut more_blue = Vec::new();
        for _ in 1..blue {
            more_blue.push(demo("v1", Slot::Blue).await);
        }
        let mut more_green = Vec::new();
        for _ in 1..green {
            more_green.push(demo("v2", Slot::Green).await);
        }
        DemoBackends {
            blue: demo("v1", Slot::Blue).await,
            green: demo("v2", Slot::Green).await,
            more_blue,
            more_green,
        }
    }

    /// One endpoint per slot (the first app of each).
    pub fn endpoints(&self) -> Endpoints {
        Endpoints::new(vec![endpoint(&self.blue)], vec![endpoint(&self.green)])
    }

    /// Every app's endpoint, per slot (the first app first).
    pub fn all_endpoints(&self) -> Endpoints {
        let all = |first: &DemoServer, more: &[DemoServer]| {
            std::iter::once(first).chain(more).map(endpoint).collect()
        };
        Endpoints::new(
            all(&self.blue, &self.more_blue),
            all(&self.green, &self.more_green),
        )
    }

    /// A [`SwitchSuite`] builder on these backends' endpoints; with several apps per slot, its
    /// multi-endpoint check routes to all of them ([`SwitchSuite::several`]).
    pub fn suite(&self) -> SwitchSuiteBuilder {
        let builder = SwitchSuiteBuilder::new(self.endpoints());
        if self.more_blue.is_empty() && self.more_green.is_empty() {
            builder
        } else {
            builder.several(self.all_endpoints())
        }
    }
}

impl DemoBackends {
    /// Switches `switch` between the slots, each routed to all its apps
    /// ([`all_endpoints`](Self::all_endpoints)), `switches` times under 8 keep-alive clients
    /// sending requests to `listen` (the switch's public address), holding each split for
    /// [`HOLD`]. Returns what the clients saw.
    ///
    /// # Panics
    /// An `apply` or `current` fails or reads back another split; a request fails; the clients
    /// got 100 answers or fewer (too little load to mean anything); after a switch, an app of the live slot serves no request during the hold, or an app of the idle
    /// slot serves one.
    pub async fn switch_under_load(
        &self,
        switch: &dyn TrafficSwitch,
        listen: SocketAddr,
        switches: usize,
    ) -> LoadStats {
        let name = switch.name().to_string();
        let eps = self.all_endpoints();
        let split = |slot| bluegreen_core::TrafficSplit::all(slot);
        switch
            .apply(&split(Slot::Blue), &eps)
            .await
            .unwrap_or_else(|e| panic!("{name}: apply(blue) failed: {e}"));
        let load = Load::start(listen, LoadOptions::new(8));
        let mut slot = Slot::Blue;
        for i in 0..switches {
            slot = slot.other();
            switch
                .apply(&split(slot), &eps)
                .await
                .unwrap_or_else(|e| panic!("{name}: switch {i} to {slot} failed: {e}"));
            assert_eq!(
                switch.current().await.unwrap(),
                Some(split(slot)),
                "{name}: switch {i}"
            );
            // Requests already on their way to the other slot finish first.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let before = load.stats().instances;
            tokio::time::sleep(HOLD).await;
            let after = load.stats().instances;
            let served = |e: &Endpoint| {
                let key = e.authority();
                after.get(&key).copied().unwrap_or(0) - before.get(&key).copied().unwrap_or(0)
            };
            for e in eps.get(slot) {
                assert!(
                    served(e) > 0,
                    "{name}: after switch {i} to {slot}, live endpoint {} served no request in \
                     {HOLD:?} ({after:?})",
                    e.authority()
                );
            }
            for e in eps.get(slot.other()) {
                assert_eq!(
                    served(e),
                    0,
                    "{name}: after switch {i} to {slot}, idle endpoint {} served requests",
                    e.authority()
                );
            }
        }
        let stats = load.finish().await;
        eprintln!(
            "{name}: {switches} switches between {} + {} endpoints: {} ok, {} failed, per \
             instance {:?}",
            eps.blue.len(),
            eps.green.len(),
            stats.ok,
            stats.failed,
            stats.instances
        );
        assert!(
            stats.ok > 100,
            "{name}: too little load to mean anything: {} requests",
            stats.ok
        );
        assert_eq!(
            stats.failed,
            0,
            "{name}: {} of {} requests failed during {switches} switches between slots of \
             several endpoints: {:?}",
            stats.failed,
            stats.total(),
            stats.errors
        );
        stats
    }
}

/// How long [`DemoBackends::switch_under_load`] holds each split.
pub const HOLD: std::time::Duration = std::time::Duration::from_millis(300);

fn endpoint(s: &DemoServer) -> Endpoint {
    Endpoint::new("127.0.0.1", s.local_addr().port())
}

/// `GET /` from `addr` (the switch's public listener) on a fresh connection; the slot that
/// answered, from `x-bluegreen-slot`.
///
/// # Errors
/// The request fails, the answer is not 200, or it names no slot.
pub async fn served_by(addr: SocketAddr) -> bluegreen_core::Result<Slot> {
    let r = bluegreen_demo::client::get(addr, "/")
        .await
        .map_err(|e| Error::backend("test", "request through the switch", true, e))?;
    if r.status != 200 {
        return Err(Error::backend(
            "test",
            "request through the switch",
            true,
            format!("status {}: {}", r.status, r.body),
        ));
    }
    r.header("x-bluegreen-slot")
        .unwrap_or("none")
        .parse::<Slot>()
}

/// The whole answer (status line, headers, body) to `GET path` at `addr`, from a synchronous test:
/// a raw HTTP/1.1 request on a fresh connection, read bounded by 5 s. `None` when nothing answers.
pub fn get_at(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}

/// The version answering `GET /` at `addr` (`x-bluegreen-version`), from a synchronous test
/// ([`get_at`]). `None` when nothing answers or the answer names no version.
pub fn version_at(addr: SocketAddr) -> Option<String> {
    get_at(addr, "/")?.to_lowercase().lines().find_map(|l| {
        l.strip_prefix("x-bluegreen-version: ")
            .map(|v| v.trim().to_string())
    })
}

/// [`served_by`] on `addr`, as the suite's data-path callback.
pub fn served_by_fn(addr: SocketAddr) -> ServedByFn {
    Arc::new(move || -> BoxFuture<bluegreen_core::Result<Slot>> { Box::pin(served_by(addr)) })
}

/// `GET /` from `addr` on a fresh connection; the endpoint that answered (`host:port`, from the
/// demo app's `x-bluegreen-instance`).
///
/// # Errors
/// The request fails, the answer is not 200, or it names no instance.
pub async fn answered_by(addr: SocketAddr) -> bluegreen_core::Result<String> {
    let failed = |why: String| Error::backend("test", "request through the switch", true, why);
    let r = bluegreen_demo::client::get(addr, "/")
        .await
        .map_err(|e| failed(e.to_string()))?;
    if r.status != 200 {
        return Err(failed(format!("status {}: {}", r.status, r.body)));
    }
    r.header("x-bluegreen-instance")
        .map(str::to_string)
        .ok_or_else(|| failed("the answer has no x-bluegreen-instance header".into()))
}

/// [`answered_by`] on `addr`, as the suite's multi-endpoint data-path callback.
pub fn answered_by_fn(addr: SocketAddr) -> AnsweredByFn {
    Arc::new(move || -> BoxFuture<bluegreen_core::Result<String>> { Box::pin(answered_by(addr)) })
}

/// Builds the testkit's [`SwitchSuite`]: endpoints, plus the data path (requests through the
/// switch's listener) and a reopen callback when the backend has them.
///
/// ```no_run
/// # async fn run(switch: &dyn bluegreen_core::TrafficSwitch, listen: std::net::SocketAddr) {
/// let backends = bluegreen_testenv::DemoBackends::start().await;
/// let suite = backends.suite().served_through(listen).build();
/// bluegreen_core::testkit::switch_suite(switch, &suite).await;
/// # }
/// ```
#[must_use]
pub struct SwitchSuiteBuilder {
    suite: SwitchSuite,
}

impl std::fmt::Debug for SwitchSuiteBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.suite.fmt(f)
    }
}

impl SwitchSuiteBuilder {
    /// A suite over `endpoints` with no data path and no reopen callback.
    pub fn new(endpoints: Endpoints) -> Self {
        SwitchSuiteBuilder {
            suite: SwitchSuite::new(endpoints),
        }
    }

    /// Checks the data path by requests to `listen`: which slot answered ([`served_by`]) and
    /// which endpoint ([`answered_by`]).
    pub fn served_through(mut self, listen: SocketAddr) -> Self {
        self.suite.answered_by = Some(answered_by_fn(listen));
        self.served_by(served_by_fn(listen))
    }

    /// Routes slots to several endpoints in the multi-endpoint check (at least 3 blue, 2 green).
    pub fn several(mut self, endpoints: Endpoints) -> Self {
        self.suite.several = Some(endpoints);
        self
    }

    /// Checks the data path with `probe`.
    pub fn served_by(mut self, probe: ServedByFn) -> Self {
        self.suite.served_by = Some(probe);
        self
    }

    /// Proves `current` reads the proxy back through fresh handles made by `open`.
    pub fn reopen<F, S>(mut self, open: F) -> Self
    where
        F: Fn() -> S + Send + Sync + 'static,
        S: TrafficSwitch + 'static,
    {
        let open = Arc::new(open);
        let f: ReopenFn = Arc::new(move || -> BoxFuture<Box<dyn TrafficSwitch>> {
            let s: Box<dyn TrafficSwitch> = Box::new(open());
            Box::pin(async move { s })
        });
        self.suite.reopen = Some(f);
        self
    }

    /// The suite.
    pub fn build(self) -> SwitchSuite {
        self.suite
    }
}
