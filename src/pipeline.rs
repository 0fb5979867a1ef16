//! The pipeline file (`bluegreen.toml`): what it says, checked, as data. The backends it names
//! are built in `backends.rs`.
//!
//! Each `[environment]` / `[switch]` / `[database]` / `[state]` section is the backend's own
//! config type (`DockerConfig`, `HaproxyConfig`, …, deserialized and validated by the backend
//! crate), plus the few keys only a pipeline file has: where clients reach the switch (`public`),
//! the release's image, secrets by reference (`token_file`; `password_env` is the Postgres
//! config's own), and a few spellings kept from earlier files (`memory_mb`, `lag_bound` in
//! seconds, a migrations directory). A section is read in two steps: the file-only keys, then
//! the rest as the backend config, with what the pipeline decides added first (the project name,
//! `[policy]`'s drain timeout unless the section sets its own, paths made relative to the file).
// Settings of backends compiled out of this binary are accepted but unused (building such a
// backend says which feature is missing).
#![cfg_attr(
    not(all(
        feature = "docker",
        feature = "haproxy",
        feature = "nginx",
        feature = "traefik",
        feature = "postgres"
    )),
    allow(dead_code)
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bluegreen::{Error, HookPoint, Name, OnTimeout, Policy, Release, Secret};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// The backends' config types; in a binary built without a backend's feature, a placeholder
/// that accepts the section (building that backend then says which feature is missing).
mod types {
    #[cfg(feature = "docker")]
    pub(crate) use bluegreen::docker::{DockerConfig, FleetHost, SwarmConfig};
    #[cfg(feature = "haproxy")]
    pub(crate) use bluegreen::haproxy::HaproxyConfig;
    #[cfg(feature = "nginx")]
    pub(crate) use bluegreen::nginx::NginxDynamicConfig;
    #[cfg(feature = "postgres")]
    pub(crate) use bluegreen::postgres::{
        CopiedConfig, PostgresStoreConfig, ReplicatedConfig, SharedConfig,
    };
    pub(crate) use bluegreen::proxy::ProxyConfig;
    #[cfg(feature = "traefik")]
    pub(crate) use bluegreen::traefik::TraefikConfig;

    /// The settings of a backend this binary was built without: accepted unread.
    #[allow(dead_code)] // unused when every backend is built
    #[derive(Debug, Clone)]
    pub(crate) struct NotBuilt;

    impl<'de> serde::Deserialize<'de> for NotBuilt {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            serde::de::IgnoredAny::deserialize(d).map(|_| NotBuilt)
        }
    }

    #[cfg(not(feature = "docker"))]
    pub(crate) type DockerConfig = NotBuilt;
    #[cfg(not(feature = "docker"))]
    pub(crate) type FleetHost = NotBuilt;
    #[cfg(not(feature = "docker"))]
    pub(crate) type SwarmConfig = NotBuilt;
    #[cfg(not(feature = "haproxy"))]
    pub(crate) type HaproxyConfig = NotBuilt;
    #[cfg(not(feature = "nginx"))]
    pub(crate) type NginxDynamicConfig = NotBuilt;
    #[cfg(not(feature = "traefik"))]
    pub(crate) type TraefikConfig = NotBuilt;
    #[cfg(not(feature = "postgres"))]
    pub(crate) type SharedConfig = NotBuilt;
    #[cfg(not(feature = "postgres"))]
    pub(crate) type CopiedConfig = NotBuilt;
    #[cfg(not(feature = "postgres"))]
    pub(crate) type ReplicatedConfig = NotBuilt;
    #[cfg(not(feature = "postgres"))]
    pub(crate) type PostgresStoreConfig = NotBuilt;
}

pub(crate) use types::*;

/// The whole file, checked.
#[derive(Debug)]
pub(crate) struct Pipeline {
    pub(crate) project: Project,
    pub(crate) environment: EnvironmentCfg,
    pub(crate) switch: SwitchCfg,
    pub(crate) database: DatabaseCfg,
    pub(crate) health_checks: Vec<HealthCfg>,
    pub(crate) hooks: Vec<HookCfg>,
    pub(crate) policy: Policy,
    pub(crate) verify: Option<VerifyCfg>,
    pub(crate) analysis: Option<AnalysisCfg>,
    pub(crate) state: StateCfg,
    pub(crate) secrets: SecretsCfg,
}

/// `[secrets]`: where releases' secret environment comes from, asked at every (re)deploy (never
/// stored). A release whose recorded secrets cannot all be had is never started.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SecretsCfg {
    /// Variables of the `bluegreen` command's own environment, passed under the same names.
    #[serde(default)]
    pub(crate) env: Vec<String>,
    /// Variable → file holding its value (relative to the pipeline file; refused when readable
    /// by group or others).
    #[serde(default)]
    pub(crate) files: BTreeMap<String, PathBuf>,
    /// A command, as an argv (no shell; `{version}` is replaced), printing `KEY=VALUE` lines.
    #[serde(default)]
    pub(crate) command: Vec<String>,
}

impl SecretsCfg {
    /// The sources this section names, checked.
    pub(crate) fn sources(&self) -> bluegreen::Result<Vec<Arc<dyn bluegreen::SecretSource>>> {
        use bluegreen::secrets::{CommandSecrets, EnvSecrets, FileSecrets};
        let mut out: Vec<Arc<dyn bluegreen::SecretSource>> = Vec::new();
        if !self.env.is_empty() {
            out.push(Arc::new(EnvSecrets::new(self.env.iter().cloned())?));
        }
        if !self.files.is_empty() {
            let mut f = FileSecrets::new();
            for (k, path) in &self.files {
                f = f.with_file(k.clone(), path.clone())?;
            }
            out.push(Arc::new(f));
        }
        if !self.command.is_empty() {
            out.push(Arc::new(CommandSecrets::new(self.command.iter().cloned())?));
        }
        Ok(out)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Project {
    pub(crate) name: Name,
    /// Relative to the pipeline file's directory.
    #[serde(default = "default_state_dir")]
    pub(crate) state_dir: PathBuf,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(".bluegreen")
}

/// Where releases run.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per process
pub(crate) enum EnvironmentCfg {
    /// Local child processes; the section is the release's program (no backend settings).
    Process(ProcessCfg),
    /// Containers on a Docker Engine (`DOCKER_HOST` or the local socket), or on every engine of
    /// `hosts` (a `DockerFleet`).
    Docker {
        /// The release's image; `{version}` is replaced by the version label (`shop:{version}`).
        image: String,
        config: DockerConfig,
        /// The fleet's hosts (TLS paths resolved against the pipeline file's directory); empty
        /// for one engine.
        hosts: Vec<types::FleetHost>,
    },
    /// Services of a Docker Swarm, through a manager's engine (`DOCKER_HOST` or the local
    /// socket).
    Swarm {
        /// The release's image; `{version}` is replaced by the version label.
        image: String,
        config: SwarmConfig,
    },
}

/// The program each release runs: these keys are the release's, not the environment's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProcessCfg {
    /// The program each release runs (the version is passed as `BLUEGREEN_VERSION`).
    pub(crate) program: String,
    #[serde(default)]
    pub(crate) args: Vec<String>,
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
    /// Variables of the CLI's environment passed through to the program, besides PATH, HOME,
    /// LANG and TZ; nothing else of it reaches the program.
    #[serde(default)]
    pub(crate) pass_env: Vec<String>,
    /// What `bluegreen serve` does when the live program dies: `restart` (with backoff, the
    /// default), `failover` (to the warm previous release if it stays down) or `none`.
    #[serde(default)]
    pub(crate) on_live_failure: bluegreen::process::OnLiveFailure,
    /// How long the live program may stay down before `failover` (default 10 s).
    #[serde(
        default = "default_failover_after",
        with = "bluegreen::config::duration"
    )]
    pub(crate) failover_after: Duration,
    /// The program's working directory; `None` keeps the CLI's. Relative to the pipeline file.
    #[serde(default)]
    pub(crate) working_dir: Option<PathBuf>,
}

fn default_failover_after() -> Duration {
    bluegreen::process::SupervisorConfig::default().failover_after
}

impl ProcessCfg {
    /// Refuses what could never start, and makes relative paths relative to `base` (the pipeline
    /// file's directory): a `program` with a `/` (a bare name is looked up in `PATH`) and
    /// `working_dir`.
    fn check(mut self, base: &Path) -> Result<Self, String> {
        if self.program.trim().is_empty() {
            return Err("environment.program: must name a program".into());
        }
        if self.program.contains('\0') || self.args.iter().any(|a| a.contains('\0')) {
            return Err("environment.program/args: must not contain NUL".into());
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(format!(
                    "environment.env: invalid variable name {:?}: must be non-empty, without `=` or NUL",
                    k.escape_debug().to_string()
                ));
            }
            if v.contains('\0') {
                return Err(format!(
                    "environment.env.{k}: the value must not contain NUL"
                ));
            }
        }
        if self.program.contains('/') && Path::new(&self.program).is_relative() {
            self.program = base.join(&self.program).to_string_lossy().into_owned();
        }
        if let Some(dir) = &self.working_dir {
            if dir.as_os_str().is_empty() {
                return Err("environment.working_dir: must not be empty".into());
            }
            self.working_dir = Some(base.join(dir));
        }
        Ok(self)
    }
}

/// The traffic switch, and where clients reach it (`public`, used by `[verify]`).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per process
pub(crate) enum SwitchCfg {
    /// The embedded proxy run by `bluegreen serve`; `admin` is its control API.
    Proxy {
        config: ProxyConfig,
        admin: SocketAddr,
    },
    Haproxy {
        config: HaproxyConfig,
        public: Option<SocketAddr>,
    },
    /// nginx with the Lua balancer (`Dynamic` mode) driven through its control listener.
    Nginx {
        config: NginxDynamicConfig,
        public: Option<SocketAddr>,
    },
    /// Traefik's file provider.
    Traefik {
        config: TraefikConfig,
        public: Option<SocketAddr>,
    },
}

/// The database strategy.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per process
pub(crate) enum DatabaseCfg {
    None,
    /// One database for both slots, expand/contract migrations.
    Shared(SharedConfig),
    /// The live database cloned into the target slot's database.
    Copied(CopiedConfig),
    /// The target slot's database kept current by logical replication; zero-loss cutover.
    Replicated(ReplicatedConfig),
}

/// Where the deployment state and lock live.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per process
pub(crate) enum StateCfg {
    File,
    /// Tables in PostgreSQL, for teams that deploy from several machines.
    Postgres(PostgresStoreConfig),
}

// ---- The file as written: file-only keys, then the rest for the backend's config. ----------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    project: Project,
    environment: EnvironmentFile,
    switch: SwitchFile,
    #[serde(default)]
    database: DatabaseFile,
    #[serde(default)]
    health_checks: Vec<HealthCfg>,
    #[serde(default)]
    hooks: Vec<HookCfg>,
    #[serde(default)]
    policy: Policy,
    #[serde(default)]
    verify: Option<VerifyCfg>,
    #[serde(default)]
    analysis: Option<AnalysisCfg>,
    #[serde(default)]
    state: StateFile,
    #[serde(default)]
    secrets: SecretsCfg,
}

/// A section with no keys besides `kind`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoKeys {}

/// The keys of a section that are not the backend config's.
type Rest = toml::Table;

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum EnvironmentFile {
    Process(ProcessCfg),
    Docker {
        image: String,
        /// Memory limit in MiB (the config's own key is `memory_bytes`).
        #[serde(default)]
        memory_mb: Option<u64>,
        /// A fleet: the release runs on every one of these engines.
        #[serde(default)]
        hosts: Vec<types::FleetHost>,
        #[serde(flatten)]
        rest: Rest,
    },
    Swarm {
        image: String,
        #[serde(flatten)]
        rest: Rest,
    },
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum SwitchFile {
    Proxy {
        /// Where `bluegreen serve` accepts client traffic.
        listen: SocketAddr,
        /// Where `bluegreen serve` accepts control requests (keep it on loopback).
        admin: SocketAddr,
        /// Serve the control API on a non-loopback `admin` address: its bearer token then
        /// travels in plain HTTP. Default `false` (such an address is refused).
        #[serde(default)]
        admin_public: bool,
        #[serde(flatten)]
        rest: Rest,
    },
    Haproxy {
        #[serde(default)]
        public: Option<SocketAddr>,
        #[serde(flatten)]
        rest: Rest,
    },
    Nginx {
        /// File holding the control token (relative to the pipeline file).
        token_file: PathBuf,
        #[serde(default)]
        public: Option<SocketAddr>,
        #[serde(flatten)]
        rest: Rest,
    },
    Traefik {
        #[serde(default)]
        public: Option<SocketAddr>,
        #[serde(flatten)]
        rest: Rest,
    },
}

#[derive(Default, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum DatabaseFile {
    #[default]
    #[serde(skip)]
    Default,
    None(NoKeys),
    Shared {
        /// `<name>.expand.sql` / `<name>.contract.sql` files (relative to the pipeline file).
        #[serde(default)]
        migrations: Option<PathBuf>,
        #[serde(flatten)]
        rest: Rest,
    },
    Copied {
        #[serde(flatten)]
        rest: Rest,
    },
    Replicated {
        /// Seconds the replication may take to catch up at the cutover.
        #[serde(default)]
        lag_bound: Option<f64>,
        #[serde(flatten)]
        rest: Rest,
    },
}

#[derive(Default, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum StateFile {
    #[default]
    #[serde(skip)]
    Default,
    File(NoKeys),
    Postgres {
        #[serde(flatten)]
        rest: Rest,
    },
}

/// A duration as the backend configs read it.
fn duration_value(d: Duration) -> toml::Value {
    toml::Value::String(format!("{}ms", d.as_millis()))
}

/// The longest number of seconds a pipeline file may give (the bound `[policy]` has too).
const MAX_SECONDS: f64 = 1e9;

/// A number of seconds from the file: positive, finite and at most [`MAX_SECONDS`] (a NaN,
/// infinite, negative or huge value would panic in `Duration::from_secs_f64`).
pub(crate) fn seconds(secs: f64) -> Result<Duration, String> {
    if secs.is_finite() && secs > 0.0 && secs <= MAX_SECONDS {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(format!(
            "{secs} is not a number of seconds (it must be above 0 and at most {MAX_SECONDS:e})"
        ))
    }
}

/// A path relative to the pipeline file's directory.
fn relative_to(base: &Path, rest: &mut Rest, key: &str) {
    if let Some(toml::Value::String(s)) = rest.get(key) {
        let joined = base.join(s).to_string_lossy().into_owned();
        rest.insert(key.to_string(), toml::Value::String(joined));
    }
}

/// The keys a container environment (docker, swarm) takes from elsewhere in the file: the project
/// from `[project] name` (refused in the section), the stop timeout from the drain bound unless
/// given.
fn container_keys(
    file: &Path,
    rest: &mut Rest,
    project: &str,
    drain: &toml::Value,
) -> bluegreen::Result<()> {
    if rest.contains_key("project") {
        return Err(config_error(
            file,
            "[environment]: the project is [project] name, not `project`",
        ));
    }
    rest.insert("project".into(), toml::Value::String(project.to_string()));
    rest.entry("stop_timeout").or_insert_with(|| drain.clone());
    Ok(())
}

/// The rest of `section` as the backend's config type, which validates it.
/// A fleet's TLS files are relative to the pipeline file's directory.
#[cfg(feature = "docker")]
fn resolve_hosts(mut hosts: Vec<types::FleetHost>, base: &Path) -> Vec<types::FleetHost> {
    for h in &mut hosts {
        if let Some(tls) = &mut h.tls {
            for p in [&mut tls.ca, &mut tls.cert, &mut tls.key] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
    }
    hosts
}

#[cfg(not(feature = "docker"))]
fn resolve_hosts(hosts: Vec<types::FleetHost>, _base: &Path) -> Vec<types::FleetHost> {
    hosts
}

fn backend_config<C: DeserializeOwned>(
    file: &Path,
    section: &str,
    rest: Rest,
) -> bluegreen::Result<C> {
    C::deserialize(toml::Value::Table(rest))
        .map_err(|e| config_error(file, format!("[{section}]: {}", e.message())))
}

impl Pipeline {
    /// Reads and checks `file`.
    pub(crate) fn load(file: &Path) -> bluegreen::Result<(Pipeline, PathBuf)> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Error::io(format!("reading the pipeline file {}", file.display()), e))?;
        Self::parse(&text, file)
    }

    /// Checks `text`, the contents of `file` (relative paths are relative to its directory).
    pub(crate) fn parse(text: &str, file: &Path) -> bluegreen::Result<(Pipeline, PathBuf)> {
        let mut f: PipelineFile = toml::from_str(text).map_err(|e| config_error(file, e))?;
        let base = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let state_dir = base.join(&f.project.state_dir);
        // The seed runbook's knobs.
        for (var, field) in [
            ("HEALTH_CHECK_TIMEOUT", 0),
            ("HEALTH_CHECK_INTERVAL", 1),
            ("DRAIN_TIMEOUT", 2),
        ] {
            if let Ok(v) = std::env::var(var) {
                let d = parse_duration(var, &v)?;
                match field {
                    0 => f.policy.readiness_timeout = d,
                    1 => {
                        f.policy.poll_max = d;
                        f.policy.poll_initial = f.policy.poll_initial.min(d);
                    }
                    _ => f.policy.drain_timeout = d,
                }
            }
        }
        f.policy
            .validate()
            .map_err(|e| config_error(file, format!("[policy]: {e}")))?;
        for (i, h) in f.hooks.iter().enumerate() {
            if h.argv.first().map(|a| a.is_empty()).unwrap_or(true) {
                return Err(config_error(
                    file,
                    format!("hooks[{i}]: argv must name a program"),
                ));
            }
            if let Some(t) = h.timeout {
                seconds(t).map_err(|e| config_error(file, format!("hooks[{i}].timeout: {e}")))?;
            }
        }
        for (i, h) in f.health_checks.iter().enumerate() {
            h.check()
                .map_err(|e| config_error(file, format!("health_checks[{i}]: {e}")))?;
        }
        if let Some(v) = &f.verify {
            v.check()
                .map_err(|e| config_error(file, format!("[verify]: {e}")))?;
        }
        if let Some(a) = &f.analysis {
            if !(0.0..=1.0).contains(&a.max_error_rate) {
                return Err(config_error(
                    file,
                    "[analysis] max_error_rate must be between 0 and 1",
                ));
            }
        }
        let drain = duration_value(f.policy.drain_timeout);
        let project = f.project.name.as_str().to_string();

        let environment = match f.environment {
            EnvironmentFile::Process(pc) => {
                if pc.failover_after.is_zero() {
                    return Err(config_error(
                        file,
                        "[environment] failover_after must be positive",
                    ));
                }
                EnvironmentCfg::Process(pc.check(&base).map_err(|e| config_error(file, e))?)
            }
            EnvironmentFile::Docker {
                image,
                memory_mb,
                hosts,
                mut rest,
            } => {
                container_keys(file, &mut rest, &project, &drain)?;
                if let Some(mb) = memory_mb {
                    let bytes = i64::try_from(mb.saturating_mul(1024 * 1024)).map_err(|_| {
                        Error::invalid("pipeline file", "environment.memory_mb", "too large")
                    })?;
                    rest.insert("memory_bytes".into(), toml::Value::Integer(bytes));
                }
                EnvironmentCfg::Docker {
                    image,
                    config: backend_config(file, "environment", rest)?,
                    hosts: resolve_hosts(hosts, &base),
                }
            }
            EnvironmentFile::Swarm { image, mut rest } => {
                container_keys(file, &mut rest, &project, &drain)?;
                EnvironmentCfg::Swarm {
                    image,
                    config: backend_config(file, "environment", rest)?,
                }
            }
        };

        let switch = match f.switch {
            SwitchFile::Proxy {
                listen,
                admin,
                admin_public,
                mut rest,
            } => {
                check_admin(admin, admin_public).map_err(|e| config_error(file, e))?;
                rest.insert("listen".into(), toml::Value::String(listen.to_string()));
                SwitchCfg::Proxy {
                    config: backend_config(file, "switch", rest)?,
                    admin,
                }
            }
            SwitchFile::Haproxy { public, mut rest } => {
                rest.entry("drain_timeout").or_insert_with(|| drain.clone());
                SwitchCfg::Haproxy {
                    config: backend_config(file, "switch", rest)?,
                    public,
                }
            }
            SwitchFile::Nginx {
                token_file,
                public,
                mut rest,
            } => {
                if rest.contains_key("token") {
                    return Err(config_error(
                        file,
                        "[switch]: the control token goes in a file named by `token_file`, not in the pipeline file",
                    ));
                }
                let token = read_secret_file(&base.join(&token_file), "nginx control token")?;
                rest.insert(
                    "token".into(),
                    toml::Value::String(token.expose().to_string()),
                );
                SwitchCfg::Nginx {
                    config: backend_config(file, "switch", rest)?,
                    public,
                }
            }
            SwitchFile::Traefik { public, mut rest } => {
                relative_to(&base, &mut rest, "dir");
                SwitchCfg::Traefik {
                    config: backend_config(file, "switch", rest)?,
                    public,
                }
            }
        };

        let database = match f.database {
            DatabaseFile::Default | DatabaseFile::None(_) => DatabaseCfg::None,
            DatabaseFile::Shared { migrations, rest } => {
                #[allow(unused_mut)]
                let mut config: SharedConfig = backend_config(file, "database", rest)?;
                if let Some(dir) = migrations {
                    #[cfg(feature = "postgres")]
                    {
                        use bluegreen::postgres::Migration;
                        config = config.with_migrations(Migration::from_dir(base.join(dir))?);
                    }
                    #[cfg(not(feature = "postgres"))]
                    let _ = dir;
                }
                // `[database.versioned] operations_dir` is relative to the pipeline file, like
                // `migrations`.
                #[cfg(feature = "postgres")]
                if let Some(dir) = config
                    .versioned
                    .as_mut()
                    .and_then(|v| v.operations_dir.as_mut())
                {
                    *dir = base.join(&*dir);
                }
                DatabaseCfg::Shared(config)
            }
            DatabaseFile::Copied { rest } => {
                DatabaseCfg::Copied(backend_config(file, "database", rest)?)
            }
            DatabaseFile::Replicated {
                lag_bound,
                mut rest,
            } => {
                if let Some(secs) = lag_bound {
                    let d = seconds(secs)
                        .map_err(|e| config_error(file, format!("database.lag_bound: {e}")))?;
                    rest.insert("lag_bound".into(), duration_value(d));
                }
                DatabaseCfg::Replicated(backend_config(file, "database", rest)?)
            }
        };

        let state = match f.state {
            StateFile::Default | StateFile::File(_) => StateCfg::File,
            StateFile::Postgres { mut rest } => {
                rest.entry("deployment")
                    .or_insert_with(|| toml::Value::String(project.clone()));
                StateCfg::Postgres(backend_config(file, "state", rest)?)
            }
        };

        let p = Pipeline {
            project: f.project,
            environment,
            switch,
            database,
            health_checks: f.health_checks,
            hooks: f.hooks,
            policy: f.policy,
            verify: f.verify,
            analysis: f.analysis,
            state,
            secrets: SecretsCfg {
                files: f
                    .secrets
                    .files
                    .into_iter()
                    .map(|(k, path)| (k, base.join(path)))
                    .collect(),
                ..f.secrets
            },
        };
        // Names and the command are checked now, not at the first deploy.
        p.secrets.sources()?;
        Ok((p, state_dir))
    }

    /// The admin token file of `bluegreen serve`.
    pub(crate) fn token_path(state_dir: &Path) -> PathBuf {
        state_dir.join("admin.token")
    }

    /// Where `bluegreen serve` keeps the routing the embedded proxy last applied.
    pub(crate) fn routing_path(state_dir: &Path) -> PathBuf {
        state_dir.join("proxy-routing.json")
    }

    /// A release of `version`.
    pub(crate) fn release(&self, version: &str) -> bluegreen::Result<Release> {
        match &self.environment {
            EnvironmentCfg::Process(pc) => {
                let mut r = Release::new(version, pc.program.clone())?;
                r.args = pc.args.clone();
                r.env = pc.env.clone();
                Ok(r)
            }
            EnvironmentCfg::Docker { image, .. } | EnvironmentCfg::Swarm { image, .. } => {
                // Validate first: the version is spliced into an image reference.
                let v = bluegreen::Version::new(version)?;
                Release::new(version, image.replace("{version}", v.as_str()))
            }
        }
    }

    /// The state store's kind, as written in the file.
    pub(crate) fn state_kind(&self) -> &'static str {
        match &self.state {
            StateCfg::File => "file",
            StateCfg::Postgres(_) => "postgres",
        }
    }

    /// The environment's kind, as written in the file.
    pub(crate) fn environment_kind(&self) -> &'static str {
        match &self.environment {
            EnvironmentCfg::Process(_) => "process",
            EnvironmentCfg::Docker { .. } => "docker",
            EnvironmentCfg::Swarm { .. } => "swarm",
        }
    }

    /// The embedded proxy's settings and control address, when the switch is the embedded proxy.
    pub(crate) fn proxy(&self) -> Option<(&ProxyConfig, SocketAddr)> {
        match &self.switch {
            SwitchCfg::Proxy { config, admin } => Some((config, *admin)),
            _ => None,
        }
    }

    /// The switch's kind, as written in the file.
    pub(crate) fn switch_kind(&self) -> &'static str {
        match &self.switch {
            SwitchCfg::Proxy { .. } => "proxy",
            SwitchCfg::Haproxy { .. } => "haproxy",
            SwitchCfg::Nginx { .. } => "nginx",
            SwitchCfg::Traefik { .. } => "traefik",
        }
    }

    /// Where clients reach the switch, when known (the `[verify]` probe goes there).
    pub(crate) fn public_addr(&self) -> Option<SocketAddr> {
        match &self.switch {
            SwitchCfg::Proxy { config, .. } => Some(config.listen),
            SwitchCfg::Haproxy { public, .. }
            | SwitchCfg::Nginx { public, .. }
            | SwitchCfg::Traefik { public, .. } => *public,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum HealthCfg {
    Http {
        path: String,
        /// Wider than a status so that any integer is named in the error (`status = 70000`).
        #[serde(default = "default_status")]
        status: i64,
        #[serde(default)]
        body_contains: Option<String>,
        #[serde(default)]
        max_latency_ms: Option<u64>,
        #[serde(default)]
        timeout_ms: Option<u64>,
        #[serde(default)]
        headers: BTreeMap<String, String>,
    },
    Tcp {
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    Command {
        argv: Vec<String>,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
}

fn default_status() -> i64 {
    200
}

/// `status` as a `u16`, or the error naming it.
pub(crate) fn http_status(status: i64) -> bluegreen::Result<u16> {
    u16::try_from(status).map_err(|_| {
        Error::invalid(
            "status",
            status.to_string(),
            "must be an HTTP status between 100 and 599",
        )
    })
}

impl HealthCfg {
    /// Refuses a check that could never pass (it would fail only after the readiness timeout).
    fn check(&self) -> bluegreen::Result<()> {
        use bluegreen::health::{validate_http_header, validate_http_path, validate_http_status};
        match self {
            HealthCfg::Http {
                path,
                status,
                headers,
                ..
            } => {
                validate_http_path("path", path)?;
                validate_http_status("status", http_status(*status)?)?;
                for (k, v) in headers {
                    validate_http_header("headers", k, Some(v))?;
                }
                Ok(())
            }
            HealthCfg::Command { argv, .. } => match argv.first() {
                Some(p) if !p.is_empty() && !argv.iter().any(|a| a.contains('\0')) => Ok(()),
                _ => Err(Error::invalid(
                    "argv",
                    format!("{argv:?}"),
                    "must name a program, without NUL",
                )),
            },
            HealthCfg::Tcp { .. } => Ok(()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HookCfg {
    pub(crate) point: HookPoint,
    /// Run in the target slot (`Environment::exec`), no shell.
    pub(crate) argv: Vec<String>,
    #[serde(default)]
    pub(crate) name: Option<String>,
    /// Seconds.
    #[serde(default)]
    pub(crate) timeout: Option<f64>,
    #[serde(default)]
    pub(crate) on_timeout: OnTimeout,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VerifyCfg {
    #[serde(default = "default_verify_path")]
    pub(crate) path: String,
    /// Response header carrying the version; when absent, the body must contain it.
    #[serde(default)]
    pub(crate) header: Option<String>,
}

fn default_verify_path() -> String {
    "/".into()
}

impl VerifyCfg {
    /// Refuses a probe that could never match: every deploy would switch, fail verify and switch
    /// back.
    fn check(&self) -> bluegreen::Result<()> {
        bluegreen::health::validate_http_path("path", &self.path)?;
        if let Some(h) = &self.header {
            bluegreen::health::validate_http_header("header", h, None)?;
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AnalysisCfg {
    pub(crate) max_error_rate: f64,
    #[serde(default)]
    pub(crate) min_requests: Option<u64>,
    #[serde(default)]
    pub(crate) max_p99_ms: Option<u64>,
}

/// The control API on a non-loopback address only when the file says so, and then with a
/// warning: the bearer token travels in plain HTTP.
fn check_admin(admin: SocketAddr, admin_public: bool) -> Result<(), String> {
    if admin.ip().is_loopback() {
        return Ok(());
    }
    if !admin_public {
        return Err(format!(
            "[switch] admin = \"{admin}\" is not a loopback address: the control API's bearer \
             token would travel in plain HTTP; keep it on 127.0.0.1 (reach it over SSH), or set \
             `admin_public = true` to serve it there anyway"
        ));
    }
    tracing::warn!(
        %admin,
        "the control API listens on a non-loopback address (admin_public = true): its bearer \
         token travels in plain HTTP, readable by anyone on the network path"
    );
    Ok(())
}

/// Refuses a secret file that group or others may read or write, as ssh refuses such a key (one
/// rule for token files and `[secrets]` files).
pub(crate) fn check_private(path: &Path, what: &str) -> bluegreen::Result<()> {
    bluegreen::secrets::check_private(path, &format!("the {what} file"))
}

/// A config error naming the file (and, from toml, the line, column and key).
pub(crate) fn config_error(file: &Path, msg: impl std::fmt::Display) -> Error {
    Error::invalid("pipeline file", file.display().to_string(), msg.to_string())
}

/// Parses a duration from the environment: `300`, `300s`, `5m`, `500ms`.
pub(crate) fn parse_duration(var: &str, s: &str) -> bluegreen::Result<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| {
        Error::invalid(
            "environment variable",
            var,
            format!("{s:?} is not a duration (e.g. 300, 30s, 5m, 500ms)"),
        )
    })?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(Error::invalid(
                "environment variable",
                var,
                format!("unknown unit {other:?} (use ms, s, m or h)"),
            ))
        }
    };
    if !(0.0..=1e7).contains(&secs) {
        return Err(Error::invalid("environment variable", var, "out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Reads a secret (a token) from a file, trimmed; an empty file is an error.
pub(crate) fn read_secret_file(path: &Path, what: &str) -> bluegreen::Result<Secret> {
    check_private(path, what)?;
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Ok(Secret::new(t.trim())),
        Ok(_) => Err(Error::invalid(
            "token file",
            path.display().to_string(),
            format!("the {what} file is empty"),
        )),
        Err(e) => Err(Error::io(
            format!("reading the {what} {}", path.display()),
            e,
        )),
    }
}

/// Reads the admin token written by `bluegreen serve`.
pub(crate) fn read_token(path: &Path) -> bluegreen::Result<Secret> {
    if path.exists() {
        check_private(path, "admin token")?;
    }
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Ok(Secret::new(t.trim())),
        Ok(_) => Err(Error::invalid(
            "admin token",
            path.display().to_string(),
            "the file is empty",
        )),
        Err(e) => Err(Error::io(
            format!(
                "reading the proxy's admin token {} (start the proxy with `bluegreen serve` first)",
                path.display()
            ),
            e,
        )),
    }
}

/// Creates (or reads) the admin token file, mode 0600.
pub(crate) fn ensure_token(path: &Path) -> bluegreen::Result<Secret> {
    // A token others could read is refused, not silently kept (nor replaced).
    if let Ok(t) = read_token(path) {
        return Ok(t);
    }
    if path.exists() {
        check_private(path, "admin token")?;
    }
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("reading /dev/urandom for the admin token", e))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    f.write_all(token.as_bytes())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok(Secret::new(token))
}

#[cfg(all(
    test,
    feature = "docker",
    feature = "haproxy",
    feature = "nginx",
    feature = "traefik",
    feature = "postgres"
))]
mod tests {
    use super::*;

    fn load(text: &str) -> bluegreen::Result<Pipeline> {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("nginx.token");
        std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let file = dir.path().join("bluegreen.toml");
        std::fs::write(&file, text).unwrap();
        Pipeline::load(&file).map(|(p, _)| p)
    }

    const README_KEYS: &str = r#"
[project]
name = "shop"

[environment]
kind = "docker"
image = "shop:{version}"
port = 8080
pull = "never"
memory_mb = 512
cpus = 1.5

[switch]
kind = "haproxy"
runtime = "/run/haproxy/admin.sock"
backend = "app"
pool_size = 6
public = "127.0.0.1:80"

[database]
kind = "replicated"
lag_bound = 60
after_cutover = "drop"
[database.connection]
host = "127.0.0.1"
dbname = "shop"
user = "deployer"

[state]
kind = "postgres"
[state.connection]
dbname = "deploys"

[policy]
drain_timeout = 12
"#;

    #[test]
    fn docker_hosts_make_a_fleet_with_tls_paths_next_to_the_file() {
        let text = r#"
[project]
name = "shop"

[environment]
kind = "docker"
image = "shop:{version}"
publish = "host"
host_ports = { blue = 8081, green = 8082 }
hosts = [
  { name = "web1", engine = "unix:///run/web1.sock", address = "10.0.0.11" },
  { name = "web2", engine = "tcp://10.0.0.12:2376", address = "10.0.0.12", tls = { ca = "certs/ca.pem", cert = "certs/cert.pem", key = "/etc/bg/key.pem" } },
]

[switch]
kind = "proxy"
listen = "127.0.0.1:8000"
admin = "127.0.0.1:8001"
"#;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bluegreen.toml");
        std::fs::write(&file, text).unwrap();
        let (p, _) = Pipeline::load(&file).unwrap();
        let EnvironmentCfg::Docker { config, hosts, .. } = &p.environment else {
            panic!("{:?}", p.environment)
        };
        assert_eq!(config.publish, bluegreen::docker::Publish::Host);
        let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["web1", "web2"]);
        let tls = hosts[1].tls.as_ref().unwrap();
        assert_eq!(tls.ca, dir.path().join("certs/ca.pem"));
        assert_eq!(tls.key, std::path::PathBuf::from("/etc/bg/key.pem"));
        // Host entries are validated like the API's.
        for bad in [
            r#"{ name = "web1", engine = "ssh://web1", address = "10.0.0.11" }"#,
            r#"{ name = "web 1", engine = "unix:///x", address = "10.0.0.11" }"#,
            r#"{ name = "web1", engine = "unix:///x", address = "10.0.0.11", typo = 1 }"#,
        ] {
            let t = text.replace(
                r#"{ name = "web1", engine = "unix:///run/web1.sock", address = "10.0.0.11" }"#,
                bad,
            );
            std::fs::write(&file, t).unwrap();
            let err = Pipeline::load(&file).unwrap_err().to_string();
            assert!(
                err.contains("[environment]") || err.contains("hosts"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_documented_keys_become_the_backend_configs() {
        let p = load(README_KEYS).unwrap();
        let EnvironmentCfg::Docker {
            image,
            config,
            hosts,
        } = &p.environment
        else {
            panic!("{:?}", p.environment)
        };
        assert_eq!(image, "shop:{version}");
        assert_eq!(config.project.as_str(), "shop");
        assert_eq!(config.container_port, 8080);
        assert_eq!(config.pull, bluegreen::docker::PullPolicy::Never);
        assert_eq!(config.memory_bytes, Some(512 * 1024 * 1024));
        assert_eq!(config.cpus, Some(1.5));
        assert_eq!(config.stop_timeout, Duration::from_secs(12));
        assert!(hosts.is_empty(), "one engine unless hosts are listed");
        let SwitchCfg::Haproxy { config, public } = &p.switch else {
            panic!("{:?}", p.switch)
        };
        assert_eq!(config.address.to_string(), "/run/haproxy/admin.sock");
        assert_eq!(config.backend(), "app");
        assert_eq!(config.pool_size, 6);
        assert_eq!(config.pool(bluegreen::Slot::Green)[5], "green-6");
        assert_eq!(config.drain_timeout, Duration::from_secs(12));
        assert_eq!(*public, Some("127.0.0.1:80".parse().unwrap()));
        let DatabaseCfg::Replicated(c) = &p.database else {
            panic!("{:?}", p.database)
        };
        assert_eq!(c.lag_bound, Duration::from_secs(60));
        assert_eq!(c.after_cutover, bluegreen::postgres::AfterCutover::Drop);
        assert_eq!(c.server.user, "deployer");
        let StateCfg::Postgres(s) = &p.state else {
            panic!("{:?}", p.state)
        };
        assert_eq!(s.deployment, "shop");
        assert_eq!(s.connection.dbname, "deploys");
    }

    #[test]
    fn versioned_schema_operations_are_read_next_to_the_pipeline_file() {
        let dir = tempfile::tempdir().unwrap();
        let schema = dir.path().join("schema");
        std::fs::create_dir_all(&schema).unwrap();
        std::fs::write(
            schema.join("v2.json"),
            r#"[{"op": "rename_column", "table": "orders", "from": "note", "to": "memo"}]"#,
        )
        .unwrap();
        std::fs::write(
            schema.join("v3.json"),
            r#"[{"op": "drop_table", "table": "orders"}]"#,
        )
        .unwrap();
        let head = "[project]\nname = \"shop\"\n[environment]\nkind = \"process\"\n\
                    program = \"/bin/true\"\n[switch]\nkind = \"haproxy\"\n\
                    runtime = \"/run/haproxy/admin.sock\"\npublic = \"127.0.0.1:80\"\n\
                    [database]\nkind = \"shared\"\n[database.connection]\ndbname = \"shop\"\n\
                    [database.versioned]\n";
        let file = dir.path().join("bluegreen.toml");
        std::fs::write(
            &file,
            format!("{head}operations_dir = \"schema\"\nlock_timeout = \"200ms\"\n"),
        )
        .unwrap();
        let (p, _) = Pipeline::load(&file).unwrap();
        let DatabaseCfg::Shared(c) = &p.database else {
            panic!("{:?}", p.database)
        };
        let v = c.versioned.as_ref().expect("the versioned mode is on");
        assert_eq!(v.operations_dir.as_deref(), Some(schema.as_path()));
        assert_eq!(v.lock_timeout, Duration::from_millis(200));
        let db = bluegreen::postgres::SharedDatabase::new(c.clone()).unwrap();
        let version = |v: &str| bluegreen::Version::new(v).unwrap();
        assert_eq!(db.schema_operations_for(&version("v2")).unwrap().len(), 1);
        assert!(db.schema_operations_for(&version("v1")).unwrap().is_empty());
        let err = db.schema_operations_for(&version("v3")).unwrap_err();
        assert!(err.to_string().contains("v3.json"), "{err}");
        // A misspelt key is an error naming it.
        std::fs::write(&file, format!("{head}lock_timout = \"200ms\"\n")).unwrap();
        let err = Pipeline::load(&file).unwrap_err();
        assert!(err.to_string().contains("lock_timout"), "{err}");
    }

    #[test]
    fn a_swarm_environment_is_a_validated_swarm_config() {
        let tail =
            "[switch]\nkind = \"haproxy\"\nruntime = \"/x.sock\"\n[policy]\ndrain_timeout = 7\n";
        let env = |keys: &str| {
            format!(
                "[project]\nname = \"shop\"\n[environment]\nkind = \"swarm\"\n\
                 image = \"shop:{{version}}\"\n{keys}\n{tail}"
            )
        };
        let p = load(&env(
            "replicas = 3\nblue_port = 9001\ngreen_port = 9002\nready_timeout = \"90s\"",
        ))
        .unwrap();
        assert_eq!(p.environment_kind(), "swarm");
        let EnvironmentCfg::Swarm { config, .. } = &p.environment else {
            panic!("{:?}", p.environment)
        };
        assert_eq!(config.project.as_str(), "shop");
        assert_eq!(
            (config.replicas, config.blue_port, config.green_port),
            (3, 9001, 9002)
        );
        assert_eq!(config.ready_timeout, Duration::from_secs(90));
        // The drain bound is the tasks' stop grace period unless given.
        assert_eq!(config.stop_timeout, Duration::from_secs(7));
        assert_eq!(
            p.release("2.1").unwrap().artifact,
            "shop:2.1",
            "the version goes into the image"
        );
        for (keys, named) in [
            ("replicas = 0", "replicas"),
            ("blue_port = 9000\ngreen_port = 9000", "ports"),
            ("replica = 2", "replica"),
            ("project = \"other\"", "project"),
        ] {
            let err = load(&env(keys)).unwrap_err().to_string();
            assert!(err.contains(named), "{keys}: {err}");
        }
    }

    #[test]
    fn nginx_reads_its_token_file_and_traefik_its_dir_relative_to_the_file() {
        let head = "[project]\nname = \"shop\"\n[environment]\nkind = \"process\"\nprogram = \"/bin/true\"\n";
        let p = load(&format!(
            "{head}[switch]\nkind = \"nginx\"\nname = \"shop\"\ncontrol = \"127.0.0.1:9000\"\n\
             token_file = \"nginx.token\"\npublic = \"127.0.0.1:8080\""
        ))
        .unwrap();
        let SwitchCfg::Nginx { config, .. } = &p.switch else {
            panic!("{:?}", p.switch)
        };
        assert_eq!(config.token.expose(), "0123456789abcdef0123");
        let p = load(&format!(
            "{head}[switch]\nkind = \"traefik\"\nname = \"shop\"\nrule = \"Host(`shop.example`)\"\n\
             dir = \"dynamic\"\nversion = \"v2\"\nformat = \"toml\""
        ))
        .unwrap();
        let SwitchCfg::Traefik { config, .. } = &p.switch else {
            panic!("{:?}", p.switch)
        };
        assert!(config.dir.is_absolute(), "{:?}", config.dir);
        assert!(config.dir.ends_with("dynamic"));
        assert_eq!(config.version, bluegreen::traefik::TraefikVersion::V2);
        assert_eq!(config.format, bluegreen::traefik::FileFormat::Toml);
    }

    #[test]
    fn every_number_of_seconds_is_checked_before_it_becomes_a_duration() {
        let head = "[project]\nname = \"shop\"\n[environment]\nkind = \"process\"\nprogram = \"/bin/true\"\n\
                    [switch]\nkind = \"haproxy\"\nruntime = \"/x.sock\"\n";
        for bad in ["-1.0", "nan", "inf", "1e300", "0.0"] {
            let err = load(&format!(
                "{head}[database]\nkind = \"replicated\"\nlag_bound = {bad}\n[database.connection]\ndbname = \"x\""
            ))
            .unwrap_err();
            assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
            assert!(err.to_string().contains("database.lag_bound"), "{err}");
            let err = load(&format!(
                "{head}[[hooks]]\npoint = \"before_switch\"\nargv = [\"true\"]\ntimeout = {bad}"
            ))
            .unwrap_err();
            assert!(err.to_string().contains("hooks[0].timeout"), "{err}");
        }
        let p = load(&format!(
            "{head}[[hooks]]\npoint = \"before_switch\"\nargv = [\"true\"]\ntimeout = 1.5"
        ))
        .unwrap();
        assert_eq!(p.hooks[0].timeout, Some(1.5));
    }

    #[test]
    fn relative_program_and_working_dir_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bluegreen.toml");
        std::fs::write(
            &file,
            "[project]\nname = \"shop\"\n[environment]\nkind = \"process\"\n\
             program = \"./bin/app\"\nworking_dir = \"data\"\n\
             [switch]\nkind = \"proxy\"\nlisten = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\n",
        )
        .unwrap();
        let (p, _) = Pipeline::load(&file).unwrap();
        let EnvironmentCfg::Process(pc) = &p.environment else {
            panic!("{:?}", p.environment)
        };
        assert_eq!(Path::new(&pc.program), dir.path().join("./bin/app"));
        assert_eq!(pc.working_dir.as_deref(), Some(&*dir.path().join("data")));
        // A bare name is looked up in PATH; an absolute path stays.
        for (program, expected) in [("app", "app"), ("/usr/bin/app", "/usr/bin/app")] {
            std::fs::write(
                &file,
                format!(
                    "[project]\nname = \"shop\"\n[environment]\nkind = \"process\"\nprogram = \"{program}\"\n\
                     [switch]\nkind = \"proxy\"\nlisten = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\n"
                ),
            )
            .unwrap();
            let (p, _) = Pipeline::load(&file).unwrap();
            let EnvironmentCfg::Process(pc) = &p.environment else {
                panic!()
            };
            assert_eq!(pc.program, expected);
            assert_eq!(pc.working_dir, None);
        }
    }

    #[test]
    fn the_nginx_token_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("t");
        std::fs::write(&token, "abc").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_file(&token, "x").unwrap().expose(), "abc");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret_file(&token, "x").unwrap_err().to_string();
        assert!(
            err.contains("group or others") && !err.contains("abc"),
            "{err}"
        );
    }

    #[test]
    fn the_proxy_takes_shadow_traffic_settings_and_refuses_mirrored_writes() {
        let head = "[project]\nname = \"shop\"\n[environment]\nkind = \"process\"\nprogram = \"/bin/true\"\n\
                    [switch]\nkind = \"proxy\"\nlisten = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\n";
        let p = load(&format!(
            "{head}[switch.shadow]\npercent = 20\ncompare_bodies = true\nignore_json_fields = [\"at\"]\n"
        ))
        .unwrap();
        let SwitchCfg::Proxy { config, .. } = &p.switch else {
            panic!("{:?}", p.switch)
        };
        let shadow = config.shadow.as_ref().unwrap();
        assert_eq!((shadow.percent, shadow.compare_bodies), (20, true));
        assert_eq!(shadow.ignore_json_fields, ["at"]);
        let err = load(&format!("{head}[switch.shadow]\nmethods = [\"POST\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[switch]") && err.contains("shadow.methods"),
            "{err}"
        );
    }

    #[test]
    fn bad_backend_keys_are_errors_naming_the_section_and_key() {
        let head = "[project]\nname = \"shop\"\n[environment]\nkind = \"process\"\nprogram = \"/bin/true\"\n";
        for (switch, expected) in [
            ("kind = \"haproxy\"\nruntime = \"/x.sock\"\nbackend_name = \"app\"", "backend_name"),
            ("kind = \"haproxy\"\nruntime = \"/x.sock\"\nbackend = \"a;b\"", "a;b"),
            ("kind = \"haproxy\"\nruntime = \"/x.sock\"\npool_size = 0", "pool_size"),
            ("kind = \"proxy\"\nlisten = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\nidle = 1", "idle"),
            ("kind = \"nginx\"\nname = \"shop\"\ncontrol = \"10.0.0.1:9000\"\ntoken_file = \"nginx.token\"", "loopback"),
        ] {
            let err = load(&format!("{head}[switch]\n{switch}")).unwrap_err().to_string();
            assert!(err.contains("[switch]") && err.contains(expected), "{err}");
        }
        let err = load(&format!(
            "{head}[switch]\nkind = \"haproxy\"\nruntime = \"/x.sock\"\n\
             [database]\nkind = \"copied\"\n[database.connection]\ndbname = \"x\"\npassword = \"p\""
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("[database]") && err.contains("password"),
            "{err}"
        );
    }
}
