//! The complete haproxy.cfg for users starting from nothing: real HAProxy starts on it and routes
//! requests once the switch applies a split.

mod common;

use std::process::Stdio;
use std::time::Duration;

use bluegreen_core::{Slot, TrafficSplit, TrafficSwitch};
use bluegreen_haproxy::{HaproxyConfig, HaproxySwitch};
use bluegreen_testenv::port::{self, StartError};
use common::{client, haproxy_available, haproxy_bin, served_by, Demos};

/// HAProxy in the foreground on `cfg`, killed on drop.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts HAProxy on `render(listen)` written to `<dir>/haproxy.cfg`, on a fresh loopback port;
/// returns it, the frontend address and its log file.
fn start(
    dir: &std::path::Path,
    render: impl Fn(std::net::SocketAddr) -> String,
) -> (Running, std::net::SocketAddr, std::path::PathBuf) {
    let cfg = dir.join("haproxy.cfg");
    let log = dir.join("haproxy.log");
    let admin = dir.join("admin.sock");
    let (running, listen) = port::start_on_fresh_ports(|[p]| {
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], p));
        std::fs::write(&cfg, render(listen)).unwrap();
        let out = std::fs::File::create(&log).unwrap();
        let mut child = std::process::Command::new(haproxy_bin())
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .map_err(|e| StartError::Failed(format!("spawning haproxy: {e}")))?;
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        match port::wait_serving(
            &mut child,
            &[p],
            Duration::from_secs(20),
            "haproxy",
            || std::os::unix::net::UnixStream::connect(&admin).is_ok(),
            read_log,
        ) {
            Ok(()) => Ok((Running(child), listen)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    })
    .unwrap();
    (running, listen, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_starts_on_the_complete_config_and_routes_after_the_first_apply() {
    if !haproxy_available("complete") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("server-state");
    let config = HaproxyConfig::unix(dir.path().join("admin.sock"))
        .with_health_check("/health", Duration::from_millis(200))
        .with_ready_timeout(Duration::from_secs(20));
    let (_haproxy, listen, log) = start(dir.path(), |listen| {
        config.render_complete(listen, &state).unwrap()
    });
    // The first start has no saved server state: the documented, expected warning.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("Can't open global server state file"),
        "{text}"
    );

    let demos = Demos::start().await;
    let url = format!("http://{listen}/");
    let http = client();
    // Both servers are in maintenance until the first apply: nothing is served yet.
    assert!(served_by(&http, &url).await.is_err());

    let switch = HaproxySwitch::new(config).unwrap();
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &demos.endpoints())
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(served_by(&http, &url).await.unwrap(), Slot::Blue);
    }
    switch
        .apply(&TrafficSplit::all(Slot::Green), &demos.endpoints())
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(served_by(&http, &url).await.unwrap(), Slot::Green);
    }
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Green))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_without_check_is_treated_as_healthy_at_the_switch() {
    if !haproxy_available("complete") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("server-state");
    let config = HaproxyConfig::unix(dir.path().join("admin.sock"))
        .with_ready_timeout(Duration::from_secs(5));
    // A hand-written backend whose servers have no `check`: HAProxy reports them up whatever
    // answers there, so the switch cannot wait for a passed check.
    let (_haproxy, listen, _log) = start(dir.path(), |listen| {
        let text = config.render_complete(listen, &state).unwrap();
        assert!(text.contains("default-server check "), "{text}");
        text.replace("default-server check ", "default-server ")
    });
    let demos = Demos::start().await;
    let switch = HaproxySwitch::new(config).unwrap();
    let mut endpoints = demos.endpoints();
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints)
        .await
        .unwrap();
    let url = format!("http://{listen}/");
    assert_eq!(served_by(&client(), &url).await.unwrap(), Slot::Blue);
    // Green's endpoint answers nothing, yet the switch moves traffic there: without `check`
    // nothing tells HAProxy (or the switch) that it is down. Health belongs to the engine's
    // health gate before the switch, or to `check` on the servers.
    let nothing = bluegreen_testenv::port::RefusedAddr::new();
    endpoints.green = vec![bluegreen_core::Endpoint::new("127.0.0.1", nothing.port())];
    let applied = switch
        .apply(&TrafficSplit::all(Slot::Green), &endpoints)
        .await;
    assert!(applied.is_ok(), "{applied:?}");
    assert!(served_by(&client(), &url).await.is_err());
}
