//! The declarative operations of a versioned schema change, their settings, and their checks.

use std::path::PathBuf;
use std::time::Duration;

use bluegreen_core::{Error, Result, Version};
use serde::{Deserialize, Serialize};

use crate::ident::validate_ident;
use crate::sqlcheck;

/// A column of [`Operation::CreateTable`] or [`Operation::AddColumn`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ColumnDef {
    /// Column name.
    pub name: String,
    /// SQL type, e.g. `text`, `bigint`, `numeric(12,2)`, `timestamp with time zone`, `text[]`.
    #[serde(rename = "type")]
    pub data_type: String,
    /// Whether NULL is allowed (default `true`).
    #[serde(default = "yes")]
    pub nullable: bool,
    /// Default, an SQL expression (e.g. `'new'`, `now()`).
    #[serde(default)]
    pub default: Option<String>,
}

fn yes() -> bool {
    true
}

impl ColumnDef {
    /// A nullable column without default.
    pub fn new(name: impl Into<String>, data_type: impl Into<String>) -> Self {
        ColumnDef {
            name: name.into(),
            data_type: data_type.into(),
            nullable: true,
            default: None,
        }
    }

    /// `NOT NULL`.
    pub fn not_null(mut self) -> Self {
        self.nullable = false;
        self
    }

    /// With a default (an SQL expression).
    pub fn with_default(mut self, expr: impl Into<String>) -> Self {
        self.default = Some(expr.into());
        self
    }

    fn check(&self) -> Result<()> {
        validate_ident("column", &self.name)?;
        check_type(&self.data_type)?;
        if let Some(d) = &self.default {
            check_expr("default", d)?;
        }
        Ok(())
    }
}

/// One declarative schema operation of a release (see [`SharedDatabase::with_schema_versions`]).
///
/// In files (one JSON array per release), each is an object tagged by `op`:
/// `{"op": "rename_column", "table": "orders", "from": "note", "to": "memo"}`.
///
/// Names are checked against the identifier grammar (1 to 63 characters of
/// `[A-Za-z0-9._+-]`, starting alphanumeric) and always quoted in SQL. Types are checked against a
/// type grammar; expressions (`default`, `backfill`, `up`, `down`) must be one SQL expression
/// (no `;` outside quotes) and are trusted like migration SQL.
///
/// [`SharedDatabase::with_schema_versions`]: crate::SharedDatabase::with_schema_versions
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Operation {
    /// A new table (the old release does not see it). Rollback drops it.
    CreateTable {
        /// Table name.
        table: String,
        /// Columns, in order.
        columns: Vec<ColumnDef>,
        /// Primary key columns.
        #[serde(default)]
        primary_key: Vec<String>,
    },
    /// A new column, added physically nullable; with `backfill`, existing rows are filled in
    /// batches and rows the old release inserts are filled by a trigger; `NOT NULL` becomes a
    /// `NOT VALID` check, validated after the backfill, made a real `NOT NULL` at contract.
    AddColumn {
        /// Table name.
        table: String,
        /// The column.
        column: ColumnDef,
        /// Value for existing rows and rows the old release writes: an SQL expression over the
        /// row's columns (old names), e.g. `amount * 2`.
        #[serde(default)]
        backfill: Option<String>,
    },
    /// A rename: the new release's view shows `from` as `to`, both releases write the same
    /// physical column (so they are always in sync); the physical rename happens at contract.
    RenameColumn {
        /// Table name.
        table: String,
        /// Current name.
        from: String,
        /// New name.
        to: String,
    },
    /// A new type: a new physical column kept in sync both ways by a trigger (`up` from the old
    /// column, `down` from the new one), backfilled in batches; at contract the old column is
    /// dropped and the new one takes its name.
    ChangeType {
        /// Table name.
        table: String,
        /// Column name.
        column: String,
        /// The new SQL type.
        #[serde(rename = "type")]
        data_type: String,
        /// New value from the old row: an SQL expression over the row's columns (old names).
        up: String,
        /// Old value from the new one: an SQL expression over the column (its name stands for
        /// the new value).
        down: String,
    },
    /// `NOT NULL` for the new release: like [`ChangeType`](Operation::ChangeType) to the same
    /// type, `up` giving the value for rows holding NULL (e.g. `coalesce(note, '')`).
    SetNotNull {
        /// Table name.
        table: String,
        /// Column name.
        column: String,
        /// The value the new column gets from the old row (must not be NULL).
        up: String,
    },
    /// The new release no longer sees the column; it is dropped at contract. A column the old
    /// release needs filled (`NOT NULL` without default) needs `down`: the value for rows the
    /// new release inserts, an SQL expression over the row's columns.
    DropColumn {
        /// Table name.
        table: String,
        /// Column name.
        column: String,
        /// Value for rows the new release inserts.
        #[serde(default)]
        down: Option<String>,
    },
    /// `CREATE [UNIQUE] INDEX CONCURRENTLY` (an interrupted build is dropped and retried);
    /// rollback drops it concurrently.
    AddIndex {
        /// Table name.
        table: String,
        /// Index name.
        name: String,
        /// Columns (names as the new release sees them).
        columns: Vec<String>,
        /// `UNIQUE`.
        #[serde(default)]
        unique: bool,
    },
    /// A foreign key, added `NOT VALID` and validated afterwards (no long exclusive lock).
    AddForeignKey {
        /// Table name.
        table: String,
        /// Constraint name.
        name: String,
        /// Columns (names as the new release sees them).
        columns: Vec<String>,
        /// Referenced table.
        references_table: String,
        /// Referenced columns (physical names).
        references_columns: Vec<String>,
    },
    /// Raw SQL, the escape hatch: run as given in one transaction, not undone by a rollback,
    /// so the step that runs it is reported irreversible (the engine then stops and asks
    /// instead of rolling back on its own).
    RawSql {
        /// The SQL.
        sql: String,
    },
}

impl Operation {
    /// The table it changes (`None` for raw SQL).
    pub fn table(&self) -> Option<&str> {
        match self {
            Operation::CreateTable { table, .. }
            | Operation::AddColumn { table, .. }
            | Operation::RenameColumn { table, .. }
            | Operation::ChangeType { table, .. }
            | Operation::SetNotNull { table, .. }
            | Operation::DropColumn { table, .. }
            | Operation::AddIndex { table, .. }
            | Operation::AddForeignKey { table, .. } => Some(table),
            Operation::RawSql { .. } => None,
        }
    }

    /// Checks names, types and expressions.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field.
    pub fn check(&self) -> Result<()> {
        if let Some(t) = self.table() {
            validate_ident("table", t)?;
        }
        match self {
            Operation::CreateTable {
                columns,
                primary_key,
                ..
            } => {
                if columns.is_empty() {
                    return Err(Error::invalid("columns", "[]", "a table needs a column"));
                }
                for c in columns {
                    c.check()?;
                }
                for k in primary_key {
                    validate_ident("primary key column", k)?;
                    if !columns.iter().any(|c| &c.name == k) {
                        return Err(Error::invalid(
                            "primary key column",
                            k,
                            "not one of the table's columns",
                        ));
                    }
                }
            }
            Operation::AddColumn {
                column, backfill, ..
            } => {
                column.check()?;
                if let Some(b) = backfill {
                    check_expr("backfill", b)?;
                }
                if !column.nullable && column.default.is_none() && backfill.is_none() {
                    return Err(Error::invalid(
                        "column",
                        &column.name,
                        "a NOT NULL column needs a default or a backfill, else the old release's \
                         inserts fail",
                    ));
                }
            }
            Operation::RenameColumn { from, to, .. } => {
                validate_ident("column", from)?;
                validate_ident("column", to)?;
            }
            Operation::ChangeType {
                column,
                data_type,
                up,
                down,
                ..
            } => {
                validate_ident("column", column)?;
                check_type(data_type)?;
                check_expr("up", up)?;
                check_expr("down", down)?;
            }
            Operation::SetNotNull { column, up, .. } => {
                validate_ident("column", column)?;
                check_expr("up", up)?;
            }
            Operation::DropColumn { column, down, .. } => {
                validate_ident("column", column)?;
                if let Some(d) = down {
                    check_expr("down", d)?;
                }
            }
            Operation::AddIndex { name, columns, .. } => {
                validate_ident("index", name)?;
                non_empty("columns", columns)?;
                for c in columns {
                    validate_ident("column", c)?;
                }
            }
            Operation::AddForeignKey {
                name,
                columns,
                references_table,
                references_columns,
                ..
            } => {
                validate_ident("constraint", name)?;
                validate_ident("table", references_table)?;
                non_empty("columns", columns)?;
                for c in columns.iter().chain(references_columns) {
                    validate_ident("column", c)?;
                }
                if columns.len() != references_columns.len() {
                    return Err(Error::invalid(
                        "references_columns",
                        references_columns.join(","),
                        "as many as `columns`",
                    ));
                }
            }
            Operation::RawSql { sql } => {
                if sqlcheck::split(sql).is_empty() {
                    return Err(Error::invalid("sql", sql, "empty"));
                }
            }
        }
        Ok(())
    }

    /// True for [`Operation::RawSql`]: a rollback cannot undo it.
    pub fn is_irreversible(&self) -> bool {
        matches!(self, Operation::RawSql { .. })
    }
}

fn non_empty(what: &'static str, v: &[String]) -> Result<()> {
    if v.is_empty() {
        return Err(Error::invalid(what, "[]", "at least one"));
    }
    Ok(())
}

/// A type: words, digits, spaces, `,`, `(`, `)`, `[`, `]`, `.`, `_` (no quotes, no `;`).
fn check_type(t: &str) -> Result<()> {
    let ok = !t.trim().is_empty()
        && t.len() <= 200
        && t.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, ' ' | ',' | '(' | ')' | '[' | ']' | '.' | '_')
        });
    if !ok {
        return Err(Error::invalid(
            "type",
            t,
            "an SQL type of letters, digits, spaces, `,()[]._` (e.g. `numeric(12,2)`)",
        ));
    }
    Ok(())
}

/// The dollar-quote tag of generated function bodies; no expression may hold it.
pub(crate) const BODY_TAG: &str = "$bg$";

/// One SQL expression: one statement's worth of tokens, no `;`, no [`BODY_TAG`].
fn check_expr(what: &'static str, e: &str) -> Result<()> {
    let stmts = sqlcheck::split(e);
    let one = stmts.len() == 1 && !stmts[0].text.trim_end().ends_with(';');
    if !one || e.contains(BODY_TAG) || e.trim().is_empty() {
        return Err(Error::invalid(
            what,
            e,
            format!("one SQL expression (no `;` outside quotes, no `{BODY_TAG}`)"),
        ));
    }
    Ok(())
}

/// Settings of the versioned-schema mode of [`SharedDatabase`](crate::SharedDatabase)
/// (`[database.versioned]` in a pipeline file). Every field has a default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
#[non_exhaustive]
pub struct VersionedConfig {
    /// The schema holding the real tables (default `public`). Release `v2` reads and writes
    /// through views in `<schema>_v2`.
    #[serde(default = "public")]
    pub schema: String,
    /// Schema of the state table and trigger functions (default `bluegreen`).
    #[serde(default = "bluegreen")]
    pub state_schema: String,
    /// `lock_timeout` of every DDL statement (default 500 ms): a statement that would queue
    /// behind a long transaction (and make the app's queries queue behind it) gives up instead.
    #[serde(default = "half_second", with = "bluegreen_core::config::duration")]
    pub lock_timeout: Duration,
    /// How many times a statement that hit `lock_timeout` is tried (default 20), with backoff.
    #[serde(default = "twenty")]
    pub lock_attempts: u32,
    /// The longest pause between two attempts (default 2 s); the first is 50 ms, then doubling.
    #[serde(default = "two_seconds", with = "bluegreen_core::config::duration")]
    pub max_backoff: Duration,
    /// Rows per backfill batch (default 1000), each batch its own transaction.
    #[serde(default = "thousand")]
    pub batch_rows: u32,
    /// A directory of `<version>.json` files, each a JSON array of [`Operation`]s: the schema
    /// changes of that release (no file: none).
    #[serde(default)]
    pub operations_dir: Option<PathBuf>,
}

bluegreen_core::validated_serde!(VersionedConfig);

fn public() -> String {
    "public".into()
}
fn bluegreen() -> String {
    "bluegreen".into()
}
fn half_second() -> Duration {
    Duration::from_millis(500)
}
fn twenty() -> u32 {
    20
}
fn two_seconds() -> Duration {
    Duration::from_secs(2)
}
fn thousand() -> u32 {
    1000
}

impl Default for VersionedConfig {
    fn default() -> Self {
        VersionedConfig {
            schema: public(),
            state_schema: bluegreen(),
            lock_timeout: half_second(),
            lock_attempts: twenty(),
            max_backoff: two_seconds(),
            batch_rows: thousand(),
            operations_dir: None,
        }
    }
}

impl VersionedConfig {
    /// Checks the names and bounds.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the setting.
    pub fn validate(&self) -> Result<()> {
        validate_ident("schema", &self.schema)?;
        validate_ident("state_schema", &self.state_schema)?;
        if self.schema == self.state_schema {
            return Err(Error::invalid(
                "state_schema",
                &self.state_schema,
                "must differ from `schema`",
            ));
        }
        if self.lock_timeout < Duration::from_millis(1)
            || self.lock_timeout > Duration::from_secs(60)
        {
            return Err(Error::invalid(
                "lock_timeout",
                format!("{:?}", self.lock_timeout),
                "between 1 ms and 60 s",
            ));
        }
        if self.lock_attempts == 0 {
            return Err(Error::invalid("lock_attempts", "0", "at least 1"));
        }
        if self.batch_rows == 0 {
            return Err(Error::invalid("batch_rows", "0", "at least 1"));
        }
        Ok(())
    }

    /// With the tables in `schema`.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// With the state table and trigger functions in `schema`.
    pub fn with_state_schema(mut self, schema: impl Into<String>) -> Self {
        self.state_schema = schema.into();
        self
    }

    /// With a `lock_timeout` for every DDL statement.
    pub fn with_lock_timeout(mut self, d: Duration) -> Self {
        self.lock_timeout = d;
        self
    }

    /// With how many attempts a statement gets.
    pub fn with_lock_attempts(mut self, n: u32) -> Self {
        self.lock_attempts = n;
        self
    }

    /// With the longest pause between attempts.
    pub fn with_max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }

    /// With rows per backfill batch.
    pub fn with_batch_rows(mut self, n: u32) -> Self {
        self.batch_rows = n;
        self
    }

    /// With the operations of each release read from `<dir>/<version>.json`.
    pub fn with_operations_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.operations_dir = Some(dir.into());
        self
    }

    /// The view schema of release `version`: `<schema>_<version>`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the name would be longer than 63 characters.
    pub fn view_schema(&self, version: &Version) -> Result<String> {
        let s = format!("{}_{}", self.schema, version.as_str());
        validate_ident("view schema", &s)?;
        Ok(s)
    }

    /// The operations in `<operations_dir>/<version>.json` (none without the directory or file).
    ///
    /// # Errors
    /// [`Error::Io`] reading, [`Error::InvalidInput`] for a file that is not a JSON array of
    /// operations (naming the file).
    pub fn operations_from_dir(&self, version: &Version) -> Result<Vec<Operation>> {
        let Some(dir) = &self.operations_dir else {
            return Ok(Vec::new());
        };
        let path = dir.join(format!("{}.json", version.as_str()));
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let ops: Vec<Operation> = serde_json::from_str(&text).map_err(|e| {
            Error::invalid(
                "schema operations file",
                path.display().to_string(),
                format!("not a JSON array of operations: {e}"),
            )
        })?;
        check_operations(&ops)?;
        Ok(ops)
    }
}

/// Checks every operation.
pub(crate) fn check_operations(ops: &[Operation]) -> Result<()> {
    for op in ops {
        op.check()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_parse_from_json_and_hostile_input_is_refused() {
        let ops: Vec<Operation> = serde_json::from_str(
            r#"[{"op": "rename_column", "table": "orders", "from": "note", "to": "memo"},
                {"op": "change_type", "table": "orders", "column": "amount", "type": "numeric(12,2)",
                 "up": "amount / 100.0", "down": "(amount * 100)::bigint"},
                {"op": "add_column", "table": "orders",
                 "column": {"name": "status", "type": "text", "nullable": false, "default": "'new'"}}]"#,
        )
        .unwrap();
        check_operations(&ops).unwrap();
        assert!(matches!(&ops[0], Operation::RenameColumn { to, .. } if to == "memo"));

        let bad = [
            Operation::RenameColumn {
                table: "orders".into(),
                from: "note".into(),
                to: "x\"; DROP TABLE orders; --".into(),
            },
            Operation::ChangeType {
                table: "orders".into(),
                column: "amount".into(),
                data_type: "text; DROP TABLE orders".into(),
                up: "amount".into(),
                down: "amount".into(),
            },
            Operation::ChangeType {
                table: "orders".into(),
                column: "amount".into(),
                data_type: "text".into(),
                up: "1); DROP TABLE orders; SELECT (1".into(),
                down: "amount".into(),
            },
            Operation::SetNotNull {
                table: "orders".into(),
                column: "note".into(),
                up: "$bg$ || 1".into(),
            },
            Operation::AddColumn {
                table: "orders".into(),
                column: ColumnDef::new("must", "text").not_null(),
                backfill: None,
            },
        ];
        for op in bad {
            let err = op.check().unwrap_err();
            assert!(matches!(err, Error::InvalidInput { .. }), "{op:?}: {err}");
        }
        assert!(
            serde_json::from_str::<Vec<Operation>>(r#"[{"op": "drop_table", "table": "t"}]"#)
                .is_err()
        );
        // A misspelt key is an error, not skipped.
        let err = serde_json::from_str::<Vec<Operation>>(
            r#"[{"op": "add_column", "table": "t", "column": {"name": "c", "type": "text"},
                 "backfil": "1"}]"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("backfil"), "{err}");
    }

    #[test]
    fn config_defaults_and_view_schema_names() {
        let c = VersionedConfig::default();
        c.validate().unwrap();
        let v = Version::new("v2.1").unwrap();
        assert_eq!(c.view_schema(&v).unwrap(), "public_v2.1");
        let long = Version::new("v".repeat(60)).unwrap();
        assert!(c.view_schema(&long).is_err());
        let file: VersionedConfig =
            serde_json::from_str(r#"{"lock_timeout": "200ms", "batch_rows": 50}"#).unwrap();
        assert_eq!(file.lock_timeout, Duration::from_millis(200));
        assert!(serde_json::from_str::<VersionedConfig>(r#"{"batch_rows": 0}"#).is_err());
        assert!(serde_json::from_str::<VersionedConfig>(r#"{"schema": "a b"}"#).is_err());
    }
}
