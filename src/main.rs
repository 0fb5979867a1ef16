//! `bluegreen`: blue-green deployments from a pipeline file, without writing code.
//!
//! ```text
//! bluegreen serve                # run the proxy (client traffic + control API) in the foreground
//! bluegreen deploy v2            # deploy to the idle slot and switch
//! bluegreen status | history | rollback | promote | abort | cleanup | reset | validate | plan v2
//! ```
//!
//! Exit codes: 0 success; 1 the operation failed (live traffic untouched or switched back);
//! 2 usage or pipeline-file error; 3 another operation holds the lock or a deployment is in flight;
//! 4 waiting for a person (`promote` / `abort`); 5 a decision is needed: live traffic may be
//! affected; 6 (`status`) drift: the backends differ from the recorded state, or the switch routes
//! to endpoints that do not answer; 130 interrupted (Ctrl-C), after rolling back at a safe point.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bluegreen::proxy::ProxySwitch;
use bluegreen::{
    DeployEvent, Deployer, Error, LiveTraffic, Report, RunOutcome, TrafficSwitch, Waiting,
};
use clap::{Parser, Subcommand};

mod backends;
mod pipeline;

use pipeline::Pipeline;

/// The cargo features this binary was built with, in the order of the crate's feature table.
const FEATURES: &[(&str, bool)] = &[
    ("proxy", cfg!(feature = "proxy")),
    ("process", cfg!(feature = "process")),
    ("docker", cfg!(feature = "docker")),
    ("nginx", cfg!(feature = "nginx")),
    ("haproxy", cfg!(feature = "haproxy")),
    ("traefik", cfg!(feature = "traefik")),
    ("postgres", cfg!(feature = "postgres")),
    ("http", cfg!(feature = "http")),
    ("cli", cfg!(feature = "cli")),
];

/// `--version`: the crate's version and the features built in, so a pipeline file naming a
/// backend the binary lacks can be explained before it is run.
fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        let on: Vec<&str> = FEATURES
            .iter()
            .filter(|(_, on)| *on)
            .map(|(name, _)| *name)
            .collect();
        format!(
            "{} (features: {})",
            env!("CARGO_PKG_VERSION"),
            on.join(", ")
        )
    })
}

#[derive(Parser)]
#[command(
    name = "bluegreen",
    version = version(),
    about = "Zero-downtime blue-green deployments"
)]
struct Cli {
    /// The pipeline file.
    #[arg(
        short,
        long,
        default_value = "bluegreen.toml",
        env = "BLUEGREEN_FILE",
        global = true
    )]
    file: PathBuf,
    /// Machine-readable output: one JSON object per line (events, then the result).
    #[arg(long, global = true)]
    json: bool,
    /// More log lines on stderr (`-v` info, `-vv` debug, `-vvv` trace); `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Fewer log lines on stderr (`-q` errors only, `-qq` none); `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "verbose")]
    quiet: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: client traffic on `switch.listen`, the control API on `switch.admin`.
    Serve,
    /// Deploy VERSION to the idle slot and switch traffic to it.
    Deploy {
        /// The release's version label.
        version: String,
        /// Deploy even when VERSION is already live: the idle slot, which holds the rollback
        /// target, is replaced by VERSION.
        #[arg(long)]
        redeploy: bool,
    },
    /// What `deploy VERSION` would do, changing nothing.
    Plan {
        /// The release's version label.
        version: String,
    },
    /// Show the live slot, the split, both slots and anything in flight.
    Status,
    /// Switch back to the previous release.
    Rollback,
    /// Continue a deployment waiting for a person.
    Promote,
    /// Roll back the deployment in flight.
    Abort,
    /// Remove the idle slot.
    Cleanup,
    /// Remove both slots (history is kept).
    Reset,
    /// List finished deployments.
    History,
    /// Check the file and reach every backend without changing anything.
    Validate,
    /// Remove the deployment lock (for a holder that died on another machine).
    BreakLock {
        /// Break it even when the holder is a process still running on this host (that run then
        /// stops at its next step without changing anything more).
        #[arg(long)]
        force: bool,
    },
}

/// Output: a spinner on a terminal, plain lines otherwise, JSON lines with `--json`.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Json,
    Tty,
    Plain,
}

fn emit_json(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn exit_code(e: &Error) -> u8 {
    match e {
        Error::InvalidInput { .. } => 2,
        Error::Locked { .. }
        | Error::InFlight { .. }
        | Error::HolderAlive { .. }
        | Error::LockLost { .. } => 3,
        Error::NeedsDecision { .. } => 5,
        Error::Phase { live, source, .. } => match (live, source.as_ref()) {
            (_, Error::LockLost { .. }) => 3,
            (_, Error::NeedsDecision { .. }) | (LiveTraffic::Affected, _) => 5,
            (_, Error::Interrupted) => 130,
            _ => 1,
        },
        _ => 1,
    }
}

fn fail(mode: Mode, e: &Error) -> ExitCode {
    let code = exit_code(e);
    if mode == Mode::Json {
        emit_json(serde_json::json!({
            "result": "error",
            "error": e.to_string(),
            "phase": e.phase().map(|p| p.to_string()),
            "live_traffic": e.live_traffic(),
            "exit_code": code,
        }));
    } else {
        eprintln!("error: {e}");
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            if !e.to_string().contains(&s.to_string()) {
                eprintln!("  caused by: {s}");
            }
            src = s.source();
        }
    }
    ExitCode::from(code)
}

/// Prints events while a run goes on.
fn progress(deployer: &Deployer, mode: Mode) -> tokio::task::JoinHandle<()> {
    let mut rx = deployer.subscribe();
    tokio::spawn(async move {
        let mut current: Option<(String, Instant)> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(120));
        let frames = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
        let mut frame = 0usize;
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    let Ok(ev) = ev else { return };
                    if mode == Mode::Json {
                        emit_json(serde_json::to_value(&ev).unwrap_or_default());
                        continue;
                    }
                    let clear = if mode == Mode::Tty { "\r\x1b[2K" } else { "" };
                    match &ev {
                        DeployEvent::Started { id, kind, version, target } => {
                            println!("{clear}#{id} {} {version} → {target}", kind.as_str())
                        }
                        DeployEvent::PhaseStarted { phase, .. } => {
                            current = Some((phase.to_string(), Instant::now()));
                        }
                        DeployEvent::PhaseCompleted { phase, elapsed, .. } => {
                            current = None;
                            println!("{clear}  ✓ {phase:<22} {:>7.1}s", elapsed.as_secs_f64());
                        }
                        DeployEvent::PhaseFailed { phase, error, .. } => {
                            current = None;
                            println!("{clear}  ✗ {phase:<22} {error}");
                        }
                        DeployEvent::Switched { split, .. } => println!("{clear}  ⇄ traffic: {split}"),
                        DeployEvent::Waiting { reason, .. } => println!("{clear}  ⏸ {reason}"),
                        DeployEvent::LongLivedClosed { slot, count, .. } => println!(
                            "{clear}  ⏏ {count} long-lived connection(s) to {slot} closed at the drain deadline"
                        ),
                        DeployEvent::RollingBack { reason, .. } => println!("{clear}  ↩ rolling back: {reason}"),
                        DeployEvent::Recovering { phase, action, .. } => {
                            println!("{clear}  ⟳ recovering a deployment left at {phase}: {action}")
                        }
                        _ => {}
                    }
                }
                _ = tick.tick(), if mode == Mode::Tty => {
                    if let Some((phase, since)) = &current {
                        frame = (frame + 1) % frames.len();
                        print!("\r\x1b[2K  {} {phase:<22} {:>7.1}s", frames[frame], since.elapsed().as_secs_f64());
                        let _ = std::io::stdout().flush();
                    }
                }
            }
        }
    })
}

/// Before `deploy --redeploy` of the live version: the idle slot's release is about to go.
async fn warn_rollback_target_lost(d: &Deployer, version: &str) {
    let Ok(st) = d.status().await else { return };
    let state = &st.state;
    let live = state.live_release().map(|r| r.version.as_str());
    if live != Some(version) {
        return;
    }
    if let Some(idle) = state.active.map(|a| a.other()) {
        if let Some(r) = state.slots.get(idle) {
            eprintln!(
                "warning: {version} is already live; redeploying replaces {0} on {idle}, the \
                 rollback target: `rollback` will no longer reach {0}",
                r.release.version
            );
        }
    }
}

fn report_result(mode: Mode, r: &Report) -> ExitCode {
    let (status, code) = match &r.outcome {
        RunOutcome::Live => ("live", 0),
        RunOutcome::RolledBack => ("rolled_back", 0),
        RunOutcome::AlreadyLive => ("already_live", 0),
        RunOutcome::Waiting(_) => ("waiting", 4),
    };
    if mode == Mode::Json {
        let waiting = match &r.outcome {
            RunOutcome::Waiting(w) => serde_json::to_value(w).ok(),
            _ => None,
        };
        emit_json(serde_json::json!({
            "result": "ok",
            "status": status,
            "id": r.id,
            "kind": r.kind.as_str(),
            "version": r.version.as_str(),
            "slot": r.target.as_str(),
            "waiting": waiting,
            "elapsed_ms": r.elapsed.as_millis() as u64,
            "ledger": r.ledger,
            "traffic": r.ledger.summary(),
            "exit_code": code,
        }));
    } else {
        if r.outcome != RunOutcome::AlreadyLive {
            println!("traffic: {}", r.ledger.summary());
        }
        match &r.outcome {
            RunOutcome::Live => println!(
                "#{} {} {} is live on {} ({:.1}s)",
                r.id,
                r.kind.as_str(),
                r.version,
                r.target,
                r.elapsed.as_secs_f64()
            ),
            RunOutcome::RolledBack => println!("#{} rolled back; the previous slot serves", r.id),
            RunOutcome::AlreadyLive => println!(
                "{} is already live on {} (deployment #{}); nothing changed \
                 (`deploy --redeploy` replaces the idle slot)",
                r.version, r.target, r.id
            ),
            RunOutcome::Waiting(w) => {
                let why = match w {
                    Waiting::Gate => "the promotion gate".to_string(),
                    Waiting::Inconclusive { reason } => {
                        format!("an inconclusive analysis: {reason}")
                    }
                    Waiting::Decision { reason } => format!("a decision: {reason}"),
                };
                println!(
                    "#{} {} waits for {why}\nrun `bluegreen promote` to continue or `bluegreen abort` to roll back",
                    r.id, r.version
                )
            }
        }
    }
    ExitCode::from(code)
}

/// Runs an engine operation with progress output; Ctrl-C interrupts it at a safe point.
async fn run_op<F>(deployer: &Deployer, mode: Mode, op: F) -> ExitCode
where
    F: std::future::Future<Output = bluegreen::Result<Report>>,
{
    let printer = progress(deployer, mode);
    let mut op = std::pin::pin!(op);
    let mut interrupted = false;
    let res = loop {
        tokio::select! {
            r = &mut op => break r,
            _ = tokio::signal::ctrl_c() => {
                if interrupted {
                    eprintln!("\ninterrupted again: exiting now; run `bluegreen status` (the next command recovers)");
                    return ExitCode::from(130);
                }
                interrupted = true;
                eprintln!("\ninterrupt: stopping at the next safe point and rolling back (Ctrl-C again to exit at once)");
                deployer.interrupt();
            }
        }
    };
    // Let the printer drain the last events.
    tokio::time::sleep(Duration::from_millis(50)).await;
    printer.abort();
    if mode == Mode::Tty {
        print!("\r\x1b[2K");
    }
    match res {
        Ok(r) => report_result(mode, &r),
        Err(e) => fail(mode, &e),
    }
}

async fn serve(
    p: &Pipeline,
    state_dir: &std::path::Path,
    mode: Mode,
) -> bluegreen::Result<ExitCode> {
    let (config, admin) = p.proxy().ok_or_else(|| {
        Error::invalid(
            "pipeline file",
            format!("switch kind \"{}\"", p.switch_kind()),
            "`bluegreen serve` runs the embedded proxy; with this switch, run the proxy server itself",
        )
    })?;
    let token = pipeline::ensure_token(&Pipeline::token_path(state_dir))?;
    // A restarted proxy serves at once, exactly as before: it restores the routing it last
    // applied from its own routing file.
    let mut config = config.clone();
    if config.routing_file.is_none() {
        config.routing_file = Some(Pipeline::routing_path(state_dir));
    }
    let proxy = ProxySwitch::bind(config).await?;
    if proxy.current().await?.is_none() {
        // No routing file yet (a first start, or one written by an older version): the routing
        // the state last recorded, with the endpoints a switched flight recorded before its
        // switch (the slot records get them only when the run completes).
        let store = backends::store(p, state_dir)?;
        if let Some((split, eps)) = store.load().await?.and_then(|st| st.last_routing()) {
            if let Err(e) = proxy.apply(&split, &eps).await {
                eprintln!("warning: could not restore the recorded split {split}: {e}");
            }
        }
    }
    // With the process environment, this server owns the programs: `deploy` asks it through
    // the admin API, and it supervises the live one.
    let env = match &p.environment {
        pipeline::EnvironmentCfg::Process(pc) => Some(bluegreen::process::ProcessEnvironment::new(
            backends::process_config(pc, state_dir)?,
        )),
        _ => None,
    };
    let served = env
        .clone()
        .map(|e| std::sync::Arc::new(e) as std::sync::Arc<dyn bluegreen::Environment>);
    let admin = proxy
        .serve_admin_with_environment(admin, token, served)
        .await?;
    if mode == Mode::Json {
        emit_json(
            serde_json::json!({"result": "serving", "listen": proxy.local_addr().to_string(), "admin": admin.local_addr().to_string()}),
        );
    } else {
        println!(
            "serving on http://{} (control API on {})",
            proxy.local_addr(),
            admin.url()
        );
    }
    let supervisor = match env {
        Some(env) => Some(supervise(p, state_dir, &proxy, env, mode).await?),
        None => None,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("installing the SIGTERM handler", e))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    if let Some(s) = supervisor {
        s.shutdown().await;
    }
    admin.shutdown().await;
    proxy.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// With the process environment, `serve` supervises the live slot's program (see
/// `on_live_failure`); what the supervisor does is printed (stderr, or JSON lines on stdout).
/// A failover is a rollback run like any other (lock, fencing, health gate, history).
async fn supervise(
    p: &Pipeline,
    state_dir: &std::path::Path,
    proxy: &ProxySwitch,
    env: bluegreen::process::ProcessEnvironment,
    mode: Mode,
) -> bluegreen::Result<bluegreen::process::SupervisorHandle> {
    use bluegreen::process::{OnLiveFailure, Supervisor, SupervisorConfig, SupervisorEvent};
    let pipeline::EnvironmentCfg::Process(pc) = &p.environment else {
        return Err(Error::invalid(
            "pipeline file",
            "[environment]",
            "only the process environment is supervised",
        ));
    };
    let config = SupervisorConfig::default()
        .with_on_live_failure(pc.on_live_failure)
        .with_failover_after(pc.failover_after);
    let mut supervisor = Supervisor::new(env.clone(), backends::store(p, state_dir)?, config);
    if pc.on_live_failure == OnLiveFailure::Failover {
        // The failover is a rollback run like any other (lock, fencing, health gate, history),
        // switching this very server's proxy.
        let switch = std::sync::Arc::new(proxy.clone());
        let public = Some(proxy.local_addr());
        let env = std::sync::Arc::new(env);
        supervisor = supervisor
            .with_deployer(backends::deployer_with(p, state_dir, switch, env, public).await?);
    }
    let handle = supervisor.start();
    let mut events = handle.subscribe();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let e = match events.recv().await {
                Ok(e) => e,
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            };
            let (event, slot, detail) = match &e {
                SupervisorEvent::Down { slot } => ("down", *slot, String::new()),
                SupervisorEvent::Restarted { slot, attempt } => {
                    ("restarted", *slot, format!("attempt {attempt}"))
                }
                SupervisorEvent::RestartFailed {
                    slot,
                    attempt,
                    error,
                } => (
                    "restart_failed",
                    *slot,
                    format!("attempt {attempt}: {error}"),
                ),
                SupervisorEvent::FailedOver { from, id } => {
                    ("failed_over", *from, format!("rollback #{id}"))
                }
                SupervisorEvent::FailoverFailed { from, error } => {
                    ("failover_failed", *from, error.clone())
                }
                _ => ("other", bluegreen::Slot::Blue, format!("{e:?}")),
            };
            if mode == Mode::Json {
                emit_json(
                    serde_json::json!({"event": "supervisor", "action": event, "slot": slot, "detail": detail}),
                );
            } else {
                eprintln!("supervisor: live slot {slot} {event} {detail}");
            }
        }
    });
    Ok(handle)
}

/// The exit code of `status` when it finds drift.
const DRIFT: u8 = 6;

async fn status(d: &Deployer, mode: Mode) -> bluegreen::Result<ExitCode> {
    let st = d.status().await?;
    let code = if st.drift.is_empty() { 0 } else { DRIFT };
    if mode == Mode::Json {
        emit_json(serde_json::json!({
            "result": "ok",
            "active": st.state.active,
            "split": st.switch,
            "slots": {
                "blue": st.slots.blue,
                "green": st.slots.green,
            },
            "in_flight": st.state.in_flight.as_ref().map(|f| serde_json::json!({
                "id": f.id, "version": f.release.version.as_str(), "phase": f.phase, "waiting": f.waiting,
            })),
            "lock": st.lock,
            "drift": st.drift,
            "last_deployment": st.state.history.back().map(|h| serde_json::json!({
                "id": h.id, "version": h.version.as_str(), "outcome": h.outcome,
                "ledger": h.ledger, "traffic": h.ledger.summary(),
            })),
            "exit_code": code,
        }));
        return Ok(ExitCode::from(code));
    }
    println!(
        "live:    {}",
        st.state
            .active
            .map(|s| s.to_string())
            .unwrap_or_else(|| "nothing deployed".into())
    );
    println!(
        "traffic: {}",
        st.switch
            .map(|s| s.to_string())
            .unwrap_or_else(|| "not configured".into())
    );
    for slot in bluegreen::Slot::ALL {
        let s = st.slots.get(slot);
        let rec = st.state.slots.get(slot);
        // The record names the deployment only of the version that really runs there.
        let recorded = rec.as_ref().map(|r| match &s.version {
            Some(v) if *v != r.release.version => format!(
                " (not the recorded {} of deployment #{})",
                r.release.version, r.deployment
            ),
            _ => format!(" (deployment #{}, {})", r.deployment, r.deployed_at),
        });
        println!(
            "{slot:<6}   {:?} {}{}",
            s.state,
            s.version.as_ref().map(|v| v.as_str()).unwrap_or("-"),
            recorded.unwrap_or_default()
        );
        // A slot over several hosts: each host by name, an unreachable one with why.
        for part in &s.parts {
            match &part.error {
                Some(e) => println!("  host {}: unreachable: {e}", part.name),
                None => println!(
                    "  host {}: {:?} {}",
                    part.name,
                    part.state,
                    part.version.as_ref().map(|v| v.as_str()).unwrap_or("-")
                ),
            }
        }
    }
    if let Some(f) = &st.state.in_flight {
        println!(
            "in flight: #{} {} at {}{}",
            f.id,
            f.release.version,
            f.phase,
            f.waiting
                .as_ref()
                .map(|w| format!(" (waiting: {w:?})"))
                .unwrap_or_default()
        );
    }
    if let Some(l) = &st.lock {
        println!("lock:    held by {l}");
    }
    for d in &st.drift {
        println!("drift:   {d}");
    }
    // What clients saw during the last deployment, ending in its one-line summary.
    if let Some(h) = st.state.history.back() {
        println!(
            "last deployment: #{} {} {}",
            h.id,
            h.kind.as_str(),
            h.version
        );
        for line in h.ledger.to_string().lines() {
            println!("  {line}");
        }
    }
    Ok(ExitCode::from(code))
}

async fn validate(
    p: &Pipeline,
    state_dir: &std::path::Path,
    mode: Mode,
) -> bluegreen::Result<ExitCode> {
    let d = backends::deployer(p, state_dir).await?;
    let st = d.status().await?;
    // Every host of a fleet must answer: "reachable" is said only when it is true.
    let unreachable: Vec<String> = bluegreen::Slot::ALL
        .iter()
        .flat_map(|slot| st.slots.get(*slot).unreadable_parts())
        .map(|part| (&part.name, part.error.as_deref().unwrap_or("")))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .map(|(name, error)| format!("{name}: {error}"))
        .collect();
    if !unreachable.is_empty() {
        return Err(bluegreen::Error::backend(
            p.environment_kind(),
            "status",
            true,
            format!(
                "environment host(s) unreachable: {}; fix them or take them out of hosts",
                unreachable.join("; ")
            ),
        ));
    }
    let database = backends::check_database(p).await?;
    let mut lines = vec![
        format!("pipeline file ok (project {})", p.project.name),
        format!(
            "{} switch reachable (traffic: {})",
            p.switch_kind(),
            st.switch
                .map(|s| s.to_string())
                .unwrap_or_else(|| "not configured".into())
        ),
        format!(
            "{} environment reachable (blue {:?}, green {:?})",
            p.environment_kind(),
            st.slots.blue.state,
            st.slots.green.state
        ),
        format!(
            "state store {} readable (revision {})",
            p.state_kind(),
            st.state.revision
        ),
    ];
    lines.push(database.unwrap_or_else(|| "no database strategy".into()));
    if mode == Mode::Json {
        emit_json(serde_json::json!({"result": "ok", "checks": lines, "drift": st.drift}));
    } else {
        for l in &lines {
            println!("ok  {l}");
        }
        for d in &st.drift {
            println!("warn {d}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(cli: Cli, mode: Mode) -> bluegreen::Result<ExitCode> {
    // Every problem with the pipeline file is a usage error (exit 2).
    let (p, state_dir) = Pipeline::load(&cli.file).map_err(|e| match e {
        Error::InvalidInput { .. } => e,
        other => pipeline::config_error(&cli.file, other),
    })?;
    if let Command::Serve = cli.command {
        return serve(&p, &state_dir, mode).await;
    }
    let d = backends::deployer(&p, &state_dir).await?;
    let started = std::time::SystemTime::now();
    Ok(match cli.command {
        Command::Serve => unreachable!(),
        Command::Deploy { version, redeploy } => {
            let release = backends::with_passed_env(&p, p.release(&version)?);
            let code = if redeploy {
                warn_rollback_target_lost(&d, &version).await;
                run_op(&d, mode, d.redeploy(release)).await
            } else {
                run_op(&d, mode, d.deploy(release)).await
            };
            if code != ExitCode::SUCCESS {
                print_logs_written_since(&p, &state_dir, started);
            }
            code
        }
        Command::Rollback => {
            let code = run_op(&d, mode, d.rollback()).await;
            if code != ExitCode::SUCCESS {
                print_logs_written_since(&p, &state_dir, started);
            }
            code
        }
        Command::Promote => run_op(&d, mode, d.promote()).await,
        Command::Abort => run_op(&d, mode, d.abort()).await,
        Command::Plan { version } => {
            let plan = d.plan(&p.release(&version)?).await?;
            if mode == Mode::Json {
                let steps: Vec<_> = plan
                    .steps
                    .iter()
                    .map(|s| serde_json::json!({"phase": s.phase, "backend": s.backend, "action": s.action}))
                    .collect();
                emit_json(
                    serde_json::json!({"result": "ok", "target": plan.target, "steps": steps}),
                );
            } else {
                print!("{plan}");
            }
            ExitCode::SUCCESS
        }
        Command::Status => status(&d, mode).await?,
        Command::History => {
            let h = d.history().await?;
            if mode == Mode::Json {
                let entries: Vec<serde_json::Value> = h
                    .iter()
                    .map(|e| {
                        let mut v = serde_json::to_value(e).unwrap_or_default();
                        v["traffic"] = serde_json::Value::String(e.ledger.summary());
                        v
                    })
                    .collect();
                emit_json(serde_json::json!({"result": "ok", "history": entries}));
            } else if h.is_empty() {
                println!("no deployments yet");
            } else {
                for e in h {
                    println!(
                        "#{:<4} {:<8} {:<12} {:<5} {}  {:?}",
                        e.id,
                        e.kind.as_str(),
                        e.version,
                        e.slot,
                        e.finished_at,
                        e.outcome
                    );
                    println!("      traffic: {}", e.ledger.summary());
                }
            }
            ExitCode::SUCCESS
        }
        Command::Cleanup => {
            let removed = d.cleanup().await?;
            if mode == Mode::Json {
                emit_json(serde_json::json!({"result": "ok", "removed": removed}));
            } else {
                match removed {
                    Some(s) => println!("removed the idle slot {s}"),
                    None => println!("nothing to clean up"),
                }
            }
            ExitCode::SUCCESS
        }
        Command::Reset => {
            d.reset().await?;
            if mode == Mode::Json {
                emit_json(serde_json::json!({"result": "ok"}));
            } else {
                println!("both slots removed; history kept");
            }
            ExitCode::SUCCESS
        }
        Command::Validate => validate(&p, &state_dir, mode).await?,
        Command::BreakLock { force } => {
            // A lock that cannot be read names no holder that could still be alive: it is
            // removed, and the output says what it was.
            let corrupt = match backends::store(&p, &state_dir)?.lock_info().await {
                Err(Error::CorruptState { location, reason }) => Some((location, reason)),
                _ => None,
            };
            let removed = if force || corrupt.is_some() {
                d.force_break_lock().await?
            } else {
                d.break_lock().await?
            };
            if mode == Mode::Json {
                let corrupt = corrupt
                    .as_ref()
                    .map(|(l, r)| serde_json::json!({"location": l, "reason": r}));
                emit_json(
                    serde_json::json!({"result": "ok", "removed": removed, "corrupt": corrupt}),
                );
            } else {
                match (removed, corrupt) {
                    (Some(l), _) => println!("removed the lock held by {l} (epoch {})", l.epoch),
                    (None, Some((location, reason))) => println!(
                        "removed a corrupt lock at {location} (it named no holder: {reason})"
                    ),
                    (None, None) => println!("no lock was held"),
                }
            }
            ExitCode::SUCCESS
        }
    })
}

/// After a failed run, where the process environment kept the logs the run wrote (the failed
/// release's log survives its removal, rotated to `<slot>.log.1`).
fn print_logs_written_since(
    p: &Pipeline,
    state_dir: &std::path::Path,
    since: std::time::SystemTime,
) {
    let pipeline::EnvironmentCfg::Process(pc) = &p.environment else {
        return;
    };
    let Ok(config) = backends::process_config(pc, state_dir) else {
        return;
    };
    let env = bluegreen::process::ProcessEnvironment::new(config);
    for slot in bluegreen::Slot::ALL {
        for log in env.log_paths(slot) {
            let written = std::fs::metadata(&log)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since);
            if written {
                eprintln!("log of slot {slot}: {}", log.display());
            }
        }
    }
}

/// Log lines (the libraries' `tracing` events: stale-lock takeovers, drain timeouts, SIGKILL
/// escalations, lease-renewal failures, ...) go to stderr. Warnings show by default; `RUST_LOG`
/// (e.g. `RUST_LOG=bluegreen_core=debug`) wins over `-v`/`-q`.
fn install_logging(verbose: u8, quiet: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match (verbose, quiet) {
        (_, 1) => "error",
        (_, q) if q >= 2 => "off",
        (0, _) => "warn",
        (1, _) => "info",
        (2, _) => "debug",
        _ => "trace",
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(v).unwrap_or_else(|e| {
            eprintln!("warning: ignoring RUST_LOG: {e}");
            EnvFilter::new(level)
        }),
        _ => EnvFilter::new(level),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    install_logging(cli.verbose, cli.quiet);
    let mode = if cli.json {
        Mode::Json
    } else if std::io::stdout().is_terminal() {
        Mode::Tty
    } else {
        Mode::Plain
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli, mode)) {
        Ok(code) => code,
        Err(e) => fail(mode, &e),
    }
}
