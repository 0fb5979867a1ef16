//! The one error type of bluegreen-core; backends convert their own errors into it.

use std::fmt;
use std::time::Duration;

use crate::state::{LockInfo, Phase};
use crate::types::{Slot, TrafficSplit};

/// A boxed error from a backend's own client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a failure did to live traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LiveTraffic {
    /// Live traffic never left the previous slot.
    Untouched,
    /// Traffic had moved (fully or partly) and was switched back to the previous slot.
    RolledBack,
    /// Traffic had moved and was **not** switched back: someone has to decide (see the error).
    Affected,
    /// Not checked: the run lost the deployment lock and stopped without changing anything more
    /// (another run holds the lock; `status` shows where traffic goes).
    Unknown,
}

impl fmt::Display for LiveTraffic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LiveTraffic::Untouched => "live traffic untouched",
            LiveTraffic::RolledBack => "traffic switched back to the previous slot",
            LiveTraffic::Affected => "traffic was NOT switched back",
            LiveTraffic::Unknown => "live traffic not checked (the run lost its lock and stopped)",
        })
    }
}

/// Errors of bluegreen.
///
/// Every variant says what was being done. Engine failures come wrapped in [`Error::Phase`], which
/// names the phase, the backend, and what happened to live traffic. Use [`Error::is_retryable`]
/// instead of guessing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A value failed validation.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidInput {
        /// What was being validated (e.g. `version`, `name`).
        what: &'static str,
        /// The offending value.
        value: String,
        /// Why it was refused.
        reason: String,
    },

    /// A backend call failed.
    #[error("{backend}: {operation} failed: {source}")]
    Backend {
        /// The backend's [`name`](crate::TrafficSwitch::name).
        backend: String,
        /// What was being done (`apply`, `deploy`, `exec`, …).
        operation: String,
        /// Whether trying again may succeed.
        retryable: bool,
        /// The underlying error.
        #[source]
        source: BoxError,
    },

    /// The backend cannot do this operation.
    #[error("{backend} does not support {operation}")]
    Unsupported {
        /// The operation asked for.
        operation: &'static str,
        /// The backend asked.
        backend: String,
    },

    /// The plan needs a capability the switch lacks; refused before anything changed.
    #[error("the plan needs {capability}, which {backend} does not support: {hint}")]
    MissingCapability {
        /// The capability (`weights`, `preview`, `pause`, …).
        capability: &'static str,
        /// The switch.
        backend: String,
        /// What to change instead.
        hint: &'static str,
    },

    /// The deployment lock is held by someone else.
    #[error(
        "the deployment lock is held by {holder}; wait for it, or break it if that holder is gone"
    )]
    Locked {
        /// Who holds it.
        holder: Box<LockInfo>,
    },

    /// A release's secrets could not be resolved: nothing was started with a partial environment.
    #[error(
        "the secrets of release {version} could not be resolved: {reason}; nothing was started \
         without them (configure a secret source that provides them)"
    )]
    SecretsUnavailable {
        /// The release.
        version: String,
        /// What is missing or what failed (names, never values).
        reason: String,
    },

    /// `break_lock` refused: the holder is a running process on this host.
    #[error(
        "the deployment lock is held by {holder}, a process that is still running on this host; \
         wait for it or stop it (breaking the lock of a live run lets two runs change the slots; \
         `break-lock --force` does it anyway)"
    )]
    HolderAlive {
        /// Who holds it.
        holder: Box<LockInfo>,
    },

    /// The lease this process held was lost (expired and taken, or broken).
    #[error("the deployment lock was lost: {reason}")]
    LockLost {
        /// What happened.
        reason: String,
    },

    /// A deployment is in flight; finish it (`promote`, `abort`) first.
    #[error("deployment #{id} is in flight (phase {phase}); promote or abort it first")]
    InFlight {
        /// The in-flight deployment's id.
        id: u64,
        /// Its phase.
        phase: Phase,
    },

    /// Someone else saved the state since it was loaded.
    #[error("state changed concurrently: expected revision {expected}, found {found}")]
    Conflict {
        /// The revision this writer loaded.
        expected: u64,
        /// The revision in the store.
        found: u64,
    },

    /// The stored state cannot be read; it is left as it is.
    #[error(
        "state at {location} is unreadable: {reason}; it was not modified (fix or move it away)"
    )]
    CorruptState {
        /// Where it is.
        location: String,
        /// Why it cannot be read.
        reason: String,
    },

    /// The stored state was written by a newer bluegreen.
    #[error("state at {location} has format {found}, this bluegreen reads up to {supported}; upgrade bluegreen")]
    UnsupportedStateFormat {
        /// Where it is.
        location: String,
        /// The file's format.
        found: u32,
        /// The newest this build reads.
        supported: u32,
    },

    /// Something did not happen in time.
    #[error("{what} did not complete within {after:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The bound.
        after: Duration,
    },

    /// A slot never became (or stopped being) healthy.
    #[error("slot {slot} is unhealthy: {reason}")]
    Unhealthy {
        /// The slot.
        slot: Slot,
        /// The last failing check's reason.
        reason: String,
    },

    /// The switch reports a different split than the one applied.
    #[error("switch verification failed: applied {expected}, the switch reports {actual}")]
    VerifyMismatch {
        /// What was applied.
        expected: TrafficSplit,
        /// What was read back (`none` when the switch had no configuration).
        actual: String,
    },

    /// Requests through the switch did not reach the target release.
    #[error("requests through the switch did not reach {expected}: {detail}")]
    DataPathMismatch {
        /// The version expected.
        expected: String,
        /// What the probe saw.
        detail: String,
    },

    /// Post-switch analysis failed.
    #[error("analysis failed: {reason}")]
    AnalysisFailed {
        /// Why.
        reason: String,
    },

    /// The operator interrupted the run ([`Deployer::interrupt`](crate::Deployer::interrupt)); it
    /// stopped at a safe point and was rolled back.
    #[error("interrupted by the operator")]
    Interrupted,

    /// A manual gate was refused (aborted).
    #[error("the deployment was aborted at the promotion gate")]
    Aborted,

    /// The engine stopped and needs a human decision; nothing was rolled back automatically.
    #[error(
        "manual intervention required: {reason}; run `promote` to continue or `abort` to roll back"
    )]
    NeedsDecision {
        /// Why the engine stopped.
        reason: String,
    },

    /// A hook failed.
    #[error("hook {hook} failed: {reason}")]
    Hook {
        /// The hook's name.
        hook: String,
        /// Why.
        reason: String,
    },

    /// Nothing to roll back to.
    #[error("nothing to roll back to: {reason}")]
    NothingToRollBack {
        /// Why.
        reason: String,
    },

    /// A phase of a deployment failed.
    #[error("{kind} #{id} failed in phase {phase} ({backend}): {source}; {live}")]
    Phase {
        /// `deploy` or `rollback`.
        kind: &'static str,
        /// Deployment id.
        id: u64,
        /// The phase that failed.
        phase: Phase,
        /// The backend (or `engine`) that failed.
        backend: String,
        /// What happened to live traffic.
        live: LiveTraffic,
        /// Problems met while cleaning up after the failure (empty when cleanup was clean).
        cleanup: Vec<String>,
        /// The failure.
        #[source]
        source: Box<Error>,
    },

    /// A file-system or OS operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// An [`Error::InvalidInput`].
    pub fn invalid(
        what: &'static str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidInput {
            what,
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Backend`] from any error.
    pub fn backend(
        backend: impl Into<String>,
        operation: impl Into<String>,
        retryable: bool,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Backend {
            backend: backend.into(),
            operation: operation.into(),
            retryable,
            source: source.into(),
        }
    }

    /// An [`Error::Unsupported`].
    pub fn unsupported(operation: &'static str, backend: impl Into<String>) -> Self {
        Error::Unsupported {
            operation,
            backend: backend.into(),
        }
    }

    /// An [`Error::Io`] with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether the same call may succeed if tried again (a transient network error, a held lock,
    /// a timeout); false for invalid input, unsupported operations and logic failures.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Backend { retryable, .. } => *retryable,
            Error::Locked { .. } | Error::Conflict { .. } | Error::Timeout { .. } => true,
            Error::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
            ),
            Error::Phase { source, .. } => source.is_retryable(),
            _ => false,
        }
    }

    /// For an [`Error::Phase`], the phase that failed.
    pub fn phase(&self) -> Option<Phase> {
        match self {
            Error::Phase { phase, .. } => Some(*phase),
            _ => None,
        }
    }

    /// For an [`Error::Phase`], what happened to live traffic.
    pub fn live_traffic(&self) -> Option<LiveTraffic> {
        match self {
            Error::Phase { live, .. } => Some(*live),
            _ => None,
        }
    }

    /// The innermost bluegreen error (unwrapping [`Error::Phase`]).
    pub fn root(&self) -> &Error {
        match self {
            Error::Phase { source, .. } => source.root(),
            e => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryability_is_decided_by_the_error() {
        let e = Error::backend("haproxy", "apply", true, "connection reset");
        assert!(e.is_retryable());
        let e = Error::invalid("name", "a b", "space");
        assert!(!e.is_retryable());
        let wrapped = Error::Phase {
            kind: "deploy",
            id: 1,
            phase: Phase::Switch,
            backend: "haproxy".into(),
            live: LiveTraffic::Untouched,
            cleanup: vec![],
            source: Box::new(Error::backend("haproxy", "apply", true, "reset")),
        };
        assert!(wrapped.is_retryable());
        assert_eq!(wrapped.phase(), Some(Phase::Switch));
        assert!(matches!(wrapped.root(), Error::Backend { .. }));
        let msg = wrapped.to_string();
        assert!(
            msg.contains("switch") && msg.contains("haproxy") && msg.contains("untouched"),
            "{msg}"
        );
    }
}
