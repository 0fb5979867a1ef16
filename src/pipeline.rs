//! The pipeline file (`bluegreen.toml`) and what it builds.
// Settings of backends compiled out of this binary are parsed (so the file is checked) but unused.
#![cfg_attr(
    not(all(
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

use bluegreen::health::{CommandCheck, HttpCheck, TcpCheck};
use bluegreen::hooks::ExecHook;
use bluegreen::{
    Deployer, Error, HealthCheck, HookOptions, HookPoint, HttpVersionProbe, MetricsAnalysis, Name,
    OnTimeout, Policy, Release, Secret, VersionMarker,
};
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Pipeline {
    pub(crate) project: Project,
    pub(crate) environment: EnvironmentCfg,
    pub(crate) switch: SwitchCfg,
    #[serde(default)]
    pub(crate) database: DatabaseCfg,
    #[serde(default)]
    pub(crate) health_checks: Vec<HealthCfg>,
    #[serde(default)]
    pub(crate) hooks: Vec<HookCfg>,
    #[serde(default)]
    pub(crate) policy: Policy,
    #[serde(default)]
    pub(crate) verify: Option<VerifyCfg>,
    #[serde(default)]
    pub(crate) analysis: Option<AnalysisCfg>,
    #[serde(default)]
    pub(crate) state: StateCfg,
    /// The pipeline file's directory (relative paths in the file start there).
    #[serde(skip)]
    pub(crate) base: PathBuf,
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

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub(crate) enum EnvironmentCfg {
    Process(ProcessCfg),
    Docker(DockerCfg),
}

/// Containers on a Docker Engine (`DOCKER_HOST` or the local socket).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DockerCfg {
    /// The release's image; `{version}` is replaced by the version label (`shop:{version}`).
    pub(crate) image: String,
    /// The port the application listens on inside the container.
    #[serde(default)]
    pub(crate) port: Option<u16>,
    /// `never`, `if-missing` (default) or `always`.
    #[serde(default)]
    pub(crate) pull: PullCfg,
    /// Memory limit in MiB.
    #[serde(default)]
    pub(crate) memory_mb: Option<u64>,
    /// CPU limit (e.g. 1.5).
    #[serde(default)]
    pub(crate) cpus: Option<f64>,
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum PullCfg {
    Never,
    #[default]
    IfMissing,
    Always,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProcessCfg {
    /// The program each release runs (the version is passed as `BLUEGREEN_VERSION`).
    pub(crate) program: String,
    #[serde(default)]
    pub(crate) args: Vec<String>,
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub(crate) enum SwitchCfg {
    Proxy(ProxyCfg),
    Haproxy(HaproxyCfg),
    Nginx(NginxCfg),
    Traefik(TraefikCfg),
}

/// HAProxy through its runtime API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HaproxyCfg {
    /// The runtime API: a unix socket path or `host:port`.
    pub(crate) runtime: String,
    #[serde(default = "default_backend")]
    pub(crate) backend: String,
    #[serde(default = "default_blue")]
    pub(crate) blue_server: String,
    #[serde(default = "default_green")]
    pub(crate) green_server: String,
    /// Where clients reach HAProxy (used by `[verify]`).
    #[serde(default)]
    pub(crate) public: Option<SocketAddr>,
}

fn default_backend() -> String {
    "app".into()
}
fn default_blue() -> String {
    "blue".into()
}
fn default_green() -> String {
    "green".into()
}

/// nginx with the Lua balancer (`Dynamic` mode) driven through its control listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NginxCfg {
    /// Base name of the upstream (`bluegreen_<name>`).
    pub(crate) name: String,
    /// The control listener (loopback).
    pub(crate) control: SocketAddr,
    /// File holding the control token (relative to the pipeline file).
    pub(crate) token_file: PathBuf,
    /// Where clients reach nginx (used by `[verify]`).
    #[serde(default)]
    pub(crate) public: Option<SocketAddr>,
}

/// Traefik's file provider.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TraefikCfg {
    /// Router name; services are `<name>-blue` and `<name>-green`.
    pub(crate) name: String,
    /// The router rule, e.g. ``Host(`shop.example`)``.
    pub(crate) rule: String,
    /// The directory the file provider watches (relative to the pipeline file).
    pub(crate) dir: PathBuf,
    #[serde(default)]
    pub(crate) format: TraefikFormat,
    #[serde(default)]
    pub(crate) version: TraefikVer,
    #[serde(default)]
    pub(crate) entry_points: Vec<String>,
    /// Traefik's API base URL, to verify the change was loaded.
    #[serde(default)]
    pub(crate) api: Option<String>,
    /// Where clients reach Traefik (used by `[verify]`).
    #[serde(default)]
    pub(crate) public: Option<SocketAddr>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TraefikFormat {
    #[default]
    Yaml,
    Toml,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TraefikVer {
    V2,
    #[default]
    V3,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProxyCfg {
    /// Where `bluegreen serve` accepts client traffic.
    pub(crate) listen: SocketAddr,
    /// Where `bluegreen serve` accepts control requests (keep it on loopback).
    pub(crate) admin: SocketAddr,
}

#[derive(Debug, Default, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum DatabaseCfg {
    #[default]
    None,
    /// One database for both slots, expand/contract migrations.
    Shared {
        connection: PgCfg,
        /// `<name>.expand.sql` / `<name>.contract.sql` files (relative to the pipeline file).
        #[serde(default)]
        migrations: Option<PathBuf>,
    },
    /// The live database cloned into the target slot's database.
    Copied {
        connection: PgCfg,
        /// Parallel copy workers.
        #[serde(default)]
        workers: Option<usize>,
        /// Use `CREATE DATABASE … TEMPLATE` (only when the source has no other connections).
        #[serde(default)]
        template: bool,
    },
    /// The target slot's database kept current by logical replication; zero-loss cutover.
    Replicated {
        connection: PgCfg,
        /// Seconds the replication may take to catch up at the cutover.
        #[serde(default)]
        lag_bound: Option<f64>,
        /// Keep the old database current after the switch (`reverse`, default) or stop (`drop`).
        #[serde(default)]
        after_cutover: AfterCutoverCfg,
    },
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AfterCutoverCfg {
    #[default]
    Reverse,
    Drop,
}

impl DatabaseCfg {
    /// The database server's connection, unless there is no database.
    pub(crate) fn connection(&self) -> Option<&PgCfg> {
        match self {
            DatabaseCfg::None => None,
            DatabaseCfg::Shared { connection, .. }
            | DatabaseCfg::Copied { connection, .. }
            | DatabaseCfg::Replicated { connection, .. } => Some(connection),
        }
    }
}

/// A PostgreSQL connection. The password comes from an environment variable, never the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PgCfg {
    #[serde(default = "default_pg_host")]
    pub(crate) host: String,
    #[serde(default = "default_pg_port")]
    pub(crate) port: u16,
    pub(crate) dbname: String,
    #[serde(default = "default_pg_user")]
    pub(crate) user: String,
    /// The environment variable holding the password.
    #[serde(default)]
    pub(crate) password_env: Option<String>,
}

fn default_pg_host() -> String {
    "127.0.0.1".into()
}
fn default_pg_port() -> u16 {
    5432
}
fn default_pg_user() -> String {
    "postgres".into()
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum HealthCfg {
    Http {
        path: String,
        #[serde(default = "default_status")]
        status: u16,
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

fn default_status() -> u16 {
    200
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AnalysisCfg {
    pub(crate) max_error_rate: f64,
    #[serde(default)]
    pub(crate) min_requests: Option<u64>,
    #[serde(default)]
    pub(crate) max_p99_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum StateCfg {
    #[default]
    File,
    /// Tables in PostgreSQL, for teams that deploy from several machines.
    Postgres { connection: PgCfg },
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

impl Pipeline {
    /// Reads and checks `file`.
    pub(crate) fn load(file: &Path) -> bluegreen::Result<(Pipeline, PathBuf)> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Error::io(format!("reading the pipeline file {}", file.display()), e))?;
        let mut p: Pipeline = toml::from_str(&text).map_err(|e| config_error(file, e))?;
        let base = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let state_dir = base.join(&p.project.state_dir);
        p.base = base;
        // The seed runbook's knobs.
        for (var, field) in [
            ("HEALTH_CHECK_TIMEOUT", 0),
            ("HEALTH_CHECK_INTERVAL", 1),
            ("DRAIN_TIMEOUT", 2),
        ] {
            if let Ok(v) = std::env::var(var) {
                let d = parse_duration(var, &v)?;
                match field {
                    0 => p.policy.readiness_timeout = d,
                    1 => {
                        p.policy.poll_max = d;
                        p.policy.poll_initial = p.policy.poll_initial.min(d);
                    }
                    _ => p.policy.drain_timeout = d,
                }
            }
        }
        p.policy
            .validate()
            .map_err(|e| config_error(file, format!("[policy]: {e}")))?;
        for (i, h) in p.hooks.iter().enumerate() {
            if h.argv.first().map(|a| a.is_empty()).unwrap_or(true) {
                return Err(config_error(
                    file,
                    format!("hooks[{i}]: argv must name a program"),
                ));
            }
        }
        if let Some(a) = &p.analysis {
            if !(0.0..=1.0).contains(&a.max_error_rate) {
                return Err(config_error(
                    file,
                    "[analysis] max_error_rate must be between 0 and 1",
                ));
            }
        }
        Ok((p, state_dir))
    }

    /// The admin token file of `bluegreen serve`.
    pub(crate) fn token_path(state_dir: &Path) -> PathBuf {
        state_dir.join("admin.token")
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
            EnvironmentCfg::Docker(dc) => {
                // Validate first: the version is spliced into an image reference.
                let v = bluegreen::Version::new(version)?;
                Release::new(version, dc.image.replace("{version}", v.as_str()))
            }
        }
    }

    /// The state store's kind, as written in the file.
    pub(crate) fn state_kind(&self) -> &'static str {
        match &self.state {
            StateCfg::File => "file",
            StateCfg::Postgres { .. } => "postgres",
        }
    }

    /// The environment's kind, as written in the file.
    pub(crate) fn environment_kind(&self) -> &'static str {
        match &self.environment {
            EnvironmentCfg::Process(_) => "process",
            EnvironmentCfg::Docker(_) => "docker",
        }
    }

    /// The embedded proxy's settings, when the switch is the embedded proxy.
    pub(crate) fn proxy(&self) -> Option<&ProxyCfg> {
        match &self.switch {
            SwitchCfg::Proxy(p) => Some(p),
            _ => None,
        }
    }

    /// The switch's kind, as written in the file.
    pub(crate) fn switch_kind(&self) -> &'static str {
        match &self.switch {
            SwitchCfg::Proxy(_) => "proxy",
            SwitchCfg::Haproxy(_) => "haproxy",
            SwitchCfg::Nginx(_) => "nginx",
            SwitchCfg::Traefik(_) => "traefik",
        }
    }

    /// Where clients reach the switch, when known (the `[verify]` probe goes there).
    pub(crate) fn public_addr(&self) -> Option<SocketAddr> {
        match &self.switch {
            SwitchCfg::Proxy(p) => Some(p.listen),
            SwitchCfg::Haproxy(h) => h.public,
            SwitchCfg::Nginx(n) => n.public,
            SwitchCfg::Traefik(t) => t.public,
        }
    }

    /// Builds the deployer. With the embedded proxy, the switch is the running `bluegreen serve`,
    /// reached by its admin API; the other switches are driven directly.
    pub(crate) async fn deployer(&self, state_dir: &Path) -> bluegreen::Result<Deployer> {
        let switch = crate::backends::switch(self, state_dir)?;
        let env = crate::backends::environment(self, state_dir).await?;
        let mut b = Deployer::builder()
            .environment(env)
            .switch(switch)
            .store(crate::backends::store(self, state_dir)?)
            .policy(self.policy.clone());
        if let Some(db) = crate::backends::database(self)? {
            b = b.database(db);
        }
        for h in &self.health_checks {
            let check: Arc<dyn HealthCheck> = match h {
                HealthCfg::Http {
                    path,
                    status,
                    body_contains,
                    max_latency_ms,
                    timeout_ms,
                    headers,
                } => {
                    let mut c = HttpCheck::new(path.clone()).with_status(*status);
                    if let Some(b) = body_contains {
                        c = c.with_body_contains(b.clone());
                    }
                    if let Some(ms) = max_latency_ms {
                        c = c.with_max_latency(Duration::from_millis(*ms));
                    }
                    if let Some(ms) = timeout_ms {
                        c = c.with_timeout(Duration::from_millis(*ms));
                    }
                    for (k, v) in headers {
                        c = c.with_header(k.clone(), v.clone());
                    }
                    Arc::new(c)
                }
                HealthCfg::Tcp { timeout_ms } => Arc::new(TcpCheck::new(Duration::from_millis(
                    timeout_ms.unwrap_or(3000),
                ))),
                HealthCfg::Command { argv, timeout_ms } => Arc::new(CommandCheck::new(
                    argv.clone(),
                    Duration::from_millis(timeout_ms.unwrap_or(10_000)),
                )?),
            };
            b = b.health_check(check);
        }
        for (i, h) in self.hooks.iter().enumerate() {
            let name = h.name.clone().unwrap_or_else(|| format!("hook-{i}"));
            let mut opts = HookOptions::default().with_on_timeout(h.on_timeout);
            if let Some(t) = h.timeout {
                opts = opts.with_timeout(Duration::from_secs_f64(t));
            }
            b = b.hook_with(
                h.point,
                Arc::new(ExecHook::new(name, h.argv.clone())?),
                opts,
            );
        }
        if let Some(v) = &self.verify {
            let marker = match &v.header {
                Some(h) => VersionMarker::Header(h.clone()),
                None => VersionMarker::Body,
            };
            let public = self.public_addr().ok_or_else(|| {
                Error::invalid(
                    "pipeline file",
                    "[verify]",
                    "set `public` in [switch] (where clients reach it) so the probe can go through it",
                )
            })?;
            let url = format!("http://{public}{}", v.path);
            b = b.verify_data_path(Arc::new(HttpVersionProbe::new(url, marker)));
        }
        if let Some(a) = &self.analysis {
            let mut m = MetricsAnalysis::new(a.max_error_rate);
            if let Some(n) = a.min_requests {
                m = m.with_min_requests(n);
            }
            if let Some(ms) = a.max_p99_ms {
                m = m.with_max_p99(Duration::from_millis(ms));
            }
            b = b.analysis(Arc::new(m));
        }
        b.build()
    }
}

/// Reads a secret (a token) from a file, trimmed; an empty file is an error.
#[allow(dead_code)]
pub(crate) fn read_secret_file(path: &Path, what: &str) -> bluegreen::Result<Secret> {
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
    if let Ok(t) = read_token(path) {
        return Ok(t);
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
