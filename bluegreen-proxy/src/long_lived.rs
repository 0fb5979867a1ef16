//! Long-lived (upgraded) connections: counted per slot apart from requests, and closed
//! gracefully at the drain deadline. A WebSocket gets a close frame `1001 going away` from the
//! proxy at a frame boundary, so the client knows to reconnect (and reaches the new slot).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bluegreen_core::Slot;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// How long a closing tunnel waits for the frame in progress to end (each direction), and then
/// for the peers to answer the close, before the connection is cut.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// WebSocket close code 1001 "going away".
const GOING_AWAY: [u8; 2] = [0x03, 0xE9];

/// Counters and close signals of both slots' long-lived connections.
pub(crate) struct LongLived {
    open: [AtomicU64; 2],
    closed: [AtomicU64; 2],
    close: [watch::Sender<u64>; 2],
}

fn idx(slot: Slot) -> usize {
    match slot {
        Slot::Blue => 0,
        Slot::Green => 1,
    }
}

impl LongLived {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(LongLived {
            open: [AtomicU64::new(0), AtomicU64::new(0)],
            closed: [AtomicU64::new(0), AtomicU64::new(0)],
            close: [watch::Sender::new(0), watch::Sender::new(0)],
        })
    }

    /// Registers a connection to `slot`; it counts as open until the guard is dropped.
    pub(crate) fn open(self: &Arc<Self>, slot: Slot) -> LongLivedGuard {
        self.open[idx(slot)].fetch_add(1, Ordering::AcqRel);
        LongLivedGuard {
            owner: Arc::clone(self),
            slot,
            close: self.close[idx(slot)].subscribe(),
        }
    }

    /// Open connections to `slot`.
    pub(crate) fn open_now(&self, slot: Slot) -> u64 {
        self.open[idx(slot)].load(Ordering::Acquire)
    }

    /// Connections to `slot` the proxy closed gracefully so far.
    pub(crate) fn closed(&self, slot: Slot) -> u64 {
        self.closed[idx(slot)].load(Ordering::Relaxed)
    }

    /// Counts `n` connections to `slot` closed gracefully by other means (HTTP/2 GOAWAY).
    pub(crate) fn add_closed(&self, slot: Slot, n: u64) {
        self.closed[idx(slot)].fetch_add(n, Ordering::Relaxed);
    }

    /// Asks every connection to `slot` open now to close.
    pub(crate) fn close_all(&self, slot: Slot) {
        self.close[idx(slot)].send_modify(|generation| *generation += 1);
    }
}

/// One open long-lived connection.
pub(crate) struct LongLivedGuard {
    owner: Arc<LongLived>,
    slot: Slot,
    close: watch::Receiver<u64>,
}

impl LongLivedGuard {
    /// Resolves when the connection is asked to close.
    pub(crate) async fn close_requested(&mut self) {
        // The sender lives as long as `owner`, which this guard keeps alive.
        let _ = self.close.changed().await;
    }

    /// Counts the connection as closed gracefully.
    pub(crate) fn closed_gracefully(&self) {
        self.owner.closed[idx(self.slot)].fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for LongLivedGuard {
    fn drop(&mut self) {
        self.owner.open[idx(self.slot)].fetch_sub(1, Ordering::AcqRel);
    }
}

/// The client connections of a proxy and, for each, the requests in flight per slot: at the
/// drain deadline, an HTTP/2 connection still carrying streams to the old slot is shut down
/// gracefully (GOAWAY: the streams in flight finish, the client opens new ones on a new
/// connection).
#[derive(Default)]
pub(crate) struct Connections {
    next: AtomicU64,
    open: std::sync::Mutex<std::collections::HashMap<u64, Arc<Connection>>>,
}

/// One client connection.
#[derive(Default)]
pub(crate) struct Connection {
    http2: std::sync::atomic::AtomicBool,
    in_flight: [AtomicU64; 2],
    goaway: tokio::sync::Notify,
}

impl Connection {
    /// Notes a request of this connection, in flight to `slot` until the guard is dropped.
    pub(crate) fn start(self: &Arc<Self>, slot: Slot, http2: bool) -> ConnRequest {
        if http2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        self.in_flight[idx(slot)].fetch_add(1, Ordering::AcqRel);
        ConnRequest {
            conn: Arc::clone(self),
            slot,
        }
    }

    /// Resolves when the connection is to be shut down gracefully.
    pub(crate) async fn goaway_requested(&self) {
        self.goaway.notified().await;
    }
}

/// A request in flight on one connection.
pub(crate) struct ConnRequest {
    conn: Arc<Connection>,
    slot: Slot,
}

impl Drop for ConnRequest {
    fn drop(&mut self) {
        self.conn.in_flight[idx(self.slot)].fetch_sub(1, Ordering::AcqRel);
    }
}

/// Removes a connection from the registry when its task ends.
pub(crate) struct Registered {
    owner: Arc<Connections>,
    id: u64,
    pub(crate) conn: Arc<Connection>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.owner
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Connections {
    pub(crate) fn register(self: &Arc<Self>) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Connection::default());
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::clone(&conn));
        Registered {
            owner: Arc::clone(self),
            id,
            conn,
        }
    }

    fn http2_with_streams_to(&self, slot: Slot) -> Vec<Arc<Connection>> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|c| {
                c.http2.load(Ordering::Relaxed)
                    && c.in_flight[idx(slot)].load(Ordering::Acquire) > 0
            })
            .cloned()
            .collect()
    }

    /// HTTP/2 connections with streams in flight to `slot` now.
    pub(crate) fn http2_to(&self, slot: Slot) -> u64 {
        self.http2_with_streams_to(slot).len() as u64
    }

    /// Sends GOAWAY on every HTTP/2 connection with streams in flight to `slot`; how many.
    pub(crate) fn goaway(&self, slot: Slot) -> u64 {
        let conns = self.http2_with_streams_to(slot);
        for c in &conns {
            c.goaway.notify_one();
        }
        conns.len() as u64
    }
}

/// Follows WebSocket frame boundaries in a byte stream (RFC 6455 §5.2) without buffering
/// payloads: the header bytes seen so far, then how much payload is left.
#[derive(Debug, Default)]
pub(crate) struct Frames {
    header: Vec<u8>,
    payload_left: u64,
}

impl Frames {
    /// Whether the bytes fed so far end exactly at a frame boundary.
    pub(crate) fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.payload_left == 0
    }

    /// The header length once its fixed part is known, else `None`.
    fn header_len(&self) -> Option<usize> {
        let b1 = *self.header.get(1)?;
        let ext = match b1 & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
        Some(2 + ext + mask)
    }

    fn finish_header(&mut self) {
        let b1 = self.header[1];
        self.payload_left = match b1 & 0x7F {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(n)
            }
            n => u64::from(n),
        };
        self.header.clear();
    }

    /// Takes in `bytes`; with `stop_at_boundary`, stops at the first frame boundary reached
    /// after at least one byte. Returns how many bytes were consumed.
    pub(crate) fn feed(&mut self, bytes: &[u8], stop_at_boundary: bool) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            if self.payload_left > 0 {
                let take =
                    (bytes.len() - i).min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                i += take;
                self.payload_left -= take as u64;
            } else {
                self.header.push(bytes[i]);
                i += 1;
                if let Some(len) = self.header_len() {
                    if self.header.len() == len {
                        self.finish_header();
                    }
                }
            }
            if stop_at_boundary && self.at_boundary() {
                break;
            }
        }
        i
    }
}

/// A close frame with code 1001; masked (as a client must send it) when `masked`.
pub(crate) fn going_away_frame(masked: bool) -> Vec<u8> {
    if !masked {
        return vec![0x88, 0x02, GOING_AWAY[0], GOING_AWAY[1]];
    }
    // Not a secret: the mask only keeps intermediaries from misreading the payload.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0x5a5a_5a5a);
    let key = nanos.to_be_bytes();
    vec![
        0x88,
        0x82,
        key[0],
        key[1],
        key[2],
        key[3],
        GOING_AWAY[0] ^ key[0],
        GOING_AWAY[1] ^ key[1],
    ]
}

/// How one direction of a WebSocket tunnel ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pumped {
    /// The reader reached its end.
    Eof,
    /// Asked to close: the frame in progress ended and a `1001` close frame was written.
    Closed,
}

/// Copies `r` to `w` frame by frame. Once `closing` turns true, the frame in progress is
/// finished, a close frame `1001` (masked when `mask`) is written and the copy ends.
pub(crate) async fn pump<R, W>(
    mut r: R,
    mut w: W,
    mask: bool,
    mut closing: watch::Receiver<bool>,
) -> std::io::Result<Pumped>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frames = Frames::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut stop = *closing.borrow();
    loop {
        if stop && frames.at_boundary() {
            w.write_all(&going_away_frame(mask)).await?;
            w.flush().await?;
            return Ok(Pumped::Closed);
        }
        let n = tokio::select! {
            changed = closing.changed(), if !stop => {
                stop = changed.is_err() || *closing.borrow();
                continue;
            }
            n = r.read(&mut buf) => n?,
        };
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(Pumped::Eof);
        }
        let upto = frames.feed(&buf[..n], stop);
        // With `stop`, bytes after the boundary are dropped: the close frame is the last one
        // the peer gets.
        w.write_all(&buf[..upto]).await?;
        w.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8], masked: bool) -> Vec<u8> {
        let mut f = vec![0x82];
        let m = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n < 65536 => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frame_boundaries_are_found_across_any_split() {
        let mut stream = Vec::new();
        let sizes = [0usize, 5, 125, 126, 300, 70_000];
        for (i, n) in sizes.iter().enumerate() {
            stream.extend(frame(&vec![7u8; *n], i % 2 == 0));
        }
        for chunk in [1usize, 3, 7, 1000, stream.len()] {
            let mut f = Frames::default();
            let mut boundaries = 0;
            let mut pos = 0;
            while pos < stream.len() {
                let end = (pos + chunk).min(stream.len());
                let mut slice = &stream[pos..end];
                while !slice.is_empty() {
                    let used = f.feed(slice, true);
                    if f.at_boundary() {
                        boundaries += 1;
                    }
                    slice = &slice[used..];
                }
                pos = end;
            }
            assert!(f.at_boundary(), "chunk {chunk}");
            assert_eq!(boundaries, sizes.len(), "chunk {chunk}");
        }
    }

    #[test]
    fn the_close_frame_says_going_away() {
        assert_eq!(going_away_frame(false), vec![0x88, 2, 0x03, 0xE9]);
        let m = going_away_frame(true);
        assert_eq!(&m[..2], &[0x88, 0x82]);
        assert_eq!([m[6] ^ m[2], m[7] ^ m[3]], [0x03, 0xE9]);
    }

    #[tokio::test]
    async fn a_closing_pump_finishes_the_frame_in_progress_then_sends_1001() {
        let (mut peer_w, r) = tokio::io::duplex(1 << 16);
        let (w, mut peer_r) = tokio::io::duplex(1 << 16);
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(pump(r, w, false, rx));
        let whole = frame(b"hello", false);
        peer_w.write_all(&whole[..3]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send_replace(true);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The rest of the frame, and the start of one that must not be forwarded.
        peer_w.write_all(&whole[3..]).await.unwrap();
        peer_w.write_all(&frame(b"late", false)).await.unwrap();
        assert_eq!(task.await.unwrap().unwrap(), Pumped::Closed);
        let mut out = Vec::new();
        drop(peer_w);
        peer_r.read_to_end(&mut out).await.unwrap();
        let mut expected = whole.clone();
        expected.extend(going_away_frame(false));
        assert_eq!(out, expected);
    }
}
