//! `pg_clone`: how long cloning one generated PostgreSQL database takes, four ways, in one run on
//! one throw-away cluster:
//!
//! - (a) ours: `bluegreen_postgres::CopiedDatabase` (one exported snapshot, parallel binary COPY streams,
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
//! The cluster is created with `initdb` in a temporary directory (as the `postgres` user when run
//! as root) and listens on a free loopback port; `fsync` stays on. Run:
//!
//! ```text
//! cargo run --release -p bluegreen-bench --bin pg_clone -- [--size-mb 1024] [--workers 2]
//! ```

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bluegreen_postgres::{quote_ident, CopiedConfig, CopiedDatabase, PostgresConfig};
use tokio_postgres::Client;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, Clone)]
struct Options {
    size_mb: u64,
    workers: usize,
    bin: PathBuf,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        size_mb: 1024,
        workers: 2,
        bin: newest_bin_dir(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<String> {
            Ok(args.next().ok_or(format!("{name} needs a value"))?)
        };
        match a.as_str() {
            "--size-mb" => o.size_mb = value("--size-mb")?.parse::<u64>()?.max(10),
            "--workers" => o.workers = value("--workers")?.parse::<usize>()?.max(1),
            "--bin-dir" => o.bin = PathBuf::from(value("--bin-dir")?),
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

fn newest_bin_dir() -> PathBuf {
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        for e in rd.flatten() {
            if let Ok(m) = e.file_name().to_string_lossy().parse::<u32>() {
                if best.as_ref().map(|(b, _)| m > *b).unwrap_or(true) {
                    best = Some((m, e.path().join("bin")));
                }
            }
        }
    }
    best.map(|(_, p)| p)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// A throw-away cluster, stopped and deleted on drop.
struct Cluster {
    root: PathBuf,
    bin: PathBuf,
    port: u16,
    password: String,
    as_postgres: bool,
}

fn postgres_ids() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres") && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

impl Cluster {
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn start(bin: &Path) -> Result<Cluster> {
        let root = std::env::temp_dir().join(format!(
            "bg-pg-clone-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir(&root)?;
        let as_postgres = is_root();
        let password = format!("bench-{}", std::process::id());
        let mut cluster = Cluster {
            root: root.clone(),
            bin: bin.to_path_buf(),
            port: 0,
            password: password.clone(),
            as_postgres,
        };
        let pwfile = root.join("pw");
        std::fs::write(&pwfile, format!("{password}\n"))?;
        if as_postgres {
            let (uid, gid) =
                postgres_ids().ok_or("running as root but there is no postgres user")?;
            std::os::unix::fs::chown(&root, Some(uid), Some(gid))?;
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid))?;
        }
        let data = root.join("data");
        let out = cluster
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg("--pwfile")
            .arg(&pwfile)
            .args(["--locale=C", "-E", "UTF8"])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        cluster.port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = root.join("postgres.log");
        let status = cluster
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .arg("-w")
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c shared_buffers=256MB \
                 -c max_wal_size=4GB -c maintenance_work_mem=256MB",
                cluster.port,
                root.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("postgres did not start: {tail}").into());
        }
        Ok(cluster)
    }

    fn config(&self, db: &str) -> PostgresConfig {
        PostgresConfig::new("127.0.0.1", self.port, db)
            .with_user("postgres")
            .with_password(self.password.clone())
            .with_connect_timeout(Duration::from_secs(30))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.root.join("data"))
            .args(["-m", "fast", "-w"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
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
fn dump_pipe_psql(cluster: &Cluster, bin: &Path, source: &str, target: &str) -> Result<()> {
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
    println!(
        "pg_clone: generating ~{} MB, then cloning it four ways (PostgreSQL binaries in {})",
        o.size_mb,
        o.bin.display()
    );
    let cluster = Cluster::start(&o.bin)?;
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
            .with_bin_dir(&o.bin)
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
        let (cluster, bin) = (&cluster, o.bin.clone());
        tokio::task::block_in_place(|| dump_pipe_psql(cluster, &bin, "bench", "copy_dump"))?;
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
