//! Throw-away PostgreSQL clusters: `initdb` in a temp dir, the server a child process on a
//! loopback port, stopped (and the directory deleted) on drop.
//!
//! The server binaries are found without a hard-coded version ([`bin_dir`]). As root, everything
//! runs as the `postgres` user through `runuser` (the server refuses to run as root); otherwise as
//! the current user. The port is chosen and retried as [`crate::port`] explains: the cluster is up
//! when the child itself listens on the port and its log says it accepts connections.
//!
//! Each call starts its own cluster; tests that need one cluster for the whole binary keep it in a
//! `static` `OnceCell`.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bluegreen_postgres::PostgresConfig;
use tokio_postgres::Client;

use crate::port::{self, StartError};

/// The programs a cluster and the tests use.
const PROGRAMS: [&str; 6] = [
    "initdb",
    "postgres",
    "pg_ctl",
    "pg_dump",
    "pg_restore",
    "psql",
];

/// Bound on the server becoming ready.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Where the server binaries are: `pg_config --bindir` when `initdb` is there; else the directory
/// of the `initdb` found on `PATH` (symlinks resolved, so `pg_dump` and friends are its
/// siblings); else the newest `/usr/lib/postgresql/<N>/bin` (Debian's `pg_config` belongs to the
/// client package and may report `/usr/bin`, where no server binary is). `None` when none holds
/// `initdb`.
pub fn bin_dir() -> Option<PathBuf> {
    let has_initdb = |d: &Path| d.join("initdb").is_file();
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(d) = from_pg_config.filter(|d| has_initdb(d)) {
        return Some(d);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("initdb"))
            .find(|p| p.is_file())
            .and_then(|p| std::fs::canonicalize(p).ok())
            .and_then(|p| p.parent().map(Path::to_path_buf))
    });
    if let Some(d) = on_path.filter(|d| has_initdb(d)) {
        return Some(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    versions.into_iter().map(|(_, d)| d).find(|d| has_initdb(d))
}

/// How clients authenticate over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Auth {
    /// `scram-sha-256` with a random password holding a quote and a space (it proves the password
    /// is passed safely everywhere).
    Password,
    /// `trust`: no password (the CLI tests' connection settings carry none).
    Trust,
}

/// What kind of cluster to start.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterOptions {
    /// Client authentication over TCP.
    pub auth: Auth,
    /// `fsync` and friends on (benchmarks); off by default (tests).
    pub durable: bool,
    /// Extra `name=value` settings; they override the defaults.
    pub settings: Vec<String>,
    /// The server binaries' directory; [`bin_dir`] when `None`.
    pub bin_dir: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            auth: Auth::Password,
            durable: false,
            settings: Vec::new(),
            bin_dir: None,
        }
    }
}

impl ClusterOptions {
    /// Password authentication, not durable, `wal_level=logical` and room for replication.
    pub fn new() -> Self {
        Self::default()
    }

    /// With trust authentication.
    pub fn trust(mut self) -> Self {
        self.auth = Auth::Trust;
        self
    }

    /// With `fsync` on (as a production server would run).
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// With the server binaries in `dir`.
    pub fn with_bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// With extra `name=value` settings.
    pub fn with_settings<S: AsRef<str>>(mut self, settings: &[S]) -> Self {
        self.settings
            .extend(settings.iter().map(|s| s.as_ref().to_string()));
        self
    }
}

/// A running throw-away cluster. Its `Debug` leaves the password out.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    durable: bool,
    /// The loopback port it listens on.
    pub port: u16,
    /// The `postgres` user's password (empty with [`Auth::Trust`]).
    pub password: String,
    child: Option<Child>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir.path())
            .field("bin", &self.bin)
            .field("port", &self.port)
            .field("password", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The last 2000 characters of `s`.
fn tail(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    chars[chars.len().saturating_sub(2000)..].iter().collect()
}

/// `(uid, gid)` of the `postgres` user.
fn postgres_ids() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres") && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })
}

fn random_password() -> Result<String, String> {
    let mut b = [0u8; 12];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(format!(
        "pw '{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    ))
}

/// Why a cluster cannot be started here (with the binaries in `bin`, or found by [`bin_dir`]), or
/// `None` when it can.
pub fn unavailable(bin: Option<&Path>) -> Option<String> {
    let Some(bin) = bin.map(Path::to_path_buf).or_else(bin_dir) else {
        return Some(
            "the PostgreSQL server binaries (no initdb via pg_config, PATH or /usr/lib/postgresql)"
                .into(),
        );
    };
    if let Some(p) = PROGRAMS.iter().map(|p| bin.join(p)).find(|p| !p.exists()) {
        return Some(format!("PostgreSQL's {}", p.display()));
    }
    if rustix::process::geteuid().is_root() {
        if !Path::new("/usr/sbin/runuser").exists() && !Path::new("/sbin/runuser").exists() {
            return Some("runuser (PostgreSQL cannot run as root)".into());
        }
        if postgres_ids().is_none() {
            return Some("the `postgres` user (PostgreSQL cannot run as root)".into());
        }
    }
    None
}

impl Cluster {
    /// Starts a test cluster ([`ClusterOptions::new`]), or returns `None` (skip, printed) when
    /// PostgreSQL is missing outside CI.
    ///
    /// # Panics
    /// PostgreSQL is missing in CI, or the cluster does not start.
    pub async fn start() -> Option<Cluster> {
        Self::start_options(ClusterOptions::new()).await
    }

    /// [`Cluster::start`] with extra `name=value` settings (they override the defaults).
    pub async fn start_with(settings: &[&str]) -> Option<Cluster> {
        Self::start_options(ClusterOptions::new().with_settings(settings)).await
    }

    /// [`Cluster::start`] with `options`.
    pub async fn start_options(options: ClusterOptions) -> Option<Cluster> {
        tokio::task::spawn_blocking(move || Self::start_blocking(options))
            .await
            .expect("the cluster start panicked")
    }

    /// [`Cluster::start_options`] for synchronous tests.
    pub fn start_blocking(options: ClusterOptions) -> Option<Cluster> {
        if let Some(what) = unavailable(options.bin_dir.as_deref()) {
            crate::gate::require(false, &what);
            return None;
        }
        Some(Self::launch(options).unwrap_or_else(|e| panic!("PostgreSQL did not start: {e}")))
    }

    /// Starts a cluster, with no skip: for benchmarks.
    ///
    /// # Errors
    /// PostgreSQL is missing ([`unavailable`]), `initdb` fails, or the server does not come up.
    pub fn launch(options: ClusterOptions) -> Result<Cluster, String> {
        if let Some(what) = unavailable(options.bin_dir.as_deref()) {
            return Err(format!("{what} is missing"));
        }
        let bin = options
            .bin_dir
            .clone()
            .or_else(bin_dir)
            .ok_or("no PostgreSQL server binaries")?;
        let as_postgres = rustix::process::geteuid().is_root();
        let dir = tempfile::Builder::new()
            .prefix("bg-pg-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let root = dir.path().to_path_buf();
        let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("chmod", e))?;
        let sock = root.join("sock");
        std::fs::create_dir(&sock).map_err(|e| io("mkdir", e))?;
        let password = match options.auth {
            Auth::Password => random_password()?,
            Auth::Trust => String::new(),
        };
        let pwfile = root.join("pw");
        std::fs::write(&pwfile, format!("{password}\n")).map_err(|e| io("pwfile", e))?;
        if as_postgres {
            let (uid, gid) = postgres_ids().ok_or("no `postgres` user")?;
            for p in [&root, &pwfile, &sock] {
                chown(p, Some(uid), Some(gid)).map_err(|e| io("chown to postgres", e))?;
            }
        }
        let mut cluster = Cluster {
            dir,
            bin,
            as_postgres,
            durable: options.durable,
            port: 0,
            password,
            child: None,
        };
        let data = root.join("data");
        let mut initdb = cluster.command("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--locale=C", "-E", "UTF8"]);
        match options.auth {
            Auth::Password => {
                initdb
                    .args([
                        "--auth-local=trust",
                        "--auth-host=scram-sha-256",
                        "--pwfile",
                    ])
                    .arg(&pwfile);
            }
            Auth::Trust => {
                initdb.arg("--auth=trust");
            }
        }
        if !options.durable {
            initdb.arg("--no-sync");
        }
        let out = initdb
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io("running initdb", e))?;
        if !out.status.success() {
            return Err(format!(
                "initdb exited {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut settings: Vec<String> = [
            "listen_addresses=127.0.0.1",
            "wal_level=logical",
            "max_connections=60",
            "shared_buffers=32MB",
            "max_replication_slots=16",
            "max_wal_senders=16",
            "max_worker_processes=16",
            "max_logical_replication_workers=8",
            "wal_receiver_status_interval=1s",
            "wal_sender_timeout=60s",
        ]
        .map(String::from)
        .to_vec();
        if !options.durable {
            settings.extend(
                [
                    "fsync=off",
                    "synchronous_commit=off",
                    "full_page_writes=off",
                ]
                .map(String::from),
            );
        }
        settings.extend(options.settings);
        port::start_on_fresh_ports(|[p]| {
            let _ = std::fs::remove_file(data.join("postmaster.pid"));
            cluster.spawn(&data, &sock, p, &settings)
        })
        .map_err(|e| e.to_string())?;
        Ok(cluster)
    }

    fn spawn(
        &mut self,
        data: &Path,
        sock: &Path,
        port: u16,
        settings: &[String],
    ) -> Result<(), StartError> {
        let log_path = self.dir.path().join("postgres.log");
        let log = File::create(&log_path)
            .map_err(|e| StartError::Failed(format!("creating the log: {e}")))?;
        let stderr = log
            .try_clone()
            .map_err(|e| StartError::Failed(e.to_string()))?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(data)
            .arg("-k")
            .arg(sock)
            .arg("-p")
            .arg(port.to_string())
            .args(settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(|e| StartError::Failed(format!("spawning postgres: {e}")))?;
        self.port = port;
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let res = port::wait_serving(
            self.child.insert(child),
            &[port],
            READY_TIMEOUT,
            "postgres",
            || log().contains("ready to accept connections"),
            || tail(&log()),
        );
        if res.is_err() {
            self.stop();
        }
        res
    }

    /// A command for the server program `program` of this cluster's version, run as the cluster's
    /// owner.
    pub fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// The directory of the server binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// A client program of this cluster's binaries (`pgbench`, `psql`, `pg_dump`, …) connecting
    /// to it over TCP as its superuser: the password in the environment, never on the command
    /// line, and nothing inherited that could redirect the connection (`PGPASSFILE`,
    /// `PGSERVICE`, `PGOPTIONS`, `PGDATABASE`). Standard input is null.
    pub fn client_command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        self.client_env(&mut c).stdin(Stdio::null());
        c
    }

    /// Sets `c`'s environment as [`Cluster::client_command`] does, for a client program from
    /// elsewhere (e.g. `pgcopydb`).
    pub fn client_env<'c>(&self, c: &'c mut Command) -> &'c mut Command {
        c.env_remove("PGPASSFILE")
            .env_remove("PGSERVICE")
            .env_remove("PGOPTIONS")
            .env_remove("PGDATABASE")
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", "postgres")
            .env("PGPASSWORD", &self.password)
    }

    /// The last 2000 characters of the server log.
    pub fn log_tail(&self) -> String {
        tail(&std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default())
    }

    /// The cluster's directory.
    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Superuser settings for `db` over TCP (with the password, if any).
    pub fn config(&self, db: &str) -> PostgresConfig {
        let c = PostgresConfig::new("127.0.0.1", self.port, db)
            .with_user("postgres")
            .with_connect_timeout(Duration::from_secs(20));
        if self.password.is_empty() {
            c
        } else {
            c.with_password(self.password.clone())
        }
    }

    /// A superuser connection to `db`.
    ///
    /// # Errors
    /// The connection fails.
    pub async fn client(&self, db: &str) -> Result<Client, String> {
        self.config(db)
            .connect("test")
            .await
            .map_err(|e| e.to_string())
    }

    /// Creates database `db`.
    ///
    /// # Panics
    /// The statement fails.
    pub async fn create_db(&self, db: &str) {
        let c = self.client("postgres").await.unwrap();
        c.batch_execute(&format!(
            "CREATE DATABASE {}",
            bluegreen_postgres::quote_ident(db)
        ))
        .await
        .unwrap();
    }

    /// Runs `sql` in `db` with `psql` (synchronous tests); the trimmed, unaligned output.
    ///
    /// # Panics
    /// `psql` fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-tAX",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(db)
            .arg("-c")
            .arg(sql)
            .env("PGPASSWORD", &self.password)
            .env_remove("PGPASSFILE")
            .env_remove("PGSERVICE")
            .stdin(Stdio::null())
            .output()
            .expect("running psql");
        assert!(out.status.success(), "psql {sql}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mode = if self.durable { "fast" } else { "immediate" };
        let _ = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", mode, "-w", "-t", "30"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_binaries_are_found_without_a_version_number() {
        if let Some(d) = bin_dir() {
            assert!(d.join("initdb").is_file(), "{}", d.display());
        }
    }

    #[tokio::test]
    async fn a_cluster_starts_answers_and_reports_its_own_port() {
        let Some(c) = Cluster::start().await else {
            return;
        };
        assert!(port::owns_ports(c.child.as_ref().unwrap().id(), &[c.port]));
        let client = c.client("postgres").await.unwrap();
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
        assert!(!format!("{:?}", c.config("postgres")).contains(&c.password));
        let trust = Cluster::start_options(ClusterOptions::new().trust())
            .await
            .unwrap();
        assert_ne!(trust.port, c.port);
        assert_eq!(trust.psql("postgres", "SELECT 2"), "2");
    }
}
