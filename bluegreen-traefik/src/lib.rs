#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod api;
mod config;
mod error;
mod labels;
pub mod render;
mod switch;

pub use config::{
    FileFormat, PreviewMatch, RouteName, RouterTls, TraefikConfig, TraefikVersion, MAX_NAME_LEN,
};
pub use error::TraefikError;
pub use labels::DockerLabels;
pub use render::{render, Routing};
pub use switch::TraefikSwitch;

/// The name this switch reports (`TrafficSwitch::name`), as found in errors and events.
pub const NAME: &str = "traefik";
