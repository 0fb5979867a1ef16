//! The load generator of every zero-downtime test and benchmark: keep-alive HTTP/1.1 clients that
//! count every failed request and never retry. A request that was sent and did not get a complete
//! 2xx answer is a failure, as it is for a client that does not retry (non-idempotent requests).
//!
//! Answers are attributed to a slot (`x-bluegreen-slot`), a version (`x-bluegreen-version`) and
//! an instance (`x-bluegreen-instance`, the demo app's listen address), the headers the demo app
//! sets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Bound on one request (connect to last byte).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How many latencies [`LoadStats::latencies_us`] keeps (16 MB).
const MAX_LATENCIES: usize = 2_000_000;

/// How many failure reasons [`LoadStats::errors`] keeps.
const KEPT_ERRORS: usize = 10;

/// What the clients send.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LoadOptions {
    /// Concurrent keep-alive clients.
    pub clients: usize,
    /// The request path.
    pub path: String,
    /// Pause of each client between two requests.
    pub pause: Duration,
    /// Bound on the whole run: the clients stop by themselves after it, whoever forgot to stop
    /// them. Default 5 minutes.
    pub limit: Duration,
    /// Send `POST /write?id=N` (the demo app's database write, a new `N` per request) instead of
    /// `GET path`; the ids answered 2xx are kept in [`LoadStats::acked`].
    pub writes: bool,
}

impl LoadOptions {
    /// `clients` clients sending `GET /` back to back.
    pub fn new(clients: usize) -> Self {
        LoadOptions {
            clients: clients.max(1),
            path: "/".into(),
            pause: Duration::ZERO,
            limit: Duration::from_secs(300),
            writes: false,
        }
    }

    /// With another request path.
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// Sending the demo app's database writes (`POST /write?id=N`, `N` counting up from 1)
    /// instead of `GET`s: every id answered 2xx is in [`LoadStats::acked`], so a test can check
    /// that each acknowledged write is in the database.
    pub fn writes(mut self) -> Self {
        self.writes = true;
        self
    }

    /// With a pause between two requests of a client.
    pub fn with_pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }
}

/// What the clients saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadStats {
    /// Requests answered with a complete 2xx answer.
    pub ok: u64,
    /// Requests that failed (connection error, reset, timeout, non-2xx, truncated answer).
    pub failed: u64,
    /// Complete answers per status code (a request without a complete answer is in none).
    pub statuses: BTreeMap<u16, u64>,
    /// Answers carrying `x-bluegreen-slot: blue`.
    pub blue: u64,
    /// Answers carrying `x-bluegreen-slot: green`.
    pub green: u64,
    /// Answers per `x-bluegreen-version` (`?` when absent).
    pub versions: BTreeMap<String, u64>,
    /// Answers per `x-bluegreen-instance` (the demo app's `host:port`; `?` when absent): which
    /// endpoint of a slot served them.
    pub instances: BTreeMap<String, u64>,
    /// The first few failure reasons.
    pub errors: Vec<String>,
    /// With [`LoadOptions::writes`]: the ids whose write was answered 2xx.
    pub acked: Vec<i64>,
    /// Each request's latency (send to complete answer, failed ones included), in microseconds,
    /// in completion order; the first two million.
    pub latencies_us: Vec<u64>,
}

impl LoadStats {
    /// `ok + failed`.
    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }

    /// The `q` quantile (0.0 ..= 1.0) of [`latencies_us`](Self::latencies_us); zero when empty.
    pub fn latency(&self, q: f64) -> Duration {
        let mut v = self.latencies_us.clone();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v.sort_unstable();
        let i = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        Duration::from_micros(v[i])
    }

    fn fail(&mut self, why: String) {
        self.failed += 1;
        if self.errors.len() < KEPT_ERRORS {
            self.errors.push(why);
        }
    }
}

/// Running clients; [`Load::finish`] stops them and returns what they saw. Dropping a `Load`
/// stops the clients too.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<LoadStats>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts the clients against `addr`.
    pub fn start(addr: SocketAddr, options: LoadOptions) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(LoadStats::default()));
        let kind = if options.writes {
            Kind::Writes(Arc::new(AtomicI64::new(0)))
        } else {
            Kind::Get(format!(
                "GET {} HTTP/1.1\r\nHost: {addr}\r\n\r\n",
                options.path
            ))
        };
        let tasks = (0..options.clients)
            .map(|_| {
                let (stop, stats, kind) = (stop.clone(), stats.clone(), kind.clone());
                let deadline = tokio::time::Instant::now() + options.limit;
                tokio::spawn(client(addr, kind, options.pause, deadline, stop, stats))
            })
            .collect();
        Load { stop, stats, tasks }
    }

    /// What the clients saw so far (they keep running).
    pub fn stats(&self) -> LoadStats {
        lock(&self.stats).clone()
    }

    /// Stops the clients (each finishes its current request) and returns the totals.
    pub async fn finish(mut self) -> LoadStats {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.tasks) {
            if let Err(e) = t.await {
                lock(&self.stats).fail(format!("client task panicked: {e}"));
            }
        }
        self.stats()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn lock(m: &Mutex<LoadStats>) -> std::sync::MutexGuard<'_, LoadStats> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

enum Outcome {
    Ok {
        slot: Option<String>,
        version: Option<String>,
        instance: Option<String>,
        keep: bool,
    },
    Failed(String),
}

/// What a client sends.
#[derive(Clone)]
enum Kind {
    /// The same `GET` every time.
    Get(String),
    /// `POST /write?id=N`, `N` from a counter shared by the clients.
    Writes(Arc<AtomicI64>),
}

async fn client(
    addr: SocketAddr,
    kind: Kind,
    pause: Duration,
    deadline: tokio::time::Instant,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<LoadStats>>,
) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
        let (req, id) = match &kind {
            Kind::Get(req) => (req.clone(), None),
            Kind::Writes(next) => {
                let id = next.fetch_add(1, Ordering::Relaxed) + 1;
                (
                    format!(
                        "POST /write?id={id} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
                    ),
                    Some(id),
                )
            }
        };
        let started = tokio::time::Instant::now();
        let mut answered = 0u16;
        let outcome =
            match tokio::time::timeout(REQUEST_TIMEOUT, one(addr, &mut conn, &req, &mut answered))
                .await
            {
                Ok(o) => o,
                Err(_) => Outcome::Failed("request timed out".into()),
            };
        let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        {
            let mut s = lock(&stats);
            if s.latencies_us.len() < MAX_LATENCIES {
                s.latencies_us.push(took);
            }
            if answered != 0 {
                *s.statuses.entry(answered).or_default() += 1;
            }
        }
        match outcome {
            Outcome::Ok {
                slot,
                version,
                instance,
                keep,
            } => {
                let mut s = lock(&stats);
                s.ok += 1;
                if let Some(id) = id {
                    s.acked.push(id);
                }
                match slot.as_deref() {
                    Some("blue") => s.blue += 1,
                    Some("green") => s.green += 1,
                    _ => {}
                }
                *s.versions
                    .entry(version.unwrap_or_else(|| "?".into()))
                    .or_default() += 1;
                *s.instances
                    .entry(instance.unwrap_or_else(|| "?".into()))
                    .or_default() += 1;
                if !keep {
                    conn = None;
                }
            }
            Outcome::Failed(why) => {
                lock(&stats).fail(why);
                conn = None;
            }
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// One request; `answered` is set to the status of a complete answer.
async fn one(
    addr: SocketAddr,
    conn: &mut Option<BufReader<TcpStream>>,
    req: &str,
    answered: &mut u16,
) -> Outcome {
    if conn.is_none() {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                *conn = Some(BufReader::new(s));
            }
            Err(e) => return Outcome::Failed(format!("connect: {e}")),
        }
    }
    let Some(c) = conn.as_mut() else {
        return Outcome::Failed("no connection".into());
    };
    if let Err(e) = c.get_mut().write_all(req.as_bytes()).await {
        return Outcome::Failed(format!("write: {e}"));
    }
    let mut status = 0u16;
    let mut len: Option<usize> = None;
    let (mut slot, mut version, mut instance) = (None, None, None);
    let mut keep = true;
    let mut line = String::new();
    let mut first = true;
    loop {
        line.clear();
        match c.read_line(&mut line).await {
            Ok(0) => return Outcome::Failed("connection closed before the answer".into()),
            Ok(_) => {}
            Err(e) => return Outcome::Failed(format!("read: {e}")),
        }
        let l = line.trim_end();
        if first {
            first = false;
            status = l
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            continue;
        }
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            match k.as_str() {
                "content-length" => len = v.parse().ok(),
                "x-bluegreen-slot" => slot = Some(v.to_string()),
                "x-bluegreen-version" => version = Some(v.to_string()),
                "x-bluegreen-instance" => instance = Some(v.to_string()),
                "connection" if v.eq_ignore_ascii_case("close") => keep = false,
                "transfer-encoding" => {
                    return Outcome::Failed("chunked answers are not supported".into())
                }
                _ => {}
            }
        }
    }
    let Some(len) = len else {
        return Outcome::Failed(format!("status {status} without content-length"));
    };
    let mut body = vec![0u8; len];
    if let Err(e) = c.read_exact(&mut body).await {
        return Outcome::Failed(format!("truncated body: {e}"));
    }
    *answered = status;
    if (200..300).contains(&status) {
        Outcome::Ok {
            slot,
            version,
            instance,
            keep,
        }
    } else {
        Outcome::Failed(format!("status {status}"))
    }
}
