//! `POST /write?id=N`: one row per request into the database the release is bound to, through a
//! small pool of connections.

use std::fmt;
use std::sync::Mutex;

use tokio_postgres::{Client, Config, NoTls};

/// Idle connections kept for reuse.
const MAX_IDLE: usize = 16;

/// The table the demo writes to; created by whoever owns the schema (DDL is not replicated).
pub const WRITES_TABLE: &str = "demo_writes";

/// A connection string the app was given (`DATABASE_URL`), never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Wraps a `postgres://` URL or a `key=value` connection string.
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(url.into())
    }

    pub(crate) fn parse(&self) -> Result<Config, String> {
        self.0
            .parse::<Config>()
            .map_err(|e| format!("DATABASE_URL is not a PostgreSQL connection string: {e}"))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatabaseUrl(<redacted>)")
    }
}

/// Connections to the bound database.
pub(crate) struct Db {
    config: Config,
    idle: Mutex<Vec<Client>>,
}

impl Db {
    pub(crate) fn new(config: Config) -> Self {
        Db {
            config,
            idle: Mutex::new(Vec::new()),
        }
    }

    async fn client(&self) -> Result<Client, tokio_postgres::Error> {
        loop {
            let reused = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match reused {
                Some(c) if !c.is_closed() => return Ok(c),
                Some(_) => continue,
                None => break,
            }
        }
        let (client, conn) = self.config.connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Inserts `id` (autocommit); the answer is sent only after the commit.
    pub(crate) async fn write(&self, id: i64) -> Result<(), tokio_postgres::Error> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO demo_writes (id) VALUES ($1) ON CONFLICT (id) DO NOTHING",
                &[&id],
            )
            .await?;
        if !client.is_closed() {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(client);
            }
        }
        Ok(())
    }
}
