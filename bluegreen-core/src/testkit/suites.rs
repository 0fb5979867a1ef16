//! Conformance suites: free async functions every backend runs against its real service.
//!
//! Each checks the sentences of a trait's "Behavior" section and panics with a message naming the
//! backend and the broken promise. A check that cannot run (the suite lacks what it needs, e.g. a
//! [`SwitchSuite::served_by`] callback for the data path) does not pass silently: it prints
//! `skipped: <check>: <why>` to stderr and is listed in the [`SuiteReport`] the suite returns, so
//! a test can assert what ran.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::state::{DeploymentState, LockOwner};
use crate::traits::{
    DatabaseStrategy, DbContext, Environment, InstanceState, StateStore, TrafficSwitch,
};
use crate::types::{Endpoint, Endpoints, Release, Slot, TrafficSplit};

/// A boxed future, for suite callbacks.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Opens a fresh handle on the same proxy.
pub type ReopenFn = Arc<dyn Fn() -> BoxFuture<Box<dyn TrafficSwitch>> + Send + Sync>;

/// Sends one request through the data path; says which slot answered.
pub type ServedByFn = Arc<dyn Fn() -> BoxFuture<crate::Result<Slot>> + Send + Sync>;

/// Sends one request through the data path; says which endpoint answered, as its `host:port`
/// ([`Endpoint::authority`]).
pub type AnsweredByFn = Arc<dyn Fn() -> BoxFuture<crate::Result<String>> + Send + Sync>;

/// Checks a slot's data is intact.
pub type IntactFn = Arc<dyn Fn(Slot) -> BoxFuture<bool> + Send + Sync>;

// ---------------------------------------------------------------------------------------------
// Report

/// A check a suite could not run, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The check (`switch_current_reads_the_proxy`, `switch_apply_is_idempotent: data path`).
    pub check: String,
    /// Why it could not run (`no reopen callback`).
    pub why: String,
}

/// What a conformance suite (or one of its checks) ran and what it skipped.
///
/// Every check the suite ran without a panic is in [`ran`](Self::ran); every check it could not
/// run is in [`skipped`](Self::skipped) and was printed to stderr as `skipped: <check>: <why>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SuiteReport {
    backend: String,
    ran: Vec<String>,
    skipped: Vec<Skipped>,
}

impl SuiteReport {
    /// An empty report for `backend` (for a suite of your own built from these checks).
    pub fn new(backend: &str) -> Self {
        SuiteReport {
            backend: backend.to_string(),
            ..SuiteReport::default()
        }
    }

    /// The backend the suite ran against (its `name()`).
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// The checks that ran (and passed: a failed check panics).
    pub fn ran(&self) -> &[String] {
        &self.ran
    }

    /// The checks that could not run.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// Whether the check named `check` ran (`"switch_apply_is_idempotent: data path"`).
    pub fn has_run(&self, check: &str) -> bool {
        self.ran.iter().any(|c| c == check)
    }

    /// Whether a check whose name contains `what` was skipped (`"data path"`).
    pub fn was_skipped(&self, what: &str) -> bool {
        self.skipped.iter().any(|s| s.check.contains(what))
    }

    /// True if nothing was skipped.
    pub fn is_complete(&self) -> bool {
        self.skipped.is_empty()
    }

    /// Panics, naming every skipped check, unless every check ran.
    #[track_caller]
    pub fn assert_complete(&self) {
        assert!(
            self.is_complete(),
            "{}: the conformance suite skipped checks: {self}",
            self.backend
        );
    }

    /// Records that `check` ran.
    pub fn record_ran(&mut self, check: &str) {
        self.ran.push(check.to_string());
    }

    /// Records that `check` could not run, and prints `skipped: <check>: <why>` to stderr.
    pub fn record_skip(&mut self, check: &str, why: &str) {
        eprintln!("skipped: {check}: {why} (backend {})", self.backend);
        self.skipped.push(Skipped {
            check: check.to_string(),
            why: why.to_string(),
        });
    }

    /// The report of a switch check that ran, with its data-path part (if `data_path`) run or
    /// skipped as the suite allows.
    fn switch_check(
        switch: &dyn TrafficSwitch,
        suite: &SwitchSuite,
        check: &str,
        data_path: bool,
    ) -> Self {
        let mut r = SuiteReport::new(switch.name());
        r.record_ran(check);
        if data_path {
            let part = format!("{check}: data path");
            if suite.served_by.is_some() {
                r.record_ran(&part);
            } else {
                r.record_skip(
                    &part,
                    "no served_by callback, so no request went through the proxy",
                );
            }
        }
        r
    }

    /// Adds `other`'s checks to this report.
    pub fn merge(&mut self, other: SuiteReport) {
        self.ran.extend(other.ran);
        self.skipped.extend(other.skipped);
    }
}

impl std::fmt::Display for SuiteReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} checks ran", self.ran.len())?;
        if self.skipped.is_empty() {
            return f.write_str(", none skipped");
        }
        write!(f, "; skipped:")?;
        for (i, s) in self.skipped.iter().enumerate() {
            let sep = if i == 0 { " " } else { "; " };
            write!(f, "{sep}{} ({})", s.check, s.why)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Switch

/// What [`switch_suite`] needs besides the switch.
pub struct SwitchSuite {
    /// Reachable endpoints for both slots (at least one each).
    pub endpoints: Endpoints,
    /// Opens a second, fresh handle on the same proxy: proves `current` reads the proxy back.
    /// Without it [`switch_current_reads_the_proxy`] is skipped (and reported as skipped).
    pub reopen: Option<ReopenFn>,
    /// Sends one request through the switch's data path and says which slot answered. Without
    /// it the data-path checks are skipped (and reported as skipped).
    pub served_by: Option<ServedByFn>,
    /// Several reachable endpoints per slot (at least 3 for blue and 2 for green, none shared),
    /// for [`switch_routes_a_slot_to_several_endpoints`]. Without it that check is skipped (and
    /// reported as skipped).
    pub several: Option<Endpoints>,
    /// Sends one request through the switch's data path and says which endpoint answered.
    /// Without it the data-path part of [`switch_routes_a_slot_to_several_endpoints`] is skipped
    /// (and reported as skipped).
    pub answered_by: Option<AnsweredByFn>,
}

impl std::fmt::Debug for SwitchSuite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchSuite")
            .field("endpoints", &self.endpoints)
            .field("reopen", &self.reopen.is_some())
            .field("served_by", &self.served_by.is_some())
            .field("several", &self.several)
            .field("answered_by", &self.answered_by.is_some())
            .finish()
    }
}

impl SwitchSuite {
    /// A suite with these endpoints and no reopen / data-path callbacks.
    pub fn new(endpoints: Endpoints) -> Self {
        SwitchSuite {
            endpoints,
            reopen: None,
            served_by: None,
            several: None,
            answered_by: None,
        }
    }
}

async fn expect_current(switch: &dyn TrafficSwitch, want: &TrafficSplit, context: &str) {
    let got = switch
        .current()
        .await
        .unwrap_or_else(|e| panic!("{}: current() failed {context}: {e}", switch.name()));
    let got = got.unwrap_or_else(|| {
        panic!(
            "{}: current() is None {context}, expected {want}",
            switch.name()
        )
    });
    assert!(
        got.same_weights(want),
        "{}: current() reports {got} {context}, expected {want}",
        switch.name()
    );
}

async fn expect_served_by(suite: &SwitchSuite, name: &str, slot: Slot) {
    if let Some(probe) = &suite.served_by {
        for i in 0..5 {
            let got = probe()
                .await
                .unwrap_or_else(|e| panic!("{name}: request {i} through the switch failed: {e}"));
            assert_eq!(
                got, slot,
                "{name}: request {i} reached {got}, the split sends all traffic to {slot}"
            );
        }
    }
}

/// `apply` then `current` reads the same split back, and requests reach that slot.
pub async fn switch_apply_then_current_reads_back(
    switch: &dyn TrafficSwitch,
    suite: &SwitchSuite,
) -> SuiteReport {
    const CHECK: &str = "switch_apply_then_current_reads_back";
    for slot in [Slot::Blue, Slot::Green, Slot::Blue] {
        let split = TrafficSplit::all(slot);
        switch
            .apply(&split, &suite.endpoints)
            .await
            .unwrap_or_else(|e| panic!("{}: apply({split}) failed: {e}", switch.name()));
        expect_current(switch, &split, "after apply").await;
        expect_served_by(suite, switch.name(), slot).await;
    }
    SuiteReport::switch_check(switch, suite, CHECK, true)
}

/// Applying the same split twice changes nothing.
pub async fn switch_apply_is_idempotent(
    switch: &dyn TrafficSwitch,
    suite: &SwitchSuite,
) -> SuiteReport {
    let split = TrafficSplit::all(Slot::Green);
    for _ in 0..2 {
        switch
            .apply(&split, &suite.endpoints)
            .await
            .unwrap_or_else(|e| panic!("{}: repeated apply failed: {e}", switch.name()));
    }
    expect_current(switch, &split, "after applying the same split twice").await;
    expect_served_by(suite, switch.name(), Slot::Green).await;
    SuiteReport::switch_check(switch, suite, "switch_apply_is_idempotent", true)
}

/// A fresh handle on the same proxy reports what was applied (no cached answer).
pub async fn switch_current_reads_the_proxy(
    switch: &dyn TrafficSwitch,
    suite: &SwitchSuite,
) -> SuiteReport {
    const CHECK: &str = "switch_current_reads_the_proxy";
    let Some(reopen) = &suite.reopen else {
        let mut r = SuiteReport::new(switch.name());
        r.record_skip(
            CHECK,
            "no reopen callback, so no fresh handle could read the proxy back",
        );
        return r;
    };
    for slot in [Slot::Green, Slot::Blue] {
        let split = TrafficSplit::all(slot);
        switch.apply(&split, &suite.endpoints).await.unwrap();
        let other = reopen().await;
        expect_current(other.as_ref(), &split, "on a freshly opened handle").await;
    }
    SuiteReport::switch_check(switch, suite, CHECK, false)
}

/// Weighted splits work when declared, and are refused (nothing changed) when not.
pub async fn switch_weights_follow_capabilities(
    switch: &dyn TrafficSwitch,
    suite: &SwitchSuite,
) -> SuiteReport {
    let base = TrafficSplit::all(Slot::Blue);
    switch.apply(&base, &suite.endpoints).await.unwrap();
    let canary = TrafficSplit::canary(Slot::Green, 30).unwrap();
    let res = switch.apply(&canary, &suite.endpoints).await;
    if switch.capabilities().weights {
        res.unwrap_or_else(|e| panic!("{}: weighted apply failed: {e}", switch.name()));
        expect_current(switch, &canary, "after a weighted apply").await;
        switch.apply(&base, &suite.endpoints).await.unwrap();
    } else {
        assert!(
            matches!(res, Err(Error::Unsupported { .. })),
            "{}: declares no weights but a 70/30 apply returned {res:?}",
            switch.name()
        );
        expect_current(switch, &base, "after a refused weighted apply").await;
    }
    SuiteReport::switch_check(switch, suite, "switch_weights_follow_capabilities", false)
}

/// Sticky splits work when declared, and are refused (nothing changed) when not.
pub async fn switch_sticky_follows_capabilities(
    switch: &dyn TrafficSwitch,
    suite: &SwitchSuite,
) -> SuiteReport {
    let base = TrafficSplit::all(Slot::Blue);
    switch.apply(&base, &suite.endpoints).await.unwrap();
    let sticky = TrafficSplit::all(Slot::Green).with_sticky("bg_slot");
    let res = switch.apply(&sticky, &suite.endpoints).await;
    if switch.capabilities().sticky {
        res.unwrap_or_else(|e| panic!("{}: sticky apply failed: {e}", switch.name()));
        expect_current(switch, &sticky, "after a sticky apply").await;
        switch.apply(&base, &suite.endpoints).await.unwrap();
    } else {
        assert!(
            matches!(res, Err(Error::Unsupported { .. })),
            "{}: declares no sticky sessions but a sticky apply returned {res:?}",
            switch.name()
        );
        expect_current(switch, &base, "after a refused sticky apply").await;
    }
    SuiteReport::switch_check(switch, suite, "switch_sticky_follows_capabilities", false)
}

/// Invalid input (weight on a slot without endpoints, a hostile host name) is refused and the
/// proxy keeps its configuration.
pub async fn switch_refuses_invalid_input_and_keeps_config(
    switch: &dyn TrafficSwitch,
    suite: &SwitchSuite,
) -> SuiteReport {
    let base = TrafficSplit::all(Slot::Blue);
    switch.apply(&base, &suite.endpoints).await.unwrap();

    let mut no_green = suite.endpoints.clone();
    no_green.green.clear();
    let res = switch
        .apply(&TrafficSplit::all(Slot::Green), &no_green)
        .await;
    assert!(
        matches!(res, Err(Error::InvalidInput { .. })),
        "{}: weight on a slot without endpoints returned {res:?}",
        switch.name()
    );
    expect_current(switch, &base, "after refusing a split without endpoints").await;

    let mut hostile = suite.endpoints.clone();
    hostile.green = vec![Endpoint::new("evil;host\nset server x", 80)];
    let res = switch
        .apply(&TrafficSplit::all(Slot::Green), &hostile)
        .await;
    assert!(
        matches!(res, Err(Error::InvalidInput { .. })),
        "{}: a hostile endpoint host returned {res:?}",
        switch.name()
    );
    expect_current(switch, &base, "after refusing a hostile endpoint").await;
    expect_served_by(suite, switch.name(), Slot::Blue).await;
    SuiteReport::switch_check(
        switch,
        suite,
        "switch_refuses_invalid_input_and_keeps_config",
        true,
    )
}

/// Optional operations answer, or say `Unsupported`, exactly as the capabilities declare.
pub async fn switch_optional_operations_match_capabilities(
    switch: &dyn TrafficSwitch,
    suite: &SwitchSuite,
) -> SuiteReport {
    let caps = switch.capabilities();
    let name = switch.name().to_string();
    let check = |declared: bool, op: &str, res: crate::Result<()>| match (declared, res) {
        (true, Ok(())) => {}
        (true, Err(e)) => panic!("{name}: declares {op} but it failed: {e}"),
        (false, Err(Error::Unsupported { .. })) => {}
        (false, other) => {
            panic!("{name}: does not declare {op} but it answered {other:?} (expected Unsupported)")
        }
    };
    check(
        caps.drain,
        "in_flight",
        switch.in_flight(Slot::Blue).await.map(|_| ()),
    );
    check(
        caps.metrics,
        "metrics",
        switch.metrics(Slot::Blue).await.map(|_| ()),
    );
    check(
        caps.preview,
        "preview",
        switch.preview(Some(Slot::Green), &suite.endpoints).await,
    );
    if caps.preview {
        switch.preview(None, &suite.endpoints).await.unwrap();
    }
    check(caps.pause, "pause", switch.pause().await);
    if caps.pause {
        switch.resume().await.unwrap();
    }
    check(
        caps.close_long_lived,
        "long_lived",
        switch.long_lived(Slot::Blue).await.map(|_| ()),
    );
    SuiteReport::switch_check(
        switch,
        suite,
        "switch_optional_operations_match_capabilities",
        false,
    )
}

/// How many requests [`expect_spread`] sends at most per endpoint of the live slot.
const SPREAD_REQUESTS_PER_ENDPOINT: usize = 20;

/// Requests through the data path reach every endpoint of `live` (within a bounded number of
/// requests) and none other (the idle slot's, or one taken out of the live slot).
async fn expect_spread(suite: &SwitchSuite, name: &str, live: &[Endpoint], context: &str) {
    let Some(probe) = &suite.answered_by else {
        return;
    };
    let want: Vec<String> = live.iter().map(Endpoint::authority).collect();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..want.len() * SPREAD_REQUESTS_PER_ENDPOINT {
        let got = probe().await.unwrap_or_else(|e| {
            panic!("{name}: request {i} through the switch failed {context}: {e}")
        });
        assert!(
            want.contains(&got),
            "{name}: request {i} was answered by {got} {context}, but the live endpoints are \
             {want:?}"
        );
        seen.insert(got);
        if seen.len() == want.len() {
            return;
        }
    }
    panic!(
        "{name}: {} requests {context} reached only {seen:?} of the live endpoints {want:?}",
        want.len() * SPREAD_REQUESTS_PER_ENDPOINT
    );
}

/// A slot routed to several endpoints: every endpoint of the live slot serves and none of the
/// idle slot does; `current` reads the split back; a slot shrinks (the endpoint left out gets no
/// more requests) and grows again; with weights, a canary split over several endpoints per slot
/// reads back too. Leaves the switch at 100 % blue on [`SwitchSuite::endpoints`].
pub async fn switch_routes_a_slot_to_several_endpoints(
    switch: &dyn TrafficSwitch,
    suite: &SwitchSuite,
) -> SuiteReport {
    const CHECK: &str = "switch_routes_a_slot_to_several_endpoints";
    let name = switch.name().to_string();
    let Some(several) = &suite.several else {
        let mut r = SuiteReport::new(&name);
        r.record_skip(
            CHECK,
            "no several-endpoint slots (SwitchSuite::several), so only one endpoint per slot was \
             routed",
        );
        return r;
    };
    assert!(
        several.blue.len() >= 3 && several.green.len() >= 2,
        "{name}: SwitchSuite::several needs at least 3 blue and 2 green endpoints, got {} and {}",
        several.blue.len(),
        several.green.len()
    );
    let apply = |split: TrafficSplit, eps: Endpoints, context: &'static str| {
        let name = name.clone();
        async move {
            switch
                .apply(&split, &eps)
                .await
                .unwrap_or_else(|e| panic!("{name}: apply({split}) {context} failed: {e}"));
            expect_current(switch, &split, context).await;
        }
    };
    let blue = TrafficSplit::all(Slot::Blue);
    let green = TrafficSplit::all(Slot::Green);

    apply(
        blue.clone(),
        several.clone(),
        "with 3 blue and 2 green endpoints",
    )
    .await;
    expect_spread(suite, &name, &several.blue, "to blue's endpoints").await;
    if let Some(reopen) = &suite.reopen {
        let other = reopen().await;
        expect_current(
            other.as_ref(),
            &blue,
            "on a fresh handle, several endpoints",
        )
        .await;
    }

    apply(
        green.clone(),
        several.clone(),
        "switching to green's 2 endpoints",
    )
    .await;
    expect_spread(suite, &name, &several.green, "after switching to green").await;

    apply(
        blue.clone(),
        several.clone(),
        "switching back to blue's endpoints",
    )
    .await;
    expect_spread(suite, &name, &several.blue, "after switching back to blue").await;

    let mut shrunk = several.clone();
    shrunk.blue.pop();
    apply(blue.clone(), shrunk.clone(), "shrinking the live slot").await;
    expect_spread(
        suite,
        &name,
        &shrunk.blue,
        "after shrinking blue by one endpoint",
    )
    .await;

    apply(blue.clone(), several.clone(), "growing the live slot again").await;
    expect_spread(suite, &name, &several.blue, "after growing blue again").await;

    if switch.capabilities().weights {
        let canary = TrafficSplit::canary(Slot::Green, 30).unwrap();
        apply(
            canary,
            several.clone(),
            "with a 70/30 split over several endpoints",
        )
        .await;
    }
    switch
        .apply(&blue, &suite.endpoints)
        .await
        .unwrap_or_else(|e| panic!("{name}: back to one endpoint per slot failed: {e}"));
    expect_current(switch, &blue, "back to one endpoint per slot").await;

    let mut r = SuiteReport::new(&name);
    r.record_ran(CHECK);
    let part = format!("{CHECK}: data path");
    if suite.answered_by.is_some() {
        r.record_ran(&part);
    } else {
        r.record_skip(
            &part,
            "no answered_by callback, so no request through the proxy said which endpoint \
             answered",
        );
    }
    r
}

/// Runs every switch conformance check. Leaves the switch at 100 % blue. Returns which checks ran
/// and which were skipped (printed to stderr as they were): the data-path parts without
/// [`SwitchSuite::served_by`], [`switch_current_reads_the_proxy`] without
/// [`SwitchSuite::reopen`], [`switch_routes_a_slot_to_several_endpoints`] without
/// [`SwitchSuite::several`] (its data-path part without [`SwitchSuite::answered_by`]).
pub async fn switch_suite(switch: &dyn TrafficSwitch, suite: &SwitchSuite) -> SuiteReport {
    let mut report = SuiteReport::new(switch.name());
    report.merge(switch_apply_then_current_reads_back(switch, suite).await);
    report.merge(switch_apply_is_idempotent(switch, suite).await);
    report.merge(switch_current_reads_the_proxy(switch, suite).await);
    report.merge(switch_weights_follow_capabilities(switch, suite).await);
    report.merge(switch_sticky_follows_capabilities(switch, suite).await);
    report.merge(switch_refuses_invalid_input_and_keeps_config(switch, suite).await);
    report.merge(switch_optional_operations_match_capabilities(switch, suite).await);
    report.merge(switch_routes_a_slot_to_several_endpoints(switch, suite).await);
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &suite.endpoints)
        .await
        .unwrap();
    report
}

// ---------------------------------------------------------------------------------------------
// Environment

/// What [`environment_suite`] needs besides the environment.
pub struct EnvironmentSuite {
    /// Builds a runnable release labelled with the given version.
    pub release: Arc<dyn Fn(&str) -> Release + Send + Sync>,
    /// How long an instance may take from deploy to `Running`.
    pub ready_timeout: Duration,
    /// An argv that `exec` runs successfully in a running slot, if the backend supports exec.
    pub exec_argv: Option<Vec<String>>,
}

impl std::fmt::Debug for EnvironmentSuite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvironmentSuite")
            .field("ready_timeout", &self.ready_timeout)
            .field("exec_argv", &self.exec_argv)
            .finish()
    }
}

async fn wait_running(env: &dyn Environment, slot: Slot, version: &str, bound: Duration) {
    let start = Instant::now();
    loop {
        let st = env
            .status(slot)
            .await
            .unwrap_or_else(|e| panic!("{}: status({slot}) failed: {e}", env.name()));
        if st.state == InstanceState::Running {
            assert_eq!(
                st.version.as_ref().map(|v| v.as_str()),
                Some(version),
                "{}: slot {slot} runs the wrong version",
                env.name()
            );
            assert!(
                !st.endpoints.is_empty(),
                "{}: running slot {slot} reports no endpoints",
                env.name()
            );
            return;
        }
        assert!(
            st.state == InstanceState::Starting,
            "{}: slot {slot} is {:?} after deploy, expected starting or running",
            env.name(),
            st.state
        );
        assert!(
            start.elapsed() < bound,
            "{}: slot {slot} not running within {bound:?}",
            env.name()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn expect_not_up(env: &dyn Environment, slot: Slot, context: &str) {
    let st = env.status(slot).await.unwrap();
    assert!(
        !st.is_up(),
        "{}: slot {slot} is {:?} {context}",
        env.name(),
        st.state
    );
}

/// Runs every environment conformance check. Leaves both slots removed. Returns the checks that
/// ran (nothing is skipped: without [`EnvironmentSuite::exec_argv`], `exec` must answer
/// `Unsupported` or succeed, and that is checked instead).
pub async fn environment_suite(env: &dyn Environment, suite: &EnvironmentSuite) -> SuiteReport {
    let name = env.name().to_string();
    let mut report = SuiteReport::new(&name);
    // Removing and stopping absent slots is Ok.
    for slot in Slot::ALL {
        env.remove(slot)
            .await
            .unwrap_or_else(|e| panic!("{name}: remove({slot}) failed: {e}"));
        env.remove(slot)
            .await
            .unwrap_or_else(|e| panic!("{name}: removing an absent slot failed: {e}"));
        env.stop(slot, Duration::from_secs(1))
            .await
            .unwrap_or_else(|e| panic!("{name}: stopping an absent slot failed: {e}"));
        let st = env.status(slot).await.unwrap();
        assert_eq!(
            st.state,
            InstanceState::Absent,
            "{name}: {slot} after remove"
        );
    }

    // deploy returns endpoints and the slot runs the release.
    let v1 = (suite.release)("v1");
    let eps = env
        .deploy(Slot::Blue, &v1)
        .await
        .unwrap_or_else(|e| panic!("{name}: deploy(blue, v1) failed: {e}"));
    assert!(!eps.is_empty(), "{name}: deploy returned no endpoints");
    wait_running(env, Slot::Blue, "v1", suite.ready_timeout).await;
    assert_eq!(
        env.status(Slot::Green).await.unwrap().state,
        InstanceState::Absent,
        "{name}: deploying blue changed green"
    );

    // Deploying the same release again is idempotent.
    env.deploy(Slot::Blue, &v1)
        .await
        .unwrap_or_else(|e| panic!("{name}: redeploying the same release failed: {e}"));
    wait_running(env, Slot::Blue, "v1", suite.ready_timeout).await;

    // The other slot is independent.
    env.deploy(Slot::Green, &(suite.release)("v2"))
        .await
        .unwrap_or_else(|e| panic!("{name}: deploy(green, v2) failed: {e}"));
    wait_running(env, Slot::Green, "v2", suite.ready_timeout).await;
    wait_running(env, Slot::Blue, "v1", suite.ready_timeout).await;

    // A new release replaces the old one in the slot.
    env.deploy(Slot::Blue, &(suite.release)("v3"))
        .await
        .unwrap_or_else(|e| panic!("{name}: deploy(blue, v3) failed: {e}"));
    wait_running(env, Slot::Blue, "v3", suite.ready_timeout).await;

    report.record_ran("environment: remove, deploy, redeploy, replace, slots independent");

    // exec and logs: supported, or Unsupported; never another error.
    if let Some(argv) = &suite.exec_argv {
        let out = env
            .exec(Slot::Blue, argv)
            .await
            .unwrap_or_else(|e| panic!("{name}: exec({argv:?}) failed: {e}"));
        assert!(
            out.success(),
            "{name}: exec({argv:?}) exited {:?}",
            out.code
        );
        report.record_ran("environment: exec runs an argv in a running slot");
    } else {
        match env.exec(Slot::Blue, &["true".to_string()]).await {
            Err(Error::Unsupported { .. }) | Ok(_) => {}
            Err(e) => panic!("{name}: exec without support must be Unsupported, got {e}"),
        }
        report.record_ran("environment: exec is supported or Unsupported");
    }
    match env.logs(Slot::Blue, None).await {
        Ok(_) | Err(Error::Unsupported { .. }) => {}
        Err(e) => panic!("{name}: logs failed: {e}"),
    }
    report.record_ran("environment: logs are supported or Unsupported");

    // stop stops only that slot.
    env.stop(Slot::Blue, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{name}: stop(blue) failed: {e}"));
    expect_not_up(env, Slot::Blue, "after stop").await;
    wait_running(env, Slot::Green, "v2", suite.ready_timeout).await;
    env.stop(Slot::Blue, Duration::from_secs(1))
        .await
        .unwrap_or_else(|e| panic!("{name}: stopping a stopped slot failed: {e}"));

    for slot in Slot::ALL {
        env.remove(slot)
            .await
            .unwrap_or_else(|e| panic!("{name}: remove({slot}) failed: {e}"));
        assert_eq!(
            env.status(slot).await.unwrap().state,
            InstanceState::Absent,
            "{name}: {slot} after remove"
        );
    }
    report.record_ran("environment: stop and remove touch only their slot");
    report
}

// ---------------------------------------------------------------------------------------------
// Database

/// What [`database_suite`] needs besides the strategy.
pub struct DatabaseSuite {
    /// The release used in contexts.
    pub release: Release,
    /// Checks that the live side's data is intact (called after a rollback).
    pub live_intact: Option<IntactFn>,
}

impl std::fmt::Debug for DatabaseSuite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSuite")
            .field("release", &self.release.version)
            .finish()
    }
}

/// Runs every database-strategy conformance check: a first deploy to blue, then a deploy to green
/// that is rolled back (twice: rollback is idempotent) and prepared again (prepare is idempotent).
///
/// Returns the checks that ran; without [`DatabaseSuite::live_intact`] the check that a rollback
/// leaves the live side's data intact is skipped (and reported).
pub async fn database_suite(db: &dyn DatabaseStrategy, suite: &DatabaseSuite) -> SuiteReport {
    let name = db.name().to_string();
    let mut report = SuiteReport::new(&name);
    let first = DbContext {
        live: None,
        target: Slot::Blue,
        release: suite.release.clone(),
    };
    db.prepare(&first)
        .await
        .unwrap_or_else(|e| panic!("{name}: first prepare failed: {e}"));
    db.before_switch(&first)
        .await
        .unwrap_or_else(|e| panic!("{name}: before_switch failed: {e}"));
    db.after_switch(&first)
        .await
        .unwrap_or_else(|e| panic!("{name}: after_switch failed: {e}"));
    db.finalize(&first)
        .await
        .unwrap_or_else(|e| panic!("{name}: finalize failed: {e}"));
    report.record_ran("database: a first deploy runs every step");

    let second = DbContext {
        live: Some(Slot::Blue),
        target: Slot::Green,
        release: suite.release.clone(),
    };
    let p1 = db
        .prepare(&second)
        .await
        .unwrap_or_else(|e| panic!("{name}: prepare(green) failed: {e}"));
    let p2 = db
        .prepare(&second)
        .await
        .unwrap_or_else(|e| panic!("{name}: prepare is not idempotent: {e}"));
    assert_eq!(
        p1.binding.env, p2.binding.env,
        "{name}: a repeated prepare changed the binding"
    );
    let bound = db
        .bind(&second)
        .await
        .unwrap_or_else(|e| panic!("{name}: bind(green) failed: {e}"));
    assert_eq!(
        bound.env, p1.binding.env,
        "{name}: bind must give the binding prepare gave"
    );
    assert_eq!(
        bound.secret_env.keys().collect::<Vec<_>>(),
        p1.binding.secret_env.keys().collect::<Vec<_>>(),
        "{name}: bind must give the secrets prepare gave"
    );
    for (k, v) in &bound.secret_env {
        assert!(
            v.expose() == p1.binding.secret_env[k].expose(),
            "{name}: bind gave another value for the secret {k}"
        );
    }
    report.record_ran("database: bind gives the binding prepare gave");
    db.rollback(&second)
        .await
        .unwrap_or_else(|e| panic!("{name}: rollback failed: {e}"));
    db.rollback(&second)
        .await
        .unwrap_or_else(|e| panic!("{name}: a second rollback failed: {e}"));
    report.record_ran("database: prepare and rollback are idempotent");
    const INTACT: &str = "database: rollback leaves the live side intact";
    if let Some(check) = &suite.live_intact {
        assert!(
            check(Slot::Blue).await,
            "{name}: rollback damaged the live side"
        );
        report.record_ran(INTACT);
    } else {
        report.record_skip(INTACT, "no live_intact callback to inspect the live data");
    }
    report
}

// ---------------------------------------------------------------------------------------------
// State store

/// Runs every state-store conformance check. `open` returns a new handle on the same, initially
/// empty, store each time it is called (as two operators' machines would have).
///
/// Returns the checks that ran (nothing is ever skipped).
pub async fn state_store_suite(
    open: &(dyn Fn() -> Arc<dyn StateStore> + Send + Sync),
) -> SuiteReport {
    let a = open();
    let b = open();
    let name = a.name().to_string();
    let mut report = SuiteReport::new(&name);

    // Empty store; fenced CAS save; conflicts.
    assert!(
        a.load().await.unwrap().is_none(),
        "{name}: a fresh store must load None"
    );
    let ttl = Duration::from_secs(30);
    let writer = a
        .acquire(&LockOwner::current("saves"), ttl)
        .await
        .unwrap_or_else(|e| panic!("{name}: acquire failed: {e}"));
    let mut s = DeploymentState::default();
    let r1 = a
        .save(&s, &writer)
        .await
        .unwrap_or_else(|e| panic!("{name}: first save failed: {e}"));
    assert_eq!(r1, 1, "{name}: first save must return revision 1");
    let loaded = b.load().await.unwrap().expect("saved state loads");
    assert_eq!(loaded.revision, 1, "{name}: loaded revision");
    s.revision = r1;
    s.last_id = 7;
    // The lease is the store's, not the handle's: another handle saves with it too.
    let r2 = b.save(&s, &writer).await.unwrap();
    assert_eq!(r2, 2);
    let stale = DeploymentState {
        revision: 1,
        ..DeploymentState::default()
    };
    match a.save(&stale, &writer).await {
        Err(Error::Conflict {
            expected: 1,
            found: 2,
        }) => {}
        other => panic!("{name}: a stale save must be a Conflict, got {other:?}"),
    }
    assert_eq!(
        a.load().await.unwrap().unwrap().last_id,
        7,
        "{name}: stale save changed the state"
    );
    a.release(&writer).await.unwrap();
    report.record_ran("state store: compare-and-swap saves");

    // Fencing: a save is refused unless its lease is the one held now, unexpired.
    let current = DeploymentState {
        revision: 2,
        ..DeploymentState::default()
    };
    match a.save(&current, &writer).await {
        Err(Error::LockLost { .. }) => {}
        other => panic!("{name}: a save with a released lease must be LockLost, got {other:?}"),
    }
    let first = a.acquire(&LockOwner::current("first"), ttl).await.unwrap();
    assert!(
        first.epoch > writer.epoch,
        "{name}: epochs must grow ({} then {})",
        writer.epoch,
        first.epoch
    );
    let broken = b.break_lock().await.unwrap().expect("a lock to break");
    assert!(broken.same_lease(&first));
    match a.save(&current, &first).await {
        Err(Error::LockLost { .. }) => {}
        other => panic!("{name}: a save with a broken lease must be LockLost, got {other:?}"),
    }
    let second = b.acquire(&LockOwner::current("second"), ttl).await.unwrap();
    assert!(
        second.epoch > first.epoch,
        "{name}: epochs must grow after a break ({} then {})",
        first.epoch,
        second.epoch
    );
    match a.save(&current, &first).await {
        Err(Error::LockLost { .. }) => {}
        other => panic!("{name}: a save with an older epoch must be LockLost, got {other:?}"),
    }
    b.save(&current, &second).await.unwrap();
    b.release(&second).await.unwrap();
    let brief = a
        .acquire(&LockOwner::current("brief"), Duration::from_millis(150))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let after = DeploymentState {
        revision: 3,
        ..DeploymentState::default()
    };
    match a.save(&after, &brief).await {
        Err(Error::LockLost { .. }) => {}
        other => panic!("{name}: a save with an expired lease must be LockLost, got {other:?}"),
    }
    a.break_lock().await.unwrap();
    assert_eq!(
        b.load().await.unwrap().unwrap().revision,
        3,
        "{name}: a refused save changed the state"
    );
    report.record_ran("state store: saves fenced by the lease epoch");

    // Exclusive lock naming its holder.
    let alice = LockOwner::current("deploy v1 (alice)");
    let bob = LockOwner::current("deploy v2 (bob)");
    let lease = a.acquire(&alice, ttl).await.unwrap();
    match b.acquire(&bob, ttl).await {
        Err(Error::Locked { holder }) => {
            assert_eq!(holder.owner, alice, "{name}: Locked must name the holder");
            assert!(Error::Locked { holder }.to_string().contains("alice"));
        }
        other => panic!("{name}: a held lock must refuse a second locker, got {other:?}"),
    }
    let renewed = a.renew(&lease, ttl).await.unwrap();
    assert!(
        renewed.expires >= lease.expires,
        "{name}: renew must extend"
    );
    assert_eq!(b.lock_info().await.unwrap().unwrap().owner, alice);
    a.release(&renewed).await.unwrap();
    assert!(
        b.lock_info().await.unwrap().is_none(),
        "{name}: released lock still shown"
    );

    // Expiry: an expired lock is taken over; the old holder's lease is dead.
    let short = a.acquire(&alice, Duration::from_millis(200)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    let taken = b
        .acquire(&bob, ttl)
        .await
        .unwrap_or_else(|e| panic!("{name}: an expired lock must be taken over, got {e}"));
    match a.renew(&short, ttl).await {
        Err(Error::LockLost { .. }) => {}
        other => panic!("{name}: renewing a taken-over lease must be LockLost, got {other:?}"),
    }
    a.release(&short).await.unwrap();
    assert_eq!(
        a.lock_info().await.unwrap().unwrap().owner,
        bob,
        "{name}: releasing a dead lease freed someone else's lock"
    );

    // break_lock removes it whoever holds it.
    let broken = a.break_lock().await.unwrap().expect("a lock to break");
    assert_eq!(broken.token, taken.token);
    assert!(a.lock_info().await.unwrap().is_none());
    match b.renew(&taken, ttl).await {
        Err(Error::LockLost { .. }) => {}
        other => panic!("{name}: renewing a broken lease must be LockLost, got {other:?}"),
    }

    report.record_ran("state store: an exclusive lock that expires and can be broken");

    // Two concurrent lockers: exactly one wins, every round.
    for round in 0..10 {
        let (x, y) = (open(), open());
        let ox = LockOwner::current(format!("x{round}"));
        let oy = LockOwner::current(format!("y{round}"));
        let (rx, ry) = tokio::join!(
            tokio::spawn(async move { x.acquire(&ox, ttl).await }),
            tokio::spawn(async move { y.acquire(&oy, ttl).await })
        );
        let (rx, ry) = (rx.unwrap(), ry.unwrap());
        let winners = [&rx, &ry].iter().filter(|r| r.is_ok()).count();
        assert_eq!(winners, 1, "{name}: round {round}: {rx:?} / {ry:?}");
        for r in [rx, ry] {
            match r {
                Ok(lease) => a.release(&lease).await.unwrap(),
                Err(Error::Locked { .. }) => {}
                Err(e) => panic!("{name}: the loser must see Locked, got {e}"),
            }
        }
    }
    report.record_ran("state store: one of two concurrent lockers wins");
    report
}
