//! A throw-away nginx: a complete, self-contained configuration around either mode of
//! `bluegreen-nginx` (Dynamic: the Lua snippet; Reload: the managed include), run in the
//! foreground as a child process and stopped on drop. For tests, benchmarks and examples.
//!
//! Production setups include the rendered snippet (Dynamic) or the managed include (Reload) in
//! their own `nginx.conf` instead. The listen and control ports come from the configuration file,
//! so [`start_dynamic`] and [`start_reload`] choose and retry them as [`crate::port`] explains:
//! nginx is up when the child itself listens on every port of its configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bluegreen_nginx::{NginxCommand, NginxDynamicConfig};
use rustix::process::{Pid, Signal};

use crate::port::{self, StartError};

/// Where Debian's `libnginx-mod-http-lua` puts its modules.
pub const LUA_MODULE_DIR: &str = "/usr/lib/nginx/modules";

/// Bound on nginx becoming ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// True when an `nginx` binary runs (`nginx -v`).
pub fn nginx_available() -> bool {
    Command::new("nginx")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// True when nginx and the Lua module (with its NDK dependency) are installed.
pub fn lua_available() -> bool {
    nginx_available()
        && Path::new(LUA_MODULE_DIR)
            .join("ngx_http_lua_module.so")
            .exists()
        && Path::new(LUA_MODULE_DIR)
            .join("ndk_http_module.so")
            .exists()
}

/// The gate: `true` when nginx (with the Lua module when `lua`) is installed; otherwise panics in
/// CI, or prints `SKIPPED` and returns `false`.
pub fn available(lua: bool) -> bool {
    if lua {
        crate::gate::require(lua_available(), "nginx with libnginx-mod-http-lua")
    } else {
        crate::gate::require(nginx_available(), "nginx")
    }
}

/// The `nginx` command line of a standalone configuration in `prefix`: known before nginx starts,
/// for a `NginxReloadConfig`.
pub fn command(prefix: &Path) -> NginxCommand {
    NginxCommand::new(prefix.join("nginx.conf")).with_prefix(prefix)
}

/// Creates `dir` and writes `<dir>/upstream.conf`: `upstream <name>` with the one `server` and
/// `keepalive` idle connections kept to it; returns its path, for [`start_reload`]'s include.
///
/// # Errors
/// The directory or the file cannot be written.
pub fn write_upstream(
    dir: &Path,
    name: &str,
    server: SocketAddr,
    keepalive: u32,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let include = dir.join("upstream.conf");
    std::fs::write(
        &include,
        format!("upstream {name} {{ server {server}; keepalive {keepalive}; }}\n"),
    )?;
    Ok(include)
}

/// The pid file of a standalone configuration in `prefix`.
pub fn pid_file(prefix: &Path) -> PathBuf {
    prefix.join("nginx.pid")
}

/// A complete `nginx.conf` serving one site on `listen`, with all paths inside `prefix`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StandaloneConfig {
    /// Prefix directory: config, pid file, logs and temp paths live here.
    pub prefix: PathBuf,
    /// The site's listener.
    pub listen: SocketAddr,
    /// Other ports the configuration listens on (Dynamic mode's control listener).
    pub other_ports: Vec<u16>,
    /// `worker_processes`.
    pub workers: u32,
    /// Load the Lua modules.
    pub lua: bool,
    /// http-level text (the Dynamic snippet, or an `include` of the Reload file).
    pub http: String,
    /// Directives of the site's `location /`.
    pub location: String,
    /// `worker_shutdown_timeout`: how long old workers keep connections after a reload
    /// (default 10 s).
    pub worker_shutdown_timeout: std::time::Duration,
}

impl StandaloneConfig {
    /// Dynamic mode: the snippet inline, the site proxying to the Lua-balanced upstream.
    pub fn dynamic(
        prefix: impl Into<PathBuf>,
        listen: SocketAddr,
        config: &NginxDynamicConfig,
    ) -> Self {
        StandaloneConfig {
            prefix: prefix.into(),
            listen,
            other_ports: vec![config.control.port()],
            workers: 2,
            lua: true,
            http: config.render_snippet(),
            location: config.render_location(),
            worker_shutdown_timeout: std::time::Duration::from_secs(10),
        }
    }

    /// Reload mode: `include <include>;` and the site proxying to `upstream` (stock nginx).
    pub fn reload(
        prefix: impl Into<PathBuf>,
        listen: SocketAddr,
        include: &Path,
        upstream: &str,
    ) -> Self {
        StandaloneConfig {
            prefix: prefix.into(),
            listen,
            other_ports: Vec::new(),
            workers: 2,
            lua: false,
            http: format!("include {};\n", include.display()),
            location: format!(
                "proxy_pass http://{upstream};\nproxy_http_version 1.1;\nproxy_set_header Connection \"\";\n"
            ),
            worker_shutdown_timeout: std::time::Duration::from_secs(10),
        }
    }

    /// Proxying WebSockets too: `Upgrade` is passed on and `Connection` is `upgrade` when the
    /// client asked for one (empty otherwise, keeping upstream keep-alive).
    pub fn with_websockets(mut self) -> Self {
        self.http.push_str(
            "map $http_upgrade $bg_connection_upgrade {\n    default upgrade;\n    '' '';\n}\n",
        );
        self.location = self.location.replace(
            "proxy_set_header Connection \"\";",
            "proxy_set_header Upgrade $http_upgrade;\nproxy_set_header Connection $bg_connection_upgrade;",
        );
        self
    }

    /// With `worker_shutdown_timeout`.
    pub fn with_worker_shutdown_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.worker_shutdown_timeout = timeout;
        self
    }

    /// With `worker_processes`.
    pub fn with_workers(mut self, workers: u32) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// `<prefix>/nginx.conf`.
    pub fn config_path(&self) -> PathBuf {
        self.prefix.join("nginx.conf")
    }

    /// `<prefix>/nginx.pid` ([`pid_file`]).
    pub fn pid_file(&self) -> PathBuf {
        pid_file(&self.prefix)
    }

    /// `<prefix>/logs/error.log`.
    pub fn error_log(&self) -> PathBuf {
        self.prefix.join("logs").join("error.log")
    }

    /// The `nginx` command line for this configuration ([`command`]).
    pub fn command(&self) -> NginxCommand {
        command(&self.prefix)
    }

    /// The configuration text.
    pub fn render(&self) -> String {
        let p = self.prefix.display();
        let mut out = String::new();
        // Workers of a root master switch to `nobody` unless told otherwise; the temp files they
        // write live in the prefix, so keep them root when the master is.
        if rustix::process::geteuid().is_root() {
            out.push_str("user root;\n");
        }
        out.push_str(&format!(
            "worker_processes {};\nerror_log {p}/logs/error.log notice;\npid {p}/nginx.pid;\n",
            self.workers
        ));
        if self.lua {
            out.push_str(&format!(
                "load_module {LUA_MODULE_DIR}/ndk_http_module.so;\nload_module {LUA_MODULE_DIR}/ngx_http_lua_module.so;\n"
            ));
        }
        out.push_str(&format!(
            "worker_shutdown_timeout {}ms;\nevents {{ worker_connections 4096; }}\nhttp {{\n",
            self.worker_shutdown_timeout.as_millis()
        ));
        out.push_str("    access_log off;\n");
        for t in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            out.push_str(&format!("    {t}_temp_path {p}/tmp/{t};\n"));
        }
        out.push_str("    keepalive_requests 1000000;\n");
        out.push_str(&self.http);
        out.push_str(&format!(
            "server {{\n    listen {};\n    location / {{\n{}    }}\n}}\n}}\n",
            self.listen, self.location
        ));
        out
    }

    /// Creates the prefix's directories and writes `nginx.conf`; returns its path.
    ///
    /// # Errors
    /// The files cannot be written.
    pub fn write(&self) -> std::io::Result<PathBuf> {
        for d in [self.prefix.join("logs"), self.prefix.join("tmp")] {
            std::fs::create_dir_all(&d)?;
        }
        let path = self.config_path();
        std::fs::write(&path, self.render())?;
        Ok(path)
    }
}

/// nginx running in the foreground (`-g 'daemon off;'`) as a child process; stopped on drop.
#[derive(Debug)]
pub struct NginxProcess {
    child: Child,
    config: StandaloneConfig,
}

impl NginxProcess {
    /// Writes `config` and starts nginx on it, on the ports the configuration names (no retry:
    /// for restarting a server on the ports it had); returns once the child listens on every one
    /// (bounded by 20 s).
    ///
    /// # Errors
    /// nginx cannot be started, exits (its stderr is in the error), or does not come up in time.
    pub fn start(config: StandaloneConfig) -> Result<NginxProcess, StartError> {
        let failed = |what: &str, e: std::io::Error| StartError::Failed(format!("{what}: {e}"));
        config
            .write()
            .map_err(|e| failed("writing nginx.conf", e))?;
        let stderr_path = config.prefix.join("logs").join("stderr.log");
        let stderr =
            std::fs::File::create(&stderr_path).map_err(|e| failed("creating stderr.log", e))?;
        let cmd = config.command();
        let child = Command::new(&cmd.binary)
            .args(cmd.base_args())
            .arg("-g")
            .arg("daemon off;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| failed(&format!("starting {}", cmd.binary.display()), e))?;
        let mut ports = vec![config.listen.port()];
        ports.extend(&config.other_ports);
        let mut me = NginxProcess { child, config };
        let pid_file = me.config.pid_file();
        port::wait_serving(
            &mut me.child,
            &ports,
            READY_TIMEOUT,
            "nginx",
            || pid_file.exists(),
            || {
                std::fs::read_to_string(&stderr_path)
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            },
        )?;
        Ok(me)
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The configuration it runs.
    pub fn config(&self) -> &StandaloneConfig {
        &self.config
    }

    /// The site's address.
    pub fn listen(&self) -> SocketAddr {
        self.config.listen
    }

    /// Stops nginx (SIGTERM, then SIGKILL after 5 s) and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Some(pid) = Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NginxProcess {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// nginx in Dynamic mode in `prefix`: the site and the control listener on fresh loopback ports,
/// for the upstream `name` with a generated token; `configure` adjusts the switch configuration
/// (e.g. a state file). Returns nginx and the configuration its switch uses.
///
/// # Errors
/// The configuration is invalid or nginx does not start.
pub fn start_dynamic(
    prefix: &Path,
    name: &str,
    configure: impl Fn(NginxDynamicConfig) -> Result<NginxDynamicConfig, bluegreen_core::Error>,
) -> Result<(NginxProcess, NginxDynamicConfig), StartError> {
    start_dynamic_site(prefix, name, configure, |site| site)
}

/// [`start_dynamic`], with `site` changing the nginx configuration around it (e.g.
/// [`StandaloneConfig::with_websockets`]).
///
/// # Errors
/// nginx does not start.
pub fn start_dynamic_site(
    prefix: &Path,
    name: &str,
    configure: impl Fn(NginxDynamicConfig) -> Result<NginxDynamicConfig, bluegreen_core::Error>,
    site: impl Fn(StandaloneConfig) -> StandaloneConfig,
) -> Result<(NginxProcess, NginxDynamicConfig), StartError> {
    let invalid = |e: bluegreen_core::Error| StartError::Failed(format!("dynamic config: {e}"));
    let token = NginxDynamicConfig::generate_token().map_err(invalid)?;
    port::start_on_fresh_ports(|[listen, control]| {
        let config = NginxDynamicConfig::new(name, loopback(control), token.clone())
            .and_then(&configure)
            .map_err(invalid)?;
        let nginx = NginxProcess::start(site(StandaloneConfig::dynamic(
            prefix,
            loopback(listen),
            &config,
        )))?;
        Ok((nginx, config))
    })
}

/// Stock nginx in `prefix` including `include` (which must exist) and proxying to `upstream`,
/// the site on a fresh loopback port; `workers` sets `worker_processes` when given.
///
/// # Errors
/// nginx does not start.
pub fn start_reload(
    prefix: &Path,
    include: &Path,
    upstream: &str,
    workers: Option<u32>,
) -> Result<NginxProcess, StartError> {
    start_reload_site(prefix, include, upstream, |c| match workers {
        Some(w) => c.with_workers(w),
        None => c,
    })
}

/// Stock nginx (Reload mode's configuration) in `prefix` proxying to the one `upstream` with 64
/// idle keep-alive connections to it and `workers` worker processes: the reference the
/// benchmarks compare the embedded proxy with.
///
/// # Errors
/// The include cannot be written or nginx does not start.
pub fn start_reverse_proxy(
    prefix: &Path,
    upstream: SocketAddr,
    workers: u32,
) -> Result<NginxProcess, StartError> {
    let include = write_upstream(prefix, "app", upstream, 64)
        .map_err(|e| StartError::Failed(format!("writing the upstream include: {e}")))?;
    start_reload(prefix, &include, "app", Some(workers))
}

/// [`start_reload`], with `site` changing the nginx configuration (e.g.
/// [`StandaloneConfig::with_websockets`]).
///
/// # Errors
/// nginx does not start.
pub fn start_reload_site(
    prefix: &Path,
    include: &Path,
    upstream: &str,
    site: impl Fn(StandaloneConfig) -> StandaloneConfig,
) -> Result<NginxProcess, StartError> {
    port::start_on_fresh_ports(|[listen]| {
        NginxProcess::start(site(StandaloneConfig::reload(
            prefix,
            loopback(listen),
            include,
            upstream,
        )))
    })
}
