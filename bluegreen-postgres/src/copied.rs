//! [`CopiedDatabase`]: each slot has its own database, cloned from the live one at prepare time.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bluegreen_core::{
    DatabaseStrategy, DbBinding, DbContext, DbStep, Error, Prepared, Result, Slot,
};
use futures_util::{pin_mut, SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::conn::PostgresConfig;
use crate::error::{fail, pg_error};
use crate::ident::quote_ident;
use crate::tools::{dump_into, dump_restore_parallel};
use crate::util::{
    copy_sequences, database_comment, database_exists, distinct, drop_database,
    set_database_comment, user_tables, SlotDatabases, TableRef,
};

const BACKEND: &str = "postgres copied";
const MARK_DONE: &str = "bluegreen copied:";
const MARK_SWITCHED: &str = "bluegreen copied (switched):";

/// Settings of [`CopiedDatabase`]. In files only `server` (or `connection`) is required.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
#[non_exhaustive]
pub struct CopiedConfig {
    /// The server holding the live database; its `dbname` is the base database (live before the
    /// first deploy; the slots use `<base>_blue` and `<base>_green` unless configured).
    #[serde(alias = "connection")]
    pub server: PostgresConfig,
    /// The server the copies go to (default: the same server).
    #[serde(default)]
    pub target_server: Option<PostgresConfig>,
    /// Per-slot database names overriding `<base>_<slot>`.
    #[serde(default)]
    pub slot_databases: bluegreen_core::PerSlot<Option<String>>,
    /// Parallel COPY workers (default 2).
    #[serde(default = "two")]
    pub workers: usize,
    /// Use `CREATE DATABASE … TEMPLATE <live>` (same server only; refused while anyone else is
    /// connected to the live database). Default false.
    #[serde(default)]
    pub template: bool,
    /// Directory of `pg_dump` and `psql` (default: the newest `/usr/lib/postgresql/*/bin`, else
    /// `PATH`). They must be at least as new as the server.
    #[serde(default)]
    pub bin_dir: Option<PathBuf>,
    /// Bound for the whole copy (default 1 hour).
    #[serde(default = "one_hour", with = "bluegreen_core::config::duration")]
    pub timeout: Duration,
    /// Drop the previous live slot's database in `finalize` (default true). The base database is
    /// never dropped.
    #[serde(default = "yes")]
    pub drop_old_on_finalize: bool,
    /// Settings handed to releases instead of `server`'s (e.g. an application role); the database
    /// name is replaced by the slot's.
    #[serde(default)]
    pub binding: Option<PostgresConfig>,
}

bluegreen_core::validated_serde!(CopiedConfig);

fn two() -> usize {
    2
}
fn one_hour() -> Duration {
    Duration::from_secs(3600)
}
fn yes() -> bool {
    true
}

impl CopiedConfig {
    /// Defaults for `server` (whose `dbname` is the base database).
    pub fn new(server: PostgresConfig) -> Self {
        CopiedConfig {
            server,
            target_server: None,
            slot_databases: Default::default(),
            workers: two(),
            template: false,
            bin_dir: None,
            timeout: one_hour(),
            drop_old_on_finalize: yes(),
            binding: None,
        }
    }

    /// Checks both servers, every database name and the worker count (also run when
    /// deserializing; [`CopiedDatabase::new`] checks the same).
    ///
    /// # Errors
    /// [`Error::InvalidInput`](bluegreen_core::Error::InvalidInput) naming the setting.
    pub fn validate(&self) -> Result<()> {
        if self.workers == 0 {
            return Err(bluegreen_core::Error::invalid(
                "workers",
                "0",
                "at least one COPY worker",
            ));
        }
        SlotDatabases::for_strategy(
            &self.server,
            self.target_server.as_ref(),
            &self.slot_databases,
        )
        .map(|_| ())
    }

    /// Copies go to another server.
    pub fn with_target_server(mut self, target: PostgresConfig) -> Self {
        self.target_server = Some(target);
        self
    }

    /// Names `slot`'s database.
    pub fn with_slot_database(mut self, slot: Slot, db: impl Into<String>) -> Self {
        self.slot_databases.set(slot, Some(db.into()));
        self
    }

    /// With `n` parallel COPY workers (at least 1).
    pub fn with_workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// Opt in to the `CREATE DATABASE … TEMPLATE` fast path.
    pub fn with_template(mut self, yes: bool) -> Self {
        self.template = yes;
        self
    }

    /// Where `pg_dump` and `psql` are.
    pub fn with_bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// Bound for the whole copy.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether `finalize` drops the previous live slot's database.
    pub fn with_drop_old_on_finalize(mut self, yes: bool) -> Self {
        self.drop_old_on_finalize = yes;
        self
    }

    /// Connection settings handed to releases (user, password); the database is the slot's.
    pub fn with_binding(mut self, binding: PostgresConfig) -> Self {
        self.binding = Some(binding);
        self
    }
}

/// What one copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CopyReport {
    /// Source database.
    pub source: String,
    /// Target database.
    pub target: String,
    /// The exported snapshot the data was read in (`None` for the template path).
    pub snapshot: Option<String>,
    /// Tables copied.
    pub tables: usize,
    /// Rows copied.
    pub rows: u64,
    /// Bytes of COPY data streamed.
    pub bytes: u64,
    /// Sequences set.
    pub sequences: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// True when `CREATE DATABASE … TEMPLATE` was used.
    pub template: bool,
}

/// Each slot gets its own database, cloned from the live one while it keeps serving.
///
/// The copy is consistent: one session exports a snapshot (`pg_export_snapshot()`) and keeps it
/// open; the schema comes from `pg_dump --snapshot=<id> --section=pre-data` piped into `psql`, then
/// parallel workers each join the snapshot (`SET TRANSACTION SNAPSHOT`) and stream
/// `COPY … TO STDOUT (FORMAT binary)` into `COPY … FROM STDIN (FORMAT binary)` on the target, then
/// sequences are set from the source and `--section=post-data` (indexes, constraints, triggers)
/// is applied with `pg_restore -j <workers>` (indexes of different tables built in parallel). On
/// any failure the target database is dropped.
///
/// **Writes made to the live database after the snapshot are not in the copy.** When the target
/// must have every write, use [`ReplicatedDatabase`](crate::ReplicatedDatabase), which streams them by logical
/// replication until the cutover.
#[derive(Debug, Clone)]
pub struct CopiedDatabase {
    config: CopiedConfig,
    dbs: SlotDatabases,
}

impl CopiedDatabase {
    /// A strategy with `config`; validates the database names.
    pub fn new(config: CopiedConfig) -> Result<Self> {
        let dbs = SlotDatabases::for_strategy(
            &config.server,
            config.target_server.as_ref(),
            &config.slot_databases,
        )?;
        Ok(CopiedDatabase { config, dbs })
    }

    /// The database `slot` uses.
    pub fn database_of(&self, slot: Slot) -> String {
        self.dbs.of(slot)
    }

    fn target_server(&self) -> &PostgresConfig {
        self.config
            .target_server
            .as_ref()
            .unwrap_or(&self.config.server)
    }

    fn binding_for(&self, db: &str) -> DbBinding {
        crate::util::binding_for(self.config.binding.as_ref(), self.target_server(), db)
    }

    /// Copies database `source` (on the server) into a new database `target` (on the target
    /// server), replacing it if it exists; drops the target on failure.
    pub async fn copy_database(&self, source: &str, target: &str) -> Result<CopyReport> {
        crate::ident::validate_ident("database", source)?;
        crate::ident::validate_ident("database", target)?;
        distinct(BACKEND, "copy", source, target)?;
        let admin = self.target_server().db("postgres").connect(BACKEND).await?;
        let started = Instant::now();
        let res =
            tokio::time::timeout(self.config.timeout, self.copy_inner(&admin, source, target))
                .await
                .unwrap_or_else(|_| {
                    Err(Error::Timeout {
                        what: format!("copying database {source} into {target}"),
                        after: self.config.timeout,
                    })
                });
        match res {
            Ok(mut r) => {
                r.elapsed = started.elapsed();
                tracing::info!(
                    source, target, tables = r.tables, rows = r.rows, bytes = r.bytes,
                    elapsed = ?r.elapsed, "database copied"
                );
                Ok(r)
            }
            Err(e) => {
                if let Err(d) = drop_database(BACKEND, &admin, target).await {
                    tracing::warn!(error = %d, target, "could not drop the failed copy");
                }
                Err(e)
            }
        }
    }

    async fn copy_inner(&self, admin: &Client, source: &str, target: &str) -> Result<CopyReport> {
        drop_database(BACKEND, admin, target).await?;
        if self.config.template {
            return self.copy_by_template(admin, source, target).await;
        }
        admin
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(target)))
            .await
            .map_err(|e| pg_error(BACKEND, &format!("creating database {target}"), e))?;

        // The snapshot session: open until the copy is done.
        let src_cfg = self.config.server.db(source);
        let snap_client = src_cfg.connect(BACKEND).await?;
        let msgs = snap_client
            .simple_query(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT pg_export_snapshot();",
            )
            .await
            .map_err(|e| pg_error(BACKEND, "exporting a snapshot", e))?;
        let snapshot = msgs
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .ok_or_else(|| fail(BACKEND, "exporting a snapshot", "no snapshot id returned"))?;
        if !snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(fail(
                BACKEND,
                "exporting a snapshot",
                "unexpected snapshot id",
            ));
        }
        let tgt_cfg = self.target_server().db(target);
        let bin = self.config.bin_dir.as_deref();

        dump_into(
            BACKEND,
            bin,
            &src_cfg,
            &[
                format!("--snapshot={snapshot}"),
                "--section=pre-data".into(),
            ],
            &tgt_cfg,
            self.config.timeout,
        )
        .await?;

        let tables = user_tables(BACKEND, &snap_client).await?;
        let ntables = tables.len();
        let queue = Arc::new(Mutex::new(tables.into_iter().collect::<VecDeque<_>>()));
        let workers = self.config.workers.min(ntables).max(1);
        let mut handles = Vec::new();
        for _ in 0..workers {
            let (queue, src_cfg, tgt_cfg, snapshot) = (
                queue.clone(),
                src_cfg.clone(),
                tgt_cfg.clone(),
                snapshot.clone(),
            );
            handles.push(tokio::spawn(async move {
                copy_worker(queue, &src_cfg, &tgt_cfg, &snapshot).await
            }));
        }
        let (mut rows, mut bytes, mut first_err) = (0u64, 0u64, None);
        for h in handles {
            match h.await {
                Ok(Ok((r, b))) => {
                    rows += r;
                    bytes += b;
                }
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(fail(BACKEND, "copy worker", e.to_string()));
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }

        let tgt_client = tgt_cfg.connect(BACKEND).await?;
        let sequences = copy_sequences(BACKEND, &snap_client, &tgt_client, 0).await?;
        // Indexes and constraints after the data, several at a time.
        dump_restore_parallel(
            BACKEND,
            bin,
            &src_cfg,
            &[
                format!("--snapshot={snapshot}"),
                "--section=post-data".into(),
            ],
            &tgt_cfg,
            self.config.workers,
            self.config.timeout,
        )
        .await?;
        let _ = snap_client.batch_execute("COMMIT").await;
        Ok(CopyReport {
            source: source.into(),
            target: target.into(),
            snapshot: Some(snapshot),
            tables: ntables,
            rows,
            bytes,
            sequences,
            elapsed: Duration::ZERO,
            template: false,
        })
    }

    async fn copy_by_template(
        &self,
        admin: &Client,
        source: &str,
        target: &str,
    ) -> Result<CopyReport> {
        if self.config.target_server.is_some() {
            return Err(Error::invalid(
                "copied strategy",
                "template",
                "CREATE DATABASE … TEMPLATE works only on one server; remove the target server \
                 or the template option",
            ));
        }
        // Client sessions only: PostgreSQL ends autovacuum workers itself before the copy, and
        // counting them (or walsenders, background workers) named connections no client has.
        let others: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()
                   AND backend_type = 'client backend'",
                &[&source],
            )
            .await
            .map_err(|e| pg_error(BACKEND, "counting connections", e))?
            .get(0);
        if others > 0 {
            return Err(fail(
                BACKEND,
                "CREATE DATABASE … TEMPLATE",
                format!(
                    "database {source} has {others} other connection(s) from clients; the \
                     template copy needs none (it would fail, and it locks out new connections for the whole copy). \
                     Stop its clients or use the online copy (template = false)"
                ),
            ));
        }
        let op = format!("CREATE DATABASE {target} TEMPLATE {source}");
        if let Err(e) = admin
            .batch_execute(&format!(
                "CREATE DATABASE {} TEMPLATE {}",
                quote_ident(target),
                quote_ident(source)
            ))
            .await
        {
            let in_use = e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE);
            let err = pg_error(BACKEND, &op, e);
            if !in_use {
                return Err(err);
            }
            // Refused for processes that are not client sessions: say which.
            let others: Vec<String> = admin
                .query(
                    "SELECT backend_type || ' (pid ' || pid || ')' FROM pg_stat_activity
                     WHERE datname = $1 AND pid <> pg_backend_pid()
                       AND backend_type <> 'client backend' ORDER BY pid",
                    &[&source],
                )
                .await
                .map(|rows| rows.iter().map(|r| r.get(0)).collect())
                .unwrap_or_default();
            if others.is_empty() {
                return Err(err);
            }
            let said = match &err {
                bluegreen_core::Error::Backend { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            return Err(fail(
                BACKEND,
                &op,
                format!(
                    "{said}; connected to {source} besides clients: {}. Stop them (a \
                     subscription or a replication client reading {source}) or use the online \
                     copy (template = false)",
                    others.join(", ")
                ),
            ));
        }
        Ok(CopyReport {
            source: source.into(),
            target: target.into(),
            snapshot: None,
            tables: 0,
            rows: 0,
            bytes: 0,
            sequences: 0,
            elapsed: Duration::ZERO,
            template: true,
        })
    }
}

/// Bytes of COPY data sent to the target per message.
const BATCH: usize = 256 * 1024;

/// One worker: joins the snapshot, then copies tables from the queue until it is empty.
async fn copy_worker(
    queue: Arc<Mutex<VecDeque<TableRef>>>,
    src: &PostgresConfig,
    tgt: &PostgresConfig,
    snapshot: &str,
) -> Result<(u64, u64)> {
    let s = src.connect(BACKEND).await?;
    s.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        crate::ident::quote_literal(snapshot)
    ))
    .await
    .map_err(|e| pg_error(BACKEND, "joining the exported snapshot", e))?;
    let t = tgt.connect(BACKEND).await?;
    let (mut rows, mut bytes) = (0u64, 0u64);
    loop {
        let next = queue.lock().await.pop_front();
        let Some(table) = next else { break };
        let q = table.qualified();
        let out = s
            .copy_out(&format!("COPY {q} TO STDOUT (FORMAT binary)"))
            .await
            .map_err(|e| pg_error(BACKEND, &format!("COPY {q} TO STDOUT"), e))?;
        let sink = t
            .copy_in::<_, bytes::Bytes>(&format!("COPY {q} FROM STDIN (FORMAT binary)"))
            .await
            .map_err(|e| pg_error(BACKEND, &format!("COPY {q} FROM STDIN"), e))?;
        pin_mut!(out);
        pin_mut!(sink);
        // The source sends one message per row; batching rows into large messages saves the
        // per-message work on the target and here.
        let mut buf = bytes::BytesMut::with_capacity(BATCH * 2);
        while let Some(chunk) = out.next().await {
            let chunk = chunk.map_err(|e| pg_error(BACKEND, &format!("reading {q}"), e))?;
            bytes += chunk.len() as u64;
            buf.extend_from_slice(&chunk);
            if buf.len() >= BATCH {
                sink.feed(buf.split().freeze())
                    .await
                    .map_err(|e| pg_error(BACKEND, &format!("writing {q}"), e))?;
            }
        }
        if !buf.is_empty() {
            sink.feed(buf.split().freeze())
                .await
                .map_err(|e| pg_error(BACKEND, &format!("writing {q}"), e))?;
        }
        rows += sink
            .as_mut()
            .finish()
            .await
            .map_err(|e| pg_error(BACKEND, &format!("finishing COPY into {q}"), e))?;
    }
    let _ = s.batch_execute("COMMIT").await;
    Ok((rows, bytes))
}

#[async_trait]
impl DatabaseStrategy for CopiedDatabase {
    fn name(&self) -> &str {
        BACKEND
    }

    async fn bind(&self, ctx: &DbContext) -> Result<DbBinding> {
        Ok(self.binding_for(&self.dbs.of(ctx.target)))
    }

    async fn prepare(&self, ctx: &DbContext) -> Result<Prepared> {
        let source = self.dbs.live(ctx);
        let target = self.dbs.of(ctx.target);
        distinct(BACKEND, "prepare", &source, &target)?;
        let admin = self.target_server().db("postgres").connect(BACKEND).await?;
        let mark = format!(
            "{MARK_DONE} from {source} for release {}",
            ctx.release.version
        );
        let comment = database_comment(BACKEND, &admin, &target).await?;
        let switched = format!("{MARK_SWITCHED}{}", &mark[MARK_DONE.len()..]);
        if comment.as_deref() == Some(mark.as_str()) || comment.as_deref() == Some(&switched) {
            // Already copied (a switched copy may hold writes: never copy over it).
            return Ok(Prepared::new(
                self.binding_for(&target),
                DbStep::reversible(format!("{target} already copied from {source}")),
            ));
        }
        let r = self.copy_database(&source, &target).await?;
        set_database_comment(BACKEND, &admin, &target, &mark).await?;
        Ok(Prepared::new(
            self.binding_for(&target),
            DbStep::reversible(format!(
                "copied {source} into {target}: {} tables, {} rows, {} sequences in {:.1?}{}",
                r.tables,
                r.rows,
                r.sequences,
                r.elapsed,
                if r.template { " (template)" } else { "" }
            )),
        ))
    }

    async fn before_switch(&self, ctx: &DbContext) -> Result<DbStep> {
        // From here on, traffic may reach the copy: a rollback keeps it (renamed) instead of
        // dropping writes it may have received.
        let target = self.dbs.of(ctx.target);
        let admin = self.target_server().db("postgres").connect(BACKEND).await?;
        if let Some(c) = database_comment(BACKEND, &admin, &target).await? {
            if let Some(rest) = c.strip_prefix(MARK_DONE) {
                set_database_comment(BACKEND, &admin, &target, &format!("{MARK_SWITCHED}{rest}"))
                    .await?;
            }
        }
        Ok(DbStep::reversible(
            "nothing to sync: writes to the live database after the snapshot are not in the copy",
        ))
    }

    async fn rollback(&self, ctx: &DbContext) -> Result<()> {
        let target = self.dbs.of(ctx.target);
        if ctx.live.map(|l| self.dbs.of(l)) == Some(target.clone()) || target == self.dbs.base {
            return Ok(());
        }
        let admin = self.target_server().db("postgres").connect(BACKEND).await?;
        if !database_exists(BACKEND, &admin, &target).await? {
            return Ok(());
        }
        let comment = database_comment(BACKEND, &admin, &target).await?;
        if comment
            .as_deref()
            .is_some_and(|c| c.starts_with(MARK_SWITCHED))
        {
            // It may hold writes made after the switch: keep it under another name.
            let stamp = bluegreen_core::Timestamp::now().0 / 1000;
            let mut kept = format!("{target}_rolled_back_{stamp}");
            kept.truncate(63);
            tracing::warn!(
                target,
                kept,
                "keeping the rolled-back copy: it may hold writes"
            );
            admin
                .batch_execute(&format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = {};
                     ALTER DATABASE {} RENAME TO {}",
                    crate::ident::quote_literal(&target),
                    quote_ident(&target),
                    quote_ident(&kept)
                ))
                .await
                .map_err(|e| pg_error(BACKEND, &format!("renaming {target}"), e))?;
            return Ok(());
        }
        drop_database(BACKEND, &admin, &target).await
    }

    async fn finalize(&self, ctx: &DbContext) -> Result<DbStep> {
        let Some(old) = ctx.live.filter(|l| *l != ctx.target) else {
            return Ok(DbStep::reversible("nothing to drop on the first deploy"));
        };
        let old_db = self.dbs.of(old);
        if !self.config.drop_old_on_finalize {
            return Ok(DbStep::reversible(format!("kept {old_db}")));
        }
        let admin = self.config.server.db("postgres").connect(BACKEND).await?;
        drop_database(BACKEND, &admin, &old_db).await?;
        Ok(DbStep::irreversible(format!(
            "dropped the previous live database {old_db}"
        )))
    }
}
