#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod conn;
mod copied;
mod error;
mod ident;
mod replicated;
mod shared;
mod sqlcheck;
mod store;
mod tools;
mod util;
mod versioned;

pub use conn::PostgresConfig;
pub use copied::{CopiedConfig, CopiedDatabase, CopyReport};
pub use error::PostgresError;
pub use ident::{quote_ident, quote_literal, validate_ident};
pub use replicated::{
    AfterCutover, CutoverReport, ReplicatedConfig, ReplicatedDatabase, ReplicationStatus,
};
pub use shared::{
    Migration, MigrationPhase, ReleaseMigrationsFn, SchemaOperationsFn, SharedConfig,
    SharedDatabase,
};
pub use store::{PostgresStateStore, PostgresStoreConfig};
pub use versioned::{ColumnDef, Operation, SchemaReport, VersionedConfig};

/// The backend name the state store reports in errors; the strategies report
/// `postgres shared`, `postgres copied` and `postgres replicated`.
pub const NAME: &str = "postgres";
