//! # bluegreen
//!
//! Zero-downtime blue-green deployments as a library. Two identical slots, one live and one idle:
//! a release goes to the idle slot, is health-checked and verified, traffic switches atomically,
//! and rollback is one switch back.
//!
//! This facade re-exports [`bluegreen_core`] (types, traits, the [`Deployer`] engine, health
//! checks, the file state store) and, behind features, the backends:
//!
//! | feature | crate | provides |
//! |---|---|---|
//! | `proxy` (default) | [`bluegreen_proxy`] | `ProxySwitch`: an in-process reverse proxy |
//! | `process` (default) | [`bluegreen_process`] | `ProcessEnvironment`: local child processes |
//! | `docker` | `bluegreen-docker` | Docker Engine environments |
//! | `nginx` | `bluegreen-nginx` | nginx switch |
//! | `haproxy` | `bluegreen-haproxy` | HAProxy runtime-API switch |
//! | `traefik` | `bluegreen-traefik` | Traefik file-provider switch |
//! | `postgres` | `bluegreen-postgres` | database strategies and a Postgres state store |
//! | `http` (default) | `bluegreen-core/http` | `health::HttpCheck` and `HttpVersionProbe` (reqwest, rustls) |
//! | `cli` (default) | clap, toml | the `bluegreen` binary (brings `proxy`, `process`, `http`) |
//! | `full` | all of the above | |
//!
//! A library user who needs one backend turns the defaults off, e.g.
//! `bluegreen = { version = "0.1", default-features = false, features = ["haproxy"] }`: no HTTP
//! client, no argument parser, no embedded proxy.
//!
//! Start with `cargo run --example quickstart`, which needs nothing installed.
//!
//! ```no_run
//! # async fn run() -> bluegreen::Result<()> {
//! use std::sync::Arc;
//! use bluegreen::health::HttpCheck;
//! use bluegreen::process::{ProcessConfig, ProcessEnvironment};
//! use bluegreen::proxy::{ProxyConfig, ProxySwitch};
//! use bluegreen::{Deployer, FileStateStore, Release};
//!
//! let proxy = ProxySwitch::bind(ProxyConfig::default()).await?;
//! let deployer = Deployer::builder()
//!     .environment(Arc::new(ProcessEnvironment::new(ProcessConfig::new(".bluegreen/process"))))
//!     .switch(Arc::new(proxy.clone()))
//!     .store(Arc::new(FileStateStore::new(".bluegreen/state")?))
//!     .health_check(Arc::new(HttpCheck::new("/health")))
//!     .build()?;
//! deployer.deploy(Release::new("v2", "./target/release/my-app")?).await?;
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]

pub use bluegreen_core::*;

#[cfg(feature = "proxy")]
#[cfg_attr(docsrs, doc(cfg(feature = "proxy")))]
#[doc(inline)]
pub use bluegreen_proxy as proxy;

#[cfg(feature = "process")]
#[cfg_attr(docsrs, doc(cfg(feature = "process")))]
#[doc(inline)]
pub use bluegreen_process as process;

#[cfg(feature = "docker")]
#[cfg_attr(docsrs, doc(cfg(feature = "docker")))]
#[doc(inline)]
pub use bluegreen_docker as docker;

#[cfg(feature = "nginx")]
#[cfg_attr(docsrs, doc(cfg(feature = "nginx")))]
#[doc(inline)]
pub use bluegreen_nginx as nginx;

#[cfg(feature = "haproxy")]
#[cfg_attr(docsrs, doc(cfg(feature = "haproxy")))]
#[doc(inline)]
pub use bluegreen_haproxy as haproxy;

#[cfg(feature = "traefik")]
#[cfg_attr(docsrs, doc(cfg(feature = "traefik")))]
#[doc(inline)]
pub use bluegreen_traefik as traefik;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[doc(inline)]
pub use bluegreen_postgres as postgres;
