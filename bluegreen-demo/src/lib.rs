//! A tiny web app for bluegreen's quickstart, tests and container images.
//!
//! It answers with the version and slot it was started with, so a client can see which side of a
//! blue-green deployment served it, and it has knobs to misbehave on purpose (failing health,
//! slow start, errors, crash at start).
//!
//! | path          | answer                                                            |
//! |---------------|-------------------------------------------------------------------|
//! | `/`           | `200 version=<v> slot=<s>\n` (or 500 for the `error_rate` share)  |
//! | `/health`     | `200 ok` (`503 unhealthy` with `DEMO_FAIL_HEALTH=1`)              |
//! | `/slow?ms=N`  | sleeps `N` ms (at most [`MAX_SLOW_MS`]) then answers like `/`     |
//! | `/web/health` | like `/health` (Odoo's health path, for the Odoo-style example)   |
//! | `/env/NAME`   | `200 set (N bytes)` when the variable reached the app, else `404`  |
//! | `/web/login`  | a small HTML login page                                           |
//! | `GET /ws`     | a WebSocket echo: each text message comes back as `<slot> <message>` |
//! | `POST /write?id=N` | inserts `N` into the table `demo_writes (id bigint primary key)` of the database in `DATABASE_URL` and answers `200 written N` after the commit; `503` naming the error when the database refuses (e.g. writes frozen) or is not configured |
//! | `POST /jsonrpc` | `{"jsonrpc":"2.0","result":{"server_version":"<v>"}}`; with `DEMO_RPC_TOKEN` set it needs `Authorization: Bearer <token>` (else 401) |
//!
//! Started as `bluegreen-demo -u <modules> --stop-after-init` it stands in for an Odoo module
//! update: it prints the modules it "updated" and exits 0 without serving.
//!
//! Every answer carries the headers `x-bluegreen-version` and `x-bluegreen-slot`, and
//! `x-bluegreen-instance`: the address the app listens on (`127.0.0.1:40123`; on a wildcard
//! address such as `0.0.0.0`, the address the connection reached, e.g. a host's own), so a
//! client behind a switch routing a slot to several instances sees which one answered.
//!
//! The `bluegreen-demo` binary reads its settings from the environment
//! ([`DemoConfig::from_env`]): `PORT` (8080), `HOST` (127.0.0.1), `BLUEGREEN_VERSION` (else
//! `VERSION`, else `dev`), `BLUEGREEN_SLOT` (`none`), and the knobs `DEMO_FAIL_HEALTH=1`,
//! `DEMO_START_DELAY_MS=N`, `DEMO_ERROR_RATE=0.3`, `DATABASE_URL` (for `POST /write`; what a
//! PostgreSQL strategy's binding gives a release), `DEMO_EXIT_CODE=N`, `DEMO_DRAIN_MS=N` (drain
//! bound, default 30 s) and `DEMO_IGNORE_SIGTERM=1` (a stuck release). On SIGTERM or SIGINT it
//! stops accepting, finishes in-flight requests (bounded) and exits 0.
//!
//! In-process, for tests and examples:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use bluegreen_demo::{client, DemoConfig, DemoServer};
//!
//! let server = DemoServer::start(DemoConfig::new("v2", "green")).await?;
//! let res = client::get(server.local_addr(), "/").await?;
//! assert_eq!(res.status, 200);
//! assert_eq!(res.body, "version=v2 slot=green\n");
//! assert_eq!(res.header("x-bluegreen-slot"), Some("green"));
//! let instance = server.local_addr().to_string();
//! assert_eq!(res.header("x-bluegreen-instance"), Some(instance.as_str()));
//! server.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Other crates' tests that need the executable use [`binary_path`].
//! Tests of WebSockets through a switch talk to `GET /ws` with [`ws_client`].
#![forbid(unsafe_code)]

mod binary;
pub mod client;
mod config;
mod db;
mod server;
pub mod ws_client;

pub use binary::binary_path;
pub use config::{ConfigError, DemoConfig, MAX_SLOW_MS};
pub use db::{DatabaseUrl, WRITES_TABLE};
pub use server::{serve, DemoServer};
