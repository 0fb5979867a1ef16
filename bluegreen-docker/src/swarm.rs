//! [`SwarmEnvironment`]: each slot is a Docker Swarm service of N replicas, one per node, on the
//! nodes' own network.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bluegreen_core::{
    Endpoint, Environment, Error, InstanceState, Name, PerSlot, Release, Result, RuntimeHealth,
    Slot, SlotStatus, Version,
};
use bollard::models::{
    NetworkAttachmentConfig, Node, NodeSpecAvailabilityEnum, NodeState, Service, ServiceSpec,
    ServiceSpecMode, ServiceSpecModeReplicated, Task, TaskSpec, TaskSpecContainerSpec,
    TaskSpecPlacement, TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{
    InspectServiceOptionsBuilder, ListTasksOptionsBuilder, LogsOptionsBuilder,
    UpdateServiceOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::config::{check_project, validate_env_key, ContainerHealth, Healthcheck};
use crate::environment::{default_client, negotiated};
use crate::environment::{keep_tail, trim_to};
use crate::error::{is_not_found, DockerError};
use crate::{DockerEnvironment, LABEL_DEPLOYMENT, LABEL_PROJECT, LABEL_SLOT, LABEL_VERSION};

/// How often a deploy, stop or remove reads the tasks while it waits.
const POLL: Duration = Duration::from_millis(250);
/// Extra time a stop or remove waits for tasks beyond the drain bound.
const TASKS_SLACK: Duration = Duration::from_secs(30);

/// Settings of a [`SwarmEnvironment`]: one project, two services (`<project>-blue`,
/// `<project>-green`).
///
/// ```
/// use std::time::Duration;
/// use bluegreen_docker::SwarmConfig;
///
/// let config = SwarmConfig::new("shop")
///     .unwrap()
///     .with_replicas(3)
///     .with_ports(8069, 8070)
///     .with_ready_timeout(Duration::from_secs(90));
/// assert_eq!(config.service_name(bluegreen_core::Slot::Green), "shop-green");
/// assert!(SwarmConfig::new("shop;rm").is_err());
/// assert!(config.clone().with_ports(8069, 8069).validate().is_err());
///
/// // In a file only `project` is required; durations are "1s", "500ms", "2m".
/// let from_file: SwarmConfig = serde_json::from_str(
///     r#"{ "project": "shop", "replicas": 3, "blue_port": 8069, "green_port": 8070 }"#,
/// )
/// .unwrap();
/// assert_eq!(from_file.replicas, 3);
/// assert!(serde_json::from_str::<SwarmConfig>(r#"{ "project": "shop", "replicas": 0 }"#).is_err());
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
#[non_exhaustive]
pub struct SwarmConfig {
    /// The project: names the services (`<project>-<slot>`) and the `bluegreen.project` label
    /// that marks what this environment owns. Lower-case letters, digits and `-`, starting with
    /// a letter, at most 40 characters.
    pub project: Name,
    /// Tasks per slot, at most one per node (they share the node's network and the slot's
    /// port). Default 1.
    #[serde(default = "one")]
    pub replicas: u32,
    /// The port blue's tasks listen on, on every node (handed to the app as `PORT`). Default
    /// 8080.
    #[serde(default = "default_blue_port")]
    pub blue_port: u16,
    /// The port green's tasks listen on. Default 8081; differs from `blue_port`, since both
    /// slots run on the same nodes' network.
    #[serde(default = "default_green_port")]
    pub green_port: u16,
    /// The tasks' health check. Default: the image's. Swarm reports a task with a health check
    /// as running only once it is healthy, and replaces a task that turns unhealthy.
    #[serde(default)]
    pub health: ContainerHealth,
    /// Variables given to every task (before the release's own, which win). Only `Debug` hides
    /// the values: put secrets in
    /// [`Release::secret_env`](bluegreen_core::Release::secret_env), never here.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Bound on a deploy waiting for every task to run and be healthy. Default 60 s.
    #[serde(default = "sixty_seconds", with = "bluegreen_core::config::duration")]
    pub ready_timeout: Duration,
    /// The tasks' stop grace period when a deploy replaces a service and on `remove`.
    /// Default 10 s.
    #[serde(default = "ten_seconds", with = "bluegreen_core::config::duration")]
    pub stop_timeout: Duration,
}

bluegreen_core::validated_serde!(SwarmConfig);

fn one() -> u32 {
    1
}
fn default_blue_port() -> u16 {
    8080
}
fn default_green_port() -> u16 {
    8081
}
fn sixty_seconds() -> Duration {
    Duration::from_secs(60)
}
fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}

impl SwarmConfig {
    /// Defaults for `project` (see [`SwarmConfig::project`]).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an invalid project name.
    pub fn new(project: impl Into<String>) -> Result<Self> {
        let name = Name::new(project.into())?;
        check_project(&name)?;
        Ok(SwarmConfig {
            project: name,
            replicas: 1,
            blue_port: default_blue_port(),
            green_port: default_green_port(),
            health: ContainerHealth::Image,
            env: BTreeMap::new(),
            ready_timeout: sixty_seconds(),
            stop_timeout: ten_seconds(),
        })
    }

    /// The service of `slot`: `<project>-<slot>`.
    pub fn service_name(&self, slot: Slot) -> String {
        format!("{}-{}", self.project, slot)
    }

    /// The port `slot`'s tasks listen on.
    pub fn port(&self, slot: Slot) -> u16 {
        match slot {
            Slot::Blue => self.blue_port,
            Slot::Green => self.green_port,
        }
    }

    /// With `replicas` tasks per slot.
    pub fn with_replicas(mut self, replicas: u32) -> Self {
        self.replicas = replicas;
        self
    }

    /// With the slots' ports.
    pub fn with_ports(mut self, blue: u16, green: u16) -> Self {
        self.blue_port = blue;
        self.green_port = green;
        self
    }

    /// With the tasks' health check `check` instead of the image's `HEALTHCHECK`.
    pub fn with_healthcheck(mut self, check: Healthcheck) -> Self {
        self.health = ContainerHealth::Check(check);
        self
    }

    /// With a variable for every task.
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// With the bound on a deploy's wait for healthy tasks.
    pub fn with_ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// With the tasks' stop grace period.
    pub fn with_stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// Checks the settings (run when deserializing and by [`SwarmEnvironment::connect`]).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the setting.
    pub fn validate(&self) -> Result<()> {
        check_project(&self.project)?;
        if self.replicas == 0 || self.replicas > 1000 {
            return Err(Error::invalid(
                "swarm replicas",
                self.replicas.to_string(),
                "between 1 and 1000 (stop a slot with `stop`, not with 0 replicas)",
            ));
        }
        if self.blue_port == 0 || self.green_port == 0 || self.blue_port == self.green_port {
            return Err(Error::invalid(
                "swarm ports",
                format!("blue {} green {}", self.blue_port, self.green_port),
                "two different, non-zero ports: both slots' tasks share the nodes' network",
            ));
        }
        if self.ready_timeout.is_zero() {
            return Err(Error::invalid(
                "ready_timeout",
                "0s",
                "give the tasks time to start",
            ));
        }
        for k in self.env.keys() {
            validate_env_key(k)?;
        }
        self.health.validate()
    }
}

impl fmt::Debug for SwarmConfig {
    /// Variable values are left out: they may hold credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwarmConfig")
            .field("project", &self.project)
            .field("replicas", &self.replicas)
            .field("blue_port", &self.blue_port)
            .field("green_port", &self.green_port)
            .field("health", &self.health)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("ready_timeout", &self.ready_timeout)
            .field("stop_timeout", &self.stop_timeout)
            .finish()
    }
}

/// One node's task of a slot's service, as [`SwarmEnvironment::service_status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeTask {
    /// The node's name (its spec name, else its hostname) and id.
    pub node: String,
    /// The node's address (the one it advertises to the swarm, where its tasks are reached).
    pub address: String,
    /// Docker's task state (`running`, `starting`, `failed`, `rejected`, …).
    pub state: String,
    /// Docker's error for a failed or rejected task.
    pub error: Option<String>,
}

/// A slot's service, per node: what [`SwarmEnvironment::service_status`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServiceStatus {
    /// The service's name.
    pub service: String,
    /// Replicas wanted (0 when stopped).
    pub wanted: u32,
    /// Tasks running. With a health check Swarm counts a task as running only once it is
    /// healthy, so these are the healthy ones too.
    pub running: u32,
    /// Whether the tasks have a health check (the image's or the configured one).
    pub health_checked: bool,
    /// The release version the service runs (its `bluegreen.version` label).
    pub version: Option<String>,
    /// The tasks Swarm wants running, one row per task: their node and state.
    pub tasks: Vec<NodeTask>,
}

/// Runs each slot's release as a Docker Swarm service, `<project>-<slot>`, of
/// [`SwarmConfig::replicas`] tasks, at most one per node, on the nodes' own network (`host`):
/// a task listens on its slot's port on its node's address, and the endpoints are those
/// addresses. See the [crate docs](crate) for why, and for what each operation does.
///
/// Talks to a manager node's engine. Cloning is cheap; clones share the client and the
/// per-slot locks.
#[derive(Clone)]
pub struct SwarmEnvironment {
    inner: Arc<Inner>,
}

struct Inner {
    docker: Docker,
    host: String,
    config: SwarmConfig,
    ops: PerSlot<tokio::sync::Mutex<()>>,
    seq: AtomicU64,
}

impl fmt::Debug for SwarmEnvironment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwarmEnvironment")
            .field("host", &self.inner.host)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// A node as errors and statuses name it: `name (address)`.
#[derive(Debug, Clone, Default)]
struct NodeInfo {
    name: String,
    address: String,
}

fn node_info(n: &Node) -> NodeInfo {
    let spec_name = n
        .spec
        .as_ref()
        .and_then(|s| s.name.clone())
        .filter(|s| !s.is_empty());
    let hostname = n.description.as_ref().and_then(|d| d.hostname.clone());
    let id: String = n.id.clone().unwrap_or_default().chars().take(12).collect();
    let name = match spec_name.or(hostname) {
        Some(name) => format!("{name} [{id}]"),
        None => id,
    };
    let mut address = n
        .status
        .as_ref()
        .and_then(|s| s.addr.clone())
        .unwrap_or_default();
    // A manager may report 0.0.0.0 as its status address: its manager address is the one.
    if address.is_empty() || address == "0.0.0.0" {
        if let Some(a) = n.manager_status.as_ref().and_then(|m| m.addr.as_deref()) {
            address = a
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or_else(|| a.to_string());
        }
    }
    NodeInfo { name, address }
}

fn state_of(t: &Task) -> Option<TaskState> {
    t.status.as_ref().and_then(|s| s.state)
}

fn wants_running(t: &Task) -> bool {
    matches!(t.desired_state, Some(TaskState::RUNNING) | None)
}

/// A task that ended for good: its node rejected it, or its container failed or exited.
fn has_failed(t: &Task) -> bool {
    matches!(
        state_of(t),
        Some(TaskState::FAILED) | Some(TaskState::REJECTED) | Some(TaskState::COMPLETE)
    )
}

fn is_up_state(s: Option<TaskState>) -> bool {
    matches!(
        s,
        Some(
            TaskState::NEW
                | TaskState::ALLOCATED
                | TaskState::PENDING
                | TaskState::ASSIGNED
                | TaskState::ACCEPTED
                | TaskState::PREPARING
                | TaskState::READY
                | TaskState::STARTING
                | TaskState::RUNNING
        )
    )
}

/// What to do about a failed task, from Docker's message.
fn hint_for(message: &str, image: &str) -> String {
    let m = message.to_ascii_lowercase();
    if m.contains("no such image") || m.contains("pull access denied") || m.contains("manifest") {
        format!(
            "the image is not on that node: load it there (`docker save {image} | docker load` \
             on the node) or push it to a registry every node can pull from"
        )
    } else if m.contains("unhealthy") || m == "finished" {
        "the release failed its health check on that node (or exited): see the service's logs \
         (`docker service logs`) and fix the release"
            .to_string()
    } else if m.contains("address already in use") {
        "the slot's port is taken on that node by another program: free it, or choose other \
         ports (blue_port / green_port)"
            .to_string()
    } else {
        "see `docker service ps <service> --no-trunc` and the service's logs".to_string()
    }
}

impl SwarmEnvironment {
    /// Connects to the engine named by `DOCKER_HOST` (as
    /// [`DockerEnvironment::connect`](crate::DockerEnvironment::connect)), which must be a
    /// manager of a swarm.
    ///
    /// # Errors
    /// An invalid configuration ([`Error::InvalidInput`]); an engine that cannot be reached
    /// ([`DockerError::Unreachable`], retryable) or is not a swarm manager
    /// ([`DockerError::NotSwarmManager`]).
    pub async fn connect(config: SwarmConfig) -> Result<Self> {
        config.validate()?;
        let (docker, host) = default_client()?;
        Self::negotiate(docker, host, config).await
    }

    /// Uses an already configured client of a manager's engine (a unix socket, TCP with TLS).
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn with_client(docker: Docker, config: SwarmConfig) -> Result<Self> {
        config.validate()?;
        Self::negotiate(docker, "the configured Docker client".to_string(), config).await
    }

    async fn negotiate(docker: Docker, host: String, config: SwarmConfig) -> Result<Self> {
        let docker = negotiated(docker, &host).await?;
        let info = docker
            .info()
            .await
            .map_err(|e| DockerError::engine_at(&host, "docker info", e).into_core("connect"))?;
        let swarm = info.swarm.unwrap_or_default();
        if swarm.control_available != Some(true) {
            return Err(DockerError::NotSwarmManager {
                host,
                state: swarm
                    .local_node_state
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "unknown".into()),
            }
            .into_core("connect"));
        }
        Ok(SwarmEnvironment {
            inner: Arc::new(Inner {
                docker,
                host,
                config,
                ops: PerSlot::default(),
                seq: AtomicU64::new(0),
            }),
        })
    }

    /// The manager's client (API version negotiated).
    pub fn client(&self) -> &Docker {
        &self.inner.docker
    }

    /// The settings.
    pub fn config(&self) -> &SwarmConfig {
        &self.inner.config
    }

    fn cfg(&self) -> &SwarmConfig {
        &self.inner.config
    }

    fn docker(&self) -> &Docker {
        &self.inner.docker
    }

    fn engine_err(&self, call: impl Into<String>, source: bollard::errors::Error) -> DockerError {
        DockerError::engine_at(&self.inner.host, call, source)
    }

    /// The slot's service: `None` when there is none; [`DockerError::NameClash`] when a service
    /// we did not create holds the name.
    async fn inspect(&self, slot: Slot) -> std::result::Result<Option<Service>, DockerError> {
        let name = self.cfg().service_name(slot);
        let opts = InspectServiceOptionsBuilder::default().build();
        match self.docker().inspect_service(&name, Some(opts)).await {
            Ok(s) => {
                let labels = s
                    .spec
                    .as_ref()
                    .and_then(|s| s.labels.clone())
                    .unwrap_or_default();
                let project = labels.get(LABEL_PROJECT).map(String::as_str);
                let owner = labels.get(LABEL_SLOT).map(String::as_str);
                if project != Some(self.cfg().project.as_str()) || owner != Some(slot.as_str()) {
                    return Err(DockerError::NameClash {
                        name,
                        project: self.cfg().project.to_string(),
                        slot,
                        found: format!(
                            "{LABEL_PROJECT}={} {LABEL_SLOT}={}",
                            project.unwrap_or("(none)"),
                            owner.unwrap_or("(none)")
                        ),
                    });
                }
                Ok(Some(s))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.engine_err(format!("inspect service {name}"), e)),
        }
    }

    async fn tasks(&self, service_id: &str) -> std::result::Result<Vec<Task>, DockerError> {
        let filters = HashMap::from([("service".to_string(), vec![service_id.to_string()])]);
        let opts = ListTasksOptionsBuilder::default().filters(&filters).build();
        match self.docker().list_tasks(Some(opts)).await {
            Ok(t) => Ok(t),
            Err(e) if is_not_found(&e) => Ok(Vec::new()),
            Err(e) => Err(self.engine_err(format!("list tasks of service {service_id}"), e)),
        }
    }

    async fn nodes(&self) -> std::result::Result<Vec<Node>, DockerError> {
        self.docker()
            .list_nodes(None)
            .await
            .map_err(|e| self.engine_err("list nodes", e))
    }

    async fn node_map(&self) -> std::result::Result<HashMap<String, NodeInfo>, DockerError> {
        Ok(self
            .nodes()
            .await?
            .iter()
            .filter_map(|n| n.id.clone().map(|id| (id, node_info(n))))
            .collect())
    }

    /// The variables a slot's tasks get, ours last so they win.
    fn task_env(&self, slot: Slot, release: &Release) -> BTreeMap<String, String> {
        let mut env = self.cfg().env.clone();
        env.extend(release.full_env());
        env.insert("PORT".into(), self.cfg().port(slot).to_string());
        env.insert("BLUEGREEN_SLOT".into(), slot.to_string());
        env.insert("BLUEGREEN_VERSION".into(), release.version.to_string());
        env
    }

    fn spec(&self, slot: Slot, release: &Release, deployment: &str) -> ServiceSpec {
        let cfg = self.cfg();
        let mut labels: HashMap<String, String> = release
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(LABEL_PROJECT.into(), cfg.project.to_string());
        labels.insert(LABEL_SLOT.into(), slot.to_string());
        labels.insert(LABEL_VERSION.into(), release.version.to_string());
        labels.insert(LABEL_DEPLOYMENT.into(), deployment.to_string());
        let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        let env = self.task_env(slot, release);
        ServiceSpec {
            name: Some(cfg.service_name(slot)),
            labels: Some(labels.clone()),
            mode: Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated {
                    replicas: Some(i64::from(cfg.replicas)),
                }),
                ..Default::default()
            }),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(release.artifact.clone()),
                    args: (!release.args.is_empty()).then(|| release.args.clone()),
                    env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
                    labels: Some(labels),
                    health_check: cfg.health.engine_config(),
                    stop_grace_period: Some(nanos(cfg.stop_timeout)),
                    ..Default::default()
                }),
                restart_policy: Some(TaskSpecRestartPolicy {
                    condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
                    delay: Some(nanos(Duration::from_secs(1))),
                    ..Default::default()
                }),
                // The tasks share their node's network and the slot's port: one per node.
                placement: Some(TaskSpecPlacement {
                    max_replicas: Some(1),
                    ..Default::default()
                }),
                networks: Some(vec![NetworkAttachmentConfig {
                    target: Some("host".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// True when `running` was created from the same release and settings as `wanted`.
    fn same_spec(running: &ServiceSpec, wanted: &ServiceSpec) -> bool {
        let cs = |s: &ServiceSpec| {
            s.task_template
                .as_ref()
                .and_then(|t| t.container_spec.clone())
                .unwrap_or_default()
        };
        let (a, b) = (cs(running), cs(wanted));
        let replicas = |s: &ServiceSpec| {
            s.mode
                .as_ref()
                .and_then(|m| m.replicated.as_ref())
                .and_then(|r| r.replicas)
        };
        let label = |s: &ServiceSpec, k: &str| s.labels.as_ref().and_then(|l| l.get(k).cloned());
        let sorted = |e: Option<Vec<String>>| {
            let mut e = e.unwrap_or_default();
            e.sort();
            e
        };
        a.image == b.image
            && a.args.clone().unwrap_or_default() == b.args.clone().unwrap_or_default()
            && sorted(a.env) == sorted(b.env)
            && a.health_check == b.health_check
            && replicas(running) == replicas(wanted)
            && label(running, LABEL_VERSION) == label(wanted, LABEL_VERSION)
    }

    /// Scales the service to 0 replicas with `drain` as the tasks' stop grace period, and waits
    /// until none of its tasks is up (their containers have stopped, so their ports are free).
    async fn scale_to_zero(
        &self,
        service: &Service,
        drain: Duration,
    ) -> std::result::Result<(), DockerError> {
        let mut spec = service.spec.clone().unwrap_or_default();
        let name = spec.name.clone().unwrap_or_default();
        let id = service.id.clone().unwrap_or_else(|| name.clone());
        let replicas = spec
            .mode
            .as_ref()
            .and_then(|m| m.replicated.as_ref())
            .and_then(|r| r.replicas);
        if replicas != Some(0) {
            tracing::info!(service = %name, ?drain, "scaling service to 0");
            spec.mode = Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated { replicas: Some(0) }),
                ..Default::default()
            });
            if let Some(cs) = spec
                .task_template
                .as_mut()
                .and_then(|t| t.container_spec.as_mut())
            {
                cs.stop_grace_period = Some(i64::try_from(drain.as_nanos()).unwrap_or(i64::MAX));
            }
            let version = service
                .version
                .as_ref()
                .and_then(|v| v.index)
                .and_then(|i| i32::try_from(i).ok())
                .unwrap_or(0);
            let opts = UpdateServiceOptionsBuilder::default()
                .version(version)
                .build();
            match self.docker().update_service(&id, spec, opts, None).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) => return Err(self.engine_err(format!("scale service {name} to 0"), e)),
            }
        }
        self.wait_tasks(&id, name, drain + TASKS_SLACK, "running", |tasks| {
            tasks.iter().filter(|t| is_up_state(state_of(t))).count()
        })
        .await
    }

    /// Waits until `left(tasks of the service)` is 0, bounded by `bound`.
    async fn wait_tasks(
        &self,
        id: &str,
        service: String,
        bound: Duration,
        what: &'static str,
        left: impl Fn(&[Task]) -> usize,
    ) -> std::result::Result<(), DockerError> {
        let deadline = Instant::now() + bound;
        loop {
            let left = left(&self.tasks(id).await?);
            if left == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(DockerError::TasksRemain {
                    service,
                    left,
                    what,
                    after: bound,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops the service's tasks, removes the service and waits until its tasks are gone,
    /// bounded by the stop timeout plus slack (each). The nodes then remove the containers.
    async fn remove_service(&self, service: &Service) -> std::result::Result<(), DockerError> {
        let name = service
            .spec
            .as_ref()
            .and_then(|s| s.name.clone())
            .unwrap_or_default();
        let id = service.id.clone().unwrap_or_else(|| name.clone());
        // Stopped first: Swarm forgets a removed service's tasks at once, while their
        // containers still run (and hold the slot's port) on the nodes.
        self.scale_to_zero(service, self.cfg().stop_timeout).await?;
        tracing::info!(service = %name, "removing service");
        match self.docker().delete_service(&id).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(self.engine_err(format!("remove service {name}"), e)),
        }
        let bound = self.cfg().stop_timeout + TASKS_SLACK;
        self.wait_tasks(&id, name, bound, "present", <[Task]>::len)
            .await
    }

    /// Endpoints of the running tasks: their nodes' addresses and the slot's port.
    fn endpoints(
        &self,
        slot: Slot,
        tasks: &[Task],
        nodes: &HashMap<String, NodeInfo>,
    ) -> Vec<Endpoint> {
        let port = self.cfg().port(slot);
        let mut eps: Vec<Endpoint> = tasks
            .iter()
            .filter(|t| wants_running(t) && state_of(t) == Some(TaskState::RUNNING))
            .filter_map(|t| t.node_id.as_ref().and_then(|n| nodes.get(n)))
            .filter(|n| !n.address.is_empty())
            .map(|n| Endpoint::new(n.address.clone(), port))
            .collect();
        eps.sort_by(|a, b| a.host.cmp(&b.host));
        eps.dedup();
        eps
    }

    /// Waits until `replicas` tasks run (past their health check) on distinct nodes; a task
    /// that fails or is rejected ends the wait with its node and Docker's message.
    async fn wait_converged(
        &self,
        slot: Slot,
        service_id: &str,
        image: &str,
    ) -> std::result::Result<Vec<Endpoint>, DockerError> {
        let cfg = self.cfg();
        let name = cfg.service_name(slot);
        let deadline = Instant::now() + cfg.ready_timeout;
        let mut nodes = self.node_map().await?;
        loop {
            let tasks = self.tasks(service_id).await?;
            if tasks
                .iter()
                .any(|t| t.node_id.as_ref().is_some_and(|n| !nodes.contains_key(n)))
            {
                nodes = self.node_map().await?;
            }
            // The task with Docker's error, if any, says most.
            let failed = tasks
                .iter()
                .filter(|t| has_failed(t))
                .max_by_key(|t| t.status.as_ref().and_then(|s| s.err.as_ref()).is_some());
            if let Some(t) = failed {
                let node = t
                    .node_id
                    .as_ref()
                    .and_then(|n| nodes.get(n))
                    .map(|n| format!("{} ({})", n.name, n.address))
                    .unwrap_or_else(|| "(not assigned)".into());
                let status = t.status.clone().unwrap_or_default();
                let message = status
                    .err
                    .filter(|e| !e.is_empty())
                    .or(status.message)
                    .unwrap_or_else(|| "no message".into());
                let state = match status.state {
                    Some(TaskState::REJECTED) => "was rejected",
                    Some(TaskState::COMPLETE) => {
                        "stopped with exit code 0 before it was ready (Swarm stops a task whose \
                         health check fails; a release that exits on its own ends the same way)"
                    }
                    _ => "failed",
                };
                return Err(DockerError::TaskFailed {
                    service: name,
                    node,
                    state: state.to_string(),
                    hint: hint_for(&message, image),
                    message,
                });
            }
            let eps = self.endpoints(slot, &tasks, &nodes);
            if eps.len() >= cfg.replicas as usize {
                return Ok(eps);
            }
            if Instant::now() > deadline {
                let detail = tasks
                    .iter()
                    .filter(|t| wants_running(t))
                    .map(|t| {
                        let node = t
                            .node_id
                            .as_ref()
                            .and_then(|n| nodes.get(n))
                            .map(|n| n.name.clone())
                            .unwrap_or_else(|| "(not assigned)".into());
                        let state = state_of(t).map(|s| s.to_string()).unwrap_or_default();
                        format!("{node}: {state}")
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(DockerError::NotConverged {
                    service: name,
                    running: eps.len(),
                    replicas: cfg.replicas,
                    after: cfg.ready_timeout,
                    detail: if detail.is_empty() {
                        "no task scheduled".into()
                    } else {
                        detail
                    },
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn deploy_inner(
        &self,
        slot: Slot,
        release: &Release,
    ) -> std::result::Result<Vec<Endpoint>, DockerError> {
        let cfg = self.cfg();
        let name = cfg.service_name(slot);
        let deployment = release
            .labels
            .get(LABEL_DEPLOYMENT)
            .cloned()
            .unwrap_or_else(|| {
                let ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0);
                format!("d{ms}-{}", self.inner.seq.fetch_add(1, Ordering::Relaxed))
            });
        let spec = self.spec(slot, release, &deployment);

        if let Some(existing) = self.inspect(slot).await? {
            let same = existing
                .spec
                .as_ref()
                .is_some_and(|s| Self::same_spec(s, &spec));
            if same {
                let id = existing.id.clone().unwrap_or_else(|| name.clone());
                let tasks = self.tasks(&id).await?;
                let nodes = self.node_map().await?;
                let eps = self.endpoints(slot, &tasks, &nodes);
                if eps.len() >= cfg.replicas as usize {
                    tracing::debug!(%slot, version = %release.version, "slot already runs this release");
                    return Ok(eps);
                }
            }
            tracing::info!(%slot, service = %name, "replacing the slot's service");
            self.remove_service(&existing).await?;
        }

        let usable = self
            .nodes()
            .await?
            .iter()
            .filter(|n| {
                n.status.as_ref().and_then(|s| s.state) == Some(NodeState::READY)
                    && n.spec.as_ref().and_then(|s| s.availability)
                        == Some(NodeSpecAvailabilityEnum::ACTIVE)
            })
            .count();
        if usable < cfg.replicas as usize {
            return Err(DockerError::TooFewNodes {
                service: name,
                replicas: cfg.replicas,
                nodes: usable,
            });
        }

        tracing::info!(%slot, service = %name, version = %release.version, replicas = cfg.replicas, "creating service");
        let created = self
            .docker()
            .create_service(spec, None)
            .await
            .map_err(|e| self.engine_err(format!("create service {name}"), e))?;
        let id = created.id.unwrap_or_else(|| name.clone());
        match self.wait_converged(slot, &id, &release.artifact).await {
            Ok(eps) => Ok(eps),
            Err(e) => {
                // All or nothing: the service this deploy created goes.
                let removed = match self.inspect(slot).await {
                    Ok(Some(created)) if created.id.as_deref() == Some(id.as_str()) => {
                        self.remove_service(&created).await
                    }
                    Ok(_) => Ok(()),
                    Err(r) => Err(r),
                };
                if let Err(r) = removed {
                    tracing::warn!(service = %name, error = %r, "cannot remove the failed service");
                    return Err(DockerError::ServiceLeft {
                        service: name,
                        failure: Box::new(e),
                        cleanup: Box::new(r),
                    });
                }
                Err(e)
            }
        }
    }

    /// The slot's service per node: replicas wanted and running, each task's node and state;
    /// `None` when the slot has no service.
    ///
    /// # Errors
    /// [`Error::Backend`] when the manager cannot be asked.
    pub async fn service_status(&self, slot: Slot) -> Result<Option<ServiceStatus>> {
        self.service_status_inner(slot)
            .await
            .map(|o| o.map(|(s, _)| s))
            .map_err(|e| e.into_core("status"))
    }

    async fn service_status_inner(
        &self,
        slot: Slot,
    ) -> std::result::Result<Option<(ServiceStatus, Vec<Endpoint>)>, DockerError> {
        let Some(service) = self.inspect(slot).await? else {
            return Ok(None);
        };
        let name = self.cfg().service_name(slot);
        let spec = service.spec.clone().unwrap_or_default();
        let wanted = spec
            .mode
            .as_ref()
            .and_then(|m| m.replicated.as_ref())
            .and_then(|r| r.replicas)
            .unwrap_or(0);
        let id = service.id.clone().unwrap_or_else(|| name.clone());
        let tasks = self.tasks(&id).await?;
        let nodes = self.node_map().await?;
        let eps = self.endpoints(slot, &tasks, &nodes);
        let health_checked = match &self.cfg().health {
            ContainerHealth::Check(_) => true,
            ContainerHealth::Disabled => false,
            ContainerHealth::Image => {
                let image = spec
                    .task_template
                    .as_ref()
                    .and_then(|t| t.container_spec.as_ref())
                    .and_then(|c| c.image.clone())
                    .unwrap_or_default();
                match self.docker().inspect_image(&image).await {
                    Ok(i) => i
                        .config
                        .and_then(|c| c.healthcheck)
                        .and_then(|h| h.test)
                        .is_some_and(|t| t.first().map(String::as_str) != Some("NONE")),
                    Err(_) => false,
                }
            }
        };
        let mut rows: Vec<NodeTask> = tasks
            .iter()
            .filter(|t| wants_running(t) || has_failed(t))
            .map(|t| {
                let n = t
                    .node_id
                    .as_ref()
                    .and_then(|n| nodes.get(n))
                    .cloned()
                    .unwrap_or_default();
                let status = t.status.clone().unwrap_or_default();
                NodeTask {
                    node: n.name,
                    address: n.address,
                    state: status.state.map(|s| s.to_string()).unwrap_or_default(),
                    error: status.err.filter(|e| !e.is_empty()),
                }
            })
            .collect();
        rows.sort_by(|a, b| a.node.cmp(&b.node).then(a.state.cmp(&b.state)));
        let status = ServiceStatus {
            service: name,
            wanted: u32::try_from(wanted).unwrap_or(0),
            running: u32::try_from(eps.len()).unwrap_or(u32::MAX),
            health_checked,
            version: spec
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_VERSION).cloned()),
            tasks: rows,
        };
        // Only tasks Swarm still wants running count as up; a task of a stopped slot that has
        // not yet stopped does not.
        let up = tasks
            .iter()
            .any(|t| wants_running(t) && is_up_state(state_of(t)));
        let eps = if up { eps } else { Vec::new() };
        Ok(Some((status, eps)))
    }

    /// Every service carrying this project's label.
    async fn owned_services(&self) -> std::result::Result<Vec<Service>, DockerError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_PROJECT}={}", self.cfg().project)],
        )]);
        let opts = bollard::query_parameters::ListServicesOptionsBuilder::default()
            .filters(&filters)
            .build();
        self.docker()
            .list_services(Some(opts))
            .await
            .map_err(|e| self.engine_err("list services", e))
    }

    /// Removes every service carrying this project's label (whatever its name), waiting for
    /// their tasks to go. Services without our label are never touched. Returns the removed
    /// names.
    ///
    /// # Errors
    /// [`Error::Backend`] naming what could not be removed.
    pub async fn reset(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for s in self
            .owned_services()
            .await
            .map_err(|e| e.into_core("reset"))?
        {
            self.remove_service(&s)
                .await
                .map_err(|e| e.into_core("reset"))?;
            removed.push(s.spec.and_then(|s| s.name).unwrap_or_default());
        }
        Ok(removed)
    }
}

#[async_trait]
impl Environment for SwarmEnvironment {
    fn name(&self) -> &str {
        "swarm"
    }

    async fn deploy(&self, slot: Slot, release: &Release) -> Result<Vec<Endpoint>> {
        DockerEnvironment::check_release(release)?;
        let _guard = self.inner.ops.get(slot).lock().await;
        self.deploy_inner(slot, release)
            .await
            .map_err(|e| e.into_core("deploy"))
    }

    async fn status(&self, slot: Slot) -> Result<SlotStatus> {
        let Some((s, eps)) = self
            .service_status_inner(slot)
            .await
            .map_err(|e| e.into_core("status"))?
        else {
            return Ok(SlotStatus::absent());
        };
        let version = s.version.clone().and_then(|v| Version::new(v).ok());
        if s.wanted == 0 {
            return Ok(SlotStatus::new(InstanceState::Stopped, version, Vec::new()));
        }
        let failed = s.tasks.iter().any(|t| t.error.is_some());
        let state = if s.running >= s.wanted {
            InstanceState::Running
        } else if s.running == 0 && failed && eps.is_empty() {
            InstanceState::Exited
        } else {
            InstanceState::Starting
        };
        let health =
            (state == InstanceState::Running && s.health_checked).then_some(RuntimeHealth::Healthy);
        Ok(SlotStatus::new(state, version, eps).with_health(health))
    }

    async fn stop(&self, slot: Slot, drain: Duration) -> Result<()> {
        let _guard = self.inner.ops.get(slot).lock().await;
        let Some(service) = self.inspect(slot).await.map_err(|e| e.into_core("stop"))? else {
            return Ok(());
        };
        self.scale_to_zero(&service, drain)
            .await
            .map_err(|e| e.into_core("stop"))
    }

    async fn remove(&self, slot: Slot) -> Result<()> {
        let _guard = self.inner.ops.get(slot).lock().await;
        let Some(service) = self
            .inspect(slot)
            .await
            .map_err(|e| e.into_core("remove"))?
        else {
            return Ok(());
        };
        self.remove_service(&service)
            .await
            .map_err(|e| e.into_core("remove"))
    }

    async fn logs(&self, slot: Slot, since: Option<SystemTime>) -> Result<String> {
        let Some(service) = self.inspect(slot).await.map_err(|e| e.into_core("logs"))? else {
            return Ok(String::new());
        };
        let name = self.cfg().service_name(slot);
        let id = service.id.unwrap_or_else(|| name.clone());
        let mut opts = LogsOptionsBuilder::default().stdout(true).stderr(true);
        if let Some(t) = since {
            let secs = t
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            opts = opts.since(i32::try_from(secs).unwrap_or(i32::MAX));
        }
        let mut stream = self.docker().service_logs(&id, Some(opts.build()));
        let mut buf: Vec<u8> = Vec::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(out) => keep_tail(&mut buf, &out.into_bytes()),
                Err(e) if is_not_found(&e) => break,
                Err(e) => {
                    return Err(self
                        .engine_err(format!("logs of service {name}"), e)
                        .into_core("logs"))
                }
            }
        }
        trim_to(&mut buf, crate::MAX_LOG_BYTES);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_validated() {
        let ok = SwarmConfig::new("shop").unwrap();
        assert!(ok.validate().is_ok());
        for bad in [
            ok.clone().with_replicas(0),
            ok.clone().with_ports(8080, 8080),
            ok.clone().with_ports(0, 8081),
            ok.clone().with_env("A=B", "x"),
            ok.clone().with_ready_timeout(Duration::ZERO),
            ok.clone().with_healthcheck(Healthcheck::new(Vec::new())),
        ] {
            assert!(bad.validate().is_err(), "{bad:?} accepted");
        }
        for bad in ["Shop", "shop_1", "shop;rm", ""] {
            assert!(SwarmConfig::new(bad).is_err(), "{bad:?} accepted");
        }
        let err = serde_json::from_str::<SwarmConfig>(r#"{ "project": "shop", "replicaz": 2 }"#)
            .unwrap_err();
        assert!(err.to_string().contains("replicaz"), "{err}");
    }

    #[test]
    fn debug_hides_variable_values() {
        let c = SwarmConfig::new("shop")
            .unwrap()
            .with_env("DB_PASSWORD", "hunter2");
        let dbg = format!("{c:?}");
        assert!(
            dbg.contains("DB_PASSWORD") && !dbg.contains("hunter2"),
            "{dbg}"
        );
    }

    #[test]
    fn a_failed_task_says_what_to_do() {
        assert!(hint_for("No such image: app:2", "app:2").contains("docker load"));
        assert!(
            hint_for("task: non-zero exit (1): unhealthy container", "app:2")
                .contains("health check")
        );
        assert!(
            hint_for("listen tcp :8080: bind: address already in use", "a").contains("blue_port")
        );
    }

    #[test]
    fn a_manager_reporting_0_0_0_0_is_named_by_its_manager_address() {
        let n = Node {
            id: Some("abcdef0123456789".into()),
            status: Some(bollard::models::NodeStatus {
                addr: Some("0.0.0.0".into()),
                ..Default::default()
            }),
            manager_status: Some(bollard::models::ManagerStatus {
                addr: Some("10.0.0.5:2377".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let info = node_info(&n);
        assert_eq!(info.address, "10.0.0.5");
        assert_eq!(info.name, "abcdef012345");
    }
}
