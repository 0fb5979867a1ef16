//! What the engine tests built on the fakes share.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use bluegreen_core::testkit::{Fakes, Op};
use bluegreen_core::{Deployer, Policy, Release, Report, Result};
use tokio::task::JoinHandle;

/// A deployer over `fakes`' environment, switch, store, database and health check.
pub(crate) fn deployer(fakes: &Fakes, policy: Policy) -> Deployer {
    fakes
        .deployer_builder()
        .database(Arc::new(fakes.database()))
        .policy(policy)
        .build()
        .unwrap()
}

/// Fast polling, no observation window.
pub(crate) fn fast_policy() -> Policy {
    Policy::default()
        .with_poll(Duration::from_millis(1), Duration::from_millis(5))
        .with_observation(Duration::ZERO, Duration::from_millis(5))
}

pub(crate) fn release(v: &str) -> Release {
    Release::new(v, "app").unwrap()
}

/// Starts `d.deploy(release)` in another task and returns once it has called `op` once more
/// than before (e.g. reached a call scripted to hang or to be slow).
pub(crate) async fn deploy_until(
    fakes: &Fakes,
    d: &Deployer,
    release: Release,
    op: Op,
) -> JoinHandle<Result<Report>> {
    let before = fakes.call_count(op.clone());
    let version = release.version.clone();
    let task = {
        let d = d.clone();
        tokio::spawn(async move { d.deploy(release).await })
    };
    assert!(
        fakes
            .called_more_than(op.clone(), before, Duration::from_secs(2))
            .await,
        "deploy {version} never reached {op}"
    );
    task
}
