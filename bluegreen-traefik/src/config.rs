//! Configuration of the Traefik switch, and the validation of everything that reaches a file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bluegreen_core::{Error, Result, Secret, Slot};
use serde::{Deserialize, Serialize};

/// Longest [`RouteName`]: the derived names (`<name>-preview`) stay within 63 characters.
pub const MAX_NAME_LEN: usize = 55;

/// A router / service name: 1 to 55 characters of letters, digits, `-` and `_`, starting with a
/// letter or digit.
///
/// Stricter than [`bluegreen_core::Name`] on purpose: `@` separates a name from its provider in
/// Traefik, `.` separates label segments and TOML keys, and `{{` would be read by the file
/// provider's Go templates. Nothing else reaches the file.
///
/// ```
/// use bluegreen_traefik::RouteName;
/// assert!(RouteName::new("shop_web-1").is_ok());
/// for bad in ["", "a.b", "a@file", "a b", "a{{x}}", "-a", "ä"] {
///     assert!(RouteName::new(bad).is_err(), "{bad:?}");
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct RouteName(String);

impl<'de> Deserialize<'de> for RouteName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        RouteName::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl RouteName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        validate_token("traefik name", &name, MAX_NAME_LEN)?;
        Ok(RouteName(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name of the `loadBalancer` service of `slot`: `<name>-blue` / `<name>-green`.
    pub fn slot_service(&self, slot: Slot) -> String {
        format!("{}-{}", self.0, slot.as_str())
    }

    /// The name of the preview router: `<name>-preview`.
    pub fn preview_router(&self) -> String {
        format!("{}-preview", self.0)
    }
}

impl fmt::Display for RouteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a token that goes into a file, a rule or a label: `[A-Za-z0-9_-]`, starting with a
/// letter or digit.
pub(crate) fn validate_token(what: &'static str, s: &str, max: usize) -> Result<()> {
    bluegreen_core::validate_token(what, s, max, &['-', '_'])
}

/// Checks a router rule written by the user (`Host(`app.example.com`)`): printable, bounded, and
/// free of Go-template delimiters (the file provider renders every file as a Go template).
pub(crate) fn validate_rule(rule: &str) -> Result<()> {
    if rule.trim().is_empty() {
        return Err(Error::invalid("traefik rule", rule, "must not be empty"));
    }
    if rule.len() > 2048 {
        return Err(Error::invalid(
            "traefik rule",
            rule,
            "longer than 2048 characters",
        ));
    }
    if rule.chars().any(|c| c.is_control()) {
        return Err(Error::invalid(
            "traefik rule",
            rule,
            "control characters (newlines, tabs) are not allowed",
        ));
    }
    if rule.contains("{{") || rule.contains("}}") {
        return Err(Error::invalid(
            "traefik rule",
            rule,
            "`{{` and `}}` are Go-template delimiters in the file provider and are not allowed",
        ));
    }
    Ok(())
}

/// The file format written into the watched directory. In files: `"yaml"`, `"toml"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum FileFormat {
    /// `<name>.bluegreen.yml`.
    #[default]
    Yaml,
    /// `<name>.bluegreen.toml`.
    Toml,
}

impl FileFormat {
    /// The file extension (without the dot).
    pub fn extension(self) -> &'static str {
        match self {
            FileFormat::Yaml => "yml",
            FileFormat::Toml => "toml",
        }
    }
}

/// The Traefik major version, which decides the matcher names in the preview rule (`Headers` in
/// v2, `Header` in v3). In files: `"v2"`, `"v3"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum TraefikVersion {
    /// Traefik v2 (v2.11).
    V2,
    /// Traefik v3.
    #[default]
    V3,
}

/// How preview (test) requests are recognised: they go to the idle slot instead of the split.
/// In files: `{ header = { name = "X-Preview", value = "1" } }` or `{ cookie = { … } }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
#[non_exhaustive]
pub enum PreviewMatch {
    /// A request header with this exact value.
    Header {
        /// Header name.
        name: String,
        /// Header value.
        value: String,
    },
    /// A cookie with this exact value.
    Cookie {
        /// Cookie name.
        name: String,
        /// Cookie value.
        value: String,
    },
}

impl Default for PreviewMatch {
    fn default() -> Self {
        PreviewMatch::Header {
            name: "X-Bluegreen-Preview".to_string(),
            value: "1".to_string(),
        }
    }
}

impl PreviewMatch {
    pub(crate) fn validate(&self) -> Result<()> {
        let (n, v) = match self {
            PreviewMatch::Header { name, value } | PreviewMatch::Cookie { name, value } => {
                (name, value)
            }
        };
        validate_token("preview match name", n, 128)?;
        validate_token("preview match value", v, 128)
    }

    /// The matcher added to the router rule, in `version`'s syntax.
    pub(crate) fn matcher(&self, version: TraefikVersion) -> String {
        let (header, header_re) = match version {
            TraefikVersion::V2 => ("Headers", "HeadersRegexp"),
            TraefikVersion::V3 => ("Header", "HeaderRegexp"),
        };
        match self {
            PreviewMatch::Header { name, value } => format!("{header}(`{name}`, `{value}`)"),
            // Names and values are `[A-Za-z0-9_-]`: nothing in them is a regexp metacharacter.
            PreviewMatch::Cookie { name, value } => {
                format!("{header_re}(`Cookie`, `(^|;\\s*){name}={value}(;|$)`)")
            }
        }
    }
}

/// TLS settings of the routers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RouterTls {
    /// The certificate resolver (`certResolver`), if any.
    #[serde(default)]
    pub cert_resolver: Option<String>,
}

/// Configuration of a [`TraefikSwitch`](crate::TraefikSwitch).
///
/// ```
/// use std::time::Duration;
/// use bluegreen_traefik::{FileFormat, TraefikConfig, TraefikVersion};
/// let config = TraefikConfig::new("shop", "Host(`shop.example.com`)", "/etc/traefik/dynamic")
///     .unwrap()
///     .with_format(FileFormat::Toml)
///     .with_version(TraefikVersion::V2)
///     .with_entry_points(["websecure"])
///     .with_api("http://127.0.0.1:8080")
///     .with_verify_timeout(Duration::from_secs(20));
/// assert!(config.file_path().ends_with("shop.bluegreen.toml"));
///
/// // In a file `name`, `rule` and `dir` are required; the API password is never serialized.
/// let from_file: TraefikConfig = serde_json::from_str(
///     r#"{ "name": "shop", "rule": "Host(`shop.example.com`)", "dir": "/etc/traefik/dynamic",
///          "version": "v2", "api": "http://127.0.0.1:8080", "api_basic_auth": ["ops", "s3cret"] }"#,
/// )
/// .unwrap();
/// assert_eq!(from_file.version, TraefikVersion::V2);
/// assert!(!serde_json::to_string(&from_file).unwrap().contains("s3cret"));
/// assert!(serde_json::from_str::<TraefikConfig>(
///     r#"{ "name": "shop", "rule": "Host(`{{ .Env }}`)", "dir": "/d" }"#,
/// )
/// .is_err());
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
#[non_exhaustive]
pub struct TraefikConfig {
    /// Router name; the services are `<name>` (weighted), `<name>-blue`, `<name>-green`.
    pub name: RouteName,
    /// The router rule, e.g. ``Host(`shop.example.com`)``.
    pub rule: String,
    /// The file provider's watched directory (`providers.file.directory`).
    pub dir: PathBuf,
    /// YAML or TOML.
    #[serde(default)]
    pub format: FileFormat,
    /// Traefik's major version.
    #[serde(default)]
    pub version: TraefikVersion,
    /// Entry points of the routers (empty: all entry points).
    #[serde(default)]
    pub entry_points: Vec<String>,
    /// Middlewares of the routers, in order (`compress`, `auth@docker`, …).
    #[serde(default)]
    pub middlewares: Vec<String>,
    /// Whether the routers are TLS routers (`tls: {}`), and with which certificate resolver.
    #[serde(default)]
    pub tls: Option<RouterTls>,
    /// Base URL of Traefik's API (`http://127.0.0.1:8080`); when set, every change is verified
    /// there and `current` reads it. When unset, `current` reads the file.
    #[serde(default)]
    pub api: Option<String>,
    /// How long to poll the API for the new configuration after writing it. Traefik throttles
    /// provider changes (`providersThrottleDuration`, 2 s by default), so keep this well above it.
    #[serde(default = "fifteen_seconds", with = "bluegreen_core::config::duration")]
    pub verify_timeout: Duration,
    /// Pause between two API polls.
    #[serde(
        default = "two_hundred_millis",
        with = "bluegreen_core::config::duration"
    )]
    pub poll_interval: Duration,
    /// Bound of one API request.
    #[serde(default = "five_seconds", with = "bluegreen_core::config::duration")]
    pub request_timeout: Duration,
    /// HTTP basic-auth credentials for the API (user, password), when Traefik's API is behind a
    /// `basicAuth` middleware. The password is a [`Secret`]: never in `Debug` or logs, and the
    /// pair is left out when serializing (in files: `["user", "password"]`).
    #[serde(default, skip_serializing)]
    pub api_basic_auth: Option<(String, Secret)>,
    /// What makes a request a preview request.
    #[serde(default)]
    pub preview_match: PreviewMatch,
    /// `httpOnly` on the sticky cookie.
    #[serde(default = "yes")]
    pub sticky_http_only: bool,
    /// `secure` on the sticky cookie.
    #[serde(default)]
    pub sticky_secure: bool,
    /// When set (e.g. `docker`), the slots' services are not written into the file: the weighted
    /// service and the preview router refer to `<name>-<slot>@<provider>`, defined by that
    /// provider (for Docker: [`DockerLabels::service_only`](crate::DockerLabels::service_only)).
    #[serde(default)]
    pub slot_services_from: Option<String>,
}

bluegreen_core::validated_serde!(TraefikConfig);

fn fifteen_seconds() -> Duration {
    Duration::from_secs(15)
}
fn two_hundred_millis() -> Duration {
    Duration::from_millis(200)
}
fn five_seconds() -> Duration {
    Duration::from_secs(5)
}
fn yes() -> bool {
    true
}

impl TraefikConfig {
    /// A YAML, Traefik v3 configuration for router `name` with `rule`, written into `dir`.
    pub fn new(
        name: impl Into<String>,
        rule: impl Into<String>,
        dir: impl Into<PathBuf>,
    ) -> Result<Self> {
        let rule = rule.into();
        validate_rule(&rule)?;
        Ok(TraefikConfig {
            name: RouteName::new(name)?,
            rule,
            dir: dir.into(),
            format: FileFormat::default(),
            version: TraefikVersion::default(),
            entry_points: Vec::new(),
            middlewares: Vec::new(),
            tls: None,
            api: None,
            verify_timeout: fifteen_seconds(),
            poll_interval: two_hundred_millis(),
            request_timeout: five_seconds(),
            api_basic_auth: None,
            preview_match: PreviewMatch::default(),
            sticky_http_only: true,
            sticky_secure: false,
            slot_services_from: None,
        })
    }

    /// With this file format.
    pub fn with_format(mut self, format: FileFormat) -> Self {
        self.format = format;
        self
    }

    /// With this Traefik version.
    pub fn with_version(mut self, version: TraefikVersion) -> Self {
        self.version = version;
        self
    }

    /// With these entry points (validated when rendering).
    pub fn with_entry_points<I, S>(mut self, entry_points: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.entry_points = entry_points.into_iter().map(Into::into).collect();
        self
    }

    /// With these router middlewares, in order: `name` or `name@provider` (validated when
    /// rendering).
    pub fn with_middlewares<I, S>(mut self, middlewares: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.middlewares = middlewares.into_iter().map(Into::into).collect();
        self
    }

    /// TLS routers (`tls: {}`), with `cert_resolver` when given (`tls: {certResolver: …}`).
    pub fn with_tls(mut self, cert_resolver: Option<&str>) -> Self {
        self.tls = Some(RouterTls {
            cert_resolver: cert_resolver.map(str::to_string),
        });
        self
    }

    /// Verify through (and read `current` from) Traefik's API at `base_url`.
    pub fn with_api(mut self, base_url: impl Into<String>) -> Self {
        self.api = Some(base_url.into());
        self
    }

    /// Authenticate to the API with HTTP basic auth.
    pub fn with_api_basic_auth(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.api_basic_auth = Some((user.into(), Secret::new(password)));
        self
    }

    /// With this verification bound.
    pub fn with_verify_timeout(mut self, timeout: Duration) -> Self {
        self.verify_timeout = timeout;
        self
    }

    /// With this pause between API polls.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// With this bound on one API request.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Preview requests carry header `name: value`.
    pub fn with_preview_header(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        self.preview_match = PreviewMatch::Header {
            name: name.into(),
            value: value.into(),
        };
        self
    }

    /// Preview requests carry cookie `name=value`.
    pub fn with_preview_cookie(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        self.preview_match = PreviewMatch::Cookie {
            name: name.into(),
            value: value.into(),
        };
        self
    }

    /// Refer to the slots' services as defined by another provider (`docker`: the containers'
    /// labels) instead of writing `loadBalancer` services into the file.
    pub fn with_slot_services_from(mut self, provider: impl Into<String>) -> Self {
        self.slot_services_from = Some(provider.into());
        self
    }

    /// How the router and the weighted service refer to `slot`'s service: `<name>-<slot>`, or
    /// `<name>-<slot>@<provider>` with [`with_slot_services_from`](Self::with_slot_services_from).
    pub fn slot_service_ref(&self, slot: Slot) -> String {
        match &self.slot_services_from {
            Some(p) => format!("{}@{p}", self.name.slot_service(slot)),
            None => self.name.slot_service(slot),
        }
    }

    /// Sticky cookie attributes.
    pub fn with_sticky_cookie_attributes(mut self, http_only: bool, secure: bool) -> Self {
        self.sticky_http_only = http_only;
        self.sticky_secure = secure;
        self
    }

    /// The file this switch owns: `<dir>/<name>.bluegreen.<yml|toml>`.
    pub fn file_path(&self) -> PathBuf {
        self.dir.join(self.file_name())
    }

    /// `<name>.bluegreen.<yml|toml>`.
    pub fn file_name(&self) -> String {
        format!("{}.bluegreen.{}", self.name, self.format.extension())
    }

    /// The file of the other format, removed after a write so that Traefik never sees the same
    /// router twice.
    pub(crate) fn other_format_path(&self) -> PathBuf {
        let other = match self.format {
            FileFormat::Yaml => FileFormat::Toml,
            FileFormat::Toml => FileFormat::Yaml,
        };
        self.dir
            .join(format!("{}.bluegreen.{}", self.name, other.extension()))
    }

    /// The preview router's rule: the main rule and the preview matcher.
    pub fn preview_rule(&self) -> String {
        format!(
            "({}) && {}",
            self.rule,
            self.preview_match.matcher(self.version)
        )
    }

    /// The watched directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checks every value that reaches the file or the API URL (also run when deserializing).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the value.
    pub fn validate(&self) -> Result<()> {
        validate_rule(&self.rule)?;
        for ep in &self.entry_points {
            validate_token("entry point", ep, 63)?;
        }
        for m in &self.middlewares {
            let (name, provider) = m.split_once('@').unwrap_or((m, "file"));
            validate_token("middleware", name, 63)?;
            validate_token("middleware provider", provider, 63)?;
        }
        if let Some(r) = self.tls.as_ref().and_then(|t| t.cert_resolver.as_ref()) {
            validate_token("cert resolver", r, 63)?;
        }
        self.preview_match.validate()?;
        if let Some(p) = &self.slot_services_from {
            validate_token("provider", p, 63)?;
            if p == "file" {
                return Err(Error::invalid(
                    "provider",
                    p,
                    "`file` is this provider: leave slot_services_from unset",
                ));
            }
        }
        if let Some(api) = &self.api {
            let ok = (api.starts_with("http://") || api.starts_with("https://"))
                && !api.chars().any(|c| c.is_whitespace() || c.is_control());
            if !ok {
                return Err(Error::invalid(
                    "traefik api url",
                    api,
                    "expected an http:// or https:// URL without spaces",
                ));
            }
        }
        if let Some((user, _)) = &self.api_basic_auth {
            if user.is_empty() || user.contains(':') || user.chars().any(|c| c.is_control()) {
                return Err(Error::invalid(
                    "api user",
                    user,
                    "must be non-empty, without `:` or control characters",
                ));
            }
        }
        if self.poll_interval.is_zero() {
            return Err(Error::invalid(
                "poll interval",
                "0",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}
