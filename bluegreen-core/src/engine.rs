//! The deployment engine: a persisted state machine that reads like the runbook.
//!
//! A deploy runs the [`Phase`]s in order. Before each phase the state is saved with that phase, so a
//! crash leaves a record of exactly where the deployment stopped; a new [`Deployer`] on the same
//! store finishes it (traffic already moved) or undoes it (traffic never moved) and never switches
//! twice. Any failure before the switch leaves live traffic untouched and removes the target; any
//! failure after it switches back first. After an irreversible database step the engine does not
//! roll back on its own: it stops and asks (`promote` / `abort`).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tracing::Instrument;

use crate::analysis::{Analysis, AnalysisContext, DataPathProbe, Verdict};
use crate::error::{Error, LiveTraffic, Result};
use crate::events::DeployEvent;
use crate::policy::{CanaryStep, KeepOld, OnTimeout, Policy, Promotion, Resume};
use crate::state::{
    DeploymentState, HistoryEntry, InFlight, Lease, LockInfo, LockOwner, Outcome, Phase, RunKind,
    SlotRecord, Timestamp, Waiting,
};
use crate::traits::{
    DatabaseStrategy, DbBinding, DbContext, DbStep, Environment, HealthCheck, Hook, HookContext,
    HookPoint, InstanceState, Prepared, Reversibility, SlotStatus, StateStore, TrafficSwitch,
};
use crate::types::{Endpoint, Endpoints, PerSlot, Release, Slot, TrafficSplit, Version};
use crate::HookOptions;

/// A phase failure: the backend that failed and the error.
type Failure = (String, Error);
type PhaseResult<T> = std::result::Result<T, Failure>;

trait By<T> {
    fn by(self, backend: &str) -> PhaseResult<T>;
}

impl<T> By<T> for Result<T> {
    fn by(self, backend: &str) -> PhaseResult<T> {
        self.map_err(|e| (backend.to_string(), e))
    }
}

/// What a phase asks the loop to do next.
enum Step {
    Next(Phase),
    Skip(&'static str, Phase),
    Wait(Waiting),
    Done,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The release is live.
    Live,
    /// Paused for a person: `promote` or `abort`.
    Waiting(Waiting),
    /// Undone; the previous slot serves (used by `abort` and crash recovery).
    RolledBack,
}

/// The result of a run that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Deployment id.
    pub id: u64,
    /// Deploy or rollback.
    pub kind: RunKind,
    /// The release's version.
    pub version: Version,
    /// The slot it targeted.
    pub target: Slot,
    /// How it ended.
    pub outcome: RunOutcome,
    /// Time taken by this call.
    pub elapsed: Duration,
}

/// One step of a [`Plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStep {
    /// The phase.
    pub phase: Phase,
    /// The backend acting.
    pub backend: String,
    /// What it would do.
    pub action: String,
}

/// A dry run: what `deploy` would do, changing nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Plan {
    /// The slot that would receive the release.
    pub target: Slot,
    /// The live slot.
    pub previous: Option<Slot>,
    /// The steps, in order.
    pub steps: Vec<PlannedStep>,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.steps.iter().enumerate() {
            writeln!(
                f,
                "{:>2}. {:<24} {:<16} {}",
                i + 1,
                s.phase,
                s.backend,
                s.action
            )?;
        }
        Ok(())
    }
}

/// What [`Deployer::status`] reports.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StatusReport {
    /// The persisted state.
    pub state: DeploymentState,
    /// What the environment says about each slot.
    pub slots: PerSlot<SlotStatus>,
    /// The split the switch really has.
    pub switch: Option<TrafficSplit>,
    /// The deployment lock, if held.
    pub lock: Option<LockInfo>,
    /// Differences between the recorded state and the backends (empty when consistent).
    pub drift: Vec<String>,
}

struct RegisteredHook {
    point: HookPoint,
    hook: Arc<dyn Hook>,
    options: HookOptions,
}

struct Inner {
    environment: Arc<dyn Environment>,
    switch: Arc<dyn TrafficSwitch>,
    database: Option<Arc<dyn DatabaseStrategy>>,
    health_checks: Vec<Arc<dyn HealthCheck>>,
    hooks: Vec<RegisteredHook>,
    analyses: Vec<Arc<dyn Analysis>>,
    probe: Option<Arc<dyn DataPathProbe>>,
    store: Arc<dyn StateStore>,
    policy: Policy,
    events: broadcast::Sender<DeployEvent>,
    interrupted: std::sync::atomic::AtomicBool,
}

/// Runs blue-green deployments over one environment, one switch, an optional database strategy
/// and a state store. Cheap to clone.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use bluegreen_core::{Deployer, Policy, Release, Slot};
/// use bluegreen_core::testkit::Fakes;
///
/// let fakes = Fakes::new();
/// let deployer = Deployer::builder()
///     .environment(Arc::new(fakes.environment()))
///     .switch(Arc::new(fakes.switch()))
///     .store(Arc::new(fakes.store()))
///     .health_check(Arc::new(fakes.health_check()))
///     .policy(Policy::default().with_observation(Duration::ZERO, Duration::from_millis(10)))
///     .build()
///     .unwrap();
///
/// deployer.deploy(Release::new("v1", "app").unwrap()).await.unwrap();
/// deployer.deploy(Release::new("v2", "app").unwrap()).await.unwrap();
/// assert_eq!(fakes.live(), Some(Slot::Green));
/// deployer.rollback().await.unwrap();
/// assert_eq!(fakes.live(), Some(Slot::Blue));
/// # });
/// ```
#[derive(Clone)]
pub struct Deployer {
    inner: Arc<Inner>,
}

impl fmt::Debug for Deployer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deployer")
            .field("environment", &self.inner.environment.name())
            .field("switch", &self.inner.switch.name())
            .field(
                "database",
                &self.inner.database.as_ref().map(|d| d.name().to_string()),
            )
            .field("store", &self.inner.store.name())
            .field("policy", &self.inner.policy)
            .finish()
    }
}

/// Builds a [`Deployer`]. Environment, switch and store are required.
#[derive(Default)]
pub struct DeployerBuilder {
    environment: Option<Arc<dyn Environment>>,
    switch: Option<Arc<dyn TrafficSwitch>>,
    database: Option<Arc<dyn DatabaseStrategy>>,
    health_checks: Vec<Arc<dyn HealthCheck>>,
    hooks: Vec<RegisteredHook>,
    analyses: Vec<Arc<dyn Analysis>>,
    probe: Option<Arc<dyn DataPathProbe>>,
    store: Option<Arc<dyn StateStore>>,
    policy: Policy,
}

impl fmt::Debug for DeployerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeployerBuilder")
    }
}

impl DeployerBuilder {
    /// Where releases run.
    pub fn environment(mut self, e: Arc<dyn Environment>) -> Self {
        self.environment = Some(e);
        self
    }
    /// What moves traffic.
    pub fn switch(mut self, s: Arc<dyn TrafficSwitch>) -> Self {
        self.switch = Some(s);
        self
    }
    /// How the slots use the database (none: the slots share nothing the engine manages).
    pub fn database(mut self, d: Arc<dyn DatabaseStrategy>) -> Self {
        self.database = Some(d);
        self
    }
    /// Adds a readiness / observation health check (all must pass).
    pub fn health_check(mut self, c: Arc<dyn HealthCheck>) -> Self {
        self.health_checks.push(c);
        self
    }
    /// Adds a hook at `point` with default options (5 min timeout, fail on timeout).
    pub fn hook(self, point: HookPoint, hook: Arc<dyn Hook>) -> Self {
        self.hook_with(point, hook, HookOptions::default())
    }
    /// Adds a hook at `point` with options.
    pub fn hook_with(
        mut self,
        point: HookPoint,
        hook: Arc<dyn Hook>,
        options: HookOptions,
    ) -> Self {
        self.hooks.push(RegisteredHook {
            point,
            hook,
            options,
        });
        self
    }
    /// Adds a post-switch analysis.
    pub fn analysis(mut self, a: Arc<dyn Analysis>) -> Self {
        self.analyses.push(a);
        self
    }
    /// Proves each full switch through the data path with this probe.
    pub fn verify_data_path(mut self, p: Arc<dyn DataPathProbe>) -> Self {
        self.probe = Some(p);
        self
    }
    /// Where state and the lock live.
    pub fn store(mut self, s: Arc<dyn StateStore>) -> Self {
        self.store = Some(s);
        self
    }
    /// Pacing and judgement.
    pub fn policy(mut self, p: Policy) -> Self {
        self.policy = p;
        self
    }

    /// Builds, checking that the required parts are there and the policy is coherent.
    pub fn build(self) -> Result<Deployer> {
        self.policy.validate()?;
        let missing = |what: &'static str| {
            Error::invalid("deployer", what, format!("no {what} given to the builder"))
        };
        let (events, _) = broadcast::channel(1024);
        Ok(Deployer {
            inner: Arc::new(Inner {
                environment: self.environment.ok_or_else(|| missing("environment"))?,
                switch: self.switch.ok_or_else(|| missing("switch"))?,
                store: self.store.ok_or_else(|| missing("store"))?,
                database: self.database,
                health_checks: self.health_checks,
                hooks: self.hooks,
                analyses: self.analyses,
                probe: self.probe,
                policy: self.policy,
                events,
                interrupted: Default::default(),
            }),
        })
    }
}

/// Holds the lock's lease and renews it in the background while a run lasts.
struct LeaseKeeper {
    store: Arc<dyn StateStore>,
    lease: Lease,
    lost: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    async fn acquire(
        store: Arc<dyn StateStore>,
        owner: LockOwner,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Self> {
        let deadline = Instant::now() + wait;
        let lease = loop {
            match store.acquire(&owner, ttl).await {
                Ok(l) => break l,
                Err(Error::Locked { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200).min(ttl / 4)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let lost = Arc::new(Mutex::new(None));
        let task = {
            let (store, lease, lost) = (store.clone(), lease.clone(), lost.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    match store.renew(&lease, ttl).await {
                        Ok(_) => {}
                        Err(e @ Error::LockLost { .. }) => {
                            *lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "renewing the deployment lock failed; retrying")
                        }
                    }
                }
            })
        };
        Ok(LeaseKeeper {
            store,
            lease,
            lost,
            task,
        })
    }

    fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn release(self) {
        self.task.abort();
        if let Err(e) = self.store.release(&self.lease).await {
            tracing::warn!(error = %e, "releasing the deployment lock failed; it expires on its own");
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One locked run over the state.
struct Run<'a> {
    d: &'a Inner,
    state: DeploymentState,
    lease: Option<LeaseKeeper>,
    binding: Option<DbBinding>,
    started: Instant,
    recovered: bool,
    previewing: bool,
    paused: bool,
}

impl Deployer {
    /// Starts building a deployer.
    pub fn builder() -> DeployerBuilder {
        DeployerBuilder::default()
    }

    /// Receives every [`DeployEvent`] from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<DeployEvent> {
        self.inner.events.subscribe()
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// Asks the run in progress (in this process) to stop at the next safe point — a phase boundary,
    /// or between health polls — and roll back as for a failure ([`Error::Interrupted`]). For a
    /// Ctrl-C handler: the state stays consistent.
    pub fn interrupt(&self) {
        self.inner
            .interrupted
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    async fn begin(&self, purpose: String) -> Result<Run<'_>> {
        let d = &*self.inner;
        d.interrupted
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let lease = LeaseKeeper::acquire(
            d.store.clone(),
            LockOwner::current(purpose),
            d.policy.lock_ttl,
            d.policy.lock_wait,
        )
        .await?;
        let state = match d.store.load().await {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => {
                lease.release().await;
                return Err(e);
            }
        };
        Ok(Run {
            d,
            state,
            lease: Some(lease),
            binding: None,
            started: Instant::now(),
            recovered: false,
            previewing: false,
            paused: false,
        })
    }

    /// Deploys `release` to the idle slot and switches traffic to it.
    ///
    /// A deployment found in flight from a crashed run is recovered first (see [`Deployer::recover`]);
    /// one waiting for a person is refused with [`Error::InFlight`].
    ///
    /// # Errors
    /// [`Error::Phase`] naming the phase, the backend and what happened to live traffic; before it
    /// starts, [`Error::Locked`], [`Error::InFlight`] or [`Error::MissingCapability`].
    pub async fn deploy(&self, release: Release) -> Result<Report> {
        let mut run = self.begin(format!("deploy {}", release.version)).await?;
        let res = async {
            run.recover_if_crashed().await?;
            let (target, previous) = run.plan_target();
            run.check_capabilities(RunKind::Deploy)?;
            run.start(RunKind::Deploy, release, target, previous, false)
                .await?;
            run.drive().await
        }
        .await;
        run.finish(res).await
    }

    /// Switches back to the previous release: in seconds if its slot is still warm, otherwise by
    /// redeploying it. Runs the same health gate and verification as a deploy, without canary
    /// steps or the manual gate.
    pub async fn rollback(&self) -> Result<Report> {
        let mut run = self.begin("rollback".into()).await?;
        let res = async {
            run.recover_if_crashed().await?;
            let Some(active) = run.state.active else {
                return Err(Error::NothingToRollBack {
                    reason: "nothing has been deployed yet".into(),
                });
            };
            let target = active.other();
            let Some(release) = run
                .state
                .slots
                .get(target)
                .as_ref()
                .map(|r| r.release.clone())
                .or_else(|| run.state.previous_release.clone())
            else {
                return Err(Error::NothingToRollBack {
                    reason: format!("slot {target} holds no previous release and none is recorded"),
                });
            };
            let status = run
                .d
                .environment
                .status(target)
                .await
                .map_err(|e| run.wrap(Phase::Plan, run.d.environment.name(), e))?;
            let warm = status.state == InstanceState::Running
                && status.version.as_ref() == Some(&release.version);
            let recorded = run
                .state
                .slots
                .get(target)
                .as_ref()
                .map(|r| r.endpoints.clone());
            run.start(RunKind::Rollback, release, target, Some(active), warm)
                .await?;
            if warm {
                let eps = if status.endpoints.is_empty() {
                    recorded.unwrap_or_default()
                } else {
                    status.endpoints
                };
                run.flight_mut().endpoints = eps;
            }
            run.drive().await
        }
        .await;
        run.finish(res).await
    }

    /// Continues a deployment waiting for a person (gate, inconclusive analysis, manual canary
    /// step, or a decision after an irreversible step: then the failed phase is tried again).
    pub async fn promote(&self) -> Result<Report> {
        let mut run = self.begin("promote".into()).await?;
        let res = async {
            let Some(f) = run.state.in_flight.as_mut() else {
                return Err(Error::invalid("promote", "", "no deployment is waiting"));
            };
            let Some(waiting) = f.waiting.take() else {
                return Err(Error::invalid(
                    "promote",
                    f.phase.to_string(),
                    "the deployment in flight is not waiting for promotion",
                ));
            };
            let next = match waiting {
                Waiting::Gate if f.phase == Phase::Gate => Phase::DatabaseBeforeSwitch,
                Waiting::Gate | Waiting::Inconclusive { .. } => run.after_observe(),
                Waiting::Decision { .. } => run.flight().phase,
            };
            run.flight_mut().phase = next;
            run.drive().await
        }
        .await;
        run.finish(res).await
    }

    /// Rolls back the deployment in flight (waiting, or left by a crash): traffic back to the
    /// previous slot if it had moved, target removed, database rolled back.
    pub async fn abort(&self) -> Result<Report> {
        let mut run = self.begin("abort".into()).await?;
        let res = async {
            if run.state.in_flight.is_none() {
                return Err(Error::invalid("abort", "", "no deployment is in flight"));
            }
            let phase = run.flight().phase;
            let (live, cleanup) = run
                .undo("aborted by request".into(), phase, Outcome::Aborted)
                .await;
            if live == LiveTraffic::Affected {
                return Err(Error::NeedsDecision {
                    reason: format!(
                        "abort could not switch traffic back: {}",
                        cleanup.join("; ")
                    ),
                });
            }
            Ok(run.report_last(RunOutcome::RolledBack))
        }
        .await;
        run.finish(res).await
    }

    /// Recovers a deployment left in flight by a crashed run, from its saved phase: finishes it if
    /// traffic had moved, otherwise undoes it (or continues, with [`Resume::Continue`]). Returns
    /// `None` when nothing needed recovery. Never switches twice.
    pub async fn recover(&self) -> Result<Option<Report>> {
        let mut run = self.begin("recover".into()).await?;
        let res = run.recover_if_crashed().await;
        run.finish(res).await
    }

    /// A dry run of `deploy(release)`: every step and what each backend would change. Reads the
    /// backends; changes nothing (no lock is taken).
    pub async fn plan(&self, release: &Release) -> Result<Plan> {
        let d = &*self.inner;
        let state = d.store.load().await?.unwrap_or_default();
        if let Some(f) = &state.in_flight {
            return Err(Error::InFlight {
                id: f.id,
                phase: f.phase,
            });
        }
        let run = Run {
            d,
            state,
            lease: None,
            binding: None,
            started: Instant::now(),
            recovered: false,
            previewing: false,
            paused: false,
        };
        run.check_capabilities(RunKind::Deploy)?;
        let (target, previous) = run.plan_target();
        let current = d.switch.current().await?;
        let target_status = d.environment.status(target).await?;
        let p = &d.policy;
        let mut steps = Vec::new();
        let mut add = |phase: Phase, backend: &str, action: String| {
            steps.push(PlannedStep {
                phase,
                backend: backend.to_string(),
                action,
            })
        };
        add(
            Phase::Plan,
            d.store.name(),
            format!(
                "lock, save deployment #{} targeting {target}",
                run.state.last_id + 1
            ),
        );
        if let Some(db) = &d.database {
            add(
                Phase::PrepareDatabase,
                db.name(),
                format!("prepare the database of {target}"),
            );
        }
        for h in d
            .hooks
            .iter()
            .filter(|h| h.point == HookPoint::BeforeDeploy)
        {
            add(
                Phase::BeforeDeployHook,
                h.hook.name(),
                "run before_deploy hook".into(),
            );
        }
        let replaces = match (&target_status.state, &target_status.version) {
            (InstanceState::Absent, _) => String::new(),
            (st, Some(v)) => format!(", replacing {v} ({st:?})"),
            (st, None) => format!(", replacing what is there ({st:?})"),
        };
        add(
            Phase::DeployTarget,
            d.environment.name(),
            format!("deploy {} to {target}{replaces}", release.version),
        );
        let checks = if d.health_checks.is_empty() {
            "the platform's status".to_string()
        } else {
            d.health_checks
                .iter()
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        add(
            Phase::WaitReady,
            d.environment.name(),
            format!(
                "wait for {} passing rounds of {checks} (≤ {:?})",
                p.rise, p.readiness_timeout
            ),
        );
        for h in d.hooks.iter().filter(|h| h.point == HookPoint::AfterDeploy) {
            add(
                Phase::AfterDeployHook,
                h.hook.name(),
                "run after_deploy hook".into(),
            );
        }
        if p.preview {
            add(
                Phase::Preview,
                d.switch.name(),
                format!("route preview traffic to {target}"),
            );
        }
        for h in d
            .hooks
            .iter()
            .filter(|h| h.point == HookPoint::BeforeSwitch)
        {
            add(Phase::SmokeTest, h.hook.name(), "run smoke test".into());
        }
        if p.promotion == Promotion::Manual {
            add(Phase::Gate, "engine", "wait for promote".into());
        }
        if let Some(db) = &d.database {
            add(
                Phase::DatabaseBeforeSwitch,
                db.name(),
                "database cutover".into(),
            );
        }
        let from = current
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_else(|| "nothing".into());
        for s in run.steps() {
            let split = run.step_split(target, s.weight);
            add(
                Phase::Switch,
                d.switch.name(),
                format!("{from} → {split}, then read back"),
            );
            if let Some(probe) = d.probe.as_ref().filter(|_| split.is_whole()) {
                add(
                    Phase::VerifyDataPath,
                    probe.name(),
                    format!("requests reach {}", release.version),
                );
            }
            if !s.hold.is_zero() {
                add(
                    Phase::Observe,
                    "engine",
                    format!("observe {target} for {:?}", s.hold),
                );
            }
        }
        if let Some(db) = &d.database {
            add(
                Phase::DatabaseAfterSwitch,
                db.name(),
                "after-switch step".into(),
            );
        }
        for h in d.hooks.iter().filter(|h| h.point == HookPoint::AfterSwitch) {
            add(
                Phase::AfterSwitchHook,
                h.hook.name(),
                "run after_switch hook".into(),
            );
        }
        if let Some(prev) = previous {
            let action = match p.keep_old {
                KeepOld::Warm => format!("drain {prev}, keep it warm for rollback"),
                KeepOld::Stop => format!("drain and stop {prev}"),
            };
            add(Phase::DrainOld, d.environment.name(), action);
        }
        add(
            Phase::Finalize,
            d.store.name(),
            "record history, unlock".into(),
        );
        Ok(Plan {
            target,
            previous,
            steps,
        })
    }

    /// The recorded state, the backends' view of both slots, the lock, and any drift between them.
    pub async fn status(&self) -> Result<StatusReport> {
        let d = &*self.inner;
        let state = d.store.load().await?.unwrap_or_default();
        let slots = PerSlot::new(
            d.environment.status(Slot::Blue).await?,
            d.environment.status(Slot::Green).await?,
        );
        let switch = d.switch.current().await?;
        let lock = d.store.lock_info().await?;
        let mut drift = Vec::new();
        match (&state.split, &switch) {
            (Some(a), Some(b)) if !a.same_weights(b) => {
                drift.push(format!("the switch sends {b}, the state records {a}"))
            }
            (Some(a), None) => drift.push(format!(
                "the switch has no configuration, the state records {a}"
            )),
            _ => {}
        }
        if let Some(active) = state.active {
            if slots.get(active).state != InstanceState::Running {
                drift.push(format!(
                    "live slot {active} is {:?} in the environment",
                    slots.get(active).state
                ));
            }
        }
        Ok(StatusReport {
            state,
            slots,
            switch,
            lock,
            drift,
        })
    }

    /// The history of finished deployments, oldest first.
    pub async fn history(&self) -> Result<Vec<HistoryEntry>> {
        Ok(self
            .inner
            .store
            .load()
            .await?
            .map(|s| s.history.into_iter().collect())
            .unwrap_or_default())
    }

    /// Removes the idle slot (the warm previous release); finalizes the database for it. Returns the
    /// slot removed, or `None` if it was already empty.
    pub async fn cleanup(&self) -> Result<Option<Slot>> {
        let mut run = self.begin("cleanup".into()).await?;
        let res = async {
            if let Some(f) = &run.state.in_flight {
                return Err(Error::InFlight {
                    id: f.id,
                    phase: f.phase,
                });
            }
            let Some(active) = run.state.active else {
                return Ok(None);
            };
            let idle = active.other();
            let env = &run.d.environment;
            let st = env.status(idle).await?;
            if st.state == InstanceState::Absent && run.state.slots.get(idle).is_none() {
                return Ok(None);
            }
            env.remove(idle).await?;
            if let (Some(db), Some(live)) = (&run.d.database, run.state.live_release().cloned()) {
                db.finalize(&DbContext {
                    live: Some(active),
                    target: active,
                    release: live,
                })
                .await?;
            }
            run.state.slots.set(idle, None);
            run.save().await?;
            Ok(Some(idle))
        }
        .await;
        run.finish(res).await
    }

    /// Removes both slots' instances and forgets what they held (history is kept). The switch
    /// keeps its last configuration; database contents are not touched.
    pub async fn reset(&self) -> Result<()> {
        let mut run = self.begin("reset".into()).await?;
        let res = async {
            for slot in Slot::ALL {
                run.d.environment.remove(slot).await?;
            }
            let history = std::mem::take(&mut run.state.history);
            let fresh = DeploymentState {
                revision: run.state.revision,
                last_id: run.state.last_id,
                history,
                ..DeploymentState::default()
            };
            run.state = fresh;
            run.save().await?;
            Ok(())
        }
        .await;
        run.finish(res).await
    }

    /// Removes the deployment lock whoever holds it (for a holder that died on another machine).
    /// Returns what was removed.
    pub async fn break_lock(&self) -> Result<Option<LockInfo>> {
        self.inner.store.break_lock().await
    }
}

impl<'a> Run<'a> {
    fn interrupted(&self) -> bool {
        self.d.interrupted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A safe point inside a long wait.
    fn check_interrupt(&self) -> PhaseResult<()> {
        if self.interrupted() {
            return Err(("operator".to_string(), Error::Interrupted));
        }
        Ok(())
    }

    fn emit(&self, ev: DeployEvent) {
        tracing::debug!(event = ?ev, "deploy event");
        let _ = self.d.events.send(ev);
    }

    fn flight(&self) -> &InFlight {
        self.state
            .in_flight
            .as_ref()
            .expect("a deployment in flight")
    }

    fn flight_mut(&mut self) -> &mut InFlight {
        self.state
            .in_flight
            .as_mut()
            .expect("a deployment in flight")
    }

    async fn save(&mut self) -> Result<()> {
        if let Some(why) = self.lease.as_ref().and_then(|l| l.lost()) {
            return Err(Error::LockLost { reason: why });
        }
        let rev = self.d.store.save(&self.state).await?;
        self.state.revision = rev;
        Ok(())
    }

    async fn finish<T>(mut self, res: Result<T>) -> Result<T> {
        if let Some(lease) = self.lease.take() {
            lease.release().await;
        }
        res
    }

    fn wrap(&self, phase: Phase, backend: &str, e: Error) -> Error {
        let (kind, id) = self
            .state
            .in_flight
            .as_ref()
            .map(|f| (f.kind.as_str(), f.id))
            .unwrap_or(("deploy", self.state.last_id + 1));
        Error::Phase {
            kind,
            id,
            phase,
            backend: backend.to_string(),
            live: LiveTraffic::Untouched,
            cleanup: Vec::new(),
            source: Box::new(e),
        }
    }

    fn plan_target(&self) -> (Slot, Option<Slot>) {
        match self.state.active {
            Some(a) => (a.other(), Some(a)),
            None => (Slot::Blue, None),
        }
    }

    /// Refuses, before anything changes, a plan the switch cannot carry out.
    fn check_capabilities(&self, kind: RunKind) -> Result<()> {
        let caps = self.d.switch.capabilities();
        let p = &self.d.policy;
        let name = self.d.switch.name().to_string();
        let missing = |capability, hint| Error::MissingCapability {
            capability,
            backend: name.clone(),
            hint,
        };
        if kind == RunKind::Deploy && p.canary.iter().any(|s| s.weight < 100) && !caps.weights {
            return Err(missing(
                "weights",
                "remove the canary steps or use a switch with weights",
            ));
        }
        if p.preview && !caps.preview {
            return Err(missing(
                "preview",
                "turn preview off or use a switch with preview routing",
            ));
        }
        if p.pause_during_cutover && !caps.pause {
            return Err(missing(
                "pause",
                "turn pause_during_cutover off or use a switch that can pause",
            ));
        }
        if self.d.analyses.iter().any(|a| a.requires_metrics()) && !caps.metrics {
            return Err(missing(
                "metrics",
                "remove the metrics analysis or use a switch with metrics",
            ));
        }
        Ok(())
    }

    /// The steps of a run: the canary steps, then 100 % if they do not reach it. Rollbacks go to
    /// 100 % at once.
    fn steps(&self) -> Vec<CanaryStep> {
        let p = &self.d.policy;
        let (kind, first) = match &self.state.in_flight {
            Some(f) => (f.kind, f.previous.is_none()),
            None => (RunKind::Deploy, self.state.active.is_none()),
        };
        // The first deploy has nothing to split traffic with: it goes to 100 % at once.
        let mut steps = if kind == RunKind::Deploy && !first {
            p.canary.clone()
        } else {
            Vec::new()
        };
        if steps.last().map(|s| s.weight < 100).unwrap_or(true) {
            steps.push(CanaryStep::new(100, p.observation.window));
        }
        steps
    }

    fn step_split(&self, target: Slot, weight: u8) -> TrafficSplit {
        TrafficSplit::canary(target, weight).expect("validated canary weight")
    }

    async fn start(
        &mut self,
        kind: RunKind,
        release: Release,
        target: Slot,
        previous: Option<Slot>,
        reuse_target: bool,
    ) -> Result<()> {
        let id = self.state.last_id + 1;
        self.state.last_id = id;
        self.state.in_flight = Some(InFlight {
            id,
            kind,
            release: release.clone(),
            target,
            previous,
            previous_split: self.state.split.clone(),
            phase: Phase::Plan,
            step: 0,
            switched: false,
            reuse_target,
            endpoints: Vec::new(),
            binding: Default::default(),
            irreversible: None,
            waiting: None,
            failing: None,
            started_at: Timestamp::now(),
        });
        self.emit(DeployEvent::Started {
            id,
            kind,
            version: release.version.clone(),
            target,
        });
        // The secret parts of the release live only in memory; keep them for this run.
        self.binding = Some(DbBinding {
            env: Default::default(),
            secret_env: release.secret_env.clone(),
        });
        self.flight_mut().phase = Phase::PrepareDatabase;
        if let Err(e) = self.save().await {
            self.state.in_flight = None;
            return Err(self.wrap_id(id, kind, Phase::Plan, self.d.store.name(), e));
        }
        Ok(())
    }

    fn wrap_id(&self, id: u64, kind: RunKind, phase: Phase, backend: &str, e: Error) -> Error {
        Error::Phase {
            kind: kind.as_str(),
            id,
            phase,
            backend: backend.to_string(),
            live: LiveTraffic::Untouched,
            cleanup: Vec::new(),
            source: Box::new(e),
        }
    }

    fn report(&self, outcome: RunOutcome) -> Report {
        let f = self.flight();
        Report {
            id: f.id,
            kind: f.kind,
            version: f.release.version.clone(),
            target: f.target,
            outcome,
            elapsed: self.started.elapsed(),
        }
    }

    fn report_last(&self, outcome: RunOutcome) -> Report {
        let h = self
            .state
            .history
            .back()
            .expect("a finished run in history");
        Report {
            id: h.id,
            kind: h.kind,
            version: h.version.clone(),
            target: h.slot,
            outcome,
            elapsed: self.started.elapsed(),
        }
    }

    fn endpoints(&self) -> Endpoints {
        let f = self.flight();
        let mut eps = Endpoints::default();
        eps.set(f.target, f.endpoints.clone());
        let other = f.target.other();
        if let Some(r) = self.state.slots.get(other) {
            eps.set(other, r.endpoints.clone());
        }
        eps
    }

    fn db_ctx(&self) -> DbContext {
        let f = self.flight();
        DbContext {
            live: f.previous,
            target: f.target,
            release: f.release.clone(),
        }
    }

    fn note_db_step(&mut self, step: &DbStep) {
        if let Reversibility::Irreversible { what } = &step.reversibility {
            self.flight_mut().irreversible = Some(what.clone());
        }
    }

    // ---------------------------------------------------------------------------------------
    // The loop

    /// Runs phases from the saved one until done, waiting, or failed.
    async fn drive(&mut self) -> Result<Report> {
        loop {
            let phase = self.flight().phase;
            if self.interrupted() {
                let id = self.flight().id;
                self.emit(DeployEvent::PhaseFailed {
                    id,
                    phase,
                    error: Error::Interrupted.to_string(),
                    elapsed: Duration::ZERO,
                });
                return Err(self
                    .fail(phase, "operator".into(), Error::Interrupted)
                    .await);
            }
            if phase == Phase::Switch {
                // Recorded before the switch is touched, so a crash inside `apply` is known.
                self.flight_mut().switched = true;
            }
            if let Err(e) = self.save().await {
                if matches!(e, Error::LockLost { .. }) {
                    return Err(self.wrap(phase, self.d.store.name(), e));
                }
                return Err(self.fail(phase, self.d.store.name().to_string(), e).await);
            }
            let (id, step) = (self.flight().id, self.flight().step);
            self.emit(DeployEvent::PhaseStarted { id, phase, step });
            let t = Instant::now();
            let span = tracing::info_span!("phase", id, phase = %phase, step);
            let res = self.run_phase(phase).instrument(span).await;
            match res {
                Ok(Step::Next(next)) => {
                    self.emit(DeployEvent::PhaseCompleted {
                        id,
                        phase,
                        elapsed: t.elapsed(),
                    });
                    self.flight_mut().phase = next;
                }
                Ok(Step::Skip(reason, next)) => {
                    self.emit(DeployEvent::PhaseSkipped {
                        id,
                        phase,
                        reason: reason.to_string(),
                    });
                    self.flight_mut().phase = next;
                }
                Ok(Step::Wait(waiting)) => {
                    let reason = match &waiting {
                        Waiting::Gate => "waiting for promote (manual gate)".to_string(),
                        Waiting::Inconclusive { reason } => {
                            format!("analysis inconclusive: {reason}")
                        }
                        Waiting::Decision { reason } => reason.clone(),
                    };
                    self.flight_mut().waiting = Some(waiting.clone());
                    if let Err(e) = self.save().await {
                        return Err(self.fail(phase, self.d.store.name().to_string(), e).await);
                    }
                    self.emit(DeployEvent::Waiting { id, reason });
                    return Ok(self.report(RunOutcome::Waiting(waiting)));
                }
                Ok(Step::Done) => {
                    let report = self.report(RunOutcome::Live);
                    let outcome = if self.recovered {
                        Outcome::Recovered {
                            action: "completed".into(),
                        }
                    } else {
                        Outcome::Succeeded
                    };
                    self.complete(outcome.clone());
                    if let Err(e) = self.save().await {
                        return Err(self.wrap(Phase::Finalize, self.d.store.name(), e));
                    }
                    self.emit(DeployEvent::Finished {
                        id,
                        outcome,
                        elapsed: self.started.elapsed(),
                    });
                    return Ok(report);
                }
                Err((backend, e)) => {
                    self.emit(DeployEvent::PhaseFailed {
                        id,
                        phase,
                        error: e.to_string(),
                        elapsed: t.elapsed(),
                    });
                    return Err(self.fail(phase, backend, e).await);
                }
            }
        }
    }

    /// Records a successful run and clears the flight.
    fn complete(&mut self, outcome: Outcome) {
        let f = self.state.in_flight.take().expect("a deployment in flight");
        let mut release = f.release.clone();
        release.env.extend(f.binding.clone());
        self.state.slots.set(
            f.target,
            Some(SlotRecord {
                release,
                deployment: f.id,
                endpoints: f.endpoints.clone(),
                deployed_at: Timestamp::now(),
            }),
        );
        // The previous slot's record is kept even when it was stopped: rollback redeploys it.
        if let Some(prev) = f.previous.filter(|p| *p != f.target) {
            if let Some(r) = self.state.slots.get(prev) {
                self.state.previous_release = Some(r.release.clone());
            }
        }
        self.state.active = Some(f.target);
        self.state.record(HistoryEntry {
            id: f.id,
            kind: f.kind,
            version: f.release.version.clone(),
            slot: f.target,
            outcome,
            started_at: f.started_at,
            finished_at: Timestamp::now(),
        });
    }

    async fn run_phase(&mut self, phase: Phase) -> PhaseResult<Step> {
        match phase {
            Phase::Plan => Ok(Step::Next(Phase::PrepareDatabase)),
            Phase::PrepareDatabase => self.prepare_database().await,
            Phase::BeforeDeployHook => {
                self.run_hooks(HookPoint::BeforeDeploy).await?;
                Ok(Step::Next(Phase::DeployTarget))
            }
            Phase::DeployTarget => self.deploy_target().await,
            Phase::WaitReady => {
                let f = self.flight();
                let (target, eps) = (f.target, f.endpoints.clone());
                self.wait_ready(target, &eps).await?;
                Ok(Step::Next(Phase::AfterDeployHook))
            }
            Phase::AfterDeployHook => {
                self.run_hooks(HookPoint::AfterDeploy).await?;
                Ok(Step::Next(Phase::Preview))
            }
            Phase::Preview => self.preview().await,
            Phase::SmokeTest => {
                self.run_hooks(HookPoint::BeforeSwitch).await?;
                Ok(Step::Next(Phase::Gate))
            }
            Phase::Gate => {
                let f = self.flight();
                if self.d.policy.promotion == Promotion::Manual
                    && f.kind == RunKind::Deploy
                    && f.previous.is_some()
                {
                    Ok(Step::Wait(Waiting::Gate))
                } else {
                    Ok(Step::Skip(
                        "automatic promotion",
                        Phase::DatabaseBeforeSwitch,
                    ))
                }
            }
            Phase::DatabaseBeforeSwitch => self.database_before_switch().await,
            Phase::Switch => self.switch().await,
            Phase::VerifyDataPath => self.verify_data_path().await,
            Phase::Observe => self.observe().await,
            Phase::DatabaseAfterSwitch => {
                let Some(db) = self.d.database.clone() else {
                    return Ok(Step::Skip("no database strategy", Phase::AfterSwitchHook));
                };
                let step = {
                    let ctx = self.db_ctx();
                    self.retry(|| db.after_switch(&ctx)).await
                }
                .by(db.name())?;
                self.note_db_step(&step);
                Ok(Step::Next(Phase::AfterSwitchHook))
            }
            Phase::AfterSwitchHook => {
                self.run_hooks(HookPoint::AfterSwitch).await?;
                Ok(Step::Next(Phase::DrainOld))
            }
            Phase::DrainOld => self.drain_old().await,
            Phase::Finalize => self.finalize().await,
        }
    }

    // ---------------------------------------------------------------------------------------
    // The phases, in order

    async fn prepare_database(&mut self) -> PhaseResult<Step> {
        let Some(db) = self.d.database.clone() else {
            return Ok(Step::Skip("no database strategy", Phase::BeforeDeployHook));
        };
        let Prepared { binding, step } = {
            let ctx = self.db_ctx();
            self.retry(|| db.prepare(&ctx)).await
        }
        .by(db.name())?;
        self.note_db_step(&step);
        self.flight_mut().binding = binding.env.clone();
        let mut all = binding;
        if let Some(b) = &self.binding {
            all.secret_env.extend(b.secret_env.clone());
        }
        self.binding = Some(all);
        Ok(Step::Next(Phase::BeforeDeployHook))
    }

    async fn deploy_target(&mut self) -> PhaseResult<Step> {
        if self.flight().reuse_target {
            return Ok(Step::Skip(
                "the target already runs this release",
                Phase::WaitReady,
            ));
        }
        if self.binding.is_none() {
            // Resumed after a crash: the secret part of the binding was never persisted.
            if let Some(db) = self.d.database.clone() {
                let prepared = {
                    let ctx = self.db_ctx();
                    self.retry(|| db.prepare(&ctx)).await
                }
                .by(db.name())?;
                self.binding = Some(prepared.binding);
            }
        }
        let f = self.flight();
        let target = f.target;
        let mut release = f.release.clone();
        release.env.extend(f.binding.clone());
        if let Some(b) = &self.binding {
            release = b.apply_to(&release);
        }
        // Environments that label what they create can name the deployment that created it.
        release
            .labels
            .entry(crate::DEPLOYMENT_LABEL.to_string())
            .or_insert_with(|| f.id.to_string());
        let env = self.d.environment.clone();
        let eps = self
            .retry(|| env.deploy(target, &release))
            .await
            .by(env.name())?;
        if eps.is_empty() {
            return Err((
                env.name().to_string(),
                Error::backend(env.name(), "deploy", false, "deploy returned no endpoints"),
            ));
        }
        self.flight_mut().endpoints = eps;
        Ok(Step::Next(Phase::WaitReady))
    }

    /// Polls the target until `rise` consecutive rounds pass, adaptively: fast at first, then
    /// doubling up to `poll_max`. Fails fast if the instance exits.
    async fn wait_ready(&mut self, target: Slot, eps: &[Endpoint]) -> PhaseResult<()> {
        let p = &self.d.policy;
        let env = self.d.environment.clone();
        let deadline = Instant::now() + p.readiness_timeout;
        let mut interval = p.poll_initial;
        let mut passes = 0u32;
        let id = self.flight().id;
        loop {
            self.check_interrupt()?;
            let status = env.status(target).await.by(env.name())?;
            if matches!(
                status.state,
                InstanceState::Exited | InstanceState::Stopped | InstanceState::Absent
            ) {
                let logs = env
                    .logs(target, None)
                    .await
                    .map(|l| {
                        let lines: Vec<&str> = l.lines().collect();
                        lines[lines.len().saturating_sub(10)..].join("\n")
                    })
                    .unwrap_or_default();
                let code = status
                    .exit_code
                    .map(|c| format!(" with code {c}"))
                    .unwrap_or_default();
                return Err((
                    env.name().to_string(),
                    Error::Unhealthy {
                        slot: target,
                        reason: format!(
                            "the instance is {:?}{code} before becoming ready; last log lines:\n{logs}",
                            status.state
                        ),
                    },
                ));
            }
            let (healthy, detail, backend) = self.health_round(&status, eps).await;
            passes = if healthy { passes + 1 } else { 0 };
            self.emit(DeployEvent::Health {
                id,
                slot: target,
                healthy,
                passes,
                detail: detail.clone(),
            });
            if passes >= p.rise {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err((
                    backend,
                    Error::Timeout {
                        what: format!(
                            "slot {target} becoming healthy ({})",
                            detail.unwrap_or_else(|| "no passing round".into())
                        ),
                        after: p.readiness_timeout,
                    },
                ));
            }
            let pause = if healthy { p.poll_initial } else { interval };
            tokio::time::sleep(pause.min(deadline - now)).await;
            interval = (interval * 2).min(p.poll_max);
        }
    }

    /// One health round over every endpoint: (healthy, failure detail, backend to blame).
    async fn health_round(
        &self,
        status: &SlotStatus,
        eps: &[Endpoint],
    ) -> (bool, Option<String>, String) {
        use crate::traits::RuntimeHealth;
        match status.health {
            Some(RuntimeHealth::Unhealthy) | Some(RuntimeHealth::Starting)
                if self.d.health_checks.is_empty() =>
            {
                return (
                    false,
                    Some(format!("platform health is {:?}", status.health.unwrap())),
                    self.d.environment.name().to_string(),
                )
            }
            Some(RuntimeHealth::Unhealthy) => {
                return (
                    false,
                    Some("the platform reports the instance unhealthy".into()),
                    self.d.environment.name().to_string(),
                )
            }
            _ => {}
        }
        if self.d.health_checks.is_empty() {
            let running = status.state == InstanceState::Running;
            return (
                running,
                (!running).then(|| format!("instance is {:?}", status.state)),
                self.d.environment.name().to_string(),
            );
        }
        let checks = self
            .d
            .health_checks
            .iter()
            .flat_map(|c| eps.iter().map(move |e| (c, e)));
        let results = futures_util::future::join_all(
            checks.map(|(c, e)| async move { (c.name().to_string(), e, c.check(e).await) }),
        )
        .await;
        for (name, e, r) in results {
            match r {
                Ok(rep) if rep.is_healthy() => {}
                Ok(rep) => {
                    return (
                        false,
                        Some(format!("{name} on {e}: {}", rep.reason().unwrap_or(""))),
                        name,
                    )
                }
                Err(err) => {
                    return (
                        false,
                        Some(format!("{name} on {e} could not run: {err}")),
                        name,
                    )
                }
            }
        }
        (true, None, String::new())
    }

    async fn preview(&mut self) -> PhaseResult<Step> {
        if !self.d.policy.preview {
            return Ok(Step::Skip("preview off", Phase::SmokeTest));
        }
        let sw = self.d.switch.clone();
        let (target, eps) = (self.flight().target, self.endpoints());
        self.retry(|| sw.preview(Some(target), &eps))
            .await
            .by(sw.name())?;
        self.previewing = true;
        Ok(Step::Next(Phase::SmokeTest))
    }

    async fn database_before_switch(&mut self) -> PhaseResult<Step> {
        let Some(db) = self.d.database.clone() else {
            return Ok(Step::Skip("no database strategy", Phase::Switch));
        };
        if self.d.policy.pause_during_cutover {
            self.d.switch.pause().await.by(self.d.switch.name())?;
            self.paused = true;
        }
        let step = {
            let ctx = self.db_ctx();
            self.retry(|| db.before_switch(&ctx)).await
        }
        .by(db.name())?;
        self.note_db_step(&step);
        Ok(Step::Next(Phase::Switch))
    }

    async fn switch(&mut self) -> PhaseResult<Step> {
        let sw = self.d.switch.clone();
        let f = self.flight();
        let target = f.target;
        let steps = self.steps();
        let step = steps[f.step.min(steps.len() - 1)].clone();
        let split = self.step_split(target, step.weight);
        let eps = self.endpoints();
        // After a crash the split may already be in force: do not switch twice.
        let already = self.recovered
            && sw
                .current()
                .await
                .by(sw.name())?
                .map(|c| c.same_weights(&split))
                .unwrap_or(false);
        if !already {
            self.retry(|| sw.apply(&split, &eps)).await.by(sw.name())?;
        }
        if self.paused {
            sw.resume().await.by(sw.name())?;
            self.paused = false;
        }
        let now = self.retry(|| sw.current()).await.by(sw.name())?;
        match &now {
            Some(c) if c.same_weights(&split) => {}
            other => {
                return Err((
                    sw.name().to_string(),
                    Error::VerifyMismatch {
                        expected: split.clone(),
                        actual: other
                            .as_ref()
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "none".into()),
                    },
                ))
            }
        }
        self.state.split = Some(split.clone());
        if split.weight(target) == 100 {
            self.state.active = Some(target);
            if self.previewing {
                if let Err(e) = sw.preview(None, &eps).await {
                    tracing::warn!(error = %e, "stopping preview routing failed");
                }
                self.previewing = false;
            }
        }
        let id = self.flight().id;
        self.emit(DeployEvent::Switched { id, split });
        Ok(Step::Next(Phase::VerifyDataPath))
    }

    async fn verify_data_path(&mut self) -> PhaseResult<Step> {
        let Some(probe) = self.d.probe.clone() else {
            return Ok(Step::Skip("no data-path probe", Phase::Observe));
        };
        let f = self.flight();
        let whole = self
            .state
            .split
            .as_ref()
            .map(|s| s.weight(f.target) == 100)
            .unwrap_or(false);
        if !whole {
            return Ok(Step::Skip(
                "partial split: not every request reaches the target",
                Phase::Observe,
            ));
        }
        let version = f.release.version.clone();
        let deadline = Instant::now() + self.d.policy.verify_timeout;
        let mut in_a_row = 0;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            self.check_interrupt()?;
            match probe.probe(&version).await {
                Ok(r) if r.matched => {
                    in_a_row += 1;
                    if in_a_row >= 3 {
                        return Ok(Step::Next(Phase::Observe));
                    }
                    continue;
                }
                Ok(r) => last = r.observed,
                Err(e) => last = e.to_string(),
            }
            in_a_row = 0;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err((
            probe.name().to_string(),
            Error::DataPathMismatch {
                expected: version.to_string(),
                detail: format!(
                    "last answer within {:?}: {last}",
                    self.d.policy.verify_timeout
                ),
            },
        ))
    }

    /// The step after a finished observation: the next canary step, or the after-switch phases.
    fn after_observe(&mut self) -> Phase {
        let n = self.steps().len();
        let f = self.flight_mut();
        if f.step + 1 < n {
            f.step += 1;
            Phase::Switch
        } else {
            Phase::DatabaseAfterSwitch
        }
    }

    async fn observe(&mut self) -> PhaseResult<Step> {
        let steps = self.steps();
        let f = self.flight();
        let step = steps[f.step.min(steps.len() - 1)].clone();
        let (target, previous, idx, id) = (f.target, f.previous, f.step, f.id);
        let eps = f.endpoints.clone();
        let window = step.hold;
        if window.is_zero() {
            let next = self.after_observe();
            return Ok(Step::Skip("no observation window", next));
        }
        let sw = self.d.switch.clone();
        let baseline = if sw.capabilities().metrics {
            sw.metrics(target).await.ok()
        } else {
            None
        };
        let interval = self.d.policy.observation.interval;
        let start = Instant::now();
        let mut fails = 0u32;
        let mut last_inconclusive: Option<String>;
        loop {
            self.check_interrupt()?;
            let status = self
                .d
                .environment
                .status(target)
                .await
                .by(self.d.environment.name())?;
            let (healthy, detail, backend) = self.health_round(&status, &eps).await;
            fails = if healthy { 0 } else { fails + 1 };
            if fails >= self.d.policy.fall {
                return Err((
                    backend,
                    Error::Unhealthy {
                        slot: target,
                        reason: format!(
                            "{fails} failing rounds after the switch: {}",
                            detail.unwrap_or_default()
                        ),
                    },
                ));
            }
            let ctx = AnalysisContext {
                target,
                previous,
                step: idx,
                weight: step.weight,
                elapsed: start.elapsed(),
                window,
                baseline,
                switch: sw.clone(),
            };
            last_inconclusive = None;
            for a in &self.d.analyses {
                let verdict = a
                    .analyze(&ctx)
                    .await
                    .unwrap_or_else(|e| Verdict::Fail(e.to_string()));
                let (v, detail) = match &verdict {
                    Verdict::Pass => ("pass", String::new()),
                    Verdict::Fail(d) => ("fail", d.clone()),
                    Verdict::Inconclusive(d) => ("inconclusive", d.clone()),
                };
                self.emit(DeployEvent::Analysis {
                    id,
                    verdict: v.into(),
                    detail: detail.clone(),
                });
                match verdict {
                    Verdict::Pass => {}
                    Verdict::Fail(reason) => {
                        return Err((a.name().to_string(), Error::AnalysisFailed { reason }))
                    }
                    Verdict::Inconclusive(reason) => last_inconclusive = Some(reason),
                }
            }
            if start.elapsed() >= window {
                break;
            }
            tokio::time::sleep(interval.min(window.saturating_sub(start.elapsed()))).await;
        }
        if let Some(reason) = last_inconclusive {
            // With nothing live before (first deploy) there is nothing to compare or fall back
            // to: only health decides. Otherwise a person does.
            if previous.is_some() {
                return Ok(Step::Wait(Waiting::Inconclusive { reason }));
            }
            tracing::info!(%reason, "analysis inconclusive on a first deploy; health checks passed");
        }
        if step.manual && step.weight < 100 {
            return Ok(Step::Wait(Waiting::Gate));
        }
        Ok(Step::Next(self.after_observe()))
    }

    async fn drain_old(&mut self) -> PhaseResult<Step> {
        let f = self.flight();
        let Some(prev) = f.previous.filter(|p| *p != f.target) else {
            return Ok(Step::Skip("no previous slot", Phase::Finalize));
        };
        let p = &self.d.policy;
        let sw = self.d.switch.clone();
        if sw.capabilities().drain {
            let deadline = Instant::now() + p.drain_timeout;
            loop {
                let n = sw.in_flight(prev).await.by(sw.name())?;
                if n == 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::warn!(slot = %prev, in_flight = n, "drain timeout reached");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if p.keep_old == KeepOld::Stop {
            let env = self.d.environment.clone();
            let drain = p.drain_timeout;
            self.retry(|| env.stop(prev, drain)).await.by(env.name())?;
        }
        Ok(Step::Next(Phase::Finalize))
    }

    async fn finalize(&mut self) -> PhaseResult<Step> {
        if self.d.policy.keep_old == KeepOld::Stop && self.flight().previous.is_some() {
            if let Some(db) = self.d.database.clone() {
                let step = {
                    let ctx = self.db_ctx();
                    self.retry(|| db.finalize(&ctx)).await
                }
                .by(db.name())?;
                self.note_db_step(&step);
            }
        }
        Ok(Step::Done)
    }

    // ---------------------------------------------------------------------------------------
    // Helpers

    /// Retries retryable errors per the policy; the only retry loop in bluegreen.
    async fn retry<T, F, Fut>(&self, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let cfg = self.d.policy.retry;
        let mut delay = cfg.backoff;
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e) if e.is_retryable() && attempt < cfg.attempts => {
                    tracing::warn!(error = %e, attempt, "retrying after a retryable error");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn run_hooks(&mut self, point: HookPoint) -> PhaseResult<()> {
        let f = self.flight();
        let ctx = HookContext {
            point,
            deployment: f.id,
            release: f.release.clone(),
            target: f.target,
            previous: f.previous,
            endpoints: f.endpoints.clone(),
            environment: self.d.environment.clone(),
        };
        for h in self.d.hooks.iter().filter(|h| h.point == point) {
            let name = h.hook.name().to_string();
            match tokio::time::timeout(h.options.timeout, h.hook.run(&ctx)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err((
                        name.clone(),
                        Error::Hook {
                            hook: name,
                            reason: e.to_string(),
                        },
                    ))
                }
                Err(_) => match h.options.on_timeout {
                    OnTimeout::Continue => {
                        tracing::warn!(hook = %name, "hook timed out; continuing as configured");
                        self.emit(DeployEvent::HookTimedOut {
                            id: ctx.deployment,
                            hook: name,
                        });
                    }
                    OnTimeout::Fail => {
                        return Err((
                            name.clone(),
                            Error::Timeout {
                                what: format!("hook {name}"),
                                after: h.options.timeout,
                            },
                        ))
                    }
                },
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Failure, undo and recovery

    /// Handles a failed phase: stop and ask after an irreversible step, otherwise undo.
    async fn fail(&mut self, phase: Phase, backend: String, err: Error) -> Error {
        let f = self.flight().clone();
        if let Some(what) = f.irreversible.clone() {
            let reason = format!("{err} (after the irreversible step: {what})");
            self.flight_mut().waiting = Some(Waiting::Decision {
                reason: reason.clone(),
            });
            let mut cleanup = Vec::new();
            if let Err(e) = self.save().await {
                cleanup.push(format!("could not save the waiting state: {e}"));
            }
            self.emit(DeployEvent::Waiting {
                id: f.id,
                reason: reason.clone(),
            });
            return Error::Phase {
                kind: f.kind.as_str(),
                id: f.id,
                phase,
                backend,
                live: if f.switched {
                    LiveTraffic::Affected
                } else {
                    LiveTraffic::Untouched
                },
                cleanup,
                source: Box::new(Error::NeedsDecision { reason }),
            };
        }
        let reason = err.to_string();
        let outcome = Outcome::Failed {
            phase,
            reason: reason.clone(),
            rolled_back: false,
        };
        let (live, cleanup) = self.undo(reason, phase, outcome).await;
        Error::Phase {
            kind: f.kind.as_str(),
            id: f.id,
            phase,
            backend,
            live,
            cleanup,
            source: Box::new(err),
        }
    }

    /// Undoes the flight: resume and stop preview, switch back if traffic moved (restarting the
    /// previous slot if needed), roll the database back, remove the target, record `outcome`.
    /// Returns what happened to live traffic and any problems met (best effort, never aborts).
    async fn undo(
        &mut self,
        reason: String,
        phase: Phase,
        outcome: Outcome,
    ) -> (LiveTraffic, Vec<String>) {
        let mut problems = Vec::new();
        // An interrupt has been honoured by stopping; the undo itself must run to the end.
        self.d
            .interrupted
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.flight_mut().failing = Some(reason.clone());
        if let Err(e) = self.save().await {
            problems.push(format!("saving the rollback marker failed: {e}"));
        }
        let f = self.flight().clone();
        self.emit(DeployEvent::RollingBack {
            id: f.id,
            reason: reason.clone(),
        });
        let sw = self.d.switch.clone();
        let env = self.d.environment.clone();
        let caps = sw.capabilities();
        if caps.pause
            && (self.paused
                || (self.d.policy.pause_during_cutover && phase >= Phase::DatabaseBeforeSwitch))
        {
            if let Err(e) = sw.resume().await {
                problems.push(format!("{}: resume failed: {e}", sw.name()));
            }
            self.paused = false;
        }
        if caps.preview && self.d.policy.preview && phase >= Phase::Preview {
            if let Err(e) = sw.preview(None, &self.endpoints()).await {
                problems.push(format!("{}: stopping preview failed: {e}", sw.name()));
            }
        }

        let mut live = LiveTraffic::Untouched;
        let mut target_serves = false;
        if f.switched {
            let current = sw.current().await.ok().flatten();
            let moved = current
                .as_ref()
                .map(|c| c.weight(f.target) > 0)
                .unwrap_or(true);
            if moved {
                match f.previous.filter(|p| *p != f.target) {
                    Some(prev) => match self.switch_back(prev, &f).await {
                        Ok(()) => live = LiveTraffic::RolledBack,
                        Err(e) => {
                            problems.push(format!("switching back to {prev} failed: {e}"));
                            live = LiveTraffic::Affected;
                            target_serves = true;
                        }
                    },
                    None => {
                        // First deploy: there is nothing to switch back to, and there was no live
                        // traffic before it.
                        self.state.active = None;
                    }
                }
            }
        }

        if let Some(db) = self.d.database.clone() {
            if phase >= Phase::PrepareDatabase && !target_serves {
                if let Err(e) = db.rollback(&self.db_ctx()).await {
                    problems.push(format!("{}: database rollback failed: {e}", db.name()));
                }
            }
        }
        if live == LiveTraffic::RolledBack {
            if let Err((name, e)) = self.run_hooks(HookPoint::AfterRollback).await {
                problems.push(format!("after_rollback hook {name} failed: {e}"));
            }
        }
        if !f.reuse_target && !target_serves {
            match env.remove(f.target).await {
                Ok(()) => self.state.slots.set(f.target, None),
                Err(e) => problems.push(format!(
                    "{}: removing target {} failed: {e} (remove it with `cleanup`)",
                    env.name(),
                    f.target
                )),
            }
        }
        let outcome = match outcome {
            Outcome::Failed { phase, reason, .. } => Outcome::Failed {
                phase,
                reason,
                rolled_back: live == LiveTraffic::RolledBack,
            },
            o => o,
        };
        self.state.in_flight = None;
        self.state.record(HistoryEntry {
            id: f.id,
            kind: f.kind,
            version: f.release.version.clone(),
            slot: f.target,
            outcome: outcome.clone(),
            started_at: f.started_at,
            finished_at: Timestamp::now(),
        });
        if let Err(e) = self.save().await {
            problems.push(format!("saving the final state failed: {e}"));
        }
        self.emit(DeployEvent::Finished {
            id: f.id,
            outcome,
            elapsed: self.started.elapsed(),
        });
        (live, problems)
    }

    async fn switch_back(&mut self, prev: Slot, f: &InFlight) -> Result<()> {
        let sw = self.d.switch.clone();
        let env = self.d.environment.clone();
        let mut eps = self.endpoints();
        let status = env.status(prev).await?;
        if status.state != InstanceState::Running {
            // The old slot was stopped (e.g. a failure after draining): start it again first.
            let record =
                self.state
                    .slots
                    .get(prev)
                    .clone()
                    .ok_or_else(|| Error::NothingToRollBack {
                        reason: format!(
                            "slot {prev} is {:?} and its release is unknown",
                            status.state
                        ),
                    })?;
            let new_eps = self.retry(|| env.deploy(prev, &record.release)).await?;
            self.wait_ready(prev, &new_eps).await.map_err(|(_, e)| e)?;
            eps.set(prev, new_eps.clone());
            if let Some(r) = self.state.slots.get_mut(prev) {
                r.endpoints = new_eps;
            }
        }
        let split = f
            .previous_split
            .clone()
            .filter(|s| s.weight(prev) == 100)
            .unwrap_or_else(|| TrafficSplit::all(prev));
        self.retry(|| sw.apply(&split, &eps)).await?;
        let now = sw.current().await?;
        if !now
            .as_ref()
            .map(|c| c.same_weights(&split))
            .unwrap_or(false)
        {
            return Err(Error::VerifyMismatch {
                expected: split,
                actual: now.map(|s| s.to_string()).unwrap_or_else(|| "none".into()),
            });
        }
        self.state.split = Some(split.clone());
        self.state.active = Some(prev);
        self.emit(DeployEvent::Switched { id: f.id, split });
        Ok(())
    }

    /// Called with the lock held: a flight that is not waiting was left by a run that died.
    async fn recover_if_crashed(&mut self) -> Result<Option<Report>> {
        let Some(f) = self.state.in_flight.clone() else {
            return Ok(None);
        };
        if f.waiting.is_some() {
            return Err(Error::InFlight {
                id: f.id,
                phase: f.phase,
            });
        }
        self.recovered = true;
        let sw = self.d.switch.clone();
        let moved = if f.switched {
            let cur = sw
                .current()
                .await
                .map_err(|e| self.wrap(f.phase, sw.name(), e))?;
            cur.map(|c| c.weight(f.target) > 0).unwrap_or(false)
        } else {
            false
        };
        if !moved {
            self.flight_mut().switched = false;
        }
        let action = if f.failing.is_some() {
            "finish rolling back"
        } else if moved || self.d.policy.resume == Resume::Continue {
            "continue from the saved phase"
        } else {
            "roll back (traffic never moved)"
        };
        self.emit(DeployEvent::Recovering {
            id: f.id,
            phase: f.phase,
            action: action.into(),
        });
        tracing::warn!(id = f.id, phase = %f.phase, action, "recovering a deployment left by a crashed run");
        if f.failing.is_some() || (!moved && self.d.policy.resume == Resume::RollBack) {
            let (live, problems) = self
                .undo(
                    format!("recovered after a crash in phase {}", f.phase),
                    f.phase,
                    Outcome::Recovered {
                        action: "rolled back".into(),
                    },
                )
                .await;
            if live == LiveTraffic::Affected {
                return Err(Error::NeedsDecision {
                    reason: format!(
                        "recovery could not switch traffic back: {}",
                        problems.join("; ")
                    ),
                });
            }
            self.recovered = false;
            return Ok(Some(self.report_last(RunOutcome::RolledBack)));
        }
        let res = self.drive().await.map(Some);
        self.recovered = false;
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::Fakes;
    use crate::traits::{Capabilities, MockTrafficSwitch};

    /// A switch whose `apply` succeeds but whose read-back shows the old split: the engine must
    /// not trust `apply`'s return value.
    #[tokio::test]
    async fn a_switch_that_does_not_take_effect_fails_verification_and_changes_nothing() {
        let fakes = Fakes::new();
        let mut switch = MockTrafficSwitch::new();
        switch.expect_name().return_const("mock-switch".to_string());
        switch.expect_capabilities().returning(Capabilities::basic);
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
}
