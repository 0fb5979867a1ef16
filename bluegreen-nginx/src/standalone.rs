//! A complete, self-contained nginx configuration around either mode, and a guard that runs nginx
//! on it as a child process: for tests, benchmarks and local trials.
//!
//! Production setups include the rendered snippet (Dynamic) or the managed include (Reload) in
//! their own `nginx.conf` instead.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use crate::dynamic::NginxDynamicConfig;
use crate::error::NginxError;
use crate::master::NginxCommand;

/// Where Debian's `libnginx-mod-http-lua` puts its modules.
pub const LUA_MODULE_DIR: &str = "/usr/lib/nginx/modules";

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

/// A complete `nginx.conf` serving one site on `listen`, with all paths inside `prefix`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StandaloneConfig {
    /// Prefix directory: config, pid file, logs and temp paths live here.
    pub prefix: PathBuf,
    /// The site's listener.
    pub listen: SocketAddr,
    /// `worker_processes`.
    pub workers: u32,
    /// Load the Lua modules.
    pub lua: bool,
    /// http-level text (the Dynamic snippet, or an `include` of the Reload file).
    pub http: String,
    /// Directives of the site's `location /`.
    pub location: String,
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
            workers: 2,
            lua: true,
            http: config.render_snippet(),
            location: config.render_location(),
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
            workers: 2,
            lua: false,
            http: format!("include {};\n", include.display()),
            location: format!(
                "proxy_pass http://{upstream};\nproxy_http_version 1.1;\nproxy_set_header Connection \"\";\n"
            ),
        }
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

    /// `<prefix>/nginx.pid`.
    pub fn pid_file(&self) -> PathBuf {
        self.prefix.join("nginx.pid")
    }

    /// `<prefix>/logs/error.log`.
    pub fn error_log(&self) -> PathBuf {
        self.prefix.join("logs").join("error.log")
    }

    /// The `nginx` command line for this configuration.
    pub fn command(&self) -> NginxCommand {
        NginxCommand::new(self.config_path()).with_prefix(&self.prefix)
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
        out.push_str("worker_shutdown_timeout 10s;\nevents { worker_connections 4096; }\nhttp {\n");
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
    pub fn write(&self) -> Result<PathBuf, NginxError> {
        for d in [self.prefix.join("logs"), self.prefix.join("tmp")] {
            std::fs::create_dir_all(&d).map_err(|e| NginxError::fs("creating", &d, e))?;
        }
        let path = self.config_path();
        std::fs::write(&path, self.render()).map_err(|e| NginxError::fs("writing", &path, e))?;
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
    /// Writes `config` and starts nginx on it; returns once the pid file exists and the site's
    /// listener accepts connections (bounded by 20 s).
    ///
    /// # Errors
    /// nginx cannot be started, exits, or does not come up in time (its stderr is in the error).
    pub fn start(config: StandaloneConfig) -> Result<NginxProcess, NginxError> {
        config.write()?;
        let stderr_path = config.prefix.join("logs").join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(|e| NginxError::fs("creating", &stderr_path, e))?;
        let cmd = config.command();
        let child = Command::new(&cmd.binary)
            .args(cmd.base_args())
            .arg("-g")
            .arg("daemon off;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| NginxError::io(format!("starting {}", cmd.binary.display()), e))?;
        let mut me = NginxProcess { child, config };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = me.child.try_wait() {
                let mut text = String::new();
                let _ =
                    std::fs::File::open(&stderr_path).and_then(|mut f| f.read_to_string(&mut text));
                return Err(NginxError::io(
                    "starting nginx",
                    std::io::Error::other(format!("nginx exited with {status}: {}", text.trim())),
                ));
            }
            let up = me.config.pid_file().exists()
                && TcpStream::connect_timeout(&me.config.listen, Duration::from_millis(200))
                    .is_ok();
            if up {
                return Ok(me);
            }
            if Instant::now() > deadline {
                return Err(NginxError::io(
                    "starting nginx",
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("not listening on {} after 20 s", me.config.listen),
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The configuration it runs.
    pub fn config(&self) -> &StandaloneConfig {
        &self.config
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
