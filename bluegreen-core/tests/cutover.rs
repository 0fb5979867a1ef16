//! The coordinated database cutover (`Policy::pause_during_cutover`), against the in-memory fakes:
//! pause, let the requests in flight to the live slot finish, run the database's cutover, switch,
//! resume. Any failure on the way resumes the switch and leaves live as it was.

use std::sync::Arc;
use std::time::Duration;

use bluegreen_core::testkit::{Fakes, Op};
use bluegreen_core::*;

fn policy() -> Policy {
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
        .with_pause_during_cutover(true)
        .with_cutover_drain_timeout(Duration::from_secs(2))
}

fn release(v: &str) -> Release {
    Release::new(v, "app").unwrap()
}

/// v1 live on blue, with a database strategy and the cutover policy.
async fn with_v1(policy: Policy) -> (Fakes, Deployer) {
    let fakes = Fakes::new();
    let deployer = fakes
        .deployer_builder()
        .database(Arc::new(fakes.database()))
        .verify_data_path(Arc::new(fakes.probe()))
        .policy(policy)
        .build()
        .unwrap();
    deployer.deploy(release("v1")).await.unwrap();
    assert_eq!(fakes.live(), Some(Slot::Blue));
    (fakes, deployer)
}

fn position(calls: &[String], what: &str) -> Option<usize> {
    calls.iter().position(|c| c.starts_with(what))
}

/// What a failed v2 cutover must leave: the switch resumed, blue live with v1, green gone, the
/// database's cutover undone.
fn assert_live_untouched(fakes: &Fakes, err: &Error) {
    assert!(!fakes.is_paused(), "the switch was left paused: {err}");
    assert_eq!(fakes.live(), Some(Slot::Blue), "live moved: {err}");
    assert_eq!(fakes.running(Slot::Blue).as_deref(), Some("v1"));
    assert_eq!(fakes.instance_state(Slot::Green), InstanceState::Absent);
    assert!(fakes.violations().is_empty(), "{:?}", fakes.violations());
    assert!(fakes.stored_lock().is_none(), "lock not released");
    assert!(
        !fakes.db_prepared().contains(&Slot::Green),
        "database not rolled back: {err}"
    );
    match err {
        Error::Phase { live, .. } => assert!(
            matches!(live, LiveTraffic::Untouched | LiveTraffic::RolledBack),
            "{err}"
        ),
        other => panic!("expected a phase error, got {other}"),
    }
}

#[tokio::test]
async fn the_cutover_waits_for_in_flight_requests_before_the_database_step() {
    let (fakes, deployer) = with_v1(policy()).await;
    fakes.set_in_flight(Slot::Blue, 3);
    let before = fakes.calls().len();
    let watcher = {
        let fakes = fakes.clone();
        tokio::spawn(async move {
            // Wait until the engine paused, then hold the requests a while longer.
            for _ in 0..400 {
                if fakes.is_paused() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(fakes.is_paused(), "the engine never paused");
            tokio::time::sleep(Duration::from_millis(80)).await;
            let early = position(&fakes.calls()[before..], "database.before_switch").is_some();
            fakes.set_in_flight(Slot::Blue, 0);
            early
        })
    };
    let report = deployer.deploy(release("v2")).await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Live);
    assert!(
        !watcher.await.unwrap(),
        "the database cutover started while requests were still in flight to the live slot"
    );
    let calls = fakes.calls()[before..].to_vec();
    let pause = position(&calls, "switch.pause").expect("paused");
    let cutover = position(&calls, "database.before_switch").expect("cut over");
    let apply = calls
        .iter()
        .rposition(|c| c.starts_with("switch.apply"))
        .unwrap();
    let resume = position(&calls, "switch.resume").expect("resumed");
    assert!(
        pause < cutover && cutover < apply && apply < resume,
        "{calls:?}"
    );
    assert!(!fakes.is_paused());
    assert_eq!(fakes.live(), Some(Slot::Green));
}

#[tokio::test]
async fn requests_that_never_finish_fail_the_cutover_before_anything_is_frozen() {
    let (fakes, deployer) =
        with_v1(policy().with_cutover_drain_timeout(Duration::from_millis(60))).await;
    fakes.set_in_flight(Slot::Blue, 2);
    let before = fakes.calls().len();
    let err = deployer.deploy(release("v2")).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("requests in flight to the live slot blue")
            && msg.contains("2 still in flight")
            && msg.contains("cutover_drain_timeout"),
        "{msg}"
    );
    assert!(
        position(&fakes.calls()[before..], "database.before_switch").is_none(),
        "the database was cut over although requests were still in flight"
    );
    assert_live_untouched(&fakes, &err);
}

#[tokio::test]
async fn a_switch_that_cannot_pause_runs_the_cutover_as_before() {
    let (fakes, deployer) = with_v1(policy()).await;
    fakes.set_capabilities(
        Capabilities::basic()
            .with_weights(true)
            .with_drain(true)
            .with_metrics(true),
    );
    // Requests in flight would hold a pausing cutover: this one does not wait for them.
    fakes.set_in_flight(Slot::Blue, 5);
    let before = fakes.calls().len();
    let report = deployer.deploy(release("v2")).await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Live);
    let calls = fakes.calls()[before..].to_vec();
    assert!(position(&calls, "switch.pause").is_none(), "{calls:?}");
    assert!(position(&calls, "switch.resume").is_none(), "{calls:?}");
    assert!(position(&calls, "database.before_switch").is_some());
    assert_eq!(fakes.live(), Some(Slot::Green));
}

#[tokio::test]
async fn without_the_policy_the_switch_is_never_paused() {
    let (fakes, deployer) = with_v1(policy().with_pause_during_cutover(false)).await;
    fakes.set_in_flight(Slot::Blue, 5);
    let before = fakes.calls().len();
    deployer.deploy(release("v2")).await.unwrap();
    assert!(position(&fakes.calls()[before..], "switch.pause").is_none());
    assert_eq!(fakes.live(), Some(Slot::Green));
}

#[tokio::test]
async fn a_failure_at_any_step_of_the_cutover_resumes_and_leaves_live_as_it_was() {
    let steps = [
        (Op::SwitchPause, "switch"),
        (Op::SwitchInFlight, "switch"),
        (Op::DatabaseBeforeSwitch, "database"),
        (Op::SwitchApply, "switch"),
    ];
    for (op, backend) in steps {
        let (fakes, deployer) = with_v1(policy()).await;
        // Both attempts of the engine's retry fail.
        let before = fakes.calls().len();
        fakes.fail_always(op.clone(), "injected");
        let err = deployer.deploy(release("v2")).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(backend) && msg.contains("injected"),
            "{op}: {msg}"
        );
        assert_live_untouched(&fakes, &err);
        let calls = fakes.calls()[before..].to_vec();
        if op != Op::SwitchPause {
            let pause = position(&calls, "switch.pause").expect("paused");
            let resume = calls
                .iter()
                .rposition(|c| c.starts_with("switch.resume"))
                .unwrap_or_else(|| panic!("{op}: never resumed: {calls:?}"));
            assert!(pause < resume, "{op}: {calls:?}");
        }
    }
}

#[tokio::test]
async fn a_resume_that_fails_after_the_switch_is_reported_and_retried_by_undo() {
    let (fakes, deployer) = with_v1(policy()).await;
    fakes.fail_next(Op::SwitchResume, "injected resume failure");
    let err = deployer.deploy(release("v2")).await.unwrap_err();
    assert!(err.to_string().contains("injected resume failure"), "{err}");
    // The switch went back to blue and undo resumed it: no request is held forever.
    assert_live_untouched(&fakes, &err);
}

#[test]
fn the_cutover_drain_bound_is_read_from_config() {
    let p: Policy =
        serde_json::from_str(r#"{"pause_during_cutover": true, "cutover_drain_timeout": 1.5}"#)
            .unwrap();
    assert!(p.pause_during_cutover);
    assert_eq!(p.cutover_drain_timeout, Duration::from_millis(1500));
    assert_eq!(
        Policy::default().cutover_drain_timeout,
        Duration::from_secs(5)
    );
}
