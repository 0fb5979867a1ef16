//! The runbook as one table: every phase in order, its handler, whether it can be undone, and what
//! undo must take back once it has started.
//!
//! The driver runs the table top to bottom (repeating the per-step group once per canary step),
//! [`Deployer::plan`](super::Deployer::plan) describes it, and undo reads it backwards to learn what
//! a failed run left behind. No phase names its successor.

use std::future::Future;
use std::pin::Pin;

use super::run::{PhaseResult, Run};
use crate::state::{Phase, Waiting};

/// What a phase asks the driver to do next.
pub(super) enum Step {
    /// Done: go on with the next phase of the table.
    Continue,
    /// Nothing to do here (the reason is reported): go on with the next phase.
    Skip(&'static str),
    /// Stop and wait for a person (`promote` / `abort`).
    Wait(Waiting),
}

/// A phase handler's future.
pub(super) type PhaseFuture<'r> = Pin<Box<dyn Future<Output = PhaseResult<Step>> + Send + 'r>>;

/// A phase handler: one method of [`Run`].
pub(super) type Handler = for<'r, 'a> fn(&'r mut Run<'a>) -> PhaseFuture<'r>;

/// Whether undo can take back what a phase did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reversible {
    /// Always: undo restores what was there.
    Yes,
    /// As the [`DatabaseStrategy`](crate::DatabaseStrategy) says of the step it ran
    /// ([`DbStep`](crate::DbStep)): after an irreversible step the engine stops and asks.
    AsTheDatabaseSays,
}

/// What undo must take back once a phase has started. Undo carries these out in the order of this
/// enum, which is the safe order for live traffic: let requests flow again, route them back to the
/// old slot, then take back the database and the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Undo {
    /// Resume a switch paused for the database cutover (when the run recorded a pause).
    Resume,
    /// Stop routing preview traffic to the target (when the run recorded preview routing).
    StopPreview,
    /// Switch traffic back to the previous slot (when the run recorded that traffic may have moved).
    SwitchBack,
    /// `DatabaseStrategy::rollback`.
    RollBackDatabase,
    /// The `after_rollback` hooks, once traffic is back on the previous slot.
    RunAfterRollbackHooks,
    /// Remove the target slot's instance, unless it already ran this release (a warm rollback).
    RemoveTarget,
}

/// One row of the runbook.
pub(super) struct PhaseSpec {
    /// The phase.
    pub(super) phase: Phase,
    /// What runs.
    pub(super) handler: Handler,
    /// Whether undo can take it back.
    pub(super) reversible: Reversible,
    /// What undo must take back once it has started.
    pub(super) undo: &'static [Undo],
    /// Part of the group that runs once per canary step (apply, verify, observe).
    pub(super) per_step: bool,
}

macro_rules! handler {
    ($method:ident) => {{
        fn handler<'r, 'a>(run: &'r mut Run<'a>) -> PhaseFuture<'r> {
            Box::pin(run.$method())
        }
        handler as Handler
    }};
}

const fn row(phase: Phase, handler: Handler, undo: &'static [Undo]) -> PhaseSpec {
    PhaseSpec {
        phase,
        handler,
        reversible: Reversible::Yes,
        undo,
        per_step: false,
    }
}

const fn database(spec: PhaseSpec) -> PhaseSpec {
    PhaseSpec {
        reversible: Reversible::AsTheDatabaseSays,
        ..spec
    }
}

const fn per_step(spec: PhaseSpec) -> PhaseSpec {
    PhaseSpec {
        per_step: true,
        ..spec
    }
}

/// The runbook, in order.
pub(super) static PHASES: [PhaseSpec; 18] = [
    // The run has claimed the target slot: undo clears it, whatever the failure.
    row(Phase::Plan, handler!(plan), &[Undo::RemoveTarget]),
    database(row(
        Phase::PrepareDatabase,
        handler!(prepare_database),
        &[Undo::RollBackDatabase],
    )),
    row(Phase::BeforeDeployHook, handler!(before_deploy_hooks), &[]),
    row(Phase::DeployTarget, handler!(deploy_target), &[]),
    row(Phase::WaitReady, handler!(wait_ready), &[]),
    row(Phase::AfterDeployHook, handler!(after_deploy_hooks), &[]),
    row(Phase::Preview, handler!(preview), &[Undo::StopPreview]),
    row(Phase::SmokeTest, handler!(smoke_test), &[]),
    row(Phase::Gate, handler!(gate), &[]),
    database(row(
        Phase::DatabaseBeforeSwitch,
        handler!(database_before_switch),
        &[Undo::Resume],
    )),
    per_step(row(
        Phase::Switch,
        handler!(switch),
        &[Undo::SwitchBack, Undo::RunAfterRollbackHooks],
    )),
    per_step(row(Phase::VerifyDataPath, handler!(verify_data_path), &[])),
    per_step(row(Phase::Observe, handler!(observe), &[])),
    database(row(
        Phase::DatabaseAfterSwitch,
        handler!(database_after_switch),
        &[],
    )),
    row(Phase::AfterSwitchHook, handler!(after_switch_hooks), &[]),
    row(Phase::DrainOld, handler!(drain_old), &[]),
    database(row(Phase::Finalize, handler!(finalize), &[])),
    // Success only when true: a failure here switches back like any failure after the switch
    // (or stops and asks after an irreversible database step).
    row(Phase::ConfirmDataPath, handler!(confirm_data_path), &[]),
];

/// The row of `phase`.
pub(super) fn spec(phase: Phase) -> &'static PhaseSpec {
    PHASES
        .iter()
        .find(|s| s.phase == phase)
        .expect("every phase has a row")
}

fn position(phase: Phase) -> usize {
    PHASES
        .iter()
        .position(|s| s.phase == phase)
        .expect("every phase has a row")
}

/// The phase after `phase` in the table, `None` after the last.
pub(super) fn following(phase: Phase) -> Option<&'static PhaseSpec> {
    PHASES.get(position(phase) + 1)
}

/// The first phase of the group repeated once per canary step.
pub(super) fn first_per_step() -> Phase {
    PHASES
        .iter()
        .find(|s| s.per_step)
        .expect("a per-step group")
        .phase
}

/// What undo must take back after a run that reached `phase` (started it, whether or not it
/// finished), in the order to carry it out.
pub(super) fn undo_after(phase: Phase) -> Vec<Undo> {
    let mut todo: Vec<Undo> = PHASES[..=position(phase)]
        .iter()
        .flat_map(|s| s.undo.iter().copied())
        .collect();
    todo.sort();
    todo.dedup();
    todo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_holds_every_phase_once_in_the_order_of_phase_all() {
        let order: Vec<Phase> = PHASES.iter().map(|s| s.phase).collect();
        assert_eq!(order, Phase::ALL.to_vec());
    }

    #[test]
    fn the_per_step_group_is_contiguous_and_starts_with_the_switch() {
        let first = PHASES.iter().position(|s| s.per_step).unwrap();
        let len = PHASES.iter().filter(|s| s.per_step).count();
        assert!(PHASES[first..first + len].iter().all(|s| s.per_step));
        assert_eq!(first_per_step(), Phase::Switch);
    }

    #[test]
    fn undo_grows_with_the_phases_reached() {
        assert_eq!(undo_after(Phase::Plan), vec![Undo::RemoveTarget]);
        assert_eq!(
            undo_after(Phase::WaitReady),
            vec![Undo::RollBackDatabase, Undo::RemoveTarget]
        );
        assert_eq!(
            undo_after(Phase::Switch),
            vec![
                Undo::Resume,
                Undo::StopPreview,
                Undo::SwitchBack,
                Undo::RollBackDatabase,
                Undo::RunAfterRollbackHooks,
                Undo::RemoveTarget
            ]
        );
        assert_eq!(undo_after(Phase::Finalize), undo_after(Phase::Switch));
    }

    #[test]
    fn only_database_phases_depend_on_the_strategy_for_reversibility() {
        for s in &PHASES {
            let db = matches!(
                s.phase,
                Phase::PrepareDatabase
                    | Phase::DatabaseBeforeSwitch
                    | Phase::DatabaseAfterSwitch
                    | Phase::Finalize
            );
            assert_eq!(
                s.reversible == Reversible::AsTheDatabaseSays,
                db,
                "{}",
                s.phase
            );
        }
    }
}
