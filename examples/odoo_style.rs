//! odoo_style: the runbook of seeds 000/001 (Odoo in Docker behind nginx, the database copied for
//! the new release) as code — Docker containers, nginx switched without a reload (Lua balancer),
//! and a copied PostgreSQL database per slot.
//!
//! ```text
//! PGHOST=127.0.0.1 PGPORT=5432 PGUSER=postgres PGPASSWORD=… \
//!   cargo run --example odoo_style --features docker,nginx,postgres
//! ```
//!
//! There is no Odoo image on this machine (no registry), so the demo app stands in for Odoo: it
//! answers `/web/health`, `/web/login` and an authenticated `POST /jsonrpc`, and
//! `bluegreen-demo -u <modules> --stop-after-init` stands in for Odoo's module update. Everything
//! else is what the runbook does: needs the Docker Engine, nginx with `libnginx-mod-http-lua`, and
//! a PostgreSQL server given by the libpq variables (the example creates and drops its databases).
//!
//! 1. deploys v1: the live database `odoo_style_<pid>` is copied into `<db>_blue`;
//! 2. deploys v2 while clients send requests through nginx (0 failed): the live copy is cloned
//!    into `<db>_green` from one snapshot while v1 keeps serving, the module update runs in the
//!    new container (`-u sale,stock --stop-after-init`), then the deep checks pass: `/web/health`,
//!    the login page within 5 s, and an authenticated JSON-RPC call;
//! 3. rolls back to v1 (its container and database were kept warm);
//! 4. tries v3, whose JSON-RPC answers 401 (a broken credential): refused by the deep check,
//!    live traffic untouched.
//!
//! Outside CI a missing service makes the example print why it skips; in CI it fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bluegreen::health::HttpCheck;
use bluegreen::hooks::ExecHook;
use bluegreen::nginx::NginxDynamicSwitch;
use bluegreen::postgres::{CopiedConfig, CopiedDatabase};
use bluegreen::{
    Deployer, Endpoint, FileStateStore, HealthCheck, HealthReport, HookPoint, HttpVersionProbe,
    Policy, Release, Slot, VersionMarker,
};
use bluegreen_testenv::nginx;

mod common;
use common::{live, missing, Load};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::main_or_demo(odoo_style)
}

/// The runbook's authenticated smoke call: `POST /jsonrpc` with a bearer token must answer a
/// `result`. A custom `HealthCheck` in a dozen lines.
#[derive(Debug)]
struct JsonRpcCheck {
    token: String,
}

#[async_trait]
impl HealthCheck for JsonRpcCheck {
    fn name(&self) -> &str {
        "jsonrpc smoke call"
    }

    async fn check(&self, ep: &Endpoint) -> bluegreen::Result<HealthReport> {
        let start = Instant::now();
        let res = reqwest::Client::new()
            .post(format!("http://{}:{}/jsonrpc", ep.host, ep.port))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({"jsonrpc": "2.0", "method": "call", "params": {}}))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let body = match res {
            Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await.ok(),
            Ok(r) => {
                return Ok(HealthReport::unhealthy(
                    format!("POST /jsonrpc answered {}", r.status()),
                    start.elapsed(),
                ))
            }
            Err(e) => return Ok(HealthReport::unhealthy(e.to_string(), start.elapsed())),
        };
        Ok(match body.and_then(|b| b.get("result").cloned()) {
            Some(_) => HealthReport::healthy(start.elapsed()),
            None => HealthReport::unhealthy("no `result` in the JSON-RPC answer", start.elapsed()),
        })
    }
}

async fn odoo_style() -> Result<(), Box<dyn std::error::Error>> {
    let Some(admin) = common::pg_from_env("postgres") else {
        return missing("a PostgreSQL server (set PGHOST, PGPORT, PGUSER, PGPASSWORD)");
    };
    if !nginx::lua_available() {
        return missing("nginx with libnginx-mod-http-lua");
    }
    let dir = tempfile::tempdir()?;
    let project = format!("odoo-style-{}", std::process::id());
    let Some(env) = common::docker_env(&project).await? else {
        return Ok(());
    };

    // nginx in Dynamic mode: the Lua balancer reads the split from shared memory, no reload.
    let (nginx, nginx_config) = nginx::start_dynamic(&dir.path().join("nginx"), "odoo", Ok)?;
    let port = nginx.listen().port();
    println!("nginx (Lua balancer) on 127.0.0.1:{port}");
    let image = common::demo_image(&env, &format!("bluegreen-demo:{project}")).await?;
    println!("built image {image} (stands in for Odoo)");

    // The live database before the first deploy, with some data.
    let base = format!("odoo_style_{}", std::process::id());
    let admin_client = admin.connect("example").await?;
    let q = bluegreen::postgres::quote_ident;
    admin_client
        .batch_execute(&format!("CREATE DATABASE {}", q(&base)))
        .await?;
    admin
        .clone()
        .with_dbname(&base)
        .connect("example")
        .await?
        .batch_execute(
            "CREATE TABLE res_partner (id serial PRIMARY KEY, name text NOT NULL);
             INSERT INTO res_partner (name) SELECT 'partner ' || i FROM generate_series(1, 5000) i;",
        )
        .await?;
    let copied =
        CopiedDatabase::new(CopiedConfig::new(admin.clone().with_dbname(&base)).with_workers(2))?;

    let rpc_token = "demo-rpc-token";
    let public = format!("http://127.0.0.1:{port}/");
    let deployer = Deployer::builder()
        .environment(Arc::new(env.clone()))
        .switch(Arc::new(NginxDynamicSwitch::new(nginx_config.clone())))
        .database(Arc::new(copied.clone()))
        .store(Arc::new(FileStateStore::new(dir.path().join("state"))?))
        .health_check(Arc::new(HttpCheck::new("/web/health")))
        .health_check(Arc::new(
            HttpCheck::new("/web/login")
                .with_body_contains("<form")
                .with_max_latency(Duration::from_secs(5)),
        ))
        .health_check(Arc::new(JsonRpcCheck {
            token: rpc_token.into(),
        }))
        // The module update runs in the new container before any traffic reaches it.
        .hook(
            HookPoint::AfterDeploy,
            Arc::new(ExecHook::new(
                "odoo -u sale,stock --stop-after-init",
                ["/bluegreen-demo", "-u", "sale,stock", "--stop-after-init"]
                    .map(String::from)
                    .to_vec(),
            )?),
        )
        .verify_data_path(Arc::new(HttpVersionProbe::new(
            public.clone(),
            VersionMarker::Header("x-bluegreen-version".into()),
        )))
        .policy(
            Policy::default()
                .with_readiness_timeout(Duration::from_secs(30))
                .with_observation(Duration::from_secs(2), Duration::from_millis(250))
                .with_drain_timeout(Duration::from_secs(5)),
        )
        .build()?;
    let release = |v: &str| -> bluegreen::Result<Release> {
        Ok(Release::new(v, image.clone())?.with_secret_env("DEMO_RPC_TOKEN", rpc_token))
    };
    let partners = |slot: Slot| {
        let cfg = admin.clone().with_dbname(copied.database_of(slot));
        async move {
            let c = cfg.connect("example").await?;
            let row = c
                .query_one("SELECT count(*) FROM res_partner", &[])
                .await
                .map_err(|e| bluegreen::Error::backend("example", "counting", false, e))?;
            Ok::<i64, bluegreen::Error>(row.get(0))
        }
    };

    let printer = common::print_events(&deployer);
    let outcome = async {
        println!("\n1. deploy v1 (the live database is copied into the blue slot's)");
        live(deployer.deploy(release("v1")?).await?)?;
        println!(
            "   {}: {} partners",
            copied.database_of(Slot::Blue),
            partners(Slot::Blue).await?
        );

        let load = Load::start(public.clone(), 4);
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!("\n2. deploy v2 through nginx while clients send requests");
        live(deployer.deploy(release("v2")?).await?)?;
        println!(
            "   {}: {} partners",
            copied.database_of(Slot::Green),
            partners(Slot::Green).await?
        );

        println!("\n3. rollback (v1 is still warm on blue, with its database)");
        live(deployer.rollback().await?)?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (counts, failed) = load.finish().await;
        println!("   requests per version: {counts:?}, failed = {failed}");
        if failed > 0 {
            return Err(format!("{failed} requests failed during the switches").into());
        }

        println!("\n4. deploy v3, whose JSON-RPC credential is broken");
        let bad = Release::new("v3", image.clone())?.with_secret_env("DEMO_RPC_TOKEN", "rotated");
        let fast = Deployer::builder()
            .environment(Arc::new(env.clone()))
            .switch(Arc::new(NginxDynamicSwitch::new(nginx_config.clone())))
            .database(Arc::new(copied.clone()))
            .store(Arc::new(FileStateStore::new(dir.path().join("state"))?))
            .health_check(Arc::new(JsonRpcCheck {
                token: rpc_token.into(),
            }))
            .policy(Policy::default().with_readiness_timeout(Duration::from_secs(5)))
            .build()?;
        match fast.deploy(bad).await {
            Ok(r) => return Err(format!("v3 should have been refused: {r:?}").into()),
            Err(e) => println!("   refused as expected:\n   {e}"),
        }
        common::expect_live(&deployer, "v1").await?;
        common::print_history(&deployer).await?;
        deployer.reset().await?;
        Ok::<(), Box<dyn std::error::Error>>(())
    }
    .await;

    // Stop what we started, whatever happened.
    printer.abort();
    let _ = env.reset().await;
    nginx.stop();
    for db in [
        base.clone(),
        copied.database_of(Slot::Blue),
        copied.database_of(Slot::Green),
    ] {
        let _ = admin_client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", q(&db)))
            .await;
    }
    outcome?;
    println!("\ndone");
    Ok(())
}
