//! Post-switch analysis (pass / fail / inconclusive) and data-path probes that prove a switch took
//! effect where clients see it.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

#[cfg(feature = "http")]
use crate::error::Error;
use crate::error::Result;
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
