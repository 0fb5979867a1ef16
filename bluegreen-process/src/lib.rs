#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod config;
mod environment;
mod error;
mod record;

pub use config::ProcessConfig;
pub use environment::{ProcessEnvironment, MAX_LOG_BYTES};
pub use error::ProcessError;

/// The backend's name, as errors and events report it.
pub const NAME: &str = "process";
