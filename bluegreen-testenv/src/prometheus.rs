//! A throw-away Prometheus server (Debian package `prometheus`): a foreground child on a loopback
//! port with a generated configuration scraping one target (e.g. the embedded proxy's admin
//! `/metrics`, with its bearer token in a private file) every `scrape_interval`, and its storage in
//! a temp dir. Stopped on drop.
//!
//! Also [`check_metrics`]: `promtool check metrics` on an exposition text, when the package ships
//! `promtool`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::port::{self, StartError};

/// Bound on Prometheus becoming ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The `prometheus` binary: Debian's `/usr/bin/prometheus` or the one on `PATH`.
pub fn binary() -> Option<PathBuf> {
    crate::find_binary(&["/usr/bin/prometheus"], "prometheus")
}

/// The `promtool` binary (shipped in the same Debian package).
pub fn promtool() -> Option<PathBuf> {
    crate::find_binary(&["/usr/bin/promtool"], "promtool")
}

/// `true` when Prometheus is installed; otherwise panics in CI, or prints `SKIPPED` and returns
/// `false` (the test returns early). `test` names the caller in the message.
pub fn available(test: &str) -> bool {
    crate::gate::require(
        binary().is_some(),
        &format!("{test}: Prometheus (Debian package prometheus)"),
    )
}

/// Runs `promtool check metrics` on `text` (a Prometheus text exposition). `Ok` with promtool's
/// findings when it has none to report; `None` when promtool is not installed.
///
/// # Errors
/// promtool's complaints (lint or parse errors), or why it could not run.
pub fn check_metrics(text: &str) -> Option<Result<(), String>> {
    let bin = promtool()?;
    let run = || -> Result<(), String> {
        let mut child = Command::new(&bin)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning promtool: {e}"))?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(text.as_bytes())
            .map_err(|e| format!("writing to promtool: {e}"))?;
        let out = child
            .wait_with_output()
            .map_err(|e| format!("waiting for promtool: {e}"))?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() && said.trim().is_empty() {
            Ok(())
        } else {
            Err(format!("promtool check metrics ({}): {said}", out.status))
        }
    };
    Some(run())
}

/// What Prometheus scrapes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ScrapeTarget {
    /// `host:port` of the target.
    pub addr: SocketAddr,
    /// The metrics path (e.g. `/metrics`).
    pub path: String,
    /// A bearer token, written to a private file Prometheus reads.
    pub bearer_token: Option<String>,
    /// The scrape interval.
    pub interval: Duration,
}

impl ScrapeTarget {
    /// `http://addr/metrics` every 500 ms, without a token.
    pub fn new(addr: SocketAddr) -> Self {
        ScrapeTarget {
            addr,
            path: "/metrics".into(),
            bearer_token: None,
            interval: Duration::from_millis(500),
        }
    }

    /// With a bearer token.
    pub fn with_bearer_token(mut self, token: impl Into<String>) -> Self {
        self.bearer_token = Some(token.into());
        self
    }

    /// With another scrape interval.
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }
}

/// A running Prometheus.
#[derive(Debug)]
pub struct Prometheus {
    /// Its directory (config, token file, storage, log).
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// Its HTTP port on 127.0.0.1.
    pub port: u16,
}

impl Prometheus {
    /// Starts Prometheus scraping `target`.
    ///
    /// # Errors
    /// Prometheus is not installed, or it does not start.
    pub fn start(target: &ScrapeTarget) -> Result<Prometheus, StartError> {
        let bin =
            binary().ok_or_else(|| StartError::Failed("Prometheus is not installed".into()))?;
        let dir = tempfile::Builder::new()
            .prefix("bg-prometheus-")
            .tempdir()
            .map_err(|e| StartError::Failed(format!("temp dir: {e}")))?;
        write_config(dir.path(), target)?;
        let mut p = Prometheus {
            dir,
            child: None,
            port: 0,
        };
        port::start_on_fresh_ports(|[port]| {
            p.port = port;
            p.spawn(&bin)
        })?;
        Ok(p)
    }

    fn spawn(&mut self, bin: &Path) -> Result<(), StartError> {
        let failed = |what: &str, e: std::io::Error| StartError::Failed(format!("{what}: {e}"));
        let log_path = self.dir.path().join("prometheus.log");
        let log = std::fs::File::create(&log_path).map_err(|e| failed("creating the log", e))?;
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                self.dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| failed("log", e))?)
            .stderr(log)
            .spawn()
            .map_err(|e| failed("spawning prometheus", e))?;
        let addr = self.addr();
        let child = self.child.insert(child);
        let res = port::wait_serving(
            child,
            &[addr.port()],
            READY_TIMEOUT,
            "prometheus",
            || {
                std::net::TcpStream::connect(addr).is_ok()
                    && std::fs::read_to_string(&log_path)
                        .map(|l| l.contains("Server is ready to receive web requests"))
                        .unwrap_or(false)
            },
            || std::fs::read_to_string(&log_path).unwrap_or_default(),
        );
        if res.is_err() {
            self.kill();
        }
        res
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Its base URL (`http://127.0.0.1:port`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Stops it and waits.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.kill();
    }
}

fn write_config(dir: &Path, target: &ScrapeTarget) -> Result<(), StartError> {
    let failed = |what: &Path, e: std::io::Error| {
        StartError::Failed(format!("writing {}: {e}", what.display()))
    };
    let interval = format!("{}ms", target.interval.as_millis().max(100));
    let mut job = format!(
        "  - job_name: bluegreen\n    scrape_interval: {interval}\n    scrape_timeout: {interval}\n    \
         metrics_path: {path:?}\n    static_configs:\n      - targets: [\"{addr}\"]\n",
        path = target.path,
        addr = target.addr,
    );
    if let Some(token) = &target.bearer_token {
        let file = dir.join("token");
        std::fs::write(&file, token).map_err(|e| failed(&file, e))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| failed(&file, e))?;
        job.push_str(&format!(
            "    authorization:\n      type: Bearer\n      credentials_file: {:?}\n",
            file.display().to_string()
        ));
    }
    let text = format!(
        "global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\nscrape_configs:\n{job}"
    );
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, text).map_err(|e| failed(&path, e))
}
