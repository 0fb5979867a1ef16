//! The deployment engine: a persisted state machine that reads like the runbook.
//!
//! A deploy runs the [`Phase`]s of one table ([`table::PHASES`]) in order. Before each phase the
//! state is saved with that phase, so a crash leaves a record of exactly where the deployment
//! stopped; a new [`Deployer`] on the same store finishes it (traffic already moved) or undoes it
//! (traffic never moved) and never switches twice. Any failure before the switch leaves live
//! traffic untouched and removes the target; any failure after it switches back first. After an
//! irreversible database step the engine does not roll back on its own: it stops and asks
//! (`promote` / `abort`). A run succeeds only after its last phase, the final data-path check
//! ([`Phase::ConfirmDataPath`]), has read the switch back and, with a probe, seen the target
//! release answer through it.
//!
//! Layout: `builder` (parts and policy), `lease` (the lock kept alive), `report` (what operations
//! return), `run` (one locked run: save, emit, retry, errors), `table` (the runbook: order,
//! handlers, reversibility, undo), `phases` and `readiness` (the handlers, in runbook order),
//! `driver` (drive, complete, crash recovery), `undo` (failure, undo, switch-back), `plan` (the
//! dry run). This file holds the public operations.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::broadcast;

mod builder;
mod driver;
mod lease;
mod phases;
mod plan;
mod readiness;
mod report;
mod run;
mod table;
#[cfg(test)]
mod tests;
mod undo;

pub use builder::DeployerBuilder;
pub use report::{Plan, PlannedStep, Report, RunOutcome, StatusReport};

use builder::Inner;
use lease::LeaseKeeper;
use run::{check_capabilities, plan_target, Run};

use crate::error::{Error, LiveTraffic, Result};
use crate::events::DeployEvent;
use crate::policy::Policy;
use crate::state::{
    DeploymentState, HistoryEntry, LockInfo, LockOwner, Outcome, Phase, RunKind, Waiting,
};
use crate::traits::{DbContext, InstanceState};
use crate::types::{PerSlot, Release, Slot};

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
        self.inner.interrupted.store(true, Ordering::SeqCst);
    }

    /// Takes the lock and loads the state: the start of every run that changes anything.
    async fn begin(&self, purpose: String) -> Result<Run<'_>> {
        let d = &*self.inner;
        d.interrupted.store(false, Ordering::SeqCst);
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
        Ok(Run::new(d, state, lease))
    }

    /// Deploys `release` to the idle slot and switches traffic to it.
    ///
    /// Deploying the version that is already live, running and receiving all traffic changes
    /// nothing and returns [`RunOutcome::AlreadyLive`]: the idle slot keeps the rollback target (a
    /// retried CI job must not destroy it). [`Deployer::redeploy`] replaces the idle slot anyway.
    ///
    /// A deployment found in flight from a crashed run is recovered first (see [`Deployer::recover`]);
    /// one waiting for a person is refused with [`Error::InFlight`].
    ///
    /// # Errors
    /// [`Error::Phase`] naming the phase, the backend and what happened to live traffic; before it
    /// starts, [`Error::Locked`], [`Error::InFlight`] or [`Error::MissingCapability`].
    pub async fn deploy(&self, release: Release) -> Result<Report> {
        self.deploy_release(release, false).await
    }

    /// Deploys `release` to the idle slot even when its version is already live. The idle slot's
    /// release, the rollback target, is replaced: afterwards both slots hold this version and
    /// `rollback` can only reach an older release by redeploying it from the state's record.
    pub async fn redeploy(&self, release: Release) -> Result<Report> {
        self.deploy_release(release, true).await
    }

    async fn deploy_release(&self, release: Release, redeploy: bool) -> Result<Report> {
        let mut run = self.begin(format!("deploy {}", release.version)).await?;
        let res = async {
            run.recover_if_crashed().await?;
            if !redeploy {
                if let Some(report) = run.already_live(&release).await? {
                    return Ok(report);
                }
            }
            let (target, previous) = plan_target(&run.state);
            check_capabilities(run.d, RunKind::Deploy)?;
            let release = run.resolve_secrets(&release).await?;
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
                // Before `start` there is no flight to name the run: say it is a rollback.
                .map_err(|e| {
                    let id = run.state.last_id + 1;
                    let env = run.d.environment.name();
                    run::wrap_id(id, RunKind::Rollback, Phase::Plan, env, e)
                })?;
            let warm = status.state == InstanceState::Running
                && status.version.as_ref() == Some(&release.version);
            if !warm {
                // It will be started again: refuse now if its secrets cannot be had.
                run.with_secrets(&release).await?;
            }
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
            let phase = f.phase;
            // A gate or an inconclusive analysis was a decision to go on; after a failure past an
            // irreversible step, the failed phase is tried again.
            let next = match waiting {
                Waiting::Gate | Waiting::Inconclusive { .. } => run.advance(phase),
                Waiting::Decision { .. } => Some(phase),
            };
            let Some(next) = next else {
                return Err(Error::invalid(
                    "promote",
                    phase.to_string(),
                    "nothing is left to run after this phase",
                ));
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
                .await?;
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
    /// traffic had moved, otherwise undoes it (or continues, with [`Resume::Continue`](crate::Resume::Continue)). Returns
    /// `None` when nothing needed recovery. Never switches twice.
    pub async fn recover(&self) -> Result<Option<Report>> {
        let mut run = self.begin("recover".into()).await?;
        let res = run.recover_if_crashed().await;
        run.finish(res).await
    }

    /// A dry run of `deploy(release)`: every step and what each backend would change. Reads the
    /// backends; changes nothing (no lock is taken).
    pub async fn plan(&self, release: &Release) -> Result<Plan> {
        plan::plan(&self.inner, release).await
    }

    /// The recorded state, the backends' view of both slots, the lock, and any drift between them.
    ///
    /// With a [`DataPathProbe`](crate::DataPathProbe), at rest (nothing in flight, all traffic on
    /// the live slot), drift also covers the data path: a switch that routes to endpoints that do
    /// not answer with the live release (a few probes within at most 3 s) is reported.
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
        if let Some(problem) = data_path_drift(d, &state, switch.as_ref()).await {
            drift.push(problem);
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
            run.fence(format!("cleanup: {}: remove {idle}", env.name()))
                .await?;
            env.remove(idle).await?;
            if let (Some(db), Some(live)) = (&run.d.database, run.state.live_release().cloned()) {
                run.fence(format!("cleanup: {}: finalize", db.name()))
                    .await?;
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
                run.fence(format!(
                    "reset: {}: remove {slot}",
                    run.d.environment.name()
                ))
                .await?;
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

    /// Removes the deployment lock of a holder that is gone (e.g. a run that died on another
    /// machine). Returns what was removed. A holder in this same process is taken to be the
    /// caller's own (a run it abandoned).
    ///
    /// # Errors
    /// [`Error::HolderAlive`] when the holder is another process still running on this host:
    /// breaking its lock would let two runs change the slots at once (that run would stop at its
    /// next step, fenced, but only after the new holder may have started). See
    /// [`force_break_lock`](Self::force_break_lock).
    pub async fn break_lock(&self) -> Result<Option<LockInfo>> {
        if let Some(holder) = self.inner.store.lock_info().await? {
            if holder.owner.is_other_process() && holder.owner.alive_here() == Some(true) {
                return Err(Error::HolderAlive {
                    holder: Box::new(holder),
                });
            }
        }
        self.inner.store.break_lock().await
    }

    /// Removes the deployment lock whoever holds it, even a live process on this host. That run,
    /// fenced, stops at its next step without changing anything more. Returns what was removed.
    pub async fn force_break_lock(&self) -> Result<Option<LockInfo>> {
        self.inner.store.break_lock().await
    }
}

/// The longest `status` waits for the live release to answer through the switch.
const STATUS_PROBE_WITHIN: std::time::Duration = std::time::Duration::from_secs(3);

/// With a probe, at rest, and all traffic on the live slot: whether requests through the switch
/// reach the live release. A switch that routes to endpoints that do not answer is drift.
async fn data_path_drift(
    d: &Inner,
    state: &DeploymentState,
    switch: Option<&crate::types::TrafficSplit>,
) -> Option<String> {
    let probe = d.probe.as_ref()?;
    let active = state.active?;
    let release = state.live_release()?;
    if state.in_flight.is_some() || switch.map(|s| s.weight(active)) != Some(100) {
        // A run is moving traffic, or the split itself already differs (reported above).
        return None;
    }
    let within = d.policy.verify_timeout.min(STATUS_PROBE_WITHIN);
    match phases::probe_until_served(&**probe, &release.version, within, 1, || false).await {
        phases::Probed::NotServed(last) => Some(format!(
            "the switch routes to endpoints that do not answer with {} (live on {active}): {last}",
            release.version
        )),
        _ => None,
    }
}
