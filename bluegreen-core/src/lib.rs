#![doc = include_str!("../README.md")]
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
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod prometheus;
pub mod secrets;
pub mod state;
pub mod store;
#[cfg(any(test, feature = "testkit"))]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;
pub mod traits;
pub mod types;

#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use analysis::HttpVersionProbe;
pub use analysis::{
    Analysis, AnalysisContext, DataPathProbe, MetricsAnalysis, ProbeResult, StatisticalAnalysis,
    Verdict, VersionMarker,
};
pub use engine::{Deployer, DeployerBuilder, Plan, PlannedStep, Report, RunOutcome, StatusReport};
pub use error::{BoxError, Error, LiveTraffic, Result};
pub use events::DeployEvent;
pub use ledger::{SwitchCounters, TrafficLedger};
pub use policy::{
    CanaryStep, HookOptions, KeepOld, Observation, OnTimeout, Policy, Promotion, Resume,
    RetryConfig,
};
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
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
