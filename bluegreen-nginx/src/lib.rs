#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod dynamic;
mod error;
mod format;
mod http;
mod master;
mod reload;

pub use dynamic::{NginxDynamicConfig, NginxDynamicSwitch, CONTROL_PATH, TOKEN_HEADER};
pub use error::{NginxError, Restored, Step};
pub use format::{Routing, MAX_PEERS_PER_SLOT};
pub use master::NginxCommand;
pub use reload::{
    NginxReloadConfig, NginxReloadConfigBuilder, NginxReloadSwitch, ReloadReport, SlotMarker,
    VerifyProbe, PROBE_HEADER, UPSTREAM_HEADER,
};

/// The name both switches report (`TrafficSwitch::name`), as found in errors and events.
pub const NAME: &str = "nginx";
