//! [`HaproxySwitch`]: a [`TrafficSwitch`] that drives two servers of one HAProxy backend.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bluegreen_core::{
    Capabilities, Endpoint, Endpoints, Error, Name, PerSlot, Result, Slot, SlotMetrics,
    TrafficSplit, TrafficSwitch, TrafficSwitchExt,
};
use tokio::sync::Mutex;

use crate::client::{AdminState, Command, RuntimeClient, ServerState, StatRow};
use crate::config::HaproxyConfig;
use crate::error::HaproxyError;
use crate::NAME;

/// Drives the blue and green servers of one HAProxy backend through the runtime API.
///
/// `apply` never leaves the backend without a server in rotation: a server gaining traffic is
/// moved to its endpoint (`set server … addr … port …`), health-checked while draining (no
/// traffic yet), weighted and set `ready`, and verified; only then does a server losing all its
/// traffic go to `drain`, wait until its current sessions (`scur`) reach 0 (bounded by the drain
/// timeout), and go to `maint`. Canary splits are `set weight` with the percentages as weights.
/// `current` reads `show servers state` back. If a step fails, `apply` restores the previous
/// state where it can and reports which step failed and what HAProxy now says.
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
    servers: PerSlot<Name>,
    lock: Mutex<()>,
}

/// Where a slot's server should point.
type Target = (IpAddr, u16);

/// A step failure before being wrapped with the step number and outcome.
struct StepError {
    command: String,
    source: HaproxyError,
}

fn at(command: impl Into<String>) -> impl FnOnce(HaproxyError) -> StepError {
    let command = command.into();
    move |source| StepError { command, source }
}

impl HaproxySwitch {
    /// A switch with `config`. Every name is validated here, before anything is sent.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a backend or server name outside `[A-Za-z0-9._+-]` (so
    /// whitespace, `;`, newlines and control characters never reach HAProxy), equal server
    /// names, or a zero timeout.
    pub fn new(config: HaproxyConfig) -> Result<Self> {
        let (backend, blue, green) = config.validated()?;
        let client = RuntimeClient::new(config.address.clone(), config.command_timeout);
        Ok(HaproxySwitch {
            inner: Arc::new(Inner {
                config,
                client,
                backend,
                servers: PerSlot::new(blue, green),
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

    /// Both slots' servers as HAProxy reports them now.
    ///
    /// # Errors
    /// The runtime API cannot be reached, or the backend or a server does not exist
    /// ([`HaproxyError::NoSuchBackend`] / [`HaproxyError::NoSuchServer`] inside
    /// [`Error::Backend`]).
    pub async fn servers(&self) -> Result<PerSlot<ServerState>> {
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

    fn server(&self, slot: Slot) -> &Name {
        self.inner.servers.get(slot)
    }

    async fn read_servers(&self) -> std::result::Result<PerSlot<ServerState>, HaproxyError> {
        let rows = self.inner.client.servers_state(&self.inner.backend).await?;
        let find = |slot: Slot| {
            let name = self.server(slot).as_str();
            rows.iter()
                .find(|r| r.name == name)
                .cloned()
                .ok_or_else(|| HaproxyError::NoSuchServer {
                    backend: self.inner.backend.to_string(),
                    server: name.to_string(),
                })
        };
        Ok(PerSlot::new(find(Slot::Blue)?, find(Slot::Green)?))
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

    async fn sessions(&self, slot: Slot) -> std::result::Result<u64, HaproxyError> {
        let rows = self.inner.client.server_stats(&self.inner.backend).await?;
        let name = self.server(slot).as_str();
        rows.iter()
            .find(|r| r.server() == name)
            .map(|r| r.current_sessions())
            .ok_or_else(|| HaproxyError::NoSuchServer {
                backend: self.inner.backend.to_string(),
                server: name.to_string(),
            })
    }

    /// Checks the input and resolves each slot's endpoint to the address HAProxy needs.
    async fn targets(
        &self,
        split: &TrafficSplit,
        endpoints: &Endpoints,
    ) -> Result<PerSlot<Option<Target>>> {
        self.check_split(split, endpoints)?;
        let mut out = PerSlot::new(None, None);
        for slot in Slot::ALL {
            let eps = endpoints.get(slot);
            if eps.len() > 1 {
                return Err(Error::invalid(
                    "endpoints",
                    format!("{} endpoints for {slot}", eps.len()),
                    "the HAProxy switch drives one server per slot; give one endpoint per slot",
                ));
            }
            let Some(e) = eps.first() else { continue };
            if e.scheme != "http" {
                return Err(Error::invalid(
                    "endpoint scheme",
                    e.scheme.as_str(),
                    "the rendered backend speaks plain http to its servers; add `ssl` to the \
                     server lines yourself for https",
                ));
            }
            out.set(slot, Some(resolve(e).await?));
        }
        Ok(out)
    }

    /// Brings `slot`'s server into rotation at `target` with `weight`, health-checked first.
    async fn bring_in(
        &self,
        slot: Slot,
        before: &ServerState,
        target: Target,
        weight: u8,
    ) -> std::result::Result<(), StepError> {
        let (backend, server) = (&self.inner.backend, self.server(slot));
        let moves = before.addr != Some(target.0) || before.port != target.1;
        if before.in_rotation() && !moves {
            if before.weight != u16::from(weight) {
                self.run(Command::set_weight(backend, server, weight.into()))
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
        let now = now.get(slot);
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
            self.wait_healthy(slot, target).await?;
        }
        self.run(Command::set_weight(backend, server, weight.into()))
            .await?;
        self.run(Command::set_state(backend, server, AdminState::Ready))
            .await?;
        let after = self
            .read_servers()
            .await
            .map_err(at("verify with show servers state"))?;
        let s = after.get(slot);
        if !s.in_rotation()
            || s.op_state != crate::client::OpState::Running
            || s.weight != u16::from(weight)
            || s.addr != Some(target.0)
            || s.port != target.1
        {
            return Err(StepError {
                command: "verify with show servers state".into(),
                source: HaproxyError::Verify {
                    detail: format!(
                        "{backend}/{server} should be ready with weight {weight} at {}, \
                         HAProxy reports {}",
                        std::net::SocketAddr::new(target.0, target.1),
                        s.summary()
                    ),
                },
            });
        }
        Ok(())
    }

    async fn wait_healthy(&self, slot: Slot, target: Target) -> std::result::Result<(), StepError> {
        let c = &self.inner.config;
        let start = Instant::now();
        loop {
            let now = self
                .read_servers()
                .await
                .map_err(at("wait for the health check"))?;
            let s = now.get(slot);
            if s.is_healthy() {
                return Ok(());
            }
            if start.elapsed() >= c.ready_timeout {
                return Err(StepError {
                    command: "wait for the health check".into(),
                    source: HaproxyError::NotReady {
                        backend: self.inner.backend.to_string(),
                        server: self.server(slot).to_string(),
                        endpoint: std::net::SocketAddr::new(target.0, target.1).to_string(),
                        after: c.ready_timeout,
                        last: s.summary(),
                    },
                });
            }
            tokio::time::sleep(c.poll_interval).await;
        }
    }

    /// Takes `slot`'s server out of rotation: drain, wait for its sessions, maint.
    async fn take_out(
        &self,
        slot: Slot,
        before: &ServerState,
    ) -> std::result::Result<(), StepError> {
        let (backend, server) = (&self.inner.backend, self.server(slot));
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
                .sessions(slot)
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

    /// Puts both servers back as they were (`before`), never leaving none in rotation: servers
    /// that were in rotation come back first.
    async fn restore(
        &self,
        before: &PerSlot<ServerState>,
    ) -> std::result::Result<(), HaproxyError> {
        let (backend, now) = (&self.inner.backend, self.read_servers().await?);
        let mut order: Vec<Slot> = Slot::ALL.to_vec();
        order.sort_by_key(|s| !before.get(*s).in_rotation());
        for slot in order {
            let (was, is, server) = (before.get(slot), now.get(slot), self.server(slot));
            let send = |c: Command| async move { self.inner.client.send(&c).await.map(|_| ()) };
            if was.in_rotation() {
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

    fn describe(&self, s: &PerSlot<ServerState>) -> String {
        format!(
            "{}: {}; {}: {}",
            self.server(Slot::Blue),
            s.blue.summary(),
            self.server(Slot::Green),
            s.green.summary()
        )
    }

    async fn apply_locked(
        &self,
        split: &TrafficSplit,
        targets: &PerSlot<Option<Target>>,
    ) -> std::result::Result<(), HaproxyError> {
        let before = self.read_servers().await?;
        // Servers gaining weight first, then those keeping some, then those losing all: at no
        // point is the backend left without a server in rotation.
        let mut order: Vec<Slot> = Slot::ALL.to_vec();
        order.sort_by_key(|s| {
            let (w, cur) = (split.weight(*s), before.get(*s).effective_weight());
            if w == 0 {
                2
            } else if u16::from(w) >= cur {
                0
            } else {
                1
            }
        });
        let total = order.len() + 1;
        for (i, slot) in order.iter().copied().enumerate() {
            let w = split.weight(slot);
            let res = match (w, targets.get(slot)) {
                (0, _) => self.take_out(slot, before.get(slot)).await,
                (w, Some(t)) => self.bring_in(slot, before.get(slot), *t, w).await,
                // check_split refused weight without endpoints.
                (_, None) => Ok(()),
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
        before: &PerSlot<ServerState>,
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

/// The split HAProxy balances with: effective weights as percentages; `None` with no server in
/// rotation.
fn split_of(s: &PerSlot<ServerState>) -> Option<TrafficSplit> {
    let (b, g) = (
        u32::from(s.blue.effective_weight()),
        u32::from(s.green.effective_weight()),
    );
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
        let targets = self.targets(split, endpoints).await?;
        let _guard = self.inner.lock.lock().await;
        self.apply_locked(split, &targets)
            .await
            .map_err(|e| e.into_core("apply"))
    }

    async fn current(&self) -> Result<Option<TrafficSplit>> {
        let s = self.servers().await?;
        Ok(split_of(&s))
    }

    async fn in_flight(&self, slot: Slot) -> Result<u64> {
        self.sessions(slot)
            .await
            .map_err(|e| e.into_core("in_flight"))
    }

    /// The sessions still on the slot's server (`scur`): HAProxy does not tell a WebSocket
    /// from a slow request, so this is the same count as `in_flight`.
    async fn long_lived(&self, slot: Slot) -> Result<u64> {
        self.sessions(slot)
            .await
            .map_err(|e| e.into_core("long_lived"))
    }

    /// `shutdown sessions server <backend>/<server>` for the slot's server, then waits (about
    /// 2 s at most) until its `scur` reaches 0; returns how many sessions it had. HAProxy
    /// closes them at the TCP level: a WebSocket client sees its connection end, not a close
    /// frame, and reconnects to the live server.
    async fn close_long_lived(&self, slot: Slot) -> Result<u64> {
        let core = |e: HaproxyError| e.into_core("close_long_lived");
        let open = self.sessions(slot).await.map_err(core)?;
        if open == 0 {
            return Ok(0);
        }
        let server = self.server(slot).clone();
        self.inner
            .client
            .send(&Command::shutdown_sessions(&self.inner.backend, &server))
            .await
            .map_err(core)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.sessions(slot).await.map_err(core)? > 0 && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(self.inner.config.poll_interval).await;
        }
        Ok(open)
    }

    /// The slot's server counters from `show stat`: responses (`hrsp_*`), 5xx (`hrsp_5xx`),
    /// connection and response errors (`econ` + `eresp`). HAProxy keeps no latency percentiles:
    /// `p50` is its average response time over the last 1024 requests (`rtime`) and `p99` the
    /// largest response time it has seen (`rtime_max`), a conservative bound. The counters are
    /// cumulative; analyses compare them with a baseline taken when observation starts.
    async fn metrics(&self, slot: Slot) -> Result<SlotMetrics> {
        let rows = self
            .inner
            .client
            .server_stats(&self.inner.backend)
            .await
            .map_err(|e| e.into_core("metrics"))?;
        let name = self.server(slot).as_str();
        let row = rows.iter().find(|r| r.server() == name).ok_or_else(|| {
            HaproxyError::NoSuchServer {
                backend: self.inner.backend.to_string(),
                server: name.to_string(),
            }
            .into_core("metrics")
        })?;
        Ok(metrics_of(row))
    }
}

/// [`SlotMetrics`] from one server row of `show stat`.
fn metrics_of(row: &StatRow) -> SlotMetrics {
    let n = |f: &str| row.get(f).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let requests = [
        "hrsp_1xx",
        "hrsp_2xx",
        "hrsp_3xx",
        "hrsp_4xx",
        "hrsp_5xx",
        "hrsp_other",
    ]
    .iter()
    .map(|f| n(f))
    .sum();
    SlotMetrics::new(
        requests,
        n("hrsp_5xx"),
        n("econ") + n("eresp"),
        Duration::from_millis(n("rtime")),
        Duration::from_millis(n("rtime_max").max(n("rtime"))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::parse_servers_state;

    fn state(blue: &str, green: &str) -> PerSlot<ServerState> {
        let text = format!(
            "1\n# be_name srv_name srv_addr srv_port srv_op_state srv_admin_state srv_uweight srv_check_state srv_check_result\napp blue {blue}\napp green {green}\n"
        );
        let rows = parse_servers_state("t", &text).unwrap();
        PerSlot::new(rows[0].clone(), rows[1].clone())
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
}
