//! `pg_cutover`: how long the Replicated strategy's cutover freezes writes on the live database,
//! over many cutovers under `pgbench` load, on one throw-away cluster (`bluegreen-testenv`'s,
//! `fsync` on as a production server runs).
//!
//! Each round is one deploy: `prepare` (a new database replicating from the live one), `pgbench`
//! writing to the live database, the cutover (`ReplicatedDatabase::cutover`: catch up, freeze,
//! wait for the target, sequences, reverse the replication), then `after_switch` and `finalize`
//! (which drops the previous live database). The first round is a first deploy from the base
//! database. The freeze ends pgbench's sessions (a real application's connection pool
//! reconnects; pgbench counts them as aborted clients, which is expected here).
//!
//! Printed: the frozen window of every cutover, split into ending the sessions and catching up,
//! then p50 / p90 / max over all rounds, against a baseline measured in the same run: the time of
//! one synchronously committed write on the same server (what one round trip with a WAL flush
//! costs on this machine). Run:
//!
//! ```text
//! cargo run --release -p bluegreen-bench --bin pg_cutover -- [--rounds 30] [--clients 8] [--scale 5]
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bluegreen_core::{DatabaseStrategy, DbContext, Release, Slot};
use bluegreen_postgres::{ReplicatedConfig, ReplicatedDatabase};
use bluegreen_testenv::pg::{Cluster, ClusterOptions};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, Clone)]
struct Options {
    rounds: usize,
    clients: usize,
    scale: u32,
    bin: Option<PathBuf>,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        rounds: 30,
        clients: 8,
        scale: 5,
        bin: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<String> {
            Ok(args.next().ok_or(format!("{name} needs a value"))?)
        };
        match a.as_str() {
            "--rounds" => o.rounds = value("--rounds")?.parse::<usize>()?.max(1),
            "--clients" => o.clients = value("--clients")?.parse::<usize>()?.max(1),
            "--scale" => o.scale = value("--scale")?.parse::<u32>()?.max(1),
            "--bin-dir" => o.bin = Some(PathBuf::from(value("--bin-dir")?)),
            "-h" | "--help" => {
                println!(
                    "usage: pg_cutover [--rounds N (30)] [--clients C (8)] [--scale S (5)] \
                     [--bin-dir DIR]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(o)
}

/// `pgbench` against `db` with the cluster's superuser; the password in the environment only.
fn pgbench(cluster: &Cluster, db: &str, args: &[String]) -> Command {
    let mut c = cluster.client_command("pgbench");
    c.args(args).arg(db);
    c
}

/// A running pgbench writing to `db`: the TPC-B-like default script, no vacuum.
fn start_load(cluster: &Cluster, db: &str, clients: usize) -> Result<Child> {
    let args: Vec<String> = ["-n", "-c", &clients.to_string(), "-j", "2", "-T", "120"]
        .map(String::from)
        .to_vec();
    Ok(pgbench(cluster, db, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let o = parse_args()?;
    let mut options = ClusterOptions::new()
        .durable()
        .with_settings(&["shared_buffers=128MB", "max_wal_size=2GB"]);
    if let Some(bin) = &o.bin {
        options = options.with_bin_dir(bin);
    }
    let cluster = Cluster::launch(options)?;
    println!(
        "pg_cutover: {} cutovers under pgbench load ({} clients, scale {}), fsync on; \
         PostgreSQL binaries in {}",
        o.rounds,
        o.clients,
        o.scale,
        cluster.bin_dir().display()
    );
    let admin = cluster.config("postgres").connect("bench").await?;
    admin.batch_execute("CREATE DATABASE bench").await?;
    let init = pgbench(
        &cluster,
        "bench",
        &["-i".into(), "-q".into(), "-s".into(), o.scale.to_string()],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .status()?;
    if !init.success() {
        return Err(format!("pgbench -i exited with {init}").into());
    }
    // pgbench_history has no primary key: without a replica identity it cannot be published.
    cluster
        .config("bench")
        .connect("bench")
        .await?
        .batch_execute("ALTER TABLE pgbench_history REPLICA IDENTITY FULL")
        .await?;

    // Baseline: one synchronously committed write on the same server.
    let base = {
        let c = cluster.config("bench").connect("bench").await?;
        c.batch_execute("SET synchronous_commit = on").await?;
        let mut times = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            c.batch_execute("UPDATE pgbench_branches SET bbalance = bbalance WHERE bid = 1")
                .await?;
            times.push(t.elapsed());
        }
        times.sort();
        percentile(&times, 0.5)
    };
    println!(
        "baseline: one synchronously committed write, p50 {}",
        ms(base)
    );

    let db = ReplicatedDatabase::new(
        ReplicatedConfig::new(cluster.config("bench"))
            .with_bin_dir(cluster.bin_dir())
            .with_lag_bound(Duration::from_secs(120)),
    )?;
    let release = Release::new("v1", "bench")?;
    let mut live: Option<Slot> = None;
    let mut rows: Vec<(Duration, Duration, Duration, usize)> = Vec::new();
    println!();
    println!(
        "{:>5} {:>12} {:>16} {:>12} {:>8}",
        "round", "frozen", "ending sessions", "catching up", "ended"
    );
    for round in 1..=o.rounds {
        let target = live.map(Slot::other).unwrap_or(Slot::Blue);
        let ctx = DbContext {
            live,
            target,
            release: release.clone(),
        };
        let source = live.map(|s| db.database_of(s)).unwrap_or("bench".into());
        db.prepare(&ctx).await?;
        let mut load = start_load(&cluster, &source, o.clients)?;
        // Let the load reach a steady state and the replication stream it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cut = db.cutover(&ctx).await;
        let _ = load.kill();
        let _ = load.wait();
        let report = cut?.ok_or("the target was already cut over")?;
        db.after_switch(&ctx).await?;
        db.finalize(&ctx).await?;
        println!(
            "{round:>5} {:>12} {:>16} {:>12} {:>8}",
            ms(report.frozen),
            ms(report.ending_sessions),
            ms(report.catching_up),
            report.sessions_ended
        );
        rows.push((
            report.frozen,
            report.ending_sessions,
            report.catching_up,
            report.sessions_ended,
        ));
        live = Some(target);
    }

    let column = |f: fn(&(Duration, Duration, Duration, usize)) -> Duration| {
        let mut v: Vec<Duration> = rows.iter().map(f).collect();
        v.sort();
        v
    };
    println!();
    println!("over {} cutovers:", rows.len());
    println!(
        "{:<18} {:>10} {:>10} {:>10} {:>14}",
        "", "p50", "p90", "max", "p50 / baseline"
    );
    for (label, v) in [
        ("writes frozen", column(|r| r.0)),
        ("ending sessions", column(|r| r.1)),
        ("catching up", column(|r| r.2)),
    ] {
        let p50 = percentile(&v, 0.5);
        println!(
            "{label:<18} {:>10} {:>10} {:>10} {:>13.1}x",
            ms(p50),
            ms(percentile(&v, 0.9)),
            ms(*v.last().unwrap_or(&Duration::ZERO)),
            p50.as_secs_f64() / base.as_secs_f64().max(1e-9)
        );
    }
    Ok(())
}
