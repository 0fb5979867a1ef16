//! The traits backends implement. Each is object safe, `Send + Sync + Debug`, and names itself
//! through `name()` so errors, events and spans say which backend did what.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state::{DeploymentState, Lease, LockInfo, LockOwner};
use crate::types::{Endpoint, Endpoints, Release, Secret, Slot, TrafficSplit, Version};

// ---------------------------------------------------------------------------------------------
// Environment

/// The lifecycle state of a slot's instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Nothing deployed (or removed).
    Absent,
    /// Created and starting.
    Starting,
    /// Running.
    Running,
    /// Stopped on request.
    Stopped,
    /// Exited on its own.
    Exited,
    /// Could not be read entirely: a part of the slot (e.g. a fleet's host) did not answer; the
    /// parts that did are in [`SlotStatus::parts`]. Never counts as running: the engine
    /// redeploys a slot in this state instead of reusing it.
    Unknown,
}

/// Health as the platform itself reports it (e.g. a Docker HEALTHCHECK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeHealth {
    /// Checks still starting.
    Starting,
    /// Healthy.
    Healthy,
    /// Unhealthy.
    Unhealthy,
}

/// What an environment reports about a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SlotStatus {
    /// Lifecycle state.
    pub state: InstanceState,
    /// The version running there, when known.
    pub version: Option<Version>,
    /// The platform's own health verdict, when it has one.
    pub health: Option<RuntimeHealth>,
    /// Exit code, for [`InstanceState::Exited`].
    pub exit_code: Option<i32>,
    /// Where it is reachable (empty unless running or starting).
    pub endpoints: Vec<Endpoint>,
    /// For a slot spread over several parts (a fleet's hosts), each part's own state, by name,
    /// an unreadable one included with why; empty for a slot in one place.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<SlotPart>,
}

/// One part of a slot spread over several (a fleet's host), in [`SlotStatus::parts`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SlotPart {
    /// The part's name (a host name).
    pub name: String,
    /// Its state; [`InstanceState::Unknown`] when it could not be read.
    pub state: InstanceState,
    /// The version running there, when known.
    pub version: Option<Version>,
    /// Why it could not be read (an unreachable engine), naming it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SlotPart {
    /// A part read as `status`.
    pub fn read(name: impl Into<String>, status: &SlotStatus) -> Self {
        SlotPart {
            name: name.into(),
            state: status.state,
            version: status.version.clone(),
            error: None,
        }
    }

    /// A part that could not be read, and why.
    pub fn unreadable(name: impl Into<String>, error: impl Into<String>) -> Self {
        SlotPart {
            name: name.into(),
            state: InstanceState::Unknown,
            version: None,
            error: Some(error.into()),
        }
    }
}

impl SlotStatus {
    /// Nothing there.
    pub fn absent() -> Self {
        SlotStatus {
            state: InstanceState::Absent,
            version: None,
            health: None,
            exit_code: None,
            endpoints: Vec::new(),
            parts: Vec::new(),
        }
    }

    /// A status in `state`, running `version`, reachable at `endpoints`.
    pub fn new(state: InstanceState, version: Option<Version>, endpoints: Vec<Endpoint>) -> Self {
        SlotStatus {
            state,
            version,
            health: None,
            exit_code: None,
            endpoints,
            parts: Vec::new(),
        }
    }

    /// With the platform's health verdict.
    pub fn with_health(mut self, health: Option<RuntimeHealth>) -> Self {
        self.health = health;
        self
    }

    /// With an exit code.
    pub fn with_exit_code(mut self, code: Option<i32>) -> Self {
        self.exit_code = code;
        self
    }

    /// With the state of each part (a fleet's hosts).
    pub fn with_parts(mut self, parts: Vec<SlotPart>) -> Self {
        self.parts = parts;
        self
    }

    /// The parts that could not be read (with why), e.g. a fleet's unreachable hosts.
    pub fn unreadable_parts(&self) -> impl Iterator<Item = &SlotPart> {
        self.parts.iter().filter(|p| p.error.is_some())
    }

    /// True for `Running` and `Starting`.
    pub fn is_up(&self) -> bool {
        matches!(self.state, InstanceState::Running | InstanceState::Starting)
    }
}

/// Output of [`Environment::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Captured standard output.
    pub stdout: String,
    /// Captured standard error.
    pub stderr: String,
}

impl ExecOutput {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Where releases run: one instance (or set of replicas) per slot.
///
/// # Behavior
/// - `deploy` replaces whatever the slot held and returns once the instance is started (not
///   necessarily ready: the engine runs health checks); deploying the same release twice is
///   idempotent. The release's environment (including `secret_env`) reaches the instance.
/// - `status` reads the platform, not a cache; an unknown slot is [`InstanceState::Absent`]. A
///   slot spread over several parts (hosts) of which some cannot be read is
///   [`InstanceState::Unknown`], naming them in [`SlotStatus::parts`].
/// - `stop` stops gracefully, waiting at most `drain` before forcing; stopping an absent or stopped
///   slot is `Ok`.
/// - `remove` deletes everything the slot owns; removing an absent slot is `Ok`.
/// - Slots are independent: nothing done to one changes the other.
///
/// # Errors
/// Backend failures are [`Error::Backend`] naming the operation; optional operations a backend
/// lacks are [`Error::Unsupported`], never a silent no-op.
#[async_trait]
pub trait Environment: Send + Sync + Debug {
    /// The backend's name (`process`, `docker`, …).
    fn name(&self) -> &str;

    /// Starts `release` in `slot`; returns its endpoints.
    async fn deploy(&self, slot: Slot, release: &Release) -> Result<Vec<Endpoint>>;

    /// Reads the slot's state.
    async fn status(&self, slot: Slot) -> Result<SlotStatus>;

    /// Stops the slot gracefully within `drain`.
    async fn stop(&self, slot: Slot, drain: Duration) -> Result<()>;

    /// Removes the slot's instance and everything it owns.
    async fn remove(&self, slot: Slot) -> Result<()>;

    /// Runs `argv` inside (or beside) the slot's instance, e.g. a migration.
    async fn exec(&self, slot: Slot, argv: &[String]) -> Result<ExecOutput> {
        let _ = (slot, argv);
        Err(Error::unsupported("exec", self.name()))
    }

    /// Log output of the slot since `since` (everything when `None`).
    async fn logs(&self, slot: Slot, since: Option<SystemTime>) -> Result<String> {
        let _ = (slot, since);
        Err(Error::unsupported("logs", self.name()))
    }
}

// ---------------------------------------------------------------------------------------------
// TrafficSwitch

/// What a switch can do, so the engine refuses impossible plans before changing anything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Capabilities {
    /// Splits other than 100/0 (canary).
    pub weights: bool,
    /// Sticky sessions.
    pub sticky: bool,
    /// Preview routing to the idle slot.
    pub preview: bool,
    /// `pause` / `resume` of new requests.
    pub pause: bool,
    /// Real in-flight request counts per slot (`in_flight`).
    pub drain: bool,
    /// Per-slot request metrics (`metrics`).
    pub metrics: bool,
    /// Long-lived connections (WebSocket and other upgraded connections, HAProxy sessions)
    /// counted apart from requests and closed gracefully at the drain deadline
    /// (`long_lived`, `close_long_lived`).
    #[serde(default)]
    pub close_long_lived: bool,
}

impl Capabilities {
    /// Only 100/0 switching.
    pub fn basic() -> Self {
        Capabilities::default()
    }

    /// With weights.
    pub fn with_weights(mut self, yes: bool) -> Self {
        self.weights = yes;
        self
    }
    /// With sticky sessions.
    pub fn with_sticky(mut self, yes: bool) -> Self {
        self.sticky = yes;
        self
    }
    /// With preview routing.
    pub fn with_preview(mut self, yes: bool) -> Self {
        self.preview = yes;
        self
    }
    /// With pause / resume.
    pub fn with_pause(mut self, yes: bool) -> Self {
        self.pause = yes;
        self
    }
    /// With in-flight counts.
    pub fn with_drain(mut self, yes: bool) -> Self {
        self.drain = yes;
        self
    }
    /// With metrics.
    pub fn with_metrics(mut self, yes: bool) -> Self {
        self.metrics = yes;
        self
    }
    /// With long-lived connection counts and graceful closing.
    pub fn with_close_long_lived(mut self, yes: bool) -> Self {
        self.close_long_lived = yes;
        self
    }
}

/// Request metrics of one slot, counted by the switch since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SlotMetrics {
    /// Requests answered (any status).
    pub requests: u64,
    /// Responses with a 5xx status (including the switch's own 502/504).
    pub errors_5xx: u64,
    /// Failed connections to the upstream.
    pub connect_errors: u64,
    /// 50th percentile latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
}

impl SlotMetrics {
    /// Builds metrics from counters and latency percentiles.
    pub fn new(
        requests: u64,
        errors_5xx: u64,
        connect_errors: u64,
        p50: Duration,
        p99: Duration,
    ) -> Self {
        SlotMetrics {
            requests,
            errors_5xx,
            connect_errors,
            p50,
            p99,
        }
    }
}

/// Moves traffic between the slots.
///
/// # Behavior
/// - `apply` is atomic from a client's point of view: each request goes wholly to one slot, and no
///   request fails because of the change. It is idempotent: applying the same split twice changes
///   nothing.
/// - `current` reads the proxy's real configuration back (not what this handle remembers): a new
///   handle on the same proxy reports the same split. `None` before anything was applied.
/// - A split that needs a capability the switch lacks (weights, sticky) is refused with
///   [`Error::Unsupported`] and nothing changes.
/// - `apply` with a weight > 0 for a slot without endpoints is refused with
///   [`Error::InvalidInput`] and nothing changes.
/// - A slot with several endpoints is routed to all of them (each serves part of the slot's
///   share) and an endpoint left out of a slot gets no new request; more endpoints than the
///   switch can route is refused with [`Error::InvalidInput`] naming the limit, and nothing
///   changes.
///
/// # Errors
/// [`Error::Backend`] naming the step that failed; on failure the previous configuration stays in
/// force (the backend restores it if it had started changing it).
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait TrafficSwitch: Send + Sync + Debug {
    /// The backend's name (`proxy`, `nginx`, `haproxy`, …).
    fn name(&self) -> &str;

    /// What this switch can do.
    fn capabilities(&self) -> Capabilities;

    /// Routes traffic according to `split` across `endpoints`.
    async fn apply(&self, split: &TrafficSplit, endpoints: &Endpoints) -> Result<()>;

    /// The split the proxy really has.
    async fn current(&self) -> Result<Option<TrafficSplit>>;

    /// Routes preview traffic (header or cookie) to `slot`, or stops preview with `None`.
    async fn preview(&self, slot: Option<Slot>, endpoints: &Endpoints) -> Result<()> {
        let _ = (slot, endpoints);
        Err(Error::unsupported("preview", self.name()))
    }

    /// Requests in flight to `slot` right now.
    async fn in_flight(&self, slot: Slot) -> Result<u64> {
        let _ = slot;
        Err(Error::unsupported("in_flight", self.name()))
    }

    /// Request metrics of `slot`.
    async fn metrics(&self, slot: Slot) -> Result<SlotMetrics> {
        let _ = slot;
        Err(Error::unsupported("metrics", self.name()))
    }

    /// The switch's own counters (requests per slot, failures by cause, latency), cumulative
    /// since it started: what the engine's [`TrafficLedger`](crate::TrafficLedger) is made of.
    /// A count the switch does not keep is `None`, never `0`.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the switch keeps no counters (the ledger then says "not
    /// measured").
    async fn counters(&self) -> Result<crate::ledger::SwitchCounters> {
        Err(Error::unsupported("counters", self.name()))
    }

    /// Holds new requests (bounded) until `resume`.
    async fn pause(&self) -> Result<()> {
        Err(Error::unsupported("pause", self.name()))
    }

    /// Releases held requests.
    async fn resume(&self) -> Result<()> {
        Err(Error::unsupported("resume", self.name()))
    }

    /// Long-lived connections open to `slot` now (WebSockets and other upgraded connections),
    /// counted apart from [`in_flight`](TrafficSwitch::in_flight) requests: the engine lets
    /// them run until the drain deadline instead of waiting for them.
    async fn long_lived(&self, slot: Slot) -> Result<u64> {
        let _ = slot;
        Err(Error::unsupported("long_lived", self.name()))
    }

    /// Closes the long-lived connections still open to `slot` gracefully (a WebSocket gets a
    /// close frame `1001 going away`), so their clients reconnect to the live slot; returns how
    /// many were closed. Called by the engine at the drain deadline of the old slot.
    async fn close_long_lived(&self, slot: Slot) -> Result<u64> {
        let _ = slot;
        Err(Error::unsupported("close_long_lived", self.name()))
    }
}

/// Conveniences over any [`TrafficSwitch`].
#[async_trait]
pub trait TrafficSwitchExt: TrafficSwitch {
    /// The slot with all (or most) of the traffic, read from the proxy.
    async fn live_slot(&self) -> Result<Option<Slot>> {
        Ok(self.current().await?.map(|s| s.primary()))
    }

    /// Checks `split` against the switch's capabilities and `endpoints` without applying it.
    fn check_split(&self, split: &TrafficSplit, endpoints: &Endpoints) -> Result<()> {
        let caps = self.capabilities();
        if !split.is_whole() && !caps.weights {
            return Err(Error::unsupported("weighted split", self.name()));
        }
        if split.sticky.is_some() && !caps.sticky {
            return Err(Error::unsupported("sticky sessions", self.name()));
        }
        for slot in Slot::ALL {
            if split.weight(slot) > 0 && endpoints.get(slot).is_empty() {
                return Err(Error::invalid(
                    "traffic split",
                    split.to_string(),
                    format!("slot {slot} has weight but no endpoints"),
                ));
            }
            for e in endpoints.get(slot) {
                e.validate()?;
            }
        }
        Ok(())
    }
}

impl<T: TrafficSwitch + ?Sized> TrafficSwitchExt for T {}

// ---------------------------------------------------------------------------------------------
// DatabaseStrategy

/// Connection settings handed to the target release (merged into its environment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DbBinding {
    /// Plain variables (`PGHOST`, `PGDATABASE`, …).
    pub env: BTreeMap<String, String>,
    /// Secret variables (`PGPASSWORD`, `DATABASE_URL`): redacted in Debug, never persisted.
    pub secret_env: BTreeMap<String, Secret>,
}

impl DbBinding {
    /// An empty binding (shared database, nothing to change).
    pub fn none() -> Self {
        DbBinding::default()
    }

    /// Adds a plain variable.
    pub fn with_env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.insert(k.into(), v.into());
        self
    }

    /// Adds a secret variable.
    pub fn with_secret(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.secret_env.insert(k.into(), Secret::new(v));
        self
    }

    /// `release` with this binding's variables added.
    pub fn apply_to(&self, release: &Release) -> Release {
        let mut r = release.clone();
        r.env.extend(self.env.clone());
        r.secret_env.extend(self.secret_env.clone());
        r
    }
}

/// Whether a database step can be undone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Reversibility {
    /// `rollback` restores the previous state.
    Reversible,
    /// It cannot be undone (e.g. a contract migration): after it the engine never rolls back on its
    /// own; it stops and asks.
    Irreversible {
        /// What was done.
        what: String,
    },
}

/// What a database step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbStep {
    /// Whether it can be undone.
    pub reversibility: Reversibility,
    /// Human-readable summary (`copied 12 tables`, `applied 2 expand migrations`).
    pub summary: String,
}

impl DbStep {
    /// A reversible step.
    pub fn reversible(summary: impl Into<String>) -> Self {
        DbStep {
            reversibility: Reversibility::Reversible,
            summary: summary.into(),
        }
    }

    /// An irreversible step.
    pub fn irreversible(summary: impl Into<String>) -> Self {
        let s = summary.into();
        DbStep {
            reversibility: Reversibility::Irreversible { what: s.clone() },
            summary: s,
        }
    }

    /// The reversible step of a strategy with nothing to do at that point (`nothing to do`).
    pub fn nothing_to_do() -> Self {
        DbStep::reversible("nothing to do")
    }

    /// True if reversible.
    pub fn is_reversible(&self) -> bool {
        self.reversibility == Reversibility::Reversible
    }
}

/// What [`DatabaseStrategy::prepare`] returns: the binding for the target release and what was
/// done.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Prepared {
    /// Connection settings merged into the target release's environment (secrets stay in
    /// [`DbBinding::secret_env`], redacted and never persisted).
    pub binding: DbBinding,
    /// What `prepare` did, and whether it can be undone.
    pub step: DbStep,
}

impl Prepared {
    /// `binding` for the target, after `step`.
    pub fn new(binding: DbBinding, step: DbStep) -> Self {
        Prepared { binding, step }
    }
}

/// What a database strategy is told at each step.
#[derive(Debug, Clone)]
pub struct DbContext {
    /// The live slot (`None` on the first deploy).
    pub live: Option<Slot>,
    /// The slot being deployed.
    pub target: Slot,
    /// The release being deployed.
    pub release: Release,
}

/// How the two slots share (or do not share) a database.
///
/// Only [`name`](Self::name) and [`prepare`](Self::prepare) are required; the other steps default
/// to doing nothing (a reversible "nothing to do" step), for strategies that need no work there.
///
/// What a step does for a release is found from [`DbContext::release`] (e.g. the migrations that
/// release ships with, by its version), so one strategy, and one [`Deployer`](crate::Deployer),
/// serves every release.
///
/// # Behavior
/// - `prepare` is idempotent for the same target: after a crash the engine may call it again.
/// - `rollback` undoes every reversible step done for this target and leaves the live side's data
///   untouched; calling it twice is `Ok`.
/// - Each step reports whether it is reversible ([`DbStep`]).
///
/// # Errors
/// [`Error::Backend`] naming the step, with `backend` equal to [`name`](Self::name); a failed step
/// leaves nothing half-done on the live side.
#[async_trait]
pub trait DatabaseStrategy: Send + Sync + Debug {
    /// The strategy's name, as its errors name the backend (`postgres shared`, …).
    fn name(&self) -> &str;

    /// Prepares the target's database; returns the binding for the target release.
    async fn prepare(&self, ctx: &DbContext) -> Result<Prepared>;

    /// The binding of a slot whose database is already in place (the same settings, secrets
    /// included, that `prepare` gave it), without changing anything: for redeploying a release the
    /// engine stopped or lost (switch-back to a stopped slot, crash recovery), whose binding
    /// secrets were never persisted.
    async fn bind(&self, ctx: &DbContext) -> Result<DbBinding>;

    /// Just before the switch (drain replication, sync sequences). Default: nothing to do.
    async fn before_switch(&self, ctx: &DbContext) -> Result<DbStep> {
        let _ = ctx;
        Ok(DbStep::nothing_to_do())
    }

    /// Just after the switch. Default: nothing to do.
    async fn after_switch(&self, ctx: &DbContext) -> Result<DbStep> {
        let _ = ctx;
        Ok(DbStep::nothing_to_do())
    }

    /// Undoes what was done for the target. Default: nothing to undo.
    async fn rollback(&self, ctx: &DbContext) -> Result<()> {
        let _ = ctx;
        Ok(())
    }

    /// Drops what the old side no longer needs (after the old slot is gone). Default: nothing to
    /// do.
    async fn finalize(&self, ctx: &DbContext) -> Result<DbStep> {
        let _ = ctx;
        Ok(DbStep::nothing_to_do())
    }
}

// ---------------------------------------------------------------------------------------------
// HealthCheck

/// A health check's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Healthy.
    Healthy,
    /// Unhealthy, with the reason.
    Unhealthy(String),
}

/// A health check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// The verdict.
    pub health: Health,
    /// How long the check took.
    pub latency: Duration,
}

impl HealthReport {
    /// Healthy after `latency`.
    pub fn healthy(latency: Duration) -> Self {
        HealthReport {
            health: Health::Healthy,
            latency,
        }
    }

    /// Unhealthy with `reason` after `latency`.
    pub fn unhealthy(reason: impl Into<String>, latency: Duration) -> Self {
        HealthReport {
            health: Health::Unhealthy(reason.into()),
            latency,
        }
    }

    /// True if healthy.
    pub fn is_healthy(&self) -> bool {
        self.health == Health::Healthy
    }

    /// The reason, if unhealthy.
    pub fn reason(&self) -> Option<&str> {
        match &self.health {
            Health::Healthy => None,
            Health::Unhealthy(r) => Some(r),
        }
    }
}

/// Checks one endpoint.
///
/// # Behavior
/// A failing target is a report ([`Health::Unhealthy`]) with the reason, not an `Err`; `Err` is for a
/// check that could not run at all (misconfigured). Each call is bounded in time by the check itself.
#[async_trait]
pub trait HealthCheck: Send + Sync + Debug {
    /// The check's name (`http /health`, `tcp`, …).
    fn name(&self) -> &str;

    /// Checks `endpoint`.
    async fn check(&self, endpoint: &Endpoint) -> Result<HealthReport>;
}

// ---------------------------------------------------------------------------------------------
// Hook

/// Named lifecycle points where hooks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookPoint {
    /// Before the target is deployed.
    BeforeDeploy,
    /// After the target is ready (migrations).
    AfterDeploy,
    /// Before the switch (smoke tests).
    BeforeSwitch,
    /// After the switch.
    AfterSwitch,
    /// After a rollback.
    AfterRollback,
}

/// What a hook is told.
#[derive(Debug, Clone)]
pub struct HookContext {
    /// Where it runs.
    pub point: HookPoint,
    /// Deployment id.
    pub deployment: u64,
    /// The release being deployed.
    pub release: Release,
    /// The target slot.
    pub target: Slot,
    /// The live slot before the deployment.
    pub previous: Option<Slot>,
    /// The target's endpoints (empty before deploy).
    pub endpoints: Vec<Endpoint>,
    /// The environment, for hooks that `exec` in the target.
    pub environment: Arc<dyn Environment>,
}

/// Code run at a lifecycle point.
///
/// # Behavior
/// `Ok` lets the deployment go on; `Err` fails it at that point (with rollback as for any failure).
/// The engine bounds each run by the hook's configured timeout.
#[async_trait]
pub trait Hook: Send + Sync + Debug {
    /// The hook's name.
    fn name(&self) -> &str;

    /// Runs the hook.
    async fn run(&self, ctx: &HookContext) -> Result<()>;
}

// ---------------------------------------------------------------------------------------------
// SecretSource

/// Where a release's secret environment comes from, every time the release is (re)deployed.
///
/// Secrets are never persisted: the state records only their names
/// ([`Release::secret_keys`]). Whenever the engine starts a release — a deploy, a rollback or
/// switch-back that redeploys an old release, a run resumed after a crash — it asks its sources
/// again, and refuses ([`Error::SecretsUnavailable`]) to start a release whose recorded secrets
/// they do not all provide.
///
/// # Behavior
/// - `resolve` returns the variables it provides for `release` (it may use the version); it
///   changes nothing and may be called several times per run.
///
/// # Errors
/// [`Error::SecretsUnavailable`] or a backend error naming what could not be read, never a value.
#[async_trait]
pub trait SecretSource: Send + Sync + Debug {
    /// The source's name, for errors.
    fn name(&self) -> &str;

    /// The secret variables this source provides for `release`.
    async fn resolve(&self, release: &Release) -> Result<BTreeMap<String, Secret>>;
}

// ---------------------------------------------------------------------------------------------
// StateStore

/// Where the engine persists its state, and the deployment lock.
///
/// # Behavior
/// - `load` returns `None` when nothing was ever saved; a corrupt or newer-format state is an error,
///   never silently replaced.
/// - `save` is fenced and compare-and-swap, in one atomic step: it succeeds only if `lease` is the
///   lock held now (same token and epoch, not expired; otherwise [`Error::LockLost`]) and the stored
///   revision equals `state.revision` (otherwise [`Error::Conflict`]); it returns the new revision
///   (stored revision + 1).
/// - `acquire` takes the lock for `ttl` or fails with [`Error::Locked`] naming the holder; an expired
///   lock is taken over. Of two concurrent callers exactly one wins. The lease's `epoch` is greater
///   than that of every lease the store granted before, released and broken ones included.
/// - `renew` extends a held lease; it fails with [`Error::LockLost`] if the lease was taken or broken.
/// - `release` frees a held lease; releasing a lease that is no longer held is `Ok` (and changes
///   nothing).
/// - `break_lock` removes any lock, returning what it removed.
#[async_trait]
pub trait StateStore: Send + Sync + Debug {
    /// The store's name (`file`, `postgres`, `memory`).
    fn name(&self) -> &str;

    /// Loads the state.
    async fn load(&self) -> Result<Option<DeploymentState>>;

    /// Saves `state` if `lease` is the lock held now and the stored revision is `state.revision`;
    /// returns the new revision.
    async fn save(&self, state: &DeploymentState, lease: &Lease) -> Result<u64>;

    /// Takes the lock.
    async fn acquire(&self, owner: &LockOwner, ttl: Duration) -> Result<Lease>;

    /// Extends the lease.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease>;

    /// Frees the lease.
    async fn release(&self, lease: &Lease) -> Result<()>;

    /// The current holder, if any (expired locks included, for display).
    async fn lock_info(&self) -> Result<Option<LockInfo>>;

    /// Removes the lock whoever holds it.
    async fn break_lock(&self) -> Result<Option<LockInfo>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_status_without_parts_reads_and_writes_as_before() {
        let old =
            r#"{"state":"running","version":"v1","health":null,"exit_code":null,"endpoints":[]}"#;
        let st: SlotStatus = serde_json::from_str(old).unwrap();
        assert!(st.parts.is_empty());
        assert_eq!(serde_json::to_string(&st).unwrap(), old);
        let unknown = SlotStatus::new(InstanceState::Unknown, None, Vec::new())
            .with_parts(vec![SlotPart::unreadable("h2", "cannot reach h2")]);
        let text = serde_json::to_string(&unknown).unwrap();
        assert!(text.contains(r#""state":"unknown""#), "{text}");
        assert_eq!(serde_json::from_str::<SlotStatus>(&text).unwrap(), unknown);
        assert!(!unknown.is_up());
        assert_eq!(unknown.unreadable_parts().count(), 1);
    }
}
