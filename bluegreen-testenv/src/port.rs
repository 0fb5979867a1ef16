//! Ports for servers that cannot bind port 0 and report what they got.
//!
//! The rule: a server that can bind port 0 does, and the test asks it for its address (the demo
//! backends, the embedded proxy). HAProxy, nginx and PostgreSQL read their listen ports from a
//! configuration file or command line and report nothing back, so for them a port has to be
//! chosen first. Choosing one (the kernel hands out a free port, the probe socket is closed) and
//! hoping it is still free when the server binds it is a race with every other test. The
//! starters in this crate close it in two steps:
//!
//! 1. **Ownership, not reachability.** A server counts as started only when the child process
//!    itself (or one of its descendants) holds a listening socket on every chosen port, read from
//!    `/proc/<pid>/fd` and `/proc/net/tcp{,6}` ([`listening_ports`]). A connect that succeeds is
//!    not enough: it may reach another test's server that took the port first.
//! 2. **Retry on conflict.** When the child exits because a port is in use
//!    ([`StartError::PortInUse`], decided from the server's own log by [`is_addr_in_use`]), the
//!    start is repeated on freshly chosen ports, at most [`START_ATTEMPTS`] times
//!    ([`start_on_fresh_ports`]). Any other failure ends the start at once.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::Path;

/// Bound on the starts of one server when its ports turn out to be taken.
pub const START_ATTEMPTS: usize = 5;

/// Why a server did not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum StartError {
    /// A chosen port was taken by someone else before the server bound it: retry on others.
    PortInUse(String),
    /// Anything else (bad config, missing binary, timeout): no retry.
    Failed(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::PortInUse(s) => write!(f, "port in use: {s}"),
            StartError::Failed(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for StartError {}

impl StartError {
    /// [`StartError::PortInUse`] when `log` says an address was in use, else
    /// [`StartError::Failed`]; both carry `what` and the log.
    pub fn from_log(what: &str, log: &str) -> StartError {
        let text = format!("{what}:\n{log}");
        if is_addr_in_use(log) {
            StartError::PortInUse(text)
        } else {
            StartError::Failed(text)
        }
    }
}

/// True when a server's log says it could not bind because the address is in use (the wording
/// of `EADDRINUSE` that HAProxy, nginx, PostgreSQL and Prometheus print).
pub fn is_addr_in_use(log: &str) -> bool {
    // Prometheus (Go) writes it in lower case: `bind: address already in use`.
    log.contains("Address already in use")
        || log.contains("Address in use")
        || log.contains("address already in use")
}

/// A port the kernel had free a moment ago. Private on purpose: only [`start_on_fresh_ports`]
/// uses it, where losing the race means a retry, never a wrong server.
fn candidate() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A loopback address where nothing listens, for tests of unreachable servers: the port is bound
/// but not listening for as long as the guard lives, so a connect is refused and no other process
/// can take the port meanwhile.
#[derive(Debug)]
pub struct RefusedAddr {
    _socket: tokio::net::TcpSocket,
    addr: std::net::SocketAddr,
}

impl RefusedAddr {
    /// Binds a fresh loopback port without listening on it.
    ///
    /// # Panics
    /// No loopback port can be bound.
    pub fn new() -> RefusedAddr {
        let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("binding a loopback port");
        let addr = socket.local_addr().expect("its address");
        RefusedAddr {
            _socket: socket,
            addr,
        }
    }

    /// The address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Default for RefusedAddr {
    fn default() -> Self {
        RefusedAddr::new()
    }
}

/// Calls `start` with `N` distinct freshly chosen loopback ports, again on new ports while it
/// fails with [`StartError::PortInUse`], at most [`START_ATTEMPTS`] times.
///
/// # Errors
/// The first [`StartError::Failed`], or the last conflict after the attempts are used up.
pub fn start_on_fresh_ports<T, const N: usize>(
    mut start: impl FnMut([u16; N]) -> Result<T, StartError>,
) -> Result<T, StartError> {
    let mut last = None;
    for _ in 0..START_ATTEMPTS {
        let ports = fresh_ports::<N>()?;
        match start(ports) {
            Err(StartError::PortInUse(why)) => last = Some(why),
            other => return other,
        }
    }
    Err(StartError::Failed(format!(
        "ports in use on all {START_ATTEMPTS} attempts; last: {}",
        last.unwrap_or_default()
    )))
}

/// [`start_on_fresh_ports`] for a start that is async (e.g. a deploy that starts a program on a
/// fixed port).
///
/// # Errors
/// As [`start_on_fresh_ports`].
pub async fn start_on_fresh_ports_async<T, F, Fut, const N: usize>(
    mut start: F,
) -> Result<T, StartError>
where
    F: FnMut([u16; N]) -> Fut,
    Fut: std::future::Future<Output = Result<T, StartError>>,
{
    let mut last = None;
    for _ in 0..START_ATTEMPTS {
        match start(fresh_ports::<N>()?).await {
            Err(StartError::PortInUse(why)) => last = Some(why),
            other => return other,
        }
    }
    Err(StartError::Failed(format!(
        "ports in use on all {START_ATTEMPTS} attempts; last: {}",
        last.unwrap_or_default()
    )))
}

fn fresh_ports<const N: usize>() -> Result<[u16; N], StartError> {
    let mut ports = [0u16; N];
    let mut seen = HashSet::new();
    let mut i = 0;
    // Distinct ports; the kernel rarely hands out the same one twice in a row.
    for _ in 0..N * 10 {
        if i == N {
            break;
        }
        let p = candidate().map_err(|e| StartError::Failed(format!("choosing a port: {e}")))?;
        if seen.insert(p) {
            ports[i] = p;
            i += 1;
        }
    }
    if i < N {
        return Err(StartError::Failed("could not choose distinct ports".into()));
    }
    Ok(ports)
}

/// The TCP ports on which process `pid` or one of its descendants holds a listening socket
/// (Linux `/proc`). Empty when `/proc` cannot be read.
pub fn listening_ports(pid: u32) -> HashSet<u16> {
    let mut inodes = HashSet::new();
    for p in with_descendants(pid) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{p}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut ports = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
                continue;
            }
            if let Some(port) = f[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            {
                ports.insert(port);
            }
        }
    }
    ports
}

/// True when `pid` (or a descendant) listens on every one of `ports`.
pub fn owns_ports(pid: u32, ports: &[u16]) -> bool {
    let held = listening_ports(pid);
    ports.iter().all(|p| held.contains(p))
}

/// Waits until the server `child` is up: it (or a descendant) listens on every one of `ports` and
/// `ready` holds (e.g. its log says so), polling every 20 ms, bounded by `timeout`. `what` names
/// the server and `log` reads its log, for the errors.
///
/// # Errors
/// The child exited ([`StartError::PortInUse`] when its log says a port was taken), or the bound
/// passed ([`StartError::Failed`]; the caller stops the child).
pub fn wait_serving(
    child: &mut std::process::Child,
    ports: &[u16],
    timeout: std::time::Duration,
    what: &str,
    mut ready: impl FnMut() -> bool,
    log: impl Fn() -> String,
) -> Result<(), StartError> {
    let start = std::time::Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(StartError::from_log(
                &format!("{what} exited with {status}"),
                &log(),
            ));
        }
        if owns_ports(child.id(), ports) && ready() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(StartError::Failed(format!(
                "{what} not serving on {ports:?} within {timeout:?}:\n{}",
                log()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `pid` and every process below it, from the parent pids in `/proc/*/stat`.
fn with_descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) =
                std::fs::read_to_string(Path::new("/proc").join(p.to_string()).join("stat"))
            else {
                continue;
            };
            // `pid (comm) state ppid …`: comm may hold spaces, so read after the last `)`.
            if let Some(ppid) = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok())
            {
                parent_of.push((p, ppid));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        for &(p, pp) in &parent_of {
            if pp == parent && !out.contains(&p) {
                out.push(p);
            }
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_of_this_process_is_found_and_a_closed_one_is_not() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(owns_ports(std::process::id(), &[port]));
        drop(l);
        assert!(!owns_ports(std::process::id(), &[port]));
    }

    #[test]
    fn a_refused_addr_refuses_connections() {
        let r = RefusedAddr::new();
        let err = std::net::TcpStream::connect(r.addr()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(TcpListener::bind(r.addr()).is_err(), "the port stays taken");
    }

    #[test]
    fn a_conflict_is_retried_on_fresh_ports_and_other_failures_are_not() {
        let mut seen = Vec::new();
        let got = start_on_fresh_ports(|[a, b]: [u16; 2]| {
            assert_ne!(a, b);
            seen.push(a);
            if seen.len() < 3 {
                Err(StartError::from_log("x", "bind: Address already in use"))
            } else {
                Ok(a)
            }
        })
        .unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(got, seen[2]);

        let mut calls = 0;
        let err = start_on_fresh_ports(|[_]: [u16; 1]| -> Result<(), _> {
            calls += 1;
            Err(StartError::from_log("x", "syntax error"))
        })
        .unwrap_err();
        assert_eq!(calls, 1);
        assert!(matches!(err, StartError::Failed(_)), "{err}");

        let mut calls = 0;
        let err = start_on_fresh_ports(|[_]: [u16; 1]| -> Result<(), _> {
            calls += 1;
            Err(StartError::PortInUse("taken".into()))
        })
        .unwrap_err();
        assert_eq!(calls, START_ATTEMPTS);
        assert!(err.to_string().contains("taken"), "{err}");
    }
}
