//! End to end: the Deployer with Docker containers, the embedded proxy switch and the file state
//! store, on the real engine with the demo image the test builds.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bluegreen_core::health::HttpCheck;
use bluegreen_core::hooks::ExecHook;
use bluegreen_core::{
    Deployer, DeployerBuilder, Environment, FileStateStore, HookPoint, HttpVersionProbe,
    InstanceState, KeepOld, LiveTraffic, MetricsAnalysis, Phase, Policy, Release, RunOutcome, Slot,
    TrafficSplit, VersionMarker,
};
use bluegreen_docker::{DockerConfig, DockerEnvironment};
use bluegreen_proxy::{ProxyConfig, ProxySwitch};
use bluegreen_testenv::{Load, LoadOptions, LoadStats};
use common::{demo_image, engine, environment, health_image, release, Cleanup};

struct Setup {
    _dir: tempfile::TempDir,
    proxy: ProxySwitch,
    env: DockerEnvironment,
    deployer: Deployer,
    _cleanup: Cleanup,
}

async fn setup(prefix: &str, policy: Policy, http_check: bool) -> Setup {
    setup_with(prefix, policy, http_check, |c| c, |b| b).await
}

async fn setup_with(
    prefix: &str,
    policy: Policy,
    http_check: bool,
    config: impl FnOnce(DockerConfig) -> DockerConfig,
    extra: impl FnOnce(DeployerBuilder) -> DeployerBuilder,
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxySwitch::bind(ProxyConfig::default()).await.unwrap();
    let (env, cleanup) = environment(prefix, config).await;
    let mut builder = Deployer::builder()
        .environment(Arc::new(env.clone()))
        .switch(Arc::new(proxy.clone()))
        .store(Arc::new(
            FileStateStore::new(dir.path().join("state")).unwrap(),
        ))
        .verify_data_path(Arc::new(HttpVersionProbe::new(
            proxy.url("/"),
            VersionMarker::Header("x-bluegreen-version".into()),
        )))
        .analysis(Arc::new(MetricsAnalysis::new(0.05).with_min_requests(20)))
        .policy(policy);
    if http_check {
        builder = builder.health_check(Arc::new(HttpCheck::new("/health")));
    }
    let builder = extra(builder);
    Setup {
        _dir: dir,
        proxy,
        env,
        deployer: builder.build().unwrap(),
        _cleanup: cleanup,
    }
}

fn policy() -> Policy {
    Policy::default()
        .with_readiness_timeout(Duration::from_secs(60))
        .with_observation(Duration::from_secs(2), Duration::from_millis(100))
        .with_drain_timeout(Duration::from_secs(5))
}

/// Keep-alive clients through the proxy, 2 ms apart; counts answers and failures.
fn load(proxy: &ProxySwitch) -> Load {
    Load::start(
        proxy.local_addr(),
        LoadOptions::new(4).with_pause(Duration::from_millis(2)),
    )
}

async fn served_version(s: &Setup) -> String {
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = c.get(s.proxy.url("/")).send().await.unwrap();
    r.headers()["x-bluegreen-version"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_to_v2_under_load_fails_no_request_and_rollback_switches_back() {
    if engine().await.is_none() {
        return;
    }
    let image = demo_image().await;
    let s = setup("e2e", policy(), true).await;
    s.deployer.deploy(release("v1", &image)).await.unwrap();
    assert_eq!(served_version(&s).await, "v1");

    let load = load(&s.proxy);
    let report = s.deployer.deploy(release("v2", &image)).await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Live, "{report:?}");
    let LoadStats { ok, failed, .. } = load.stats();
    assert_eq!(
        failed, 0,
        "requests failed during the v1 -> v2 deploy ({ok} ok)"
    );
    assert!(ok > 20, "too little load went through: {ok}");
    assert_eq!(served_version(&s).await, "v2");
    // The container carries the engine's deployment id.
    let green = s
        .env
        .containers()
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.slot == Some(Slot::Green))
        .expect("the green container");
    assert_eq!(green.deployment, Some(report.id.to_string()), "{green:?}");
    assert_eq!(
        s.env
            .status(Slot::Green)
            .await
            .unwrap()
            .version
            .unwrap()
            .as_str(),
        "v2"
    );

    // The old slot was kept warm: rollback is a switch back, still under load.
    let report = s.deployer.rollback().await.unwrap();
    assert_eq!(report.version.as_str(), "v1");
    let LoadStats { ok, failed, .. } = load.finish().await;
    assert_eq!(
        failed, 0,
        "requests failed during deploy + rollback ({ok} ok)"
    );
    assert_eq!(served_version(&s).await, "v1");
    let st = s.deployer.status().await.unwrap();
    assert_eq!(st.state.active, Some(Slot::Blue));
    assert_eq!(st.switch, Some(TrafficSplit::all(Slot::Blue)));
    assert!(st.drift.is_empty(), "{:?}", st.drift);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_redeploys_a_stopped_old_slot_under_load() {
    if engine().await.is_none() {
        return;
    }
    let image = demo_image().await;
    let s = setup("e2e-stop", policy().with_keep_old(KeepOld::Stop), true).await;
    s.deployer.deploy(release("v1", &image)).await.unwrap();
    let load = load(&s.proxy);
    let report = s.deployer.deploy(release("v2", &image)).await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Live, "{report:?}");
    assert!(
        !s.env.status(Slot::Blue).await.unwrap().is_up(),
        "KeepOld::Stop left the old slot running"
    );
    let report = s.deployer.rollback().await.unwrap();
    assert_eq!(report.version.as_str(), "v1");
    let LoadStats { ok, failed, .. } = load.finish().await;
    assert_eq!(
        failed, 0,
        "requests failed during deploy + rollback ({ok} ok)"
    );
    assert!(ok > 20);
    assert_eq!(served_version(&s).await, "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_exits_at_once_is_refused_with_its_log_lines() {
    if engine().await.is_none() {
        return;
    }
    let image = demo_image().await;
    // A crash is reported as soon as it is seen: a long grace costs nothing and keeps a loaded
    // machine from starting the crash after it.
    let s = setup_with(
        "e2e-crash",
        policy(),
        true,
        |c| c.with_startup_grace(Duration::from_secs(5)),
        |b| b,
    )
    .await;
    s.deployer.deploy(release("v1", &image)).await.unwrap();
    let crash: Release = release("v2", &image).with_env("DEMO_EXIT_CODE", "3");
    let err = s.deployer.deploy(crash).await.unwrap_err();
    assert_eq!(err.phase(), Some(Phase::DeployTarget), "{err}");
    assert_eq!(err.live_traffic(), Some(LiveTraffic::Untouched), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("exiting with code 3 (DEMO_EXIT_CODE)"),
        "{msg}"
    );
    assert_eq!(served_version(&s).await, "v1");
    assert_eq!(
        s.env.status(Slot::Green).await.unwrap().state,
        InstanceState::Absent,
        "the crashed target was not removed"
    );
    assert_eq!(
        s.env.status(Slot::Blue).await.unwrap().state,
        InstanceState::Running
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_that_never_passes_removes_the_target_and_leaves_live_untouched() {
    if engine().await.is_none() {
        return;
    }
    let image = demo_image().await;
    let s = setup(
        "e2e-unhealthy",
        policy().with_readiness_timeout(Duration::from_secs(5)),
        true,
    )
    .await;
    s.deployer.deploy(release("v1", &image)).await.unwrap();
    let load = load(&s.proxy);
    let bad = release("v2", &image).with_env("DEMO_FAIL_HEALTH", "1");
    let err = s.deployer.deploy(bad).await.unwrap_err();
    let LoadStats { ok, failed, .. } = load.finish().await;
    assert_eq!(err.phase(), Some(Phase::WaitReady), "{err}");
    assert_eq!(err.live_traffic(), Some(LiveTraffic::Untouched), "{err}");
    assert!(err.to_string().contains("/health"), "{err}");
    assert_eq!(
        failed, 0,
        "live traffic failed while the target was refused ({ok} ok)"
    );
    assert_eq!(served_version(&s).await, "v1");
    assert_eq!(
        s.env.status(Slot::Green).await.unwrap().state,
        InstanceState::Absent,
        "the unhealthy target was not removed"
    );
    assert_eq!(
        s.env.status(Slot::Blue).await.unwrap().state,
        InstanceState::Running
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_image_healthcheck_fails_the_deploy_without_http_checks() {
    if engine().await.is_none() {
        return;
    }
    let image = health_image().await;
    // No HTTP check: readiness is the image's own HEALTHCHECK.
    let s = setup(
        "e2e-imghealth",
        policy().with_readiness_timeout(Duration::from_secs(20)),
        false,
    )
    .await;
    s.deployer.deploy(release("v1", &image)).await.unwrap();
    let bad = release("v2", &image).with_env("DEMO_FAIL_HEALTH", "1");
    let err = s.deployer.deploy(bad).await.unwrap_err();
    assert_eq!(err.phase(), Some(Phase::WaitReady), "{err}");
    assert_eq!(err.live_traffic(), Some(LiveTraffic::Untouched), "{err}");
    assert!(err.to_string().contains("platform"), "{err}");
    assert_eq!(served_version(&s).await, "v1");
    assert_eq!(
        s.env.status(Slot::Green).await.unwrap().state,
        InstanceState::Absent
    );
}

/// `argv` for a one-off run of the demo binary inside the container that exits with `code`, like
/// a migration (`odoo -u modules --stop-after-init`).
fn migration(code: u8) -> Vec<String> {
    vec![
        "/usr/bin/env".into(),
        format!("DEMO_EXIT_CODE={code}"),
        "/bluegreen-demo".into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_runs_in_the_target_container_and_a_failing_one_stops_the_deploy() {
    if engine().await.is_none() {
        return;
    }
    let image = demo_image().await;
    let ok = setup_with(
        "e2e-migrate",
        policy(),
        true,
        |c| c,
        |b| {
            b.hook(
                HookPoint::AfterDeploy,
                Arc::new(ExecHook::new("migrate", migration(0)).unwrap()),
            )
        },
    )
    .await;
    ok.deployer.deploy(release("v1", &image)).await.unwrap();
    assert_eq!(served_version(&ok).await, "v1");
    drop(ok);

    let s = setup_with(
        "e2e-migrate-fail",
        policy(),
        true,
        |c| c,
        |b| {
            b.hook(
                HookPoint::AfterDeploy,
                Arc::new(ExecHook::new("migrate", migration(7)).unwrap()),
            )
        },
    )
    .await;
    // The first deploy of this deployer runs the failing migration: nothing goes live.
    let err = s.deployer.deploy(release("v1", &image)).await.unwrap_err();
    assert_eq!(err.phase(), Some(Phase::AfterDeployHook), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("migrate") && msg.contains("DEMO_EXIT_CODE"),
        "{msg}"
    );
    for slot in Slot::ALL {
        assert_eq!(
            s.env.status(slot).await.unwrap().state,
            InstanceState::Absent,
            "the target of the failed migration was not removed"
        );
    }
}
