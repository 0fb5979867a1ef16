#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod config;
mod environment;
mod error;
mod fleet;
mod swarm;

pub use config::{
    ContainerHealth, DockerConfig, Healthcheck, HostPorts, Publish, PullPolicy, RestartPolicy,
};
pub use environment::{
    DockerEnvironment, OwnedContainer, LABEL_DEPLOYMENT, LABEL_PROJECT, LABEL_SLOT, LABEL_VERSION,
    MAX_LOG_BYTES,
};
pub use error::DockerError;
pub use fleet::{
    DockerFleet, FleetError, FleetHost, FleetTls, HostFailure, HostStatus, DEFAULT_CONCURRENCY,
};

pub use swarm::{NodeTask, ServiceStatus, SwarmConfig, SwarmEnvironment};

/// The bollard client this crate uses, re-exported so callers build clients of the same version.
pub use bollard;

/// The backend's name, as errors and events report it.
pub const NAME: &str = "docker";
