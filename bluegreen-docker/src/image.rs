//! [`Healthcheck`]: a health check the engine runs inside a container.

use std::time::Duration;

/// A health check the engine runs inside a container: `argv` every `interval`; exit 0 is
/// healthy. Set per environment
/// ([`DockerConfig::with_healthcheck`](crate::DockerConfig::with_healthcheck)) or baked into an
/// image by its `HEALTHCHECK` instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Healthcheck {
    /// The command (exec form, no shell unless the command is one).
    pub argv: Vec<String>,
    /// Time between checks. Default 1 s.
    pub interval: Duration,
    /// Bound on one check. Default 3 s.
    pub timeout: Duration,
    /// Failures during this initial period do not count. Default 0.
    pub start_period: Duration,
    /// Consecutive failures before `unhealthy`. Default 3.
    pub retries: u32,
}

impl Healthcheck {
    /// A health check running `argv`.
    pub fn new(argv: Vec<String>) -> Self {
        Healthcheck {
            argv,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(3),
            start_period: Duration::ZERO,
            retries: 3,
        }
    }

    /// With the time between checks.
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// With the failures needed for `unhealthy`.
    pub fn with_retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }
}
