#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

pub mod admin;
mod config;
mod error;
mod long_lived;
mod metrics;
mod pause;
mod persist;
mod pool;
mod proxy;
mod remote_env;
mod routing;
mod shadow;
mod switch;

pub use admin::{AdminServer, RemoteProxySwitch};
pub use config::ProxyConfig;
pub use error::ProxyError;
pub use pause::PauseCounts;
pub use remote_env::RemoteEnvironment;
pub use shadow::{ShadowAnalysis, ShadowConfig, ShadowMismatch, ShadowReport};
pub use switch::ProxySwitch;

/// The name this switch reports (`TrafficSwitch::name`), as found in errors and events.
pub const NAME: &str = "proxy";
