//! Shared test setup: real nginx started on loopback ports in a temp dir, in-process demo backends.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;

use bluegreen_core::testkit::{BoxFuture, ServedByFn};
use bluegreen_core::{Endpoint, Endpoints, Error, Slot};
use bluegreen_demo::{DemoConfig, DemoServer};
use bluegreen_nginx::standalone::{self, NginxProcess, StandaloneConfig};
use bluegreen_nginx::{NginxDynamicConfig, NginxDynamicSwitch};

/// True when the test can run; false (after printing SKIPPED) when nginx or the Lua module is
/// missing outside CI. Panics in CI.
pub fn require(lua: bool) -> bool {
    let ok = if lua {
        standalone::lua_available()
    } else {
        standalone::nginx_available()
    };
    if ok {
        return true;
    }
    let what = if lua {
        "nginx with libnginx-mod-http-lua"
    } else {
        "nginx"
    };
    if std::env::var_os("CI").is_some() {
        panic!("{what} is required in CI but is not installed");
    }
    eprintln!("SKIPPED: {what} is not installed");
    false
}

/// A free loopback port (bound then released).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A temp dir nginx workers can read.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub struct Backends {
    pub blue: DemoServer,
    pub green: DemoServer,
}

impl Backends {
    pub async fn start() -> Backends {
        Backends {
            blue: DemoServer::start(DemoConfig::new("v1", "blue"))
                .await
                .unwrap(),
            green: DemoServer::start(DemoConfig::new("v2", "green"))
                .await
                .unwrap(),
        }
    }

    pub fn endpoints(&self) -> Endpoints {
        let e = |s: &DemoServer| Endpoint::new("127.0.0.1", s.local_addr().port());
        Endpoints::new(vec![e(&self.blue)], vec![e(&self.green)])
    }
}

pub struct DynamicSetup {
    pub nginx: NginxProcess,
    pub switch: NginxDynamicSwitch,
    pub listen: SocketAddr,
    pub backends: Backends,
    pub dir: tempfile::TempDir,
}

pub async fn dynamic() -> DynamicSetup {
    let dir = tempdir();
    let backends = Backends::start().await;
    let listen = free_addr();
    let config = NginxDynamicConfig::new(
        "app",
        free_addr(),
        NginxDynamicConfig::generate_token().unwrap(),
    )
    .unwrap();
    let nginx =
        NginxProcess::start(StandaloneConfig::dynamic(dir.path(), listen, &config)).unwrap();
    DynamicSetup {
        nginx,
        switch: NginxDynamicSwitch::new(config),
        listen,
        backends,
        dir,
    }
}

/// GET / through nginx with a fresh connection; the slot from `x-bluegreen-slot`.
pub async fn served_by(listen: SocketAddr) -> bluegreen_core::Result<Slot> {
    let r = bluegreen_demo::client::get(listen, "/")
        .await
        .map_err(|e| Error::backend("test", "request through nginx", true, e))?;
    if r.status != 200 {
        return Err(Error::backend(
            "test",
            "request through nginx",
            true,
            format!("status {}: {}", r.status, r.body),
        ));
    }
    r.header("x-bluegreen-slot")
        .unwrap_or("none")
        .parse::<Slot>()
}

pub fn served_by_fn(listen: SocketAddr) -> ServedByFn {
    Arc::new(move || -> BoxFuture<bluegreen_core::Result<Slot>> { Box::pin(served_by(listen)) })
}

pub struct ReloadSetup {
    pub nginx: NginxProcess,
    pub switch: bluegreen_nginx::NginxReloadSwitch,
    pub listen: SocketAddr,
    pub backends: Backends,
    pub dir: tempfile::TempDir,
}

/// nginx (stock, no modules) including a managed upstream file that starts at 100 % blue.
pub async fn reload() -> ReloadSetup {
    use bluegreen_core::TrafficSplit;
    use bluegreen_nginx::{NginxReloadConfig, NginxReloadSwitch, VerifyProbe};
    let dir = tempdir();
    let backends = Backends::start().await;
    let listen = free_addr();
    let include = dir.path().join("upstream.conf");
    let standalone = StandaloneConfig::reload(dir.path(), listen, &include, "app");
    let config =
        NginxReloadConfig::new(standalone.command(), &include, "app", standalone.pid_file())
            .unwrap()
            .with_verify(VerifyProbe::new(listen));
    let switch = NginxReloadSwitch::new(config);
    switch
        .write_initial(&TrafficSplit::all(Slot::Blue), &backends.endpoints())
        .unwrap();
    let nginx = NginxProcess::start(standalone).unwrap();
    ReloadSetup {
        nginx,
        switch,
        listen,
        backends,
        dir,
    }
}
