//! An [`Analysis`] that asks Prometheus: a PromQL query and a success condition on its result.
//!
//! The query runs against the HTTP API (`GET <base>/api/v1/query?query=…`). `{slot}` in the
//! query is replaced by the target slot (`blue` or `green`), so one query follows each canary,
//! e.g. with the embedded proxy's `/metrics` scraped:
//!
//! ```text
//! sum(rate(bluegreen_proxy_failed_requests_total{slot="{slot}"}[1m]))
//!   / sum(rate(bluegreen_proxy_requests_total{slot="{slot}"}[1m]))
//! ```
//!
//! with the condition `result < 0.01`. Every sample of the answer must meet the condition; an
//! empty answer (no data yet) or `NaN` (e.g. 0 / 0) is inconclusive; a failed query is an error
//! naming Prometheus and what it said.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use crate::analysis::{Analysis, AnalysisContext, Verdict};
use crate::error::{Error, Result};
use crate::types::Slot;

/// How a result compares with the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// `<`
    Less,
    /// `<=`
    LessOrEqual,
    /// `>`
    Greater,
    /// `>=`
    GreaterOrEqual,
    /// `==`
    Equal,
    /// `!=`
    NotEqual,
}

impl Comparison {
    fn as_str(self) -> &'static str {
        match self {
            Comparison::Less => "<",
            Comparison::LessOrEqual => "<=",
            Comparison::Greater => ">",
            Comparison::GreaterOrEqual => ">=",
            Comparison::Equal => "==",
            Comparison::NotEqual => "!=",
        }
    }
}

/// A success condition: `result <op> <number>`, e.g. `result < 0.01`.
///
/// ```
/// use bluegreen_core::prometheus::Condition;
/// let c: Condition = "result < 0.01".parse().unwrap();
/// assert!(c.holds(0.005) && !c.holds(0.02));
/// assert!("result <> 1".parse::<Condition>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Condition {
    /// The comparison.
    pub op: Comparison,
    /// The threshold.
    pub threshold: f64,
}

impl Condition {
    /// Whether `value` meets the condition (`NaN` never does).
    pub fn holds(&self, value: f64) -> bool {
        let t = self.threshold;
        match self.op {
            Comparison::Less => value < t,
            Comparison::LessOrEqual => value <= t,
            Comparison::Greater => value > t,
            Comparison::GreaterOrEqual => value >= t,
            Comparison::Equal => value == t,
            Comparison::NotEqual => !value.is_nan() && value != t,
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "result {} {}", self.op.as_str(), self.threshold)
    }
}

impl FromStr for Condition {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::invalid(
                "prometheus condition",
                s,
                format!("{why}; expected `result <op> <number>` with <op> one of < <= > >= == !="),
            )
        };
        let rest = s
            .trim()
            .strip_prefix("result")
            .ok_or_else(|| bad("it must start with `result`"))?
            .trim_start();
        let (op, number) = [
            ("<=", Comparison::LessOrEqual),
            (">=", Comparison::GreaterOrEqual),
            ("==", Comparison::Equal),
            ("!=", Comparison::NotEqual),
            ("<", Comparison::Less),
            (">", Comparison::Greater),
        ]
        .iter()
        .find_map(|(text, op)| rest.strip_prefix(text).map(|n| (*op, n.trim())))
        .ok_or_else(|| bad("unknown comparison"))?;
        let threshold: f64 = number
            .parse()
            .map_err(|_| bad("the threshold is not a number"))?;
        if !threshold.is_finite() {
            return Err(bad("the threshold must be finite"));
        }
        Ok(Condition { op, threshold })
    }
}

/// A PromQL query judged by a [`Condition`], against Prometheus's HTTP API.
///
/// ```
/// use bluegreen_core::prometheus::PrometheusAnalysis;
/// let a = PrometheusAnalysis::new(
///     "http://127.0.0.1:9090",
///     r#"sum(bluegreen_proxy_failed_requests_total{slot="{slot}"}) / sum(bluegreen_proxy_requests_total{slot="{slot}"})"#,
///     "result < 0.01",
/// )
/// .unwrap();
/// # let _ = a;
/// ```
#[derive(Debug, Clone)]
pub struct PrometheusAnalysis {
    base: String,
    query: String,
    condition: Condition,
    client: reqwest::Client,
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum Data {
    Vector(Vec<Sample>),
    Scalar((f64, String)),
    Matrix(serde_json::Value),
    String(serde_json::Value),
}

#[derive(Deserialize)]
struct Sample {
    #[serde(default)]
    metric: std::collections::BTreeMap<String, String>,
    value: (f64, String),
}

impl PrometheusAnalysis {
    /// Queries the Prometheus at `base_url` (e.g. `http://127.0.0.1:9090`) with `query` and
    /// judges the result with `condition` (e.g. `result < 0.01`).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a URL that is not `http(s)://`, an empty query or a malformed
    /// condition.
    pub fn new(
        base_url: impl Into<String>,
        query: impl Into<String>,
        condition: &str,
    ) -> Result<Self> {
        let base = base_url.into().trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(Error::invalid(
                "prometheus URL",
                base,
                "expected http:// or https://",
            ));
        }
        let query = query.into();
        if query.trim().is_empty() {
            return Err(Error::invalid("prometheus query", "", "the query is empty"));
        }
        let condition = condition.parse()?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::backend("prometheus", "building the HTTP client", false, e))?;
        Ok(PrometheusAnalysis {
            base,
            query,
            condition,
            client,
        })
    }

    /// The query as sent for `slot`.
    pub fn query_for(&self, slot: Slot) -> String {
        self.query.replace("{slot}", slot.as_str())
    }

    /// The condition.
    pub fn condition(&self) -> Condition {
        self.condition
    }

    /// Runs the query for `target` and judges it.
    ///
    /// # Errors
    /// [`Error::Backend`] (backend `prometheus`) when Prometheus cannot be reached or refuses
    /// the query (its message is kept).
    pub async fn evaluate(&self, target: Slot) -> Result<Verdict> {
        let query = self.query_for(target);
        let url = format!("{}/api/v1/query", self.base);
        let what = format!("query {query:?} at {url}");
        let fail =
            |retryable: bool, e: String| Error::backend("prometheus", what.clone(), retryable, e);
        let resp = self
            .client
            .get(&url)
            .query(&[("query", query.as_str())])
            .send()
            .await
            .map_err(|e| Error::backend("prometheus", what.clone(), true, e))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Error::backend("prometheus", what.clone(), true, e))?;
        let answer: Answer = serde_json::from_slice(&bytes).map_err(|e| {
            fail(
                status.is_server_error(),
                format!("HTTP {status}, not a Prometheus API answer: {e}"),
            )
        })?;
        if answer.status != "success" {
            return Err(fail(
                status.is_server_error(),
                format!(
                    "HTTP {status}: {}",
                    answer.error.unwrap_or_else(|| "no error message".into())
                ),
            ));
        }
        let values: Vec<(String, f64)> = match answer.data {
            Some(Data::Vector(samples)) => samples
                .into_iter()
                .map(|s| {
                    let labels: Vec<String> =
                        s.metric.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
                    (format!("{{{}}}", labels.join(",")), parse_value(&s.value.1))
                })
                .collect(),
            Some(Data::Scalar((_, v))) => vec![("scalar".into(), parse_value(&v))],
            other => {
                let got = match other {
                    Some(Data::Matrix(v)) => format!("a range vector {v}"),
                    Some(Data::String(v)) => format!("a string {v}"),
                    _ => "no data field".into(),
                };
                let got: String = got.chars().take(200).collect();
                return Err(fail(
                    false,
                    format!("the query must give an instant vector or a scalar, not {got}"),
                ));
            }
        };
        if values.is_empty() {
            return Ok(Verdict::Inconclusive(format!(
                "Prometheus has no data for {query:?} yet"
            )));
        }
        if let Some((series, _)) = values.iter().find(|(_, v)| v.is_nan()) {
            return Ok(Verdict::Inconclusive(format!(
                "{query:?} is NaN for {series} (no requests yet?)"
            )));
        }
        let failing: Vec<String> = values
            .iter()
            .filter(|(_, v)| !self.condition.holds(*v))
            .map(|(series, v)| format!("{series} = {v}"))
            .collect();
        if failing.is_empty() {
            Ok(Verdict::Pass)
        } else {
            Ok(Verdict::Fail(format!(
                "{query:?} does not meet `{}`: {}",
                self.condition,
                failing.join(", ")
            )))
        }
    }
}

/// Prometheus writes sample values as strings (`"0.5"`, `"NaN"`, `"+Inf"`).
fn parse_value(v: &str) -> f64 {
    match v {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or(f64::NAN),
    }
}

#[async_trait]
impl Analysis for PrometheusAnalysis {
    fn name(&self) -> &str {
        "prometheus"
    }

    async fn analyze(&self, ctx: &AnalysisContext) -> Result<Verdict> {
        self.evaluate(ctx.target).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_parse_and_judge() {
        for (text, yes, no) in [
            ("result < 0.01", 0.0, 0.01),
            ("result<=1", 1.0, 1.5),
            (" result > 5 ", 6.0, 5.0),
            ("result >= 0.5", 0.5, 0.4),
            ("result == 0", 0.0, 0.1),
            ("result != 0", 1.0, 0.0),
        ] {
            let c: Condition = text.parse().unwrap();
            assert!(c.holds(yes), "{text} with {yes}");
            assert!(!c.holds(no), "{text} with {no}");
            assert!(!c.holds(f64::NAN), "{text} with NaN");
        }
        for bad in [
            "",
            "x < 1",
            "result",
            "result ~ 1",
            "result < one",
            "result < inf",
        ] {
            let err = bad.parse::<Condition>().unwrap_err();
            assert!(matches!(err, Error::InvalidInput { .. }), "{bad}: {err}");
            assert!(err.to_string().contains("result <op> <number>"), "{err}");
        }
        assert_eq!(
            "result<0.01".parse::<Condition>().unwrap().to_string(),
            "result < 0.01"
        );
    }

    #[test]
    fn the_slot_is_substituted_and_bad_settings_are_refused() {
        let a = PrometheusAnalysis::new("http://p:9090/", r#"up{slot="{slot}"}"#, "result > 0")
            .unwrap();
        assert_eq!(a.query_for(Slot::Green), r#"up{slot="green"}"#);
        assert!(PrometheusAnalysis::new("p:9090", "up", "result > 0").is_err());
        assert!(PrometheusAnalysis::new("http://p", " ", "result > 0").is_err());
        assert!(PrometheusAnalysis::new("http://p", "up", "up > 0").is_err());
    }
}
