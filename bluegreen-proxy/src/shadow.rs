//! Shadow traffic: while preview routing points at the idle slot, a share of live requests is
//! mirrored to it and the answers are compared with the live ones. The client only ever gets the
//! live answer: the copy runs in its own task, bounded in concurrency and time.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bluegreen_core::analysis::{Analysis, AnalysisContext, Verdict};
use bluegreen_core::{Error, Result};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{HeaderMap, HeaderName};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Semaphore};

/// Settings of shadow traffic ([`ProxyConfig::shadow`](crate::ProxyConfig::shadow)).
///
/// While preview routing is on (the engine turns it on for the target before the switch, with
/// `Policy::preview`), `percent` % of the live requests whose method is in `methods` and that
/// carry no body are sent to the preview slot too. The client gets the live answer only; the
/// shadow answer is compared with it: the status, the headers (but `date`, hop-by-hop headers,
/// `content-length` and `ignore_headers`) and, with `compare_bodies`, the bodies (as JSON
/// without the `ignore_json_fields` keys at any depth when both parse as JSON, else byte for
/// byte). [`ProxySwitch::shadow_report`](crate::ProxySwitch::shadow_report) says how it went.
///
/// ```
/// use bluegreen_proxy::{ProxyConfig, ShadowConfig};
///
/// let config: ProxyConfig = serde_json::from_str(
///     r#"{ "shadow": { "percent": 20, "compare_bodies": true,
///                      "ignore_headers": ["x-bluegreen-version", "x-bluegreen-slot"],
///                      "ignore_json_fields": ["generated_at"] } }"#,
/// ).unwrap();
/// let shadow = config.shadow.unwrap();
/// assert_eq!(shadow.percent, 20);
/// assert_eq!(shadow.methods, ["GET", "HEAD", "OPTIONS"]);
/// assert!(serde_json::from_str::<ProxyConfig>(r#"{ "shadow": { "percent": 0 } }"#).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ShadowConfig {
    /// Share of the eligible requests mirrored, 1 to 100 (default 10). Deterministic: of the
    /// first `n` eligible requests, `floor(n * percent / 100)` are mirrored.
    pub percent: u8,
    /// Methods mirrored (default the safe ones: `GET`, `HEAD`, `OPTIONS`). A method with side
    /// effects is refused: the idle slot may share the live database.
    pub methods: Vec<String>,
    /// Most shadow requests at once (default 16); an eligible request finding them all busy is
    /// not mirrored (counted as skipped).
    pub max_concurrent: usize,
    /// Bound on a shadow request, answer and body included (default 5 s).
    #[serde(with = "bluegreen_core::config::duration")]
    pub timeout: Duration,
    /// Compare bodies too (default false: status and headers only).
    pub compare_bodies: bool,
    /// Largest body compared (default 256 KiB); larger ones are compared by status and headers.
    pub max_body_bytes: usize,
    /// Response headers not compared (case-insensitive), besides `date`, `content-length` and
    /// hop-by-hop headers.
    pub ignore_headers: Vec<String>,
    /// JSON object keys ignored at any depth when comparing JSON bodies (e.g. timestamps).
    pub ignore_json_fields: Vec<String>,
    /// Mismatches kept as examples in the report (default 5).
    pub examples: usize,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        ShadowConfig {
            percent: 10,
            methods: vec!["GET".into(), "HEAD".into(), "OPTIONS".into()],
            max_concurrent: 16,
            timeout: Duration::from_secs(5),
            compare_bodies: false,
            max_body_bytes: 256 * 1024,
            ignore_headers: Vec::new(),
            ignore_json_fields: Vec::new(),
            examples: 5,
        }
    }
}

/// Methods that never change anything on the server (RFC 9110 §9.2.1).
const SAFE: [&str; 4] = ["GET", "HEAD", "OPTIONS", "TRACE"];

impl ShadowConfig {
    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field: `percent` outside 1..=100, an unsafe or
    /// malformed method, no method, `max_concurrent` or `max_body_bytes` of 0, a zero timeout,
    /// a malformed header name.
    pub fn validate(&self) -> Result<()> {
        if !(1..=100).contains(&self.percent) {
            return Err(Error::invalid(
                "shadow.percent",
                self.percent.to_string(),
                "must be 1 to 100",
            ));
        }
        if self.methods.is_empty() {
            return Err(Error::invalid(
                "shadow.methods",
                "[]",
                "name at least one method",
            ));
        }
        for m in &self.methods {
            if !SAFE.contains(&m.as_str()) {
                return Err(Error::invalid(
                    "shadow.methods",
                    m,
                    "only safe methods (GET, HEAD, OPTIONS, TRACE) are mirrored: the idle slot may share the live database",
                ));
            }
        }
        if self.max_concurrent == 0 {
            return Err(Error::invalid(
                "shadow.max_concurrent",
                "0",
                "must be at least 1",
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(Error::invalid(
                "shadow.max_body_bytes",
                "0",
                "must be at least 1",
            ));
        }
        if self.timeout.is_zero() {
            return Err(Error::invalid("shadow.timeout", "0", "must be more than 0"));
        }
        for h in &self.ignore_headers {
            HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                Error::invalid("shadow.ignore_headers", h, "not a valid HTTP header name")
            })?;
        }
        Ok(())
    }

    /// With this share of eligible requests mirrored (1 to 100).
    pub fn with_percent(mut self, percent: u8) -> Self {
        self.percent = percent;
        self
    }

    /// With bodies compared.
    pub fn with_compare_bodies(mut self, yes: bool) -> Self {
        self.compare_bodies = yes;
        self
    }

    /// With these response headers not compared.
    pub fn with_ignore_headers<S: Into<String>>(
        mut self,
        names: impl IntoIterator<Item = S>,
    ) -> Self {
        self.ignore_headers = names.into_iter().map(Into::into).collect();
        self
    }

    /// With these JSON keys ignored at any depth.
    pub fn with_ignore_json_fields<S: Into<String>>(
        mut self,
        names: impl IntoIterator<Item = S>,
    ) -> Self {
        self.ignore_json_fields = names.into_iter().map(Into::into).collect();
        self
    }

    /// With the bound on a shadow request.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// With the most shadow requests at once.
    pub fn with_max_concurrent(mut self, max: usize) -> Self {
        self.max_concurrent = max;
        self
    }
}

/// One answer that differed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ShadowMismatch {
    /// The request's method.
    pub method: String,
    /// The request's path (without the query, which may carry secrets).
    pub path: String,
    /// The live answer's status.
    pub live_status: u16,
    /// The shadow answer's status.
    pub shadow_status: u16,
    /// What differed first.
    pub detail: String,
}

/// How shadow traffic went since the proxy started (or since preview last turned on).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ShadowReport {
    /// Requests mirrored to the preview slot.
    pub mirrored: u64,
    /// Shadow answers compared with the live ones.
    pub compared: u64,
    /// Compared answers that differed.
    pub mismatched: u64,
    /// Shadow requests that failed or timed out (the client never noticed).
    pub shadow_errors: u64,
    /// Eligible requests not mirrored because `max_concurrent` shadow requests were running.
    pub skipped_busy: u64,
    /// The first mismatches (at most `examples`).
    pub examples: Vec<ShadowMismatch>,
}

impl ShadowReport {
    /// `mismatched / compared`; `None` before anything was compared (never a fake 0).
    pub fn mismatch_rate(&self) -> Option<f64> {
        (self.compared > 0).then(|| self.mismatched as f64 / self.compared as f64)
    }
}

/// The live answer, as the comparison needs it.
pub(crate) struct LiveAnswer {
    status: StatusCode,
    headers: HeaderMap,
    /// `None` when bodies are not compared or it was larger than `max_body_bytes`.
    body: Option<Bytes>,
}

/// Copies the live body as it streams to the client (bounded), then hands the answer over.
pub(crate) struct Tee {
    tx: Option<oneshot::Sender<LiveAnswer>>,
    status: StatusCode,
    headers: HeaderMap,
    body: Option<BytesMut>,
    limit: usize,
}

impl Tee {
    pub(crate) fn data(&mut self, chunk: &[u8]) {
        if let Some(b) = &mut self.body {
            if b.len() + chunk.len() > self.limit {
                self.body = None;
            } else {
                b.extend_from_slice(chunk);
            }
        }
    }

    /// The live body ended: the comparison may run.
    pub(crate) fn finish(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(LiveAnswer {
                status: self.status,
                headers: std::mem::take(&mut self.headers),
                body: self.body.take().map(BytesMut::freeze),
            });
        }
    }
}

/// Shadow traffic state of one proxy.
pub(crate) struct Shadow {
    config: ShadowConfig,
    client: Client<HttpConnector, Empty<Bytes>>,
    permits: Arc<Semaphore>,
    eligible: AtomicU64,
    report: Mutex<ShadowReport>,
    ignore_headers: HashSet<HeaderName>,
}

impl Shadow {
    pub(crate) fn new(config: ShadowConfig, connect_timeout: Duration) -> Arc<Self> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout.min(config.timeout)));
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .build(http);
        let mut ignore: HashSet<HeaderName> = [
            "date",
            "content-length",
            "connection",
            "keep-alive",
            "transfer-encoding",
        ]
        .iter()
        .map(|h| HeaderName::from_static(h))
        .collect();
        ignore.extend(
            config
                .ignore_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok()),
        );
        Arc::new(Shadow {
            permits: Arc::new(Semaphore::new(config.max_concurrent)),
            config,
            client,
            eligible: AtomicU64::new(0),
            report: Mutex::new(ShadowReport::default()),
            ignore_headers: ignore,
        })
    }

    fn report(&self) -> std::sync::MutexGuard<'_, ShadowReport> {
        self.report.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn snapshot(&self) -> ShadowReport {
        self.report().clone()
    }

    pub(crate) fn reset(&self) {
        *self.report() = ShadowReport::default();
        self.eligible.store(0, Ordering::Relaxed);
    }

    /// If this request is to be mirrored, starts the shadow request (to `target`, an upstream
    /// base URI of the preview slot) and returns the sender the live answer goes to.
    pub(crate) fn mirror(
        self: &Arc<Self>,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body_empty: bool,
        target: Uri,
    ) -> Option<TeeStart> {
        if !body_empty || !self.config.methods.iter().any(|m| m == method.as_str()) {
            return None;
        }
        let n = self.eligible.fetch_add(1, Ordering::Relaxed) + 1;
        let pick = |k: u64| k * u64::from(self.config.percent) / 100;
        if pick(n) == pick(n - 1) {
            return None;
        }
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            self.report().skipped_busy += 1;
            return None;
        };
        self.report().mirrored += 1;
        let mut req = Request::new(Empty::<Bytes>::new());
        *req.method_mut() = method.clone();
        *req.uri_mut() = target;
        *req.headers_mut() = headers.clone();
        let (tx, rx) = oneshot::channel();
        let shadow = Arc::clone(self);
        let path = uri.path().to_string();
        let method = method.to_string();
        tokio::spawn(async move {
            let _permit = permit;
            shadow.compare(req, rx, method, path).await;
        });
        Some(TeeStart {
            tx,
            compare_bodies: self.config.compare_bodies,
            limit: self.config.max_body_bytes,
        })
    }

    async fn compare(
        &self,
        req: Request<Empty<Bytes>>,
        live: oneshot::Receiver<LiveAnswer>,
        method: String,
        path: String,
    ) {
        let cfg = &self.config;
        let shadow = tokio::time::timeout(cfg.timeout, async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let (parts, body) = resp.into_parts();
            let body = if cfg.compare_bodies {
                Limited::new(body, cfg.max_body_bytes)
                    .collect()
                    .await
                    .ok()
                    .map(|c| c.to_bytes())
            } else {
                None
            };
            Ok::<_, String>((parts.status, parts.headers, body))
        })
        .await;
        let (status, headers, body) = match shadow {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "shadow request failed");
                self.report().shadow_errors += 1;
                return;
            }
            Err(_) => {
                self.report().shadow_errors += 1;
                return;
            }
        };
        // The live answer ends when its body has gone to the client; a client that went away
        // leaves nothing to compare.
        let Ok(Ok(live)) = tokio::time::timeout(cfg.timeout, live).await else {
            return;
        };
        let differs = self.difference(&live, status, &headers, body.as_ref());
        let mut r = self.report();
        r.compared += 1;
        if let Some(detail) = differs {
            r.mismatched += 1;
            if r.examples.len() < cfg.examples {
                r.examples.push(ShadowMismatch {
                    method,
                    path,
                    live_status: live.status.as_u16(),
                    shadow_status: status.as_u16(),
                    detail,
                });
            }
        }
    }

    /// What differs first between the live and the shadow answer, if anything.
    fn difference(
        &self,
        live: &LiveAnswer,
        status: StatusCode,
        headers: &HeaderMap,
        body: Option<&Bytes>,
    ) -> Option<String> {
        if live.status != status {
            return Some(format!(
                "status {} vs {}",
                live.status.as_u16(),
                status.as_u16()
            ));
        }
        let names: BTreeSet<&str> = live
            .headers
            .keys()
            .chain(headers.keys())
            .filter(|n| !self.ignore_headers.contains(*n))
            .map(HeaderName::as_str)
            .collect();
        for name in names {
            let a: Vec<_> = live.headers.get_all(name).iter().collect();
            let b: Vec<_> = headers.get_all(name).iter().collect();
            if a != b {
                return Some(format!("header {name}: {a:?} vs {b:?}"));
            }
        }
        if !self.config.compare_bodies {
            return None;
        }
        let (Some(a), Some(b)) = (&live.body, body) else {
            // Larger than max_body_bytes on either side: not compared.
            return None;
        };
        match (
            serde_json::from_slice::<serde_json::Value>(a),
            serde_json::from_slice::<serde_json::Value>(b),
        ) {
            (Ok(mut x), Ok(mut y)) => {
                strip(&mut x, &self.config.ignore_json_fields);
                strip(&mut y, &self.config.ignore_json_fields);
                (x != y).then(|| {
                    format!(
                        "JSON body: {} vs {}",
                        clip(&x.to_string()),
                        clip(&y.to_string())
                    )
                })
            }
            _ => (a != b).then(|| {
                format!(
                    "body ({} vs {} bytes): {:?} vs {:?}",
                    a.len(),
                    b.len(),
                    clip(&String::from_utf8_lossy(a)),
                    clip(&String::from_utf8_lossy(b))
                )
            }),
        }
    }
}

/// What the live path keeps to tee the live answer.
pub(crate) struct TeeStart {
    tx: oneshot::Sender<LiveAnswer>,
    compare_bodies: bool,
    limit: usize,
}

impl TeeStart {
    /// The tee for the live answer with this status and headers.
    pub(crate) fn tee(self, status: StatusCode, headers: &HeaderMap) -> Tee {
        Tee {
            tx: Some(self.tx),
            status,
            headers: headers.clone(),
            body: self.compare_bodies.then(BytesMut::new),
            limit: self.limit,
        }
    }
}

/// The shadow traffic mismatch rate as an analysis input: fails a deployment whose preview slot
/// answered differently from the live one too often, naming examples.
///
/// Reads [`ProxySwitch::shadow_report`](crate::ProxySwitch::shadow_report), which keeps what
/// was mirrored while preview routing was on (before the switch). Fewer than `min_compared`
/// comparisons is inconclusive, never a pass.
///
/// ```no_run
/// # async fn f(proxy: bluegreen_proxy::ProxySwitch) -> bluegreen_core::Result<()> {
/// use std::sync::Arc;
/// use bluegreen_proxy::ShadowAnalysis;
///
/// let analysis = ShadowAnalysis::new(proxy.clone(), 0.01).with_min_compared(50);
/// let deployer = bluegreen_core::Deployer::builder()
///     .switch(Arc::new(proxy))
///     .analysis(Arc::new(analysis));
/// # let _ = deployer; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ShadowAnalysis {
    proxy: crate::ProxySwitch,
    max_mismatch_rate: f64,
    min_compared: u64,
}

impl ShadowAnalysis {
    /// Fails above `max_mismatch_rate` (0 to 1) of compared answers differing.
    pub fn new(proxy: crate::ProxySwitch, max_mismatch_rate: f64) -> Self {
        ShadowAnalysis {
            proxy,
            max_mismatch_rate: max_mismatch_rate.clamp(0.0, 1.0),
            min_compared: 20,
        }
    }

    /// With the fewest comparisons for a verdict (default 20).
    pub fn with_min_compared(mut self, n: u64) -> Self {
        self.min_compared = n;
        self
    }

    /// The verdict on `report`.
    pub fn verdict(&self, report: Option<&ShadowReport>) -> Verdict {
        let Some(r) = report else {
            return Verdict::Inconclusive("shadow traffic is not configured on the proxy".into());
        };
        if r.compared < self.min_compared {
            return Verdict::Inconclusive(format!(
                "shadow traffic: {} of {} answers needed compared ({} mirrored, {} shadow errors)",
                r.compared, self.min_compared, r.mirrored, r.shadow_errors
            ));
        }
        let rate = r.mismatch_rate().unwrap_or(0.0);
        if rate > self.max_mismatch_rate {
            let examples: Vec<String> = r
                .examples
                .iter()
                .map(|e| format!("{} {}: {}", e.method, e.path, e.detail))
                .collect();
            return Verdict::Fail(format!(
                "shadow traffic: {} of {} answers of the new release differed ({:.1} % > {:.1} %), e.g. {}",
                r.mismatched,
                r.compared,
                rate * 100.0,
                self.max_mismatch_rate * 100.0,
                examples.join("; ")
            ));
        }
        Verdict::Pass
    }
}

#[async_trait::async_trait]
impl Analysis for ShadowAnalysis {
    fn name(&self) -> &str {
        "shadow"
    }

    async fn analyze(&self, _ctx: &AnalysisContext) -> Result<Verdict> {
        Ok(self.verdict(self.proxy.shadow_report().as_ref()))
    }
}

fn strip(v: &mut serde_json::Value, keys: &[String]) {
    match v {
        serde_json::Value::Object(map) => {
            for k in keys {
                map.remove(k);
            }
            for x in map.values_mut() {
                strip(x, keys);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|x| strip(x, keys)),
        _ => {}
    }
}

fn clip(s: &str) -> String {
    const MAX: usize = 120;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shadow(config: ShadowConfig) -> Arc<Shadow> {
        Shadow::new(config, Duration::from_secs(1))
    }

    fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> LiveAnswer {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        LiveAnswer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: h,
            body: Some(Bytes::from(body.to_string())),
        }
    }

    fn diff(s: &Shadow, a: &LiveAnswer, b: &LiveAnswer) -> Option<String> {
        s.difference(a, b.status, &b.headers, b.body.as_ref())
    }

    #[test]
    fn answers_are_compared_with_the_ignore_rules() {
        let s = shadow(
            ShadowConfig::default()
                .with_compare_bodies(true)
                .with_ignore_headers(["X-Version"])
                .with_ignore_json_fields(["at"]),
        );
        let live = answer(
            200,
            &[("x-version", "1"), ("date", "a")],
            r#"{"n":1,"meta":{"at":5}}"#,
        );
        let same = answer(
            200,
            &[("x-version", "2"), ("date", "b")],
            r#"{"meta":{"at":9},"n":1}"#,
        );
        assert_eq!(diff(&s, &live, &same), None);
        let other = answer(200, &[], r#"{"n":2,"meta":{"at":5}}"#);
        assert!(diff(&s, &live, &other).unwrap().starts_with("JSON body"));
        let status = answer(500, &[], r#"{"n":1}"#);
        assert_eq!(diff(&s, &live, &status).unwrap(), "status 200 vs 500");
        let header = answer(200, &[("x-version", "1"), ("x-new", "y")], r#"{"n":1}"#);
        assert!(diff(&s, &live, &header)
            .unwrap()
            .starts_with("header x-new"));
        let text = answer(200, &[], "plain");
        let text2 = answer(200, &[], "plain!");
        assert!(diff(&s, &text, &text2)
            .unwrap()
            .starts_with("body (5 vs 6 bytes)"));
        // Bodies are not compared unless asked.
        let s = shadow(ShadowConfig::default().with_ignore_headers(["x-version"]));
        assert_eq!(diff(&s, &live, &other), None);
    }

    #[test]
    fn the_config_is_validated_naming_the_field() {
        assert!(ShadowConfig::default().validate().is_ok());
        let bad = [
            (ShadowConfig::default().with_percent(0), "shadow.percent"),
            (ShadowConfig::default().with_percent(101), "shadow.percent"),
            (
                ShadowConfig::default().with_max_concurrent(0),
                "shadow.max_concurrent",
            ),
            (
                ShadowConfig::default().with_timeout(Duration::ZERO),
                "shadow.timeout",
            ),
            (
                ShadowConfig::default().with_ignore_headers(["a b"]),
                "shadow.ignore_headers",
            ),
            (
                ShadowConfig {
                    methods: vec!["POST".into()],
                    ..ShadowConfig::default()
                },
                "shadow.methods",
            ),
        ];
        for (c, field) in bad {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    #[tokio::test]
    async fn the_analysis_needs_enough_comparisons_and_names_examples() {
        let proxy = crate::ProxySwitch::bind(crate::ProxyConfig::default())
            .await
            .unwrap();
        let a = ShadowAnalysis::new(proxy, 0.1).with_min_compared(10);
        assert!(matches!(a.verdict(None), Verdict::Inconclusive(_)));
        let mut r = ShadowReport {
            compared: 9,
            ..ShadowReport::default()
        };
        assert!(matches!(a.verdict(Some(&r)), Verdict::Inconclusive(_)));
        r.compared = 10;
        r.mismatched = 1;
        assert_eq!(a.verdict(Some(&r)), Verdict::Pass);
        r.mismatched = 2;
        r.examples.push(ShadowMismatch {
            method: "GET".into(),
            path: "/cart".into(),
            live_status: 200,
            shadow_status: 500,
            detail: "status 200 vs 500".into(),
        });
        match a.verdict(Some(&r)) {
            Verdict::Fail(why) => assert!(
                why.contains("2 of 10") && why.contains("GET /cart: status 200 vs 500"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_share_is_exact() {
        let s = shadow(
            ShadowConfig::default()
                .with_percent(25)
                .with_max_concurrent(100),
        );
        let target: Uri = "http://127.0.0.1:9/".parse().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let picked = (0..100)
                .filter(|_| {
                    s.mirror(
                        &Method::GET,
                        &target,
                        &HeaderMap::new(),
                        true,
                        target.clone(),
                    )
                    .is_some()
                })
                .count();
            assert_eq!(picked, 25);
            // Unsafe methods and requests with a body are never mirrored.
            assert!(s
                .mirror(
                    &Method::POST,
                    &target,
                    &HeaderMap::new(),
                    true,
                    target.clone()
                )
                .is_none());
            assert!(s
                .mirror(
                    &Method::GET,
                    &target,
                    &HeaderMap::new(),
                    false,
                    target.clone()
                )
                .is_none());
        });
    }
}
