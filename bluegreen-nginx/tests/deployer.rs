//! End to end: the Deployer with local processes (the real demo app binary), the Dynamic nginx
//! switch in front of them, and the file state store: v1, v2 (canary, under keep-alive load),
//! then a rollback to v1.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bluegreen_core::health::HttpCheck;
use bluegreen_core::{
    CanaryStep, Deployer, FileStateStore, HttpVersionProbe, Policy, Release, RunOutcome,
    TrafficSplit, TrafficSwitch, VersionMarker,
};
use bluegreen_nginx::NginxDynamicSwitch;
use bluegreen_process::{ProcessConfig, ProcessEnvironment};
use bluegreen_testenv::{Load, LoadOptions};

struct KillAll(ProcessEnvironment);

impl Drop for KillAll {
    fn drop(&mut self) {
        self.0.kill_all();
    }
}

fn release(v: &str) -> Release {
    Release::new(v, bluegreen_demo::binary_path().to_string_lossy()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployer_with_processes_and_the_dynamic_nginx_switch_deploys_and_rolls_back() {
    if !common::require(true) {
        return;
    }
    let dir = common::tempdir();
    let (nginx, config) =
        bluegreen_testenv::nginx::start_dynamic(&dir.path().join("nginx"), "app", Ok).unwrap();
    let listen = nginx.listen();
    let switch = NginxDynamicSwitch::new(config);
    let env = ProcessEnvironment::new(ProcessConfig::new(dir.path().join("process")));
    let _guard = KillAll(env.clone());
    let url = format!("http://{listen}/");
    let deployer = Deployer::builder()
        .environment(Arc::new(env.clone()))
        .switch(Arc::new(switch.clone()))
        .store(Arc::new(
            FileStateStore::new(dir.path().join("state")).unwrap(),
        ))
        .health_check(Arc::new(HttpCheck::new("/health")))
        .verify_data_path(Arc::new(HttpVersionProbe::new(
            url,
            VersionMarker::Header("x-bluegreen-version".into()),
        )))
        .policy(
            Policy::default()
                .with_readiness_timeout(Duration::from_secs(30))
                .with_observation(Duration::from_millis(500), Duration::from_millis(100))
                .with_drain_timeout(Duration::from_secs(5))
                .with_canary(vec![
                    CanaryStep::new(20, Duration::from_millis(300)),
                    CanaryStep::new(100, Duration::ZERO),
                ]),
        )
        .build()
        .unwrap();

    let report = deployer.deploy(release("v1")).await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Live, "{report:?}");
    let version = |r: bluegreen_demo::client::Response| {
        r.header("x-bluegreen-version")
            .unwrap_or("none")
            .to_string()
    };
    assert_eq!(
        version(bluegreen_demo::client::get(listen, "/").await.unwrap()),
        "v1"
    );
    let first = switch.current().await.unwrap().unwrap();
    assert!(first.is_whole());

    // v2 through a 20 % canary step while keep-alive clients run: no request fails.
    let load = Load::start(
        listen,
        LoadOptions::new(4).with_pause(Duration::from_millis(2)),
    );
    let report = deployer.deploy(release("v2")).await.unwrap();
    let stats = load.finish().await;
    assert_eq!(report.outcome, RunOutcome::Live, "{report:?}");
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert!(stats.ok > 20, "{stats:?}");
    assert_eq!(
        version(bluegreen_demo::client::get(listen, "/").await.unwrap()),
        "v2"
    );
    let live = first.primary().other();
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(live))
    );

    // Rollback: the old slot is still warm; traffic goes back to v1.
    let report = deployer.rollback().await.unwrap();
    assert_eq!(report.version.as_str(), "v1");
    assert_eq!(
        version(bluegreen_demo::client::get(listen, "/").await.unwrap()),
        "v1"
    );
    let st = deployer.status().await.unwrap();
    assert_eq!(st.state.active, Some(live.other()));
    assert_eq!(st.switch, Some(TrafficSplit::all(live.other())));
    assert!(st.drift.is_empty(), "{:?}", st.drift);
}
