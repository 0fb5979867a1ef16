//! [`TestSwarm`]: a Docker Swarm of the [test hosts](crate::hosts): the first host's engine is
//! the manager (`swarm init --advertise-addr <its address>`), the others join as workers.
//!
//! The test hosts reach this machine, not each other (their links end in this machine's
//! namespace, which does not forward between them, and changing its forwarding or firewall is
//! not ours to do). So the swarm gets its own LAN, inside the hosts' namespaces: a bridge in the
//! first host's namespace, a veth from every other host into it (addresses `10.200.0.<n>/24`,
//! private to the namespaces), and on every host a route to each other host's address through
//! that LAN. Each node then advertises its own address ([`TestHost::address`]), the one this
//! machine (and so a switch) reaches it at, as nodes of one LAN do.
//!
//! Overlay networks and the routing mesh need the engine's bridge networking and iptables, which
//! the test hosts' engines run without (`--bridge=none --iptables=false`): services use the
//! host's network (see `bluegreen_docker::SwarmEnvironment`).
//!
//! [`TestSwarm::leave`] (and `Drop`) makes every node leave the swarm, workers first, and removes
//! the swarm's LAN: the engines are left as they were found.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bluegreen_core::Result;
use bluegreen_docker::bollard::models::{NodeSpec, NodeState, SwarmInitRequest, SwarmJoinRequest};
use bluegreen_docker::bollard::query_parameters::{
    LeaveSwarmOptionsBuilder, UpdateNodeOptionsBuilder,
};
use bluegreen_docker::bollard::Docker;
use tokio::sync::OnceCell;

use crate::hosts::{host_error, run, TestHost, TestHosts};

/// The bridge of the swarm's LAN, in the first host's namespace.
const BRIDGE: &str = "bgswarm";
/// Each other host's end of its veth into the LAN.
const LAN_END: &str = "bgswarm0";
/// Bound on the nodes becoming ready after joining.
const READY: Duration = Duration::from_secs(60);

/// The address of host `i` (0-based) on the swarm's LAN.
fn lan_address(i: usize) -> String {
    format!("10.200.0.{}", i + 1)
}

/// The first host's end of host `i`'s veth.
fn bridge_port(i: usize) -> String {
    format!("bgswarm-p{i}")
}

fn in_ns(host: &TestHost, args: &[&str]) -> Result<String> {
    let ns = format!("--net=/var/run/netns/{}", host.netns());
    let mut argv = vec![ns.as_str()];
    argv.extend_from_slice(args);
    run("nsenter", &argv)
}

/// A swarm over a set of test hosts (see the [module docs](self)).
#[derive(Debug)]
pub struct TestSwarm<'h> {
    hosts: &'h TestHosts,
    left: Mutex<bool>,
}

impl<'h> TestSwarm<'h> {
    /// Connects the hosts' namespaces by a LAN, makes the first host's engine a swarm manager
    /// and joins the others as workers, names each node after its host (`h1`, …) and waits until
    /// every node is ready.
    ///
    /// # Errors
    /// Fewer than one host, an engine already in a swarm (left as it is), or a step that fails
    /// (named); what was set up is undone.
    pub async fn init(hosts: &'h TestHosts) -> Result<TestSwarm<'h>> {
        let list = hosts.hosts();
        let Some(manager) = list.first() else {
            return Err(host_error("a swarm needs at least one test host"));
        };
        for h in list {
            let state = h
                .client()
                .await?
                .info()
                .await
                .map_err(|e| host_error(format!("docker info on {}: {e}", h.name())))?
                .swarm
                .and_then(|s| s.local_node_state)
                .map(|s| s.to_string())
                .unwrap_or_default();
            if !state.is_empty() && state != "inactive" {
                return Err(host_error(format!(
                    "the engine of {} is already in a swarm ({state}); it is left as it is",
                    h.name()
                )));
            }
        }
        let swarm = TestSwarm {
            hosts,
            left: Mutex::new(false),
        };
        if let Err(e) = swarm.form(manager).await {
            swarm.leave_now().await;
            return Err(e);
        }
        Ok(swarm)
    }

    async fn form(&self, manager: &TestHost) -> Result<()> {
        let list = self.hosts.hosts();
        self.link()?;
        let addr = manager.address().to_string();
        let m = manager.client().await?;
        m.init_swarm(SwarmInitRequest {
            listen_addr: Some(format!("{addr}:2377")),
            advertise_addr: Some(addr.clone()),
            ..Default::default()
        })
        .await
        .map_err(|e| host_error(format!("swarm init on {}: {e}", manager.name())))?;
        let token = m
            .inspect_swarm()
            .await
            .map_err(|e| host_error(format!("swarm inspect on {}: {e}", manager.name())))?
            .join_tokens
            .and_then(|t| t.worker)
            .ok_or_else(|| host_error("the manager reports no worker join token"))?;
        for h in &list[1..] {
            let own = h.address().to_string();
            h.client()
                .await?
                .join_swarm(SwarmJoinRequest {
                    listen_addr: Some(format!("{own}:2377")),
                    advertise_addr: Some(own),
                    remote_addrs: Some(vec![format!("{addr}:2377")]),
                    join_token: Some(token.clone()),
                    ..Default::default()
                })
                .await
                .map_err(|e| host_error(format!("swarm join of {}: {e}", h.name())))?;
        }
        self.name_nodes(&m).await
    }

    /// Waits until every host is a ready node, and names each node after its host.
    async fn name_nodes(&self, m: &Docker) -> Result<()> {
        let deadline = Instant::now() + READY;
        loop {
            let nodes = m
                .list_nodes(None)
                .await
                .map_err(|e| host_error(format!("listing the swarm's nodes: {e}")))?;
            let ready: Vec<_> = nodes
                .iter()
                .filter(|n| n.status.as_ref().and_then(|s| s.state) == Some(NodeState::READY))
                .collect();
            if ready.len() == self.hosts.hosts().len() {
                for n in ready {
                    let addr = n.status.as_ref().and_then(|s| s.addr.clone());
                    let Some(h) = self
                        .hosts
                        .hosts()
                        .iter()
                        .find(|h| Some(h.address().to_string()) == addr)
                    else {
                        return Err(host_error(format!(
                            "a swarm node advertises {addr:?}, no test host's address"
                        )));
                    };
                    let (Some(id), Some(version)) =
                        (n.id.as_deref(), n.version.as_ref().and_then(|v| v.index))
                    else {
                        continue;
                    };
                    let spec = NodeSpec {
                        name: Some(h.name().to_string()),
                        ..n.spec.clone().unwrap_or_default()
                    };
                    let opts = UpdateNodeOptionsBuilder::default()
                        .version(i64::try_from(version).unwrap_or(i64::MAX))
                        .build();
                    m.update_node(id, spec, opts)
                        .await
                        .map_err(|e| host_error(format!("naming node {}: {e}", h.name())))?;
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(host_error(format!(
                    "{} of {} swarm nodes ready after {READY:?}",
                    ready.len(),
                    self.hosts.hosts().len()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The swarm's LAN: a bridge in the first host's namespace, a veth from each other host,
    /// routes to each host's address through it.
    fn link(&self) -> Result<()> {
        let list = self.hosts.hosts();
        let first = &list[0];
        let lan0 = format!("{}/24", lan_address(0));
        in_ns(first, &["ip", "link", "add", BRIDGE, "type", "bridge"])?;
        in_ns(first, &["ip", "addr", "add", &lan0, "dev", BRIDGE])?;
        in_ns(first, &["ip", "link", "set", BRIDGE, "up"])?;
        for (i, h) in list.iter().enumerate().skip(1) {
            let port = bridge_port(i);
            run(
                "ip",
                &[
                    "link",
                    "add",
                    "name",
                    &port,
                    "netns",
                    first.netns(),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    LAN_END,
                    "netns",
                    h.netns(),
                ],
            )?;
            in_ns(first, &["ip", "link", "set", &port, "master", BRIDGE])?;
            in_ns(first, &["ip", "link", "set", &port, "up"])?;
            let own = format!("{}/24", lan_address(i));
            in_ns(h, &["ip", "addr", "add", &own, "dev", LAN_END])?;
            in_ns(h, &["ip", "link", "set", LAN_END, "up"])?;
        }
        for (i, h) in list.iter().enumerate() {
            let dev = if i == 0 { BRIDGE } else { LAN_END };
            let src = h.address().to_string();
            for (j, other) in list.iter().enumerate() {
                if i == j {
                    continue;
                }
                let to = format!("{}/32", other.address());
                let via = lan_address(j);
                in_ns(
                    h,
                    &[
                        "ip", "route", "replace", &to, "via", &via, "dev", dev, "src", &src,
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// The hosts, the manager first.
    pub fn hosts(&self) -> &'h TestHosts {
        self.hosts
    }

    /// The manager's host (the first).
    pub fn manager(&self) -> &'h TestHost {
        &self.hosts.hosts()[0]
    }

    /// A client of the manager's engine: the one a swarm environment talks to.
    ///
    /// # Errors
    /// The engine does not answer.
    pub async fn manager_client(&self) -> Result<Docker> {
        self.manager().client().await
    }

    /// Makes every node leave the swarm (workers first, `--force`) and removes the swarm's LAN.
    /// Idempotent.
    ///
    /// # Errors
    /// A node could not leave (named); the others still leave.
    pub async fn leave(&self) -> Result<()> {
        let problems = self.leave_now().await;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(host_error(format!(
                "leaving the test swarm: {}",
                problems.join("; ")
            )))
        }
    }

    async fn leave_now(&self) -> Vec<String> {
        {
            let Ok(mut left) = self.left.lock() else {
                return Vec::new();
            };
            if *left {
                return Vec::new();
            }
            *left = true;
        }
        let mut problems = Vec::new();
        for h in self.hosts.hosts().iter().rev() {
            let Ok(d) = h.client().await else {
                // An engine that is gone keeps no swarm state to leave.
                continue;
            };
            let opts = LeaveSwarmOptionsBuilder::default().force(true).build();
            match d.leave_swarm(Some(opts)).await {
                Ok(()) => {}
                // 503: "This node is not part of a swarm".
                Err(bluegreen_docker::bollard::errors::Error::DockerResponseServerError {
                    status_code: 503,
                    ..
                }) => {}
                Err(e) => problems.push(format!("{} leaving the swarm: {e}", h.name())),
            }
        }
        if let Some(first) = self.hosts.hosts().first() {
            // Deleting the bridge's ports deletes their peers (and the routes through them).
            for i in 1..self.hosts.hosts().len() {
                let _ = in_ns(first, &["ip", "link", "del", &bridge_port(i)]);
            }
            let _ = in_ns(first, &["ip", "link", "del", BRIDGE]);
        }
        problems
    }
}

impl Drop for TestSwarm<'_> {
    fn drop(&mut self) {
        let this = &*self;
        std::thread::scope(|s| {
            s.spawn(|| {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                if let Err(e) = rt.block_on(this.leave()) {
                    eprintln!("{e}");
                }
            });
        });
    }
}

/// A swarm over the test hosts shared by the tests of one binary ([`crate::hosts::shared`],
/// with the demo image on every node); `None` (skip, printed) when test hosts cannot run here
/// outside CI.
///
/// Rust never drops a `static`: the hosts' engines die with the process and their state
/// (swarm membership included) is removed with their directories by the next
/// [`clean_leftovers`](crate::hosts::clean_leftovers); no other engine ever joins.
///
/// # Panics
/// The swarm cannot be formed, in CI.
pub async fn shared() -> Option<&'static TestSwarm<'static>> {
    static SWARM: OnceCell<std::result::Result<TestSwarm<'static>, String>> = OnceCell::const_new();
    let hosts = crate::hosts::shared().await?;
    let res = SWARM
        .get_or_init(|| async { TestSwarm::init(hosts).await.map_err(|e| e.to_string()) })
        .await;
    crate::gate::require_ok(res.as_ref(), "test swarm")
}
