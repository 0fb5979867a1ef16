//! [`ProxyError`]: what the control-API client ([`RemoteProxySwitch`](crate::RemoteProxySwitch))
//! can meet, and its conversion into core's [`Error::Backend`](bluegreen_core::Error::Backend).

/// An error of the proxy's control API, as seen by its client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The HTTP client could not be built.
    #[error("building the admin API client: {0}")]
    Client(#[source] reqwest::Error),

    /// The admin API did not answer (not running, wrong address, connection reset).
    #[error(
        "the proxy's admin API at {base} is unreachable ({source}); is `bluegreen serve` running?"
    )]
    Unreachable {
        /// The admin API's base URL.
        base: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },

    /// The admin API refused the token.
    #[error("the admin API refused the token (check the token file)")]
    Unauthorized,

    /// The admin API answered with an error.
    #[error("{message}")]
    Api {
        /// The HTTP status code.
        status: u16,
        /// The API's message.
        message: String,
    },

    /// The admin API's answer could not be read.
    #[error("reading the admin API's answer: {0}")]
    Answer(#[source] reqwest::Error),
}

impl ProxyError {
    /// Whether the same call may succeed if tried again: transport problems, unreadable answers
    /// and server-side (5xx) errors; not a refused token or a client that cannot be built.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProxyError::Client(_) | ProxyError::Unauthorized => false,
            ProxyError::Unreachable { .. } | ProxyError::Answer(_) => true,
            ProxyError::Api { status, .. } => (500..600).contains(status),
        }
    }

    /// Converts into [`bluegreen_core::Error::Backend`] for backend [`NAME`](crate::NAME) and
    /// `operation`, keeping this error as the source and its retryability.
    pub fn into_core(self, operation: &str) -> bluegreen_core::Error {
        let retryable = self.is_retryable();
        bluegreen_core::Error::backend(crate::NAME, operation, retryable, self)
    }
}
