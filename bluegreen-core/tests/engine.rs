//! The engine's specification, against the in-memory fakes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bluegreen_core::testkit::{Fakes, Op};
use bluegreen_core::*;

fn fast_policy() -> Policy {
    Policy::default()
        .with_poll(Duration::from_millis(1), Duration::from_millis(5))
        .with_readiness_timeout(Duration::from_millis(300))
        .with_observation(Duration::ZERO, Duration::from_millis(5))
        .with_verify_timeout(Duration::from_millis(300))
        .with_drain_timeout(Duration::from_millis(100))
        .with_retry(RetryConfig {
            attempts: 2,
            backoff: Duration::from_millis(1),
        })
}

struct World {
    fakes: Fakes,
    deployer: Deployer,
}

fn builder(fakes: &Fakes, policy: Policy) -> DeployerBuilder {
    fakes
        .deployer_builder()
        .database(Arc::new(fakes.database()))
        .hook(HookPoint::BeforeDeploy, Arc::new(fakes.hook("pre")))
        .hook(HookPoint::AfterDeploy, Arc::new(fakes.hook("migrate")))
        .hook(HookPoint::BeforeSwitch, Arc::new(fakes.hook("smoke")))
        .hook(HookPoint::AfterSwitch, Arc::new(fakes.hook("post")))
        .hook(
            HookPoint::AfterRollback,
            Arc::new(fakes.hook("rolled-back")),
        )
        .verify_data_path(Arc::new(fakes.probe()))
        .policy(policy)
}

/// Environment, switch, store and health check only: no database, hooks or probe.
fn plain_builder(fakes: &Fakes, policy: Policy) -> DeployerBuilder {
    fakes.deployer_builder().policy(policy)
}

fn world(policy: Policy) -> World {
    let fakes = Fakes::new();
    let deployer = builder(&fakes, policy).build().unwrap();
    World { fakes, deployer }
}

fn release(v: &str) -> Release {
    Release::new(v, "app").unwrap()
}

/// v1 live on blue.
async fn with_v1(policy: Policy) -> World {
    let w = world(policy);
    w.deployer.deploy(release("v1")).await.unwrap();
    assert_eq!(w.fakes.live(), Some(Slot::Blue));
    w
}

/// What every failed deploy of v2 over a live v1 must leave behind.
async fn assert_v1_untouched(w: &World, err: &Error, phase: Phase, backend: &str) {
    match err {
        Error::Phase {
            phase: p,
            backend: b,
            live,
            ..
        } => {
            assert_eq!(*p, phase, "wrong phase in {err}");
            assert_eq!(b, backend, "wrong backend in {err}");
            assert!(
                matches!(live, LiveTraffic::Untouched | LiveTraffic::RolledBack),
                "{err}"
            );
        }
        other => panic!("expected a phase error, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(phase.as_str()) && msg.contains(backend),
        "{msg}"
    );
    assert_eq!(w.fakes.live(), Some(Slot::Blue), "live slot moved: {msg}");
    assert_eq!(w.fakes.running(Slot::Blue).as_deref(), Some("v1"));
    assert_eq!(
        w.fakes.instance_state(Slot::Green),
        InstanceState::Absent,
        "target not cleaned up"
    );
    assert!(
        w.fakes.violations().is_empty(),
        "{:?}",
        w.fakes.violations()
    );
    assert!(w.fakes.stored_lock().is_none(), "lock not released");
    let state = w.fakes.stored_state().unwrap();
    assert!(state.in_flight.is_none(), "in-flight left behind");
    assert_eq!(state.active, Some(Slot::Blue));
    assert!(state.slots.green.is_none());
    match &state.history.back().unwrap().outcome {
        Outcome::Failed { phase: p, .. } => assert_eq!(*p, phase),
        o => panic!("history says {o:?}"),
    }
    assert!(
        !w.fakes.db_prepared().contains(&Slot::Green),
        "database not rolled back"
    );
}

// ---------------------------------------------------------------------------------------------
// Happy paths

#[tokio::test]
async fn deploy_switches_to_the_idle_slot_and_runs_every_phase_in_order() {
    let w = with_v1(fast_policy()).await;
    let mut events = w.deployer.subscribe();
    let report = w.deployer.deploy(release("v2")).await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Live);
    assert_eq!(report.target, Slot::Green);
    assert_eq!(w.fakes.live(), Some(Slot::Green));
    assert_eq!(w.fakes.running(Slot::Green).as_deref(), Some("v2"));
    // The old slot stays warm by default.
    assert_eq!(w.fakes.running(Slot::Blue).as_deref(), Some("v1"));
    assert_eq!(w.fakes.switch_count(), 1);
    assert!(w.fakes.violations().is_empty());

    let calls = w.fakes.calls();
    let pos = |needle: &str| {
        calls
            .iter()
            .rposition(|c| c.starts_with(needle))
            .unwrap_or_else(|| panic!("{needle} never called: {calls:?}"))
    };
    let order = [
        "database.prepare green",
        "hook.pre",
        "environment.deploy green v2",
        "hook.migrate",
        "hook.smoke",
        "database.before_switch green",
        "switch.apply blue 0% / green 100%",
        "database.after_switch green",
        "hook.post",
    ];
    for pair in order.windows(2) {
        assert!(
            pos(pair[0]) < pos(pair[1]),
            "{} after {}: {calls:?}",
            pair[0],
            pair[1]
        );
    }

    let mut started = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if let DeployEvent::PhaseStarted { phase, .. } = ev {
            started.push(phase);
        }
    }
    let mut sorted = started.clone();
    sorted.sort();
    assert_eq!(started, sorted, "phases out of order");
    assert!(started.contains(&Phase::WaitReady) && started.contains(&Phase::Finalize));

    let st = w.fakes.stored_state().unwrap();
    assert_eq!(st.history.len(), 2);
    assert_eq!(st.last_id, 2);
    assert_eq!(
        st.slots.green.as_ref().unwrap().release.version.as_str(),
        "v2"
    );
    // The database binding reached the instance but its secret never reached the state store.
    let json = String::from_utf8(st.to_json()).unwrap();
    assert!(!json.contains("fake-secret-password"), "{json}");
    assert!(json.contains("app_green"));
}

#[tokio::test]
async fn rollback_to_a_warm_slot_is_a_switch_back_without_redeploying() {
    let w = with_v1(fast_policy()).await;
    w.deployer.deploy(release("v2")).await.unwrap();
    let deploys = w.fakes.call_count(Op::EnvironmentDeploy);
    let report = w.deployer.rollback().await.unwrap();
    assert_eq!(report.kind, RunKind::Rollback);
    assert_eq!(report.version.as_str(), "v1");
    assert_eq!(w.fakes.live(), Some(Slot::Blue));
    assert_eq!(
        w.fakes.call_count(Op::EnvironmentDeploy),
        deploys,
        "rollback redeployed"
    );
    assert_eq!(w.fakes.switch_count(), 2);
    assert!(w.fakes.violations().is_empty());
}

#[tokio::test]
async fn a_failed_rollback_is_reported_as_a_rollback() {
    let w = with_v1(fast_policy()).await;
    w.deployer.deploy(release("v2")).await.unwrap();
    w.fakes
        .fail_next(Op::EnvironmentStatus, "daemon unreachable");
    let err = w.deployer.rollback().await.unwrap_err();
    let Error::Phase { kind, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*kind, "rollback", "{err}");
    assert!(err.to_string().starts_with("rollback #"), "{err}");
    assert_eq!(w.fakes.live(), Some(Slot::Green), "live traffic moved");
}

#[tokio::test]
async fn rollback_redeploys_a_stopped_previous_release() {
    let w = with_v1(fast_policy().with_keep_old(KeepOld::Stop)).await;
    w.deployer.deploy(release("v2")).await.unwrap();
    assert_eq!(w.fakes.instance_state(Slot::Blue), InstanceState::Stopped);
    let deploys = w.fakes.call_count(Op::EnvironmentDeploy);
    w.deployer.rollback().await.unwrap();
    assert_eq!(
        w.fakes.call_count(Op::EnvironmentDeploy),
        deploys + 1,
        "v1 was not redeployed"
    );
    assert_eq!(w.fakes.live(), Some(Slot::Blue));
    assert_eq!(w.fakes.running(Slot::Blue).as_deref(), Some("v1"));
    assert_eq!(w.fakes.instance_state(Slot::Green), InstanceState::Stopped);
    assert!(w.fakes.violations().is_empty());
}

#[tokio::test]
async fn rollback_redeploys_when_the_warm_slot_died() {
    let w = with_v1(fast_policy()).await;
    w.deployer.deploy(release("v2")).await.unwrap();
    // The warm slot crashed meanwhile.
    w.fakes
        .environment()
        .stop(Slot::Blue, Duration::ZERO)
        .await
        .unwrap();
    let deploys = w.fakes.call_count(Op::EnvironmentDeploy);
    w.deployer.rollback().await.unwrap();
    assert_eq!(w.fakes.call_count(Op::EnvironmentDeploy), deploys + 1);
    assert_eq!(w.fakes.live(), Some(Slot::Blue));
    assert_eq!(w.fakes.running(Slot::Blue).as_deref(), Some("v1"));
}

#[tokio::test]
async fn rollback_after_a_failed_deploy_redeploys_the_previous_release() {
    let w = with_v1(fast_policy()).await;
    w.deployer.deploy(release("v2")).await.unwrap();
    // v3 fails in blue, which held the warm v1: the slot is cleaned up.
    w.fakes.set_unhealthy_version("v3");
    w.deployer.deploy(release("v3")).await.unwrap_err();
    assert_eq!(w.fakes.instance_state(Slot::Blue), InstanceState::Absent);
    assert_eq!(w.fakes.live(), Some(Slot::Green));
    let report = w.deployer.rollback().await.unwrap();
    assert_eq!(report.version.as_str(), "v1");
    assert_eq!(w.fakes.live(), Some(Slot::Blue));
    assert_eq!(w.fakes.running(Slot::Blue).as_deref(), Some("v1"));
    assert!(w.fakes.violations().is_empty());
}

#[tokio::test]
async fn nothing_to_roll_back_on_a_fresh_install() {
    let w = world(fast_policy());
    let err = w.deployer.rollback().await.unwrap_err();
    assert!(matches!(err, Error::NothingToRollBack { .. }), "{err}");
    assert!(w.fakes.stored_lock().is_none());
}

#[tokio::test]
async fn canary_steps_move_weight_gradually() {
    let steps = vec![
        CanaryStep::new(10, Duration::from_millis(20)),
        CanaryStep::new(50, Duration::from_millis(20)),
    ];
    let w = with_v1(fast_policy().with_canary(steps)).await;
    w.deployer.deploy(release("v2")).await.unwrap();
    let weights: Vec<u8> = w
        .fakes
        .timeline()
        .iter()
        .map(|e| e.split.weight(Slot::Green))
        .collect();
    assert_eq!(weights, vec![0, 10, 50, 100]);
    assert!(w.fakes.violations().is_empty());
}

#[tokio::test]
async fn canary_on_a_switch_without_weights_is_refused_before_anything_changes() {
    let w = with_v1(fast_policy()).await;
    w.fakes.set_capabilities(Capabilities::basic());
    let steps = vec![CanaryStep::new(10, Duration::ZERO)];
    let d = builder(&w.fakes, fast_policy().with_canary(steps))
        .build()
        .unwrap();
    let before = w.fakes.calls().len();
    let err = d.deploy(release("v2")).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::MissingCapability {
                capability: "weights",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        w.fakes.calls().len(),
        before,
        "a refused plan changed something"
    );
    assert!(w.fakes.stored_lock().is_none());
    assert!(w.fakes.stored_state().unwrap().in_flight.is_none());
}

#[tokio::test]
async fn manual_gate_waits_for_promote() {
    let w = with_v1(fast_policy().with_promotion(Promotion::Manual)).await;
    let report = w.deployer.deploy(release("v2")).await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Waiting(Waiting::Gate));
    assert_eq!(
        w.fakes.live(),
        Some(Slot::Blue),
        "switched before promotion"
    );
    assert_eq!(w.fakes.running(Slot::Green).as_deref(), Some("v2"));
    assert!(
        w.fakes.stored_lock().is_none(),
        "a waiting deploy must not hold the lock"
    );
    // Another deploy is refused while one waits.
    let err = w.deployer.deploy(release("v3")).await.unwrap_err();
    assert!(matches!(err, Error::InFlight { .. }), "{err}");
    let report = w.deployer.promote().await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Live);
    assert_eq!(w.fakes.live(), Some(Slot::Green));
}

#[tokio::test]
async fn inconclusive_analysis_pauses_for_a_person() {
    let policy =
        fast_policy().with_observation(Duration::from_millis(30), Duration::from_millis(5));
    let w = with_v1(policy.clone()).await;
    let d = builder(&w.fakes, policy)
        .analysis(Arc::new(MetricsAnalysis::new(0.05).with_min_requests(100)))
        .build()
        .unwrap();
    // No traffic reaches green in the fake: not enough evidence.
    let report = d.deploy(release("v2")).await.unwrap();
    assert!(
        matches!(
            report.outcome,
            RunOutcome::Waiting(Waiting::Inconclusive { .. })
        ),
        "{report:?}"
    );
    assert_eq!(
        w.fakes.live(),
        Some(Slot::Green),
        "the switch already happened"
    );
    let report = d.promote().await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Live);
    assert!(d.history().await.unwrap().last().unwrap().outcome == Outcome::Succeeded);
}

#[tokio::test]
async fn metrics_analysis_rolls_back_on_error_rate() {
    let policy =
        fast_policy().with_observation(Duration::from_millis(300), Duration::from_millis(5));
    let w = with_v1(policy.clone()).await;
    let d = builder(&w.fakes, policy)
        .analysis(Arc::new(MetricsAnalysis::new(0.05).with_min_requests(10)))
        .build()
        .unwrap();
    let mut events = d.subscribe();
    let fakes = w.fakes.clone();
    let deploy = tokio::spawn(async move { d.deploy(release("v2")).await });
    // Once observation of green began (its baseline is read), green answers 30 % errors.
    loop {
        match events.recv().await.unwrap() {
            DeployEvent::PhaseStarted {
                phase: Phase::Observe,
                ..
            } => break,
            _ => continue,
        }
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    fakes.set_metrics(
        Slot::Green,
        SlotMetrics::new(100, 30, 0, Duration::ZERO, Duration::ZERO),
    );
    let err = deploy.await.unwrap().unwrap_err();
    assert_eq!(err.phase(), Some(Phase::Observe), "{err}");
    assert_eq!(err.live_traffic(), Some(LiveTraffic::RolledBack));
    assert!(err.to_string().contains("30 of 100"), "{err}");
    assert_v1_untouched(&w, &err, Phase::Observe, "metrics").await;
    assert!(w
        .fakes
        .calls()
        .iter()
        .any(|c| c.starts_with("hook.rolled-back")));
}

#[tokio::test]
async fn plan_lists_every_step_and_changes_nothing() {
    let w = with_v1(fast_policy()).await;
    let before = w.fakes.calls().len();
    let plan = w.deployer.plan(&release("v2")).await.unwrap();
    assert_eq!(w.fakes.calls().len(), before, "plan changed something");
    assert_eq!(plan.target, Slot::Green);
    let text = plan.to_string();
    for needle in [
        "deploy v2 to green",
        "blue 100% / green 0% → blue 0% / green 100%",
        "smoke",
        "drain blue",
    ] {
        assert!(text.contains(needle), "plan lacks {needle:?}:\n{text}");
    }
}

#[tokio::test]
async fn status_reports_drift_between_state_and_backends() {
    let w = with_v1(fast_policy()).await;
    assert!(w.deployer.status().await.unwrap().drift.is_empty());
    w.fakes
        .environment()
        .stop(Slot::Blue, Duration::ZERO)
        .await
        .unwrap();
    let st = w.deployer.status().await.unwrap();
    assert!(
        st.drift.iter().any(|d| d.contains("live slot blue")),
        "{:?}",
        st.drift
    );
}

#[tokio::test]
async fn cleanup_removes_the_idle_slot_and_reset_removes_everything() {
    let w = with_v1(fast_policy()).await;
    w.deployer.deploy(release("v2")).await.unwrap();
    assert_eq!(w.deployer.cleanup().await.unwrap(), Some(Slot::Blue));
    assert_eq!(w.fakes.instance_state(Slot::Blue), InstanceState::Absent);
    assert_eq!(w.fakes.running(Slot::Green).as_deref(), Some("v2"));
    assert_eq!(w.deployer.cleanup().await.unwrap(), None);
    w.deployer.reset().await.unwrap();
    assert_eq!(w.fakes.instance_state(Slot::Green), InstanceState::Absent);
    let st = w.fakes.stored_state().unwrap();
    assert!(st.active.is_none());
    assert_eq!(st.history.len(), 2, "reset must keep history");
}

#[tokio::test]
async fn a_retryable_backend_error_is_retried_once_per_policy() {
    let w = with_v1(fast_policy()).await;
    let applies = w.fakes.call_count(Op::SwitchApply);
    w.fakes
        .fail_next_retryable(Op::SwitchApply, "connection reset");
    w.deployer.deploy(release("v2")).await.unwrap();
    assert_eq!(w.fakes.live(), Some(Slot::Green));
    // One apply per deploy without canary steps: the failed attempt and its retry.
    assert_eq!(
        w.fakes.call_count(Op::SwitchApply),
        applies + 2,
        "attempts of switch.apply"
    );
}

#[tokio::test]
async fn a_retryable_error_is_attempted_as_often_as_the_policy_says_and_no_more() {
    // fast_policy: 2 attempts in all.
    let w = with_v1(fast_policy()).await;
    let deploys = w.fakes.call_count(Op::EnvironmentDeploy);
    w.fakes
        .fail_next_retryable(Op::EnvironmentDeploy, "registry timeout");
    w.fakes
        .fail_next_retryable(Op::EnvironmentDeploy, "registry timeout");
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert!(err.to_string().contains("registry timeout"), "{err}");
    assert_eq!(
        w.fakes.call_count(Op::EnvironmentDeploy),
        deploys + 2,
        "attempts of environment.deploy"
    );
    assert_v1_untouched(&w, &err, Phase::DeployTarget, "fake-environment").await;

    // With 3 attempts the same two failures are survived, on the third attempt.
    let policy = fast_policy().with_retry(RetryConfig {
        attempts: 3,
        backoff: Duration::from_millis(1),
    });
    let d = builder(&w.fakes, policy).build().unwrap();
    let deploys = w.fakes.call_count(Op::EnvironmentDeploy);
    w.fakes
        .fail_next_retryable(Op::EnvironmentDeploy, "registry timeout");
    w.fakes
        .fail_next_retryable(Op::EnvironmentDeploy, "registry timeout");
    d.deploy(release("v2")).await.unwrap();
    assert_eq!(w.fakes.call_count(Op::EnvironmentDeploy), deploys + 3);
    assert_eq!(w.fakes.live(), Some(Slot::Green));
}

#[tokio::test]
async fn hook_timeouts_continue_or_fail_as_configured() {
    let fakes = Fakes::new();
    let opts = HookOptions::default().with_timeout(Duration::from_millis(20));
    let d = builder(&fakes, fast_policy())
        .hook_with(
            HookPoint::AfterDeploy,
            Arc::new(fakes.hook("slow-optional")),
            opts.with_on_timeout(OnTimeout::Continue),
        )
        .build()
        .unwrap();
    let mut events = d.subscribe();
    fakes.delay_next(Op::hook("slow-optional"), Duration::from_secs(5));
    d.deploy(release("v1")).await.unwrap();
    let mut timed_out = false;
    while let Ok(ev) = events.try_recv() {
        timed_out |=
            matches!(ev, DeployEvent::HookTimedOut { ref hook, .. } if hook == "slow-optional");
    }
    assert!(timed_out);

    let d = builder(&fakes, fast_policy())
        .hook_with(
            HookPoint::AfterDeploy,
            Arc::new(fakes.hook("slow-required")),
            opts,
        )
        .build()
        .unwrap();
    fakes.delay_next(Op::hook("slow-required"), Duration::from_secs(5));
    let err = d.deploy(release("v2")).await.unwrap_err();
    assert_eq!(err.phase(), Some(Phase::AfterDeployHook));
    assert!(matches!(err.root(), Error::Timeout { .. }), "{err}");
    assert_eq!(fakes.live(), Some(Slot::Blue));
}

#[tokio::test]
async fn a_second_deploy_while_one_runs_is_refused_naming_the_holder() {
    let w = with_v1(fast_policy()).await;
    w.fakes.hang_next(Op::hook("smoke"));
    let d = w.deployer.clone();
    let running = tokio::spawn(async move { d.deploy(release("v2")).await });
    for _ in 0..500 {
        if w.fakes.call_count(Op::hook("smoke")) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let err = w.deployer.deploy(release("v3")).await.unwrap_err();
    match &err {
        Error::Locked { holder } => assert_eq!(holder.owner.purpose, "deploy v2"),
        other => panic!("expected Locked, got {other}"),
    }
    assert!(err.to_string().contains("deploy v2"), "{err}");
    running.abort();
}

#[tokio::test]
async fn a_held_lock_can_be_waited_for() {
    let w =
        with_v1(fast_policy().with_lock(Duration::from_millis(200), Duration::from_secs(5))).await;
    // A lock left by someone else that will expire.
    let store = w.fakes.store();
    store
        .acquire(
            &LockOwner::current("stuck operator"),
            Duration::from_millis(300),
        )
        .await
        .unwrap();
    let t = Instant::now();
    w.deployer.deploy(release("v2")).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "did not wait for the lock"
    );
}

// ---------------------------------------------------------------------------------------------
// Fault matrix: a failure at every phase

#[tokio::test]
async fn fault_prepare_database() {
    let w = with_v1(fast_policy()).await;
    w.fakes
        .fail_next(Op::DatabasePrepare, "template database busy");
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert_eq!(err.live_traffic(), Some(LiveTraffic::Untouched));
    assert!(err.to_string().contains("template database busy"), "{err}");
    assert_v1_untouched(&w, &err, Phase::PrepareDatabase, "fake-database").await;
}

#[tokio::test]
async fn fault_before_deploy_hook() {
    let w = with_v1(fast_policy()).await;
    w.fakes.fail_next(Op::hook("pre"), "ticket not approved");
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert!(matches!(err.root(), Error::Hook { .. }), "{err}");
    assert_v1_untouched(&w, &err, Phase::BeforeDeployHook, "pre").await;
}

#[tokio::test]
async fn fault_environment_deploy() {
    let w = with_v1(fast_policy()).await;
    let deploys = w.fakes.call_count(Op::EnvironmentDeploy);
    w.fakes.fail_next(Op::EnvironmentDeploy, "image not found");
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert!(err.to_string().contains("image not found"), "{err}");
    assert_eq!(
        w.fakes.call_count(Op::EnvironmentDeploy),
        deploys + 1,
        "a non-retryable error is not retried"
    );
    assert_v1_untouched(&w, &err, Phase::DeployTarget, "fake-environment").await;
}

#[tokio::test]
async fn fault_readiness_timeout() {
    let w = with_v1(fast_policy()).await;
    w.fakes.set_unhealthy_version("v2");
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert!(matches!(err.root(), Error::Timeout { .. }), "{err}");
    assert!(
        err.to_string().contains("503"),
        "the last health failure is named: {err}"
    );
    assert_v1_untouched(&w, &err, Phase::WaitReady, "fake-health").await;
}

#[tokio::test]
async fn fault_after_deploy_hook() {
    let w = with_v1(fast_policy()).await;
    w.fakes
        .fail_next(Op::hook("migrate"), "migration 42 failed");
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert_v1_untouched(&w, &err, Phase::AfterDeployHook, "migrate").await;
}

#[tokio::test]
async fn fault_smoke_test_hook() {
    let w = with_v1(fast_policy()).await;
    w.fakes
        .fail_next(Op::hook("smoke"), "login page returned 500");
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert_v1_untouched(&w, &err, Phase::SmokeTest, "smoke").await;
}

#[tokio::test]
async fn fault_gate_refused() {
    let w = with_v1(fast_policy().with_promotion(Promotion::Manual)).await;
    w.deployer.deploy(release("v2")).await.unwrap();
    let report = w.deployer.abort().await.unwrap();
    assert_eq!(report.outcome, RunOutcome::RolledBack);
    assert_eq!(w.fakes.live(), Some(Slot::Blue));
    assert_eq!(w.fakes.instance_state(Slot::Green), InstanceState::Absent);
    let st = w.fakes.stored_state().unwrap();
    assert!(st.in_flight.is_none());
    assert_eq!(st.history.back().unwrap().outcome, Outcome::Aborted);
    assert!(w.fakes.stored_lock().is_none());
    assert_eq!(w.fakes.switch_count(), 0);
}

#[tokio::test]
async fn fault_database_before_switch() {
    let w = with_v1(fast_policy()).await;
    w.fakes
        .fail_next(Op::DatabaseBeforeSwitch, "replication lag 30s");
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert_v1_untouched(&w, &err, Phase::DatabaseBeforeSwitch, "fake-database").await;
}

#[tokio::test]
async fn fault_switch_apply() {
    let w = with_v1(fast_policy()).await;
    w.fakes.fail_next(Op::SwitchApply, "reload failed");
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert_eq!(err.live_traffic(), Some(LiveTraffic::Untouched), "{err}");
    assert_v1_untouched(&w, &err, Phase::Switch, "fake-switch").await;
}

#[tokio::test]
async fn fault_switch_read_back() {
    let w = with_v1(fast_policy()).await;
    // apply succeeds; reading the proxy back fails (not retryable), and so does undo's own read
    // of where traffic is: undo then assumes traffic moved and switches back.
    let reads = w.fakes.call_count(Op::SwitchCurrent);
    w.fakes.fail_on_call(
        Op::SwitchCurrent,
        w.fakes.call_count(Op::SwitchCurrent) + 1,
        "socket closed",
    );
    w.fakes.fail_on_call(
        Op::SwitchCurrent,
        w.fakes.call_count(Op::SwitchCurrent) + 2,
        "socket closed",
    );
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert_eq!(err.live_traffic(), Some(LiveTraffic::RolledBack), "{err}");
    assert_v1_untouched(&w, &err, Phase::Switch, "fake-switch").await;
    assert_eq!(w.fakes.switch_count(), 2, "switched, then back");
    assert_eq!(
        w.fakes.call_count(Op::SwitchCurrent),
        reads + 3,
        "the read-back once (not retried), undo's read, the read-back after switching back"
    );
}

#[tokio::test]
async fn fault_data_path_verification() {
    let w = with_v1(fast_policy()).await;
    w.fakes.fail_always(Op::Probe, "connection refused");
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert!(
        matches!(err.root(), Error::DataPathMismatch { .. }),
        "{err}"
    );
    assert_eq!(err.live_traffic(), Some(LiveTraffic::RolledBack));
    assert_v1_untouched(&w, &err, Phase::VerifyDataPath, "fake-probe").await;
}

/// From the next probe after the per-step verification (three answers in a row) on, every probe
/// fails: the data path broke during the run, after the switch was verified.
fn break_the_data_path_after_verification(w: &World) {
    let first = w.fakes.call_count(Op::Probe) + 4;
    for n in first..first + 200 {
        w.fakes.fail_on_call(Op::Probe, n, "502 Bad Gateway");
    }
}

#[tokio::test]
async fn a_failed_final_data_path_check_switches_back_and_reports_no_success() {
    let w = with_v1(fast_policy()).await;
    break_the_data_path_after_verification(&w);
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert!(
        matches!(err.root(), Error::DataPathMismatch { .. }),
        "{err}"
    );
    assert_eq!(err.live_traffic(), Some(LiveTraffic::RolledBack), "{err}");
    assert_v1_untouched(&w, &err, Phase::ConfirmDataPath, "fake-probe").await;
    assert_eq!(w.fakes.switch_count(), 2, "switched, then back");
    let st = w.fakes.stored_state().unwrap();
    assert!(
        matches!(
            st.history.back().unwrap().outcome,
            Outcome::Failed {
                phase: Phase::ConfirmDataPath,
                rolled_back: true,
                ..
            }
        ),
        "{:?}",
        st.history.back()
    );
}

#[tokio::test]
async fn a_failed_final_check_restarts_a_stopped_old_slot_to_switch_back() {
    // No database here: without an irreversible finalize, undo switches back on its own.
    let fakes = Fakes::new();
    let deployer = plain_builder(&fakes, fast_policy().with_keep_old(KeepOld::Stop))
        .verify_data_path(Arc::new(fakes.probe()))
        .build()
        .unwrap();
    let w = World { fakes, deployer };
    w.deployer.deploy(release("v1")).await.unwrap();
    break_the_data_path_after_verification(&w);
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert_eq!(err.phase(), Some(Phase::ConfirmDataPath), "{err}");
    assert_eq!(err.live_traffic(), Some(LiveTraffic::RolledBack), "{err}");
    // Blue was stopped by DrainOld; switching back started it again first.
    assert_eq!(w.fakes.live(), Some(Slot::Blue));
    assert_eq!(w.fakes.running(Slot::Blue).as_deref(), Some("v1"));
    assert_eq!(w.fakes.instance_state(Slot::Green), InstanceState::Absent);
    assert!(
        w.fakes.violations().is_empty(),
        "{:?}",
        w.fakes.violations()
    );
}

#[tokio::test]
async fn a_failed_final_check_after_an_irreversible_finalize_stops_and_asks() {
    // The fake database's finalize (old slot stopped) cannot be undone.
    let w = with_v1(fast_policy().with_keep_old(KeepOld::Stop)).await;
    break_the_data_path_after_verification(&w);
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert_eq!(err.phase(), Some(Phase::ConfirmDataPath), "{err}");
    assert!(matches!(err.root(), Error::NeedsDecision { .. }), "{err}");
    assert_eq!(err.live_traffic(), Some(LiveTraffic::Affected));
    // Not recorded as a success: the run waits for a person at the final check.
    let st = w.fakes.stored_state().unwrap();
    let f = st.in_flight.expect("the run waits");
    assert_eq!(f.phase, Phase::ConfirmDataPath);
    assert!(matches!(f.waiting, Some(Waiting::Decision { .. })));
    assert!(!st
        .history
        .iter()
        .any(|h| h.version.as_str() == "v2" && h.outcome == Outcome::Succeeded));
    assert!(w.fakes.stored_lock().is_none());
    // What is left: a person decides. Abort switches back, restarting the stopped blue.
    w.fakes.clear_faults();
    w.deployer.abort().await.unwrap();
    assert_eq!(w.fakes.live(), Some(Slot::Blue));
    assert_eq!(w.fakes.running(Slot::Blue).as_deref(), Some("v1"));
    assert!(
        w.fakes.violations().is_empty(),
        "{:?}",
        w.fakes.violations()
    );
}

#[tokio::test]
async fn without_a_probe_the_final_check_reads_the_switch_back_and_says_what_it_skipped() {
    let fakes = Fakes::new();
    let d = plain_builder(&fakes, fast_policy()).build().unwrap();
    let mut events = d.subscribe();
    let reads = fakes.call_count(Op::SwitchCurrent);
    d.deploy(release("v1")).await.unwrap();
    assert!(fakes.call_count(Op::SwitchCurrent) > reads);
    let mut skipped = None;
    while let Ok(ev) = events.try_recv() {
        if let DeployEvent::PhaseSkipped {
            phase: Phase::ConfirmDataPath,
            reason,
            ..
        } = ev
        {
            skipped = Some(reason);
        }
    }
    let reason = skipped.expect("the final check reports what it could not check");
    assert!(reason.contains("no data-path probe"), "{reason}");
}

#[tokio::test]
async fn status_reports_a_data_path_that_does_not_answer_as_drift() {
    let w = with_v1(fast_policy()).await;
    let st = w.deployer.status().await.unwrap();
    assert!(st.drift.is_empty(), "{:?}", st.drift);
    w.fakes.fail_always(Op::Probe, "502 Bad Gateway");
    let st = w.deployer.status().await.unwrap();
    assert_eq!(st.drift.len(), 1, "{:?}", st.drift);
    assert!(
        st.drift[0].contains("do not answer") && st.drift[0].contains("v1"),
        "{:?}",
        st.drift
    );
}

#[tokio::test]
async fn the_state_records_the_targets_endpoints_before_the_switch() {
    let w = with_v1(fast_policy()).await;
    let blue = w.fakes.endpoints().blue;
    // v2 (only) sits in a long observation window.
    let policy = fast_policy().with_observation(Duration::from_secs(30), Duration::from_millis(5));
    let d = builder(&w.fakes, policy).build().unwrap();
    let task = tokio::spawn(async move { d.deploy(release("v2")).await });
    let start = Instant::now();
    let st = loop {
        let st = w.fakes.stored_state().unwrap();
        if st.in_flight.as_ref().map(|f| f.phase) == Some(Phase::Observe) {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "never observed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    task.abort();
    let _ = task.await;
    // Green's slot record is written only when the run completes, but a switch that restarts now
    // must route green to v2's endpoints: the flight recorded them before the switch.
    assert!(st.slots.green.is_none());
    let (split, eps) = st.last_routing().unwrap();
    assert_eq!(split, TrafficSplit::all(Slot::Green));
    assert_eq!(eps.green, w.fakes.endpoints().green);
    assert!(!eps.green.is_empty());
    assert_eq!(eps.blue, blue);
}

#[tokio::test]
async fn fault_observation_health() {
    let policy = fast_policy()
        .with_observation(Duration::from_millis(200), Duration::from_millis(5))
        .with_thresholds(2, 2);
    let w = with_v1(policy).await;
    w.fakes.set_unhealthy_after_switch("v2");
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert!(
        matches!(
            err.root(),
            Error::Unhealthy {
                slot: Slot::Green,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.live_traffic(), Some(LiveTraffic::RolledBack));
    assert_v1_untouched(&w, &err, Phase::Observe, "fake-health").await;
}

#[tokio::test]
async fn fault_database_after_switch() {
    let w = with_v1(fast_policy()).await;
    w.fakes
        .fail_next(Op::DatabaseAfterSwitch, "sequence sync failed");
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert_v1_untouched(&w, &err, Phase::DatabaseAfterSwitch, "fake-database").await;
}

#[tokio::test]
async fn fault_drain_and_stop_old_slot() {
    let w = with_v1(fast_policy().with_keep_old(KeepOld::Stop)).await;
    w.fakes
        .fail_always(Op::EnvironmentStop, "daemon unreachable");
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert_eq!(err.live_traffic(), Some(LiveTraffic::RolledBack));
    assert_v1_untouched(&w, &err, Phase::DrainOld, "fake-environment").await;
}

#[tokio::test]
async fn fault_state_save() {
    let w = with_v1(fast_policy()).await;
    // Saves of a deploy: start, then one before each phase. The 3rd is before the first hook.
    let n = w.fakes.call_count(Op::StoreSave);
    w.fakes.fail_on_call(Op::StoreSave, n + 3, "disk full");
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
    assert_v1_untouched(&w, &err, Phase::BeforeDeployHook, "memory").await;
}

#[tokio::test]
async fn an_irreversible_step_stops_and_asks_instead_of_rolling_back() {
    let policy = fast_policy()
        .with_observation(Duration::from_millis(200), Duration::from_millis(5))
        .with_thresholds(2, 2);
    let w = with_v1(policy).await;
    w.fakes.set_db_irreversible("v2");
    w.fakes.set_unhealthy_after_switch("v2");
    let err = w.deployer.deploy(release("v2")).await.unwrap_err();
    assert_eq!(err.phase(), Some(Phase::Observe));
    assert_eq!(err.live_traffic(), Some(LiveTraffic::Affected));
    assert!(matches!(err.root(), Error::NeedsDecision { .. }), "{err}");
    assert!(err.to_string().contains("irreversible"), "{err}");
    // Nothing was rolled back automatically.
    assert_eq!(w.fakes.live(), Some(Slot::Green));
    let st = w.fakes.stored_state().unwrap();
    assert!(matches!(
        st.in_flight.unwrap().waiting,
        Some(Waiting::Decision { .. })
    ));
    assert!(w.fakes.stored_lock().is_none());
    // A person decides: abort rolls back.
    w.deployer.abort().await.unwrap();
    assert_eq!(w.fakes.live(), Some(Slot::Blue));
    assert!(w.fakes.violations().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Crash and resume

/// The fake operation that starts each phase, to hang in it.
fn op_of(phase: Phase) -> Op {
    match phase {
        Phase::PrepareDatabase => Op::DatabasePrepare,
        Phase::BeforeDeployHook => Op::hook("pre"),
        Phase::DeployTarget => Op::EnvironmentDeploy,
        Phase::WaitReady => Op::HealthCheck,
        Phase::AfterDeployHook => Op::hook("migrate"),
        Phase::Preview => Op::SwitchPreview,
        Phase::SmokeTest => Op::hook("smoke"),
        Phase::DatabaseBeforeSwitch => Op::DatabaseBeforeSwitch,
        Phase::Switch => Op::SwitchApply,
        Phase::VerifyDataPath => Op::Probe,
        Phase::Observe => Op::SwitchMetrics,
        Phase::DatabaseAfterSwitch => Op::DatabaseAfterSwitch,
        Phase::AfterSwitchHook => Op::hook("post"),
        Phase::DrainOld => Op::SwitchInFlight,
        Phase::Finalize => Op::DatabaseFinalize,
        Phase::ConfirmDataPath => Op::Probe,
        other => panic!("no hang point for {other}"),
    }
}

/// Deploys v2 over v1, kills the engine task while it is inside `phase`, then recovers with a new
/// Deployer on the same store. Returns the world and the recovered report.
async fn crash_in(phase: Phase, resume: Resume) -> (World, Report) {
    let policy = fast_policy()
        .with_preview(true)
        .with_keep_old(KeepOld::Stop)
        .with_resume(resume)
        .with_observation(Duration::from_millis(10), Duration::from_millis(5));
    let w = with_v1(policy.clone()).await;
    // v1's deploy stopped nothing; make blue warm again in the record for KeepOld::Stop runs.
    let op = op_of(phase);
    if phase == Phase::ConfirmDataPath {
        // The probe runs first in VerifyDataPath (three answers in a row); hang the next one.
        w.fakes
            .hang_on_call(op.clone(), w.fakes.call_count(op.clone()) + 4);
    } else {
        w.fakes.hang_next(op.clone());
    }
    let d = w.deployer.clone();
    let task = tokio::spawn(async move { d.deploy(release("v2")).await });
    let start = Instant::now();
    loop {
        let at = w
            .fakes
            .stored_state()
            .and_then(|s| s.in_flight)
            .map(|f| f.phase);
        let hung = at == Some(phase) && !w.fakes.calls().is_empty();
        if hung && w.fakes.call_count(op.clone()) > 0 {
            // Give the hang a moment to be reached inside the phase.
            tokio::time::sleep(Duration::from_millis(20)).await;
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "never reached {phase}: {at:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    task.abort();
    let _ = task.await;
    assert!(
        w.fakes.stored_lock().is_some(),
        "the crashed run's lease is still there"
    );

    // A new process: a new Deployer on the same store breaks the dead holder's lock and recovers.
    let d2 = builder(&w.fakes, policy).build().unwrap();
    d2.break_lock().await.unwrap();
    let report = d2.recover().await.unwrap().expect("something to recover");
    (
        World {
            fakes: w.fakes.clone(),
            deployer: d2,
        },
        report,
    )
}

#[tokio::test]
async fn a_crash_at_any_phase_converges_without_switching_twice() {
    for phase in Phase::ALL {
        if matches!(phase, Phase::Plan | Phase::Gate) {
            continue;
        }
        let (w, report) = crash_in(phase, Resume::RollBack).await;
        let st = w.fakes.stored_state().unwrap();
        assert!(st.in_flight.is_none(), "{phase}: still in flight");
        assert!(w.fakes.stored_lock().is_none(), "{phase}: lock left");
        assert!(
            w.fakes.violations().is_empty(),
            "{phase}: {:?}",
            w.fakes.violations()
        );
        if phase <= Phase::Switch {
            // Traffic never moved (the hang in apply is before it takes effect): undone.
            assert_eq!(report.outcome, RunOutcome::RolledBack, "{phase}");
            assert_eq!(w.fakes.switch_count(), 0, "{phase}");
            assert_eq!(w.fakes.live(), Some(Slot::Blue), "{phase}");
            assert_eq!(
                w.fakes.instance_state(Slot::Green),
                InstanceState::Absent,
                "{phase}"
            );
            assert_eq!(
                st.history.back().unwrap().outcome,
                Outcome::Recovered {
                    action: "rolled back".into()
                },
                "{phase}"
            );
        } else {
            // Traffic had moved: finished, exactly one switch.
            assert_eq!(report.outcome, RunOutcome::Live, "{phase}");
            assert_eq!(
                w.fakes.switch_count(),
                1,
                "{phase}: {:?}",
                w.fakes.timeline()
            );
            assert_eq!(w.fakes.live(), Some(Slot::Green), "{phase}");
            assert_eq!(
                w.fakes.running(Slot::Green).as_deref(),
                Some("v2"),
                "{phase}"
            );
            assert_eq!(
                st.history.back().unwrap().outcome,
                Outcome::Recovered {
                    action: "completed".into()
                },
                "{phase}"
            );
        }
        // And the next deploy works normally.
        w.deployer.deploy(release("v3")).await.unwrap();
    }
}

#[tokio::test]
async fn resume_continue_finishes_an_unswitched_deploy_with_exactly_one_switch() {
    for phase in [
        Phase::DeployTarget,
        Phase::WaitReady,
        Phase::SmokeTest,
        Phase::Switch,
    ] {
        let (w, report) = crash_in(phase, Resume::Continue).await;
        assert_eq!(report.outcome, RunOutcome::Live, "{phase}");
        assert_eq!(w.fakes.switch_count(), 1, "{phase}");
        assert_eq!(w.fakes.live(), Some(Slot::Green), "{phase}");
        assert!(w.fakes.violations().is_empty(), "{phase}");
    }
}

#[tokio::test]
async fn deploy_after_a_crash_recovers_first() {
    let w = with_v1(fast_policy()).await;
    w.fakes.hang_next(Op::hook("smoke"));
    let d = w.deployer.clone();
    let task = tokio::spawn(async move { d.deploy(release("v2")).await });
    for _ in 0..1000 {
        if w.fakes.call_count(Op::hook("smoke")) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    task.abort();
    let _ = task.await;
    w.deployer.break_lock().await.unwrap();
    w.deployer.deploy(release("v3")).await.unwrap();
    let hist = w.deployer.history().await.unwrap();
    let outcomes: Vec<_> = hist
        .iter()
        .map(|h| (h.version.to_string(), h.outcome.clone()))
        .collect();
    assert!(
        matches!(outcomes[1].1, Outcome::Recovered { .. }),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[2], ("v3".into(), Outcome::Succeeded));
    assert_eq!(w.fakes.live(), Some(Slot::Green));
    assert_eq!(w.fakes.running(Slot::Green).as_deref(), Some("v3"));
}

#[tokio::test]
async fn an_interrupt_stops_at_a_safe_point_and_rolls_back() {
    let policy = fast_policy().with_readiness_timeout(Duration::from_secs(30));
    let w = with_v1(policy).await;
    w.fakes.set_healthy_after(1_000_000);
    let d = w.deployer.clone();
    let run = tokio::spawn(async move { d.deploy(release("v2")).await });
    for _ in 0..1000 {
        if w.fakes.call_count(Op::HealthCheck) > 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    w.deployer.interrupt();
    let err = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("the interrupted run ends promptly")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err.root(), Error::Interrupted), "{err}");
    assert_v1_untouched(&w, &err, Phase::WaitReady, "operator").await;
    // The next run is not affected by the old interrupt.
    w.fakes.set_healthy_after(0);
    w.deployer.deploy(release("v2")).await.unwrap();
}

#[tokio::test]
async fn the_lease_is_renewed_while_a_long_run_holds_it() {
    let policy = fast_policy().with_lock(Duration::from_millis(300), Duration::ZERO);
    let w = with_v1(policy).await;
    // The smoke test takes 1.5 s: five lease lifetimes.
    w.fakes
        .delay_next(Op::hook("smoke"), Duration::from_millis(1500));
    let d = w.deployer.clone();
    let run = tokio::spawn(async move { d.deploy(release("v2")).await });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let err = w.deployer.deploy(release("v3")).await.unwrap_err();
    assert!(
        matches!(err, Error::Locked { .. }),
        "the lease expired under a live run: {err}"
    );
    run.await.unwrap().unwrap();
    assert_eq!(w.fakes.live(), Some(Slot::Green));
    assert!(w.fakes.stored_lock().is_none());
}

#[tokio::test]
async fn a_lost_lease_stops_the_run_without_touching_anything_more() {
    let policy = fast_policy().with_lock(Duration::from_millis(300), Duration::ZERO);
    let w = with_v1(policy).await;
    w.fakes
        .delay_next(Op::hook("smoke"), Duration::from_millis(800));
    let d = w.deployer.clone();
    let run = tokio::spawn(async move { d.deploy(release("v2")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Someone breaks the lock (believing the holder dead) and takes it.
    w.deployer.break_lock().await.unwrap();
    w.fakes
        .store()
        .acquire(&LockOwner::current("operator"), Duration::from_secs(60))
        .await
        .unwrap();
    let err = run.await.unwrap().unwrap_err();
    assert!(matches!(err.root(), Error::LockLost { .. }), "{err}");
    // The run stopped before the switch: traffic never moved.
    assert_eq!(w.fakes.live(), Some(Slot::Blue));
    assert_eq!(w.fakes.stored_lock().unwrap().owner.purpose, "operator");
}
