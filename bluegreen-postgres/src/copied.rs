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
use crate::tools::{dump_into, dump_to_file, restore_file};
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
    /// Parallel COPY workers (default 2). They also build the indexes and constraints after the
    /// data (`pg_restore -j <workers>`).
    #[serde(default = "two")]
    pub workers: usize,
    /// Tables whose heap is larger than this many bytes are copied in ranges of pages
    /// (`WHERE ctid >= '(a,0)' AND ctid < '(b,0)'`, a TID range scan on PostgreSQL 14+), about
    /// this size each and at least one per worker, so that several workers share one big table;
    /// all ranges are read in the one exported snapshot. PostgreSQL before 14 is never split.
    /// Default 0: never split. Splitting uses more cores for the data but costs CPU: the
    /// workers' pages interleave, so the index builds sort unsorted input, and a split table
    /// cannot be loaded with FREEZE. It pays only with idle cores on both servers (measured in
    /// `bench/RESULTS.md`: a net loss on 2 busy cores); try 64 MiB (`67108864`) there.
    #[serde(default = "split_default")]
    pub split_table_bytes: u64,
    /// `maintenance_work_mem` in MiB for the index and constraint builds after the data (each of
    /// the `workers` sessions may use this much; PostgreSQL's parallel index build shares it
    /// among its processes). 0 keeps the server's setting. At most 2097151 (the server's
    /// maximum). Default 256.
    #[serde(default = "mwm_default")]
    pub maintenance_work_mem_mb: u32,
    /// Tables copied whole (not split) are loaded with `COPY … (FREEZE)` after a `TRUNCATE ONLY`
    /// of the empty new table in the same transaction: rows arrive frozen and all-visible, so the
    /// index builds and the first reads do not rewrite every page to set hint bits, and no
    /// anti-wraparound vacuum has to freeze them later. Default true.
    #[serde(default = "yes")]
    pub copy_freeze: bool,
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
fn split_default() -> u64 {
    0
}
fn mwm_default() -> u32 {
    256
}
/// PostgreSQL's largest `maintenance_work_mem` (`MAX_KILOBYTES` on 64-bit builds), in MiB.
const MAX_MWM_MB: u32 = 2_097_151;
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
            split_table_bytes: split_default(),
            maintenance_work_mem_mb: mwm_default(),
            copy_freeze: yes(),
            template: false,
            bin_dir: None,
            timeout: one_hour(),
            drop_old_on_finalize: yes(),
            binding: None,
        }
    }

    /// Checks both servers, every database name, the worker count and `maintenance_work_mem_mb`
    /// (also run when deserializing; [`CopiedDatabase::new`] checks the same).
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
        if self.maintenance_work_mem_mb > MAX_MWM_MB {
            return Err(bluegreen_core::Error::invalid(
                "maintenance_work_mem_mb",
                self.maintenance_work_mem_mb.to_string(),
                format!(
                    "at most {MAX_MWM_MB} (PostgreSQL's maximum), or 0 for the server's setting"
                ),
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

    /// Tables larger than `bytes` are split into page ranges copied by several workers (0: never).
    pub fn with_split_table_bytes(mut self, bytes: u64) -> Self {
        self.split_table_bytes = bytes;
        self
    }

    /// `maintenance_work_mem` (MiB) of the index and constraint builds (0: the server's);
    /// checked by [`CopiedConfig::validate`].
    pub fn with_maintenance_work_mem_mb(mut self, mb: u32) -> Self {
        self.maintenance_work_mem_mb = mb;
        self
    }

    /// Whether tables copied whole are loaded with `COPY … (FREEZE)`.
    pub fn with_copy_freeze(mut self, yes: bool) -> Self {
        self.copy_freeze = yes;
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
    /// COPY streams run: one per table copied whole, one per page range of a split table.
    pub chunks: usize,
    /// Tables split into page ranges.
    pub split_tables: usize,
    /// Rows copied.
    pub rows: u64,
    /// Bytes of COPY data streamed.
    pub bytes: u64,
    /// Sequences set.
    pub sequences: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// Time of the schema before the data (`pg_dump --section=pre-data | psql`).
    pub pre_data: Duration,
    /// Time of the data (the COPY streams; the post-data dump runs beside them).
    pub data: Duration,
    /// Time of the sequences and of the indexes, constraints and triggers after the data
    /// (`pg_restore -j <workers>`), including the final flush.
    pub post_data: Duration,
    /// True when `CREATE DATABASE … TEMPLATE` was used.
    pub template: bool,
}

/// Each slot gets its own database, cloned from the live one while it keeps serving.
///
/// The copy is consistent: one session exports a snapshot (`pg_export_snapshot()`) and keeps it
/// open; the schema comes from `pg_dump --snapshot=<id> --section=pre-data` piped into `psql`, then
/// parallel workers each join the snapshot (`SET TRANSACTION SNAPSHOT`) and stream
/// `COPY … TO STDOUT (FORMAT binary)` into `COPY … FROM STDIN (FORMAT binary)` on the target (a
/// table bigger than [`CopiedConfig::split_table_bytes`] in several ctid page ranges, so that
/// the workers share it; a table copied whole with `COPY … (FREEZE)`), then sequences are set
/// from the source and `--section=post-data` (indexes, constraints, triggers; dumped while the
/// data streams) is applied with `pg_restore -j <workers>` (indexes of different tables built in
/// parallel) with [`CopiedConfig::maintenance_work_mem_mb`]. The target's sessions commit
/// asynchronously; one synchronous commit at the end makes the whole copy durable before success
/// is reported. On any failure the target database is dropped.
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
    /// A strategy with `config`, checked by [`CopiedConfig::validate`].
    pub fn new(config: CopiedConfig) -> Result<Self> {
        config.validate()?;
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

        let phase = Instant::now();
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
        let pre_data = phase.elapsed();

        let phase = Instant::now();
        let tables = user_tables(BACKEND, &snap_client).await?;
        let ntables = tables.len();
        let chunks = plan_chunks(
            &snap_client,
            tables,
            self.config.workers,
            self.config.split_table_bytes,
        )
        .await?;
        let nchunks = chunks.len();
        let split_tables = {
            let mut split: Vec<&str> = chunks
                .iter()
                .filter(|c| c.range.is_some())
                .map(|c| c.sql_name.as_str())
                .collect();
            split.dedup();
            split.len()
        };
        let queue = Arc::new(Mutex::new(chunks.into_iter().collect::<VecDeque<_>>()));
        let workers = self.config.workers.min(nchunks).max(1);
        let mut handles = Vec::new();
        for _ in 0..workers {
            let (queue, src_cfg, tgt_cfg, snapshot, freeze) = (
                queue.clone(),
                src_cfg.clone(),
                tgt_cfg.clone(),
                snapshot.clone(),
                self.config.copy_freeze,
            );
            handles.push(tokio::spawn(async move {
                let res = copy_worker(&queue, &src_cfg, &tgt_cfg, &snapshot, freeze).await;
                if res.is_err() {
                    // The copy has failed: the other workers stop after their current stream.
                    queue.lock().await.clear();
                }
                res
            }));
        }
        // The post-data section is dumped (in the same snapshot) while the data streams.
        let post_args = [
            format!("--snapshot={snapshot}"),
            "--section=post-data".into(),
        ];
        let post_dump = dump_to_file(BACKEND, bin, &src_cfg, &post_args, self.config.timeout);
        let data = async {
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
            match first_err {
                Some(e) => Err(e),
                None => Ok((rows, bytes)),
            }
        };
        let (post_dump, data) = tokio::join!(post_dump, data);
        let (rows, bytes) = data?;
        let post_dump = post_dump?;
        let data = phase.elapsed();

        let phase = Instant::now();
        let tgt_client = tgt_cfg.connect(BACKEND).await?;
        let sequences = copy_sequences(BACKEND, &snap_client, &tgt_client, 0).await?;
        // Indexes and constraints after the data, several at a time, with room to sort in memory.
        let mut settings = vec!["synchronous_commit=off".to_string()];
        if self.config.maintenance_work_mem_mb > 0 {
            settings.push(format!(
                "maintenance_work_mem={}MB",
                self.config.maintenance_work_mem_mb
            ));
        }
        restore_file(
            BACKEND,
            bin,
            &post_dump,
            &tgt_cfg,
            self.config.workers,
            &settings,
            self.config.timeout,
        )
        .await?;
        // The data and the post-data sessions committed with `synchronous_commit = off`: their
        // commits returned before their WAL reached the disk, so a crash right after could lose
        // them. That is safe while the copy runs (a copy interrupted by a crash is never reported
        // and is re-done from scratch), but success must not be reported before everything is
        // durable. A commit with `synchronous_commit = on` waits until the WAL up to its own
        // commit record is flushed (and, with synchronous standbys, confirmed by them); WAL is
        // one sequence per server, so that flush covers every earlier asynchronous commit of the
        // copy. `txid_current()` gives the transaction an xid so that it writes a commit record.
        tgt_client
            .batch_execute("SET synchronous_commit = on; BEGIN; SELECT txid_current(); COMMIT;")
            .await
            .map_err(|e| pg_error(BACKEND, "flushing the copy to disk", e))?;
        let post_data = phase.elapsed();
        let _ = snap_client.batch_execute("COMMIT").await;
        tracing::debug!(
            ?pre_data,
            ?data,
            ?post_data,
            chunks = nchunks,
            split_tables,
            "copy phases"
        );
        Ok(CopyReport {
            source: source.into(),
            target: target.into(),
            snapshot: Some(snapshot),
            tables: ntables,
            chunks: nchunks,
            split_tables,
            rows,
            bytes,
            sequences,
            elapsed: Duration::ZERO,
            pre_data,
            data,
            post_data,
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
            chunks: 0,
            split_tables: 0,
            rows: 0,
            bytes: 0,
            sequences: 0,
            elapsed: Duration::ZERO,
            pre_data: Duration::ZERO,
            data: Duration::ZERO,
            post_data: Duration::ZERO,
            template: true,
        })
    }
}

/// Bytes of COPY data sent to the target per message.
const BATCH: usize = 256 * 1024;

/// One COPY stream: a whole table, or one page range of a split table.
#[derive(Debug, Clone)]
struct Chunk {
    /// The table, quoted and schema-qualified.
    sql_name: String,
    /// Pages `[from, to)` of the heap; `to = None` runs to the end (rows on pages added after
    /// the table was measured are still read). `None`: the whole table.
    range: Option<(u64, Option<u64>)>,
    /// The quoted list of the columns COPY carries (not dropped, not generated), for ranges.
    columns: String,
}

impl Chunk {
    /// The COPY reading it on the source.
    fn copy_out(&self) -> String {
        let q = &self.sql_name;
        match self.range {
            None => format!("COPY {q} TO STDOUT (FORMAT binary)"),
            // ONLY: an inheritance parent's rows, not its children's (copied on their own), as
            // `COPY <table> TO` reads.
            Some((from, to)) => {
                let upper = to
                    .map(|to| format!(" AND ctid < '({to},0)'::tid"))
                    .unwrap_or_default();
                format!(
                    "COPY (SELECT {} FROM ONLY {q} WHERE ctid >= '({from},0)'::tid{upper}) \
                     TO STDOUT (FORMAT binary)",
                    self.columns
                )
            }
        }
    }

    /// The COPY writing it on the target.
    fn copy_in(&self, freeze: bool) -> String {
        let q = &self.sql_name;
        match self.range {
            None if freeze => format!("COPY {q} FROM STDIN (FORMAT binary, FREEZE)"),
            None => format!("COPY {q} FROM STDIN (FORMAT binary)"),
            Some(_) => format!("COPY {q} ({}) FROM STDIN (FORMAT binary)", self.columns),
        }
    }
}

/// The COPY streams for `tables` (biggest first): a table whose heap is larger than
/// `split_bytes` (when not 0, on PostgreSQL 14+ where a ctid range is a TID Range Scan) becomes
/// page ranges of about `split_bytes`, at least `workers` of them.
async fn plan_chunks(
    snap: &Client,
    tables: Vec<TableRef>,
    workers: usize,
    split_bytes: u64,
) -> Result<Vec<Chunk>> {
    let row = snap
        .query_one(
            "SELECT current_setting('server_version_num')::int,
                    current_setting('block_size')::bigint",
            &[],
        )
        .await
        .map_err(|e| pg_error(BACKEND, "reading the server version", e))?;
    let (version, block): (i32, i64) = (row.get(0), row.get(1));
    let can_split = split_bytes > 0 && version >= 140_000 && block > 0;
    let mut chunks = Vec::new();
    for t in tables {
        let sql_name = t.qualified();
        let bytes = u64::try_from(t.bytes).unwrap_or(0);
        if !can_split || bytes <= split_bytes {
            chunks.push(Chunk {
                sql_name,
                range: None,
                columns: String::new(),
            });
            continue;
        }
        let columns: Vec<String> = snap
            .query(
                "SELECT a.attname::text FROM pg_attribute a
                 WHERE a.attrelid = ($1::text || '.' || $2::text)::regclass
                   AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
                 ORDER BY a.attnum",
                &[&quote_ident(&t.schema), &quote_ident(&t.name)],
            )
            .await
            .map_err(|e| pg_error(BACKEND, &format!("reading the columns of {sql_name}"), e))?
            .iter()
            .map(|r| quote_ident(r.get::<_, &str>(0)))
            .collect();
        let pages = bytes / block as u64;
        let n = bytes
            .div_ceil(split_bytes)
            .max(workers as u64)
            .min(pages)
            .min(100_000);
        if columns.is_empty() || n < 2 {
            chunks.push(Chunk {
                sql_name,
                range: None,
                columns: String::new(),
            });
            continue;
        }
        let columns = columns.join(", ");
        for i in 0..n {
            let from = pages * i / n;
            let to = (i + 1 < n).then(|| pages * (i + 1) / n);
            chunks.push(Chunk {
                sql_name: sql_name.clone(),
                range: Some((from, to)),
                columns: columns.clone(),
            });
        }
    }
    Ok(chunks)
}

/// One worker: joins the snapshot, then copies chunks from the queue until it is empty.
async fn copy_worker(
    queue: &Mutex<VecDeque<Chunk>>,
    src: &PostgresConfig,
    tgt: &PostgresConfig,
    snapshot: &str,
    freeze: bool,
) -> Result<(u64, u64)> {
    let s = src.connect(BACKEND).await?;
    s.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        crate::ident::quote_literal(snapshot)
    ))
    .await
    .map_err(|e| pg_error(BACKEND, "joining the exported snapshot", e))?;
    let t = tgt.connect(BACKEND).await?;
    // Commits need not wait for their WAL to reach the disk: `copy_inner` makes everything
    // durable with one synchronous commit before it reports success (see there).
    t.batch_execute("SET synchronous_commit = off")
        .await
        .map_err(|e| pg_error(BACKEND, "setting synchronous_commit", e))?;
    let (mut rows, mut bytes) = (0u64, 0u64);
    loop {
        let next = queue.lock().await.pop_front();
        let Some(chunk) = next else { break };
        let q = &chunk.sql_name;
        // FREEZE needs the table created or truncated in the loading transaction: the table is
        // new and empty, and ONLY leaves an inheritance child (copied by another worker) alone.
        let freeze = freeze && chunk.range.is_none();
        if freeze {
            t.batch_execute(&format!("BEGIN; TRUNCATE ONLY {q}"))
                .await
                .map_err(|e| pg_error(BACKEND, &format!("TRUNCATE ONLY {q}"), e))?;
        }
        let out = s
            .copy_out(&chunk.copy_out())
            .await
            .map_err(|e| pg_error(BACKEND, &format!("COPY {q} TO STDOUT"), e))?;
        let sink = t
            .copy_in::<_, bytes::Bytes>(&chunk.copy_in(freeze))
            .await
            .map_err(|e| pg_error(BACKEND, &format!("COPY {q} FROM STDIN"), e))?;
        pin_mut!(out);
        pin_mut!(sink);
        // The source sends one message per row; batching rows into large messages saves the
        // per-message work on the target and here.
        let mut buf = bytes::BytesMut::with_capacity(BATCH * 2);
        while let Some(data) = out.next().await {
            let data = data.map_err(|e| pg_error(BACKEND, &format!("reading {q}"), e))?;
            bytes += data.len() as u64;
            buf.extend_from_slice(&data);
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
        if freeze {
            t.batch_execute("COMMIT")
                .await
                .map_err(|e| pg_error(BACKEND, &format!("committing {q}"), e))?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_knobs_have_defaults_and_are_checked() {
        let cfg: CopiedConfig =
            serde_json::from_str(r#"{ "server": { "dbname": "shop" } }"#).unwrap();
        assert_eq!(cfg.split_table_bytes, 0);
        assert_eq!(cfg.maintenance_work_mem_mb, 256);
        assert!(cfg.copy_freeze);
        let cfg: CopiedConfig = serde_json::from_str(
            r#"{ "server": { "dbname": "shop" }, "split_table_bytes": 67108864,
                 "maintenance_work_mem_mb": 0, "copy_freeze": false }"#,
        )
        .unwrap();
        assert_eq!(
            (
                cfg.split_table_bytes,
                cfg.maintenance_work_mem_mb,
                cfg.copy_freeze
            ),
            (67_108_864, 0, false)
        );
        let err = serde_json::from_str::<CopiedConfig>(
            r#"{ "server": { "dbname": "shop" }, "maintenance_work_mem_mb": 2097152 }"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("maintenance_work_mem_mb"), "{err}");
        let server = PostgresConfig::new("127.0.0.1", 5432, "shop");
        let too_big =
            CopiedConfig::new(server.clone()).with_maintenance_work_mem_mb(MAX_MWM_MB + 1);
        assert!(too_big.validate().is_err());
        assert!(CopiedDatabase::new(too_big).is_err());
        assert!(CopiedDatabase::new(
            CopiedConfig::new(server).with_maintenance_work_mem_mb(MAX_MWM_MB)
        )
        .is_ok());
    }

    #[test]
    fn a_range_reads_only_the_parent_between_its_pages_and_names_its_columns() {
        let whole = Chunk {
            sql_name: "\"s\".\"t\"".into(),
            range: None,
            columns: String::new(),
        };
        assert_eq!(
            whole.copy_out(),
            "COPY \"s\".\"t\" TO STDOUT (FORMAT binary)"
        );
        assert_eq!(
            whole.copy_in(true),
            "COPY \"s\".\"t\" FROM STDIN (FORMAT binary, FREEZE)"
        );
        assert_eq!(
            whole.copy_in(false),
            "COPY \"s\".\"t\" FROM STDIN (FORMAT binary)"
        );
        let mid = Chunk {
            range: Some((10, Some(20))),
            columns: "\"a\", \"b\"".into(),
            ..whole.clone()
        };
        assert_eq!(
            mid.copy_out(),
            "COPY (SELECT \"a\", \"b\" FROM ONLY \"s\".\"t\" WHERE ctid >= '(10,0)'::tid \
             AND ctid < '(20,0)'::tid) TO STDOUT (FORMAT binary)"
        );
        // Never FREEZE into a range: other workers load the same table.
        assert_eq!(
            mid.copy_in(true),
            "COPY \"s\".\"t\" (\"a\", \"b\") FROM STDIN (FORMAT binary)"
        );
        let last = Chunk {
            range: Some((20, None)),
            ..mid
        };
        assert_eq!(
            last.copy_out(),
            "COPY (SELECT \"a\", \"b\" FROM ONLY \"s\".\"t\" WHERE ctid >= '(20,0)'::tid) \
             TO STDOUT (FORMAT binary)"
        );
    }
}
