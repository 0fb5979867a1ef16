//! [`DockerEnvironment`]: each slot is one container on a Docker Engine.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bluegreen_core::{
    Endpoint, Environment, Error, ExecOutput, InstanceState, PerSlot, Release, Result,
    RuntimeHealth, Slot, SlotStatus, Version,
};
use bollard::container::LogOutput;
use bollard::exec::StartExecResults;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, EndpointSettings,
    ExecConfig, HealthStatusEnum, HostConfig, NetworkCreateRequest, NetworkingConfig, PortBinding,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    ListNetworksOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;

use crate::config::validate_env_key;
use crate::config::{DockerConfig, Publish, PullPolicy, RestartPolicy};
use crate::error::{docker_host_for_messages, is_not_found, is_not_modified, DockerError};

/// Label naming the project that owns a container or network.
pub const LABEL_PROJECT: &str = "bluegreen.project";
/// Label naming the slot a container serves.
pub const LABEL_SLOT: &str = "bluegreen.slot";
/// Label naming the release version a container runs.
pub const LABEL_VERSION: &str = "bluegreen.version";
/// Label identifying the deploy that created a container: the engine's deployment id (the
/// release label [`bluegreen_core::DEPLOYMENT_LABEL`] it sets), else a unique id per call.
pub const LABEL_DEPLOYMENT: &str = bluegreen_core::DEPLOYMENT_LABEL;

/// Most bytes [`Environment::logs`] returns, and `exec` keeps of each output stream (the end is
/// kept).
pub const MAX_LOG_BYTES: usize = 4 * 1024 * 1024;

/// How many log lines error messages quote.
const TAIL_LINES: usize = 20;

/// Extra time given to the HTTP request of a `stop` beyond the drain bound.
const STOP_REQUEST_SLACK: Duration = Duration::from_secs(60);

/// Runs each slot's release as a container on a Docker Engine.
///
/// The release's `artifact` is the image reference and its `args` the container command (the
/// image's `CMD` when empty). See the [crate docs](crate) for names, labels, networking,
/// environment variables and what each operation does.
///
/// Cloning is cheap; clones share the client and the per-slot locks.
#[derive(Clone)]
pub struct DockerEnvironment {
    inner: Arc<Inner>,
}

struct Inner {
    docker: Docker,
    host: String,
    config: DockerConfig,
    /// Serializes deploy / stop / remove per slot within this handle and its clones.
    ops: PerSlot<tokio::sync::Mutex<()>>,
    /// Ids of containers this handle stopped on request (`Stopped` rather than `Exited`).
    stopped: Mutex<PerSlot<Option<String>>>,
    /// Distinguishes deploys started in the same millisecond.
    seq: AtomicU64,
    /// Serializes network creation: engines before API 1.44 accept two networks of one name.
    network: tokio::sync::Mutex<()>,
}

impl fmt::Debug for DockerEnvironment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerEnvironment")
            .field("host", &self.inner.host)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// A container of this project, as listed by [`DockerEnvironment::containers`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OwnedContainer {
    /// The container's name (without the leading `/`).
    pub name: String,
    /// The container's id.
    pub id: String,
    /// Its `bluegreen.slot` label.
    pub slot: Option<Slot>,
    /// Its `bluegreen.version` label.
    pub version: Option<String>,
    /// Its `bluegreen.deployment` label: the deployment that created it.
    pub deployment: Option<String>,
    /// The engine's state (`running`, `exited`, …).
    pub state: String,
}

/// Appends `chunk`, keeping memory bounded: past twice the limit, the oldest bytes go.
pub(crate) fn keep_tail(buf: &mut Vec<u8>, chunk: &[u8]) {
    buf.extend_from_slice(chunk);
    if buf.len() > 2 * MAX_LOG_BYTES {
        trim_to(buf, MAX_LOG_BYTES);
    }
}

/// Keeps the last `max` bytes.
pub(crate) fn trim_to(buf: &mut Vec<u8>, max: usize) {
    if buf.len() > max {
        buf.drain(..buf.len() - max);
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// A client of the engine named by `DOCKER_HOST`, else the local socket, and that address.
pub(crate) fn default_client() -> Result<(Docker, String)> {
    let host = docker_host_for_messages();
    let docker = Docker::connect_with_defaults().map_err(|source| {
        DockerError::Unreachable {
            host: host.clone(),
            source,
        }
        .into_core("connect")
    })?;
    Ok((docker, host))
}

/// The client with the API version negotiated: older engines (e.g. 20.10 speaks API 1.41)
/// refuse requests for a newer API version.
pub(crate) async fn negotiated(docker: Docker, host: &str) -> Result<Docker> {
    docker.negotiate_version().await.map_err(|source| {
        DockerError::Unreachable {
            host: host.to_string(),
            source,
        }
        .into_core("connect")
    })
}

impl DockerEnvironment {
    /// Connects to the engine named by `DOCKER_HOST` (`unix://`, `tcp://`; TLS when
    /// `DOCKER_TLS_VERIFY` is set, with certificates from `DOCKER_CERT_PATH`), else the local
    /// socket `/var/run/docker.sock`, and negotiates the API version with it.
    ///
    /// # Errors
    /// An invalid configuration ([`Error::InvalidInput`]); an engine that cannot be reached
    /// ([`DockerError::Unreachable`], retryable).
    pub async fn connect(config: DockerConfig) -> Result<Self> {
        config.validate()?;
        let (docker, host) = default_client()?;
        Self::negotiate(docker, host, config).await
    }

    /// Uses an already configured client (e.g. [`Docker::connect_with_ssl`] with explicit
    /// certificates) and negotiates the API version with its engine.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn with_client(docker: Docker, config: DockerConfig) -> Result<Self> {
        config.validate()?;
        Self::negotiate(docker, "the configured Docker client".to_string(), config).await
    }

    pub(crate) async fn negotiate(
        docker: Docker,
        host: String,
        config: DockerConfig,
    ) -> Result<Self> {
        let docker = negotiated(docker, &host).await?;
        tracing::debug!(%host, api = %docker.client_version(), "connected to the Docker Engine");
        Ok(DockerEnvironment {
            inner: Arc::new(Inner {
                docker,
                host,
                config,
                ops: PerSlot::default(),
                stopped: Mutex::new(PerSlot::default()),
                seq: AtomicU64::new(0),
                network: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The engine client (API version negotiated).
    pub fn client(&self) -> &Docker {
        &self.inner.docker
    }

    /// The settings.
    pub fn config(&self) -> &DockerConfig {
        &self.inner.config
    }

    /// An engine call failure; an unreachable engine is named by this handle's address.
    fn engine_err(&self, call: impl Into<String>, source: bollard::errors::Error) -> DockerError {
        DockerError::engine_at(&self.inner.host, call, source)
    }

    fn cfg(&self) -> &DockerConfig {
        &self.inner.config
    }

    fn docker(&self) -> &Docker {
        &self.inner.docker
    }

    fn project(&self) -> &str {
        self.cfg().project.as_str()
    }

    fn port_key(&self) -> String {
        format!("{}/tcp", self.cfg().container_port)
    }

    fn host_network(&self) -> bool {
        self.cfg().publish == Publish::Host
    }

    /// Inspects the slot's container: `None` when there is none; a [`DockerError::NameClash`]
    /// when the name belongs to a container we did not create.
    async fn inspect(
        &self,
        slot: Slot,
    ) -> std::result::Result<Option<ContainerInspectResponse>, DockerError> {
        let name = self.cfg().container_name(slot);
        match self.docker().inspect_container(&name, None).await {
            Ok(c) => {
                let labels = c
                    .config
                    .as_ref()
                    .and_then(|c| c.labels.clone())
                    .unwrap_or_default();
                let project = labels.get(LABEL_PROJECT).map(String::as_str);
                let owner_slot = labels.get(LABEL_SLOT).map(String::as_str);
                if project != Some(self.project()) || owner_slot != Some(slot.as_str()) {
                    return Err(DockerError::NameClash {
                        name,
                        project: self.project().to_string(),
                        slot,
                        found: format!(
                            "{LABEL_PROJECT}={} {LABEL_SLOT}={}",
                            project.unwrap_or("(none)"),
                            owner_slot.unwrap_or("(none)")
                        ),
                    });
                }
                Ok(Some(c))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.engine_err(format!("inspect container {name}"), e)),
        }
    }

    fn state_of(c: &ContainerInspectResponse) -> Option<ContainerStateStatusEnum> {
        c.state.as_ref().and_then(|s| s.status)
    }

    fn is_running(c: &ContainerInspectResponse) -> bool {
        matches!(
            Self::state_of(c),
            Some(ContainerStateStatusEnum::RUNNING)
                | Some(ContainerStateStatusEnum::RESTARTING)
                | Some(ContainerStateStatusEnum::PAUSED)
        )
    }

    /// The endpoints of a running container.
    fn endpoints_of(
        &self,
        slot: Slot,
        c: &ContainerInspectResponse,
    ) -> std::result::Result<Vec<Endpoint>, DockerError> {
        let name = self.container_name_of(c);
        match self.cfg().publish {
            Publish::Host => Ok(vec![Endpoint::new(
                self.cfg().endpoint_host.clone(),
                self.cfg().slot_port(slot),
            )]),
            Publish::Network => Ok(vec![Endpoint::new(name, self.cfg().container_port)]),
            Publish::Loopback => {
                let port = c
                    .network_settings
                    .as_ref()
                    .and_then(|n| n.ports.as_ref())
                    .and_then(|p| p.get(&self.port_key()).cloned().flatten())
                    .unwrap_or_default()
                    .into_iter()
                    .find_map(|b| b.host_port.and_then(|p| p.parse::<u16>().ok()))
                    .filter(|p| *p != 0);
                match port {
                    Some(p) => Ok(vec![Endpoint::new(self.cfg().endpoint_host.clone(), p)]),
                    None => Err(DockerError::NoPublishedPort {
                        name,
                        port: self.cfg().container_port,
                    }),
                }
            }
        }
    }

    fn container_name_of(&self, c: &ContainerInspectResponse) -> String {
        c.name
            .as_deref()
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_default()
    }

    /// The variables a slot's container gets, ours last so they win.
    fn container_env(&self, slot: Slot, release: &Release) -> BTreeMap<String, String> {
        let mut env = self.cfg().env.clone();
        env.extend(release.full_env());
        env.insert("PORT".into(), self.cfg().slot_port(slot).to_string());
        env.insert("BLUEGREEN_SLOT".into(), slot.to_string());
        env.insert("BLUEGREEN_VERSION".into(), release.version.to_string());
        env
    }

    pub(crate) fn check_release(release: &Release) -> Result<()> {
        let image = release.artifact.as_str();
        if image.is_empty()
            || image.len() > 512
            || image.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Error::invalid(
                "docker image",
                image,
                "expected an image reference such as `registry.example/app:1.4`",
            ));
        }
        for k in release.env.keys().chain(release.secret_env.keys()) {
            validate_env_key(k)?;
        }
        let has_nul = release.env.values().any(|v| v.contains('\0'))
            || release
                .secret_env
                .values()
                .any(|v| v.expose().contains('\0'))
            || release.args.iter().any(|a| a.contains('\0'));
        if has_nul {
            return Err(Error::invalid(
                "release",
                release.version.as_str(),
                "environment values and arguments must not contain NUL",
            ));
        }
        if let Some(id) = release.labels.get(LABEL_DEPLOYMENT) {
            bluegreen_core::Name::new(id.clone())?;
        }
        if let Some(k) = release
            .labels
            .keys()
            .find(|k| k.starts_with("bluegreen.") && k.as_str() != LABEL_DEPLOYMENT)
        {
            return Err(Error::invalid(
                "release label",
                k.as_str(),
                "labels starting with `bluegreen.` are reserved for ownership",
            ));
        }
        Ok(())
    }

    /// Makes sure the image is on the engine according to the pull policy; returns its id.
    async fn ensure_image(&self, image: &str) -> std::result::Result<String, DockerError> {
        let policy = self.cfg().pull;
        let local = match self.docker().inspect_image(image).await {
            Ok(i) => i.id,
            Err(e) if is_not_found(&e) => None,
            Err(e) => return Err(self.engine_err(format!("inspect image {image}"), e)),
        };
        let must_pull = match policy {
            PullPolicy::Never => false,
            PullPolicy::IfMissing => local.is_none(),
            PullPolicy::Always => true,
        };
        if !must_pull {
            return local.ok_or_else(|| DockerError::ImageMissing {
                image: image.to_string(),
                policy: policy.as_str(),
                detail: String::new(),
            });
        }
        if let Err(message) = self.pull(image).await {
            if policy == PullPolicy::Always {
                return Err(DockerError::PullFailed {
                    image: image.to_string(),
                    local: if local.is_some() {
                        ", a local copy exists".into()
                    } else {
                        String::new()
                    },
                    message,
                });
            }
            let detail = message;
            return Err(DockerError::ImageMissing {
                image: image.to_string(),
                policy: policy.as_str(),
                detail: format!("; pulling it failed: {detail}"),
            });
        }
        match self.docker().inspect_image(image).await {
            Ok(i) => i.id.ok_or_else(|| DockerError::ImageMissing {
                image: image.to_string(),
                policy: policy.as_str(),
                detail: "; the engine reports no id after the pull".into(),
            }),
            Err(e) => Err(self.engine_err(format!("inspect image {image}"), e)),
        }
    }

    /// Pulls `image`; the error is the engine's message.
    async fn pull(&self, image: &str) -> std::result::Result<(), String> {
        // Without a tag the API pulls every tag of the repository.
        let last = image.rsplit('/').next().unwrap_or(image);
        let (from, tag) = if image.contains('@') || last.contains(':') {
            (image.to_string(), None)
        } else {
            (image.to_string(), Some("latest"))
        };
        let mut opts = CreateImageOptionsBuilder::default().from_image(&from);
        if let Some(t) = tag {
            opts = opts.tag(t);
        }
        tracing::info!(image, "pulling image");
        let mut stream = self.docker().create_image(Some(opts.build()), None, None);
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(e) = info.error_detail.and_then(|d| d.message) {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    /// Creates the project network when missing.
    async fn ensure_network(&self) -> std::result::Result<(), DockerError> {
        let name = self.cfg().network_name();
        let _guard = self.inner.network.lock().await;
        if name == "bridge" {
            return Err(DockerError::NetworkUnusable {
                name: name.to_string(),
                driver: "bridge".into(),
                hint: "the default `bridge` network has no DNS aliases; use a user-defined network",
            });
        }
        match self.docker().inspect_network(name, None).await {
            Ok(n) => {
                let driver = n.driver.unwrap_or_default();
                if driver == "host" || driver == "null" {
                    return Err(DockerError::NetworkUnusable {
                        name: name.to_string(),
                        driver,
                        hint: "configure another network name",
                    });
                }
                Ok(())
            }
            Err(e) if is_not_found(&e) => {
                let labels =
                    HashMap::from([(LABEL_PROJECT.to_string(), self.project().to_string())]);
                let req = NetworkCreateRequest {
                    name: name.to_string(),
                    driver: Some("bridge".into()),
                    labels: Some(labels),
                    ..Default::default()
                };
                match self.docker().create_network(req).await {
                    Ok(_) => Ok(()),
                    // Created concurrently by another handle.
                    Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 409,
                        ..
                    }) => Ok(()),
                    Err(e) => Err(self.engine_err(format!("create network {name}"), e)),
                }
            }
            Err(e) => Err(self.engine_err(format!("inspect network {name}"), e)),
        }
    }

    /// True when the running container already is this release (image, command, environment,
    /// version): deploying it again changes nothing.
    async fn is_same(
        &self,
        c: &ContainerInspectResponse,
        image_id: &str,
        release: &Release,
        env: &BTreeMap<String, String>,
    ) -> bool {
        let running = Self::state_of(c) == Some(ContainerStateStatusEnum::RUNNING);
        if !running || c.image.as_deref() != Some(image_id) {
            return false;
        }
        let Some(cfg) = &c.config else { return false };
        let labels = cfg.labels.clone().unwrap_or_default();
        if labels.get(LABEL_VERSION).map(String::as_str) != Some(release.version.as_str()) {
            return false;
        }
        // The engine merges the image's ENV and CMD into the container's: compare against that.
        let Ok(img) = self.docker().inspect_image(image_id).await else {
            return false;
        };
        let img_cfg = img.config.unwrap_or_default();
        let mut want: BTreeMap<String, String> = BTreeMap::new();
        for kv in img_cfg.env.unwrap_or_default() {
            if let Some((k, v)) = kv.split_once('=') {
                want.insert(k.to_string(), v.to_string());
            }
        }
        want.extend(env.clone());
        let mut have: BTreeMap<String, String> = BTreeMap::new();
        for kv in cfg.env.clone().unwrap_or_default() {
            if let Some((k, v)) = kv.split_once('=') {
                have.insert(k.to_string(), v.to_string());
            }
        }
        let want_cmd = if release.args.is_empty() {
            img_cfg.cmd.unwrap_or_default()
        } else {
            release.args.clone()
        };
        want == have && cfg.cmd.clone().unwrap_or_default() == want_cmd
    }

    fn create_body(
        &self,
        slot: Slot,
        release: &Release,
        env: &BTreeMap<String, String>,
        deployment: &str,
    ) -> ContainerCreateBody {
        let cfg = self.cfg();
        let name = cfg.container_name(slot);
        let mut labels: HashMap<String, String> = release
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(LABEL_PROJECT.into(), self.project().to_string());
        labels.insert(LABEL_SLOT.into(), slot.to_string());
        labels.insert(LABEL_VERSION.into(), release.version.to_string());
        labels.insert(LABEL_DEPLOYMENT.into(), deployment.to_string());

        let port_bindings = match cfg.publish {
            Publish::Loopback => Some(HashMap::from([(
                self.port_key(),
                Some(vec![PortBinding {
                    host_ip: Some(cfg.bind_ip.clone()),
                    // Empty: the engine picks a free host port.
                    host_port: Some(String::new()),
                }]),
            )])),
            Publish::Network | Publish::Host => None,
        };
        let restart = match cfg.restart {
            RestartPolicy::No => bollard::models::RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            },
            RestartPolicy::OnFailure(n) => bollard::models::RestartPolicy {
                name: Some(RestartPolicyNameEnum::ON_FAILURE),
                maximum_retry_count: Some(i64::from(n)),
            },
            RestartPolicy::UnlessStopped => bollard::models::RestartPolicy {
                name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                maximum_retry_count: None,
            },
            RestartPolicy::Always => bollard::models::RestartPolicy {
                name: Some(RestartPolicyNameEnum::ALWAYS),
                maximum_retry_count: None,
            },
        };
        let network = if self.host_network() {
            "host".to_string()
        } else {
            cfg.network_name().to_string()
        };
        // On the host network there are no aliases: the slot is reached at its host port.
        let networking_config = (!self.host_network()).then(|| NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                network.clone(),
                EndpointSettings {
                    aliases: Some(vec![name]),
                    ..Default::default()
                },
            )])),
        });
        let exposed = if self.host_network() {
            format!("{}/tcp", cfg.slot_port(slot))
        } else {
            self.port_key()
        };
        ContainerCreateBody {
            image: Some(release.artifact.clone()),
            cmd: (!release.args.is_empty()).then(|| release.args.clone()),
            env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            exposed_ports: Some(vec![exposed]),
            healthcheck: cfg.health.engine_config(),
            stop_timeout: Some(cfg.stop_timeout.as_secs().max(1) as i64),
            host_config: Some(HostConfig {
                port_bindings,
                memory: cfg.memory_bytes,
                nano_cpus: cfg.cpus.map(|c| (c * 1e9).round() as i64),
                restart_policy: Some(restart),
                network_mode: Some(network),
                ..Default::default()
            }),
            networking_config,
            ..Default::default()
        }
    }

    /// Stops a container within `drain` (the engine sends SIGKILL after it).
    async fn stop_container(
        &self,
        name: &str,
        drain: Duration,
    ) -> std::result::Result<(), DockerError> {
        let secs = i32::try_from(drain.as_secs_f64().ceil() as u64).unwrap_or(i32::MAX);
        let opts = StopContainerOptionsBuilder::default().t(secs).build();
        // The HTTP request lasts as long as the drain: give it room.
        let client = self
            .docker()
            .clone()
            .with_timeout(drain + STOP_REQUEST_SLACK);
        match client.stop_container(name, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_modified(&e) || is_not_found(&e) => Ok(()),
            Err(e) => Err(self.engine_err(format!("stop container {name}"), e)),
        }
    }

    async fn remove_container(&self, name: &str) -> std::result::Result<(), DockerError> {
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker().remove_container(name, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // Already being removed.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409,
                message,
            }) if message.contains("already in progress") => Ok(()),
            Err(e) => Err(self.engine_err(format!("remove container {name}"), e)),
        }
    }

    fn mark_stopped(&self, slot: Slot, id: Option<String>) {
        if let Ok(mut s) = self.inner.stopped.lock() {
            s.set(slot, id);
        }
    }

    fn was_stopped(&self, slot: Slot, id: Option<&str>) -> bool {
        self.inner
            .stopped
            .lock()
            .map(|s| s.get(slot).as_deref() == id && id.is_some())
            .unwrap_or(false)
    }

    /// The last `lines` lines of a container's log.
    async fn log_tail(&self, name: &str, lines: usize) -> String {
        let opts = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .tail(&lines.to_string())
            .build();
        match self.collect_logs(name, opts).await {
            Ok(s) if s.trim().is_empty() => "(no output)".into(),
            Ok(s) => s.trim_end().to_string(),
            Err(e) => format!("(logs unavailable: {e})"),
        }
    }

    async fn collect_logs(
        &self,
        name: &str,
        opts: bollard::query_parameters::LogsOptions,
    ) -> std::result::Result<String, DockerError> {
        let mut stream = self.docker().logs(name, Some(opts));
        let mut buf: Vec<u8> = Vec::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(out) => keep_tail(&mut buf, &out.into_bytes()),
                Err(e) if is_not_found(&e) => break,
                Err(e) => return Err(self.engine_err(format!("logs of {name}"), e)),
            }
        }
        trim_to(&mut buf, MAX_LOG_BYTES);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    async fn deploy_inner(
        &self,
        slot: Slot,
        release: &Release,
    ) -> std::result::Result<Vec<Endpoint>, DockerError> {
        let cfg = self.cfg();
        let name = cfg.container_name(slot);
        let image_id = self.ensure_image(&release.artifact).await?;
        if !self.host_network() {
            self.ensure_network().await?;
        }
        let env = self.container_env(slot, release);

        if let Some(c) = self.inspect(slot).await? {
            if self.is_same(&c, &image_id, release, &env).await {
                tracing::debug!(%slot, version = %release.version, "slot already runs this release");
                return self.endpoints_of(slot, &c);
            }
            tracing::info!(%slot, container = %name, "replacing the slot's container");
            if Self::is_running(&c) {
                self.stop_container(&name, cfg.stop_timeout).await?;
            }
            self.remove_container(&name).await?;
        }

        // The caller's deployment id (e.g. the engine's) when it gives one, else a unique id.
        let deployment = release
            .labels
            .get(LABEL_DEPLOYMENT)
            .cloned()
            .unwrap_or_else(|| {
                format!(
                    "{}-{}",
                    now_ms(),
                    self.inner.seq.fetch_add(1, Ordering::Relaxed)
                )
            });
        let body = self.create_body(slot, release, &env, &deployment);
        let opts = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = self
            .docker()
            .create_container(Some(opts), body)
            .await
            .map_err(|e| self.engine_err(format!("create container {name}"), e))?;
        self.mark_stopped(slot, None);
        tracing::info!(
            %slot, container = %name, image = %release.artifact, version = %release.version,
            "starting container"
        );
        if let Err(e) = self.docker().start_container(&created.id, None).await {
            // A container that never ran (missing entrypoint, port taken, …) is of no use for
            // inspection: remove it so the slot reads `Absent`, not `Starting` forever.
            if let Err(rm) = self.remove_container(&created.id).await {
                tracing::warn!(container = %name, error = %rm, "cannot remove the unstarted container");
            }
            return Err(self.engine_err(format!("start container {name}"), e));
        }

        // Watch the start: an exit (or a restart) within the grace period is a failed start, and
        // is reported as soon as it is seen.
        let grace_end = tokio::time::Instant::now() + cfg.startup_grace;
        let (c, up) = loop {
            let c = self
                .inspect(slot)
                .await?
                .ok_or_else(|| DockerError::ExitedAtStart {
                    name: name.clone(),
                    image: release.artifact.clone(),
                    slot,
                    how: "the container disappeared (removed by someone else, or `--rm`)".into(),
                    log_tail: String::new(),
                })?;
            let running = Self::state_of(&c) == Some(ContainerStateStatusEnum::RUNNING);
            let up = running && c.restart_count.unwrap_or(0) == 0;
            let now = tokio::time::Instant::now();
            if !up || now >= grace_end {
                break (c, up);
            }
            tokio::time::sleep((grace_end - now).min(Duration::from_millis(100))).await;
        };
        let state = c.state.clone().unwrap_or_default();
        let restarts = c.restart_count.unwrap_or(0);
        if !up {
            let code = state.exit_code.unwrap_or(-1);
            let how = match state.status {
                Some(ContainerStateStatusEnum::RESTARTING) => {
                    format!("restarting after exit code {code}")
                }
                // Running again: the engine keeps no exit code of the earlier runs.
                Some(ContainerStateStatusEnum::RUNNING) => {
                    format!("it crashed and the restart policy restarted it {restarts} time(s)")
                }
                _ => format!("exit code {code}"),
            };
            let how = match state.error.as_deref() {
                Some(e) if !e.is_empty() => format!("{how}: {e}"),
                _ => how,
            };
            let log_tail = self.log_tail(&name, TAIL_LINES).await;
            // Keep it for inspection, but end a restart loop: the deploy has failed either way.
            if let Err(e) = self.stop_container(&name, Duration::from_secs(1)).await {
                tracing::warn!(container = %name, error = %e, "cannot stop the failed container");
            }
            return Err(DockerError::ExitedAtStart {
                name: name.clone(),
                image: release.artifact.clone(),
                slot,
                how,
                log_tail,
            });
        }
        self.endpoints_of(slot, &c)
    }

    /// Every container carrying this project's label (any slot, any state).
    ///
    /// # Errors
    /// [`Error::Backend`] when the engine cannot be asked.
    pub async fn containers(&self) -> Result<Vec<OwnedContainer>> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_PROJECT}={}", self.project())],
        )]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker()
            .list_containers(Some(opts))
            .await
            .map_err(|e| {
                self.engine_err("list containers", e)
                    .into_core("containers")
            })?;
        Ok(list
            .into_iter()
            .map(|c| {
                let labels = c.labels.unwrap_or_default();
                OwnedContainer {
                    name: c
                        .names
                        .unwrap_or_default()
                        .first()
                        .map(|n| n.trim_start_matches('/').to_string())
                        .unwrap_or_default(),
                    id: c.id.unwrap_or_default(),
                    slot: labels.get(LABEL_SLOT).and_then(|s| s.parse().ok()),
                    version: labels.get(LABEL_VERSION).cloned(),
                    deployment: labels.get(LABEL_DEPLOYMENT).cloned(),
                    state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                }
            })
            .collect())
    }

    /// Removes this project's containers that are not running (exited, created, dead), whatever
    /// their name; running ones and everything without our label stay. Returns the removed
    /// names.
    ///
    /// # Errors
    /// [`Error::Backend`] naming the container that could not be removed.
    pub async fn cleanup(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for c in self.containers().await? {
            if matches!(c.state.as_str(), "running" | "restarting" | "paused") {
                continue;
            }
            self.remove_container(&c.id)
                .await
                .map_err(|e| e.into_core("cleanup"))?;
            removed.push(c.name);
        }
        Ok(removed)
    }

    /// Removes everything this project created: every container carrying its label (stopped
    /// within the configured stop timeout first) and the networks carrying its label. Containers
    /// and networks without our label are never touched. Returns the removed names.
    ///
    /// # Errors
    /// [`Error::Backend`] naming what could not be removed (e.g. a network a foreign container
    /// still uses).
    pub async fn reset(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for c in self.containers().await? {
            if matches!(c.state.as_str(), "running" | "restarting" | "paused") {
                self.stop_container(&c.id, self.cfg().stop_timeout)
                    .await
                    .map_err(|e| e.into_core("reset"))?;
            }
            self.remove_container(&c.id)
                .await
                .map_err(|e| e.into_core("reset"))?;
            removed.push(c.name);
        }
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_PROJECT}={}", self.project())],
        )]);
        let opts = ListNetworksOptionsBuilder::default()
            .filters(&filters)
            .build();
        let nets = self
            .docker()
            .list_networks(Some(opts))
            .await
            .map_err(|e| self.engine_err("list networks", e).into_core("reset"))?;
        for n in nets {
            let Some(name) = n.name else { continue };
            // By id: an older engine may hold two networks of one name.
            let id = n.id.unwrap_or_else(|| name.clone());
            match self.docker().remove_network(&id).await {
                Ok(()) => removed.push(name),
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(self
                        .engine_err(format!("remove network {name}"), e)
                        .into_core("reset"))
                }
            }
        }
        for slot in Slot::ALL {
            self.mark_stopped(slot, None);
        }
        Ok(removed)
    }
}

#[async_trait]
impl Environment for DockerEnvironment {
    fn name(&self) -> &str {
        crate::NAME
    }

    async fn deploy(&self, slot: Slot, release: &Release) -> Result<Vec<Endpoint>> {
        Self::check_release(release)?;
        let _guard = self.inner.ops.get(slot).lock().await;
        self.deploy_inner(slot, release)
            .await
            .map_err(|e| e.into_core("deploy"))
    }

    async fn status(&self, slot: Slot) -> Result<SlotStatus> {
        let Some(c) = self
            .inspect(slot)
            .await
            .map_err(|e| e.into_core("status"))?
        else {
            return Ok(SlotStatus::absent());
        };
        let st = c.state.clone().unwrap_or_default();
        let version = c
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .and_then(|l| l.get(LABEL_VERSION))
            .and_then(|v| Version::new(v.clone()).ok());
        let exit_code = st.exit_code.and_then(|c| i32::try_from(c).ok());
        let (state, code) = match st.status {
            Some(ContainerStateStatusEnum::CREATED) => (InstanceState::Starting, None),
            Some(ContainerStateStatusEnum::RUNNING) => (InstanceState::Running, None),
            // Between two runs of a crash loop: it exited; the restart policy brings it back.
            Some(ContainerStateStatusEnum::RESTARTING) => (InstanceState::Exited, exit_code),
            Some(ContainerStateStatusEnum::PAUSED) | Some(ContainerStateStatusEnum::STOPPING) => {
                (InstanceState::Stopped, None)
            }
            Some(ContainerStateStatusEnum::EXITED)
            | Some(ContainerStateStatusEnum::DEAD)
            | Some(ContainerStateStatusEnum::REMOVING)
            | Some(ContainerStateStatusEnum::EMPTY)
            | None => {
                if self.was_stopped(slot, c.id.as_deref()) {
                    (InstanceState::Stopped, exit_code)
                } else {
                    (InstanceState::Exited, exit_code)
                }
            }
        };
        let health = match st.health.and_then(|h| h.status) {
            Some(HealthStatusEnum::STARTING) => Some(RuntimeHealth::Starting),
            Some(HealthStatusEnum::HEALTHY) => Some(RuntimeHealth::Healthy),
            Some(HealthStatusEnum::UNHEALTHY) => Some(RuntimeHealth::Unhealthy),
            _ => None,
        };
        let endpoints = if matches!(state, InstanceState::Running | InstanceState::Starting) {
            self.endpoints_of(slot, &c).unwrap_or_default()
        } else {
            Vec::new()
        };
        Ok(SlotStatus::new(state, version, endpoints)
            .with_health(if state == InstanceState::Running {
                health
            } else {
                None
            })
            .with_exit_code(code))
    }

    async fn stop(&self, slot: Slot, drain: Duration) -> Result<()> {
        let _guard = self.inner.ops.get(slot).lock().await;
        let Some(c) = self.inspect(slot).await.map_err(|e| e.into_core("stop"))? else {
            return Ok(());
        };
        if Self::is_running(&c) {
            let name = self.cfg().container_name(slot);
            tracing::info!(%slot, container = %name, ?drain, "stopping container");
            self.stop_container(&name, drain)
                .await
                .map_err(|e| e.into_core("stop"))?;
            self.mark_stopped(slot, c.id.clone());
        }
        Ok(())
    }

    async fn remove(&self, slot: Slot) -> Result<()> {
        let _guard = self.inner.ops.get(slot).lock().await;
        let Some(c) = self
            .inspect(slot)
            .await
            .map_err(|e| e.into_core("remove"))?
        else {
            return Ok(());
        };
        let name = self.cfg().container_name(slot);
        if Self::is_running(&c) {
            self.stop_container(&name, self.cfg().stop_timeout)
                .await
                .map_err(|e| e.into_core("remove"))?;
        }
        tracing::info!(%slot, container = %name, "removing container");
        self.remove_container(c.id.as_deref().unwrap_or(&name))
            .await
            .map_err(|e| e.into_core("remove"))?;
        self.mark_stopped(slot, None);
        Ok(())
    }

    async fn exec(&self, slot: Slot, argv: &[String]) -> Result<ExecOutput> {
        let Some(program) = argv.first() else {
            return Err(Error::invalid(
                "exec argv",
                "[]",
                "needs at least a program",
            ));
        };
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(Error::invalid(
                "exec argv",
                program.as_str(),
                "arguments must not contain NUL",
            ));
        }
        let c = self
            .inspect(slot)
            .await
            .map_err(|e| e.into_core("exec"))?
            .filter(|c| Self::state_of(c) == Some(ContainerStateStatusEnum::RUNNING))
            .ok_or_else(|| DockerError::NotRunning { slot }.into_core("exec"))?;
        let id =
            c.id.clone()
                .unwrap_or_else(|| self.cfg().container_name(slot));
        let timeout = self.cfg().exec_timeout;
        let run = async {
            let exec = self
                .docker()
                .create_exec(
                    &id,
                    ExecConfig {
                        cmd: Some(argv.to_vec()),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| self.engine_err(format!("create exec {program}"), e))?;
            let mut out = ExecOutput {
                code: None,
                stdout: String::new(),
                stderr: String::new(),
            };
            let (mut so, mut se) = (Vec::new(), Vec::new());
            if let StartExecResults::Attached { mut output, .. } = self
                .docker()
                .start_exec(&exec.id, None)
                .await
                .map_err(|e| self.engine_err(format!("start exec {program}"), e))?
            {
                while let Some(item) = output.next().await {
                    match item.map_err(|e| self.engine_err(format!("output of {program}"), e))? {
                        LogOutput::StdErr { message } => keep_tail(&mut se, &message),
                        LogOutput::StdOut { message } | LogOutput::Console { message } => {
                            keep_tail(&mut so, &message)
                        }
                        LogOutput::StdIn { .. } => {}
                    }
                }
            }
            trim_to(&mut so, MAX_LOG_BYTES);
            trim_to(&mut se, MAX_LOG_BYTES);
            let info = self
                .docker()
                .inspect_exec(&exec.id)
                .await
                .map_err(|e| self.engine_err(format!("inspect exec {program}"), e))?;
            out.code = info.exit_code.and_then(|c| i32::try_from(c).ok());
            out.stdout = String::from_utf8_lossy(&so).into_owned();
            out.stderr = String::from_utf8_lossy(&se).into_owned();
            Ok::<_, DockerError>(out)
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r.map_err(|e| e.into_core("exec")),
            Err(_) => Err(DockerError::ExecTimeout {
                program: program.clone(),
                slot,
                after: timeout,
            }
            .into_core("exec")),
        }
    }

    async fn logs(&self, slot: Slot, since: Option<SystemTime>) -> Result<String> {
        let Some(c) = self.inspect(slot).await.map_err(|e| e.into_core("logs"))? else {
            return Ok(String::new());
        };
        let mut opts = LogsOptionsBuilder::default().stdout(true).stderr(true);
        if let Some(t) = since {
            // The engine counts in whole seconds: round down so nothing newer is left out.
            let secs = t
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            opts = opts.since(i32::try_from(secs).unwrap_or(i32::MAX));
        }
        let id = c.id.unwrap_or_else(|| self.cfg().container_name(slot));
        self.collect_logs(&id, opts.build())
            .await
            .map_err(|e| e.into_core("logs"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_buffers_keep_the_end_within_bounds() {
        let mut buf = Vec::new();
        let chunk = vec![b'a'; MAX_LOG_BYTES / 2];
        for _ in 0..9 {
            keep_tail(&mut buf, &chunk);
            assert!(buf.len() <= 2 * MAX_LOG_BYTES);
        }
        keep_tail(&mut buf, b"END");
        trim_to(&mut buf, MAX_LOG_BYTES);
        assert_eq!(buf.len(), MAX_LOG_BYTES);
        assert!(buf.ends_with(b"aEND"));
    }
}
