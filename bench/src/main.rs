//! `bluegreen-bench`: load through the embedded proxy while it flips between two upstreams.
//!
//! For each client mix (keep-alive connections, a new connection per request) it runs the same
//! load for the same time against:
//! 1. one upstream directly (the baseline),
//! 2. the `ProxySwitch`, flipping blue ↔ green `--flips` times spread over the run,
//! 3. nginx proxying to the same upstream (`bluegreen-testenv`'s), when `nginx` is on `PATH`,
//!
//! and prints requests, failures, p50/p99 latency, throughput ratios, and the switch latency
//! (`apply` called → first response from the new slot; → last response from the old slot).
//!
//! ```text
//! cargo run --release -p bluegreen-bench -- [--clients 32] [--flips 50] [--secs 4]
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bluegreen_core::{Endpoint, Endpoints, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_proxy::{ProxyConfig, ProxySwitch};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, Clone, Copy)]
struct Options {
    clients: usize,
    flips: usize,
    secs: u64,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        clients: 32,
        flips: 50,
        secs: 4,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<usize> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            Ok(v.parse::<usize>().map_err(|e| format!("{name} {v}: {e}"))?)
        };
        match a.as_str() {
            "--clients" => o.clients = value("--clients")?.max(1),
            "--flips" => o.flips = value("--flips")?,
            "--secs" => o.secs = value("--secs")?.max(1) as u64,
            "-h" | "--help" => {
                println!("usage: bluegreen-bench [--clients N] [--flips K] [--secs S]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Upstreams

/// An HTTP/1.1 keep-alive server that answers every request with `name`.
async fn upstream(name: &'static str) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        name.as_bytes(),
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

// ---------------------------------------------------------------------------------------------
// Load

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mix {
    KeepAlive,
    NewConnection,
}

impl Mix {
    fn label(self) -> &'static str {
        match self {
            Mix::KeepAlive => "keep-alive",
            Mix::NewConnection => "new connection per request",
        }
    }
}

/// What one client saw.
#[derive(Default)]
struct ClientLog {
    ok: u64,
    failed: u64,
    /// Request latencies in microseconds.
    latencies: Vec<u32>,
    /// (completion time since the run started in µs, slot that answered) of successful responses.
    answers: Vec<(u64, Option<Slot>)>,
}

struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

async fn connect(addr: SocketAddr) -> Result<Conn> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn { sender })
}

async fn one_request(conn: &mut Conn, addr: SocketAddr) -> Result<Bytes> {
    conn.sender.ready().await?;
    let req = Request::get("/")
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = conn.sender.send_request(req).await?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()).into());
    }
    Ok(resp.into_body().collect().await?.to_bytes())
}

async fn client(addr: SocketAddr, mix: Mix, start: Instant, stop: Arc<AtomicBool>) -> ClientLog {
    let mut log = ClientLog::default();
    let mut conn: Option<Conn> = None;
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        let result = async {
            let c = match conn.take() {
                Some(c) => c,
                None => connect(addr).await?,
            };
            let mut c = c;
            let body = one_request(&mut c, addr).await?;
            if mix == Mix::KeepAlive {
                conn = Some(c);
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(body)
        }
        .await;
        let done = Instant::now();
        match result {
            Ok(body) => {
                let slot = match &body[..] {
                    b"blue" => Some(Slot::Blue),
                    b"green" => Some(Slot::Green),
                    _ => None,
                };
                log.ok += 1;
                log.latencies
                    .push(u32::try_from((done - t0).as_micros()).unwrap_or(u32::MAX));
                log.answers.push(((done - start).as_micros() as u64, slot));
            }
            Err(e) => {
                if log.failed < 3 {
                    eprintln!("  request failed: {e}");
                }
                log.failed += 1;
                conn = None;
            }
        }
    }
    log
}

struct RunResult {
    ok: u64,
    failed: u64,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    answers: Vec<(u64, Option<Slot>)>,
}

impl RunResult {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

fn percentile(sorted: &[u32], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Duration::from_micros(u64::from(sorted[i]))
}

/// Runs `clients` clients against `addr` for `secs`; `during` runs alongside (the flips) and
/// gets the run's start instant.
async fn run_load<F, Fut>(addr: SocketAddr, mix: Mix, o: Options, during: F) -> RunResult
where
    F: FnOnce(Instant) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..o.clients)
        .map(|_| tokio::spawn(client(addr, mix, start, Arc::clone(&stop))))
        .collect();
    let run = tokio::time::sleep(Duration::from_secs(o.secs));
    tokio::join!(run, during(start));
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let mut result = RunResult {
        ok: 0,
        failed: 0,
        elapsed,
        p50: Duration::ZERO,
        p99: Duration::ZERO,
        answers: Vec::new(),
    };
    let mut latencies = Vec::new();
    for t in tasks {
        let log = t.await.unwrap_or_default();
        result.ok += log.ok;
        result.failed += log.failed;
        latencies.extend(log.latencies);
        result.answers.extend(log.answers);
    }
    latencies.sort_unstable();
    result.p50 = percentile(&latencies, 0.50);
    result.p99 = percentile(&latencies, 0.99);
    result.answers.sort_unstable_by_key(|a| a.0);
    result
}

// ---------------------------------------------------------------------------------------------
// Switch latency

/// One flip: when `apply` was called (µs since the run started) and the slot it moved to.
#[derive(Clone, Copy)]
struct Flip {
    at: u64,
    to: Slot,
}

/// For each flip, µs from `apply` to the first answer from the new slot and to the last answer
/// from the old slot, looking only until the next flip.
fn switch_latencies(flips: &[Flip], answers: &[(u64, Option<Slot>)]) -> (Vec<u64>, Vec<u64>) {
    let (mut first_new, mut last_old) = (Vec::new(), Vec::new());
    for (i, f) in flips.iter().enumerate() {
        let end = flips.get(i + 1).map_or(u64::MAX, |n| n.at);
        let from = answers.partition_point(|a| a.0 < f.at);
        let window = answers[from..].iter().take_while(|a| a.0 < end);
        let (mut first, mut last) = (None, 0);
        for (t, slot) in window {
            if *slot == Some(f.to) && first.is_none() {
                first = Some(t - f.at);
            }
            if *slot == Some(f.to.other()) {
                last = t - f.at;
            }
        }
        if let Some(first) = first {
            first_new.push(first);
        }
        last_old.push(last);
    }
    first_new.sort_unstable();
    last_old.sort_unstable();
    (first_new, last_old)
}

fn describe_us(sorted: &[u64]) -> String {
    if sorted.is_empty() {
        return "n/a".into();
    }
    let pick = |q: f64| {
        let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
        Duration::from_micros(sorted[i])
    };
    format!(
        "p50 {:?}, p99 {:?}, max {:?} (over {} flips)",
        pick(0.5),
        pick(0.99),
        Duration::from_micros(*sorted.last().unwrap_or(&0)),
        sorted.len()
    )
}

// ---------------------------------------------------------------------------------------------
// nginx

/// nginx (`bluegreen-testenv`'s, on a loopback port it is seen to own) proxying to `upstream`
/// with 64 keep-alive upstream connections and one worker per CPU core.
fn start_nginx(dir: &Path, upstream: SocketAddr) -> Result<bluegreen_testenv::nginx::NginxProcess> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    Ok(bluegreen_testenv::nginx::start_reverse_proxy(
        dir, upstream, workers,
    )?)
}

// ---------------------------------------------------------------------------------------------

fn print_run(label: &str, r: &RunResult, baseline: Option<&RunResult>) {
    print!(
        "  {label:<34} {:>8} ok {:>4} failed {:>9.0} req/s   p50 {:>9?}  p99 {:>9?}",
        r.ok,
        r.failed,
        r.rps(),
        r.p50,
        r.p99
    );
    if let Some(b) = baseline {
        print!("   throughput x{:.2} of direct", r.rps() / b.rps());
    }
    println!();
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = parse_args()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("# bluegreen-bench");
    println!();
    println!(
        "arguments: `{}`",
        if args.is_empty() {
            "(defaults)".to_string()
        } else {
            args.join(" ")
        }
    );
    println!(
        "clients {}, flips {} per proxy run, {} s per run, {} CPU cores, tokio multi-thread runtime \
         (load generator, proxy and upstreams share the process)",
        o.clients,
        o.flips,
        o.secs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();

    let blue = upstream("blue").await?;
    let green = upstream("green").await?;
    let endpoints = Endpoints::new(
        vec![Endpoint::new("127.0.0.1", blue.port())],
        vec![Endpoint::new("127.0.0.1", green.port())],
    );
    let proxy = ProxySwitch::bind(ProxyConfig::default()).await?;
    proxy
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints)
        .await?;
    let nginx_dir = bluegreen_testenv::nginx::nginx_available().then(|| {
        std::env::temp_dir().join(format!("bluegreen-bench-nginx-{}", std::process::id()))
    });

    let mut total_failed = 0;
    for mix in [Mix::KeepAlive, Mix::NewConnection] {
        println!("## {} ({} clients)", mix.label(), o.clients);
        println!();
        println!("```");
        let direct = run_load(blue, mix, o, |_| async {}).await;
        print_run("direct to upstream (baseline)", &direct, None);

        proxy
            .apply(&TrafficSplit::all(Slot::Blue), &endpoints)
            .await?;
        let flips = Arc::new(std::sync::Mutex::new(Vec::new()));
        let flips_log = Arc::clone(&flips);
        let flipper = proxy.clone();
        let eps = endpoints.clone();
        let through = run_load(proxy.local_addr(), mix, o, move |start| async move {
            if o.flips == 0 {
                return;
            }
            let every = Duration::from_secs(o.secs) / (o.flips as u32 + 1);
            let mut to = Slot::Green;
            for _ in 0..o.flips {
                tokio::time::sleep(every).await;
                let at = start.elapsed().as_micros() as u64;
                if let Err(e) = flipper.apply(&TrafficSplit::all(to), &eps).await {
                    eprintln!("  apply failed: {e}");
                }
                flips_log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Flip { at, to });
                to = to.other();
            }
        })
        .await;
        print_run(
            &format!("ProxySwitch, {} flips", o.flips),
            &through,
            Some(&direct),
        );
        total_failed += through.failed;

        let nginx_run = match &nginx_dir {
            Some(dir) => match start_nginx(dir, blue) {
                Ok(nginx) => {
                    let r = run_load(nginx.listen(), mix, o, |_| async {}).await;
                    nginx.stop();
                    print_run("nginx (no flips)", &r, Some(&direct));
                    Some(r)
                }
                Err(e) => {
                    println!("  nginx failed to start: {e}");
                    None
                }
            },
            None => None,
        };
        println!("```");
        println!();

        let flips = flips.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (first_new, last_old) = switch_latencies(&flips, &through.answers);
        println!(
            "- proxy latency vs direct: p50 x{:.2}, p99 x{:.2}",
            through.p50.as_secs_f64() / direct.p50.as_secs_f64().max(1e-9),
            through.p99.as_secs_f64() / direct.p99.as_secs_f64().max(1e-9)
        );
        if let Some(n) = &nginx_run {
            println!(
                "- ProxySwitch throughput vs nginx: x{:.2} (p50 {:?} vs {:?}, p99 {:?} vs {:?})",
                through.rps() / n.rps(),
                through.p50,
                n.p50,
                through.p99,
                n.p99
            );
        }
        println!(
            "- switch latency, apply() called -> first response from the new slot: {}",
            describe_us(&first_new)
        );
        println!(
            "- switch latency, apply() called -> last response from the old slot: {}",
            describe_us(&last_old)
        );
        println!();
    }
    if let Some(dir) = &nginx_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    if nginx_dir.is_none() {
        println!("nginx: skipped (no `nginx` on PATH)");
    }
    println!("total failed requests through the proxy: {total_failed}");
    proxy.shutdown().await;
    Ok(())
}
