//! End to end: the embedded defaults (local processes + the in-process proxy) driven by the
//! Deployer, with the real demo app binary.

use std::sync::Arc;
use std::time::Duration;

use bluegreen::health::HttpCheck;
use bluegreen::process::{ProcessConfig, ProcessEnvironment};
use bluegreen::proxy::{ProxyConfig, ProxySwitch};
use bluegreen::*;
use bluegreen_demo::ws_client;
use bluegreen_testenv::{Load, LoadOptions};

struct Setup {
    _dir: tempfile::TempDir,
    proxy: ProxySwitch,
    env: ProcessEnvironment,
    deployer: Deployer,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.env.kill_all();
    }
}

async fn setup(policy: Policy) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxySwitch::bind(ProxyConfig::default()).await.unwrap();
    let env = ProcessEnvironment::new(ProcessConfig::new(dir.path().join("process")));
    let deployer = Deployer::builder()
        .environment(Arc::new(env.clone()))
        .switch(Arc::new(proxy.clone()))
        .store(Arc::new(
            FileStateStore::new(dir.path().join("state")).unwrap(),
        ))
        .health_check(Arc::new(HttpCheck::new("/health")))
        .verify_data_path(Arc::new(HttpVersionProbe::new(
            proxy.url("/"),
            VersionMarker::Header("x-bluegreen-version".into()),
        )))
        .analysis(Arc::new(MetricsAnalysis::new(0.05).with_min_requests(20)))
        .policy(policy)
        .build()
        .unwrap();
    Setup {
        _dir: dir,
        proxy,
        env,
        deployer,
    }
}

fn release(v: &str) -> Release {
    Release::new(v, bluegreen_demo::binary_path().to_string_lossy()).unwrap()
}

fn policy() -> Policy {
    Policy::default()
        .with_readiness_timeout(Duration::from_secs(20))
        .with_observation(Duration::from_secs(2), Duration::from_millis(100))
        .with_drain_timeout(Duration::from_secs(5))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_under_load_fails_no_request_and_a_bad_release_is_rolled_back_by_metrics() {
    let s = setup(policy()).await;
    s.deployer.deploy(release("v1")).await.unwrap();

    // Keep-alive clients through the proxy, 2 ms apart.
    let load = Load::start(
        s.proxy.local_addr(),
        LoadOptions::new(4).with_pause(Duration::from_millis(2)),
    );

    let report = s.deployer.deploy(release("v2")).await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Live);
    let stats = load.stats();
    assert_eq!(
        stats.failed, 0,
        "requests failed during a clean deploy: {:?}",
        stats.errors
    );
    assert!(stats.ok > 20);

    // v3 passes its health check but answers 50 % of requests with 500: the metrics analysis
    // sees it after the switch and the engine switches back to v2 on its own.
    let bad = release("v3").with_env("DEMO_ERROR_RATE", "0.5");
    let err = s.deployer.deploy(bad).await.unwrap_err();
    load.finish().await;
    assert_eq!(err.phase(), Some(Phase::Observe), "{err}");
    assert_eq!(err.live_traffic(), Some(LiveTraffic::RolledBack), "{err}");
    assert!(matches!(err.root(), Error::AnalysisFailed { .. }), "{err}");
    assert!(err.to_string().contains("metrics"), "{err}");

    let st = s.deployer.status().await.unwrap();
    assert_eq!(st.state.active, Some(Slot::Green));
    assert_eq!(st.switch, Some(TrafficSplit::all(Slot::Green)));
    assert_eq!(st.slots.green.version.as_ref().unwrap().as_str(), "v2");
    assert_eq!(
        st.slots.blue.state,
        InstanceState::Absent,
        "the bad release was not removed"
    );
    assert!(st.drift.is_empty(), "{:?}", st.drift);
    let r = reqwest::get(s.proxy.url("/")).await.unwrap();
    assert_eq!(r.headers()["x-bluegreen-version"], "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_exits_at_once_is_refused_with_its_log_lines() {
    let s = setup(policy()).await;
    s.deployer.deploy(release("v1")).await.unwrap();
    let crash = release("v2").with_env("DEMO_EXIT_CODE", "3");
    let err = s.deployer.deploy(crash).await.unwrap_err();
    assert_eq!(err.phase(), Some(Phase::DeployTarget), "{err}");
    assert_eq!(err.live_traffic(), Some(LiveTraffic::Untouched));
    let msg = err.to_string();
    assert!(
        msg.contains("DEMO_EXIT_CODE") || msg.contains("code 3"),
        "{msg}"
    );
    let r = reqwest::get(s.proxy.url("/")).await.unwrap();
    assert_eq!(r.headers()["x-bluegreen-version"], "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_the_deployer_a_new_one_promotes_and_rolls_back() {
    let s = setup(policy()).await;
    s.deployer.deploy(release("v1")).await.unwrap();
    // No traffic reaches v2 during its observation: the metrics analysis cannot judge it, so the
    // deployment waits for a person instead of guessing.
    let report = s.deployer.deploy(release("v2")).await.unwrap();
    assert!(
        matches!(
            report.outcome,
            RunOutcome::Waiting(Waiting::Inconclusive { .. })
        ),
        "{report:?}"
    );
    // A new process would build a new Deployer on the same directories.
    let again = Deployer::builder()
        .environment(Arc::new(ProcessEnvironment::new(ProcessConfig::new(
            s._dir.path().join("process"),
        ))))
        .switch(Arc::new(s.proxy.clone()))
        .store(Arc::new(
            FileStateStore::new(s._dir.path().join("state")).unwrap(),
        ))
        .health_check(Arc::new(HttpCheck::new("/health")))
        .policy(policy().with_observation(Duration::ZERO, Duration::from_millis(100)))
        .build()
        .unwrap();
    // The waiting deployment is in the store: the new Deployer promotes it.
    assert_eq!(again.promote().await.unwrap().outcome, RunOutcome::Live);
    let deploys_before = again.history().await.unwrap().len();
    let report = again.rollback().await.unwrap();
    assert_eq!(report.version.as_str(), "v1");
    assert_eq!(again.history().await.unwrap().len(), deploys_before + 1);
    let r = reqwest::get(s.proxy.url("/")).await.unwrap();
    assert_eq!(r.headers()["x-bluegreen-version"], "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_held_across_a_deploy_is_closed_at_the_drain_deadline_and_counted_in_the_ledger(
) {
    let s = setup(policy().with_drain_timeout(Duration::from_secs(1))).await;
    s.deployer.deploy(release("v1")).await.unwrap();
    let old = s.deployer.status().await.unwrap().state.active.unwrap();
    let url = format!("ws://{}/ws", s.proxy.local_addr());
    let mut ws = ws_client::connect(&url).await.unwrap();
    assert_eq!(
        ws_client::echo(&mut ws, "a").await.unwrap(),
        format!("{old} a")
    );

    // The WebSocket client keeps sending through the whole deploy; it sees its echoes from the
    // old slot, then a close frame 1001 at the drain deadline, and reconnects to the new slot.
    let client = tokio::spawn({
        let url = url.clone();
        async move {
            let closed = ws_client::send_until_closed(ws, Duration::from_millis(20))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let mut again = ws_client::connect(&url).await.unwrap();
            (closed, ws_client::echo(&mut again, "after").await.unwrap())
        }
    });
    let load = Load::start(
        s.proxy.local_addr(),
        LoadOptions::new(4).with_pause(Duration::from_millis(2)),
    );
    let report = s.deployer.deploy(release("v2")).await.unwrap();
    let stats = load.finish().await;
    assert_eq!(report.outcome, RunOutcome::Live);
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    let new = old.other();
    assert_eq!(report.target, new);

    let (closed, after) = tokio::time::timeout(Duration::from_secs(20), client)
        .await
        .expect("the client never saw the close")
        .unwrap();
    assert!(
        !closed.echoes.is_empty(),
        "the client was not answered during the deploy"
    );
    for t in &closed.echoes {
        assert!(t.starts_with(&format!("{old} m")), "{t}");
    }
    let close = closed.close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 1001, "going away: {close:?}");
    assert_eq!(after, format!("{new} after"));

    // The deployment's ledger (report and history) counts the one graceful close, and the
    // proxy's own counters put it on the old slot.
    let counts = report.ledger.counts().expect("the proxy counts");
    assert_eq!(counts.graceful_closes, Some(1), "{}", report.ledger);
    assert!(
        report
            .ledger
            .to_string()
            .contains("long-lived connections closed gracefully: 1"),
        "{}",
        report.ledger
    );
    let history = s.deployer.history().await.unwrap();
    let entry = history
        .iter()
        .find(|h| h.id == report.id)
        .expect("the deploy is in the history");
    assert_eq!(entry.ledger, report.ledger);
    let c = s.proxy.counters_now();
    assert_eq!(c.slots.get(old).graceful_closes, Some(1), "{c:?}");
    assert_eq!(c.slots.get(new).graceful_closes, Some(0), "{c:?}");
    assert!(
        s.proxy.prometheus_metrics().contains(&format!(
            "bluegreen_proxy_long_lived_closed_total{{slot=\"{old}\"}} 1\n"
        )),
        "{}",
        s.proxy.prometheus_metrics()
    );
}
