//! In-memory fakes of every trait, sharing one [`World`] so that tests can prove properties across
//! them (e.g. live traffic never pointed at a stopped slot), with scripted faults.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::ledger::SwitchCounters;
use crate::state::{new_token, DeploymentState, Lease, LockInfo, LockOwner, Timestamp};
use crate::traits::{
    Capabilities, DatabaseStrategy, DbBinding, DbContext, DbStep, Environment, ExecOutput,
    HealthCheck, HealthReport, Hook, HookContext, InstanceState, Prepared, SlotMetrics, SlotStatus,
    StateStore, TrafficSwitch, TrafficSwitchExt,
};
use crate::types::{Endpoint, Endpoints, PerSlot, Release, Slot, TrafficSplit};

/// A scripted fault.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Fail with this message (and retryability).
    Fail {
        /// Error text.
        message: String,
        /// Whether the error says it is retryable.
        retryable: bool,
    },
    /// Sleep this long, then proceed.
    Delay(Duration),
    /// Never return (until the caller's timeout or the task is aborted).
    Hang,
}

/// An operation of the fakes: what a scripted fault fires on and what [`Fakes::call_count`] counts.
///
/// A typed name, so that a misspelt fault does not compile (or, for a hook, panics when scripted)
/// instead of never firing. [`Display`](fmt::Display) gives the `<fake>.<method>` name the call log
/// uses (`environment.deploy`, `hook.smoke`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// [`Environment::deploy`].
    EnvironmentDeploy,
    /// [`Environment::status`].
    EnvironmentStatus,
    /// [`Environment::stop`].
    EnvironmentStop,
    /// [`Environment::remove`].
    EnvironmentRemove,
    /// [`Environment::exec`].
    EnvironmentExec,
    /// [`TrafficSwitch::apply`].
    SwitchApply,
    /// [`TrafficSwitch::current`].
    SwitchCurrent,
    /// [`TrafficSwitch::preview`].
    SwitchPreview,
    /// [`TrafficSwitch::in_flight`].
    SwitchInFlight,
    /// [`TrafficSwitch::metrics`].
    SwitchMetrics,
    /// [`TrafficSwitch::pause`].
    SwitchPause,
    /// [`TrafficSwitch::resume`].
    SwitchResume,
    /// [`HealthCheck::check`].
    HealthCheck,
    /// [`DatabaseStrategy::prepare`].
    DatabasePrepare,
    /// [`DatabaseStrategy::before_switch`].
    DatabaseBeforeSwitch,
    /// [`DatabaseStrategy::after_switch`].
    DatabaseAfterSwitch,
    /// [`DatabaseStrategy::rollback`].
    DatabaseRollback,
    /// [`DatabaseStrategy::bind`].
    DatabaseBind,
    /// [`DatabaseStrategy::finalize`].
    DatabaseFinalize,
    /// [`DataPathProbe::probe`](crate::DataPathProbe::probe).
    Probe,
    /// [`StateStore::load`].
    StoreLoad,
    /// [`StateStore::save`].
    StoreSave,
    /// [`StateStore::acquire`].
    StoreAcquire,
    /// [`StateStore::renew`].
    StoreRenew,
    /// [`StateStore::release`].
    StoreRelease,
    /// [`Hook::run`] of the hook made by [`Fakes::hook`] with this name.
    Hook(String),
}

impl Op {
    /// The run of the hook named `name` (see [`Fakes::hook`]).
    pub fn hook(name: impl Into<String>) -> Self {
        Op::Hook(name.into())
    }

    /// The fake's part of the name: `environment`, `switch`, `health`, `database`, `probe`, `store`
    /// or `hook`.
    pub fn fake(&self) -> &'static str {
        use Op::*;
        match self {
            EnvironmentDeploy | EnvironmentStatus | EnvironmentStop | EnvironmentRemove
            | EnvironmentExec => "environment",
            SwitchApply | SwitchCurrent | SwitchPreview | SwitchInFlight | SwitchMetrics
            | SwitchPause | SwitchResume => "switch",
            HealthCheck => "health",
            DatabasePrepare | DatabaseBeforeSwitch | DatabaseAfterSwitch | DatabaseRollback
            | DatabaseBind | DatabaseFinalize => "database",
            Probe => "probe",
            StoreLoad | StoreSave | StoreAcquire | StoreRenew | StoreRelease => "store",
            Hook(_) => "hook",
        }
    }

    /// The method's part of the name (`deploy`, `apply`, …; a hook's name), as injected errors
    /// name the operation.
    pub fn method(&self) -> &str {
        use Op::*;
        match self {
            EnvironmentDeploy => "deploy",
            EnvironmentStatus => "status",
            EnvironmentStop => "stop",
            EnvironmentRemove => "remove",
            EnvironmentExec => "exec",
            SwitchApply => "apply",
            SwitchCurrent => "current",
            SwitchPreview => "preview",
            SwitchInFlight => "in_flight",
            SwitchMetrics => "metrics",
            SwitchPause => "pause",
            SwitchResume => "resume",
            HealthCheck => "check",
            DatabasePrepare => "prepare",
            DatabaseBeforeSwitch => "before_switch",
            DatabaseAfterSwitch => "after_switch",
            DatabaseRollback => "rollback",
            DatabaseBind => "bind",
            DatabaseFinalize => "finalize",
            Probe => "probe",
            StoreLoad => "load",
            StoreSave => "save",
            StoreAcquire => "acquire",
            StoreRenew => "renew",
            StoreRelease => "release",
            Hook(name) => name,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.fake(), self.method())
    }
}

#[derive(Debug, Clone)]
struct Rule {
    op: Op,
    /// Fire on this call number (1-based) of `op`; `None` = the next call.
    on_call: Option<u64>,
    fault: Fault,
    persistent: bool,
}

/// Where live traffic pointed, at an instant.
#[derive(Debug, Clone, PartialEq)]
pub struct TimelineEntry {
    /// When.
    pub at: Instant,
    /// The split in force from then on.
    pub split: TrafficSplit,
}

#[derive(Debug, Clone)]
struct Instance {
    release: Release,
    state: InstanceState,
    endpoints: Vec<Endpoint>,
    /// The environment it was started with, secrets included ([`Release::full_env`]).
    env: BTreeMap<String, String>,
    /// Whether a health check has reported it healthy.
    passed_health: bool,
}

/// A crash armed by [`Fakes::crash_at_call`]: the `at`-th counted call never returns.
#[derive(Debug, Clone)]
struct CrashPlan {
    at: u64,
    seen: u64,
    hit: Option<(u64, Op)>,
}

/// The shared state behind a set of fakes. Inspect it through [`Fakes`] accessors.
#[derive(Debug, Default, Clone)]
pub struct World {
    instances: PerSlot<Option<Instance>>,
    next_port: u16,
    split: Option<TrafficSplit>,
    endpoints: Endpoints,
    preview: Option<Slot>,
    paused: bool,
    timeline: Vec<TimelineEntry>,
    violations: Vec<String>,
    rules: Vec<Rule>,
    calls: HashMap<Op, u64>,
    /// Names given to [`Fakes::hook`]: scripting a fault on any other hook is a mistake.
    hooks: HashSet<String>,
    log: Vec<String>,
    unhealthy_versions: HashSet<String>,
    unhealthy_after_switch: HashSet<String>,
    healthy_after: u32,
    health_calls: u32,
    in_flight: PerSlot<u64>,
    long_lived: PerSlot<u64>,
    long_lived_closed: PerSlot<u64>,
    metrics: PerSlot<SlotMetrics>,
    counters: Option<SwitchCounters>,
    db_irreversible: HashSet<String>,
    db_prepared: HashSet<Slot>,
    state: Option<DeploymentState>,
    lock: Option<LockInfo>,
    /// The highest lease epoch granted.
    lock_epoch: u64,
    capabilities: Capabilities,
    crash: Option<CrashPlan>,
    unverified: Vec<String>,
}

fn lock(world: &Mutex<World>) -> MutexGuard<'_, World> {
    world.lock().unwrap_or_else(|p| p.into_inner())
}

/// A set of fakes sharing one world. Cheap to clone; every clone sees the same world.
///
/// ```
/// use bluegreen_core::testkit::Fakes;
/// use bluegreen_core::{Slot, TrafficSplit, TrafficSwitch};
/// # tokio_test_block_on(async {
/// let fakes = Fakes::new();
/// let switch = fakes.switch();
/// let eps = fakes.endpoints();
/// # let _ = eps;
/// assert!(switch.current().await.unwrap().is_none());
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Fakes {
    world: Arc<Mutex<World>>,
}

impl fmt::Debug for Fakes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fakes")
    }
}

impl Fakes {
    /// A new world: both slots absent, the switch unconfigured, every capability on.
    pub fn new() -> Self {
        let f = Fakes::default();
        {
            let mut w = lock(&f.world);
            w.next_port = 10_000;
            w.capabilities = Capabilities::basic()
                .with_weights(true)
                .with_sticky(true)
                .with_preview(true)
                .with_pause(true)
                .with_drain(true)
                .with_metrics(true)
                .with_close_long_lived(true);
        }
        f
    }

    fn w(&self) -> MutexGuard<'_, World> {
        lock(&self.world)
    }

    /// A new world that starts as a copy of this one as it is now (instances, switch, store and
    /// lock, scripted faults, call counts, logs); the two evolve separately from then on. For
    /// exploring several futures from one point, e.g. a crash during recovery after a crash.
    pub fn fork(&self) -> Fakes {
        let copy = self.w().clone();
        Fakes {
            world: Arc::new(Mutex::new(copy)),
        }
    }

    /// The fake environment.
    pub fn environment(&self) -> FakeEnvironment {
        FakeEnvironment {
            world: self.world.clone(),
        }
    }

    /// The fake switch.
    pub fn switch(&self) -> FakeSwitch {
        FakeSwitch {
            world: self.world.clone(),
        }
    }

    /// A health check that answers from the world: unhealthy for versions marked unhealthy.
    pub fn health_check(&self) -> FakeHealthCheck {
        FakeHealthCheck {
            world: self.world.clone(),
        }
    }

    /// The fake database strategy.
    pub fn database(&self) -> FakeDatabase {
        FakeDatabase {
            world: self.world.clone(),
        }
    }

    /// A [`DeployerBuilder`](crate::DeployerBuilder) over these fakes' environment, switch,
    /// store and health check: add a database, hooks, a probe, secrets and a policy, then build.
    pub fn deployer_builder(&self) -> crate::DeployerBuilder {
        crate::Deployer::builder()
            .environment(Arc::new(self.environment()))
            .switch(Arc::new(self.switch()))
            .store(Arc::new(self.store()))
            .health_check(Arc::new(self.health_check()))
    }

    /// The in-memory state store.
    pub fn store(&self) -> MemoryStateStore {
        MemoryStateStore {
            world: self.world.clone(),
        }
    }

    /// A data-path probe answering with the version a request through the switch would reach.
    pub fn probe(&self) -> FakeProbe {
        FakeProbe {
            world: self.world.clone(),
        }
    }

    /// A hook named `name` that records its runs (and fails or hangs as scripted on
    /// [`Op::Hook`]`(name)`).
    pub fn hook(&self, name: &str) -> FakeHook {
        self.w().hooks.insert(name.to_string());
        FakeHook {
            name: name.to_string(),
            world: self.world.clone(),
        }
    }

    // ---- scripting -----------------------------------------------------------------------

    /// The next call of `op` fails (non-retryable).
    ///
    /// # Panics
    /// If `op` is [`Op::Hook`] naming no hook made by [`Fakes::hook`] (a fault that could never
    /// fire); the same holds for every scripting method.
    pub fn fail_next(&self, op: Op, message: &str) {
        self.add_rule(
            op,
            None,
            Fault::Fail {
                message: message.into(),
                retryable: false,
            },
            false,
        );
    }

    /// The next call of `op` fails with a retryable error.
    pub fn fail_next_retryable(&self, op: Op, message: &str) {
        self.add_rule(
            op,
            None,
            Fault::Fail {
                message: message.into(),
                retryable: true,
            },
            false,
        );
    }

    /// Call number `n` (1-based, counting every call of `op` so far) fails.
    pub fn fail_on_call(&self, op: Op, n: u64, message: &str) {
        self.add_rule(
            op,
            Some(n),
            Fault::Fail {
                message: message.into(),
                retryable: false,
            },
            false,
        );
    }

    /// Every call of `op` fails from now on.
    pub fn fail_always(&self, op: Op, message: &str) {
        self.add_rule(
            op,
            None,
            Fault::Fail {
                message: message.into(),
                retryable: false,
            },
            true,
        );
    }

    /// The next call of `op` sleeps `d` first.
    pub fn delay_next(&self, op: Op, d: Duration) {
        self.add_rule(op, None, Fault::Delay(d), false);
    }

    /// The next call of `op` never returns.
    pub fn hang_next(&self, op: Op) {
        self.add_rule(op, None, Fault::Hang, false);
    }

    /// Call number `n` (1-based, counting every call of `op` so far) never returns.
    pub fn hang_on_call(&self, op: Op, n: u64) {
        self.add_rule(op, Some(n), Fault::Hang, false);
    }

    /// Removes every scripted fault.
    pub fn clear_faults(&self) {
        self.w().rules.clear();
    }

    /// Arms a crash point: counting from now, the `n`-th call (1-based) of any fake never returns,
    /// as if the process died just before that call took effect. Every operation counts (state
    /// saves, loads and the lock's acquire and release included) except [`Op::StoreRenew`], which
    /// the lease's background task makes at times of its own. A crash *after* a call took effect
    /// is the crash before the next call, so enumerating `n = 1, 2, …` until a run finishes
    /// without reaching `n` visits every crash point of that run. Replaces an armed crash.
    pub fn crash_at_call(&self, n: u64) {
        assert!(n > 0, "crash points count from 1");
        self.w().crash = Some(CrashPlan {
            at: n,
            seen: 0,
            hit: None,
        });
    }

    /// The call that hung for the armed crash point: its number and its operation.
    pub fn crashed(&self) -> Option<(u64, Op)> {
        self.w().crash.as_ref().and_then(|c| c.hit.clone())
    }

    /// How many calls were counted since [`Fakes::crash_at_call`] armed a crash point.
    pub fn crash_calls(&self) -> u64 {
        self.w().crash.as_ref().map(|c| c.seen).unwrap_or(0)
    }

    /// Disarms the crash point: calls are no longer counted, none hangs.
    pub fn disarm_crash(&self) {
        self.w().crash = None;
    }

    fn add_rule(&self, op: Op, on_call: Option<u64>, fault: Fault, persistent: bool) {
        self.expect_known(&op);
        self.w().rules.push(Rule {
            op,
            on_call,
            fault,
            persistent,
        });
    }

    /// Health checks fail for instances running `version`.
    pub fn set_unhealthy_version(&self, version: &str) {
        self.w().unhealthy_versions.insert(version.to_string());
    }

    /// Health checks pass for `version` until it receives traffic, then fail.
    pub fn set_unhealthy_after_switch(&self, version: &str) {
        self.w().unhealthy_after_switch.insert(version.to_string());
    }

    /// The first `n` health checks (of any endpoint) fail, later ones pass.
    pub fn set_healthy_after(&self, n: u32) {
        let mut w = self.w();
        w.healthy_after = n;
        w.health_calls = 0;
    }

    /// Sets how many long-lived connections `long_lived(slot)` reports (until
    /// `close_long_lived(slot)` closes them).
    pub fn set_long_lived(&self, slot: Slot, n: u64) {
        self.w().long_lived.set(slot, n);
    }

    /// How many long-lived connections to `slot` `close_long_lived` closed.
    pub fn long_lived_closed(&self, slot: Slot) -> u64 {
        *self.w().long_lived_closed.get(slot)
    }

    /// Sets what `in_flight(slot)` reports.
    pub fn set_in_flight(&self, slot: Slot, n: u64) {
        self.w().in_flight.set(slot, n);
    }

    /// Sets what `metrics(slot)` reports.
    pub fn set_metrics(&self, slot: Slot, m: SlotMetrics) {
        self.w().metrics.set(slot, m);
    }

    /// Sets what `counters()` reports. Until this is called the fake switch keeps no counters:
    /// `counters()` is unsupported and ledgers say "not measured".
    pub fn set_counters(&self, c: SwitchCounters) {
        self.w().counters = Some(c);
    }

    /// Database steps run for `version` report themselves irreversible.
    pub fn set_db_irreversible(&self, version: &str) {
        self.w().db_irreversible.insert(version.to_string());
    }

    /// Overrides the switch's capabilities.
    pub fn set_capabilities(&self, caps: Capabilities) {
        self.w().capabilities = caps;
    }

    // ---- inspection ----------------------------------------------------------------------

    /// Every split the switch held, in order.
    pub fn timeline(&self) -> Vec<TimelineEntry> {
        self.w().timeline.clone()
    }

    /// How many times the slot with most traffic changed (a switch, in the everyday sense).
    pub fn switch_count(&self) -> usize {
        let w = self.w();
        w.timeline
            .windows(2)
            .filter(|p| p[0].split.primary() != p[1].split.primary())
            .count()
    }

    /// Moments where traffic pointed at a slot that was not running: must stay empty.
    pub fn violations(&self) -> Vec<String> {
        self.w().violations.clone()
    }

    /// A log line per backend call (`environment.deploy green v2`, `switch.apply …`).
    pub fn calls(&self) -> Vec<String> {
        self.w().log.clone()
    }

    /// How many times `op` was called (every attempt counts: a retried call counts twice).
    ///
    /// # Panics
    /// If `op` is [`Op::Hook`] naming no hook made by [`Fakes::hook`] (its count would always be
    /// 0).
    pub fn call_count(&self, op: Op) -> u64 {
        self.expect_known(&op);
        self.w().calls.get(&op).copied().unwrap_or(0)
    }

    /// Waits (polling, at most `within`) until `op` has been called more than `count` times, e.g.
    /// until a run running in another task reaches a hung or delayed call. Returns whether it was.
    pub async fn called_more_than(&self, op: Op, count: u64, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.call_count(op.clone()) > count {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn expect_known(&self, op: &Op) {
        if let Op::Hook(name) = op {
            let w = self.w();
            if !w.hooks.contains(name) {
                let mut known: Vec<&str> = w.hooks.iter().map(String::as_str).collect();
                known.sort_unstable();
                panic!("{op}: no hook named {name:?} was made with Fakes::hook (known: {known:?})");
            }
        }
    }

    /// The version running in `slot`, if up.
    pub fn running(&self, slot: Slot) -> Option<String> {
        self.w()
            .instances
            .get(slot)
            .as_ref()
            .filter(|i| i.state == InstanceState::Running)
            .map(|i| i.release.version.to_string())
    }

    /// The instance state of `slot`.
    pub fn instance_state(&self, slot: Slot) -> InstanceState {
        self.w()
            .instances
            .get(slot)
            .as_ref()
            .map(|i| i.state)
            .unwrap_or(InstanceState::Absent)
    }

    /// The environment (secrets included) the instance in `slot` was started with; `None` if
    /// the slot is absent.
    pub fn started_env(&self, slot: Slot) -> Option<BTreeMap<String, String>> {
        self.w().instances.get(slot).as_ref().map(|i| i.env.clone())
    }

    /// The endpoints the instance in `slot` listens on (empty if absent).
    pub fn instance_endpoints(&self, slot: Slot) -> Vec<Endpoint> {
        self.w()
            .instances
            .get(slot)
            .as_ref()
            .map(|i| i.endpoints.clone())
            .unwrap_or_default()
    }

    /// Whether a health check has reported the instance in `slot` healthy since it started.
    pub fn passed_health(&self, slot: Slot) -> bool {
        self.w()
            .instances
            .get(slot)
            .as_ref()
            .map(|i| i.passed_health)
            .unwrap_or(false)
    }

    /// Moments where the switch was told to send traffic to an instance that no health check had
    /// reported healthy: must stay empty.
    pub fn unverified_routes(&self) -> Vec<String> {
        self.w().unverified.clone()
    }

    /// The split the switch holds.
    pub fn split(&self) -> Option<TrafficSplit> {
        self.w().split.clone()
    }

    /// The slot with most traffic.
    pub fn live(&self) -> Option<Slot> {
        self.w().split.as_ref().map(|s| s.primary())
    }

    /// Endpoints the switch was last given.
    pub fn endpoints(&self) -> Endpoints {
        self.w().endpoints.clone()
    }

    /// Whether the switch is paused.
    pub fn is_paused(&self) -> bool {
        self.w().paused
    }

    /// The slot receiving preview traffic.
    pub fn preview_slot(&self) -> Option<Slot> {
        self.w().preview
    }

    /// Slots whose database was prepared and not rolled back.
    pub fn db_prepared(&self) -> Vec<Slot> {
        let mut v: Vec<Slot> = self.w().db_prepared.iter().copied().collect();
        v.sort();
        v
    }

    /// The stored state, as the store holds it.
    pub fn stored_state(&self) -> Option<DeploymentState> {
        self.w().state.clone()
    }

    /// The stored lock.
    pub fn stored_lock(&self) -> Option<LockInfo> {
        self.w().lock.clone()
    }

    /// The version the data path serves: what a request through the switch would reach (the
    /// primary slot's running version).
    pub fn served_version(&self) -> Option<String> {
        let w = self.w();
        let slot = w.split.as_ref()?.primary();
        w.instances
            .get(slot)
            .as_ref()
            .filter(|i| i.state == InstanceState::Running)
            .map(|i| i.release.version.to_string())
    }
}

/// Applies scripted faults for `op` and counts the call.
async fn hit(world: &Arc<Mutex<World>>, backend: &str, op: Op) -> Result<()> {
    let fault = {
        let mut w = lock(world);
        let n = {
            let c = w.calls.entry(op.clone()).or_insert(0);
            *c += 1;
            *c
        };
        let crash = match w.crash.as_mut() {
            Some(c) if c.hit.is_none() && op != Op::StoreRenew => {
                c.seen += 1;
                if c.seen == c.at {
                    c.hit = Some((c.seen, op.clone()));
                    true
                } else {
                    false
                }
            }
            _ => false,
        };
        let idx = w
            .rules
            .iter()
            .position(|r| r.op == op && r.on_call.map(|k| k == n).unwrap_or(true));
        let scripted = idx.map(|i| {
            let r = w.rules[i].clone();
            if !r.persistent {
                w.rules.remove(i);
            }
            r.fault
        });
        if crash {
            Some(Fault::Hang)
        } else {
            scripted
        }
    };
    match fault {
        None => Ok(()),
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            Ok(())
        }
        Some(Fault::Hang) => {
            std::future::pending::<()>().await;
            Ok(())
        }
        Some(Fault::Fail { message, retryable }) => Err(Error::backend(
            backend,
            op.method(),
            retryable,
            format!("injected fault: {message}"),
        )),
    }
}

fn record(world: &Arc<Mutex<World>>, line: String) {
    lock(world).log.push(line);
}

fn check_live(w: &mut World, context: &str) {
    if let Some(split) = w.split.clone() {
        for slot in Slot::ALL {
            if split.weight(slot) > 0 {
                let up = w
                    .instances
                    .get(slot)
                    .as_ref()
                    .map(|i| i.state == InstanceState::Running)
                    .unwrap_or(false);
                if !up {
                    let msg =
                        format!("{context}: {split} sends traffic to {slot}, which is not running");
                    w.violations.push(msg);
                }
            }
        }
    }
}

// -------------------------------------------------------------------------------------------
/// In-memory [`Environment`]. Endpoints are `<slot>.fake:<port>`.
#[derive(Clone)]
pub struct FakeEnvironment {
    world: Arc<Mutex<World>>,
}

impl fmt::Debug for FakeEnvironment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FakeEnvironment")
    }
}

#[async_trait]
impl Environment for FakeEnvironment {
    fn name(&self) -> &str {
        "fake-environment"
    }

    async fn deploy(&self, slot: Slot, release: &Release) -> Result<Vec<Endpoint>> {
        hit(&self.world, self.name(), Op::EnvironmentDeploy).await?;
        record(
            &self.world,
            format!("environment.deploy {slot} {}", release.version),
        );
        let mut w = lock(&self.world);
        if let Some(i) = w.instances.get(slot) {
            if i.release == *release && i.state == InstanceState::Running {
                return Ok(i.endpoints.clone());
            }
        }
        w.next_port = w.next_port.wrapping_add(1).max(10_000);
        let ep = Endpoint::new(format!("{slot}.fake"), w.next_port);
        w.instances.set(
            slot,
            Some(Instance {
                release: release.clone(),
                state: InstanceState::Running,
                endpoints: vec![ep.clone()],
                env: release.full_env(),
                passed_health: false,
            }),
        );
        Ok(vec![ep])
    }

    async fn status(&self, slot: Slot) -> Result<SlotStatus> {
        hit(&self.world, self.name(), Op::EnvironmentStatus).await?;
        let w = lock(&self.world);
        Ok(match w.instances.get(slot) {
            None => SlotStatus::absent(),
            Some(i) => SlotStatus::new(
                i.state,
                Some(i.release.version.clone()),
                if i.state == InstanceState::Running {
                    i.endpoints.clone()
                } else {
                    Vec::new()
                },
            ),
        })
    }

    async fn stop(&self, slot: Slot, _drain: Duration) -> Result<()> {
        hit(&self.world, self.name(), Op::EnvironmentStop).await?;
        record(&self.world, format!("environment.stop {slot}"));
        let mut w = lock(&self.world);
        if let Some(i) = w.instances.get_mut(slot) {
            i.state = InstanceState::Stopped;
        }
        check_live(&mut w, &format!("stop({slot})"));
        Ok(())
    }

    async fn remove(&self, slot: Slot) -> Result<()> {
        hit(&self.world, self.name(), Op::EnvironmentRemove).await?;
        record(&self.world, format!("environment.remove {slot}"));
        let mut w = lock(&self.world);
        w.instances.set(slot, None);
        check_live(&mut w, &format!("remove({slot})"));
        Ok(())
    }

    async fn exec(&self, slot: Slot, argv: &[String]) -> Result<ExecOutput> {
        hit(&self.world, self.name(), Op::EnvironmentExec).await?;
        record(
            &self.world,
            format!("environment.exec {slot} {}", argv.join(" ")),
        );
        let up = lock(&self.world)
            .instances
            .get(slot)
            .as_ref()
            .map(|i| i.state == InstanceState::Running)
            .unwrap_or(false);
        if !up {
            return Err(Error::backend(
                self.name(),
                "exec",
                false,
                format!("slot {slot} is not running"),
            ));
        }
        Ok(ExecOutput {
            code: Some(0),
            stdout: argv.join(" "),
            stderr: String::new(),
        })
    }

    async fn logs(&self, slot: Slot, _since: Option<std::time::SystemTime>) -> Result<String> {
        Ok(format!("fake logs of {slot}\n"))
    }
}

// -------------------------------------------------------------------------------------------
/// In-memory [`TrafficSwitch`] that records every split it held ([`Fakes::timeline`]) and flags any
/// moment where traffic pointed at a slot that was not running ([`Fakes::violations`]).
#[derive(Clone)]
pub struct FakeSwitch {
    world: Arc<Mutex<World>>,
}

impl fmt::Debug for FakeSwitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FakeSwitch")
    }
}

#[async_trait]
impl TrafficSwitch for FakeSwitch {
    fn name(&self) -> &str {
        "fake-switch"
    }

    fn capabilities(&self) -> Capabilities {
        lock(&self.world).capabilities
    }

    async fn apply(&self, split: &TrafficSplit, endpoints: &Endpoints) -> Result<()> {
        self.check_split(split, endpoints)?;
        hit(&self.world, self.name(), Op::SwitchApply).await?;
        record(&self.world, format!("switch.apply {split}"));
        let mut w = lock(&self.world);
        let changed = w.split.as_ref() != Some(split);
        w.split = Some(split.clone());
        w.endpoints = endpoints.clone();
        if changed {
            w.timeline.push(TimelineEntry {
                at: Instant::now(),
                split: split.clone(),
            });
        }
        check_live(&mut w, &format!("apply({split})"));
        for slot in Slot::ALL {
            let unchecked = split.weight(slot) > 0
                && w.instances
                    .get(slot)
                    .as_ref()
                    .map(|i| i.state == InstanceState::Running && !i.passed_health)
                    .unwrap_or(false);
            if unchecked {
                let msg = format!("apply({split}): {slot} never passed a health check");
                w.unverified.push(msg);
            }
        }
        Ok(())
    }

    async fn current(&self) -> Result<Option<TrafficSplit>> {
        hit(&self.world, self.name(), Op::SwitchCurrent).await?;
        Ok(lock(&self.world).split.clone())
    }

    async fn preview(&self, slot: Option<Slot>, _endpoints: &Endpoints) -> Result<()> {
        if !self.capabilities().preview {
            return Err(Error::unsupported("preview", self.name()));
        }
        hit(&self.world, self.name(), Op::SwitchPreview).await?;
        record(&self.world, format!("switch.preview {slot:?}"));
        lock(&self.world).preview = slot;
        Ok(())
    }

    async fn in_flight(&self, slot: Slot) -> Result<u64> {
        if !self.capabilities().drain {
            return Err(Error::unsupported("in_flight", self.name()));
        }
        hit(&self.world, self.name(), Op::SwitchInFlight).await?;
        Ok(*lock(&self.world).in_flight.get(slot))
    }

    async fn metrics(&self, slot: Slot) -> Result<SlotMetrics> {
        if !self.capabilities().metrics {
            return Err(Error::unsupported("metrics", self.name()));
        }
        hit(&self.world, self.name(), Op::SwitchMetrics).await?;
        Ok(*lock(&self.world).metrics.get(slot))
    }

    async fn counters(&self) -> Result<SwitchCounters> {
        lock(&self.world)
            .counters
            .clone()
            .ok_or_else(|| Error::unsupported("counters", self.name()))
    }

    async fn long_lived(&self, slot: Slot) -> Result<u64> {
        if !self.capabilities().close_long_lived {
            return Err(Error::unsupported("long_lived", self.name()));
        }
        Ok(*lock(&self.world).long_lived.get(slot))
    }

    async fn close_long_lived(&self, slot: Slot) -> Result<u64> {
        if !self.capabilities().close_long_lived {
            return Err(Error::unsupported("close_long_lived", self.name()));
        }
        record(&self.world, format!("switch.close_long_lived {slot:?}"));
        let mut w = lock(&self.world);
        let n = *w.long_lived.get(slot);
        w.long_lived.set(slot, 0);
        let closed = *w.long_lived_closed.get(slot) + n;
        w.long_lived_closed.set(slot, closed);
        Ok(n)
    }

    async fn pause(&self) -> Result<()> {
        if !self.capabilities().pause {
            return Err(Error::unsupported("pause", self.name()));
        }
        hit(&self.world, self.name(), Op::SwitchPause).await?;
        record(&self.world, "switch.pause".into());
        lock(&self.world).paused = true;
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        if !self.capabilities().pause {
            return Err(Error::unsupported("resume", self.name()));
        }
        hit(&self.world, self.name(), Op::SwitchResume).await?;
        record(&self.world, "switch.resume".into());
        lock(&self.world).paused = false;
        Ok(())
    }
}

// -------------------------------------------------------------------------------------------
/// A [`HealthCheck`] answering from the world (see [`Fakes::set_unhealthy_version`]).
#[derive(Clone)]
pub struct FakeHealthCheck {
    world: Arc<Mutex<World>>,
}

impl fmt::Debug for FakeHealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FakeHealthCheck")
    }
}

#[async_trait]
impl HealthCheck for FakeHealthCheck {
    fn name(&self) -> &str {
        "fake-health"
    }

    async fn check(&self, endpoint: &Endpoint) -> Result<HealthReport> {
        hit(&self.world, self.name(), Op::HealthCheck).await?;
        let mut w = lock(&self.world);
        w.health_calls += 1;
        if w.health_calls <= w.healthy_after {
            return Ok(HealthReport::unhealthy(
                "not ready yet",
                Duration::from_millis(1),
            ));
        }
        let found = Slot::ALL.into_iter().find_map(|slot| {
            w.instances
                .get(slot)
                .as_ref()
                .filter(|i| i.endpoints.contains(endpoint))
                .map(|i| (slot, i.clone()))
        });
        let Some((slot, inst)) = found else {
            return Ok(HealthReport::unhealthy(
                format!("connection refused: nothing listens on {endpoint}"),
                Duration::from_millis(1),
            ));
        };
        if inst.state != InstanceState::Running {
            return Ok(HealthReport::unhealthy(
                format!("connection refused: {slot} is {:?}", inst.state),
                Duration::from_millis(1),
            ));
        }
        let v = inst.release.version.to_string();
        let live = w
            .split
            .as_ref()
            .map(|s| s.weight(slot) > 0)
            .unwrap_or(false);
        if w.unhealthy_versions.contains(&v) || (live && w.unhealthy_after_switch.contains(&v)) {
            return Ok(HealthReport::unhealthy(
                format!("GET /health on {endpoint}: 503 (version {v})"),
                Duration::from_millis(1),
            ));
        }
        if let Some(i) = w.instances.get_mut(slot) {
            i.passed_health = true;
        }
        Ok(HealthReport::healthy(Duration::from_millis(1)))
    }
}

// -------------------------------------------------------------------------------------------
/// In-memory [`DatabaseStrategy`]: records steps; binds `DATABASE_NAME=app_<slot>` and a secret
/// `DATABASE_PASSWORD`.
#[derive(Clone)]
pub struct FakeDatabase {
    world: Arc<Mutex<World>>,
}

impl fmt::Debug for FakeDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FakeDatabase")
    }
}

impl FakeDatabase {
    fn step(&self, ctx: &DbContext, what: &str) -> DbStep {
        let irreversible = lock(&self.world)
            .db_irreversible
            .contains(ctx.release.version.as_str());
        if irreversible {
            DbStep::irreversible(format!("{what} for {} (irreversible)", ctx.release.version))
        } else {
            DbStep::reversible(format!("{what} for {}", ctx.release.version))
        }
    }
}

impl FakeDatabase {
    /// What a slot's release gets: its database's name, and a password.
    fn binding(slot: Slot) -> DbBinding {
        DbBinding::none()
            .with_env("DATABASE_NAME", format!("app_{slot}"))
            .with_secret("DATABASE_PASSWORD", "fake-secret-password")
    }
}

#[async_trait]
impl DatabaseStrategy for FakeDatabase {
    fn name(&self) -> &str {
        "fake-database"
    }

    async fn prepare(&self, ctx: &DbContext) -> Result<Prepared> {
        hit(&self.world, self.name(), Op::DatabasePrepare).await?;
        record(&self.world, format!("database.prepare {}", ctx.target));
        lock(&self.world).db_prepared.insert(ctx.target);
        Ok(Prepared::new(
            Self::binding(ctx.target),
            DbStep::reversible("prepared"),
        ))
    }

    async fn bind(&self, ctx: &DbContext) -> Result<DbBinding> {
        hit(&self.world, self.name(), Op::DatabaseBind).await?;
        Ok(Self::binding(ctx.target))
    }

    async fn before_switch(&self, ctx: &DbContext) -> Result<DbStep> {
        hit(&self.world, self.name(), Op::DatabaseBeforeSwitch).await?;
        record(
            &self.world,
            format!("database.before_switch {}", ctx.target),
        );
        Ok(self.step(ctx, "before_switch"))
    }

    async fn after_switch(&self, ctx: &DbContext) -> Result<DbStep> {
        hit(&self.world, self.name(), Op::DatabaseAfterSwitch).await?;
        record(&self.world, format!("database.after_switch {}", ctx.target));
        Ok(self.step(ctx, "after_switch"))
    }

    async fn rollback(&self, ctx: &DbContext) -> Result<()> {
        hit(&self.world, self.name(), Op::DatabaseRollback).await?;
        record(&self.world, format!("database.rollback {}", ctx.target));
        lock(&self.world).db_prepared.remove(&ctx.target);
        Ok(())
    }

    async fn finalize(&self, ctx: &DbContext) -> Result<DbStep> {
        hit(&self.world, self.name(), Op::DatabaseFinalize).await?;
        record(&self.world, format!("database.finalize {}", ctx.target));
        Ok(DbStep::irreversible("dropped the old side's database"))
    }
}

// -------------------------------------------------------------------------------------------
/// A [`DataPathProbe`](crate::DataPathProbe) over the fake world (faults on [`Op::Probe`]).
#[derive(Clone)]
pub struct FakeProbe {
    world: Arc<Mutex<World>>,
}

impl fmt::Debug for FakeProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FakeProbe")
    }
}

#[async_trait]
impl crate::analysis::DataPathProbe for FakeProbe {
    fn name(&self) -> &str {
        "fake-probe"
    }

    async fn probe(&self, expected: &crate::Version) -> Result<crate::analysis::ProbeResult> {
        hit(&self.world, self.name(), Op::Probe).await?;
        let observed = Fakes {
            world: self.world.clone(),
        }
        .served_version()
        .unwrap_or_default();
        Ok(crate::analysis::ProbeResult {
            matched: observed == expected.as_str(),
            observed,
        })
    }
}

// -------------------------------------------------------------------------------------------
/// A [`Hook`] that records its runs; scripted with faults on [`Op::Hook`] (see [`FakeHook::op`]).
#[derive(Clone)]
pub struct FakeHook {
    name: String,
    world: Arc<Mutex<World>>,
}

impl FakeHook {
    /// The operation naming this hook's runs, for scripting faults and counting calls.
    pub fn op(&self) -> Op {
        Op::Hook(self.name.clone())
    }
}

impl fmt::Debug for FakeHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FakeHook({})", self.name)
    }
}

#[async_trait]
impl Hook for FakeHook {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&self, ctx: &HookContext) -> Result<()> {
        hit(&self.world, &self.name, Op::Hook(self.name.clone())).await?;
        record(
            &self.world,
            format!(
                "hook.{} {:?} {} {}",
                self.name, ctx.point, ctx.target, ctx.release.version
            ),
        );
        Ok(())
    }
}

// -------------------------------------------------------------------------------------------
/// In-memory [`StateStore`], shared by every clone. Faults on [`Op::StoreLoad`], [`Op::StoreSave`],
/// [`Op::StoreAcquire`], [`Op::StoreRenew`], [`Op::StoreRelease`].
#[derive(Clone, Default)]
pub struct MemoryStateStore {
    world: Arc<Mutex<World>>,
}

impl fmt::Debug for MemoryStateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MemoryStateStore")
    }
}

impl MemoryStateStore {
    /// An empty store of its own.
    pub fn new() -> Self {
        MemoryStateStore::default()
    }
}

#[async_trait]
impl StateStore for MemoryStateStore {
    fn name(&self) -> &str {
        "memory"
    }

    async fn load(&self) -> Result<Option<DeploymentState>> {
        hit(&self.world, self.name(), Op::StoreLoad).await?;
        Ok(lock(&self.world).state.clone())
    }

    async fn save(&self, state: &DeploymentState, lease: &Lease) -> Result<u64> {
        hit(&self.world, self.name(), Op::StoreSave).await?;
        let mut w = lock(&self.world);
        match &w.lock {
            Some(held) => held.check_held_by(lease, Timestamp::now())?,
            None => {
                return Err(Error::LockLost {
                    reason: "the lock was broken or released".into(),
                })
            }
        }
        let found = w.state.as_ref().map(|s| s.revision).unwrap_or(0);
        if found != state.revision {
            return Err(Error::Conflict {
                expected: state.revision,
                found,
            });
        }
        let mut s = state.clone();
        s.revision = found + 1;
        // Secrets never reach a store: the fake keeps what a serialized store would keep.
        for r in [&mut s.slots.blue, &mut s.slots.green]
            .into_iter()
            .flatten()
        {
            r.release.secret_env = BTreeMap::new();
        }
        if let Some(f) = s.in_flight.as_mut() {
            f.release.secret_env = BTreeMap::new();
        }
        w.state = Some(s);
        Ok(found + 1)
    }

    async fn acquire(&self, owner: &LockOwner, ttl: Duration) -> Result<Lease> {
        hit(&self.world, self.name(), Op::StoreAcquire).await?;
        let mut w = lock(&self.world);
        let now = Timestamp::now();
        if let Some(l) = &w.lock {
            if !l.expired_at(now) {
                return Err(Error::Locked {
                    holder: Box::new(l.clone()),
                });
            }
        }
        w.lock_epoch += 1;
        let lease = LockInfo {
            owner: owner.clone(),
            token: new_token(),
            since: now,
            expires: now.plus(ttl),
            epoch: w.lock_epoch,
        };
        w.lock = Some(lease.clone());
        Ok(lease)
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        hit(&self.world, self.name(), Op::StoreRenew).await?;
        let mut w = lock(&self.world);
        match &mut w.lock {
            Some(l) if l.token == lease.token => {
                l.expires = Timestamp::now().plus(ttl);
                Ok(l.clone())
            }
            Some(l) => Err(Error::LockLost {
                reason: format!("now held by {l}"),
            }),
            None => Err(Error::LockLost {
                reason: "the lock was broken or released".into(),
            }),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        hit(&self.world, self.name(), Op::StoreRelease).await?;
        let mut w = lock(&self.world);
        if w.lock
            .as_ref()
            .map(|l| l.token == lease.token)
            .unwrap_or(false)
        {
            w.lock = None;
        }
        Ok(())
    }

    async fn lock_info(&self) -> Result<Option<LockInfo>> {
        Ok(lock(&self.world).lock.clone())
    }

    async fn break_lock(&self) -> Result<Option<LockInfo>> {
        Ok(lock(&self.world).lock.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn faults_fire_once_on_the_scripted_call() {
        let f = Fakes::new();
        let env = f.environment();
        let r = Release::new("v1", "app").unwrap();
        f.fail_on_call(Op::EnvironmentDeploy, 2, "disk full");
        env.deploy(Slot::Blue, &r).await.unwrap();
        let err = env.deploy(Slot::Green, &r).await.unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        env.deploy(Slot::Green, &r).await.unwrap();
        assert_eq!(f.call_count(Op::EnvironmentDeploy), 3);
    }

    #[test]
    fn ops_keep_the_names_of_the_call_log() {
        assert_eq!(Op::EnvironmentDeploy.to_string(), "environment.deploy");
        assert_eq!(Op::SwitchInFlight.to_string(), "switch.in_flight");
        assert_eq!(Op::Probe.to_string(), "probe.probe");
        assert_eq!(Op::hook("smoke").to_string(), "hook.smoke");
        assert_eq!(Op::DatabaseBeforeSwitch.method(), "before_switch");
        assert_eq!(Fakes::new().hook("smoke").op(), Op::hook("smoke"));
    }

    #[test]
    #[should_panic(expected = "no hook named \"smok\"")]
    fn a_fault_on_a_hook_that_does_not_exist_is_refused() {
        let f = Fakes::new();
        let _ = f.hook("smoke");
        f.fail_next(Op::hook("smok"), "never fires");
    }

    #[tokio::test]
    async fn the_switch_flags_traffic_to_a_stopped_slot() {
        let f = Fakes::new();
        let env = f.environment();
        let sw = f.switch();
        let r = Release::new("v1", "app").unwrap();
        let eps = Endpoints::new(env.deploy(Slot::Blue, &r).await.unwrap(), vec![]);
        sw.apply(&TrafficSplit::all(Slot::Blue), &eps)
            .await
            .unwrap();
        assert!(f.violations().is_empty());
        env.stop(Slot::Blue, Duration::ZERO).await.unwrap();
        assert_eq!(f.violations().len(), 1, "{:?}", f.violations());
    }

    #[tokio::test]
    async fn memory_store_passes_the_state_store_suite() {
        let shared = MemoryStateStore::new();
        crate::testkit::state_store_suite(&move || Arc::new(shared.clone()) as Arc<dyn StateStore>)
            .await
            .assert_complete();
    }

    /// v1 running in both slots; their endpoints.
    async fn both_slots_running(f: &Fakes) -> Endpoints {
        let env = f.environment();
        let r = Release::new("v1", "app").unwrap();
        Endpoints::new(
            env.deploy(Slot::Blue, &r).await.unwrap(),
            env.deploy(Slot::Green, &r).await.unwrap(),
        )
    }

    #[tokio::test]
    async fn fake_switch_passes_the_switch_suite_directly_and_boxed() {
        let f = Fakes::new();
        let eps = both_slots_running(&f).await;
        let mut suite = crate::testkit::SwitchSuite::new(eps);
        let f2 = f.clone();
        suite.reopen = Some(Arc::new(move || {
            let s: Box<dyn TrafficSwitch> = Box::new(f2.switch());
            Box::pin(async move { s })
        }));
        let f3 = f.clone();
        suite.served_by = Some(Arc::new(move || {
            let live = f3.live();
            Box::pin(async move { live.ok_or_else(|| Error::invalid("split", "", "none")) })
        }));
        // Several endpoints per slot; the fake routes round robin over the live slot's.
        let at = |host: &str, port| Endpoint::new(host, port);
        suite.several = Some(Endpoints::new(
            vec![at("blue.fake", 1), at("blue.fake", 2), at("blue.fake", 3)],
            vec![at("green.fake", 1), at("green.fake", 2)],
        ));
        let (f4, turn) = (f.clone(), Arc::new(std::sync::atomic::AtomicUsize::new(0)));
        suite.answered_by = Some(Arc::new(move || {
            let (live, eps) = (f4.live(), f4.endpoints());
            let n = turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::pin(async move {
                let live = live.ok_or_else(|| Error::invalid("split", "", "none"))?;
                let eps = eps.get(live);
                Ok(eps[n % eps.len()].authority())
            })
        }));
        let report = crate::testkit::switch_suite(&f.switch(), &suite).await;
        report.assert_complete();
        assert!(
            report.has_run("switch_apply_is_idempotent: data path"),
            "{report}"
        );
        assert!(
            report.has_run("switch_routes_a_slot_to_several_endpoints: data path"),
            "{report}"
        );
        let boxed: Box<dyn TrafficSwitch> = Box::new(f.switch());
        crate::testkit::switch_suite(boxed.as_ref(), &suite)
            .await
            .assert_complete();

        // With fewer capabilities the suite checks the refusals instead.
        f.set_capabilities(Capabilities::basic());
        crate::testkit::switch_suite(&f.switch(), &suite)
            .await
            .assert_complete();
    }

    #[tokio::test]
    async fn a_suite_without_its_callbacks_reports_what_it_skipped() {
        let f = Fakes::new();
        let eps = both_slots_running(&f).await;
        let report =
            crate::testkit::switch_suite(&f.switch(), &crate::testkit::SwitchSuite::new(eps)).await;
        assert!(!report.is_complete());
        assert!(report.was_skipped("data path"), "{report}");
        assert!(
            report.was_skipped("switch_current_reads_the_proxy"),
            "{report}"
        );
        assert!(
            report
                .skipped()
                .iter()
                .all(|s| s.why.starts_with("no served_by")
                    || s.why.starts_with("no reopen")
                    || s.why.starts_with("no several-endpoint slots")),
            "{report}"
        );
        assert!(
            report.was_skipped("switch_routes_a_slot_to_several_endpoints"),
            "{report}"
        );
        // The checks that could run, ran.
        assert!(
            report.has_run("switch_apply_then_current_reads_back"),
            "{report}"
        );
        assert!(report.to_string().contains("skipped:"), "{report}");

        let report = crate::testkit::database_suite(
            &f.database(),
            &crate::testkit::DatabaseSuite {
                release: Release::new("v1", "app").unwrap(),
                live_intact: None,
            },
        )
        .await;
        assert!(report.was_skipped("live side intact"), "{report}");
    }

    /// A strategy that needs only `prepare` (e.g. one database reached under another name)
    /// writes only `name`, `prepare` and `bind`: the other steps are the trait's no-ops.
    #[derive(Debug)]
    struct OnlyPrepare;

    #[async_trait]
    impl DatabaseStrategy for OnlyPrepare {
        fn name(&self) -> &str {
            "only-prepare"
        }

        async fn prepare(&self, ctx: &DbContext) -> Result<Prepared> {
            Ok(Prepared::new(
                self.bind(ctx).await?,
                DbStep::reversible("nothing to copy"),
            ))
        }

        async fn bind(&self, _ctx: &DbContext) -> Result<DbBinding> {
            Ok(DbBinding::none().with_env("PGDATABASE", "app"))
        }
    }

    #[tokio::test]
    async fn a_strategy_with_only_name_and_prepare_passes_the_database_suite() {
        let db = OnlyPrepare;
        let ctx = DbContext {
            live: None,
            target: Slot::Blue,
            release: Release::new("v1", "app").unwrap(),
        };
        assert_eq!(
            db.before_switch(&ctx).await.unwrap(),
            DbStep::nothing_to_do()
        );
        assert_eq!(db.finalize(&ctx).await.unwrap(), DbStep::nothing_to_do());
        crate::testkit::database_suite(
            &db,
            &crate::testkit::DatabaseSuite {
                release: ctx.release.clone(),
                live_intact: Some(Arc::new(|_| Box::pin(async { true }))),
            },
        )
        .await
        .assert_complete();
    }

    #[test]
    #[should_panic(expected = "skipped checks")]
    fn assert_complete_names_what_was_skipped() {
        let mut r = crate::testkit::SuiteReport::default();
        r.record_skip("a check", "a reason");
        r.assert_complete();
    }

    #[tokio::test]
    async fn fake_environment_passes_the_environment_suite() {
        let f = Fakes::new();
        let suite = crate::testkit::EnvironmentSuite {
            release: Arc::new(|v| Release::new(v, "app").unwrap()),
            ready_timeout: Duration::from_secs(1),
            exec_argv: Some(vec!["migrate".into()]),
        };
        crate::testkit::environment_suite(&f.environment(), &suite)
            .await
            .assert_complete();
    }

    #[tokio::test]
    async fn fake_database_passes_the_database_suite() {
        let f = Fakes::new();
        let suite = crate::testkit::DatabaseSuite {
            release: Release::new("v1", "app").unwrap(),
            live_intact: Some(Arc::new(|_| Box::pin(async { true }))),
        };
        crate::testkit::database_suite(&f.database(), &suite)
            .await
            .assert_complete();
        assert_eq!(f.db_prepared(), vec![Slot::Blue]);
    }
}
