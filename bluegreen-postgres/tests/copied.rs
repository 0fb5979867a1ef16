//! The Copied strategy on a real cluster.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bluegreen_core::testkit::{database_suite, DatabaseSuite};
use bluegreen_core::{DatabaseStrategy, DbContext, Prepared, Release, Slot};
use bluegreen_postgres::{CopiedConfig, CopiedDatabase};
use common::{facts, orders_checksum, Cluster, SEED};

async fn seeded(cluster: &Cluster, db: &str) {
    cluster.create_db(db).await;
    cluster
        .client(db)
        .await
        .unwrap()
        .batch_execute(SEED)
        .await
        .unwrap();
}

fn strategy(cluster: &Cluster, base: &str) -> CopiedConfig {
    CopiedConfig::new(cluster.config(base))
        .with_bin_dir(cluster.bin_dir())
        .with_timeout(Duration::from_secs(120))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copied_passes_the_database_suite() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    seeded(&cluster, "app").await;
    let db = CopiedDatabase::new(strategy(&cluster, "app")).unwrap();
    assert_eq!(db.database_of(Slot::Blue), "app_blue");
    let expected = facts(&cluster.client("app").await.unwrap()).await;
    let cfg = cluster.config("postgres");
    let live_intact: bluegreen_core::testkit::IntactFn = Arc::new(move |slot| {
        let cfg = cfg.clone();
        Box::pin(async move {
            let c = cfg
                .with_dbname(format!("app_{slot}"))
                .connect("t")
                .await
                .unwrap();
            facts(&c).await == expected
        })
    });
    let release = Release::new("v1", "app").unwrap();
    database_suite(
        &db,
        &DatabaseSuite {
            release: release.clone(),
            live_intact: Some(live_intact),
        },
    )
    .await
    .assert_complete();

    let admin = cluster.client("postgres").await.unwrap();
    let exists = |name: &'static str| {
        let admin = &admin;
        async move {
            admin
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
                .await
                .unwrap()
                .is_some()
        }
    };
    assert!(exists("app_blue").await, "blue's copy must exist");
    assert!(
        !exists("app_green").await,
        "rollback must drop green's copy"
    );

    // The copy is complete: schema (index, FK, view, quoted names), data, sequences.
    let blue = cluster.client("app_blue").await.unwrap();
    assert_eq!(facts(&blue).await, expected);
    let idx: i64 = blue
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_account'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(idx, 1);
    let fk: i64 = blue
        .query_one(
            "SELECT count(*) FROM pg_constraint WHERE contype = 'f'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(fk, 1);
    let mixed: i64 = blue
        .query_one("SELECT count(*) FROM extra.\"Mixed Case\"", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(mixed, 200);
    let view: i64 = blue
        .query_one("SELECT count(*) FROM order_totals", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(view, 100);
    // The sequence continues after the copied rows (no duplicate key).
    let id: i64 = blue
        .query_one(
            "INSERT INTO orders (account, amount) VALUES (1, 1) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(id > expected.3, "sequence not copied: {id}");

    // The binding names the slot's database; the password only in secret_env.
    let ctx = DbContext {
        live: Some(Slot::Blue),
        target: Slot::Green,
        release,
    };
    let Prepared { binding, step, .. } = db.prepare(&ctx).await.unwrap();
    assert!(step.is_reversible());
    assert_eq!(binding.env["PGDATABASE"], "app_green");
    assert_eq!(binding.env["PGPORT"], cluster.port.to_string());
    assert_eq!(binding.secret_env["PGPASSWORD"].expose(), cluster.password);
    assert!(binding.secret_env["DATABASE_URL"]
        .expose()
        .ends_with("/app_green"));
    for v in binding.env.values() {
        assert!(!v.contains(&cluster.password));
    }
    assert!(!format!("{db:?} {binding:?}").contains(&cluster.password));

    // finalize drops the previous live database (irreversible), never the base one.
    db.before_switch(&ctx).await.unwrap();
    // After the switch the copy may take writes: a repeated prepare never copies over it.
    let green = cluster.client("app_green").await.unwrap();
    let before = facts(&green).await.0;
    green
        .execute("INSERT INTO orders (account, amount) VALUES (1, 2)", &[])
        .await
        .unwrap();
    let Prepared { step: again, .. } = db.prepare(&ctx).await.unwrap();
    assert!(again.summary.contains("already copied"), "{again:?}");
    assert_eq!(facts(&green).await.0, before + 1);
    drop(green);
    db.after_switch(&ctx).await.unwrap();
    let step = db.finalize(&ctx).await.unwrap();
    assert!(!step.is_reversible(), "{step:?}");
    assert!(!exists("app_blue").await);
    assert!(exists("app_green").await);
    assert!(exists("app").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_equals_one_snapshot_under_concurrent_writes() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    seeded(&cluster, "live").await;
    let db = CopiedDatabase::new(strategy(&cluster, "live").with_workers(3)).unwrap();
    let src = cluster.client("live").await.unwrap();
    let base_total = facts(&src).await.2;

    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, commits) = (stop.clone(), commits.clone());
        let c = cluster.client("live").await.unwrap();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 200_000 {
                i += 1;
                c.batch_execute(&common::write_txn(i)).await.unwrap();
                commits.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Let the writer get going, then copy three times while it writes.
    let deadline = Instant::now() + Duration::from_secs(60);
    while commits.load(Ordering::Relaxed) < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut during = Vec::new();
    for round in 0..3 {
        let before = commits.load(Ordering::Relaxed);
        let target = format!("copy_{round}");
        let report = db.copy_database("live", &target).await.unwrap();
        during.push(commits.load(Ordering::Relaxed) - before);
        assert_eq!(report.tables, 4, "{report:?}");
        assert!(report.snapshot.is_some());

        let copy = cluster.client(&target).await.unwrap();
        let (orders, counter, total, max_id) = facts(&copy).await;
        assert_eq!(
            orders, counter,
            "round {round}: orders and counter from different moments"
        );
        assert_eq!(
            total, base_total,
            "round {round}: a transfer was copied half"
        );
        // The copy holds exactly the orders committed before the snapshot (one writer: a prefix).
        let src_count: i64 = src
            .query_one("SELECT count(*) FROM orders WHERE id <= $1", &[&max_id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(orders, src_count, "round {round}");
        assert_eq!(
            orders_checksum(&copy, max_id).await,
            orders_checksum(&src, max_id).await,
            "round {round}: checksums differ"
        );
        println!(
            "round {round}: copied {} rows ({} bytes) in {:?}; {} writer commits during the copy",
            report.rows, report.bytes, report.elapsed, during[round]
        );
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    // The writer kept writing: the live side moved on past the copies.
    let (live_orders, live_counter, live_total, _) = facts(&src).await;
    assert_eq!(live_orders, live_counter);
    assert_eq!(live_total, base_total);
    println!("writer commits during the three copies: {during:?}");
    // Otherwise the test proved nothing about concurrency.
    assert!(
        during.iter().sum::<u64>() > 0,
        "no write happened during any copy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_path_refuses_a_busy_source_and_failures_drop_the_target() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    seeded(&cluster, "tpl").await;
    let db = CopiedDatabase::new(strategy(&cluster, "tpl").with_template(true)).unwrap();
    // A process that is not a client session: a logical walsender streaming from tpl.
    let admin = cluster.client("postgres").await.unwrap();
    cluster
        .client("tpl")
        .await
        .unwrap()
        .batch_execute("SELECT pg_create_logical_replication_slot('tpl_watch', 'test_decoding')")
        .await
        .unwrap();
    let mut walsender = std::process::Command::new(cluster.bin_dir().join("pg_recvlogical"))
        .args([
            "--no-password",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "tpl",
        ])
        .args([
            "-p",
            &cluster.port.to_string(),
            "--slot",
            "tpl_watch",
            "--start",
        ])
        .args(["-f", "/dev/null"])
        .env("PGPASSWORD", &cluster.password)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Waits (bounded) until the number of `kind` processes on tpl satisfies `done`; returns it.
    let backends = |kind: &'static str, done: fn(i64) -> bool| {
        let admin = &admin;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let n: i64 = admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                         WHERE datname = 'tpl' AND backend_type = $1",
                        &[&kind],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if done(n) || Instant::now() > deadline {
                    return n;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(
        backends("walsender", |n| n > 0).await,
        1,
        "pg_recvlogical did not start"
    );
    let busy = cluster.client("tpl").await.unwrap();
    let busy_too = cluster.client("tpl").await.unwrap();
    let err = db
        .copy_database("tpl", "tpl_green")
        .await
        .unwrap_err()
        .to_string();
    println!("{err}");
    // The two client sessions, not the walsender.
    assert!(
        err.contains("has 2 other connection(s) from clients"),
        "{err}"
    );
    drop((busy, busy_too));
    assert_eq!(backends("client backend", |n| n == 0).await, 0);
    // No client left: the copy is tried, and PostgreSQL itself refuses while the walsender is
    // connected; the error says so and nothing is left behind.
    let err = db
        .copy_database("tpl", "tpl_green")
        .await
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(
        err.contains("TEMPLATE tpl") && err.contains("being accessed by other users"),
        "{err}"
    );
    assert!(err.contains("besides clients: walsender (pid "), "{err}");
    let left = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = 'tpl_green'", &[])
        .await
        .unwrap();
    assert!(left.is_none(), "a refused copy left its target behind");
    walsender.kill().unwrap();
    walsender.wait().unwrap();
    assert_eq!(backends("walsender", |n| n == 0).await, 0);
    admin
        .batch_execute("SELECT pg_drop_replication_slot('tpl_watch')")
        .await
        .unwrap();
    // The dropped session may take a moment to leave pg_stat_activity.
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        match db.copy_database("tpl", "tpl_green").await {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline && e.to_string().contains("other connection") => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("template copy failed: {e}"),
        }
    };
    assert!(report.template);
    let copy = cluster.client("tpl_green").await.unwrap();
    assert_eq!(facts(&copy).await.0, 3000);
    drop(copy);

    // A failing pg_dump: an error naming it, and no half-made target left.
    let broken = CopiedDatabase::new(
        strategy(&cluster, "tpl").with_bin_dir(cluster.path().join("no-such-bin")),
    )
    .unwrap();
    let err = broken
        .copy_database("tpl", "tpl_blue")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("pg_dump"), "{err}");
    let admin = cluster.client("postgres").await.unwrap();
    let left = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = 'tpl_blue'", &[])
        .await
        .unwrap();
    assert!(left.is_none(), "a failed copy left its target behind");
    // Bad names are refused before anything runs.
    assert!(broken.copy_database("tpl", "x\";drop").await.is_err());
}

/// `sum(hashtext(t::text))` and `count(*)` of `from` (a table expression such as `ONLY big`).
async fn table_sum(c: &tokio_postgres::Client, from: &str) -> (i64, i64) {
    let r = c
        .query_one(
            &format!("SELECT count(*), coalesce(sum(hashtext(t::text)::bigint), 0)::bigint FROM {from} t"),
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_tables_are_split_by_ctid_and_every_row_is_copied_once() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    seeded(&cluster, "split").await;
    let src = cluster.client("split").await.unwrap();
    // A table of ~10 MB with a dropped column, a generated one, holes left by deletes, rows
    // moved by updates, and an inheritance child (whose rows a range of the parent must not
    // read: ONLY).
    src.batch_execute(
        "CREATE TABLE big (id bigint PRIMARY KEY, gone int, payload text NOT NULL,
                           g int GENERATED ALWAYS AS ((id % 7)::int) STORED);
         INSERT INTO big (id, payload) SELECT g, md5(g::text) || md5((g * 3)::text)
           FROM generate_series(1, 100000) g;
         ALTER TABLE big DROP COLUMN gone;
         DELETE FROM big WHERE id % 10 = 0;
         UPDATE big SET payload = 'moved ' || id WHERE id % 97 = 0;
         CREATE TABLE big_child (extra int) INHERITS (big);
         INSERT INTO big_child (id, payload, extra) SELECT g, 'child ' || g, g
           FROM generate_series(200001, 201000) g;",
    )
    .await
    .unwrap();
    // On its own: VACUUM cannot run in a multi-statement query's implicit transaction.
    src.batch_execute("VACUUM ANALYZE big").await.unwrap();
    let db = CopiedDatabase::new(
        strategy(&cluster, "split")
            .with_workers(3)
            .with_split_table_bytes(1024 * 1024)
            .with_maintenance_work_mem_mb(32),
    )
    .unwrap();
    let report = db.copy_database("split", "split_copy").await.unwrap();
    println!("{report:?}");
    assert_eq!(report.tables, 6, "{report:?}");
    assert_eq!(report.split_tables, 1, "only big is over 1 MiB: {report:?}");
    let big_bytes: i64 = src
        .query_one("SELECT pg_relation_size('big')", &[])
        .await
        .unwrap()
        .get(0);
    let ranges = (big_bytes as usize).div_ceil(1024 * 1024).max(3);
    assert_eq!(report.chunks, 5 + ranges, "{report:?}");

    let copy = cluster.client("split_copy").await.unwrap();
    for from in [
        "ONLY big",
        "big",
        "big_child",
        "orders",
        "accounts",
        "counters",
        "extra.\"Mixed Case\"",
    ] {
        let want = table_sum(&src, from).await;
        assert!(want.0 > 0, "{from} is empty on the source");
        assert_eq!(
            table_sum(&copy, from).await,
            want,
            "{from}: count and checksum"
        );
    }
    assert_eq!(
        table_sum(&copy, "ONLY big").await.0,
        90000,
        "every row of big exactly once"
    );
    // The generated column was computed on the target, the primary key holds.
    assert_eq!(
        common::one_i64(&copy, "SELECT count(*) FROM big WHERE g <> id % 7").await,
        0
    );
    assert_eq!(
        common::one_i64(
            &copy,
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'big'::regclass AND contype = 'p'"
        )
        .await,
        1
    );
    // Tables copied whole were loaded with FREEZE: every page all-frozen.
    copy.batch_execute("CREATE EXTENSION pg_visibility")
        .await
        .unwrap();
    let frozen = common::one_i64(
        &copy,
        "SELECT all_frozen FROM pg_visibility_map_summary('orders')",
    )
    .await;
    let heap_pages = common::one_i64(
        &copy,
        "SELECT pg_relation_size('orders') / current_setting('block_size')::bigint",
    )
    .await;
    println!("orders: {heap_pages} pages, {frozen} all-frozen");
    assert!(heap_pages > 0);
    assert_eq!(frozen, heap_pages, "orders not loaded frozen");
}

/// A child process killed (and reaped) on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `pgbench <args> <db>` against the cluster as its superuser, the password in the environment.
fn pgbench(cluster: &Cluster, db: &str, args: &[&str]) -> std::process::Command {
    let mut c = cluster.client_command("pgbench");
    c.args(args).arg(db);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_under_pgbench_writes_keeps_its_balances_equal_to_the_history() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    if !bluegreen_testenv::require(
        cluster.bin_dir().join("pgbench").is_file(),
        &format!("pgbench (in {})", cluster.bin_dir().display()),
    ) {
        return;
    }
    cluster.create_db("pgb").await;
    let init = pgbench(&cluster, "pgb", &["-i", "-q", "-s", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(init.success(), "pgbench -i: {init}");
    let src = cluster.client("pgb").await.unwrap();
    let history = "SELECT count(*) FROM pgbench_history";
    assert_eq!(common::one_i64(&src, history).await, 0);
    // Two clients writing TPC-B-like transactions (each updates an account, a teller and a
    // branch by the same delta and logs it in the history) for at most 60 s.
    let _load = Killed(
        pgbench(&cluster, "pgb", &["-n", "-c", "2", "-j", "2", "-T", "60"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::one_i64(&src, history).await < 100 {
        assert!(Instant::now() < deadline, "pgbench did not write");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // pgbench_accounts (~13 MB) is split into 1 MiB ranges read by two workers.
    let db = CopiedDatabase::new(
        strategy(&cluster, "pgb")
            .with_workers(2)
            .with_split_table_bytes(1024 * 1024),
    )
    .unwrap();
    for round in 0..2 {
        let before = common::one_i64(&src, history).await;
        let target = format!("pgb_copy_{round}");
        let report = db.copy_database("pgb", &target).await.unwrap();
        let after = common::one_i64(&src, history).await;
        assert_eq!(report.split_tables, 1, "{report:?}");
        let copy = cluster.client(&target).await.unwrap();
        let copied = common::one_i64(&copy, history).await;
        println!(
            "round {round}: {} streams in {:?}; history {before} before, {copied} copied, \
             {after} after",
            report.chunks, report.elapsed
        );
        assert!(after > before, "round {round}: no write during the copy");
        assert!(copied >= before && copied <= after, "round {round}");
        let deltas = common::one_i64(
            &copy,
            "SELECT coalesce(sum(delta), 0)::bigint FROM pgbench_history",
        )
        .await;
        for (table, column) in [
            ("pgbench_branches", "bbalance"),
            ("pgbench_tellers", "tbalance"),
            ("pgbench_accounts", "abalance"),
        ] {
            let sum = common::one_i64(
                &copy,
                &format!("SELECT coalesce(sum({column}), 0)::bigint FROM {table}"),
            )
            .await;
            assert_eq!(
                sum, deltas,
                "round {round}: sum({table}.{column}) differs from the history's deltas"
            );
        }
        assert_eq!(
            common::one_i64(&copy, "SELECT count(*) FROM pgbench_accounts").await,
            100_000,
            "round {round}: every account exactly once"
        );
    }
}
