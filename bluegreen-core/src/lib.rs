//! # bluegreen-core
//!
//! Domain types, traits, the deployment engine, health checks, the file state store and the
//! conformance testkit of [bluegreen](https://example.invalid/bluegreen): zero-downtime blue-green
//! deployments as a library.
//!
//! Two identical slots, [`Slot::Blue`] and [`Slot::Green`]: one live, one idle. A release goes to
//! the idle slot, is health-checked and verified, traffic switches atomically, and rollback is one
//! switch back. The [`Deployer`] drives that as a persisted state machine over five traits:
//!
//! | trait | does | implementations |
//! |---|---|---|
//! | [`Environment`] | runs a release in a slot | `bluegreen-process`, `bluegreen-docker` |
//! | [`TrafficSwitch`] | moves traffic between slots | `bluegreen-proxy`, `bluegreen-nginx`, `bluegreen-haproxy`, `bluegreen-traefik` |
//! | [`DatabaseStrategy`] | shares, copies or replicates the database | `bluegreen-postgres` |
//! | [`HealthCheck`] | judges an endpoint | [`health::HttpCheck`], [`health::TcpCheck`], [`health::CommandCheck`], [`health::AllOf`], [`health::AnyOf`] |
//! | [`StateStore`] | persists state and the deployment lock | [`FileStateStore`], `bluegreen-postgres` |
//!
//! plus [`Hook`]s at lifecycle points, [`Analysis`] after the switch (pass / fail / inconclusive:
//! [`MetricsAnalysis`], the canary-against-stable [`StatisticalAnalysis`], a PromQL query with
//! [`PrometheusAnalysis`]) and a [`DataPathProbe`] proving the switch through the proxy's public
//! address. Every deployment's [`TrafficLedger`] says what its clients saw, from the switch's own
//! counters ([`TrafficSwitch::counters`]), or that it was not measured.
//!
//! ## A deployment, phase by phase
//!
//! [`Phase`] lists them in order: prepare the database, `before_deploy` hooks, deploy the target,
//! wait until healthy (rise threshold, adaptive polling, timeout), `after_deploy` hooks
//! (migrations), preview, smoke tests, the manual gate, the database cutover, the switch (each
//! canary step) read back from the proxy, the data-path probe, the observation window, after-switch
//! steps, drain and stop (or keep warm) the old slot, finalize, and the final data-path check
//! (the switch read back, the target release answering through it): a run succeeds only once
//! that has passed. The phase is saved before it runs.
//!
//! - A failure before the switch leaves live traffic untouched and removes the target.
//! - A failure after it switches back first, then cleans up.
//! - After an irreversible database step the engine stops and asks ([`Deployer::promote`] /
//!   [`Deployer::abort`]): a rollback onto a schema the old release cannot read is an outage.
//! - After a crash, a new `Deployer` on the same store finishes a run whose traffic had moved and
//!   undoes one whose traffic had not ([`Policy::resume`]); it never switches twice.
//!
//! Errors say which phase and which backend failed and what happened to live traffic
//! ([`Error::Phase`], [`LiveTraffic`]); [`Error::is_retryable`] decides retries, which happen in one
//! place ([`RetryConfig`]).
//!
//! ## Example
//!
//! A full deploy and rollback with the in-memory fakes (feature `testkit`):
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use bluegreen_core::testkit::Fakes;
//! use bluegreen_core::{Deployer, HookPoint, Policy, Release, RunOutcome, Slot};
//!
//! let fakes = Fakes::new();
//! let deployer = Deployer::builder()
//!     .environment(Arc::new(fakes.environment()))
//!     .switch(Arc::new(fakes.switch()))
//!     .database(Arc::new(fakes.database()))
//!     .health_check(Arc::new(fakes.health_check()))
//!     .hook(HookPoint::AfterDeploy, Arc::new(fakes.hook("migrate")))
//!     .store(Arc::new(fakes.store()))
//!     .policy(Policy::default().with_observation(Duration::ZERO, Duration::from_millis(10)))
//!     .build()?;
//!
//! // What would happen, changing nothing:
//! println!("{}", deployer.plan(&Release::new("v1", "app:v1")?).await?);
//!
//! deployer.deploy(Release::new("v1", "app:v1")?).await?;
//! let report = deployer.deploy(Release::new("v2", "app:v2")?).await?;
//! assert_eq!(report.outcome, RunOutcome::Live);
//! assert_eq!(fakes.live(), Some(Slot::Green));
//!
//! // Rollback is one switch back to the warm previous slot.
//! deployer.rollback().await?;
//! assert_eq!(fakes.live(), Some(Slot::Blue));
//!
//! // A release that never gets healthy is refused; live traffic stays where it is.
//! fakes.set_unhealthy_version("v3");
//! let fast = Policy::default()
//!     .with_readiness_timeout(Duration::from_millis(200))
//!     .with_observation(Duration::ZERO, Duration::from_millis(10));
//! let strict = Deployer::builder()
//!     .environment(Arc::new(fakes.environment()))
//!     .switch(Arc::new(fakes.switch()))
//!     .health_check(Arc::new(fakes.health_check()))
//!     .store(Arc::new(fakes.store()))
//!     .policy(fast)
//!     .build()?;
//! let err = strict.deploy(Release::new("v3", "app:v3")?).await.unwrap_err();
//! println!("{err}");
//! assert_eq!(fakes.live(), Some(Slot::Blue));
//! # Ok::<(), bluegreen_core::Error>(())
//! # }).unwrap();
//! ```
//!
//! ## Crate feature flags
//!
//! - `testkit`: the [`testkit`][testkit-module] module: conformance suites every backend runs, and
//!   in-memory fakes with fault injection for your own tests.
//!
//! ## Supported Rust versions
//!
//! The workspace's `rust-version` (1.89) and newer.
//!
// The testkit module exists only with its feature: without it the link goes to the docs.rs build
// (all features), so `cargo doc` has no broken link either way.
#![cfg_attr(feature = "testkit", doc = "[testkit-module]: crate::testkit")]
#![cfg_attr(
    not(feature = "testkit"),
    doc = "[testkit-module]: https://docs.rs/bluegreen-core/latest/bluegreen_core/testkit/"
)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]

pub mod analysis;
pub mod config;
mod engine;
pub mod error;
pub mod events;
pub mod health;
pub mod hooks;
pub mod ledger;
pub mod policy;
pub mod prometheus;
pub mod secrets;
pub mod state;
pub mod store;
#[cfg(any(test, feature = "testkit"))]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;
pub mod traits;
pub mod types;

pub use analysis::{
    Analysis, AnalysisContext, DataPathProbe, HttpVersionProbe, MetricsAnalysis, ProbeResult,
    StatisticalAnalysis, Verdict, VersionMarker,
};
pub use engine::{Deployer, DeployerBuilder, Plan, PlannedStep, Report, RunOutcome, StatusReport};
pub use error::{BoxError, Error, LiveTraffic, Result};
pub use events::DeployEvent;
pub use ledger::{SwitchCounters, TrafficLedger};
pub use policy::{
    CanaryStep, HookOptions, KeepOld, Observation, OnTimeout, Policy, Promotion, Resume,
    RetryConfig,
};
pub use prometheus::PrometheusAnalysis;
pub use state::{
    DeploymentState, HistoryEntry, InFlight, Lease, LockInfo, LockOwner, Outcome, Phase, RunKind,
    SlotRecord, Timestamp, Waiting,
};
pub use store::FileStateStore;
pub use traits::*;

/// The release label the engine sets (unless the caller did) to its deployment id before
/// [`Environment::deploy`], so environments that label what they create (containers, …) can say
/// which deployment created it.
pub const DEPLOYMENT_LABEL: &str = "bluegreen.deployment";
pub use types::{
    validate_token, Endpoint, Endpoints, Name, PerSlot, Release, Secret, Slot, Sticky,
    TrafficSplit, Version,
};

// For `validated_serde!`: the crates using it need not name serde themselves.
#[doc(hidden)]
pub use serde as __serde;
