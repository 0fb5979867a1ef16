//! Throw-away PostgreSQL clusters for the tests: `initdb` on a temp dir as the `postgres` user,
//! started on a free loopback port with `wal_level=logical`, stopped (immediate) on drop.
#![allow(dead_code, unreachable_pub)]

use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bluegreen_postgres::PostgresConfig;
use tokio_postgres::Client;

pub const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running throw-away cluster.
pub struct Cluster {
    dir: tempfile::TempDir,
    pub port: u16,
    pub password: String,
    child: Option<Child>,
}

fn skip_or_panic(reason: &str) -> Option<Cluster> {
    if std::env::var_os("CI").is_some() {
        panic!("PostgreSQL test cluster unavailable in CI: {reason}");
    }
    eprintln!("SKIPPED: PostgreSQL test cluster unavailable: {reason}");
    None
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

fn random_password() -> String {
    let mut b = [0u8; 12];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    // A quote and a space prove the password is passed safely everywhere.
    format!(
        "pw '{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn run(argv: &[&str]) -> Result<(), String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{argv:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{argv:?} exited {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

impl Cluster {
    /// Starts a cluster, or returns `None` (skip) when the binaries are missing outside CI.
    pub async fn start() -> Option<Cluster> {
        Self::start_with(&[]).await
    }

    /// Like [`Cluster::start`], with extra `name=value` settings (they override the defaults).
    pub async fn start_with(settings: &[&str]) -> Option<Cluster> {
        let bin = Path::new(BIN);
        for b in [
            "initdb",
            "postgres",
            "pg_ctl",
            "pg_dump",
            "pg_restore",
            "psql",
        ] {
            if !bin.join(b).exists() {
                return skip_or_panic(&format!("{} is missing", bin.join(b).display()));
            }
        }
        if !Path::new("/usr/sbin/runuser").exists() && !Path::new("/sbin/runuser").exists() {
            return skip_or_panic("runuser is missing");
        }
        let Some((uid, gid)) = postgres_ids() else {
            return skip_or_panic("no `postgres` user");
        };
        let mut dir = tempfile::Builder::new()
            .prefix("bg-pg-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path().to_path_buf();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
        chown(&root, Some(uid), Some(gid)).expect("chown temp dir to postgres");
        let password = random_password();
        let pwfile = root.join("pw");
        std::fs::write(&pwfile, format!("{password}\n")).unwrap();
        chown(&pwfile, Some(uid), Some(gid)).unwrap();
        let sock = root.join("sock");
        std::fs::create_dir(&sock).unwrap();
        chown(&sock, Some(uid), Some(gid)).unwrap();
        let data = root.join("data");
        let initdb = bin.join("initdb");
        let res = tokio::task::spawn_blocking({
            let (data, pwfile) = (data.clone(), pwfile.clone());
            move || {
                run(&[
                    "runuser",
                    "-u",
                    "postgres",
                    "--",
                    initdb.to_str().unwrap(),
                    "-D",
                    data.to_str().unwrap(),
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--pwfile",
                    pwfile.to_str().unwrap(),
                    "--no-sync",
                    "--locale=C",
                    "-E",
                    "UTF8",
                ])
            }
        })
        .await
        .unwrap();
        if let Err(e) = res {
            panic!("initdb failed: {e}");
        }
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let log = File::create(root.join("postgres.log")).unwrap();
            let child = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("postgres"))
                .arg("-D")
                .arg(&data)
                .arg("-k")
                .arg(&sock)
                .arg("-p")
                .arg(port.to_string())
                .args([
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "wal_level=logical",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=60",
                    "-c",
                    "shared_buffers=32MB",
                    "-c",
                    "max_replication_slots=16",
                    "-c",
                    "max_wal_senders=16",
                    "-c",
                    "max_worker_processes=16",
                    "-c",
                    "max_logical_replication_workers=8",
                    "-c",
                    "wal_receiver_status_interval=1s",
                    "-c",
                    "wal_sender_timeout=60s",
                ])
                .args(settings.iter().flat_map(|s| ["-c", s]))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn postgres");
            let mut cluster = Cluster {
                dir,
                port,
                password: password.clone(),
                child: Some(child),
            };
            match cluster.wait_ready(Duration::from_secs(90)).await {
                Ok(()) => return Some(cluster),
                Err(e) => {
                    last_err = e;
                    cluster.stop();
                    dir = std::mem::replace(&mut cluster.dir, tempfile::tempdir().unwrap());
                    let _ = std::fs::remove_file(data.join("postmaster.pid"));
                }
            }
        }
        panic!("PostgreSQL did not start: {last_err}");
    }

    async fn wait_ready(&mut self, bound: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("postgres exited {status}: {}", self.log_tail()));
                }
            }
            match self.client("postgres").await {
                Ok(_) => return Ok(()),
                Err(e) if start.elapsed() > bound => {
                    return Err(format!(
                        "not ready after {bound:?}: {e}; {}",
                        self.log_tail()
                    ))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
        let chars: Vec<char> = s.chars().collect();
        chars[chars.len().saturating_sub(2000)..].iter().collect()
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Superuser settings for `db` over TCP with the password.
    pub fn config(&self, db: &str) -> PostgresConfig {
        PostgresConfig::new("127.0.0.1", self.port, db)
            .with_user("postgres")
            .with_password(self.password.clone())
            .with_connect_timeout(Duration::from_secs(20))
    }

    /// A superuser connection to `db`.
    pub async fn client(&self, db: &str) -> Result<Client, String> {
        self.config(db)
            .connect("test")
            .await
            .map_err(|e| e.to_string())
    }

    /// Creates database `db`.
    pub async fn create_db(&self, db: &str) {
        let c = self.client("postgres").await.unwrap();
        c.batch_execute(&format!(
            "CREATE DATABASE {}",
            bluegreen_postgres::quote_ident(db)
        ))
        .await
        .unwrap();
    }

    fn stop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(BIN).join("pg_ctl"))
            .arg("stop")
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "-t", "30"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a query returning one i64.
pub async fn one_i64(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// A small application schema: accounts (total balance constant), orders (insert-only, FK),
/// a counter kept equal to the number of orders, a sequence, a view, a quoted mixed-case name.
pub const SEED: &str = "
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 100) g;
CREATE TABLE orders (id bigserial PRIMARY KEY, account int NOT NULL REFERENCES accounts(id),
                     amount bigint NOT NULL, note text);
CREATE INDEX orders_account ON orders (account);
INSERT INTO orders (account, amount, note)
  SELECT 1 + g % 100, g, md5(g::text) FROM generate_series(1, 3000) g;
CREATE TABLE counters (name text PRIMARY KEY, n bigint NOT NULL);
INSERT INTO counters VALUES ('orders', 3000);
CREATE SCHEMA extra;
CREATE TABLE extra.\"Mixed Case\" (k int PRIMARY KEY, v jsonb);
INSERT INTO extra.\"Mixed Case\" SELECT g, jsonb_build_object('g', g) FROM generate_series(1, 200) g;
CREATE VIEW order_totals AS SELECT account, sum(amount) AS total FROM orders GROUP BY account;
";

/// One writer transaction: an order, the counter, a transfer between two accounts.
pub fn write_txn(i: u64) -> String {
    let a = 1 + i % 100;
    let b = 1 + (i * 7 + 3) % 100;
    format!(
        "BEGIN;
         INSERT INTO orders (account, amount, note) VALUES ({a}, {i}, 'w{i}');
         UPDATE counters SET n = n + 1 WHERE name = 'orders';
         UPDATE accounts SET balance = balance - 1 WHERE id = {a};
         UPDATE accounts SET balance = balance + 1 WHERE id = {b};
         COMMIT;"
    )
}

/// Consistency facts of a database holding [`SEED`]: (orders, counter, total balance, max id).
pub async fn facts(c: &Client) -> (i64, i64, i64, i64) {
    let r = c
        .query_one(
            "SELECT (SELECT count(*) FROM orders), (SELECT n FROM counters WHERE name = 'orders'),
                    (SELECT sum(balance)::bigint FROM accounts),
                    (SELECT coalesce(max(id), 0) FROM orders)",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

/// md5 over the orders with `id <= max_id`, in id order.
pub async fn orders_checksum(c: &Client, max_id: i64) -> String {
    c.query_one(
        "SELECT coalesce(md5(string_agg(o::text, ',' ORDER BY id)), '') FROM orders o WHERE id <= $1",
        &[&max_id],
    )
    .await
    .unwrap()
    .get(0)
}
