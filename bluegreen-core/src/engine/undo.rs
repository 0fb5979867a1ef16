//! Failure, undo and switch-back. Undo reads the table for what the phases reached may have left
//! behind, and the flight's persisted flags for what actually happened, so it works the same in
//! the run that failed and in a new run recovering after a crash.

use std::sync::atomic::Ordering;

use super::run::Run;
use super::table::{self, Undo};
use crate::error::{Error, LiveTraffic, Result};
use crate::events::DeployEvent;
use crate::state::{HistoryEntry, InFlight, Outcome, Phase, Timestamp, Waiting};
use crate::traits::{DbContext, HookPoint, InstanceState};
use crate::types::{Slot, TrafficSplit};

impl Run<'_> {
    /// Handles a failed phase: stop and ask after an irreversible step, otherwise undo.
    pub(super) async fn fail(&mut self, phase: Phase, backend: String, err: Error) -> Error {
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
        match self.undo(reason, phase, outcome).await {
            Ok((live, cleanup)) => Error::Phase {
                kind: f.kind.as_str(),
                id: f.id,
                phase,
                backend,
                live,
                cleanup,
                source: Box::new(err),
            },
            Err(lost) => Error::Phase {
                kind: f.kind.as_str(),
                id: f.id,
                phase,
                backend,
                live: LiveTraffic::Unknown,
                cleanup: vec![format!("undo stopped after the failure: {err}")],
                source: Box::new(lost),
            },
        }
    }

    /// Undoes the flight that reached `phase`: what the table says the phases reached may have
    /// left, as far as the flight's flags say it happened (resume, stop preview, switch back —
    /// restarting the previous slot if needed —, roll the database back, remove the target), then
    /// records `outcome`. Returns what happened to live traffic and any problems met (best effort:
    /// a failed step does not stop the others).
    ///
    /// # Errors
    /// [`Error::LockLost`]: the run no longer holds the lock, so it stopped undoing at once and
    /// changed nothing more (another run may own the slots now).
    pub(super) async fn undo(
        &mut self,
        reason: String,
        phase: Phase,
        outcome: Outcome,
    ) -> Result<(LiveTraffic, Vec<String>)> {
        let mut problems = Vec::new();
        // An interrupt has been honoured by stopping; the undo itself must run to the end.
        self.d.interrupted.store(false, Ordering::SeqCst);
        self.flight_mut().failing = Some(reason.clone());
        match self.save().await {
            Err(e @ Error::LockLost { .. }) => return Err(e),
            Err(e) => problems.push(format!("saving the rollback marker failed: {e}")),
            Ok(()) => {}
        }
        let f = self.flight().clone();
        self.emit(DeployEvent::RollingBack {
            id: f.id,
            reason: reason.clone(),
        });
        let sw = self.d.switch.clone();
        let env = self.d.environment.clone();
        let caps = sw.capabilities();
        let mut live = LiveTraffic::Untouched;
        let mut target_serves = false;
        for todo in table::undo_after(phase) {
            match todo {
                Undo::Resume if caps.pause && f.paused => {
                    self.fence(format!("undo: {}: resume", sw.name())).await?;
                    if let Err(e) = sw.resume().await {
                        problems.push(format!("{}: resume failed: {e}", sw.name()));
                    }
                    self.flight_mut().paused = false;
                }
                Undo::StopPreview if caps.preview && f.previewing => {
                    self.fence(format!("undo: {}: stop preview routing", sw.name()))
                        .await?;
                    if let Err(e) = sw.preview(None, &self.endpoints()).await {
                        problems.push(format!("{}: stopping preview failed: {e}", sw.name()));
                    }
                }
                Undo::SwitchBack if f.switched => {
                    let current = sw.current().await.ok().flatten();
                    let moved = current
                        .as_ref()
                        .map(|c| c.weight(f.target) > 0)
                        .unwrap_or(true);
                    if !moved {
                        self.follow_switch_back(&f, current);
                        continue;
                    }
                    match f.previous.filter(|p| *p != f.target) {
                        Some(prev) => match self.switch_back(prev, &f).await {
                            Ok(()) => live = LiveTraffic::RolledBack,
                            Err(e @ Error::LockLost { .. }) => return Err(e),
                            Err(e) => {
                                problems.push(format!("switching back to {prev} failed: {e}"));
                                live = LiveTraffic::Affected;
                                target_serves = true;
                            }
                        },
                        // First deploy: there is nothing to switch back to, and there was no
                        // live traffic before it.
                        None => self.state.active = None,
                    }
                }
                Undo::RollBackDatabase if !target_serves => {
                    if let Some(db) = self.d.database.clone() {
                        self.fence(format!("undo: {}: roll back", db.name()))
                            .await?;
                        if let Err(e) = db.rollback(&self.db_ctx()).await {
                            problems.push(format!("{}: database rollback failed: {e}", db.name()));
                        }
                    }
                }
                Undo::RunAfterRollbackHooks if live == LiveTraffic::RolledBack => {
                    match self.run_hooks(HookPoint::AfterRollback).await {
                        Ok(()) => {}
                        Err((_, e @ Error::LockLost { .. })) => return Err(e),
                        Err((name, e)) => {
                            problems.push(format!("after_rollback hook {name} failed: {e}"))
                        }
                    }
                }
                Undo::RemoveTarget if !f.reuse_target && !target_serves => {
                    self.fence(format!("undo: {}: remove {}", env.name(), f.target))
                        .await?;
                    match env.remove(f.target).await {
                        Ok(()) => self.state.slots.set(f.target, None),
                        Err(e) => problems.push(format!(
                            "{}: removing target {} failed: {e} (remove it with `cleanup`)",
                            env.name(),
                            f.target
                        )),
                    }
                }
                _ => {}
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
        // What clients saw, the failure and the switch back included.
        let ledger = self.ledger_now().await;
        self.state.in_flight = None;
        self.state.record(HistoryEntry {
            id: f.id,
            kind: f.kind,
            version: f.release.version.clone(),
            slot: f.target,
            outcome: outcome.clone(),
            started_at: f.started_at,
            finished_at: Timestamp::now(),
            ledger,
        });
        match self.save().await {
            Err(e @ Error::LockLost { .. }) => return Err(e),
            Err(e) => problems.push(format!("saving the final state failed: {e}")),
            Ok(()) => {}
        }
        self.emit(DeployEvent::Finished {
            id: f.id,
            outcome,
            elapsed: self.started.elapsed(),
        });
        Ok((live, problems))
    }

    /// The switch does not route to the flight's target although the state may say so: a run
    /// recorded the target live, then its undo switched traffic back and it died before saving
    /// that. The state follows the switch; left as it was, the next deploy would target the live
    /// slot.
    pub(super) fn follow_switch_back(&mut self, f: &InFlight, current: Option<TrafficSplit>) {
        if self.state.active == Some(f.target) {
            self.state.active = f.previous.filter(|p| *p != f.target);
            self.state.split = current;
        }
    }

    /// Routes all traffic back to `prev`, restarting it first if it was stopped.
    async fn switch_back(&mut self, prev: Slot, f: &InFlight) -> Result<()> {
        let sw = self.d.switch.clone();
        let env = self.d.environment.clone();
        let mut eps = self.endpoints();
        let status = env.status(prev).await?;
        let fresh = if status.state != InstanceState::Running {
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
            // Its binding and secrets were never persisted: derive and resolve them again.
            let mut release = record.release.clone();
            if let Some(db) = self.d.database.clone() {
                let ctx = DbContext {
                    live: Some(f.target),
                    target: prev,
                    release: release.clone(),
                };
                release = self.retry(|| db.bind(&ctx)).await?.apply_to(&release);
            }
            let release = self.with_secrets(&release).await?;
            self.fence(format!(
                "switch back: {}: redeploy {} to {prev}",
                env.name(),
                release.version
            ))
            .await?;
            let new_eps = self.retry(|| env.deploy(prev, &release)).await?;
            self.await_healthy(prev, &new_eps)
                .await
                .map_err(|(_, e)| e)?;
            Some(new_eps)
        } else if !status.endpoints.is_empty() && status.endpoints != eps.get(prev).as_slice() {
            // Running where the record does not say: restarted by a run that died before saving
            // its endpoints. Route to where it listens, once it passes the health gate.
            self.await_healthy(prev, &status.endpoints)
                .await
                .map_err(|(_, e)| e)?;
            Some(status.endpoints)
        } else {
            None
        };
        if let Some(new_eps) = fresh {
            eps.set(prev, new_eps.clone());
            if let Some(r) = self.state.slots.get_mut(prev) {
                r.endpoints = new_eps;
            }
            // Saved before traffic goes there: after a crash from here on, the record still
            // says where the old slot listens.
            self.save().await?;
        }
        let split = f
            .previous_split
            .clone()
            .filter(|s| s.weight(prev) == 100)
            .unwrap_or_else(|| TrafficSplit::all(prev));
        self.fence(format!("switch back: {}: switch to {split}", sw.name()))
            .await?;
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
}
