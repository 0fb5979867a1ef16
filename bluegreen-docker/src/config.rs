//! Settings of a [`DockerEnvironment`](crate::DockerEnvironment).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use bluegreen_core::{Error, Name, Result};
use serde::{Deserialize, Serialize};

/// When the image of a release is pulled from a registry. In files: `"never"`, `"if-missing"`,
/// `"always"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum PullPolicy {
    /// Never pull: the image must already be on the engine (built or loaded there).
    Never,
    /// Pull only when the engine does not have the image. The default.
    #[default]
    IfMissing,
    /// Pull before every deploy (a moving tag such as `app:stable` then gets its newest image).
    Always,
}

impl PullPolicy {
    /// `never`, `if-missing` or `always`.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Never => "never",
            PullPolicy::IfMissing => "if-missing",
            PullPolicy::Always => "always",
        }
    }
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a slot's container is reached, which decides the endpoints `deploy` returns. In files:
/// `"loopback"`, `"network"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Publish {
    /// The container port is published on the engine host's loopback interface
    /// (`127.0.0.1`, a random free host port); endpoints are
    /// `<endpoint_host>:<host port>`. For a switch running on the engine's host. The default.
    #[default]
    Loopback,
    /// Nothing is published; endpoints are `<project>-<slot>:<container port>`, the slot's alias
    /// on the project network. For a switch running as a container on that network.
    Network,
    /// The container shares the engine host's network (`--network host`) and listens on its
    /// slot's port ([`DockerConfig::host_ports`]); endpoints are `<endpoint_host>:<port>`. No
    /// proxy process of the engine sits between clients and the application, so a live slot
    /// keeps serving while the engine restarts or crashes. For a fleet of hosts whose switch
    /// reaches them over the network.
    Host,
}

/// The ports the two slots listen on with [`Publish::Host`] (they share the host's network, so
/// they need two). In files: `host_ports = { blue = 8081, green = 8082 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HostPorts {
    /// The blue slot's port.
    pub blue: u16,
    /// The green slot's port.
    pub green: u16,
}

impl HostPorts {
    /// Blue on `blue`, green on `green`.
    pub fn new(blue: u16, green: u16) -> Self {
        HostPorts { blue, green }
    }

    /// The port of `slot`.
    pub fn get(&self, slot: bluegreen_core::Slot) -> u16 {
        match slot {
            bluegreen_core::Slot::Blue => self.blue,
            bluegreen_core::Slot::Green => self.green,
        }
    }
}

/// Docker's restart policy for the slot containers. In files: `"no"`, `"unless-stopped"`,
/// `"always"`, or `{ on-failure = 3 }`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum RestartPolicy {
    /// Never restarted by the engine.
    No,
    /// Restarted when it exits with a non-zero code, at most this many times.
    OnFailure(u32),
    /// Restarted unless it was stopped (also across engine restarts). The default.
    #[default]
    UnlessStopped,
    /// Always restarted.
    Always,
}

/// The health check of the slot containers. In files: `"image"`, `"disabled"`, or
/// `{ check = { argv = [...], interval = "1s" } }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ContainerHealth {
    /// The image's own `HEALTHCHECK`, if it has one. The default.
    #[default]
    Image,
    /// No engine health check, even if the image has one.
    Disabled,
    /// This check instead of the image's.
    Check(Healthcheck),
}

/// A health check the engine runs inside a container: `argv` every `interval`; exit 0 is
/// healthy. Baked into an image (`ScratchImage::with_healthcheck`) or set per environment
/// ([`DockerConfig::with_healthcheck`](DockerConfig::with_healthcheck)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Healthcheck {
    /// The command (exec form, no shell unless the command is one).
    pub argv: Vec<String>,
    /// Time between checks. Default 1 s.
    #[serde(default = "one_second", with = "bluegreen_core::config::duration")]
    pub interval: Duration,
    /// Bound on one check. Default 3 s.
    #[serde(default = "three_seconds", with = "bluegreen_core::config::duration")]
    pub timeout: Duration,
    /// Failures during this initial period do not count. Default 0.
    #[serde(default, with = "bluegreen_core::config::duration")]
    pub start_period: Duration,
    /// Consecutive failures before `unhealthy`. Default 3.
    #[serde(default = "three")]
    pub retries: u32,
}

impl Healthcheck {
    /// A health check running `argv`.
    pub fn new(argv: Vec<String>) -> Self {
        Healthcheck {
            argv,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(3),
            start_period: Duration::ZERO,
            retries: 3,
        }
    }

    /// With the time between checks.
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// With the failures needed for `unhealthy`.
    pub fn with_retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }
}

/// Settings of a [`DockerEnvironment`](crate::DockerEnvironment): one project, two slot
/// containers (`<project>-blue`, `<project>-green`).
///
/// ```
/// use std::time::Duration;
/// use bluegreen_docker::{DockerConfig, PullPolicy, RestartPolicy};
///
/// let config = DockerConfig::new("shop")
///     .unwrap()
///     .with_container_port(8069)
///     .with_memory_limit(512 * 1024 * 1024)
///     .with_cpus(1.5)
///     .with_restart(RestartPolicy::OnFailure(3))
///     .with_pull(PullPolicy::Never)
///     .with_stop_timeout(Duration::from_secs(20));
/// assert_eq!(config.container_name(bluegreen_core::Slot::Green), "shop-green");
/// assert_eq!(config.network_name(), "shop");
/// assert!(DockerConfig::new("shop;rm -rf").is_err());
///
/// // In a file only `project` is required; durations are "1s", "500ms", "2m".
/// let from_file: DockerConfig = serde_json::from_str(
///     r#"{ "project": "shop", "container_port": 8069, "pull": "never", "stop_timeout": "20s" }"#,
/// )
/// .unwrap();
/// assert_eq!(from_file.pull, PullPolicy::Never);
/// assert!(serde_json::from_str::<DockerConfig>(r#"{ "project": "Shop" }"#).is_err());
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
#[non_exhaustive]
pub struct DockerConfig {
    /// The project: names the containers (`<project>-<slot>`), the default network and the
    /// `bluegreen.project` label that marks what this environment owns.
    pub project: Name,
    /// The user-defined bridge network the slots join (default: the project name). Created with
    /// our labels when missing; an existing network is used as it is and never removed.
    #[serde(default)]
    pub network: Option<Name>,
    /// The port the application listens on inside the container (handed to it as `PORT`).
    /// Default 8080.
    #[serde(default = "default_container_port", alias = "port")]
    pub container_port: u16,
    /// How endpoints are reached. Default [`Publish::Loopback`].
    #[serde(default)]
    pub publish: Publish,
    /// With [`Publish::Host`]: the slots' ports (default: blue on `container_port`, green on
    /// the next port).
    #[serde(default)]
    pub host_ports: Option<HostPorts>,
    /// The host put into [`Publish::Loopback`] endpoints: `127.0.0.1` for a local engine; for a
    /// remote engine, an address of that host where the switch can reach the published ports.
    #[serde(default = "loopback")]
    pub endpoint_host: String,
    /// The host address published ports bind to. Default `127.0.0.1`.
    #[serde(default = "loopback")]
    pub bind_ip: String,
    /// When images are pulled. Default [`PullPolicy::IfMissing`].
    #[serde(default)]
    pub pull: PullPolicy,
    /// Memory limit in bytes (`--memory`); `None` for no limit.
    #[serde(default)]
    pub memory_bytes: Option<i64>,
    /// CPU limit in CPUs (`--cpus`, e.g. `1.5`); `None` for no limit.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Restart policy. Default [`RestartPolicy::UnlessStopped`].
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Variables given to every container (before the release's own, which win). Serialized as
    /// they are (only `Debug` hides the values): put secrets in
    /// [`Release::secret_env`](bluegreen_core::Release::secret_env), never here.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The engine's health check of the containers. Default: the image's.
    #[serde(default)]
    pub health: ContainerHealth,
    /// How long after `start` a deploy watches for an immediate exit. Default 1 s.
    #[serde(default = "one_second", with = "bluegreen_core::config::duration")]
    pub startup_grace: Duration,
    /// Drain bound when `deploy` replaces a running container and for `remove`. Default 10 s.
    #[serde(default = "ten_seconds", with = "bluegreen_core::config::duration")]
    pub stop_timeout: Duration,
    /// Bound on one `exec`. Default 10 min.
    #[serde(default = "ten_minutes", with = "bluegreen_core::config::duration")]
    pub exec_timeout: Duration,
}

bluegreen_core::validated_serde!(DockerConfig);

fn default_container_port() -> u16 {
    8080
}
fn loopback() -> String {
    "127.0.0.1".to_string()
}
fn one_second() -> Duration {
    Duration::from_secs(1)
}
fn three_seconds() -> Duration {
    Duration::from_secs(3)
}
fn three() -> u32 {
    3
}
fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}
fn ten_minutes() -> Duration {
    Duration::from_secs(600)
}

/// A project name of at most 40 characters (so that `<project>-green` stays a valid DNS label),
/// lower-case, starting with a letter.
pub(crate) fn check_project(name: &Name) -> Result<()> {
    let project = name.as_str();
    if project.len() > 40 {
        return Err(Error::invalid(
            "docker project",
            project,
            "at most 40 characters (container names are <project>-<slot>)",
        ));
    }
    if !project.as_bytes()[0].is_ascii_alphabetic()
        || project.contains(['+', '.', '_'])
        || project.chars().any(|c| c.is_ascii_uppercase())
    {
        return Err(Error::invalid(
            "docker project",
            project,
            "use lower-case letters, digits and `-`, starting with a letter (it becomes a \
             DNS alias on the project network)",
        ));
    }
    Ok(())
}

impl DockerConfig {
    /// Defaults for `project`, which must be a valid [`Name`] of at most 40 characters (so that
    /// `<project>-green` stays a valid DNS label) and start with a letter.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an invalid project name.
    pub fn new(project: impl Into<String>) -> Result<Self> {
        let name = Name::new(project.into())?;
        check_project(&name)?;
        Ok(DockerConfig {
            project: name,
            network: None,
            container_port: 8080,
            publish: Publish::Loopback,
            host_ports: None,
            endpoint_host: "127.0.0.1".to_string(),
            bind_ip: "127.0.0.1".to_string(),
            pull: PullPolicy::IfMissing,
            memory_bytes: None,
            cpus: None,
            restart: RestartPolicy::UnlessStopped,
            env: BTreeMap::new(),
            health: ContainerHealth::Image,
            startup_grace: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(10),
            exec_timeout: Duration::from_secs(600),
        })
    }

    /// The container of `slot`: `<project>-<slot>` (also its alias on the network).
    pub fn container_name(&self, slot: bluegreen_core::Slot) -> String {
        format!("{}-{}", self.project, slot)
    }

    /// The network the slots join.
    pub fn network_name(&self) -> &str {
        self.network.as_ref().unwrap_or(&self.project).as_str()
    }

    /// With another network (an existing one is used as it is and never removed by
    /// [`reset`](crate::DockerEnvironment::reset) unless it carries our labels).
    pub fn with_network(mut self, network: Name) -> Self {
        self.network = Some(network);
        self
    }

    /// With the application's port inside the container.
    pub fn with_container_port(mut self, port: u16) -> Self {
        self.container_port = port;
        self
    }

    /// With how endpoints are reached.
    pub fn with_publish(mut self, publish: Publish) -> Self {
        self.publish = publish;
        self
    }

    /// With the slots' ports for [`Publish::Host`].
    pub fn with_host_ports(mut self, ports: HostPorts) -> Self {
        self.host_ports = Some(ports);
        self
    }

    /// The port the application of `slot` listens on inside its container (`PORT`): the slot's
    /// host port with [`Publish::Host`], else `container_port`.
    pub fn slot_port(&self, slot: bluegreen_core::Slot) -> u16 {
        match self.publish {
            Publish::Host => self
                .host_ports
                .unwrap_or(HostPorts::new(
                    self.container_port,
                    self.container_port.saturating_add(1),
                ))
                .get(slot),
            Publish::Loopback | Publish::Network => self.container_port,
        }
    }

    /// With the host put into loopback endpoints (a remote engine's address).
    pub fn with_endpoint_host(mut self, host: impl Into<String>) -> Self {
        self.endpoint_host = host.into();
        self
    }

    /// With the host address published ports bind to.
    pub fn with_bind_ip(mut self, ip: impl Into<String>) -> Self {
        self.bind_ip = ip.into();
        self
    }

    /// With the pull policy.
    pub fn with_pull(mut self, pull: PullPolicy) -> Self {
        self.pull = pull;
        self
    }

    /// With a memory limit in bytes.
    pub fn with_memory_limit(mut self, bytes: i64) -> Self {
        self.memory_bytes = Some(bytes);
        self
    }

    /// With a CPU limit (in CPUs).
    pub fn with_cpus(mut self, cpus: f64) -> Self {
        self.cpus = Some(cpus);
        self
    }

    /// With the restart policy.
    pub fn with_restart(mut self, restart: RestartPolicy) -> Self {
        self.restart = restart;
        self
    }

    /// With a variable for every container.
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// With the engine health check `check` instead of the image's `HEALTHCHECK`.
    pub fn with_healthcheck(mut self, check: Healthcheck) -> Self {
        self.health = ContainerHealth::Check(check);
        self
    }

    /// With the containers' engine health check chosen explicitly.
    pub fn with_health(mut self, health: ContainerHealth) -> Self {
        self.health = health;
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

    /// With the bound on `exec`.
    pub fn with_exec_timeout(mut self, timeout: Duration) -> Self {
        self.exec_timeout = timeout;
        self
    }

    /// Checks the settings that reach the engine (run when deserializing and by
    /// [`DockerEnvironment::connect`](crate::DockerEnvironment::connect)).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the setting.
    pub fn validate(&self) -> Result<()> {
        check_project(&self.project)?;
        if self.container_port == 0 {
            return Err(Error::invalid(
                "container port",
                "0",
                "the application's port must be set",
            ));
        }
        if self.publish == Publish::Host {
            let (b, g) = (
                self.slot_port(bluegreen_core::Slot::Blue),
                self.slot_port(bluegreen_core::Slot::Green),
            );
            if b == 0 || g == 0 || b == g {
                return Err(Error::invalid(
                    "host ports",
                    format!("blue {b}, green {g}"),
                    "the slots share the host's network: they need two different ports",
                ));
            }
        }
        if self.bind_ip.parse::<std::net::IpAddr>().is_err() {
            return Err(Error::invalid(
                "bind ip",
                &self.bind_ip,
                "expected an IP address",
            ));
        }
        bluegreen_core::Endpoint::new(self.endpoint_host.clone(), 1).validate()?;
        if let Some(c) = self.cpus {
            if !(c > 0.0 && c <= 1024.0) {
                return Err(Error::invalid(
                    "cpus",
                    c.to_string(),
                    "expected a positive number of CPUs",
                ));
            }
        }
        if let Some(m) = self.memory_bytes {
            // The engine refuses less than 6 MiB.
            if m < 6 * 1024 * 1024 {
                return Err(Error::invalid(
                    "memory limit",
                    m.to_string(),
                    "at least 6 MiB (6291456 bytes)",
                ));
            }
        }
        for k in self.env.keys() {
            validate_env_key(k)?;
        }
        self.health.validate()
    }
}

impl ContainerHealth {
    /// Checks a [`ContainerHealth::Check`]: a command without NUL, interval and timeout of at
    /// least 1 ms.
    pub(crate) fn validate(&self) -> Result<()> {
        if let ContainerHealth::Check(h) = self {
            if h.argv.is_empty() || h.argv.iter().any(|a| a.contains('\0')) {
                return Err(Error::invalid(
                    "healthcheck",
                    format!("{:?}", h.argv),
                    "needs a command, without NUL characters",
                ));
            }
            if h.interval < Duration::from_millis(1) || h.timeout < Duration::from_millis(1) {
                return Err(Error::invalid(
                    "healthcheck",
                    format!("{:?}", h.argv),
                    "interval and timeout must be at least 1 ms",
                ));
            }
        }
        Ok(())
    }

    /// The engine's form: `None` keeps the image's `HEALTHCHECK`.
    pub(crate) fn engine_config(&self) -> Option<bollard::models::HealthConfig> {
        use bollard::models::HealthConfig;
        match self {
            ContainerHealth::Image => None,
            ContainerHealth::Disabled => Some(HealthConfig {
                test: Some(vec!["NONE".into()]),
                ..Default::default()
            }),
            ContainerHealth::Check(h) => {
                let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
                let mut test = vec!["CMD".to_string()];
                test.extend(h.argv.iter().cloned());
                Some(HealthConfig {
                    test: Some(test),
                    interval: Some(nanos(h.interval)),
                    timeout: Some(nanos(h.timeout)),
                    retries: Some(i64::from(h.retries.max(1))),
                    // 0 would mean "inherit the image's".
                    start_period: Some(nanos(h.start_period.max(Duration::from_millis(1)))),
                    ..Default::default()
                })
            }
        }
    }
}

impl fmt::Debug for DockerConfig {
    /// Variable values are left out: they may hold credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerConfig")
            .field("project", &self.project)
            .field("network", &self.network_name())
            .field("container_port", &self.container_port)
            .field("publish", &self.publish)
            .field("host_ports", &self.host_ports)
            .field("endpoint_host", &self.endpoint_host)
            .field("bind_ip", &self.bind_ip)
            .field("pull", &self.pull)
            .field("memory_bytes", &self.memory_bytes)
            .field("cpus", &self.cpus)
            .field("restart", &self.restart)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("health", &self.health)
            .field("startup_grace", &self.startup_grace)
            .field("stop_timeout", &self.stop_timeout)
            .field("exec_timeout", &self.exec_timeout)
            .finish()
    }
}

/// Environment variable names reach the engine as `KEY=value`.
pub(crate) fn validate_env_key(k: &str) -> Result<()> {
    if k.is_empty() || k.contains('=') || k.contains('\0') {
        return Err(Error::invalid(
            "environment variable name",
            k,
            "must be non-empty, without `=` or NUL",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bluegreen_core::Slot;

    #[test]
    fn project_names_become_container_names_and_dns_aliases() {
        let c = DockerConfig::new("shop-2").unwrap();
        assert_eq!(c.container_name(Slot::Blue), "shop-2-blue");
        assert_eq!(c.network_name(), "shop-2");
        for bad in [
            "",
            "Shop",
            "shop_2",
            "shop.io",
            "2shop",
            "-shop",
            "shop;rm",
            "a b",
            &"x".repeat(41),
        ] {
            let err = DockerConfig::new(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidInput { .. }), "{bad:?}: {err}");
        }
    }

    #[test]
    fn settings_reaching_the_engine_are_validated() {
        let ok = DockerConfig::new("shop").unwrap();
        assert!(ok.validate().is_ok());
        let bad = [
            ok.clone().with_container_port(0),
            ok.clone().with_bind_ip("localhost"),
            ok.clone().with_endpoint_host("evil host"),
            ok.clone().with_cpus(0.0),
            ok.clone().with_cpus(f64::NAN),
            ok.clone().with_memory_limit(1024),
            ok.clone().with_env("A=B", "x"),
            ok.clone()
                .with_publish(Publish::Host)
                .with_host_ports(HostPorts::new(8080, 8080)),
            ok.clone()
                .with_publish(Publish::Host)
                .with_container_port(u16::MAX),
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?} accepted");
        }
    }

    #[test]
    fn host_networking_gives_each_slot_its_own_port() {
        use bluegreen_core::Slot;
        let c = DockerConfig::new("shop")
            .unwrap()
            .with_container_port(9000)
            .with_publish(Publish::Host);
        assert_eq!(
            (c.slot_port(Slot::Blue), c.slot_port(Slot::Green)),
            (9000, 9001)
        );
        let c = c.with_host_ports(HostPorts::new(7001, 7002));
        assert_eq!(
            (c.slot_port(Slot::Blue), c.slot_port(Slot::Green)),
            (7001, 7002)
        );
        assert!(c.validate().is_ok());
        let c = c.with_publish(Publish::Loopback);
        assert_eq!(
            c.slot_port(Slot::Green),
            9000,
            "only host networking uses host_ports"
        );
    }

    #[test]
    fn debug_hides_variable_values() {
        let c = DockerConfig::new("shop")
            .unwrap()
            .with_env("DB_PASSWORD", "hunter2");
        let dbg = format!("{c:?}");
        assert!(
            dbg.contains("DB_PASSWORD") && !dbg.contains("hunter2"),
            "{dbg}"
        );
    }

    #[test]
    fn environment_names_are_checked() {
        assert!(validate_env_key("DATABASE_URL").is_ok());
        for bad in ["", "A=B", "A\0"] {
            assert!(validate_env_key(bad).is_err(), "{bad:?}");
        }
    }
}
