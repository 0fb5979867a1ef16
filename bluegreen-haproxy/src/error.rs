//! Typed errors of the HAProxy runtime API, converted into [`bluegreen_core::Error`].

use std::io;
use std::time::Duration;

/// What went wrong talking to HAProxy's runtime API.
///
/// Converted into [`bluegreen_core::Error::Backend`] (backend `haproxy`) by
/// [`HaproxyError::into_core`]; [`HaproxyError::is_retryable`] says whether trying again may help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HaproxyError {
    /// The runtime API socket could not be reached (missing socket file, connection refused).
    #[error(
        "cannot connect to the HAProxy runtime API at {address}: {source} (is HAProxy running \
         with `stats socket {address} level admin`?)"
    )]
    Connect {
        /// The socket path or `host:port`.
        address: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// Reading or writing the socket failed after connecting.
    #[error("talking to the HAProxy runtime API at {address} failed during `{command}`: {source}")]
    Io {
        /// The socket path or `host:port`.
        address: String,
        /// The command being sent.
        command: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// HAProxy did not answer in time.
    #[error("the HAProxy runtime API at {address} did not answer `{command}` within {after:?}")]
    Timeout {
        /// The socket path or `host:port`.
        address: String,
        /// The command.
        command: String,
        /// The bound.
        after: Duration,
    },

    /// HAProxy has no backend of that name.
    #[error("HAProxy has no backend named {backend:?} (check the backend name in the config)")]
    NoSuchBackend {
        /// The backend name.
        backend: String,
    },

    /// HAProxy has no server of that name in the backend.
    #[error("HAProxy has no server {backend}/{server} (check the server names in the config)")]
    NoSuchServer {
        /// The backend name.
        backend: String,
        /// The server name.
        server: String,
    },

    /// The socket is not at `level admin`.
    #[error(
        "HAProxy refused `{command}`: permission denied (the stats socket at {address} needs \
         `level admin`)"
    )]
    PermissionDenied {
        /// The socket path or `host:port`.
        address: String,
        /// The command.
        command: String,
    },

    /// HAProxy does not know the command (too old a version?).
    #[error("HAProxy does not know the command `{command}` (HAProxy 2.x is required)")]
    UnknownCommand {
        /// The command.
        command: String,
    },

    /// HAProxy answered the command with an error message.
    #[error("HAProxy refused `{command}`: {message}")]
    Refused {
        /// The command.
        command: String,
        /// HAProxy's answer.
        message: String,
    },

    /// HAProxy's answer could not be understood.
    #[error("unexpected answer from HAProxy to `{command}`: {detail}")]
    Protocol {
        /// The command.
        command: String,
        /// What was wrong.
        detail: String,
    },

    /// HAProxy's state did not become what was set.
    #[error("HAProxy did not reach the expected state: {detail}")]
    Verify {
        /// What differs.
        detail: String,
    },

    /// A server did not pass its health check in time after being enabled.
    #[error(
        "server {backend}/{server} at {endpoint} did not pass HAProxy's health check within \
         {after:?} (last seen: {last}); is the new release up and answering its health check?"
    )]
    NotReady {
        /// The backend name.
        backend: String,
        /// The server name.
        server: String,
        /// Where the server points.
        endpoint: String,
        /// The bound.
        after: Duration,
        /// The server's last state as HAProxy reported it.
        last: String,
    },

    /// A command was refused before sending because it could carry a second command.
    #[error("refusing to send {command:?} to HAProxy: {reason}")]
    InvalidCommand {
        /// The command (escaped).
        command: String,
        /// Why.
        reason: String,
    },

    /// A step of a switch failed; says which step and what HAProxy's state is afterwards.
    #[error("switching to {target} failed at step {step} `{command}`: {source}; {outcome}")]
    SwitchFailed {
        /// The split being applied.
        target: String,
        /// The step number and total (`3/5`).
        step: String,
        /// The command or action of that step.
        command: String,
        /// Why it failed.
        #[source]
        source: Box<HaproxyError>,
        /// What was done about it and the state HAProxy reports now (or that it could not be
        /// read).
        outcome: String,
    },
}

impl HaproxyError {
    /// Whether the same call may succeed if tried again (transport problems and verification
    /// timeouts); false for unknown names, permissions and refused commands.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            HaproxyError::Connect { .. }
                | HaproxyError::Io { .. }
                | HaproxyError::Timeout { .. }
                | HaproxyError::Verify { .. }
                | HaproxyError::NotReady { .. }
        ) || matches!(self, HaproxyError::SwitchFailed { source, .. } if source.is_retryable())
    }

    /// Converts into [`bluegreen_core::Error::Backend`] for backend `haproxy` and `operation`.
    pub fn into_core(self, operation: &str) -> bluegreen_core::Error {
        let retryable = self.is_retryable();
        bluegreen_core::Error::backend(crate::NAME, operation, retryable, self)
    }
}

/// Classifies an error answer of HAProxy. `None` when `answer` is not a known error form.
pub(crate) fn classify(
    address: &str,
    command: &str,
    backend: &str,
    server: Option<&str>,
    answer: &str,
) -> Option<HaproxyError> {
    let text = answer.trim();
    let first = text.lines().next().unwrap_or("").trim();
    if first.starts_with("No such server") {
        return Some(HaproxyError::NoSuchServer {
            backend: backend.to_string(),
            server: server.unwrap_or("").to_string(),
        });
    }
    if first.starts_with("No such backend")
        || first.starts_with("Can't find backend")
        || first.starts_with("No such proxy")
    {
        return Some(HaproxyError::NoSuchBackend {
            backend: backend.to_string(),
        });
    }
    if first.starts_with("Permission denied") {
        return Some(HaproxyError::PermissionDenied {
            address: address.to_string(),
            command: command.to_string(),
        });
    }
    if first.starts_with("Unknown command") {
        return Some(HaproxyError::UnknownCommand {
            command: command.to_string(),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_error_texts_are_classified() {
        let c = |a: &str| classify("/s", "cmd", "app", Some("blue"), a);
        assert!(matches!(
            c("No such server.\n\n"),
            Some(HaproxyError::NoSuchServer { ref server, .. }) if server == "blue"
        ));
        assert!(matches!(
            c("No such backend.\n\n"),
            Some(HaproxyError::NoSuchBackend { .. })
        ));
        assert!(matches!(
            c("Can't find backend.\n\n"),
            Some(HaproxyError::NoSuchBackend { .. })
        ));
        assert!(matches!(
            c("No such proxy.\n\n"),
            Some(HaproxyError::NoSuchBackend { .. })
        ));
        assert!(matches!(
            c("Permission denied\n\n"),
            Some(HaproxyError::PermissionDenied { .. })
        ));
        assert!(matches!(
            c("Unknown command, but maybe one of the following ones is a better match:\n  x\n"),
            Some(HaproxyError::UnknownCommand { .. })
        ));
        assert!(c("\n").is_none());
        assert!(c("Invalid addr 'x'").is_none());
    }

    #[test]
    fn retryability_and_conversion() {
        let e = HaproxyError::Connect {
            address: "/run/haproxy.sock".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert!(e.is_retryable());
        let core = e.into_core("apply");
        assert!(core.is_retryable());
        let msg = core.to_string();
        assert!(
            msg.contains("haproxy") && msg.contains("/run/haproxy.sock"),
            "{msg}"
        );
        let e = HaproxyError::NoSuchServer {
            backend: "app".into(),
            server: "x".into(),
        };
        assert!(!e.into_core("apply").is_retryable());
    }
}
