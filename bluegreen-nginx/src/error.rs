//! The crate's own error, converted into [`bluegreen_core::Error`] at the trait boundary.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A step of a switch, named in errors so the caller knows where it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// Checking that the nginx master in the pid file is alive.
    Preflight,
    /// Writing the candidate include to a temporary file.
    WriteCandidate,
    /// Renaming the candidate over the include.
    Install,
    /// `nginx -t` against the main configuration with the candidate in place.
    ConfigTest,
    /// Signalling the master (SIGHUP) and waiting for its new workers.
    Reload,
    /// Probing through nginx that new requests reach the target slot.
    Verify,
    /// Sending the split to the Lua control listener.
    Control,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Preflight => "preflight (is nginx running?)",
            Step::WriteCandidate => "write candidate include",
            Step::Install => "install include (rename)",
            Step::ConfigTest => "nginx -t",
            Step::Reload => "reload",
            Step::Verify => "verify",
            Step::Control => "control listener",
        })
    }
}

/// What happened to the previous configuration after a failed step.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Restored {
    /// Nothing had been changed yet.
    NothingChanged,
    /// The previous include was put back (and nginx reloaded with it when it had been reloaded).
    Restored {
        /// Whether a reload with the restored include was needed and done.
        reloaded: bool,
    },
    /// Putting the previous include back failed: nginx may run the candidate. Fix by hand.
    RestoreFailed {
        /// Why.
        reason: String,
    },
}

impl fmt::Display for Restored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Restored::NothingChanged => f.write_str("nothing was changed; live traffic untouched"),
            Restored::Restored { reloaded: false } => f.write_str(
                "the previous include was restored before any reload; live traffic untouched",
            ),
            Restored::Restored { reloaded: true } => f.write_str(
                "the previous include was restored and nginx reloaded with it; traffic is back on the previous split",
            ),
            Restored::RestoreFailed { reason } => write!(
                f,
                "RESTORING THE PREVIOUS INCLUDE FAILED ({reason}); nginx may serve the candidate: check the include and reload by hand"
            ),
        }
    }
}

/// Errors of bluegreen-nginx.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NginxError {
    /// The pid file does not exist or is empty: nginx is not running (or uses another pid file).
    #[error("nginx is not running: pid file {pid_file} {detail}; start nginx (or point `pid_file` at the one its config names)")]
    NotRunning {
        /// The pid file read.
        pid_file: PathBuf,
        /// What was found.
        detail: String,
    },

    /// The pid file names a process that does not exist.
    #[error("stale pid file {pid_file}: process {pid} does not exist; nginx is not running (start it, or remove the stale file)")]
    StalePidFile {
        /// The pid file.
        pid_file: PathBuf,
        /// The pid in it.
        pid: i32,
    },

    /// `nginx -t` refused the configuration with the candidate include.
    #[error(
        "`nginx -t` rejected the configuration with the candidate include {include}: {output}"
    )]
    ConfigTest {
        /// The include tested.
        include: PathBuf,
        /// nginx's diagnostic output.
        output: String,
    },

    /// The OS refused access.
    #[error("permission denied: {what} {path}; run as a user allowed to do that (nginx's user or root), or fix the file's permissions")]
    PermissionDenied {
        /// What was being done.
        what: String,
        /// The path (or pid) concerned.
        path: PathBuf,
    },

    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The master did not start new workers after SIGHUP (a reload it rejected: see its error_log).
    #[error("nginx master {pid} did not start new workers within {after:?} after SIGHUP: it rejected the reload (see its error_log)")]
    ReloadNotApplied {
        /// The master's pid.
        pid: i32,
        /// The bound waited.
        after: Duration,
    },

    /// Probes through nginx did not reach the target.
    #[error("requests through nginx did not reach {expected} within {after:?}: {detail}")]
    Verify {
        /// What was expected.
        expected: String,
        /// The bound waited.
        after: Duration,
        /// The last observation.
        detail: String,
    },

    /// The Lua control listener cannot be reached.
    #[error("the nginx control listener {addr} is unreachable: {source}; is nginx running with the bluegreen snippet included?")]
    ControlUnreachable {
        /// Its address.
        addr: String,
        /// The connection error.
        #[source]
        source: std::io::Error,
    },

    /// The control listener refused the token.
    #[error("the nginx control listener {addr} refused the token (HTTP 401); the token given to NginxDynamicSwitch differs from the one in the rendered snippet")]
    Unauthorized {
        /// Its address.
        addr: String,
    },

    /// The control listener answered something else than expected.
    #[error("the nginx control listener {addr} answered {status}: {body}")]
    ControlRejected {
        /// Its address.
        addr: String,
        /// HTTP status.
        status: u16,
        /// The answer's body.
        body: String,
    },

    /// The include (or the control listener's answer) is not in the format this crate writes.
    #[error("{source_desc} is not in the format bluegreen-nginx writes ({reason}); it was edited by hand or by another tool: re-apply a split to overwrite it")]
    Unparseable {
        /// Where it came from.
        source_desc: String,
        /// Why it does not parse.
        reason: String,
    },

    /// A switch step failed; says what was restored.
    #[error("nginx switch failed at step `{step}`: {source}; {restored}")]
    Switch {
        /// The failed step.
        step: Step,
        /// What the previous configuration is now.
        restored: Restored,
        /// The failure.
        #[source]
        source: Box<NginxError>,
    },
}

impl NginxError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        NginxError::Io {
            context: context.into(),
            source,
        }
    }

    /// An I/O error on `path`, mapped to [`NginxError::PermissionDenied`] when that is what it is.
    pub(crate) fn fs(what: &str, path: &std::path::Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::PermissionDenied || source.raw_os_error() == Some(1)
        {
            NginxError::PermissionDenied {
                what: what.to_string(),
                path: path.to_path_buf(),
            }
        } else {
            NginxError::io(format!("{what} {}", path.display()), source)
        }
    }

    /// The step that failed, for [`NginxError::Switch`].
    pub fn step(&self) -> Option<Step> {
        match self {
            NginxError::Switch { step, .. } => Some(*step),
            _ => None,
        }
    }

    /// What happened to the previous configuration, for [`NginxError::Switch`].
    pub fn restored(&self) -> Option<&Restored> {
        match self {
            NginxError::Switch { restored, .. } => Some(restored),
            _ => None,
        }
    }

    /// The innermost error (unwrapping [`NginxError::Switch`]).
    pub fn root(&self) -> &NginxError {
        match self {
            NginxError::Switch { source, .. } => source.root(),
            e => e,
        }
    }

    /// Whether trying again may succeed (nginx starting, a listener not up yet, a slow reload).
    pub fn is_retryable(&self) -> bool {
        match self {
            NginxError::Switch {
                source, restored, ..
            } => !matches!(restored, Restored::RestoreFailed { .. }) && source.is_retryable(),
            NginxError::NotRunning { .. }
            | NginxError::StalePidFile { .. }
            | NginxError::ControlUnreachable { .. }
            | NginxError::ReloadNotApplied { .. }
            | NginxError::Verify { .. } => true,
            NginxError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }

    /// Converts into core's [`Error::Backend`](bluegreen_core::Error::Backend) for backend
    /// [`NAME`](crate::NAME) and `operation`, keeping this error as the source and its
    /// retryability.
    pub fn into_core(self, operation: &str) -> bluegreen_core::Error {
        let retryable = self.is_retryable();
        bluegreen_core::Error::backend(crate::NAME, operation, retryable, self)
    }
}
