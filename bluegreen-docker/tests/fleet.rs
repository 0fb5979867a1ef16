//! DockerFleet on three real Docker engines, each in its own network namespace with its own
//! address (bluegreen-testenv's test hosts), with the demo image loaded on each.
//!
//! The tests of this binary share one set of hosts. Those that kill an engine or cut a host off
//! run alone (`exclusive_hosts`); the others run side by side (`hosts`), each with its own
//! project and ports.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bluegreen_core::testkit::{environment_suite, EnvironmentSuite};
use bluegreen_core::{
    Deployer, Environment, Error, InstanceState, KeepOld, LiveTraffic, Phase, Policy, Release,
    RunOutcome, Slot, TrafficSwitch,
};
use bluegreen_docker::{
    DockerConfig, DockerFleet, FleetError, HostPorts, Publish, PullPolicy, LABEL_PROJECT,
    LABEL_SLOT,
};
use bluegreen_proxy::{ProxyConfig, ProxySwitch};
use bluegreen_testenv::hosts::{self, TestHosts, DEMO_IMAGE};
use bluegreen_testenv::{Load, LoadStats};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static HOSTS: RwLock<()> = RwLock::const_new(());

/// The shared hosts, healthy, and a write guard on them; `None` (skipped outside CI).
async fn exclusive_hosts() -> Option<(&'static TestHosts, RwLockWriteGuard<'static, ()>)> {
    let guard = HOSTS.write().await;
    let set = hosts::shared().await?;
    // A test that failed midway may have left an engine killed or a link down.
    for h in set.hosts() {
        h.restore_link().unwrap();
        if h.client().await.is_err() {
            h.restart_engine().await.unwrap();
        }
    }
    Some((set, guard))
}

/// The shared hosts, healthy, for a test that does not break them (it runs beside others).
async fn hosts() -> Option<(&'static TestHosts, RwLockReadGuard<'static, ()>)> {
    let (set, guard) = exclusive_hosts().await?;
    Some((set, guard.downgrade()))
}

fn project(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "bgf-{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn config(project: &str) -> DockerConfig {
    DockerConfig::new(project)
        .unwrap()
        .with_pull(PullPolicy::Never)
        .with_stop_timeout(Duration::from_secs(2))
        // The demo app crashes at once or not at all: a short watch keeps the suite fast.
        .with_startup_grace(Duration::from_millis(300))
}

fn release(version: &str) -> Release {
    Release::new(version, DEMO_IMAGE).unwrap()
}

/// Removes the project from every host when dropped, whatever happened.
struct Cleanup(DockerFleet);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let fleet = self.0.clone();
        let t = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            if let Err(e) = rt.block_on(fleet.reset()) {
                eprintln!("fleet cleanup failed: {e}");
            }
        });
        let _ = t.join();
    }
}

fn fleet(set: &TestHosts, prefix: &str) -> (DockerFleet, Cleanup) {
    fleet_with(set, config(&project(prefix)))
}

fn fleet_with(set: &TestHosts, config: DockerConfig) -> (DockerFleet, Cleanup) {
    let fleet = DockerFleet::new(config, set.fleet_hosts()).unwrap();
    (fleet.clone(), Cleanup(fleet))
}

/// The `FleetError` inside a backend error.
fn fleet_error(e: &Error) -> &FleetError {
    let mut cur: &(dyn std::error::Error + 'static) = e;
    loop {
        if let Some(f) = cur.downcast_ref::<FleetError>() {
            return f;
        }
        match cur.source() {
            Some(s) => cur = s,
            None => panic!("no FleetError in {e}"),
        }
    }
}

/// Ids of the slot's containers per host.
async fn container_ids(fleet: &DockerFleet, slot: Slot) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for name in fleet.host_names() {
        let env = fleet.host(name).await.unwrap();
        for c in env.containers().await.unwrap() {
            if c.slot == Some(slot) {
                out.push((name.to_string(), c.id, c.version.unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_host_fleet_passes_the_environment_suite() {
    let Some((set, _serial)) = hosts().await else {
        return;
    };
    let (fleet, _cleanup) = fleet(set, "suite");
    let suite = EnvironmentSuite {
        release: Arc::new(release),
        ready_timeout: Duration::from_secs(30),
        exec_argv: None,
    };
    environment_suite(&fleet, &suite).await.assert_complete();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_runs_on_every_host_and_deploying_it_again_changes_nothing() {
    let Some((set, _serial)) = hosts().await else {
        return;
    };
    let (fleet, _cleanup) = fleet(set, "every");
    let eps = fleet.deploy(Slot::Blue, &release("v1")).await.unwrap();
    let mut hosts_of: Vec<String> = eps.iter().map(|e| e.host.clone()).collect();
    hosts_of.sort();
    let mut want: Vec<String> = set
        .hosts()
        .iter()
        .map(|h| h.address().to_string())
        .collect();
    want.sort();
    assert_eq!(hosts_of, want, "one endpoint per host, at its address");
    for e in &eps {
        let addr = format!("{}:{}", e.host, e.port).parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while bluegreen_testenv::demo::version_at(addr).as_deref() != Some("v1") {
            assert!(Instant::now() < deadline, "{e} never served v1");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let st = fleet.status(Slot::Blue).await.unwrap();
    assert_eq!(st.state, InstanceState::Running);
    assert_eq!(st.version.unwrap().as_str(), "v1");
    assert_eq!(st.endpoints.len(), 3);
    let per_host = fleet.host_status(Slot::Blue).await;
    assert_eq!(
        per_host.iter().map(|h| h.host.as_str()).collect::<Vec<_>>(),
        ["h1", "h2", "h3"]
    );
    assert!(per_host
        .iter()
        .all(|h| h.status.as_ref().unwrap().state == InstanceState::Running));

    // The same release again: every host keeps its container (same ids), same endpoints.
    let before = container_ids(&fleet, Slot::Blue).await;
    assert_eq!(before.len(), 3);
    let started = Instant::now();
    let again = fleet.deploy(Slot::Blue, &release("v1")).await.unwrap();
    assert_eq!(container_ids(&fleet, Slot::Blue).await, before);
    assert_eq!(again, eps);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a no-op redeploy took {:?}",
        started.elapsed()
    );
    // The other slot is independent.
    assert_eq!(
        fleet.status(Slot::Green).await.unwrap().state,
        InstanceState::Absent
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_failing_on_one_host_removes_what_it_started_on_the_others() {
    let Some((set, _serial)) = hosts().await else {
        return;
    };
    let (fleet, _cleanup) = fleet(set, "allornothing");
    fleet.deploy(Slot::Blue, &release("v1")).await.unwrap();
    let live = container_ids(&fleet, Slot::Blue).await;
    // On h2, a container we did not create holds the green slot's name: the deploy fails there.
    let h2 = fleet.host("h2").await.unwrap();
    let name = fleet.config().container_name(Slot::Green);
    h2.client()
        .create_container(
            Some(
                bluegreen_docker::bollard::query_parameters::CreateContainerOptionsBuilder::default()
                    .name(&name)
                    .build(),
            ),
            bluegreen_docker::bollard::models::ContainerCreateBody {
                image: Some(DEMO_IMAGE.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let err = fleet.deploy(Slot::Green, &release("v2")).await.unwrap_err();
    let f = fleet_error(&err);
    assert_eq!(f.failed.len(), 1, "{err}");
    assert_eq!(f.failed[0].host, "h2", "{err}");
    let text = err.to_string();
    assert!(
        text.contains("h2") && text.contains("was not created by bluegreen"),
        "{text}"
    );
    assert!(text.contains("live slot was not touched"), "{text}");
    // Nothing of v2 is left on any host (the foreign container is not ours and stays).
    assert!(
        container_ids(&fleet, Slot::Green).await.is_empty(),
        "green containers left: {:?}",
        container_ids(&fleet, Slot::Green).await
    );
    assert_eq!(
        container_ids(&fleet, Slot::Blue).await,
        live,
        "live touched"
    );
    assert_eq!(
        fleet.status(Slot::Blue).await.unwrap().state,
        InstanceState::Running
    );
    let foreign = h2.client().inspect_container(&name, None).await.unwrap();
    let labels = foreign.config.unwrap().labels.unwrap_or_default();
    assert!(!labels.contains_key(LABEL_PROJECT) && !labels.contains_key(LABEL_SLOT));
    h2.client()
        .remove_container(
            &name,
            Some(
                bluegreen_docker::bollard::query_parameters::RemoveContainerOptionsBuilder::default()
                    .force(true)
                    .build(),
            ),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_host_is_reported_by_name() {
    let Some((set, _serial)) = exclusive_hosts().await else {
        return;
    };
    let (fleet, _cleanup) = fleet(set, "unreachable");
    fleet.deploy(Slot::Blue, &release("v1")).await.unwrap();
    let h3 = set.get("h3").unwrap();
    h3.kill_engine();

    let per_host = fleet.host_status(Slot::Blue).await;
    for h in &per_host {
        match h.host.as_str() {
            "h3" => {
                let err = h.status.as_ref().unwrap_err();
                assert!(err.contains("cannot reach") && err.contains("h3"), "{err}");
                assert!(h.is_unreachable());
            }
            _ => assert_eq!(h.status.as_ref().unwrap().state, InstanceState::Running),
        }
    }
    // The aggregate answers: unknown (never running), each host by name, h3 with the error.
    let st = fleet.status(Slot::Blue).await.unwrap();
    assert_eq!(st.state, InstanceState::Unknown, "{st:?}");
    assert!(!st.is_up());
    assert_eq!(
        st.version.as_ref().unwrap().as_str(),
        "v1",
        "what h1, h2 run"
    );
    assert_eq!(st.endpoints.len(), 2, "the reachable hosts' endpoints");
    let parts: Vec<(&str, InstanceState)> = st
        .parts
        .iter()
        .map(|p| (p.name.as_str(), p.state))
        .collect();
    assert_eq!(
        parts,
        [
            ("h1", InstanceState::Running),
            ("h2", InstanceState::Running),
            ("h3", InstanceState::Unknown)
        ]
    );
    let unread: Vec<_> = st.unreadable_parts().collect();
    assert_eq!(unread.len(), 1);
    let why = unread[0].error.as_deref().unwrap();
    assert!(why.contains("cannot reach") && why.contains("h3"), "{why}");
    // Remove is not silently skipped on the unreachable host: it fails naming it, after
    // removing the slot everywhere else.
    let err = fleet.remove(Slot::Blue).await.unwrap_err();
    let f = fleet_error(&err);
    assert_eq!(f.failed[0].host, "h3", "{err}");
    assert_eq!(f.done, ["h1", "h2"]);
    let inner = f.failed[0].error.to_string();
    assert!(inner.contains("cannot reach the Docker Engine"), "{inner}");
    h3.restart_engine().await.unwrap();
    fleet.remove(Slot::Blue).await.unwrap();
    assert_eq!(
        fleet.status(Slot::Blue).await.unwrap().state,
        InstanceState::Absent
    );
}

// ---------------------------------------------------------------------------------------------
// Through the engine and the embedded proxy, under load.

struct Setup {
    _dir: tempfile::TempDir,
    proxy: ProxySwitch,
    fleet: DockerFleet,
    deployer: Deployer,
    _cleanup: Cleanup,
}

async fn setup(set: &TestHosts, prefix: &str, policy: Policy, concurrency: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let proxy =
        ProxySwitch::bind(ProxyConfig::default().with_connect_timeout(Duration::from_millis(500)))
            .await
            .unwrap();
    let (fleet, cleanup) = host_network_fleet(set, prefix, concurrency);
    let deployer = common::proxy_deployer(Arc::new(fleet.clone()), &proxy, dir.path(), policy);
    Setup {
        _dir: dir,
        proxy,
        fleet,
        deployer,
        _cleanup: cleanup,
    }
}

/// A fleet over the hosts with host networking, as on real hosts: no engine proxy process
/// between the switch and a live container, which keeps serving while its engine crashes.
fn host_network_fleet(set: &TestHosts, prefix: &str, concurrency: usize) -> (DockerFleet, Cleanup) {
    let (fleet, cleanup) = fleet_with(
        set,
        config(&project(prefix))
            .with_publish(Publish::Host)
            .with_host_ports(host_ports()),
    );
    (fleet.with_concurrency(concurrency), cleanup)
}

/// Ports of their own for each setup: a container left behind by a failed test (restarted with
/// its engine) must not take the next test's ports.
fn host_ports() -> HostPorts {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(18100);
    let blue = NEXT.fetch_add(2, Ordering::Relaxed);
    HostPorts::new(blue, blue + 1)
}

fn policy() -> Policy {
    Policy::default()
        .with_readiness_timeout(Duration::from_secs(60))
        .with_observation(Duration::from_secs(1), Duration::from_millis(100))
        .with_drain_timeout(Duration::from_secs(2))
}

fn load(proxy: &ProxySwitch) -> Load {
    common::proxy_load(proxy)
}

async fn served_version(proxy: &ProxySwitch) -> String {
    common::served_version(proxy).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_host_deploy_through_the_embedded_proxy_fails_no_request() {
    let Some((set, _serial)) = hosts().await else {
        return;
    };
    let s = setup(set, "zero", policy(), 3).await;
    s.deployer.deploy(release("v1")).await.unwrap();
    let load = load(&s.proxy);
    let report = s.deployer.deploy(release("v2")).await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Live, "{report:?}");
    let LoadStats { ok, failed, .. } = load.finish().await;
    assert_eq!(
        failed, 0,
        "requests failed during the 3-host deploy ({ok} ok)"
    );
    assert!(ok > 20, "too little load went through: {ok}");
    assert_eq!(served_version(&s.proxy).await, "v2");
    // Every host serves the new release, and the proxy routes to all three.
    let st = s.fleet.status(Slot::Green).await.unwrap();
    assert_eq!(st.endpoints.len(), 3);
    let routed = s.proxy.endpoints();
    assert_eq!(routed.get(Slot::Green).len(), 3, "{routed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_mid_deploy_fails_it_cleanly_and_leaves_live_untouched() {
    let Some((set, _serial)) = exclusive_hosts().await else {
        return;
    };
    // One host at a time, so the kill lands while the deploy is under way.
    let s = setup(set, "killed", policy(), 1).await;
    s.deployer.deploy(release("v1")).await.unwrap();
    let live = container_ids(&s.fleet, Slot::Blue).await;
    let load = load(&s.proxy);

    let deployer = s.deployer.clone();
    let run = tokio::spawn(async move { deployer.deploy(release("v2")).await });
    // As soon as the first host has the new container, kill the second host's engine.
    let h1 = s.fleet.host("h1").await.unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let started = h1
            .containers()
            .await
            .unwrap()
            .iter()
            .any(|c| c.slot == Some(Slot::Green));
        if started {
            break;
        }
        assert!(Instant::now() < deadline, "the deploy never reached h1");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let h2 = set.get("h2").unwrap();
    h2.kill_engine();
    let err = run.await.unwrap().unwrap_err();
    let LoadStats { ok, failed, .. } = load.finish().await;

    assert_eq!(err.phase(), Some(Phase::DeployTarget), "{err}");
    assert_eq!(err.live_traffic(), Some(LiveTraffic::Untouched), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("h2") && text.contains("cannot reach the Docker Engine"),
        "{text}"
    );
    assert_eq!(failed, 0, "live requests failed ({ok} ok)");
    assert!(ok > 20, "too little load went through: {ok}");
    assert_eq!(served_version(&s.proxy).await, "v1");
    // Nothing of v2 on the reachable hosts; their live containers are the same ones.
    for name in ["h1", "h3"] {
        let env = s.fleet.host(name).await.unwrap();
        let cs = env.containers().await.unwrap();
        assert!(
            !cs.iter().any(|c| c.slot == Some(Slot::Green)),
            "{name} still has {cs:?}"
        );
    }
    let mut live_now = Vec::new();
    for name in ["h1", "h3"] {
        for c in s
            .fleet
            .host(name)
            .await
            .unwrap()
            .containers()
            .await
            .unwrap()
        {
            if c.slot == Some(Slot::Blue) {
                live_now.push((name.to_string(), c.id, c.version.unwrap_or_default()));
            }
        }
    }
    live_now.sort();
    let reachable_live: Vec<_> = live.into_iter().filter(|(h, _, _)| h != "h2").collect();
    assert_eq!(reachable_live, live_now, "live containers replaced");
    h2.restart_engine().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cut_off_after_the_switch_is_noticed_and_traffic_goes_back() {
    let Some((set, _serial)) = exclusive_hosts().await else {
        return;
    };
    let s = setup(
        set,
        "cut",
        policy()
            .with_observation(Duration::from_secs(4), Duration::from_millis(200))
            .with_thresholds(1, 2)
            .with_keep_old(KeepOld::Warm),
        3,
    )
    .await;
    s.deployer.deploy(release("v1")).await.unwrap();
    let load = load(&s.proxy);
    let deployer = s.deployer.clone();
    let run = tokio::spawn(async move { deployer.deploy(release("v2")).await });
    // Once the new release takes the traffic, cut h3 off.
    let deadline = Instant::now() + Duration::from_secs(60);
    while served_version(&s.proxy).await != "v2" {
        assert!(Instant::now() < deadline, "v2 never went live");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let h3 = set.get("h3").unwrap();
    h3.cut_link().unwrap();
    let outcome = run.await.unwrap();
    let stats = load.finish().await;
    h3.restore_link().unwrap();

    let err = outcome.expect_err("a deploy whose host was cut off must not report success");
    assert_eq!(err.live_traffic(), Some(LiveTraffic::RolledBack), "{err}");
    let text = err.to_string();
    let h3_addr = h3.address().to_string();
    assert!(
        text.contains(&h3_addr) && text.contains("/health"),
        "the report must say which endpoint failed its health check: {text}"
    );
    assert_eq!(served_version(&s.proxy).await, "v1");
    assert_eq!(
        s.proxy.current().await.unwrap().unwrap().weight(Slot::Blue),
        100,
        "live ends on the old slot"
    );
    eprintln!("requests during the cut: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_to_a_release_missing_on_one_host_deploys_it_there_first() {
    let Some((set, _serial)) = hosts().await else {
        return;
    };
    let s = setup(set, "rollback", policy().with_keep_old(KeepOld::Warm), 3).await;
    s.deployer.deploy(release("v1")).await.unwrap();
    s.deployer.deploy(release("v2")).await.unwrap();
    let blue_before = container_ids(&s.fleet, Slot::Blue).await;
    assert_eq!(blue_before.len(), 3);
    // v1 disappears from h2 (a host replaced, a container removed by hand).
    s.fleet
        .host("h2")
        .await
        .unwrap()
        .remove(Slot::Blue)
        .await
        .unwrap();
    assert_ne!(
        s.fleet.status(Slot::Blue).await.unwrap().state,
        InstanceState::Running,
        "a slot missing on one host is not running"
    );
    let load = load(&s.proxy);
    let report = s.deployer.rollback().await.unwrap();
    let LoadStats { ok, failed, .. } = load.finish().await;
    assert_eq!(report.version.as_str(), "v1");
    assert_eq!(failed, 0, "requests failed during the rollback ({ok} ok)");
    assert_eq!(served_version(&s.proxy).await, "v1");
    let blue_after = container_ids(&s.fleet, Slot::Blue).await;
    assert_eq!(blue_after.len(), 3, "{blue_after:?}");
    for (host, id, version) in &blue_after {
        assert_eq!(version, "v1");
        let was = blue_before.iter().find(|(h, _, _)| h == host).unwrap();
        if host == "h2" {
            assert_ne!(&was.1, id, "h2 got a new container");
        } else {
            assert_eq!(&was.1, id, "{host} kept its running container");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Through the engine and a real HAProxy / nginx Dynamic switch, under load.

/// Deploys v1 then v2 on a 3-host fleet through `switch`, whose public address is `addr`,
/// under load there: no request fails, every host of both slots served requests (the demo
/// app's `x-bluegreen-instance` is the host's address), and the data path serves v2 at the end.
async fn three_hosts_through(
    set: &TestHosts,
    prefix: &str,
    switch: Arc<dyn TrafficSwitch>,
    addr: std::net::SocketAddr,
) {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, _cleanup) = host_network_fleet(set, prefix, 3);
    let url = format!("http://{addr}/");
    let deployer = common::switch_deployer(
        Arc::new(fleet.clone()),
        switch,
        url.clone(),
        dir.path(),
        policy(),
    );
    deployer.deploy(release("v1")).await.unwrap();
    let blue = fleet.status(Slot::Blue).await.unwrap().endpoints;
    let load = common::load_at(addr);
    let report = deployer.deploy(release("v2")).await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Live, "{report:?}");
    let stats = load.finish().await;
    assert_eq!(
        stats.failed, 0,
        "requests failed during the 3-host deploy through {prefix} ({} ok): {:?}",
        stats.ok, stats.errors
    );
    assert!(stats.ok > 20, "too little load went through: {}", stats.ok);
    assert_eq!(common::version_at(&url).await, "v2");
    let green = fleet.status(Slot::Green).await.unwrap().endpoints;
    assert_eq!(green.len(), 3, "{green:?}");
    for e in blue.iter().chain(&green) {
        assert!(
            stats.instances.get(&e.authority()).copied().unwrap_or(0) > 0,
            "{e} served no request through {prefix}: {:?}",
            stats.instances
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_host_deploy_through_haproxy_fails_no_request() {
    if !bluegreen_testenv::haproxy::available("fleet through HAProxy") {
        return;
    }
    let Some((set, _serial)) = hosts().await else {
        return;
    };
    // A pool of 4 servers per slot: 3 routed to the hosts, one left in maintenance.
    let haproxy = bluegreen_testenv::haproxy::Haproxy::launch(false, |sock| {
        bluegreen_testenv::haproxy::test_config(sock).with_pool_size(4)
    })
    .unwrap();
    three_hosts_through(set, "haproxy", Arc::new(haproxy.switch()), haproxy.addr()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_host_deploy_through_nginx_dynamic_fails_no_request() {
    if !bluegreen_testenv::nginx::available(true) {
        return;
    }
    let Some((set, _serial)) = hosts().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (nginx, config) =
        bluegreen_testenv::nginx::start_dynamic(&dir.path().join("nginx"), "app", Ok).unwrap();
    let switch = bluegreen_nginx::NginxDynamicSwitch::new(config);
    three_hosts_through(set, "nginx", Arc::new(switch), nginx.listen()).await;
}
