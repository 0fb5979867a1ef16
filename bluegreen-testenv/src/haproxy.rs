//! A throw-away HAProxy: a foreground child on loopback ports with an admin unix socket, an admin
//! TCP socket, a user-level socket and a server-state file in a temp dir, running the backend the
//! crate renders (`app`, servers `blue` / `green`). Stopped on drop.
//!
//! Its two TCP ports (the frontend and the admin socket) come from a configuration file, so they
//! are chosen and retried as [`crate::port`] explains: HAProxy is up when the child itself listens
//! on both ports and answers on its admin socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use bluegreen_haproxy::{HaproxyConfig, HaproxySwitch, RuntimeAddress};

use crate::port::{self, StartError};

/// Bound on HAProxy becoming ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The `haproxy` binary: Debian's `/usr/sbin/haproxy`, `/usr/local/sbin/haproxy`, or the one on
/// `PATH`.
pub fn binary() -> Option<PathBuf> {
    crate::find_binary(&["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"], "haproxy")
}

/// `true` when HAProxy is installed; otherwise panics in CI, or prints `SKIPPED` and returns
/// `false` (the test returns early). `test` names the caller in the message.
pub fn available(test: &str) -> bool {
    crate::gate::require(
        binary().is_some(),
        &format!("{test}: HAProxy (Debian package haproxy)"),
    )
}

/// The configuration the tests' switch uses: health checks every 100 ms, short bounds.
pub fn test_config(admin_sock: &Path) -> HaproxyConfig {
    HaproxyConfig::unix(admin_sock)
        .with_health_check("/health", Duration::from_millis(100))
        .with_ready_timeout(Duration::from_secs(20))
        .with_drain_timeout(Duration::from_secs(10))
        .with_poll_interval(Duration::from_millis(20))
}

/// A running HAProxy.
#[derive(Debug)]
pub struct Haproxy {
    /// Its directory (config, sockets, state file, log).
    pub dir: tempfile::TempDir,
    /// The child (the master with `master_worker`).
    pub child: Option<Child>,
    /// `haproxy.cfg`.
    pub cfg: PathBuf,
    /// The admin unix socket.
    pub admin_sock: PathBuf,
    /// A user-level (not admin) unix socket.
    pub user_sock: PathBuf,
    /// The server-state file.
    pub state_file: PathBuf,
    /// The admin TCP socket's port.
    pub tcp_port: u16,
    /// The frontend's port.
    pub port: u16,
    /// The switch configuration on the admin unix socket.
    pub config: HaproxyConfig,
    /// Started with `-Ws` (reload by SIGUSR2) instead of `-db`.
    pub master_worker: bool,
}

impl Haproxy {
    /// Starts HAProxy with [`test_config`].
    ///
    /// # Panics
    /// HAProxy does not start.
    pub fn start() -> Haproxy {
        Haproxy::start_with(false)
    }

    /// Starts HAProxy; `master_worker` uses `-Ws` (reload by SIGUSR2) instead of `-db`.
    ///
    /// # Panics
    /// HAProxy does not start.
    pub fn start_with(master_worker: bool) -> Haproxy {
        Haproxy::launch(master_worker, test_config).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts HAProxy on the switch configuration `config` makes from the admin socket's path.
    ///
    /// # Errors
    /// HAProxy is not installed, the configuration cannot be rendered, or it does not start.
    pub fn launch(
        master_worker: bool,
        config: impl FnOnce(&Path) -> HaproxyConfig,
    ) -> Result<Haproxy, StartError> {
        let bin = binary().ok_or_else(|| StartError::Failed("HAProxy is not installed".into()))?;
        let dir = tempfile::Builder::new()
            .prefix("bg-haproxy-")
            .tempdir()
            .map_err(|e| StartError::Failed(format!("temp dir: {e}")))?;
        let admin_sock = dir.path().join("admin.sock");
        let config = config(&admin_sock);
        let mut h = Haproxy {
            cfg: dir.path().join("haproxy.cfg"),
            user_sock: dir.path().join("user.sock"),
            state_file: dir.path().join("server-state"),
            admin_sock,
            dir,
            child: None,
            tcp_port: 0,
            port: 0,
            config,
            master_worker,
        };
        port::start_on_fresh_ports(|[tcp_port, port]| {
            h.tcp_port = tcp_port;
            h.port = port;
            h.write_config()?;
            h.spawn(&bin)
        })?;
        Ok(h)
    }

    fn write_config(&self) -> Result<(), StartError> {
        let render = |e: bluegreen_core::Error| StartError::Failed(format!("rendering: {e}"));
        let text = format!(
            "global\n{global}    stats socket ipv4@127.0.0.1:{tcp_port} level admin\n    \
             stats socket {user} mode 600 level user\n\n\
             defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    \
             timeout server 30s\n    timeout http-keep-alive 30s\n\n\
             frontend fe\n    bind 127.0.0.1:{port}\n    default_backend {name}\n\n{backend}",
            global = self
                .config
                .render_global(&self.state_file)
                .map_err(render)?,
            tcp_port = self.tcp_port,
            user = self.user_sock.display(),
            port = self.port,
            name = self.config.backend(),
            backend = self.config.render_backend().map_err(render)?,
        );
        std::fs::write(&self.cfg, text)
            .map_err(|e| StartError::Failed(format!("writing {}: {e}", self.cfg.display())))
    }

    fn spawn(&mut self, bin: &Path) -> Result<(), StartError> {
        let failed = |what: &str, e: std::io::Error| StartError::Failed(format!("{what}: {e}"));
        let log = std::fs::File::create(self.dir.path().join("haproxy.log"))
            .map_err(|e| failed("creating the log", e))?;
        let mode = if self.master_worker { "-Ws" } else { "-db" };
        let child = std::process::Command::new(bin)
            .arg("-f")
            .arg(&self.cfg)
            .arg(mode)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| failed("log", e))?)
            .stderr(log)
            .spawn()
            .map_err(|e| failed("spawning haproxy", e))?;
        let log_path = self.dir.path().join("haproxy.log");
        let admin_sock = self.admin_sock.clone();
        let child = self.child.insert(child);
        let res = port::wait_serving(
            child,
            &[self.port, self.tcp_port],
            READY_TIMEOUT,
            "haproxy",
            || std::os::unix::net::UnixStream::connect(&admin_sock).is_ok(),
            || std::fs::read_to_string(&log_path).unwrap_or_default(),
        );
        if res.is_err() {
            self.kill();
        }
        res
    }

    /// Its log (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }

    /// The child's pid.
    ///
    /// # Panics
    /// After [`Haproxy::kill`].
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("haproxy is running").id()
    }

    /// A switch on the admin unix socket.
    ///
    /// # Panics
    /// The configuration is invalid.
    pub fn switch(&self) -> HaproxySwitch {
        HaproxySwitch::new(self.config.clone()).unwrap()
    }

    /// A switch on the admin TCP socket.
    ///
    /// # Panics
    /// The configuration is invalid.
    pub fn tcp_switch(&self) -> HaproxySwitch {
        let mut c = self.config.clone();
        c.address = RuntimeAddress::Tcp(format!("127.0.0.1:{}", self.tcp_port));
        HaproxySwitch::new(c).unwrap()
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The frontend's address.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kills HAProxy (SIGTERM first for a master, which stops its workers) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.master_worker {
                if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
                let start = Instant::now();
                while matches!(c.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Reload of a `-Ws` master: SIGUSR2.
    ///
    /// # Panics
    /// Not started with `master_worker`, or the signal cannot be sent.
    pub fn reload(&mut self) {
        assert!(self.master_worker, "reload needs a -Ws master");
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("a pid");
        rustix::process::kill_process(pid, rustix::process::Signal::USR2).expect("SIGUSR2");
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.kill();
    }
}
