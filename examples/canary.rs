//! Canary: traffic moves 10 % → 50 % → 100 % with an automatic analysis at each step, and a bad
//! release is rolled back at its first step, having seen only a tenth of the traffic.
//!
//! Each step prints the statistical verdict (the canary against the stable slot, from the
//! switch's own counters: a two-proportion z-test on error rates and a p95 latency ratio) and the
//! deployment's traffic ledger so far, ending in one line such as `812 requests, 0 dropped,
//! p99 +0.2 ms`.
//!
//! ```text
//! cargo run --example canary --features haproxy   # through a real HAProxy (set weight, show stat)
//! cargo run --example canary                       # through the embedded proxy, runs anywhere
//! ```
//!
//! Releases run as local processes. With the `haproxy` feature and HAProxy installed, the example
//! starts HAProxy on the backend snippet `bluegreen-haproxy` renders: the canary weights are
//! `set weight` commands on its runtime API and the analysis reads each server's counters from
//! `show stat`. Otherwise the embedded proxy (weights, per-slot metrics) does the same. The engine
//! is the same for every switch with weights and metrics.

use std::sync::Arc;
use std::time::Duration;

use bluegreen::health::HttpCheck;
use bluegreen::process::{ProcessConfig, ProcessEnvironment};
use bluegreen::proxy::{ProxyConfig, ProxySwitch};
use bluegreen::{
    CanaryStep, DeployEvent, Deployer, FileStateStore, LiveTraffic, MetricsAnalysis, Policy, Slot,
    StatisticalAnalysis, TrafficSwitch,
};

mod common;
use common::{demo_release as release, live, Load};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::main_or_demo(canary)
}

/// The switch: HAProxy when built in and installed, else the embedded proxy. Returns it, the
/// public URL, and what must stay alive while it runs.
async fn switch(
) -> Result<(Arc<dyn TrafficSwitch>, String, Box<dyn std::any::Any>), Box<dyn std::error::Error>> {
    #[cfg(feature = "haproxy")]
    {
        use bluegreen::haproxy::{HaproxyConfig, HaproxySwitch};
        let haproxy = common::local_haproxy(|sock| {
            HaproxyConfig::unix(sock)
                .with_health_check("/health", Duration::from_millis(200))
                .with_drain_timeout(Duration::from_secs(5))
        })?;
        match haproxy {
            Some(h) => {
                println!("switch: HAProxy on 127.0.0.1:{} (runtime API)", h.port);
                let url = h.url("/");
                let switch = HaproxySwitch::new(h.config.clone())?;
                return Ok((Arc::new(switch), url, Box::new(h)));
            }
            None => {
                common::missing("HAProxy (apt-get install haproxy)")?;
            }
        }
    }
    let proxy = ProxySwitch::bind(ProxyConfig::default()).await?;
    println!("switch: the embedded proxy on {}", proxy.url("/"));
    let url = proxy.url("/");
    Ok((Arc::new(proxy.clone()), url, Box::new(ShutDown(proxy))))
}

/// Shuts the embedded proxy down when dropped.
struct ShutDown(ProxySwitch);

impl Drop for ShutDown {
    fn drop(&mut self) {
        let proxy = self.0.clone();
        tokio::spawn(async move { proxy.shutdown().await });
    }
}

async fn canary() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("bluegreen-canary-{}", std::process::id()));
    let (switch, url, guard) = switch().await?;
    let policy = Policy::default()
        .with_readiness_timeout(Duration::from_secs(10))
        .with_canary(vec![
            CanaryStep::new(10, Duration::from_secs(3)),
            CanaryStep::new(50, Duration::from_secs(3)),
        ])
        .with_observation(Duration::from_secs(2), Duration::from_millis(250));
    let deployer = Deployer::builder()
        .environment(Arc::new(ProcessEnvironment::new(ProcessConfig::new(
            dir.join("process"),
        ))))
        .switch(switch)
        .store(Arc::new(FileStateStore::new(dir.join("state"))?))
        .health_check(Arc::new(HttpCheck::new("/health")))
        // The canary against the stable slot: significantly more errors (z > 2.326) or a p95
        // above 1.5 × the stable's fails; fewer than 30 requests a side is inconclusive.
        .analysis(Arc::new(StatisticalAnalysis::new().with_min_samples(30)))
        // And an absolute bound: at most 2 % of the canary's requests may fail.
        .analysis(Arc::new(MetricsAnalysis::new(0.02).with_min_requests(10)))
        .policy(policy)
        .build()?;

    let mut events = deployer.subscribe();
    let printer = tokio::spawn(async move {
        // The latest verdict of each analysis this round (statistical first, then metrics).
        let mut verdicts: Vec<String> = Vec::new();
        while let Ok(ev) = events.recv().await {
            match ev {
                DeployEvent::Started {
                    id,
                    version,
                    target,
                    ..
                } => {
                    println!("#{id} {version} → {target}")
                }
                DeployEvent::Switched { split, .. } => println!("   ⇄ {split}"),
                DeployEvent::Analysis {
                    verdict, detail, ..
                } => {
                    if verdict == "fail" {
                        println!("   ✗ analysis: {detail}")
                    }
                    if verdicts.len() == 2 {
                        verdicts.clear();
                    }
                    verdicts.push(if detail.is_empty() {
                        verdict
                    } else {
                        format!("{verdict} ({detail})")
                    });
                }
                // After each step's observation, and once more when the run finishes.
                DeployEvent::Traffic { step, ledger, .. } => match verdicts.first() {
                    Some(v) => {
                        println!("   step {}: statistical verdict: {v}", step + 1);
                        println!("   step {}: traffic: {}", step + 1, ledger.summary());
                        verdicts.clear();
                    }
                    None => println!("   done: traffic: {}", ledger.summary()),
                },
                DeployEvent::RollingBack { .. } => println!("   ↩ rolling back"),
                _ => {}
            }
        }
    });

    let outcome = async {
        live(deployer.deploy(release("v1")?).await?)?;
        let load = Load::start(url.clone(), 4);
        tokio::time::sleep(Duration::from_millis(500)).await;

        println!("\na good release walks through every step:");
        live(deployer.deploy(release("v2")?).await?)?;

        println!("\na release answering 30 % errors is stopped at 10 %:");
        let bad = release("v3")?.with_env("DEMO_ERROR_RATE", "0.3");
        let err = match deployer.deploy(bad).await {
            Ok(r) => return Err(format!("v3 should have been rolled back: {r:?}").into()),
            Err(e) => e,
        };
        println!("   {err}");
        if err.live_traffic() != Some(LiveTraffic::RolledBack) {
            return Err("v3 was not switched back".into());
        }
        // A failed deployment keeps its ledger in history: what clients saw, rollback included.
        if let Some(h) = deployer.history().await?.last() {
            println!("   traffic of #{}: {}", h.id, h.ledger.summary());
        }
        let (counts, failed) = load.finish().await;
        let total: u64 = counts.values().sum::<u64>() + failed;
        println!("\nrequests: {counts:?}, failed {failed} of {total}");
        println!("   (the failures are v3's own 500s while it held 10 % of the traffic)");
        let st = deployer.status().await?;
        if st.state.active != Some(Slot::Green) {
            return Err("v2 should be live on green".into());
        }
        println!(
            "live: green v2, traffic {}",
            st.switch.map(|s| s.to_string()).unwrap_or_default()
        );
        Ok::<(), Box<dyn std::error::Error>>(())
    }
    .await;

    deployer.reset().await?;
    drop(guard);
    printer.abort();
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}
