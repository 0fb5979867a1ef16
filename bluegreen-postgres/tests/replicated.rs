//! The Replicated strategy on real clusters: logical replication, a zero-loss cutover under a
//! concurrent writer, and the refusals.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bluegreen_core::testkit::{database_suite, DatabaseSuite};
use bluegreen_core::{DatabaseStrategy, DbContext, Prepared, Release, Slot};
use bluegreen_postgres::{AfterCutover, PostgresConfig, ReplicatedConfig, ReplicatedDatabase};
use common::{facts, one_i64, Cluster, SEED};
use tokio_postgres::Client;

async fn seeded(cluster: &Cluster, db: &str) -> Client {
    cluster.create_db(db).await;
    let c = cluster.client(db).await.unwrap();
    c.batch_execute(SEED).await.unwrap();
    c
}

fn config(cluster: &Cluster, base: &str) -> ReplicatedConfig {
    ReplicatedConfig::new(cluster.config(base))
        .with_bin_dir(cluster.bin_dir())
        .with_sync_timeout(Duration::from_secs(120))
        .with_lag_bound(Duration::from_secs(60))
}

fn ctx(live: Option<Slot>, target: Slot) -> DbContext {
    DbContext {
        live,
        target,
        release: Release::new("v2", "app").unwrap(),
    }
}

async fn db_exists(admin: &Client, name: &str) -> bool {
    admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap()
        .is_some()
}

/// Replication objects left on the cluster: slots, and publications/subscriptions in `dbs`.
async fn leftovers(cluster: &Cluster, dbs: &[&str]) -> Vec<String> {
    let admin = cluster.client("postgres").await.unwrap();
    let mut out: Vec<String> = admin
        .query("SELECT 'slot ' || slot_name FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for db in dbs {
        if !db_exists(&admin, db).await {
            continue;
        }
        let c = cluster.client(db).await.unwrap();
        for r in c
            .query(
                "SELECT 'publication ' || pubname FROM pg_publication
                 UNION ALL SELECT 'subscription ' || subname FROM pg_subscription
                   WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .unwrap()
        {
            out.push(format!("{db}: {}", r.get::<_, String>(0)));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_passes_the_database_suite_and_cleans_up() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    seeded(&cluster, "app").await;
    let db = ReplicatedDatabase::new(config(&cluster, "app")).unwrap();
    assert_eq!(db.database_of(Slot::Green), "app_green");
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
    database_suite(
        &db,
        &DatabaseSuite {
            release: Release::new("v2", "app").unwrap(),
            live_intact: Some(live_intact),
        },
    )
    .await
    .assert_complete();
    let admin = cluster.client("postgres").await.unwrap();
    assert!(db_exists(&admin, "app_blue").await);
    assert!(
        !db_exists(&admin, "app_green").await,
        "rollback must drop green"
    );
    // No slot (it would keep WAL forever), publication or subscription is left behind.
    assert_eq!(
        leftovers(&cluster, &["app", "app_blue"]).await,
        Vec::<String>::new()
    );
    // The binding names the slot's database; the password only in secret_env.
    let Prepared { binding, .. } = db
        .prepare(&ctx(Some(Slot::Blue), Slot::Green))
        .await
        .unwrap();
    assert_eq!(binding.env["PGDATABASE"], "app_green");
    assert_eq!(binding.secret_env["PGPASSWORD"].expose(), cluster.password);
    assert!(!format!("{db:?} {binding:?}").contains(&cluster.password));
    let st = db
        .status(&ctx(Some(Slot::Blue), Slot::Green))
        .await
        .unwrap();
    assert_eq!((st.tables, st.tables_syncing), (4, 0), "{st:?}");
    assert!(st.confirmed_lsn.is_some(), "{st:?}");
    db.rollback(&ctx(Some(Slot::Blue), Slot::Green))
        .await
        .unwrap();
    assert_eq!(
        leftovers(&cluster, &["app", "app_blue"]).await,
        Vec::<String>::new()
    );
}

/// What the writer task shares with the test.
#[derive(Default)]
struct Writer {
    /// The database writes go to ("the proxy's upstream").
    db: Mutex<String>,
    /// Hold new writes (the proxy's pause).
    paused: AtomicBool,
    /// Incremented each time the writer sees `paused` between writes (nothing in flight).
    idle_acks: AtomicU64,
    stop: AtomicBool,
    /// Every committed write: (database, order id).
    committed: Mutex<Vec<(String, i64)>>,
    failed: AtomicU64,
    /// Pause between writes, in milliseconds.
    think_ms: AtomicU64,
}

impl Writer {
    fn commits(&self) -> usize {
        self.committed.lock().unwrap().len()
    }

    async fn run(self: Arc<Self>, base: PostgresConfig) {
        let mut conn: Option<(String, Client)> = None;
        let mut i = 0u64;
        let deadline = Instant::now() + Duration::from_secs(300);
        while !self.stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            if self.paused.load(Ordering::SeqCst) {
                self.idle_acks.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            let db = self.db.lock().unwrap().clone();
            if conn.as_ref().map(|(d, _)| d != &db).unwrap_or(true) {
                conn = base
                    .clone()
                    .with_dbname(&db)
                    .connect("writer")
                    .await
                    .ok()
                    .map(|c| (db.clone(), c));
            }
            let Some((_, c)) = conn.as_mut() else {
                self.failed.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            i += 1;
            let a = 1 + (i % 100) as i32;
            let b = 1 + ((i * 7 + 3) % 100) as i32;
            let res = async {
                let tx = c.transaction().await?;
                let id: i64 = tx
                    .query_one(
                        "INSERT INTO orders (account, amount, note) VALUES ($1, $2, 'w')
                         RETURNING id",
                        &[&a, &(i as i64)],
                    )
                    .await?
                    .get(0);
                tx.execute("UPDATE counters SET n = n + 1 WHERE name = 'orders'", &[])
                    .await?;
                tx.execute(
                    "UPDATE accounts SET balance = balance - 1 WHERE id = $1",
                    &[&a],
                )
                .await?;
                tx.execute(
                    "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                    &[&b],
                )
                .await?;
                tx.commit().await?;
                Ok::<_, tokio_postgres::Error>(id)
            }
            .await;
            let think = self.think_ms.load(Ordering::SeqCst);
            if think > 0 {
                tokio::time::sleep(Duration::from_millis(think)).await;
            }
            match res {
                Ok(id) => self.committed.lock().unwrap().push((db, id)),
                Err(_) => {
                    // Not committed, so not a lost write: a failed request the client sees.
                    self.failed.fetch_add(1, Ordering::SeqCst);
                    conn = None;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
}

async fn ids(c: &Client) -> BTreeSet<i64> {
    c.query("SELECT id FROM orders", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn wait_commits(w: &Writer, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while w.commits() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(w.commits() >= n, "the writer is stuck at {}", w.commits());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_under_a_concurrent_writer_loses_no_committed_write() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    seeded(&cluster, "live_green").await;
    let db = ReplicatedDatabase::new(
        config(&cluster, "live")
            .with_after_cutover(AfterCutover::Reverse)
            .with_drop_old_on_finalize(false),
    )
    .unwrap();
    // A second deploy: green (`live_green`) is live, blue is the target.
    let c = ctx(Some(Slot::Green), Slot::Blue);
    let target = db.database_of(Slot::Blue);

    let w = Arc::new(Writer::default());
    *w.db.lock().unwrap() = "live_green".into();
    let task = tokio::spawn(w.clone().run(cluster.config("live_green")));
    // A client that ignores the pause and keeps writing to the old side: the freeze makes its
    // late writes fail instead of being lost.
    let rogue = Arc::new(Writer::default());
    // A stray client, not a flood: one write every few milliseconds.
    rogue.think_ms.store(3, Ordering::SeqCst);
    *rogue.db.lock().unwrap() = "live_green".into();
    let rogue_task = tokio::spawn(rogue.clone().run(cluster.config("live_green")));
    wait_commits(&w, 20).await;
    wait_commits(&rogue, 20).await;

    // The initial copy and the streaming happen while the writer writes.
    let before_prepare = w.commits();
    let Prepared { binding, step, .. } = db.prepare(&c).await.unwrap();
    println!("{}", step.summary);
    assert_eq!(binding.env["PGDATABASE"], target);
    wait_commits(&w, w.commits() + 100).await;
    assert!(w.commits() > before_prepare + 100);
    let st = db.status(&c).await.unwrap();
    println!("replication status before the cutover: {st:?}");

    // The cutover, as the engine runs it: pause (drain in-flight writes), before_switch, switch,
    // resume.
    let t0 = Instant::now();
    let acks = w.idle_acks.load(Ordering::SeqCst);
    w.paused.store(true, Ordering::SeqCst);
    while w.idle_acks.load(Ordering::SeqCst) <= acks {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let at_pause = w.commits();
    let step = db.before_switch(&c).await.unwrap();
    *w.db.lock().unwrap() = target.clone();
    w.paused.store(false, Ordering::SeqCst);
    let window = t0.elapsed();
    println!("before_switch: {}", step.summary);
    println!(
        "write-pause window: {window:?} (pause, drain, catch-up, sequences, reverse, switch); \
         goal < 1 s"
    );
    db.after_switch(&c).await.unwrap();
    wait_commits(&w, at_pause + 200).await;
    w.stop.store(true, Ordering::SeqCst);
    rogue.stop.store(true, Ordering::SeqCst);
    task.await.unwrap();
    rogue_task.await.unwrap();
    let rogue_committed = rogue.committed.lock().unwrap().clone();
    println!(
        "rogue writer: {} committed, {} failed (refused by the freeze)",
        rogue_committed.len(),
        rogue.failed.load(Ordering::SeqCst)
    );
    assert!(
        rogue.failed.load(Ordering::SeqCst) > 0,
        "the freeze never refused a write"
    );

    let mut committed = w.committed.lock().unwrap().clone();
    let on_old = committed.iter().filter(|(d, _)| d == "live_green").count();
    let on_new = committed.iter().filter(|(d, _)| *d == target).count();
    println!(
        "writer: {} committed ({on_old} on the old side, {on_new} on the new side), {} failed",
        committed.len(),
        w.failed.load(Ordering::SeqCst)
    );
    assert_eq!(
        on_old, at_pause,
        "a write reached the old side after the pause"
    );
    assert!(on_new >= 200);
    committed.extend(rogue_committed);

    // Every committed write is on the new side: 0 lost, and no id handed out twice.
    let new = cluster.client(&target).await.unwrap();
    let present = ids(&new).await;
    let lost: Vec<i64> = committed
        .iter()
        .filter(|(_, id)| !present.contains(id))
        .map(|(_, id)| *id)
        .collect();
    println!("lost writes: {}", lost.len());
    assert!(lost.is_empty(), "lost committed writes: {lost:?}");
    let unique: BTreeSet<i64> = committed.iter().map(|(_, id)| *id).collect();
    assert_eq!(unique.len(), committed.len(), "a sequence value was reused");
    // Whole transactions, consistent: counter = orders, money neither created nor destroyed.
    let (orders, counter, total, _) = facts(&new).await;
    assert_eq!(orders, counter);
    assert_eq!(total, 100 * 1000);
    assert_eq!(orders as usize, 3000 + committed.len());

    // Reversed: the old side follows the new one (for a rollback after the switch) and is
    // read-only for anyone else.
    let old = cluster.client("live_green").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ids(&old).await != present && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ids(&old).await, present, "the old side did not follow");
    let err = old
        .execute("INSERT INTO orders (account, amount) VALUES (1, 1)", &[])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("read-only") || format!("{err:?}").contains("read-only"));

    // finalize stops the reverse replication and leaves nothing behind.
    let step = db.finalize(&c).await.unwrap();
    println!("finalize: {}", step.summary);
    assert!(!step.is_reversible(), "{step:?}");
    assert!(
        step.summary
            .contains("stopped the replication into live_green; it no longer follows")
            && step
                .summary
                .contains("live_green kept (drop_old_on_finalize is off)"),
        "{step:?}"
    );
    let before = one_i64(&old, "SELECT count(*) FROM orders").await;
    new.execute("INSERT INTO orders (account, amount) VALUES (1, 1)", &[])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(one_i64(&old, "SELECT count(*) FROM orders").await, before);
    assert_eq!(
        leftovers(&cluster, &["live_green", &target]).await,
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_that_never_converges_fails_the_cutover_and_leaves_live_writable() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let src = seeded(&cluster, "lag").await;
    let db = ReplicatedDatabase::new(
        config(&cluster, "lag")
            .with_lag_bound(Duration::from_millis(1500))
            .with_after_cutover(AfterCutover::Drop),
    )
    .unwrap();
    let c = ctx(None, Slot::Green);
    db.prepare(&c).await.unwrap();

    // Block the apply worker on the target with a lock, then write on the source.
    let mut blocker = cluster.client("lag_green").await.unwrap();
    let tx = blocker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    src.execute("INSERT INTO orders (account, amount) VALUES (1, 42)", &[])
        .await
        .unwrap();
    let started = Instant::now();
    let err = db.before_switch(&c).await.unwrap_err().to_string();
    println!("{err}");
    assert!(err.contains("did not catch up within"), "{err}");
    assert!(err.contains("bytes behind"), "{err}");
    assert!(err.contains("accepts writes again"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(!err.contains(&cluster.password));
    // The live side is untouched and writable, also for new sessions.
    let fresh = cluster.client("lag").await.unwrap();
    fresh
        .execute("INSERT INTO orders (account, amount) VALUES (2, 43)", &[])
        .await
        .unwrap();

    // A table created on the source after prepare (DDL is not replicated) is named, and nothing
    // is switched.
    fresh
        .batch_execute("CREATE TABLE late (id int PRIMARY KEY)")
        .await
        .unwrap();
    let err = db.before_switch(&c).await.unwrap_err().to_string();
    assert!(
        err.contains("\"public\".\"late\"") && err.contains("not replicated"),
        "{err}"
    );
    fresh.batch_execute("DROP TABLE late").await.unwrap();

    // Once the blocker goes, the same cutover succeeds with every write (a generous bound here:
    // the machine may be loaded).
    tx.rollback().await.unwrap();
    let db = ReplicatedDatabase::new(
        config(&cluster, "lag")
            .with_lag_bound(Duration::from_secs(60))
            .with_after_cutover(AfterCutover::Drop),
    )
    .unwrap();
    let step = db.before_switch(&c).await.unwrap();
    println!("{}", step.summary);
    // The cutover ended the live database's sessions (src among them).
    let live_ids = ids(&cluster.client("lag").await.unwrap()).await;
    let tgt = cluster.client("lag_green").await.unwrap();
    assert_eq!(ids(&tgt).await, live_ids);
    // A repeated prepare after the cutover (a resumed run) never recreates the database.
    tgt.execute("INSERT INTO orders (account, amount) VALUES (4, 45)", &[])
        .await
        .unwrap();
    let Prepared { step: again, .. } = db.prepare(&c).await.unwrap();
    assert!(again.summary.contains("already cut over"), "{again:?}");
    assert_eq!(ids(&tgt).await.len(), live_ids.len() + 1);
    // Dropped, not reversed: nothing left on the cluster.
    assert_eq!(
        leftovers(&cluster, &["lag", "lag_green"]).await,
        Vec::<String>::new()
    );
    // A rollback after the cutover keeps the target (it may hold writes) and unfreezes live.
    db.rollback(&c).await.unwrap();
    let admin = cluster.client("postgres").await.unwrap();
    assert!(!db_exists(&admin, "lag_green").await);
    let kept = one_i64(
        &admin,
        "SELECT count(*) FROM pg_database WHERE datname LIKE 'lag\\_green\\_rolled\\_back\\_%'",
    )
    .await;
    assert_eq!(kept, 1, "the switched target must be kept, renamed");
    cluster
        .client("lag")
        .await
        .unwrap()
        .execute("INSERT INTO orders (account, amount) VALUES (3, 44)", &[])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_tables_without_replica_identity_and_missing_privileges_creating_nothing() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let src = seeded(&cluster, "nopk").await;
    src.batch_execute(
        "CREATE TABLE logs (line text); INSERT INTO logs VALUES ('a');
         CREATE ROLE deployer LOGIN PASSWORD 'deployer-secret';",
    )
    .await
    .unwrap();
    let db = ReplicatedDatabase::new(config(&cluster, "nopk")).unwrap();
    let c = ctx(None, Slot::Blue);
    let err = db.prepare(&c).await.unwrap_err().to_string();
    println!("{err}");
    assert!(err.contains("public.logs"), "{err}");
    assert!(err.contains("replica identity"), "{err}");
    assert!(err.contains("REPLICA IDENTITY FULL"), "{err}");
    let admin = cluster.client("postgres").await.unwrap();
    assert!(!db_exists(&admin, "nopk_blue").await);
    assert_eq!(leftovers(&cluster, &["nopk"]).await, Vec::<String>::new());

    // A user without the REPLICATION attribute who owns nothing: every missing privilege named.
    let weak = ReplicatedDatabase::new(
        ReplicatedConfig::new(
            PostgresConfig::new("127.0.0.1", cluster.port, "nopk")
                .with_user("deployer")
                .with_password("deployer-secret"),
        )
        .with_target_server(cluster.config("postgres"))
        .with_bin_dir(cluster.bin_dir()),
    )
    .unwrap();
    let err = weak.prepare(&c).await.unwrap_err().to_string();
    println!("{err}");
    assert!(err.contains("lacks privileges"), "{err}");
    assert!(err.contains("REPLICATION"), "{err}");
    assert!(err.contains("ownership of table(s)"), "{err}");
    assert!(!err.contains("deployer-secret"), "{err}");
    assert!(!format!("{weak:?}").contains("deployer-secret"));
    assert!(!db_exists(&admin, "nopk_blue").await);
    // A target user who is not a superuser cannot create the subscription.
    let weak_target = ReplicatedDatabase::new(
        config(&cluster, "nopk").with_target_server(
            PostgresConfig::new("127.0.0.1", cluster.port, "postgres")
                .with_user("deployer")
                .with_password("deployer-secret"),
        ),
    )
    .unwrap();
    src.batch_execute("ALTER TABLE logs REPLICA IDENTITY FULL")
        .await
        .unwrap();
    let err = weak_target.prepare(&c).await.unwrap_err().to_string();
    println!("{err}");
    assert!(
        err.contains("not a superuser") && err.contains("CREATE SUBSCRIPTION"),
        "{err}"
    );
    assert!(!err.contains("deployer-secret"), "{err}");
    assert!(!db_exists(&admin, "nopk_blue").await);
    assert_eq!(leftovers(&cluster, &["nopk"]).await, Vec::<String>::new());

    // The remedy the first error named (REPLICA IDENTITY FULL, above) works.
    db.prepare(&c).await.unwrap();
    let tgt = cluster.client("nopk_blue").await.unwrap();
    assert_eq!(one_i64(&tgt, "SELECT count(*) FROM logs").await, 1);
    db.rollback(&c).await.unwrap();
    assert!(!db_exists(&admin, "nopk_blue").await);
    assert_eq!(leftovers(&cluster, &["nopk"]).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_source_without_wal_level_logical() {
    let Some(cluster) = Cluster::start_with(&["wal_level=replica"]).await else {
        return;
    };
    seeded(&cluster, "plain").await;
    let db = ReplicatedDatabase::new(config(&cluster, "plain")).unwrap();
    let err = db
        .prepare(&ctx(None, Slot::Blue))
        .await
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(err.contains("wal_level is 'replica'"), "{err}");
    assert!(
        err.contains("wal_level = logical") && err.contains("restart"),
        "{err}"
    );
    let admin = cluster.client("postgres").await.unwrap();
    assert!(!db_exists(&admin, "plain_blue").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_two_clusters_a_rollback_after_the_switch_brings_every_write_back() {
    let (a, b) = tokio::join!(Cluster::start(), Cluster::start());
    let (Some(a), Some(b)) = (a, b) else {
        return;
    };
    let src = seeded(&a, "shop_green").await;
    let db = ReplicatedDatabase::new(
        config(&a, "shop")
            .with_target_server(b.config("postgres"))
            .with_after_cutover(AfterCutover::Reverse),
    )
    .unwrap();
    let c = ctx(Some(Slot::Green), Slot::Blue);
    let Prepared { binding, .. } = db.prepare(&c).await.unwrap();
    assert_eq!(binding.env["PGPORT"], b.port.to_string());
    assert_eq!(binding.secret_env["PGPASSWORD"].expose(), b.password);
    // Streaming: a write on the source after the initial copy.
    src.execute("INSERT INTO orders (account, amount) VALUES (1, 7)", &[])
        .await
        .unwrap();
    db.before_switch(&c).await.unwrap();
    db.after_switch(&c).await.unwrap();
    let new = b.client("shop_blue").await.unwrap();
    let old_ids = ids(&a.client("shop_green").await.unwrap()).await;
    assert_eq!(ids(&new).await, old_ids, "the target missed a write");
    // Traffic on the new side, then a rollback straight away.
    for i in 0..50i64 {
        new.execute("INSERT INTO orders (account, amount) VALUES (2, $1)", &[&i])
            .await
            .unwrap();
    }
    let on_new = ids(&new).await;
    assert_eq!(on_new.len(), old_ids.len() + 50);
    drop(new);
    db.rollback(&c).await.unwrap();
    // The old side has every write made on the new side, and takes writes again.
    let old = a.client("shop_green").await.unwrap();
    assert_eq!(
        ids(&old).await,
        on_new,
        "writes made after the switch were lost"
    );
    old.execute("INSERT INTO orders (account, amount) VALUES (3, 9)", &[])
        .await
        .unwrap();
    // The new side is kept (renamed), and no replication object is left on either cluster.
    let admin_b = b.client("postgres").await.unwrap();
    assert!(!db_exists(&admin_b, "shop_blue").await);
    assert_eq!(
        one_i64(
            &admin_b,
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'shop\\_blue\\_rolled\\_back\\_%'"
        )
        .await,
        1
    );
    assert_eq!(leftovers(&a, &["shop_green"]).await, Vec::<String>::new());
    assert_eq!(leftovers(&b, &[]).await, Vec::<String>::new());
}

/// Pids holding the start-up lock on database `db` (sessions still starting) that
/// `pg_stat_activity` does not list yet.
async fn starting_unlisted(admin: &Client, db: &str) -> Vec<i32> {
    admin
        .query(
            "SELECT l.pid FROM pg_locks l
             WHERE l.locktype = 'object' AND l.database = 0
               AND l.classid = 'pg_database'::regclass
               AND l.objid = (SELECT oid FROM pg_database WHERE datname = $1)
               AND l.pid NOT IN (SELECT pid FROM pg_stat_activity)",
            &[&db],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Two writers the freeze used to miss. A client that connected a moment before the freeze: its
/// session read the database's settings (writable) but PostgreSQL lists it in `pg_stat_activity`
/// only once its start-up is over, so ending the listed sessions did not end it, and its write
/// landed on the old side after the cutover (`post_auth_delay` holds it at exactly that point).
/// And a prepared transaction, which any session (read-only ones too) can commit later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_the_freeze_cannot_see_yet_cannot_write_after_the_cutover() {
    let Some(cluster) = Cluster::start_with(&["max_prepared_transactions=2"]).await else {
        return;
    };
    let src = seeded(&cluster, "slow").await;
    let db =
        ReplicatedDatabase::new(config(&cluster, "slow").with_after_cutover(AfterCutover::Drop))
            .unwrap();
    let c = ctx(None, Slot::Green);
    db.prepare(&c).await.unwrap();

    // A prepared transaction: the cutover refuses, naming it, and live takes writes again.
    src.batch_execute(
        "BEGIN; INSERT INTO orders (account, amount) VALUES (1, 99);
         PREPARE TRANSACTION 'pending-order'",
    )
    .await
    .unwrap();
    let err = db.before_switch(&c).await.unwrap_err().to_string();
    println!("{err}");
    assert!(
        err.contains("prepared transaction") && err.contains("'pending-order'"),
        "{err}"
    );
    assert!(err.contains("ROLLBACK PREPARED"), "{err}");
    let fresh = cluster.client("slow").await.unwrap();
    fresh
        .batch_execute("ROLLBACK PREPARED 'pending-order'")
        .await
        .unwrap();
    fresh
        .execute("INSERT INTO orders (account, amount) VALUES (2, 1)", &[])
        .await
        .unwrap();

    // A client whose session sleeps 4 s between reading the settings and being listed.
    let mut late = tokio_postgres::Config::new();
    late.host("127.0.0.1")
        .port(cluster.port)
        .user("postgres")
        .password(cluster.password.as_str())
        .dbname("slow")
        .options("-c post_auth_delay=4");
    let writer = tokio::spawn(async move {
        let (client, conn) = late.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let id: i64 = client
            .query_one(
                "INSERT INTO orders (account, amount, note) VALUES (3, 7, 'late') RETURNING id",
                &[],
            )
            .await?
            .get(0);
        Ok::<_, tokio_postgres::Error>(id)
    });
    let admin = cluster.client("postgres").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while starting_unlisted(&admin, "slow").await.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(starting_unlisted(&admin, "slow").await.len(), 1);
    // Its settings are read just before the sleep begins.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        starting_unlisted(&admin, "slow").await.len(),
        1,
        "still starting, not listed"
    );

    let step = db.before_switch(&c).await.unwrap();
    println!("{}", step.summary);
    let late_write = writer.await.unwrap();
    println!("late writer: {late_write:?}");
    let tgt = cluster.client("slow_green").await.unwrap();
    let on_target = ids(&tgt).await;
    // Refused (ended by the freeze), or committed before the cutover's LSN and so on the target:
    // never committed on the old side only.
    if let Ok(id) = late_write {
        assert!(on_target.contains(&id), "write {id} committed but lost");
    }
    let old = cluster.client("slow").await.unwrap();
    assert_eq!(
        ids(&old).await,
        on_target,
        "the old side has writes the new one lacks"
    );
    db.rollback(&c).await.unwrap();
}

/// `finalize` reports what it did: after a first deploy (no reverse replication was ever set up,
/// and the base database is kept) nothing irreversible happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_after_a_first_deploy_reports_only_what_happened() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    seeded(&cluster, "first").await;
    // The default: reverse the replication at the cutover (there is nothing to reverse into
    // on a first deploy).
    let db = ReplicatedDatabase::new(config(&cluster, "first")).unwrap();
    let c = ctx(None, Slot::Blue);
    db.prepare(&c).await.unwrap();
    let step = db.before_switch(&c).await.unwrap();
    assert!(step.summary.contains("replication dropped"), "{step:?}");
    db.after_switch(&c).await.unwrap();
    let step = db.finalize(&c).await.unwrap();
    println!("finalize: {}", step.summary);
    assert!(step.is_reversible(), "{step:?}");
    assert!(!step.summary.contains("stopped"), "{step:?}");
    assert!(
        step.summary.contains("no replication into first")
            && step
                .summary
                .contains("first kept (the base database is never dropped)"),
        "{step:?}"
    );
    assert_eq!(
        leftovers(&cluster, &["first", "first_blue"]).await,
        Vec::<String>::new()
    );
}
