//! Deploying the version that is already live changes nothing: a retried CI job must not destroy
//! the rollback target (issue #12, part 3).

mod common;

use std::time::Duration;

use common::{deploy_until, fast_policy, release};

use bluegreen_core::testkit::{Fakes, Op};
use bluegreen_core::{Deployer, Environment, RunOutcome, Slot};

fn deployer(fakes: &Fakes) -> Deployer {
    common::deployer(fakes, fast_policy())
}

#[tokio::test]
async fn deploying_the_live_version_again_keeps_the_rollback_target() {
    let fakes = Fakes::new();
    let d = deployer(&fakes);
    d.deploy(release("v1")).await.unwrap();
    let v2 = d.deploy(release("v2")).await.unwrap();
    let calls = fakes.calls().len();

    let again = d.deploy(release("v2")).await.unwrap();
    assert_eq!(again.outcome, RunOutcome::AlreadyLive);
    assert_eq!(again.target, Slot::Green);
    assert_eq!(again.id, v2.id, "names the deployment that put v2 live");
    let changed: Vec<String> = fakes.calls()[calls..]
        .iter()
        .filter(|c| !c.ends_with(".status") && !c.ends_with(".current"))
        .cloned()
        .collect();
    assert!(changed.is_empty(), "a no-op deploy called {changed:?}");
    assert_eq!(fakes.running(Slot::Blue).as_deref(), Some("v1"));
    assert_eq!(d.history().await.unwrap().len(), 2, "a no-op is not a run");

    // The rollback target survived: rollback reaches v1 on its warm slot.
    d.rollback().await.unwrap();
    assert_eq!(fakes.live(), Some(Slot::Blue));
    assert_eq!(fakes.running(Slot::Blue).as_deref(), Some("v1"));
}

#[tokio::test]
async fn redeploy_replaces_the_idle_slot_with_the_live_version() {
    let fakes = Fakes::new();
    let d = deployer(&fakes);
    d.deploy(release("v1")).await.unwrap();
    d.deploy(release("v2")).await.unwrap();
    let r = d.redeploy(release("v2")).await.unwrap();
    assert_eq!(r.outcome, RunOutcome::Live);
    assert_eq!(r.target, Slot::Blue);
    assert_eq!(fakes.running(Slot::Blue).as_deref(), Some("v2"));
    assert_eq!(fakes.running(Slot::Green).as_deref(), Some("v2"));
}

#[tokio::test]
async fn a_live_version_that_is_not_serving_is_deployed_again() {
    let fakes = Fakes::new();
    let d = deployer(&fakes);
    d.deploy(release("v1")).await.unwrap();
    d.deploy(release("v2")).await.unwrap();
    // The live instance died behind the engine's back: "already live" would be a false success.
    fakes
        .environment()
        .stop(Slot::Green, Duration::ZERO)
        .await
        .unwrap();
    let r = d.deploy(release("v2")).await.unwrap();
    assert_eq!(r.outcome, RunOutcome::Live);
    assert_eq!(fakes.live(), Some(Slot::Blue));
    assert_eq!(fakes.running(Slot::Blue).as_deref(), Some("v2"));
}

#[tokio::test]
async fn a_retried_deploy_after_a_recovered_crash_is_a_no_op() {
    let fakes = Fakes::new();
    let d = deployer(&fakes);
    d.deploy(release("v1")).await.unwrap();
    // Kill the v2 run after traffic moved (hanging in the after-switch database step).
    fakes.hang_next(Op::DatabaseAfterSwitch);
    let task = deploy_until(&fakes, &d, release("v2"), Op::DatabaseAfterSwitch).await;
    let left = fakes
        .stored_state()
        .unwrap()
        .in_flight
        .expect("a flight left");
    assert!(left.switched, "traffic had moved when the run died");
    task.abort();
    let _ = task.await;

    // The retried job: a new process recovers (completing v2), then finds v2 live.
    let d2 = deployer(&fakes);
    d2.break_lock().await.unwrap();
    let r = d2.deploy(release("v2")).await.unwrap();
    assert_eq!(r.outcome, RunOutcome::AlreadyLive);
    assert_eq!(fakes.live(), Some(Slot::Green));
    assert_eq!(fakes.running(Slot::Blue).as_deref(), Some("v1"));
    assert_eq!(
        fakes.switch_count(),
        1,
        "blue to green once, never back and forth"
    );
}
