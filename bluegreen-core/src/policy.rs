//! How the engine paces and judges a deployment.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One canary step: send `weight` percent to the target, then hold and analyse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryStep {
    /// Percent of traffic to the target (1–100).
    pub weight: u8,
    /// How long to observe at this weight before the next step.
    #[serde(with = "secs")]
    pub hold: Duration,
    /// Wait for `promote` after this step's analysis passes.
    #[serde(default)]
    pub manual: bool,
}

impl CanaryStep {
    /// A step at `weight` percent held for `hold`.
    pub fn new(weight: u8, hold: Duration) -> Self {
        CanaryStep {
            weight,
            hold,
            manual: false,
        }
    }

    /// Pause for a person after this step.
    pub fn manual(mut self) -> Self {
        self.manual = true;
        self
    }
}

/// Whether the engine switches on its own once the target is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Promotion {
    /// Switch as soon as readiness and smoke tests pass.
    #[default]
    Auto,
    /// Stop at the gate before the switch and wait for `promote` (or `abort`).
    Manual,
}

/// What happens to the old slot after a successful switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepOld {
    /// Keep it running, so `rollback` is a switch back in seconds; `cleanup` removes it.
    #[default]
    Warm,
    /// Drain and stop it (rollback then redeploys its release).
    Stop,
}

/// What a crash-recovery does with a deployment that had not switched yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resume {
    /// Undo it (target removed, database rolled back); live traffic never moved.
    #[default]
    RollBack,
    /// Continue from the saved phase (phases are idempotent by contract).
    Continue,
}

/// What to do when a hook runs past its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// Fail the deployment (and roll back as for any failure).
    #[default]
    Fail,
    /// Log an event and go on.
    Continue,
}

/// Per-hook settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookOptions {
    /// Bound on one run.
    #[serde(with = "secs")]
    pub timeout: Duration,
    /// What a timeout means.
    pub on_timeout: OnTimeout,
}

impl Default for HookOptions {
    fn default() -> Self {
        HookOptions {
            timeout: Duration::from_secs(300),
            on_timeout: OnTimeout::Fail,
        }
    }
}

impl HookOptions {
    /// With a timeout.
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// With the on-timeout action.
    pub fn with_on_timeout(mut self, a: OnTimeout) -> Self {
        self.on_timeout = a;
        self
    }
}

/// Retries of retryable backend errors ([`Error::is_retryable`]); the only place bluegreen retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all (1 = no retry).
    pub attempts: u32,
    /// Delay before the first retry; doubled each time.
    #[serde(with = "millis")]
    pub backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 3,
            backoff: Duration::from_millis(200),
        }
    }
}

/// The post-switch observation window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Observation {
    /// How long to watch after the (final) switch; zero skips observation.
    #[serde(with = "secs")]
    pub window: Duration,
    /// Time between analysis rounds.
    #[serde(with = "millis")]
    pub interval: Duration,
}

impl Default for Observation {
    fn default() -> Self {
        Observation {
            window: Duration::from_secs(10),
            interval: Duration::from_secs(1),
        }
    }
}

/// How the engine paces and judges a deployment. Every field has a sensible default.
///
/// ```
/// use std::time::Duration;
/// use bluegreen_core::{Policy, CanaryStep};
/// let p = Policy::default()
///     .with_readiness_timeout(Duration::from_secs(60))
///     .with_canary(vec![CanaryStep::new(10, Duration::from_secs(30)), CanaryStep::new(50, Duration::from_secs(30))]);
/// assert_eq!(p.rise, 2);
/// assert!(p.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Policy {
    /// Bound on waiting for the target to become healthy (default 300 s).
    #[serde(with = "secs")]
    pub readiness_timeout: Duration,
    /// First poll interval (default 100 ms); doubled after each poll up to `poll_max`.
    #[serde(with = "millis")]
    pub poll_initial: Duration,
    /// Cap of the poll interval (default 3 s).
    #[serde(with = "millis")]
    pub poll_max: Duration,
    /// Consecutive passing rounds to call a slot ready (default 2).
    pub rise: u32,
    /// Consecutive failing rounds to call a slot failed after the switch (default 3).
    pub fall: u32,
    /// Bound on draining the old slot (default 30 s).
    #[serde(with = "secs")]
    pub drain_timeout: Duration,
    /// Post-switch observation.
    pub observation: Observation,
    /// Canary steps; empty means switch 100 % at once.
    pub canary: Vec<CanaryStep>,
    /// Automatic or manual promotion.
    pub promotion: Promotion,
    /// Route preview traffic to the target before the switch (needs a switch with preview).
    pub preview: bool,
    /// Pause new requests at the switch during the database cutover (default off): the engine
    /// holds new requests, lets those in flight to the live slot finish (see
    /// `cutover_drain_timeout`), then runs the database's `before_switch` (e.g. the write freeze
    /// and catch-up), switches and resumes. A switch whose [`Capabilities`](crate::Capabilities)
    /// say it cannot pause is not refused: the cutover then runs without pausing.
    pub pause_during_cutover: bool,
    /// Bound on the requests in flight to the live slot finishing once the switch is paused for
    /// the cutover (default 5 s). Exceeding it fails the deploy before anything is frozen or
    /// switched, and the switch resumes.
    #[serde(with = "secs")]
    pub cutover_drain_timeout: Duration,
    /// Old slot after success.
    pub keep_old: KeepOld,
    /// Crash recovery of an unswitched deployment.
    pub resume: Resume,
    /// Bound on verifying a switch (read-back and data path; default 30 s).
    #[serde(with = "secs")]
    pub verify_timeout: Duration,
    /// Lock lease duration, renewed while a run holds it (default 60 s).
    #[serde(with = "secs")]
    pub lock_ttl: Duration,
    /// How long to wait for a held lock before refusing (default 0: refuse at once).
    #[serde(with = "secs")]
    pub lock_wait: Duration,
    /// Retries of retryable backend errors.
    pub retry: RetryConfig,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            readiness_timeout: Duration::from_secs(300),
            poll_initial: Duration::from_millis(100),
            poll_max: Duration::from_secs(3),
            rise: 2,
            fall: 3,
            drain_timeout: Duration::from_secs(30),
            observation: Observation::default(),
            canary: Vec::new(),
            promotion: Promotion::Auto,
            preview: false,
            pause_during_cutover: false,
            cutover_drain_timeout: Duration::from_secs(5),
            keep_old: KeepOld::Warm,
            resume: Resume::RollBack,
            verify_timeout: Duration::from_secs(30),
            lock_ttl: Duration::from_secs(60),
            lock_wait: Duration::ZERO,
            retry: RetryConfig::default(),
        }
    }
}

impl Policy {
    /// Checks the policy is coherent.
    pub fn validate(&self) -> Result<()> {
        if self.rise == 0 || self.fall == 0 {
            return Err(Error::invalid("policy", "rise/fall", "must be at least 1"));
        }
        if self.poll_initial.is_zero() || self.poll_max < self.poll_initial {
            return Err(Error::invalid(
                "policy",
                "poll interval",
                "poll_initial must be > 0 and ≤ poll_max",
            ));
        }
        if self.observation.interval.is_zero() {
            return Err(Error::invalid(
                "policy",
                "observation.interval",
                "must be > 0",
            ));
        }
        let mut last = 0;
        for s in &self.canary {
            if s.weight == 0 || s.weight > 100 || s.weight <= last {
                return Err(Error::invalid(
                    "canary steps",
                    format!("{}", s.weight),
                    "weights must be 1..=100 and strictly increasing",
                ));
            }
            last = s.weight;
        }
        if self.lock_ttl < Duration::from_millis(100) {
            return Err(Error::invalid(
                "policy",
                "lock_ttl",
                "must be at least 100 ms",
            ));
        }
        if self.retry.attempts == 0 {
            return Err(Error::invalid(
                "policy",
                "retry.attempts",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// With the readiness timeout.
    pub fn with_readiness_timeout(mut self, d: Duration) -> Self {
        self.readiness_timeout = d;
        self
    }
    /// With poll intervals (first, cap).
    pub fn with_poll(mut self, initial: Duration, max: Duration) -> Self {
        self.poll_initial = initial;
        self.poll_max = max;
        self
    }
    /// With rise / fall thresholds.
    pub fn with_thresholds(mut self, rise: u32, fall: u32) -> Self {
        self.rise = rise;
        self.fall = fall;
        self
    }
    /// With the drain timeout.
    pub fn with_drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }
    /// With the observation window and interval.
    pub fn with_observation(mut self, window: Duration, interval: Duration) -> Self {
        self.observation = Observation { window, interval };
        self
    }
    /// With canary steps.
    pub fn with_canary(mut self, steps: Vec<CanaryStep>) -> Self {
        self.canary = steps;
        self
    }
    /// With the promotion mode.
    pub fn with_promotion(mut self, p: Promotion) -> Self {
        self.promotion = p;
        self
    }
    /// With preview routing before the switch.
    pub fn with_preview(mut self, yes: bool) -> Self {
        self.preview = yes;
        self
    }
    /// With pausing at the switch during the database cutover.
    pub fn with_pause_during_cutover(mut self, yes: bool) -> Self {
        self.pause_during_cutover = yes;
        self
    }
    /// With the bound on in-flight requests finishing before the database cutover.
    pub fn with_cutover_drain_timeout(mut self, d: Duration) -> Self {
        self.cutover_drain_timeout = d;
        self
    }
    /// With what happens to the old slot.
    pub fn with_keep_old(mut self, k: KeepOld) -> Self {
        self.keep_old = k;
        self
    }
    /// With the crash-recovery mode.
    pub fn with_resume(mut self, r: Resume) -> Self {
        self.resume = r;
        self
    }
    /// With the verification bound.
    pub fn with_verify_timeout(mut self, d: Duration) -> Self {
        self.verify_timeout = d;
        self
    }
    /// With the lock lease and how long to wait for a held lock.
    pub fn with_lock(mut self, ttl: Duration, wait: Duration) -> Self {
        self.lock_ttl = ttl;
        self.lock_wait = wait;
        self
    }
    /// With the retry configuration.
    pub fn with_retry(mut self, r: RetryConfig) -> Self {
        self.retry = r;
        self
    }
}

pub(crate) mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        if !(0.0..=1e9).contains(&v) {
            return Err(serde::de::Error::custom(
                "seconds must be between 0 and 1e9",
            ));
        }
        Ok(Duration::from_secs_f64(v))
    }
}

pub(crate) mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_values() {
        let p = Policy::default();
        assert_eq!(p.readiness_timeout, Duration::from_secs(300));
        assert_eq!(p.poll_max, Duration::from_secs(3));
        assert_eq!((p.rise, p.fall), (2, 3));
        assert_eq!(p.drain_timeout, Duration::from_secs(30));
        assert!(p.validate().is_ok());
    }

    #[test]
    fn incoherent_policies_are_refused() {
        assert!(Policy::default().with_thresholds(0, 3).validate().is_err());
        let steps = vec![
            CanaryStep::new(50, Duration::ZERO),
            CanaryStep::new(10, Duration::ZERO),
        ];
        assert!(Policy::default().with_canary(steps).validate().is_err());
        assert!(Policy::default()
            .with_poll(Duration::from_secs(5), Duration::from_secs(1))
            .validate()
            .is_err());
    }

    #[test]
    fn policy_round_trips_through_serde_with_defaults() {
        let p: Policy = serde_json::from_str(r#"{"rise": 4, "drain_timeout": 2.5}"#).unwrap();
        assert_eq!(p.rise, 4);
        assert_eq!(p.drain_timeout, Duration::from_millis(2500));
        assert_eq!(p.fall, 3);
        let err = serde_json::from_str::<Policy>(r#"{"rise": 4, "rsie": 2}"#).unwrap_err();
        assert!(err.to_string().contains("rsie"), "{err}");
    }
}
