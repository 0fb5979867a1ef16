//! Fencing (issue #12, part 1): a run acts only while it holds the lease. Saves present the
//! lease's epoch, every change is preceded by a lease check, and a run that lost its lease stops
//! at once, undo included, saying which lock it lost and the last change it made.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{deploy_until, fast_policy, release};

use bluegreen_core::testkit::{Fakes, Op};
use bluegreen_core::{
    Deployer, Error, FileStateStore, LiveTraffic, LockInfo, LockOwner, Policy, RunOutcome, Slot,
    StateStore,
};

fn policy() -> Policy {
    fast_policy()
        .with_lock(Duration::from_millis(300), Duration::ZERO)
        .with_readiness_timeout(Duration::from_secs(10))
}

fn deployer(fakes: &Fakes) -> Deployer {
    common::deployer(fakes, policy())
}

/// Everything the environment, switch and database were asked to change since `from`.
fn changes_since(fakes: &Fakes, from: usize) -> Vec<String> {
    fakes.calls()[from..]
        .iter()
        .filter(|c| {
            !c.starts_with("environment.status")
                && !c.starts_with("switch.current")
                && !c.starts_with("health")
                && !c.starts_with("store")
        })
        .cloned()
        .collect()
}

fn assert_lost(err: &Error) {
    assert!(matches!(err.root(), Error::LockLost { .. }), "{err}");
    assert_eq!(err.live_traffic(), Some(LiveTraffic::Unknown), "{err}");
    let msg = err.to_string();
    assert!(!msg.contains("live traffic untouched"), "{msg}");
    assert!(msg.contains("last change it made"), "{msg}");
}

#[tokio::test]
async fn a_run_whose_lease_renewal_fails_stops_at_its_next_step_and_changes_nothing_more() {
    let fakes = Fakes::new();
    let d = deployer(&fakes);
    d.deploy(release("v1")).await.unwrap();
    // v2 takes 400 ms to pass its first health round; the first renewal (at ttl/3) fails.
    fakes.delay_next(Op::HealthCheck, Duration::from_millis(400));
    fakes.fail_next(Op::StoreRenew, "the store went away");
    let from = fakes.calls().len();
    let err = d.deploy(release("v2")).await.unwrap_err();
    assert_lost(&err);
    assert!(err.to_string().contains("the store went away"), "{err}");
    // It deployed v2 to green, then stopped: no undo, no switch, nothing removed.
    let changes = changes_since(&fakes, from);
    assert_eq!(
        changes,
        vec!["database.prepare green", "environment.deploy green v2"],
        "{changes:?}"
    );
    assert_eq!(fakes.live(), Some(Slot::Blue));
    // The flight is left for the next run, which recovers it as crashed.
    let st = fakes.stored_state().unwrap();
    assert!(st.in_flight.is_some());
    d.force_break_lock().await.unwrap();
    let r = d.recover().await.unwrap().expect("a flight to recover");
    assert_eq!(r.outcome, RunOutcome::RolledBack);
    assert_eq!(fakes.live(), Some(Slot::Blue));
}

#[tokio::test]
async fn a_run_whose_lock_was_broken_stops_and_the_new_holder_goes_live() {
    let fakes = Fakes::new();
    let a = deployer(&fakes);
    a.deploy(release("v1")).await.unwrap();
    fakes.delay_next(Op::HealthCheck, Duration::from_millis(250));
    let run_a = deploy_until(&fakes, &a, release("v2"), Op::HealthCheck).await;
    // Another operator breaks the lock and deploys v3: it recovers A's flight first.
    let b = deployer(&fakes);
    let broken = b.force_break_lock().await.unwrap().expect("A's lock");
    assert!(broken.owner.purpose.contains("v2"));
    let r = b.deploy(release("v3")).await.unwrap();
    assert_eq!(r.outcome, RunOutcome::Live);
    let from = fakes.calls().len();

    let err = run_a.await.unwrap().unwrap_err();
    assert_lost(&err);
    assert!(
        changes_since(&fakes, from).is_empty(),
        "A changed something after losing its lock: {:?}",
        changes_since(&fakes, from)
    );
    assert_eq!(fakes.served_version().as_deref(), Some("v3"));
    assert!(fakes.violations().is_empty(), "{:?}", fakes.violations());
}

#[tokio::test]
async fn break_lock_refuses_a_live_holder_on_this_host_and_force_breaks_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStateStore::new(dir.path()).unwrap();
    let fakes = Fakes::new();
    let d = Deployer::builder()
        .environment(Arc::new(fakes.environment()))
        .switch(Arc::new(fakes.switch()))
        .store(Arc::new(store.clone()))
        .build()
        .unwrap();
    // The holder: another process on this host that is running (pid 1 always is).
    let mut owner = LockOwner::current("deploy v7 (still running)");
    owner.pid = 1;
    let lease = store
        .acquire(&owner, Duration::from_secs(600))
        .await
        .unwrap();
    std::fs::write(
        dir.path().join("lock.json"),
        serde_json::to_vec(&LockInfo {
            owner: owner.clone(),
            ..lease.clone()
        })
        .unwrap(),
    )
    .unwrap();
    let err = d.break_lock().await.unwrap_err();
    assert!(matches!(err, Error::HolderAlive { .. }), "{err}");
    assert!(err.to_string().contains("deploy v7"), "{err}");
    assert!(
        store.lock_info().await.unwrap().is_some(),
        "refused, yet removed"
    );

    let removed = d.force_break_lock().await.unwrap().expect("the lock");
    assert!(removed.same_lease(&lease));
    assert!(store.lock_info().await.unwrap().is_none());
    // The old holder's saves are refused from now on.
    let err = store.save(&Default::default(), &lease).await.unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err}");
}
