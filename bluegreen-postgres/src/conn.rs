//! Connection settings, connecting, and error conversion.

use std::fmt;
use std::time::Duration;

use bluegreen_core::{DbBinding, Error, Result, Secret};
use tokio_postgres::{Client, NoTls};

use crate::ident::validate_ident;

/// Where and as whom to connect: host, port, user, password, database.
///
/// `Debug` never shows the password. The password reaches the server through the protocol, child
/// processes (`pg_dump`, `psql`) through the `PGPASSWORD` environment variable (never argv), and
/// releases through [`DbBinding::secret_env`].
///
/// ```
/// use bluegreen_postgres::PgConfig;
/// let cfg = PgConfig::new("127.0.0.1", 5432, "app")
///     .with_user("deployer")
///     .with_password("s3cret");
/// assert!(!format!("{cfg:?}").contains("s3cret"));
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgConfig {
    /// Host name, IP address, or a Unix-socket directory (starting with `/`).
    pub host: String,
    /// Port.
    pub port: u16,
    /// User (default `postgres`).
    pub user: String,
    /// Password, if the server asks for one.
    pub password: Option<Secret>,
    /// Database.
    pub dbname: String,
    /// Connect timeout (default 10 s).
    pub connect_timeout: Duration,
}

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .finish()
    }
}

impl PgConfig {
    /// Settings for `dbname` on `host:port` as user `postgres`, without a password.
    pub fn new(host: impl Into<String>, port: u16, dbname: impl Into<String>) -> Self {
        PgConfig {
            host: host.into(),
            port,
            user: "postgres".into(),
            password: None,
            dbname: dbname.into(),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// With a user.
    pub fn with_user(mut self, user: impl Into<String>) -> Self {
        self.user = user.into();
        self
    }

    /// With a password.
    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(Secret::new(password));
        self
    }

    /// With another database on the same server.
    pub fn with_dbname(mut self, dbname: impl Into<String>) -> Self {
        self.dbname = dbname.into();
        self
    }

    /// With a connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The same server, database `dbname`.
    pub(crate) fn db(&self, dbname: &str) -> PgConfig {
        self.clone().with_dbname(dbname)
    }

    /// Checks the names in these settings.
    pub(crate) fn validate(&self) -> Result<()> {
        validate_ident("database", &self.dbname)?;
        validate_ident("user", &self.user)?;
        if self.host.is_empty() || self.host.chars().any(|c| c.is_whitespace() || c == '\'') {
            return Err(Error::invalid(
                "host",
                &self.host,
                "empty, or contains spaces or quotes",
            ));
        }
        Ok(())
    }

    fn tokio_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("bluegreen")
            .connect_timeout(self.connect_timeout);
        if let Some(p) = &self.password {
            c.password(p.expose());
        }
        c
    }

    /// Opens a connection (its driver task runs on the current tokio runtime).
    pub async fn connect(&self, backend: &str) -> Result<Client> {
        let (client, conn) = self
            .tokio_config()
            .connect(NoTls)
            .await
            .map_err(|e| pg_error(backend, &format!("connect to {}", self.describe()), e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "postgres connection ended");
            }
        });
        Ok(client)
    }

    /// `host:port/dbname as user`, for messages (no password).
    pub fn describe(&self) -> String {
        format!(
            "{}:{}/{} as {}",
            self.host, self.port, self.dbname, self.user
        )
    }

    /// A libpq connection string with the password (for `CREATE SUBSCRIPTION`; never logged).
    pub(crate) fn conninfo_with_password(&self) -> Secret {
        let q = |s: &str| {
            let mut o = String::from("'");
            for c in s.chars() {
                if c == '\'' || c == '\\' {
                    o.push('\\');
                }
                o.push(c);
            }
            o.push('\'');
            o
        };
        let mut s = format!(
            "host={} port={} user={} dbname={}",
            q(&self.host),
            self.port,
            q(&self.user),
            q(&self.dbname)
        );
        if let Some(p) = &self.password {
            s.push_str(" password=");
            s.push_str(&q(p.expose()));
        }
        Secret::new(s)
    }

    /// `postgresql://user:password@host:port/dbname` (percent-encoded).
    pub(crate) fn url(&self) -> Secret {
        let enc = |s: &str| {
            let mut o = String::new();
            for b in s.bytes() {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                    o.push(b as char);
                } else {
                    o.push_str(&format!("%{b:02X}"));
                }
            }
            o
        };
        let auth = match &self.password {
            Some(p) => format!("{}:{}", enc(&self.user), enc(p.expose())),
            None => enc(&self.user),
        };
        let host = if self.host.starts_with('/') {
            // A socket directory goes in the query string.
            return Secret::new(format!(
                "postgresql://{auth}@/{}?host={}&port={}",
                enc(&self.dbname),
                enc(&self.host),
                self.port
            ));
        } else if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        Secret::new(format!(
            "postgresql://{auth}@{host}:{}/{}",
            self.port,
            enc(&self.dbname)
        ))
    }

    /// The binding a release gets for these settings: `PGHOST`, `PGPORT`, `PGDATABASE`, `PGUSER`
    /// in `env`; `PGPASSWORD` (when set) and `DATABASE_URL` in `secret_env`.
    pub fn binding(&self) -> DbBinding {
        let mut b = DbBinding::none()
            .with_env("PGHOST", &self.host)
            .with_env("PGPORT", self.port.to_string())
            .with_env("PGDATABASE", &self.dbname)
            .with_env("PGUSER", &self.user)
            .with_secret("DATABASE_URL", self.url().expose());
        if let Some(p) = &self.password {
            b = b.with_secret("PGPASSWORD", p.expose());
        }
        b
    }

    /// Environment for child processes (`pg_dump`, `psql`): connection settings, password included.
    pub(crate) fn child_env(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("PGHOST", self.host.clone()),
            ("PGPORT", self.port.to_string()),
            ("PGUSER", self.user.clone()),
            ("PGDATABASE", self.dbname.clone()),
            (
                "PGCONNECT_TIMEOUT",
                self.connect_timeout.as_secs().max(2).to_string(),
            ),
            ("PGAPPNAME", "bluegreen".to_string()),
        ];
        if let Some(p) = &self.password {
            v.push(("PGPASSWORD", p.expose().to_string()));
        }
        v
    }
}

/// A PostgreSQL error with the server's message (the driver's `Display` says only "db error").
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PgError {
    /// What was being done.
    pub context: String,
    /// The server's (or driver's) message, with SQLSTATE, detail and hint when present.
    pub message: String,
    /// The SQLSTATE code, when the server sent one.
    pub code: Option<String>,
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
        PgError {
            context: context.to_string(),
            message,
            code,
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
            .downcast_ref::<PgError>()
            .and_then(|p| p.code.as_deref()),
        _ => None,
    }
}
