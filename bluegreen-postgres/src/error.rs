//! [`PostgresError`] and the conversion of driver errors into core's
//! [`Error::Backend`](bluegreen_core::Error::Backend), keeping the server's message, the SQLSTATE
//! and whether trying again may help.

use bluegreen_core::Error;

/// A PostgreSQL error with the server's message (the driver's `Display` says only "db error").
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
#[non_exhaustive]
pub struct PostgresError {
    /// What was being done.
    pub context: String,
    /// The server's (or driver's) message, with SQLSTATE, detail and hint when present.
    pub message: String,
    /// The SQLSTATE code, when the server sent one.
    pub code: Option<String>,
    /// Whether trying again may work (serialization failures, deadlocks, lock timeouts, lost
    /// connections).
    pub retryable: bool,
}

impl PostgresError {
    /// Whether the same call may succeed if tried again.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// Converts into core's [`Error::Backend`] for backend [`NAME`](crate::NAME) and `operation`,
    /// keeping this error as the source and its retryability.
    pub fn into_core(self, operation: &str) -> Error {
        let retryable = self.retryable;
        Error::backend(crate::NAME, operation, retryable, self)
    }
}

/// Into core's [`Error::Backend`] for backend [`NAME`](crate::NAME), the operation being the
/// error's `context`; the error stays the source and decides retryability.
impl From<PostgresError> for Error {
    fn from(e: PostgresError) -> Error {
        let context = e.context.clone();
        e.into_core(&context)
    }
}

/// Converts a driver error into core's [`Error::Backend`], keeping the server's message.
pub(crate) fn pg_error(backend: &str, context: &str, e: tokio_postgres::Error) -> Error {
    let (message, code, retryable) = match e.as_db_error() {
        Some(db) => {
            let mut m = format!("{} ({}): {}", db.severity(), db.code().code(), db.message());
            if let Some(d) = db.detail() {
                m.push_str(&format!("; detail: {d}"));
            }
            if let Some(h) = db.hint() {
                m.push_str(&format!("; hint: {h}"));
            }
            let code = db.code().code().to_string();
            // Serialization failures, deadlocks, lock timeouts, "cannot connect now", too many
            // connections: trying again may work.
            let retryable = matches!(
                code.as_str(),
                "40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03" | "53300"
            ) || code.starts_with("08");
            (m, Some(code), retryable)
        }
        None => {
            let mut m = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                m.push_str(&format!(": {s}"));
                src = s.source();
            }
            let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
            (m, None, e.is_closed() || io)
        }
    };
    let _ = e;
    Error::backend(
        backend,
        context,
        retryable,
        PostgresError {
            context: context.to_string(),
            message,
            code,
            retryable,
        },
    )
}

/// An [`Error::Backend`] from a message.
pub(crate) fn fail(backend: &str, operation: &str, message: impl Into<String>) -> Error {
    Error::backend(backend, operation, false, message.into())
}

/// The SQLSTATE of a bluegreen error produced by [`pg_error`], if any.
#[allow(dead_code)] // for callers that branch on a SQLSTATE
pub(crate) fn sqlstate(e: &Error) -> Option<&str> {
    match e {
        Error::Backend { source, .. } => source
            .downcast_ref::<PostgresError>()
            .and_then(|p| p.code.as_deref()),
        _ => None,
    }
}
