//! Secrets survive every redeploy (issue #13, part 1): the engine resolves a release's secret
//! environment from its `SecretSource`s whenever it starts the release, re-derives the database
//! binding, and never starts a release without its recorded secrets.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use bluegreen_core::secrets::StaticSecrets;
use bluegreen_core::testkit::{Fakes, Op};
use bluegreen_core::{Deployer, Error, KeepOld, Policy, Release, Resume, RunOutcome, Slot};
use common::{deploy_until, fast_policy};

/// The operator's vault: one API key for every release.
fn vault() -> StaticSecrets {
    StaticSecrets::new().with("API_KEY", "k-live-123")
}

fn deployer(fakes: &Fakes, policy: Policy, database: bool) -> Deployer {
    let mut b = fakes
        .deployer_builder()
        .secrets(Arc::new(vault()))
        .policy(policy);
    if database {
        b = b.database(Arc::new(fakes.database()));
    }
    b.build().unwrap()
}

/// A release that needs API_KEY (the vault provides it) and ships a plain variable.
fn release(v: &str) -> Release {
    Release::new(v, "app")
        .unwrap()
        .with_env("PLAIN", format!("plain-{v}"))
        .with_secret_env("API_KEY", "k-live-123")
}

/// The instance in `slot` runs `version` with its full environment (and the database's binding,
/// secrets included, when there is a database).
fn assert_full_env(fakes: &Fakes, slot: Slot, version: &str, database: bool) {
    assert_eq!(fakes.running(slot).as_deref(), Some(version), "{slot}");
    let env = fakes.started_env(slot).expect("an instance");
    let mut want = BTreeMap::from([
        ("PLAIN", format!("plain-{version}")),
        ("API_KEY", "k-live-123".to_string()),
    ]);
    if database {
        want.insert("DATABASE_NAME", format!("app_{slot}"));
        want.insert("DATABASE_PASSWORD", "fake-secret-password".to_string());
    }
    for (k, v) in want {
        assert_eq!(
            env.get(k),
            Some(&v),
            "{version} on {slot} started without {k}"
        );
    }
}

#[tokio::test]
async fn rollback_after_cleanup_starts_the_old_release_with_its_secrets() {
    let fakes = Fakes::new();
    let d = deployer(&fakes, fast_policy(), false);
    d.deploy(release("v1")).await.unwrap();
    d.deploy(release("v2")).await.unwrap();
    assert_eq!(d.cleanup().await.unwrap(), Some(Slot::Blue));
    d.rollback().await.unwrap();
    assert_full_env(&fakes, Slot::Blue, "v1", false);
}

#[tokio::test]
async fn rollback_to_a_stopped_slot_starts_it_with_its_secrets() {
    let fakes = Fakes::new();
    let d = deployer(&fakes, fast_policy().with_keep_old(KeepOld::Stop), false);
    d.deploy(release("v1")).await.unwrap();
    d.deploy(release("v2")).await.unwrap();
    d.rollback().await.unwrap();
    assert_full_env(&fakes, Slot::Blue, "v1", false);
}

#[tokio::test]
async fn rollback_with_a_database_keeps_the_users_secrets_and_the_binding() {
    let fakes = Fakes::new();
    let d = deployer(&fakes, fast_policy().with_keep_old(KeepOld::Stop), true);
    d.deploy(release("v1")).await.unwrap();
    d.deploy(release("v2")).await.unwrap();
    d.rollback().await.unwrap();
    assert_full_env(&fakes, Slot::Blue, "v1", true);
}

#[tokio::test]
async fn an_automatic_switch_back_after_a_finalize_failure_restarts_the_old_slot_with_its_secrets()
{
    let fakes = Fakes::new();
    let d = deployer(&fakes, fast_policy().with_keep_old(KeepOld::Stop), true);
    d.deploy(release("v1")).await.unwrap();
    // v2 drains and stops v1, then its finalize fails: the engine switches back to a restarted v1.
    fakes.fail_next(Op::DatabaseFinalize, "disk full");
    let err = d.deploy(release("v2")).await.unwrap_err();
    assert_eq!(
        err.live_traffic(),
        Some(bluegreen_core::LiveTraffic::RolledBack),
        "{err}"
    );
    assert_eq!(fakes.live(), Some(Slot::Blue));
    assert_full_env(&fakes, Slot::Blue, "v1", true);
}

#[tokio::test]
async fn a_recovery_that_continues_a_deploy_starts_it_with_its_secrets() {
    let fakes = Fakes::new();
    let policy = fast_policy().with_resume(Resume::Continue);
    let d = deployer(&fakes, policy.clone(), true);
    d.deploy(release("v1")).await.unwrap();
    // The run dies before deploying v2 (inside the database's prepare); a new process continues.
    fakes.hang_next(Op::DatabasePrepare);
    let task = deploy_until(&fakes, &d, release("v2"), Op::DatabasePrepare).await;
    task.abort();
    let _ = task.await;
    let d2 = deployer(&fakes, policy, true);
    d2.break_lock().await.unwrap();
    let r = d2.recover().await.unwrap().expect("a flight");
    assert_eq!(r.outcome, RunOutcome::Live);
    assert_full_env(&fakes, Slot::Green, "v2", true);
}

#[tokio::test]
async fn a_release_whose_secrets_cannot_be_resolved_is_never_started() {
    let fakes = Fakes::new();
    let d = deployer(&fakes, fast_policy(), false);
    d.deploy(release("v1")).await.unwrap();
    d.deploy(release("v2")).await.unwrap();
    d.cleanup().await.unwrap();
    // A new process whose vault no longer has API_KEY: rolling back to v1 would start it
    // without its recorded secret. Refused before anything runs.
    let poor = fakes
        .deployer_builder()
        .policy(fast_policy())
        .build()
        .unwrap();
    let deploys = fakes.call_count(Op::EnvironmentDeploy);
    let history = poor.history().await.unwrap().len();
    let err = poor.rollback().await.unwrap_err();
    assert!(
        matches!(err.root(), Error::SecretsUnavailable { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("API_KEY") && msg.contains("v1"), "{msg}");
    assert!(!msg.contains("k-live-123"), "{msg}");
    assert_eq!(
        fakes.call_count(Op::EnvironmentDeploy),
        deploys,
        "started anyway"
    );
    assert_eq!(
        poor.history().await.unwrap().len(),
        history,
        "a run was recorded"
    );
    assert_eq!(fakes.live(), Some(Slot::Green));
    // A new deploy whose source fails is refused before anything starts too.
    let broken = fakes
        .deployer_builder()
        .secrets(Arc::new(
            bluegreen_core::secrets::EnvSecrets::new(["BG_TEST_NEVER_SET_VAR"]).unwrap(),
        ))
        .policy(fast_policy())
        .build()
        .unwrap();
    let err = broken.deploy(release("v3")).await.unwrap_err();
    assert!(
        matches!(err.root(), Error::SecretsUnavailable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("BG_TEST_NEVER_SET_VAR"), "{err}");
    assert_eq!(
        fakes.call_count(Op::EnvironmentDeploy),
        deploys,
        "started anyway"
    );
    assert!(fakes.stored_state().unwrap().in_flight.is_none());
}

#[tokio::test]
async fn secrets_never_reach_the_state() {
    let fakes = Fakes::new();
    let d = deployer(&fakes, fast_policy(), true);
    d.deploy(release("v1")).await.unwrap();
    let state = serde_json::to_string(&fakes.stored_state().unwrap()).unwrap();
    assert!(!state.contains("k-live-123"), "{state}");
    assert!(!state.contains("fake-secret-password"), "{state}");
    assert!(state.contains("API_KEY"), "the name is recorded: {state}");
}
