//! `nginx_switch`: failed requests and switch latency while nginx switches between two demo
//! backends under keep-alive load, three ways, in one run:
//!
//! - (a) `NginxDynamicSwitch` (Lua balancer, no reload),
//! - (b) `NginxReloadSwitch` (managed include, `nginx -t`, SIGHUP, verification),
//! - (c) the seed runbooks' way: plain string replace of the upstream file + `nginx -s reload`.
//!
//! Each scenario gets a fresh nginx (same settings: 2 workers, upstream keepalive 32), the same
//! clients (keep-alive, no retries: a request sent and not answered 2xx is a failure) and the same
//! pause between switches. Prints totals, failures, switch latency, and failure-rate ratios
//! against (c).
//!
//! ```text
//! cargo run --release -p bluegreen-bench --bin nginx_switch -- [--clients 16] [--switches 50] [--pause-ms 150]
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::{parse_args, target, Options, Result};

use bluegreen_core::{Endpoints, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_nginx::{NginxDynamicSwitch, NginxReloadConfig, NginxReloadSwitch, VerifyProbe};
use bluegreen_testenv::nginx;
use bluegreen_testenv::{DemoBackends, Load, LoadOptions, LoadStats};

/// One scenario's figures.
struct Outcome {
    name: &'static str,
    stats: LoadStats,
    elapsed: Duration,
    latencies: Vec<Duration>,
    note: String,
}

impl Outcome {
    fn fail_rate(&self) -> f64 {
        if self.stats.total() == 0 {
            0.0
        } else {
            self.stats.failed as f64 / self.stats.total() as f64
        }
    }

    fn per_switch(&self) -> f64 {
        self.stats.failed as f64 / self.latencies.len().max(1) as f64
    }

    fn pct(&self, q: f64) -> Duration {
        let mut v = self.latencies.clone();
        v.sort();
        if v.is_empty() {
            return Duration::ZERO;
        }
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v[i]
    }
}

async fn dynamic(o: Options, endpoints: &Endpoints, dir: &Path) -> Result<Outcome> {
    let (nginx, config) = nginx::start_dynamic(dir, "app", Ok)?;
    let listen = nginx.listen();
    let switch = NginxDynamicSwitch::new(config);
    switch
        .apply(&TrafficSplit::all(Slot::Blue), endpoints)
        .await?;
    let started = Instant::now();
    let load = Load::start(listen, LoadOptions::new(o.clients));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let latencies = common::switch_repeatedly(&switch, endpoints, o).await?;
    let stats = load.finish().await;
    let elapsed = started.elapsed();
    Ok(Outcome {
        elapsed,
        name: "(a) Dynamic: Lua balancer, no reload",
        stats,
        latencies,
        note: "apply = PUT to the control listener".into(),
    })
}

async fn reload(o: Options, endpoints: &Endpoints, dir: &Path) -> Result<Outcome> {
    let include = dir.join("upstream.conf");
    let config = NginxReloadConfig::builder(nginx::command(dir))
        .include(&include)
        .upstream("app")
        .pid_file(nginx::pid_file(dir))
        .build()?
        .with_drain_wait(Duration::from_secs(2));
    // The include exists before nginx starts; the verify probe needs nginx's port.
    NginxReloadSwitch::new(config.clone())
        .write_initial(&TrafficSplit::all(Slot::Blue), endpoints)?;
    let nginx = nginx::start_reload(dir, &include, "app", None)?;
    let listen = nginx.listen();
    let switch = NginxReloadSwitch::new(config.with_verify(VerifyProbe::new(listen)));
    let started = Instant::now();
    let load = Load::start(listen, LoadOptions::new(o.clients));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::new();
    let mut draining = 0;
    for i in 0..o.switches {
        let routing = bluegreen_nginx::Routing {
            split: TrafficSplit::all(target(i)),
            endpoints: endpoints.clone(),
        };
        let t = Instant::now();
        let report = switch.switch_to(&routing).await?;
        // `latency` ends when verification passed; the drain wait after it is not switch latency.
        latencies.push(report.latency.min(t.elapsed()));
        if report.old_workers_draining > 0 {
            draining += 1;
        }
        tokio::time::sleep(o.pause).await;
    }
    let stats = load.finish().await;
    let elapsed = started.elapsed();
    Ok(Outcome {
        elapsed,
        name: "(b) Reload: NginxReloadSwitch",
        stats,
        latencies,
        note: format!(
            "apply = nginx -t + SIGHUP + new worker up + verified through nginx; old workers still draining after 2 s: {draining} times"
        ),
    })
}

async fn runbook(o: Options, endpoints: &Endpoints, dir: &Path) -> Result<Outcome> {
    let include = dir.join("upstream.conf");
    let blue = endpoints.blue[0].authority();
    let green = endpoints.green[0].authority();
    std::fs::write(
        &include,
        format!("upstream app {{\n    server {blue};\n    keepalive 32;\n}}\n"),
    )?;
    let cmd = nginx::command(dir);
    let nginx = nginx::start_reload(dir, &include, "app", None)?;
    let listen = nginx.listen();
    let started = Instant::now();
    let load = Load::start(listen, LoadOptions::new(o.clients));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::new();
    for i in 0..o.switches {
        let (from, to) = match target(i) {
            Slot::Green => (&blue, &green),
            Slot::Blue => (&green, &blue),
        };
        let t = Instant::now();
        // The runbook: sed -i "s/<old>/<new>/" upstream.conf && nginx -s reload
        let text = std::fs::read_to_string(&include)?;
        std::fs::write(&include, text.replace(from.as_str(), to))?;
        let out = tokio::process::Command::new(&cmd.binary)
            .args(cmd.base_args())
            .args(["-s", "reload"])
            .output()
            .await?;
        latencies.push(t.elapsed());
        if !out.status.success() {
            return Err(format!(
                "nginx -s reload failed: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        tokio::time::sleep(o.pause).await;
    }
    let stats = load.finish().await;
    let elapsed = started.elapsed();
    Ok(Outcome {
        elapsed,
        name: "(c) runbook: string replace + nginx -s reload",
        stats,
        latencies,
        note: "latency = until `nginx -s reload` returns (signal sent, not applied)".into(),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let o = parse_args("nginx_switch")?;
    if !nginx::lua_available() {
        return Err("this benchmark needs nginx and libnginx-mod-http-lua".into());
    }
    let backends = DemoBackends::start().await;
    let endpoints = backends.endpoints();
    println!(
        "nginx_switch: {} keep-alive clients (no retries), {} switches, {:?} between switches, 2 nginx workers, upstream keepalive 32",
        o.clients, o.switches, o.pause
    );
    let mut outcomes = Vec::new();
    for (i, which) in ["dynamic", "reload", "runbook"].into_iter().enumerate() {
        let dir =
            std::env::temp_dir().join(format!("bluegreen-nginx-bench-{}-{i}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let res = match which {
            "dynamic" => dynamic(o, &endpoints, &dir).await,
            "reload" => reload(o, &endpoints, &dir).await,
            _ => runbook(o, &endpoints, &dir).await,
        };
        let _ = std::fs::remove_dir_all(&dir);
        outcomes.push(res?);
    }

    println!();
    println!(
        "{:<48} {:>7} {:>9} {:>7} {:>9} {:>8} {:>10} {:>10} {:>10}",
        "mode", "run", "requests", "failed", "fail %", "f/switch", "switch p50", "p99", "max"
    );
    for out in &outcomes {
        println!(
            "{:<48} {:>6.1}s {:>9} {:>7} {:>8.4}% {:>8.2} {:>10.1?} {:>10.1?} {:>10.1?}",
            out.name,
            out.elapsed.as_secs_f64(),
            out.stats.total(),
            out.stats.failed,
            out.fail_rate() * 100.0,
            out.per_switch(),
            out.pct(0.5),
            out.pct(0.99),
            out.pct(1.0),
        );
    }
    println!();
    let base = &outcomes[2];
    for out in &outcomes {
        let ratio = if base.fail_rate() > 0.0 {
            format!(
                "failure rate {:.3}, failures per switch {:.3}",
                out.fail_rate() / base.fail_rate(),
                out.per_switch() / base.per_switch()
            )
        } else {
            "n/a (the runbook had no failures)".into()
        };
        println!("{}: vs (c): {ratio}; {}", out.name, out.note);
        if !out.stats.errors.is_empty() {
            println!(
                "    first failures: {:?}",
                &out.stats.errors[..out.stats.errors.len().min(3)]
            );
        }
    }
    backends.blue.shutdown().await?;
    backends.green.shutdown().await?;
    Ok(())
}
