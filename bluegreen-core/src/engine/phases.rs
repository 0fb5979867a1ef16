//! The phases, in runbook order: one method each. The order itself lives in the table
//! ([`super::table::PHASES`]); a phase says only whether it did its work, skipped, or waits.

use std::time::{Duration, Instant};

use super::run::{step_split, By, PhaseResult, Run};
use super::table::Step;
use crate::analysis::{AnalysisContext, DataPathProbe, Verdict};
use crate::error::Error;
use crate::events::DeployEvent;
use crate::policy::{KeepOld, Promotion};
use crate::state::{RunKind, Waiting};
use crate::traits::{HookPoint, Prepared};
use crate::types::{Slot, TrafficSplit, Version};

impl Run<'_> {
    /// Lock, load and target choice happen before the flight exists; nothing is left to do.
    pub(super) async fn plan(&mut self) -> PhaseResult<Step> {
        Ok(Step::Continue)
    }

    pub(super) async fn prepare_database(&mut self) -> PhaseResult<Step> {
        let Some(db) = self.d.database.clone() else {
            return Ok(Step::Skip("no database strategy"));
        };
        self.fenced(format!("{}: prepare the database", db.name()))
            .await?;
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
        Ok(Step::Continue)
    }

    pub(super) async fn before_deploy_hooks(&mut self) -> PhaseResult<Step> {
        self.run_hooks(HookPoint::BeforeDeploy).await?;
        Ok(Step::Continue)
    }

    pub(super) async fn deploy_target(&mut self) -> PhaseResult<Step> {
        if self.flight().reuse_target {
            return Ok(Step::Skip("the target already runs this release"));
        }
        if self.binding.is_none() {
            // Resumed after a crash: the secret part of the binding was never persisted.
            if let Some(db) = self.d.database.clone() {
                self.fenced(format!("{}: prepare the database again", db.name()))
                    .await?;
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
        // Never started without its secrets: asked again now (they were never persisted).
        let mut release = self.with_secrets(&release).await.by("secrets")?;
        // Environments that label what they create can name the deployment that created it.
        release
            .labels
            .entry(crate::DEPLOYMENT_LABEL.to_string())
            .or_insert_with(|| f.id.to_string());
        let env = self.d.environment.clone();
        self.fenced(format!(
            "{}: deploy {} to {target}",
            env.name(),
            release.version
        ))
        .await?;
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
        Ok(Step::Continue)
    }

    pub(super) async fn wait_ready(&mut self) -> PhaseResult<Step> {
        let f = self.flight();
        let (target, eps) = (f.target, f.endpoints.clone());
        self.await_healthy(target, &eps).await?;
        Ok(Step::Continue)
    }

    pub(super) async fn after_deploy_hooks(&mut self) -> PhaseResult<Step> {
        self.run_hooks(HookPoint::AfterDeploy).await?;
        Ok(Step::Continue)
    }

    pub(super) async fn preview(&mut self) -> PhaseResult<Step> {
        if !self.d.policy.preview {
            return Ok(Step::Skip("preview off"));
        }
        let sw = self.d.switch.clone();
        let (target, eps) = (self.flight().target, self.endpoints());
        // Recorded before the switch is touched, so undo stops preview routing after a crash too.
        self.flight_mut().previewing = true;
        self.save().await.by(self.d.store.name())?;
        self.fenced(format!("{}: route preview traffic to {target}", sw.name()))
            .await?;
        self.retry(|| sw.preview(Some(target), &eps))
            .await
            .by(sw.name())?;
        Ok(Step::Continue)
    }

    pub(super) async fn smoke_test(&mut self) -> PhaseResult<Step> {
        self.run_hooks(HookPoint::BeforeSwitch).await?;
        Ok(Step::Continue)
    }

    pub(super) async fn gate(&mut self) -> PhaseResult<Step> {
        let f = self.flight();
        if self.d.policy.promotion == Promotion::Manual
            && f.kind == RunKind::Deploy
            && f.previous.is_some()
        {
            Ok(Step::Wait(Waiting::Gate))
        } else {
            Ok(Step::Skip("automatic promotion"))
        }
    }

    pub(super) async fn database_before_switch(&mut self) -> PhaseResult<Step> {
        let Some(db) = self.d.database.clone() else {
            return Ok(Step::Skip("no database strategy"));
        };
        if self.d.policy.pause_during_cutover {
            self.pause_for_cutover().await?;
        }
        self.fenced(format!("{}: database cutover", db.name()))
            .await?;
        let step = {
            let ctx = self.db_ctx();
            self.retry(|| db.before_switch(&ctx)).await
        }
        .by(db.name())?;
        self.note_db_step(&step);
        Ok(Step::Continue)
    }

    /// Holds new requests at the switch, then lets the requests in flight to the live slot
    /// finish (bounded by the policy's `cutover_drain_timeout`), so that the write freeze that
    /// follows ends no request half-way. A switch that cannot pause says so in its
    /// capabilities: the cutover then runs without pausing, as it would with the policy off.
    async fn pause_for_cutover(&mut self) -> PhaseResult<()> {
        let sw = self.d.switch.clone();
        let caps = sw.capabilities();
        if !caps.pause {
            tracing::warn!(
                switch = sw.name(),
                "the switch cannot pause: the database cutover runs without holding requests"
            );
            return Ok(());
        }
        // Recorded before the switch is touched, so undo resumes it after a crash too.
        self.flight_mut().paused = true;
        self.save().await.by(self.d.store.name())?;
        self.fenced(format!("{}: pause", sw.name())).await?;
        sw.pause().await.by(sw.name())?;
        let Some(live) = self
            .flight()
            .previous
            .filter(|p| *p != self.flight().target)
        else {
            return Ok(());
        };
        if !caps.drain {
            return Ok(());
        }
        let bound = self.d.policy.cutover_drain_timeout;
        let deadline = Instant::now() + bound;
        loop {
            let n = sw.in_flight(live).await.by(sw.name())?;
            if n == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err((
                    sw.name().to_string(),
                    Error::Timeout {
                        what: format!(
                            "requests in flight to the live slot {live} finishing before the \
                             database cutover ({n} still in flight; nothing was frozen or \
                             switched, and the held requests were let through): raise \
                             cutover_drain_timeout or deploy when long requests are done"
                        ),
                        after: bound,
                    },
                ));
            }
            self.check_interrupt()?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub(super) async fn switch(&mut self) -> PhaseResult<Step> {
        let sw = self.d.switch.clone();
        let target = self.flight().target;
        let split = step_split(target, self.current_step().weight);
        let eps = self.endpoints();
        if self.flight().counters_at_switch.is_none() && self.flight().counters_at_start.is_some() {
            // The ledger's latency "before" ends here.
            let counters = self.read_counters().await;
            self.flight_mut().counters_at_switch = counters;
        }
        // After a crash the split may already be in force: do not switch twice.
        let already = self.recovered
            && sw
                .current()
                .await
                .by(sw.name())?
                .map(|c| c.same_weights(&split))
                .unwrap_or(false);
        if !already {
            self.fenced(format!("{}: switch to {split}", sw.name()))
                .await?;
            self.retry(|| sw.apply(&split, &eps)).await.by(sw.name())?;
        }
        if self.flight().paused {
            self.fenced(format!("{}: resume", sw.name())).await?;
            sw.resume().await.by(sw.name())?;
            self.flight_mut().paused = false;
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
            if self.flight().previewing {
                self.fenced(format!("{}: stop preview routing", sw.name()))
                    .await?;
                match sw.preview(None, &eps).await {
                    Ok(()) => self.flight_mut().previewing = false,
                    Err(e) => tracing::warn!(error = %e, "stopping preview routing failed"),
                }
            }
        }
        let id = self.flight().id;
        self.emit(DeployEvent::Switched { id, split });
        Ok(Step::Continue)
    }

    pub(super) async fn verify_data_path(&mut self) -> PhaseResult<Step> {
        let Some(probe) = self.d.probe.clone() else {
            return Ok(Step::Skip("no data-path probe"));
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
            ));
        }
        let version = f.release.version.clone();
        self.probe_target(&*probe, &version).await?;
        Ok(Step::Continue)
    }

    pub(super) async fn observe(&mut self) -> PhaseResult<Step> {
        let step = self.current_step();
        let f = self.flight();
        let (target, previous, idx, id) = (f.target, f.previous, f.step, f.id);
        let eps = f.endpoints.clone();
        let window = step.hold;
        if window.is_zero() {
            return Ok(Step::Skip("no observation window"));
        }
        let sw = self.d.switch.clone();
        let baseline = if sw.capabilities().metrics {
            sw.metrics(target).await.ok()
        } else {
            None
        };
        let counters_at_step = self.read_counters().await;
        let counters_at_start = self.flight().counters_at_start.clone();
        let interval = self.d.policy.observation.interval;
        let start = Instant::now();
        let mut fails = 0u32;
        let mut last_inconclusive: Option<String>;
        loop {
            self.check_interrupt()?;
            // A retryable error (a control plane restarting) is retried like every other
            // backend call; only a lasting one ends the observation.
            let env = self.d.environment.clone();
            let status = self
                .retry(|| env.status(target))
                .await
                .and_then(|s| super::readiness::readable(env.name(), s))
                .by(env.name())?;
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
                counters_at_step: counters_at_step.clone(),
                counters_at_start: counters_at_start.clone(),
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
        let ledger = self.ledger_now().await;
        self.emit(DeployEvent::Traffic {
            id,
            step: idx,
            ledger,
        });
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
        Ok(Step::Continue)
    }

    pub(super) async fn database_after_switch(&mut self) -> PhaseResult<Step> {
        let Some(db) = self.d.database.clone() else {
            return Ok(Step::Skip("no database strategy"));
        };
        self.fenced(format!("{}: after-switch step", db.name()))
            .await?;
        let step = {
            let ctx = self.db_ctx();
            self.retry(|| db.after_switch(&ctx)).await
        }
        .by(db.name())?;
        self.note_db_step(&step);
        Ok(Step::Continue)
    }

    pub(super) async fn after_switch_hooks(&mut self) -> PhaseResult<Step> {
        self.run_hooks(HookPoint::AfterSwitch).await?;
        Ok(Step::Continue)
    }

    pub(super) async fn drain_old(&mut self) -> PhaseResult<Step> {
        let f = self.flight();
        let Some(prev) = f.previous.filter(|p| *p != f.target) else {
            return Ok(Step::Skip("no previous slot"));
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
            if sw.capabilities().close_long_lived {
                // Traffic is already on the target: a failure here is reported, not undone
                // (stopping the old slot ends those connections anyway).
                if let Err((backend, e)) = self.close_long_lived(prev, deadline).await {
                    if matches!(e, Error::LockLost { .. } | Error::Interrupted) {
                        return Err((backend, e));
                    }
                    tracing::warn!(backend, error = %e, slot = %prev, "closing long-lived connections failed");
                }
            }
        }
        if p.keep_old == KeepOld::Stop {
            let env = self.d.environment.clone();
            let drain = p.drain_timeout;
            self.fenced(format!("{}: stop {prev}", env.name())).await?;
            self.retry(|| env.stop(prev, drain)).await.by(env.name())?;
        }
        Ok(Step::Continue)
    }

    /// Long-lived connections (WebSockets) to the old slot stay open until the drain deadline;
    /// those still open then are closed gracefully by the switch, and counted.
    async fn close_long_lived(&mut self, prev: Slot, deadline: Instant) -> PhaseResult<()> {
        let sw = self.d.switch.clone();
        let open = loop {
            let n = sw.long_lived(prev).await.by(sw.name())?;
            if n == 0 || Instant::now() >= deadline {
                break n;
            }
            self.check_interrupt()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if open == 0 {
            return Ok(());
        }
        self.fenced(format!(
            "{}: close {open} long-lived connection(s) to {prev}",
            sw.name()
        ))
        .await?;
        let count = sw.close_long_lived(prev).await.by(sw.name())?;
        tracing::info!(slot = %prev, count, "long-lived connections closed at the drain deadline");
        let id = self.flight().id;
        self.emit(DeployEvent::LongLivedClosed {
            id,
            slot: prev,
            count,
        });
        Ok(())
    }

    /// The last word before success: the switch still sends every request to the target (read
    /// back, not remembered) and, with a probe, requests through it reach the target release.
    /// A switch that restarted and lost or mis-restored its routing fails here, and the run
    /// switches back instead of reporting a success that is not true.
    pub(super) async fn confirm_data_path(&mut self) -> PhaseResult<Step> {
        let sw = self.d.switch.clone();
        let f = self.flight();
        let (target, version) = (f.target, f.release.version.clone());
        let expected = TrafficSplit::all(target);
        let now = self.retry(|| sw.current()).await.by(sw.name())?;
        if !now
            .as_ref()
            .map(|c| c.same_weights(&expected))
            .unwrap_or(false)
        {
            return Err((
                sw.name().to_string(),
                Error::VerifyMismatch {
                    expected,
                    actual: now.map(|s| s.to_string()).unwrap_or_else(|| "none".into()),
                },
            ));
        }
        let Some(probe) = self.d.probe.clone() else {
            return Ok(Step::Skip(
                "no data-path probe: the switch's read-back is the only evidence",
            ));
        };
        self.probe_target(&*probe, &version).await?;
        Ok(Step::Continue)
    }

    /// Probes through the switch until three answers in a row come from `version`, within the
    /// policy's `verify_timeout`.
    async fn probe_target(&self, probe: &dyn DataPathProbe, version: &Version) -> PhaseResult<()> {
        let within = self.d.policy.verify_timeout;
        match probe_until_served(probe, version, within, 3, || self.interrupted()).await {
            Probed::Served => Ok(()),
            Probed::Interrupted => Err(("operator".to_string(), Error::Interrupted)),
            Probed::NotServed(last) => Err((
                probe.name().to_string(),
                Error::DataPathMismatch {
                    expected: version.to_string(),
                    detail: format!("last answer within {within:?}: {last}"),
                },
            )),
        }
    }

    pub(super) async fn finalize(&mut self) -> PhaseResult<Step> {
        if self.d.policy.keep_old == KeepOld::Stop && self.flight().previous.is_some() {
            if let Some(db) = self.d.database.clone() {
                self.fenced(format!("{}: finalize", db.name())).await?;
                let step = {
                    let ctx = self.db_ctx();
                    self.retry(|| db.finalize(&ctx)).await
                }
                .by(db.name())?;
                self.note_db_step(&step);
            }
        }
        Ok(Step::Continue)
    }
}

/// How probing the data path ended.
pub(super) enum Probed {
    /// Enough answers in a row came from the expected release.
    Served,
    /// The run was interrupted while probing.
    Interrupted,
    /// Not within the time allowed; the last answer seen.
    NotServed(String),
}

/// Probes until `in_a_row` answers in a row come from `version`, for at most `within`; `stop` is
/// a safe point between probes.
pub(super) async fn probe_until_served(
    probe: &dyn DataPathProbe,
    version: &Version,
    within: Duration,
    in_a_row: u32,
    stop: impl Fn() -> bool,
) -> Probed {
    let deadline = Instant::now() + within;
    let mut matched = 0;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        if stop() {
            return Probed::Interrupted;
        }
        match probe.probe(version).await {
            Ok(r) if r.matched => {
                matched += 1;
                if matched >= in_a_row {
                    return Probed::Served;
                }
                continue;
            }
            Ok(r) => last = r.observed,
            Err(e) => last = e.to_string(),
        }
        matched = 0;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Probed::NotServed(last)
}
