//! Settings of a [`ProcessEnvironment`](crate::ProcessEnvironment).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use bluegreen_core::{Error, PerSlot, Result, Slot};
use serde::{Deserialize, Serialize};

/// Settings of a [`ProcessEnvironment`](crate::ProcessEnvironment).
///
/// ```
/// use std::time::Duration;
/// use bluegreen_core::Slot;
/// use bluegreen_process::ProcessConfig;
///
/// let config = ProcessConfig::new("/var/lib/myapp/bluegreen")
///     .with_port(Slot::Blue, 8081)
///     .with_port(Slot::Green, 8082)
///     .with_env("RUST_LOG", "info")
///     .with_stop_timeout(Duration::from_secs(20));
/// assert_eq!(config.host, "127.0.0.1");
/// assert_eq!(config.ports.get(Slot::Green), &Some(8082));
///
/// // In a file, every field has its default; durations are "500ms", "10s", "2m".
/// let from_file: ProcessConfig =
///     serde_json::from_str(r#"{ "state_dir": "/srv/app", "stop_timeout": "20s" }"#).unwrap();
/// assert_eq!(from_file.stop_timeout, Duration::from_secs(20));
/// assert!(serde_json::from_str::<ProcessConfig>(r#"{ "host": "" }"#).is_err());
///
/// // Programs get PATH, HOME, LANG, TZ and what is passed, never the rest of this environment.
/// let passing: ProcessConfig = serde_json::from_str(r#"{ "pass_env": ["RUST_LOG"] }"#).unwrap();
/// assert!(!passing.inherit_env);
/// assert!(serde_json::from_str::<ProcessConfig>(r#"{ "pass_env": ["A=B"] }"#).is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ProcessConfig {
    /// Where pid files (`<slot>.json`) and logs (`<slot>.log`) live. Created (mode 0700) when
    /// missing. Two environments on the same directory see the same slots.
    pub state_dir: PathBuf,
    /// The address handed to the program (`HOST`) and put in its endpoint. Default `127.0.0.1`.
    pub host: String,
    /// A fixed port per slot; `None` picks a free port on `host` at each deploy.
    pub ports: PerSlot<Option<u16>>,
    /// Variables given to every program (before the release's own, which win). Serialized as they
    /// are (only `Debug` hides the values): put secrets in
    /// [`Release::secret_env`](bluegreen_core::Release::secret_env), never here.
    pub env: BTreeMap<String, String>,
    /// Whether programs inherit this process's whole environment. Default `false`: a program
    /// gets only [`BASE_ENV`] and the names in [`pass_env`](Self::pass_env) from this process,
    /// so the deploying shell's credentials (a database password variable, CI tokens) never
    /// reach it.
    pub inherit_env: bool,
    /// Names of variables passed through from this process's environment, besides
    /// [`BASE_ENV`] (a name that is not set is left out). Default empty.
    pub pass_env: Vec<String>,
    /// How many earlier logs each slot keeps (`<slot>.log.1` the newest, up to
    /// `<slot>.log.<keep_logs>`): a slot's log is rotated when a new program starts in it and when
    /// the slot is removed, so a failed release's output outlives the rollback. Default 5.
    pub keep_logs: u32,
    /// Working directory of programs; `None` keeps this process's.
    pub working_dir: Option<PathBuf>,
    /// How long after spawning `deploy` watches for an immediate exit. Default 500 ms.
    #[serde(with = "bluegreen_core::config::duration")]
    pub startup_grace: Duration,
    /// Drain bound used when `deploy` replaces a running program and by `remove`. Default 10 s.
    #[serde(with = "bluegreen_core::config::duration")]
    pub stop_timeout: Duration,
    /// How long after SIGKILL a process may take to disappear before `stop` fails. Default 5 s.
    #[serde(with = "bluegreen_core::config::duration")]
    pub kill_timeout: Duration,
    /// Bound on one `exec`; the command's process group is killed after it. Default 10 min.
    #[serde(with = "bluegreen_core::config::duration")]
    pub exec_timeout: Duration,
}

/// The variables every program gets from this process's environment, when set.
pub const BASE_ENV: [&str; 4] = ["PATH", "HOME", "LANG", "TZ"];

/// Most earlier logs a slot may keep.
pub const MAX_KEEP_LOGS: u32 = 100;

impl Default for ProcessConfig {
    /// State in `.bluegreen/process` (relative to the working directory).
    fn default() -> Self {
        ProcessConfig::new(".bluegreen/process")
    }
}

bluegreen_core::validated_serde!(ProcessConfig);

impl ProcessConfig {
    /// Checks what a file could get wrong: an empty state directory or host, and variable names
    /// that cannot reach a program (empty, with `=` or NUL). Run when deserializing.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.state_dir.as_os_str().is_empty() {
            return Err(Error::invalid("state_dir", "", "must not be empty"));
        }
        if self.host.trim().is_empty() {
            return Err(Error::invalid("host", &self.host, "must not be empty"));
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(Error::invalid(
                    "environment variable name",
                    k,
                    "must be non-empty, without `=` or NUL",
                ));
            }
        }
        for k in &self.pass_env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(Error::invalid(
                    "pass_env",
                    k,
                    "a variable name must be non-empty, without `=` or NUL",
                ));
            }
        }
        if self.keep_logs > MAX_KEEP_LOGS {
            return Err(Error::invalid(
                "keep_logs",
                self.keep_logs.to_string(),
                format!("must be at most {MAX_KEEP_LOGS}"),
            ));
        }
        Ok(())
    }

    /// Defaults, keeping state in `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        ProcessConfig {
            state_dir: state_dir.into(),
            host: "127.0.0.1".to_string(),
            ports: PerSlot::default(),
            env: BTreeMap::new(),
            inherit_env: false,
            pass_env: Vec::new(),
            keep_logs: 5,
            working_dir: None,
            startup_grace: Duration::from_millis(500),
            stop_timeout: Duration::from_secs(10),
            kill_timeout: Duration::from_secs(5),
            exec_timeout: Duration::from_secs(600),
        }
    }

    /// With the state directory.
    pub fn with_state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = dir.into();
        self
    }

    /// With the host handed out (`HOST` and endpoints).
    pub fn with_host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// With a fixed port for `slot`.
    pub fn with_port(mut self, slot: Slot, port: u16) -> Self {
        self.ports.set(slot, Some(port));
        self
    }

    /// With a variable for every program.
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Whether programs inherit this process's whole environment (default: only [`BASE_ENV`]
    /// and [`pass_env`](Self::pass_env)).
    pub fn with_inherit_env(mut self, inherit: bool) -> Self {
        self.inherit_env = inherit;
        self
    }

    /// With one more variable passed through from this process's environment.
    pub fn with_pass_env(mut self, name: impl Into<String>) -> Self {
        self.pass_env.push(name.into());
        self
    }

    /// With how many earlier logs each slot keeps.
    pub fn with_keep_logs(mut self, keep: u32) -> Self {
        self.keep_logs = keep;
        self
    }

    /// The variables a program's clean environment starts from (without
    /// [`inherit_env`](Self::inherit_env)): those of [`BASE_ENV`] and
    /// [`pass_env`](Self::pass_env) that this process has.
    pub fn passed_env(&self) -> BTreeMap<String, std::ffi::OsString> {
        BASE_ENV
            .iter()
            .copied()
            .chain(self.pass_env.iter().map(String::as_str))
            .filter_map(|k| Some((k.to_string(), std::env::var_os(k)?)))
            .collect()
    }

    /// With the programs' working directory.
    pub fn with_working_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.working_dir = Some(dir.into());
        self
    }

    /// With the window in which an exit counts as a failed start.
    pub fn with_startup_grace(mut self, grace: Duration) -> Self {
        self.startup_grace = grace;
        self
    }

    /// With the drain bound for replacing and removing.
    pub fn with_stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// With the wait after SIGKILL.
    pub fn with_kill_timeout(mut self, timeout: Duration) -> Self {
        self.kill_timeout = timeout;
        self
    }

    /// With the bound on `exec`.
    pub fn with_exec_timeout(mut self, timeout: Duration) -> Self {
        self.exec_timeout = timeout;
        self
    }
}

impl fmt::Debug for ProcessConfig {
    /// Variable values are left out: they may hold credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessConfig")
            .field("state_dir", &self.state_dir)
            .field("host", &self.host)
            .field("ports", &self.ports)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("inherit_env", &self.inherit_env)
            .field("pass_env", &self.pass_env)
            .field("keep_logs", &self.keep_logs)
            .field("working_dir", &self.working_dir)
            .field("startup_grace", &self.startup_grace)
            .field("stop_timeout", &self.stop_timeout)
            .field("kill_timeout", &self.kill_timeout)
            .field("exec_timeout", &self.exec_timeout)
            .finish()
    }
}
