//! Post-switch analysis (pass / fail / inconclusive) and data-path probes that prove a switch took
//! effect where clients see it.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

#[cfg(feature = "http")]
use crate::error::Error;
use crate::error::Result;
use crate::ledger::{SlotCounters, SwitchCounters};
use crate::traits::{SlotMetrics, TrafficSwitch};
use crate::types::{Slot, Version};

/// An analysis verdict. Inconclusive pauses the deployment for a person (`promote` / `abort`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The target behaves.
    Pass,
    /// The target misbehaves: roll back.
    Fail(String),
    /// Not enough evidence either way.
    Inconclusive(String),
}

/// What an analysis is told each round.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AnalysisContext {
    /// The slot receiving new traffic.
    pub target: Slot,
    /// The slot traffic came from.
    pub previous: Option<Slot>,
    /// Canary step (0-based).
    pub step: usize,
    /// The target's weight in this step.
    pub weight: u8,
    /// Time since this step's observation began.
    pub elapsed: Duration,
    /// The step's observation window.
    pub window: Duration,
    /// The target's metrics when observation began (when the switch reports metrics).
    pub baseline: Option<SlotMetrics>,
    /// The switch's counters when this step's observation began (when it keeps counters).
    pub counters_at_step: Option<SwitchCounters>,
    /// The switch's counters when the deployment started, before any traffic moved.
    pub counters_at_start: Option<SwitchCounters>,
    /// The switch, to read metrics.
    pub switch: Arc<dyn TrafficSwitch>,
}

/// Judges the target during the observation window.
///
/// # Behavior
/// Called every observation interval. `Fail` ends the window at once (rollback); the verdict of the
/// last round decides between `Pass` and `Inconclusive`. `Err` counts as `Fail`.
#[async_trait]
pub trait Analysis: Send + Sync + Debug {
    /// The analysis's name.
    fn name(&self) -> &str;

    /// Whether it reads [`TrafficSwitch::metrics`] (the engine refuses a plan whose switch lacks them).
    fn requires_metrics(&self) -> bool {
        false
    }

    /// One round.
    async fn analyze(&self, ctx: &AnalysisContext) -> Result<Verdict>;
}

/// Error-rate and latency analysis over the switch's per-slot metrics.
///
/// Counts requests, 5xx answers and upstream connect errors of the target since the observation
/// began. Fewer than `min_requests` is inconclusive.
///
/// ```
/// use std::time::Duration;
/// use bluegreen_core::analysis::MetricsAnalysis;
/// let a = MetricsAnalysis::new(0.01).with_min_requests(50).with_max_p99(Duration::from_millis(500));
/// # let _ = a;
/// ```
#[derive(Debug, Clone)]
pub struct MetricsAnalysis {
    max_error_rate: f64,
    max_p99: Option<Duration>,
    min_requests: u64,
}

impl MetricsAnalysis {
    /// Fails when more than `max_error_rate` (0.0–1.0) of requests fail.
    pub fn new(max_error_rate: f64) -> Self {
        MetricsAnalysis {
            max_error_rate,
            max_p99: None,
            min_requests: 20,
        }
    }

    /// Fails when the target's p99 latency exceeds `bound`.
    pub fn with_max_p99(mut self, bound: Duration) -> Self {
        self.max_p99 = Some(bound);
        self
    }

    /// Fewer requests than this is inconclusive (default 20).
    pub fn with_min_requests(mut self, n: u64) -> Self {
        self.min_requests = n;
        self
    }
}

#[async_trait]
impl Analysis for MetricsAnalysis {
    fn name(&self) -> &str {
        "metrics"
    }

    fn requires_metrics(&self) -> bool {
        true
    }

    async fn analyze(&self, ctx: &AnalysisContext) -> Result<Verdict> {
        let now = ctx.switch.metrics(ctx.target).await?;
        let base = ctx.baseline.unwrap_or_default();
        let requests = now.requests.saturating_sub(base.requests);
        let failed = now.errors_5xx.saturating_sub(base.errors_5xx)
            + now.connect_errors.saturating_sub(base.connect_errors);
        if requests == 0 && failed == 0 {
            return Ok(Verdict::Inconclusive(format!(
                "no requests reached {} yet (need {})",
                ctx.target, self.min_requests
            )));
        }
        let rate = failed as f64 / requests.max(1) as f64;
        if rate > self.max_error_rate && failed > 0 {
            return Ok(Verdict::Fail(format!(
                "{failed} of {requests} requests to {} failed ({:.1}% > {:.1}%)",
                ctx.target,
                rate * 100.0,
                self.max_error_rate * 100.0
            )));
        }
        if let Some(bound) = self.max_p99 {
            if now.p99 > bound {
                return Ok(Verdict::Fail(format!(
                    "p99 latency of {} is {:?} > {bound:?}",
                    ctx.target, now.p99
                )));
            }
        }
        if requests < self.min_requests {
            return Ok(Verdict::Inconclusive(format!(
                "only {requests} requests reached {} (need {})",
                ctx.target, self.min_requests
            )));
        }
        Ok(Verdict::Pass)
    }
}

/// The two-proportion z statistic of `x1` failures in `n1` requests against `x2` in `n2`:
/// `(p1 - p2) / sqrt(p (1 - p) (1/n1 + 1/n2))` with the pooled rate `p = (x1 + x2) / (n1 + n2)`.
/// Positive when the first rate is higher; `0` when there is no variance (both rates 0 or 1) or
/// a sample is empty.
///
/// ```
/// use bluegreen_core::analysis::two_proportion_z;
/// // 3 % against 1 % over 1000 requests each: z ≈ 3.19.
/// let z = two_proportion_z(30, 1000, 10, 1000);
/// assert!((z - 3.194).abs() < 1e-3);
/// ```
pub fn two_proportion_z(x1: u64, n1: u64, x2: u64, n2: u64) -> f64 {
    if n1 == 0 || n2 == 0 {
        return 0.0;
    }
    let (x1, n1, x2, n2) = (x1 as f64, n1 as f64, x2 as f64, n2 as f64);
    let p = (x1 + x2) / (n1 + n2);
    let se = (p * (1.0 - p) * (1.0 / n1 + 1.0 / n2)).sqrt();
    if se == 0.0 || !se.is_finite() {
        return 0.0;
    }
    (x1 / n1 - x2 / n2) / se
}

/// Statistical canary analysis from the switch's own counters
/// ([`TrafficSwitch::counters`]): the canary (target) slot against the stable (previous) slot,
/// live, over the current step's observation.
///
/// - Fewer than `min_samples` requests on either side: **inconclusive** (keep waiting).
/// - Error rates (every failure cause the switch counts) compared with a one-sided
///   two-proportion z-test ([`two_proportion_z`]): z above the threshold (default 2.326, a 1 %
///   false-alarm rate) **fails**.
/// - p95 latency: the canary's p95 above `max_p95_ratio` × the stable's (default 1.5) and more
///   than `latency_floor` (default 25 ms) above it **fails** (a floor, so jitter and a new
///   instance's cold connections never fail a release).
/// - Otherwise **pass**.
///
/// When the stable slot receives too little traffic during the step (at 100 % it gets none), it
/// is judged by its traffic since the deployment started instead.
///
/// ```
/// use bluegreen_core::analysis::StatisticalAnalysis;
/// let a = StatisticalAnalysis::new().with_min_samples(200).with_max_p95_ratio(1.2);
/// # let _ = a;
/// ```
#[derive(Debug, Clone)]
pub struct StatisticalAnalysis {
    min_samples: u64,
    z_threshold: f64,
    max_p95_ratio: f64,
    latency_floor: Duration,
}

impl Default for StatisticalAnalysis {
    fn default() -> Self {
        StatisticalAnalysis::new()
    }
}

impl StatisticalAnalysis {
    /// At least 100 requests per side, z > 2.326 fails, p95 ratio 1.5 above a 25 ms floor.
    pub fn new() -> Self {
        StatisticalAnalysis {
            min_samples: 100,
            z_threshold: 2.326,
            max_p95_ratio: 1.5,
            latency_floor: Duration::from_millis(25),
        }
    }

    /// Requests each side needs before a verdict (at least 1).
    pub fn with_min_samples(mut self, n: u64) -> Self {
        self.min_samples = n.max(1);
        self
    }

    /// The z above which the canary's error rate is significantly worse (2.326 ≈ 1 %,
    /// 1.645 ≈ 5 % one-sided).
    pub fn with_z_threshold(mut self, z: f64) -> Self {
        self.z_threshold = z;
        self
    }

    /// The largest canary p95 / stable p95 accepted.
    pub fn with_max_p95_ratio(mut self, ratio: f64) -> Self {
        self.max_p95_ratio = ratio;
        self
    }

    /// p95 differences up to this never fail.
    pub fn with_latency_floor(mut self, floor: Duration) -> Self {
        self.latency_floor = floor;
        self
    }

    /// Judges `canary` against `stable`, counts over the same window (or the stable's longer
    /// one); the slots name them in the verdict.
    pub fn judge(
        &self,
        canary_slot: Slot,
        canary: &SlotCounters,
        stable_slot: Slot,
        stable: &SlotCounters,
    ) -> Verdict {
        let (n1, n2) = (canary.requests, stable.requests);
        if n1 < self.min_samples || n2 < self.min_samples {
            return Verdict::Inconclusive(format!(
                "{n1} requests on {canary_slot} and {n2} on {stable_slot} so far, {} each needed",
                self.min_samples
            ));
        }
        let (x1, x2) = (canary.failed(), stable.failed());
        let z = two_proportion_z(x1, n1, x2, n2);
        let rate = |x: u64, n: u64| 100.0 * x as f64 / n as f64;
        if z > self.z_threshold {
            return Verdict::Fail(format!(
                "error rate of {canary_slot} {:.2}% ({x1}/{n1}) against {stable_slot} {:.2}% \
                 ({x2}/{n2}): z = {z:.2} > {:.2}",
                rate(x1, n1),
                rate(x2, n2),
                self.z_threshold
            ));
        }
        let p95 = |c: &SlotCounters| c.latency.as_ref().and_then(|h| h.quantile(0.95));
        if let (Some(c), Some(s)) = (p95(canary), p95(stable)) {
            let ratio = c.as_secs_f64() / s.as_secs_f64().max(1e-6);
            if ratio > self.max_p95_ratio && c > s + self.latency_floor {
                return Verdict::Fail(format!(
                    "p95 latency of {canary_slot} {c:?} is {ratio:.2} × {stable_slot}'s {s:?} \
                     (at most {:.2} ×)",
                    self.max_p95_ratio
                ));
            }
        }
        Verdict::Pass
    }
}

#[async_trait]
impl Analysis for StatisticalAnalysis {
    fn name(&self) -> &str {
        "statistical"
    }

    fn requires_metrics(&self) -> bool {
        true
    }

    async fn analyze(&self, ctx: &AnalysisContext) -> Result<Verdict> {
        let Some(stable_slot) = ctx.previous.filter(|p| *p != ctx.target) else {
            return Ok(Verdict::Inconclusive(
                "no stable slot to compare the canary with (first deploy)".into(),
            ));
        };
        let now = ctx.switch.counters().await?;
        let Some(base) = ctx.counters_at_step.as_ref() else {
            return Ok(Verdict::Inconclusive(
                "the switch's counters were not read when the step began".into(),
            ));
        };
        let Some(window) = now.since(base) else {
            return Ok(Verdict::Inconclusive(
                "the switch's counters went back (it restarted): comparing from the next step"
                    .into(),
            ));
        };
        let canary = window.slots.get(ctx.target);
        let mut stable = window.slots.get(stable_slot).clone();
        if stable.requests < self.min_samples {
            if let Some(longer) = ctx.counters_at_start.as_ref().and_then(|s| now.since(s)) {
                stable = longer.slots.get(stable_slot).clone();
            }
        }
        Ok(self.judge(ctx.target, canary, stable_slot, &stable))
    }
}

/// What a data-path probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// Whether the response came from the expected release.
    pub matched: bool,
    /// What was seen (a header value or the start of the body).
    pub observed: String,
}

/// Sends a request through the switch's public address and says whether the expected release
/// answered. Proves a switch took effect for clients, not only in the proxy's configuration.
#[async_trait]
pub trait DataPathProbe: Send + Sync + Debug {
    /// The probe's name.
    fn name(&self) -> &str;

    /// One probe.
    async fn probe(&self, expected: &Version) -> Result<ProbeResult>;
}

/// How an HTTP probe recognises the release that answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionMarker {
    /// A response header whose value is the version (e.g. `x-bluegreen-version`).
    Header(String),
    /// The body contains the version string.
    Body,
}

/// `GET url` through the switch, looking for the version in a header or the body (feature
/// `http`, on by default).
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
#[derive(Debug, Clone)]
pub struct HttpVersionProbe {
    url: String,
    marker: VersionMarker,
    client: reqwest::Client,
}

#[cfg(feature = "http")]
impl HttpVersionProbe {
    /// Probes `url` (the switch's public address) for `marker`.
    pub fn new(url: impl Into<String>, marker: VersionMarker) -> Self {
        HttpVersionProbe {
            url: url.into(),
            marker,
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("HTTP client builds"),
        }
    }
}

#[cfg(feature = "http")]
#[async_trait]
impl DataPathProbe for HttpVersionProbe {
    fn name(&self) -> &str {
        "http-probe"
    }

    async fn probe(&self, expected: &Version) -> Result<ProbeResult> {
        let resp = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(|e| Error::backend("http-probe", format!("GET {}", self.url), true, e))?;
        match &self.marker {
            VersionMarker::Header(h) => {
                let observed = resp
                    .headers()
                    .get(h.as_str())
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                Ok(ProbeResult {
                    matched: observed == expected.as_str(),
                    observed: format!("{h}: {observed}"),
                })
            }
            VersionMarker::Body => {
                let body = resp.text().await.map_err(|e| {
                    Error::backend("http-probe", format!("GET {}", self.url), true, e)
                })?;
                Ok(ProbeResult {
                    matched: body.contains(expected.as_str()),
                    observed: body.chars().take(80).collect(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::LatencyHistogram;

    fn slot(requests: u64, app_5xx: u64) -> SlotCounters {
        SlotCounters::counted(requests, 0, 0, app_5xx, 0)
    }

    #[test]
    fn z_values_match_the_hand_computation() {
        // 30/1000 vs 10/1000: p1 = .03, p2 = .01, pooled p = .02;
        // se = sqrt(.02 * .98 * (1/1000 + 1/1000)) = sqrt(.0000392) = .0062610;
        // z = .02 / .0062610 = 3.1944.
        assert!((two_proportion_z(30, 1000, 10, 1000) - 3.1944).abs() < 1e-4);
        // 12/1000 vs 10/1000: p = .011; se = sqrt(.011 * .989 * .002) = .0046646;
        // z = .002 / .0046646 = 0.4288.
        assert!((two_proportion_z(12, 1000, 10, 1000) - 0.4288).abs() < 1e-4);
        // 5/100 vs 20/2000: p = 25/2100 = .0119048; se = sqrt(.0119048 * .9880952 * .0105)
        // = .0111136; z = (.05 - .01) / .0111136 = 3.5992.
        assert!((two_proportion_z(5, 100, 20, 2000) - 3.5992).abs() < 1e-4);
        // 0/500 vs 3/500: p = .003; se = sqrt(.003 * .997 * .004) = .0034583;
        // z = -.006 / .0034583 = -1.7350 (the canary is better: negative).
        assert!((two_proportion_z(0, 500, 3, 500) + 1.7347).abs() < 1e-3);
        // No variance, or nothing to compare.
        assert_eq!(two_proportion_z(0, 100, 0, 100), 0.0);
        assert_eq!(two_proportion_z(100, 100, 50, 50), 0.0);
        assert_eq!(two_proportion_z(1, 0, 0, 10), 0.0);
    }

    #[test]
    fn three_verdicts_from_known_numbers() {
        let a = StatisticalAnalysis::new().with_min_samples(1000);
        let (g, b) = (Slot::Green, Slot::Blue);
        // z = 3.19 > 2.326: fails, naming both rates and z.
        match a.judge(g, &slot(1000, 30), b, &slot(1000, 10)) {
            Verdict::Fail(why) => {
                assert!(why.contains("green 3.00% (30/1000)"), "{why}");
                assert!(why.contains("blue 1.00% (10/1000)"), "{why}");
                assert!(why.contains("z = 3.19 > 2.33"), "{why}");
            }
            v => panic!("expected a failure, got {v:?}"),
        }
        // z = 0.43: no significant difference.
        assert_eq!(
            a.judge(g, &slot(1000, 12), b, &slot(1000, 10)),
            Verdict::Pass
        );
        // The same 3 % on too few requests: keep waiting.
        match a.judge(g, &slot(999, 30), b, &slot(1000, 10)) {
            Verdict::Inconclusive(why) => assert!(why.contains("999 requests on green"), "{why}"),
            v => panic!("expected inconclusive, got {v:?}"),
        }
        // A looser threshold (1.645, 5 %): 5/100 vs 20/2000 (z = 3.60) fails, and with a
        // threshold of 4 it passes.
        let loose = StatisticalAnalysis::new()
            .with_min_samples(100)
            .with_z_threshold(1.645);
        assert!(matches!(
            loose.judge(g, &slot(100, 5), b, &slot(2000, 20)),
            Verdict::Fail(_)
        ));
        let strict = loose.with_z_threshold(4.0);
        assert_eq!(
            strict.judge(g, &slot(100, 5), b, &slot(2000, 20)),
            Verdict::Pass
        );
    }

    #[test]
    fn p95_ratio_fails_above_the_ratio_and_the_floor() {
        let a = StatisticalAnalysis::new().with_min_samples(100);
        let (g, b) = (Slot::Green, Slot::Blue);
        let lat = |ms: u64, slow_ms: u64, slow: u64| {
            LatencyHistogram::from_buckets([(ms * 1000, 100 - slow), (slow_ms * 1000, slow)])
        };
        let stable = slot(100, 0).with_latency(lat(10, 10, 0));
        // p95 of the canary: 10 of 100 at 40 ms → 40 ms = 4 × 10 ms, 30 ms above: fails.
        let slow = slot(100, 0).with_latency(lat(10, 40, 10));
        match a.judge(g, &slow, b, &stable) {
            Verdict::Fail(why) => assert!(why.contains("4.00 ×"), "{why}"),
            v => panic!("expected a failure, got {v:?}"),
        }
        // 4 % slow requests: p95 still 10 ms.
        let fine = slot(100, 0).with_latency(lat(10, 40, 4));
        assert_eq!(a.judge(g, &fine, b, &stable), Verdict::Pass);
        // 3 × but only 2 ms apart (1 ms vs 3 ms): under the 25 ms floor.
        let tiny = slot(100, 0).with_latency(lat(1, 3, 10));
        let tiny_stable = slot(100, 0).with_latency(lat(1, 1, 0));
        assert_eq!(a.judge(g, &tiny, b, &tiny_stable), Verdict::Pass);
    }
}
