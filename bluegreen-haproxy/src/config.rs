//! Settings of an [`HaproxySwitch`](crate::HaproxySwitch).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bluegreen_core::{Error, Name, PerSlot, Result, Slot};
use serde::{Deserialize, Serialize};

/// Where HAProxy's runtime API listens (`stats socket … level admin`). In files, the string
/// [`RuntimeAddress::parse`] reads (`"/run/haproxy/admin.sock"`, `"127.0.0.1:9999"`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RuntimeAddress {
    /// A unix socket path, e.g. `/run/haproxy/admin.sock`.
    Unix(PathBuf),
    /// A TCP `host:port`, e.g. `127.0.0.1:9999`.
    Tcp(String),
}

impl RuntimeAddress {
    /// Parses `address`: anything containing `/` is a unix socket path (a `unix@` prefix is
    /// accepted), anything else must be `host:port` (an `ipv4@`/`ipv6@` prefix is accepted).
    pub fn parse(address: &str) -> Result<Self> {
        if let Some(path) = address.strip_prefix("unix@") {
            return Ok(RuntimeAddress::Unix(PathBuf::from(path)));
        }
        if address.contains('/') {
            return Ok(RuntimeAddress::Unix(PathBuf::from(address)));
        }
        let tcp = address
            .strip_prefix("ipv4@")
            .or_else(|| address.strip_prefix("ipv6@"))
            .unwrap_or(address);
        let port_ok = tcp
            .rsplit_once(':')
            .map(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
            .unwrap_or(false);
        if !port_ok {
            return Err(Error::invalid(
                "haproxy runtime address",
                address,
                "expected a unix socket path or host:port",
            ));
        }
        Ok(RuntimeAddress::Tcp(tcp.to_string()))
    }

    /// The address as HAProxy's `stats socket` line spells it.
    pub(crate) fn stats_socket_spec(&self) -> Result<String> {
        match self {
            RuntimeAddress::Unix(p) => Ok(config_word("stats socket path", p)?.to_string()),
            RuntimeAddress::Tcp(a) => {
                check_word("stats socket address", a)?;
                if a.starts_with('[') {
                    Ok(format!("ipv6@{a}"))
                } else {
                    Ok(format!("ipv4@{a}"))
                }
            }
        }
    }
}

impl fmt::Display for RuntimeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeAddress::Unix(p) => write!(f, "{}", p.display()),
            RuntimeAddress::Tcp(a) => f.write_str(a),
        }
    }
}

impl Serialize for RuntimeAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RuntimeAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        RuntimeAddress::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Checks that `value` can be placed in haproxy.cfg as one word without quoting.
pub(crate) fn check_word(what: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(what, value, "must not be empty"));
    }
    if let Some(c) = value.chars().find(|c| {
        c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '#' | '\\' | ';' | '$')
    }) {
        return Err(Error::invalid(
            what,
            value,
            format!("character {c:?} is not allowed in an haproxy.cfg word"),
        ));
    }
    Ok(())
}

pub(crate) fn config_word<'a>(what: &'static str, path: &'a Path) -> Result<&'a str> {
    let s = path
        .to_str()
        .ok_or_else(|| Error::invalid(what, path.display().to_string(), "not valid UTF-8"))?;
    check_word(what, s)?;
    Ok(s)
}

/// Settings of an [`HaproxySwitch`](crate::HaproxySwitch): where the runtime API is, which
/// backend and servers to drive, and the time bounds.
///
/// Names are checked with [`bluegreen_core::Name`] when the switch is built (before anything is
/// sent), so a name like `app;shutdown sessions` never reaches HAProxy.
///
/// ```
/// use std::time::Duration;
/// use bluegreen_haproxy::HaproxyConfig;
/// let config = HaproxyConfig::new("/run/haproxy/admin.sock")
///     .unwrap()
///     .with_backend("app")
///     .with_servers("app_blue", "app_green")
///     .with_drain_timeout(Duration::from_secs(30));
/// assert_eq!(config.backend(), "app");
///
/// // In a file only the address is required (`runtime` is accepted for `address`).
/// let from_file: HaproxyConfig = serde_json::from_str(
///     r#"{ "runtime": "127.0.0.1:9999", "blue_server": "b", "green_server": "g" }"#,
/// )
/// .unwrap();
/// assert_eq!(from_file.server(bluegreen_core::Slot::Green), "g");
/// assert!(serde_json::from_str::<HaproxyConfig>(
///     r#"{ "address": "/run/admin.sock", "backend": "app;shutdown sessions" }"#,
/// )
/// .is_err());
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
#[non_exhaustive]
pub struct HaproxyConfig {
    /// The runtime API address.
    #[serde(alias = "runtime")]
    pub address: RuntimeAddress,
    /// The backend driven (default `app`).
    #[serde(default = "default_backend")]
    pub backend: String,
    /// The server of the blue slot (default `blue`).
    #[serde(default = "default_blue")]
    pub blue_server: String,
    /// The server of the green slot (default `green`).
    #[serde(default = "default_green")]
    pub green_server: String,
    /// How long `apply` waits for a server's sessions (`scur`) to reach 0 before putting it into
    /// maintenance. Default 30 s.
    #[serde(default = "thirty_seconds", with = "bluegreen_core::config::duration")]
    pub drain_timeout: Duration,
    /// Bound on one runtime API command, connect to last byte. Default 5 s.
    #[serde(default = "five_seconds", with = "bluegreen_core::config::duration")]
    pub command_timeout: Duration,
    /// How long `apply` waits for a server it enabled to be reported up (its health check
    /// passing) before giving up and restoring the previous state. Default 10 s.
    #[serde(default = "ten_seconds", with = "bluegreen_core::config::duration")]
    pub ready_timeout: Duration,
    /// How often `apply` polls HAProxy while it waits (health, drain). Default 50 ms.
    #[serde(default = "fifty_millis", with = "bluegreen_core::config::duration")]
    pub poll_interval: Duration,
    /// The health-check path in the rendered snippet. Default `/health`.
    #[serde(default = "default_health_path")]
    pub health_path: String,
    /// The health-check interval in the rendered snippet. Default 1 s.
    #[serde(default = "one_second", with = "bluegreen_core::config::duration")]
    pub check_interval: Duration,
    /// How many servers each slot has in the backend: the most endpoints a slot can be routed
    /// to. The pool of a slot is its server name, then `<name>-2` … `<name>-<pool_size>`
    /// ([`HaproxyConfig::pool`]); [`render_backend`](HaproxyConfig::render_backend) renders
    /// them all. Between 1 and [`MAX_POOL_SIZE`]. Default [`DEFAULT_POOL_SIZE`].
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
}

/// The default [`HaproxyConfig::pool_size`]: servers per slot.
pub const DEFAULT_POOL_SIZE: usize = 4;

/// The largest [`HaproxyConfig::pool_size`].
pub const MAX_POOL_SIZE: usize = 64;

bluegreen_core::validated_serde!(HaproxyConfig);

fn default_backend() -> String {
    "app".to_string()
}
fn default_blue() -> String {
    "blue".to_string()
}
fn default_green() -> String {
    "green".to_string()
}
fn default_health_path() -> String {
    "/health".to_string()
}
fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}
fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}
fn five_seconds() -> Duration {
    Duration::from_secs(5)
}
fn one_second() -> Duration {
    Duration::from_secs(1)
}
fn fifty_millis() -> Duration {
    Duration::from_millis(50)
}
fn default_pool_size() -> usize {
    DEFAULT_POOL_SIZE
}

impl HaproxyConfig {
    /// Settings for the runtime API at `address` (a unix socket path or `host:port`), backend
    /// `app`, servers `blue` and `green`.
    pub fn new(address: &str) -> Result<Self> {
        Ok(Self::with_address(RuntimeAddress::parse(address)?))
    }

    /// Settings for the runtime API at `address`.
    pub fn with_address(address: RuntimeAddress) -> Self {
        HaproxyConfig {
            address,
            backend: default_backend(),
            blue_server: default_blue(),
            green_server: default_green(),
            drain_timeout: thirty_seconds(),
            command_timeout: five_seconds(),
            ready_timeout: ten_seconds(),
            poll_interval: fifty_millis(),
            health_path: default_health_path(),
            check_interval: one_second(),
            pool_size: DEFAULT_POOL_SIZE,
        }
    }

    /// Settings for a unix socket at `path`.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self::with_address(RuntimeAddress::Unix(path.into()))
    }

    /// The backend name (default `app`).
    pub fn with_backend(mut self, backend: impl Into<String>) -> Self {
        self.backend = backend.into();
        self
    }

    /// The server names of the blue and green slots (default `blue` / `green`).
    pub fn with_servers(mut self, blue: impl Into<String>, green: impl Into<String>) -> Self {
        self.blue_server = blue.into();
        self.green_server = green.into();
        self
    }

    /// The drain bound.
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// The bound on one command.
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// The bound on a server becoming up.
    pub fn with_ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// The polling interval while waiting for health and drain.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The health-check path and interval of the rendered snippet.
    pub fn with_health_check(mut self, path: impl Into<String>, interval: Duration) -> Self {
        self.health_path = path.into();
        self.check_interval = interval;
        self
    }

    /// The number of servers per slot (default [`DEFAULT_POOL_SIZE`]): the most endpoints one
    /// slot can be routed to. haproxy.cfg must have them all ([`render_backend`](Self::render_backend)).
    pub fn with_pool_size(mut self, servers: usize) -> Self {
        self.pool_size = servers;
        self
    }

    /// The server names of `slot`'s pool, in the order endpoints are placed on them: the slot's
    /// server name, then `<name>-2` … `<name>-<pool_size>`.
    ///
    /// ```
    /// use bluegreen_core::Slot;
    /// use bluegreen_haproxy::HaproxyConfig;
    /// let c = HaproxyConfig::new("/run/haproxy/admin.sock").unwrap().with_pool_size(3);
    /// assert_eq!(c.pool(Slot::Blue), ["blue", "blue-2", "blue-3"]);
    /// ```
    pub fn pool(&self, slot: Slot) -> Vec<String> {
        let name = self.server(slot);
        (1..=self.pool_size.max(1))
            .map(|i| {
                if i == 1 {
                    name.to_string()
                } else {
                    format!("{name}-{i}")
                }
            })
            .collect()
    }

    /// The backend name.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// The server name of `slot`.
    pub fn server(&self, slot: Slot) -> &str {
        match slot {
            Slot::Blue => &self.blue_server,
            Slot::Green => &self.green_server,
        }
    }

    /// Checks every name and that no time bound is zero (also done when deserializing and when
    /// the switch is built).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the setting.
    pub fn validate(&self) -> Result<()> {
        self.validated().map(|_| ())
    }

    /// Validates every name; returns them as [`Name`]s (the backend, each slot's pool).
    pub(crate) fn validated(&self) -> Result<(Name, PerSlot<Vec<Name>>)> {
        let backend = Name::new(self.backend.as_str())?;
        let blue = Name::new(self.blue_server.as_str())?;
        let green = Name::new(self.green_server.as_str())?;
        if blue == green {
            return Err(Error::invalid(
                "haproxy server names",
                blue.as_str(),
                "blue and green must be different servers",
            ));
        }
        if !(1..=MAX_POOL_SIZE).contains(&self.pool_size) {
            return Err(Error::invalid(
                "haproxy pool_size",
                self.pool_size.to_string(),
                format!("servers per slot must be between 1 and {MAX_POOL_SIZE}"),
            ));
        }
        let pool = |slot: Slot| -> Result<Vec<Name>> {
            self.pool(slot).into_iter().map(Name::new).collect()
        };
        let pools = PerSlot::new(pool(Slot::Blue)?, pool(Slot::Green)?);
        let mut seen = std::collections::BTreeSet::new();
        for name in pools.blue.iter().chain(&pools.green) {
            if !seen.insert(name.as_str()) {
                return Err(Error::invalid(
                    "haproxy server names",
                    name.as_str(),
                    "the blue and green pools (<name>, <name>-2, …) must not share a server; \
                     choose server names that are not <other>-<n>",
                ));
            }
        }
        for (what, t) in [
            ("drain timeout", self.drain_timeout),
            ("command timeout", self.command_timeout),
            ("ready timeout", self.ready_timeout),
            ("poll interval", self.poll_interval),
            ("check interval", self.check_interval),
        ] {
            if t.is_zero() {
                return Err(Error::invalid(what, "0s", "must be greater than zero"));
            }
        }
        Ok((backend, pools))
    }
}

fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

impl HaproxyConfig {
    /// The lines this switch needs in haproxy.cfg's `global` section: the admin-level stats
    /// socket and the server-state file a reload restores the runtime state from.
    ///
    /// ```
    /// use bluegreen_haproxy::HaproxyConfig;
    /// let g = HaproxyConfig::new("/run/haproxy/admin.sock").unwrap()
    ///     .render_global("/var/lib/haproxy/server-state".as_ref())
    ///     .unwrap();
    /// assert!(g.contains("stats socket /run/haproxy/admin.sock mode 600 level admin"));
    /// assert!(g.contains("server-state-file /var/lib/haproxy/server-state"));
    /// ```
    pub fn render_global(&self, state_file: &Path) -> Result<String> {
        let socket = self.address.stats_socket_spec()?;
        let state = config_word("server-state-file path", state_file)?;
        Ok(format!(
            "    stats socket {socket} mode 600 level admin\n    server-state-file {state}\n"
        ))
    }

    /// The `backend` section this switch drives: every server of both pools ([`pool`](Self::pool))
    /// starts in maintenance (`disabled`) at a placeholder address until an `apply` sets its
    /// address, weight and state; `load-server-state-from-file global` makes a reload keep what the
    /// runtime API set (dump `show servers state` into the state file first, see
    /// [`HaproxySwitch::save_server_state`](crate::HaproxySwitch::save_server_state)).
    ///
    /// The placeholder is a host name with `init-addr last,127.0.0.1`: HAProxy 2.6 restores a
    /// runtime-set address from the state file only for servers configured by name.
    ///
    /// ```
    /// use bluegreen_haproxy::HaproxyConfig;
    /// let b = HaproxyConfig::new("/run/haproxy/admin.sock").unwrap().render_backend().unwrap();
    /// assert!(b.starts_with("backend app\n"));
    /// assert!(b.contains("server blue blue.bluegreen.invalid:1 disabled"));
    /// assert!(b.contains("server green-4 green-4.bluegreen.invalid:1 disabled"));
    /// assert!(b.contains("load-server-state-from-file global"));
    /// ```
    pub fn render_backend(&self) -> Result<String> {
        let (backend, pools) = self.validated()?;
        check_word("health-check path", &self.health_path)?;
        if !self.health_path.starts_with('/') {
            return Err(Error::invalid(
                "health-check path",
                self.health_path.as_str(),
                "must start with /",
            ));
        }
        let inter = millis(self.check_interval);
        let fast = millis((self.check_interval / 4).max(Duration::from_millis(100)));
        let mut out = format!(
            "backend {backend}\n\
             \x20   balance roundrobin\n\
             \x20   option httpchk GET {path}\n\
             \x20   http-check expect status 200\n\
             \x20   option redispatch\n\
             \x20   retries 3\n\
             \x20   load-server-state-from-file global\n\
             \x20   default-server check inter {inter} fastinter {fast} downinter {fast} rise 2 fall 2 init-addr last,127.0.0.1\n",
            path = self.health_path,
        );
        for server in pools.blue.iter().chain(&pools.green) {
            out.push_str(&format!(
                "    server {server} {server}.bluegreen.invalid:1 disabled weight 100\n"
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            RuntimeAddress::parse("/run/haproxy/admin.sock").unwrap(),
            RuntimeAddress::Unix("/run/haproxy/admin.sock".into())
        );
        assert_eq!(
            RuntimeAddress::parse("unix@admin.sock").unwrap(),
            RuntimeAddress::Unix("admin.sock".into())
        );
        assert_eq!(
            RuntimeAddress::parse("127.0.0.1:9999").unwrap(),
            RuntimeAddress::Tcp("127.0.0.1:9999".into())
        );
        assert_eq!(
            RuntimeAddress::parse("ipv4@127.0.0.1:9999").unwrap(),
            RuntimeAddress::Tcp("127.0.0.1:9999".into())
        );
        for bad in ["", "admin.sock", "host:", ":80", "host:0", "host:99999"] {
            assert!(RuntimeAddress::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn injection_names_are_refused() {
        let base = HaproxyConfig::unix("/tmp/x.sock");
        for bad in [
            "app;shutdown sessions",
            "blue\nset server",
            "a b",
            "",
            "a\tb",
            "x\u{7}",
        ] {
            assert!(
                base.clone().with_backend(bad).validated().is_err(),
                "{bad:?}"
            );
            assert!(
                base.clone().with_servers(bad, "green").validated().is_err(),
                "{bad:?}"
            );
            assert!(
                base.clone().with_servers("blue", bad).validated().is_err(),
                "{bad:?}"
            );
        }
        assert!(base.clone().with_servers("s", "s").validated().is_err());
        // Pools must not overlap: green "blue-2" would be blue's second server.
        let e = base
            .clone()
            .with_servers("blue", "blue-2")
            .validated()
            .unwrap_err();
        assert!(e.to_string().contains("blue-2"), "{e}");
        assert!(base
            .clone()
            .with_servers("blue", "blue-2")
            .with_pool_size(1)
            .validated()
            .is_ok());
        for bad in [0, MAX_POOL_SIZE + 1] {
            let e = base.clone().with_pool_size(bad).validated().unwrap_err();
            assert!(e.to_string().contains("pool_size"), "{e}");
        }
        // A name that fits alone but not with its pool suffix.
        let long = "b".repeat(63);
        assert!(base.clone().with_servers(&long, "g").validated().is_err());
        assert!(base
            .clone()
            .with_servers(&long, "g")
            .with_pool_size(1)
            .validated()
            .is_ok());
        assert!(base
            .clone()
            .with_drain_timeout(Duration::ZERO)
            .validated()
            .is_err());
        assert!(base.validated().is_ok());
    }

    #[test]
    fn rendered_snippet_names_both_servers_and_refuses_bad_words() {
        let c = HaproxyConfig::unix("/tmp/a.sock")
            .with_backend("web")
            .with_servers("web_blue", "web_green");
        let b = c.render_backend().unwrap();
        assert!(b.contains("backend web\n"), "{b}");
        assert!(
            b.contains("    server web_blue web_blue.bluegreen.invalid:1 disabled weight 100\n")
        );
        assert!(b.contains("    server web_green "));
        assert!(
            b.contains(
                "    server web_blue-4 web_blue-4.bluegreen.invalid:1 disabled weight 100\n"
            ),
            "{b}"
        );
        assert_eq!(
            b.matches("    server ").count(),
            2 * DEFAULT_POOL_SIZE,
            "{b}"
        );
        let one = c.clone().with_pool_size(1).render_backend().unwrap();
        assert_eq!(one.matches("    server ").count(), 2, "{one}");
        assert!(b.contains("option httpchk GET /health"));
        assert!(c
            .clone()
            .with_health_check("/health check", Duration::from_secs(1))
            .render_backend()
            .is_err());
        assert!(c
            .clone()
            .with_health_check("health", Duration::from_secs(1))
            .render_backend()
            .is_err());
        assert!(c.with_backend("a;b").render_backend().is_err());
        let g = HaproxyConfig::new("127.0.0.1:9999")
            .unwrap()
            .render_global(Path::new("/tmp/state"))
            .unwrap();
        assert!(
            g.contains("stats socket ipv4@127.0.0.1:9999 mode 600 level admin"),
            "{g}"
        );
        assert!(HaproxyConfig::unix("/tmp/a b.sock")
            .render_global(Path::new("/tmp/state"))
            .is_err());
    }

    #[test]
    fn config_words_refuse_spaces_and_quotes() {
        assert!(check_word("w", "/tmp/a.sock").is_ok());
        for bad in ["a b", "a\"b", "a#b", "a\nb", ""] {
            assert!(check_word("w", bad).is_err(), "{bad:?}");
        }
    }
}
