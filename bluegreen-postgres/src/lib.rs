#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod conn;
mod copied;
mod ident;
mod replicated;
mod shared;
mod sqlcheck;
mod store;
mod tools;
mod util;

pub use conn::{PgConfig, PgError};
pub use copied::{Copied, CopiedConfig, CopyReport};
pub use ident::{quote_ident, quote_literal, validate_ident};
pub use replicated::{
    AfterCutover, CutoverReport, Replicated, ReplicatedConfig, ReplicationStatus,
};
pub use shared::{Migration, MigrationPhase, ReleaseMigrationsFn, Shared, SharedConfig};
pub use store::{PostgresStateStore, PostgresStoreConfig};
