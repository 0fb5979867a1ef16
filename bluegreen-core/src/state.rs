//! Persisted deployment state, its phases, history, and the lock's lease.

use crate::ledger::{SwitchCounters, TrafficLedger};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::types::{Endpoint, PerSlot, Release, Slot, TrafficSplit, Version};

/// The newest state format this build reads and writes.
pub const STATE_FORMAT: u32 = 1;

/// How many history entries are kept (oldest dropped first).
pub const HISTORY_LIMIT: usize = 200;

/// Milliseconds since the Unix epoch, shown as RFC 3339 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Now.
    pub fn now() -> Self {
        Timestamp::from(SystemTime::now())
    }

    /// This instant plus `d`.
    pub fn plus(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(d.as_millis() as u64))
    }

    /// Time from `earlier` to `self` (zero if `earlier` is later).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// As a `SystemTime`.
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0)
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        Timestamp(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0 / 1000;
        let millis = self.0 % 1000;
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        // Civil-from-days (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            rem / 3600,
            (rem / 60) % 60,
            rem % 60
        )
    }
}

/// The phases of a deployment, in the order the engine runs them.
///
/// The engine saves the phase **before** running it, so after a crash a new
/// [`Deployer`](crate::Deployer) knows where the deployment stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Phase {
    /// Lock, load, choose the target, refuse impossible plans.
    Plan,
    /// `DatabaseStrategy::prepare`.
    PrepareDatabase,
    /// The `before_deploy` hooks.
    BeforeDeployHook,
    /// `Environment::deploy` into the target slot.
    DeployTarget,
    /// Health checks on the target until the rise threshold (or the readiness timeout).
    WaitReady,
    /// The `after_deploy` hooks (migrations).
    AfterDeployHook,
    /// Route preview traffic to the target.
    Preview,
    /// The `before_switch` hooks (smoke tests).
    SmokeTest,
    /// The manual promotion gate before the switch.
    Gate,
    /// `DatabaseStrategy::before_switch` (drain replication, sync sequences).
    DatabaseBeforeSwitch,
    /// `TrafficSwitch::apply` of the current step, read back with `current()`.
    Switch,
    /// Requests through the switch reach the target release.
    VerifyDataPath,
    /// The post-switch observation window (analysis of the current step).
    Observe,
    /// `DatabaseStrategy::after_switch`.
    DatabaseAfterSwitch,
    /// The `after_switch` hooks.
    AfterSwitchHook,
    /// Drain the old slot and stop it (or keep it warm).
    DrainOld,
    /// `DatabaseStrategy::finalize`.
    Finalize,
    /// The final data-path check: the switch still routes all traffic to the target and requests
    /// through it reach the target release. Only then is the run recorded as a success.
    ConfirmDataPath,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 18] = [
        Phase::Plan,
        Phase::PrepareDatabase,
        Phase::BeforeDeployHook,
        Phase::DeployTarget,
        Phase::WaitReady,
        Phase::AfterDeployHook,
        Phase::Preview,
        Phase::SmokeTest,
        Phase::Gate,
        Phase::DatabaseBeforeSwitch,
        Phase::Switch,
        Phase::VerifyDataPath,
        Phase::Observe,
        Phase::DatabaseAfterSwitch,
        Phase::AfterSwitchHook,
        Phase::DrainOld,
        Phase::Finalize,
        Phase::ConfirmDataPath,
    ];

    /// Snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Plan => "plan",
            Phase::PrepareDatabase => "prepare_database",
            Phase::BeforeDeployHook => "before_deploy_hook",
            Phase::DeployTarget => "deploy_target",
            Phase::WaitReady => "wait_ready",
            Phase::AfterDeployHook => "after_deploy_hook",
            Phase::Preview => "preview",
            Phase::SmokeTest => "smoke_test",
            Phase::Gate => "gate",
            Phase::DatabaseBeforeSwitch => "database_before_switch",
            Phase::Switch => "switch",
            Phase::VerifyDataPath => "verify_data_path",
            Phase::Observe => "observe",
            Phase::DatabaseAfterSwitch => "database_after_switch",
            Phase::AfterSwitchHook => "after_switch_hook",
            Phase::DrainOld => "drain_old",
            Phase::Finalize => "finalize",
            Phase::ConfirmDataPath => "confirm_data_path",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Whether a run deploys a new release or rolls back to the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// `Deployer::deploy`.
    Deploy,
    /// `Deployer::rollback`.
    Rollback,
}

impl RunKind {
    /// `deploy` or `rollback`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Deploy => "deploy",
            RunKind::Rollback => "rollback",
        }
    }
}

/// Why an in-flight deployment is waiting for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Waiting {
    /// The manual promotion gate before the switch (or before a canary step).
    Gate,
    /// Analysis was inconclusive.
    Inconclusive {
        /// What the analysis said.
        reason: String,
    },
    /// A failure happened after an irreversible step; rolling back automatically could be an outage.
    Decision {
        /// The failure and the irreversible step.
        reason: String,
    },
}

/// A deployment that has started and not finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InFlight {
    /// Deployment id.
    pub id: u64,
    /// Deploy or rollback.
    pub kind: RunKind,
    /// What is being deployed.
    pub release: Release,
    /// The slot receiving it.
    pub target: Slot,
    /// The live slot when it started (`None` on the first deploy).
    pub previous: Option<Slot>,
    /// The split when it started.
    pub previous_split: Option<TrafficSplit>,
    /// The phase saved before it ran.
    pub phase: Phase,
    /// Canary step being applied or observed (0-based).
    pub step: usize,
    /// True once any traffic may have reached the target.
    pub switched: bool,
    /// True when the target already ran this release (rollback to a warm slot): no redeploy.
    pub reuse_target: bool,
    /// The target's endpoints once deployed.
    pub endpoints: Vec<Endpoint>,
    /// Non-secret part of the database binding.
    pub binding: BTreeMap<String, String>,
    /// Set once a step that cannot be undone has run (e.g. an irreversible migration).
    pub irreversible: Option<String>,
    /// Set while paused for a person.
    pub waiting: Option<Waiting>,
    /// Set while the engine is undoing a failed deployment.
    pub failing: Option<String>,
    /// Set before preview traffic may reach the target, cleared once preview routing stops: undo
    /// (also after a crash) stops preview routing while it is set.
    #[serde(default)]
    pub previewing: bool,
    /// Set before the switch is paused for the database cutover, cleared once it resumes: undo
    /// (also after a crash) resumes the switch while it is set.
    #[serde(default)]
    pub paused: bool,
    /// The switch's counters when the deployment started, for its traffic ledger (`None` when
    /// the switch keeps none or they could not be read).
    #[serde(default)]
    pub counters_at_start: Option<SwitchCounters>,
    /// The switch's counters just before the first switch: the ledger's latency "before" ends
    /// and "after" begins there.
    #[serde(default)]
    pub counters_at_switch: Option<SwitchCounters>,
    /// When it started.
    pub started_at: Timestamp,
}

/// What a slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// The release deployed there.
    pub release: Release,
    /// The deployment that put it there.
    pub deployment: u64,
    /// Its endpoints.
    pub endpoints: Vec<Endpoint>,
    /// When it was deployed.
    pub deployed_at: Timestamp,
}

/// How a deployment ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum Outcome {
    /// It went live.
    Succeeded,
    /// It failed; the previous slot stayed or became live again.
    Failed {
        /// The phase that failed.
        phase: Phase,
        /// The error, as text.
        reason: String,
        /// Whether traffic had moved and was switched back.
        rolled_back: bool,
    },
    /// Aborted by a person.
    Aborted,
    /// Finished after a crash: resumed from the saved phase.
    Recovered {
        /// What recovery did: `completed` or `rolled back`.
        action: String,
    },
}

/// One finished deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Deployment id.
    pub id: u64,
    /// Deploy or rollback.
    pub kind: RunKind,
    /// The release's version.
    pub version: Version,
    /// The slot it targeted.
    pub slot: Slot,
    /// How it ended.
    pub outcome: Outcome,
    /// Start.
    pub started_at: Timestamp,
    /// End.
    pub finished_at: Timestamp,
    /// What the switch counted during the deployment (entries written before ledgers existed
    /// read as not measured).
    #[serde(default)]
    pub ledger: TrafficLedger,
}

/// Everything the engine persists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeploymentState {
    /// Format version ([`STATE_FORMAT`]).
    pub format: u32,
    /// Incremented by every save; the store's compare-and-swap key.
    pub revision: u64,
    /// The last deployment id handed out (ids increase monotonically).
    pub last_id: u64,
    /// The slot serving traffic.
    pub active: Option<Slot>,
    /// The split last applied.
    pub split: Option<TrafficSplit>,
    /// What each slot holds.
    pub slots: PerSlot<Option<SlotRecord>>,
    /// The release that was live before the current one: what `rollback` returns to when the
    /// idle slot no longer holds it (e.g. a failed deploy replaced it).
    #[serde(default)]
    pub previous_release: Option<Release>,
    /// The deployment in flight, if any.
    pub in_flight: Option<InFlight>,
    /// Finished deployments, oldest first, at most [`HISTORY_LIMIT`].
    pub history: VecDeque<HistoryEntry>,
}

impl Default for DeploymentState {
    fn default() -> Self {
        DeploymentState {
            format: STATE_FORMAT,
            revision: 0,
            last_id: 0,
            active: None,
            split: None,
            slots: PerSlot::default(),
            previous_release: None,
            in_flight: None,
            history: VecDeque::new(),
        }
    }
}

impl DeploymentState {
    /// Appends to the history, dropping the oldest beyond [`HISTORY_LIMIT`].
    pub fn record(&mut self, entry: HistoryEntry) {
        self.history.push_back(entry);
        while self.history.len() > HISTORY_LIMIT {
            self.history.pop_front();
        }
    }

    /// The release serving traffic.
    pub fn live_release(&self) -> Option<&Release> {
        self.active
            .and_then(|s| self.slots.get(s).as_ref())
            .map(|r| &r.release)
    }

    /// The routing last recorded: the split, with each slot's endpoints from its record — except
    /// the target of a flight that may have switched, whose endpoints the flight recorded before
    /// the switch (its slot record gets them only when the run completes). What a switch that lost
    /// its own configuration should apply to serve as it did. `None` before any split.
    pub fn last_routing(&self) -> Option<(TrafficSplit, crate::types::Endpoints)> {
        let split = self.split.clone()?;
        let mut eps = crate::types::Endpoints::default();
        for slot in Slot::ALL {
            if let Some(r) = self.slots.get(slot) {
                eps.set(slot, r.endpoints.clone());
            }
        }
        if let Some(f) = self.in_flight.as_ref() {
            if f.switched && !f.endpoints.is_empty() {
                eps.set(f.target, f.endpoints.clone());
            }
        }
        Some((split, eps))
    }

    /// Parses a serialized state, refusing newer formats.
    pub fn from_json(location: &str, bytes: &[u8]) -> crate::Result<Self> {
        #[derive(Deserialize)]
        struct Probe {
            format: u32,
        }
        let probe: Probe =
            serde_json::from_slice(bytes).map_err(|e| crate::Error::CorruptState {
                location: location.to_string(),
                reason: e.to_string(),
            })?;
        if probe.format > STATE_FORMAT {
            return Err(crate::Error::UnsupportedStateFormat {
                location: location.to_string(),
                found: probe.format,
                supported: STATE_FORMAT,
            });
        }
        serde_json::from_slice(bytes).map_err(|e| crate::Error::CorruptState {
            location: location.to_string(),
            reason: e.to_string(),
        })
    }

    /// Serializes (pretty JSON).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("state serializes")
    }
}

/// Who holds (or asks for) the deployment lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockOwner {
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Free-form purpose (`deploy v2`, `rollback`), shown to whoever is refused.
    pub purpose: String,
}

impl LockOwner {
    /// This process on this host.
    pub fn current(purpose: impl Into<String>) -> Self {
        LockOwner {
            host: hostname(),
            pid: std::process::id(),
            purpose: purpose.into(),
        }
    }

    /// Whether this owner is a running process, when that can be known from here: `Some` for an
    /// owner on this host (read from `/proc`), `None` for another host or without `/proc`.
    pub fn alive_here(&self) -> Option<bool> {
        if self.host != hostname() || !std::path::Path::new("/proc/self").exists() {
            return None;
        }
        Some(std::path::Path::new(&format!("/proc/{}", self.pid)).exists())
    }

    /// Whether this owner is another process than the caller's.
    pub fn is_other_process(&self) -> bool {
        self.host != hostname() || self.pid != std::process::id()
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_string())
}

/// A held lock as stored: its owner, when it was taken and when it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// The holder.
    pub owner: LockOwner,
    /// Unique token of this lease; renew and release must present it.
    pub token: String,
    /// When it was acquired.
    pub since: Timestamp,
    /// When it expires unless renewed.
    pub expires: Timestamp,
    /// The fencing token: every lease a store grants has a greater epoch than every lease it
    /// granted before (released and broken ones included). A save presenting an older epoch is
    /// refused, so a run that lost its lease can never overwrite what the new holder wrote.
    #[serde(default)]
    pub epoch: u64,
}

impl LockInfo {
    /// Whether it has expired at `now`.
    pub fn expired_at(&self, now: Timestamp) -> bool {
        now >= self.expires
    }

    /// Whether `other` is this same lease (same token and epoch), whatever its expiry.
    pub fn same_lease(&self, other: &LockInfo) -> bool {
        self.token == other.token && self.epoch == other.epoch
    }

    /// Checks that `lease` is this held lock and has not expired at `now`: what a store checks
    /// before a save.
    ///
    /// # Errors
    /// [`Error::LockLost`](crate::Error::LockLost) saying who holds the lock now, or that the lease
    /// expired.
    pub fn check_held_by(&self, lease: &LockInfo, now: Timestamp) -> crate::Result<()> {
        if !self.same_lease(lease) {
            return Err(crate::Error::LockLost {
                reason: format!("now held by {self} (epoch {})", self.epoch),
            });
        }
        if self.expired_at(now) {
            return Err(crate::Error::LockLost {
                reason: format!("the lease expired at {}", self.expires),
            });
        }
        Ok(())
    }
}

impl fmt::Display for LockInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (pid {} on {}, since {}, expires {})",
            self.owner.purpose, self.owner.pid, self.owner.host, self.since, self.expires
        )
    }
}

/// Proof of holding the lock.
pub type Lease = LockInfo;

/// A unique lease token.
pub fn new_token() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{:x}-{:x}-{n:x}", std::process::id(), nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_as_rfc3339() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Timestamp(1_795_000_000_123).to_string(),
            "2026-11-18T11:06:40.123Z"
        );
    }

    #[test]
    fn newer_formats_and_garbage_are_refused() {
        let newer = br#"{"format": 99}"#;
        assert!(matches!(
            DeploymentState::from_json("x", newer),
            Err(crate::Error::UnsupportedStateFormat { found: 99, .. })
        ));
        assert!(matches!(
            DeploymentState::from_json("x", b"{not json"),
            Err(crate::Error::CorruptState { .. })
        ));
        let s = DeploymentState::default();
        assert_eq!(DeploymentState::from_json("x", &s.to_json()).unwrap(), s);
    }

    #[test]
    fn a_state_written_before_traffic_ledgers_loads_as_not_measured() {
        let mut s = DeploymentState::default();
        s.record(HistoryEntry {
            id: 1,
            kind: RunKind::Deploy,
            version: Version::new("v1").unwrap(),
            slot: Slot::Blue,
            outcome: Outcome::Succeeded,
            started_at: Timestamp(1),
            finished_at: Timestamp(2),
            ledger: TrafficLedger::default(),
        });
        // The file an older bluegreen wrote: no `ledger` in history, no counters in the flight.
        let mut json: serde_json::Value = serde_json::from_slice(&s.to_json()).unwrap();
        json["history"][0].as_object_mut().unwrap().remove("ledger");
        assert!(json["history"][0].get("ledger").is_none());
        let old = serde_json::to_vec(&json).unwrap();
        let loaded = DeploymentState::from_json("old.json", &old).unwrap();
        assert_eq!(loaded.history[0].id, 1);
        assert_eq!(
            loaded.history[0].ledger,
            TrafficLedger::not_measured("recorded before traffic ledgers existed")
        );
        assert_eq!(loaded.history[0].ledger.dropped(), None);
        // A flight saved by an older version (fields up to `paused`) loads without counters.
        let flight = r#"{"id":3,"kind":"deploy","release":{"version":"v3","artifact":"a"},
            "target":"green","previous":"blue","previous_split":null,"phase":"switch","step":0,
            "switched":false,"reuse_target":false,"endpoints":[],"binding":{},
            "irreversible":null,"waiting":null,"failing":null,"started_at":5}"#;
        match serde_json::from_str::<InFlight>(flight) {
            Ok(f) => assert!(f.counters_at_start.is_none() && f.counters_at_switch.is_none()),
            Err(e) => panic!("an old flight must load: {e}"),
        }
    }

    #[test]
    fn history_is_bounded() {
        let mut s = DeploymentState::default();
        for id in 0..(HISTORY_LIMIT as u64 + 10) {
            s.record(HistoryEntry {
                id,
                kind: RunKind::Deploy,
                version: Version::new("v1").unwrap(),
                slot: Slot::Blue,
                outcome: Outcome::Succeeded,
                started_at: Timestamp(0),
                finished_at: Timestamp(0),
                ledger: TrafficLedger::default(),
            });
        }
        assert_eq!(s.history.len(), HISTORY_LIMIT);
        assert_eq!(s.history.front().unwrap().id, 10);
    }
}
