//! The versioned-schema mode of the Shared strategy on a real cluster: old and new releases
//! writing at once through their own views, renamed and retyped columns in sync both ways,
//! rollback, contract, lock_timeout retries under a long transaction, hostile identifiers, and
//! the engine driving it.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bluegreen_core::testkit::Fakes;
use bluegreen_core::{
    DatabaseStrategy, DbBinding, DbContext, Error, Prepared, Release, RunOutcome, Slot, Version,
};
use bluegreen_postgres::{ColumnDef, Operation, SharedConfig, SharedDatabase, VersionedConfig};
use common::{one_i64, Cluster, SEED};
use tokio_postgres::{Client, NoTls};

/// v2 renames `orders.note` to `memo`, makes `amount` (cents, bigint) a numeric of units, and
/// adds `size`, filled for old rows and the old release's inserts.
fn v2_ops() -> Vec<Operation> {
    vec![
        Operation::RenameColumn {
            table: "orders".into(),
            from: "note".into(),
            to: "memo".into(),
        },
        Operation::ChangeType {
            table: "orders".into(),
            column: "amount".into(),
            data_type: "numeric(14,2)".into(),
            up: "amount / 100.0".into(),
            down: "round(amount * 100)::bigint".into(),
        },
        Operation::AddColumn {
            table: "orders".into(),
            column: ColumnDef::new("size", "text")
                .not_null()
                .with_default("'small'"),
            backfill: Some("CASE WHEN amount >= 1000 THEN 'big' ELSE 'small' END".into()),
        },
        Operation::AddIndex {
            table: "orders".into(),
            name: "orders_size".into(),
            columns: vec!["size".into()],
            unique: false,
        },
    ]
}

fn ops_for(v: &Version) -> bluegreen_core::Result<Vec<Operation>> {
    Ok(if v.as_str() == "v2" { v2_ops() } else { vec![] })
}

fn config(cluster: &Cluster) -> SharedConfig {
    SharedConfig::new(cluster.config("app")).with_versioned(
        VersionedConfig::default()
            .with_lock_timeout(Duration::from_millis(200))
            .with_batch_rows(500),
    )
}

/// The strategy of most tests: v2's operations, `config`'s settings.
fn shared(cluster: &Cluster) -> SharedDatabase {
    SharedDatabase::new(config(cluster))
        .unwrap()
        .with_schema_versions(ops_for)
}

/// A strategy that gives up quickly on a lock: 50 ms `lock_timeout` and backoff, `attempts`.
fn impatient<F>(cluster: &Cluster, attempts: u32, ops: F) -> SharedDatabase
where
    F: Fn(&Version) -> bluegreen_core::Result<Vec<Operation>> + Send + Sync + 'static,
{
    SharedDatabase::new(
        SharedConfig::new(cluster.config("app")).with_versioned(
            VersionedConfig::default()
                .with_lock_timeout(Duration::from_millis(50))
                .with_max_backoff(Duration::from_millis(50))
                .with_lock_attempts(attempts),
        ),
    )
    .unwrap()
    .with_schema_versions(ops)
}

fn ctx(version: &str, live: Option<Slot>, target: Slot) -> DbContext {
    DbContext {
        live,
        target,
        release: Release::new(version, "app").unwrap(),
    }
}

/// Connects the way a release would: with the `DATABASE_URL` of its binding.
async fn connect_as(binding: &DbBinding) -> Client {
    let url = binding.secret_env["DATABASE_URL"].expose().to_string();
    connect_url(&url).await
}

async fn connect_url(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

async fn columns(c: &Client, table: &str) -> Vec<String> {
    c.query(
        "SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = $1::text::regclass
           AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn schema_exists(c: &Client, s: &str) -> bool {
    c.query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&s])
        .await
        .unwrap()
        .is_some()
}

async fn triggers_on(c: &Client, table: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::text::regclass AND NOT tgisinternal",
        &[&table],
    )
    .await
    .unwrap()
    .get(0)
}

/// The common seed without its `order_totals` view (which uses `orders.amount`, which v2
/// replaces: see the first test for what happens with it).
async fn seeded(cluster: &Cluster) -> Client {
    let c = seeded_with_view(cluster).await;
    c.batch_execute("DROP VIEW order_totals").await.unwrap();
    c
}

async fn seeded_with_view(cluster: &Cluster) -> Client {
    cluster.create_db("app").await;
    let c = cluster.client("app").await.unwrap();
    c.batch_execute(SEED).await.unwrap();
    c
}

/// Deploys v1 (no operations) then expands v2; returns (v1 client, v2 client).
async fn v1_then_v2(db: &SharedDatabase) -> (Client, Client, Prepared) {
    let p1 = db.prepare(&ctx("v1", None, Slot::Blue)).await.unwrap();
    let old = connect_as(&p1.binding).await;
    let p2 = db
        .prepare(&ctx("v2", Some(Slot::Blue), Slot::Green))
        .await
        .unwrap();
    assert!(p2.step.is_reversible(), "{:?}", p2.step);
    assert!(
        p2.step.summary.contains("expanded schema version v2"),
        "{:?}",
        p2.step
    );
    assert_eq!(
        p2.binding.env["PGOPTIONS"],
        "-c search_path=\"public_v2\",\"public\""
    );
    let new = connect_as(&p2.binding).await;
    (old, new, p2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_and_new_releases_write_at_once_and_see_the_same_data_then_contract() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let admin = seeded_with_view(&cluster).await;
    let before = one_i64(&admin, "SELECT sum(amount)::bigint FROM orders").await;
    let db = shared(&cluster);
    // A view of the application's uses `amount`, which v2 replaces: the contract could not drop
    // it, so v2 is refused before anything runs, naming the view.
    db.prepare(&ctx("v1", None, Slot::Blue)).await.unwrap();
    let err = db
        .prepare(&ctx("v2", Some(Slot::Blue), Slot::Green))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("public.order_totals") && msg.contains("orders.amount"),
        "{msg}"
    );
    assert!(!schema_exists(&admin, "public_v2").await);
    assert_eq!(
        columns(&admin, "public.orders").await,
        ["id", "account", "amount", "note"]
    );
    admin.batch_execute("DROP VIEW order_totals").await.unwrap();
    let (old, new, _) = v1_then_v2(&db).await;

    // Each release sees its own names; the old one's queries are unchanged.
    assert_eq!(
        one_i64(&old, "SELECT sum(amount)::bigint FROM orders").await,
        before
    );
    old.query("SELECT id, account, amount, note FROM orders LIMIT 1", &[])
        .await
        .unwrap();
    assert!(old.query("SELECT memo FROM orders", &[]).await.is_err());
    assert!(new.query("SELECT note FROM orders", &[]).await.is_err());
    // The backfill filled every old row in both new columns.
    let r = new
        .query_one(
            "SELECT sum(amount)::float8, count(*) FILTER (WHERE size IS NULL),
                    count(*) FILTER (WHERE size = 'big')
             FROM orders",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, f64>(0), before as f64 / 100.0);
    assert_eq!(r.get::<_, i64>(1), 0);
    assert_eq!(
        r.get::<_, i64>(2),
        one_i64(&admin, "SELECT count(*) FROM orders WHERE amount >= 1000").await
    );

    // Both write at once for a while: inserts and updates, each through its own view.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = |c: Client, who: &'static str, stop: Arc<AtomicBool>| {
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 5000 {
                n += 1;
                let sql = if who == "old" {
                    format!(
                        "INSERT INTO orders (account, amount, note) VALUES ({a}, {n}01, 'old-{n}');
                         UPDATE orders SET amount = amount + 100, note = 'old-touched'
                           WHERE id = (SELECT min(id) FROM orders WHERE note LIKE 'new-%');",
                        a = 1 + n % 100
                    )
                } else {
                    format!(
                        "INSERT INTO orders (account, amount, memo, size) VALUES ({a}, {n}.25, 'new-{n}', 'big');
                         UPDATE orders SET memo = 'new-touched', amount = amount + 1
                           WHERE id = (SELECT max(id) FROM orders WHERE memo LIKE 'old-%');",
                        a = 1 + n % 100
                    )
                };
                c.batch_execute(&sql).await.unwrap();
            }
            n
        })
    };
    let (wo, wn) = (
        writer(old, "old", stop.clone()),
        writer(new, "new", stop.clone()),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let (no, nn) = (wo.await.unwrap(), wn.await.unwrap());
    println!("old release wrote {no} rounds, new release {nn}, at once");
    assert!(no > 5 && nn > 5, "both must have written: {no} {nn}");

    // Every row agrees through both views: amount in cents vs units, note vs memo.
    let mismatched = one_i64(
        &admin,
        "SELECT count(*) FROM public_v2.orders n JOIN public.orders o USING (id)
         WHERE o.amount <> round(n.amount * 100)::bigint OR o.note IS DISTINCT FROM n.memo",
    )
    .await;
    assert_eq!(mismatched, 0);
    // Rows of each release seen by the other, with the values converted.
    let old2 = connect_url(
        db.bind(&ctx("v1", None, Slot::Blue))
            .await
            .unwrap()
            .secret_env["DATABASE_URL"]
            .expose(),
    )
    .await;
    let new2 = connect_as(
        &db.bind(&ctx("v2", Some(Slot::Blue), Slot::Green))
            .await
            .unwrap(),
    )
    .await;
    old2.batch_execute("INSERT INTO orders (account, amount, note) VALUES (1, 101, 'mark-old')")
        .await
        .unwrap();
    new2.batch_execute("INSERT INTO orders (account, amount, memo) VALUES (1, 1.25, 'mark-new')")
        .await
        .unwrap();
    let r = new2
        .query_one(
            "SELECT amount::text, size FROM orders WHERE memo = 'mark-old'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "1.01");
    assert_eq!(
        r.get::<_, String>(1),
        "small",
        "the old release's insert is filled by the backfill expression"
    );
    let r = old2
        .query_one("SELECT amount FROM orders WHERE note = 'mark-new'", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 125);
    assert!(
        one_i64(
            &old2,
            "SELECT count(*) FROM orders WHERE note = 'new-touched'"
        )
        .await
            > 0
    );
    assert!(
        one_i64(
            &new2,
            "SELECT count(*) FROM orders WHERE memo = 'old-touched'"
        )
        .await
            > 0
    );
    assert_eq!(
        one_i64(&admin, "SELECT count(*) FROM orders WHERE size IS NULL").await,
        0
    );

    // A failed redeploy of v2 to the other slot rolls back only what it did: v2's schema, which
    // the live slot uses, stays.
    db.rollback(&ctx("v2", Some(Slot::Green), Slot::Blue))
        .await
        .unwrap();
    assert!(schema_exists(&admin, "public_v2").await);
    assert_eq!(
        one_i64(&new2, "SELECT count(*) FROM orders WHERE memo = 'mark-new'").await,
        1
    );

    // A third version cannot start while v2 is expanded: cleanup first, says the error.
    let err = db
        .prepare(&ctx("v3", Some(Slot::Green), Slot::Blue))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("run `cleanup` first"), "{err}");
    assert!(!schema_exists(&admin, "public_v3").await);

    // Contract (cleanup, once v1 is gone): irreversible, the physical table becomes v2's.
    let counts = one_i64(&admin, "SELECT count(*) FROM orders").await;
    let step = db
        .finalize(&ctx("v2", Some(Slot::Green), Slot::Green))
        .await
        .unwrap();
    assert!(!step.is_reversible(), "{step:?}");
    assert!(
        step.summary.contains("contracted schema version v2"),
        "{step:?}"
    );
    assert_eq!(
        columns(&admin, "public.orders").await,
        ["id", "account", "memo", "amount", "size"]
    );
    assert!(!schema_exists(&admin, "public_v1").await);
    assert_eq!(triggers_on(&admin, "public.orders").await, 0);
    let r = admin
        .query_one(
            "SELECT format_type(atttypid, atttypmod), attnotnull FROM pg_attribute
             WHERE attrelid = 'public.orders'::regclass AND attname = $1",
            &[&"amount"],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "numeric(14,2)");
    assert!(r.get::<_, bool>(1), "amount keeps NOT NULL");
    assert!(
        one_i64(
            &admin,
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'public.orders'::regclass
               AND attname = 'size' AND attnotnull"
        )
        .await
            == 1
    );
    // The live release goes on through its views, nothing lost.
    assert_eq!(one_i64(&new2, "SELECT count(*) FROM orders").await, counts);
    new2.batch_execute("INSERT INTO orders (account, amount, memo) VALUES (1, 2.5, 'after')")
        .await
        .unwrap();
    assert_eq!(
        one_i64(
            &new2,
            "SELECT count(*) FROM orders WHERE size = 'small' AND memo = 'after'"
        )
        .await,
        1
    );
    // Again: nothing to do. v1, contracted away, is refused rather than broken.
    let step = db
        .finalize(&ctx("v2", Some(Slot::Green), Slot::Green))
        .await
        .unwrap();
    assert!(step.is_reversible(), "{step:?}");
    let err = db
        .prepare(&ctx("v1", Some(Slot::Green), Slot::Blue))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("contracted away"), "{err}");
    // The next release expands from v2's schema.
    db.prepare(&ctx("v3", Some(Slot::Green), Slot::Blue))
        .await
        .unwrap();
    assert!(schema_exists(&admin, "public_v3").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_mid_deploy_drops_the_new_version_and_leaves_the_old_release_as_it_was() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let admin = seeded(&cluster).await;
    let original = columns(&admin, "public.orders").await;
    let db = shared(&cluster);
    let (old, new, _) = v1_then_v2(&db).await;
    new.batch_execute("INSERT INTO orders (account, amount, memo) VALUES (1, 9.99, 'by-v2')")
        .await
        .unwrap();
    old.batch_execute("INSERT INTO orders (account, amount, note) VALUES (1, 500, 'by-v1')")
        .await
        .unwrap();

    db.rollback(&ctx("v2", Some(Slot::Blue), Slot::Green))
        .await
        .unwrap();
    assert_eq!(columns(&admin, "public.orders").await, original);
    assert!(!schema_exists(&admin, "public_v2").await);
    assert_eq!(triggers_on(&admin, "public.orders").await, 0);
    assert_eq!(
        one_i64(
            &admin,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_size'"
        )
        .await,
        0
    );
    // The old release works as before and keeps every row, the new release's included.
    old.batch_execute("INSERT INTO orders (account, amount, note) VALUES (2, 700, 'after')")
        .await
        .unwrap();
    assert_eq!(
        one_i64(&old, "SELECT amount FROM orders WHERE note = 'by-v2'").await,
        999
    );
    assert_eq!(one_i64(&old, "SELECT count(*) FROM orders").await, 3003);
    // Twice is fine; and v2 can be deployed again from scratch.
    db.rollback(&ctx("v2", Some(Slot::Blue), Slot::Green))
        .await
        .unwrap();
    db.prepare(&ctx("v2", Some(Slot::Blue), Slot::Green))
        .await
        .unwrap();
    assert!(schema_exists(&admin, "public_v2").await);

    // An expand failing half-way (a backfill expression erroring on some rows) says which step
    // failed; the rollback removes what it had done.
    db.rollback(&ctx("v2", Some(Slot::Blue), Slot::Green))
        .await
        .unwrap();
    let failing = SharedDatabase::new(config(&cluster))
        .unwrap()
        .with_schema_versions(|_| {
            Ok(vec![
                Operation::RenameColumn {
                    table: "orders".into(),
                    from: "note".into(),
                    to: "memo".into(),
                },
                Operation::ChangeType {
                    table: "orders".into(),
                    column: "amount".into(),
                    data_type: "int".into(),
                    up: "100 / (amount - 77)".into(),
                    down: "amount".into(),
                },
            ])
        });
    let err = failing
        .prepare(&ctx("v9", Some(Slot::Blue), Slot::Green))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("backfilling orders") && msg.contains("division by zero"),
        "{msg}"
    );
    assert_ne!(columns(&admin, "public.orders").await, original);
    failing
        .rollback(&ctx("v9", Some(Slot::Blue), Slot::Green))
        .await
        .unwrap();
    assert_eq!(columns(&admin, "public.orders").await, original);
    assert_eq!(triggers_on(&admin, "public.orders").await, 0);
    old.batch_execute("INSERT INTO orders (account, amount, note) VALUES (2, 77, 'fine')")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_blocked_by_a_long_transaction_retries_without_blocking_the_app() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let admin = seeded(&cluster).await;
    let lock_timeout = Duration::from_millis(100);
    let long_tx = Duration::from_secs(3);
    let db = SharedDatabase::new(
        SharedConfig::new(cluster.config("app")).with_versioned(
            VersionedConfig::default()
                .with_lock_timeout(lock_timeout)
                .with_max_backoff(Duration::from_millis(300))
                .with_lock_attempts(40),
        ),
    )
    .unwrap()
    .with_schema_versions(ops_for);
    db.prepare(&ctx("v1", None, Slot::Blue)).await.unwrap();

    // A long transaction holds a lock on orders (it read it).
    let holder = cluster.client("app").await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT count(*) FROM orders;")
        .await
        .unwrap();
    // The app reads orders all along.
    let app = cluster.client("app").await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let reader = tokio::spawn(async move {
        let mut lat = Vec::new();
        let mut i = 0i64;
        while !s2.load(Ordering::Relaxed) && lat.len() < 100_000 {
            i += 1;
            let t = Instant::now();
            app.query_one(
                "SELECT amount FROM orders WHERE id = $1",
                &[&(1 + i % 3000)],
            )
            .await
            .unwrap();
            lat.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lat
    });
    let release = tokio::spawn(async move {
        tokio::time::sleep(long_tx).await;
        holder.batch_execute("COMMIT").await.unwrap();
    });
    let started = Instant::now();
    let report = db
        .expand_schema(&Version::new("v2").unwrap())
        .await
        .unwrap();
    let took = started.elapsed();
    release.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut lat = reader.await.unwrap();
    lat.sort();
    let p99 = lat[lat.len() * 99 / 100];
    let max = *lat.last().unwrap();
    println!(
        "expand under a {long_tx:?} transaction: took {took:?}, {} lock retries, longest exclusive \
         {:?} ({}); app: {} queries, p99 {p99:?}, max {max:?} (lock_timeout {lock_timeout:?})",
        report.lock_retries,
        report.longest_exclusive,
        report.longest_exclusive_what,
        lat.len()
    );
    assert!(report.lock_retries >= 1, "{report:?}");
    assert!(
        took >= long_tx,
        "the expand cannot finish before the lock is free"
    );
    let bound = lock_timeout + Duration::from_millis(400);
    assert!(
        p99 < bound,
        "the app's p99 {p99:?} must be bounded by lock_timeout {lock_timeout:?} plus margin, not by \
         the {long_tx:?} transaction"
    );
    assert!(max < long_tx / 2, "an app query waited {max:?}");
    assert_eq!(
        one_i64(&admin, "SELECT count(*) FROM public_v2.orders").await,
        3000
    );

    // Bounded: a transaction that never ends makes the expand give up, saying why.
    db.rollback_schema(&Version::new("v2").unwrap())
        .await
        .unwrap();
    let holder = cluster.client("app").await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT count(*) FROM orders;")
        .await
        .unwrap();
    let impatient = impatient(&cluster, 3, ops_for);
    let err = impatient
        .expand_schema(&Version::new("v2").unwrap())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("3 attempts") && msg.contains("lock_timeout"),
        "{msg}"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    impatient
        .rollback_schema(&Version::new("v2").unwrap())
        .await
        .unwrap();
    assert!(!schema_exists(&admin, "public_v2").await);
    assert_eq!(
        columns(&admin, "public.orders").await,
        ["id", "account", "amount", "note"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_identifiers_are_refused_and_odd_names_are_quoted() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let admin = seeded(&cluster).await;
    for (op, field) in [
        (
            Operation::RenameColumn {
                table: "orders\"; DROP TABLE orders; --".into(),
                from: "note".into(),
                to: "memo".into(),
            },
            "table",
        ),
        (
            Operation::AddColumn {
                table: "orders".into(),
                column: ColumnDef::new("x", "text); DROP TABLE orders; --"),
                backfill: None,
            },
            "type",
        ),
        (
            Operation::AddColumn {
                table: "orders".into(),
                column: ColumnDef::new("x", "text"),
                backfill: Some("1; DROP TABLE orders".into()),
            },
            "backfill",
        ),
        (
            Operation::AddIndex {
                table: "orders".into(),
                name: "i' OR '1".into(),
                columns: vec!["note".into()],
                unique: false,
            },
            "index",
        ),
    ] {
        let db = SharedDatabase::new(config(&cluster))
            .unwrap()
            .with_schema_versions(move |_| Ok(vec![op.clone()]));
        let err = db.prepare(&ctx("v2", None, Slot::Blue)).await.unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput { what, .. } if *what == field),
            "{field}: {err:?}"
        );
    }
    assert!(
        !schema_exists(&admin, "bluegreen").await,
        "refused before anything ran"
    );
    assert_eq!(one_i64(&admin, "SELECT count(*) FROM orders").await, 3000);

    // Names that need quoting (dots, dashes, capitals) work end to end, version included.
    admin
        .batch_execute(
            "CREATE TABLE \"Odd.Table-1\" (\"Key\" int PRIMARY KEY, \"Note-Text\" text);
             INSERT INTO \"Odd.Table-1\" VALUES (1, 'a'), (2, 'b');",
        )
        .await
        .unwrap();
    let db = SharedDatabase::new(config(&cluster))
        .unwrap()
        .with_schema_versions(|_| {
            Ok(vec![
                Operation::RenameColumn {
                    table: "Odd.Table-1".into(),
                    from: "Note-Text".into(),
                    to: "memo.v2".into(),
                },
                Operation::SetNotNull {
                    table: "Odd.Table-1".into(),
                    column: "memo.v2".into(),
                    up: "coalesce(\"Note-Text\", '-')".into(),
                },
            ])
        });
    let p = db
        .prepare(&ctx("v2.0-rc+1", None, Slot::Blue))
        .await
        .unwrap();
    let new = connect_as(&p.binding).await;
    new.batch_execute("INSERT INTO \"Odd.Table-1\" (\"Key\", \"memo.v2\") VALUES (3, 'c')")
        .await
        .unwrap();
    admin
        .batch_execute("INSERT INTO \"Odd.Table-1\" (\"Key\") VALUES (4)")
        .await
        .unwrap();
    let got: Vec<String> = new
        .query("SELECT \"memo.v2\" FROM \"Odd.Table-1\" ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(got, ["-", "a", "b", "c"]);
    db.contract_schema(&Version::new("v2.0-rc+1").unwrap())
        .await
        .unwrap();
    assert_eq!(
        columns(&admin, "public.\"Odd.Table-1\"").await,
        ["Key", "memo.v2"]
    );
    assert_eq!(one_i64(&admin, "SELECT count(*) FROM orders").await, 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_deploys_cleans_up_and_rolls_back_a_schema_version() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let admin = seeded(&cluster).await;
    let original = columns(&admin, "public.orders").await;
    let db = shared(&cluster);
    let fakes = Fakes::new();
    let deployer = fakes
        .deployer_builder()
        .database(Arc::new(db))
        .policy(common::fast_policy())
        .build()
        .unwrap();
    let r = deployer
        .deploy(Release::new("v1", "app").unwrap())
        .await
        .unwrap();
    assert_eq!(r.outcome, RunOutcome::Live, "{r:?}");

    // v2 fails to start: the engine rolls the database back, v1 untouched.
    fakes.fail_next(
        bluegreen_core::testkit::Op::EnvironmentDeploy,
        "image pull failed",
    );
    let err = deployer
        .deploy(Release::new("v2", "app").unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("image pull failed"), "{err}");
    assert_eq!(columns(&admin, "public.orders").await, original);
    assert!(!schema_exists(&admin, "public_v2").await);
    assert_eq!(fakes.live(), Some(Slot::Blue));

    // v2 again: live, each slot started with its own search_path.
    let r = deployer
        .deploy(Release::new("v2", "app").unwrap())
        .await
        .unwrap();
    assert_eq!(r.outcome, RunOutcome::Live, "{r:?}");
    let env = fakes.started_env(Slot::Green).unwrap();
    assert_eq!(env["PGOPTIONS"], "-c search_path=\"public_v2\",\"public\"");
    let new = connect_url(&env["DATABASE_URL"]).await;
    let old = connect_url(&fakes.started_env(Slot::Blue).unwrap()["DATABASE_URL"]).await;
    new.batch_execute("INSERT INTO orders (account, amount, memo) VALUES (1, 1.5, 'v2')")
        .await
        .unwrap();
    assert_eq!(
        one_i64(&old, "SELECT amount FROM orders WHERE note = 'v2'").await,
        150
    );
    assert!(schema_exists(&admin, "public_v2").await);
    assert!(columns(&admin, "public.orders")
        .await
        .contains(&"note".to_string()));

    // cleanup: the old slot goes, then the contract.
    assert_eq!(deployer.cleanup().await.unwrap(), Some(Slot::Blue));
    assert_eq!(
        columns(&admin, "public.orders").await,
        ["id", "account", "memo", "amount", "size"]
    );
    assert_eq!(
        one_i64(
            &new,
            "SELECT round(amount * 100)::bigint FROM orders WHERE memo = 'v2'"
        )
        .await,
        150
    );
}

async fn state_of(c: &Client, version: &str) -> Option<String> {
    c.query_opt(
        "SELECT state FROM bluegreen.schema_versions WHERE version = $1",
        &[&version],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_expand_or_contract_is_completed_or_rolled_back_from_the_state_table() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let admin = seeded(&cluster).await;
    let original = columns(&admin, "public.orders").await;
    let ops = |v: &Version| -> bluegreen_core::Result<Vec<Operation>> {
        Ok(match v.as_str() {
            "v2" => v2_ops(),
            // Fails in its backfill (id 77 exists): left `expanding`.
            "v3" => vec![Operation::ChangeType {
                table: "orders".into(),
                column: "account".into(),
                data_type: "bigint".into(),
                up: "100 / (id - 77)".into(),
                down: "account::int".into(),
            }],
            "v4" => vec![Operation::AddColumn {
                table: "orders".into(),
                column: ColumnDef::new("tag", "text"),
                backfill: None,
            }],
            _ => vec![],
        })
    };
    let db = SharedDatabase::new(config(&cluster))
        .unwrap()
        .with_schema_versions(ops);
    db.prepare(&ctx("v1", None, Slot::Blue)).await.unwrap();

    // An expand that gave up half-way (a long transaction outlasted its attempts) is recorded as
    // `expanding`; preparing the same release again completes it.
    let holder = cluster.client("app").await.unwrap();
    let impatient = impatient(&cluster, 2, ops);
    // Its first ALTER TABLE cannot get its lock while the holder reads orders.
    holder
        .batch_execute("BEGIN; SELECT count(*) FROM orders;")
        .await
        .unwrap();
    impatient
        .prepare(&ctx("v2", Some(Slot::Blue), Slot::Green))
        .await
        .unwrap_err();
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(state_of(&admin, "v2").await.as_deref(), Some("expanding"));
    let p = db
        .prepare(&ctx("v2", Some(Slot::Blue), Slot::Green))
        .await
        .unwrap();
    assert_eq!(state_of(&admin, "v2").await.as_deref(), Some("expanded"));
    let new = connect_as(&p.binding).await;
    assert_eq!(
        one_i64(&new, "SELECT count(*) FROM orders WHERE memo IS NOT NULL").await,
        3000
    );

    // A contract interrupted after its first statement (the old views dropped) is refused as
    // a base for the next version, and finished by the next finalize.
    admin
        .batch_execute(
            "UPDATE bluegreen.schema_versions SET state = 'contracting' WHERE version = 'v2';
             DROP SCHEMA public_v1 CASCADE;",
        )
        .await
        .unwrap();
    let err = db
        .prepare(&ctx("v3", Some(Slot::Green), Slot::Blue))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cleanup"), "{err}");
    let step = db
        .finalize(&ctx("v2", Some(Slot::Green), Slot::Green))
        .await
        .unwrap();
    assert!(!step.is_reversible());
    assert_eq!(state_of(&admin, "v2").await.as_deref(), Some("complete"));
    assert_eq!(
        columns(&admin, "public.orders").await,
        ["id", "account", "memo", "amount", "size"]
    );

    // v3's expand fails in its backfill: left `expanding`. Deploying v4 instead rolls v3 back
    // first (it never served), then expands v4.
    let err = db
        .prepare(&ctx("v3", Some(Slot::Green), Slot::Blue))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("division by zero"), "{err}");
    assert_eq!(state_of(&admin, "v3").await.as_deref(), Some("expanding"));
    assert_ne!(
        columns(&admin, "public.orders").await,
        ["id", "account", "memo", "amount", "size"]
    );
    db.prepare(&ctx("v4", Some(Slot::Green), Slot::Blue))
        .await
        .unwrap();
    assert_eq!(state_of(&admin, "v3").await, None);
    assert_eq!(
        columns(&admin, "public.orders").await,
        ["id", "account", "memo", "amount", "size", "tag"]
    );
    assert_eq!(triggers_on(&admin, "public.orders").await, 0);
    assert_ne!(original, columns(&admin, "public.orders").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_rollback_keeps_both_schemas_and_cleanup_then_drops_the_abandoned_one() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let admin = seeded(&cluster).await;
    let original = columns(&admin, "public.orders").await;
    let fakes = Fakes::new();
    let deployer = fakes
        .deployer_builder()
        .database(Arc::new(shared(&cluster)))
        .policy(common::fast_policy())
        .build()
        .unwrap();
    for v in ["v1", "v2"] {
        let r = deployer
            .deploy(Release::new(v, "app").unwrap())
            .await
            .unwrap();
        assert_eq!(r.outcome, RunOutcome::Live, "{r:?}");
    }
    // Back to v1 (still warm): its schema was never touched, v2's stays while v2 is warm.
    let r = deployer.rollback().await.unwrap();
    assert_eq!(r.outcome, RunOutcome::Live, "{r:?}");
    assert_eq!(fakes.live(), Some(Slot::Blue));
    let old = connect_url(&fakes.started_env(Slot::Blue).unwrap()["DATABASE_URL"]).await;
    old.batch_execute("INSERT INTO orders (account, amount, note) VALUES (1, 250, 'after')")
        .await
        .unwrap();
    assert!(schema_exists(&admin, "public_v2").await);
    assert_eq!(state_of(&admin, "v2").await.as_deref(), Some("expanded"));

    // cleanup removes v2's slot, then drops its schema version instead of contracting it.
    assert_eq!(deployer.cleanup().await.unwrap(), Some(Slot::Green));
    assert_eq!(state_of(&admin, "v2").await, None);
    assert!(!schema_exists(&admin, "public_v2").await);
    assert_eq!(columns(&admin, "public.orders").await, original);
    assert_eq!(
        one_i64(&old, "SELECT count(*) FROM orders WHERE note = 'after'").await,
        1
    );
}
