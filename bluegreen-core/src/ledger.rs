//! The traffic ledger: what clients saw during one deployment, read from the switch's own
//! counters.
//!
//! A switch that counts ([`TrafficSwitch::counters`](crate::TrafficSwitch::counters)) returns a
//! [`SwitchCounters`] snapshot, cumulative since it started. The engine takes one when the
//! deployment starts, one just before the first switch and one when it ends; the differences are
//! the deployment's [`TrafficLedger`], kept in its [`Report`](crate::Report) and its history
//! entry. A switch without counters gives [`TrafficLedger::NotMeasured`]: never a zero that was
//! not counted. A count the switch does not keep is `None` ("not measured"), never `0`.
//!
//! ```
//! use bluegreen_core::ledger::{SlotCounters, SwitchCounters, TrafficLedger};
//! use bluegreen_core::PerSlot;
//! let start = SwitchCounters::default();
//! let mut end = SwitchCounters::default();
//! end.slots = PerSlot::new(SlotCounters::counted(40, 0, 0, 0, 0), SlotCounters::counted(60, 0, 0, 2, 0));
//! let ledger = TrafficLedger::between(&start, None, &end);
//! assert_eq!(ledger.dropped(), Some(2));
//! assert!(ledger.summary().starts_with("100 requests, 2 dropped"));
//! ```

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::types::{PerSlot, Slot};

/// A latency histogram: (bucket value, count) pairs, sorted by value, only non-empty buckets.
///
/// The value is a representative latency of the bucket in microseconds (the switch chooses its
/// buckets; two snapshots of one switch have the same ones, so they can be subtracted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    /// `(latency in µs, count)`, sorted by latency.
    pub buckets: Vec<(u64, u64)>,
}

impl LatencyHistogram {
    /// From `(latency in µs, count)` pairs in any order; empty buckets are dropped and equal
    /// latencies merged.
    pub fn from_buckets(buckets: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut v: Vec<(u64, u64)> = buckets.into_iter().filter(|(_, c)| *c > 0).collect();
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (value, count) in v {
            match out.last_mut() {
                Some((last, c)) if *last == value => *c += count,
                _ => out.push((value, count)),
            }
        }
        LatencyHistogram { buckets: out }
    }

    /// The number of latencies recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|(_, c)| c).sum()
    }

    /// What was recorded after `earlier` (a previous snapshot of the same histogram); `None` when
    /// a bucket went down (the switch restarted in between).
    pub fn since(&self, earlier: &LatencyHistogram) -> Option<LatencyHistogram> {
        let mut out = Vec::with_capacity(self.buckets.len());
        let mut old = earlier.buckets.iter().peekable();
        for &(value, count) in &self.buckets {
            let mut before = 0;
            while let Some(&&(v, c)) = old.peek() {
                if v < value {
                    if c > 0 {
                        return None;
                    }
                    old.next();
                } else {
                    if v == value {
                        before = c;
                        old.next();
                    }
                    break;
                }
            }
            out.push((value, count.checked_sub(before)?));
        }
        if old.any(|(_, c)| *c > 0) {
            return None;
        }
        Some(LatencyHistogram::from_buckets(out))
    }

    /// Adds `other`'s counts.
    pub fn merged(&self, other: &LatencyHistogram) -> LatencyHistogram {
        LatencyHistogram::from_buckets(self.buckets.iter().chain(&other.buckets).copied())
    }

    /// The `q` quantile (0.0 ..= 1.0); `None` when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for &(value, count) in &self.buckets {
            seen += count;
            if seen >= rank {
                return Some(Duration::from_micros(value));
            }
        }
        self.buckets.last().map(|(v, _)| Duration::from_micros(*v))
    }

    /// p50 and p99; `None` when nothing was recorded.
    pub fn percentiles(&self) -> Option<Percentiles> {
        Some(Percentiles {
            p50: self.quantile(0.50)?,
            p99: self.quantile(0.99)?,
        })
    }
}

/// `now - then` for a count a switch may not keep: `Some(None)` when it does not, `None` when it
/// went down (a restart).
fn sub(now: Option<u64>, then: Option<u64>) -> Option<Option<u64>> {
    match (now, then) {
        (Some(n), Some(t)) => n.checked_sub(t).map(Some),
        (n, _) => Some(n),
    }
}

/// One slot's counters in a [`SwitchCounters`] snapshot, cumulative since the switch started.
///
/// The failure causes are disjoint: a request the client saw fail is counted under exactly one.
/// `None` means the switch does not count it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SlotCounters {
    /// Requests routed to the slot and answered (any status, including the failures below).
    pub requests: u64,
    /// Answered by the switch because no endpoint of the slot accepted a connection.
    #[serde(default)]
    pub refused: Option<u64>,
    /// Answered by the switch because the slot did not answer in time.
    #[serde(default)]
    pub timeouts: Option<u64>,
    /// 5xx answers written by the application.
    #[serde(default)]
    pub app_5xx: Option<u64>,
    /// Other 5xx answers the switch wrote itself (e.g. the upstream broke off mid-request).
    #[serde(default)]
    pub switch_5xx: Option<u64>,
    /// Long-lived connections (WebSocket, HTTP/2) the switch closed gracefully.
    #[serde(default)]
    pub graceful_closes: Option<u64>,
    /// Latency of the answered requests (time to response headers).
    #[serde(default)]
    pub latency: Option<LatencyHistogram>,
}

impl SlotCounters {
    /// `requests` answered; no failure cause, latency or close counted (all "not measured").
    pub fn new(requests: u64) -> Self {
        SlotCounters {
            requests,
            ..SlotCounters::default()
        }
    }

    /// With a count of the application's 5xx.
    pub fn with_app_5xx(mut self, n: u64) -> Self {
        self.app_5xx = Some(n);
        self
    }

    /// A slot whose switch counts every failure cause (latency and graceful closes not counted).
    pub fn counted(
        requests: u64,
        refused: u64,
        timeouts: u64,
        app_5xx: u64,
        switch_5xx: u64,
    ) -> Self {
        SlotCounters {
            requests,
            refused: Some(refused),
            timeouts: Some(timeouts),
            app_5xx: Some(app_5xx),
            switch_5xx: Some(switch_5xx),
            graceful_closes: None,
            latency: None,
        }
    }

    /// With a count of graceful closes of long-lived connections.
    pub fn with_graceful_closes(mut self, n: u64) -> Self {
        self.graceful_closes = Some(n);
        self
    }

    /// With a latency histogram.
    pub fn with_latency(mut self, h: LatencyHistogram) -> Self {
        self.latency = Some(h);
        self
    }

    /// Requests that failed, over the causes the switch counts.
    pub fn failed(&self) -> u64 {
        [self.refused, self.timeouts, self.app_5xx, self.switch_5xx]
            .iter()
            .flatten()
            .sum()
    }

    /// What was counted after `earlier`; `None` when a counter went down (a restart).
    pub fn since(&self, earlier: &SlotCounters) -> Option<SlotCounters> {
        Some(SlotCounters {
            requests: self.requests.checked_sub(earlier.requests)?,
            refused: sub(self.refused, earlier.refused)?,
            timeouts: sub(self.timeouts, earlier.timeouts)?,
            app_5xx: sub(self.app_5xx, earlier.app_5xx)?,
            switch_5xx: sub(self.switch_5xx, earlier.switch_5xx)?,
            graceful_closes: sub(self.graceful_closes, earlier.graceful_closes)?,
            latency: match (&self.latency, &earlier.latency) {
                (Some(n), Some(t)) => Some(n.since(t)?),
                (Some(n), None) => Some(n.clone()),
                (None, _) => None,
            },
        })
    }
}

/// A snapshot of a switch's own counters, cumulative since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SwitchCounters {
    /// Per slot.
    pub slots: PerSlot<SlotCounters>,
    /// 5xx answers the switch wrote before choosing a slot (no split applied, a pause that
    /// overflowed or lasted too long); `None` when not counted.
    #[serde(default)]
    pub unrouted_5xx: Option<u64>,
    /// Requests held by a pause and then let through; `None` when the switch cannot pause.
    #[serde(default)]
    pub buffered: Option<u64>,
}

impl SwitchCounters {
    /// Counters of both slots; nothing counted outside them.
    pub fn new(blue: SlotCounters, green: SlotCounters) -> Self {
        SwitchCounters {
            slots: PerSlot::new(blue, green),
            unrouted_5xx: None,
            buffered: None,
        }
    }

    /// With a count of 5xx answers written before a slot was chosen.
    pub fn with_unrouted_5xx(mut self, n: u64) -> Self {
        self.unrouted_5xx = Some(n);
        self
    }

    /// With a count of requests buffered by a pause.
    pub fn with_buffered(mut self, n: u64) -> Self {
        self.buffered = Some(n);
        self
    }

    /// What was counted after `earlier`; `None` when a counter went down (the switch restarted).
    pub fn since(&self, earlier: &SwitchCounters) -> Option<SwitchCounters> {
        Some(SwitchCounters {
            slots: PerSlot::new(
                self.slots.blue.since(&earlier.slots.blue)?,
                self.slots.green.since(&earlier.slots.green)?,
            ),
            unrouted_5xx: sub(self.unrouted_5xx, earlier.unrouted_5xx)?,
            buffered: sub(self.buffered, earlier.buffered)?,
        })
    }

    /// The latency of both slots together; `None` when the switch measures none.
    fn latency(&self) -> Option<LatencyHistogram> {
        match (&self.slots.blue.latency, &self.slots.green.latency) {
            (Some(b), Some(g)) => Some(b.merged(g)),
            (Some(h), None) | (None, Some(h)) => Some(h.clone()),
            (None, None) => None,
        }
    }
}

/// p50 and p99 latency over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median (in JSON: `p50_us`, microseconds).
    #[serde(rename = "p50_us", with = "micros")]
    pub p50: Duration,
    /// 99th percentile (in JSON: `p99_us`).
    #[serde(rename = "p99_us", with = "micros")]
    pub p99: Duration,
}

/// Durations as whole microseconds.
mod micros {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_micros)
    }
}

/// Latency before and after the switch. `None` in a window without requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyLedger {
    /// From the start of the deployment to its first switch.
    pub before: Option<Percentiles>,
    /// From the first switch to the end of the deployment.
    pub after: Option<Percentiles>,
    /// Whether the deployment switched at all (if not, `before` covers all of it).
    #[serde(default)]
    pub switched: bool,
}

/// What the switch counted during one deployment. A `None` count is "not measured".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LedgerCounts {
    /// Requests routed to each slot and answered.
    pub requests: PerSlot<u64>,
    /// Failed: no endpoint accepted the connection.
    pub refused: Option<u64>,
    /// Failed: the slot did not answer in time.
    pub timeouts: Option<u64>,
    /// Failed: a 5xx from the application.
    pub app_5xx: Option<u64>,
    /// Failed: a 5xx written by the switch itself (other than refused and timeouts).
    pub switch_5xx: Option<u64>,
    /// Requests held by a pause (added latency, not errors).
    pub buffered: Option<u64>,
    /// Long-lived connections closed gracefully.
    pub graceful_closes: Option<u64>,
    /// p50 / p99 before and after the switch; `None` when the switch measures no latency.
    pub latency: Option<LatencyLedger>,
}

/// The traffic of one deployment, as the switch counted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "measured", rename_all = "snake_case")]
pub enum TrafficLedger {
    /// The switch keeps no counters, or they could not be read: nothing is claimed.
    NotMeasured {
        /// Why.
        reason: String,
    },
    /// Counted by the switch.
    Measured(LedgerCounts),
}

impl Default for TrafficLedger {
    /// What a history entry written before traffic ledgers existed reads as.
    fn default() -> Self {
        TrafficLedger::not_measured("recorded before traffic ledgers existed")
    }
}

impl TrafficLedger {
    /// Not measured, for `reason`.
    pub fn not_measured(reason: impl Into<String>) -> Self {
        TrafficLedger::NotMeasured {
            reason: reason.into(),
        }
    }

    /// The ledger between snapshots taken at the start, at the first switch (if it happened) and
    /// at the end of a deployment. Not measured when a counter went down (the switch restarted).
    pub fn between(
        start: &SwitchCounters,
        at_switch: Option<&SwitchCounters>,
        end: &SwitchCounters,
    ) -> TrafficLedger {
        let Some(all) = end.since(start) else {
            return TrafficLedger::not_measured(
                "the switch's counters went back during the deployment (it restarted)",
            );
        };
        let total = |f: fn(&SlotCounters) -> Option<u64>| -> Option<u64> {
            match (f(&all.slots.blue), f(&all.slots.green)) {
                (None, None) => None,
                (b, g) => Some(b.unwrap_or(0) + g.unwrap_or(0)),
            }
        };
        let switch_5xx = match (total(|s| s.switch_5xx), all.unrouted_5xx) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        let latency = all.latency().map(|_| {
            let window = |from: &SwitchCounters, to: &SwitchCounters| {
                to.since(from)
                    .and_then(|d| d.latency())
                    .and_then(|h| h.percentiles())
            };
            match at_switch {
                Some(mid) => LatencyLedger {
                    before: window(start, mid),
                    after: window(mid, end),
                    switched: true,
                },
                None => LatencyLedger {
                    before: window(start, end),
                    after: None,
                    switched: false,
                },
            }
        });
        TrafficLedger::Measured(LedgerCounts {
            requests: PerSlot::new(all.slots.blue.requests, all.slots.green.requests),
            refused: total(|s| s.refused),
            timeouts: total(|s| s.timeouts),
            app_5xx: total(|s| s.app_5xx),
            switch_5xx,
            buffered: all.buffered,
            graceful_closes: total(|s| s.graceful_closes),
            latency,
        })
    }

    /// The counts, when measured.
    pub fn counts(&self) -> Option<&LedgerCounts> {
        match self {
            TrafficLedger::Measured(c) => Some(c),
            TrafficLedger::NotMeasured { .. } => None,
        }
    }

    /// Failed requests over the causes the switch counts; `None` when not measured.
    pub fn dropped(&self) -> Option<u64> {
        let c = self.counts()?;
        Some(
            [c.refused, c.timeouts, c.app_5xx, c.switch_5xx]
                .iter()
                .flatten()
                .sum(),
        )
    }

    /// The one-line summary, e.g. `1200 requests, 0 dropped, p99 +3 ms`.
    pub fn summary(&self) -> String {
        let c = match self {
            TrafficLedger::NotMeasured { reason } => {
                return format!("traffic not measured: {reason}")
            }
            TrafficLedger::Measured(c) => c,
        };
        let requests = c.requests.blue + c.requests.green;
        let all = [
            ("refused", c.refused),
            ("timed out", c.timeouts),
            ("app 5xx", c.app_5xx),
            ("switch 5xx", c.switch_5xx),
        ];
        let unmeasured: Vec<&str> = all
            .iter()
            .filter(|(_, n)| n.is_none())
            .map(|(name, _)| *name)
            .collect();
        // With causes the switch does not count, the total is a lower bound and says so.
        let at_least = if unmeasured.is_empty() {
            ""
        } else {
            "at least "
        };
        let mut line = format!(
            "{requests} requests, {at_least}{} dropped",
            self.dropped().unwrap_or(0)
        );
        let mut causes: Vec<String> = all
            .iter()
            .filter_map(|(name, n)| n.filter(|n| *n > 0).map(|n| format!("{n} {name}")))
            .collect();
        if !unmeasured.is_empty() {
            causes.push(format!("{} not measured", unmeasured.join(", ")));
        }
        if !causes.is_empty() {
            line.push_str(&format!(" ({})", causes.join(", ")));
        }
        if let Some(b) = c.buffered.filter(|b| *b > 0) {
            line.push_str(&format!(", {b} buffered"));
        }
        line.push_str(", ");
        line.push_str(&latency_delta(c.latency.as_ref()));
        line
    }
}

/// `p99 +3 ms`, `p99 -1 ms`, or why there is no difference to show.
fn latency_delta(l: Option<&LatencyLedger>) -> String {
    let Some(l) = l else {
        return "latency not measured".into();
    };
    match (l.before, l.after) {
        (Some(b), _) if !l.switched => format!("p99 {} (traffic never switched)", ms(b.p99)),
        (Some(b), Some(a)) => {
            let delta = a.p99.as_secs_f64() - b.p99.as_secs_f64();
            format!("p99 {}", signed_ms(delta))
        }
        (None, Some(a)) => format!("p99 {} (no requests before the switch)", ms(a.p99)),
        (Some(b), None) => format!("p99 {} (no requests after the switch)", ms(b.p99)),
        (None, None) => "p99 n/a (no requests)".into(),
    }
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.0} ms")
    }
}

fn signed_ms(secs: f64) -> String {
    let v = secs * 1000.0;
    let sign = if v < 0.0 { "-" } else { "+" };
    let a = v.abs();
    if a < 10.0 {
        format!("{sign}{a:.1} ms")
    } else {
        format!("{sign}{a:.0} ms")
    }
}

fn count(n: Option<u64>) -> String {
    n.map(|n| n.to_string())
        .unwrap_or_else(|| "not measured".into())
}

impl fmt::Display for TrafficLedger {
    /// The details, one line each, ending with [`summary`](TrafficLedger::summary).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let TrafficLedger::Measured(c) = self {
            writeln!(
                f,
                "requests:  {} blue, {} green",
                c.requests.get(Slot::Blue),
                c.requests.get(Slot::Green)
            )?;
            writeln!(
                f,
                "failed:    refused {}, timed out {}, app 5xx {}, switch 5xx {}",
                count(c.refused),
                count(c.timeouts),
                count(c.app_5xx),
                count(c.switch_5xx)
            )?;
            writeln!(f, "buffered during a pause: {}", count(c.buffered))?;
            writeln!(
                f,
                "long-lived connections closed gracefully: {}",
                count(c.graceful_closes)
            )?;
            let p = |p: Option<Percentiles>| {
                p.map(|p| format!("p50 {} p99 {}", ms(p.p50), ms(p.p99)))
                    .unwrap_or_else(|| "no requests".into())
            };
            match &c.latency {
                Some(l) if !l.switched => {
                    writeln!(f, "latency:   {} (traffic never switched)", p(l.before))?
                }
                Some(l) => writeln!(
                    f,
                    "latency:   before the switch {}; after {}",
                    p(l.before),
                    p(l.after)
                )?,
                None => writeln!(f, "latency:   not measured")?,
            }
        }
        write!(f, "{}", self.summary())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(pairs: &[(u64, u64)]) -> LatencyHistogram {
        LatencyHistogram::from_buckets(pairs.iter().copied())
    }

    #[test]
    fn histograms_subtract_and_give_quantiles() {
        let a = hist(&[(1000, 5), (2000, 1)]);
        let b = hist(&[(1000, 7), (2000, 1), (50_000, 2)]);
        let d = b.since(&a).unwrap();
        assert_eq!(d.buckets, vec![(1000, 2), (50_000, 2)]);
        assert_eq!(d.quantile(0.5), Some(Duration::from_micros(1000)));
        assert_eq!(d.quantile(0.99), Some(Duration::from_micros(50_000)));
        // A bucket that went down, or disappeared: the switch restarted.
        assert_eq!(a.since(&b), None);
        assert_eq!(hist(&[(2000, 1)]).since(&a), None);
        assert_eq!(LatencyHistogram::default().quantile(0.5), None);
    }

    #[test]
    fn a_ledger_counts_the_window_and_sums_disjoint_causes() {
        let start = SwitchCounters::new(
            SlotCounters::counted(100, 1, 0, 2, 0).with_latency(hist(&[(1000, 100)])),
            SlotCounters::counted(0, 0, 0, 0, 0).with_latency(hist(&[])),
        )
        .with_unrouted_5xx(3)
        .with_buffered(0);
        let mid = SwitchCounters::new(
            SlotCounters::counted(200, 1, 0, 2, 0).with_latency(hist(&[(1000, 200)])),
            SlotCounters::counted(0, 0, 0, 0, 0).with_latency(hist(&[])),
        )
        .with_unrouted_5xx(3)
        .with_buffered(0);
        let end = SwitchCounters::new(
            SlotCounters::counted(210, 2, 1, 2, 0).with_latency(hist(&[(1000, 210)])),
            SlotCounters::counted(90, 0, 0, 5, 1).with_latency(hist(&[(4000, 90)])),
        )
        .with_unrouted_5xx(4)
        .with_buffered(7);
        let l = TrafficLedger::between(&start, Some(&mid), &end);
        let c = l.counts().unwrap();
        assert_eq!(c.requests, PerSlot::new(110, 90));
        assert_eq!(
            (c.refused, c.timeouts, c.app_5xx, c.switch_5xx),
            (Some(1), Some(1), Some(5), Some(2))
        );
        assert_eq!(c.buffered, Some(7));
        assert_eq!(c.graceful_closes, None, "not counted: not measured, not 0");
        let lat = c.latency.unwrap();
        assert_eq!(lat.before.unwrap().p99, Duration::from_millis(1));
        // After: 10 at 1 ms, 90 at 4 ms.
        assert_eq!(lat.after.unwrap().p50, Duration::from_millis(4));
        assert_eq!(l.dropped(), Some(9));
        assert_eq!(
            l.summary(),
            "200 requests, 9 dropped (1 refused, 1 timed out, 5 app 5xx, 2 switch 5xx), \
             7 buffered, p99 +3.0 ms"
        );
        assert!(l
            .to_string()
            .contains("long-lived connections closed gracefully: not measured"));
        // A deployment that failed before its switch: its latency is one window, said so.
        let never = TrafficLedger::between(&start, None, &mid);
        assert!(
            never
                .summary()
                .ends_with("0 dropped, p99 1.0 ms (traffic never switched)"),
            "{}",
            never.summary()
        );
        // A restart in between: nothing claimed.
        let l = TrafficLedger::between(&end, None, &start);
        assert!(matches!(l, TrafficLedger::NotMeasured { .. }), "{l:?}");
        assert_eq!(l.dropped(), None);
    }

    #[test]
    fn causes_a_switch_does_not_count_make_the_total_a_lower_bound() {
        // A switch that only counts the application's 5xx (HAProxy's server rows).
        let slot = |requests, app_5xx| SlotCounters {
            requests,
            app_5xx: Some(app_5xx),
            ..SlotCounters::default()
        };
        let start = SwitchCounters::new(slot(10, 0), slot(0, 0));
        let end = SwitchCounters::new(slot(60, 2), slot(40, 1));
        let l = TrafficLedger::between(&start, None, &end);
        assert_eq!(l.dropped(), Some(3));
        assert_eq!(
            l.summary(),
            "90 requests, at least 3 dropped (3 app 5xx, refused, timed out, switch 5xx not \
             measured), latency not measured"
        );
        assert!(l.to_string().contains(
            "failed:    refused not measured, timed out not measured, app 5xx 3, switch 5xx not measured"
        ));
    }

    #[test]
    fn not_measured_is_never_zero_and_serializes_as_such() {
        let l = TrafficLedger::not_measured("the nginx switch keeps no request counters");
        assert_eq!(l.dropped(), None);
        assert_eq!(
            l.summary(),
            "traffic not measured: the nginx switch keeps no request counters"
        );
        let json = serde_json::to_value(&l).unwrap();
        assert_eq!(json["measured"], "not_measured");
        let back: TrafficLedger = serde_json::from_value(json).unwrap();
        assert_eq!(back, l);
        let m =
            TrafficLedger::between(&SwitchCounters::default(), None, &SwitchCounters::default());
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["measured"], "measured");
        assert_eq!(json["refused"], serde_json::Value::Null);
        assert_eq!(serde_json::from_value::<TrafficLedger>(json).unwrap(), m);
    }
}
