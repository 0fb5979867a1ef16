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
