//! Quickstart: a complete blue-green pipeline with nothing installed.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! - the embedded reverse proxy (`ProxySwitch`) listens on a loopback port;
//! - releases run as local processes (`ProcessEnvironment`): this very binary, re-executed in
//!   "demo server" mode, stands in for your application;
//! - v1 goes to blue; v2 to green behind the health gate, switched while a client keeps sending
//!   requests (every failed request is counted: it must be 0);
//! - v3 fails its health check and is refused: live traffic stays on v2;
//! - rollback returns to v1 in one switch; then the status and the history are printed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bluegreen::health::HttpCheck;
use bluegreen::process::{ProcessConfig, ProcessEnvironment};
use bluegreen::proxy::{ProxyConfig, ProxySwitch};
use bluegreen::{
    Deployer, FileStateStore, HttpVersionProbe, KeepOld, MetricsAnalysis, Policy, VersionMarker,
};

mod common;
use common::{demo_release as release, live, Load};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::main_or_demo(quickstart)
}

async fn quickstart() -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("bluegreen-quickstart-{}", std::process::id()));
    let proxy = ProxySwitch::bind(ProxyConfig::default()).await?;
    println!("bluegreen quickstart");
    println!("  proxy listening on {}", proxy.url("/"));
    println!("  state and logs in  {}", dir.display());

    let environment = ProcessEnvironment::new(ProcessConfig::new(dir.join("process")));
    let policy = Policy::default()
        .with_readiness_timeout(Duration::from_secs(8))
        .with_observation(Duration::from_secs(2), Duration::from_millis(250))
        .with_drain_timeout(Duration::from_secs(5))
        .with_keep_old(KeepOld::Warm);
    let deployer = Deployer::builder()
        .environment(Arc::new(environment))
        .switch(Arc::new(proxy.clone()))
        .store(Arc::new(FileStateStore::new(dir.join("state"))?))
        .health_check(Arc::new(HttpCheck::new("/health")))
        .verify_data_path(Arc::new(HttpVersionProbe::new(
            proxy.url("/"),
            VersionMarker::Header("x-bluegreen-version".into()),
        )))
        .analysis(Arc::new(MetricsAnalysis::new(0.01).with_min_requests(10)))
        .policy(policy)
        .build()?;

    // Progress: one line per phase.
    let printer = common::print_events(&deployer);

    let outcome = async {
        println!("\n1. deploy v1 to blue (first deploy)");
        live(deployer.deploy(release("v1")?).await?)?;

        let load = Load::start(proxy.url("/"), 4);
        tokio::time::sleep(Duration::from_millis(500)).await;

        println!("\n2. deploy v2 to green while clients send requests");
        live(deployer.deploy(release("v2")?).await?)?;

        println!("\n3. deploy v3, which fails its health check");
        let bad = release("v3")?.with_env("DEMO_FAIL_HEALTH", "1");
        let fast_fail = Deployer::builder()
            .environment(Arc::new(ProcessEnvironment::new(ProcessConfig::new(
                dir.join("process"),
            ))))
            .switch(Arc::new(proxy.clone()))
            .store(Arc::new(FileStateStore::new(dir.join("state"))?))
            .health_check(Arc::new(HttpCheck::new("/health")))
            .policy(Policy::default().with_readiness_timeout(Duration::from_secs(3)))
            .build()?;
        match fast_fail.deploy(bad).await {
            Ok(_) => return Err("v3 should have been refused".into()),
            Err(e) => println!("   refused as expected:\n   {e}"),
        }

        println!("\n4. rollback (green v2 → blue v1)");
        live(deployer.rollback().await?)?;
        tokio::time::sleep(Duration::from_millis(300)).await;

        let (counts, failed) = load.finish().await;
        println!("\nrequests through the proxy while all of this happened:");
        for (v, n) in &counts {
            println!("   {v}: {n}");
        }
        println!("   failed = {failed}");

        let st = deployer.status().await?;
        println!("\nstatus:");
        println!("   live slot: {:?}", st.state.active);
        println!(
            "   switch:    {}",
            st.switch.map(|s| s.to_string()).unwrap_or_default()
        );
        for slot in bluegreen::Slot::ALL {
            let s = st.slots.get(slot);
            println!(
                "   {slot:<5}      {:?} {}",
                s.state,
                s.version.as_ref().map(|v| v.as_str()).unwrap_or("")
            );
        }
        common::print_history(&deployer).await?;
        if failed > 0 {
            return Err(format!("{failed} requests failed during the deployments").into());
        }
        if counts.get("v2").copied().unwrap_or(0) == 0 {
            return Err("no request reached v2".into());
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    }
    .await;

    // Stop what we started, whatever happened.
    deployer.reset().await?;
    proxy.shutdown().await;
    printer.abort();
    let _ = std::fs::remove_dir_all(&dir);
    outcome?;
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
