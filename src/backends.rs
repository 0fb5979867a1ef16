//! Builds the backends a pipeline file names. Each backend is behind its cargo feature; a file
//! naming a backend this binary was built without is a usage error that says how to get it.

use std::path::Path;
use std::sync::Arc;

use bluegreen::{DatabaseStrategy, Environment, Error, FileStateStore, StateStore, TrafficSwitch};

#[cfg(feature = "postgres")]
use crate::pipeline::PgCfg;
use crate::pipeline::{DatabaseCfg, EnvironmentCfg, Pipeline, StateCfg, SwitchCfg};

/// The error for a backend compiled out of this binary.
#[allow(dead_code)]
fn not_built(what: &str, feature: &str) -> Error {
    Error::invalid(
        "pipeline file",
        what.to_string(),
        format!(
            "this bluegreen binary was built without the `{feature}` feature; \
             install it with `cargo install bluegreen --features {feature}` (or `--features full`)"
        ),
    )
}

/// The error for a database strategy in a binary built without PostgreSQL.
#[cfg(not(feature = "postgres"))]
fn no_postgres() -> Error {
    not_built(
        "database kind \"shared\"/\"copied\"/\"replicated\"",
        "postgres",
    )
}

/// The environment.
pub(crate) async fn environment(
    p: &Pipeline,
    state_dir: &Path,
) -> bluegreen::Result<Arc<dyn Environment>> {
    match &p.environment {
        EnvironmentCfg::Process(_) => {
            use bluegreen::process::{ProcessConfig, ProcessEnvironment};
            Ok(Arc::new(ProcessEnvironment::new(ProcessConfig::new(
                state_dir.join("process"),
            ))))
        }
        #[cfg(feature = "docker")]
        EnvironmentCfg::Docker(cfg) => {
            use crate::pipeline::PullCfg;
            use bluegreen::docker::{DockerConfig, DockerEnvironment, PullPolicy};
            let mut c = DockerConfig::new(p.project.name.as_str())?
                .with_pull(match cfg.pull {
                    PullCfg::Never => PullPolicy::Never,
                    PullCfg::IfMissing => PullPolicy::IfMissing,
                    PullCfg::Always => PullPolicy::Always,
                })
                .with_stop_timeout(p.policy.drain_timeout);
            if let Some(port) = cfg.port {
                c = c.with_container_port(port);
            }
            if let Some(mb) = cfg.memory_mb {
                let bytes = i64::try_from(mb.saturating_mul(1024 * 1024)).map_err(|_| {
                    Error::invalid("pipeline file", "environment.memory_mb", "too large")
                })?;
                c = c.with_memory_limit(bytes);
            }
            if let Some(cpus) = cfg.cpus {
                c = c.with_cpus(cpus);
            }
            for (k, v) in &cfg.env {
                c = c.with_env(k.clone(), v.clone());
            }
            Ok(Arc::new(DockerEnvironment::connect(c).await?))
        }
        #[cfg(not(feature = "docker"))]
        EnvironmentCfg::Docker(_) => Err(not_built("environment kind \"docker\"", "docker")),
    }
}

/// The traffic switch.
pub(crate) fn switch(p: &Pipeline, state_dir: &Path) -> bluegreen::Result<Arc<dyn TrafficSwitch>> {
    match &p.switch {
        SwitchCfg::Proxy(cfg) => {
            let token = crate::pipeline::read_token(&Pipeline::token_path(state_dir))?;
            Ok(Arc::new(bluegreen::proxy::RemoteProxySwitch::new(
                format!("http://{}", cfg.admin),
                token,
            )?))
        }
        #[cfg(feature = "haproxy")]
        SwitchCfg::Haproxy(cfg) => {
            use bluegreen::haproxy::{HaproxyConfig, HaproxySwitch};
            let c = HaproxyConfig::new(&cfg.runtime)?
                .with_backend(cfg.backend.clone())
                .with_servers(cfg.blue_server.clone(), cfg.green_server.clone())
                .with_drain_timeout(p.policy.drain_timeout);
            Ok(Arc::new(HaproxySwitch::new(c)?))
        }
        #[cfg(not(feature = "haproxy"))]
        SwitchCfg::Haproxy(_) => Err(not_built("switch kind \"haproxy\"", "haproxy")),
        #[cfg(feature = "nginx")]
        SwitchCfg::Nginx(cfg) => {
            use bluegreen::nginx::{NginxDynamicConfig, NginxDynamicSwitch};
            let token_path = p.base.join(&cfg.token_file);
            let token = crate::pipeline::read_secret_file(&token_path, "nginx control token")?;
            Ok(Arc::new(NginxDynamicSwitch::new(NginxDynamicConfig::new(
                &cfg.name,
                cfg.control,
                token,
            )?)))
        }
        #[cfg(not(feature = "nginx"))]
        SwitchCfg::Nginx(_) => Err(not_built("switch kind \"nginx\"", "nginx")),
        #[cfg(feature = "traefik")]
        SwitchCfg::Traefik(cfg) => {
            use crate::pipeline::{TraefikFormat, TraefikVer};
            use bluegreen::traefik::{FileFormat, TraefikConfig, TraefikSwitch, TraefikVersion};
            let mut c =
                TraefikConfig::new(cfg.name.clone(), cfg.rule.clone(), p.base.join(&cfg.dir))?
                    .with_format(match cfg.format {
                        TraefikFormat::Yaml => FileFormat::Yaml,
                        TraefikFormat::Toml => FileFormat::Toml,
                    })
                    .with_version(match cfg.version {
                        TraefikVer::V2 => TraefikVersion::V2,
                        TraefikVer::V3 => TraefikVersion::V3,
                    })
                    .with_entry_points(cfg.entry_points.clone());
            if let Some(api) = &cfg.api {
                c = c.with_api(api.clone());
            }
            Ok(Arc::new(TraefikSwitch::new(c)?))
        }
        #[cfg(not(feature = "traefik"))]
        SwitchCfg::Traefik(_) => Err(not_built("switch kind \"traefik\"", "traefik")),
    }
}

/// A PostgreSQL connection from the file, the password from its environment variable.
#[cfg(feature = "postgres")]
fn pg(c: &PgCfg, what: &str) -> bluegreen::Result<bluegreen::postgres::PostgresConfig> {
    let mut cfg =
        bluegreen::postgres::PostgresConfig::new(c.host.clone(), c.port, c.dbname.clone())
            .with_user(c.user.clone());
    if let Some(var) = &c.password_env {
        let pw = std::env::var(var).map_err(|_| {
            Error::invalid(
                "pipeline file",
                format!("{what}.connection.password_env"),
                format!("the environment variable {var} is not set"),
            )
        })?;
        cfg = cfg.with_password(pw);
    }
    Ok(cfg)
}

/// The database strategy, if any.
pub(crate) fn database(p: &Pipeline) -> bluegreen::Result<Option<Arc<dyn DatabaseStrategy>>> {
    match &p.database {
        DatabaseCfg::None => Ok(None),
        #[cfg(feature = "postgres")]
        DatabaseCfg::Shared {
            connection,
            migrations,
        } => {
            use bluegreen::postgres::{Migration, SharedConfig, SharedDatabase};
            let mut c = SharedConfig::new(pg(connection, "database")?);
            if let Some(dir) = migrations {
                c = c.with_migrations(Migration::from_dir(p.base.join(dir))?);
            }
            Ok(Some(Arc::new(SharedDatabase::new(c)?)))
        }
        #[cfg(feature = "postgres")]
        DatabaseCfg::Copied {
            connection,
            workers,
            template,
        } => {
            use bluegreen::postgres::{CopiedConfig, CopiedDatabase};
            let mut c = CopiedConfig::new(pg(connection, "database")?).with_template(*template);
            if let Some(n) = workers {
                c = c.with_workers(*n);
            }
            Ok(Some(Arc::new(CopiedDatabase::new(c)?)))
        }
        #[cfg(feature = "postgres")]
        DatabaseCfg::Replicated {
            connection,
            lag_bound,
            after_cutover,
        } => {
            use crate::pipeline::AfterCutoverCfg;
            use bluegreen::postgres::{AfterCutover, ReplicatedConfig, ReplicatedDatabase};
            let mut c = ReplicatedConfig::new(pg(connection, "database")?).with_after_cutover(
                match after_cutover {
                    AfterCutoverCfg::Reverse => AfterCutover::Reverse,
                    AfterCutoverCfg::Drop => AfterCutover::Drop,
                },
            );
            if let Some(secs) = lag_bound {
                if !(secs.is_finite() && *secs > 0.0) {
                    return Err(Error::invalid(
                        "pipeline file",
                        "database.lag_bound",
                        "must be a positive number of seconds",
                    ));
                }
                c = c.with_lag_bound(std::time::Duration::from_secs_f64(*secs));
            }
            Ok(Some(Arc::new(ReplicatedDatabase::new(c)?)))
        }
        #[cfg(not(feature = "postgres"))]
        DatabaseCfg::Shared { .. }
        | DatabaseCfg::Copied { .. }
        | DatabaseCfg::Replicated { .. } => Err(no_postgres()),
    }
}

/// Reaches the database server without changing anything; what it found, or `None` without a
/// database.
pub(crate) async fn check_database(p: &Pipeline) -> bluegreen::Result<Option<String>> {
    let Some(connection) = p.database.connection() else {
        return Ok(None);
    };
    #[cfg(feature = "postgres")]
    {
        let cfg = pg(connection, "database")?;
        let client = cfg.connect("validate").await?;
        let row = client
            .query_one("SELECT current_setting('server_version')", &[])
            .await
            .map_err(|e| Error::backend("postgres", "reading the server version", true, e))?;
        let version: String = row.get(0);
        Ok(Some(format!(
            "PostgreSQL {version} reachable at {}",
            cfg.describe()
        )))
    }
    #[cfg(not(feature = "postgres"))]
    {
        let _ = connection;
        Err(no_postgres())
    }
}

/// The state store.
pub(crate) fn store(p: &Pipeline, state_dir: &Path) -> bluegreen::Result<Arc<dyn StateStore>> {
    match &p.state {
        StateCfg::File => Ok(Arc::new(FileStateStore::new(state_dir.join("state"))?)),
        #[cfg(feature = "postgres")]
        StateCfg::Postgres { connection } => {
            use bluegreen::postgres::{PostgresStateStore, PostgresStoreConfig};
            Ok(Arc::new(PostgresStateStore::new(
                PostgresStoreConfig::new(pg(connection, "state")?)
                    .with_deployment(p.project.name.as_str()),
            )?))
        }
        #[cfg(not(feature = "postgres"))]
        StateCfg::Postgres { .. } => Err(not_built("state kind \"postgres\"", "postgres")),
    }
}
