//! Lock-free per-slot counters: in-flight requests, answered requests, failures by cause and a
//! latency histogram; their snapshot for the traffic ledger ([`Stats::counters`]) and their
//! Prometheus text exposition ([`Stats::prometheus`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bluegreen_core::ledger::{LatencyHistogram, SlotCounters, SwitchCounters};
use bluegreen_core::{Slot, SlotMetrics};
use tokio::sync::Notify;

use crate::long_lived::LongLived;

/// Sub-buckets per power of two: 8 gives a relative error below 12.5 %.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Latencies are clamped to 2^40 µs (about 12 days).
const MAX_BITS: u32 = 40;
const BUCKETS: usize = (SUB + (MAX_BITS as u64 - SUB_BITS as u64 + 1) * SUB) as usize;

/// A histogram of latencies in microseconds with fixed logarithmic buckets of atomics.
pub(crate) struct Histogram {
    buckets: Box<[AtomicU64]>,
    /// The sum of every recorded latency, in microseconds (Prometheus's `_sum`).
    sum_micros: AtomicU64,
}

impl Histogram {
    pub(crate) fn new() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// The first latency (µs) above bucket `i`: its exclusive upper bound.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i + 1;
        }
        let shift = (i - SUB) / SUB;
        let sub = (i - SUB) % SUB;
        ((SUB + sub) << shift) + (1u64 << shift)
    }

    /// The non-empty buckets as (representative µs, count), for the ledger.
    pub(crate) fn snapshot(&self) -> LatencyHistogram {
        LatencyHistogram::from_buckets(
            self.buckets
                .iter()
                .enumerate()
                .map(|(i, b)| (Self::value(i), b.load(Ordering::Relaxed))),
        )
    }

    /// Cumulative counts of latencies below each of `bounds` (µs, ascending), the total count and
    /// the sum in µs. A bucket counts under a bound when all of it lies below: near a bound the
    /// count is low by at most one bucket's width (12.5 %).
    fn cumulative(&self, bounds: &[u64]) -> (Vec<u64>, u64, u64) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let le = bounds
            .iter()
            .map(|bound| {
                counts
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| Self::upper(*i) <= *bound)
                    .map(|(_, c)| c)
                    .sum()
            })
            .collect();
        (
            le,
            counts.iter().sum(),
            self.sum_micros.load(Ordering::Relaxed),
        )
    }

    fn index(micros: u64) -> usize {
        let v = micros.min((1u64 << MAX_BITS) - 1);
        if v < SUB {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        let sub = (v >> shift) & (SUB - 1);
        (SUB + u64::from(shift) * SUB + sub) as usize
    }

    /// A representative value (the middle) of bucket `i`, in microseconds.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let shift = (i - SUB) / SUB;
        let sub = (i - SUB) % SUB;
        let low = (SUB + sub) << shift;
        low + (1u64 << shift) / 2
    }

    pub(crate) fn record(&self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[Self::index(micros)].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The `q` quantile (0.0 ..= 1.0); zero when nothing was recorded.
    pub(crate) fn quantile(&self, q: f64) -> Duration {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Duration::from_micros(Self::value(i));
            }
        }
        Duration::from_micros(Self::value(BUCKETS - 1))
    }
}

/// Why the proxy answered a routed request with an error of its own. The causes are disjoint
/// (with the application's own 5xx, counted apart): each failed request counts under one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No endpoint of the slot accepted a connection (502).
    Refused,
    /// The slot did not answer within the response-header timeout (504).
    Timeout,
    /// Any other error the proxy wrote (e.g. 502: the upstream broke off mid-request).
    Switch,
}

/// Counters of one slot.
pub(crate) struct SlotStats {
    in_flight: AtomicU64,
    requests: AtomicU64,
    errors_5xx: AtomicU64,
    connect_errors: AtomicU64,
    refused: AtomicU64,
    timeouts: AtomicU64,
    app_5xx: AtomicU64,
    switch_5xx: AtomicU64,
    latency: Histogram,
    drained: Notify,
}

impl SlotStats {
    fn new() -> Self {
        SlotStats {
            in_flight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors_5xx: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            app_5xx: AtomicU64::new(0),
            switch_5xx: AtomicU64::new(0),
            latency: Histogram::new(),
            drained: Notify::new(),
        }
    }

    /// The slot's counters; `closed` is its count of long-lived connections closed gracefully.
    fn counters(&self, closed: u64) -> SlotCounters {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SlotCounters::counted(
            n(&self.requests),
            n(&self.refused),
            n(&self.timeouts),
            n(&self.app_5xx),
            n(&self.switch_5xx),
        )
        .with_graceful_closes(closed)
        .with_latency(self.latency.snapshot())
    }
}

/// Counters of both slots, shared by every connection of a proxy.
pub(crate) struct Stats {
    blue: SlotStats,
    green: SlotStats,
    /// 5xx answers written before a slot was chosen (no split, pause overflow or timeout).
    unrouted_5xx: AtomicU64,
}

/// Latency bounds of the Prometheus histogram, in µs (1 ms to 10 s).
const PROMETHEUS_BOUNDS: [u64; 13] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

impl Stats {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Stats {
            blue: SlotStats::new(),
            green: SlotStats::new(),
            unrouted_5xx: AtomicU64::new(0),
        })
    }

    /// Counts a 5xx the proxy wrote before choosing a slot.
    pub(crate) fn unrouted_5xx(&self) {
        self.unrouted_5xx.fetch_add(1, Ordering::Relaxed);
    }

    /// The snapshot the traffic ledger is made of; `buffered` is the pause gate's count,
    /// `long_lived` the slots' long-lived connections (their graceful closes).
    pub(crate) fn counters(&self, buffered: u64, long_lived: &LongLived) -> SwitchCounters {
        SwitchCounters::new(
            self.blue.counters(long_lived.closed(Slot::Blue)),
            self.green.counters(long_lived.closed(Slot::Green)),
        )
        .with_unrouted_5xx(self.unrouted_5xx.load(Ordering::Relaxed))
        .with_buffered(buffered)
    }

    /// The counters in the Prometheus text exposition format (version 0.0.4).
    pub(crate) fn prometheus(&self, buffered: u64, long_lived: &LongLived) -> String {
        let mut out = String::new();
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let slots = [(Slot::Blue, &self.blue), (Slot::Green, &self.green)];
        let mut w = |line: String| {
            out.push_str(&line);
            out.push('\n');
        };
        w("# HELP bluegreen_proxy_requests_total Requests routed to a slot and answered (any status).".into());
        w("# TYPE bluegreen_proxy_requests_total counter".into());
        for (slot, s) in slots {
            w(format!(
                "bluegreen_proxy_requests_total{{slot=\"{slot}\"}} {}",
                n(&s.requests)
            ));
        }
        w("# HELP bluegreen_proxy_failed_requests_total Requests that failed, by cause: refused, timeout, app_5xx (from the application), switch_5xx (written by the proxy).".into());
        w("# TYPE bluegreen_proxy_failed_requests_total counter".into());
        for (slot, s) in slots {
            for (cause, v) in [
                ("refused", &s.refused),
                ("timeout", &s.timeouts),
                ("app_5xx", &s.app_5xx),
                ("switch_5xx", &s.switch_5xx),
            ] {
                w(format!(
                    "bluegreen_proxy_failed_requests_total{{slot=\"{slot}\",cause=\"{cause}\"}} {}",
                    n(v)
                ));
            }
        }
        w("# HELP bluegreen_proxy_unrouted_errors_total 5xx answers written before a slot was chosen (no split applied, pause overflow or timeout).".into());
        w("# TYPE bluegreen_proxy_unrouted_errors_total counter".into());
        w(format!(
            "bluegreen_proxy_unrouted_errors_total {}",
            n(&self.unrouted_5xx)
        ));
        w("# HELP bluegreen_proxy_buffered_requests_total Requests held by a pause and then let through.".into());
        w("# TYPE bluegreen_proxy_buffered_requests_total counter".into());
        w(format!(
            "bluegreen_proxy_buffered_requests_total {buffered}"
        ));
        w("# HELP bluegreen_proxy_long_lived_closed_total Long-lived connections (WebSocket, HTTP/2) to a slot the proxy closed gracefully (close frame 1001, GOAWAY).".into());
        w("# TYPE bluegreen_proxy_long_lived_closed_total counter".into());
        for (slot, _) in slots {
            w(format!(
                "bluegreen_proxy_long_lived_closed_total{{slot=\"{slot}\"}} {}",
                long_lived.closed(slot)
            ));
        }
        w("# HELP bluegreen_proxy_in_flight Requests in flight to a slot.".into());
        w("# TYPE bluegreen_proxy_in_flight gauge".into());
        for (slot, s) in slots {
            w(format!(
                "bluegreen_proxy_in_flight{{slot=\"{slot}\"}} {}",
                n(&s.in_flight)
            ));
        }
        w("# HELP bluegreen_proxy_request_duration_seconds Time to response headers of answered requests.".into());
        w("# TYPE bluegreen_proxy_request_duration_seconds histogram".into());
        for (slot, s) in slots {
            let (le, count, sum) = s.latency.cumulative(&PROMETHEUS_BOUNDS);
            for (bound, c) in PROMETHEUS_BOUNDS.iter().zip(le) {
                w(format!(
                    "bluegreen_proxy_request_duration_seconds_bucket{{slot=\"{slot}\",le=\"{}\"}} {c}",
                    *bound as f64 / 1e6
                ));
            }
            w(format!(
                "bluegreen_proxy_request_duration_seconds_bucket{{slot=\"{slot}\",le=\"+Inf\"}} {count}"
            ));
            w(format!(
                "bluegreen_proxy_request_duration_seconds_sum{{slot=\"{slot}\"}} {}",
                sum as f64 / 1e6
            ));
            w(format!(
                "bluegreen_proxy_request_duration_seconds_count{{slot=\"{slot}\"}} {count}"
            ));
        }
        out
    }

    pub(crate) fn slot(&self, slot: Slot) -> &SlotStats {
        match slot {
            Slot::Blue => &self.blue,
            Slot::Green => &self.green,
        }
    }

    /// Counts a request routed to `slot` as in flight until the returned guard is dropped.
    pub(crate) fn start(self: &Arc<Self>, slot: Slot) -> InFlight {
        self.slot(slot).in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            stats: Arc::clone(self),
            slot,
            started: Instant::now(),
        }
    }

    pub(crate) fn in_flight(&self, slot: Slot) -> u64 {
        self.slot(slot).in_flight.load(Ordering::Acquire)
    }

    pub(crate) fn connect_error(&self, slot: Slot) {
        self.slot(slot)
            .connect_errors
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn metrics(&self, slot: Slot) -> SlotMetrics {
        let s = self.slot(slot);
        SlotMetrics::new(
            s.requests.load(Ordering::Relaxed),
            s.errors_5xx.load(Ordering::Relaxed),
            s.connect_errors.load(Ordering::Relaxed),
            s.latency.quantile(0.50),
            s.latency.quantile(0.99),
        )
    }

    /// Waits until `slot` has no request in flight, or `timeout` passes; returns what is left.
    pub(crate) async fn wait_drained(&self, slot: Slot, timeout: Duration) -> u64 {
        let s = self.slot(slot);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = s.drained.notified();
            tokio::pin!(notified);
            // Register before reading the counter, so a decrement to zero in between wakes us.
            notified.as_mut().enable();
            let left = s.in_flight.load(Ordering::Acquire);
            if left == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return s.in_flight.load(Ordering::Acquire);
            }
        }
    }
}

/// A request in flight to one slot. Dropping it (when the response body is finished or dropped)
/// ends the request.
pub(crate) struct InFlight {
    stats: Arc<Stats>,
    slot: Slot,
    started: Instant,
}

impl InFlight {
    pub(crate) fn slot(&self) -> Slot {
        self.slot
    }

    /// Records the answer (status and time to response headers).
    pub(crate) fn answered(&self, status: u16) {
        let s = self.stats.slot(self.slot);
        s.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            s.errors_5xx.fetch_add(1, Ordering::Relaxed);
        }
        s.latency.record(self.started.elapsed());
    }

    /// Counts the application's own 5xx (after [`answered`](Self::answered)).
    pub(crate) fn app_error(&self) {
        self.stats
            .slot(self.slot)
            .app_5xx
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an error the proxy answered with itself (after [`answered`](Self::answered)).
    pub(crate) fn failed(&self, why: Failure) {
        let s = self.stats.slot(self.slot);
        let counter = match why {
            Failure::Refused => &s.refused,
            Failure::Timeout => &s.timeouts,
            Failure::Switch => &s.switch_5xx,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let s = self.stats.slot(self.slot);
        if s.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            s.drained.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_monotonic_and_close() {
        let mut last = 0;
        for v in [
            0u64,
            1,
            7,
            8,
            9,
            15,
            16,
            100,
            1_000,
            12_345,
            1 << 30,
            u64::MAX,
        ] {
            let i = Histogram::index(v);
            assert!(i >= last, "index not monotonic at {v}");
            assert!(i < BUCKETS);
            last = i;
            if v < (1 << MAX_BITS) {
                let back = Histogram::value(i) as f64;
                let err = (back - v as f64).abs() / (v as f64).max(1.0);
                assert!(err <= 0.125, "{v} -> bucket {i} -> {back}");
            }
        }
    }

    #[test]
    fn quantiles_follow_the_distribution() {
        let h = Histogram::new();
        assert_eq!(h.quantile(0.5), Duration::ZERO);
        for _ in 0..98 {
            h.record(Duration::from_millis(1));
        }
        h.record(Duration::from_millis(100));
        h.record(Duration::from_millis(100));
        let p50 = h.quantile(0.5).as_micros() as f64;
        let p99 = h.quantile(0.99).as_micros() as f64;
        assert!((p50 - 1000.0).abs() / 1000.0 < 0.13, "p50 {p50}");
        assert!((p99 - 100_000.0).abs() / 100_000.0 < 0.13, "p99 {p99}");
    }

    #[tokio::test]
    async fn drain_wait_wakes_when_the_last_request_ends() {
        let stats = Stats::new();
        let a = stats.start(Slot::Blue);
        let b = stats.start(Slot::Blue);
        assert_eq!(stats.in_flight(Slot::Blue), 2);
        assert_eq!(stats.in_flight(Slot::Green), 0);
        assert_eq!(
            stats
                .wait_drained(Slot::Blue, Duration::from_millis(20))
                .await,
            2
        );
        let s2 = Arc::clone(&stats);
        let waiter =
            tokio::spawn(async move { s2.wait_drained(Slot::Blue, Duration::from_secs(30)).await });
        drop(a);
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(b);
        assert_eq!(waiter.await.unwrap(), 0);
    }
}
