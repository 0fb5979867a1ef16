//! Engine unit tests that need a scripted backend (mockall).

use super::*;
use crate::testkit::{Fakes, Op};
use crate::traits::{Capabilities, MockTrafficSwitch};
use crate::types::TrafficSplit;
use std::time::Duration;

/// A switch whose `apply` succeeds but whose read-back shows the old split: the engine must
/// not trust `apply`'s return value.
#[tokio::test]
async fn a_switch_that_does_not_take_effect_fails_verification_and_changes_nothing() {
    let fakes = Fakes::new();
    let mut switch = MockTrafficSwitch::new();
    switch.expect_name().return_const("mock-switch".to_string());
    switch.expect_capabilities().returning(Capabilities::basic);
    // A switch without counters: the ledger says "not measured".
    switch
        .expect_counters()
        .returning(|| Err(Error::unsupported("counters", "mock-switch")));
    switch.expect_apply().times(1).returning(|_, _| Ok(()));
    switch
        .expect_current()
        .returning(|| Ok(Some(TrafficSplit::all(Slot::Green))));
    let d = Deployer::builder()
        .environment(Arc::new(fakes.environment()))
        .switch(Arc::new(switch))
        .store(Arc::new(fakes.store()))
        .policy(Policy::default().with_poll(Duration::from_millis(1), Duration::from_millis(2)))
        .build()
        .unwrap();
    let err = d
        .deploy(Release::new("v1", "app").unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.phase(), Some(Phase::Switch));
    assert!(matches!(err.root(), Error::VerifyMismatch { .. }), "{err}");
    // Traffic never reached blue according to the proxy: nothing to switch back, target gone.
    assert_eq!(err.live_traffic(), Some(LiveTraffic::Untouched));
    assert_eq!(fakes.instance_state(Slot::Blue), InstanceState::Absent);
}

/// Deploys v1 then v2 with `policy`, kills the v2 run while it hangs in fake operation `op`, and
/// returns the flight the dead run left in the store plus a new Deployer on the same store.
async fn crash_inside(fakes: &Fakes, policy: Policy, op: Op) -> (crate::state::InFlight, Deployer) {
    let build = || {
        fakes
            .deployer_builder()
            .database(Arc::new(fakes.database()))
            .policy(policy.clone())
            .build()
            .unwrap()
    };
    let d = build();
    d.deploy(Release::new("v1", "app").unwrap()).await.unwrap();
    let before = fakes.call_count(op.clone());
    fakes.hang_next(op.clone());
    let task = {
        let d = d.clone();
        tokio::spawn(async move { d.deploy(Release::new("v2", "app").unwrap()).await })
    };
    assert!(
        fakes
            .called_more_than(op.clone(), before, Duration::from_secs(1))
            .await,
        "the run never reached {op}"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    task.abort();
    let _ = task.await;
    let flight = fakes
        .stored_state()
        .unwrap()
        .in_flight
        .expect("a flight left behind");
    let d2 = build();
    d2.break_lock().await.unwrap();
    (flight, d2)
}

fn crash_policy() -> Policy {
    Policy::default()
        .with_poll(Duration::from_millis(1), Duration::from_millis(5))
        .with_observation(Duration::ZERO, Duration::from_millis(5))
}

#[tokio::test]
async fn recovery_resumes_a_switch_the_crashed_run_had_paused() {
    let fakes = Fakes::new();
    let policy = crash_policy().with_pause_during_cutover(true);
    let (flight, d2) = crash_inside(&fakes, policy, Op::DatabaseBeforeSwitch).await;
    assert!(
        flight.paused,
        "the pause is recorded before the switch is paused"
    );
    assert!(fakes.is_paused());
    let report = d2.recover().await.unwrap().expect("something to recover");
    assert_eq!(report.outcome, RunOutcome::RolledBack);
    assert!(!fakes.is_paused(), "recovery left the switch paused");
    assert_eq!(fakes.live(), Some(Slot::Blue));
}

#[tokio::test]
async fn recovery_stops_preview_routing_the_crashed_run_had_started() {
    let fakes = Fakes::new();
    let policy = crash_policy().with_preview(true);
    let (flight, d2) = crash_inside(&fakes, policy, Op::DatabaseBeforeSwitch).await;
    assert!(
        flight.previewing,
        "preview routing is recorded in the flight"
    );
    assert_eq!(fakes.preview_slot(), Some(Slot::Green));
    let report = d2.recover().await.unwrap().expect("something to recover");
    assert_eq!(report.outcome, RunOutcome::RolledBack);
    assert_eq!(
        fakes.preview_slot(),
        None,
        "recovery left preview routing on"
    );
    assert_eq!(fakes.live(), Some(Slot::Blue));
}
