//! [`HaproxySwitch`]: a [`TrafficSwitch`] that drives a pool of servers per slot in one HAProxy
//! backend.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bluegreen_core::{
    ledger::SlotCounters, Capabilities, Endpoint, Endpoints, Error, Name, PerSlot, Result, Slot,
    SlotMetrics, SwitchCounters, TrafficSplit, TrafficSwitch, TrafficSwitchExt,
};
use tokio::sync::Mutex;

use crate::client::{AdminState, Command, RuntimeClient, ServerState, StatRow};
use crate::config::HaproxyConfig;
use crate::error::HaproxyError;
use crate::NAME;

/// Drives the blue and green server pools of one HAProxy backend through the runtime API.
///
/// Each slot has a pool of [`HaproxyConfig::pool_size`] servers (`blue`, `blue-2`, …); a slot
/// routed to `k` endpoints uses `k` of them and keeps the others in maintenance.
///
/// `apply` never leaves the backend without a server in rotation: a server gaining traffic is
/// moved to its endpoint (`set server … addr … port …`), health-checked while draining (no
/// traffic yet), weighted and set `ready`, and verified; only then does a server losing all its
/// traffic go to `drain`, wait until its current sessions (`scur`) reach 0 (bounded by the drain
/// timeout), and go to `maint`. The slot's weight is spread over its servers so that their sum is
/// the slot's share (canary splits are `set weight`). `current` reads `show servers state` back
/// and sums each pool. If a step fails, `apply` restores the previous state where it can and
/// reports which step failed and what HAProxy now says.
///
/// Clones share one lock, so concurrent `apply` calls on clones are serialized.
#[derive(Debug, Clone)]
pub struct HaproxySwitch {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: HaproxyConfig,
    client: RuntimeClient,
    backend: Name,
    pools: PerSlot<Vec<Name>>,
    lock: Mutex<()>,
}

/// Where a server should point.
type Target = (IpAddr, u16);

/// Each pool's servers, as HAProxy reports them, in pool order.
type Pools = PerSlot<Vec<ServerState>>;

/// What `apply` routes a slot to: its endpoints and each one's server weight.
type Plan = PerSlot<Vec<(Target, u16)>>;

/// The largest server weight HAProxy accepts.
const MAX_WEIGHT: u64 = 256;

/// A step failure before being wrapped with the step number and outcome.
struct StepError {
    command: String,
    source: HaproxyError,
}

fn at(command: impl Into<String>) -> impl FnOnce(HaproxyError) -> StepError {
    let command = command.into();
    move |source| StepError { command, source }
}

/// One step of an `apply`, on server `idx` of `slot`'s pool.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Into rotation at the target with the weight (health-checked first unless already in).
    In(Slot, usize, Target, u16),
    /// Out of rotation: drain, wait for its sessions, maint.
    Out(Slot, usize),
    /// A server in rotation that must point elsewhere: out, then in at the target.
    Move(Slot, usize, Target, u16),
}

impl HaproxySwitch {
    /// A switch with `config`. Every name is validated here, before anything is sent.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a backend or server name outside `[A-Za-z0-9._+-]` (so
    /// whitespace, `;`, newlines and control characters never reach HAProxy), equal or
    /// overlapping pools, a pool size out of range, or a zero timeout.
    pub fn new(config: HaproxyConfig) -> Result<Self> {
        let (backend, pools) = config.validated()?;
        let client = RuntimeClient::new(config.address.clone(), config.command_timeout);
        Ok(HaproxySwitch {
            inner: Arc::new(Inner {
                config,
                client,
                backend,
                pools,
                lock: Mutex::new(()),
            }),
        })
    }

    /// The settings.
    pub fn config(&self) -> &HaproxyConfig {
        &self.inner.config
    }

    /// The runtime API client this switch uses.
    pub fn client(&self) -> &RuntimeClient {
        &self.inner.client
    }

    /// The first server of each slot's pool (the server named `blue_server` / `green_server`)
    /// as HAProxy reports it now. [`pool_servers`](Self::pool_servers) has every server.
    ///
    /// # Errors
    /// The runtime API cannot be reached, or the backend or a server of a pool does not exist
    /// ([`HaproxyError::NoSuchBackend`] / [`HaproxyError::NoSuchServer`] inside
    /// [`Error::Backend`]).
    pub async fn servers(&self) -> Result<PerSlot<ServerState>> {
        let pools = self.pool_servers().await?;
        Ok(PerSlot::new(pools.blue[0].clone(), pools.green[0].clone()))
    }

    /// Every server of both pools as HAProxy reports them now, in pool order
    /// ([`HaproxyConfig::pool`]).
    ///
    /// # Errors
    /// As [`servers`](Self::servers).
    pub async fn pool_servers(&self) -> Result<PerSlot<Vec<ServerState>>> {
        self.read_servers()
            .await
            .map_err(|e| e.into_core("read server state"))
    }

    /// Writes `show servers state` (all backends) to `path` atomically (temp file, fsync,
    /// rename), in the format `server-state-file` reads: run it just before reloading HAProxy
    /// so the reloaded process keeps the addresses, weights and states set at runtime.
    ///
    /// # Errors
    /// The runtime API cannot be reached, or the file cannot be written.
    pub async fn save_server_state(&self, path: &Path) -> Result<()> {
        let answer = self
            .inner
            .client
            .send(&Command::show_all_servers_state())
            .await
            .map_err(|e| e.into_core("save server state"))?;
        let mut text = answer.trim_end().to_string();
        text.push('\n');
        let tmp = path.with_extension("bluegreen-tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    fn server(&self, slot: Slot, idx: usize) -> &Name {
        &self.inner.pools.get(slot)[idx]
    }

    async fn read_servers(&self) -> std::result::Result<Pools, HaproxyError> {
        let rows = self.inner.client.servers_state(&self.inner.backend).await?;
        let name = |r: &ServerState| r.name.clone();
        Ok(PerSlot::new(
            self.pool_rows(Slot::Blue, &rows, name)?,
            self.pool_rows(Slot::Green, &rows, name)?,
        ))
    }

    /// The rows of `slot`'s pool, in pool order, from rows named by `name`.
    fn pool_rows<T: Clone>(
        &self,
        slot: Slot,
        rows: &[T],
        name: impl Fn(&T) -> String,
    ) -> std::result::Result<Vec<T>, HaproxyError> {
        self.inner
            .pools
            .get(slot)
            .iter()
            .map(|server| {
                rows.iter()
                    .find(|r| name(r) == server.as_str())
                    .cloned()
                    .ok_or_else(|| HaproxyError::NoSuchServer {
                        backend: self.inner.backend.to_string(),
                        server: self.missing(server),
                    })
            })
            .collect()
    }

    /// The name of a server HAProxy lacks, with what to do when it is a pool's extra server.
    fn missing(&self, name: &Name) -> String {
        let first = |s: Slot| &self.inner.pools.get(s)[0];
        if name == first(Slot::Blue) || name == first(Slot::Green) {
            return name.to_string();
        }
        format!(
            "{name} (pool_size is {n}: haproxy.cfg needs {n} servers per slot, as \
             HaproxyConfig::render_backend renders them, or set pool_size to the servers it has)",
            n = self.inner.config.pool_size
        )
    }

    async fn run(&self, command: Command) -> std::result::Result<(), StepError> {
        let line = command.line().to_string();
        self.inner
            .client
            .send(&command)
            .await
            .map(|_| ())
            .map_err(at(line))
    }

    async fn stat_rows(&self, slot: Slot) -> std::result::Result<Vec<StatRow>, HaproxyError> {
        let rows = self.inner.client.server_stats(&self.inner.backend).await?;
        self.pool_rows(slot, &rows, |r| r.server().to_string())
    }

    /// The current sessions (`scur`) of all of `slot`'s servers.
    async fn pool_sessions(&self, slot: Slot) -> std::result::Result<u64, HaproxyError> {
        let rows = self.stat_rows(slot).await?;
        Ok(rows.iter().map(StatRow::current_sessions).sum())
    }

    async fn sessions(&self, slot: Slot, idx: usize) -> std::result::Result<u64, HaproxyError> {
        let rows = self.inner.client.server_stats(&self.inner.backend).await?;
        let name = self.server(slot, idx).as_str();
        rows.iter()
            .find(|r| r.server() == name)
            .map(|r| r.current_sessions())
            .ok_or_else(|| HaproxyError::NoSuchServer {
                backend: self.inner.backend.to_string(),
                server: name.to_string(),
            })
    }

    /// Checks the input, resolves each endpoint to the address HAProxy needs and gives each its
    /// server weight. Refuses, before anything is sent, more endpoints than a pool has servers.
    async fn plan(&self, split: &TrafficSplit, endpoints: &Endpoints) -> Result<Plan> {
        self.check_split(split, endpoints)?;
        let pool = self.inner.config.pool_size;
        let mut out = PerSlot::new(Vec::new(), Vec::new());
        for slot in Slot::ALL {
            let eps = endpoints.get(slot);
            if eps.len() > pool {
                return Err(Error::invalid(
                    "endpoints",
                    format!("{} endpoints for {slot}", eps.len()),
                    format!(
                        "the HAProxy switch has a pool of {pool} servers per slot (pool_size); \
                         raise pool_size to at least {} and render haproxy.cfg's backend again \
                         (HaproxyConfig::render_backend) so it has the servers",
                        eps.len()
                    ),
                ));
            }
            let mut targets = Vec::with_capacity(eps.len());
            for e in eps {
                if e.scheme != "http" {
                    return Err(Error::invalid(
                        "endpoint scheme",
                        e.scheme.as_str(),
                        "the rendered backend speaks plain http to its servers; add `ssl` to \
                         the server lines yourself for https",
                    ));
                }
                targets.push(resolve(e).await?);
            }
            out.set(slot, targets);
        }
        let counts = PerSlot::new(out.blue.len(), out.green.len());
        let weights = server_weights(split, &counts).ok_or_else(|| {
            Error::invalid(
                "traffic split",
                split.to_string(),
                format!(
                    "with {} blue and {} green endpoints this split cannot be expressed in \
                     HAProxy server weights (1 to 256 per server); use fewer endpoints on the \
                     small side or a less extreme split",
                    counts.blue, counts.green
                ),
            )
        })?;
        Ok(PerSlot::new(
            out.blue.into_iter().zip(weights.blue).collect(),
            out.green.into_iter().zip(weights.green).collect(),
        ))
    }

    /// Brings server `idx` of `slot` into rotation at `target` with `weight`, health-checked
    /// first.
    async fn bring_in(
        &self,
        slot: Slot,
        idx: usize,
        before: &ServerState,
        target: Target,
        weight: u16,
    ) -> std::result::Result<(), StepError> {
        let (backend, server) = (&self.inner.backend, self.server(slot, idx));
        let moves = before.addr != Some(target.0) || before.port != target.1;
        if before.in_rotation() && !moves {
            if before.weight != weight {
                self.run(Command::set_weight(backend, server, weight))
                    .await?;
            }
            return Ok(());
        }
        if moves {
            if !before.is_maint() && !before.in_rotation() {
                // Draining at another address: stop it so the checks restart on the new one.
                self.run(Command::set_state(backend, server, AdminState::Maint))
                    .await?;
            }
            self.run(Command::set_addr(backend, server, target.0, target.1))
                .await?;
        }
        let now = self
            .read_servers()
            .await
            .map_err(at("show servers state"))?;
        let now = &now.get(slot)[idx];
        if now.is_maint() {
            // Out of maintenance but not yet in rotation: health checks start afresh.
            self.run(Command::set_state(backend, server, AdminState::Drain))
                .await?;
        }
        if !now.in_rotation() {
            if now.has_check() {
                // HAProxy keeps the last check result through maintenance and an address change,
                // and assumes a server leaving maintenance is up: without this, a stale "passed"
                // would let a dead endpoint into rotation. Now `rise` fresh checks must pass.
                self.run(Command::set_health_down(backend, server)).await?;
            }
            self.wait_healthy(slot, idx, target).await?;
        }
        self.run(Command::set_weight(backend, server, weight))
            .await?;
        self.run(Command::set_state(backend, server, AdminState::Ready))
            .await?;
        let after = self
            .read_servers()
            .await
            .map_err(at("verify with show servers state"))?;
        let s = &after.get(slot)[idx];
        if !s.in_rotation()
            || s.op_state != crate::client::OpState::Running
            || s.weight != weight
            || s.addr != Some(target.0)
            || s.port != target.1
        {
            return Err(StepError {
                command: "verify with show servers state".into(),
                source: HaproxyError::Verify {
                    detail: format!(
                        "{backend}/{server} should be ready with weight {weight} at {}, \
                         HAProxy reports {}",
                        SocketAddr::new(target.0, target.1),
                        s.summary()
                    ),
                },
            });
        }
        Ok(())
    }

    async fn wait_healthy(
        &self,
        slot: Slot,
        idx: usize,
        target: Target,
    ) -> std::result::Result<(), StepError> {
        let c = &self.inner.config;
        let start = Instant::now();
        loop {
            let now = self
                .read_servers()
                .await
                .map_err(at("wait for the health check"))?;
            let s = &now.get(slot)[idx];
            if s.is_healthy() {
                return Ok(());
            }
            if start.elapsed() >= c.ready_timeout {
                return Err(StepError {
                    command: "wait for the health check".into(),
                    source: HaproxyError::NotReady {
                        backend: self.inner.backend.to_string(),
                        server: self.server(slot, idx).to_string(),
                        endpoint: SocketAddr::new(target.0, target.1).to_string(),
                        after: c.ready_timeout,
                        last: s.summary(),
                    },
                });
            }
            tokio::time::sleep(c.poll_interval).await;
        }
    }

    /// Takes server `idx` of `slot` out of rotation: drain, wait for its sessions, maint.
    async fn take_out(
        &self,
        slot: Slot,
        idx: usize,
        before: &ServerState,
    ) -> std::result::Result<(), StepError> {
        let (backend, server) = (&self.inner.backend, self.server(slot, idx));
        if before.is_maint() {
            return Ok(());
        }
        if !before.is_drain() {
            self.run(Command::set_state(backend, server, AdminState::Drain))
                .await?;
        }
        let c = &self.inner.config;
        let start = Instant::now();
        loop {
            let n = self
                .sessions(slot, idx)
                .await
                .map_err(at("wait for sessions to drain (show stat)"))?;
            if n == 0 {
                break;
            }
            if start.elapsed() >= c.drain_timeout {
                tracing::warn!(
                    backend = %backend, server = %server, sessions = n,
                    "drain timeout reached; putting the server into maintenance anyway"
                );
                break;
            }
            tokio::time::sleep(c.poll_interval).await;
        }
        self.run(Command::set_state(backend, server, AdminState::Maint))
            .await
    }

    /// Moves server `idx` of `slot`, in rotation at another address, to `target`: out of
    /// rotation first while another server serves, so the new address is health-checked before
    /// it gets traffic; in place (as a one-server backend must) when it is the only one.
    async fn move_server(
        &self,
        slot: Slot,
        idx: usize,
        target: Target,
        weight: u16,
    ) -> std::result::Result<(), StepError> {
        let now = self
            .read_servers()
            .await
            .map_err(at("show servers state"))?;
        let others_serve = Slot::ALL.iter().any(|s| {
            now.get(*s)
                .iter()
                .enumerate()
                .any(|(i, st)| (*s, i) != (slot, idx) && st.in_rotation())
        });
        if others_serve {
            self.take_out(slot, idx, &now.get(slot)[idx]).await?;
            let now = self
                .read_servers()
                .await
                .map_err(at("show servers state"))?;
            self.bring_in(slot, idx, &now.get(slot)[idx], target, weight)
                .await
        } else {
            self.bring_in(slot, idx, &now.get(slot)[idx], target, weight)
                .await
        }
    }

    /// Puts every server back as it was (`before`), never leaving none in rotation: servers
    /// that were in rotation come back first.
    async fn restore(&self, before: &Pools) -> std::result::Result<(), HaproxyError> {
        let (backend, now) = (&self.inner.backend, self.read_servers().await?);
        let mut order: Vec<(Slot, usize)> = Slot::ALL
            .iter()
            .flat_map(|s| (0..before.get(*s).len()).map(move |i| (*s, i)))
            .collect();
        order.sort_by_key(|(s, i)| !before.get(*s)[*i].in_rotation());
        for (slot, idx) in order {
            let (was, is) = (&before.get(slot)[idx], &now.get(slot)[idx]);
            let server = self.server(slot, idx);
            let send = |c: Command| async move { self.inner.client.send(&c).await.map(|_| ()) };
            if was.in_rotation() {
                if let Some(addr) = was.addr {
                    if is.addr != was.addr || is.port != was.port {
                        send(Command::set_addr(backend, server, addr, was.port)).await?;
                    }
                }
                if is.weight != was.weight {
                    send(Command::set_weight(backend, server, was.weight)).await?;
                }
                if !is.in_rotation() {
                    send(Command::set_state(backend, server, AdminState::Ready)).await?;
                }
            } else if was.is_maint() && !is.is_maint() {
                send(Command::set_state(backend, server, AdminState::Maint)).await?;
            } else if was.is_drain() && is.in_rotation() {
                send(Command::set_state(backend, server, AdminState::Drain)).await?;
            }
        }
        Ok(())
    }

    /// Every server that is not idle in maintenance, or the first of each pool.
    fn describe(&self, s: &Pools) -> String {
        let mut parts = Vec::new();
        for slot in Slot::ALL {
            for (i, st) in s.get(slot).iter().enumerate() {
                if i == 0 || !st.is_maint() {
                    parts.push(format!("{}: {}", self.server(slot, i), st.summary()));
                }
            }
        }
        parts.join("; ")
    }

    /// The steps of an `apply`: servers gaining weight first, then those keeping some, then
    /// those losing all, so that at no point is the backend left without a server in rotation.
    /// Within a slot: its new servers in, then servers in rotation that must move, then its
    /// spare servers out.
    fn steps(&self, split: &TrafficSplit, plan: &Plan, before: &Pools) -> Vec<Step> {
        let current = split_of(before);
        let mut order: Vec<Slot> = Slot::ALL.to_vec();
        order.sort_by_key(|s| {
            let (w, cur) = (
                split.weight(*s),
                current.as_ref().map_or(0, |c| c.weight(*s)),
            );
            if w == 0 {
                2
            } else if w >= cur {
                0
            } else {
                1
            }
        });
        let mut steps = Vec::new();
        for slot in order {
            let servers = before.get(slot);
            let targets = if split.weight(slot) == 0 {
                &[][..]
            } else {
                &plan.get(slot)[..]
            };
            let assigned = assign(servers, targets);
            let mut moves = Vec::new();
            for (idx, a) in assigned.iter().enumerate() {
                let Some(t) = a else { continue };
                let (target, weight) = targets[*t];
                let s = &servers[idx];
                let at_target = s.addr == Some(target.0) && s.port == target.1;
                if s.in_rotation() && !at_target {
                    moves.push(Step::Move(slot, idx, target, weight));
                } else {
                    steps.push(Step::In(slot, idx, target, weight));
                }
            }
            steps.extend(moves);
            for (idx, a) in assigned.iter().enumerate() {
                if a.is_none() && !servers[idx].is_maint() {
                    steps.push(Step::Out(slot, idx));
                }
            }
        }
        steps
    }

    async fn apply_locked(
        &self,
        split: &TrafficSplit,
        plan: &Plan,
    ) -> std::result::Result<(), HaproxyError> {
        let before = self.read_servers().await?;
        let steps = self.steps(split, plan, &before);
        let total = steps.len() + 1;
        for (i, step) in steps.iter().copied().enumerate() {
            let res = match step {
                Step::In(slot, idx, target, weight) => {
                    self.bring_in(slot, idx, &before.get(slot)[idx], target, weight)
                        .await
                }
                Step::Out(slot, idx) => self.take_out(slot, idx, &before.get(slot)[idx]).await,
                Step::Move(slot, idx, target, weight) => {
                    self.move_server(slot, idx, target, weight).await
                }
            };
            if let Err(e) = res {
                return Err(self.failed(split, i + 1, total, e, &before).await);
            }
        }
        let now = self
            .read_servers()
            .await
            .map_err(|e| e.to_string())
            .and_then(|s| {
                let got = split_of(&s);
                match &got {
                    Some(g) if g.same_weights(split) => Ok(()),
                    _ => Err(format!(
                        "applied {split}, HAProxy reports {} ({})",
                        got.map(|g| g.to_string())
                            .unwrap_or_else(|| "no server in rotation".into()),
                        self.describe(&s)
                    )),
                }
            });
        if let Err(detail) = now {
            let e = StepError {
                command: "verify the split with show servers state".into(),
                source: HaproxyError::Verify { detail },
            };
            return Err(self.failed(split, total, total, e, &before).await);
        }
        Ok(())
    }

    async fn failed(
        &self,
        split: &TrafficSplit,
        step: usize,
        total: usize,
        e: StepError,
        before: &Pools,
    ) -> HaproxyError {
        let outcome = match self.restore(before).await {
            Ok(()) => match self.read_servers().await {
                Ok(now) => format!(
                    "restored the previous state; HAProxy now reports {}",
                    self.describe(&now)
                ),
                Err(read) => {
                    format!("restored the previous state, but reading it back failed ({read})")
                }
            },
            Err(restore) => format!(
                "restoring the previous state failed ({restore}); the switch order keeps at least \
                 one server in rotation, last known state before the switch: {}",
                self.describe(before)
            ),
        };
        HaproxyError::SwitchFailed {
            target: split.to_string(),
            step: format!("{step}/{total}"),
            command: e.command,
            source: Box::new(e.source),
            outcome,
        }
    }
}

/// Which target each server of a pool gets (`None`: none, it goes out). A server already at a
/// target's address keeps it (in rotation first), so unchanged endpoints are not touched; the
/// other targets go to servers out of rotation first, so they are health-checked before they get
/// traffic.
fn assign(servers: &[ServerState], targets: &[(Target, u16)]) -> Vec<Option<usize>> {
    let mut assigned: Vec<Option<usize>> = vec![None; servers.len()];
    let mut placed = vec![false; targets.len()];
    let at = |s: &ServerState, t: &Target| s.addr == Some(t.0) && s.port == t.1;
    type Fits = fn(&ServerState, bool) -> bool;
    let passes: [Fits; 4] = [
        |s, at| at && s.in_rotation(),
        |_, at| at,
        |s, _| !s.in_rotation(),
        |_, _| true,
    ];
    for fits in passes {
        for (t, (target, _)) in targets.iter().enumerate() {
            if placed[t] {
                continue;
            }
            let free = (0..servers.len())
                .find(|i| assigned[*i].is_none() && fits(&servers[*i], at(&servers[*i], target)));
            if let Some(i) = free {
                assigned[i] = Some(t);
                placed[t] = true;
            }
        }
    }
    assigned
}

/// Server weights per slot whose sums are exactly proportional to the split (so `current` reads
/// the split back), spread as evenly as possible over a slot's `counts` servers: each slot's sum
/// is its percentage times the smallest factor that gives every server at least 1. `None` when a
/// server would need more than HAProxy's 256.
fn server_weights(split: &TrafficSplit, counts: &PerSlot<usize>) -> Option<PerSlot<Vec<u16>>> {
    let factor = Slot::ALL
        .iter()
        .filter(|s| split.weight(**s) > 0 && *counts.get(**s) > 0)
        .map(|s| (*counts.get(*s) as u64).div_ceil(u64::from(split.weight(*s))))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut out = PerSlot::new(Vec::new(), Vec::new());
    for slot in Slot::ALL {
        let (k, w) = (*counts.get(slot) as u64, u64::from(split.weight(slot)));
        if k == 0 {
            continue;
        }
        let total = w * factor;
        let weights: Vec<u16> = (0..k)
            .map(|i| total / k + u64::from(i < total % k))
            .map(|x| {
                u16::try_from(x)
                    .ok()
                    .filter(|x| u64::from(*x) <= MAX_WEIGHT)
            })
            .collect::<Option<_>>()?;
        out.set(slot, weights);
    }
    Some(out)
}

/// The split HAProxy balances with: each pool's summed effective weights as percentages; `None`
/// with no server in rotation.
fn split_of(s: &Pools) -> Option<TrafficSplit> {
    let sum =
        |v: &[ServerState]| -> u32 { v.iter().map(|x| u32::from(x.effective_weight())).sum() };
    let (b, g) = (sum(&s.blue), sum(&s.green));
    if b + g == 0 {
        return None;
    }
    let blue = ((b * 100 + (b + g) / 2) / (b + g)) as u8;
    TrafficSplit::new(blue, 100 - blue).ok()
}

async fn resolve(e: &Endpoint) -> Result<Target> {
    let host = e.host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((ip, e.port));
    }
    // The runtime API takes IP addresses only (`set server … fqdn` needs resolvers).
    let mut addrs = tokio::net::lookup_host((host, e.port))
        .await
        .map_err(|err| Error::io(format!("resolving endpoint host {host}"), err))?;
    addrs
        .next()
        .map(|a| (a.ip(), e.port))
        .ok_or_else(|| Error::invalid("endpoint host", host, "resolves to no address"))
}

#[async_trait]
impl TrafficSwitch for HaproxySwitch {
    fn name(&self) -> &str {
        NAME
    }

    /// Weights (`set weight`), real in-flight counts (`scur`), per-server metrics (`show
    /// stat`) and closing the sessions left on a server after its drain (`shutdown sessions
    /// server`); no sticky sessions, preview or pause.
    fn capabilities(&self) -> Capabilities {
        Capabilities::basic()
            .with_weights(true)
            .with_drain(true)
            .with_metrics(true)
            .with_close_long_lived(true)
    }

    async fn apply(&self, split: &TrafficSplit, endpoints: &Endpoints) -> Result<()> {
        let plan = self.plan(split, endpoints).await?;
        let _guard = self.inner.lock.lock().await;
        self.apply_locked(split, &plan)
            .await
            .map_err(|e| e.into_core("apply"))
    }

    async fn current(&self) -> Result<Option<TrafficSplit>> {
        Ok(split_of(&self.pool_servers().await?))
    }

    /// The current sessions (`scur`) of every server of the slot's pool.
    async fn in_flight(&self, slot: Slot) -> Result<u64> {
        self.pool_sessions(slot)
            .await
            .map_err(|e| e.into_core("in_flight"))
    }

    /// The sessions still on the slot's servers (`scur`, summed over its pool): HAProxy does
    /// not tell a WebSocket from a slow request, so this is the same count as `in_flight`.
    async fn long_lived(&self, slot: Slot) -> Result<u64> {
        self.pool_sessions(slot)
            .await
            .map_err(|e| e.into_core("long_lived"))
    }

    /// `shutdown sessions server <backend>/<server>` for each of the slot's servers that has
    /// sessions, then waits (about 2 s at most) until their `scur` reaches 0; returns how many
    /// sessions they had. HAProxy closes them at the TCP level: a WebSocket client sees its
    /// connection end, not a close frame, and reconnects to the live slot.
    async fn close_long_lived(&self, slot: Slot) -> Result<u64> {
        let core = |e: HaproxyError| e.into_core("close_long_lived");
        // One `show stat` for the whole pool; its rows come in pool order.
        let rows = self.stat_rows(slot).await.map_err(core)?;
        let mut open = 0;
        for (idx, row) in rows.iter().enumerate() {
            let n = row.current_sessions();
            if n == 0 {
                continue;
            }
            open += n;
            let server = self.server(slot, idx).clone();
            self.inner
                .client
                .send(&Command::shutdown_sessions(&self.inner.backend, &server))
                .await
                .map_err(core)?;
        }
        if open == 0 {
            return Ok(0);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.pool_sessions(slot).await.map_err(core)? > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(self.inner.config.poll_interval).await;
        }
        Ok(open)
    }

    /// The slot's servers' counters from `show stat`, summed over its pool: responses
    /// (`hrsp_*`), 5xx (`hrsp_5xx`), connection and response errors (`econ` + `eresp`). HAProxy
    /// keeps no latency percentiles: `p50` is the largest of the servers' average response times
    /// over their last 1024 requests (`rtime`) and `p99` the largest response time any of them
    /// has seen (`rtime_max`), a conservative bound. The counters are cumulative; analyses
    /// compare them with a baseline taken when observation starts.
    async fn metrics(&self, slot: Slot) -> Result<SlotMetrics> {
        let rows = self
            .stat_rows(slot)
            .await
            .map_err(|e| e.into_core("metrics"))?;
        Ok(metrics_of(&rows))
    }

    /// The traffic ledger's counters from the servers' rows of `show stat`, summed over each
    /// slot's pool: responses per slot
    /// (`hrsp_*`) and the application's 5xx (`hrsp_5xx`). HAProxy's retries and redispatch hide
    /// which connection errors reached a client, it keeps no latency histogram, and the errors
    /// it writes itself are not on the server rows: refused, timeouts, the switch's own 5xx,
    /// buffered requests and latency are `None` ("not measured"), never 0. Long-lived
    /// connections closed gracefully are `None` too: [`close_long_lived`] cuts sessions at the
    /// TCP level (no WebSocket close frame, no GOAWAY), and its count is every session the
    /// servers had (`scur`), slow requests included, so none of it is a graceful close.
    ///
    /// [`close_long_lived`]: TrafficSwitch::close_long_lived
    async fn counters(&self) -> Result<SwitchCounters> {
        let rows = self
            .inner
            .client
            .server_stats(&self.inner.backend)
            .await
            .map_err(|e| e.into_core("counters"))?;
        let slot = |slot: Slot| -> Result<SlotCounters> {
            let pool = self
                .pool_rows(slot, &rows, |r| r.server().to_string())
                .map_err(|e| e.into_core("counters"))?;
            let m = metrics_of(&pool);
            Ok(SlotCounters::new(m.requests).with_app_5xx(m.errors_5xx))
        };
        Ok(SwitchCounters::new(slot(Slot::Blue)?, slot(Slot::Green)?))
    }
}

/// [`SlotMetrics`] from the server rows of one pool in `show stat`.
fn metrics_of(rows: &[StatRow]) -> SlotMetrics {
    let n = |row: &StatRow, f: &str| row.get(f).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let sum = |f: &str| rows.iter().map(|r| n(r, f)).sum::<u64>();
    let max = |f: &str| rows.iter().map(|r| n(r, f)).max().unwrap_or(0);
    let requests = [
        "hrsp_1xx",
        "hrsp_2xx",
        "hrsp_3xx",
        "hrsp_4xx",
        "hrsp_5xx",
        "hrsp_other",
    ]
    .iter()
    .map(|f| sum(f))
    .sum();
    SlotMetrics::new(
        requests,
        sum("hrsp_5xx"),
        sum("econ") + sum("eresp"),
        Duration::from_millis(max("rtime")),
        Duration::from_millis(max("rtime_max").max(max("rtime"))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::parse_servers_state;

    fn rows(lines: &[&str]) -> Vec<ServerState> {
        let mut text = "1\n# be_name srv_name srv_addr srv_port srv_op_state srv_admin_state srv_uweight srv_check_state srv_check_result\n".to_string();
        for (i, l) in lines.iter().enumerate() {
            text.push_str(&format!("app s{i} {l}\n"));
        }
        parse_servers_state("t", &text).unwrap()
    }

    fn state(blue: &str, green: &str) -> Pools {
        PerSlot::new(rows(&[blue]), rows(&[green]))
    }

    #[test]
    fn split_is_read_from_admin_state_and_weights() {
        let s = state("127.0.0.1 80 2 0 100 6 3", "127.0.0.1 81 0 5 100 14 1");
        assert_eq!(split_of(&s), Some(TrafficSplit::all(Slot::Blue)));
        let s = state("127.0.0.1 80 2 0 90 6 3", "127.0.0.1 81 2 4 10 6 3");
        assert_eq!(split_of(&s), TrafficSplit::new(90, 10).ok());
        // Draining counts as out of rotation.
        let s = state("127.0.0.1 80 2 8 100 6 3", "127.0.0.1 81 2 4 100 6 3");
        assert_eq!(split_of(&s), Some(TrafficSplit::all(Slot::Green)));
        // Both in maintenance: nothing applied.
        let s = state("- 1 0 5 1 14 0", "- 1 0 5 1 14 0");
        assert_eq!(split_of(&s), None);
        // Weights that are not percentages are rounded into one.
        let s = state("127.0.0.1 80 2 0 1 6 3", "127.0.0.1 81 2 0 2 6 3");
        assert_eq!(split_of(&s), TrafficSplit::new(33, 67).ok());
    }

    #[test]
    fn a_pool_is_summed_and_spare_servers_in_maintenance_do_not_count() {
        let blue = rows(&[
            "127.0.0.1 80 2 0 34 6 3",
            "127.0.0.1 81 2 0 33 6 3",
            "127.0.0.1 82 2 0 33 6 3",
            "- 1 0 5 100 14 0",
        ]);
        let green = rows(&["127.0.0.1 90 0 5 50 14 0", "127.0.0.1 91 0 5 50 14 0"]);
        let s = PerSlot::new(blue.clone(), green);
        assert_eq!(split_of(&s), Some(TrafficSplit::all(Slot::Blue)));
        let green = rows(&["127.0.0.1 90 2 0 6 6 3", "127.0.0.1 91 2 0 5 6 3"]);
        let blue = rows(&[
            "127.0.0.1 80 2 0 34 6 3",
            "127.0.0.1 81 2 0 33 6 3",
            "127.0.0.1 82 2 0 32 6 3",
        ]);
        assert_eq!(
            split_of(&PerSlot::new(blue, green)),
            TrafficSplit::new(90, 10).ok()
        );
    }

    #[test]
    fn server_weights_sum_exactly_to_the_split_and_stay_in_range() {
        let counts = |b, g| PerSlot::new(b, g);
        let w = server_weights(&TrafficSplit::all(Slot::Blue), &counts(1, 1)).unwrap();
        // One server per slot: the percentages, as before pools existed.
        assert_eq!(w.blue, vec![100]);
        assert_eq!(w.green, vec![0]);
        let w = server_weights(&TrafficSplit::new(90, 10).unwrap(), &counts(3, 2)).unwrap();
        assert_eq!(w.blue, vec![30, 30, 30]);
        assert_eq!(w.green, vec![5, 5]);
        // Every split a canary can ask for, with up to 4 servers a side: the sums read back as
        // the split, every weighted server gets at least 1.
        for b in 1..=4usize {
            for g in 1..=4usize {
                for blue in 0..=100u8 {
                    let split = TrafficSplit::new(blue, 100 - blue).unwrap();
                    let Some(w) = server_weights(&split, &counts(b, g)) else {
                        // Only extreme splits over uneven pools may not fit.
                        assert!(!(4..=96).contains(&blue), "{split} over {b}/{g}");
                        continue;
                    };
                    for slot in Slot::ALL {
                        let ws = w.get(slot);
                        assert_eq!(ws.len(), *counts(b, g).get(slot));
                        assert!(ws.iter().all(|x| *x <= 256));
                        if split.weight(slot) > 0 {
                            assert!(ws.iter().all(|x| *x >= 1), "{split} {b}/{g} {w:?}");
                        }
                        let (min, max) = (ws.iter().min().unwrap(), ws.iter().max().unwrap());
                        assert!(max - min <= 1, "uneven spread {ws:?}");
                    }
                    let pools = PerSlot::new(
                        w.blue
                            .iter()
                            .map(|x| format!("127.0.0.1 1 2 0 {x} 6 3"))
                            .collect::<Vec<_>>(),
                        w.green
                            .iter()
                            .map(|x| format!("127.0.0.1 2 2 0 {x} 6 3"))
                            .collect::<Vec<_>>(),
                    );
                    fn as_str(v: &[String]) -> Vec<&str> {
                        v.iter().map(String::as_str).collect()
                    }
                    let state =
                        PerSlot::new(rows(&as_str(&pools.blue)), rows(&as_str(&pools.green)));
                    assert_eq!(
                        split_of(&state),
                        Some(split.clone()),
                        "{split} over {b}/{g}: {w:?}"
                    );
                }
            }
        }
        // 1 % over 4 servers against 99 % on one server would need 396 on that one.
        assert!(server_weights(&TrafficSplit::new(1, 99).unwrap(), &counts(4, 1)).is_none());
    }

    #[test]
    fn unchanged_endpoints_keep_their_server_and_new_ones_take_servers_out_of_rotation() {
        let t = |port: u16| (("127.0.0.1".parse::<IpAddr>().unwrap(), port), 1u16);
        // Serving at 80, 81, 82; 83 idle in maintenance.
        let pool = rows(&[
            "127.0.0.1 80 2 0 34 6 3",
            "127.0.0.1 81 2 0 33 6 3",
            "127.0.0.1 82 2 0 33 6 3",
            "- 1 0 5 100 14 0",
        ]);
        // Shrinking to 81, 82: those servers keep them, 80's server goes out.
        assert_eq!(
            assign(&pool, &[t(81), t(82)]),
            vec![None, Some(0), Some(1), None]
        );
        // Replacing 80 by 90: the idle server takes 90, 80's goes out.
        assert_eq!(
            assign(&pool, &[t(81), t(90), t(82)]),
            vec![None, Some(0), Some(2), Some(1)]
        );
        // Growing to 4.
        assert_eq!(
            assign(&pool, &[t(80), t(81), t(82), t(84)]),
            vec![Some(0), Some(1), Some(2), Some(3)]
        );
        // All new with no idle server left: the serving ones must move.
        let full = rows(&["127.0.0.1 80 2 0 50 6 3", "127.0.0.1 81 2 0 50 6 3"]);
        assert_eq!(assign(&full, &[t(90), t(91)]), vec![Some(0), Some(1)]);
    }
}
