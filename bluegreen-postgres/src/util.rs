//! Pieces the strategies share: per-slot database names, database lifecycle, table lists,
//! sequences.

use bluegreen_core::{DbBinding, DbContext, PerSlot, Result, Slot};
use tokio_postgres::Client;

use crate::conn::PostgresConfig;
use crate::error::{fail, pg_error};
use crate::ident::{quote_ident, quote_literal, validate_ident};

/// Which database each slot uses: `<base>_<slot>` unless configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotDatabases {
    pub(crate) base: String,
    pub(crate) per_slot: PerSlot<Option<String>>,
}

impl SlotDatabases {
    /// The database of `slot`.
    pub(crate) fn of(&self, slot: Slot) -> String {
        self.per_slot
            .get(slot)
            .clone()
            .unwrap_or_else(|| format!("{}_{}", self.base, slot.as_str()))
    }

    /// The live database: the live slot's, or the base database on the first deploy.
    pub(crate) fn live(&self, ctx: &DbContext) -> String {
        match ctx.live {
            Some(s) => self.of(s),
            None => self.base.clone(),
        }
    }

    /// The databases of a per-slot strategy (`CopiedDatabase`, `ReplicatedDatabase`): the base is `server`'s
    /// database, `per_slot` overrides `<base>_<slot>`. Validates both servers and every name.
    pub(crate) fn for_strategy(
        server: &PostgresConfig,
        target_server: Option<&PostgresConfig>,
        per_slot: &PerSlot<Option<String>>,
    ) -> Result<Self> {
        server.validate()?;
        if let Some(t) = target_server {
            t.validate()?;
        }
        let dbs = SlotDatabases {
            base: server.dbname.clone(),
            per_slot: per_slot.clone(),
        };
        dbs.validate()?;
        Ok(dbs)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        validate_ident("database", &self.base)?;
        for s in Slot::ALL {
            validate_ident("database", &self.of(s))?;
        }
        if self.of(Slot::Blue) == self.of(Slot::Green)
            || self.of(Slot::Blue) == self.base
            || self.of(Slot::Green) == self.base
        {
            return Err(bluegreen_core::Error::invalid(
                "database",
                self.base.clone(),
                "the base database and the two slot databases must all differ",
            ));
        }
        Ok(())
    }
}

/// What a release gets for database `db`: `binding`'s settings (e.g. an application role) when
/// set, else the target server's, with the database name replaced.
pub(crate) fn binding_for(
    binding: Option<&PostgresConfig>,
    target_server: &PostgresConfig,
    db: &str,
) -> DbBinding {
    binding.unwrap_or(target_server).db(db).binding()
}

pub(crate) async fn database_exists(backend: &str, admin: &Client, db: &str) -> Result<bool> {
    let r = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
        .await
        .map_err(|e| pg_error(backend, "reading pg_database", e))?;
    Ok(r.is_some())
}

pub(crate) async fn database_comment(
    backend: &str,
    admin: &Client,
    db: &str,
) -> Result<Option<String>> {
    let r = admin
        .query_opt(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
            &[&db],
        )
        .await
        .map_err(|e| pg_error(backend, "reading the database comment", e))?;
    Ok(r.and_then(|r| r.get::<_, Option<String>>(0)))
}

pub(crate) async fn set_database_comment(
    backend: &str,
    admin: &Client,
    db: &str,
    comment: &str,
) -> Result<()> {
    admin
        .batch_execute(&format!(
            "COMMENT ON DATABASE {} IS {}",
            quote_ident(db),
            quote_literal(comment)
        ))
        .await
        .map_err(|e| pg_error(backend, &format!("marking database {db}"), e))
}

/// Drops `db` (terminating its sessions) if it exists.
pub(crate) async fn drop_database(backend: &str, admin: &Client, db: &str) -> Result<()> {
    admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(db)
        ))
        .await
        .map_err(|e| pg_error(backend, &format!("dropping database {db}"), e))
}

/// A user table to copy: schema and name.
#[derive(Debug, Clone)]
pub(crate) struct TableRef {
    pub(crate) schema: String,
    pub(crate) name: String,
    /// `pg_relation_size` of its main fork when listed.
    pub(crate) bytes: i64,
}

impl TableRef {
    pub(crate) fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// The user tables of the connected database (no catalogs, no extension members, no temp
/// tables), biggest first.
pub(crate) async fn user_tables(backend: &str, c: &Client) -> Result<Vec<TableRef>> {
    let rows = c
        .query(
            "SELECT n.nspname::text, c.relname::text, pg_relation_size(c.oid)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'r' AND c.relpersistence IN ('p', 'u')
               AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
               AND NOT EXISTS (SELECT 1 FROM pg_depend d
                               WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                 AND d.deptype = 'e')
             ORDER BY 3 DESC, 1, 2",
            &[],
        )
        .await
        .map_err(|e| pg_error(backend, "listing tables", e))?;
    Ok(rows
        .iter()
        .map(|r| TableRef {
            schema: r.get(0),
            name: r.get(1),
            bytes: r.get(2),
        })
        .collect())
}

/// Sets every sequence on `target` from `source` (`last_value + margin`); returns how many.
pub(crate) async fn copy_sequences(
    backend: &str,
    source: &Client,
    target: &Client,
    margin: i64,
) -> Result<usize> {
    let rows = source
        .query(
            "SELECT schemaname::text, sequencename::text, last_value FROM pg_sequences
             WHERE last_value IS NOT NULL
               AND schemaname <> 'information_schema' AND schemaname NOT LIKE 'pg\\_%'",
            &[],
        )
        .await
        .map_err(|e| pg_error(backend, "reading sequences", e))?;
    for r in &rows {
        let (s, n, v): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
        let q = format!("{}.{}", quote_ident(&s), quote_ident(&n));
        target
            .execute(
                "SELECT setval($1::text::regclass, GREATEST($2::bigint, 1), true)",
                &[&q, &v.saturating_add(margin)],
            )
            .await
            .map_err(|e| pg_error(backend, &format!("setting sequence {q}"), e))?;
    }
    Ok(rows.len())
}

/// Fails unless `db` is a usable name distinct from `other`.
pub(crate) fn distinct(backend: &str, what: &str, db: &str, other: &str) -> Result<()> {
    if db == other {
        return Err(fail(
            backend,
            what,
            format!("source and target are the same database {db}"),
        ));
    }
    Ok(())
}
