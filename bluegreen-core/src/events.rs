//! Typed deployment events, for progress displays, notifications and audit logs.

use std::time::Duration;

use serde::Serialize;

use crate::ledger::TrafficLedger;
use crate::state::{Outcome, Phase, RunKind};
use crate::types::{Slot, TrafficSplit, Version};

/// Something that happened during a deployment. Subscribe with
/// [`Deployer::subscribe`](crate::Deployer::subscribe).
///
/// Events never contain secrets: releases appear by version only.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "event")]
#[non_exhaustive]
pub enum DeployEvent {
    /// What the switch counted so far: at the end of each canary step's observation and when
    /// the run finishes.
    Traffic {
        /// Deployment id.
        id: u64,
        /// Canary step (0-based).
        step: usize,
        /// The deployment's traffic ledger until now.
        ledger: TrafficLedger,
    },
    /// A run began.
    Started {
        /// Deployment id.
        id: u64,
        /// Deploy or rollback.
        kind: RunKind,
        /// The release's version.
        version: Version,
        /// The target slot.
        target: Slot,
    },
    /// Long-lived connections to the old slot were still open at the drain deadline and the
    /// switch closed them gracefully (their clients reconnect to the live slot).
    LongLivedClosed {
        /// Deployment id.
        id: u64,
        /// The old slot.
        slot: Slot,
        /// How many were closed.
        count: u64,
    },
    /// A phase began.
    PhaseStarted {
        /// Deployment id.
        id: u64,
        /// The phase.
        phase: Phase,
        /// Canary step (0 outside canaries).
        step: usize,
    },
    /// A phase ended well.
    PhaseCompleted {
        /// Deployment id.
        id: u64,
        /// The phase.
        phase: Phase,
        /// How long it took.
        #[serde(with = "duration_ms")]
        elapsed: Duration,
    },
    /// A phase was skipped (nothing to do under this configuration).
    PhaseSkipped {
        /// Deployment id.
        id: u64,
        /// The phase.
        phase: Phase,
        /// Why.
        reason: String,
    },
    /// A phase failed.
    PhaseFailed {
        /// Deployment id.
        id: u64,
        /// The phase.
        phase: Phase,
        /// The error, as text.
        error: String,
        /// How long it ran.
        #[serde(with = "duration_ms")]
        elapsed: Duration,
    },
    /// One health-check round on a slot.
    Health {
        /// Deployment id.
        id: u64,
        /// The slot checked.
        slot: Slot,
        /// Whether every check passed.
        healthy: bool,
        /// Consecutive passing rounds so far.
        passes: u32,
        /// The failing reason, if any.
        detail: Option<String>,
    },
    /// Traffic moved.
    Switched {
        /// Deployment id.
        id: u64,
        /// The split now in force.
        split: TrafficSplit,
    },
    /// Post-switch analysis finished a round.
    Analysis {
        /// Deployment id.
        id: u64,
        /// `pass`, `fail` or `inconclusive`.
        verdict: String,
        /// Details.
        detail: String,
    },
    /// Waiting for a person (`promote` / `abort`).
    Waiting {
        /// Deployment id.
        id: u64,
        /// Why.
        reason: String,
    },
    /// Undoing a failed deployment.
    RollingBack {
        /// Deployment id.
        id: u64,
        /// Why.
        reason: String,
    },
    /// Recovering a deployment found in flight after a crash.
    Recovering {
        /// Deployment id.
        id: u64,
        /// The phase it was saved at.
        phase: Phase,
        /// What recovery will do.
        action: String,
    },
    /// A hook ran past its timeout and its policy said to continue.
    HookTimedOut {
        /// Deployment id.
        id: u64,
        /// The hook.
        hook: String,
    },
    /// A run ended.
    Finished {
        /// Deployment id.
        id: u64,
        /// How.
        outcome: Outcome,
        /// Total time.
        #[serde(with = "duration_ms")]
        elapsed: Duration,
    },
}

mod duration_ms {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}
