//! Builds what a pipeline file names: the backends (each behind its cargo feature; a file naming
//! a backend this binary was built without is a usage error that says how to get it), the
//! health checks, hooks, data-path probe and analysis, and the [`Deployer`] over them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bluegreen::health::{CommandCheck, HttpCheck, TcpCheck};
use bluegreen::hooks::ExecHook;
use bluegreen::{
    DatabaseStrategy, Deployer, Environment, Error, FileStateStore, HealthCheck, HookOptions,
    HttpVersionProbe, MetricsAnalysis, Release, StateStore, TrafficSwitch, VersionMarker,
};

use crate::pipeline::{
    DatabaseCfg, EnvironmentCfg, HealthCfg, Pipeline, ProcessCfg, StateCfg, SwitchCfg,
};

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

/// Builds the deployer. With the embedded proxy, the switch is the running `bluegreen serve`,
/// reached by its admin API; the other switches are driven directly.
pub(crate) async fn deployer(p: &Pipeline, state_dir: &Path) -> bluegreen::Result<Deployer> {
    let env = environment(p, state_dir).await?;
    deployer_with(p, state_dir, switch(p, state_dir)?, env, p.public_addr()).await
}

/// Builds the deployer over `switch` and `env`, probing the data path at `public` (`bluegreen
/// serve` passes its own proxy, its own environment and the address it bound).
pub(crate) async fn deployer_with(
    p: &Pipeline,
    state_dir: &Path,
    switch: Arc<dyn TrafficSwitch>,
    env: Arc<dyn Environment>,
    public: Option<std::net::SocketAddr>,
) -> bluegreen::Result<Deployer> {
    let mut b = Deployer::builder()
        .environment(env)
        .switch(switch)
        .store(store(p, state_dir)?)
        .policy(p.policy.clone());
    for source in p.secrets.sources()? {
        b = b.secrets(source);
    }
    if let Some(db) = database(p)? {
        b = b.database(db);
    }
    for h in &p.health_checks {
        let check: Arc<dyn HealthCheck> = match h {
            HealthCfg::Http {
                path,
                status,
                body_contains,
                max_latency_ms,
                timeout_ms,
                headers,
            } => {
                let status = crate::pipeline::http_status(*status)?;
                let mut c = HttpCheck::new(path.clone()).with_status(status);
                if let Some(b) = body_contains {
                    c = c.with_body_contains(b.clone());
                }
                if let Some(ms) = max_latency_ms {
                    c = c.with_max_latency(Duration::from_millis(*ms));
                }
                if let Some(ms) = timeout_ms {
                    c = c.with_timeout(Duration::from_millis(*ms));
                }
                for (k, v) in headers {
                    c = c.with_header(k.clone(), v.clone());
                }
                Arc::new(c)
            }
            HealthCfg::Tcp { timeout_ms } => Arc::new(TcpCheck::new(Duration::from_millis(
                timeout_ms.unwrap_or(3000),
            ))),
            HealthCfg::Command { argv, timeout_ms } => Arc::new(CommandCheck::new(
                argv.clone(),
                Duration::from_millis(timeout_ms.unwrap_or(10_000)),
            )?),
        };
        b = b.health_check(check);
    }
    for (i, h) in p.hooks.iter().enumerate() {
        let name = h.name.clone().unwrap_or_else(|| format!("hook-{i}"));
        let mut opts = HookOptions::default().with_on_timeout(h.on_timeout);
        if let Some(t) = h.timeout {
            // Checked when the file was loaded.
            let t = crate::pipeline::seconds(t)
                .map_err(|e| Error::invalid("pipeline file", format!("hooks[{i}].timeout"), e))?;
            opts = opts.with_timeout(t);
        }
        b = b.hook_with(
            h.point,
            Arc::new(ExecHook::new(name, h.argv.clone())?),
            opts,
        );
    }
    if let Some(v) = &p.verify {
        let marker = match &v.header {
            Some(h) => VersionMarker::Header(h.clone()),
            None => VersionMarker::Body,
        };
        let public = public.ok_or_else(|| {
            Error::invalid(
                "pipeline file",
                "[verify]",
                "set `public` in [switch] (where clients reach it) so the probe can go through it",
            )
        })?;
        let url = format!("http://{public}{}", v.path);
        b = b.verify_data_path(Arc::new(HttpVersionProbe::new(url, marker)));
    }
    if let Some(a) = &p.analysis {
        let mut m = MetricsAnalysis::new(a.max_error_rate);
        if let Some(n) = a.min_requests {
            m = m.with_min_requests(n);
        }
        if let Some(ms) = a.max_p99_ms {
            m = m.with_max_p99(Duration::from_millis(ms));
        }
        b = b.analysis(Arc::new(m));
    }
    b.build()
}

/// The environment. With the embedded proxy, the process environment is the one `bluegreen
/// serve` runs and supervises, reached by its admin API; otherwise programs are started here.
pub(crate) async fn environment(
    p: &Pipeline,
    state_dir: &Path,
) -> bluegreen::Result<Arc<dyn Environment>> {
    match &p.environment {
        EnvironmentCfg::Process(pc) => {
            // Checked here too, so that `validate` reports a bad `pass_env`.
            let config = process_config(pc, state_dir)?;
            if let SwitchCfg::Proxy { admin, .. } = &p.switch {
                let token = crate::pipeline::read_token(&Pipeline::token_path(state_dir))?;
                return Ok(Arc::new(bluegreen::proxy::RemoteEnvironment::new(
                    format!("http://{admin}"),
                    token,
                    bluegreen::process::NAME,
                )?));
            }
            Ok(Arc::new(bluegreen::process::ProcessEnvironment::new(
                config,
            )))
        }
        #[cfg(feature = "docker")]
        EnvironmentCfg::Docker { config, hosts, .. } if !hosts.is_empty() => Ok(Arc::new(
            bluegreen::docker::DockerFleet::new(config.clone(), hosts.clone())?,
        )),
        #[cfg(feature = "docker")]
        EnvironmentCfg::Docker { config, .. } => Ok(Arc::new(
            bluegreen::docker::DockerEnvironment::connect(config.clone()).await?,
        )),
        #[cfg(not(feature = "docker"))]
        EnvironmentCfg::Docker { .. } => Err(not_built("environment kind \"docker\"", "docker")),
        #[cfg(feature = "docker")]
        EnvironmentCfg::Swarm { config, .. } => Ok(Arc::new(
            bluegreen::docker::SwarmEnvironment::connect(config.clone()).await?,
        )),
        #[cfg(not(feature = "docker"))]
        EnvironmentCfg::Swarm { .. } => Err(not_built("environment kind \"swarm\"", "docker")),
    }
}

/// The process environment's settings: state under `<state_dir>/process`, and a clean
/// environment for the programs plus `pass_env`.
pub(crate) fn process_config(
    pc: &ProcessCfg,
    state_dir: &Path,
) -> bluegreen::Result<bluegreen::process::ProcessConfig> {
    let mut config = bluegreen::process::ProcessConfig::new(state_dir.join("process"));
    config.working_dir = pc.working_dir.clone();
    for name in &pc.pass_env {
        config = config.with_pass_env(name.clone());
    }
    config.validate().map_err(|e| match e {
        Error::InvalidInput { value, reason, .. } => Error::invalid(
            "pipeline file",
            format!("environment.pass_env: {value}"),
            reason,
        ),
        other => other,
    })?;
    Ok(config)
}

/// `release` with the `pass_env` variables of this (the deploying) process, as secret variables:
/// held in memory by whoever starts the program (`bluegreen serve` too), never written down. The
/// process that starts the programs passes its own as well (`ProcessConfig::pass_env`); these
/// win.
pub(crate) fn with_passed_env(p: &Pipeline, mut release: Release) -> Release {
    if let EnvironmentCfg::Process(pc) = &p.environment {
        for name in &pc.pass_env {
            if let Ok(value) = std::env::var(name) {
                release = release.with_secret_env(name.clone(), value);
            }
        }
    }
    release
}

/// The traffic switch.
pub(crate) fn switch(p: &Pipeline, state_dir: &Path) -> bluegreen::Result<Arc<dyn TrafficSwitch>> {
    match &p.switch {
        SwitchCfg::Proxy { admin, .. } => {
            let token = crate::pipeline::read_token(&Pipeline::token_path(state_dir))?;
            Ok(Arc::new(bluegreen::proxy::RemoteProxySwitch::new(
                format!("http://{admin}"),
                token,
            )?))
        }
        #[cfg(feature = "haproxy")]
        SwitchCfg::Haproxy { config, .. } => Ok(Arc::new(bluegreen::haproxy::HaproxySwitch::new(
            config.clone(),
        )?)),
        #[cfg(not(feature = "haproxy"))]
        SwitchCfg::Haproxy { .. } => Err(not_built("switch kind \"haproxy\"", "haproxy")),
        #[cfg(feature = "nginx")]
        SwitchCfg::Nginx { config, .. } => Ok(Arc::new(bluegreen::nginx::NginxDynamicSwitch::new(
            config.clone(),
        ))),
        #[cfg(not(feature = "nginx"))]
        SwitchCfg::Nginx { .. } => Err(not_built("switch kind \"nginx\"", "nginx")),
        #[cfg(feature = "traefik")]
        SwitchCfg::Traefik { config, .. } => Ok(Arc::new(bluegreen::traefik::TraefikSwitch::new(
            config.clone(),
        )?)),
        #[cfg(not(feature = "traefik"))]
        SwitchCfg::Traefik { .. } => Err(not_built("switch kind \"traefik\"", "traefik")),
    }
}

/// The database strategy, if any.
pub(crate) fn database(p: &Pipeline) -> bluegreen::Result<Option<Arc<dyn DatabaseStrategy>>> {
    match &p.database {
        DatabaseCfg::None => Ok(None),
        #[cfg(feature = "postgres")]
        DatabaseCfg::Shared(c) => Ok(Some(Arc::new(bluegreen::postgres::SharedDatabase::new(
            c.clone(),
        )?))),
        #[cfg(feature = "postgres")]
        DatabaseCfg::Copied(c) => Ok(Some(Arc::new(bluegreen::postgres::CopiedDatabase::new(
            c.clone(),
        )?))),
        #[cfg(feature = "postgres")]
        DatabaseCfg::Replicated(c) => Ok(Some(Arc::new(
            bluegreen::postgres::ReplicatedDatabase::new(c.clone())?,
        ))),
        #[cfg(not(feature = "postgres"))]
        DatabaseCfg::Shared(_) | DatabaseCfg::Copied(_) | DatabaseCfg::Replicated(_) => {
            Err(no_postgres())
        }
    }
}

/// Reaches the database server without changing anything; what it found, or `None` without a
/// database.
pub(crate) async fn check_database(p: &Pipeline) -> bluegreen::Result<Option<String>> {
    #[cfg(feature = "postgres")]
    {
        let cfg = match &p.database {
            DatabaseCfg::None => return Ok(None),
            DatabaseCfg::Shared(c) => &c.connection,
            DatabaseCfg::Copied(c) => &c.server,
            DatabaseCfg::Replicated(c) => &c.server,
        };
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
        match &p.database {
            DatabaseCfg::None => Ok(None),
            _ => Err(no_postgres()),
        }
    }
}

/// The state store.
pub(crate) fn store(p: &Pipeline, state_dir: &Path) -> bluegreen::Result<Arc<dyn StateStore>> {
    match &p.state {
        StateCfg::File => Ok(Arc::new(FileStateStore::new(state_dir.join("state"))?)),
        #[cfg(feature = "postgres")]
        StateCfg::Postgres(c) => Ok(Arc::new(bluegreen::postgres::PostgresStateStore::new(
            c.clone(),
        )?)),
        #[cfg(not(feature = "postgres"))]
        StateCfg::Postgres(_) => Err(not_built("state kind \"postgres\"", "postgres")),
    }
}
