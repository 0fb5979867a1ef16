//! The traffic ledger and the statistical canary analysis, through the engine and the fakes.

use std::sync::Arc;
use std::time::Duration;

use bluegreen_core::ledger::{LatencyHistogram, SlotCounters, SwitchCounters};
use bluegreen_core::testkit::Fakes;
use bluegreen_core::*;
use tokio::sync::broadcast;

fn policy() -> Policy {
    Policy::default()
        .with_poll(Duration::from_millis(1), Duration::from_millis(5))
        .with_readiness_timeout(Duration::from_millis(300))
        .with_observation(Duration::ZERO, Duration::from_millis(5))
        .with_verify_timeout(Duration::from_millis(300))
        .with_drain_timeout(Duration::from_millis(50))
}

fn release(v: &str) -> Release {
    Release::new(v, "app").unwrap()
}

fn ms_hist(ms: u64, n: u64) -> LatencyHistogram {
    LatencyHistogram::from_buckets([(ms * 1000, n)])
}

/// Counters with `blue` / `green` requests, of which the given numbers of app 5xx, and a latency.
fn counters(blue: (u64, u64), green: (u64, u64)) -> SwitchCounters {
    SwitchCounters::new(
        SlotCounters::counted(blue.0, 0, 0, blue.1, 0).with_latency(ms_hist(1, blue.0)),
        SlotCounters::counted(green.0, 0, 0, green.1, 0).with_latency(ms_hist(1, green.0)),
    )
    .with_unrouted_5xx(0)
    .with_buffered(0)
}

/// Waits for `phase` to start (of any step), then a little, so the phase read its baseline.
async fn started(events: &mut broadcast::Receiver<DeployEvent>, phase: Phase) {
    loop {
        match events.recv().await.unwrap() {
            DeployEvent::PhaseStarted { phase: p, .. } if p == phase => break,
            _ => continue,
        }
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
}

#[tokio::test]
async fn a_switch_without_counters_says_not_measured_never_zero() {
    let fakes = Fakes::new();
    let d = fakes.deployer_builder().policy(policy()).build().unwrap();
    d.deploy(release("v1")).await.unwrap();
    let report = d.deploy(release("v2")).await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Live);
    let expected = TrafficLedger::not_measured("the switch fake-switch keeps no request counters");
    assert_eq!(report.ledger, expected);
    assert_eq!(report.ledger.dropped(), None, "not measured is not 0");
    assert_eq!(
        report.ledger.summary(),
        "traffic not measured: the switch fake-switch keeps no request counters"
    );
    let history = d.history().await.unwrap();
    assert_eq!(history.last().unwrap().ledger, expected);
}

#[tokio::test]
async fn the_ledger_is_what_the_switch_counted_from_start_to_end() {
    let fakes = Fakes::new();
    let d = fakes
        .deployer_builder()
        .policy(policy().with_promotion(Promotion::Manual))
        .build()
        .unwrap();
    d.deploy(release("v1")).await.unwrap();
    // Counters the proxy had before this deployment: they are not its traffic.
    fakes.set_counters(counters((100, 1), (0, 0)));
    let waiting = d.deploy(release("v2")).await.unwrap();
    assert!(matches!(
        waiting.outcome,
        RunOutcome::Waiting(Waiting::Gate)
    ));
    // What clients did while the deployment waited at the gate: 200 more requests to blue.
    fakes.set_counters(counters((300, 1), (0, 0)));
    let d = Arc::new(
        fakes
            .deployer_builder()
            .policy(
                policy()
                    .with_promotion(Promotion::Manual)
                    .with_observation(Duration::from_millis(300), Duration::from_millis(5)),
            )
            .build()
            .unwrap(),
    );
    let mut events = d.subscribe();
    let promote = tokio::spawn({
        let d = Arc::clone(&d);
        async move { d.promote().await }
    });
    // After the switch: 10 more to blue (in flight when it switched), 200 to green at 3 ms, 2 of
    // them app 5xx, 1 refused; 4 requests held by a pause, 1 answered 503 by the switch.
    started(&mut events, Phase::Observe).await;
    let mut after = SwitchCounters::new(
        SlotCounters::counted(310, 0, 0, 1, 0).with_latency(ms_hist(1, 310)),
        SlotCounters::counted(200, 1, 0, 2, 0)
            .with_latency(ms_hist(3, 200))
            .with_graceful_closes(3),
    )
    .with_unrouted_5xx(1)
    .with_buffered(4);
    after.slots.blue.refused = Some(0);
    fakes.set_counters(after);
    let report = promote.await.unwrap().unwrap();
    assert_eq!(report.outcome, RunOutcome::Live);
    let c = report.ledger.counts().expect("measured");
    assert_eq!(c.requests, PerSlot::new(210, 200));
    assert_eq!(
        (c.refused, c.timeouts, c.app_5xx, c.switch_5xx),
        (Some(1), Some(0), Some(2), Some(1))
    );
    assert_eq!(c.buffered, Some(4));
    assert_eq!(c.graceful_closes, Some(3));
    let lat = c.latency.expect("latency measured");
    assert_eq!(lat.before.unwrap().p99, Duration::from_millis(1));
    assert_eq!(lat.after.unwrap().p99, Duration::from_millis(3));
    assert_eq!(
        report.ledger.summary(),
        "410 requests, 4 dropped (1 refused, 2 app 5xx, 1 switch 5xx), 4 buffered, p99 +2.0 ms"
    );
    // The same ledger is in history, and survives the state file's round trip.
    let state = fakes.stored_state().unwrap();
    let entry = state.history.back().unwrap();
    assert_eq!(entry.ledger, report.ledger);
    let reloaded = DeploymentState::from_json("state", &state.to_json()).unwrap();
    assert_eq!(reloaded.history.back().unwrap().ledger, report.ledger);
}

#[tokio::test]
async fn a_failed_deploy_keeps_its_ledger_in_history() {
    let fakes = Fakes::new();
    let d = Arc::new(
        fakes
            .deployer_builder()
            .policy(policy().with_observation(Duration::from_millis(500), Duration::from_millis(5)))
            .analysis(Arc::new(StatisticalAnalysis::new().with_min_samples(1000)))
            .build()
            .unwrap(),
    );
    d.deploy(release("v1")).await.unwrap();
    fakes.set_counters(counters((0, 0), (0, 0)));
    let mut events = d.subscribe();
    let deploy = spawn_deploy(&d, "v2");
    started(&mut events, Phase::Observe).await;
    // Blue served 1000 with 10 errors before the switch; green 1000 with 30 after it.
    fakes.set_counters(counters((1000, 10), (1000, 30)));
    let err = deploy.await.unwrap().unwrap_err();
    assert_eq!(err.phase(), Some(Phase::Observe), "{err}");
    assert_eq!(err.live_traffic(), Some(LiveTraffic::RolledBack), "{err}");
    let entry = d.history().await.unwrap().pop().unwrap();
    assert!(matches!(entry.outcome, Outcome::Failed { .. }));
    let c = entry.ledger.counts().expect("measured");
    assert_eq!(c.requests, PerSlot::new(1000, 1000));
    assert_eq!(c.app_5xx, Some(40));
    assert_eq!(entry.ledger.dropped(), Some(40));
}

/// `d.deploy(version)` in a task, so the test can act while it runs.
fn spawn_deploy(d: &Arc<Deployer>, version: &str) -> tokio::task::JoinHandle<Result<Report>> {
    let (d, release) = (Arc::clone(d), release(version));
    tokio::spawn(async move { d.deploy(release).await })
}

fn canary_deployer(fakes: &Fakes, steps: Vec<CanaryStep>) -> Arc<Deployer> {
    Arc::new(
        fakes
            .deployer_builder()
            .policy(policy().with_canary(steps))
            .analysis(Arc::new(StatisticalAnalysis::new().with_min_samples(1000)))
            .build()
            .unwrap(),
    )
}

#[tokio::test]
async fn statistical_analysis_fails_a_canary_significantly_worse_than_stable() {
    let fakes = Fakes::new();
    let d = canary_deployer(
        &fakes,
        vec![CanaryStep::new(50, Duration::from_millis(400))],
    );
    d.deploy(release("v1")).await.unwrap();
    fakes.set_counters(counters((500, 0), (0, 0)));
    let mut events = d.subscribe();
    let deploy = spawn_deploy(&d, "v2");
    started(&mut events, Phase::Observe).await;
    // During the step: blue 1000 requests with 10 errors (1 %), green 1000 with 30 (3 %):
    // z = 3.19 (computed by hand in the unit tests) > 2.326.
    fakes.set_counters(counters((1500, 10), (1000, 30)));
    let err = deploy.await.unwrap().unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.phase(), Some(Phase::Observe), "{msg}");
    assert_eq!(err.live_traffic(), Some(LiveTraffic::RolledBack), "{msg}");
    assert!(msg.contains("statistical"), "names the analysis: {msg}");
    assert!(
        msg.contains("green 3.00% (30/1000) against blue 1.00% (10/1000): z = 3.19"),
        "{msg}"
    );
    assert_eq!(fakes.live(), Some(Slot::Blue));
}

#[tokio::test]
async fn statistical_analysis_waits_while_the_canary_has_too_few_requests() {
    let fakes = Fakes::new();
    let d = canary_deployer(
        &fakes,
        vec![CanaryStep::new(10, Duration::from_millis(100))],
    );
    d.deploy(release("v1")).await.unwrap();
    fakes.set_counters(counters((5000, 0), (0, 0)));
    let report = d.deploy(release("v2")).await.unwrap();
    match &report.outcome {
        RunOutcome::Waiting(Waiting::Inconclusive { reason }) => assert!(
            reason.contains("0 requests on green") && reason.contains("1000 each needed"),
            "{reason}"
        ),
        o => panic!("expected to wait for more evidence, got {o:?}"),
    }
    // Still 10 % on green, nothing lost: a person (or a later promote) decides.
    let split = fakes.switch().current().await.unwrap().unwrap();
    assert_eq!(split.weight(Slot::Green), 10);
}

#[tokio::test]
async fn statistical_analysis_passes_each_step_and_judges_100_percent_against_the_stable_history() {
    let fakes = Fakes::new();
    let d = canary_deployer(
        &fakes,
        vec![
            CanaryStep::new(50, Duration::from_millis(300)),
            CanaryStep::new(100, Duration::from_millis(300)),
        ],
    );
    d.deploy(release("v1")).await.unwrap();
    fakes.set_counters(counters((0, 0), (0, 0)));
    let mut events = d.subscribe();
    let deploy = spawn_deploy(&d, "v2");
    // Step 1 (50 %): 12/1000 against 10/1000, z = 0.43: pass.
    started(&mut events, Phase::Observe).await;
    fakes.set_counters(counters((1000, 10), (1000, 12)));
    // Step 2 (100 %): blue gets nothing during the step, so green is judged against blue's
    // traffic since the deployment started (1000 requests, 10 errors).
    started(&mut events, Phase::Observe).await;
    fakes.set_counters(counters((1000, 10), (2000, 24)));
    let mut verdicts = Vec::new();
    let report = loop {
        tokio::select! {
            ev = events.recv() => {
                if let Ok(DeployEvent::Analysis { verdict, .. }) = ev {
                    verdicts.push(verdict);
                }
            }
            done = async { while !deploy.is_finished() { tokio::time::sleep(Duration::from_millis(5)).await } } => {
                let () = done;
                break deploy.await.unwrap().unwrap();
            }
        }
    };
    assert_eq!(report.outcome, RunOutcome::Live, "{verdicts:?}");
    assert_eq!(fakes.live(), Some(Slot::Green));
    assert_eq!(verdicts.last().map(String::as_str), Some("pass"));
    let c = report.ledger.counts().unwrap();
    assert_eq!(c.requests, PerSlot::new(1000, 2000));
    assert_eq!(c.app_5xx, Some(34));
}

/// The fake switch, except that reading its counters fails (a proxy's admin API down, say).
#[derive(Debug)]
struct CountersFail(bluegreen_core::testkit::FakeSwitch);

#[async_trait::async_trait]
impl TrafficSwitch for CountersFail {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    async fn apply(&self, split: &TrafficSplit, endpoints: &Endpoints) -> Result<()> {
        self.0.apply(split, endpoints).await
    }
    async fn current(&self) -> Result<Option<TrafficSplit>> {
        self.0.current().await
    }
    async fn in_flight(&self, slot: Slot) -> Result<u64> {
        self.0.in_flight(slot).await
    }
    async fn counters(&self) -> Result<SwitchCounters> {
        Err(Error::backend(
            "fake-switch",
            "counters",
            true,
            "admin API unreachable",
        ))
    }
}

#[tokio::test]
async fn counters_that_cannot_be_read_never_fail_a_deploy_and_are_not_measured() {
    let fakes = Fakes::new();
    let d = fakes
        .deployer_builder()
        .switch(Arc::new(CountersFail(fakes.switch())))
        .policy(policy())
        .build()
        .unwrap();
    d.deploy(release("v1")).await.unwrap();
    let report = d.deploy(release("v2")).await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Live);
    assert_eq!(fakes.live(), Some(Slot::Green));
    match &report.ledger {
        TrafficLedger::NotMeasured { reason } => {
            assert!(
                reason.contains("reading the counters of the switch fake-switch failed")
                    && reason.contains("admin API unreachable"),
                "{reason}"
            );
        }
        l => panic!("expected not measured, got {l:?}"),
    }
    assert_eq!(report.ledger.dropped(), None);
}
