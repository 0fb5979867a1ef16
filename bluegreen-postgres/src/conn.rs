//! Connection settings, connecting, and error conversion.

use std::fmt;
use std::time::Duration;

use bluegreen_core::{DbBinding, Error, Result, Secret};
use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, NoTls};

use crate::error::pg_error;
use crate::ident::validate_ident;

/// Where and as whom to connect: host, port, user, password, database.
///
/// `Debug` never shows the password. The password reaches the server through the protocol, child
/// processes (`pg_dump`, `psql`) through the `PGPASSWORD` environment variable (never argv), and
/// releases through [`DbBinding::secret_env`].
///
/// ```
/// use bluegreen_postgres::PostgresConfig;
/// let cfg = PostgresConfig::new("127.0.0.1", 5432, "app")
///     .with_user("deployer")
///     .with_password("s3cret");
/// assert!(!format!("{cfg:?}").contains("s3cret"));
///
/// // In a file: the password is named by an environment variable, read when the file is read,
/// // and never written back.
/// std::env::set_var("DOC_PG_PASSWORD", "s3cret");
/// let from_file: PostgresConfig = serde_json::from_str(
///     r#"{ "dbname": "app", "user": "deployer", "password_env": "DOC_PG_PASSWORD" }"#,
/// )
/// .unwrap();
/// assert_eq!(from_file.host, "127.0.0.1");
/// assert_eq!(from_file.password.as_ref().map(|p| p.expose()), Some("s3cret"));
/// let written = serde_json::to_string(&from_file).unwrap();
/// assert!(written.contains("DOC_PG_PASSWORD") && !written.contains("s3cret"), "{written}");
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PostgresConfigFile", into = "PostgresConfigFile")]
#[non_exhaustive]
pub struct PostgresConfig {
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
    /// The environment variable the password was read from, when it came from a file; written
    /// back instead of the password.
    pub password_env: Option<String>,
}

/// [`PostgresConfig`] as a file spells it: the password by the name of the environment variable
/// holding it (`password_env`), never in clear.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PostgresConfigFile {
    #[serde(default = "default_host")]
    host: String,
    #[serde(default = "default_port")]
    port: u16,
    #[serde(default = "default_user")]
    user: String,
    dbname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password_env: Option<String>,
    #[serde(default = "ten_seconds", with = "bluegreen_core::config::duration")]
    connect_timeout: Duration,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    5432
}
fn default_user() -> String {
    "postgres".into()
}
fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}

impl TryFrom<PostgresConfigFile> for PostgresConfig {
    type Error = Error;

    /// Reads the password from `password_env` (an error naming the variable when it is unset)
    /// and validates the names.
    fn try_from(f: PostgresConfigFile) -> Result<Self> {
        let password = match &f.password_env {
            Some(var) => Some(Secret::new(std::env::var(var).map_err(|_| {
                Error::invalid(
                    "password_env",
                    var,
                    format!("the environment variable {var} is not set"),
                )
            })?)),
            None => None,
        };
        let config = PostgresConfig {
            host: f.host,
            port: f.port,
            user: f.user,
            password,
            dbname: f.dbname,
            connect_timeout: f.connect_timeout,
            password_env: f.password_env,
        };
        config.validate()?;
        Ok(config)
    }
}

impl From<PostgresConfig> for PostgresConfigFile {
    fn from(c: PostgresConfig) -> Self {
        PostgresConfigFile {
            host: c.host,
            port: c.port,
            user: c.user,
            dbname: c.dbname,
            password_env: c.password_env,
            connect_timeout: c.connect_timeout,
        }
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .finish()
    }
}

impl PostgresConfig {
    /// Settings for `dbname` on `host:port` as user `postgres`, without a password.
    pub fn new(host: impl Into<String>, port: u16, dbname: impl Into<String>) -> Self {
        PostgresConfig {
            host: host.into(),
            port,
            user: default_user(),
            password: None,
            dbname: dbname.into(),
            connect_timeout: ten_seconds(),
            password_env: None,
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
    pub(crate) fn db(&self, dbname: &str) -> PostgresConfig {
        self.clone().with_dbname(dbname)
    }

    /// Checks the names in these settings (also run when deserializing).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a database or user name outside the identifier grammar, or a
    /// host that is empty or holds spaces or quotes.
    pub fn validate(&self) -> Result<()> {
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
