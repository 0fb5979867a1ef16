//! `pg_clone`: how long cloning one PostgreSQL database takes, several ways, in one run on one
//! throw-away cluster:
//!
//! - ours: `bluegreen_postgres::Copied` with its defaults (one exported snapshot, parallel binary
//!   COPY streams, `COPY … FREEZE`, indexes and constraints built after the data with
//!   `maintenance_work_mem` 256MB; the source stays online), with its phases' times,
//! - ours with tables over 64 MiB split into ctid ranges shared by the workers,
//! - ours with the levers off (no split, no FREEZE, the server's `maintenance_work_mem`),
//! - the seed scripts' way: `pg_dump <db> | psql -X -v ON_ERROR_STOP=1 <copy>` (two child
//!   processes joined by a pipe, no shell),
//! - `pgcopydb clone --table-jobs W --index-jobs W` (the anchor; skipped with a note when
//!   `pgcopydb` is not installed: `apt-get install -y pgcopydb`),
//! - `CREATE DATABASE … TEMPLATE <db>` with `STRATEGY WAL_LOG` (PostgreSQL 15's default) and
//!   `FILE_COPY`.
//!
//! The TEMPLATE ways need the source to have no other connection for the whole copy: downtime on
//! a live database. Each copy is checked (row counts per table equal the source's), then dropped;
//! a checkpoint runs before each. Prints every pass's time, the medians and the ratios to
//! `pg_dump | psql` and to pgcopydb.
//!
//! The database is generated (`--size-mb`: orders, lines, customers, events) or pgbench's
//! (`--pgbench-scale N`: `pgbench -i -s N`, 15 MB per unit of scale). The cluster is
//! `bluegreen-testenv`'s: `initdb` in a temporary directory (as the `postgres` user when run as
//! root), a loopback port, `fsync` on, `maintenance_work_mem` the server's default 64MB. Run:
//!
//! ```text
//! cargo run --release -p bluegreen-bench --bin pg_clone -- [--size-mb 1024 | --pgbench-scale 40] \
//!     [--workers 2] [--passes 3]
//! ```

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bluegreen_postgres::{quote_ident, CopiedConfig, CopiedDatabase};
use bluegreen_testenv::pg::{Cluster, ClusterOptions};
use tokio_postgres::Client;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, Clone)]
struct Options {
    size_mb: u64,
    /// `--pgbench-scale N`: the database is `pgbench -i -s N`'s instead of the generated one.
    pgbench_scale: Option<u32>,
    workers: usize,
    passes: usize,
    /// `--bin-dir`; found like every test cluster's otherwise.
    bin: Option<PathBuf>,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        size_mb: 1024,
        pgbench_scale: None,
        workers: 2,
        passes: 1,
        bin: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<String> {
            Ok(args.next().ok_or(format!("{name} needs a value"))?)
        };
        match a.as_str() {
            "--size-mb" => o.size_mb = value("--size-mb")?.parse::<u64>()?.max(10),
            "--pgbench-scale" => {
                o.pgbench_scale = Some(value("--pgbench-scale")?.parse::<u32>()?.max(1))
            }
            "--workers" => o.workers = value("--workers")?.parse::<usize>()?.max(1),
            "--passes" => o.passes = value("--passes")?.parse::<usize>()?.clamp(1, 20),
            "--bin-dir" => o.bin = Some(PathBuf::from(value("--bin-dir")?)),
            "-h" | "--help" => {
                println!(
                    "usage: pg_clone [--size-mb N (default 1024) | --pgbench-scale N] \
                     [--workers W (default 2)] [--passes P (default 1)] [--bin-dir DIR]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(o)
}

/// Fills `bench` with about `size_mb` MB: a wide orders table (most of the data), customers,
/// order lines, an event log; primary keys, foreign keys, secondary indexes, a sequence.
async fn generate(c: &Client, size_mb: u64) -> Result<()> {
    // About 460 bytes per order on disk with its lines, events and indexes (measured).
    let orders = size_mb * 1024 * 1024 / 460;
    let customers = (orders / 50).max(1000);
    c.batch_execute(&format!(
        "CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL);
         INSERT INTO customers SELECT g, 'customer ' || g, md5(g::text) || '@example.com'
           FROM generate_series(1, {customers}) g;
         CREATE TABLE orders (id bigserial PRIMARY KEY,
                              customer bigint NOT NULL REFERENCES customers(id),
                              created timestamptz NOT NULL, amount numeric(12,2) NOT NULL,
                              status text NOT NULL, note text);
         CREATE TABLE order_lines (order_id bigint NOT NULL REFERENCES orders(id),
                                   line int NOT NULL, sku text NOT NULL, qty int NOT NULL,
                                   PRIMARY KEY (order_id, line));
         CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz NOT NULL, payload jsonb);"
    ))
    .await?;
    // In chunks, so progress shows and no single statement holds everything.
    let chunk = 500_000u64;
    let mut from = 1u64;
    while from <= orders {
        let to = (from + chunk - 1).min(orders);
        c.batch_execute(&format!(
            "INSERT INTO orders (id, customer, created, amount, status, note)
               SELECT g, 1 + g % {customers}, now() - (g % 100000) * interval '1 minute',
                      (g % 100000) / 100.0, (ARRAY['new','paid','shipped','done'])[1 + g % 4],
                      md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text)
               FROM generate_series({from}, {to}) g;
             INSERT INTO order_lines SELECT g, l, 'SKU-' || (g * l) % 10007, 1 + l
               FROM generate_series({from}, {to}) g, generate_series(1, 2) l;
             INSERT INTO events (at, payload)
               SELECT now(), jsonb_build_object('order', g, 'kind', 'created')
               FROM generate_series({from}, {to}, 4) g;"
        ))
        .await?;
        eprint!("\r  generated {to}/{orders} orders");
        from = to + 1;
    }
    eprintln!();
    c.batch_execute(
        "SELECT setval('orders_id_seq', (SELECT max(id) FROM orders));
         CREATE INDEX orders_customer ON orders (customer);
         CREATE INDEX orders_created ON orders (created);
         CREATE INDEX events_at ON events (at);",
    )
    .await?;
    // Each on its own: VACUUM cannot run in the implicit transaction of a multi-statement query.
    c.batch_execute("VACUUM ANALYZE").await?;
    c.batch_execute("CHECKPOINT").await?;
    Ok(())
}

/// Rows per user table, by name: the check that a copy holds what the source holds.
async fn counts(c: &Client) -> Result<Vec<(String, i64)>> {
    let tables: Vec<String> = c
        .query(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(relname) FROM pg_stat_user_tables
             ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut out = Vec::new();
    for t in tables {
        // The names come from the catalog, quoted by the server.
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await?
            .get(0);
        out.push((t, n));
    }
    Ok(out)
}

/// `pgbench -i -q -s <scale> bench`.
fn pgbench_init(cluster: &Cluster, scale: u32) -> Result<()> {
    let st = cluster
        .client_command("pgbench")
        .args(["-i", "-q", "-s"])
        .arg(scale.to_string())
        .arg("bench")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !st.success() {
        return Err(format!("pgbench -i exited with {st}").into());
    }
    Ok(())
}

/// `pgcopydb clone --table-jobs W --index-jobs W` from `source` into the existing `target`, as
/// a child process (no shell), its work directory a fresh temporary one; the cluster's
/// `pg_dump` and `pg_restore` first on `PATH`.
fn pgcopydb_clone(cluster: &Cluster, source: &str, target: &str, jobs: usize) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("bg-pgcopydb-").tempdir()?;
    let uri = |db: &str| format!("postgres://postgres@127.0.0.1:{}/{db}", cluster.port);
    let path = std::env::join_paths(
        std::iter::once(cluster.bin_dir().to_path_buf()).chain(
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default(),
        ),
    )?;
    let mut c = Command::new("pgcopydb");
    let out = cluster
        .client_env(&mut c)
        .env("PATH", path)
        .arg("clone")
        .arg("--source")
        .arg(uri(source))
        .arg("--target")
        .arg(uri(target))
        .arg("--table-jobs")
        .arg(jobs.to_string())
        .arg("--index-jobs")
        .arg(jobs.to_string())
        .arg("--dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err
            .chars()
            .rev()
            .take(3000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(format!("pgcopydb clone exited with {}: {tail}", out.status).into());
    }
    Ok(())
}

/// `pg_dump source | psql -X -v ON_ERROR_STOP=1 target`: two children joined by a pipe (no shell),
/// the password in the environment only.
fn dump_pipe_psql(cluster: &Cluster, source: &str, target: &str) -> Result<()> {
    let mut dump = cluster.client_command("pg_dump");
    dump.arg("--no-password")
        .arg("-d")
        .arg(source)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut d = dump.spawn()?;
    let out = d.stdout.take().ok_or("pg_dump stdout")?;
    let mut psql = cluster.client_command("psql");
    psql.args(["--no-password", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(target)
        .stdin(Stdio::from(out))
        .stdout(Stdio::null());
    let mut p = psql.spawn()?;
    let ps = p.wait()?;
    let ds = d.wait()?;
    if !ds.success() {
        return Err(format!("pg_dump exited with {ds}").into());
    }
    if !ps.success() {
        return Err(format!("psql exited with {ps}").into());
    }
    Ok(())
}

/// `/proc/loadavg`'s three load averages.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// CPU time in clock ticks from `/proc/<pid>/stat`: (the process's own, its reaped children's).
fn cpu_ticks(pid: u32) -> Option<(u64, u64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (in parentheses, which may hold spaces): state, ppid, …
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    // Fields 14-17 of stat(5) (utime, stime, cutime, cstime) are 11-14 here; ppid is 1.
    Some((n(11)? + n(12)?, n(13)? + n(14)?, u32::try_from(n(1)?).ok()?))
}

/// The postmaster's live children with their CPU ticks (own + reaped).
fn children(postmaster: u32) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((own, reaped, ppid)) = cpu_ticks(pid) {
                if ppid == postmaster {
                    out.push((pid, own + reaped));
                }
            }
        }
    }
    out.sort_unstable();
    out
}

/// CPU seconds used so far by the whole cluster (the postmaster, its live processes and every
/// backend it has reaped) and by this process with its reaped children (pg_dump, psql,
/// pg_restore, pgcopydb). Linux's `/proc`; zeros elsewhere. A backend reaped between reading
/// the children and the postmaster would be missed or counted twice: read until the set of
/// children did not change around the postmaster's figures (bounded).
fn cpu_seconds(postmaster: u32) -> (f64, f64) {
    let hz = 100.0; // USER_HZ: 100 on every Linux ABI this runs on
    let mut server = 0u64;
    for _ in 0..20 {
        let before = children(postmaster);
        let own = cpu_ticks(postmaster).map(|(o, r, _)| o + r).unwrap_or(0);
        let after = children(postmaster);
        let same =
            before.len() == after.len() && before.iter().zip(&after).all(|(a, b)| a.0 == b.0);
        server = own + after.iter().map(|c| c.1).sum::<u64>();
        if same {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let client = cpu_ticks(std::process::id())
        .map(|(own, reaped, _)| own + reaped)
        .unwrap_or(0);
    (server as f64 / hz, client as f64 / hz)
}

/// The ways to clone, in the order each pass runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// `CopiedDatabase` with this crate's defaults (FREEZE, maintenance_work_mem 256MB, no
    /// split).
    Copied,
    /// The defaults plus tables over 64 MiB split into ctid ranges.
    CopiedSplit,
    /// `CopiedDatabase` with the levers off: no split, no FREEZE, the server's
    /// maintenance_work_mem (what Copied did before issue #17 §2, apart from the post-data dump
    /// running beside the data and the asynchronous commits).
    CopiedPlain,
    DumpPsql,
    Pgcopydb,
    TemplateWal,
    TemplateFile,
}

impl Method {
    fn label(self) -> &'static str {
        match self {
            Method::Copied => "Copied (ours, online)",
            Method::CopiedSplit => "Copied + split 64 MiB",
            Method::CopiedPlain => "Copied, levers off",
            Method::DumpPsql => "pg_dump | psql (seeds)",
            Method::Pgcopydb => "pgcopydb clone",
            Method::TemplateWal => "TEMPLATE (WAL_LOG)",
            Method::TemplateFile => "TEMPLATE FILE_COPY",
        }
    }
    fn target(self) -> &'static str {
        match self {
            Method::Copied => "copy_ours",
            Method::CopiedSplit => "copy_split",
            Method::CopiedPlain => "copy_plain",
            Method::DumpPsql => "copy_dump",
            Method::Pgcopydb => "copy_pgcopydb",
            Method::TemplateWal => "copy_tpl_wal",
            Method::TemplateFile => "copy_tpl_file",
        }
    }
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let o = parse_args()?;
    // fsync on, as a production server runs; as the `postgres` user when run as root.
    let mut options = ClusterOptions::new().durable().with_settings(&[
        "shared_buffers=256MB",
        "max_wal_size=4GB",
        "maintenance_work_mem=64MB",
    ]);
    if let Some(bin) = &o.bin {
        options = options.with_bin_dir(bin);
    }
    let cluster = Cluster::launch(options)?;
    let postmaster: u32 = std::fs::read_to_string(cluster.path().join("data/postmaster.pid"))?
        .lines()
        .next()
        .ok_or("empty postmaster.pid")?
        .trim()
        .parse()?;
    let have_pgcopydb = Command::new("pgcopydb")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let what = match o.pgbench_scale {
        Some(s) => format!("pgbench -i -s {s}"),
        None => format!("~{} MB generated", o.size_mb),
    };
    println!(
        "pg_clone: {what}, cloned {} pass(es) of each way (PostgreSQL binaries in {}; pgcopydb {})",
        o.passes,
        cluster.bin_dir().display(),
        if have_pgcopydb {
            "found"
        } else {
            "NOT installed: skipped (apt-get install -y pgcopydb)"
        }
    );
    let admin = cluster.config("postgres").connect("bench").await?;
    admin.batch_execute("CREATE DATABASE bench").await?;
    {
        let t = Instant::now();
        match o.pgbench_scale {
            Some(scale) => {
                let cluster = &cluster;
                tokio::task::block_in_place(|| pgbench_init(cluster, scale))?;
                let c = cluster.config("bench").connect("bench").await?;
                c.batch_execute("VACUUM ANALYZE").await?;
                c.batch_execute("CHECKPOINT").await?;
            }
            None => {
                let c = cluster.config("bench").connect("bench").await?;
                generate(&c, o.size_mb).await?;
            }
        }
        println!("  generated in {:.1?}", t.elapsed());
    }
    let size: String = admin
        .query_one("SELECT pg_size_pretty(pg_database_size('bench'))", &[])
        .await?
        .get(0);
    let expected = counts(&cluster.config("bench").connect("bench").await?).await?;
    println!("  database size {size}; rows {expected:?}");
    println!("  load average at start: {}", load());

    let mut methods = vec![
        Method::Copied,
        Method::CopiedSplit,
        Method::CopiedPlain,
        Method::DumpPsql,
    ];
    if have_pgcopydb {
        methods.push(Method::Pgcopydb);
    }
    methods.extend([Method::TemplateWal, Method::TemplateFile]);
    let ours = CopiedConfig::new(cluster.config("bench"))
        .with_workers(o.workers)
        .with_bin_dir(cluster.bin_dir())
        .with_timeout(Duration::from_secs(6 * 3600));
    let copied = CopiedDatabase::new(ours.clone())?;
    let split = CopiedDatabase::new(ours.clone().with_split_table_bytes(64 * 1024 * 1024))?;
    let plain = CopiedDatabase::new(
        ours.with_split_table_bytes(0)
            .with_copy_freeze(false)
            .with_maintenance_work_mem_mb(0),
    )?;

    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); methods.len()];
    let mut cpu: Vec<Vec<(f64, f64)>> = vec![Vec::new(); methods.len()];
    for pass in 1..=o.passes {
        println!("pass {pass} (load {})", load());
        for (i, &m) in methods.iter().enumerate() {
            let db = m.target();
            admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(db)
                ))
                .await?;
            // Every way starts from the same state: nothing dirty left by the previous one.
            admin.batch_execute("CHECKPOINT").await?;
            let cpu0 = cpu_seconds(postmaster);
            let t = Instant::now();
            let mut detail = String::new();
            match m {
                Method::Copied | Method::CopiedSplit | Method::CopiedPlain => {
                    let s = match m {
                        Method::Copied => &copied,
                        Method::CopiedSplit => &split,
                        _ => &plain,
                    };
                    let r = s.copy_database("bench", db).await?;
                    detail = format!(
                        "pre-data {:.2?}, data {:.2?} ({} streams, {} split tables, {} MB of COPY \
                         data), sequences + post-data {:.2?}",
                        r.pre_data,
                        r.data,
                        r.chunks,
                        r.split_tables,
                        r.bytes / (1024 * 1024),
                        r.post_data
                    );
                }
                Method::DumpPsql | Method::Pgcopydb => {
                    admin
                        .batch_execute(&format!("CREATE DATABASE {}", quote_ident(db)))
                        .await?;
                    let t = Instant::now();
                    let cluster = &cluster;
                    if m == Method::DumpPsql {
                        tokio::task::block_in_place(|| dump_pipe_psql(cluster, "bench", db))?;
                    } else {
                        tokio::task::block_in_place(|| {
                            pgcopydb_clone(cluster, "bench", db, o.workers)
                        })?;
                    }
                    // The empty target's creation is not part of these ways' time.
                    times[i].push(t.elapsed());
                }
                Method::TemplateWal | Method::TemplateFile => {
                    let strategy = if m == Method::TemplateWal {
                        "WAL_LOG"
                    } else {
                        "FILE_COPY"
                    };
                    admin
                        .batch_execute(&format!(
                            "CREATE DATABASE {} TEMPLATE bench STRATEGY {strategy}",
                            quote_ident(db)
                        ))
                        .await?;
                }
            }
            if !matches!(m, Method::DumpPsql | Method::Pgcopydb) {
                times[i].push(t.elapsed());
            }
            let took = *times[i].last().expect("pushed");
            // The sessions of the copy have closed; let the postmaster reap them.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let cpu1 = cpu_seconds(postmaster);
            let (server_cpu, client_cpu) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
            cpu[i].push((server_cpu, client_cpu));
            let got = counts(&cluster.config(db).connect("bench").await?).await?;
            if got != expected {
                return Err(format!("{db}: rows {got:?}, expected {expected:?}").into());
            }
            println!(
                "  {:<24} {took:>9.2?}  CPU s: server {server_cpu:>5.1}, clients \
                 {client_cpu:>5.1}  {detail}",
                m.label()
            );
            admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(db)
                ))
                .await?;
        }
    }
    println!("  load average at the end: {}", load());

    let base = methods
        .iter()
        .position(|m| *m == Method::DumpPsql)
        .map(|i| median(&times[i]))
        .expect("pg_dump | psql always runs");
    let anchor = methods
        .iter()
        .position(|m| *m == Method::Pgcopydb)
        .map(|i| median(&times[i]));
    println!();
    println!(
        "database of {size} ({what}), fsync on, {} worker(s), {} pass(es), median:",
        o.workers, o.passes
    );
    println!(
        "{:<24} {:>8} {:>24} {:>15} {:>15} {:>18}",
        "method", "median s", "passes s", "vs pg_dump|psql", "vs pgcopydb", "CPU s server+client"
    );
    for (i, m) in methods.iter().enumerate() {
        let med = median(&times[i]);
        let all: Vec<String> = times[i]
            .iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect();
        let vs_anchor = anchor
            .map(|a| format!("{:.2}x", a.as_secs_f64() / med.as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        let mut server: Vec<f64> = cpu[i].iter().map(|c| c.0).collect();
        let mut client: Vec<f64> = cpu[i].iter().map(|c| c.1).collect();
        server.sort_by(f64::total_cmp);
        client.sort_by(f64::total_cmp);
        println!(
            "{:<24} {:>8.2} {:>24} {:>14.2}x {:>15} {:>12.1}+{:<5.1}",
            m.label(),
            med.as_secs_f64(),
            all.join(" "),
            base.as_secs_f64() / med.as_secs_f64(),
            vs_anchor,
            server[server.len() / 2],
            client[client.len() / 2]
        );
    }
    println!(
        "(x > 1: faster; the TEMPLATE rows need the source idle for the whole copy; the others \
         copy an online source; CPU s: medians of the cluster's processes and of this one with \
         its child programs)"
    );
    Ok(())
}
