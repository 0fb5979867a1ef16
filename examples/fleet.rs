//! fleet: one slot spread over several Docker engines (hosts), behind the embedded proxy, which
//! balances every slot over all its hosts.
//!
//! ```text
//! BLUEGREEN_FLEET_HOSTS='web1=tcp://10.0.0.11:2375@10.0.0.11,web2=unix:///run/web2.sock@10.0.0.12' \
//! BLUEGREEN_FLEET_IMAGE=bluegreen-demo:latest \
//!   cargo run --example fleet --features docker
//! ```
//!
//! Each host is `name=engine@address`: the engine's address (`unix://`, `tcp://`) and the address
//! this machine reaches the host's containers at. The image must be on every engine (or be
//! pullable there) and serve HTTP on `$PORT`, answering `/health` and stating its version in an
//! `x-bluegreen-version` header (as the demo app does: `cargo run -p bluegreen-testenv --features
//! docker --example build-demo-image`). The containers use host networking, blue on port 18080
//! and green on 18081 of every host. The example:
//!
//! 1. deploys v1 on every host (all or nothing) and routes to all of them;
//! 2. deploys v2 while clients send requests through the proxy (0 failed);
//! 3. prints each host's view of both slots;
//! 4. rolls back to v1 (still warm on every host), then removes everything it created.
//!
//! Without hosts it says so and exits 0 (in CI it fails). CI runs it against three test-host
//! engines: `bluegreen-testhosts run 3 -- cargo run --example fleet --features docker`.

use std::sync::Arc;
use std::time::Duration;

use bluegreen::docker::{DockerConfig, DockerFleet, FleetHost, HostPorts, Publish};
use bluegreen::health::HttpCheck;
use bluegreen::proxy::{ProxyConfig, ProxySwitch};
use bluegreen::{Deployer, FileStateStore, HttpVersionProbe, Policy, Release, Slot, VersionMarker};

mod common;
use common::{live, missing, Load};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::main_or_demo(fleet)
}

/// `name=engine@address,…` into hosts.
fn parse_hosts(list: &str) -> bluegreen::Result<Vec<FleetHost>> {
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let (name, rest) = item.trim().split_once('=').ok_or_else(|| {
                bluegreen::Error::invalid("fleet host", item, "expected name=engine@address")
            })?;
            let (engine, address) = rest.rsplit_once('@').ok_or_else(|| {
                bluegreen::Error::invalid("fleet host", item, "expected name=engine@address")
            })?;
            FleetHost::new(name, engine, address)
        })
        .collect()
}

async fn fleet() -> Result<(), Box<dyn std::error::Error>> {
    let list = std::env::var("BLUEGREEN_FLEET_HOSTS").unwrap_or_default();
    if list.trim().is_empty() {
        return missing(
            "Docker hosts for the fleet (set BLUEGREEN_FLEET_HOSTS=name=engine@address,…)",
        );
    }
    let hosts = parse_hosts(&list)?;
    let image =
        std::env::var("BLUEGREEN_FLEET_IMAGE").unwrap_or_else(|_| "bluegreen-demo:latest".into());
    let project = format!("fleet-example-{}", std::process::id());
    let fleet = DockerFleet::new(
        DockerConfig::new(&project)?
            .with_publish(Publish::Host)
            .with_host_ports(HostPorts::new(18080, 18081))
            .with_stop_timeout(Duration::from_secs(5)),
        hosts,
    )?;
    println!("fleet {:?}, image {image}", fleet.host_names());

    let dir = tempfile::tempdir()?;
    let proxy =
        ProxySwitch::bind(ProxyConfig::default().with_connect_timeout(Duration::from_millis(500)))
            .await?;
    let public = proxy.url("/");
    println!("embedded proxy on {public}");
    let d = Deployer::builder()
        .environment(Arc::new(fleet.clone()))
        .switch(Arc::new(proxy.clone()))
        .store(Arc::new(FileStateStore::new(dir.path().join("state"))?))
        .health_check(Arc::new(
            HttpCheck::new("/health").with_timeout(Duration::from_secs(1)),
        ))
        .verify_data_path(Arc::new(HttpVersionProbe::new(
            public.clone(),
            VersionMarker::Header("x-bluegreen-version".into()),
        )))
        .policy(
            Policy::default()
                .with_readiness_timeout(Duration::from_secs(60))
                .with_observation(Duration::from_secs(2), Duration::from_millis(250))
                .with_drain_timeout(Duration::from_secs(2)),
        )
        .build()?;
    let release = |v: &str| Release::new(v, image.clone());

    let outcome = async {
        println!("\n1. deploy v1 on every host");
        live(d.deploy(release("v1")?).await?)?;
        println!("   routed to {:?}", proxy.endpoints().get(Slot::Blue));

        println!("\n2. deploy v2 on every host while clients send requests");
        let load = Load::start(public.clone(), 4);
        tokio::time::sleep(Duration::from_millis(500)).await;
        live(d.deploy(release("v2")?).await?)?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (counts, failed) = load.finish().await;
        println!("   requests per version: {counts:?}, failed = {failed}");
        if failed > 0 {
            return Err(format!("{failed} requests failed during the switch").into());
        }

        println!("\n3. each host's view");
        for slot in Slot::ALL {
            for h in fleet.host_status(slot).await {
                match &h.status {
                    Ok(s) => println!(
                        "   {slot} on {}: {:?} {:?} {:?}",
                        h.host,
                        s.state,
                        s.version.as_ref().map(|v| v.as_str()),
                        s.endpoints
                    ),
                    Err(e) => println!("   {slot} on {}: unreachable: {e}", h.host),
                }
            }
        }

        println!("\n4. roll back to v1 (warm on every host)");
        d.rollback().await?;
        common::expect_live(&d, "v1").await?;
        d.reset().await?;
        Ok::<(), Box<dyn std::error::Error>>(())
    }
    .await;

    // Remove what we created on every host, whatever happened.
    if let Err(e) = fleet.reset().await {
        eprintln!("cleanup: {e}");
    }
    outcome?;
    println!("\ndone");
    Ok(())
}
