//! `proxy_throughput`: the embedded proxy (`ProxySwitch`) against nginx, with no switching, in one
//! run, each in its own process, loaded by `wrk` (a separate process too), in front of the same
//! upstream:
//!
//! - direct to the upstream (the baseline),
//! - nginx (`worker_processes` = cores, upstream `keepalive 64`),
//! - the proxy (`ProxySwitch` in a child process, tokio's multi-thread runtime, defaults).
//!
//! Scenarios: keep-alive and a new connection per request (`Connection: close`), 16 and 256
//! connections, a small (3 byte) and a 10 KB response. Each scenario runs the three targets in
//! turn, `--passes` times, so every ratio compares figures taken minutes apart at most.
//!
//! `--callgrind` instead counts the instructions the proxy and nginx (one worker each) execute
//! per request under `valgrind --tool=callgrind`, which is repeatable on a noisy machine; with
//! `--callgrind-out DIR` the proxy's profile is kept there for `callgrind_annotate`.
//!
//! ```text
//! apt-get install wrk valgrind nginx
//! cargo run --release -p bluegreen-bench --bin proxy_throughput -- [--secs 5] [--passes 3]
//! cargo run --release -p bluegreen-bench --bin proxy_throughput -- --callgrind
//! ```
//!
//! The same binary is its own upstream and proxy child (`--role upstream|proxy`). For the
//! runtime experiments recorded in `bench/RESULTS.md`, `BLUEGREEN_BENCH_RUNTIME=current` runs
//! the proxy child on one current-thread runtime and `=percore` on one current-thread runtime
//! per core, each with its own `ProxySwitch` on a clone of one listener; `TOKIO_WORKER_THREADS`
//! sets the default runtime's workers.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bluegreen_core::{Endpoint, Endpoints, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_proxy::{ProxyConfig, ProxySwitch};
use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const SMALL: &[u8] = b"ok\n";
const LARGE_LEN: usize = 10 * 1024;

#[derive(Debug, Clone)]
struct Options {
    secs: u64,
    passes: usize,
    threads: usize,
    callgrind: bool,
    callgrind_requests: usize,
    callgrind_out: Option<PathBuf>,
    /// Only scenarios whose label contains this.
    only: Option<String>,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        secs: 5,
        passes: 3,
        threads: 2,
        callgrind: false,
        callgrind_requests: 20_000,
        callgrind_out: None,
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<String> {
            Ok(args.next().ok_or(format!("{name} needs a value"))?)
        };
        match a.as_str() {
            "--secs" => o.secs = value("--secs")?.parse::<u64>()?.max(1),
            "--passes" => o.passes = value("--passes")?.parse::<usize>()?.max(1),
            "--threads" => o.threads = value("--threads")?.parse::<usize>()?.max(1),
            "--only" => o.only = Some(value("--only")?),
            "--callgrind" => o.callgrind = true,
            "--requests" => o.callgrind_requests = value("--requests")?.parse::<usize>()?.max(100),
            "--callgrind-out" => o.callgrind_out = Some(PathBuf::from(value("--callgrind-out")?)),
            "-h" | "--help" => {
                println!(
                    "usage: proxy_throughput [--secs S] [--passes P] [--threads T] [--only TEXT]\n\
                     \x20      proxy_throughput --callgrind [--requests N] [--callgrind-out DIR]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Child roles

/// The upstream: `/` answers 3 bytes, `/10k` answers 10 KB. Prints its address on stdout.
async fn run_upstream() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let large = Bytes::from(vec![b'x'; LARGE_LEN]);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let large = large.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let body = if req.uri().path() == "/10k" {
                    large.clone()
                } else {
                    Bytes::from_static(SMALL)
                };
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The proxy: a `ProxySwitch` with the defaults routing everything to `upstream`. Prints its
/// address on stdout, runs until stdin closes.
async fn run_proxy(upstream: SocketAddr) -> Result<()> {
    let proxy = ProxySwitch::bind(ProxyConfig::default()).await?;
    let ep = vec![Endpoint::new("127.0.0.1", upstream.port())];
    proxy
        .apply(
            &TrafficSplit::all(Slot::Blue),
            &Endpoints::new(ep.clone(), ep),
        )
        .await?;
    println!("{}", proxy.local_addr());
    std::io::stdout().flush()?;
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await?;
    proxy.shutdown().await;
    Ok(())
}

/// Experiment: one current-thread runtime per core, each with its own proxy on a clone of one
/// listener.
fn run_percore(upstream: SocketAddr) -> Result<()> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    println!("{}", std_listener.local_addr()?);
    std::io::stdout().flush()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for _ in 0..cores {
        let l = std_listener.try_clone()?;
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(l).expect("listener");
                let proxy =
                    ProxySwitch::from_listener(listener, ProxyConfig::default()).expect("proxy");
                let ep = vec![Endpoint::new("127.0.0.1", upstream.port())];
                proxy
                    .apply(
                        &TrafficSplit::all(Slot::Blue),
                        &Endpoints::new(ep.clone(), ep),
                    )
                    .await
                    .expect("apply");
                std::future::pending::<()>().await;
            });
        });
    }
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process that printed its address; killed on drop.
struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_role(wrapper: &[String], args: &[String]) -> Result<Proc> {
    let exe = std::env::current_exe()?;
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .parse::<SocketAddr>()
        .map_err(|e| format!("child {args:?} printed {line:?}: {e}"))?;
    Ok(Proc { child, addr })
}

fn start_nginx(
    dir: &Path,
    upstream: SocketAddr,
    workers: u32,
) -> Result<bluegreen_testenv::nginx::NginxProcess> {
    Ok(bluegreen_testenv::nginx::start_reverse_proxy(
        dir, upstream, workers,
    )?)
}

// ---------------------------------------------------------------------------------------------
// wrk

#[derive(Debug, Clone, Copy, Default)]
struct WrkResult {
    rps: f64,
    p50: Duration,
    p99: Duration,
    requests: u64,
    errors: u64,
    /// CPU time (user + system) the measured server spent per request, in microseconds.
    cpu_us: f64,
}

/// CPU time (user + system) of process `pid` and its children that are alive (nginx's
/// workers), in clock ticks, from `/proc`.
fn cpu_ticks(pid: u32) -> u64 {
    fn stat(pid: u32) -> Option<(u32, u64)> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the command name (in parentheses, may hold spaces): state ppid … utime stime.
        let rest = &s[s.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid = f.get(1)?.parse().ok()?;
        let utime: u64 = f.get(11)?.parse().ok()?;
        let stime: u64 = f.get(12)?.parse().ok()?;
        Some((ppid, utime + stime))
    }
    let mut total = stat(pid).map_or(0, |(_, t)| t);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, t)) = stat(child) {
                if ppid == pid {
                    total += t;
                }
            }
        }
    }
    total
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    let secs = match unit {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

fn parse_wrk(out: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => r.p50 = parse_duration(v).ok_or("wrk p50")?,
            ["99%", v] => r.p99 = parse_duration(v).ok_or("wrk p99")?,
            ["Requests/sec:", v] => r.rps = v.parse()?,
            [n, "requests", "in", ..] => r.requests = n.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>()?,
            ["Socket", "errors:", rest @ ..] => {
                // `connect N, read N, write N, timeout N`: every kind counts as an error.
                for w in rest.chunks(2) {
                    if let [_, n] = w {
                        r.errors += n.trim_end_matches(',').parse::<u64>()?;
                    }
                }
            }
            _ => {}
        }
    }
    if r.requests == 0 {
        return Err(format!("wrk printed no result:\n{out}").into());
    }
    Ok(r)
}

#[derive(Debug, Clone, Copy)]
struct Scenario {
    conns: usize,
    keep_alive: bool,
    large: bool,
}

impl Scenario {
    fn label(&self) -> String {
        format!(
            "{}, {} connections, {} response",
            if self.keep_alive {
                "keep-alive"
            } else {
                "new connection per request"
            },
            self.conns,
            if self.large { "10 KB" } else { "3 B" }
        )
    }
}

fn wrk(addr: SocketAddr, pid: u32, s: Scenario, o: &Options) -> Result<WrkResult> {
    let url = format!("http://{addr}/{}", if s.large { "10k" } else { "" });
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{}", o.threads.min(s.conns)))
        .arg(format!("-c{}", s.conns))
        .arg(format!("-d{}s", o.secs))
        .arg("--latency");
    if !s.keep_alive {
        cmd.arg("-H").arg("Connection: close");
    }
    let before = cpu_ticks(pid);
    let out = cmd.arg(url).output()?;
    let ticks = cpu_ticks(pid).saturating_sub(before);
    if !out.status.success() {
        return Err(format!("wrk failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let mut r = parse_wrk(&String::from_utf8_lossy(&out.stdout))?;
    r.cpu_us = ticks as f64 / TICKS_PER_SEC * 1e6 / r.requests as f64;
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// The throughput run

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn median_d(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn throughput(o: &Options) -> Result<()> {
    if Command::new("wrk").arg("--version").output().is_err() {
        return Err("wrk is not on PATH (apt-get install wrk)".into());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("# proxy_throughput");
    println!();
    println!(
        "{cores} CPU cores; wrk -t{} for {} s per measurement, {} passes (median shown); \
         upstream, nginx, proxy and wrk are separate processes on the same cores.",
        o.threads, o.secs, o.passes
    );
    println!("load at start: {}", uptime());
    println!();
    let upstream = spawn_role(&[], &["--role".into(), "upstream".into()])?;
    let proxy = spawn_role(
        &[],
        &[
            "--role".into(),
            "proxy".into(),
            "--upstream".into(),
            upstream.addr.to_string(),
        ],
    )?;
    let dir = std::env::temp_dir().join(format!("bluegreen-bench-thr-{}", std::process::id()));
    let nginx = start_nginx(&dir, upstream.addr, cores as u32)?;

    let mut scenarios = Vec::new();
    for keep_alive in [true, false] {
        for conns in [16, 256] {
            for large in [false, true] {
                scenarios.push(Scenario {
                    conns,
                    keep_alive,
                    large,
                });
            }
        }
    }
    println!("```");
    println!(
        "{:<52} {:>9} {:>9} {:>9} | {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>6} {:>6} {:>7} | errors",
        "scenario",
        "direct/s",
        "nginx/s",
        "proxy/s",
        "px/ngx",
        "px/dir",
        "p99 dir",
        "p99 ngx",
        "p99 px",
        "ngx µs",
        "px µs",
        "cpu px/ngx"
    );
    let mut worst = f64::MAX;
    for s in scenarios {
        if o.only
            .as_ref()
            .is_some_and(|t| !s.label().contains(t.as_str()))
        {
            continue;
        }
        let (mut d, mut n, mut p) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..o.passes {
            d.push(wrk(upstream.addr, upstream.child.id(), s, o)?);
            n.push(wrk(nginx.listen(), nginx.pid(), s, o)?);
            p.push(wrk(proxy.addr, proxy.child.id(), s, o)?);
        }
        let rps = |v: &[WrkResult]| median(v.iter().map(|r| r.rps).collect());
        let p99 = |v: &[WrkResult]| median_d(v.iter().map(|r| r.p99).collect());
        let errs = |v: &[WrkResult]| v.iter().map(|r| r.errors).sum::<u64>();
        let cpu = |v: &[WrkResult]| median(v.iter().map(|r| r.cpu_us).collect());
        let ratio = rps(&p) / rps(&n);
        worst = worst.min(ratio);
        println!(
            "{:<52} {:>9.0} {:>9.0} {:>9.0} | {:>6.2}x {:>6.2}x | {:>7} {:>7} {:>7} | {:>6.1} {:>6.1} {:>6.2}x | d{} n{} p{}",
            s.label(),
            rps(&d),
            rps(&n),
            rps(&p),
            ratio,
            rps(&p) / rps(&d),
            fmt_d(p99(&d)),
            fmt_d(p99(&n)),
            fmt_d(p99(&p)),
            cpu(&n),
            cpu(&p),
            cpu(&p) / cpu(&n),
            errs(&d),
            errs(&n),
            errs(&p),
        );
        // Each pass's ratio, to show the spread.
        let per_pass: Vec<String> = p
            .iter()
            .zip(&n)
            .map(|(p, n)| format!("{:.2}", p.rps / n.rps))
            .collect();
        println!("{:<52} proxy/nginx per pass: {}", "", per_pass.join(" "));
    }
    println!("```");
    println!();
    println!("lowest proxy/nginx throughput ratio: {worst:.2}x");
    println!("load at end: {}", uptime());
    nginx.stop();
    let _ = std::fs::remove_dir_all(&dir);
    drop(proxy);
    drop(upstream);
    Ok(())
}

fn fmt_d(d: Duration) -> String {
    if d >= Duration::from_millis(10) {
        format!("{:.1}ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.2}ms", d.as_secs_f64() * 1e3)
    }
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| {
            let v: Vec<&str> = s.split_whitespace().take(3).collect();
            format!("load average {}", v.join(", "))
        })
        .unwrap_or_else(|_| "unknown".into())
}

// ---------------------------------------------------------------------------------------------
// Instruction counts

/// `n` sequential keep-alive requests to `addr` (`path`), each answered in full.
fn sequential(addr: SocketAddr, path: &str, n: usize, keep_alive: bool) -> Result<()> {
    let connect = || -> Result<(TcpStream, BufReader<TcpStream>)> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let reader = BufReader::new(s.try_clone()?);
        Ok((s, reader))
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: bench\r\n{}\r\n",
        if keep_alive {
            ""
        } else {
            "Connection: close\r\n"
        }
    );
    let (mut s, mut reader) = connect()?;
    for i in 0..n {
        if !keep_alive && i > 0 {
            (s, reader) = connect()?;
        }
        s.write_all(req.as_bytes())?;
        let mut len = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err("connection closed".into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = Some(v.trim().parse::<usize>()?);
                }
            }
        }
        let mut body = vec![0u8; len.ok_or("no content-length")?];
        reader.read_exact(&mut body)?;
    }
    Ok(())
}

/// Removes an earlier run's profiles `prefix*` from `dir`.
fn remove_prefixed(dir: &Path, prefix: &str) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(prefix))
        {
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
    }
    Ok(())
}

/// Total instructions in the callgrind output files `prefix*` (all threads and processes).
fn callgrind_total(dir: &Path, prefix: &str) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.starts_with(prefix) {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            if let Some(v) = line
                .strip_prefix("summary:")
                .or(line.strip_prefix("totals:"))
            {
                total += v.split_whitespace().next().unwrap_or("0").parse::<u64>()?;
                break;
            }
        }
    }
    Ok(total)
}

fn callgrind(o: &Options) -> Result<()> {
    if Command::new("valgrind").arg("--version").output().is_err() {
        return Err("valgrind is not on PATH (apt-get install valgrind)".into());
    }
    let dir = match &o.callgrind_out {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("bluegreen-bench-cg-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let upstream = spawn_role(&[], &["--role".into(), "upstream".into()])?;
    println!("# proxy_throughput --callgrind");
    println!();
    println!(
        "Instructions per request (valgrind --tool=callgrind, every thread), \
         {} sequential keep-alive requests after 500 warm-up ones; startup is measured apart \
         (a run of 500 requests) and subtracted.",
        o.callgrind_requests
    );
    println!();
    println!("```");
    let cases = [
        ("/", "3 B, keep-alive", true),
        ("/10k", "10 KB, keep-alive", true),
        ("/", "3 B, new connection", false),
    ];
    for (path, label, keep_alive) in cases {
        let mut per = Vec::new();
        for who in ["proxy", "nginx"] {
            let mut totals = Vec::new();
            for (i, n) in [500, 500 + o.callgrind_requests].into_iter().enumerate() {
                let prefix = format!(
                    "{who}-{}{}-{i}",
                    path.trim_start_matches('/'),
                    if keep_alive { "" } else { "-close" }
                );
                remove_prefixed(&dir, &prefix)?;
                let out = dir.join(format!("{prefix}.%p"));
                let wrapper = vec![
                    "valgrind".to_string(),
                    "--tool=callgrind".into(),
                    "--trace-children=yes".into(),
                    format!("--callgrind-out-file={}", out.display()),
                ];
                match who {
                    "proxy" => {
                        let proxy = spawn_role(
                            &wrapper,
                            &[
                                "--role".into(),
                                "proxy".into(),
                                "--upstream".into(),
                                upstream.addr.to_string(),
                            ],
                        )?;
                        sequential(proxy.addr, path, n, keep_alive)?;
                        // Closing stdin stops it cleanly so callgrind writes its file.
                        let mut proxy = proxy;
                        drop(proxy.child.stdin.take());
                        wait_bounded(&mut proxy.child, Duration::from_secs(60))?;
                    }
                    _ => {
                        let ndir = dir.join(format!("nginx-{prefix}"));
                        let nginx = start_nginx_wrapped(&ndir, upstream.addr, &wrapper)?;
                        sequential(nginx.addr, path, n, keep_alive)?;
                        stop_nginx_wrapped(nginx, &ndir)?;
                    }
                }
                totals.push(callgrind_total(&dir, &prefix)?);
            }
            let per_request =
                (totals[1].saturating_sub(totals[0])) as f64 / o.callgrind_requests as f64;
            println!("{who:<6} {label:<20} {per_request:>9.0} instructions per request");
            per.push(per_request);
        }
        println!("         proxy/nginx: {:.2}x", per[0] / per[1]);
    }
    println!("```");
    if o.callgrind_out.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("profiles kept in {}", dir.display());
    }
    Ok(())
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    Err("a profiled process did not stop in time".into())
}

/// nginx with one worker under `wrapper` (valgrind), in the foreground.
fn start_nginx_wrapped(dir: &Path, upstream: SocketAddr, wrapper: &[String]) -> Result<Proc> {
    let include = bluegreen_testenv::nginx::write_upstream(dir, "app", upstream, 64)?;
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = bluegreen_testenv::nginx::StandaloneConfig::reload(dir, listen, &include, "app")
        .with_workers(1);
    let conf = config.write()?;
    let (first, rest) = wrapper.split_first().ok_or("no wrapper")?;
    let child = Command::new(first)
        .args(rest)
        .arg("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf)
        .arg("-g")
        .arg("daemon off;")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let t = Instant::now();
    while TcpStream::connect(listen).is_err() {
        if t.elapsed() > Duration::from_secs(30) {
            return Err("nginx under valgrind did not start".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Proc {
        child,
        addr: listen,
    })
}

fn stop_nginx_wrapped(mut nginx: Proc, dir: &Path) -> Result<()> {
    // SIGQUIT: graceful stop; valgrind writes the profile of master and worker.
    let pid = std::fs::read_to_string(dir.join("nginx.pid"))?;
    Command::new("kill").arg("-QUIT").arg(pid.trim()).status()?;
    wait_bounded(&mut nginx.child, Duration::from_secs(60))
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some("--role") {
        let role = args.next().unwrap_or_default();
        // `BLUEGREEN_BENCH_RUNTIME=current` runs the child on one thread (experiments).
        let rt = if std::env::var("BLUEGREEN_BENCH_RUNTIME").as_deref() == Ok("current") {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
        } else {
            tokio::runtime::Runtime::new()?
        };
        return match role.as_str() {
            "upstream" => rt.block_on(run_upstream()),
            "proxy" => {
                let _ = args.next();
                let up: SocketAddr = args.next().ok_or("--upstream ADDR")?.parse()?;
                if std::env::var("BLUEGREEN_BENCH_RUNTIME").as_deref() == Ok("percore") {
                    return run_percore(up);
                }
                rt.block_on(run_proxy(up))
            }
            other => Err(format!("unknown role {other}").into()),
        };
    }
    let o = parse_args()?;
    if o.callgrind {
        callgrind(&o)
    } else {
        throughput(&o)
    }
}
