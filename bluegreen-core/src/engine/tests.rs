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

/// A fake environment whose status of `slot` reads as [`InstanceState::Unknown`] (a part
/// `h9` unreachable, the rest as the fake says) for the next `times` reads.
#[derive(Debug)]
struct PartlyUnknown {
    inner: crate::testkit::FakeEnvironment,
    slot: Slot,
    times: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl crate::Environment for PartlyUnknown {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn deploy(&self, slot: Slot, release: &Release) -> Result<Vec<crate::Endpoint>> {
        self.inner.deploy(slot, release).await
    }
    async fn status(&self, slot: Slot) -> Result<crate::SlotStatus> {
        let mut st = self.inner.status(slot).await?;
        let left = self.times.load(std::sync::atomic::Ordering::SeqCst);
        if slot == self.slot && left > 0 {
            self.times
                .store(left - 1, std::sync::atomic::Ordering::SeqCst);
            let part = crate::SlotPart::read("h1", &st);
            st.state = InstanceState::Unknown;
            st = st.with_parts(vec![
                part,
                crate::SlotPart::unreadable("h9", "cannot reach the engine of h9"),
            ]);
        }
        Ok(st)
    }
    async fn stop(&self, slot: Slot, drain: Duration) -> Result<()> {
        self.inner.stop(slot, drain).await
    }
    async fn remove(&self, slot: Slot) -> Result<()> {
        self.inner.remove(slot).await
    }
}

fn partly_unknown_deployer(fakes: &Fakes, slot: Slot, times: u32) -> Deployer {
    fakes
        .deployer_builder()
        .environment(Arc::new(PartlyUnknown {
            inner: fakes.environment(),
            slot,
            times: times.into(),
        }))
        .policy(quick())
        .build()
        .unwrap()
}

/// Fast polls, no observation window: these tests are about the gates, not timing.
fn quick() -> Policy {
    Policy::default()
        .with_poll(Duration::from_millis(1), Duration::from_millis(2))
        .with_observation(Duration::ZERO, Duration::from_millis(5))
        .with_drain_timeout(Duration::from_millis(50))
}

/// A rollback target whose state is unknown (a host unreachable) is not taken as running the
/// release: it is deployed again (a no-op where it runs) before traffic goes back.
#[tokio::test]
async fn a_rollback_to_a_slot_of_unknown_state_redeploys_it() {
    let fakes = Fakes::new();
    let d = fakes.deployer_builder().policy(quick()).build().unwrap();
    d.deploy(Release::new("v1", "app").unwrap()).await.unwrap();
    d.deploy(Release::new("v2", "app").unwrap()).await.unwrap();
    // Kept warm: a plain rollback reuses it without a deploy.
    assert_eq!(fakes.instance_state(Slot::Blue), InstanceState::Running);
    let deploys = fakes.call_count(Op::EnvironmentDeploy);
    let d = partly_unknown_deployer(&fakes, Slot::Blue, 1);
    let report = d.rollback().await.unwrap();
    assert_eq!(report.version.as_str(), "v1");
    assert_eq!(
        fakes.call_count(Op::EnvironmentDeploy),
        deploys + 1,
        "the unknown slot was reused without a deploy"
    );
}

/// A target whose state stays unknown never passes the readiness gate: the run fails naming the
/// unreadable part, and live traffic is untouched.
#[tokio::test]
async fn a_target_of_unknown_state_fails_readiness_naming_the_unreadable_part() {
    let fakes = Fakes::new();
    fakes
        .deployer_builder()
        .policy(quick())
        .build()
        .unwrap()
        .deploy(Release::new("v1", "app").unwrap())
        .await
        .unwrap();
    let d = partly_unknown_deployer(&fakes, Slot::Green, u32::MAX);
    let err = d
        .deploy(Release::new("v2", "app").unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.phase(), Some(Phase::WaitReady), "{err}");
    assert_eq!(err.live_traffic(), Some(LiveTraffic::Untouched), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("h9") && text.contains("cannot reach the engine of h9"),
        "{text}"
    );
    assert_eq!(
        crate::TrafficSwitch::current(&fakes.switch())
            .await
            .unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );
}
