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
#[cfg(feature = "docker")]
pub mod hosts;
#[cfg(feature = "nginx")]
pub mod nginx;
#[cfg(feature = "postgres")]
pub mod pg;
#[cfg(feature = "docker")]
pub mod swarm;

pub use demo::{DemoBackends, SwitchSuiteBuilder};

/// The first of `known` paths that is a file, else `name` on `PATH`: how the starters find a
/// server's binary.
pub(crate) fn find_binary(known: &[&str], name: &str) -> Option<std::path::PathBuf> {
    known
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|p| p.join(name))
                    .find(|p| p.is_file())
            })
        })
}
pub use gate::{in_ci, missing, require};
pub use load::{Load, LoadOptions, LoadStats};
