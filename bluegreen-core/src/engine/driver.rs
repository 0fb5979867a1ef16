//! The driver: runs the table's phases from the saved one until done, waiting or failed; completes
//! a run; recovers a flight left by a crashed run.

use std::time::{Duration, Instant};

use tracing::Instrument;

use super::run::{wrap_id, Run};
use super::table::{self, Step};
use super::Report;
use super::RunOutcome;
use crate::error::{Error, LiveTraffic, Result};
use crate::events::DeployEvent;
use crate::ledger::TrafficLedger;
use crate::policy::Resume;
use crate::state::{
    HistoryEntry, InFlight, Outcome, Phase, RunKind, SlotRecord, Timestamp, Waiting,
};
use crate::traits::DbBinding;
use crate::types::{Release, Slot};

impl Run<'_> {
    /// Records a new flight at its first phase after planning and saves it.
    pub(super) async fn start(
        &mut self,
        kind: RunKind,
        release: Release,
        target: Slot,
        previous: Option<Slot>,
        reuse_target: bool,
    ) -> Result<()> {
        let id = self.state.last_id + 1;
        self.state.last_id = id;
        // The names of its secrets are recorded (never the values): a redeploy needs them all.
        let mut release = release;
        release.secret_keys = release.needed_secrets();
        let first = table::following(Phase::Plan)
            .expect("phases after the plan")
            .phase;
        self.state.in_flight = Some(InFlight {
            id,
            kind,
            release: release.clone(),
            target,
            previous,
            previous_split: self.state.split.clone(),
            phase: first,
            step: 0,
            switched: false,
            reuse_target,
            endpoints: Vec::new(),
            binding: Default::default(),
            irreversible: None,
            waiting: None,
            failing: None,
            previewing: false,
            paused: false,
            counters_at_start: None,
            counters_at_switch: None,
            started_at: Timestamp::now(),
        });
        // The ledger's first snapshot, before anything changes.
        let counters = self.read_counters().await;
        self.flight_mut().counters_at_start = counters;
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
        if let Err(e) = self.save().await {
            self.state.in_flight = None;
            return Err(wrap_id(id, kind, Phase::Plan, self.d.store.name(), e));
        }
        Ok(())
    }

    /// The phase to run after `phase` finished: the next row of the table, or the start of the
    /// per-step group again while canary steps remain. `None` once the last phase is done.
    pub(super) fn advance(&mut self, phase: Phase) -> Option<Phase> {
        let next = table::following(phase);
        let group_ends = table::spec(phase).per_step && !next.map(|n| n.per_step).unwrap_or(false);
        if group_ends {
            let n = self.steps().len();
            let f = self.flight_mut();
            if f.step + 1 < n {
                f.step += 1;
                return Some(table::first_per_step());
            }
        }
        next.map(|n| n.phase)
    }

    /// Runs phases from the saved one until done, waiting, or failed.
    pub(super) async fn drive(&mut self) -> Result<Report> {
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
            let spec = table::spec(phase);
            if spec.undo.contains(&table::Undo::SwitchBack) {
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
            let res = (spec.handler)(self).instrument(span).await;
            match res {
                Ok(Step::Continue) => self.emit(DeployEvent::PhaseCompleted {
                    id,
                    phase,
                    elapsed: t.elapsed(),
                }),
                Ok(Step::Skip(reason)) => self.emit(DeployEvent::PhaseSkipped {
                    id,
                    phase,
                    reason: reason.to_string(),
                }),
                Ok(Step::Wait(waiting)) => return self.wait(phase, waiting).await,
                Err((_, e)) if matches!(e, Error::LockLost { .. }) => {
                    // Another run holds the lock now: change nothing more, undo included.
                    return Err(self.wrap(phase, self.d.store.name(), e));
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
            match self.advance(phase) {
                Some(next) => self.flight_mut().phase = next,
                None => return self.done().await,
            }
        }
    }

    /// Saves the flight as waiting for a person and reports it.
    async fn wait(&mut self, phase: Phase, waiting: Waiting) -> Result<Report> {
        let id = self.flight().id;
        let reason = match &waiting {
            Waiting::Gate => "waiting for promote (manual gate)".to_string(),
            Waiting::Inconclusive { reason } => format!("analysis inconclusive: {reason}"),
            Waiting::Decision { reason } => reason.clone(),
        };
        self.flight_mut().waiting = Some(waiting.clone());
        // The traffic so far, for the person deciding.
        self.ledger = Some(self.ledger_now().await);
        if let Err(e) = self.save().await {
            return Err(self.fail(phase, self.d.store.name().to_string(), e).await);
        }
        self.emit(DeployEvent::Waiting { id, reason });
        Ok(self.report(RunOutcome::Waiting(waiting)))
    }

    /// The last phase is done: record the run as finished.
    async fn done(&mut self) -> Result<Report> {
        let id = self.flight().id;
        let ledger = self.ledger_now().await;
        self.ledger = Some(ledger.clone());
        self.emit(DeployEvent::Traffic {
            id,
            step: self.flight().step,
            ledger,
        });
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
            let last = table::PHASES[table::PHASES.len() - 1].phase;
            return Err(self.wrap(last, self.d.store.name(), e));
        }
        self.emit(DeployEvent::Finished {
            id,
            outcome,
            elapsed: self.started.elapsed(),
        });
        Ok(report)
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
            ledger: self
                .ledger
                .clone()
                .unwrap_or_else(|| TrafficLedger::not_measured("the deployment did not finish")),
        });
    }

    /// Called with the lock held: a flight that is not waiting was left by a run that died.
    pub(super) async fn recover_if_crashed(&mut self) -> Result<Option<Report>> {
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
        let current = if f.switched {
            sw.current()
                .await
                .map_err(|e| self.wrap(f.phase, sw.name(), e))?
        } else {
            None
        };
        let moved = current
            .as_ref()
            .map(|c| c.weight(f.target) > 0)
            .unwrap_or(false);
        if !moved {
            self.flight_mut().switched = false;
            if f.switched {
                self.follow_switch_back(&f, current);
            }
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
                .await?;
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
