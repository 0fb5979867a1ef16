//! What the engine's operations return.

use std::fmt;
use std::time::Duration;

use crate::ledger::TrafficLedger;
use crate::state::{DeploymentState, LockInfo, Phase, RunKind, Waiting};
use crate::traits::SlotStatus;
use crate::types::{PerSlot, Slot, TrafficSplit, Version};

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The release is live.
    Live,
    /// Paused for a person: `promote` or `abort`.
    Waiting(Waiting),
    /// Undone; the previous slot serves (used by `abort` and crash recovery).
    RolledBack,
    /// Nothing to do: this version was already live, running and receiving all traffic. The
    /// report names the deployment that put it there.
    AlreadyLive,
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
    /// What the switch counted during the deployment (so far, for a run waiting for a person).
    pub ledger: TrafficLedger,
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

/// What [`Deployer::status`](super::Deployer::status) reports.
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
