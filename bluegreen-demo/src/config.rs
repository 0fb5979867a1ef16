//! Settings of the demo app, from code or from environment variables.

use std::fmt;
use std::time::Duration;

use crate::db::DatabaseUrl;

/// The longest sleep `/slow?ms=N` accepts, in milliseconds.
pub const MAX_SLOW_MS: u64 = 60_000;

/// Settings of the demo app.
///
/// Build one with [`DemoConfig::new`] and the `with_*` methods, or read the environment with
/// [`DemoConfig::from_env`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DemoConfig {
    /// Address to listen on (`127.0.0.1`; `0.0.0.0` in containers).
    pub host: String,
    /// Port to listen on (0 picks a free one).
    pub port: u16,
    /// Version reported in bodies and headers.
    pub version: String,
    /// Slot reported in bodies and headers.
    pub slot: String,
    /// `/health` answers 503 when set.
    pub fail_health: bool,
    /// Share of `/` requests answered with 500, between 0 and 1. Deterministic: of the first `n`
    /// requests, exactly `floor(n * error_rate)` fail.
    pub error_rate: f64,
    /// Wait before listening (applied by the binary, not by [`serve`](crate::serve)).
    pub start_delay: Duration,
    /// Exit at once with this code instead of serving (applied by the binary).
    pub exit_code: Option<i32>,
    /// How long in-flight requests may take to finish after shutdown starts.
    pub drain_timeout: Duration,
    /// Ignore SIGTERM (binary only; SIGINT and SIGKILL still stop it): a stuck release, for
    /// testing forced stops.
    pub ignore_sigterm: bool,
    /// When set, `POST /jsonrpc` requires `Authorization: Bearer <token>` (`DEMO_RPC_TOKEN`).
    pub rpc_token: Option<String>,
    /// The database `POST /write` writes to (`DATABASE_URL`); without it the route answers 503.
    pub database_url: Option<DatabaseUrl>,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            host: "127.0.0.1".to_string(),
            port: 8080,
            version: "dev".to_string(),
            slot: "none".to_string(),
            fail_health: false,
            error_rate: 0.0,
            start_delay: Duration::ZERO,
            exit_code: None,
            drain_timeout: Duration::from_secs(30),
            ignore_sigterm: false,
            rpc_token: None,
            database_url: None,
        }
    }
}

impl DemoConfig {
    /// Reporting `version` and `slot`, listening on `127.0.0.1` on a free port.
    pub fn new(version: impl Into<String>, slot: impl Into<String>) -> Self {
        DemoConfig {
            version: version.into(),
            slot: slot.into(),
            port: 0,
            ..DemoConfig::default()
        }
    }

    /// Reads the process environment (see the [crate docs](crate) for the variables).
    ///
    /// # Errors
    /// A variable that is set but cannot be parsed, naming the variable and the value.
    pub fn from_env() -> Result<Self, ConfigError> {
        DemoConfig::from_lookup(|k| std::env::var(k).ok())
    }

    /// Like [`from_env`](Self::from_env), reading variables through `var` (for tests).
    ///
    /// # Errors
    /// A variable that is set but cannot be parsed, naming the variable and the value.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut c = DemoConfig::default();
        let set = |k: &str| var(k).filter(|v| !v.is_empty());
        if let Some(h) = set("HOST") {
            c.host = h;
        }
        if let Some(p) = set("PORT") {
            c.port = parse("PORT", &p, "a TCP port (0-65535)")?;
        }
        if let Some(v) = set("BLUEGREEN_VERSION").or_else(|| set("VERSION")) {
            c.version = v;
        }
        if let Some(s) = set("BLUEGREEN_SLOT") {
            c.slot = s;
        }
        check_header_value("BLUEGREEN_VERSION", &c.version)?;
        check_header_value("BLUEGREEN_SLOT", &c.slot)?;
        if let Some(f) = set("DEMO_FAIL_HEALTH") {
            c.fail_health = flag("DEMO_FAIL_HEALTH", &f)?;
        }
        if let Some(f) = set("DEMO_IGNORE_SIGTERM") {
            c.ignore_sigterm = flag("DEMO_IGNORE_SIGTERM", &f)?;
        }
        if let Some(d) = set("DEMO_START_DELAY_MS") {
            c.start_delay =
                Duration::from_millis(parse("DEMO_START_DELAY_MS", &d, "milliseconds")?);
        }
        if let Some(r) = set("DEMO_ERROR_RATE") {
            let rate: f64 = parse("DEMO_ERROR_RATE", &r, "a number between 0 and 1")?;
            if !(0.0..=1.0).contains(&rate) {
                return Err(ConfigError::new(
                    "DEMO_ERROR_RATE",
                    &r,
                    "a number between 0 and 1",
                ));
            }
            c.error_rate = rate;
        }
        if let Some(e) = set("DEMO_EXIT_CODE") {
            c.exit_code = Some(parse("DEMO_EXIT_CODE", &e, "an exit code")?);
        }
        if let Some(d) = set("DEMO_DRAIN_MS") {
            c.drain_timeout = Duration::from_millis(parse("DEMO_DRAIN_MS", &d, "milliseconds")?);
        }
        c.rpc_token = set("DEMO_RPC_TOKEN");
        if let Some(url) = set("DATABASE_URL") {
            let url = DatabaseUrl::new(url);
            // The value is a secret: the error names the variable only.
            if url.parse().is_err() {
                return Err(ConfigError::new(
                    "DATABASE_URL",
                    "<redacted>",
                    "a PostgreSQL connection string",
                ));
            }
            c.database_url = Some(url);
        }
        Ok(c)
    }

    /// With a token `POST /jsonrpc` requires.
    pub fn with_rpc_token(mut self, token: impl Into<String>) -> Self {
        self.rpc_token = Some(token.into());
        self
    }

    /// With the database `POST /write` writes to.
    pub fn with_database_url(mut self, url: DatabaseUrl) -> Self {
        self.database_url = Some(url);
        self
    }

    /// With the listen address.
    pub fn with_host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// With the listen port (0 picks a free one).
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// With a failing `/health`.
    pub fn with_fail_health(mut self, fail: bool) -> Self {
        self.fail_health = fail;
        self
    }

    /// With this share (0 to 1) of `/` requests answered with 500.
    pub fn with_error_rate(mut self, rate: f64) -> Self {
        self.error_rate = rate.clamp(0.0, 1.0);
        self
    }

    /// With a delay before listening (binary only).
    pub fn with_start_delay(mut self, delay: Duration) -> Self {
        self.start_delay = delay;
        self
    }

    /// With the drain bound applied at shutdown.
    pub fn with_drain_timeout(mut self, drain: Duration) -> Self {
        self.drain_timeout = drain;
        self
    }
}

fn parse<T: std::str::FromStr>(
    var: &'static str,
    value: &str,
    want: &'static str,
) -> Result<T, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| ConfigError::new(var, value, want))
}

fn flag(var: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        _ => Err(ConfigError::new(var, value, "1 or 0")),
    }
}

fn check_header_value(var: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(ConfigError::new(
            var,
            value,
            "printable ASCII without spaces (it is sent as an HTTP header)",
        ))
    }
}

/// An environment variable that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The variable.
    pub var: &'static str,
    /// Its value.
    pub value: String,
    /// What was expected.
    pub expected: &'static str,
}

impl ConfigError {
    fn new(var: &'static str, value: &str, expected: &'static str) -> Self {
        ConfigError {
            var,
            value: value.to_string(),
            expected,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={:?} is invalid: expected {}",
            self.var, self.value, self.expected
        )
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<DemoConfig, ConfigError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DemoConfig::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_when_nothing_is_set() {
        let c = from(&[]).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 8080));
        assert_eq!((c.version.as_str(), c.slot.as_str()), ("dev", "none"));
        assert!(!c.fail_health && c.error_rate == 0.0 && c.exit_code.is_none());
    }

    #[test]
    fn reads_every_variable() {
        let c = from(&[
            ("HOST", "0.0.0.0"),
            ("PORT", "9000"),
            ("BLUEGREEN_VERSION", "v3"),
            ("VERSION", "ignored"),
            ("BLUEGREEN_SLOT", "blue"),
            ("DEMO_FAIL_HEALTH", "1"),
            ("DEMO_START_DELAY_MS", "250"),
            ("DEMO_ERROR_RATE", "0.3"),
            ("DEMO_EXIT_CODE", "3"),
            ("DEMO_DRAIN_MS", "1500"),
            ("DEMO_IGNORE_SIGTERM", "1"),
        ])
        .unwrap();
        assert_eq!((c.host.as_str(), c.port), ("0.0.0.0", 9000));
        assert_eq!((c.version.as_str(), c.slot.as_str()), ("v3", "blue"));
        assert!(c.fail_health);
        assert_eq!(c.start_delay, Duration::from_millis(250));
        assert_eq!(c.error_rate, 0.3);
        assert_eq!(c.exit_code, Some(3));
        assert_eq!(c.drain_timeout, Duration::from_millis(1500));
        assert!(c.ignore_sigterm);
    }

    #[test]
    fn version_falls_back_to_version_variable() {
        assert_eq!(from(&[("VERSION", "1.2")]).unwrap().version, "1.2");
    }

    #[test]
    fn the_database_url_is_read_but_never_shown() {
        let url = "postgres://app:s3cret@127.0.0.1:5432/shop";
        let c = from(&[("DATABASE_URL", url)]).unwrap();
        assert_eq!(c.database_url, Some(DatabaseUrl::new(url)));
        assert!(!format!("{c:?}").contains("s3cret"), "{c:?}");
        let err = from(&[("DATABASE_URL", "postgres://app:s3cret@[bad")]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("DATABASE_URL") && !msg.contains("s3cret"),
            "{msg}"
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("PORT", "http"),
            ("PORT", "70000"),
            ("DEMO_ERROR_RATE", "1.5"),
            ("DEMO_FAIL_HEALTH", "maybe"),
            ("BLUEGREEN_VERSION", "a b"),
        ] {
            let err = from(&[(k, v)]).unwrap_err();
            assert_eq!(err.var, k);
            assert!(err.to_string().contains(v), "{err}");
        }
    }
}
