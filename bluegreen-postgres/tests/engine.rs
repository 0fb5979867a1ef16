//! Replicated driven by the real engine (`Deployer`), with core's fake environment and switch and a
//! real PostgreSQL cluster: the engine pauses the switch around the cutover.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bluegreen_core::testkit::Fakes;
use bluegreen_core::{Deployer, KeepOld, Policy, Release, RunOutcome, Slot};
use bluegreen_postgres::{ReplicatedConfig, ReplicatedDatabase};
use common::{facts, one_i64, Cluster, SEED};

fn policy() -> Policy {
    common::fast_policy()
        .with_pause_during_cutover(true)
        .with_keep_old(KeepOld::Stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_deploys_twice_and_rolls_back_with_replicated() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    cluster.create_db("app").await;
    let base = cluster.client("app").await.unwrap();
    base.batch_execute(SEED).await.unwrap();
    let db = ReplicatedDatabase::new(
        ReplicatedConfig::new(cluster.config("app"))
            .with_bin_dir(cluster.bin_dir())
            .with_sync_timeout(Duration::from_secs(120)),
    )
    .unwrap();
    let fakes = Fakes::new();
    let deployer = Deployer::builder()
        .environment(Arc::new(fakes.environment()))
        .switch(Arc::new(fakes.switch()))
        .store(Arc::new(fakes.store()))
        .health_check(Arc::new(fakes.health_check()))
        .database(Arc::new(db))
        .policy(policy())
        .build()
        .unwrap();

    // v1: the base database replicated into blue's, cut over while the switch is paused.
    let r = deployer
        .deploy(Release::new("v1", "app").unwrap())
        .await
        .unwrap();
    assert_eq!(r.outcome, RunOutcome::Live, "{r:?}");
    assert_eq!(fakes.live(), Some(Slot::Blue));
    assert!(
        !fakes.is_paused(),
        "the engine must resume after the switch"
    );
    let calls = fakes.calls();
    let pause = calls.iter().position(|c| c.contains("pause"));
    let resume = calls.iter().position(|c| c.contains("resume"));
    assert!(
        matches!((pause, resume), (Some(p), Some(q)) if p < q),
        "{calls:?}"
    );
    let blue = cluster.client("app_blue").await.unwrap();
    // The cutover ended the base database's sessions (and left it read-only).
    let base = cluster.client("app").await.unwrap();
    assert_eq!(facts(&blue).await, facts(&base).await);
    assert!(base
        .execute("INSERT INTO orders (account, amount) VALUES (1, 1)", &[])
        .await
        .is_err());

    // Live traffic writes to blue; v2 replicates blue into green and keeps every row.
    for i in 0..25i64 {
        blue.execute("INSERT INTO orders (account, amount) VALUES (1, $1)", &[&i])
            .await
            .unwrap();
    }
    let expected = facts(&blue).await;
    drop(blue);
    let r = deployer
        .deploy(Release::new("v2", "app").unwrap())
        .await
        .unwrap();
    assert_eq!(r.outcome, RunOutcome::Live, "{r:?}");
    assert_eq!(fakes.live(), Some(Slot::Green));
    let green = cluster.client("app_green").await.unwrap();
    assert_eq!(facts(&green).await, expected);
    // KeepOld::Stop: finalize dropped the old database and the reverse replication.
    let admin = cluster.client("postgres").await.unwrap();
    assert_eq!(
        one_i64(
            &admin,
            "SELECT count(*) FROM pg_database WHERE datname = 'app_blue'"
        )
        .await,
        0
    );
    assert_eq!(
        one_i64(&admin, "SELECT count(*) FROM pg_replication_slots").await,
        0
    );

    // v3 never gets healthy: rolled back before the switch; green keeps serving and writing.
    fakes.set_unhealthy_version("v3");
    let r = deployer.deploy(Release::new("v3", "app").unwrap()).await;
    println!("v3: {r:?}");
    assert_eq!(fakes.live(), Some(Slot::Green));
    assert_eq!(
        one_i64(
            &admin,
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'app\\_blue%'"
        )
        .await,
        0,
        "the failed target must be dropped"
    );
    assert_eq!(
        one_i64(&admin, "SELECT count(*) FROM pg_replication_slots").await,
        0
    );
    green
        .execute("INSERT INTO orders (account, amount) VALUES (1, 1)", &[])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_warm_old_slot_each_deploy_replaces_the_previous_reverse_replication() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    cluster.create_db("app").await;
    cluster
        .client("app")
        .await
        .unwrap()
        .batch_execute(SEED)
        .await
        .unwrap();
    let db = ReplicatedDatabase::new(
        ReplicatedConfig::new(cluster.config("app"))
            .with_bin_dir(cluster.bin_dir())
            .with_sync_timeout(Duration::from_secs(120)),
    )
    .unwrap();
    let fakes = Fakes::new();
    let deployer = Deployer::builder()
        .environment(Arc::new(fakes.environment()))
        .switch(Arc::new(fakes.switch()))
        .store(Arc::new(fakes.store()))
        .health_check(Arc::new(fakes.health_check()))
        .database(Arc::new(db))
        .policy(policy().with_keep_old(KeepOld::Warm))
        .build()
        .unwrap();
    let admin = cluster.client("postgres").await.unwrap();
    for (v, live, old) in [
        ("v1", "app_blue", None),
        ("v2", "app_green", Some("app_blue")),
        ("v3", "app_blue", Some("app_green")),
    ] {
        let r = deployer
            .deploy(Release::new(v, "app").unwrap())
            .await
            .unwrap();
        assert_eq!(r.outcome, RunOutcome::Live, "{v}: {r:?}");
        // Exactly the reverse replication of this deploy: one slot in the live database.
        let slots: Vec<String> = admin
            .query(
                "SELECT slot_name || '@' || database FROM pg_replication_slots",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        match old {
            None => assert!(slots.is_empty(), "{v}: {slots:?}"),
            Some(_) => assert_eq!(slots, vec![format!("bg_rslot_{live}@{live}")], "{v}"),
        }
        let live_c = cluster.client(live).await.unwrap();
        let pubs: Vec<String> = live_c
            .query("SELECT pubname::text FROM pg_publication", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        match old {
            None => assert!(pubs.is_empty(), "{v}: {pubs:?}"),
            Some(_) => assert_eq!(pubs, vec![format!("bg_rpub_{live}")], "{v}"),
        }
        // The warm old database follows the live one.
        live_c
            .execute("INSERT INTO orders (account, amount) VALUES (1, 1)", &[])
            .await
            .unwrap();
        if let Some(old) = old {
            let want = one_i64(&live_c, "SELECT count(*) FROM orders").await;
            let old_c = cluster.client(old).await.unwrap();
            // No publication left in the old database from when it was live.
            assert_eq!(
                one_i64(&old_c, "SELECT count(*) FROM pg_publication").await,
                0,
                "{v}"
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while one_i64(&old_c, "SELECT count(*) FROM orders").await != want
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(one_i64(&old_c, "SELECT count(*) FROM orders").await, want);
        }
    }
}
