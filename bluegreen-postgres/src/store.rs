//! [`PostgresStateStore`]: deployment state and the deployment lock in two PostgreSQL tables.

use std::time::Duration;

use async_trait::async_trait;
use bluegreen_core::{
    state::new_token, DeploymentState, Error, Lease, LockInfo, LockOwner, Result, StateStore,
    Timestamp,
};
use tokio::sync::Mutex;
use tokio_postgres::{Client, Row};

use crate::conn::PostgresConfig;
use crate::error::{fail, pg_error};
use crate::ident::{quote_ident, validate_ident};

const BACKEND: &str = "postgres";

/// Server time in milliseconds since the epoch: every lease compares against one clock.
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// Settings of a [`PostgresStateStore`]. In files only `connection` is required.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
#[non_exhaustive]
pub struct PostgresStoreConfig {
    /// Where the tables live.
    pub connection: PostgresConfig,
    /// Schema of the tables (default `public`).
    #[serde(default = "public")]
    pub schema: String,
    /// Prefix of the table names: `<prefix>_state`, `<prefix>_lock` and `<prefix>_epoch` (default
    /// `bluegreen`).
    #[serde(default = "default_prefix")]
    pub table_prefix: String,
    /// The deployment's key: several deployments can share the tables (default `default`).
    #[serde(default = "default_deployment")]
    pub deployment: String,
}

bluegreen_core::validated_serde!(PostgresStoreConfig);

fn public() -> String {
    "public".into()
}
fn default_prefix() -> String {
    "bluegreen".into()
}
fn default_deployment() -> String {
    "default".into()
}

impl PostgresStoreConfig {
    /// Defaults for `connection`.
    pub fn new(connection: PostgresConfig) -> Self {
        PostgresStoreConfig {
            connection,
            schema: public(),
            table_prefix: default_prefix(),
            deployment: default_deployment(),
        }
    }

    /// Checks the connection and the table names (also run when deserializing and by
    /// [`PostgresStateStore::new`]).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the setting.
    pub fn validate(&self) -> Result<()> {
        self.connection.validate()?;
        validate_ident("schema", &self.schema)?;
        validate_ident("table prefix", &self.table_prefix)?;
        if self.table_prefix.len() > 50 {
            return Err(Error::invalid(
                "table prefix",
                &self.table_prefix,
                "longer than 50 characters",
            ));
        }
        Ok(())
    }

    /// With a schema for the tables (it must exist).
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// With a table-name prefix.
    pub fn with_table_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.table_prefix = prefix.into();
        self
    }

    /// With a deployment key (one row per deployment in each table).
    pub fn with_deployment(mut self, deployment: impl Into<String>) -> Self {
        self.deployment = deployment.into();
        self
    }
}

/// State and lock in PostgreSQL, for teams that deploy from several machines.
///
/// - Table `<prefix>_state` holds one row per deployment key: the revision and the state as JSON.
///   `save` is a compare-and-swap (`UPDATE … WHERE revision = $expected`, or an insert that
///   conflicts when a row already exists).
/// - Table `<prefix>_lock` holds the lease: owner (host, pid, purpose), a unique token, since and
///   expiry, in the **server's** clock (so operators' clocks do not matter). Acquisition is one
///   `INSERT … ON CONFLICT DO UPDATE … WHERE expires <= now`: of two concurrent callers exactly one
///   wins; an expired lease is taken over.
/// - Table `<prefix>_epoch` keeps the highest lease epoch granted per deployment key, so epochs only
///   grow (released and broken locks included). `save` locks the lock row and refuses (as
///   [`Error::LockLost`]) a lease that is not the one held now, unexpired in the server's clock: a
///   run that lost its lease never overwrites what the new holder wrote.
/// - Tables are created on first use (`CREATE TABLE IF NOT EXISTS`, under an advisory lock).
/// - Each handle keeps one connection, reopened when it breaks.
///
/// ```no_run
/// # async fn f() -> bluegreen_core::Result<()> {
/// use bluegreen_postgres::{PostgresConfig, PostgresStateStore, PostgresStoreConfig};
/// use bluegreen_core::StateStore;
/// let cfg = PostgresConfig::new("db.internal", 5432, "ops").with_user("deployer").with_password("…");
/// let store = PostgresStateStore::new(PostgresStoreConfig::new(cfg).with_deployment("shop"))?;
/// let state = store.load().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PostgresStateStore {
    config: PostgresStoreConfig,
    state_table: String,
    lock_table: String,
    epoch_table: String,
    client: Mutex<Option<Client>>,
}

impl PostgresStateStore {
    /// A store with `config`; validates the names; connects on first use.
    pub fn new(config: PostgresStoreConfig) -> Result<Self> {
        config.validate()?;
        let t = |suffix: &str| {
            format!(
                "{}.{}",
                quote_ident(&config.schema),
                quote_ident(&format!("{}_{suffix}", config.table_prefix))
            )
        };
        Ok(PostgresStateStore {
            state_table: t("state"),
            lock_table: t("lock"),
            epoch_table: t("epoch"),
            config,
            client: Mutex::new(None),
        })
    }

    /// The settings.
    pub fn config(&self) -> &PostgresStoreConfig {
        &self.config
    }

    fn location(&self) -> String {
        format!(
            "postgres {} table {} key {}",
            self.config.connection.describe(),
            self.state_table,
            self.config.deployment
        )
    }

    /// Runs `f` with this handle's connection (opened, and the tables created, when needed).
    async fn with_client<T>(
        &self,
        f: impl for<'a> FnOnce(
            &'a mut Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T>> + Send + 'a>,
        >,
    ) -> Result<T> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().map(|c| c.is_closed()).unwrap_or(true) {
            let client = self.config.connection.connect(BACKEND).await?;
            self.create_tables(&client).await?;
            *guard = Some(client);
        }
        let client = guard.as_mut().expect("connected above");
        let out = f(client).await;
        if matches!(
            out,
            Err(Error::Backend {
                retryable: true,
                ..
            })
        ) || client.is_closed()
        {
            // A broken (or possibly broken) connection: the next call opens a new one.
            *guard = None;
        }
        out
    }

    async fn create_tables(&self, client: &Client) -> Result<()> {
        let sql = format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('bluegreen-state-store-ddl'));
             CREATE TABLE IF NOT EXISTS {st} (
                 deployment text PRIMARY KEY,
                 revision bigint NOT NULL,
                 state text NOT NULL,
                 updated_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS {lt} (
                 deployment text PRIMARY KEY,
                 token text NOT NULL,
                 owner text NOT NULL,
                 since_ms bigint NOT NULL,
                 expires_ms bigint NOT NULL);
             ALTER TABLE {lt} ADD COLUMN IF NOT EXISTS epoch bigint NOT NULL DEFAULT 0;
             CREATE TABLE IF NOT EXISTS {et} (
                 deployment text PRIMARY KEY,
                 epoch bigint NOT NULL);
             COMMIT;",
            st = self.state_table,
            lt = self.lock_table,
            et = self.epoch_table
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| pg_error(BACKEND, "creating the state store tables", e))
    }
}

/// The lock of deployment `key` in lock table `lt`, if one is held.
async fn read_lock(c: &Client, lt: &str, key: &str, op: &str) -> Result<Option<LockInfo>> {
    let row = c
        .query_opt(
            &format!("SELECT * FROM {lt} WHERE deployment = $1"),
            &[&key],
        )
        .await
        .map_err(|e| pg_error(BACKEND, op, e))?;
    row.as_ref().map(lock_from_row).transpose()
}

fn lock_from_row(row: &Row) -> Result<LockInfo> {
    let owner: String = row.get("owner");
    let owner: LockOwner = serde_json::from_str(&owner).map_err(|e| Error::CorruptState {
        location: "postgres lock table".into(),
        reason: format!("lock owner: {e}"),
    })?;
    Ok(LockInfo {
        owner,
        token: row.get("token"),
        since: Timestamp(row.get::<_, i64>("since_ms").max(0) as u64),
        expires: Timestamp(row.get::<_, i64>("expires_ms").max(0) as u64),
        epoch: row.get::<_, i64>("epoch").max(0) as u64,
    })
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4)
}

#[async_trait]
impl StateStore for PostgresStateStore {
    fn name(&self) -> &str {
        BACKEND
    }

    async fn load(&self) -> Result<Option<DeploymentState>> {
        let sql = format!(
            "SELECT state FROM {} WHERE deployment = $1",
            self.state_table
        );
        let key = self.config.deployment.clone();
        let location = self.location();
        self.with_client(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(&sql, &[&key])
                    .await
                    .map_err(|e| pg_error(BACKEND, "load", e))?;
                match row {
                    None => Ok(None),
                    Some(r) => {
                        let text: String = r.get(0);
                        DeploymentState::from_json(&location, text.as_bytes()).map(Some)
                    }
                }
            })
        })
        .await
    }

    async fn save(&self, state: &DeploymentState, lease: &Lease) -> Result<u64> {
        let key = self.config.deployment.clone();
        let lease = lease.clone();
        let lt = self.lock_table.clone();
        let expected = state.revision;
        let mut next = state.clone();
        next.revision = expected + 1;
        let json = String::from_utf8(next.to_json())
            .map_err(|e| fail(BACKEND, "save", format!("state is not UTF-8: {e}")))?;
        let (st, location) = (self.state_table.clone(), self.location());
        self.with_client(move |c| {
            Box::pin(async move {
                let tx = c
                    .transaction()
                    .await
                    .map_err(|e| pg_error(BACKEND, "save", e))?;
                // Fencing: the lock row is locked until the commit, so it cannot change hands
                // between this check and the write.
                let held = tx
                    .query_opt(
                        &format!(
                            "SELECT *, {NOW_MS} AS now_ms FROM {lt} WHERE deployment = $1 FOR UPDATE"
                        ),
                        &[&key],
                    )
                    .await
                    .map_err(|e| pg_error(BACKEND, "save", e))?;
                match &held {
                    Some(row) => {
                        let now = Timestamp(row.get::<_, i64>("now_ms").max(0) as u64);
                        lock_from_row(row)?.check_held_by(&lease, now)?;
                    }
                    None => {
                        return Err(Error::LockLost {
                            reason: "the lock was broken or released".into(),
                        })
                    }
                }
                let current = tx
                    .query_opt(
                        &format!(
                            "SELECT revision, state FROM {st} WHERE deployment = $1 FOR UPDATE"
                        ),
                        &[&key],
                    )
                    .await
                    .map_err(|e| pg_error(BACKEND, "save", e))?;
                let found = match &current {
                    None => 0,
                    Some(r) => {
                        // A corrupt or newer-format state is never overwritten.
                        let text: String = r.get(1);
                        DeploymentState::from_json(&location, text.as_bytes())?;
                        r.get::<_, i64>(0) as u64
                    }
                };
                if found != expected {
                    return Err(Error::Conflict { expected, found });
                }
                let n = if current.is_none() {
                    tx.execute(
                        &format!(
                            "INSERT INTO {st} (deployment, revision, state) VALUES ($1, $2, $3)
                             ON CONFLICT (deployment) DO NOTHING"
                        ),
                        &[&key, &((expected + 1) as i64), &json],
                    )
                    .await
                } else {
                    tx.execute(
                        &format!(
                            "UPDATE {st} SET revision = $2, state = $3, updated_at = now()
                             WHERE deployment = $1 AND revision = $4"
                        ),
                        &[&key, &((expected + 1) as i64), &json, &(expected as i64)],
                    )
                    .await
                }
                .map_err(|e| pg_error(BACKEND, "save", e))?;
                if n != 1 {
                    // A concurrent first save won the insert.
                    drop(tx);
                    return Err(Error::Conflict {
                        expected,
                        found: expected + 1,
                    });
                }
                tx.commit()
                    .await
                    .map_err(|e| pg_error(BACKEND, "save", e))?;
                Ok(expected + 1)
            })
        })
        .await
    }

    async fn acquire(&self, owner: &LockOwner, ttl: Duration) -> Result<Lease> {
        let key = self.config.deployment.clone();
        let owner_json = serde_json::to_string(owner).expect("owner serializes");
        let lt = self.lock_table.clone();
        let et = self.epoch_table.clone();
        let ttl = ttl_ms(ttl);
        self.with_client(move |c| {
            Box::pin(async move {
                for _ in 0..10 {
                    let token = new_token();
                    let won = c
                        .query_opt(
                            &format!(
                                "WITH e AS (
                                   INSERT INTO {et} AS x (deployment, epoch) VALUES ($1, 1)
                                   ON CONFLICT (deployment) DO UPDATE SET epoch = x.epoch + 1
                                   RETURNING epoch)
                                 INSERT INTO {lt} AS l
                                   (deployment, token, owner, since_ms, expires_ms, epoch)
                                 VALUES ($1, $2, $3, {NOW_MS}, {NOW_MS} + $4, (SELECT epoch FROM e))
                                 ON CONFLICT (deployment) DO UPDATE
                                   SET token = EXCLUDED.token, owner = EXCLUDED.owner,
                                       since_ms = EXCLUDED.since_ms, expires_ms = EXCLUDED.expires_ms,
                                       epoch = EXCLUDED.epoch
                                   WHERE l.expires_ms <= EXCLUDED.since_ms
                                 RETURNING token, owner, since_ms, expires_ms, epoch"
                            ),
                            &[&key, &token, &owner_json, &ttl],
                        )
                        .await
                        .map_err(|e| pg_error(BACKEND, "acquire", e))?;
                    if let Some(row) = won {
                        return lock_from_row(&row);
                    }
                    if let Some(holder) = read_lock(c, &lt, &key, "acquire").await? {
                        return Err(Error::Locked {
                            holder: Box::new(holder),
                        });
                    }
                    // Released between the two statements: try again.
                }
                Err(Error::backend(
                    BACKEND,
                    "acquire",
                    true,
                    "the lock changed hands too often; try again",
                ))
            })
        })
        .await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let key = self.config.deployment.clone();
        let token = lease.token.clone();
        let lt = self.lock_table.clone();
        let ttl = ttl_ms(ttl);
        self.with_client(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        &format!(
                            "UPDATE {lt} SET expires_ms = {NOW_MS} + $3
                             WHERE deployment = $1 AND token = $2
                             RETURNING token, owner, since_ms, expires_ms, epoch"
                        ),
                        &[&key, &token, &ttl],
                    )
                    .await
                    .map_err(|e| pg_error(BACKEND, "renew", e))?;
                if let Some(row) = row {
                    return lock_from_row(&row);
                }
                Err(Error::LockLost {
                    reason: match read_lock(c, &lt, &key, "renew").await? {
                        Some(holder) => format!("now held by {holder}"),
                        None => "the lock was broken or released".into(),
                    },
                })
            })
        })
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let key = self.config.deployment.clone();
        let token = lease.token.clone();
        let lt = self.lock_table.clone();
        self.with_client(move |c| {
            Box::pin(async move {
                c.execute(
                    &format!("DELETE FROM {lt} WHERE deployment = $1 AND token = $2"),
                    &[&key, &token],
                )
                .await
                .map_err(|e| pg_error(BACKEND, "release", e))?;
                Ok(())
            })
        })
        .await
    }

    async fn lock_info(&self) -> Result<Option<LockInfo>> {
        let key = self.config.deployment.clone();
        let lt = self.lock_table.clone();
        self.with_client(move |c| {
            Box::pin(async move { read_lock(c, &lt, &key, "lock_info").await })
        })
        .await
    }

    async fn break_lock(&self) -> Result<Option<LockInfo>> {
        let key = self.config.deployment.clone();
        let lt = self.lock_table.clone();
        self.with_client(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        &format!(
                            "DELETE FROM {lt} WHERE deployment = $1
                             RETURNING token, owner, since_ms, expires_ms, epoch"
                        ),
                        &[&key],
                    )
                    .await
                    .map_err(|e| pg_error(BACKEND, "break_lock", e))?;
                row.as_ref().map(lock_from_row).transpose()
            })
        })
        .await
    }
}
