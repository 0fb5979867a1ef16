//! Shared test setup: real nginx (from `bluegreen-testenv`) in a temp dir, in-process demo
//! backends.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::net::SocketAddr;

use bluegreen_core::{Slot, TrafficSplit};
use bluegreen_nginx::{NginxDynamicSwitch, NginxReloadConfig, NginxReloadSwitch, VerifyProbe};
pub use bluegreen_testenv::demo::served_by;
pub use bluegreen_testenv::nginx::available as require;
use bluegreen_testenv::nginx::{self, NginxProcess};
pub use bluegreen_testenv::DemoBackends as Backends;

/// A temp dir nginx workers can read.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub struct DynamicSetup {
    pub nginx: NginxProcess,
    pub switch: NginxDynamicSwitch,
    pub listen: SocketAddr,
    pub backends: Backends,
    pub dir: tempfile::TempDir,
}

pub async fn dynamic() -> DynamicSetup {
    dynamic_site(|site| site).await
}

/// [`dynamic`], with `site` changing the nginx configuration around the snippet.
pub async fn dynamic_site(
    site: impl Fn(nginx::StandaloneConfig) -> nginx::StandaloneConfig,
) -> DynamicSetup {
    let dir = tempdir();
    let backends = Backends::start_several(3, 2).await;
    let (nginx, config) = nginx::start_dynamic_site(dir.path(), "app", Ok, site).unwrap();
    DynamicSetup {
        listen: nginx.listen(),
        nginx,
        switch: NginxDynamicSwitch::new(config),
        backends,
        dir,
    }
}

pub struct ReloadSetup {
    pub nginx: NginxProcess,
    pub switch: NginxReloadSwitch,
    pub listen: SocketAddr,
    pub backends: Backends,
    pub dir: tempfile::TempDir,
}

/// nginx (stock, no modules) including a managed upstream file that starts at 100 % blue.
pub async fn reload() -> ReloadSetup {
    reload_site(|site| site).await
}

/// [`reload`], with `site` changing the nginx configuration.
pub async fn reload_site(
    site: impl Fn(nginx::StandaloneConfig) -> nginx::StandaloneConfig,
) -> ReloadSetup {
    let dir = tempdir();
    let backends = Backends::start_several(3, 2).await;
    let include = dir.path().join("upstream.conf");
    // No pid file given: the switch finds the one nginx.conf names (`pid …;`).
    let config = NginxReloadConfig::builder(nginx::command(dir.path()))
        .include(&include)
        .upstream("app")
        .build()
        .unwrap();
    // The include must exist before nginx starts; the verify probe needs nginx's port, known
    // once it runs.
    NginxReloadSwitch::new(config.clone())
        .write_initial(&TrafficSplit::all(Slot::Blue), &backends.endpoints())
        .unwrap();
    let nginx = nginx::start_reload_site(dir.path(), &include, "app", site).unwrap();
    let listen = nginx.listen();
    ReloadSetup {
        nginx,
        switch: NginxReloadSwitch::new(config.with_verify(VerifyProbe::new(listen))),
        listen,
        backends,
        dir,
    }
}
