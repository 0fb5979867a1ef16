//! Typed errors of the Traefik switch, converted into [`bluegreen_core::Error`].

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// What went wrong writing Traefik's dynamic configuration or reading Traefik's API.
///
/// Converted into [`bluegreen_core::Error::Backend`] (backend `traefik`) by
/// [`TraefikError::into_core`], which keeps this error as the source: use
/// [`TraefikError::from_core`] to tell, for example, "written but not loaded"
/// ([`TraefikError::NotLoaded`]) apart from "nothing written" ([`TraefikError::Write`],
/// [`TraefikError::ApiUnreachable`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraefikError {
    /// The dynamic configuration could not be written into the watched directory. Nothing was
    /// changed: the previous file (if any) is intact and no temporary file is left behind.
    #[error(
        "cannot write Traefik's dynamic configuration to {path}: {source}; nothing was changed \
         (check that the file provider's directory exists, is a directory and is writable by \
         this process)"
    )]
    Write {
        /// The file (or temporary file) being written.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The dynamic configuration file (or its directory) could not be read. Nothing was changed.
    #[error(
        "cannot read Traefik's dynamic configuration {path}: {source}; nothing was changed \
         (check that the file provider's directory exists, is a directory and is readable and \
         writable by this process)"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// A configuration file (ours, in the watched directory) does not parse or lacks what this
    /// switch writes.
    #[error(
        "Traefik's dynamic configuration {path} is unreadable: {reason}; it was not modified \
         (fix or remove it)"
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },

    /// Traefik's API could not be reached (connection refused, timeout, TLS failure).
    #[error(
        "cannot reach Traefik's API at {url}: {source} (is Traefik running with `api` enabled, \
         and is this the API entry point?)"
    )]
    ApiUnreachable {
        /// The URL requested.
        url: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },

    /// Traefik's API answered with an unexpected status.
    #[error("Traefik's API answered {status} to GET {url}: {body}")]
    ApiStatus {
        /// The URL requested.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The start of the response body.
        body: String,
    },

    /// Traefik's API answered something that is not the documented shape.
    #[error("Traefik's API answered GET {url} with an unexpected body: {reason}")]
    ApiResponse {
        /// The URL requested.
        url: String,
        /// What was wrong.
        reason: String,
    },

    /// The file was written, but Traefik's API did not report the new configuration within the
    /// bound. The file stays in place: Traefik may still load it (after its providers throttle),
    /// or it may have rejected it — see Traefik's log. Apply the previous split to go back.
    #[error(
        "wrote {path}, but Traefik's API did not report the new configuration within {waited:?} \
         (expected {expected}; Traefik reports {seen}); the file stays in place and Traefik may \
         still load it: check that the file provider watches {dir} and Traefik's log for errors"
    )]
    NotLoaded {
        /// The file written.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// How long the API was polled.
        waited: Duration,
        /// What was written.
        expected: String,
        /// What the API reported last.
        seen: String,
    },
}

impl TraefikError {
    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            TraefikError::Write { source, .. } | TraefikError::Read { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            TraefikError::Parse { .. } | TraefikError::ApiResponse { .. } => false,
            TraefikError::ApiUnreachable { .. } | TraefikError::NotLoaded { .. } => true,
            TraefikError::ApiStatus { status, .. } => *status >= 500,
        }
    }

    /// Converts into [`bluegreen_core::Error::Backend`] for `operation`, keeping `self` as the
    /// source.
    pub fn into_core(self, operation: &str) -> bluegreen_core::Error {
        let retryable = self.is_retryable();
        bluegreen_core::Error::backend(crate::NAME, operation, retryable, self)
    }

    /// The Traefik error inside a core error produced by this crate, if it is one.
    ///
    /// ```
    /// use bluegreen_traefik::TraefikError;
    /// let e = TraefikError::Parse { path: "x.yml".into(), reason: "bad".into() }.into_core("apply");
    /// assert!(matches!(TraefikError::from_core(&e), Some(TraefikError::Parse { .. })));
    /// ```
    pub fn from_core(err: &bluegreen_core::Error) -> Option<&TraefikError> {
        match err.root() {
            bluegreen_core::Error::Backend {
                backend, source, ..
            } if backend == crate::NAME => source.downcast_ref::<TraefikError>(),
            _ => None,
        }
    }

    /// True when the file was written but Traefik did not report it in time.
    pub fn is_not_loaded(err: &bluegreen_core::Error) -> bool {
        matches!(
            TraefikError::from_core(err),
            Some(TraefikError::NotLoaded { .. })
        )
    }
}
