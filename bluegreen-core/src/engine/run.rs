//! One locked run over the state: saving, events, retries and error context shared by the phases.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::builder::Inner;
use super::lease::LeaseKeeper;
use super::report::Report;
use super::RunOutcome;
use crate::error::{Error, LiveTraffic, Result};
use crate::events::DeployEvent;
use crate::ledger::{SwitchCounters, TrafficLedger};
use crate::policy::{CanaryStep, OnTimeout, Policy};
use crate::state::{DeploymentState, InFlight, Phase, RunKind};
use crate::traits::{
    DbBinding, DbContext, DbStep, HookContext, HookPoint, InstanceState, Reversibility,
};
use crate::types::{Endpoints, Release, Slot, TrafficSplit};
use std::collections::BTreeMap;

/// A phase failure: the backend that failed and the error.
pub(super) type Failure = (String, Error);
/// What a phase returns.
pub(super) type PhaseResult<T> = std::result::Result<T, Failure>;

/// Names the backend that failed.
pub(super) trait By<T> {
    fn by(self, backend: &str) -> PhaseResult<T>;
}

impl<T> By<T> for Result<T> {
    fn by(self, backend: &str) -> PhaseResult<T> {
        self.map_err(|e| (backend.to_string(), e))
    }
}

/// One locked run over the state.
pub(super) struct Run<'a> {
    pub(super) d: &'a Inner,
    pub(super) state: DeploymentState,
    lease: Option<LeaseKeeper>,
    /// The database binding with its secrets, for this run only (never persisted).
    pub(super) binding: Option<DbBinding>,
    pub(super) started: Instant,
    /// Set while finishing a flight left by a crashed run.
    pub(super) recovered: bool,
    /// The last change this run was cleared to make (reported if it loses its lock).
    last_change: std::sync::Mutex<Option<String>>,
    /// The traffic ledger, once the run finished or stopped to wait.
    pub(super) ledger: Option<TrafficLedger>,
}

/// The slot a deploy targets and the live slot, from the state.
pub(super) fn plan_target(state: &DeploymentState) -> (Slot, Option<Slot>) {
    match state.active {
        Some(a) => (a.other(), Some(a)),
        None => (Slot::Blue, None),
    }
}

/// Refuses, before anything changes, a plan the switch cannot carry out.
pub(super) fn check_capabilities(d: &Inner, kind: RunKind) -> Result<()> {
    let caps = d.switch.capabilities();
    let p = &d.policy;
    let name = d.switch.name().to_string();
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
    // A switch that cannot pause is not refused for `pause_during_cutover`: the cutover then
    // runs without holding requests (see `pause_for_cutover`).
    if d.analyses.iter().any(|a| a.requires_metrics()) && !caps.metrics {
        return Err(missing(
            "metrics",
            "remove the metrics analysis or use a switch with metrics",
        ));
    }
    Ok(())
}

/// The steps of a run: the canary steps, then 100 % if they do not reach it. Rollbacks and the
/// first deploy (nothing to split traffic with) go to 100 % at once.
pub(super) fn canary_steps(p: &Policy, kind: RunKind, first: bool) -> Vec<CanaryStep> {
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

/// The split of a canary step.
pub(super) fn step_split(target: Slot, weight: u8) -> TrafficSplit {
    TrafficSplit::canary(target, weight).expect("validated canary weight")
}

impl<'a> Run<'a> {
    pub(super) fn new(d: &'a Inner, state: DeploymentState, lease: LeaseKeeper) -> Self {
        Run {
            d,
            state,
            lease: Some(lease),
            binding: None,
            started: Instant::now(),
            recovered: false,
            last_change: Default::default(),
            ledger: None,
        }
    }

    /// Proves this run still holds the deployment lock before it changes anything (`what`: the
    /// change, for the report if the lock is gone). A run that lost its lock stops at once, undo
    /// included: another run may be changing the same slots.
    ///
    /// # Errors
    /// [`Error::LockLost`] naming why and the last change this run made.
    pub(super) async fn fence(&self, what: impl Into<String>) -> Result<()> {
        let what = what.into();
        let Some(lease) = &self.lease else {
            return Ok(());
        };
        match lease.check().await {
            Ok(()) => {
                *self.last_change.lock().unwrap_or_else(|p| p.into_inner()) = Some(what);
                Ok(())
            }
            Err(e) => Err(self.stopped(e, &what)),
        }
    }

    /// A lost lock as the caller sees it: why, what the run was about to do, and the last change
    /// it made. Other errors pass through.
    fn stopped(&self, e: Error, before: &str) -> Error {
        match e {
            Error::LockLost { reason } => Error::LockLost {
                reason: format!(
                    "{reason}; this run stopped before: {before}; the last change it made: {}",
                    self.last_change
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_deref()
                        .unwrap_or("none")
                ),
            },
            e => e,
        }
    }

    /// [`fence`](Self::fence) inside a phase: a lost lock is blamed on the state store.
    pub(super) async fn fenced(&self, what: impl Into<String>) -> PhaseResult<()> {
        self.fence(what).await.by(self.d.store.name())
    }

    pub(super) fn interrupted(&self) -> bool {
        self.d.interrupted.load(Ordering::SeqCst)
    }

    /// A safe point inside a long wait: stops on an interrupt, and at once when the lease is
    /// known to be lost (the renewal task found it gone, or it expired).
    pub(super) fn check_interrupt(&self) -> PhaseResult<()> {
        if self.interrupted() {
            return Err(("operator".to_string(), Error::Interrupted));
        }
        if let Some(why) = self.lease.as_ref().and_then(|l| l.lost()) {
            return Err((
                self.d.store.name().to_string(),
                self.stopped(Error::LockLost { reason: why }, "waiting"),
            ));
        }
        Ok(())
    }

    pub(super) fn emit(&self, ev: DeployEvent) {
        tracing::debug!(event = ?ev, "deploy event");
        let _ = self.d.events.send(ev);
    }

    pub(super) fn flight(&self) -> &InFlight {
        self.state
            .in_flight
            .as_ref()
            .expect("a deployment in flight")
    }

    pub(super) fn flight_mut(&mut self) -> &mut InFlight {
        self.state
            .in_flight
            .as_mut()
            .expect("a deployment in flight")
    }

    /// Saves the state, unless the lease was lost.
    pub(super) async fn save(&mut self) -> Result<()> {
        let Some(keeper) = &self.lease else {
            return Err(Error::LockLost {
                reason: "the lock was already released".into(),
            });
        };
        if let Some(why) = keeper.lost() {
            return Err(self.stopped(Error::LockLost { reason: why }, "saving the state"));
        }
        let rev = self
            .d
            .store
            .save(&self.state, &keeper.lease())
            .await
            .map_err(|e| self.stopped(e, "saving the state"))?;
        self.state.revision = rev;
        Ok(())
    }

    /// Releases the lock and returns the run's result.
    pub(super) async fn finish<T>(mut self, res: Result<T>) -> Result<T> {
        if let Some(lease) = self.lease.take() {
            lease.release().await;
        }
        res
    }

    /// A phase error of the flight in progress (or of the one about to start).
    pub(super) fn wrap(&self, phase: Phase, backend: &str, e: Error) -> Error {
        let (kind, id) = self
            .state
            .in_flight
            .as_ref()
            .map(|f| (f.kind, f.id))
            .unwrap_or((RunKind::Deploy, self.state.last_id + 1));
        wrap_id(id, kind, phase, backend, e)
    }

    /// The steps of the flight in progress.
    pub(super) fn steps(&self) -> Vec<CanaryStep> {
        let (kind, first) = match &self.state.in_flight {
            Some(f) => (f.kind, f.previous.is_none()),
            None => (RunKind::Deploy, self.state.active.is_none()),
        };
        canary_steps(&self.d.policy, kind, first)
    }

    /// The canary step the flight is at.
    pub(super) fn current_step(&self) -> CanaryStep {
        let steps = self.steps();
        steps[self.flight().step.min(steps.len() - 1)].clone()
    }

    pub(super) fn report(&self, outcome: RunOutcome) -> Report {
        let f = self.flight();
        Report {
            id: f.id,
            kind: f.kind,
            version: f.release.version.clone(),
            target: f.target,
            outcome,
            elapsed: self.started.elapsed(),
            ledger: self
                .ledger
                .clone()
                .unwrap_or_else(|| TrafficLedger::not_measured("the deployment has not finished")),
        }
    }

    /// A snapshot of the switch's counters; `None` when it keeps none or they cannot be read
    /// (the ledger then says "not measured"; a deployment never fails over its ledger).
    pub(super) async fn read_counters(&self) -> Option<SwitchCounters> {
        let sw = &self.d.switch;
        match sw.counters().await {
            Ok(c) => Some(c),
            Err(Error::Unsupported { .. }) => None,
            Err(e) => {
                tracing::warn!(switch = sw.name(), error = %e, "reading the switch's counters failed");
                None
            }
        }
    }

    /// The flight's traffic ledger from its start until now.
    pub(super) async fn ledger_now(&self) -> TrafficLedger {
        let sw = &self.d.switch;
        let f = self.flight();
        let end = match sw.counters().await {
            Ok(c) => c,
            Err(Error::Unsupported { .. }) => {
                return TrafficLedger::not_measured(format!(
                    "the switch {} keeps no request counters",
                    sw.name()
                ))
            }
            Err(e) => {
                return TrafficLedger::not_measured(format!(
                    "reading the counters of the switch {} failed: {e}",
                    sw.name()
                ))
            }
        };
        match &f.counters_at_start {
            Some(start) => TrafficLedger::between(start, f.counters_at_switch.as_ref(), &end),
            None => TrafficLedger::not_measured(format!(
                "the counters of the switch {} were not read when the deployment started",
                sw.name()
            )),
        }
    }

    /// `release` with its full secret environment: what the secret sources provide (asked now),
    /// under the secrets already on it (set by the caller, or the database binding's). Checks
    /// that every secret the release needs ([`Release::needed_secrets`]) is there.
    ///
    /// # Errors
    /// [`Error::SecretsUnavailable`] naming the missing variables (never values) or the source
    /// that failed.
    pub(super) async fn with_secrets(&self, release: &Release) -> Result<Release> {
        let needed = release.needed_secrets();
        let recorded = &release.secret_keys;
        if !recorded.is_empty() && recorded.iter().all(|k| release.secret_env.contains_key(k)) {
            // Resolved earlier in this run (the values are in memory): asking the sources again
            // (a command, files) would give the same, and the release's own values win anyway.
            return Ok(release.clone());
        }
        let mut secret_env = BTreeMap::new();
        for source in &self.d.secrets {
            let got = source.resolve(release).await.map_err(|e| match e {
                e @ Error::SecretsUnavailable { .. } => e,
                e => Error::SecretsUnavailable {
                    version: release.version.to_string(),
                    reason: format!("secret source {}: {e}", source.name()),
                },
            })?;
            secret_env.extend(got);
        }
        secret_env.extend(release.secret_env.clone());
        let missing: Vec<&String> = needed
            .iter()
            .filter(|k| !secret_env.contains_key(*k))
            .collect();
        if !missing.is_empty() {
            let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            return Err(Error::SecretsUnavailable {
                version: release.version.to_string(),
                reason: format!(
                    "it needs {} and no secret source provides {}",
                    names.join(", "),
                    if names.len() == 1 { "it" } else { "them" }
                ),
            });
        }
        let mut full = release.clone();
        full.secret_env = secret_env;
        Ok(full)
    }

    /// Before a deploy starts anything: `release` with its secrets (their names are then
    /// recorded with it), after checking that the live release's can be had too when a failure
    /// may have to start it again (its slot is stopped after the switch).
    pub(super) async fn resolve_secrets(&self, release: &Release) -> Result<Release> {
        let full = self.with_secrets(release).await?;
        if self.d.policy.keep_old == crate::policy::KeepOld::Stop {
            if let Some(live) = self.state.live_release() {
                self.with_secrets(live).await?;
            }
        }
        Ok(full)
    }

    /// The report of a deploy that has nothing to do: `release`'s version is live on the active
    /// slot, the environment runs it there and the switch sends it all traffic. `None` otherwise
    /// (a live version that is not really serving is deployed again).
    pub(super) async fn already_live(&self, release: &Release) -> Result<Option<Report>> {
        let Some(active) = self.state.active else {
            return Ok(None);
        };
        let Some(record) = self.state.slots.get(active).as_ref() else {
            return Ok(None);
        };
        if record.release.version != release.version {
            return Ok(None);
        }
        let status = self.d.environment.status(active).await?;
        let serving = status.state == InstanceState::Running
            && status.version.as_ref() == Some(&release.version)
            && self
                .d
                .switch
                .current()
                .await?
                .map(|c| c.weight(active) == 100)
                .unwrap_or(false);
        if !serving {
            tracing::warn!(
                version = %release.version,
                slot = %active,
                "the version is recorded live but is not serving; deploying it again"
            );
            return Ok(None);
        }
        Ok(Some(Report {
            id: record.deployment,
            kind: RunKind::Deploy,
            version: release.version.clone(),
            target: active,
            outcome: RunOutcome::AlreadyLive,
            elapsed: self.started.elapsed(),
            ledger: TrafficLedger::not_measured(
                "nothing was deployed: the version is already live",
            ),
        }))
    }

    pub(super) fn report_last(&self, outcome: RunOutcome) -> Report {
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
            ledger: h.ledger.clone(),
        }
    }

    /// Both slots' endpoints: the target's from the flight, the other's from its record.
    pub(super) fn endpoints(&self) -> Endpoints {
        let f = self.flight();
        let mut eps = Endpoints::default();
        eps.set(f.target, f.endpoints.clone());
        let other = f.target.other();
        if let Some(r) = self.state.slots.get(other) {
            eps.set(other, r.endpoints.clone());
        }
        eps
    }

    pub(super) fn db_ctx(&self) -> DbContext {
        let f = self.flight();
        DbContext {
            live: f.previous,
            target: f.target,
            release: f.release.clone(),
        }
    }

    /// Remembers (persisted with the flight) that a step that cannot be undone has run.
    pub(super) fn note_db_step(&mut self, step: &DbStep) {
        if let Reversibility::Irreversible { what } = &step.reversibility {
            self.flight_mut().irreversible = Some(what.clone());
        }
    }

    /// Retries retryable errors per the policy; the only retry loop in bluegreen.
    pub(super) async fn retry<T, F, Fut>(&self, mut op: F) -> Result<T>
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

    /// Runs the hooks registered at `point`, each within its timeout.
    pub(super) async fn run_hooks(&mut self, point: HookPoint) -> PhaseResult<()> {
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
        for h in self.d.hooks_at(point) {
            let name = h.hook.name().to_string();
            self.fenced(format!("{point:?} hook {name}")).await?;
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
}

/// A phase error of deployment `id`, before undo says what happened to live traffic. A run that
/// lost its lock has not checked live traffic and says so.
pub(super) fn wrap_id(id: u64, kind: RunKind, phase: Phase, backend: &str, e: Error) -> Error {
    let live = if matches!(e, Error::LockLost { .. }) {
        LiveTraffic::Unknown
    } else {
        LiveTraffic::Untouched
    };
    Error::Phase {
        kind: kind.as_str(),
        id,
        phase,
        backend: backend.to_string(),
        live,
        cleanup: Vec::new(),
        source: Box::new(e),
    }
}
