//! [`DockerFleet`]: a slot spans several Docker engines (hosts); a release is deployed on every
//! one of them, all or nothing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bluegreen_core::{
    Endpoint, Environment, Error, ExecOutput, InstanceState, Name, Release, Result, RuntimeHealth,
    Slot, SlotPart, SlotStatus,
};
use bollard::Docker;
use serde::{Deserialize, Serialize};

use crate::config::{DockerConfig, Publish};
use crate::environment::{DockerEnvironment, LABEL_DEPLOYMENT};
use crate::error::DockerError;

/// Default bound on the hosts a fleet deploys to at once.
pub const DEFAULT_CONCURRENCY: usize = 4;

/// Seconds a fleet's engine client waits for one API answer (a stop takes longer: it gets its
/// own bound).
const CLIENT_TIMEOUT_SECS: u64 = 120;

/// TLS settings of a [`FleetHost`] reached over `tcp://…:2376` with `--tlsverify`: the CA that
/// signed the engine's certificate, and this client's certificate and key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct FleetTls {
    /// The CA certificate the engine's certificate must chain to.
    pub ca: PathBuf,
    /// This client's certificate (the engine verifies it).
    pub cert: PathBuf,
    /// This client's private key.
    pub key: PathBuf,
}

impl FleetTls {
    /// TLS with these PEM files.
    pub fn new(ca: impl Into<PathBuf>, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        FleetTls {
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
        }
    }
}

/// One engine of a [`DockerFleet`].
///
/// ```
/// use bluegreen_docker::{FleetHost, FleetTls};
///
/// let local = FleetHost::new("h1", "unix:///var/run/docker.sock", "10.0.0.11").unwrap();
/// let remote = FleetHost::new("h2", "tcp://10.0.0.12:2376", "10.0.0.12")
///     .unwrap()
///     .with_tls(FleetTls::new("ca.pem", "cert.pem", "key.pem"));
/// assert_eq!(remote.bind_ip(), "10.0.0.12");
///
/// // In a pipeline file: `hosts = [{ name = "h1", engine = "unix:///…", address = "10.0.0.11" }]`.
/// let from_file: FleetHost = serde_json::from_str(
///     r#"{ "name": "h3", "engine": "tcp://10.0.0.13:2375", "address": "10.0.0.13" }"#,
/// )
/// .unwrap();
/// assert_eq!(from_file.name.as_str(), "h3");
/// assert!(FleetHost::new("h4", "ssh://example", "10.0.0.14").is_err());
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
#[non_exhaustive]
pub struct FleetHost {
    /// The host's name, as errors, logs and [`DockerFleet::host_status`] report it.
    pub name: Name,
    /// The engine's address: `unix:///path/docker.sock`, `tcp://host:2375`, or
    /// `tcp://host:2376` with [`tls`](Self::tls).
    pub engine: String,
    /// The address the switch reaches this host's containers at: the host of the endpoints
    /// (e.g. the host's LAN address). Published ports bind to it too, unless
    /// [`bind_ip`](Self::bind_ip) says otherwise.
    pub address: String,
    /// The host address published ports bind to (default: `address` when it is an IP address,
    /// else `0.0.0.0`).
    #[serde(default, rename = "bind_ip")]
    pub bind: Option<String>,
    /// TLS for a `tcp://` engine (`--tlsverify`).
    #[serde(default)]
    pub tls: Option<FleetTls>,
}

bluegreen_core::validated_serde!(FleetHost);

impl fmt::Debug for FleetHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetHost")
            .field("name", &self.name)
            .field("engine", &self.engine)
            .field("address", &self.address)
            .field("bind_ip", &self.bind_ip())
            .field("tls", &self.tls)
            .finish()
    }
}

impl FleetHost {
    /// The host `name`, its engine at `engine`, its containers reached at `address`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the setting.
    pub fn new(
        name: impl Into<String>,
        engine: impl Into<String>,
        address: impl Into<String>,
    ) -> Result<Self> {
        let host = FleetHost {
            name: Name::new(name.into())?,
            engine: engine.into(),
            address: address.into(),
            bind: None,
            tls: None,
        };
        host.validate()?;
        Ok(host)
    }

    /// With TLS for a `tcp://` engine.
    pub fn with_tls(mut self, tls: FleetTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// With the address published ports bind to.
    pub fn with_bind_ip(mut self, ip: impl Into<String>) -> Self {
        self.bind = Some(ip.into());
        self
    }

    /// The address published ports bind to.
    pub fn bind_ip(&self) -> String {
        match &self.bind {
            Some(ip) => ip.clone(),
            None if self.address.parse::<std::net::IpAddr>().is_ok() => self.address.clone(),
            None => "0.0.0.0".to_string(),
        }
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the setting.
    pub fn validate(&self) -> Result<()> {
        let e = &self.engine;
        let ok_scheme = e.starts_with("unix:///") || e.starts_with("tcp://");
        if !ok_scheme || e.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::invalid(
                "fleet host engine",
                e.as_str(),
                "expected unix:///path/docker.sock or tcp://host:port",
            ));
        }
        if self.tls.is_some() && !e.starts_with("tcp://") {
            return Err(Error::invalid(
                "fleet host engine",
                e.as_str(),
                "TLS needs a tcp:// engine address",
            ));
        }
        Endpoint::new(self.address.clone(), 1).validate()?;
        if self.bind_ip().parse::<std::net::IpAddr>().is_err() {
            return Err(Error::invalid(
                "fleet host bind_ip",
                self.bind_ip(),
                "expected an IP address",
            ));
        }
        Ok(())
    }

    /// A client of this host's engine (no I/O for `tcp://`; a missing unix socket or an
    /// unreadable TLS file is an error here).
    fn client(&self) -> std::result::Result<Docker, DockerError> {
        let version = bollard::API_DEFAULT_VERSION;
        let res = if let Some(path) = self.engine.strip_prefix("unix://") {
            Docker::connect_with_unix(path, CLIENT_TIMEOUT_SECS, version)
        } else if let Some(tls) = &self.tls {
            for (what, file) in [
                ("CA certificate", &tls.ca),
                ("client certificate", &tls.cert),
                ("client key", &tls.key),
            ] {
                if let Err(e) = std::fs::metadata(file) {
                    return Err(DockerError::TlsFile {
                        host: self.name.to_string(),
                        what,
                        path: file.clone(),
                        source: e,
                    });
                }
            }
            Docker::connect_with_ssl(
                &self.engine,
                &tls.key,
                &tls.cert,
                &tls.ca,
                CLIENT_TIMEOUT_SECS,
                version,
            )
        } else {
            Docker::connect_with_http(&self.engine, CLIENT_TIMEOUT_SECS, version)
        };
        res.map_err(|source| DockerError::Unreachable {
            host: self.label(),
            source,
        })
    }

    /// `h1 (unix:///…)`, for messages.
    fn label(&self) -> String {
        format!("host {} ({})", self.name, self.engine)
    }
}

/// One host's part in a fleet operation that failed somewhere.
#[derive(Debug)]
#[non_exhaustive]
pub struct HostFailure {
    /// The host's name.
    pub host: String,
    /// What went wrong there.
    pub error: Error,
}

/// A fleet operation failed on some hosts. It reaches callers as the source of an
/// [`Error::Backend`] (backend `docker`); downcast to match on it.
#[derive(Debug)]
#[non_exhaustive]
pub struct FleetError {
    /// `deploy`, `stop`, `remove`, `status`, …
    pub operation: &'static str,
    /// The slot, for an operation on one (not for `reset` or `containers`).
    pub slot: Option<Slot>,
    /// The hosts where it failed, with their errors.
    pub failed: Vec<HostFailure>,
    /// The hosts where it succeeded (for a deploy: rolled back there).
    pub done: Vec<String>,
    /// What was done about it and what to do.
    pub hint: String,
}

impl fmt::Display for FleetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<&str> = self.failed.iter().map(|h| h.host.as_str()).collect();
        match self.slot {
            Some(slot) => write!(f, "{} of slot {slot}", self.operation)?,
            None => f.write_str(self.operation)?,
        }
        write!(f, " failed on host(s) {}", hosts.join(", "))?;
        for h in &self.failed {
            write!(f, "; host {}: {}", h.host, h.error)?;
        }
        write!(f, ". {}", self.hint)
    }
}

impl std::error::Error for FleetError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.failed
            .first()
            .map(|h| &h.error as &(dyn std::error::Error + 'static))
    }
}

impl FleetError {
    /// Retryable when every host's failure is.
    pub fn is_retryable(&self) -> bool {
        self.failed.iter().all(|h| h.error.is_retryable())
    }

    fn into_core(self) -> Error {
        let retryable = self.is_retryable();
        Error::backend(crate::NAME, self.operation, retryable, self)
    }
}

/// One host's view of a slot, in [`DockerFleet::host_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HostStatus {
    /// The host's name.
    pub host: String,
    /// Its status, or why it could not be read (an unreachable engine).
    pub status: std::result::Result<SlotStatus, String>,
}

impl HostStatus {
    /// True when the host's engine could not be asked.
    pub fn is_unreachable(&self) -> bool {
        self.status.is_err()
    }
}

/// A host of the fleet: its settings and its environment, connected on first use (so that an
/// unreachable host does not keep the others from being used or reported).
struct Member {
    host: FleetHost,
    config: DockerConfig,
    env: tokio::sync::OnceCell<DockerEnvironment>,
}

impl Member {
    async fn env(&self) -> Result<&DockerEnvironment> {
        self.env
            .get_or_try_init(|| async {
                let docker = self.host.client().map_err(|e| e.into_core("connect"))?;
                DockerEnvironment::negotiate(docker, self.host.label(), self.config.clone()).await
            })
            .await
    }
}

/// Runs each slot's release as one container on every host of a fleet of Docker engines.
///
/// Every host is a [`DockerEnvironment`] with the same settings (project, port, limits,
/// health check), except that its published ports bind to the host's
/// [`bind_ip`](FleetHost::bind_ip) and its endpoints carry the host's
/// [`address`](FleetHost::address):
///
/// - `deploy` runs on every host, at most [`concurrency`](Self::with_concurrency) at a time, and
///   returns the endpoints of all hosts. It is all-or-nothing: when a host fails, no further
///   host is started, and the containers this deploy started on the others are removed; the
///   error names the host and what to do. The live slot is never touched. Deploying a release
///   a host already runs is a no-op there (that host keeps its container), so a rollback to a
///   release missing on one host only starts it there.
/// - `status` aggregates the hosts: `Running` only when every host runs the slot's release, the
///   platform health is the worst of the hosts', and the endpoints are all hosts'. Each host is
///   in [`SlotStatus::parts`] by name with its state. An unreachable host makes the slot
///   [`InstanceState::Unknown`] (never running: a rollback redeploys it, the health gates stop)
///   and its part carries the error naming it; [`host_status`](Self::host_status) gives each
///   host's full status.
/// - `stop`, `remove` act on every host, and fail naming any host they could not reach.
/// - `exec` runs on the first host (in configuration order), once: hooks such as migrations
///   must not run once per host. `logs` concatenates all hosts', each under a header.
///
/// Health is gated per host by the engine: the health checks run against every endpoint, so a
/// release that is unhealthy on one host never takes traffic.
///
/// Cloning is cheap; clones share the hosts.
#[derive(Clone)]
pub struct DockerFleet {
    inner: Arc<FleetInner>,
    concurrency: usize,
}

struct FleetInner {
    members: Vec<Arc<Member>>,
    config: DockerConfig,
    seq: AtomicU64,
}

impl fmt::Debug for DockerFleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerFleet")
            .field(
                "hosts",
                &self
                    .inner
                    .members
                    .iter()
                    .map(|m| &m.host)
                    .collect::<Vec<_>>(),
            )
            .field("config", &self.inner.config)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl DockerFleet {
    /// A fleet of `hosts` running the slots described by `config`. No engine is contacted yet:
    /// each is connected (and its API version negotiated) on first use, so an unreachable host
    /// is reported by the operations, by name.
    ///
    /// ```
    /// # async fn run() -> bluegreen_core::Result<()> {
    /// use bluegreen_docker::{DockerConfig, DockerFleet, FleetHost};
    ///
    /// let fleet = DockerFleet::new(
    ///     DockerConfig::new("shop")?,
    ///     vec![
    ///         FleetHost::new("web1", "tcp://10.0.0.11:2375", "10.0.0.11")?,
    ///         FleetHost::new("web2", "tcp://10.0.0.12:2375", "10.0.0.12")?,
    ///     ],
    /// )?
    /// .with_concurrency(2);
    /// assert_eq!(fleet.host_names(), ["web1", "web2"]);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidInput`]: no hosts, two hosts of one name or engine, invalid settings, or
    /// [`Publish::Network`] (endpoints on a per-host network cannot be reached across hosts).
    pub fn new(config: DockerConfig, hosts: Vec<FleetHost>) -> Result<Self> {
        config.validate()?;
        if hosts.is_empty() {
            return Err(Error::invalid(
                "docker fleet",
                "hosts = []",
                "needs at least one host",
            ));
        }
        if config.publish == Publish::Network {
            return Err(Error::invalid(
                "docker fleet publish",
                "network",
                "a fleet publishes each container's port on its host's address; use publish = \
                 \"loopback\" (the default) and set each host's address",
            ));
        }
        let mut members = Vec::new();
        let mut seen_names = BTreeMap::new();
        let mut seen_engines = BTreeMap::new();
        for host in hosts {
            host.validate()?;
            if seen_names.insert(host.name.to_string(), ()).is_some() {
                return Err(Error::invalid(
                    "docker fleet host",
                    host.name.as_str(),
                    "two hosts have this name",
                ));
            }
            if seen_engines.insert(host.engine.clone(), ()).is_some() {
                return Err(Error::invalid(
                    "docker fleet host",
                    host.engine.as_str(),
                    "two hosts use this engine",
                ));
            }
            let member_config = config
                .clone()
                .with_endpoint_host(host.address.clone())
                .with_bind_ip(host.bind_ip());
            member_config.validate()?;
            members.push(Arc::new(Member {
                host,
                config: member_config,
                env: tokio::sync::OnceCell::new(),
            }));
        }
        Ok(DockerFleet {
            inner: Arc::new(FleetInner {
                members,
                config,
                seq: AtomicU64::new(0),
            }),
            concurrency: DEFAULT_CONCURRENCY,
        })
    }

    /// With at most `n` hosts deployed to at once (at least 1). Default
    /// [`DEFAULT_CONCURRENCY`].
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The hosts' names, in order.
    pub fn host_names(&self) -> Vec<&str> {
        self.inner
            .members
            .iter()
            .map(|m| m.host.name.as_str())
            .collect()
    }

    /// The shared settings.
    pub fn config(&self) -> &DockerConfig {
        &self.inner.config
    }

    /// The environment of host `name` (connected on first use).
    ///
    /// # Errors
    /// No such host ([`Error::InvalidInput`]); its engine cannot be reached.
    pub async fn host(&self, name: &str) -> Result<&DockerEnvironment> {
        let m = self
            .inner
            .members
            .iter()
            .find(|m| m.host.name.as_str() == name)
            .ok_or_else(|| Error::invalid("docker fleet host", name, "no host of this name"))?;
        m.env().await
    }

    /// Runs `op` on every host concurrently; the results in host order.
    async fn on_all<T, F, Fut>(&self, op: F) -> Vec<(String, Result<T>)>
    where
        F: Fn(Arc<Member>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let futs = self.inner.members.iter().map(|m| {
            let name = m.host.name.to_string();
            let fut = op(m.clone());
            async move { (name, fut.await) }
        });
        futures_util::future::join_all(futs).await
    }

    /// Every host's view of `slot`, an unreachable one included (with the reason).
    pub async fn host_status(&self, slot: Slot) -> Vec<HostStatus> {
        self.on_all(|m| async move { m.env().await?.status(slot).await })
            .await
            .into_iter()
            .map(|(host, r)| HostStatus {
                host,
                status: r.map_err(|e| e.to_string()),
            })
            .collect()
    }

    /// Removes everything this project created on every host (see
    /// [`DockerEnvironment::reset`]). Returns the removed names, prefixed by the host
    /// (`h1/shop-blue`).
    ///
    /// # Errors
    /// A host failed (named); the others were still reset.
    pub async fn reset(&self) -> Result<Vec<String>> {
        let results = self
            .on_all(|m| async move { m.env().await?.reset().await })
            .await;
        let mut removed = Vec::new();
        let mut failed = Vec::new();
        let mut done = Vec::new();
        for (host, r) in results {
            match r {
                Ok(names) => {
                    removed.extend(names.into_iter().map(|n| format!("{host}/{n}")));
                    done.push(host);
                }
                Err(error) => failed.push(HostFailure { host, error }),
            }
        }
        if failed.is_empty() {
            Ok(removed)
        } else {
            Err(FleetError {
                operation: "reset",
                slot: None,
                failed,
                done,
                hint: "the other hosts were reset; run it again once the host is reachable".into(),
            }
            .into_core())
        }
    }

    /// Collects per-host results of an operation that must succeed everywhere.
    fn all_or_error<T>(
        operation: &'static str,
        slot: Option<Slot>,
        results: Vec<(String, Result<T>)>,
        hint: &str,
    ) -> Result<Vec<(String, T)>> {
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        for (host, r) in results {
            match r {
                Ok(v) => ok.push((host, v)),
                Err(error) => failed.push(HostFailure { host, error }),
            }
        }
        if failed.is_empty() {
            return Ok(ok);
        }
        Err(FleetError {
            operation,
            slot,
            failed,
            done: ok.into_iter().map(|(h, _)| h).collect(),
            hint: hint.to_string(),
        }
        .into_core())
    }

    /// Removes the slot's container on `member` when this deploy (`deployment`) created it.
    async fn undo_on(member: &Member, slot: Slot, deployment: &str) -> Result<bool> {
        let env = member.env().await?;
        let name = member.config.container_name(slot);
        let ours = env
            .containers()
            .await?
            .into_iter()
            .any(|c| c.name == name && c.deployment.as_deref() == Some(deployment));
        if ours {
            env.remove(slot).await?;
        }
        Ok(ours)
    }
}

/// The aggregate of every host's status of one slot (as [`aggregate`]), with each host as a
/// part: [`InstanceState::Unknown`] when a host could not be read, naming it with the error.
fn aggregate_hosts(results: Vec<(String, Result<SlotStatus>)>) -> SlotStatus {
    let parts: Vec<SlotPart> = results
        .iter()
        .map(|(host, r)| match r {
            Ok(s) => SlotPart::read(host, s),
            Err(e) => SlotPart::unreadable(host, e.to_string()),
        })
        .collect();
    let read: Vec<SlotStatus> = results.into_iter().filter_map(|(_, r)| r.ok()).collect();
    let mut status = aggregate(&read);
    if parts.iter().any(|p| p.error.is_some()) {
        // What the other hosts run is kept for the reader (version, their endpoints); the slot
        // as a whole is not known to run anything.
        status.state = InstanceState::Unknown;
        status.health = None;
        status.exit_code = None;
    }
    status.with_parts(parts)
}

/// The aggregate of every host's status of one slot.
fn aggregate(statuses: &[SlotStatus]) -> SlotStatus {
    use InstanceState::*;
    let states: Vec<InstanceState> = statuses.iter().map(|s| s.state).collect();
    let state = if states.contains(&Unknown) {
        Unknown
    } else if states.iter().all(|s| *s == Absent) {
        Absent
    } else if states.iter().all(|s| *s == Running) {
        Running
    } else if states.iter().all(|s| matches!(s, Running | Starting)) {
        Starting
    } else if states.contains(&Exited) {
        Exited
    } else {
        // Part of the fleet runs it, part does not: the slot is not whole. Not `Absent`, so
        // that cleanup still removes what is there; not `Running`, so that a rollback deploys it
        // again (a no-op on the hosts that run it).
        Stopped
    };
    let mut versions = statuses
        .iter()
        .filter(|s| s.state != Absent)
        .map(|s| s.version.clone());
    let first = versions.next().flatten();
    let version = if versions.all(|v| v == first) {
        first
    } else {
        None
    };
    let healths: Vec<Option<RuntimeHealth>> = statuses.iter().map(|s| s.health).collect();
    let health = if healths.contains(&Some(RuntimeHealth::Unhealthy)) {
        Some(RuntimeHealth::Unhealthy)
    } else if healths.contains(&Some(RuntimeHealth::Starting)) {
        Some(RuntimeHealth::Starting)
    } else if healths.iter().all(|h| *h == Some(RuntimeHealth::Healthy)) && !healths.is_empty() {
        Some(RuntimeHealth::Healthy)
    } else {
        None
    };
    let exit_code = statuses
        .iter()
        .find(|s| s.state == Exited)
        .and_then(|s| s.exit_code);
    let endpoints = statuses
        .iter()
        .flat_map(|s| s.endpoints.iter().cloned())
        .collect();
    SlotStatus::new(state, version, endpoints)
        .with_health(if state == Running { health } else { None })
        .with_exit_code(exit_code)
}

#[async_trait]
impl Environment for DockerFleet {
    fn name(&self) -> &str {
        crate::NAME
    }

    async fn deploy(&self, slot: Slot, release: &Release) -> Result<Vec<Endpoint>> {
        // One deployment id on every host, so that a failure removes exactly what this deploy
        // started.
        let mut release = release.clone();
        let deployment = match release.labels.get(LABEL_DEPLOYMENT) {
            Some(id) => id.clone(),
            None => {
                let id = format!(
                    "fleet-{}-{}",
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_millis())
                        .unwrap_or(0),
                    self.inner.seq.fetch_add(1, Ordering::Relaxed)
                );
                release
                    .labels
                    .insert(LABEL_DEPLOYMENT.to_string(), id.clone());
                id
            }
        };
        let release = Arc::new(release);
        let failed_flag = Arc::new(AtomicBool::new(false));
        let limit = Arc::new(tokio::sync::Semaphore::new(self.concurrency));
        let mut tasks = Vec::new();
        for m in &self.inner.members {
            let (m, release, failed_flag, limit) = (
                m.clone(),
                release.clone(),
                failed_flag.clone(),
                limit.clone(),
            );
            // Spawned: a deploy that has begun on a host runs to its end even if the caller
            // goes away, so that what it started can be accounted for.
            tasks.push(tokio::spawn(async move {
                let _permit = limit.acquire_owned().await;
                if failed_flag.load(Ordering::SeqCst) {
                    return None;
                }
                let r = async { m.env().await?.deploy(slot, &release).await }.await;
                if r.is_err() {
                    failed_flag.store(true, Ordering::SeqCst);
                }
                Some(r)
            }));
        }
        let mut results = Vec::new();
        for (m, t) in self.inner.members.iter().zip(tasks) {
            let r = t.await.unwrap_or_else(|e| {
                Some(Err(Error::backend(
                    crate::NAME,
                    "deploy",
                    false,
                    format!("the deploy task panicked: {e}"),
                )))
            });
            results.push((m.clone(), r));
        }
        if !failed_flag.load(Ordering::SeqCst) {
            let mut endpoints = Vec::new();
            for (_, r) in results {
                if let Some(Ok(eps)) = r {
                    endpoints.extend(eps);
                }
            }
            return Ok(endpoints);
        }

        // All or nothing: remove what this deploy started on the hosts where it succeeded.
        let mut failed = Vec::new();
        let mut undone = Vec::new();
        let mut undo_failed = Vec::new();
        let mut skipped = Vec::new();
        for (m, r) in results {
            let host = m.host.name.to_string();
            match r {
                Some(Err(error)) => failed.push(HostFailure { host, error }),
                None => skipped.push(host),
                Some(Ok(_)) => match Self::undo_on(&m, slot, &deployment).await {
                    Ok(true) => undone.push(host),
                    Ok(false) => {}
                    Err(e) => undo_failed.push(format!("{host} ({e})")),
                },
            }
        }
        // A failed host may hold a container this deploy created before failing (an exit at
        // start is kept for inspection): it is not live, and its logs are in the error.
        let mut hint = String::new();
        if !undone.is_empty() {
            hint.push_str(&format!(
                "The containers this deploy started on {} were removed. ",
                undone.join(", ")
            ));
        }
        if !skipped.is_empty() {
            hint.push_str(&format!("Not started on {}. ", skipped.join(", ")));
        }
        if !undo_failed.is_empty() {
            hint.push_str(&format!(
                "Removing this deploy's containers failed on {}: remove slot {slot} there once \
                 reachable. ",
                undo_failed.join(", ")
            ));
        }
        hint.push_str(
            "The live slot was not touched. Fix the failed host (or take it out of the fleet's \
             hosts) and deploy again.",
        );
        let done = undone;
        Err(FleetError {
            operation: "deploy",
            slot: Some(slot),
            failed,
            done,
            hint,
        }
        .into_core())
    }

    async fn status(&self, slot: Slot) -> Result<SlotStatus> {
        let results = self
            .on_all(|m| async move { m.env().await?.status(slot).await })
            .await;
        Ok(aggregate_hosts(results))
    }

    async fn stop(&self, slot: Slot, drain: Duration) -> Result<()> {
        let results = self
            .on_all(|m| async move { m.env().await?.stop(slot, drain).await })
            .await;
        Self::all_or_error(
            "stop",
            Some(slot),
            results,
            "it was stopped on the other hosts; stop it again once the host is reachable",
        )
        .map(drop)
    }

    async fn remove(&self, slot: Slot) -> Result<()> {
        let results = self
            .on_all(|m| async move { m.env().await?.remove(slot).await })
            .await;
        Self::all_or_error(
            "remove",
            Some(slot),
            results,
            "it was removed on the other hosts; remove it again once the host is reachable",
        )
        .map(drop)
    }

    async fn exec(&self, slot: Slot, argv: &[String]) -> Result<ExecOutput> {
        let first = &self.inner.members[0];
        first.env().await?.exec(slot, argv).await
    }

    async fn logs(&self, slot: Slot, since: Option<SystemTime>) -> Result<String> {
        let results = self
            .on_all(|m| async move { m.env().await?.logs(slot, since).await })
            .await;
        let mut out = String::new();
        for (host, r) in results {
            out.push_str(&format!("== host {host} ==\n"));
            match r {
                Ok(l) => out.push_str(&l),
                Err(e) => out.push_str(&format!("(logs unavailable: {e})\n")),
            }
            if !out.ends_with('\n') {
                out.push('\n');
            }
        }
        Ok(out)
    }
}

/// Containers of a project per host, for tests and tools.
impl DockerFleet {
    /// Every container of this project on every host, by host name.
    ///
    /// # Errors
    /// A host failed (named).
    pub async fn containers(
        &self,
    ) -> Result<HashMap<String, Vec<crate::environment::OwnedContainer>>> {
        let results = self
            .on_all(|m| async move { m.env().await?.containers().await })
            .await;
        Ok(Self::all_or_error(
            "containers",
            None,
            results,
            "list them again once the host is reachable",
        )?
        .into_iter()
        .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bluegreen_core::Version;

    fn st(state: InstanceState, v: &str, port: u16) -> SlotStatus {
        SlotStatus::new(
            state,
            Some(Version::new(v).unwrap()),
            vec![Endpoint::new("10.0.0.1", port)],
        )
    }

    #[test]
    fn a_slot_is_running_only_when_every_host_runs_one_version() {
        use InstanceState::*;
        let all = aggregate(&[st(Running, "v1", 1), st(Running, "v1", 2)]);
        assert_eq!(all.state, Running);
        assert_eq!(all.version.unwrap().as_str(), "v1");
        assert_eq!(all.endpoints.len(), 2);
        let missing = aggregate(&[st(Running, "v1", 1), SlotStatus::absent()]);
        assert_eq!(missing.state, Stopped, "a half-present slot is not running");
        assert_eq!(missing.version.unwrap().as_str(), "v1");
        let mixed = aggregate(&[st(Running, "v1", 1), st(Running, "v2", 2)]);
        assert_eq!(mixed.version, None, "two versions: none reported");
        assert_eq!(
            aggregate(&[st(Running, "v1", 1), st(Exited, "v1", 2)]).state,
            Exited
        );
        assert_eq!(
            aggregate(&[st(Running, "v1", 1), st(Starting, "v1", 2)]).state,
            Starting
        );
        assert_eq!(
            aggregate(&[SlotStatus::absent(), SlotStatus::absent()]).state,
            Absent
        );
        let sick = aggregate(&[
            st(Running, "v1", 1).with_health(Some(RuntimeHealth::Healthy)),
            st(Running, "v1", 2).with_health(Some(RuntimeHealth::Unhealthy)),
        ]);
        assert_eq!(sick.health, Some(RuntimeHealth::Unhealthy));
    }

    #[test]
    fn an_unreadable_host_makes_the_slot_unknown_and_is_named() {
        use InstanceState::*;
        let down = Error::backend("docker", "status", true, "cannot reach h2");
        let agg = aggregate_hosts(vec![
            ("h1".into(), Ok(st(Running, "v1", 1))),
            ("h2".into(), Err(down)),
            ("h3".into(), Ok(st(Running, "v1", 3))),
        ]);
        assert_eq!(agg.state, Unknown, "never Running with a host unread");
        assert!(!agg.is_up());
        assert_eq!(agg.version.as_ref().unwrap().as_str(), "v1");
        assert_eq!(agg.endpoints.len(), 2);
        let names: Vec<&str> = agg.parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["h1", "h2", "h3"]);
        let unread: Vec<&SlotPart> = agg.unreadable_parts().collect();
        assert_eq!(unread.len(), 1);
        assert_eq!(unread[0].name, "h2");
        assert_eq!(unread[0].state, Unknown);
        assert!(unread[0]
            .error
            .as_ref()
            .unwrap()
            .contains("cannot reach h2"));
        assert_eq!(agg.parts[0].state, Running);
        // Every host read: the plain aggregate, with the hosts as parts.
        let whole = aggregate_hosts(vec![
            ("h1".into(), Ok(st(Running, "v1", 1))),
            ("h2".into(), Ok(st(Running, "v1", 2))),
        ]);
        assert_eq!(whole.state, Running);
        assert_eq!(whole.parts.len(), 2);
        assert_eq!(whole.unreadable_parts().count(), 0);
    }

    #[test]
    fn hosts_are_validated() {
        assert!(FleetHost::new("h1", "unix:///run/docker.sock", "10.0.0.1").is_ok());
        assert!(FleetHost::new("h1", "tcp://10.0.0.1:2375", "host.example").is_ok());
        for (name, engine, address) in [
            ("h 1", "unix:///x", "10.0.0.1"),
            ("h1", "ssh://x", "10.0.0.1"),
            ("h1", "unix://relative", "10.0.0.1"),
            ("h1", "tcp://x y", "10.0.0.1"),
            ("h1", "tcp://x:1", "bad host"),
        ] {
            assert!(
                FleetHost::new(name, engine, address).is_err(),
                "{name} {engine} {address}"
            );
        }
        let h = FleetHost::new("h1", "unix:///x", "10.0.0.1")
            .unwrap()
            .with_tls(FleetTls::new("a", "b", "c"));
        assert!(h.validate().is_err(), "TLS over a unix socket");
        let h = FleetHost::new("h1", "tcp://x:1", "name.example").unwrap();
        assert_eq!(h.bind_ip(), "0.0.0.0");
        assert!(h.with_bind_ip("nope").validate().is_err());
    }

    #[test]
    fn a_fleet_needs_distinct_hosts_and_published_ports() {
        let c = DockerConfig::new("shop").unwrap();
        let h1 = FleetHost::new("h1", "unix:///a", "10.0.0.1").unwrap();
        let h1b = FleetHost::new("h1", "unix:///b", "10.0.0.2").unwrap();
        let h2a = FleetHost::new("h2", "unix:///a", "10.0.0.2").unwrap();
        assert!(DockerFleet::new(c.clone(), vec![]).is_err());
        assert!(DockerFleet::new(c.clone(), vec![h1.clone(), h1b]).is_err());
        assert!(DockerFleet::new(c.clone(), vec![h1.clone(), h2a]).is_err());
        assert!(
            DockerFleet::new(c.clone().with_publish(Publish::Network), vec![h1.clone()]).is_err()
        );
        let f = DockerFleet::new(c, vec![h1]).unwrap().with_concurrency(0);
        assert_eq!(f.concurrency, 1);
        assert_eq!(
            f.inner.members[0].config.endpoint_host, "10.0.0.1",
            "endpoints carry the host's address"
        );
        assert_eq!(f.inner.members[0].config.bind_ip, "10.0.0.1");
    }

    #[test]
    fn the_error_names_every_failed_host_and_what_to_do() {
        let e = FleetError {
            operation: "deploy",
            slot: Some(Slot::Green),
            failed: vec![HostFailure {
                host: "h2".into(),
                error: Error::backend("docker", "deploy", true, "engine gone"),
            }],
            done: vec!["h1".into()],
            hint: "The live slot was not touched.".into(),
        };
        assert!(e.is_retryable());
        let text = e.into_core().to_string();
        assert!(
            text.contains("deploy of slot green failed on host(s) h2")
                && text.contains("engine gone")
                && text.contains("live"),
            "{text}"
        );
    }
}
