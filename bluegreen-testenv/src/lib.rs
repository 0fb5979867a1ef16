#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

pub mod demo;
pub mod gate;
pub mod load;
pub mod port;
pub mod prometheus;

#[cfg(feature = "docker")]
pub mod docker;
#[cfg(feature = "haproxy")]
pub mod haproxy;
#[cfg(feature = "nginx")]
pub mod nginx;
#[cfg(feature = "postgres")]
pub mod pg;

pub use demo::{DemoBackends, SwitchSuiteBuilder};
pub use gate::{in_ci, missing, require};
pub use load::{Load, LoadOptions, LoadStats};
