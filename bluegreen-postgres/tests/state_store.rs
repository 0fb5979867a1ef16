//! PostgresStateStore on a real cluster.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bluegreen_core::{DeploymentState, Error, LockOwner, StateStore};
use bluegreen_postgres::{PostgresStateStore, PostgresStoreConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_passes_the_state_store_suite_and_keeps_keys_apart() {
    let Some(cluster) = common::Cluster::start().await else {
        return;
    };
    cluster.create_db("ops").await;
    let cfg = cluster.config("ops");
    let open = {
        let cfg = cfg.clone();
        move || {
            Arc::new(
                PostgresStateStore::new(
                    PostgresStoreConfig::new(cfg.clone()).with_deployment("suite"),
                )
                .unwrap(),
            ) as Arc<dyn StateStore>
        }
    };
    bluegreen_core::testkit::state_store_suite(&open)
        .await
        .assert_complete();

    // Another deployment key in the same tables is independent.
    let other =
        PostgresStateStore::new(PostgresStoreConfig::new(cfg.clone()).with_deployment("other-app"))
            .unwrap();
    assert!(other.load().await.unwrap().is_none());
    let lease = other
        .acquire(&LockOwner::current("deploy other"), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        other
            .save(&DeploymentState::default(), &lease)
            .await
            .unwrap(),
        1
    );
    let suite_store = open();
    // The suite's last (fenced) save left revision 3 under the default key.
    assert_eq!(suite_store.load().await.unwrap().unwrap().revision, 3);
    other.release(&lease).await.unwrap();

    // A corrupt stored state is an error and is not overwritten.
    let c = cluster.client("ops").await.unwrap();
    c.execute(
        "UPDATE bluegreen_state SET state = '{ half' WHERE deployment = 'other-app'",
        &[],
    )
    .await
    .unwrap();
    let err = other.load().await.unwrap_err();
    assert!(matches!(err, Error::CorruptState { .. }), "{err}");
    let mut s = DeploymentState::default();
    s.revision = 1;
    let lease = other
        .acquire(&LockOwner::current("deploy other"), Duration::from_secs(30))
        .await
        .unwrap();
    let err = other.save(&s, &lease).await.unwrap_err();
    assert!(matches!(err, Error::CorruptState { .. }), "{err}");
    let still: String = c
        .query_one(
            "SELECT state FROM bluegreen_state WHERE deployment = 'other-app'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(still, "{ half");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_survives_a_broken_connection_and_reports_bad_names() {
    let Some(cluster) = common::Cluster::start().await else {
        return;
    };
    let cfg = cluster.config("postgres");
    let bad = PostgresStateStore::new(PostgresStoreConfig::new(cfg.clone()).with_schema("x\";--"));
    assert!(matches!(
        bad,
        Err(Error::InvalidInput { what: "schema", .. })
    ));

    let store = PostgresStateStore::new(PostgresStoreConfig::new(cfg.clone())).unwrap();
    let lease = store
        .acquire(&LockOwner::current("test"), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        store
            .save(&DeploymentState::default(), &lease)
            .await
            .unwrap(),
        1
    );
    // Kill the store's session.
    let admin = cluster.client("postgres").await.unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'bluegreen' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    // The store notices the broken connection (at most one failed call) and reconnects.
    let mut failures = 0;
    let loaded = loop {
        match store.load().await {
            Ok(s) => break s.unwrap(),
            Err(e) => {
                failures += 1;
                assert!(e.is_retryable(), "{e}");
                assert!(failures <= 2, "the store does not reconnect: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(loaded.revision, 1);

    // A wrong password is an error that does not contain the password.
    let wrong = PostgresStateStore::new(PostgresStoreConfig::new(
        cfg.clone().with_password("not-the-password-xyz"),
    ))
    .unwrap();
    let err = wrong.load().await.unwrap_err();
    let msg = format!("{err} {err:?}");
    assert!(!msg.contains("not-the-password-xyz"), "{msg}");
    assert!(!msg.contains(&cluster.password), "{msg}");
    assert!(msg.contains("password authentication failed"), "{msg}");
}
