//! [`TestHosts`]: extra Docker engines on this machine, each in its own network namespace with
//! its own address — real separate hosts for the multi-host tests (a fleet, a swarm).
//!
//! For each host:
//! 1. a network namespace `bgt-<a>-<b>` and a veth pair `bgh<a>-<b>` (host side, `10.<a>.<b>.1/24`)
//!    / `bgn<a>-<b>` (inside, `10.<a>.<b>.2/24`), links and `lo` up;
//! 2. a `dockerd` started with `nsenter --net=/var/run/netns/<ns>` (not `ip netns exec`, which
//!    remounts `/sys` so that dockerd fails with "Devices cgroup isn't mounted"), an empty
//!    `--config-file` (the machine's `/etc/docker/daemon.json` may set options a flag would
//!    repeat), its data root, exec root, socket and pid file in the host's own directory,
//!    `--bridge=none --iptables=false` (nothing of the machine's firewall is touched) and the
//!    main engine's storage driver;
//! 3. images copied from the main engine (`docker save` streamed into the host's `docker load`,
//!    through the Engine API).
//!
//! A container publishing its port on the host's address ([`TestHost::address`]) answers from
//! this namespace, like a service on another machine of the LAN.
//!
//! Subnets are claimed by creating `<tmp>/bluegreen-testhosts/10.<a>.<b>/` (an atomic `mkdir`),
//! which also holds the host's engine files and the owner's pid, so that parallel test binaries
//! never share a name or a subnet. [`TestHosts::stop`] (and `Drop`) stops the daemons it started,
//! by pid, kills what still runs in the namespace, unmounts what the engine left mounted under
//! its directory, deletes the namespace and the veth and removes the directory.
//! [`clean_leftovers`] does the same for hosts whose owner process has died (a test binary
//! that was killed, or one that shared its hosts in a `static`, which Rust never drops):
//! [`TestHosts::start`] runs it first, and CI runs it before and after the suites.
//!
//! The engines are started with `setpriv --pdeathsig KILL` from a thread that lives as long as
//! the process, so a test binary that exits (or is killed) takes its daemons with it.
//!
//! Needs root, `ip` (iproute2), `nsenter` and `setpriv` (util-linux) and `dockerd`; [`shared`]
//! is the gate (skip outside CI, fail in CI).

use std::collections::BTreeSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bluegreen_core::{Error, Result};
use bluegreen_docker::bollard::query_parameters::ImportImageOptionsBuilder;
use bluegreen_docker::bollard::{self, Docker};
use futures_util::{StreamExt, TryStreamExt};
use rustix::process::{Pid, Signal};
use tokio::sync::OnceCell;

/// The second octet of every test host subnet (`10.201.<b>.0/24`).
const SUBNET_A: u8 = 201;
/// Bound on an engine's start (it takes well under a second here).
const ENGINE_START: Duration = Duration::from_secs(60);
/// Bound on a graceful engine stop before SIGKILL.
const ENGINE_STOP: Duration = Duration::from_secs(15);
/// The TCP port a TLS engine listens on.
pub const TLS_PORT: u16 = 2376;

pub(crate) fn host_error(what: impl Into<String>) -> Error {
    Error::backend("testenv", "test hosts", false, what.into())
}

/// Where the host directories (claims) live.
pub fn state_root() -> PathBuf {
    std::env::temp_dir().join("bluegreen-testhosts")
}

/// Runs a program (argv, never a shell) and returns its stdout; an error names the command and
/// quotes its stderr.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| host_error(format!("running `{program}`: {e}")))?;
    if !out.status.success() {
        return Err(host_error(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when `program` is on `PATH` (or is an existing path).
fn on_path(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// What is missing to start test hosts here (root, `ip`, `nsenter`, `setpriv`, `dockerd`), or
/// `None`.
pub fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("root (test hosts create network namespaces)".into());
    }
    for (bin, pkg) in [
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("setpriv", "util-linux"),
        ("umount", "mount"),
        ("dockerd", "docker.io"),
    ] {
        if !on_path(bin) {
            return Some(format!("`{bin}` (package {pkg})"));
        }
    }
    None
}

/// The gate of the test-host suites: `true` when test hosts can run here; otherwise prints
/// `SKIPPED: …` outside CI and returns `false`, or panics in CI ([`crate::require`]).
pub fn require_available() -> bool {
    match unavailable() {
        None => true,
        Some(what) => crate::gate::require(false, &format!("test hosts ({what})")),
    }
}

/// Spawns children from one thread that lives as long as the process: `setpriv --pdeathsig`
/// fires when the *thread* that spawned a child ends, and a runtime's worker threads come and go.
fn spawn_kept(cmd: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("testhosts-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // Keep the thread (and so the children's parent-death signal) until exit.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawning the test hosts' keeper thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    keeper
        .lock()
        .map_err(|_| std::io::Error::other("keeper lock poisoned"))?
        .send((cmd, tx))
        .map_err(|_| std::io::Error::other("keeper thread gone"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("keeper thread gone"))?
}

/// True when `pid` runs a process whose command line mentions `marker` (so a recycled pid is
/// never signalled).
fn pid_runs(pid: i32, marker: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(marker))
        .unwrap_or(false)
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn signal(pid: i32, sig: Signal) {
    if let Some(p) = Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// TLS material of an engine listening on `tcp://<address>:2376` with `--tlsverify`: PEM files
/// in the host's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineTls {
    /// The CA that signed the server's certificate and the clients' certificates.
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// The server's key.
    pub key: PathBuf,
}

/// The names and addresses of one host, derived from its subnet `10.<a>.<b>.0/24`.
#[derive(Debug, Clone)]
struct Layout {
    dir: PathBuf,
    netns: String,
    host_veth: String,
    ns_veth: String,
    gateway: Ipv4Addr,
    address: Ipv4Addr,
}

impl Layout {
    fn new(b: u8) -> Layout {
        Layout {
            dir: state_root().join(format!("10.{SUBNET_A}.{b}")),
            netns: format!("bgt-{SUBNET_A}-{b}"),
            host_veth: format!("bgh{SUBNET_A}-{b}"),
            ns_veth: format!("bgn{SUBNET_A}-{b}"),
            gateway: Ipv4Addr::new(10, SUBNET_A, b, 1),
            address: Ipv4Addr::new(10, SUBNET_A, b, 2),
        }
    }

    fn from_dir(dir: &Path) -> Option<Layout> {
        let name = dir.file_name()?.to_str()?;
        let b: u8 = name
            .strip_prefix(&format!("10.{SUBNET_A}."))?
            .parse()
            .ok()?;
        Some(Layout::new(b))
    }

    fn subnet(&self) -> String {
        let [a, b, c, _] = self.address.octets();
        format!("{a}.{b}.{c}.0/24")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    fn netns_path(&self) -> String {
        format!("/var/run/netns/{}", self.netns)
    }
}

/// One extra Docker engine in its own network namespace. Made by [`TestHosts::start`].
#[derive(Debug)]
pub struct TestHost {
    name: String,
    layout: Layout,
    driver: String,
    tls: Option<EngineTls>,
    engine: Mutex<Option<Child>>,
}

impl TestHost {
    /// The host's name (`h1`, `h2`, …).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address (`10.<a>.<b>.2`), reachable from this machine's namespace: publish
    /// ports on it and put it into endpoints.
    pub fn address(&self) -> Ipv4Addr {
        self.layout.address
    }

    /// The address of this machine on the host's link (`10.<a>.<b>.1`).
    pub fn gateway(&self) -> Ipv4Addr {
        self.layout.gateway
    }

    /// The network namespace's name.
    pub fn netns(&self) -> &str {
        &self.layout.netns
    }

    /// The name of this machine's end of the host's link (a veth).
    pub fn link(&self) -> &str {
        &self.layout.host_veth
    }

    /// The engine's address for clients: `unix://<dir>/docker.sock`.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.layout.socket().display())
    }

    /// The engine's TCP+TLS address (`tcp://<address>:2376`) and material, for a host started
    /// with TLS.
    pub fn tls(&self) -> Option<(String, &EngineTls)> {
        self.tls
            .as_ref()
            .map(|t| (format!("tcp://{}:{TLS_PORT}", self.address()), t))
    }

    /// The host's own directory (engine files, TLS material).
    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }

    /// A client of the host's engine (unix socket), API version negotiated.
    ///
    /// # Errors
    /// The engine does not answer.
    pub async fn client(&self) -> Result<Docker> {
        let d = Docker::connect_with_unix(
            &self.layout.socket().to_string_lossy(),
            120,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| host_error(format!("connecting to {}: {e}", self.name)))?;
        d.negotiate_version()
            .await
            .map_err(|e| host_error(format!("engine of {} does not answer: {e}", self.name)))
    }

    /// This host as a member of a [`DockerFleet`](bluegreen_docker::DockerFleet): its engine
    /// through the unix socket, its containers reached (and ports published) at its address.
    pub fn fleet_host(&self) -> bluegreen_docker::FleetHost {
        bluegreen_docker::FleetHost::new(
            self.name.clone(),
            self.docker_host(),
            self.address().to_string(),
        )
        .expect("test host names and addresses are valid")
    }

    /// The same host reached over TCP+TLS with the given client material (for a host started
    /// with TLS, see [`TestHosts::start_with`]).
    pub fn fleet_host_tls(&self, tls: bluegreen_docker::FleetTls) -> bluegreen_docker::FleetHost {
        bluegreen_docker::FleetHost::new(
            self.name.clone(),
            format!("tcp://{}:{TLS_PORT}", self.address()),
            self.address().to_string(),
        )
        .expect("test host names and addresses are valid")
        .with_tls(tls)
    }

    /// The engine's pid, while it runs.
    pub fn engine_pid(&self) -> Option<u32> {
        let mut guard = self.engine.lock().ok()?;
        let child = guard.as_mut()?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            _ => None,
        }
    }

    fn engine_args(&self) -> Vec<String> {
        let d = &self.layout.dir;
        let p = |s: &str| d.join(s).to_string_lossy().into_owned();
        let mut args = vec![
            "--pdeathsig".into(),
            "KILL".into(),
            "nsenter".into(),
            format!("--net={}", self.layout.netns_path()),
            "dockerd".into(),
            format!("--config-file={}", p("daemon.json")),
            format!("--data-root={}", p("data")),
            format!("--exec-root={}", p("exec")),
            format!("--pidfile={}", p("docker.pid")),
            format!("--host=unix://{}", p("docker.sock")),
            "--bridge=none".into(),
            "--iptables=false".into(),
            "--ip6tables=false".into(),
            format!("--storage-driver={}", self.driver),
            "--shutdown-timeout=2".into(),
        ];
        if let Some(t) = &self.tls {
            args.extend([
                "--tlsverify".into(),
                format!("--tlscacert={}", t.ca.display()),
                format!("--tlscert={}", t.cert.display()),
                format!("--tlskey={}", t.key.display()),
                format!("--host=tcp://{}:{TLS_PORT}", self.address()),
            ]);
        }
        args
    }

    /// Starts the engine (again) and waits until it answers.
    async fn start_engine(&self) -> Result<()> {
        let log = std::fs::File::create(self.layout.dir.join("dockerd.log"))
            .map_err(|e| host_error(format!("creating the log of {}: {e}", self.name)))?;
        let log2 = log
            .try_clone()
            .map_err(|e| host_error(format!("log of {}: {e}", self.name)))?;
        let mut cmd = Command::new("setpriv");
        cmd.args(self.engine_args())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = spawn_kept(cmd)
            .map_err(|e| host_error(format!("starting dockerd for {}: {e}", self.name)))?;
        if let Ok(mut g) = self.engine.lock() {
            *g = Some(child);
        }
        let deadline = Instant::now() + ENGINE_START;
        loop {
            if let Ok(d) = self.client().await {
                if d.ping().await.is_ok() {
                    return Ok(());
                }
            }
            if self.engine_pid().is_none() || Instant::now() > deadline {
                let log = std::fs::read_to_string(self.layout.dir.join("dockerd.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(host_error(format!(
                    "the engine of test host {} did not start (see {}):\n{}",
                    self.name,
                    self.layout.dir.join("dockerd.log").display(),
                    tail.join("\n")
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the engine at once (SIGKILL, as a crash would): its API stops answering; the
    /// network stays. [`restart_engine`](Self::restart_engine) brings it back.
    pub fn kill_engine(&self) {
        if let Ok(mut g) = self.engine.lock() {
            if let Some(mut child) = g.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Starts the engine again after [`kill_engine`](Self::kill_engine), as after a reboot of
    /// the host: what still runs in its namespace (container shims, containers) is killed and
    /// the engine's mounts are released first; images and containers stay on disk. Waits until
    /// the engine answers.
    ///
    /// # Errors
    /// The engine does not start.
    pub async fn restart_engine(&self) -> Result<()> {
        self.kill_engine();
        let problems = kill_namespace(&self.layout);
        if !problems.is_empty() {
            return Err(host_error(problems.join("; ")));
        }
        let problems = unmount_under(&self.layout.dir);
        if !problems.is_empty() {
            return Err(host_error(problems.join("; ")));
        }
        // The engine's containerd dies with it, but until it is reaped its pid still exists, and
        // a new engine that finds it in containerd's pid file waits for it forever.
        let pidfile = self.layout.dir.join("exec/containerd/containerd.pid");
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            let deadline = Instant::now() + Duration::from_secs(5);
            while pid_runs(pid, "containerd") && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = std::fs::remove_file(&pidfile);
        self.start_engine().await
    }

    /// Cuts the host off the network, as an unplugged cable would: its end of the link goes
    /// down (`ip link set <veth> down` inside the namespace), so packets to its address are
    /// dropped and connections time out. Its engine keeps running (reachable through its
    /// socket).
    ///
    /// # Errors
    /// `ip` fails.
    pub fn cut_link(&self) -> Result<()> {
        self.set_link("down")
    }

    /// Puts the link back up after [`cut_link`](Self::cut_link).
    ///
    /// # Errors
    /// `ip` fails.
    pub fn restore_link(&self) -> Result<()> {
        self.set_link("up")
    }

    fn set_link(&self, state: &str) -> Result<()> {
        let ns = format!("--net={}", self.layout.netns_path());
        run(
            "nsenter",
            &[&ns, "ip", "link", "set", &self.layout.ns_veth, state],
        )
        .map(drop)
    }

    /// Copies `tag` from the engine `from` into this host's engine (`docker save | docker load`
    /// through the API). Does nothing when the host already has an image of the same id.
    ///
    /// # Errors
    /// Either engine fails.
    pub async fn load_image(&self, from: &Docker, tag: &str) -> Result<()> {
        let src = from
            .inspect_image(tag)
            .await
            .map_err(|e| host_error(format!("inspect image {tag} on the main engine: {e}")))?;
        let to = self.client().await?;
        if let Ok(have) = to.inspect_image(tag).await {
            if have.id.is_some() && have.id == src.id {
                return Ok(());
            }
        }
        let tar: Vec<bytes::Bytes> = from
            .export_image(tag)
            .try_collect()
            .await
            .map_err(|e| host_error(format!("docker save {tag}: {e}")))?;
        let body = bytes::Bytes::from(tar.concat());
        let opts = ImportImageOptionsBuilder::default().quiet(true).build();
        let mut stream = to.import_image(opts, bollard::body_full(body), None);
        while let Some(item) = stream.next().await {
            let info =
                item.map_err(|e| host_error(format!("docker load {tag} on {}: {e}", self.name)))?;
            if let Some(msg) = info.error_detail.and_then(|d| d.message) {
                return Err(host_error(format!(
                    "docker load {tag} on {}: {msg}",
                    self.name
                )));
            }
        }
        Ok(())
    }
}

/// A set of test hosts (see the [module docs](self)). Stopped by [`stop`](Self::stop) or
/// when dropped.
#[derive(Debug)]
pub struct TestHosts {
    hosts: Vec<TestHost>,
    stopped: Mutex<bool>,
}

/// Creates the host's network: namespace, veth pair, addresses, links up.
fn create_network(l: &Layout) -> Result<()> {
    run("ip", &["netns", "add", &l.netns])?;
    run(
        "ip",
        &[
            "link",
            "add",
            &l.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &l.ns_veth,
        ],
    )?;
    run("ip", &["link", "set", &l.ns_veth, "netns", &l.netns])?;
    run(
        "ip",
        &[
            "addr",
            "add",
            &format!("{}/24", l.gateway),
            "dev",
            &l.host_veth,
        ],
    )?;
    run("ip", &["link", "set", &l.host_veth, "up"])?;
    // Should our side of the link ever go down, the subnet must not fall through to the
    // default route (which leads off this machine): only test hosts and loopback are targets.
    run(
        "ip",
        &[
            "route",
            "replace",
            "unreachable",
            &l.subnet(),
            "metric",
            "4242",
        ],
    )?;
    let ns = format!("--net={}", l.netns_path());
    let addr = format!("{}/24", l.address);
    for args in [
        vec![ns.as_str(), "ip", "addr", "add", &addr, "dev", &l.ns_veth],
        vec![ns.as_str(), "ip", "link", "set", &l.ns_veth, "up"],
        vec![ns.as_str(), "ip", "link", "set", "lo", "up"],
    ] {
        run("nsenter", &args)?;
    }
    Ok(())
}

/// Tears down whatever exists of the host at `l` (engine by its pid file, processes left in
/// the namespace, mounts, namespace, veth, directory). Best effort; returns what failed.
fn teardown(l: &Layout, engine: Option<Child>) -> Vec<String> {
    let mut problems = Vec::new();
    let marker = l.dir.to_string_lossy().into_owned();
    let pidfile_pid = std::fs::read_to_string(l.dir.join("docker.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| pid_runs(*p, &marker));
    let child_pid = engine.as_ref().map(|c| c.id() as i32);
    let pid = child_pid.or(pidfile_pid);
    if let Some(pid) = pid {
        signal(pid, Signal::TERM);
        let deadline = Instant::now() + ENGINE_STOP;
        while pid_runs(pid, &marker) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if pid_runs(pid, &marker) {
            signal(pid, Signal::KILL);
        }
    }
    if let Some(mut c) = engine {
        let _ = c.wait();
    }
    problems.extend(kill_namespace(l));
    problems.extend(unmount_under(&l.dir));
    if Path::new(&l.netns_path()).exists() {
        if let Err(e) = run("ip", &["netns", "del", &l.netns]) {
            problems.push(e.to_string());
        }
    }
    // Deleting the namespace destroys the pair, asynchronously; delete our side to be sure.
    if Path::new(&format!("/sys/class/net/{}", l.host_veth)).exists() {
        let _ = run("ip", &["link", "del", &l.host_veth]);
    }
    let _ = run(
        "ip",
        &["route", "del", "unreachable", &l.subnet(), "metric", "4242"],
    );
    if l.dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&l.dir) {
            problems.push(format!("removing {}: {e}", l.dir.display()));
        }
    }
    problems
}

/// Kills every process in the host's namespace (shims, containers, fuse-overlayfs: all ours).
fn kill_namespace(l: &Layout) -> Vec<String> {
    let mut problems = Vec::new();
    if !Path::new(&l.netns_path()).exists() {
        return problems;
    }
    for round in 0..100 {
        let pids: Vec<i32> = run("ip", &["netns", "pids", &l.netns])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for p in &pids {
            signal(*p, Signal::KILL);
        }
        if round == 99 {
            problems.push(format!("processes {pids:?} remain in {}", l.netns));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    problems
}

/// Unmounts what the engine left mounted under `dir` (it bind-mounts its data root and keeps
/// namespace files under its exec root), the deepest first.
fn unmount_under(dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(str::to_string))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        if let Err(e) = run("umount", &["-l", &m]) {
            problems.push(e.to_string());
        }
    }
    problems
}

/// Tears down the test hosts whose owner process is gone (see the [module docs](self)).
/// Returns the namespaces cleaned.
///
/// # Errors
/// Something could not be removed (named).
pub fn clean_leftovers() -> Result<Vec<String>> {
    let mut cleaned = Vec::new();
    let mut problems = Vec::new();
    let Ok(entries) = std::fs::read_dir(state_root()) else {
        return Ok(cleaned);
    };
    for e in entries.flatten() {
        let Some(l) = Layout::from_dir(&e.path()) else {
            continue;
        };
        let owner = std::fs::read_to_string(l.dir.join("owner"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let owner_alive = owner.is_some_and(|p| pid_alive(p) && !owner_is_recycled(p, &l));
        // A claim without an owner file is being set up (or its owner died at once): leave it
        // for a minute.
        let young = owner.is_none()
            && e.metadata()
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(60))
                .unwrap_or(true);
        if owner_alive || young {
            continue;
        }
        problems.extend(teardown(&l, None));
        cleaned.push(l.netns.clone());
    }
    if problems.is_empty() {
        Ok(cleaned)
    } else {
        Err(host_error(format!(
            "cleaning left-over test hosts: {}",
            problems.join("; ")
        )))
    }
}

/// The owner file records the owner's start time too: a different one means a new process got
/// the pid.
fn owner_is_recycled(pid: i32, l: &Layout) -> bool {
    let recorded = std::fs::read_to_string(l.dir.join("owner-start")).ok();
    match (recorded, process_start(pid)) {
        (Some(r), Some(now)) => r.trim() != now,
        _ => false,
    }
}

/// Field 22 of `/proc/<pid>/stat` (start time in clock ticks).
fn process_start(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from after its closing parenthesis.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19).map(str::to_string)
}

/// Claims a free subnet: an atomic `mkdir` of its directory, and no interface of this machine
/// already in `10.201.<b>.0/24`.
fn claim() -> Result<Layout> {
    std::fs::create_dir_all(state_root())
        .map_err(|e| host_error(format!("creating {}: {e}", state_root().display())))?;
    let in_use = run("ip", &["-o", "-4", "addr", "show"]).unwrap_or_default();
    let routes = run("ip", &["-4", "route", "show"]).unwrap_or_default();
    let start = (std::process::id() % 250) as u8;
    for i in 0..250u16 {
        let b = ((u16::from(start) + i) % 250 + 1) as u8;
        if in_use.contains(&format!(" 10.{SUBNET_A}.{b}."))
            || routes.contains(&format!("10.{SUBNET_A}.{b}.0/24"))
        {
            continue;
        }
        let l = Layout::new(b);
        if Path::new(&l.netns_path()).exists() {
            continue;
        }
        match std::fs::create_dir(&l.dir) {
            Ok(()) => {
                let me = std::process::id() as i32;
                let write = |name: &str, text: String| {
                    std::fs::File::create(l.dir.join(name))
                        .and_then(|mut f| f.write_all(text.as_bytes()))
                };
                write("owner-start", process_start(me).unwrap_or_default())
                    .and_then(|()| write("owner", me.to_string()))
                    .map_err(|e| {
                        host_error(format!("writing the claim {}: {e}", l.dir.display()))
                    })?;
                return Ok(l);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(host_error(format!("claiming {}: {e}", l.dir.display()))),
        }
    }
    Err(host_error(format!(
        "no free test host subnet in 10.{SUBNET_A}.0.0/16 (run clean_leftovers?)"
    )))
}

impl TestHosts {
    /// Starts `n` hosts named `h1`…`hn`, their engines concurrently, and waits until every
    /// engine answers. Left-over hosts of dead processes are cleaned first.
    ///
    /// # Errors
    /// A tool is missing, the main engine cannot be asked for its storage driver, or a host
    /// cannot be set up (whatever was set up is torn down).
    pub async fn start(n: usize) -> Result<TestHosts> {
        Self::start_with(n, |_, _| Ok(None)).await
    }

    /// [`start`](Self::start), with TLS on some hosts: `tls(index, host_dir)` may write an
    /// engine's CA, certificate and key (e.g. generated with `rcgen`) into the host's directory
    /// and return their paths; that engine then also listens on `tcp://<address>:2376` with
    /// `--tlsverify`. The host's address is in `host_dir/address` when the callback runs (for
    /// the certificate's subject).
    ///
    /// # Errors
    /// As [`start`](Self::start), or the callback's error.
    pub async fn start_with<F>(n: usize, tls: F) -> Result<TestHosts>
    where
        F: Fn(usize, &Path) -> Result<Option<EngineTls>>,
    {
        if let Some(what) = unavailable() {
            return Err(host_error(format!("test hosts need {what}")));
        }
        if let Err(e) = clean_leftovers() {
            eprintln!("warning: {e}");
        }
        let main = Docker::connect_with_defaults()
            .map_err(|e| host_error(format!("the main Docker Engine: {e}")))?
            .negotiate_version()
            .await
            .map_err(|e| host_error(format!("the main Docker Engine: {e}")))?;
        let driver = main
            .info()
            .await
            .map_err(|e| host_error(format!("docker info on the main engine: {e}")))?
            .driver
            .filter(|d| !d.is_empty())
            .ok_or_else(|| host_error("the main engine reports no storage driver"))?;
        let mut hosts = TestHosts {
            hosts: Vec::new(),
            stopped: Mutex::new(false),
        };
        for i in 0..n {
            let layout = claim()?;
            let name = format!("h{}", i + 1);
            // Pushed first, so that a failure below tears it down.
            hosts.hosts.push(TestHost {
                name,
                layout: layout.clone(),
                driver: driver.clone(),
                tls: None,
                engine: Mutex::new(None),
            });
            create_network(&layout)?;
            std::fs::write(layout.dir.join("daemon.json"), "{}\n")
                .and_then(|()| {
                    std::fs::write(layout.dir.join("address"), layout.address.to_string())
                })
                .map_err(|e| host_error(format!("writing the host's files: {e}")))?;
            hosts.hosts[i].tls = tls(i, &layout.dir)?;
        }
        let starts = hosts.hosts.iter().map(TestHost::start_engine);
        for r in futures_util::future::join_all(starts).await {
            r?;
        }
        Ok(hosts)
    }

    /// Every host as a fleet member ([`TestHost::fleet_host`]).
    pub fn fleet_hosts(&self) -> Vec<bluegreen_docker::FleetHost> {
        self.hosts.iter().map(TestHost::fleet_host).collect()
    }

    /// The hosts, in order (`h1` first).
    pub fn hosts(&self) -> &[TestHost] {
        &self.hosts
    }

    /// The host named `name`.
    pub fn get(&self, name: &str) -> Option<&TestHost> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// Copies the image `tag` from the main engine into every host, concurrently.
    ///
    /// # Errors
    /// As [`TestHost::load_image`].
    pub async fn load_image(&self, main: &Docker, tag: &str) -> Result<()> {
        let loads = self.hosts.iter().map(|h| h.load_image(main, tag));
        for r in futures_util::future::join_all(loads).await {
            r?;
        }
        Ok(())
    }

    /// Stops the engines this set started (by pid), kills what is left in their namespaces,
    /// deletes the namespaces and veths, and removes the hosts' directories. Idempotent.
    ///
    /// # Errors
    /// Something could not be removed (named); the rest is still torn down.
    pub fn stop(&self) -> Result<()> {
        let Ok(mut stopped) = self.stopped.lock() else {
            return Ok(());
        };
        if *stopped {
            return Ok(());
        }
        *stopped = true;
        let mut problems = Vec::new();
        for h in &self.hosts {
            let child = h.engine.lock().ok().and_then(|mut g| g.take());
            problems.extend(teardown(&h.layout, child));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(host_error(format!(
                "stopping test hosts: {}",
                problems.join("; ")
            )))
        }
    }
}

impl Drop for TestHosts {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("{e}");
        }
    }
}

/// The demo app image on the test hosts: built on the main engine (the same files give the same
/// image, so parallel builds agree) and copied into every host.
pub const DEMO_IMAGE: &str = "bluegreen-testhosts/demo:latest";

/// Three test hosts shared by the tests of one binary, with the demo app image
/// ([`demo_image`]) loaded on each; `None` (skip, printed) when test hosts cannot run here
/// outside CI.
///
/// Rust never drops a `static`: the engines die with the process (parent-death signal), and
/// the rest is removed by the next [`clean_leftovers`].
///
/// # Panics
/// Test hosts cannot run, or do not start, in CI.
pub async fn shared() -> Option<&'static TestHosts> {
    static HOSTS: OnceCell<std::result::Result<TestHosts, String>> = OnceCell::const_new();
    if !require_available() {
        return None;
    }
    let res = HOSTS
        .get_or_init(|| async {
            let hosts = TestHosts::start(3).await.map_err(|e| e.to_string())?;
            let main = crate::docker::engine()
                .await
                .ok_or("the main Docker Engine")?;
            let tag = demo_image(&main).await.map_err(|e| e.to_string())?;
            hosts
                .load_image(&main, &tag)
                .await
                .map_err(|e| e.to_string())?;
            Ok(hosts)
        })
        .await;
    crate::gate::require_ok(res.as_ref(), "test hosts")
}

/// Builds the demo app image on `main` (once per process) and returns its tag.
///
/// # Errors
/// The build fails.
pub async fn demo_image(main: &Docker) -> Result<String> {
    static TAG: OnceCell<String> = OnceCell::const_new();
    TAG.get_or_try_init(|| async {
        let tag = DEMO_IMAGE.to_string();
        crate::docker::ScratchImage::demo(&tag, bluegreen_demo::binary_path())?
            .with_label("bluegreen.test", "1")
            .build(main)
            .await?;
        Ok(tag)
    })
    .await
    .cloned()
}
