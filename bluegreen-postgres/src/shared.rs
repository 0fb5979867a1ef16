//! [`SharedDatabase`]: both slots use one database; schema changes go through expand/contract migrations.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bluegreen_core::{
    DatabaseStrategy, DbBinding, DbContext, DbStep, Error, Prepared, Result, Slot, Version,
};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::conn::PostgresConfig;
use crate::error::{fail, pg_error};
use crate::ident::{quote_ident, validate_ident};
use crate::sqlcheck;
use crate::versioned::{self, Operation, SchemaReport, VersionedConfig};

const BACKEND: &str = "postgres shared";

/// When a migration runs. In files: `"expand"`, `"contract"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum MigrationPhase {
    /// Before the switch; must keep the old release working (checked).
    Expand,
    /// At finalize, after the old slot is gone; irreversible.
    Contract,
}

impl MigrationPhase {
    /// `expand` or `contract`.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Expand => "expand",
            MigrationPhase::Contract => "contract",
        }
    }
}

/// One plain-SQL migration: a unique name (its order key), a phase, and the SQL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Migration {
    /// Unique name, e.g. `0003_add_status`. Migrations run in the order given.
    pub name: String,
    /// Expand or contract.
    pub phase: MigrationPhase,
    /// The SQL (one or more statements; run in one transaction).
    pub sql: String,
}

impl Migration {
    /// An expand migration.
    pub fn expand(name: impl Into<String>, sql: impl Into<String>) -> Self {
        Migration {
            name: name.into(),
            phase: MigrationPhase::Expand,
            sql: sql.into(),
        }
    }

    /// A contract migration.
    pub fn contract(name: impl Into<String>, sql: impl Into<String>) -> Self {
        Migration {
            name: name.into(),
            phase: MigrationPhase::Contract,
            sql: sql.into(),
        }
    }

    /// Loads `<name>.expand.sql` and `<name>.contract.sql` files from `dir`, ordered by file name.
    /// Any other `.sql` file is an error (a typo must not be skipped silently).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Vec<Migration>> {
        let dir = dir.as_ref();
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("reading migrations in {}", dir.display()), e))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|p| {
                let file = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                let (name, phase) = if let Some(n) = file.strip_suffix(".expand.sql") {
                    (n, MigrationPhase::Expand)
                } else if let Some(n) = file.strip_suffix(".contract.sql") {
                    (n, MigrationPhase::Contract)
                } else {
                    return Err(Error::invalid(
                        "migration file",
                        p.display().to_string(),
                        "name it <name>.expand.sql or <name>.contract.sql",
                    ));
                };
                let sql = std::fs::read_to_string(&p)
                    .map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
                Ok(Migration {
                    name: name.to_string(),
                    phase,
                    sql,
                })
            })
            .collect()
    }

    /// Checks an expand migration: every statement must keep the old release working. Refused:
    /// `DROP TABLE`/`VIEW`/`SCHEMA`, `DROP COLUMN`, `RENAME`, `SET SCHEMA`,
    /// `ALTER COLUMN … TYPE`, `SET NOT NULL`, `ADD COLUMN … NOT NULL` without `DEFAULT`.
    /// The error names the statement. Contract migrations are not checked.
    pub fn check(&self) -> Result<()> {
        if self.phase == MigrationPhase::Contract {
            return Ok(());
        }
        for stmt in sqlcheck::split(&self.sql) {
            if let Some(why) = sqlcheck::breaking_reason(&stmt) {
                let shown: String = stmt.text.split_whitespace().collect::<Vec<_>>().join(" ");
                return Err(Error::invalid(
                    "expand migration statement",
                    shown,
                    format!(
                        "{why} in expand migration {} breaks the release still running on the \
                         old slot; move it to a contract migration",
                        self.name
                    ),
                ));
            }
        }
        Ok(())
    }

    fn checksum(&self) -> String {
        format!("{:016x}", fnv64(&self.sql))
    }
}

/// FNV-1a, 64 bits: detects a migration edited after it was applied; short stable name tags.
pub(crate) fn fnv64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Settings of [`SharedDatabase`]. In files only `connection` is required.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
#[non_exhaustive]
pub struct SharedConfig {
    /// The shared database (as the migrating user).
    pub connection: PostgresConfig,
    /// Migrations, in order.
    #[serde(default)]
    pub migrations: Vec<Migration>,
    /// Schema of the record table (default `public`).
    #[serde(default = "public")]
    pub schema: String,
    /// Name of the record table (default `bluegreen_migrations`).
    #[serde(default = "default_table")]
    pub table: String,
    /// How long to wait for another deployer's migration lock (default 5 min).
    #[serde(default = "five_minutes", with = "bluegreen_core::config::duration")]
    pub lock_wait: Duration,
    /// Settings handed to releases instead of `connection`'s (e.g. an application role).
    #[serde(default)]
    pub binding: Option<PostgresConfig>,
    /// The versioned-schema mode (off by default): each release reads and writes through its
    /// own schema of views, see [`SharedDatabase::with_schema_versions`].
    #[serde(default)]
    pub versioned: Option<VersionedConfig>,
}

bluegreen_core::validated_serde!(SharedConfig);

fn public() -> String {
    "public".into()
}
fn default_table() -> String {
    "bluegreen_migrations".into()
}
fn five_minutes() -> Duration {
    Duration::from_secs(300)
}

impl SharedConfig {
    /// Defaults for `connection`, no migrations.
    pub fn new(connection: PostgresConfig) -> Self {
        SharedConfig {
            connection,
            migrations: Vec::new(),
            schema: public(),
            table: default_table(),
            lock_wait: five_minutes(),
            binding: None,
            versioned: None,
        }
    }

    /// Checks the connection, the record table's names, and every migration: unique names, and
    /// expand migrations that keep the old release working (also run when deserializing and by
    /// [`SharedDatabase::new`]).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the setting or the refused statement.
    pub fn validate(&self) -> Result<()> {
        self.connection.validate()?;
        validate_ident("schema", &self.schema)?;
        validate_ident("table", &self.table)?;
        if let Some(v) = &self.versioned {
            v.validate()?;
        }
        check_migrations(&self.migrations)
    }

    /// Turns on the versioned-schema mode with `versioned`'s settings.
    pub fn with_versioned(mut self, versioned: VersionedConfig) -> Self {
        self.versioned = Some(versioned);
        self
    }

    /// Adds a migration.
    pub fn with_migration(mut self, m: Migration) -> Self {
        self.migrations.push(m);
        self
    }

    /// Adds migrations.
    pub fn with_migrations(mut self, ms: impl IntoIterator<Item = Migration>) -> Self {
        self.migrations.extend(ms);
        self
    }

    /// With the record table in `schema`.`table`.
    pub fn with_table(mut self, schema: impl Into<String>, table: impl Into<String>) -> Self {
        self.schema = schema.into();
        self.table = table.into();
        self
    }

    /// How long to wait for the migration lock.
    pub fn with_lock_wait(mut self, d: Duration) -> Self {
        self.lock_wait = d;
        self
    }

    /// Connection settings handed to releases.
    pub fn with_binding(mut self, binding: PostgresConfig) -> Self {
        self.binding = Some(binding);
        self
    }
}

/// Finds the migrations a release ships with, by its version (see
/// [`SharedDatabase::with_release_migrations`]).
pub type ReleaseMigrationsFn = Arc<dyn Fn(&Version) -> Result<Vec<Migration>> + Send + Sync>;

/// Finds the schema operations a release ships with, by its version (see
/// [`SharedDatabase::with_schema_versions`]).
pub type SchemaOperationsFn = Arc<dyn Fn(&Version) -> Result<Vec<Operation>> + Send + Sync>;

/// Both slots use one database. Schema changes are plain SQL migrations in two phases:
///
/// - **expand** migrations run in `prepare` (before the new release starts) and must keep the old
///   release working; statements that would break it are refused before anything runs;
/// - **contract** migrations run in `finalize`, after the old slot is gone, and are reported as
///   irreversible.
///
/// Each migration runs once, in its own transaction, recorded in `bluegreen_migrations` (name,
/// phase, checksum, time); a recorded migration whose SQL changed is an error. Deployers serialize on
/// a PostgreSQL advisory lock, so two machines never run the same migration. `rollback` leaves
/// expand migrations: they are compatible with the old release and stay.
///
/// The migrations of a release are [`SharedConfig::migrations`] (the same for every release)
/// followed by the ones it ships with, found by its version
/// ([`with_release_migrations`](Self::with_release_migrations)): one `SharedDatabase`, and so one
/// `Deployer`, serves every release.
///
/// In the versioned-schema mode ([`SharedConfig::with_versioned`]) each release also ships
/// declarative [`Operation`]s ([`with_schema_versions`](Self::with_schema_versions)) and reads and
/// writes through its own schema of views, both releases at once: `prepare` expands (after the
/// migrations), `rollback` drops the target's version, `finalize` contracts once the old release
/// is gone (irreversible). See the crate README.
#[derive(Clone)]
pub struct SharedDatabase {
    config: SharedConfig,
    table: String,
    release_migrations: Option<ReleaseMigrationsFn>,
    schema_operations: Option<SchemaOperationsFn>,
}

impl fmt::Debug for SharedDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedDatabase")
            .field("config", &self.config)
            .field("table", &self.table)
            .field("release_migrations", &self.release_migrations.is_some())
            .field("schema_operations", &self.schema_operations.is_some())
            .finish()
    }
}

impl SharedDatabase {
    /// A strategy with `config`; checks names and every expand migration.
    pub fn new(config: SharedConfig) -> Result<Self> {
        config.validate()?;
        let table = format!(
            "{}.{}",
            quote_ident(&config.schema),
            quote_ident(&config.table)
        );
        Ok(SharedDatabase {
            config,
            table,
            release_migrations: None,
            schema_operations: None,
        })
    }

    /// Finds the migrations each release ships with by its version: `find(version)` returns them
    /// in order. They run after [`SharedConfig::migrations`], expand ones in `prepare`, contract
    /// ones in `finalize` (of the release then live). They are checked like the config's, when
    /// the release is prepared: a release whose expand migration would break the live one is
    /// refused before anything runs.
    ///
    /// ```
    /// # use bluegreen_postgres::{Migration, PostgresConfig, SharedConfig, SharedDatabase};
    /// let shared = SharedDatabase::new(SharedConfig::new(PostgresConfig::new("127.0.0.1", 5432, "app")))?
    ///     .with_release_migrations(|version| {
    ///         let mut m = vec![Migration::expand("001_orders", "CREATE TABLE orders (id int)")];
    ///         if version.as_str() >= "v2" {
    ///             m.push(Migration::expand("002_note", "ALTER TABLE orders ADD COLUMN note text"));
    ///         }
    ///         Ok(m)
    ///     });
    /// # let _ = shared;
    /// # Ok::<(), bluegreen_core::Error>(())
    /// ```
    pub fn with_release_migrations<F>(mut self, find: F) -> Self
    where
        F: Fn(&Version) -> Result<Vec<Migration>> + Send + Sync + 'static,
    {
        self.release_migrations = Some(Arc::new(find));
        self
    }

    /// The migrations of the release `version`, in order, checked: the config's, then the ones
    /// it ships with.
    pub fn migrations_for(&self, version: &Version) -> Result<Vec<Migration>> {
        let mut all = self.config.migrations.clone();
        if let Some(find) = &self.release_migrations {
            all.extend(find(version)?);
            check_migrations(&all)?;
        }
        Ok(all)
    }

    fn release_config(&self) -> PostgresConfig {
        self.config
            .binding
            .clone()
            .unwrap_or_else(|| self.config.connection.clone())
    }

    /// What release `version` connects with: the binding's settings, and in the versioned mode
    /// its `search_path` (`<schema>_<version>,<schema>`) in `PGOPTIONS` and in `DATABASE_URL`'s
    /// `options`.
    fn binding(&self, version: &Version) -> Result<DbBinding> {
        let cfg = self.release_config();
        let mut b = cfg.binding();
        if let Some(v) = &self.config.versioned {
            let opt = versioned::search_path_option(v, version)?;
            let url = cfg.url();
            let sep = if url.expose().contains('?') { '&' } else { '?' };
            let enc: String = opt
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            b = b.with_env("PGOPTIONS", opt).with_secret(
                "DATABASE_URL",
                format!("{}{sep}options={enc}", url.expose()),
            );
        }
        Ok(b)
    }

    /// Reads each release's schema operations with `find(version)` (the versioned-schema mode,
    /// which [`SharedConfig::with_versioned`] turns on; without `find`, they are read from
    /// [`VersionedConfig::operations_dir`]). A release's operations take the schema of the
    /// release before it to its own; they run in `prepare` (expand), are dropped by `rollback`,
    /// and are completed by `finalize` once the old release is gone (contract).
    ///
    /// ```
    /// # use bluegreen_postgres::{Operation, PostgresConfig, SharedConfig, SharedDatabase, VersionedConfig};
    /// let config = SharedConfig::new(PostgresConfig::new("127.0.0.1", 5432, "app"))
    ///     .with_versioned(VersionedConfig::default());
    /// let shared = SharedDatabase::new(config)?.with_schema_versions(|version| {
    ///     Ok(match version.as_str() {
    ///         "v2" => vec![Operation::RenameColumn {
    ///             table: "orders".into(),
    ///             from: "note".into(),
    ///             to: "memo".into(),
    ///         }],
    ///         _ => vec![],
    ///     })
    /// });
    /// # let _ = shared;
    /// # Ok::<(), bluegreen_core::Error>(())
    /// ```
    pub fn with_schema_versions<F>(mut self, find: F) -> Self
    where
        F: Fn(&Version) -> Result<Vec<Operation>> + Send + Sync + 'static,
    {
        self.schema_operations = Some(Arc::new(find));
        self
    }

    /// The schema operations of release `version`, checked.
    pub fn schema_operations_for(&self, version: &Version) -> Result<Vec<Operation>> {
        let ops = match (&self.schema_operations, &self.config.versioned) {
            (Some(find), _) => find(version)?,
            (None, Some(v)) => v.operations_from_dir(version)?,
            (None, None) => Vec::new(),
        };
        versioned::check_operations(&ops)?;
        Ok(ops)
    }

    fn versioned_config(&self, what: &str) -> Result<&VersionedConfig> {
        self.config.versioned.as_ref().ok_or_else(|| {
            Error::invalid(
                "versioned",
                what,
                "the versioned-schema mode is off: set SharedConfig::versioned",
            )
        })
    }

    /// Runs `f` on a connection holding the migration lock.
    async fn with_versioned<T>(
        &self,
        what: &str,
        f: impl for<'c> FnOnce(
            versioned::Versioned<'c>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T>> + Send + 'c>,
        >,
    ) -> Result<T> {
        let cfg = self.versioned_config(what)?;
        let client = self.config.connection.connect(BACKEND).await?;
        self.lock(&client).await?;
        let grant_to = self
            .config
            .binding
            .as_ref()
            .map(|b| b.user.clone())
            .filter(|u| *u != self.config.connection.user);
        let res = f(versioned::Versioned {
            cfg,
            c: &client,
            grant_to,
        })
        .await;
        let _ = client
            .execute(
                "SELECT pg_advisory_unlock(hashtext($1))",
                &[&self.lock_key()],
            )
            .await;
        res
    }

    /// Expand (versioned mode): makes the physical changes of release `version`'s operations
    /// (only additive ones), its sync triggers and batched backfills, and its views in
    /// `<schema>_<version>`. Idempotent; an interrupted expand of another version is rolled
    /// back first. Refused while another version is expanded and not contracted.
    pub async fn expand_schema(&self, version: &Version) -> Result<SchemaReport> {
        self.expand_for(version, None).await
    }

    async fn expand_for(&self, version: &Version, slot: Option<Slot>) -> Result<SchemaReport> {
        let ops = self.schema_operations_for(version)?;
        let v = version.clone();
        self.with_versioned("expand", move |x| {
            Box::pin(async move { x.expand(&v, &ops, slot).await })
        })
        .await
    }

    /// Rollback (versioned mode): drops release `version`'s schema version (views, triggers,
    /// new columns and tables, indexes, constraints); the old release's schema stays as it was.
    /// `Ok(false)` when there was nothing to drop. Raw SQL is not undone.
    pub async fn rollback_schema(&self, version: &Version) -> Result<bool> {
        self.rollback_for(version, None).await
    }

    async fn rollback_for(&self, version: &Version, slot: Option<Slot>) -> Result<bool> {
        let v = version.clone();
        self.with_versioned("rollback", move |x| {
            Box::pin(async move { x.rollback(&v, slot).await })
        })
        .await
    }

    /// Contract (versioned mode), once only release `live` runs: drops the previous release's
    /// views, the triggers, the old columns, renames the new columns to their final names and
    /// makes `NOT NULL` checks real. Irreversible. Versions abandoned by a switch back to
    /// `live` are dropped instead.
    pub async fn contract_schema(&self, live: &Version) -> Result<SchemaReport> {
        let v = live.clone();
        self.with_versioned("contract", move |x| {
            Box::pin(async move { x.contract(&v).await })
        })
        .await
    }

    /// Applies the pending migrations of `phase` in [`SharedConfig::migrations`]; returns the
    /// names applied.
    pub async fn migrate(&self, phase: MigrationPhase) -> Result<Vec<String>> {
        self.migrate_list(&self.config.migrations, phase).await
    }

    /// Applies the pending migrations of `phase` of the release `version`
    /// ([`migrations_for`](Self::migrations_for)); returns the names applied.
    pub async fn migrate_release(
        &self,
        version: &Version,
        phase: MigrationPhase,
    ) -> Result<Vec<String>> {
        let migrations = self.migrations_for(version)?;
        self.migrate_list(&migrations, phase).await
    }

    async fn migrate_list(
        &self,
        migrations: &[Migration],
        phase: MigrationPhase,
    ) -> Result<Vec<String>> {
        let mut client = self.config.connection.connect(BACKEND).await?;
        self.lock(&client).await?;
        let res = self.migrate_locked(&mut client, migrations, phase).await;
        // Closing the session releases the advisory lock even if this unlock fails.
        let _ = client
            .execute(
                "SELECT pg_advisory_unlock(hashtext($1))",
                &[&self.lock_key()],
            )
            .await;
        res
    }

    fn lock_key(&self) -> String {
        format!("bluegreen-migrations:{}", self.table)
    }

    async fn lock(&self, client: &Client) -> Result<()> {
        let started = Instant::now();
        loop {
            let got: bool = client
                .query_one(
                    "SELECT pg_try_advisory_lock(hashtext($1))",
                    &[&self.lock_key()],
                )
                .await
                .map_err(|e| pg_error(BACKEND, "taking the migration lock", e))?
                .get(0);
            if got {
                return Ok(());
            }
            if started.elapsed() > self.config.lock_wait {
                return Err(Error::Timeout {
                    what: "the migration lock (another deployer is migrating)".into(),
                    after: self.config.lock_wait,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn migrate_locked(
        &self,
        client: &mut Client,
        migrations: &[Migration],
        phase: MigrationPhase,
    ) -> Result<Vec<String>> {
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {} (
                     name text PRIMARY KEY,
                     phase text NOT NULL,
                     checksum text NOT NULL,
                     applied_at timestamptz NOT NULL DEFAULT now())",
                self.table
            ))
            .await
            .map_err(|e| pg_error(BACKEND, "creating the migrations table", e))?;
        let rows = client
            .query(
                &format!("SELECT name, phase, checksum FROM {}", self.table),
                &[],
            )
            .await
            .map_err(|e| pg_error(BACKEND, "reading applied migrations", e))?;
        let applied: std::collections::HashMap<String, (String, String)> = rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        // Check everything before running anything.
        let mut pending = Vec::new();
        for m in migrations.iter().filter(|m| m.phase == phase) {
            match applied.get(&m.name) {
                Some((p, sum)) => {
                    if *sum != m.checksum() || p != m.phase.as_str() {
                        return Err(fail(
                            BACKEND,
                            "migrate",
                            format!(
                                "migration {} was changed after it was applied (recorded as {p}, \
                                 checksum {sum}); add a new migration instead",
                                m.name
                            ),
                        ));
                    }
                }
                None => {
                    m.check()?;
                    pending.push(m);
                }
            }
        }
        let mut done = Vec::new();
        for m in pending {
            let tx = client
                .transaction()
                .await
                .map_err(|e| pg_error(BACKEND, "migrate", e))?;
            tx.batch_execute(&m.sql).await.map_err(|e| {
                pg_error(
                    BACKEND,
                    &format!("{} migration {}", m.phase.as_str(), m.name),
                    e,
                )
            })?;
            tx.execute(
                &format!(
                    "INSERT INTO {} (name, phase, checksum) VALUES ($1, $2, $3)",
                    self.table
                ),
                &[&m.name, &m.phase.as_str(), &m.checksum()],
            )
            .await
            .map_err(|e| pg_error(BACKEND, "recording a migration", e))?;
            tx.commit()
                .await
                .map_err(|e| pg_error(BACKEND, &format!("committing migration {}", m.name), e))?;
            tracing::info!(migration = %m.name, phase = m.phase.as_str(), "migration applied");
            done.push(m.name.clone());
        }
        Ok(done)
    }
}

/// Names valid and unique; every expand migration keeps the old release working.
fn check_migrations(migrations: &[Migration]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for m in migrations {
        validate_ident("migration name", &m.name)?;
        if !seen.insert(m.name.as_str()) {
            return Err(Error::invalid(
                "migration name",
                &m.name,
                "used twice; names must be unique",
            ));
        }
        m.check()?;
    }
    Ok(())
}

// `before_switch` and `after_switch` keep the trait's no-op defaults: one database needs no sync.
// `rollback` leaves expand migrations (they keep the old release working) and, in the versioned
// mode, drops the target's schema version.
#[async_trait]
impl DatabaseStrategy for SharedDatabase {
    fn name(&self) -> &str {
        BACKEND
    }

    async fn bind(&self, ctx: &DbContext) -> Result<DbBinding> {
        self.binding(&ctx.release.version)
    }

    async fn prepare(&self, ctx: &DbContext) -> Result<Prepared> {
        let done = self
            .migrate_release(&ctx.release.version, MigrationPhase::Expand)
            .await?;
        let mut summary = if done.is_empty() {
            "no pending expand migrations".to_string()
        } else {
            format!("applied expand migrations: {}", done.join(", "))
        };
        let binding = self.binding(&ctx.release.version)?;
        if self.config.versioned.is_some() {
            let report = self
                .expand_for(&ctx.release.version, Some(ctx.target))
                .await?;
            summary = format!("{summary}; {}", report.summary);
            if report.irreversible {
                return Ok(Prepared::new(binding, DbStep::irreversible(summary)));
            }
        }
        Ok(Prepared::new(binding, DbStep::reversible(summary)))
    }

    async fn rollback(&self, ctx: &DbContext) -> Result<()> {
        if self.config.versioned.is_some() {
            // Only what was expanded for this target: a failed redeploy of the live version to
            // the other slot must not drop the schema the live slot uses.
            self.rollback_for(&ctx.release.version, Some(ctx.target))
                .await?;
        }
        Ok(())
    }

    async fn finalize(&self, ctx: &DbContext) -> Result<DbStep> {
        let done = self
            .migrate_release(&ctx.release.version, MigrationPhase::Contract)
            .await?;
        let mut irreversible = !done.is_empty();
        let mut summary = if done.is_empty() {
            "no pending contract migrations".to_string()
        } else {
            format!("applied contract migrations: {}", done.join(", "))
        };
        if self.config.versioned.is_some() {
            let report = self.contract_schema(&ctx.release.version).await?;
            irreversible |= report.irreversible;
            summary = format!("{summary}; {}", report.summary);
        }
        Ok(if irreversible {
            DbStep::irreversible(summary)
        } else {
            DbStep::reversible(summary)
        })
    }
}
