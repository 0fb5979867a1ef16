//! `cutover`: what clients see during a database cutover, with and without pausing the proxy, in
//! one run.
//!
//! Each scenario deploys v1 then v2 of the demo app (local processes, `bluegreen-process`) behind
//! the embedded proxy, with the Replicated strategy on a throw-away PostgreSQL cluster (`fsync`
//! and `synchronous_commit` on, as a production server runs). During the v2 deploy, keep-alive
//! clients read through the proxy (`GET /`) and write through the app to the database
//! (`POST /write?id=N`, one row per request). It reports, per scenario: failed requests, the p99
//! and maximum latency while the deploy ran against the p99 measured just before it (same run,
//! same load), the write-freeze duration (`CutoverReport::frozen`: writes refused on the live
//! database until the target had everything), how many requests the pause held, and acknowledged
//! writes missing from the new database (must be 0).
//!
//! ```text
//! cargo run --release -p bluegreen-bench --bin cutover -- [--clients N] [--runs R]
//! ```

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bluegreen_core::health::HttpCheck;
use bluegreen_core::{
    DatabaseStrategy, DbBinding, DbContext, DbStep, Deployer, FileStateStore, Policy, Prepared,
    Release, RunOutcome,
};
use bluegreen_postgres::{ReplicatedConfig, ReplicatedDatabase};
use bluegreen_process::{ProcessConfig, ProcessEnvironment};
use bluegreen_proxy::{ProxyConfig, ProxySwitch};
use bluegreen_testenv::pg::{Cluster, ClusterOptions};
use bluegreen_testenv::{Load, LoadOptions, LoadStats};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Options {
    clients: usize,
    runs: usize,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        clients: 4,
        runs: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<usize> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            Ok(v.parse::<usize>().map_err(|e| format!("{name} {v}: {e}"))?)
        };
        match a.as_str() {
            "--clients" => o.clients = value("--clients")?.max(1),
            "--runs" => o.runs = value("--runs")?.max(1),
            "-h" | "--help" => {
                println!(
                    "usage: cutover [--clients N (per load, default 4)] [--runs R (default 3)]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(o)
}

/// The Replicated strategy, recording how long each cutover froze writes.
#[derive(Debug)]
struct Measured {
    inner: ReplicatedDatabase,
    frozen: Mutex<Vec<Duration>>,
}

#[async_trait]
impl DatabaseStrategy for Measured {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn prepare(&self, ctx: &DbContext) -> bluegreen_core::Result<Prepared> {
        self.inner.prepare(ctx).await
    }
    async fn bind(&self, ctx: &DbContext) -> bluegreen_core::Result<DbBinding> {
        self.inner.bind(ctx).await
    }
    async fn before_switch(&self, ctx: &DbContext) -> bluegreen_core::Result<DbStep> {
        match self.inner.cutover(ctx).await? {
            Some(r) => {
                self.frozen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(r.frozen);
                Ok(DbStep::reversible(format!("cut over at LSN {}", r.lsn)))
            }
            None => Ok(DbStep::reversible("already cut over")),
        }
    }
    async fn after_switch(&self, ctx: &DbContext) -> bluegreen_core::Result<DbStep> {
        self.inner.after_switch(ctx).await
    }
    async fn rollback(&self, ctx: &DbContext) -> bluegreen_core::Result<()> {
        self.inner.rollback(ctx).await
    }
    async fn finalize(&self, ctx: &DbContext) -> bluegreen_core::Result<DbStep> {
        self.inner.finalize(ctx).await
    }
}

/// What one scenario measured.
struct Outcome {
    reads: LoadStats,
    writes: LoadStats,
    /// p99 of both loads in the second before the deploy.
    before_p99: Duration,
    /// p99 and max of both loads while the deploy ran.
    during_p99: Duration,
    during_max: Duration,
    frozen: Duration,
    held: u64,
    refused_by_pause: u64,
    lost: usize,
    deploy: Duration,
}

fn quantile(mut v: Vec<u64>, q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    Duration::from_micros(v[i])
}

async fn scenario(cluster: &Cluster, base: &str, pause: bool, clients: usize) -> Result<Outcome> {
    let admin = cluster.client("postgres").await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {base}"))
        .await?;
    cluster
        .client(base)
        .await?
        .batch_execute("CREATE TABLE demo_writes (id bigint PRIMARY KEY)")
        .await?;
    let db = Arc::new(Measured {
        inner: ReplicatedDatabase::new(
            ReplicatedConfig::new(cluster.config(base))
                .with_bin_dir(cluster.bin_dir())
                .with_sync_timeout(Duration::from_secs(120)),
        )?,
        frozen: Mutex::new(Vec::new()),
    });
    let dir = tempfile::tempdir()?;
    let proxy = ProxySwitch::bind(ProxyConfig::default()).await?;
    let env = ProcessEnvironment::new(ProcessConfig::new(dir.path().join("process")));
    let deployer = Deployer::builder()
        .environment(Arc::new(env.clone()))
        .switch(Arc::new(proxy.clone()))
        .store(Arc::new(FileStateStore::new(dir.path().join("state"))?))
        .health_check(Arc::new(HttpCheck::new("/health")))
        .database(db.clone())
        .policy(
            Policy::default()
                .with_readiness_timeout(Duration::from_secs(30))
                .with_observation(Duration::ZERO, Duration::from_millis(100))
                .with_pause_during_cutover(pause),
        )
        .build()?;
    let program = bluegreen_demo::binary_path().to_string_lossy().to_string();
    let outcome = async {
        let r = deployer.deploy(Release::new("v1", &program)?).await?;
        if r.outcome != RunOutcome::Live {
            return Err(format!("v1: {r:?}").into());
        }
        let reads = Load::start(proxy.local_addr(), LoadOptions::new(clients));
        let writes = Load::start(proxy.local_addr(), LoadOptions::new(clients).writes());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (r0, w0) = (reads.stats(), writes.stats());
        let started = std::time::Instant::now();
        let r = deployer.deploy(Release::new("v2", &program)?).await?;
        let deploy = started.elapsed();
        let (r1, w1) = (reads.stats(), writes.stats());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (reads, writes) = (reads.finish().await, writes.finish().await);
        if r.outcome != RunOutcome::Live {
            return Err(format!("v2: {r:?}").into());
        }
        // The second before the deploy, and the deploy itself (latencies in completion order).
        let window = |s: &LoadStats, from: usize, to: usize| s.latencies_us[from..to].to_vec();
        let tail = |s: &LoadStats| {
            s.latencies_us
                .len()
                .saturating_sub(s.latencies_us.len() / 3)
        };
        let mut before = window(&r0, tail(&r0), r0.latencies_us.len());
        before.extend(window(&w0, tail(&w0), w0.latencies_us.len()));
        let mut during = window(&r1, r0.latencies_us.len(), r1.latencies_us.len());
        during.extend(window(&w1, w0.latencies_us.len(), w1.latencies_us.len()));
        let live_db = format!("{base}_green");
        let on_green: BTreeSet<i64> = cluster
            .client(&live_db)
            .await?
            .query("SELECT id FROM demo_writes", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let lost = writes
            .acked
            .iter()
            .filter(|id| !on_green.contains(id))
            .count();
        let counts = proxy.pause_counts();
        let frozen = db
            .frozen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .copied()
            .unwrap_or_default();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Outcome {
            reads,
            writes,
            before_p99: quantile(before, 0.99),
            during_p99: quantile(during.clone(), 0.99),
            during_max: quantile(during, 1.0),
            frozen,
            held: counts.held,
            refused_by_pause: counts.overflowed + counts.timed_out,
            lost,
            deploy,
        })
    }
    .await;
    env.kill_all();
    proxy.shutdown().await;
    outcome
}

fn print(label: &str, o: &Outcome) {
    let failed = o.reads.failed + o.writes.failed;
    println!(
        "  {label:<10} {:>6} reads {:>6} writes  {failed:>4} failed  p99 {:>9.3?} before / {:>9.3?} during ({:+.1} ms)  max {:>9.3?}  writes frozen {:>8.3?}  held {:>4}  refused by pause {}  lost writes {}  deploy {:.2?}",
        o.reads.ok,
        o.writes.ok,
        o.before_p99,
        o.during_p99,
        (o.during_p99.as_secs_f64() - o.before_p99.as_secs_f64()) * 1000.0,
        o.during_max,
        o.frozen,
        o.held,
        o.refused_by_pause,
        o.lost,
        o.deploy,
    );
    if failed > 0 {
        let first: Vec<_> = o
            .reads
            .errors
            .iter()
            .chain(&o.writes.errors)
            .take(3)
            .collect();
        println!("             first failures: {first:?}");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let o = parse_args()?;
    let cluster = Cluster::launch(ClusterOptions::new().trust().durable())?;
    println!(
        "cutover: {} read + {} write keep-alive clients through the proxy, Replicated on PostgreSQL ({}), {} run(s) per scenario",
        o.clients,
        o.clients,
        cluster.bin_dir().display(),
        o.runs
    );
    let mut failed_paused = 0;
    for run in 0..o.runs {
        println!("run {}", run + 1);
        let p = scenario(&cluster, &format!("paused{run}"), true, o.clients).await?;
        print("paused", &p);
        let u = scenario(&cluster, &format!("unpaused{run}"), false, o.clients).await?;
        print("unpaused", &u);
        failed_paused += p.reads.failed + p.writes.failed + p.lost as u64;
    }
    println!("total failed requests and lost writes with pausing: {failed_paused}");
    Ok(())
}
