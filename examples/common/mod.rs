//! Shared by the examples: the demo web app mode (the examples re-execute themselves as the
//! "release" they deploy) and a load client that counts responses per version and failures.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

/// Counts responses per version and failures, from a few keep-alive clients.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    per_version: Arc<Mutex<BTreeMap<String, u64>>>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Load {
    pub(crate) fn start(url: String, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let per_version = Arc::new(Mutex::new(BTreeMap::new()));
        let failed = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let (url, stop, per_version, failed) = (
                    url.clone(),
                    stop.clone(),
                    per_version.clone(),
                    failed.clone(),
                );
                tokio::spawn(async move {
                    let client = reqwest::Client::builder()
                        .no_proxy()
                        .timeout(Duration::from_secs(10))
                        .build()
                        .expect("client");
                    while !stop.load(Ordering::Relaxed) {
                        match client.get(&url).send().await {
                            Ok(r) if r.status().is_success() => {
                                let v = r
                                    .headers()
                                    .get("x-bluegreen-version")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("?")
                                    .to_string();
                                let _ = r.bytes().await;
                                *per_version.lock().unwrap().entry(v).or_default() += 1;
                            }
                            Ok(r) => {
                                eprintln!("  ! request failed: HTTP {}", r.status());
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                eprintln!("  ! request failed: {e}");
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            per_version,
            failed,
            tasks,
        }
    }

    pub(crate) async fn finish(mut self) -> (BTreeMap<String, u64>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        let counts = self.per_version.lock().unwrap().clone();
        (counts, self.failed.load(Ordering::Relaxed))
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
/// example prints why it skips and exits 0.
pub(crate) fn missing(what: &str) -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("CI").is_some() {
        return Err(format!("{what} is required in CI").into());
    }
    println!("skipped: {what}");
    Ok(())
}

/// HAProxy started by an example on a rendered configuration, stopped on drop.
#[cfg(feature = "haproxy")]
pub(crate) struct LocalHaproxy {
    child: std::process::Child,
    /// The runtime API socket.
    pub(crate) socket: std::path::PathBuf,
    /// Where clients connect.
    pub(crate) port: u16,
}

#[cfg(feature = "haproxy")]
impl LocalHaproxy {
    /// `haproxy -db` in `dir` with a frontend on a free loopback port and the backend `config`
    /// renders; `None` when HAProxy is not installed.
    pub(crate) fn start(
        dir: &std::path::Path,
        config: &bluegreen::haproxy::HaproxyConfig,
    ) -> Result<Option<LocalHaproxy>, Box<dyn std::error::Error>> {
        let bin = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let Some(bin) = bin else { return Ok(None) };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n{}\ndefaults\n    mode http\n    timeout connect 2s\n    \
                 timeout client 30s\n    timeout server 30s\n\n\
                 frontend fe\n    bind 127.0.0.1:{port}\n    default_backend {}\n\n{}",
                config.render_global(&dir.join("haproxy-state"))?,
                config.backend(),
                config.render_backend()?
            ),
        )?;
        let log = std::fs::File::create(dir.join("haproxy.log"))?;
        let child = std::process::Command::new(bin)
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let bluegreen::haproxy::RuntimeAddress::Unix(socket) = config.address.clone() else {
            return Err("the examples use a unix runtime socket".into());
        };
        let me = LocalHaproxy {
            child,
            socket,
            port,
        };
        let start = std::time::Instant::now();
        while std::os::unix::net::UnixStream::connect(&me.socket).is_err() {
            if start.elapsed() > Duration::from_secs(20) {
                return Err(format!(
                    "haproxy did not start: {}",
                    std::fs::read_to_string(dir.join("haproxy.log")).unwrap_or_default()
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Some(me))
    }
}

#[cfg(feature = "haproxy")]
impl Drop for LocalHaproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    bluegreen::docker::ScratchImage::demo(tag, bluegreen_demo::binary_path())?
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
