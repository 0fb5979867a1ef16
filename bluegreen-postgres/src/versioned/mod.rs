//! The versioned-schema mode of [`SharedDatabase`](crate::SharedDatabase): each release reads and
//! writes through its own schema of views (`<schema>_<version>`), chosen by its `search_path`;
//! expand makes only additive physical changes, keeps renamed and retyped columns in sync both
//! ways, backfills in batches; rollback drops the new version; contract (at cleanup, once the old
//! release is gone) drops the old columns, views and triggers. Every DDL statement runs under a
//! short `lock_timeout` and is retried with backoff when it hits it. What is in flight is kept in
//! `<state_schema>.schema_versions`, so a crash can be rolled back or completed.

mod ops;
mod plan;

use std::time::{Duration, Instant};

use bluegreen_core::{Result, Slot, Version};
use tokio_postgres::Client;

pub(crate) use ops::check_operations;
use ops::BODY_TAG;
pub use ops::{ColumnDef, Operation, VersionedConfig};
use plan::{Catalog, PhysColumn, Plan, Step};

use crate::error::{fail, pg_error, sqlstate};
use crate::ident::{quote_ident, quote_literal};

const BACKEND: &str = "postgres shared";

/// What a versioned-schema step did, with the figures of its locks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SchemaReport {
    /// What was done (`expanded schema version v2: …`, `nothing to do`).
    pub summary: String,
    /// Whether a rollback cannot undo it (raw SQL ran, or a contract).
    pub irreversible: bool,
    /// The longest statement that held a lock blocking the app's reads or writes on a table
    /// (`ALTER TABLE`, `CREATE TRIGGER`, `DROP …`), as measured around the statement.
    pub longest_exclusive: Duration,
    /// That statement, described.
    pub longest_exclusive_what: String,
    /// Statements that hit `lock_timeout` and were tried again.
    pub lock_retries: u32,
    /// Rows touched by backfills.
    pub backfilled_rows: u64,
}

/// Runs statements under `lock_timeout`, retrying the ones that hit it, and keeps the figures.
struct Runner<'a> {
    c: &'a Client,
    cfg: &'a VersionedConfig,
    report: SchemaReport,
}

impl<'a> Runner<'a> {
    async fn new(c: &'a Client, cfg: &'a VersionedConfig) -> Result<Runner<'a>> {
        c.batch_execute(&format!(
            "SET lock_timeout = '{}ms'",
            cfg.lock_timeout.as_millis().max(1)
        ))
        .await
        .map_err(|e| pg_error(BACKEND, "setting lock_timeout", e))?;
        Ok(Runner {
            c,
            cfg,
            report: SchemaReport::default(),
        })
    }

    /// Runs `sql` (one implicit transaction), retrying on SQLSTATE 55P03 (lock_timeout) with
    /// backoff, at most `lock_attempts` times. `exclusive`: counted in `longest_exclusive`.
    async fn run(&mut self, what: &str, sql: &str, exclusive: bool) -> Result<()> {
        let mut pause = Duration::from_millis(50);
        let mut attempt = 1;
        loop {
            let started = Instant::now();
            let res = self.c.batch_execute(sql).await;
            let took = started.elapsed();
            match res {
                Ok(()) => {
                    if exclusive && took > self.report.longest_exclusive {
                        self.report.longest_exclusive = took;
                        self.report.longest_exclusive_what = what.to_string();
                    }
                    return Ok(());
                }
                Err(e) => {
                    let err = pg_error(BACKEND, what, e);
                    if sqlstate(&err) != Some("55P03") {
                        return Err(err);
                    }
                    if attempt >= self.cfg.lock_attempts {
                        return Err(fail(
                            BACKEND,
                            what,
                            format!(
                                "{what}: could not get its lock within lock_timeout {:?} in {} \
                                 attempts (a long transaction holds the table): {err}; nothing \
                                 waits behind it, try again when the transaction ends",
                                self.cfg.lock_timeout, self.cfg.lock_attempts
                            ),
                        ));
                    }
                    self.report.lock_retries += 1;
                    tracing::info!(what, attempt, ?pause, "lock_timeout hit; trying again");
                    // A little jitter from the clock, so two deployers do not retry in step.
                    let jitter =
                        Duration::from_millis(u64::from(started.elapsed().subsec_nanos() % 23));
                    tokio::time::sleep(pause + jitter).await;
                    pause = (pause * 2).min(self.cfg.max_backoff);
                    attempt += 1;
                }
            }
        }
    }
}

/// The versioned-schema mode, on one connection that holds the migration lock.
pub(crate) struct Versioned<'a> {
    pub(crate) cfg: &'a VersionedConfig,
    pub(crate) c: &'a Client,
    /// Role the views are granted to, when releases connect as another user.
    pub(crate) grant_to: Option<String>,
}

/// A row of the state table.
#[derive(Debug, Clone)]
struct Row {
    version: String,
    state: String,
    checksum: String,
    plan: Plan,
}

fn q(s: &str) -> String {
    quote_ident(s)
}

impl Versioned<'_> {
    fn table_ref(&self) -> String {
        format!("{}.schema_versions", q(&self.cfg.state_schema))
    }

    fn qt(&self, table: &str) -> String {
        format!("{}.{}", q(&self.cfg.schema), q(table))
    }

    fn func(&self, name: &str) -> String {
        format!("{}.{}", q(&self.cfg.state_schema), q(name))
    }

    async fn ensure_state(&self) -> Result<()> {
        self.c
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {s};
                 CREATE TABLE IF NOT EXISTS {t} (
                     seq bigserial NOT NULL,
                     version text PRIMARY KEY,
                     state text NOT NULL,
                     checksum text NOT NULL,
                     plan text NOT NULL,
                     updated_at timestamptz NOT NULL DEFAULT now())",
                s = q(&self.cfg.state_schema),
                t = self.table_ref()
            ))
            .await
            .map_err(|e| pg_error(BACKEND, "creating the schema versions table", e))
    }

    async fn rows(&self) -> Result<Vec<Row>> {
        self.ensure_state().await?;
        let rows = self
            .c
            .query(
                &format!(
                    "SELECT version, state, checksum, plan FROM {} ORDER BY seq",
                    self.table_ref()
                ),
                &[],
            )
            .await
            .map_err(|e| pg_error(BACKEND, "reading schema versions", e))?;
        rows.iter()
            .map(|r| {
                let plan: String = r.get(3);
                Ok(Row {
                    version: r.get(0),
                    state: r.get(1),
                    checksum: r.get(2),
                    plan: serde_json::from_str(&plan).map_err(|e| {
                        fail(
                            BACKEND,
                            "reading schema versions",
                            format!(
                                "the stored plan of {} is unreadable: {e}",
                                r.get::<_, String>(0)
                            ),
                        )
                    })?,
                })
            })
            .collect()
    }

    async fn set_state(&self, version: &str, state: &str) -> Result<()> {
        self.c
            .execute(
                &format!(
                    "UPDATE {} SET state = $2, updated_at = now() WHERE version = $1",
                    self.table_ref()
                ),
                &[&version, &state],
            )
            .await
            .map_err(|e| pg_error(BACKEND, "recording a schema version's state", e))?;
        Ok(())
    }

    /// The physical columns of the tables `ops` touch.
    async fn catalog(&self, ops: &[Operation]) -> Result<Catalog> {
        let mut cat = Catalog::new();
        let mut tables: Vec<&str> = ops.iter().filter_map(Operation::table).collect();
        for op in ops {
            if let Operation::AddForeignKey {
                references_table, ..
            } = op
            {
                tables.push(references_table);
            }
        }
        for t in tables {
            if cat.contains_key(t) {
                continue;
            }
            let rows = self
                .c
                .query(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                            a.atthasdef
                     FROM pg_attribute a
                     JOIN pg_class c ON c.oid = a.attrelid
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
                       AND a.attnum > 0 AND NOT a.attisdropped
                     ORDER BY a.attnum",
                    &[&self.cfg.schema, &t],
                )
                .await
                .map_err(|e| pg_error(BACKEND, "reading table columns", e))?;
            if rows.is_empty() {
                continue;
            }
            cat.insert(
                t.to_string(),
                rows.iter()
                    .map(|r| PhysColumn {
                        name: r.get(0),
                        data_type: r.get(1),
                        not_null: r.get(2),
                        has_default: r.get(3),
                    })
                    .collect(),
            );
        }
        Ok(cat)
    }

    /// Expands the schema for `version`: see [`SharedDatabase::expand_schema`](crate::SharedDatabase::expand_schema).
    /// `slot`: the slot the release is deployed to, recorded so that a rollback for another slot
    /// (a redeploy of the live version failing) never drops the version the live slot uses.
    pub(crate) async fn expand(
        &self,
        version: &Version,
        ops: &[Operation],
        slot: Option<Slot>,
    ) -> Result<SchemaReport> {
        check_operations(ops)?;
        let view_schema = self.cfg.view_schema(version)?;
        let checksum = checksum(ops);
        let rows = self.rows().await?;
        let v = version.as_str();
        let mut runner = Runner::new(self.c, self.cfg).await?;

        // Whatever else is in flight first.
        for r in rows.iter().filter(|r| r.version != v) {
            match r.state.as_str() {
                "expanding" | "rolling_back" => {
                    tracing::info!(version = %r.version, "rolling back an interrupted schema version");
                    self.rollback_plan(&mut runner, &r.plan).await?;
                }
                "expanded" if r.plan.base_version.as_deref() == Some(v) => {
                    // Switching back to the release this one expanded from: both work as they are.
                    runner.report.summary = format!(
                        "schema version {v} kept; version {} expanded from it stays until cleanup",
                        r.version
                    );
                    return Ok(runner.report);
                }
                "expanded" if r.plan.base_schema.is_none() && r.plan.contract_is_noop() => {
                    // Nothing to contract and no older views: complete it without waiting.
                    self.set_state(&r.version, "complete").await?;
                }
                "expanded" | "contracting" => {
                    return Err(fail(
                        BACKEND,
                        "expand schema",
                        format!(
                            "schema version {} is still expanded (its old release may still \
                             run, its contract has not run): run `cleanup` first (it contracts \
                             {} if that is the live release, or drops it if its previous release \
                             is live), then deploy {v}",
                            r.version, r.version
                        ),
                    ));
                }
                _ => {}
            }
        }
        let rows = self.rows().await?;
        let latest_complete = rows
            .iter()
            .filter(|r| r.state == "complete")
            .map(|r| r.version.clone())
            .next_back();
        let plan = match rows.iter().find(|r| r.version == v) {
            Some(r) if r.checksum != checksum => {
                return Err(fail(
                    BACKEND,
                    "expand schema",
                    format!(
                        "the schema operations of {v} changed since they were applied \
                         (recorded checksum {}, now {checksum}); give the release a new version",
                        r.checksum
                    ),
                ))
            }
            Some(r) if r.state == "complete" => {
                if latest_complete.as_deref() != Some(v) {
                    return Err(fail(
                        BACKEND,
                        "expand schema",
                        format!(
                            "schema version {v} was contracted away by {} (irreversible): \
                             deploy a release built for the current schema",
                            latest_complete.unwrap_or_default()
                        ),
                    ));
                }
                runner.report.summary = format!("schema version {v} already complete");
                return Ok(runner.report);
            }
            Some(r) if r.state == "rolling_back" => {
                self.rollback_plan(&mut runner, &r.plan).await?;
                None
            }
            Some(r) if r.state == "contracting" => {
                return Err(fail(
                    BACKEND,
                    "expand schema",
                    format!("the contract of {v} was interrupted: run `cleanup` to finish it"),
                ))
            }
            Some(r) => Some(r.plan.clone()),
            None => None,
        };
        let plan = match plan {
            Some(p) => p,
            None => {
                let base_schema = match &latest_complete {
                    Some(b) => Some(self.cfg.view_schema(&Version::new(b.clone())?)?),
                    None => None,
                };
                let catalog = self.catalog(ops).await?;
                let mut p =
                    plan::plan(v, latest_complete, base_schema, view_schema, ops, &catalog)?;
                p.slot = slot.map(|s| s.as_str().to_string());
                self.check_dependents(&p).await?;
                let text = serde_json::to_string(&p)
                    .map_err(|e| fail(BACKEND, "expand schema", e.to_string()))?;
                self.c
                    .execute(
                        &format!(
                            "INSERT INTO {} (version, state, checksum, plan) VALUES ($1, 'expanding', $2, $3)
                             ON CONFLICT (version) DO UPDATE SET state = 'expanding', checksum = $2,
                               plan = $3, updated_at = now()",
                            self.table_ref()
                        ),
                        &[&v, &checksum, &text],
                    )
                    .await
                    .map_err(|e| pg_error(BACKEND, "recording a schema version", e))?;
                p
            }
        };
        self.set_state(v, "expanding").await?;
        self.expand_plan(&mut runner, &plan).await?;
        self.set_state(v, "expanded").await?;
        let r = &mut runner.report;
        r.irreversible = plan.irreversible();
        r.summary = format!(
            "expanded schema version {v} ({} step(s), views in {}; longest exclusive lock {:?}, \
             {} lock retries, {} rows backfilled)",
            plan.steps.len(),
            plan.view_schema,
            r.longest_exclusive,
            r.lock_retries,
            r.backfilled_rows
        );
        Ok(runner.report)
    }

    async fn expand_plan(&self, r: &mut Runner<'_>, p: &Plan) -> Result<()> {
        let vs = &p.view_schema;
        let new_writer = format!(
            "(current_schemas(false))[1] IS NOT DISTINCT FROM {}",
            quote_literal(vs)
        );
        for step in &p.steps {
            match step {
                Step::CreateTable {
                    table,
                    columns,
                    primary_key,
                } => {
                    let mut defs: Vec<String> = columns.iter().map(column_sql).collect();
                    if !primary_key.is_empty() {
                        defs.push(format!(
                            "PRIMARY KEY ({})",
                            primary_key
                                .iter()
                                .map(|k| q(k))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                    r.run(
                        &format!("creating table {table}"),
                        &format!(
                            "CREATE TABLE IF NOT EXISTS {} ({})",
                            self.qt(table),
                            defs.join(", ")
                        ),
                        false,
                    )
                    .await?;
                }
                Step::AddColumn {
                    table,
                    column,
                    backfill,
                    trigger,
                    check,
                } => {
                    let t = self.qt(table);
                    let c = q(&column.name);
                    r.run(
                        &format!("adding column {table}.{}", column.name),
                        &format!(
                            "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {c} {}",
                            column.data_type
                        ),
                        true,
                    )
                    .await?;
                    if let (Some(trg), Some(b)) = (trigger, backfill) {
                        let body = format!(
                            "BEGIN
                               IF NOT ({new_writer}) AND (TG_OP = 'INSERT' OR NEW.{c} IS NULL) THEN
                                 NEW.{c} := (SELECT ({b}) FROM (SELECT NEW.*) AS bg_row);
                               END IF;
                               RETURN NEW;
                             END"
                        );
                        self.trigger(r, table, trg, &body).await?;
                    }
                    if let Some(d) = &column.default {
                        r.run(
                            &format!("setting the default of {table}.{}", column.name),
                            &format!("ALTER TABLE {t} ALTER COLUMN {c} SET DEFAULT {d}"),
                            true,
                        )
                        .await?;
                    }
                    if let Some(k) = check {
                        self.not_valid_check(r, table, &column.name, k).await?;
                    }
                    if let Some(b) = backfill {
                        self.backfill(r, table, &format!("{c} = ({b})"), &format!("{c} IS NULL"))
                            .await?;
                    } else if let (Some(d), Some(_)) = (&column.default, check) {
                        // Rows that were there before the default: NULL until filled.
                        self.backfill(r, table, &format!("{c} = ({d})"), &format!("{c} IS NULL"))
                            .await?;
                    }
                    if let Some(k) = check {
                        self.validate(r, table, k).await?;
                    }
                }
                Step::Rewrite {
                    table,
                    column,
                    name,
                    tmp,
                    data_type,
                    up,
                    down,
                    trigger,
                    check,
                } => {
                    let (c, n, tc) = (q(column), q(name), q(tmp));
                    r.run(
                        &format!("adding column {table}.{tmp} for {column}"),
                        &format!(
                            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {tc} {data_type}",
                            self.qt(table)
                        ),
                        true,
                    )
                    .await?;
                    let body = format!(
                        "BEGIN
                           IF ({new_writer}) AND NOT (TG_OP = 'INSERT' AND NEW.{tc} IS NULL) THEN
                             NEW.{c} := (SELECT ({down}) FROM (SELECT NEW.{tc} AS {n}) AS bg_row);
                           ELSE
                             NEW.{tc} := (SELECT ({up}) FROM (SELECT NEW.*) AS bg_row);
                           END IF;
                           RETURN NEW;
                         END"
                    );
                    self.trigger(r, table, trigger, &body).await?;
                    if let Some(k) = check {
                        self.not_valid_check(r, table, tmp, k).await?;
                    }
                    // Touching the old column makes the trigger compute the new one.
                    self.backfill(r, table, &format!("{c} = {c}"), "true")
                        .await?;
                    if let Some(k) = check {
                        self.validate(r, table, k).await?;
                    }
                }
                Step::FillDropped {
                    table,
                    column,
                    down,
                    trigger,
                } => {
                    let c = q(column);
                    let body = format!(
                        "BEGIN
                           IF ({new_writer}) AND TG_OP = 'INSERT' AND NEW.{c} IS NULL THEN
                             NEW.{c} := (SELECT ({down}) FROM (SELECT NEW.*) AS bg_row);
                           END IF;
                           RETURN NEW;
                         END"
                    );
                    self.trigger(r, table, trigger, &body).await?;
                }
                Step::AddIndex {
                    table,
                    name,
                    columns,
                    unique,
                } => {
                    self.add_index(r, table, name, columns, *unique).await?;
                }
                Step::AddForeignKey {
                    table,
                    name,
                    columns,
                    references_table,
                    references_columns,
                } => {
                    let cols = |v: &[String]| v.iter().map(|c| q(c)).collect::<Vec<_>>().join(", ");
                    let exists = self.constraint_exists(table, name).await?;
                    if !exists {
                        r.run(
                            &format!("adding foreign key {name} on {table} (NOT VALID)"),
                            &format!(
                                "ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({}) NOT VALID",
                                self.qt(table),
                                q(name),
                                cols(columns),
                                self.qt(references_table),
                                cols(references_columns)
                            ),
                            true,
                        )
                        .await?;
                    }
                    self.validate(r, table, name).await?;
                }
                Step::Raw { sql } => {
                    r.run("raw SQL", &format!("BEGIN; {sql}\n; COMMIT;"), true)
                        .await?;
                }
            }
        }
        // The new release's views, all in one transaction.
        let security = if self.server_version().await? >= 150_000 {
            " WITH (security_invoker = true)"
        } else {
            ""
        };
        let mut sql = format!("CREATE SCHEMA IF NOT EXISTS {};", q(vs));
        for v in &p.views {
            let cols = v
                .columns
                .iter()
                .map(|(l, ph)| format!("{} AS {}", q(ph), q(l)))
                .collect::<Vec<_>>()
                .join(", ");
            let view = format!("{}.{}", q(vs), q(&v.table));
            sql.push_str(&format!(
                "DROP VIEW IF EXISTS {view}; CREATE VIEW {view}{security} AS SELECT {cols} FROM {};",
                self.qt(&v.table)
            ));
        }
        if let Some(role) = &self.grant_to {
            sql.push_str(&format!(
                "GRANT USAGE ON SCHEMA {s} TO {role}; \
                 GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {role};",
                s = q(vs),
                role = q(role)
            ));
        }
        r.run(&format!("creating the views of {}", p.version), &sql, false)
            .await
    }

    /// Refuses a plan whose contract would drop a column another view depends on (the
    /// contract would fail then, after the old release is gone): before anything runs.
    async fn check_dependents(&self, p: &Plan) -> Result<()> {
        let ours: Vec<String> = p
            .base_schema
            .iter()
            .cloned()
            .chain([p.view_schema.clone()])
            .collect();
        for tc in &p.contract {
            for col in &tc.drop_columns {
                let rows = self
                    .c
                    .query(
                        "SELECT DISTINCT vn.nspname::text || '.' || v.relname::text
                         FROM pg_depend d
                         JOIN pg_rewrite r ON r.oid = d.objid
                         JOIN pg_class v ON v.oid = r.ev_class
                         JOIN pg_namespace vn ON vn.oid = v.relnamespace
                         JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                         WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
                           AND d.refobjid = $1::text::regclass AND a.attname = $2
                           AND v.oid <> d.refobjid AND NOT (vn.nspname = ANY($3))
                         ORDER BY 1",
                        &[&self.qt(&tc.table), col, &ours],
                    )
                    .await
                    .map_err(|e| pg_error(BACKEND, "reading views that use a column", e))?;
                if !rows.is_empty() {
                    let views: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                    return Err(fail(
                        BACKEND,
                        "expand schema",
                        format!(
                            "{}.{col} is replaced or dropped by schema version {}, but view(s) {} \
                             use it: the contract could not drop it. Change or drop those views \
                             first (in an earlier release), then deploy {}",
                            tc.table,
                            p.version,
                            views.join(", "),
                            p.version
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    async fn server_version(&self) -> Result<i32> {
        let v: String = self
            .c
            .query_one("SHOW server_version_num", &[])
            .await
            .map_err(|e| pg_error(BACKEND, "reading the server version", e))?
            .get(0);
        Ok(v.parse().unwrap_or(0))
    }

    async fn trigger(&self, r: &mut Runner<'_>, table: &str, name: &str, body: &str) -> Result<()> {
        let f = self.func(name);
        r.run(
            &format!("creating trigger {name} on {table}"),
            &format!(
                "CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS {BODY_TAG}{body}{BODY_TAG};
                 DROP TRIGGER IF EXISTS {n} ON {t};
                 CREATE TRIGGER {n} BEFORE INSERT OR UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {f}();",
                n = q(name),
                t = self.qt(table)
            ),
            true,
        )
        .await
    }

    async fn constraint_exists(&self, table: &str, name: &str) -> Result<bool> {
        Ok(self
            .c
            .query_opt(
                "SELECT 1 FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2 AND k.conname = $3",
                &[&self.cfg.schema, &table, &name],
            )
            .await
            .map_err(|e| pg_error(BACKEND, "reading constraints", e))?
            .is_some())
    }

    async fn not_valid_check(
        &self,
        r: &mut Runner<'_>,
        table: &str,
        column: &str,
        name: &str,
    ) -> Result<()> {
        if self.constraint_exists(table, name).await? {
            return Ok(());
        }
        r.run(
            &format!("adding NOT NULL check {name} on {table}.{column} (NOT VALID)"),
            &format!(
                "ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL) NOT VALID",
                self.qt(table),
                q(name),
                q(column)
            ),
            true,
        )
        .await
    }

    /// `VALIDATE CONSTRAINT` takes SHARE UPDATE EXCLUSIVE: reads and writes go on.
    async fn validate(&self, r: &mut Runner<'_>, table: &str, name: &str) -> Result<()> {
        r.run(
            &format!("validating constraint {name} on {table}"),
            &format!(
                "ALTER TABLE {} VALIDATE CONSTRAINT {}",
                self.qt(table),
                q(name)
            ),
            false,
        )
        .await
    }

    async fn add_index(
        &self,
        r: &mut Runner<'_>,
        table: &str,
        name: &str,
        columns: &[String],
        unique: bool,
    ) -> Result<()> {
        let idx = format!("{}.{}", q(&self.cfg.schema), q(name));
        let valid: Option<bool> = self
            .c
            .query_opt(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                &[&self.cfg.schema, &name],
            )
            .await
            .map_err(|e| pg_error(BACKEND, "reading indexes", e))?
            .map(|row| row.get(0));
        match valid {
            Some(true) => return Ok(()),
            Some(false) => {
                // An interrupted concurrent build leaves an invalid index: drop it and build again.
                r.run(
                    &format!("dropping invalid index {name}"),
                    &format!("DROP INDEX CONCURRENTLY IF EXISTS {idx}"),
                    false,
                )
                .await?;
            }
            None => {}
        }
        let cols = columns.iter().map(|c| q(c)).collect::<Vec<_>>().join(", ");
        let res = r
            .run(
                &format!("building index {name} on {table} (concurrently)"),
                &format!(
                    "CREATE {}INDEX CONCURRENTLY {} ON {} ({cols})",
                    if unique { "UNIQUE " } else { "" },
                    q(name),
                    self.qt(table)
                ),
                false,
            )
            .await;
        if res.is_err() {
            let _ = self
                .c
                .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {idx}"))
                .await;
        }
        res
    }

    /// Runs `UPDATE table SET <set> WHERE <filter>` in batches of `batch_rows` by primary key,
    /// each its own transaction, up to the largest key at the start (rows inserted later are
    /// filled by the triggers).
    async fn backfill(
        &self,
        r: &mut Runner<'_>,
        table: &str,
        set: &str,
        filter: &str,
    ) -> Result<()> {
        let pk = self
            .c
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
                 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                 WHERE i.indrelid = $1::text::regclass AND i.indisprimary",
                &[&self.qt(table)],
            )
            .await
            .map_err(|e| pg_error(BACKEND, "reading the primary key", e))?;
        if pk.len() != 1 {
            return Err(fail(
                BACKEND,
                &format!("backfilling {table}"),
                format!(
                    "table {table} needs a single-column primary key for a batched backfill \
                     (it has {} key columns)",
                    pk.len()
                ),
            ));
        }
        let (key, key_type): (String, String) = (pk[0].get(0), pk[0].get(1));
        let (k, t) = (q(&key), self.qt(table));
        let upper: Option<String> = self
            .c
            .query_one(&format!("SELECT max({k})::text FROM {t}"), &[])
            .await
            .map_err(|e| pg_error(BACKEND, &format!("backfilling {table}"), e))?
            .get(0);
        let Some(upper) = upper else {
            return Ok(());
        };
        let mut last: Option<String> = None;
        loop {
            let after = match &last {
                Some(l) => format!("{k} > {}::{key_type} AND ", quote_literal(l)),
                None => String::new(),
            };
            let sql = format!(
                "WITH bg_batch AS (SELECT {k} AS bg_k FROM {t} WHERE {after}{k} <= {up}::{key_type}
                                   ORDER BY {k} LIMIT {n}),
                      bg_done AS (UPDATE {t} SET {set} FROM bg_batch
                                  WHERE {t}.{k} = bg_batch.bg_k AND ({filter}) RETURNING 1)
                 SELECT (SELECT max(bg_k)::text FROM bg_batch), (SELECT count(*) FROM bg_done)",
                up = quote_literal(&upper),
                n = self.cfg.batch_rows
            );
            // One batch, retried like DDL when a row lock outlasts lock_timeout.
            let mut attempt = 1;
            let row = loop {
                match self.c.query_one(&sql, &[]).await {
                    Ok(row) => break row,
                    Err(e) => {
                        let err = pg_error(BACKEND, &format!("backfilling {table}"), e);
                        if sqlstate(&err) != Some("55P03") || attempt >= self.cfg.lock_attempts {
                            return Err(err);
                        }
                        r.report.lock_retries += 1;
                        tokio::time::sleep(
                            Duration::from_millis(50 * u64::from(attempt))
                                .min(self.cfg.max_backoff),
                        )
                        .await;
                        attempt += 1;
                    }
                }
            };
            let (max, n): (Option<String>, i64) = (row.get(0), row.get(1));
            r.report.backfilled_rows += n.max(0) as u64;
            match max {
                Some(m) => last = Some(m),
                None => return Ok(()),
            }
        }
    }

    /// Drops the new version of `version` (its views, triggers, new columns, tables, indexes,
    /// constraints); the old release's schema is left as it was. `Ok(false)` when there was
    /// nothing to roll back (unknown or complete), or when `slot` is given and the version was
    /// expanded for the other slot (then the live release may be using it).
    pub(crate) async fn rollback(&self, version: &Version, slot: Option<Slot>) -> Result<bool> {
        let rows = self.rows().await?;
        let Some(row) = rows.iter().find(|r| r.version == version.as_str()) else {
            return Ok(false);
        };
        if let (Some(asked), Some(recorded)) = (slot, row.plan.slot.as_deref()) {
            if asked.as_str() != recorded && row.state == "expanded" {
                tracing::info!(
                    version = %row.version,
                    recorded,
                    asked = asked.as_str(),
                    "schema version kept: it was expanded for the other slot"
                );
                return Ok(false);
            }
        }
        if !matches!(
            row.state.as_str(),
            "expanding" | "expanded" | "rolling_back"
        ) {
            return Ok(false);
        }
        let mut r = Runner::new(self.c, self.cfg).await?;
        self.rollback_plan(&mut r, &row.plan).await?;
        Ok(true)
    }

    async fn rollback_plan(&self, r: &mut Runner<'_>, p: &Plan) -> Result<()> {
        self.set_state(&p.version, "rolling_back").await?;
        r.run(
            &format!("dropping the views of {}", p.version),
            &format!("DROP SCHEMA IF EXISTS {} CASCADE", q(&p.view_schema)),
            false,
        )
        .await?;
        for step in p.steps.iter().rev() {
            match step {
                Step::CreateTable { table, .. } => {
                    r.run(
                        &format!("dropping table {table}"),
                        &format!("DROP TABLE IF EXISTS {}", self.qt(table)),
                        true,
                    )
                    .await?
                }
                Step::AddColumn {
                    table,
                    column,
                    trigger,
                    ..
                } => {
                    if let Some(t) = trigger {
                        self.drop_trigger(r, table, t).await?;
                    }
                    r.run(
                        &format!("dropping column {table}.{}", column.name),
                        &format!(
                            "ALTER TABLE {} DROP COLUMN IF EXISTS {}",
                            self.qt(table),
                            q(&column.name)
                        ),
                        true,
                    )
                    .await?
                }
                Step::Rewrite {
                    table,
                    tmp,
                    trigger,
                    ..
                } => {
                    self.drop_trigger(r, table, trigger).await?;
                    r.run(
                        &format!("dropping column {table}.{tmp}"),
                        &format!(
                            "ALTER TABLE {} DROP COLUMN IF EXISTS {}",
                            self.qt(table),
                            q(tmp)
                        ),
                        true,
                    )
                    .await?
                }
                Step::FillDropped { table, trigger, .. } => {
                    self.drop_trigger(r, table, trigger).await?
                }
                Step::AddIndex { name, .. } => {
                    r.run(
                        &format!("dropping index {name}"),
                        &format!(
                            "DROP INDEX CONCURRENTLY IF EXISTS {}.{}",
                            q(&self.cfg.schema),
                            q(name)
                        ),
                        false,
                    )
                    .await?
                }
                Step::AddForeignKey { table, name, .. } => {
                    r.run(
                        &format!("dropping foreign key {name}"),
                        &format!(
                            "ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}",
                            self.qt(table),
                            q(name)
                        ),
                        true,
                    )
                    .await?
                }
                Step::Raw { .. } => {
                    tracing::warn!(version = %p.version, "raw SQL is not undone by a rollback");
                }
            }
        }
        self.c
            .execute(
                &format!("DELETE FROM {} WHERE version = $1", self.table_ref()),
                &[&p.version],
            )
            .await
            .map_err(|e| pg_error(BACKEND, "forgetting a rolled-back schema version", e))?;
        tracing::info!(version = %p.version, "schema version rolled back");
        Ok(())
    }

    async fn drop_trigger(&self, r: &mut Runner<'_>, table: &str, name: &str) -> Result<()> {
        r.run(
            &format!("dropping trigger {name}"),
            &format!(
                "DROP TRIGGER IF EXISTS {} ON {}; DROP FUNCTION IF EXISTS {}();",
                q(name),
                self.qt(table),
                self.func(name)
            ),
            true,
        )
        .await
    }

    /// The contract phase for the live release `live`; see
    /// [`SharedDatabase::contract_schema`](crate::SharedDatabase::contract_schema).
    pub(crate) async fn contract(&self, live: &Version) -> Result<SchemaReport> {
        let rows = self.rows().await?;
        let mut r = Runner::new(self.c, self.cfg).await?;
        let mut done = Vec::new();
        // Versions that never served or were abandoned by a switch back to their base: dropped.
        for row in rows.iter().filter(|x| x.version != live.as_str()) {
            let abandoned =
                row.state == "expanded" && row.plan.base_version.as_deref() == Some(live.as_str());
            if matches!(row.state.as_str(), "expanding" | "rolling_back") || abandoned {
                self.rollback_plan(&mut r, &row.plan).await?;
                done.push(format!("dropped schema version {}", row.version));
            }
        }
        if let Some(row) = rows.iter().find(|x| x.version == live.as_str()) {
            if matches!(row.state.as_str(), "expanded" | "contracting") {
                self.contract_plan(&mut r, &row.plan).await?;
                r.report.irreversible = true;
                done.push(format!("contracted schema version {}", row.version));
            }
        }
        r.report.summary = if done.is_empty() {
            "no schema version to contract".into()
        } else {
            done.join("; ")
        };
        Ok(r.report)
    }

    async fn contract_plan(&self, r: &mut Runner<'_>, p: &Plan) -> Result<()> {
        self.set_state(&p.version, "contracting").await?;
        if let Some(base) = &p.base_schema {
            r.run(
                &format!(
                    "dropping the views of {}",
                    p.base_version.as_deref().unwrap_or("")
                ),
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", q(base)),
                false,
            )
            .await?;
        }
        for tc in &p.contract {
            let t = self.qt(&tc.table);
            let cols: Vec<String> = self
                .c
                .query(
                    "SELECT a.attname::text FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
                    &[&self.cfg.schema, &tc.table],
                )
                .await
                .map_err(|e| pg_error(BACKEND, "reading table columns", e))?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let mut sql = String::new();
            for trg in &tc.triggers {
                sql.push_str(&format!(
                    "DROP TRIGGER IF EXISTS {} ON {t}; DROP FUNCTION IF EXISTS {}();",
                    q(trg),
                    self.func(trg)
                ));
            }
            for c in &tc.drop_columns {
                sql.push_str(&format!("ALTER TABLE {t} DROP COLUMN IF EXISTS {};", q(c)));
            }
            for (from, to) in &tc.renames {
                // Idempotent: a crash after this transaction left it renamed already.
                if cols.contains(from) && (!cols.contains(to) || tc.drop_columns.contains(to)) {
                    sql.push_str(&format!(
                        "ALTER TABLE {t} RENAME COLUMN {} TO {};",
                        q(from),
                        q(to)
                    ));
                }
            }
            for (c, k) in &tc.not_null {
                sql.push_str(&format!(
                    "ALTER TABLE {t} ALTER COLUMN {} SET NOT NULL; ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {};",
                    q(c),
                    q(k)
                ));
            }
            if !sql.is_empty() {
                r.run(&format!("contracting table {}", tc.table), &sql, true)
                    .await?;
            }
        }
        self.set_state(&p.version, "complete").await?;
        tracing::info!(version = %p.version, "schema version contracted");
        Ok(())
    }
}

fn column_sql(c: &ColumnDef) -> String {
    let mut s = format!("{} {}", q(&c.name), c.data_type);
    if !c.nullable {
        s.push_str(" NOT NULL");
    }
    if let Some(d) = &c.default {
        s.push_str(&format!(" DEFAULT {d}"));
    }
    s
}

fn checksum(ops: &[Operation]) -> String {
    let text = serde_json::to_string(ops).unwrap_or_default();
    format!("{:016x}", crate::shared::fnv64(&text))
}

/// `-c search_path=<view schema>,<schema>` for a release's `PGOPTIONS`.
pub(crate) fn search_path_option(cfg: &VersionedConfig, version: &Version) -> Result<String> {
    Ok(format!(
        "-c search_path={},{}",
        q(&cfg.view_schema(version)?),
        q(&cfg.schema)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_path_quotes_the_names() {
        let cfg = VersionedConfig::default();
        let v = Version::new("v2.1").unwrap();
        assert_eq!(
            search_path_option(&cfg, &v).unwrap(),
            "-c search_path=\"public_v2.1\",\"public\""
        );
    }
}
