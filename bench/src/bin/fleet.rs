//! `fleet`: a slot spread over several Docker engines, on three test-host engines (network
//! namespaces, `bluegreen-testenv`'s hosts), in one run:
//!
//! - deploy time of a `DockerFleet` of 1 host vs 3 hosts (same release, same settings, a fresh
//!   slot each round), as a ratio: the hosts deploy concurrently, so 3 hosts should cost little
//!   more than 1;
//! - failed requests while the embedded proxy switches 100 % between two slots of 3 endpoints
//!   each (one per host), under keep-alive load (expected: 0).
//!
//! ```text
//! cargo run --release -p bluegreen-bench --bin fleet -- [--clients 16] [--switches 20] [--pause-ms 150]
//! ```
//!
//! Needs root, iproute2, util-linux and dockerd (see the hosts module); not part of CI's run.

use std::time::{Duration, Instant};

mod common;
use common::{parse_args, Result};

use bluegreen_core::{Endpoints, Environment, PerSlot, Release, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_docker::{DockerConfig, DockerFleet, HostPorts, Publish, PullPolicy};
use bluegreen_proxy::{ProxyConfig, ProxySwitch};
use bluegreen_testenv::hosts::{self, TestHosts, DEMO_IMAGE};
use bluegreen_testenv::{Load, LoadOptions};

/// Deploy rounds per fleet size.
const ROUNDS: usize = 3;

fn config(project: &str, ports: HostPorts) -> Result<DockerConfig> {
    Ok(DockerConfig::new(project)?
        .with_pull(PullPolicy::Never)
        .with_publish(Publish::Host)
        .with_host_ports(ports)
        .with_stop_timeout(Duration::from_secs(2)))
}

/// Median time of `fleet.deploy(Blue, v1)` on a fresh slot, over [`ROUNDS`] rounds.
async fn deploy_time(fleet: &DockerFleet) -> Result<Duration> {
    let release = Release::new("v1", DEMO_IMAGE)?;
    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        fleet.remove(Slot::Blue).await?;
        let t = Instant::now();
        fleet.deploy(Slot::Blue, &release).await?;
        times.push(t.elapsed());
    }
    fleet.remove(Slot::Blue).await?;
    times.sort();
    Ok(times[times.len() / 2])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let o = parse_args("fleet")?;
    let o = common::Options {
        switches: if std::env::args().any(|a| a == "--switches") {
            o.switches
        } else {
            20
        },
        ..o
    };
    if let Some(what) = hosts::unavailable() {
        bluegreen_testenv::missing(&format!("test hosts ({what})"))?;
        return Ok(());
    }
    let Some(main_engine) = bluegreen_testenv::docker::engine().await else {
        return Ok(());
    };
    let set = TestHosts::start(3).await?;
    let tag = hosts::demo_image(&main_engine).await?;
    set.load_image(&main_engine, &tag).await?;
    let all = set.fleet_hosts();
    let pid = std::process::id();

    println!("# fleet bench\n");
    println!(
        "3 test-host engines (network namespaces on this machine), {} clients, {} switches, \
         {:?} apart, {ROUNDS} deploy rounds per size (median)\n",
        o.clients, o.switches, o.pause
    );

    let one = DockerFleet::new(
        config(&format!("bench-one-{pid}"), HostPorts::new(19080, 19081))?,
        all[..1].to_vec(),
    )?;
    let three = DockerFleet::new(
        config(&format!("bench-three-{pid}"), HostPorts::new(19180, 19181))?,
        all.clone(),
    )?;
    let t1 = deploy_time(&one).await?;
    let t3 = deploy_time(&three).await?;
    println!("## deploy time\n");
    println!("```");
    println!("  1 host    {t1:>10.3?}");
    println!("  3 hosts   {t3:>10.3?}");
    println!("```\n");
    println!(
        "- 3 hosts vs 1 host: x{:.2} (concurrency {})\n",
        t3.as_secs_f64() / t1.as_secs_f64().max(1e-9),
        bluegreen_docker::DEFAULT_CONCURRENCY
    );

    // Both slots on all three hosts, switched back and forth by the embedded proxy.
    let blue = three
        .deploy(Slot::Blue, &Release::new("v1", DEMO_IMAGE)?)
        .await?;
    let green = three
        .deploy(Slot::Green, &Release::new("v2", DEMO_IMAGE)?)
        .await?;
    let endpoints: Endpoints = PerSlot::new(blue, green);
    // The demo app answers at once after start, but give every container a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let proxy = ProxySwitch::bind(ProxyConfig::default()).await?;
    proxy
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints)
        .await?;
    let load = Load::start(proxy.local_addr(), LoadOptions::new(o.clients));
    tokio::time::sleep(o.pause).await;
    let started = Instant::now();
    let latencies = common::switch_repeatedly(&proxy, &endpoints, o).await?;
    let stats = load.finish().await;
    let elapsed = started.elapsed();
    let mut l = latencies.clone();
    l.sort();
    println!(
        "## {} switches across 3 hosts (embedded proxy)\n",
        o.switches
    );
    println!("```");
    println!(
        "  {} ok  {} failed  {:.0} req/s  apply() p50 {:?} max {:?}",
        stats.ok,
        stats.failed,
        stats.ok as f64 / elapsed.as_secs_f64(),
        l[l.len() / 2],
        l[l.len() - 1]
    );
    println!("```\n");
    println!("- failed requests during the switches: {}", stats.failed);

    for f in [&one, &three] {
        f.reset().await?;
    }
    set.stop()?;
    if stats.failed > 0 {
        return Err(format!("{} requests failed during the switches", stats.failed).into());
    }
    Ok(())
}
