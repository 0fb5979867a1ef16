//! A keep-alive HTTP/1.1 load generator that counts every failed request and never retries: a
//! request that was sent and did not get a complete 2xx answer is a failure, as it is for a client
//! that does not retry (non-idempotent requests). Used by this crate's tests and benchmark.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Bound on one request (connect to last byte).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What the clients saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadStats {
    /// Requests answered with a complete 2xx answer.
    pub ok: u64,
    /// Requests that failed (connection error, reset, timeout, non-2xx, truncated answer).
    pub failed: u64,
    /// Answers carrying `x-bluegreen-slot: blue`.
    pub blue: u64,
    /// Answers carrying `x-bluegreen-slot: green`.
    pub green: u64,
    /// The first few failure reasons.
    pub errors: Vec<String>,
}

impl LoadStats {
    /// `ok + failed`.
    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }

    fn merge(&mut self, o: LoadStats) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.blue += o.blue;
        self.green += o.green;
        for e in o.errors {
            if self.errors.len() < 10 {
                self.errors.push(e);
            }
        }
    }
}

/// Running clients; [`Load::finish`] stops them and adds up what they saw.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<LoadStats>>,
}

impl Load {
    /// Starts `clients` keep-alive clients sending `GET path` to `addr` in a loop, each pausing
    /// `pause` between requests.
    pub fn start(addr: SocketAddr, path: &str, clients: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                let stop = stop.clone();
                let path = path.to_string();
                tokio::spawn(async move { client(addr, path, pause, stop).await })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stops the clients (each finishes its current request) and returns the totals.
    pub async fn finish(self) -> LoadStats {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = LoadStats::default();
        for t in self.tasks {
            match t.await {
                Ok(s) => total.merge(s),
                Err(e) => {
                    total.failed += 1;
                    total.errors.push(format!("client task panicked: {e}"));
                }
            }
        }
        total
    }
}

enum Outcome {
    Ok { slot: Option<String>, keep: bool },
    Failed(String),
}

async fn client(
    addr: SocketAddr,
    path: String,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> LoadStats {
    let mut stats = LoadStats::default();
    let mut conn: Option<BufReader<TcpStream>> = None;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    while !stop.load(Ordering::Relaxed) {
        let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, one(addr, &mut conn, &req)).await
        {
            Ok(o) => o,
            Err(_) => Outcome::Failed("request timed out".into()),
        };
        match outcome {
            Outcome::Ok { slot, keep } => {
                stats.ok += 1;
                match slot.as_deref() {
                    Some("blue") => stats.blue += 1,
                    Some("green") => stats.green += 1,
                    _ => {}
                }
                if !keep {
                    conn = None;
                }
            }
            Outcome::Failed(why) => {
                stats.failed += 1;
                if stats.errors.len() < 10 {
                    stats.errors.push(why);
                }
                conn = None;
            }
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    stats
}

async fn one(addr: SocketAddr, conn: &mut Option<BufReader<TcpStream>>, req: &str) -> Outcome {
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
    let mut slot = None;
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
    if (200..300).contains(&status) {
        Outcome::Ok { slot, keep }
    } else {
        Outcome::Failed(format!("status {status}"))
    }
}
