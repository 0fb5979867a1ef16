//! compose_style: seed 003's runbook (Docker Compose services behind HAProxy, one shared database)
//! as code — Docker containers, the HAProxy runtime API, and a shared PostgreSQL database with
//! expand/contract migrations.
//!
//! ```text
//! PGHOST=127.0.0.1 PGPORT=5432 PGUSER=postgres PGPASSWORD=… \
//!   cargo run --example compose_style --features docker,haproxy,postgres
//! ```
//!
//! Needs the Docker Engine, HAProxy (`apt-get install haproxy`) and a PostgreSQL server given by
//! the standard libpq variables (the example creates and drops its own database there). It builds
//! the demo app into a `FROM scratch` image (no registry), starts HAProxy with the backend snippet
//! `bluegreen-haproxy` renders, and then:
//!
//! 1. deploys v1 (migration 001 creates `orders` with a `legacy_code` column);
//! 2. deploys v2 while clients send requests through HAProxy (0 failed): its *expand* migration
//!    adds `orders.customer`, which v1, still warm on the other slot, simply ignores;
//! 3. runs `cleanup`: the old slot goes away, and only then v2's *contract* migration drops
//!    `legacy_code`, which v1 was still reading;
//! 4. tries v3, whose plain expand migration renames a column the live release reads: refused
//!    before anything runs, naming the statement, live traffic untouched;
//! 5. deploys v4, which makes the same rename as a versioned schema change (`rename_column`): v2,
//!    still warm, and v4 run at once, each through its own `search_path` (`public_v2`,
//!    `public_v4`), each writing rows the other reads under its own column name; `cleanup` then
//!    removes v2 and only then renames the column for real (contract).
//!
//! Outside CI a missing service makes the example print why it skips; in CI it fails.

use std::sync::Arc;
use std::time::Duration;

use bluegreen::haproxy::{HaproxyConfig, HaproxySwitch};
use bluegreen::health::HttpCheck;
use bluegreen::postgres::{Migration, Operation, SharedConfig, SharedDatabase, VersionedConfig};
use bluegreen::{
    DatabaseStrategy, DbContext, Deployer, FileStateStore, HttpVersionProbe, Policy, Release, Slot,
    Version, VersionMarker,
};

mod common;
use common::{live, missing, Load};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::main_or_demo(compose_style)
}

/// The migrations each release ships with, found by its version: one `SharedDatabase` strategy (and one
/// `Deployer`) serves every release.
fn migrations(version: &Version) -> bluegreen::Result<Vec<Migration>> {
    let version = version.as_str();
    let mut m = vec![Migration::expand(
        "001_orders",
        "CREATE TABLE orders (id bigserial PRIMARY KEY, total_cents int NOT NULL, legacy_code text);
         INSERT INTO orders (total_cents, legacy_code) VALUES (1250, 'A-1'), (990, 'A-2');",
    )];
    if version >= "v2" {
        m.push(Migration::expand(
            "002_customer",
            "ALTER TABLE orders ADD COLUMN customer text;",
        ));
        m.push(Migration::contract(
            "002_drop_legacy_code",
            "ALTER TABLE orders DROP COLUMN legacy_code;",
        ));
    }
    if version == "v3" {
        // Breaks v2, which is live and reads `customer`: the expand check refuses it.
        m.push(Migration::expand(
            "003_rename",
            "ALTER TABLE orders RENAME COLUMN customer TO client;",
        ));
    }
    Ok(m)
}

/// The versioned schema changes each release ships: v4 renames `customer` to `client` while v2
/// keeps running with `customer`.
fn schema_changes(version: &Version) -> bluegreen::Result<Vec<Operation>> {
    Ok(match version.as_str() {
        "v4" => vec![Operation::RenameColumn {
            table: "orders".into(),
            from: "customer".into(),
            to: "client".into(),
        }],
        _ => vec![],
    })
}

/// Connects as release `version` would: with the `DATABASE_URL` its binding gives it.
async fn connect_as(
    shared: &SharedDatabase,
    version: &str,
) -> Result<tokio_postgres::Client, Box<dyn std::error::Error>> {
    let binding = shared
        .bind(&DbContext {
            live: None,
            target: Slot::Blue,
            release: Release::new(version, "app")?,
        })
        .await?;
    let url = binding.secret_env["DATABASE_URL"].expose().to_string();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

async fn compose_style() -> Result<(), Box<dyn std::error::Error>> {
    let Some(admin) = common::pg_from_env("postgres") else {
        return missing("a PostgreSQL server (set PGHOST, PGPORT, PGUSER, PGPASSWORD)");
    };
    let dir = tempfile::tempdir()?;
    let project = format!("compose-style-{}", std::process::id());
    let Some(env) = common::docker_env(&project).await? else {
        return Ok(());
    };
    let Some(haproxy) = common::local_haproxy(|sock| {
        HaproxyConfig::unix(sock)
            .with_health_check("/health", Duration::from_millis(200))
            .with_drain_timeout(Duration::from_secs(5))
    })?
    else {
        return missing("HAProxy (apt-get install haproxy)");
    };
    let config = haproxy.config.clone();
    println!(
        "HAProxy on 127.0.0.1:{}, runtime API {}",
        haproxy.port,
        haproxy.admin_sock.display()
    );
    let image = common::demo_image(&env, &format!("bluegreen-demo:{project}")).await?;
    println!("built image {image} (FROM scratch, the demo app and its libraries)");

    // A database of our own on the server, dropped at the end.
    let db = format!("compose_style_{}", std::process::id());
    let admin_client = admin.connect("example").await?;
    admin_client
        .batch_execute(&format!(
            "CREATE DATABASE {}",
            bluegreen::postgres::quote_ident(&db)
        ))
        .await?;
    let shared_db = admin.clone().with_dbname(&db);

    let public = format!("http://127.0.0.1:{}/", haproxy.port);
    let shared = SharedDatabase::new(
        SharedConfig::new(shared_db.clone()).with_versioned(VersionedConfig::default()),
    )?
    .with_release_migrations(migrations)
    .with_schema_versions(schema_changes);
    let d = Deployer::builder()
        .environment(Arc::new(env.clone()))
        .switch(Arc::new(HaproxySwitch::new(config.clone())?))
        .database(Arc::new(shared.clone()))
        .store(Arc::new(FileStateStore::new(dir.path().join("state"))?))
        .health_check(Arc::new(HttpCheck::new("/health")))
        .verify_data_path(Arc::new(HttpVersionProbe::new(
            public.clone(),
            VersionMarker::Header("x-bluegreen-version".into()),
        )))
        .policy(
            Policy::default()
                .with_readiness_timeout(Duration::from_secs(60))
                .with_observation(Duration::from_secs(2), Duration::from_millis(250))
                .with_drain_timeout(Duration::from_secs(5)),
        )
        .build()?;
    let release = |v: &str| Release::new(v, image.clone());
    let columns = || async {
        let c = shared_db.connect("example").await?;
        let rows = c
            .query(
                "SELECT column_name::text FROM information_schema.columns
                 WHERE table_schema = 'public' AND table_name = 'orders'
                 ORDER BY ordinal_position",
                &[],
            )
            .await
            .map_err(|e| bluegreen::Error::backend("example", "reading columns", false, e))?;
        Ok::<Vec<String>, bluegreen::Error>(rows.iter().map(|r| r.get(0)).collect())
    };

    let outcome = async {
        println!("\n1. deploy v1 (expand: 001_orders)");
        let printer = common::print_events(&d);
        live(d.deploy(release("v1")?).await?)?;
        printer.abort();
        println!("   orders columns: {:?}", columns().await?);

        let load = Load::start(public.clone(), 4);
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!(
            "\n2. deploy v2 through HAProxy while clients send requests (expand: 002_customer)"
        );
        let printer = common::print_events(&d);
        live(d.deploy(release("v2")?).await?)?;
        printer.abort();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (counts, failed) = load.finish().await;
        println!("   requests per version: {counts:?}, failed = {failed}");
        println!("   orders columns (v1 still warm): {:?}", columns().await?);
        if failed > 0 {
            return Err(format!("{failed} requests failed during the switch").into());
        }

        println!("\n3. cleanup: remove the old slot, then contract (drop legacy_code)");
        let removed = d.cleanup().await?;
        println!(
            "   removed {removed:?}; orders columns: {:?}",
            columns().await?
        );
        if columns().await?.iter().any(|c| c == "legacy_code") {
            return Err("the contract migration did not run".into());
        }

        println!("\n4. deploy v3, whose expand migration renames a column v2 reads");
        // The check runs when v3's database is prepared, before anything runs for it.
        let refused = match d.deploy(release("v3")?).await {
            Ok(r) => return Err(format!("v3 should have been refused: {r:?}").into()),
            Err(e) => e,
        };
        println!("   refused as expected:\n   {refused}");
        common::expect_live(&d, "v2").await?;

        println!("\n5. deploy v4: the same rename as a versioned schema change, v2 and v4 at once");
        let load = Load::start(public.clone(), 4);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let printer = common::print_events(&d);
        live(d.deploy(release("v4")?).await?)?;
        printer.abort();
        let (counts, failed) = load.finish().await;
        println!("   requests per version: {counts:?}, failed = {failed}");
        if failed > 0 {
            return Err(format!("{failed} requests failed during the switch").into());
        }
        let (v2, v4) = (
            connect_as(&shared, "v2").await?,
            connect_as(&shared, "v4").await?,
        );
        v2.batch_execute(
            "INSERT INTO orders (total_cents, customer) VALUES (500, 'written by v2')",
        )
        .await?;
        v4.batch_execute("INSERT INTO orders (total_cents, client) VALUES (700, 'written by v4')")
            .await?;
        let seen_by_v2: Vec<String> = v2
            .query(
                "SELECT customer FROM orders WHERE customer LIKE 'written%' ORDER BY id",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let seen_by_v4: Vec<String> = v4
            .query(
                "SELECT client FROM orders WHERE client LIKE 'written%' ORDER BY id",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        println!("   v2 reads orders.customer: {seen_by_v2:?}");
        println!("   v4 reads orders.client:   {seen_by_v4:?}");
        println!("   physical columns while both run: {:?}", columns().await?);
        if seen_by_v2.len() != 2 || seen_by_v2 != seen_by_v4 {
            return Err("v2 and v4 must see the same rows".into());
        }
        println!("   cleanup: remove v2, then contract (the real rename)");
        d.cleanup().await?;
        let after = columns().await?;
        println!("   orders columns: {after:?}");
        if !after.iter().any(|c| c == "client") || after.iter().any(|c| c == "customer") {
            return Err("the contract did not rename customer to client".into());
        }
        let n: i64 = v4
            .query_one(
                "SELECT count(*) FROM orders WHERE client LIKE 'written%'",
                &[],
            )
            .await?
            .get(0);
        println!("   v4 still reads its {n} rows after the contract");
        d.reset().await?;
        Ok::<(), Box<dyn std::error::Error>>(())
    }
    .await;

    // Stop what we started, whatever happened.
    let _ = env.reset().await;
    drop(haproxy);
    let _ = admin_client
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            bluegreen::postgres::quote_ident(&db)
        ))
        .await;
    outcome?;
    println!("\ndone");
    Ok(())
}
