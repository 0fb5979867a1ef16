//! `pg_clone`: how long cloning one generated PostgreSQL database takes, four ways, in one run on
//! one throw-away cluster:
//!
//! - (a) ours: `bluegreen_postgres::Copied` (one exported snapshot, parallel binary COPY streams,
//!   indexes and constraints built after the data; the source stays online),
//! - (b) the seed scripts' way: `pg_dump <db> | psql -X -v ON_ERROR_STOP=1 <copy>` (two child
//!   processes joined by a pipe, no shell),
//! - (c) `CREATE DATABASE … TEMPLATE <db>` (PostgreSQL 15's default `STRATEGY WAL_LOG`), and
//! - (d) the same with `STRATEGY FILE_COPY`.
//!
//! (c) and (d) need the source to have no other connection for the whole copy: downtime on a live
//! database. Each copy is checked (row counts per table equal the source's), then dropped.
//! Prints the times and the ratios to `pg_dump | psql`.
//!
//! The cluster is `bluegreen-testenv`'s: `initdb` in a temporary directory (as the `postgres` user
//! when run as root), a loopback port, `fsync` on. Run:
//!
//! ```text
//! cargo run --release -p bluegreen-bench --bin pg_clone -- [--size-mb 1024] [--workers 2]
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
    workers: usize,
    /// `--bin-dir`; found like every test cluster's otherwise.
    bin: Option<PathBuf>,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        size_mb: 1024,
        workers: 2,
        bin: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<String> {
            Ok(args.next().ok_or(format!("{name} needs a value"))?)
        };
        match a.as_str() {
            "--size-mb" => o.size_mb = value("--size-mb")?.parse::<u64>()?.max(10),
            "--workers" => o.workers = value("--workers")?.parse::<usize>()?.max(1),
            "--bin-dir" => o.bin = Some(PathBuf::from(value("--bin-dir")?)),
            "-h" | "--help" => {
                println!(
                    "usage: pg_clone [--size-mb N (default 1024)] [--workers W] [--bin-dir DIR]"
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

async fn counts(c: &Client) -> Result<Vec<(String, i64)>> {
    let mut out = Vec::new();
    for t in ["customers", "orders", "order_lines", "events"] {
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await?
            .get(0);
        out.push((t.to_string(), n));
    }
    Ok(out)
}

/// `pg_dump source | psql -X -v ON_ERROR_STOP=1 target`: two children joined by a pipe (no shell),
/// the password in the environment only.
fn dump_pipe_psql(cluster: &Cluster, source: &str, target: &str) -> Result<()> {
    let bin = cluster.bin_dir();
    let env = |c: &mut Command| {
        c.env_remove("PGPASSFILE")
            .env_remove("PGSERVICE")
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", cluster.port.to_string())
            .env("PGUSER", "postgres")
            .env("PGPASSWORD", &cluster.password);
    };
    let mut dump = Command::new(bin.join("pg_dump"));
    env(&mut dump);
    dump.arg("--no-password")
        .arg("-d")
        .arg(source)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut d = dump.spawn()?;
    let out = d.stdout.take().ok_or("pg_dump stdout")?;
    let mut psql = Command::new(bin.join("psql"));
    env(&mut psql);
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

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let o = parse_args()?;
    // fsync on, as a production server runs; as the `postgres` user when run as root.
    let mut options = ClusterOptions::new().durable().with_settings(&[
        "shared_buffers=256MB",
        "max_wal_size=4GB",
        "maintenance_work_mem=256MB",
    ]);
    if let Some(bin) = &o.bin {
        options = options.with_bin_dir(bin);
    }
    let cluster = Cluster::launch(options)?;
    println!(
        "pg_clone: generating ~{} MB, then cloning it four ways (PostgreSQL binaries in {})",
        o.size_mb,
        cluster.bin_dir().display()
    );
    let admin = cluster.config("postgres").connect("bench").await?;
    admin.batch_execute("CREATE DATABASE bench").await?;
    {
        let c = cluster.config("bench").connect("bench").await?;
        let t = Instant::now();
        generate(&c, o.size_mb).await?;
        println!("  generated in {:.1?}", t.elapsed());
    }
    let size: String = admin
        .query_one("SELECT pg_size_pretty(pg_database_size('bench'))", &[])
        .await?
        .get(0);
    let expected = counts(&cluster.config("bench").connect("bench").await?).await?;
    println!("  database size {size}; rows {expected:?}");

    let mut results: Vec<(&str, Duration)> = Vec::new();
    let check = |db: &'static str| {
        let cfg = cluster.config(db);
        let expected = expected.clone();
        async move {
            let got = counts(&cfg.connect("bench").await?).await?;
            if got != expected {
                return Err(format!("{db}: rows {got:?}, expected {expected:?}").into());
            }
            Result::Ok(())
        }
    };
    let drop_db = |db: &'static str| {
        let admin = &admin;
        async move {
            admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(db)
                ))
                .await?;
            admin.batch_execute("CHECKPOINT").await?;
            Result::Ok(())
        }
    };

    // (a) ours.
    admin.batch_execute("CHECKPOINT").await?;
    let copied = CopiedDatabase::new(
        CopiedConfig::new(cluster.config("bench"))
            .with_workers(o.workers)
            .with_bin_dir(cluster.bin_dir())
            .with_timeout(Duration::from_secs(6 * 3600)),
    )?;
    let t = Instant::now();
    let report = copied.copy_database("bench", "copy_ours").await?;
    let ours = t.elapsed();
    check("copy_ours").await?;
    println!(
        "  (a) Copied ({} workers): {ours:.2?} ({} rows, {} MB of COPY data)",
        o.workers,
        report.rows,
        report.bytes / (1024 * 1024)
    );
    results.push(("Copied (ours, online)", ours));
    drop_db("copy_ours").await?;

    // (b) pg_dump | psql.
    admin.batch_execute("CREATE DATABASE copy_dump").await?;
    let t = Instant::now();
    {
        let cluster = &cluster;
        tokio::task::block_in_place(|| dump_pipe_psql(cluster, "bench", "copy_dump"))?;
    }
    let dump = t.elapsed();
    check("copy_dump").await?;
    println!("  (b) pg_dump | psql: {dump:.2?}");
    results.push(("pg_dump | psql (seeds)", dump));
    drop_db("copy_dump").await?;

    // (c), (d) CREATE DATABASE … TEMPLATE (no other session may be connected to bench).
    for (name, label, strategy) in [
        ("copy_tpl_wal", "TEMPLATE (WAL_LOG, default)", "WAL_LOG"),
        ("copy_tpl_file", "TEMPLATE STRATEGY FILE_COPY", "FILE_COPY"),
    ] {
        let t = Instant::now();
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {} TEMPLATE bench STRATEGY {strategy}",
                quote_ident(name)
            ))
            .await?;
        let took = t.elapsed();
        let got = counts(&cluster.config(name).connect("bench").await?).await?;
        if got != expected {
            return Err(format!("{name}: rows {got:?}, expected {expected:?}").into());
        }
        println!("  {label}: {took:.2?}");
        results.push((label, took));
        drop_db(name).await?;
    }

    println!();
    println!(
        "database of {size} ({} MB requested), fsync on, 1 run each:",
        o.size_mb
    );
    println!(
        "{:<30} {:>10} {:>16}",
        "method", "seconds", "vs pg_dump|psql"
    );
    for (label, d) in &results {
        println!(
            "{label:<30} {:>10.2} {:>15.2}x",
            d.as_secs_f64(),
            dump.as_secs_f64() / d.as_secs_f64()
        );
    }
    println!("(x > 1: faster than pg_dump | psql; the TEMPLATE rows need the source idle for the whole copy)");
    Ok(())
}
