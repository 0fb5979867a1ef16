//! A throw-away HAProxy for tests: a foreground child on loopback ports with an admin unix
//! socket, an admin TCP socket, a user-level socket and a server-state file in a temp dir.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bluegreen_core::{Endpoint, Endpoints, Slot};
use bluegreen_demo::{DemoConfig, DemoServer};
use bluegreen_haproxy::{HaproxyConfig, HaproxySwitch, RuntimeAddress};

pub const HAPROXY: &str = "/usr/sbin/haproxy";

/// `true` when HAProxy is installed; otherwise panics under CI, or prints SKIPPED and returns
/// `false` so the test returns early.
pub fn haproxy_available(test: &str) -> bool {
    if Path::new(HAPROXY).exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {HAPROXY} is missing but CI is set: install Debian's haproxy package");
    }
    eprintln!("SKIPPED: {test}: {HAPROXY} is not installed");
    false
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running HAProxy.
pub struct Haproxy {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub cfg: PathBuf,
    pub admin_sock: PathBuf,
    pub user_sock: PathBuf,
    pub state_file: PathBuf,
    pub tcp_port: u16,
    pub port: u16,
    pub config: HaproxyConfig,
    pub master_worker: bool,
}

impl Haproxy {
    /// Starts HAProxy with the crate's rendered backend (`app`, servers `blue` / `green`).
    pub fn start() -> Haproxy {
        Haproxy::start_with(false)
    }

    /// Starts HAProxy; `master_worker` uses `-Ws` (reload by SIGUSR2) instead of `-db`.
    pub fn start_with(master_worker: bool) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let admin_sock = dir.path().join("admin.sock");
        let user_sock = dir.path().join("user.sock");
        let state_file = dir.path().join("server-state");
        let cfg = dir.path().join("haproxy.cfg");
        let (tcp_port, port) = (free_port(), free_port());
        let config = HaproxyConfig::unix(&admin_sock)
            .with_health_check("/health", Duration::from_millis(100))
            .with_ready_timeout(Duration::from_secs(20))
            .with_drain_timeout(Duration::from_secs(10))
            .with_poll_interval(Duration::from_millis(20));
        let text = format!(
            "global\n{global}    stats socket ipv4@127.0.0.1:{tcp_port} level admin\n    \
             stats socket {user} mode 600 level user\n\n\
             defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    \
             timeout server 30s\n    timeout http-keep-alive 30s\n\n\
             frontend fe\n    bind 127.0.0.1:{port}\n    default_backend app\n\n{backend}",
            global = config.render_global(&state_file).unwrap(),
            user = user_sock.display(),
            backend = config.render_backend().unwrap(),
        );
        std::fs::write(&cfg, text).unwrap();
        let mut h = Haproxy {
            dir,
            child: None,
            cfg,
            admin_sock,
            user_sock,
            state_file,
            tcp_port,
            port,
            config,
            master_worker,
        };
        h.spawn();
        h
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("haproxy.log")).unwrap();
        let mode = if self.master_worker { "-Ws" } else { "-db" };
        let child = std::process::Command::new(HAPROXY)
            .arg("-f")
            .arg(&self.cfg)
            .arg(mode)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning haproxy");
        self.child = Some(child);
        self.wait_ready();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("haproxy exited with {status}:\n{}", self.log());
            }
            if std::os::unix::net::UnixStream::connect(&self.admin_sock).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "haproxy not ready within 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// A switch on the admin unix socket.
    pub fn switch(&self) -> HaproxySwitch {
        HaproxySwitch::new(self.config.clone()).unwrap()
    }

    /// A switch on the admin TCP socket.
    pub fn tcp_switch(&self) -> HaproxySwitch {
        let mut c = self.config.clone();
        c.address = RuntimeAddress::Tcp(format!("127.0.0.1:{}", self.tcp_port));
        HaproxySwitch::new(c).unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Kills HAProxy (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.master_worker {
                // SIGTERM stops the master and its workers.
                let pid = rustix::process::Pid::from_raw(c.id() as i32).unwrap();
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                let start = Instant::now();
                while c.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Reload of a `-Ws` master: SIGUSR2, then waits until the new worker answers.
    pub fn reload(&mut self) {
        assert!(self.master_worker);
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::USR2).unwrap();
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Two in-process demo apps, one per slot.
pub struct Demos {
    pub blue: DemoServer,
    pub green: DemoServer,
}

impl Demos {
    pub async fn start() -> Demos {
        Demos {
            blue: DemoServer::start(DemoConfig::new("v1", "blue"))
                .await
                .unwrap(),
            green: DemoServer::start(DemoConfig::new("v2", "green"))
                .await
                .unwrap(),
        }
    }

    pub fn endpoints(&self) -> Endpoints {
        Endpoints::new(
            vec![Endpoint::new("127.0.0.1", self.blue.local_addr().port())],
            vec![Endpoint::new("127.0.0.1", self.green.local_addr().port())],
        )
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Which slot answered one request through HAProxy.
pub async fn served_by(client: &reqwest::Client, url: &str) -> Result<Slot, String> {
    let r = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = r.status();
    let slot = r
        .headers()
        .get("x-bluegreen-slot")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let _ = r.bytes().await;
    match (status.is_success(), slot) {
        (true, Some(s)) => s.parse::<Slot>().map_err(|e| e.to_string()),
        _ => Err(format!("status {status}")),
    }
}

/// Keep-alive clients sending requests through HAProxy until stopped.
pub struct Load {
    pub stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub per_slot: Arc<[AtomicU64; 2]>,
    pub errors: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(url: String, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let per_slot = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let errors = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (url, stop, ok, failed, per_slot, errors) = (
                    url.clone(),
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    per_slot.clone(),
                    errors.clone(),
                );
                tokio::spawn(async move {
                    // One connection per client, kept alive.
                    let c = reqwest::Client::builder()
                        .no_proxy()
                        .pool_max_idle_per_host(1)
                        .timeout(Duration::from_secs(30))
                        .build()
                        .unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        match served_by(&c, &url).await {
                            Ok(slot) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                per_slot[slot as usize].fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                let mut errs = errors.lock().unwrap();
                                if errs.len() < 10 {
                                    errs.push(e);
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            per_slot,
            errors,
            tasks,
        }
    }

    /// Stops the clients; returns (ok, failed).
    pub async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
