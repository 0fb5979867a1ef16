//! Health gating: polling a slot until it is ready, and one round of health checks.

use std::time::Instant;

use super::run::{By, PhaseResult, Run};
use crate::error::Error;
use crate::events::DeployEvent;
use crate::traits::{InstanceState, RuntimeHealth, SlotStatus};
use crate::types::{Endpoint, Slot};

/// `status`, unless some of its parts could not be read ([`InstanceState::Unknown`]): then an
/// error naming them, as when the environment could not be read at all. The health gates act
/// on what they know, never on a guess.
pub(super) fn readable(env: &str, status: SlotStatus) -> crate::error::Result<SlotStatus> {
    if status.state != InstanceState::Unknown {
        return Ok(status);
    }
    let parts: Vec<String> = status
        .unreadable_parts()
        .map(|p| format!("{}: {}", p.name, p.error.as_deref().unwrap_or("unknown")))
        .collect();
    Err(Error::backend(
        env,
        "status",
        true,
        format!(
            "the slot's state is unknown: cannot read {}",
            if parts.is_empty() {
                "it".to_string()
            } else {
                parts.join("; ")
            }
        ),
    ))
}

impl Run<'_> {
    /// Polls `target` until `rise` consecutive rounds pass, adaptively: fast at first, then
    /// doubling up to `poll_max`. Fails fast if the instance exits.
    pub(super) async fn await_healthy(
        &mut self,
        target: Slot,
        eps: &[Endpoint],
    ) -> PhaseResult<()> {
        let p = &self.d.policy;
        let env = self.d.environment.clone();
        let deadline = Instant::now() + p.readiness_timeout;
        let mut interval = p.poll_initial;
        let mut passes = 0u32;
        let id = self.flight().id;
        loop {
            self.check_interrupt()?;
            let status = env
                .status(target)
                .await
                .and_then(|s| readable(env.name(), s))
                .by(env.name())?;
            if matches!(
                status.state,
                InstanceState::Exited | InstanceState::Stopped | InstanceState::Absent
            ) {
                let logs = env
                    .logs(target, None)
                    .await
                    .map(|l| {
                        let lines: Vec<&str> = l.lines().collect();
                        lines[lines.len().saturating_sub(10)..].join("\n")
                    })
                    .unwrap_or_default();
                let code = status
                    .exit_code
                    .map(|c| format!(" with code {c}"))
                    .unwrap_or_default();
                return Err((
                    env.name().to_string(),
                    Error::Unhealthy {
                        slot: target,
                        reason: format!(
                            "the instance is {:?}{code} before becoming ready; last log lines:\n{logs}",
                            status.state
                        ),
                    },
                ));
            }
            let (healthy, detail, backend) = self.health_round(&status, eps).await;
            passes = if healthy { passes + 1 } else { 0 };
            self.emit(DeployEvent::Health {
                id,
                slot: target,
                healthy,
                passes,
                detail: detail.clone(),
            });
            if passes >= p.rise {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err((
                    backend,
                    Error::Timeout {
                        what: format!(
                            "slot {target} becoming healthy ({})",
                            detail.unwrap_or_else(|| "no passing round".into())
                        ),
                        after: p.readiness_timeout,
                    },
                ));
            }
            let pause = if healthy { p.poll_initial } else { interval };
            tokio::time::sleep(pause.min(deadline - now)).await;
            interval = (interval * 2).min(p.poll_max);
        }
    }

    /// One health round over every endpoint: (healthy, failure detail, backend to blame).
    pub(super) async fn health_round(
        &self,
        status: &SlotStatus,
        eps: &[Endpoint],
    ) -> (bool, Option<String>, String) {
        match status.health {
            Some(RuntimeHealth::Unhealthy) | Some(RuntimeHealth::Starting)
                if self.d.health_checks.is_empty() =>
            {
                return (
                    false,
                    Some(format!("platform health is {:?}", status.health.unwrap())),
                    self.d.environment.name().to_string(),
                )
            }
            Some(RuntimeHealth::Unhealthy) => {
                return (
                    false,
                    Some("the platform reports the instance unhealthy".into()),
                    self.d.environment.name().to_string(),
                )
            }
            _ => {}
        }
        if self.d.health_checks.is_empty() {
            let running = status.state == InstanceState::Running;
            return (
                running,
                (!running).then(|| format!("instance is {:?}", status.state)),
                self.d.environment.name().to_string(),
            );
        }
        let checks = self
            .d
            .health_checks
            .iter()
            .flat_map(|c| eps.iter().map(move |e| (c, e)));
        let results = futures_util::future::join_all(
            checks.map(|(c, e)| async move { (c.name().to_string(), e, c.check(e).await) }),
        )
        .await;
        for (name, e, r) in results {
            match r {
                Ok(rep) if rep.is_healthy() => {}
                Ok(rep) => {
                    return (
                        false,
                        Some(format!("{name} on {e}: {}", rep.reason().unwrap_or(""))),
                        name,
                    )
                }
                Err(err) => {
                    return (
                        false,
                        Some(format!("{name} on {e} could not run: {err}")),
                        name,
                    )
                }
            }
        }
        (true, None, String::new())
    }
}
