//! `pg_expand`: on a table of `--rows` rows (default 1M), the longest time a schema change holds
//! a lock that stops the application's queries, in one run on one throw-away cluster:
//!
//! - (a) ours: the versioned-schema expand of `SharedDatabase` for "add a NOT NULL column filled
//!   per row, rename a column, make `amount` a numeric": only additive physical changes, sync
//!   triggers, batched backfill, `NOT VALID` checks validated afterwards;
//! - (b) the naive way, in one transaction: `ALTER TABLE … ADD COLUMN … NOT NULL DEFAULT
//!   clock_timestamp()`, `RENAME COLUMN`, `ALTER COLUMN … TYPE numeric USING …` (table rewrites
//!   under ACCESS EXCLUSIVE);
//! - (c) the naive way with a constant default and a rename only (PostgreSQL 11+ adds such a
//!   column without a rewrite): the best case of the naive way.
//!
//! Two figures per way: the longest statement holding ACCESS EXCLUSIVE (measured around the
//! statement or transaction), and the longest wait of a probe querying the table every
//! millisecond from another connection (what the app sees). Run:
//!
//! ```text
//! cargo run --release -p bluegreen-bench --bin pg_expand -- [--rows 1000000] [--batch 1000]
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bluegreen_core::Version;
use bluegreen_postgres::{
    ColumnDef, Operation, PostgresConfig, SharedConfig, SharedDatabase, VersionedConfig,
};
use bluegreen_testenv::pg::{Cluster, ClusterOptions};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn parse_args() -> Result<(u64, u32)> {
    let (mut rows, mut batch) = (1_000_000u64, 1000u32);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<String> {
            Ok(args.next().ok_or(format!("{name} needs a value"))?)
        };
        match a.as_str() {
            "--rows" => rows = value("--rows")?.parse::<u64>()?.max(1000),
            "--batch" => batch = value("--batch")?.parse::<u32>()?.max(1),
            "-h" | "--help" => {
                println!(
                    "usage: pg_expand [--rows N (default 1000000)] [--batch B (default 1000)]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok((rows, batch))
}

/// Queries `table` every millisecond until stopped; returns the longest query time and count.
async fn probe(
    cfg: PostgresConfig,
    table: &'static str,
    stop: Arc<AtomicBool>,
) -> Result<(Duration, u64)> {
    let c = cfg.connect("probe").await?;
    let (mut worst, mut n) = (Duration::ZERO, 0u64);
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let t = Instant::now();
        c.query_one(
            &format!("SELECT id FROM {table} WHERE id = $1"),
            &[&(1 + (n as i64 * 7919) % 1000)],
        )
        .await?;
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok((worst, n))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let (rows, batch) = parse_args()?;
    let cluster = Cluster::launch(
        ClusterOptions::new()
            .durable()
            .with_settings(&["shared_buffers=256MB", "max_wal_size=4GB"]),
    )?;
    println!(
        "pg_expand: {rows} rows, backfill batches of {batch} (PostgreSQL binaries in {})",
        cluster.bin_dir().display()
    );
    let admin = cluster.config("postgres").connect("bench").await?;
    admin.batch_execute("CREATE DATABASE bench").await?;
    let cfg = cluster.config("bench");
    let c = cfg.connect("bench").await?;
    let t = Instant::now();
    for table in ["orders", "orders_naive", "orders_const"] {
        c.batch_execute(&format!(
            "CREATE TABLE {table} (id bigserial PRIMARY KEY, amount bigint NOT NULL, note text);
             INSERT INTO {table} (amount, note)
               SELECT g, 'note ' || g FROM generate_series(1, {rows}) g;"
        ))
        .await?;
        c.batch_execute(&format!("VACUUM ANALYZE {table}")).await?;
    }
    println!("  generated 3 tables in {:.1?}", t.elapsed());

    // (a) ours.
    let ops = vec![
        Operation::AddColumn {
            table: "orders".into(),
            column: ColumnDef::new("created", "timestamptz").not_null(),
            backfill: Some("clock_timestamp()".into()),
        },
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
    ];
    let db = SharedDatabase::new(
        SharedConfig::new(cfg.clone())
            .with_versioned(VersionedConfig::default().with_batch_rows(batch)),
    )?
    .with_schema_versions(move |v| {
        Ok(if v.as_str() == "v2" {
            ops.clone()
        } else {
            vec![]
        })
    });
    db.expand_schema(&Version::new("v1")?).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let p = tokio::spawn(probe(cfg.clone(), "orders", stop.clone()));
    let t = Instant::now();
    let report = db.expand_schema(&Version::new("v2")?).await?;
    let ours_total = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (ours_probe, ours_n) = p.await??;
    let ours = report.longest_exclusive;
    println!(
        "  (a) ours, expand: longest exclusive lock {ours:.2?} ({}), probe's longest wait \
         {ours_probe:.2?} over {ours_n} queries; whole expand {ours_total:.1?}, {} rows backfilled",
        report.longest_exclusive_what, report.backfilled_rows
    );

    // (b) and (c): the naive ways, each one transaction holding ACCESS EXCLUSIVE throughout.
    let naive = |table: &'static str, sql: String| {
        let cfg = cfg.clone();
        async move {
            let stop = Arc::new(AtomicBool::new(false));
            let p = tokio::spawn(probe(cfg.clone(), table, stop.clone()));
            tokio::time::sleep(Duration::from_millis(50)).await;
            let c = cfg.connect("naive").await?;
            let t = Instant::now();
            c.batch_execute(&sql).await?;
            let took = t.elapsed();
            stop.store(true, Ordering::Relaxed);
            let (worst, n) = p.await??;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((took, worst, n))
        }
    };
    let (b, b_probe, b_n) = naive(
        "orders_naive",
        "BEGIN;
         ALTER TABLE orders_naive ADD COLUMN created timestamptz NOT NULL DEFAULT clock_timestamp();
         ALTER TABLE orders_naive RENAME COLUMN note TO memo;
         ALTER TABLE orders_naive ALTER COLUMN amount TYPE numeric(14,2) USING amount / 100.0;
         COMMIT;"
            .into(),
    )
    .await?;
    println!(
        "  (b) naive ADD COLUMN … NOT NULL DEFAULT clock_timestamp() + RENAME + TYPE: exclusive \
         lock {b:.2?}, probe's longest wait {b_probe:.2?} over {b_n} queries"
    );
    let (cst, c_probe, c_n) = naive(
        "orders_const",
        "BEGIN;
         ALTER TABLE orders_const ADD COLUMN status text NOT NULL DEFAULT 'new';
         ALTER TABLE orders_const RENAME COLUMN note TO memo;
         COMMIT;"
            .into(),
    )
    .await?;
    println!(
        "  (c) naive ADD COLUMN … NOT NULL DEFAULT 'new' + RENAME (no rewrite): exclusive lock \
         {cst:.2?}, probe's longest wait {c_probe:.2?} over {c_n} queries"
    );
    println!();
    println!(
        "longest exclusive lock: ours {ours:.2?} vs naive with rewrite {b:.2?} (x{:.0} shorter); \
         target < 50 ms: {}",
        b.as_secs_f64() / ours.as_secs_f64().max(1e-6),
        if ours < Duration::from_millis(50) {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}
