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

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::{parse_args, target, Options, Result};

use bluegreen_core::{Endpoints, Name, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_haproxy::{AdminState, Command, HaproxyConfig, HaproxySwitch, RuntimeClient};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

const HAPROXY: &str = "/usr/sbin/haproxy";

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A HAProxy child with the crate's rendered config; killed on drop.
struct Haproxy {
    child: Child,
    config: HaproxyConfig,
    port: u16,
}

impl Haproxy {
    fn start(dir: &Path) -> Result<Haproxy> {
        let sock = dir.join("admin.sock");
        let cfg = dir.join("haproxy.cfg");
        let port = free_port()?;
        let config = HaproxyConfig::unix(&sock)
            .with_health_check("/health", Duration::from_millis(100))
            .with_drain_timeout(Duration::from_secs(10))
            .with_poll_interval(Duration::from_millis(10));
        let text = format!(
            "global\n{global}\ndefaults\n    mode http\n    timeout connect 2s\n    \
             timeout client 30s\n    timeout server 30s\n    timeout http-keep-alive 30s\n\n\
             frontend fe\n    bind 127.0.0.1:{port}\n    default_backend app\n\n{backend}",
            global = config.render_global(&dir.join("server-state"))?,
            backend = config.render_backend()?,
        );
        std::fs::write(&cfg, text)?;
        let log = std::fs::File::create(dir.join("haproxy.log"))?;
        let child = std::process::Command::new(HAPROXY)
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut h = Haproxy {
            child,
            config,
            port,
        };
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        {
            if let Some(status) = h.child.try_wait()? {
                return Err(format!("haproxy exited with {status}").into());
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err("haproxy not ready within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(h)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Keep-alive HTTP/1.1 clients; no retries.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn one_request(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    authority: &str,
) -> std::result::Result<bool, hyper::Error> {
    let req = hyper::Request::get("/")
        .header("host", authority)
        .body(Empty::<Bytes>::new())
        .expect("static request");
    let res = sender.send_request(req).await?;
    let ok = res.status().is_success();
    res.into_body().collect().await?;
    Ok(ok)
}

impl Load {
    fn start(port: u16, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    let authority = format!("127.0.0.1:{port}");
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(stream) = tokio::net::TcpStream::connect(&authority).await else {
                            failed.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        let Ok((mut sender, conn)) =
                            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                        else {
                            failed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        let driver = tokio::spawn(conn);
                        // Requests on this connection until it fails or the run ends.
                        while !stop.load(Ordering::Relaxed) {
                            match one_request(&mut sender, &authority).await {
                                Ok(true) => {
                                    ok.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(false) => {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(_) => {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                            }
                        }
                        driver.abort();
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
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

async fn ours(o: Options, endpoints: &Endpoints, dir: &Path) -> Result<Outcome> {
    let h = Haproxy::start(dir)?;
    let switch = HaproxySwitch::new(h.config.clone())?;
    switch
        .apply(&TrafficSplit::all(Slot::Blue), endpoints)
        .await?;
    let load = Load::start(h.port, o.clients);
    tokio::time::sleep(o.pause).await;
    let mut latencies = Vec::new();
    for i in 0..o.switches {
        let t = Instant::now();
        switch
            .apply(&TrafficSplit::all(target(i)), endpoints)
            .await?;
        latencies.push(t.elapsed());
        tokio::time::sleep(o.pause).await;
    }
    let (ok, failed) = load.finish().await;
    Ok(Outcome {
        name: "(a) HaproxySwitch::apply (ready+verify, then drain+maint)",
        ok,
        failed,
        latencies,
    })
}

async fn runbook(o: Options, endpoints: &Endpoints, dir: &Path) -> Result<Outcome> {
    let h = Haproxy::start(dir)?;
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
    let load = Load::start(h.port, o.clients);
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
    let (ok, failed) = load.finish().await;
    Ok(Outcome {
        name: "(b) runbook: old maint, then new ready",
        ok,
        failed,
        latencies,
    })
}

fn scratch(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "bluegreen-haproxy-bench-{}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = parse_args("haproxy_switch")?;
    if !Path::new(HAPROXY).exists() {
        return Err(format!("{HAPROXY} is not installed (Debian package haproxy)").into());
    }
    let version = std::process::Command::new(HAPROXY).arg("-v").output()?;
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let (_blue, _green, endpoints) = common::demo_backends().await?;
    println!(
        "{version}\n{} keep-alive clients, {} switches, {:?} between switches\n",
        o.clients, o.switches, o.pause
    );
    let (da, db) = (scratch("a")?, scratch("b")?);
    let a = ours(o, &endpoints, &da).await;
    let b = runbook(o, &endpoints, &db).await;
    let _ = std::fs::remove_dir_all(&da);
    let _ = std::fs::remove_dir_all(&db);
    let (a, b) = (a?, b?);
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
