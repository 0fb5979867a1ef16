//! Domain types: slots, releases, endpoints, traffic splits and the validated names they carry.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One of the two identical environments.
///
/// ```
/// use bluegreen_core::Slot;
/// assert_eq!(Slot::Blue.other(), Slot::Green);
/// assert_eq!("green".parse::<Slot>().unwrap(), Slot::Green);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// The blue slot.
    Blue,
    /// The green slot.
    Green,
}

impl Slot {
    /// Both slots, blue first.
    pub const ALL: [Slot; 2] = [Slot::Blue, Slot::Green];

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::Blue => Slot::Green,
            Slot::Green => Slot::Blue,
        }
    }

    /// Lower-case name (`blue` / `green`), as used in names, labels and config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Blue => "blue",
            Slot::Green => "green",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Slot {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "blue" => Ok(Slot::Blue),
            "green" => Ok(Slot::Green),
            other => Err(Error::invalid("slot", other, "expected `blue` or `green`")),
        }
    }
}

/// A value for each slot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerSlot<T> {
    /// The blue slot's value.
    pub blue: T,
    /// The green slot's value.
    pub green: T,
}

impl<T> PerSlot<T> {
    /// Builds from both values.
    pub fn new(blue: T, green: T) -> Self {
        PerSlot { blue, green }
    }

    /// The value of `slot`.
    pub fn get(&self, slot: Slot) -> &T {
        match slot {
            Slot::Blue => &self.blue,
            Slot::Green => &self.green,
        }
    }

    /// The value of `slot`, mutably.
    pub fn get_mut(&mut self, slot: Slot) -> &mut T {
        match slot {
            Slot::Blue => &mut self.blue,
            Slot::Green => &mut self.green,
        }
    }

    /// Replaces the value of `slot`.
    pub fn set(&mut self, slot: Slot, value: T) {
        *self.get_mut(slot) = value;
    }
}

/// A strictly validated name: 1 to 63 characters of `[A-Za-z0-9._-]`, starting with an
/// alphanumeric character.
///
/// This grammar is safe to place in an nginx config, an HAProxy runtime-API command, a Docker label,
/// a file name or (quoted) an SQL identifier: no whitespace, separators, quotes or control characters.
///
/// ```
/// use bluegreen_core::Name;
/// assert!(Name::new("app-v2.1").is_ok());
/// assert!(Name::new("app;shutdown").is_err());
/// assert!(Name::new("a b").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        validate_label("name", &name, 63)?;
        Ok(Name(name))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Name::new(s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Name {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Name::new(s)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

fn validate_label(what: &'static str, s: &str, max: usize) -> Result<()> {
    validate_token(what, s, max, &['.', '_', '-', '+'])
}

/// Checks a name that reaches a file, a command or a label: 1 to `max` characters, ASCII letters,
/// digits and the `extra` characters, starting with a letter or digit. The error names `what`,
/// the value and the rule broken.
///
/// ```
/// use bluegreen_core::validate_token;
/// assert!(validate_token("router", "shop-1", 63, &['-', '_']).is_ok());
/// assert!(validate_token("router", "shop;1", 63, &['-', '_']).is_err());
/// assert!(validate_token("router", "-shop", 63, &['-', '_']).is_err());
/// ```
pub fn validate_token(what: &'static str, s: &str, max: usize, extra: &[char]) -> Result<()> {
    if s.is_empty() {
        return Err(Error::invalid(what, s, "must not be empty"));
    }
    if s.len() > max {
        return Err(Error::invalid(
            what,
            s,
            format!("longer than {max} characters"),
        ));
    }
    if !s.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(Error::invalid(what, s, "must start with a letter or digit"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || extra.contains(c)))
    {
        let allowed: Vec<String> = extra.iter().map(|e| format!("`{e}`")).collect();
        return Err(Error::invalid(
            what,
            s,
            format!(
                "character {c:?} is not allowed (use letters, digits, {})",
                allowed.join(", ")
            ),
        ));
    }
    Ok(())
}

/// A release's version label, e.g. `v2`, `1.4.0`, `2026-11-23.1`, `17.0+abc123`.
///
/// Validated like [`Name`] (letters, digits, `.`, `_`, `-`, `+`; at most 128 characters), because it
/// ends up in labels, log lines, HTTP headers and file names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Version(String);

impl Version {
    /// Validates `version`.
    pub fn new(version: impl Into<String>) -> Result<Self> {
        let v = version.into();
        validate_label("version", &v, 128)?;
        Ok(Version(v))
    }

    /// The version as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Version::new(s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl FromStr for Version {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Version::new(s)
    }
}

/// A secret string (password, token, connection string). Its `Debug` and `Display` print
/// `<redacted>`, and it is never serialized into state files.
///
/// It deserializes from a plain string (so a config read from a secrets manager can carry it) but
/// deliberately does not implement `Serialize`: config types mark secret fields
/// `#[serde(skip_serializing)]`, so writing a config out never writes a secret in clear.
///
/// ```
/// use bluegreen_core::Secret;
/// let s = Secret::new("hunter2");
/// assert_eq!(format!("{s:?}"), "<redacted>");
/// assert_eq!(s.expose(), "hunter2");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value. Call only where the value is handed to the system that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// What is deployed into a slot.
///
/// The `artifact` is opaque to the engine: an image reference for Docker, a program path for local
/// processes. `env` is handed to the instance; `secret_env` too, but it never appears in `Debug`,
/// events or state files.
///
/// ```
/// use bluegreen_core::Release;
/// let r = Release::new("v2", "registry.local/app:v2")
///     .unwrap()
///     .with_env("RUST_LOG", "info")
///     .with_secret_env("DB_PASSWORD", "s3cret")
///     .with_label("team", "payments");
/// assert_eq!(r.version.as_str(), "v2");
/// assert!(!format!("{r:?}").contains("s3cret"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Release {
    /// The version label.
    pub version: Version,
    /// What to run; its meaning belongs to the environment.
    pub artifact: String,
    /// Extra arguments for the artifact (a process's argv after the program, a container's command).
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Secret environment variables (redacted in Debug; not persisted).
    #[serde(skip)]
    pub secret_env: BTreeMap<String, Secret>,
    /// The names (never the values) of the secret variables this release needs. The engine
    /// records them with the release, adding `secret_env`'s names, so that a redeploy (rollback,
    /// switch-back, crash recovery) whose [`SecretSource`](crate::SecretSource)s cannot provide
    /// them all is refused before anything starts.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub secret_keys: std::collections::BTreeSet<String>,
    /// Free-form labels (for Docker labels, audit, notifications).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Release {
    /// A release of `artifact` labelled `version`.
    pub fn new(version: impl Into<String>, artifact: impl Into<String>) -> Result<Self> {
        Ok(Release {
            version: Version::new(version)?,
            artifact: artifact.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            secret_env: BTreeMap::new(),
            secret_keys: Default::default(),
            labels: BTreeMap::new(),
        })
    }

    /// The names of every secret variable this release needs: [`secret_keys`](Self::secret_keys)
    /// and the names in [`secret_env`](Self::secret_env).
    pub fn needed_secrets(&self) -> std::collections::BTreeSet<String> {
        let mut all = self.secret_keys.clone();
        all.extend(self.secret_env.keys().cloned());
        all
    }

    /// Adds an argument.
    pub fn with_arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Sets an environment variable.
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Sets a secret environment variable.
    pub fn with_secret_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.secret_env.insert(key.into(), Secret::new(value));
        self
    }

    /// Sets a label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// All environment variables, secrets exposed, for handing to the instance.
    pub fn full_env(&self) -> BTreeMap<String, String> {
        let mut all = self.env.clone();
        for (k, v) in &self.secret_env {
            all.insert(k.clone(), v.expose().to_string());
        }
        all
    }
}

/// Where a slot's instance is reachable.
///
/// ```
/// use bluegreen_core::Endpoint;
/// let e = Endpoint::new("127.0.0.1", 8080);
/// assert_eq!(e.url("/health"), "http://127.0.0.1:8080/health");
/// assert_eq!(e.authority(), "127.0.0.1:8080");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Endpoint {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `http` or `https`.
    #[serde(default = "default_scheme")]
    pub scheme: String,
}

fn default_scheme() -> String {
    "http".to_string()
}

impl Endpoint {
    /// An `http` endpoint.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Endpoint {
            host: host.into(),
            port,
            scheme: default_scheme(),
        }
    }

    /// `host:port` (IPv6 addresses bracketed).
    pub fn authority(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// A URL to `path` on this endpoint.
    pub fn url(&self, path: &str) -> String {
        let sep = if path.starts_with('/') { "" } else { "/" };
        format!("{}://{}{}{}", self.scheme, self.authority(), sep, path)
    }

    /// Checks that the host is an IP address or a DNS name (letters, digits, `-`, `.`), so that it
    /// can be placed in a proxy's configuration without escaping.
    pub fn validate(&self) -> Result<()> {
        if self.port == 0 {
            return Err(Error::invalid(
                "endpoint port",
                "0",
                "port 0 is not reachable",
            ));
        }
        if self.scheme != "http" && self.scheme != "https" {
            return Err(Error::invalid(
                "endpoint scheme",
                &self.scheme,
                "expected http or https",
            ));
        }
        let h = self.host.trim_start_matches('[').trim_end_matches(']');
        if h.parse::<std::net::IpAddr>().is_ok() {
            return Ok(());
        }
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
            });
        if !ok {
            return Err(Error::invalid(
                "endpoint host",
                &self.host,
                "expected an IP address or a DNS name",
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority())
    }
}

/// The endpoints of both slots, as handed to a [`TrafficSwitch`](crate::TrafficSwitch).
pub type Endpoints = PerSlot<Vec<Endpoint>>;

/// Sticky sessions: a client that got a slot keeps it while the split changes only in weight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sticky {
    /// Cookie name that pins a client to a slot.
    pub cookie: String,
}

/// Weights per slot: 100/0 for blue-green, 90/10 for a canary step.
///
/// Weights are percentages and always sum to 100.
///
/// ```
/// use bluegreen_core::{Slot, TrafficSplit};
/// let s = TrafficSplit::canary(Slot::Green, 10).unwrap();
/// assert_eq!(s.weight(Slot::Blue), 90);
/// assert_eq!(s.primary(), Slot::Blue);
/// assert!(TrafficSplit::new(60, 60).is_err());
/// assert_eq!(TrafficSplit::all(Slot::Green).to_string(), "blue 0% / green 100%");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficSplit {
    blue: u8,
    green: u8,
    /// Sticky sessions, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
}

impl TrafficSplit {
    /// A split with these weights (they must sum to 100).
    pub fn new(blue: u8, green: u8) -> Result<Self> {
        if u16::from(blue) + u16::from(green) != 100 {
            return Err(Error::invalid(
                "traffic split",
                format!("{blue}/{green}"),
                "weights must sum to 100",
            ));
        }
        Ok(TrafficSplit {
            blue,
            green,
            sticky: None,
        })
    }

    /// All traffic to `slot`.
    pub fn all(slot: Slot) -> Self {
        match slot {
            Slot::Blue => TrafficSplit {
                blue: 100,
                green: 0,
                sticky: None,
            },
            Slot::Green => TrafficSplit {
                blue: 0,
                green: 100,
                sticky: None,
            },
        }
    }

    /// `percent` of traffic to `to`, the rest to the other slot.
    pub fn canary(to: Slot, percent: u8) -> Result<Self> {
        if percent > 100 {
            return Err(Error::invalid(
                "canary weight",
                percent.to_string(),
                "must be between 0 and 100",
            ));
        }
        match to {
            Slot::Blue => TrafficSplit::new(percent, 100 - percent),
            Slot::Green => TrafficSplit::new(100 - percent, percent),
        }
    }

    /// With sticky sessions on `cookie`.
    pub fn with_sticky(mut self, cookie: impl Into<String>) -> Self {
        self.sticky = Some(Sticky {
            cookie: cookie.into(),
        });
        self
    }

    /// The weight of `slot` in percent.
    pub fn weight(&self, slot: Slot) -> u8 {
        match slot {
            Slot::Blue => self.blue,
            Slot::Green => self.green,
        }
    }

    /// The slot with the larger weight (blue on a tie).
    pub fn primary(&self) -> Slot {
        if self.green > self.blue {
            Slot::Green
        } else {
            Slot::Blue
        }
    }

    /// True when one slot has all the traffic.
    pub fn is_whole(&self) -> bool {
        self.blue == 100 || self.green == 100
    }

    /// True when both splits send the same weights (sticky settings ignored).
    pub fn same_weights(&self, other: &TrafficSplit) -> bool {
        self.blue == other.blue && self.green == other.green
    }
}

impl fmt::Display for TrafficSplit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blue {}% / green {}%", self.blue, self.green)?;
        if let Some(s) = &self.sticky {
            write!(f, " (sticky cookie {})", s.cookie)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reject_injection_characters() {
        for bad in [
            "", "a b", "a;b", "a\nb", "a\tb", "-a", "a/b", "a'b", "a\"b", "a{b", "a$b", "a\0",
        ] {
            assert!(Name::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Name::new("x".repeat(64)).is_err());
        for good in ["a", "app-1", "APP_2.blue", "1x"] {
            assert!(Name::new(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn names_refuse_invalid_values_when_deserialized() {
        assert!(serde_json::from_str::<Name>("\"ok-name\"").is_ok());
        let err = serde_json::from_str::<Name>("\"bad name\"").unwrap_err();
        assert!(err.to_string().contains("not allowed"), "{err}");
    }

    #[test]
    fn split_weights_must_sum_to_100() {
        assert!(TrafficSplit::new(50, 50).is_ok());
        assert!(TrafficSplit::new(50, 49).is_err());
        assert!(TrafficSplit::canary(Slot::Blue, 101).is_err());
        let s = TrafficSplit::canary(Slot::Blue, 30).unwrap();
        assert_eq!((s.weight(Slot::Blue), s.weight(Slot::Green)), (30, 70));
        assert!(!s.is_whole());
        assert!(TrafficSplit::all(Slot::Blue).is_whole());
    }

    #[test]
    fn secrets_stay_out_of_debug_and_state() {
        let r = Release::new("v1", "app")
            .unwrap()
            .with_secret_env("PGPASSWORD", "topsecret");
        assert!(!format!("{r:?}").contains("topsecret"));
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("topsecret"), "{json}");
        assert_eq!(r.full_env()["PGPASSWORD"], "topsecret");
    }

    #[test]
    fn endpoint_validation() {
        assert!(Endpoint::new("127.0.0.1", 80).validate().is_ok());
        assert!(Endpoint::new("::1", 80).validate().is_ok());
        assert_eq!(Endpoint::new("::1", 80).authority(), "[::1]:80");
        assert!(Endpoint::new("app-blue.internal", 80).validate().is_ok());
        assert!(Endpoint::new("evil;host", 80).validate().is_err());
        assert!(Endpoint::new("a b", 80).validate().is_err());
        assert!(Endpoint::new("127.0.0.1", 0).validate().is_err());
    }
}
