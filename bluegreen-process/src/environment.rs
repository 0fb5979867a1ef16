//! [`ProcessEnvironment`]: each slot is one local child process.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bluegreen_core::{
    Endpoint, Environment, Error, ExecOutput, InstanceState, PerSlot, Release, Result, Slot,
    SlotStatus, Version,
};
use rustix::process::{Pid, Signal};
use tokio::sync::oneshot;

use crate::config::ProcessConfig;
use crate::error::{io_error, ProcessError};
use crate::record::{self, SlotFiles, SlotRecord};

/// Most log bytes [`Environment::logs`] returns (the end of the file is kept).
pub const MAX_LOG_BYTES: usize = 4 * 1024 * 1024;

/// How many log lines error messages quote.
const TAIL_LINES: usize = 20;

/// Runs each slot's release as a local child process.
///
/// The release's `artifact` is the program (a path, or a name looked up on `PATH`) and its `args`
/// the arguments; they are executed directly, never through a shell. See the
/// [crate docs](crate) for the environment variables a program gets, where its output goes and
/// how state is kept between handles.
///
/// Cloning is cheap and clones share the slot locks. Dropping a handle leaves the programs
/// running (that is the point: the next handle finds them); stop them with
/// [`stop`](Environment::stop) or [`remove`](Environment::remove), or, in tests,
/// [`kill_all`](Self::kill_all).
///
/// Operations on one slot are serialized within a handle and its clones, not between processes:
/// run one deployment at a time per state directory (the engine's deployment lock does that).
///
/// Linux is the supported platform: pid reuse is detected through `/proc`; on other Unix systems
/// a pid that is alive is taken at its word.
#[derive(Clone)]
pub struct ProcessEnvironment {
    inner: Arc<Inner>,
}

struct Inner {
    config: ProcessConfig,
    /// Serializes deploy / stop / remove per slot within this handle (and its clones).
    ops: PerSlot<tokio::sync::Mutex<()>>,
    /// Serializes read-modify-write of pid files between operations and reaper threads.
    files: Arc<Mutex<()>>,
    /// Secret variables of the releases this handle deployed: never written to disk, so `exec`
    /// gets them only from the handle that deployed.
    secrets: Mutex<PerSlot<BTreeMap<String, String>>>,
}

impl fmt::Debug for ProcessEnvironment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessEnvironment")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl ProcessEnvironment {
    /// An environment keeping its state in `config.state_dir`.
    ///
    /// Nothing is touched until the first call; a new handle on a directory where programs run
    /// (e.g. the next CLI invocation) sees them.
    pub fn new(config: ProcessConfig) -> Self {
        ProcessEnvironment {
            inner: Arc::new(Inner {
                config,
                ops: PerSlot::default(),
                files: Arc::new(Mutex::new(())),
                secrets: Mutex::new(PerSlot::default()),
            }),
        }
    }

    /// The settings.
    pub fn config(&self) -> &ProcessConfig {
        &self.inner.config
    }

    /// The slot's log file (`<state_dir>/<slot>.log`).
    pub fn log_path(&self, slot: Slot) -> PathBuf {
        self.files(slot).log
    }

    /// The slot's logs that exist, newest first: `<slot>.log` (the running or last program's),
    /// then the earlier ones kept by rotation (`<slot>.log.1`, …; see
    /// [`ProcessConfig::keep_logs`]).
    pub fn log_paths(&self, slot: Slot) -> Vec<PathBuf> {
        let log = self.files(slot).log;
        (0..=self.inner.config.keep_logs)
            .map(|n| record::rotated(&log, n))
            .filter(|p| p.exists())
            .collect()
    }

    /// The slot's pid file (`<state_dir>/<slot>.json`).
    pub fn pid_file(&self, slot: Slot) -> PathBuf {
        self.files(slot).record
    }

    /// The pid of the slot's program while it runs.
    ///
    /// # Errors
    /// The pid file cannot be read.
    pub fn pid(&self, slot: Slot) -> Result<Option<u32>> {
        Ok(self
            .read(slot)?
            .filter(SlotRecord::is_alive)
            .map(|r| r.pid as u32))
    }

    /// Whether the slot's program ended on its own (a crash, not a stop): it has a pid file, is
    /// not running, and no stop was asked for.
    ///
    /// # Errors
    /// The pid file cannot be read.
    pub fn crashed(&self, slot: Slot) -> Result<bool> {
        Ok(self
            .read(slot)?
            .is_some_and(|r| !r.stop_requested && !r.is_alive()))
    }

    /// Starts again what a [`crashed`](Self::crashed) slot ran (same version, program,
    /// arguments, variables and port, so whatever routes to it reaches it again), with a fresh
    /// log. `Ok(false)`, doing nothing, if the slot is not crashed.
    ///
    /// # Errors
    /// The program cannot be started or exits within `startup_grace`; or the release has secret
    /// variables that this handle does not hold (pid files keep only their names, and a program
    /// is never started without its secrets: deploy through the handle that supervises).
    pub async fn restart(&self, slot: Slot) -> Result<bool> {
        let _op = self.inner.ops.get(slot).lock().await;
        let Some(rec) = self.read(slot)? else {
            return Ok(false);
        };
        if rec.stop_requested || rec.is_alive() {
            return Ok(false);
        }
        let secrets = lock(&self.inner.secrets).get(slot).clone();
        let missing: Vec<String> = rec
            .secret_keys
            .iter()
            .filter(|k| !secrets.contains_key(*k))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(ProcessError::SecretsUnknown { slot, missing }.into_core("restart"));
        }
        let launch = Launch {
            version: rec.version,
            program: rec.program,
            args: rec.args,
            env: rec.env,
            secrets,
            port: rec.port,
        };
        self.start_locked(slot, launch, "restart").await?;
        Ok(true)
    }

    /// Sends SIGKILL to the process group of every slot's running program, now, without drain;
    /// pid files stay. Blocking and quick: for test guards (`Drop`) and emergency cleanup.
    pub fn kill_all(&self) {
        for slot in Slot::ALL {
            if let Ok(Some(rec)) = self.read(slot) {
                let _ = rec.signal(slot, Signal::KILL);
            }
        }
    }

    fn files(&self, slot: Slot) -> SlotFiles {
        SlotFiles::new(&self.inner.config.state_dir, slot)
    }

    fn read(&self, slot: Slot) -> Result<Option<SlotRecord>> {
        record::read(&self.files(slot).record)
    }

    /// Read-modify-write of the slot's pid file, if it still describes process `pid`.
    fn update(&self, slot: Slot, pid: i32, change: impl FnOnce(&mut SlotRecord)) -> Result<()> {
        let _guard = lock(&self.inner.files);
        let path = self.files(slot).record;
        if let Some(mut rec) = record::read(&path)? {
            if rec.pid == pid {
                change(&mut rec);
                record::write(&path, &rec)?;
            }
        }
        Ok(())
    }

    fn endpoint(rec: &SlotRecord) -> Endpoint {
        Endpoint::new(rec.host.clone(), rec.port)
    }

    /// The variables a slot's programs get, ours last so they win.
    fn slot_env(
        &self,
        slot: Slot,
        rec_env: &BTreeMap<String, String>,
        secrets: &BTreeMap<String, String>,
        host: &str,
        port: u16,
        version: &str,
    ) -> BTreeMap<String, String> {
        let mut env = self.inner.config.env.clone();
        env.extend(rec_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend(secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.insert("PORT".into(), port.to_string());
        env.insert("HOST".into(), host.to_string());
        env.insert("BLUEGREEN_SLOT".into(), slot.to_string());
        env.insert("BLUEGREEN_VERSION".into(), version.to_string());
        env
    }

    /// A relative program path with a `/` is taken from this process's working directory, not
    /// from the child's (which may differ).
    fn resolve_program(artifact: &str) -> String {
        let p = Path::new(artifact);
        if artifact.contains('/') && p.is_relative() {
            if let Ok(cwd) = std::env::current_dir() {
                return cwd.join(p).to_string_lossy().into_owned();
            }
        }
        artifact.to_string()
    }

    fn pick_port(&self, slot: Slot) -> Result<u16> {
        if let Some(port) = *self.inner.config.ports.get(slot) {
            return Ok(port);
        }
        let host = &self.inner.config.host;
        let other = self
            .read(slot.other())
            .ok()
            .flatten()
            .filter(SlotRecord::is_alive)
            .map(|r| r.port);
        // The port is free now; the program binds it a moment later. Another process could take
        // it in between: the program then fails to bind and the health check reports it.
        let mut last_err = None;
        for _ in 0..5 {
            match TcpListener::bind((host.as_str(), 0)).and_then(|l| l.local_addr()) {
                Ok(addr) if Some(addr.port()) != other => return Ok(addr.port()),
                Ok(_) => {}
                Err(e) => last_err = Some(e),
            }
        }
        Err(ProcessError::NoPort {
            host: host.clone(),
            slot,
            source: last_err.unwrap_or_else(|| std::io::Error::other("no distinct port found")),
        }
        .into_core("deploy"))
    }

    /// Stops the slot's program, and any other program writing to the slot's log; the caller
    /// holds the slot's operation lock.
    async fn stop_locked(&self, slot: Slot, drain: Duration) -> Result<()> {
        self.stop_recorded(slot, drain).await?;
        self.stop_strays(slot, drain).await
    }

    /// Stops programs writing to the slot's log that its pid file does not name: one started by
    /// a run killed after the spawn and before it wrote the pid file would otherwise outlive
    /// the slot. SIGTERM to each one's process group, then SIGKILL after `drain`.
    async fn stop_strays(&self, slot: Slot, drain: Duration) -> Result<()> {
        let log = self.files(slot).log;
        let strays = record::writers_of(&log);
        if strays.is_empty() {
            return Ok(());
        }
        tracing::warn!(%slot, ?strays, "stopping programs of the slot that its pid file does not name");
        for signal in [Signal::TERM, Signal::KILL] {
            for &pid in &strays {
                record::mark(&log, slot, &format!("stray pid={pid}: {signal:?}"));
                if let Some(p) = Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process_group(p, signal)
                        .or_else(|_| rustix::process::kill_process(p, signal));
                }
            }
            let bound = if signal == Signal::TERM {
                drain
            } else {
                self.inner.config.kill_timeout
            };
            let mut gone = true;
            for &pid in &strays {
                gone &= record::wait_gone(pid, None, bound).await;
            }
            if gone {
                return Ok(());
            }
        }
        Err(ProcessError::Unkillable {
            pid: strays[0],
            slot,
            waited: self.inner.config.kill_timeout,
        }
        .into_core("stop"))
    }

    /// Stops the program the slot's pid file names.
    async fn stop_recorded(&self, slot: Slot, drain: Duration) -> Result<()> {
        let Some(rec) = self.read(slot)? else {
            return Ok(());
        };
        if !rec.is_alive() {
            return Ok(());
        }
        let log = self.files(slot).log;
        self.update(slot, rec.pid, |r| r.stop_requested = true)?;
        record::mark(
            &log,
            slot,
            &format!("stop pid={}: SIGTERM, drain up to {drain:?}", rec.pid),
        );
        rec.signal(slot, Signal::TERM)?;
        if record::wait_gone(rec.pid, rec.proc_start, drain).await {
            record::mark(&log, slot, &format!("stopped pid={}", rec.pid));
            return Ok(());
        }
        record::mark(
            &log,
            slot,
            &format!("pid={} still running after {drain:?}: SIGKILL", rec.pid),
        );
        tracing::warn!(%slot, pid = rec.pid, ?drain, "program ignored SIGTERM; sending SIGKILL");
        rec.signal(slot, Signal::KILL)?;
        let waited = self.inner.config.kill_timeout;
        if record::wait_gone(rec.pid, rec.proc_start, waited).await {
            return Ok(());
        }
        Err(ProcessError::Unkillable {
            pid: rec.pid,
            slot,
            waited,
        }
        .into_core("stop"))
    }

    /// Starts `launch` in `slot` with a fresh log; the caller holds the slot's operation lock and
    /// stopped what ran there. `what` (`deploy`, `restart`) names the operation in markers and
    /// errors.
    pub(crate) async fn start_locked(
        &self,
        slot: Slot,
        launch: Launch,
        what: &'static str,
    ) -> Result<SlotRecord> {
        let config = &self.inner.config;
        let files = self.files(slot);
        let Launch {
            version,
            program,
            args,
            env: release_env,
            secrets,
            port,
        } = launch;
        record::ensure_dir(&config.state_dir)?;
        // Each program starts a fresh log; the earlier ones are kept, rotated.
        record::rotate_log(&files.log, config.keep_logs)?;
        let open_log = || {
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&files.log)
                .map_err(|e| io_error("opening log", &files.log, e))
        };
        record::mark(
            &files.log,
            slot,
            &format!("{what} version={version} program={program} port={port}"),
        );
        let out = open_log()?;
        let err = out
            .try_clone()
            .map_err(|e| io_error("opening log", &files.log, e))?;

        let env = self.slot_env(
            slot,
            &release_env,
            &secrets,
            &config.host,
            port,
            version.as_str(),
        );
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group: a Ctrl-C to the operator's terminal does not reach it, and
            // stop() can signal it together with its children.
            .process_group(0);
        if !config.inherit_env {
            cmd.env_clear().envs(config.passed_env());
        }
        cmd.envs(&env);
        if let Some(dir) = &config.working_dir {
            cmd.current_dir(dir);
        }
        let child = cmd.spawn().map_err(|source| {
            record::mark(
                &files.log,
                slot,
                &format!("cannot start {program}: {source}"),
            );
            ProcessError::Spawn {
                program: program.clone(),
                slot,
                source,
                log_tail: record::log_tail(&files.log, TAIL_LINES),
            }
            .into_core(what)
        })?;
        let pid = child.id() as i32;
        let rec = SlotRecord {
            format: 1,
            pid,
            proc_start: record::start_time(pid),
            host: config.host.clone(),
            port,
            version: version.clone(),
            program: program.clone(),
            args,
            env: release_env,
            secret_keys: secrets.keys().cloned().collect(),
            started_at_ms: record::unix_ms(SystemTime::now()),
            stop_requested: false,
            exit_code: None,
            exit_signal: None,
            exited_at_ms: None,
        };
        let (tx, rx) = oneshot::channel();
        {
            let _guard = lock(&self.inner.files);
            if let Err(e) = record::write(&files.record, &rec) {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
        lock(&self.inner.secrets).set(slot, secrets);
        if let Err(e) = self.spawn_reaper(slot, child, tx) {
            // The child was moved into the failed closure and dropped: kill it by pid.
            let _ = rec.signal(slot, Signal::KILL);
            return Err(io_error("starting the reaper thread for", &files.log, e));
        }
        record::mark(&files.log, slot, &format!("started pid={pid}"));

        // Readiness is the engine's job (health checks); here only an immediate exit is caught.
        if let Ok(Ok(status)) = tokio::time::timeout(config.startup_grace, rx).await {
            return Err(ProcessError::ExitedAtStart {
                program,
                slot,
                how: record::describe_exit(status.code(), status.signal()),
                log: files.log.clone(),
                log_tail: record::log_tail(&files.log, TAIL_LINES),
            }
            .into_core(what));
        }
        tracing::info!(%slot, pid, port, version = version.as_str(), "started {program}");
        Ok(rec)
    }

    /// Waits for the child on a thread (so it is reaped even when no runtime is left), records
    /// how it ended, and reports that on `tx`.
    fn spawn_reaper(
        &self,
        slot: Slot,
        mut child: std::process::Child,
        tx: oneshot::Sender<ExitStatus>,
    ) -> std::io::Result<()> {
        let env = self.clone();
        std::thread::Builder::new()
            .name(format!("bluegreen-{slot}-reaper"))
            .spawn(move || {
                let pid = child.id() as i32;
                let Ok(status) = child.wait() else {
                    return;
                };
                let (code, signal) = (status.code(), status.signal());
                let ended = record::describe_exit(code, signal);
                let _ = env.update(slot, pid, |r| {
                    r.exit_code = code;
                    r.exit_signal = signal;
                    r.exited_at_ms = Some(record::unix_ms(SystemTime::now()));
                });
                record::mark(
                    &env.files(slot).log,
                    slot,
                    &format!("pid={pid} ended: {ended}"),
                );
                let _ = tx.send(status);
            })
            .map(|_| ())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves nothing half-done that the next holder cannot read
    // again from disk.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What to start in a slot: a release, or what a slot's record says it ran.
pub(crate) struct Launch {
    pub(crate) version: Version,
    pub(crate) program: String,
    pub(crate) args: Vec<String>,
    pub(crate) env: BTreeMap<String, String>,
    /// Values of the secret variables (kept in memory only).
    pub(crate) secrets: BTreeMap<String, String>,
    pub(crate) port: u16,
}

/// True if `rec` already runs exactly `release` (so deploying it again changes nothing).
fn runs_release(rec: &SlotRecord, release: &Release, program: &str, host: &str) -> bool {
    rec.version == release.version
        && rec.program == program
        && rec.args == release.args
        && rec.env == release.env
        && rec.secret_keys == release.secret_env.keys().cloned().collect::<Vec<_>>()
        && rec.host == host
}

#[async_trait]
impl Environment for ProcessEnvironment {
    fn name(&self) -> &str {
        crate::NAME
    }

    async fn deploy(&self, slot: Slot, release: &Release) -> Result<Vec<Endpoint>> {
        let _op = self.inner.ops.get(slot).lock().await;
        let config = &self.inner.config;
        if release.artifact.trim().is_empty() {
            return Err(Error::invalid(
                "artifact",
                &release.artifact,
                "the process environment needs a program to run",
            ));
        }
        let program = Self::resolve_program(&release.artifact);

        if let Some(rec) = self.read(slot)? {
            if rec.is_alive() {
                let fixed = config.ports.get(slot).is_none_or(|p| p == rec.port);
                if fixed
                    && !rec.stop_requested
                    && runs_release(&rec, release, &program, &config.host)
                {
                    return Ok(vec![Self::endpoint(&rec)]);
                }
            }
        }
        self.stop_locked(slot, config.stop_timeout).await?;

        let secrets = release
            .secret_env
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().to_string()))
            .collect::<BTreeMap<_, _>>();
        let port = self.pick_port(slot)?;
        let launch = Launch {
            version: release.version.clone(),
            program,
            args: release.args.clone(),
            env: release.env.clone(),
            secrets,
            port,
        };
        let rec = self.start_locked(slot, launch, "deploy").await?;
        Ok(vec![Self::endpoint(&rec)])
    }

    async fn status(&self, slot: Slot) -> Result<SlotStatus> {
        let Some(rec) = self.read(slot)? else {
            return Ok(SlotStatus::absent());
        };
        let version = Some(rec.version.clone());
        Ok(if rec.is_alive() {
            SlotStatus::new(InstanceState::Running, version, vec![Self::endpoint(&rec)])
        } else if rec.stop_requested {
            SlotStatus::new(InstanceState::Stopped, version, Vec::new())
        } else {
            SlotStatus::new(InstanceState::Exited, version, Vec::new())
                .with_exit_code(rec.exit_code)
        })
    }

    async fn stop(&self, slot: Slot, drain: Duration) -> Result<()> {
        let _op = self.inner.ops.get(slot).lock().await;
        self.stop_locked(slot, drain).await
    }

    async fn remove(&self, slot: Slot) -> Result<()> {
        let _op = self.inner.ops.get(slot).lock().await;
        self.stop_locked(slot, self.inner.config.stop_timeout)
            .await?;
        let files = self.files(slot);
        {
            let _guard = lock(&self.inner.files);
            record::remove_file(&files.record)?;
        }
        // The log outlives the slot (a failed release's output is what the operator reads
        // after the rollback): rotated, not deleted.
        if let Some(kept) = record::rotate_log(&files.log, self.inner.config.keep_logs)? {
            tracing::info!(%slot, log = %kept.display(), "slot removed; its log is kept");
        }
        lock(&self.inner.secrets).set(slot, BTreeMap::new());
        Ok(())
    }

    async fn exec(&self, slot: Slot, argv: &[String]) -> Result<ExecOutput> {
        let Some((program, args)) = argv.split_first() else {
            return Err(Error::invalid(
                "exec argv",
                "[]",
                "needs at least a program",
            ));
        };
        let Some(rec) = self.read(slot)? else {
            return Err(ProcessError::NotDeployed { slot }.into_core("exec"));
        };
        let config = &self.inner.config;
        let secrets = lock(&self.inner.secrets).get(slot).clone();
        let env = self.slot_env(
            slot,
            &rec.env,
            &secrets,
            &rec.host,
            rec.port,
            rec.version.as_str(),
        );
        let program = Self::resolve_program(program);
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if !config.inherit_env {
            cmd.env_clear().envs(config.passed_env());
        }
        cmd.envs(&env);
        if let Some(dir) = &config.working_dir {
            cmd.current_dir(dir);
        }
        let child = cmd.spawn().map_err(|source| {
            ProcessError::Exec {
                program: program.clone(),
                slot,
                source,
            }
            .into_core("exec")
        })?;
        let pgid = child.id().and_then(|id| Pid::from_raw(id as i32));
        match tokio::time::timeout(config.exec_timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => Ok(ExecOutput {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }),
            Ok(Err(source)) => Err(ProcessError::Exec {
                program,
                slot,
                source,
            }
            .into_core("exec")),
            Err(_) => {
                // The child itself is killed on drop; its own children share its group.
                if let Some(pgid) = pgid {
                    let _ = rustix::process::kill_process_group(pgid, Signal::KILL);
                }
                Err(Error::Timeout {
                    what: format!("exec {argv:?} in slot {slot}"),
                    after: config.exec_timeout,
                })
            }
        }
    }

    /// The slot's log file: the program's stdout and stderr plus marker lines this environment
    /// writes (`--- bluegreen ts=<unix ms> <UTC time> <slot>: deploy …`, `stop …`, `… ended`).
    ///
    /// With `since`, nothing is returned if the file was not modified since then; otherwise the
    /// text starts at the last marker stamped at least a second before `since` (program lines
    /// carry no timestamps of their own, so older lines may come along, but none written after
    /// `since` is left out). At most [`MAX_LOG_BYTES`] (the end) are returned. An absent slot
    /// has an empty log.
    async fn logs(&self, slot: Slot, since: Option<SystemTime>) -> Result<String> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.files(slot).log;
        let mut file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
            Err(e) => return Err(io_error("reading log", &path, e)),
        };
        let read_err = |e| io_error("reading log", &path, e);
        let meta = file.metadata().map_err(read_err)?;
        if let Some(since) = since {
            if meta.modified().map_err(read_err)? < since {
                return Ok(String::new());
            }
        }
        let skip = meta.len().saturating_sub(MAX_LOG_BYTES as u64);
        file.seek(SeekFrom::Start(skip)).map_err(read_err)?;
        let mut bytes = Vec::new();
        file.take(MAX_LOG_BYTES as u64)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        let text = String::from_utf8_lossy(&bytes);
        Ok(match since {
            Some(since) => record::lines_since(&text, record::unix_ms(since)).to_string(),
            None => text.into_owned(),
        })
    }
}
