//! End to end: the Deployer with local processes (bluegreen-process), this switch in front of
//! them, and a file state store — deploy v1, v2 under load, roll back, deploy v3.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bluegreen_core::health::HttpCheck;
use bluegreen_core::{
    Deployer, FileStateStore, HttpVersionProbe, Policy, Release, RunOutcome, Slot, TrafficSplit,
    TrafficSwitch, VersionMarker,
};
use bluegreen_process::{ProcessConfig, ProcessEnvironment};
use common::{client, haproxy_available, Haproxy, Load, LoadOptions};

struct KillAll(ProcessEnvironment);

impl Drop for KillAll {
    fn drop(&mut self) {
        self.0.kill_all();
    }
}

fn release(v: &str) -> Release {
    Release::new(v, bluegreen_demo::binary_path().to_string_lossy()).unwrap()
}

async fn version_through_haproxy(url: &str) -> String {
    let r = client().get(url).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.headers()["x-bluegreen-version"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployer_deploys_v1_v2_rolls_back_and_deploys_v3_through_haproxy() {
    if !haproxy_available("deployer") {
        return;
    }
    let h = Haproxy::start();
    let dir = tempfile::tempdir().unwrap();
    let env = ProcessEnvironment::new(ProcessConfig::new(dir.path().join("process")));
    let _guard = KillAll(env.clone());
    let switch = h.switch();
    let deployer = Deployer::builder()
        .environment(Arc::new(env.clone()))
        .switch(Arc::new(switch.clone()))
        .store(Arc::new(
            FileStateStore::new(dir.path().join("state")).unwrap(),
        ))
        .health_check(Arc::new(HttpCheck::new("/health")))
        .verify_data_path(Arc::new(HttpVersionProbe::new(
            h.url("/"),
            VersionMarker::Header("x-bluegreen-version".into()),
        )))
        .policy(
            Policy::default()
                .with_readiness_timeout(Duration::from_secs(30))
                .with_observation(Duration::ZERO, Duration::from_millis(100))
                .with_drain_timeout(Duration::from_secs(5)),
        )
        .build()
        .unwrap();

    let report = deployer.deploy(release("v1")).await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Live);
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );
    assert_eq!(version_through_haproxy(&h.url("/")).await, "v1");

    let load = Load::start(h.addr(), LoadOptions::new(4));
    let report = deployer.deploy(release("v2")).await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Live);
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Green))
    );
    assert_eq!(version_through_haproxy(&h.url("/")).await, "v2");

    let report = deployer.rollback().await.unwrap();
    assert_eq!(report.version.as_str(), "v1");
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );
    assert_eq!(version_through_haproxy(&h.url("/")).await, "v1");
    let stats = load.finish().await;
    let (ok, failed, errors) = (stats.ok, stats.failed, stats.errors);
    assert_eq!(
        failed, 0,
        "requests failed during deploy and rollback: {errors:?}"
    );
    assert!(ok > 0);

    // v3 goes to green again: the process environment picks a new port, so the switch must
    // move green's server address (as it did for v2, from the placeholder).
    let green_before = switch.servers().await.unwrap().green;
    let report = deployer.deploy(release("v3")).await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Live);
    assert_eq!(version_through_haproxy(&h.url("/")).await, "v3");
    let st = deployer.status().await.unwrap();
    assert!(st.drift.is_empty(), "{:?}", st.drift);
    assert_eq!(st.switch, Some(TrafficSplit::all(Slot::Green)));
    let green = switch.servers().await.unwrap().green;
    let ep = st.slots.green.endpoints[0].clone();
    assert_eq!(green.port, ep.port, "{}", green.summary());
    assert_ne!(
        green.port, green_before.port,
        "the process environment reused the port"
    );
}
