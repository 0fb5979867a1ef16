//! The demo backends every switch suite and benchmark routes between: two in-process
//! `bluegreen-demo` apps on port 0 (v1 on blue, v2 on green), and a builder of the core testkit's
//! [`SwitchSuite`] around them.

use std::net::SocketAddr;
use std::sync::Arc;

use bluegreen_core::testkit::{BoxFuture, ReopenFn, ServedByFn, SwitchSuite};
use bluegreen_core::{Endpoint, Endpoints, Error, Slot, TrafficSwitch};
use bluegreen_demo::{DemoConfig, DemoServer};

/// Two demo apps: `v1` answering as blue, `v2` as green. Keep it alive while the switch routes
/// to them.
#[derive(Debug)]
pub struct DemoBackends {
    /// The blue app (`v1`).
    pub blue: DemoServer,
    /// The green app (`v2`).
    pub green: DemoServer,
}

impl DemoBackends {
    /// Starts both apps on loopback port 0.
    ///
    /// # Panics
    /// An app cannot bind a loopback port.
    pub async fn start() -> DemoBackends {
        DemoBackends {
            blue: DemoServer::start(DemoConfig::new("v1", "blue"))
                .await
                .expect("starting the blue demo app"),
            green: DemoServer::start(DemoConfig::new("v2", "green"))
                .await
                .expect("starting the green demo app"),
        }
    }

    /// One endpoint per slot.
    pub fn endpoints(&self) -> Endpoints {
        let e = |s: &DemoServer| Endpoint::new("127.0.0.1", s.local_addr().port());
        Endpoints::new(vec![e(&self.blue)], vec![e(&self.green)])
    }

    /// A [`SwitchSuite`] builder on these backends' endpoints.
    pub fn suite(&self) -> SwitchSuiteBuilder {
        SwitchSuiteBuilder::new(self.endpoints())
    }
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

    /// Checks the data path by requests to `listen` ([`served_by`]).
    pub fn served_through(self, listen: SocketAddr) -> Self {
        self.served_by(served_by_fn(listen))
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
