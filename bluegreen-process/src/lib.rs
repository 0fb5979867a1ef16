#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod config;
mod environment;
mod error;
mod record;
mod supervisor;

pub use config::{ProcessConfig, BASE_ENV, MAX_KEEP_LOGS};
pub use environment::{ProcessEnvironment, MAX_LOG_BYTES};
pub use error::ProcessError;
pub use supervisor::{
    OnLiveFailure, Supervisor, SupervisorConfig, SupervisorEvent, SupervisorHandle,
};

/// The backend's name, as errors and events report it.
pub const NAME: &str = "process";
