//! Shared by the examples: the demo web app mode (the examples re-execute themselves as the
//! "release" they deploy) and a load client that counts responses per version and failures.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use bluegreen::{Report, RunOutcome};

/// Argument that turns this binary into the demo web app (the "release" the quickstart deploys).
pub(crate) const SERVE_DEMO: &str = "serve-demo";

/// The demo app, as a release would run it: `PORT`, `BLUEGREEN_VERSION`, `BLUEGREEN_SLOT` and the
/// `DEMO_*` knobs come from the environment; SIGTERM drains and exits.
pub(crate) async fn serve_demo() -> Result<(), Box<dyn std::error::Error>> {
    let config = bluegreen_demo::DemoConfig::from_env()?;
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port)).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    bluegreen_demo::serve(listener, config, async move {
        term.recv().await;
    })
    .await?;
    Ok(())
}

/// Counts responses per version and failures, from a few keep-alive clients 5 ms apart
/// (`bluegreen-testenv`'s load generator).
pub(crate) struct Load(bluegreen_testenv::Load);

impl Load {
    /// Clients sending `GET` to `url` (`http://<ip>:<port>/<path>`).
    pub(crate) fn start(url: String, clients: usize) -> Load {
        let rest = url.strip_prefix("http://").unwrap_or(&url);
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let addr = authority.parse().expect("the examples serve on an ip:port");
        Load(bluegreen_testenv::Load::start(
            addr,
            bluegreen_testenv::LoadOptions::new(clients)
                .with_path(format!("/{path}"))
                .with_pause(Duration::from_millis(5)),
        ))
    }

    /// Stops the clients; the answers per version and the failures (each reason printed).
    pub(crate) async fn finish(self) -> (BTreeMap<String, u64>, u64) {
        let stats = self.0.finish().await;
        for e in &stats.errors {
            eprintln!("  ! request failed: {e}");
        }
        (stats.versions, stats.failed)
    }
}

/// A run that did not end live (e.g. waiting for a person) is a failure of the quickstart.
pub(crate) fn live(report: Report) -> Result<(), Box<dyn std::error::Error>> {
    match report.outcome {
        RunOutcome::Live => Ok(()),
        other => Err(format!("#{} ended {other:?}", report.id).into()),
    }
}

/// Runs `body` unless this process was started as the demo app.
pub(crate) fn main_or_demo<F, Fut>(body: F) -> Result<(), Box<dyn std::error::Error>>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), Box<dyn std::error::Error>>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if std::env::args().nth(1).as_deref() == Some(SERVE_DEMO) {
        return runtime.block_on(serve_demo());
    }
    runtime.block_on(body())
}

/// A release of this very binary in demo-app mode.
pub(crate) fn demo_release(version: &str) -> bluegreen::Result<bluegreen::Release> {
    let exe = std::env::current_exe()
        .map_err(|e| bluegreen::Error::io("locating the example binary", e))?;
    Ok(bluegreen::Release::new(version, exe.to_string_lossy())?.with_arg(SERVE_DEMO))
}

/// Prints one line per phase, switch and rollback of `deployer`'s runs.
pub(crate) fn print_events(deployer: &bluegreen::Deployer) -> tokio::task::JoinHandle<()> {
    use bluegreen::DeployEvent;
    let mut events = deployer.subscribe();
    tokio::spawn(async move {
        while let Ok(ev) = events.recv().await {
            match ev {
                DeployEvent::Started {
                    id,
                    kind,
                    version,
                    target,
                    ..
                } => println!("  #{id} {} {version} → {target}", kind.as_str()),
                DeployEvent::PhaseCompleted { phase, elapsed, .. } => {
                    println!("      ✓ {phase:<22} {:>6} ms", elapsed.as_millis())
                }
                DeployEvent::PhaseFailed { phase, error, .. } => {
                    println!("      ✗ {phase}: {error}")
                }
                DeployEvent::Switched { split, .. } => println!("      ⇄ traffic: {split}"),
                DeployEvent::RollingBack { reason, .. } => {
                    println!("      ↩ rolling back: {reason}")
                }
                _ => {}
            }
        }
    })
}

/// A service an example needs is missing: in CI (`CI` set) that is an error; elsewhere the
/// example prints why it skips and exits 0 (`bluegreen-testenv`'s gate).
pub(crate) fn missing(what: &str) -> Result<(), Box<dyn std::error::Error>> {
    Ok(bluegreen_testenv::missing(what)?)
}

/// HAProxy started by an example (`bluegreen-testenv`'s, on fresh loopback ports) with the switch
/// configuration `config` makes from its runtime socket's path; stopped on drop. `None` when
/// HAProxy is not installed.
#[cfg(feature = "haproxy")]
pub(crate) fn local_haproxy(
    config: impl FnOnce(&std::path::Path) -> bluegreen::haproxy::HaproxyConfig,
) -> Result<Option<bluegreen_testenv::haproxy::Haproxy>, Box<dyn std::error::Error>> {
    if bluegreen_testenv::haproxy::binary().is_none() {
        return Ok(None);
    }
    Ok(Some(bluegreen_testenv::haproxy::Haproxy::launch(
        false, config,
    )?))
}

/// The PostgreSQL server from the standard libpq variables (`PGHOST`, `PGPORT`, `PGUSER`,
/// `PGPASSWORD`), connected to database `dbname`; `None` when `PGHOST` is not set.
#[cfg(feature = "postgres")]
pub(crate) fn pg_from_env(dbname: &str) -> Option<bluegreen::postgres::PostgresConfig> {
    let host = std::env::var("PGHOST").ok()?;
    let port = std::env::var("PGPORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5432);
    let mut c = bluegreen::postgres::PostgresConfig::new(host, port, dbname)
        .with_user(std::env::var("PGUSER").unwrap_or_else(|_| "postgres".into()));
    if let Ok(pw) = std::env::var("PGPASSWORD") {
        c = c.with_password(pw);
    }
    Some(c)
}

/// The demo app as a `FROM scratch` image on the local engine (built, no registry).
#[cfg(feature = "docker")]
pub(crate) async fn demo_image(
    env: &bluegreen::docker::DockerEnvironment,
    tag: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    bluegreen_testenv::docker::ScratchImage::demo(tag, bluegreen_demo::binary_path())?
        .build(env.client())
        .await?;
    Ok(tag.to_string())
}

/// Prints the finished deployments.
pub(crate) async fn print_history(deployer: &bluegreen::Deployer) -> bluegreen::Result<()> {
    println!("\nhistory:");
    for h in deployer.history().await? {
        println!(
            "   #{} {:<8} {:<3} → {:<5} {:?}",
            h.id,
            h.kind.as_str(),
            h.version,
            h.slot,
            h.outcome
        );
        println!("      traffic: {}", h.ledger.summary());
    }
    Ok(())
}

/// The Docker environment for `project` (5 s stop bound); `None` after [`missing`] when the
/// engine cannot be reached outside CI.
#[cfg(feature = "docker")]
pub(crate) async fn docker_env(
    project: &str,
) -> Result<Option<bluegreen::docker::DockerEnvironment>, Box<dyn std::error::Error>> {
    use bluegreen::docker::{DockerConfig, DockerEnvironment};
    match DockerEnvironment::connect(
        DockerConfig::new(project)?.with_stop_timeout(Duration::from_secs(5)),
    )
    .await
    {
        Ok(env) => Ok(Some(env)),
        Err(e) => missing(&format!("the Docker Engine ({e})")).map(|()| None),
    }
}

/// Prints the live slot, its release and the traffic split; an error unless `version` is live.
pub(crate) async fn expect_live(
    deployer: &bluegreen::Deployer,
    version: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let st = deployer.status().await?;
    let live = st.state.live_release().map(|r| r.version.to_string());
    println!(
        "   live: {:?} ({}), traffic: {}",
        st.state.active,
        live.clone().unwrap_or_default(),
        st.switch.map(|s| s.to_string()).unwrap_or_default()
    );
    if live.as_deref() != Some(version) {
        return Err(format!("{version} should be live").into());
    }
    Ok(())
}
