//! What can go wrong with local processes; converted into [`bluegreen_core::Error`] at the
//! boundary, where retryability is decided.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use bluegreen_core::{Error, Slot};

/// A failure of the process environment.
///
/// It reaches callers as the source of an [`Error::Backend`] (backend `process`), or for
/// file-system failures as an [`Error::Io`]; downcast the source to match on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// The program could not be started at all.
    #[error(
        "cannot start `{program}` in slot {slot}: {source}; the artifact must be an executable \
         path or a program on PATH{log_tail}"
    )]
    Spawn {
        /// The program (the release's artifact).
        program: String,
        /// The slot.
        slot: Slot,
        /// The OS error.
        #[source]
        source: io::Error,
        /// The last lines of the slot's log, formatted for the message (may be empty).
        log_tail: String,
    },

    /// The program exited within the startup grace period.
    #[error(
        "`{program}` in slot {slot} exited right after it started ({how}); see {}{log_tail}",
        log.display()
    )]
    ExitedAtStart {
        /// The program.
        program: String,
        /// The slot.
        slot: Slot,
        /// How it ended (`exit code 3`, `signal 9`).
        how: String,
        /// The slot's log file.
        log: PathBuf,
        /// The last lines of the log, formatted for the message.
        log_tail: String,
    },

    /// The process was still there after SIGTERM, the drain, SIGKILL and the kill timeout.
    #[error(
        "pid {pid} in slot {slot} is still running {waited:?} after SIGKILL; \
         it may be stuck in the kernel (state D): check `ps -o stat -p {pid}`"
    )]
    Unkillable {
        /// The process.
        pid: i32,
        /// The slot.
        slot: Slot,
        /// How long it was given after SIGKILL.
        waited: Duration,
    },

    /// A crashed program was not restarted: its secret variables are not known to this handle.
    #[error(
        "slot {slot} is not restarted: its release needs the secret variables {missing:?}, which \
         only the process that deployed it held; deploy it again"
    )]
    SecretsUnknown {
        /// The slot.
        slot: Slot,
        /// The names of the secret variables this handle lacks.
        missing: Vec<String>,
    },

    /// A signal could not be sent.
    #[error("cannot send {signal} to pid {pid} in slot {slot}: {source}")]
    Signal {
        /// `SIGTERM` or `SIGKILL`.
        signal: &'static str,
        /// The process.
        pid: i32,
        /// The slot.
        slot: Slot,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// A pid file cannot be parsed.
    #[error(
        "pid file {} is unreadable: {reason}; if no program of that slot is running, delete it",
        path.display()
    )]
    CorruptPidFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },

    /// `exec` on a slot with nothing deployed.
    #[error("slot {slot} has nothing deployed; deploy a release before running commands in it")]
    NotDeployed {
        /// The slot.
        slot: Slot,
    },

    /// `exec` could not start its command.
    #[error("cannot run `{program}` for slot {slot}: {source}")]
    Exec {
        /// The command's program.
        program: String,
        /// The slot.
        slot: Slot,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// No free port could be found on the host.
    #[error("cannot find a free port on {host} for slot {slot}: {source}; set a fixed port for the slot")]
    NoPort {
        /// The host.
        host: String,
        /// The slot.
        slot: Slot,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl ProcessError {
    /// Whether the same call may succeed if tried again: a signal or kill that did not take, no
    /// free port, an interrupted spawn; not a crashing release or a missing program.
    pub fn is_retryable(&self) -> bool {
        match self {
            // A crashing release or a missing program fails the same way next time.
            ProcessError::Spawn { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::OutOfMemory
            ),
            ProcessError::ExitedAtStart { .. }
            | ProcessError::CorruptPidFile { .. }
            | ProcessError::NotDeployed { .. }
            | ProcessError::SecretsUnknown { .. }
            | ProcessError::Exec { .. } => false,
            ProcessError::Unkillable { .. }
            | ProcessError::Signal { .. }
            | ProcessError::NoPort { .. } => true,
        }
    }

    /// Converts into core's [`Error::Backend`] for backend [`NAME`](crate::NAME) and `operation`,
    /// keeping this error as the source and its retryability.
    pub fn into_core(self, operation: &str) -> Error {
        let retryable = self.is_retryable();
        Error::backend(crate::NAME, operation, retryable, self)
    }
}

/// An [`Error::Io`] naming what was done to which path.
pub(crate) fn io_error(what: &str, path: &std::path::Path, source: io::Error) -> Error {
    Error::io(format!("process: {what} {}", path.display()), source)
}
