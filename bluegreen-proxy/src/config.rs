//! The proxy's settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bluegreen_core::{Error, Result};
use hyper::header::HeaderName;
use serde::{Deserialize, Serialize};

use crate::shadow::ShadowConfig;

/// Settings of a [`ProxySwitch`](crate::ProxySwitch).
///
/// Every field has a default (see [`ProxyConfig::default`]); set the ones you need with the
/// `with_*` methods. In a config file durations are written as `"250ms"`, `"5s"`, `"2m"` (or a
/// plain number of milliseconds).
///
/// ```
/// use std::time::Duration;
/// use bluegreen_proxy::ProxyConfig;
///
/// let config = ProxyConfig::default()
///     .with_listen("127.0.0.1:0".parse().unwrap())
///     .with_connect_timeout(Duration::from_secs(2))
///     .with_max_paused_requests(1_000);
/// assert_eq!(config.preview_header, "x-bluegreen-preview");
///
/// let from_file: ProxyConfig =
///     serde_json::from_str(r#"{ "listen": "127.0.0.1:8080", "max_pause_wait": "2s" }"#).unwrap();
/// assert_eq!(from_file.max_pause_wait, Duration::from_secs(2));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ProxyConfig {
    /// Address the proxy listens on (default `127.0.0.1:0`: a free loopback port).
    pub listen: SocketAddr,
    /// Bound on establishing a connection to an upstream (default 3 s); exceeding it is a 502.
    #[serde(with = "bluegreen_core::config::duration")]
    pub connect_timeout: Duration,
    /// Bound on waiting for an upstream's response headers once the request was sent
    /// (default 60 s); exceeding it is a 504.
    #[serde(with = "bluegreen_core::config::duration")]
    pub response_header_timeout: Duration,
    /// How long an idle HTTP/1.1 client keep-alive connection is kept open, and the bound on
    /// receiving a request's headers (default 60 s). HTTP/2 connections stay open while the
    /// client keeps them.
    #[serde(with = "bluegreen_core::config::duration")]
    pub idle_timeout: Duration,
    /// How long an idle pooled upstream connection is kept (default 4 s: below the common 5 s
    /// keep-alive of application servers, so the proxy closes first and never reuses a
    /// connection the upstream is closing).
    #[serde(with = "bluegreen_core::config::duration")]
    pub upstream_idle_timeout: Duration,
    /// Most requests that may wait while the proxy is paused (default 10 000); more are answered
    /// 503 with `Retry-After` at once.
    pub max_paused_requests: usize,
    /// Longest a request waits while the proxy is paused (default 10 s); then it is answered 504
    /// (gateway timeout).
    #[serde(with = "bluegreen_core::config::duration")]
    pub max_pause_wait: Duration,
    /// Request header that sends a request to the preview slot (default `x-bluegreen-preview`).
    pub preview_header: String,
    /// Cookie that sends a request to the preview slot (default `bluegreen_preview`).
    pub preview_cookie: String,
    /// Cookie name for sticky sessions when the split's [`Sticky`](bluegreen_core::Sticky)
    /// leaves it empty (default `bluegreen_slot`).
    pub sticky_cookie: String,
    /// Keep `X-Forwarded-Proto` / `X-Forwarded-Host` sent by the client (default `false`: they are
    /// overwritten). Set it only behind another proxy you trust. `X-Forwarded-For` is always
    /// appended to.
    pub trust_forwarded_headers: bool,
    /// How long [`shutdown`](crate::ProxySwitch::shutdown) waits for open requests (default 30 s).
    #[serde(with = "bluegreen_core::config::duration")]
    pub shutdown_timeout: Duration,
    /// Where the proxy keeps the routing it last applied (split, both slots' endpoints, preview),
    /// to restore it when it starts again (default none: a new proxy answers 503 until a split
    /// is applied). Written atomically (temporary file, `fsync`, `rename`; mode 0600) before a
    /// change takes effect; a change that cannot be written is refused.
    pub routing_file: Option<PathBuf>,
    /// Shadow traffic to the preview slot while preview routing is on (default none); see
    /// [`ShadowConfig`].
    pub shadow: Option<ShadowConfig>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            connect_timeout: Duration::from_secs(3),
            response_header_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            upstream_idle_timeout: Duration::from_secs(4),
            max_paused_requests: 10_000,
            max_pause_wait: Duration::from_secs(10),
            preview_header: "x-bluegreen-preview".to_string(),
            preview_cookie: "bluegreen_preview".to_string(),
            sticky_cookie: "bluegreen_slot".to_string(),
            trust_forwarded_headers: false,
            shutdown_timeout: Duration::from_secs(30),
            routing_file: None,
            shadow: None,
        }
    }
}

bluegreen_core::validated_serde!(ProxyConfig);

impl ProxyConfig {
    /// Checks the header and cookie names (also done when deserializing and by
    /// [`ProxySwitch::bind`](crate::ProxySwitch::bind)).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a malformed header or cookie name.
    pub fn validate(&self) -> Result<()> {
        check_header_name("preview header", &self.preview_header)?;
        check_cookie_name("preview cookie", &self.preview_cookie)?;
        check_cookie_name("sticky cookie", &self.sticky_cookie)?;
        match &self.shadow {
            Some(shadow) => shadow.validate(),
            None => Ok(()),
        }
    }

    /// With the listen address.
    pub fn with_listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// With the upstream connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// With the upstream response-header timeout.
    pub fn with_response_header_timeout(mut self, timeout: Duration) -> Self {
        self.response_header_timeout = timeout;
        self
    }

    /// With the client idle (keep-alive) timeout.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// With the pooled upstream connection idle timeout.
    pub fn with_upstream_idle_timeout(mut self, timeout: Duration) -> Self {
        self.upstream_idle_timeout = timeout;
        self
    }

    /// With the bound on requests waiting while paused.
    pub fn with_max_paused_requests(mut self, max: usize) -> Self {
        self.max_paused_requests = max;
        self
    }

    /// With the longest wait of a request while paused.
    pub fn with_max_pause_wait(mut self, wait: Duration) -> Self {
        self.max_pause_wait = wait;
        self
    }

    /// With the preview header name.
    pub fn with_preview_header(mut self, name: impl Into<String>) -> Self {
        self.preview_header = name.into();
        self
    }

    /// With the preview cookie name.
    pub fn with_preview_cookie(mut self, name: impl Into<String>) -> Self {
        self.preview_cookie = name.into();
        self
    }

    /// With the default sticky-session cookie name.
    pub fn with_sticky_cookie(mut self, name: impl Into<String>) -> Self {
        self.sticky_cookie = name.into();
        self
    }

    /// With trust in the client's `X-Forwarded-Proto` / `X-Forwarded-Host`.
    pub fn with_trust_forwarded_headers(mut self, trust: bool) -> Self {
        self.trust_forwarded_headers = trust;
        self
    }

    /// With a file that keeps the routing across restarts (see
    /// [`routing_file`](ProxyConfig::routing_file)).
    pub fn with_routing_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.routing_file = Some(path.into());
        self
    }

    /// With shadow traffic to the preview slot (see [`ShadowConfig`]).
    pub fn with_shadow(mut self, shadow: ShadowConfig) -> Self {
        self.shadow = Some(shadow);
        self
    }

    /// With the graceful-shutdown bound.
    pub fn with_shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }
}

fn check_header_name(what: &'static str, name: &str) -> Result<()> {
    HeaderName::from_bytes(name.as_bytes())
        .map(|_| ())
        .map_err(|_| Error::invalid(what, name, "not a valid HTTP header name"))
}

pub(crate) fn check_cookie_name(what: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(what, name, "not a valid cookie name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_round_trip() {
        let c = ProxyConfig::default().with_connect_timeout(Duration::from_millis(1500));
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"connect_timeout\":\"1500ms\""), "{json}");
        let back: ProxyConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        let ms: ProxyConfig = serde_json::from_str(r#"{"idle_timeout": 1200}"#).unwrap();
        assert_eq!(ms.idle_timeout, Duration::from_millis(1200));
        assert!(serde_json::from_str::<ProxyConfig>(r#"{"idle_timeout": "soon"}"#).is_err());
    }

    #[test]
    fn deserializing_validates_and_rejects_unknown_keys() {
        let err = serde_json::from_str::<ProxyConfig>(r#"{"preview_header": "a b"}"#).unwrap_err();
        assert!(
            err.to_string().contains("not a valid HTTP header name"),
            "{err}"
        );
        assert!(serde_json::from_str::<ProxyConfig>(r#"{"sticky_cookie": ""}"#).is_err());
        assert!(serde_json::from_str::<ProxyConfig>(r#"{"listen_on": "127.0.0.1:1"}"#).is_err());
    }
}
