//! Building a [`Deployer`] from one implementation of each trait and a policy.

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tokio::sync::broadcast;

use super::Deployer;
use crate::analysis::{Analysis, DataPathProbe};
use crate::error::{Error, Result};
use crate::events::DeployEvent;
use crate::policy::Policy;
use crate::traits::{
    DatabaseStrategy, Environment, HealthCheck, Hook, HookPoint, SecretSource, StateStore,
    TrafficSwitch,
};
use crate::HookOptions;

pub(super) struct RegisteredHook {
    pub(super) point: HookPoint,
    pub(super) hook: Arc<dyn Hook>,
    pub(super) options: HookOptions,
}

/// The parts a [`Deployer`] is built from; shared by every run.
pub(super) struct Inner {
    pub(super) environment: Arc<dyn Environment>,
    pub(super) switch: Arc<dyn TrafficSwitch>,
    pub(super) database: Option<Arc<dyn DatabaseStrategy>>,
    pub(super) health_checks: Vec<Arc<dyn HealthCheck>>,
    pub(super) hooks: Vec<RegisteredHook>,
    pub(super) analyses: Vec<Arc<dyn Analysis>>,
    pub(super) probe: Option<Arc<dyn DataPathProbe>>,
    pub(super) store: Arc<dyn StateStore>,
    pub(super) secrets: Vec<Arc<dyn SecretSource>>,
    pub(super) policy: Policy,
    pub(super) events: broadcast::Sender<DeployEvent>,
    pub(super) interrupted: AtomicBool,
}

impl Inner {
    /// The hooks registered at `point`, in registration order.
    pub(super) fn hooks_at(&self, point: HookPoint) -> impl Iterator<Item = &RegisteredHook> {
        self.hooks.iter().filter(move |h| h.point == point)
    }
}

/// Builds a [`Deployer`]. Environment, switch and store are required.
#[derive(Default)]
pub struct DeployerBuilder {
    environment: Option<Arc<dyn Environment>>,
    switch: Option<Arc<dyn TrafficSwitch>>,
    database: Option<Arc<dyn DatabaseStrategy>>,
    health_checks: Vec<Arc<dyn HealthCheck>>,
    hooks: Vec<RegisteredHook>,
    analyses: Vec<Arc<dyn Analysis>>,
    probe: Option<Arc<dyn DataPathProbe>>,
    store: Option<Arc<dyn StateStore>>,
    secrets: Vec<Arc<dyn SecretSource>>,
    policy: Policy,
}

impl fmt::Debug for DeployerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeployerBuilder")
    }
}

impl DeployerBuilder {
    /// Where releases run.
    pub fn environment(mut self, e: Arc<dyn Environment>) -> Self {
        self.environment = Some(e);
        self
    }
    /// What moves traffic.
    pub fn switch(mut self, s: Arc<dyn TrafficSwitch>) -> Self {
        self.switch = Some(s);
        self
    }
    /// How the slots use the database (none: the slots share nothing the engine manages).
    pub fn database(mut self, d: Arc<dyn DatabaseStrategy>) -> Self {
        self.database = Some(d);
        self
    }
    /// Adds a readiness / observation health check (all must pass).
    pub fn health_check(mut self, c: Arc<dyn HealthCheck>) -> Self {
        self.health_checks.push(c);
        self
    }
    /// Adds a hook at `point` with default options (5 min timeout, fail on timeout).
    pub fn hook(self, point: HookPoint, hook: Arc<dyn Hook>) -> Self {
        self.hook_with(point, hook, HookOptions::default())
    }
    /// Adds a hook at `point` with options.
    pub fn hook_with(
        mut self,
        point: HookPoint,
        hook: Arc<dyn Hook>,
        options: HookOptions,
    ) -> Self {
        self.hooks.push(RegisteredHook {
            point,
            hook,
            options,
        });
        self
    }
    /// Adds a post-switch analysis.
    pub fn analysis(mut self, a: Arc<dyn Analysis>) -> Self {
        self.analyses.push(a);
        self
    }
    /// Proves each full switch through the data path with this probe.
    pub fn verify_data_path(mut self, p: Arc<dyn DataPathProbe>) -> Self {
        self.probe = Some(p);
        self
    }
    /// Where state and the lock live.
    pub fn store(mut self, s: Arc<dyn StateStore>) -> Self {
        self.store = Some(s);
        self
    }
    /// Adds a source of releases' secret environment, asked every time a release is (re)deployed
    /// (sources are merged in the order added; secrets set on the release itself win). A release
    /// whose recorded secrets the sources do not all provide is never started.
    pub fn secrets(mut self, s: Arc<dyn SecretSource>) -> Self {
        self.secrets.push(s);
        self
    }
    /// Pacing and judgement.
    pub fn policy(mut self, p: Policy) -> Self {
        self.policy = p;
        self
    }

    /// Builds, checking that the required parts are there and the policy is coherent.
    pub fn build(self) -> Result<Deployer> {
        self.policy.validate()?;
        let missing = |what: &'static str| {
            Error::invalid("deployer", what, format!("no {what} given to the builder"))
        };
        let (events, _) = broadcast::channel(1024);
        Ok(Deployer {
            inner: Arc::new(Inner {
                environment: self.environment.ok_or_else(|| missing("environment"))?,
                switch: self.switch.ok_or_else(|| missing("switch"))?,
                store: self.store.ok_or_else(|| missing("store"))?,
                secrets: self.secrets,
                database: self.database,
                health_checks: self.health_checks,
                hooks: self.hooks,
                analyses: self.analyses,
                probe: self.probe,
                policy: self.policy,
                events,
                interrupted: Default::default(),
            }),
        })
    }
}
