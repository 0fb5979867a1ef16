//! Health checks: HTTP, TCP connect, command, and combinators.

#[cfg(feature = "http")]
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::traits::{HealthCheck, HealthReport};
use crate::types::Endpoint;

/// HTTP check (feature `http`, on by default): `GET <endpoint><path>`, expecting a status, optionally a body substring and a latency
/// bound, with extra headers (e.g. `Host`).
///
/// ```
/// use std::time::Duration;
/// use bluegreen_core::health::HttpCheck;
/// let check = HttpCheck::new("/health")
///     .with_status(200)
///     .with_body_contains("ok")
///     .with_max_latency(Duration::from_secs(5))
///     .with_header("Host", "app.example.com");
/// # let _ = check;
/// ```
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
#[derive(Clone)]
pub struct HttpCheck {
    name: String,
    path: String,
    status: u16,
    body_contains: Option<String>,
    max_latency: Option<Duration>,
    timeout: Duration,
    headers: Vec<(String, String)>,
    client: reqwest::Client,
}

#[cfg(feature = "http")]
impl fmt::Debug for HttpCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCheck")
            .field("path", &self.path)
            .field("status", &self.status)
            .field("body_contains", &self.body_contains)
            .field("max_latency", &self.max_latency)
            .field("timeout", &self.timeout)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[cfg(feature = "http")]
impl HttpCheck {
    /// A check of `path`, expecting 200 within 5 s.
    pub fn new(path: impl Into<String>) -> Self {
        let path = path.into();
        HttpCheck {
            name: format!("http {path}"),
            path,
            status: 200,
            body_contains: None,
            max_latency: None,
            timeout: Duration::from_secs(5),
            headers: Vec::new(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .build()
                .expect("HTTP client builds"),
        }
    }

    /// Expected status (default 200).
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// The body must contain this text.
    pub fn with_body_contains(mut self, text: impl Into<String>) -> Self {
        self.body_contains = Some(text.into());
        self
    }

    /// Slower answers count as unhealthy.
    pub fn with_max_latency(mut self, bound: Duration) -> Self {
        self.max_latency = Some(bound);
        self
    }

    /// Bound on one request (default 5 s).
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// An extra request header (its value is not shown in `Debug`: it may be a token).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Checks what could never work: a path that is not a request target, a status outside
    /// 100..=599, a header name or value HTTP cannot carry. Without it such a check fails only
    /// when the readiness timeout runs out.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field.
    pub fn validate(&self) -> Result<()> {
        validate_http_path("path", &self.path)?;
        validate_http_status("status", self.status)?;
        for (k, v) in &self.headers {
            validate_http_header("headers", k, Some(v))?;
        }
        Ok(())
    }
}

/// Checks that `path` is an HTTP request target: it starts with `/` and holds no whitespace or
/// control characters (a CR/LF would split the request). `field` names it in the error.
///
/// # Errors
/// [`Error::InvalidInput`] naming `field`.
pub fn validate_http_path(field: &'static str, path: &str) -> Result<()> {
    if !path.starts_with('/') {
        return Err(Error::invalid(field, path, "must start with `/`"));
    }
    if path.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Error::invalid(
            field,
            path.escape_debug().to_string(),
            "must not contain spaces or control characters (CR, LF, ...)",
        ));
    }
    Ok(())
}

/// Checks that `status` is an HTTP status code (100..=599). `field` names it in the error.
///
/// # Errors
/// [`Error::InvalidInput`] naming `field`.
pub fn validate_http_status(field: &'static str, status: u16) -> Result<()> {
    if !(100..=599).contains(&status) {
        return Err(Error::invalid(
            field,
            status.to_string(),
            "must be an HTTP status between 100 and 599",
        ));
    }
    Ok(())
}

/// Checks that `name` (and `value`, when given) can be sent as an HTTP header: a token name, a
/// value without CR, LF or NUL. The value is never shown in the error: it may be a token.
///
/// # Errors
/// [`Error::InvalidInput`] naming `field`.
pub fn validate_http_header(field: &'static str, name: &str, value: Option<&str>) -> Result<()> {
    if !is_header_name(name) {
        return Err(Error::invalid(
            field,
            name.escape_debug().to_string(),
            "is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only)",
        ));
    }
    if let Some(v) = value {
        if !is_header_value(v) {
            return Err(Error::invalid(
                field,
                name,
                "the header's value must be visible ASCII, without CR, LF or NUL",
            ));
        }
    }
    Ok(())
}

/// An HTTP header name: one or more token characters (RFC 9110 `tchar`), as `http`'s
/// `HeaderName` accepts them.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// An HTTP header value as `http`'s `HeaderValue::from_str` accepts it: visible ASCII, spaces,
/// tabs and non-ASCII bytes (RFC 9110 `obs-text`); no CR, LF, NUL, DEL or other control
/// characters.
fn is_header_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

#[cfg(feature = "http")]
#[async_trait]
impl HealthCheck for HttpCheck {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self, endpoint: &Endpoint) -> Result<HealthReport> {
        let url = endpoint.url(&self.path);
        let mut req = self.client.get(&url).timeout(self.timeout);
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let start = Instant::now();
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let why = if e.is_timeout() {
                    format!("GET {url}: no answer within {:?}", self.timeout)
                } else if e.is_connect() {
                    format!("GET {url}: connection refused or unreachable")
                } else {
                    format!("GET {url}: {e}")
                };
                return Ok(HealthReport::unhealthy(why, start.elapsed()));
            }
        };
        let status = resp.status().as_u16();
        let body = if self.body_contains.is_some() {
            match resp.text().await {
                Ok(b) => b,
                Err(e) => {
                    return Ok(HealthReport::unhealthy(
                        format!("GET {url}: reading the body failed: {e}"),
                        start.elapsed(),
                    ))
                }
            }
        } else {
            String::new()
        };
        let latency = start.elapsed();
        if status != self.status {
            return Ok(HealthReport::unhealthy(
                format!("GET {url}: status {status}, expected {}", self.status),
                latency,
            ));
        }
        if let Some(want) = &self.body_contains {
            if !body.contains(want.as_str()) {
                return Ok(HealthReport::unhealthy(
                    format!("GET {url}: body does not contain {want:?}"),
                    latency,
                ));
            }
        }
        if let Some(bound) = self.max_latency {
            if latency > bound {
                return Ok(HealthReport::unhealthy(
                    format!("GET {url}: took {latency:?}, bound is {bound:?}"),
                    latency,
                ));
            }
        }
        Ok(HealthReport::healthy(latency))
    }
}

/// TCP check: the endpoint accepts a connection within the timeout.
#[derive(Debug, Clone)]
pub struct TcpCheck {
    timeout: Duration,
}

impl TcpCheck {
    /// A TCP connect check bounded by `timeout`.
    pub fn new(timeout: Duration) -> Self {
        TcpCheck { timeout }
    }
}

impl Default for TcpCheck {
    fn default() -> Self {
        TcpCheck::new(Duration::from_secs(3))
    }
}

#[async_trait]
impl HealthCheck for TcpCheck {
    fn name(&self) -> &str {
        "tcp"
    }

    async fn check(&self, endpoint: &Endpoint) -> Result<HealthReport> {
        let start = Instant::now();
        let addr = endpoint.authority();
        match tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(&addr)).await {
            Ok(Ok(_)) => Ok(HealthReport::healthy(start.elapsed())),
            Ok(Err(e)) => Ok(HealthReport::unhealthy(
                format!("connect {addr}: {e}"),
                start.elapsed(),
            )),
            Err(_) => Ok(HealthReport::unhealthy(
                format!("connect {addr}: no answer within {:?}", self.timeout),
                start.elapsed(),
            )),
        }
    }
}

/// Command check: runs `argv` (no shell); exit 0 is healthy. The endpoint is passed as the
/// environment variables `BLUEGREEN_HOST`, `BLUEGREEN_PORT` and `BLUEGREEN_URL`.
#[derive(Debug, Clone)]
pub struct CommandCheck {
    name: String,
    argv: Vec<String>,
    timeout: Duration,
}

impl CommandCheck {
    /// A check running `argv`, bounded by `timeout`.
    pub fn new(argv: Vec<String>, timeout: Duration) -> Result<Self> {
        if argv.is_empty() || argv[0].is_empty() {
            return Err(Error::invalid(
                "command check",
                "",
                "argv must name a program",
            ));
        }
        Ok(CommandCheck {
            name: format!("command {}", argv[0]),
            argv,
            timeout,
        })
    }
}

#[async_trait]
impl HealthCheck for CommandCheck {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self, endpoint: &Endpoint) -> Result<HealthReport> {
        let start = Instant::now();
        let mut cmd = tokio::process::Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .env("BLUEGREEN_HOST", &endpoint.host)
            .env("BLUEGREEN_PORT", endpoint.port.to_string())
            .env("BLUEGREEN_URL", endpoint.url("/"))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = match tokio::time::timeout(self.timeout, cmd.output()).await {
            Err(_) => {
                return Ok(HealthReport::unhealthy(
                    format!("{} did not finish within {:?}", self.argv[0], self.timeout),
                    start.elapsed(),
                ))
            }
            Ok(Err(e)) => {
                return Err(Error::io(
                    format!("running health command {:?}", self.argv[0]),
                    e,
                ))
            }
            Ok(Ok(o)) => o,
        };
        if out.status.success() {
            Ok(HealthReport::healthy(start.elapsed()))
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: String = stderr
                .lines()
                .last()
                .unwrap_or("")
                .chars()
                .take(200)
                .collect();
            Ok(HealthReport::unhealthy(
                format!("{} exited with {}: {tail}", self.argv[0], out.status),
                start.elapsed(),
            ))
        }
    }
}

/// Runs every check on `endpoint` concurrently; returns how many passed and the failures, each
/// prefixed with its check's name.
async fn run_all(
    checks: &[Arc<dyn HealthCheck>],
    endpoint: &Endpoint,
) -> Result<(usize, Vec<String>)> {
    let reports =
        futures_util::future::try_join_all(checks.iter().map(|c| c.check(endpoint))).await?;
    let failed: Vec<String> = reports
        .iter()
        .zip(checks)
        .filter_map(|(r, c)| r.reason().map(|why| format!("{}: {why}", c.name())))
        .collect();
    Ok((reports.len() - failed.len(), failed))
}

fn combined_name(kind: &str, checks: &[Arc<dyn HealthCheck>]) -> String {
    let names: Vec<&str> = checks.iter().map(|c| c.name()).collect();
    format!("{kind} [{}]", names.join(", "))
}

/// Healthy when every inner check is healthy (checked concurrently).
#[derive(Debug, Clone)]
pub struct AllOf {
    name: String,
    checks: Vec<Arc<dyn HealthCheck>>,
}

impl AllOf {
    /// All of `checks`.
    pub fn new(checks: Vec<Arc<dyn HealthCheck>>) -> Self {
        AllOf {
            name: combined_name("all of", &checks),
            checks,
        }
    }
}

#[async_trait]
impl HealthCheck for AllOf {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self, endpoint: &Endpoint) -> Result<HealthReport> {
        let start = Instant::now();
        let (_, failed) = run_all(&self.checks, endpoint).await?;
        if failed.is_empty() {
            Ok(HealthReport::healthy(start.elapsed()))
        } else {
            Ok(HealthReport::unhealthy(failed.join("; "), start.elapsed()))
        }
    }
}

/// Healthy when at least one inner check is healthy (an empty list is healthy).
#[derive(Debug, Clone)]
pub struct AnyOf {
    name: String,
    checks: Vec<Arc<dyn HealthCheck>>,
}

impl AnyOf {
    /// Any of `checks`.
    pub fn new(checks: Vec<Arc<dyn HealthCheck>>) -> Self {
        AnyOf {
            name: combined_name("any of", &checks),
            checks,
        }
    }
}

#[async_trait]
impl HealthCheck for AnyOf {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self, endpoint: &Endpoint) -> Result<HealthReport> {
        let start = Instant::now();
        let (passed, failed) = run_all(&self.checks, endpoint).await?;
        if passed > 0 || failed.is_empty() {
            Ok(HealthReport::healthy(start.elapsed()))
        } else {
            Ok(HealthReport::unhealthy(failed.join("; "), start.elapsed()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[cfg(feature = "http")]
    #[test]
    fn checks_that_can_never_pass_are_invalid() {
        assert!(HttpCheck::new("/health")
            .with_header("Host", "a.example")
            .validate()
            .is_ok());
        for (check, field) in [
            (HttpCheck::new("/x\r\nX-Evil: 1"), "path"),
            (HttpCheck::new("health"), "path"),
            (HttpCheck::new("/x").with_status(0), "status"),
            (HttpCheck::new("/x").with_status(600), "status"),
            (HttpCheck::new("/x").with_header("Bad Name", "v"), "headers"),
            (HttpCheck::new("/x").with_header("X-A\r\n", "v"), "headers"),
            (
                HttpCheck::new("/x").with_header("X-A", "v\r\nX-B: 1"),
                "headers",
            ),
            (HttpCheck::new("/x").with_header("X-A", "v\0"), "headers"),
        ] {
            let err = check.validate().unwrap_err();
            assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
            assert!(err.to_string().contains(field), "{err}");
        }
        // A header's value may be a token: never in the error.
        let err = HttpCheck::new("/x")
            .with_header("Authorization", "secret\n")
            .validate()
            .unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    /// The header grammar without reqwest agrees with reqwest's (`http`'s) own.
    #[cfg(feature = "http")]
    #[test]
    fn header_grammar_matches_http_crate() {
        let samples = [
            "",
            "Host",
            "X-A",
            "x_a.b~c",
            "Bad Name",
            "X-A\r\n",
            "a:b",
            "a\u{e9}",
            "a\"",
            "!#$%&'*+-.^_`|~",
            "v",
            "v w",
            "v\tw",
            "v\r\nX-B: 1",
            "v\0",
            "\u{7f}",
            "\u{e9}t\u{e9}",
            "Bearer abc/def=",
        ];
        for s in samples {
            assert_eq!(
                is_header_name(s),
                reqwest::header::HeaderName::from_bytes(s.as_bytes()).is_ok(),
                "name {s:?}"
            );
            assert_eq!(
                is_header_value(s),
                reqwest::header::HeaderValue::from_str(s).is_ok(),
                "value {s:?}"
            );
        }
    }

    /// A one-route HTTP server answering every request with `status` and `body` after `delay`.
    async fn server(status: u16, body: &'static str, delay: Duration) -> Endpoint {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    tokio::time::sleep(delay).await;
                    let body = if req.to_ascii_lowercase().contains("host: app.example") {
                        format!("{body} host-ok")
                    } else {
                        body.to_string()
                    };
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        Endpoint::new("127.0.0.1", port)
    }

    fn closed_port() -> Endpoint {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        Endpoint::new("127.0.0.1", port)
    }

    #[cfg(feature = "http")]
    #[tokio::test]
    async fn http_check_judges_status_body_latency_and_headers() {
        let ok = server(200, "status ok", Duration::ZERO).await;
        assert!(HttpCheck::new("/health")
            .check(&ok)
            .await
            .unwrap()
            .is_healthy());
        let r = HttpCheck::new("/health")
            .with_body_contains("nope")
            .check(&ok)
            .await
            .unwrap();
        assert!(r.reason().unwrap().contains("does not contain"), "{r:?}");
        let r = HttpCheck::new("/")
            .with_header("Host", "app.example")
            .with_body_contains("host-ok")
            .check(&ok)
            .await
            .unwrap();
        assert!(r.is_healthy(), "{r:?}");

        let bad = server(503, "down", Duration::ZERO).await;
        let r = HttpCheck::new("/health").check(&bad).await.unwrap();
        assert!(r.reason().unwrap().contains("status 503"), "{r:?}");

        let slow = server(200, "ok", Duration::from_millis(300)).await;
        let r = HttpCheck::new("/")
            .with_max_latency(Duration::from_millis(50))
            .check(&slow)
            .await
            .unwrap();
        assert!(r.reason().unwrap().contains("bound"), "{r:?}");
        let r = HttpCheck::new("/")
            .with_timeout(Duration::from_millis(50))
            .check(&slow)
            .await
            .unwrap();
        assert!(r.reason().unwrap().contains("no answer"), "{r:?}");

        let r = HttpCheck::new("/").check(&closed_port()).await.unwrap();
        assert!(!r.is_healthy());
    }

    #[cfg(feature = "http")]
    #[tokio::test]
    async fn header_values_stay_out_of_debug() {
        let c = HttpCheck::new("/").with_header("Authorization", "Bearer sekrit");
        assert!(!format!("{c:?}").contains("sekrit"));
    }

    #[tokio::test]
    async fn tcp_and_command_checks() {
        let ok = server(200, "ok", Duration::ZERO).await;
        assert!(TcpCheck::default().check(&ok).await.unwrap().is_healthy());
        assert!(!TcpCheck::default()
            .check(&closed_port())
            .await
            .unwrap()
            .is_healthy());

        let yes = CommandCheck::new(vec!["true".into()], Duration::from_secs(5)).unwrap();
        assert!(yes.check(&ok).await.unwrap().is_healthy());
        let no = CommandCheck::new(vec!["false".into()], Duration::from_secs(5)).unwrap();
        assert!(!no.check(&ok).await.unwrap().is_healthy());
        // The endpoint reaches the command through the environment, never through a shell string.
        let env = CommandCheck::new(
            vec!["printenv".into(), "BLUEGREEN_PORT".into()],
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(env.check(&ok).await.unwrap().is_healthy());
        let unset = CommandCheck::new(
            vec!["printenv".into(), "BLUEGREEN_NOT_SET".into()],
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(!unset.check(&ok).await.unwrap().is_healthy());
        let slow = CommandCheck::new(vec!["sleep".into(), "5".into()], Duration::from_millis(100))
            .unwrap();
        let r = slow.check(&ok).await.unwrap();
        assert!(r.reason().unwrap().contains("did not finish"), "{r:?}");
        assert!(CommandCheck::new(vec![], Duration::from_secs(1)).is_err());
        let missing =
            CommandCheck::new(vec!["/nonexistent/x".into()], Duration::from_secs(1)).unwrap();
        assert!(missing.check(&ok).await.is_err());
    }

    // Its failing check is an HTTP one.
    #[cfg(feature = "http")]
    #[tokio::test]
    async fn combinators() {
        let ok = server(200, "ok", Duration::ZERO).await;
        let yes: Arc<dyn HealthCheck> = Arc::new(TcpCheck::default());
        let no: Arc<dyn HealthCheck> = Arc::new(HttpCheck::new("/").with_status(204));
        let all = AllOf::new(vec![yes.clone(), no.clone()]);
        let r = all.check(&ok).await.unwrap();
        assert!(
            r.reason().unwrap().contains("status 200, expected 204"),
            "{r:?}"
        );
        assert!(AnyOf::new(vec![yes.clone(), no.clone()])
            .check(&ok)
            .await
            .unwrap()
            .is_healthy());
        assert!(!AnyOf::new(vec![no]).check(&ok).await.unwrap().is_healthy());
        assert!(AllOf::new(vec![yes]).check(&ok).await.unwrap().is_healthy());
    }
}
