//! The Shared strategy on a real cluster: expand/contract migrations, recorded once, under an
//! advisory lock.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bluegreen_core::testkit::{database_suite, DatabaseSuite};
use bluegreen_core::{DatabaseStrategy, DbContext, Error, Prepared, Release, Slot};
use bluegreen_postgres::{Migration, MigrationPhase, SharedConfig, SharedDatabase};
use common::{one_i64, Cluster, SEED};
use tokio_postgres::Client;

async fn seeded(cluster: &Cluster, db: &str) -> Client {
    cluster.create_db(db).await;
    let c = cluster.client(db).await.unwrap();
    c.batch_execute(SEED).await.unwrap();
    c
}

async fn column_exists(c: &Client, table: &str, column: &str) -> bool {
    c.query_opt(
        "SELECT 1 FROM information_schema.columns WHERE table_name = $1 AND column_name = $2",
        &[&table, &column],
    )
    .await
    .unwrap()
    .is_some()
}

async fn table_exists(c: &Client, table: &str) -> bool {
    c.query_opt("SELECT to_regclass($1)::text", &[&table])
        .await
        .unwrap()
        .and_then(|r| r.get::<_, Option<String>>(0))
        .is_some()
}

async fn recorded(c: &Client) -> Vec<(String, String)> {
    if !table_exists(c, "public.bluegreen_migrations").await {
        return Vec::new();
    }
    c.query(
        "SELECT name, phase FROM bluegreen_migrations ORDER BY name",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Expand: a new nullable column and a new table. Contract: drop the column the old release used.
fn migrations() -> Vec<Migration> {
    vec![
        Migration::expand(
            "0001_add_status",
            "ALTER TABLE orders ADD COLUMN status text DEFAULT 'new';
             CREATE TABLE audit (id bigserial PRIMARY KEY, what text NOT NULL);",
        ),
        Migration::contract("0002_drop_note", "ALTER TABLE orders DROP COLUMN note;"),
    ]
}

fn ctx(live: Option<Slot>, target: Slot) -> DbContext {
    DbContext {
        live,
        target,
        release: Release::new("v2", "app").unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_passes_the_database_suite_and_contract_waits_for_finalize() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let c = seeded(&cluster, "app").await;
    let db =
        SharedDatabase::new(SharedConfig::new(cluster.config("app")).with_migrations(migrations()))
            .unwrap();

    // Phase by phase: expand in prepare, nothing more until finalize.
    let first = ctx(None, Slot::Blue);
    let Prepared { binding, step, .. } = db.prepare(&first).await.unwrap();
    assert!(step.is_reversible(), "{step:?}");
    assert!(step.summary.contains("0001_add_status"), "{step:?}");
    assert_eq!(binding.env["PGDATABASE"], "app");
    assert_eq!(binding.secret_env["PGPASSWORD"].expose(), cluster.password);
    assert!(!format!("{db:?} {binding:?}").contains(&cluster.password));
    assert!(column_exists(&c, "orders", "status").await);
    assert!(table_exists(&c, "public.audit").await);
    assert!(
        column_exists(&c, "orders", "note").await,
        "a contract migration ran before finalize"
    );
    db.before_switch(&first).await.unwrap();
    db.after_switch(&first).await.unwrap();
    // The old release's query still works after the expand phase and the switch.
    one_i64(&c, "SELECT count(note) FROM orders").await;
    assert!(column_exists(&c, "orders", "note").await);
    // Rollback keeps expand migrations (they are compatible with the old release).
    db.rollback(&first).await.unwrap();
    assert!(column_exists(&c, "orders", "status").await);
    assert_eq!(
        recorded(&c).await,
        vec![("0001_add_status".into(), "expand".into())]
    );

    let step = db.finalize(&first).await.unwrap();
    assert!(
        !step.is_reversible(),
        "a contract migration is irreversible"
    );
    assert!(step.summary.contains("0002_drop_note"), "{step:?}");
    assert!(!column_exists(&c, "orders", "note").await);
    assert_eq!(
        recorded(&c).await,
        vec![
            ("0001_add_status".into(), "expand".into()),
            ("0002_drop_note".into(), "contract".into())
        ]
    );

    // The conformance suite on the migrated database: everything already applied runs nothing.
    let expected = common::facts(&c).await;
    let cfg = cluster.config("app");
    let live_intact: bluegreen_core::testkit::IntactFn = Arc::new(move |_slot| {
        let cfg = cfg.clone();
        Box::pin(async move {
            let c = cfg.connect("t").await.unwrap();
            common::facts(&c).await == expected
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
    let Prepared { step, .. } = db
        .prepare(&ctx(Some(Slot::Blue), Slot::Green))
        .await
        .unwrap();
    assert_eq!(step.summary, "no pending expand migrations");
    assert_eq!(recorded(&c).await.len(), 2, "a migration ran twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expand_refuses_breaking_statements_and_failures_leave_nothing_half_applied() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let c = seeded(&cluster, "app").await;
    let cfg = SharedConfig::new(cluster.config("app"));

    // A breaking statement in an expand migration: refused before anything runs, naming it.
    for (sql, why) in [
        ("ALTER TABLE orders DROP COLUMN note", "DROP COLUMN"),
        ("ALTER TABLE orders RENAME COLUMN note TO memo", "RENAME"),
        (
            "ALTER TABLE orders ALTER COLUMN amount TYPE numeric",
            "TYPE",
        ),
        (
            "ALTER TABLE orders ADD COLUMN must text NOT NULL",
            "NOT NULL",
        ),
        ("DROP TABLE counters", "DROP TABLE"),
    ] {
        let ms = vec![
            Migration::expand("0001_ok", "CREATE TABLE fine (id int PRIMARY KEY);"),
            Migration::expand("0002_bad", format!("CREATE TABLE t2 (id int);\n  {sql};")),
        ];
        let err = SharedDatabase::new(cfg.clone().with_migrations(ms)).unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(sql),
            "the error must name the statement: {msg}"
        );
        assert!(msg.contains(why), "{msg}");
        assert!(msg.contains("0002_bad"), "{msg}");
        assert!(
            msg.contains("contract"),
            "the error must say what to do: {msg}"
        );
    }
    assert!(!table_exists(&c, "public.fine").await);
    assert!(recorded(&c).await.is_empty());
    // The same statement is fine in a contract migration.
    SharedDatabase::new(cfg.clone().with_migration(Migration::contract(
        "0003_drop",
        "ALTER TABLE orders DROP COLUMN note",
    )))
    .unwrap();

    // A migration failing on the server: its transaction is rolled back (the table it created
    // first is gone, nothing recorded); earlier migrations stay applied and recorded.
    let ms = vec![
        Migration::expand("0001_ok", "CREATE TABLE fine (id int PRIMARY KEY);"),
        Migration::expand(
            "0002_fails",
            "CREATE TABLE half (id int); INSERT INTO no_such_table VALUES (1);",
        ),
        Migration::expand("0003_after", "CREATE TABLE after_fail (id int);"),
    ];
    let db = SharedDatabase::new(cfg.clone().with_migrations(ms)).unwrap();
    let err = db.prepare(&ctx(None, Slot::Blue)).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("0002_fails"), "{msg}");
    assert!(msg.contains("no_such_table"), "{msg}");
    assert!(table_exists(&c, "public.fine").await);
    assert!(!table_exists(&c, "public.half").await, "half-applied");
    assert!(!table_exists(&c, "public.after_fail").await);
    assert_eq!(
        recorded(&c).await,
        vec![("0001_ok".into(), "expand".into())]
    );
    // The live data is untouched.
    assert_eq!(one_i64(&c, "SELECT count(*) FROM orders").await, 3000);

    // An applied migration edited afterwards is an error, not silently skipped or re-run.
    let edited = SharedDatabase::new(cfg.clone().with_migration(Migration::expand(
        "0001_ok",
        "CREATE TABLE fine (id bigint PRIMARY KEY);",
    )))
    .unwrap();
    let msg = edited
        .migrate(MigrationPhase::Expand)
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("0001_ok") && msg.contains("changed"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_advisory_lock_serializes_concurrent_deployers_and_each_migration_runs_once() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let c = seeded(&cluster, "app").await;
    c.batch_execute("CREATE TABLE runs (who text, started timestamptz, ended timestamptz)")
        .await
        .unwrap();
    // A slow migration that logs each time it really runs.
    let slow = Migration::expand(
        "0001_slow",
        "INSERT INTO runs VALUES ('m', clock_timestamp(), NULL);
         SELECT pg_sleep(0.7);
         UPDATE runs SET ended = clock_timestamp() WHERE ended IS NULL;
         CREATE TABLE made_once (id int);",
    );
    let open = || {
        SharedDatabase::new(
            SharedConfig::new(cluster.config("app"))
                .with_migration(slow.clone())
                .with_lock_wait(Duration::from_secs(60)),
        )
        .unwrap()
    };
    let (a, b) = (open(), open());
    let (ra, rb) = tokio::join!(
        a.migrate(MigrationPhase::Expand),
        b.migrate(MigrationPhase::Expand)
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    // Exactly one of the two deployers applied it; the other waited and found it recorded.
    let mut applied = [ra.clone(), rb.clone()];
    applied.sort();
    assert_eq!(
        applied,
        [Vec::<String>::new(), vec!["0001_slow".to_string()]],
        "{ra:?} {rb:?}"
    );
    assert_eq!(one_i64(&c, "SELECT count(*) FROM runs").await, 1);
    assert_eq!(recorded(&c).await.len(), 1);

    // While someone else holds the lock, a deployer waits (bounded) and says why it gave up.
    let holder = cluster.client("app").await.unwrap();
    holder
        .execute(
            "SELECT pg_advisory_lock(hashtext($1))",
            &[&"bluegreen-migrations:\"public\".\"bluegreen_migrations\""],
        )
        .await
        .unwrap();
    let impatient = SharedDatabase::new(
        SharedConfig::new(cluster.config("app"))
            .with_migration(Migration::expand(
                "0002_next",
                "CREATE TABLE next (id int);",
            ))
            .with_lock_wait(Duration::from_millis(800)),
    )
    .unwrap();
    let err = impatient.migrate(MigrationPhase::Expand).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("migration lock"), "{err}");
    assert!(err.is_retryable());
    assert!(!table_exists(&c, "public.next").await);
    // Released: the same deployer goes ahead.
    drop(holder);
    let patient = SharedDatabase::new(
        SharedConfig::new(cluster.config("app"))
            .with_migration(Migration::expand(
                "0002_next",
                "CREATE TABLE next (id int);",
            ))
            .with_lock_wait(Duration::from_secs(60)),
    )
    .unwrap();
    assert_eq!(
        patient.migrate(MigrationPhase::Expand).await.unwrap(),
        vec!["0002_next".to_string()]
    );
    assert!(table_exists(&c, "public.next").await);
}

/// The migrations each release ships with, found by its version (as a repository's migrations
/// directory grows release by release).
fn shipped(version: &bluegreen_core::Version) -> bluegreen_core::Result<Vec<Migration>> {
    let mut m = vec![Migration::expand(
        "0001_add_status",
        "ALTER TABLE orders ADD COLUMN status text DEFAULT 'new';",
    )];
    if version.as_str() >= "v2" {
        m.push(Migration::expand(
            "0002_add_customer",
            "ALTER TABLE orders ADD COLUMN customer text;",
        ));
        m.push(Migration::contract(
            "0002_drop_note",
            "ALTER TABLE orders DROP COLUMN note;",
        ));
    }
    if version.as_str() >= "v3" {
        // Breaks v2, which reads `customer`.
        m.push(Migration::expand(
            "0003_rename",
            "ALTER TABLE orders RENAME COLUMN customer TO client;",
        ));
    }
    Ok(m)
}

fn release_ctx(version: &str, live: Option<Slot>, target: Slot) -> DbContext {
    DbContext {
        live,
        target,
        release: Release::new(version, "app").unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shared_strategy_serves_every_release_with_the_migrations_it_ships() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let c = seeded(&cluster, "app").await;
    let db = SharedDatabase::new(SharedConfig::new(cluster.config("app")))
        .unwrap()
        .with_release_migrations(shipped);

    // v1: its one expand migration.
    let v1 = release_ctx("v1", None, Slot::Blue);
    let Prepared { step, .. } = db.prepare(&v1).await.unwrap();
    assert_eq!(step.summary, "applied expand migrations: 0001_add_status");
    assert!(!column_exists(&c, "orders", "customer").await);

    // v2: only its new expand migration runs; the contract one waits for finalize.
    let v2 = release_ctx("v2", Some(Slot::Blue), Slot::Green);
    let Prepared { step, .. } = db.prepare(&v2).await.unwrap();
    assert_eq!(step.summary, "applied expand migrations: 0002_add_customer");
    assert!(column_exists(&c, "orders", "customer").await);
    assert!(column_exists(&c, "orders", "note").await);
    let step = db
        .finalize(&release_ctx("v2", Some(Slot::Green), Slot::Green))
        .await
        .unwrap();
    assert!(!step.is_reversible(), "{step:?}");
    assert!(!column_exists(&c, "orders", "note").await);

    // v3: its expand migration would break v2; refused before anything runs, naming it.
    let err = db
        .prepare(&release_ctx("v3", Some(Slot::Green), Slot::Blue))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("0003_rename") && msg.contains("RENAME"),
        "{msg}"
    );
    assert!(column_exists(&c, "orders", "customer").await);
    assert_eq!(
        recorded(&c).await,
        vec![
            ("0001_add_status".into(), "expand".into()),
            ("0002_add_customer".into(), "expand".into()),
            ("0002_drop_note".into(), "contract".into()),
        ]
    );
    assert_eq!(
        db.name(),
        "postgres shared",
        "name() is the backend of errors"
    );
}
