//! A client for HAProxy's runtime API (the `stats socket`), over a unix socket or TCP.
//!
//! Two ways to talk:
//! - [`RuntimeClient::send`]: one command per connection (HAProxy's default, non-interactive
//!   mode: it answers and closes).
//! - [`RuntimeClient::session`]: the interactive `prompt` mode, many commands on one connection;
//!   each answer ends with a `> ` prompt.
//!
//! Commands are [`Command`] values: the typed constructors take validated [`Name`]s, and
//! [`Command::raw`] refuses newlines, `;` and control characters, so nothing sent can smuggle a
//! second command in (the runtime API ends a command at an unescaped `;` or newline).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::time::Duration;

use bluegreen_core::Name;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::RuntimeAddress;
use crate::error::{classify, HaproxyError};

/// The administrative state `set server … state` puts a server in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    /// In load balancing.
    Ready,
    /// Out of load balancing; health checks go on and persistent (sticky) sessions still arrive.
    Drain,
    /// Out of load balancing and health checks stopped.
    Maint,
}

impl AdminState {
    fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }
}

/// What a successful answer looks like, so anything else is reported as an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// `set …` commands answer nothing on success.
    Empty,
    /// `set server … addr` answers "IP changed …" / "no need to change …".
    AddrChanged,
    /// `show …` commands answer data.
    Data,
}

/// One runtime-API command line, checked before it can be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    line: String,
    backend: Option<String>,
    server: Option<String>,
    expect: Expect,
}

impl Command {
    /// A free-form command (e.g. `show info`). Refused when it contains a newline, `;` or any
    /// other control character, or is empty: those would let one string carry several commands.
    ///
    /// ```
    /// use bluegreen_haproxy::Command;
    /// assert!(Command::raw("show info").is_ok());
    /// assert!(Command::raw("show info; shutdown sessions server app/blue").is_err());
    /// assert!(Command::raw("show info\nshutdown frontend fe").is_err());
    /// ```
    pub fn raw(line: &str) -> Result<Self, HaproxyError> {
        if line.trim().is_empty() {
            return Err(HaproxyError::InvalidCommand {
                command: line.to_string(),
                reason: "empty command".into(),
            });
        }
        if let Some(c) = line.chars().find(|c| *c == ';' || c.is_control()) {
            return Err(HaproxyError::InvalidCommand {
                command: line.escape_debug().to_string(),
                reason: format!(
                    "character {c:?} is not allowed: it would end the command and start another"
                ),
            });
        }
        Ok(Command {
            line: line.to_string(),
            backend: None,
            server: None,
            expect: Expect::Data,
        })
    }

    /// `set server <backend>/<server> state <state>`.
    pub fn set_state(backend: &Name, server: &Name, state: AdminState) -> Self {
        Command::for_server(
            format!("set server {backend}/{server} state {}", state.as_str()),
            backend,
            server,
            Expect::Empty,
        )
    }

    /// `set weight <backend>/<server> <weight>`; HAProxy's range is 0 to 256, larger values
    /// are sent as 256.
    pub fn set_weight(backend: &Name, server: &Name, weight: u16) -> Self {
        Command::for_server(
            format!("set weight {backend}/{server} {}", weight.min(256)),
            backend,
            server,
            Expect::Empty,
        )
    }

    /// `set server <backend>/<server> health down`: forgets the server's last check results,
    /// so it is up again only after `rise` passing checks.
    pub fn set_health_down(backend: &Name, server: &Name) -> Self {
        Command::for_server(
            format!("set server {backend}/{server} health down"),
            backend,
            server,
            Expect::Empty,
        )
    }

    /// `set server <backend>/<server> addr <ip> port <port>`.
    pub fn set_addr(backend: &Name, server: &Name, ip: IpAddr, port: u16) -> Self {
        Command::for_server(
            format!("set server {backend}/{server} addr {ip} port {port}"),
            backend,
            server,
            Expect::AddrChanged,
        )
    }

    /// `shutdown sessions server <backend>/<server>`: closes every session still on the server
    /// (long-lived connections left after a drain).
    pub fn shutdown_sessions(backend: &Name, server: &Name) -> Self {
        Command::for_server(
            format!("shutdown sessions server {backend}/{server}"),
            backend,
            server,
            Expect::Empty,
        )
    }

    /// `show servers state <backend>`.
    pub fn show_servers_state(backend: &Name) -> Self {
        Command {
            line: format!("show servers state {backend}"),
            backend: Some(backend.to_string()),
            server: None,
            expect: Expect::Data,
        }
    }

    /// `show servers state` for all backends (the format of a `server-state-file`).
    pub fn show_all_servers_state() -> Self {
        Command {
            line: "show servers state".into(),
            backend: None,
            server: None,
            expect: Expect::Data,
        }
    }

    /// `show stat <backend> 4 -1`: the CSV statistics of the backend's servers.
    pub fn show_stat(backend: &Name) -> Self {
        Command {
            line: format!("show stat {backend} 4 -1"),
            backend: Some(backend.to_string()),
            server: None,
            expect: Expect::Data,
        }
    }

    fn for_server(line: String, backend: &Name, server: &Name, expect: Expect) -> Self {
        Command {
            line,
            backend: Some(backend.to_string()),
            server: Some(server.to_string()),
            expect,
        }
    }

    /// The command line as sent (without the newline).
    pub fn line(&self) -> &str {
        &self.line
    }

    /// Turns HAProxy's answer into the command's output or a typed error.
    fn check(&self, address: &str, answer: &str) -> Result<String, HaproxyError> {
        let backend = self.backend.as_deref().unwrap_or("");
        if let Some(e) = classify(address, &self.line, backend, self.server.as_deref(), answer) {
            return Err(e);
        }
        let text = answer.trim_end_matches('\n');
        let refused = || HaproxyError::Refused {
            command: self.line.clone(),
            message: text.trim().to_string(),
        };
        match self.expect {
            Expect::Empty if !text.trim().is_empty() => Err(refused()),
            Expect::AddrChanged
                if !(text.contains("changed") || text.contains("no need to change")) =>
            {
                Err(refused())
            }
            Expect::Data if text.starts_with("No such") || text.starts_with("Can't find") => {
                Err(refused())
            }
            _ => Ok(text.to_string()),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line)
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A client of one HAProxy runtime API socket. Cheap to clone; holds no connection.
///
/// ```no_run
/// # async fn f() -> Result<(), bluegreen_haproxy::HaproxyError> {
/// use std::time::Duration;
/// use bluegreen_core::Name;
/// use bluegreen_haproxy::{Command, RuntimeAddress, RuntimeClient};
///
/// let client = RuntimeClient::new(
///     RuntimeAddress::Unix("/run/haproxy/admin.sock".into()),
///     Duration::from_secs(5),
/// );
/// let app = Name::new("app").unwrap();
/// for server in client.servers_state(&app).await? {
///     println!("{} {:?} weight {}", server.name, server.op_state, server.weight);
/// }
/// let info = client.send(&Command::raw("show info")?).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RuntimeClient {
    address: RuntimeAddress,
    timeout: Duration,
}

impl RuntimeClient {
    /// A client for `address`; each command (connect to last byte) is bounded by `timeout`.
    pub fn new(address: RuntimeAddress, timeout: Duration) -> Self {
        RuntimeClient { address, timeout }
    }

    /// The socket address.
    pub fn address(&self) -> &RuntimeAddress {
        &self.address
    }

    async fn connect(&self) -> Result<Box<dyn Stream>, HaproxyError> {
        let connect = async {
            match &self.address {
                RuntimeAddress::Unix(path) => tokio::net::UnixStream::connect(path)
                    .await
                    .map(|s| Box::new(s) as Box<dyn Stream>),
                RuntimeAddress::Tcp(addr) => tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map(|s| Box::new(s) as Box<dyn Stream>),
            }
        };
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(source)) => Err(HaproxyError::Connect {
                address: self.address.to_string(),
                source,
            }),
            Err(_) => Err(HaproxyError::Timeout {
                address: self.address.to_string(),
                command: "connect".into(),
                after: self.timeout,
            }),
        }
    }

    /// Sends `command` on a new connection (non-interactive mode) and returns HAProxy's answer,
    /// or the typed error HAProxy's answer means.
    pub async fn send(&self, command: &Command) -> Result<String, HaproxyError> {
        let address = self.address.to_string();
        let exchange = async {
            let mut stream = self.connect().await?;
            let io_err = |source: io::Error| HaproxyError::Io {
                address: address.clone(),
                command: command.line.clone(),
                source,
            };
            stream
                .write_all(format!("{}\n", command.line).as_bytes())
                .await
                .map_err(io_err)?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.map_err(io_err)?;
            if raw.is_empty() {
                return Err(io_err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "HAProxy closed the connection without answering",
                )));
            }
            Ok(String::from_utf8_lossy(&raw).into_owned())
        };
        let answer = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(HaproxyError::Timeout {
                    address,
                    command: command.line.clone(),
                    after: self.timeout,
                })
            }
        };
        command.check(&address, &answer)
    }

    /// Opens an interactive (`prompt` mode) session: several commands on one connection.
    pub async fn session(&self) -> Result<RuntimeSession, HaproxyError> {
        let stream = self.connect().await?;
        let mut session = RuntimeSession {
            stream,
            address: self.address.to_string(),
            timeout: self.timeout,
            buf: Vec::new(),
        };
        session.exchange("prompt").await?;
        Ok(session)
    }

    /// The state of `backend`'s servers (`show servers state <backend>`).
    pub async fn servers_state(&self, backend: &Name) -> Result<Vec<ServerState>, HaproxyError> {
        let cmd = Command::show_servers_state(backend);
        let answer = self.send(&cmd).await?;
        parse_servers_state(cmd.line(), &answer)
    }

    /// The statistics rows of `backend`'s servers (`show stat <backend> 4 -1`).
    pub async fn server_stats(&self, backend: &Name) -> Result<Vec<StatRow>, HaproxyError> {
        let cmd = Command::show_stat(backend);
        let answer = self.send(&cmd).await?;
        parse_stat_csv(cmd.line(), &answer)
    }
}

/// An interactive runtime-API session (`prompt` mode) on one connection.
///
/// HAProxy closes idle sessions after its `stats timeout` (10 s by default); open one per batch
/// of commands.
pub struct RuntimeSession {
    stream: Box<dyn Stream>,
    address: String,
    timeout: Duration,
    buf: Vec<u8>,
}

impl fmt::Debug for RuntimeSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeSession")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl RuntimeSession {
    /// Sends `command` and returns its answer (or the typed error it means).
    pub async fn send(&mut self, command: &Command) -> Result<String, HaproxyError> {
        let answer = self.exchange(&command.line).await?;
        command.check(&self.address, &answer)
    }

    /// The state of `backend`'s servers.
    pub async fn servers_state(
        &mut self,
        backend: &Name,
    ) -> Result<Vec<ServerState>, HaproxyError> {
        let cmd = Command::show_servers_state(backend);
        let answer = self.send(&cmd).await?;
        parse_servers_state(cmd.line(), &answer)
    }

    /// Ends the session (`quit`).
    pub async fn quit(mut self) -> Result<(), HaproxyError> {
        let _ = self.stream.write_all(b"quit\n").await;
        let _ = self.stream.shutdown().await;
        Ok(())
    }

    /// Writes `line`, reads until the prompt, returns the answer without the prompt.
    async fn exchange(&mut self, line: &str) -> Result<String, HaproxyError> {
        let address = self.address.clone();
        let io_err = |source: io::Error| HaproxyError::Io {
            address: address.clone(),
            command: line.to_string(),
            source,
        };
        let work = async {
            self.stream
                .write_all(format!("{line}\n").as_bytes())
                .await
                .map_err(io_err)?;
            let mut chunk = [0u8; 8192];
            loop {
                // An answer ends with "\n> " (an empty answer is just "\n> ").
                if self.buf.ends_with(b"\n> ") {
                    let answer =
                        String::from_utf8_lossy(&self.buf[..self.buf.len() - 2]).into_owned();
                    self.buf.clear();
                    return Ok(answer);
                }
                let n = self.stream.read(&mut chunk).await.map_err(io_err)?;
                if n == 0 {
                    return Err(io_err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "HAProxy closed the interactive session",
                    )));
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(HaproxyError::Timeout {
                address: self.address.clone(),
                command: line.to_string(),
                after: self.timeout,
            }),
        }
    }
}

/// A server's operational state (`srv_op_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpState {
    /// Down (failed checks, or in maintenance).
    Stopped,
    /// Starting (slowstart).
    Starting,
    /// Up.
    Running,
    /// Going down.
    Stopping,
    /// A value this crate does not know.
    Other(u8),
}

impl OpState {
    fn from_code(code: u8) -> Self {
        match code {
            0 => OpState::Stopped,
            1 => OpState::Starting,
            2 => OpState::Running,
            3 => OpState::Stopping,
            n => OpState::Other(n),
        }
    }
}

/// Maintenance bits of `srv_admin_state` (forced, inherited, resolution): `SRV_ADMF_MAINT`.
const ADMIN_MAINT_MASK: u8 = 0x01 | 0x02 | 0x20;
/// Drain bits of `srv_admin_state` (forced, inherited): `SRV_ADMF_DRAIN`.
const ADMIN_DRAIN_MASK: u8 = 0x08 | 0x10;
/// `srv_check_state`: a health check is configured.
const CHECK_CONFIGURED: u16 = 0x02;
/// `srv_check_result`: the last check passed (`CHK_RES_PASSED`).
const CHECK_PASSED: u8 = 3;

/// One row of `show servers state`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerState {
    /// Backend name.
    pub backend: String,
    /// Server name.
    pub name: String,
    /// IP address (`None` when HAProxy shows `-`).
    pub addr: Option<IpAddr>,
    /// Port.
    pub port: u16,
    /// Operational state.
    pub op_state: OpState,
    /// Administrative state bitmask (`srv_admin_state`).
    pub admin_state: u8,
    /// User weight (`srv_uweight`).
    pub weight: u16,
    /// Health-check state bitmask (`srv_check_state`).
    pub check_state: u16,
    /// Result of the last health check (`srv_check_result`: 0 unknown, 1 neutral, 2 failed,
    /// 3 passed, 4 passed conditionally).
    pub check_result: u8,
}

impl ServerState {
    /// In maintenance (forced, inherited or for a failed address resolution).
    pub fn is_maint(&self) -> bool {
        self.admin_state & ADMIN_MAINT_MASK != 0
    }

    /// Draining (forced or inherited).
    pub fn is_drain(&self) -> bool {
        self.admin_state & ADMIN_DRAIN_MASK != 0
    }

    /// In load balancing: neither in maintenance nor draining, with a weight above 0.
    pub fn in_rotation(&self) -> bool {
        !self.is_maint() && !self.is_drain() && self.weight > 0
    }

    /// The weight HAProxy balances with: 0 when out of rotation.
    pub fn effective_weight(&self) -> u16 {
        if self.in_rotation() {
            self.weight
        } else {
            0
        }
    }

    /// A health check is configured for this server.
    pub fn has_check(&self) -> bool {
        self.check_state & CHECK_CONFIGURED != 0
    }

    /// Up, and (when it has a health check) its last check passed.
    pub fn is_healthy(&self) -> bool {
        self.op_state == OpState::Running
            && (!self.has_check() || self.check_result >= CHECK_PASSED)
    }

    /// Short human-readable summary (`ready, up, weight 100, 127.0.0.1:8080`).
    pub fn summary(&self) -> String {
        let admin = if self.is_maint() {
            "maint"
        } else if self.is_drain() {
            "drain"
        } else {
            "ready"
        };
        let op = match self.op_state {
            OpState::Running => "up",
            OpState::Stopped => "down",
            OpState::Starting => "starting",
            OpState::Stopping => "stopping",
            OpState::Other(_) => "unknown",
        };
        let addr = self
            .addr
            .map(|a| std::net::SocketAddr::new(a, self.port).to_string())
            .unwrap_or_else(|| "-".into());
        format!("{admin}, {op}, weight {}, {addr}", self.weight)
    }
}

fn protocol(command: &str, detail: impl Into<String>) -> HaproxyError {
    HaproxyError::Protocol {
        command: command.to_string(),
        detail: detail.into(),
    }
}

/// Parses the answer of `show servers state` (format version 1), by header name.
pub fn parse_servers_state(command: &str, answer: &str) -> Result<Vec<ServerState>, HaproxyError> {
    let mut lines = answer.lines();
    let version = lines.next().unwrap_or("").trim();
    if version != "1" {
        return Err(protocol(
            command,
            format!("expected server-state format version 1, got {version:?}"),
        ));
    }
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix('#'))
        .ok_or_else(|| protocol(command, "missing `# be_id be_name …` header line"))?;
    let names: Vec<&str> = header.split_whitespace().collect();
    let col = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .ok_or_else(|| protocol(command, format!("no column {name:?} in the header")))
    };
    let cols = [
        col("be_name")?,
        col("srv_name")?,
        col("srv_addr")?,
        col("srv_port")?,
        col("srv_op_state")?,
        col("srv_admin_state")?,
        col("srv_uweight")?,
        col("srv_check_state")?,
        col("srv_check_result")?,
    ];
    let mut out = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let get = |i: usize| {
            f.get(cols[i])
                .copied()
                .ok_or_else(|| protocol(command, format!("short line {line:?}")))
        };
        fn num<T: std::str::FromStr>(
            command: &str,
            what: &str,
            v: &str,
        ) -> Result<T, HaproxyError> {
            v.parse()
                .map_err(|_| protocol(command, format!("{what} {v:?} is not a number")))
        }
        let addr = match get(2)? {
            "-" => None,
            a => Some(
                a.parse::<IpAddr>()
                    .map_err(|_| protocol(command, format!("bad srv_addr {a:?}")))?,
            ),
        };
        out.push(ServerState {
            backend: get(0)?.to_string(),
            name: get(1)?.to_string(),
            addr,
            port: num(command, "srv_port", get(3)?)?,
            op_state: OpState::from_code(num(command, "srv_op_state", get(4)?)?),
            admin_state: num(command, "srv_admin_state", get(5)?)?,
            weight: num(command, "srv_uweight", get(6)?)?,
            check_state: num(command, "srv_check_state", get(7)?)?,
            check_result: num(command, "srv_check_result", get(8)?)?,
        });
    }
    Ok(out)
}

/// One row of `show stat`, fields by header name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatRow {
    fields: HashMap<String, String>,
}

impl StatRow {
    /// The raw value of `field` (e.g. `scur`, `status`), `None` when absent or empty.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields
            .get(field)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// `pxname`: the proxy (backend) name.
    pub fn proxy(&self) -> &str {
        self.get("pxname").unwrap_or("")
    }

    /// `svname`: the server name (or `FRONTEND` / `BACKEND`).
    pub fn server(&self) -> &str {
        self.get("svname").unwrap_or("")
    }

    /// `scur`: current sessions.
    pub fn current_sessions(&self) -> u64 {
        self.get("scur").and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    /// `status`: `UP`, `DOWN`, `MAINT`, `DRAIN`, `no check`, …
    pub fn status(&self) -> &str {
        self.get("status").unwrap_or("")
    }
}

/// Splits one CSV line; HAProxy quotes fields that contain a comma or a quote.
fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Parses the CSV answer of `show stat`, by header name.
pub fn parse_stat_csv(command: &str, answer: &str) -> Result<Vec<StatRow>, HaproxyError> {
    let mut lines = answer.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or_else(|| protocol(command, "missing `# pxname,svname,…` CSV header"))?;
    let names = split_csv(header);
    if !names.iter().any(|n| n == "scur") || !names.iter().any(|n| n == "svname") {
        return Err(protocol(command, "CSV header lacks svname or scur"));
    }
    Ok(lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| StatRow {
            fields: names.iter().cloned().zip(split_csv(l)).collect(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: &str = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n3 app 1 blue 127.0.0.1 2 4 100 1 27 15 3 3 6 0 0 0 - 18081 - 0 0 - - 0\n3 app 2 green 127.0.0.2 0 5 1 1 31 1 0 0 14 0 0 0 green.bluegreen.invalid 1 - 0 0 - - 0\n\n";

    #[test]
    fn servers_state_is_parsed_by_header() {
        let s = parse_servers_state("show servers state app", STATE).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "blue");
        assert_eq!(s[0].addr, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(s[0].port, 18081);
        assert_eq!(s[0].op_state, OpState::Running);
        assert!(s[0].in_rotation() && s[0].is_healthy() && !s[0].is_maint());
        assert_eq!(s[0].effective_weight(), 100);
        assert_eq!(s[1].name, "green");
        assert!(s[1].is_maint() && !s[1].in_rotation());
        assert_eq!(s[1].effective_weight(), 0);
        assert!(s[0].summary().starts_with("ready, up, weight 100"));
        // Drain: admin state 12 = config maint (informative) | forced drain.
        let drain = STATE.replace("2 4 100 1 27", "2 12 100 1 27");
        let s = parse_servers_state("x", &drain).unwrap();
        assert!(s[0].is_drain() && !s[0].in_rotation());
    }

    #[test]
    fn malformed_servers_state_is_a_protocol_error() {
        for bad in [
            "",
            "2\n# be_name\n",
            "1\nno header\n",
            "1\n# be_name srv_name\n",
        ] {
            assert!(
                matches!(
                    parse_servers_state("c", bad),
                    Err(HaproxyError::Protocol { .. })
                ),
                "{bad:?}"
            );
        }
        let short = "1\n# be_name srv_name srv_addr srv_port srv_op_state srv_admin_state srv_uweight srv_check_state srv_check_result\napp blue\n";
        assert!(parse_servers_state("c", short).is_err());
    }

    #[test]
    fn stat_csv_is_parsed_by_header_with_quotes() {
        let csv = "# pxname,svname,scur,status,check_desc\napp,blue,3,UP,\"a, \"\"quoted\"\" b\"\napp,green,0,MAINT,\n\n";
        let rows = parse_stat_csv("show stat", csv).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].server(), "blue");
        assert_eq!(rows[0].current_sessions(), 3);
        assert_eq!(rows[0].get("check_desc"), Some("a, \"quoted\" b"));
        assert_eq!(rows[1].status(), "MAINT");
        assert!(parse_stat_csv("c", "No such proxy.\n").is_err());
    }

    #[test]
    fn raw_commands_refuse_separators() {
        for bad in [
            "",
            " ",
            "show info;",
            "show info\n",
            "a\rb",
            "x\u{0}",
            "x\u{1b}[0m",
        ] {
            assert!(Command::raw(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Command::raw("show stat").unwrap().line(), "show stat");
    }

    #[test]
    fn answers_are_checked_against_what_the_command_expects() {
        let app = Name::new("app").unwrap();
        let blue = Name::new("blue").unwrap();
        let set = Command::set_state(&app, &blue, AdminState::Drain);
        assert_eq!(set.line(), "set server app/blue state drain");
        assert_eq!(set.check("s", "\n").unwrap(), "");
        assert!(matches!(
            set.check("s", "No such server.\n\n"),
            Err(HaproxyError::NoSuchServer { .. })
        ));
        assert!(matches!(
            set.check("s", "Require 'backend/server'.\n"),
            Err(HaproxyError::Refused { .. })
        ));
        let addr = Command::set_addr(&app, &blue, "127.0.0.1".parse().unwrap(), 8080);
        assert_eq!(addr.line(), "set server app/blue addr 127.0.0.1 port 8080");
        assert!(addr
            .check(
                "s",
                "IP changed from '127.0.0.1' to '127.0.0.2' by 'stats socket command'\n"
            )
            .is_ok());
        assert!(matches!(
            addr.check("s", "Update for the current server address family is only supported through configuration file\n"),
            Err(HaproxyError::Refused { .. })
        ));
        assert_eq!(
            Command::set_weight(&app, &blue, 30).line(),
            "set weight app/blue 30"
        );
        assert_eq!(
            Command::set_weight(&app, &blue, 1000).line(),
            "set weight app/blue 256"
        );
    }
}
