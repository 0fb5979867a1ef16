//! The dry run: the table's phases as the backends would carry them out, changing nothing.

use super::builder::Inner;
use super::report::{Plan, PlannedStep};
use super::run::{canary_steps, check_capabilities, plan_target, step_split};
use super::table::{Reversible, PHASES};
use crate::error::{Error, Result};
use crate::policy::{KeepOld, Promotion};
use crate::state::{Phase, RunKind};
use crate::traits::{HookPoint, InstanceState, SlotStatus};
use crate::types::{Release, Slot, TrafficSplit};

/// What the backends report before the plan is made.
struct Before<'r> {
    release: &'r Release,
    target: Slot,
    previous: Option<Slot>,
    next_id: u64,
    current: Option<TrafficSplit>,
    target_status: SlotStatus,
}

/// A dry run of `deploy(release)`. Reads the state and the backends; takes no lock.
pub(super) async fn plan(d: &Inner, release: &Release) -> Result<Plan> {
    let state = d.store.load().await?.unwrap_or_default();
    if let Some(f) = &state.in_flight {
        return Err(Error::InFlight {
            id: f.id,
            phase: f.phase,
        });
    }
    check_capabilities(d, RunKind::Deploy)?;
    let (target, previous) = plan_target(&state);
    let before = Before {
        release,
        target,
        previous,
        next_id: state.last_id + 1,
        current: d.switch.current().await?,
        target_status: d.environment.status(target).await?,
    };
    let steps = canary_steps(&d.policy, RunKind::Deploy, state.active.is_none());
    let mut planned = Vec::new();
    let mut i = 0;
    while i < PHASES.len() {
        if PHASES[i].per_step {
            // The per-step group, once for each canary step.
            let len = PHASES[i..].iter().take_while(|s| s.per_step).count();
            for s in &steps {
                for spec in &PHASES[i..i + len] {
                    per_step_actions(d, &before, spec.phase, s, &mut planned);
                }
            }
            i += len;
            continue;
        }
        let spec = &PHASES[i];
        let database = d.database.as_ref().map(|db| db.name());
        for (backend, mut action) in actions(d, &before, spec.phase) {
            if spec.reversible == Reversible::AsTheDatabaseSays
                && database == Some(backend.as_str())
            {
                action.push_str(" (undone unless the strategy says it is irreversible)");
            }
            planned.push(PlannedStep {
                phase: spec.phase,
                backend,
                action,
            });
        }
        i += 1;
    }
    Ok(Plan {
        target,
        previous,
        steps: planned,
    })
}

/// What one phase outside the per-step group would do: (backend, action) for each actor.
fn actions(d: &Inner, b: &Before<'_>, phase: Phase) -> Vec<(String, String)> {
    let p = &d.policy;
    let target = b.target;
    let hooks = |point: HookPoint, what: &str| -> Vec<(String, String)> {
        d.hooks_at(point)
            .map(|h| (h.hook.name().to_string(), what.to_string()))
            .collect()
    };
    let db = |action: String| -> Vec<(String, String)> {
        d.database
            .iter()
            .map(|db| (db.name().to_string(), action.clone()))
            .collect()
    };
    let one = |backend: &str, action: String| vec![(backend.to_string(), action)];
    match phase {
        Phase::Plan => one(
            d.store.name(),
            format!("lock, save deployment #{} targeting {target}", b.next_id),
        ),
        Phase::PrepareDatabase => db(format!("prepare the database of {target}")),
        Phase::BeforeDeployHook => hooks(HookPoint::BeforeDeploy, "run before_deploy hook"),
        Phase::DeployTarget => {
            let replaces = match (&b.target_status.state, &b.target_status.version) {
                (InstanceState::Absent, _) => String::new(),
                (st, Some(v)) => format!(", replacing {v} ({st:?})"),
                (st, None) => format!(", replacing what is there ({st:?})"),
            };
            one(
                d.environment.name(),
                format!("deploy {} to {target}{replaces}", b.release.version),
            )
        }
        Phase::WaitReady => {
            let checks = if d.health_checks.is_empty() {
                "the platform's status".to_string()
            } else {
                d.health_checks
                    .iter()
                    .map(|c| c.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            one(
                d.environment.name(),
                format!(
                    "wait for {} passing rounds of {checks} (≤ {:?})",
                    p.rise, p.readiness_timeout
                ),
            )
        }
        Phase::AfterDeployHook => hooks(HookPoint::AfterDeploy, "run after_deploy hook"),
        Phase::Preview if p.preview => one(
            d.switch.name(),
            format!("route preview traffic to {target}"),
        ),
        Phase::SmokeTest => hooks(HookPoint::BeforeSwitch, "run smoke test"),
        Phase::Gate if p.promotion == Promotion::Manual => one("engine", "wait for promote".into()),
        Phase::DatabaseBeforeSwitch => db("database cutover".into()),
        Phase::DatabaseAfterSwitch => db("after-switch step".into()),
        Phase::AfterSwitchHook => hooks(HookPoint::AfterSwitch, "run after_switch hook"),
        Phase::DrainOld => match b.previous {
            Some(prev) => {
                let action = match p.keep_old {
                    KeepOld::Warm => format!("drain {prev}, keep it warm for rollback"),
                    KeepOld::Stop => format!("drain and stop {prev}"),
                };
                one(d.environment.name(), action)
            }
            None => Vec::new(),
        },
        Phase::Finalize if p.keep_old == KeepOld::Stop && b.previous.is_some() => {
            db("finalize: drop what the old side no longer needs".into())
        }
        Phase::ConfirmDataPath => {
            let mut v = one(
                d.switch.name(),
                format!("read back: all traffic to {target}"),
            );
            if let Some(probe) = &d.probe {
                v.extend(one(
                    probe.name(),
                    format!("requests still reach {}", b.release.version),
                ));
            }
            v.extend(one(d.store.name(), "record history, unlock".into()));
            v
        }
        _ => Vec::new(),
    }
}

/// What one phase of the per-step group would do at canary step `step`.
fn per_step_actions(
    d: &Inner,
    b: &Before<'_>,
    phase: Phase,
    step: &crate::policy::CanaryStep,
    out: &mut Vec<PlannedStep>,
) {
    let split = step_split(b.target, step.weight);
    let mut add = |backend: &str, action: String| {
        out.push(PlannedStep {
            phase,
            backend: backend.to_string(),
            action,
        })
    };
    match phase {
        Phase::Switch => {
            let from = b
                .current
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_else(|| "nothing".into());
            add(d.switch.name(), format!("{from} → {split}, then read back"));
        }
        Phase::VerifyDataPath => {
            if let Some(probe) = d.probe.as_ref().filter(|_| split.is_whole()) {
                add(
                    probe.name(),
                    format!("requests reach {}", b.release.version),
                );
            }
        }
        Phase::Observe if !step.hold.is_zero() => {
            add(
                "engine",
                format!("observe {} for {:?}", b.target, step.hold),
            );
        }
        _ => {}
    }
}
