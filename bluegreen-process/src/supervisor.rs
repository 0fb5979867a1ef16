//! [`Supervisor`]: watches the live slot's program, restarts it with backoff when it dies, and
//! under [`OnLiveFailure::Failover`] switches back to the warm previous release when it stays
//! down.

use std::sync::Arc;
use std::time::Duration;

use bluegreen_core::{Deployer, Error, InstanceState, PerSlot, Result, Slot, StateStore};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::ProcessEnvironment;

/// What the supervisor does when the live slot's program dies on its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum OnLiveFailure {
    /// Restart it, with backoff, for as long as it takes (the default).
    #[default]
    Restart,
    /// Restart it; if it stays down for
    /// [`failover_after`](SupervisorConfig::failover_after) and the other slot runs the
    /// previous release (kept warm), roll back to it through the engine (lock, fencing, health
    /// gate, history).
    Failover,
    /// Leave it down (the supervisor only reports it).
    None,
}

/// Settings of a [`Supervisor`]. In a file every key is optional; durations are `"500ms"`,
/// `"10s"`.
///
/// ```
/// use std::time::Duration;
/// use bluegreen_process::{OnLiveFailure, SupervisorConfig};
///
/// let c: SupervisorConfig =
///     serde_json::from_str(r#"{ "on_live_failure": "failover", "failover_after": "5s" }"#).unwrap();
/// assert_eq!(c.on_live_failure, OnLiveFailure::Failover);
/// assert_eq!(c.failover_after, Duration::from_secs(5));
/// assert!(serde_json::from_str::<SupervisorConfig>(r#"{ "check_interval": "0s" }"#).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SupervisorConfig {
    /// What to do when the live program dies. Default [`OnLiveFailure::Restart`].
    pub on_live_failure: OnLiveFailure,
    /// How often the slots are looked at. Default 250 ms.
    #[serde(with = "bluegreen_core::config::duration")]
    pub check_interval: Duration,
    /// The wait before the second restart of a down period (the first is immediate); it doubles
    /// with each restart that does not last. Default 500 ms.
    #[serde(with = "bluegreen_core::config::duration")]
    pub backoff_initial: Duration,
    /// The longest wait between restarts. Default 30 s.
    #[serde(with = "bluegreen_core::config::duration")]
    pub backoff_max: Duration,
    /// How long the live program must stay down (or keep dying) before a failover, and how long
    /// it must stay up after a restart for the down period to end. Default 10 s.
    #[serde(with = "bluegreen_core::config::duration")]
    pub failover_after: Duration,
}

bluegreen_core::validated_serde!(SupervisorConfig);

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            on_live_failure: OnLiveFailure::Restart,
            check_interval: Duration::from_millis(250),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            failover_after: Duration::from_secs(10),
        }
    }
}

impl SupervisorConfig {
    /// Checks that every duration is positive and `backoff_initial <= backoff_max`. Run when
    /// deserializing.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field.
    pub fn validate(&self) -> Result<()> {
        for (field, d) in [
            ("check_interval", self.check_interval),
            ("backoff_initial", self.backoff_initial),
            ("backoff_max", self.backoff_max),
            ("failover_after", self.failover_after),
        ] {
            if d.is_zero() {
                return Err(Error::invalid(field, "0s", "must be positive"));
            }
        }
        if self.backoff_initial > self.backoff_max {
            return Err(Error::invalid(
                "backoff_initial",
                format!("{:?}", self.backoff_initial),
                "must not exceed backoff_max",
            ));
        }
        Ok(())
    }

    /// With the policy.
    pub fn with_on_live_failure(mut self, policy: OnLiveFailure) -> Self {
        self.on_live_failure = policy;
        self
    }

    /// With how often the slots are looked at.
    pub fn with_check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// With the restart backoff bounds.
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    /// With how long the live program may stay down before a failover.
    pub fn with_failover_after(mut self, after: Duration) -> Self {
        self.failover_after = after;
        self
    }

    /// The wait after the `attempt`th restart (1-based) of a down period.
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
        self.backoff_initial
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

/// What a [`Supervisor`] did, as [`SupervisorHandle::subscribe`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SupervisorEvent {
    /// The live slot's program was found dead (the start of a down period).
    Down {
        /// The slot.
        slot: Slot,
    },
    /// It was started again.
    Restarted {
        /// The slot.
        slot: Slot,
        /// The restart's number within this down period.
        attempt: u32,
    },
    /// A restart failed (the next one waits for the backoff).
    RestartFailed {
        /// The slot.
        slot: Slot,
        /// The restart's number within this down period.
        attempt: u32,
        /// Why.
        error: String,
    },
    /// Traffic was moved to the other slot by a rollback (recorded in the history).
    FailedOver {
        /// The slot that stayed down.
        from: Slot,
        /// The deployment id of the rollback.
        id: u64,
    },
    /// A failover was due but not done (no warm previous release, or the rollback failed).
    FailoverFailed {
        /// The slot that stayed down.
        from: Slot,
        /// Why.
        error: String,
    },
}

/// Watches the live slot of a [`ProcessEnvironment`] and acts under
/// [`SupervisorConfig::on_live_failure`]; `bluegreen serve` runs one.
///
/// Only the live slot (the state's active slot) is supervised, and only while no run holds the
/// deployment lock or is in flight: a deployment's own target is the engine's business. A
/// restart runs the same program, arguments, variables and port as before (see
/// [`ProcessEnvironment::restart`]), so the switch reaches it again without being touched. A
/// failover is [`Deployer::rollback`]: it takes the lock like any run (fenced), puts the warm
/// slot through the health gate and records a rollback in the history.
pub struct Supervisor {
    env: ProcessEnvironment,
    store: Arc<dyn StateStore>,
    deployer: Option<Deployer>,
    config: SupervisorConfig,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("env", &self.env)
            .field("store", &self.store.name())
            .field("failover", &self.deployer.is_some())
            .field("config", &self.config)
            .finish()
    }
}

/// One slot's down period.
#[derive(Debug)]
struct Down {
    since: Instant,
    attempts: u32,
    next_restart: Instant,
    last_restart: Option<Instant>,
    next_failover: Instant,
}

impl Supervisor {
    /// A supervisor of `env`'s live slot, reading the live slot from `store`.
    pub fn new(
        env: ProcessEnvironment,
        store: Arc<dyn StateStore>,
        config: SupervisorConfig,
    ) -> Self {
        Supervisor {
            env,
            store,
            deployer: None,
            config,
        }
    }

    /// With the deployer a failover runs its rollback through (built on the same environment,
    /// switch and store). Without it, [`OnLiveFailure::Failover`] only restarts.
    pub fn with_deployer(mut self, deployer: Deployer) -> Self {
        self.deployer = Some(deployer);
        self
    }

    /// Starts watching on the current tokio runtime.
    pub fn start(self) -> SupervisorHandle {
        let (stop, mut stopped) = watch::channel(false);
        let (events, _) = broadcast::channel(64);
        let tx = events.clone();
        let task = tokio::spawn(async move {
            let mut down: PerSlot<Option<Down>> = PerSlot::default();
            let mut tick = tokio::time::interval(self.config.check_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => return,
                }
                for slot in Slot::ALL {
                    if let Err(e) = self.check(slot, &mut down, &tx).await {
                        tracing::warn!(%slot, "supervisor: cannot check the slot: {e}");
                    }
                }
            }
        });
        SupervisorHandle {
            stop,
            events,
            task: Some(task),
        }
    }

    async fn check(
        &self,
        slot: Slot,
        down: &mut PerSlot<Option<Down>>,
        events: &broadcast::Sender<SupervisorEvent>,
    ) -> Result<()> {
        let emit = |e: SupervisorEvent| {
            let _ = events.send(e);
        };
        let now = Instant::now();
        if !self.env.crashed(slot)? {
            // Up (or stopped on purpose, or absent): a down period ends once the program has
            // stayed up long enough after the last restart.
            if let Some(d) = down.get(slot) {
                let settled = d
                    .last_restart
                    .is_none_or(|t| now.duration_since(t) >= self.config.failover_after);
                if settled {
                    down.set(slot, None);
                }
            }
            return Ok(());
        }
        // Only the live slot, and only while no run is in charge.
        let state = self.store.load().await?.unwrap_or_default();
        if state.active != Some(slot) || state.in_flight.is_some() {
            return Ok(());
        }
        if self.store.lock_info().await?.is_some() {
            return Ok(());
        }
        let d = down.get_mut(slot).get_or_insert_with(|| {
            tracing::warn!(%slot, policy = ?self.config.on_live_failure, "the live program died");
            emit(SupervisorEvent::Down { slot });
            Down {
                since: now,
                attempts: 0,
                next_restart: now,
                last_restart: None,
                next_failover: now + self.config.failover_after,
            }
        });
        let policy = self.config.on_live_failure;
        if policy == OnLiveFailure::None {
            return Ok(());
        }
        if policy == OnLiveFailure::Failover
            && now >= d.next_failover
            && now.duration_since(d.since) >= self.config.failover_after
        {
            match self.failover(slot).await {
                Ok(id) => {
                    tracing::warn!(from = %slot, id, "failed over to the warm previous release");
                    emit(SupervisorEvent::FailedOver { from: slot, id });
                    down.set(slot, None);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(from = %slot, "failover not done: {e}");
                    emit(SupervisorEvent::FailoverFailed {
                        from: slot,
                        error: e.to_string(),
                    });
                    d.next_failover = now + self.config.backoff_max;
                }
            }
        }
        if now < d.next_restart {
            return Ok(());
        }
        d.attempts += 1;
        let attempt = d.attempts;
        match self.env.restart(slot).await {
            Ok(_) => {
                tracing::warn!(%slot, attempt, "restarted the live program");
                emit(SupervisorEvent::Restarted { slot, attempt });
            }
            Err(e) => {
                tracing::warn!(%slot, attempt, "restarting the live program failed: {e}");
                emit(SupervisorEvent::RestartFailed {
                    slot,
                    attempt,
                    error: e.to_string(),
                });
            }
        }
        let now = Instant::now();
        d.last_restart = Some(now);
        d.next_restart = now + self.config.backoff(attempt);
        Ok(())
    }

    /// Rolls back to the other slot if it runs the previous release; the rollback's id.
    async fn failover(&self, from: Slot) -> Result<u64> {
        let Some(deployer) = &self.deployer else {
            return Err(Error::invalid(
                "supervisor",
                "failover",
                "no deployer was given to run the rollback",
            ));
        };
        let to = from.other();
        let state = self.store.load().await?.unwrap_or_default();
        let previous = state
            .slots
            .get(to)
            .as_ref()
            .map(|r| r.release.version.clone());
        let status = bluegreen_core::Environment::status(&self.env, to).await?;
        let warm = status.state == InstanceState::Running
            && previous.is_some()
            && status.version == previous;
        if !warm {
            return Err(Error::NothingToRollBack {
                reason: format!(
                    "slot {to} does not run the previous release (it is {:?}); keep it warm \
                     (`keep_old`) to fail over",
                    status.state
                ),
            });
        }
        Ok(deployer.rollback().await?.id)
    }
}

/// A running [`Supervisor`]. Stops on [`shutdown`](Self::shutdown) or when dropped.
#[derive(Debug)]
pub struct SupervisorHandle {
    stop: watch::Sender<bool>,
    events: broadcast::Sender<SupervisorEvent>,
    task: Option<JoinHandle<()>>,
}

impl SupervisorHandle {
    /// What the supervisor does from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<SupervisorEvent> {
        self.events.subscribe()
    }

    /// Stops watching (the programs keep running) and waits for the current check to end.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for SupervisorHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_bound() {
        let c = SupervisorConfig::default()
            .with_backoff(Duration::from_millis(500), Duration::from_secs(3));
        let waits: Vec<_> = (1..=6).map(|a| c.backoff(a)).collect();
        assert_eq!(
            waits,
            [500, 1000, 2000, 3000, 3000, 3000].map(Duration::from_millis)
        );
        assert_eq!(c.backoff(u32::MAX), Duration::from_secs(3));
    }

    #[test]
    fn invalid_settings_are_refused_naming_the_field() {
        let bad = SupervisorConfig::default()
            .with_backoff(Duration::from_secs(5), Duration::from_secs(1));
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("backoff_initial"));
        let zero = SupervisorConfig::default().with_failover_after(Duration::ZERO);
        assert!(zero
            .validate()
            .unwrap_err()
            .to_string()
            .contains("failover_after"));
        assert!(SupervisorConfig::default().validate().is_ok());
        assert!(
            serde_json::from_str::<SupervisorConfig>(r#"{"on_live_failure":"sometimes"}"#).is_err()
        );
    }
}
