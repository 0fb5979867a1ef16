//! `haproxy_switch`: failed requests and switch latency while HAProxy switches between two demo
//! backends under keep-alive load, two ways, in one run:
//!
//! - (a) ours: `HaproxySwitch::apply` (new server health-checked while draining, `ready`,
//!   verified; then the old one `drain` → sessions 0 → `maint`),
//! - (b) the seed runbooks' way over the same runtime API: `set server <old> state maint`, then
//!   `set server <new> state ready`.
//!
//! Each scenario gets a fresh HAProxy 2.6 (the crate's rendered backend, health checks every
//! 100 ms), the same clients (one keep-alive HTTP/1.1 connection each, no retries: a request sent
//! and not answered 2xx is a failure, and the client reconnects) and the same pause between
//! switches. Prints totals, failures, switch latency, and the failure ratio.
//!
//! ```text
//! cargo run --release -p bluegreen-bench --bin haproxy_switch -- [--clients 16] [--switches 50] [--pause-ms 150]
//! ```

use std::time::{Duration, Instant};

mod common;
use common::{parse_args, target, Options, Result};

use bluegreen_core::{Endpoints, Name, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_haproxy::{AdminState, Command, HaproxyConfig, HaproxySwitch, RuntimeClient};
use bluegreen_testenv::haproxy::{self, Haproxy};
use bluegreen_testenv::{DemoBackends, Load, LoadOptions};

/// HAProxy (`bluegreen-testenv`'s) with the crate's rendered backend, health checks every
/// 100 ms.
fn start_haproxy() -> Result<Haproxy> {
    Ok(Haproxy::launch(false, |sock| {
        HaproxyConfig::unix(sock)
            .with_health_check("/health", Duration::from_millis(100))
            .with_drain_timeout(Duration::from_secs(10))
            .with_poll_interval(Duration::from_millis(10))
    })?)
}

/// Keep-alive HTTP/1.1 clients through HAProxy; no retries.
fn load(h: &Haproxy, clients: usize) -> Load {
    Load::start(h.addr(), LoadOptions::new(clients))
}

struct Outcome {
    name: &'static str,
    ok: u64,
    failed: u64,
    latencies: Vec<Duration>,
}

impl Outcome {
    fn total(&self) -> u64 {
        self.ok + self.failed
    }

    fn fail_rate(&self) -> f64 {
        self.failed as f64 / self.total().max(1) as f64
    }

    fn pct(&self, q: f64) -> Duration {
        let mut v = self.latencies.clone();
        v.sort();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v[((v.len() - 1) as f64 * q).round() as usize]
    }
}

async fn ours(o: Options, endpoints: &Endpoints) -> Result<Outcome> {
    let h = start_haproxy()?;
    let switch = HaproxySwitch::new(h.config.clone())?;
    switch
        .apply(&TrafficSplit::all(Slot::Blue), endpoints)
        .await?;
    let load = load(&h, o.clients);
    tokio::time::sleep(o.pause).await;
    let latencies = common::switch_repeatedly(&switch, endpoints, o).await?;
    let stats = load.finish().await;
    let (ok, failed) = (stats.ok, stats.failed);
    Ok(Outcome {
        name: "(a) HaproxySwitch::apply (ready+verify, then drain+maint)",
        ok,
        failed,
        latencies,
    })
}

async fn runbook(o: Options, endpoints: &Endpoints) -> Result<Outcome> {
    let h = start_haproxy()?;
    // Set up both servers with the crate (addresses, weight 100, blue live), then switch the
    // runbook's way over the same socket.
    let switch = HaproxySwitch::new(h.config.clone())?;
    switch
        .apply(&TrafficSplit::all(Slot::Green), endpoints)
        .await?;
    switch
        .apply(&TrafficSplit::all(Slot::Blue), endpoints)
        .await?;
    let client = RuntimeClient::new(h.config.address.clone(), Duration::from_secs(5));
    let backend = Name::new(h.config.backend())?;
    let server = |s: Slot| Name::new(h.config.server(s));
    let load = load(&h, o.clients);
    tokio::time::sleep(o.pause).await;
    let mut latencies = Vec::new();
    for i in 0..o.switches {
        let (new, old) = (target(i), target(i).other());
        let t = Instant::now();
        client
            .send(&Command::set_state(
                &backend,
                &server(old)?,
                AdminState::Maint,
            ))
            .await?;
        client
            .send(&Command::set_state(
                &backend,
                &server(new)?,
                AdminState::Ready,
            ))
            .await?;
        latencies.push(t.elapsed());
        tokio::time::sleep(o.pause).await;
    }
    let stats = load.finish().await;
    let (ok, failed) = (stats.ok, stats.failed);
    Ok(Outcome {
        name: "(b) runbook: old maint, then new ready",
        ok,
        failed,
        latencies,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = parse_args("haproxy_switch")?;
    let Some(bin) = haproxy::binary() else {
        return Err("HAProxy is not installed (Debian package haproxy)".into());
    };
    let version = std::process::Command::new(bin).arg("-v").output()?;
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let backends = DemoBackends::start().await;
    let endpoints = backends.endpoints();
    println!(
        "{version}\n{} keep-alive clients, {} switches, {:?} between switches\n",
        o.clients, o.switches, o.pause
    );
    let a = ours(o, &endpoints).await?;
    let b = runbook(o, &endpoints).await?;
    println!(
        "{:<58} {:>9} {:>7} {:>9} {:>9} {:>9}",
        "scenario", "requests", "failed", "p50", "p99", "max"
    );
    for r in [&a, &b] {
        println!(
            "{:<58} {:>9} {:>7} {:>9.1?} {:>9.1?} {:>9.1?}",
            r.name,
            r.total(),
            r.failed,
            r.pct(0.5),
            r.pct(0.99),
            r.pct(1.0)
        );
    }
    println!();
    if a.failed == 0 {
        println!(
            "failure rate: (a) 0 of {} vs (b) {:.4} % ({} of {}): (a) fails none",
            a.total(),
            b.fail_rate() * 100.0,
            b.failed,
            b.total()
        );
    } else {
        println!(
            "failure-rate ratio (b)/(a): {:.1}x",
            b.fail_rate() / a.fail_rate()
        );
    }
    println!(
        "switch latency ratio (a)/(b), median: {:.1}x",
        a.pct(0.5).as_secs_f64() / b.pct(0.5).as_secs_f64().max(1e-9)
    );
    Ok(())
}
