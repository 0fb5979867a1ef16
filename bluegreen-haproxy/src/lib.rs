#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod client;
mod complete;
mod config;
mod error;
mod switch;

pub use client::{
    parse_servers_state, parse_stat_csv, AdminState, Command, OpState, RuntimeClient,
    RuntimeSession, ServerState, StatRow,
};
pub use config::{HaproxyConfig, RuntimeAddress, DEFAULT_POOL_SIZE, MAX_POOL_SIZE};
pub use error::HaproxyError;
pub use switch::HaproxySwitch;

/// The backend name this crate reports in errors and events.
pub const NAME: &str = "haproxy";
