//! The data path: accept loop, per-request routing, forwarding, upgrades.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{
    Entry, HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, RETRY_AFTER, SET_COOKIE, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use hyper::http::uri::PathAndQuery;
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ProxyConfig;
use crate::long_lived::{
    pump, ConnRequest, Connection, Connections, LongLived, LongLivedGuard, Pumped, CLOSE_GRACE,
};
use crate::metrics::{Failure, InFlight, Stats};
use crate::pause::{PauseGate, Refused};
use crate::pool::{Checkin, ConnectError, Pools};
use crate::routing::{Names, RoundRobin, Table, Upstream};
use crate::shadow::{Shadow, Tee};

/// Everything the request path needs, shared by all connections.
pub(crate) struct State {
    pub(crate) config: ProxyConfig,
    pub(crate) table: ArcSwap<Table>,
    /// Serializes writers of `table` (readers never take it).
    pub(crate) writer: Mutex<()>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) gate: PauseGate,
    pub(crate) long_lived: Arc<LongLived>,
    pub(crate) connections: Arc<Connections>,
    pub(crate) shadow: Option<Arc<Shadow>>,
    /// The upstreams' connection pools, by endpoint (for installing new tables).
    pub(crate) pools: Pools,
    rr: RoundRobin,
}

impl State {
    pub(crate) fn new(config: ProxyConfig) -> Self {
        let shadow = config
            .shadow
            .clone()
            .map(|s| Shadow::new(s, config.connect_timeout));
        State {
            config,
            table: ArcSwap::from_pointee(Table::default()),
            writer: Mutex::new(()),
            stats: Stats::new(),
            gate: PauseGate::new(),
            long_lived: LongLived::new(),
            connections: Arc::default(),
            shadow,
            pools: Pools::default(),
            rr: RoundRobin::default(),
        }
    }
}

/// Accepts connections until `shutdown` changes (or its sender is dropped), then shuts down
/// gracefully: open requests get `shutdown_timeout` to finish.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Each connection task holds a receiver: the proxy has stopped once all are gone.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.idle_timeout)
        .keep_alive(true);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2.timer(TokioTimer::new());
    let builders = Arc::new((http1, http2));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let state = Arc::clone(&state);
                    let builders = Arc::clone(&builders);
                    let stop = stop_rx.clone();
                    tokio::spawn(connection(stream, peer, state, builders, stop));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    drop(stop_rx);
    stop_tx.send_replace(true);
    if tokio::time::timeout(state.config.shutdown_timeout, stop_tx.closed())
        .await
        .is_err()
    {
        tracing::warn!("proxy shutdown timed out with connections still open");
    }
}

/// The HTTP/2 connection preface starts with the method `PRI`, reserved for it (RFC 9113 §3.4):
/// no HTTP/1.1 request starts so.
const H2_PREFACE_START: &[u8] = b"PRI";

/// Which protocol a new connection speaks, from its first bytes (peeked, not read); `None` when
/// it closed or sent nothing within `wait`.
async fn sniff(stream: &tokio::net::TcpStream, wait: Duration) -> Option<Version> {
    let mut buf = [0u8; 3];
    // Set when the bytes were not all there at once (usually they are: no timer then).
    let mut deadline = None;
    loop {
        let now = std::future::poll_fn(|cx| {
            let mut read = tokio::io::ReadBuf::new(&mut buf);
            Poll::Ready(match stream.poll_peek(cx, &mut read) {
                Poll::Ready(peeked) => Some(peeked),
                Poll::Pending => None,
            })
        })
        .await;
        let n = match now {
            Some(peeked) => peeked.ok()?,
            None => {
                let until = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + wait);
                tokio::time::timeout_at(until, stream.peek(&mut buf))
                    .await
                    .ok()?
                    .ok()?
            }
        };
        if n == 0 {
            return None;
        }
        if buf[..n] != H2_PREFACE_START[..n] {
            return Some(Version::HTTP_11);
        }
        if n == H2_PREFACE_START.len() {
            return Some(Version::HTTP_2);
        }
        // A preface split after one or two bytes: wait for the rest (peek does not wait for
        // more than it has).
        let until = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + wait);
        if tokio::time::Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Serves one client connection with the HTTP/1.1 or HTTP/2 server, as its first bytes say.
async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    builders: Arc<(
        hyper::server::conn::http1::Builder,
        hyper::server::conn::http2::Builder<TokioExecutor>,
    )>,
    mut stop: watch::Receiver<bool>,
) {
    let registered = state.connections.register();
    let version = tokio::select! {
        v = sniff(&stream, state.config.idle_timeout) => v,
        // Stopping: a connection that has not sent a byte yet is closed at once.
        _ = stop.changed() => None,
    };
    let Some(version) = version else {
        return;
    };
    let this = Arc::clone(&registered.conn);
    // The client's address as `X-Forwarded-For` writes it, once per connection.
    let client = Peer::new(peer);
    let service = hyper::service::service_fn(move |req| {
        handle(Arc::clone(&state), client.clone(), Arc::clone(&this), req)
    });
    let io = TokioIo::new(stream);
    let ended = if version == Version::HTTP_2 {
        let conn = builders.1.serve_connection(io, service);
        drive(conn, |c| c.graceful_shutdown(), stop, &registered.conn).await
    } else {
        let conn = builders.0.serve_connection(io, service).with_upgrades();
        drive(conn, |c| c.graceful_shutdown(), stop, &registered.conn).await
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
    drop(registered);
}

/// Runs a served connection to its end. When the proxy stops, or at the drain deadline of a
/// slot the connection still has streams to, it is shut down gracefully: HTTP/2 GOAWAY, and
/// HTTP/1.1 closes after the response in progress.
async fn drive<C>(
    conn: C,
    graceful: impl Fn(Pin<&mut C>),
    mut stop: watch::Receiver<bool>,
    this: &Connection,
) -> Result<(), hyper::Error>
where
    C: std::future::Future<Output = Result<(), hyper::Error>>,
{
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            ended = conn.as_mut() => return ended,
            _ = stop.changed(), if !closing => {
                closing = true;
                graceful(conn.as_mut());
            }
            () = this.goaway_requested(), if !closing => {
                closing = true;
                graceful(conn.as_mut());
            }
        }
    }
}

/// The response body: the upstream's, or one the proxy wrote, carrying the in-flight guard that
/// ends the request when the body is finished or dropped.
pub(crate) struct ProxyBody {
    kind: Kind,
    in_flight: Option<InFlight>,
    /// The same request as seen by its client connection (ended with `in_flight`).
    conn: Option<ConnRequest>,
    /// A copy of the answer for shadow traffic's comparison, when the request was mirrored.
    tee: Option<Box<Tee>>,
    /// The upstream connection the body comes from: back to its pool once the body ended.
    checkin: Option<Checkin>,
}

enum Kind {
    Upstream(Incoming),
    Local(Full<Bytes>),
}

impl ProxyBody {
    fn local(text: &'static str, in_flight: Option<InFlight>) -> Self {
        ProxyBody {
            kind: Kind::Local(Full::new(Bytes::from_static(text.as_bytes()))),
            in_flight,
            conn: None,
            tee: None,
            checkin: None,
        }
    }

    /// The body ended: its connection can take another request.
    fn ended(&mut self) {
        if let Some(c) = self.checkin.take() {
            c.done();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Upstream(b) => Pin::new(b).poll_frame(cx),
            Kind::Local(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        };
        if let (Some(tee), Poll::Ready(Some(Ok(frame)))) = (&mut this.tee, &polled) {
            if let Some(data) = frame.data_ref() {
                tee.data(data);
            }
        }
        let ended = matches!(polled, Poll::Ready(None)) || this.is_end_stream();
        if ended {
            if let Some(tee) = &mut this.tee {
                tee.finish();
            }
            this.ended();
        }
        if ended || matches!(polled, Poll::Ready(Some(Err(_)))) {
            // An error leaves the connection mid-response: it is dropped, not pooled.
            this.checkin = None;
            this.in_flight = None;
            this.conn = None;
            this.tee = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream(b) => b.is_end_stream(),
            Kind::Local(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream(b) => b.size_hint(),
            Kind::Local(b) => b.size_hint(),
        }
    }
}

fn local_response(
    status: StatusCode,
    text: &'static str,
    in_flight: Option<InFlight>,
) -> Response<ProxyBody> {
    if let Some(g) = &in_flight {
        g.answered(status.as_u16());
    }
    let mut resp = Response::new(ProxyBody::local(text, in_flight));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP_COUNT: usize = 7;
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TRAILER,
    TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including those named in `Connection`. `TE: trailers` is kept
/// (it is end-to-end in practice, e.g. gRPC); `Upgrade` is kept only when `keep_upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of them: one pass over the names spares the removals.
    let mut present = [false; HOP_BY_HOP_COUNT];
    let mut other = false;
    for k in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == k) {
            present[i] = true;
        } else if k == TE || k == UPGRADE {
            other = true;
        }
    }
    if present[0] {
        // Headers named by `Connection` (RFC 9110 §7.6.1); `close` and `keep-alive` are the
        // usual tokens and name no header to remove (`Keep-Alive` goes below anyway).
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            if !(keep_upgrade && name == UPGRADE) {
                headers.remove(&name);
            }
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    if other {
        if let Some(te) = headers.get(TE) {
            if !te.as_bytes().eq_ignore_ascii_case(b"trailers") {
                headers.remove(TE);
            }
        }
    }
    if keep_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else if other {
        headers.remove(UPGRADE);
    }
}

fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && req
            .headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The client at the other end of a connection.
#[derive(Clone)]
pub(crate) struct Peer {
    addr: SocketAddr,
    /// Its IP address as a header value, made once per connection.
    ip: HeaderValue,
}

impl Peer {
    fn new(addr: SocketAddr) -> Self {
        let ip = match addr.ip() {
            // Written by hand: `to_string` goes through the formatting machinery, and this runs
            // once per connection (once per request for clients that do not keep connections).
            std::net::IpAddr::V4(v4) => {
                let mut out = Vec::with_capacity(15);
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    if octet >= 100 {
                        out.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        out.push(b'0' + octet / 10 % 10);
                    }
                    out.push(b'0' + octet % 10);
                }
                HeaderValue::from_maybe_shared(Bytes::from(out))
            }
            std::net::IpAddr::V6(v6) => HeaderValue::from_str(&v6.to_string()),
        }
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Peer { addr, ip }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}

fn add_forwarded(headers: &mut HeaderMap, uri: &Uri, peer: &Peer, trust: bool) {
    // Room for the (up to) four headers below at once, not a growth per insert.
    headers.reserve(4);
    // One lookup per header (`entry`): this runs for every request.
    match headers.entry(X_FORWARDED_FOR) {
        Entry::Vacant(v) => {
            v.insert(peer.ip.clone());
        }
        Entry::Occupied(mut o) => {
            let prior: Vec<&str> = o.iter().filter_map(|v| v.to_str().ok()).collect();
            let ip = peer.ip.to_str().unwrap_or("unknown");
            if let Ok(v) = HeaderValue::from_str(&format!("{}, {ip}", prior.join(", "))) {
                o.insert(v);
            }
        }
    }
    let http = HeaderValue::from_static("http");
    if trust {
        headers.entry(X_FORWARDED_PROTO).or_insert(http);
    } else {
        headers.insert(X_FORWARDED_PROTO, http);
    }
    // HTTP/2 clients send `:authority` instead of `Host`; the upstream speaks HTTP/1.1.
    let host = match headers.entry(HOST) {
        Entry::Occupied(o) => Some(o.get().clone()),
        Entry::Vacant(v) => uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .map(|a| v.insert(a).clone()),
    };
    match headers.entry(X_FORWARDED_HOST) {
        Entry::Occupied(_) if trust => {}
        Entry::Occupied(mut o) => match host {
            Some(h) => {
                o.insert(h);
            }
            None => {
                o.remove_entry_mult().1.for_each(drop);
            }
        },
        Entry::Vacant(v) => {
            if let Some(h) = host {
                v.insert(h);
            }
        }
    }
}

fn upstream_uri(up: &Upstream, pq: Option<&PathAndQuery>) -> Uri {
    let mut parts = hyper::http::uri::Parts::default();
    parts.scheme = Some(up.scheme.clone());
    parts.authority = Some(up.authority.clone());
    parts.path_and_query = Some(
        pq.cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

async fn handle(
    state: Arc<State>,
    peer: Peer,
    conn: Arc<Connection>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let cfg = &state.config;
    if let Err(refused) = state
        .gate
        .pass(cfg.max_paused_requests, cfg.max_pause_wait)
        .await
    {
        // Overflow: retry soon (503 + Retry-After). Timeout: the request waited its whole
        // bound at the gateway (504).
        let (status, text) = match refused {
            Refused::QueueFull => (
                StatusCode::SERVICE_UNAVAILABLE,
                "proxy paused: too many waiting requests\n",
            ),
            Refused::TimedOut => (StatusCode::GATEWAY_TIMEOUT, "proxy paused for too long\n"),
        };
        state.stats.unrouted_5xx();
        let mut resp = local_response(status, text, None);
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return Ok(resp);
    }
    // Routed only after the pause gate, so a held request sees the split applied meanwhile.
    let table = state.table.load_full();
    let names = Names {
        preview_header: &cfg.preview_header,
        preview_cookie: &cfg.preview_cookie,
        sticky_cookie: &cfg.sticky_cookie,
    };
    let Some(route) = table.route(req.headers(), &names) else {
        state.stats.unrouted_5xx();
        return Ok(local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "no route: no traffic split applied\n",
            None,
        ));
    };
    let in_flight = state.stats.start(route.slot);
    let on_conn = conn.start(route.slot, req.version() == Version::HTTP_2);
    // Shadow traffic: live requests (not preview ones) mirrored to the preview slot.
    let mirrored = match (&state.shadow, &table.preview) {
        (Some(shadow), Some(preview))
            if preview.slot != route.slot
                && !wants_upgrade(&req)
                && !preview.upstreams.is_empty() =>
        {
            let mut headers = req.headers().clone();
            strip_hop_by_hop(&mut headers, false);
            let target = upstream_uri(&preview.upstreams[0], req.uri().path_and_query());
            shadow.mirror(
                req.method(),
                req.uri(),
                &headers,
                req.body().is_end_stream(),
                target,
            )
        }
        _ => None,
    };
    let mut resp = forward(
        &state,
        &peer,
        req,
        route.upstreams,
        route.set_cookie,
        in_flight,
    )
    .await;
    let tee = mirrored.map(|m| m.tee(resp.status(), resp.headers()));
    let body = resp.body_mut();
    if body.in_flight.is_some() {
        body.conn = Some(on_conn);
    }
    if let Some(mut tee) = tee {
        if body.is_end_stream() {
            // Nothing will be polled (e.g. a HEAD answer): the answer is complete now.
            tee.finish();
        } else {
            body.tee = Some(Box::new(tee));
        }
    }
    Ok(resp)
}

/// How one upstream took a request.
enum Outcome {
    /// The response head, and the connection it came on.
    Answered(Response<Incoming>, Checkin),
    /// No connection could carry the request: nothing reached the upstream, and the request is
    /// handed back intact for another endpoint.
    NotSent(Request<Incoming>, ConnectError),
    /// The request went out and failed.
    Failed(hyper::Error),
    /// No response head within `response_header_timeout`.
    TimedOut,
}

/// Sends `req` to `up` on a pooled connection, or a new one when the pooled one turns out to
/// have been closed before the request could be written (nothing was sent: safe to repeat).
async fn send(state: &State, up: &Upstream, mut req: Request<Incoming>) -> Outcome {
    let cfg = &state.config;
    let mut fresh_only = false;
    loop {
        let checkout = if fresh_only {
            up.pool.fresh(cfg.connect_timeout).await
        } else {
            up.pool
                .checkout(cfg.connect_timeout, cfg.upstream_idle_timeout)
                .await
        };
        let mut co = match checkout {
            Ok(co) => co,
            Err(e) => return Outcome::NotSent(req, e),
        };
        let sent = co.sender.try_send_request(req);
        match tokio::time::timeout(cfg.response_header_timeout, sent).await {
            Ok(Ok(resp)) => {
                let checkin = Checkin {
                    sender: co.sender,
                    pool: Arc::clone(&up.pool),
                };
                return Outcome::Answered(resp, checkin);
            }
            Ok(Err(mut e)) => match e.take_message() {
                Some(back) if co.reused => {
                    // The upstream closed the idle connection as it was taken.
                    req = back;
                    fresh_only = true;
                }
                Some(back) => {
                    return Outcome::NotSent(back, ConnectError(e.into_error().to_string()));
                }
                None => return Outcome::Failed(e.into_error()),
            },
            Err(_) => return Outcome::TimedOut,
        }
    }
}

async fn forward(
    state: &State,
    peer: &Peer,
    mut req: Request<Incoming>,
    upstreams: &[Upstream],
    set_cookie: Option<HeaderValue>,
    in_flight: InFlight,
) -> Response<ProxyBody> {
    let cfg = &state.config;
    let slot = in_flight.slot();
    let upgrade = wants_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    add_forwarded(
        &mut parts.headers,
        &parts.uri,
        peer,
        cfg.trust_forwarded_headers,
    );
    // HTTP/1.1 to the upstream, in origin form (`/path?query`).
    let uri = match parts.uri.path_and_query() {
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    };
    // A client without `Host` (HTTP/1.0): the upstream's address, per attempt.
    let add_host = !parts.headers.contains_key(HOST);
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = parts.headers;
    let first = state.rr.next(slot, upstreams.len());
    let attempts = upstreams.len().min(2);

    for attempt in 0..attempts {
        let up = &upstreams[(first + attempt) % upstreams.len()];
        if add_host {
            if let Ok(v) = HeaderValue::from_str(up.authority.as_str()) {
                out.headers_mut().insert(HOST, v);
            }
        }
        match send(state, up, out).await {
            Outcome::Answered(resp, checkin) => {
                return respond(state, resp, set_cookie, in_flight, client_upgrade, checkin);
            }
            Outcome::NotSent(back, e) => {
                state.stats.connect_error(slot);
                tracing::debug!(upstream = %up.endpoint, error = %e, "connect to upstream failed");
                // Nothing reached the upstream: the next endpoint gets the request.
                out = back;
            }
            Outcome::Failed(e) => {
                tracing::debug!(upstream = %up.endpoint, error = %e, "upstream request failed");
                in_flight.failed(Failure::Switch);
                return local_response(
                    StatusCode::BAD_GATEWAY,
                    "bad gateway: upstream failed\n",
                    Some(in_flight),
                );
            }
            Outcome::TimedOut => {
                in_flight.failed(Failure::Timeout);
                return local_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "gateway timeout: upstream did not answer in time\n",
                    Some(in_flight),
                );
            }
        }
    }
    in_flight.failed(Failure::Refused);
    local_response(
        StatusCode::BAD_GATEWAY,
        "bad gateway: cannot connect to upstream\n",
        Some(in_flight),
    )
}

fn respond(
    state: &State,
    mut resp: Response<Incoming>,
    set_cookie: Option<HeaderValue>,
    in_flight: InFlight,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    checkin: Checkin,
) -> Response<ProxyBody> {
    in_flight.answered(resp.status().as_u16());
    if resp.status().is_server_error() {
        in_flight.app_error();
    }
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(resp.headers_mut(), switching && client_upgrade.is_some());
    if let Some(c) = set_cookie {
        resp.headers_mut().append(SET_COOKIE, c);
    }
    match client_upgrade {
        Some(client_side) if switching => {
            let upstream_side = hyper::upgrade::on(&mut resp);
            let websocket = resp
                .headers()
                .get(UPGRADE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
            let (parts, body) = resp.into_parts();
            // The request is answered: from now on the tunnel is a long-lived connection,
            // counted apart from requests so a drain or a cutover does not wait for it.
            let guard = state.long_lived.open(in_flight.slot());
            drop(in_flight);
            tokio::spawn(tunnel(client_side, upstream_side, guard, websocket));
            Response::from_parts(
                parts,
                ProxyBody {
                    kind: Kind::Upstream(body),
                    in_flight: None,
                    conn: None,
                    tee: None,
                    // The upgraded connection is the tunnel's now.
                    checkin: None,
                },
            )
        }
        _ => {
            let mut resp = resp.map(|body| ProxyBody {
                kind: Kind::Upstream(body),
                in_flight: Some(in_flight),
                conn: None,
                tee: None,
                checkin: Some(checkin),
            });
            if resp.body().is_end_stream() {
                // No body to read (HEAD, 204, 304): the connection is free now.
                resp.body_mut().ended();
            }
            resp
        }
    }
}

async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    mut guard: LongLivedGuard,
    websocket: bool,
) {
    let (c, u) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut c = TokioIo::new(c);
    let mut u = TokioIo::new(u);
    if !websocket {
        // Another protocol: bytes are copied as they come; asked to close, it is cut.
        tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut c, &mut u) => {
                if let Err(e) = copied {
                    tracing::debug!(error = %e, "upgraded connection ended with an error");
                }
            }
            () = guard.close_requested() => guard.closed_gracefully(),
        }
        return;
    }
    let (mut cr, mut cw) = tokio::io::split(c);
    let (mut ur, mut uw) = tokio::io::split(u);
    let (closing, rx) = watch::channel(false);
    let (rx2, rx3) = (rx.clone(), rx);
    let down = {
        let mut both = std::pin::pin!(async {
            // Upstream to client: server frames, unmasked.
            let mut down = std::pin::pin!(pump(&mut ur, &mut cw, false, rx2));
            // Client to upstream: client frames, masked.
            let mut up = std::pin::pin!(pump(&mut cr, &mut uw, true, rx3));
            // Once one side is done the other gets a moment to finish, not forever (a peer
            // that never closes its half would keep the connection counted).
            let rest = |r: Result<std::io::Result<Pumped>, _>| r.unwrap_or(Ok(Pumped::Eof));
            tokio::select! {
                d = &mut down => (d, rest(tokio::time::timeout(CLOSE_GRACE, &mut up).await)),
                u = &mut up => (rest(tokio::time::timeout(CLOSE_GRACE, &mut down).await), u),
            }
        });
        tokio::select! {
            ended = &mut both => {
                log_tunnel_end(ended);
                None
            }
            () = guard.close_requested() => {
                closing.send_replace(true);
                match tokio::time::timeout(CLOSE_GRACE, &mut both).await {
                    Ok((down, _)) => Some(down),
                    Err(_) => {
                        tracing::debug!("a closing WebSocket did not reach a frame boundary in time: cut");
                        None
                    }
                }
            }
        }
    };
    let Some(down) = down else { return };
    if matches!(down, Ok(Pumped::Closed)) {
        guard.closed_gracefully();
        // The client answers the close frame; then the connection ends (bounded).
        let mut sink = [0u8; 1024];
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while matches!(tokio::io::AsyncReadExt::read(&mut cr, &mut sink).await, Ok(n) if n > 0)
            {
            }
        })
        .await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut cw).await;
    }
}

fn log_tunnel_end(ended: (std::io::Result<Pumped>, std::io::Result<Pumped>)) {
    if let (Err(e), _) | (_, Err(e)) = ended {
        tracing::debug!(error = %e, "WebSocket connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(TE, HeaderValue::from_static("gzip"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-app"], "kept");

        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[UPGRADE], "websocket");
        assert_eq!(h[CONNECTION], "upgrade");
        assert_eq!(h[TE], "trailers");
    }

    #[test]
    fn peer_addresses_are_written_as_to_string_writes_them() {
        for ip in [
            "0.0.0.0",
            "10.0.0.7",
            "192.168.100.255",
            "1.20.3.199",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let addr = SocketAddr::new(ip.parse().unwrap(), 9);
            assert_eq!(Peer::new(addr).ip, ip);
        }
    }

    /// What `sniff` says of a connection whose client sends `parts`, `gap` apart.
    async fn sniffed(parts: &'static [&'static [u8]], gap: Duration) -> Option<Version> {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            for p in parts {
                c.write_all(p).await.unwrap();
                tokio::time::sleep(gap).await;
            }
            // Kept open until the server has decided.
            tokio::time::sleep(Duration::from_millis(300)).await;
        });
        let (server, _) = listener.accept().await.unwrap();
        let v = sniff(&server, Duration::from_millis(200)).await;
        client.abort();
        v
    }

    #[tokio::test]
    async fn the_first_bytes_tell_http2_from_http1_even_when_split() {
        let gap = Duration::from_millis(20);
        assert_eq!(
            sniffed(&[b"GET / HTTP/1.1\r\n"], gap).await,
            Some(Version::HTTP_11)
        );
        assert_eq!(
            sniffed(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], gap).await,
            Some(Version::HTTP_2)
        );
        assert_eq!(
            sniffed(&[b"P", b"OST / HTTP/1.1\r\n"], gap).await,
            Some(Version::HTTP_11)
        );
        assert_eq!(
            sniffed(&[b"PR", b"I * HTTP/2.0\r\n"], gap).await,
            Some(Version::HTTP_2)
        );
        // Nothing sent within the wait, or only a preface's first byte: no protocol.
        assert_eq!(sniffed(&[], gap).await, None);
        assert_eq!(sniffed(&[b"P"], gap).await, None);
    }

    #[test]
    fn forwarded_headers_append_and_overwrite() {
        let peer = Peer::new("10.0.0.7:5555".parse().unwrap());
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("app.example"));
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        add_forwarded(&mut h, &Uri::from_static("/x"), &peer, false);
        assert_eq!(h[&X_FORWARDED_FOR], "1.2.3.4, 10.0.0.7");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "app.example");

        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        let uri = Uri::from_static("http://h2.example/x");
        add_forwarded(&mut h, &uri, &peer, true);
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[HOST], "h2.example");
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.7");

        // A client's own X-Forwarded-Host: kept only when trusted, else replaced by Host, or
        // removed when there is no Host to put there.
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("real.example"));
        h.append(
            &X_FORWARDED_HOST,
            HeaderValue::from_static("spoofed.example"),
        );
        h.append(&X_FORWARDED_HOST, HeaderValue::from_static("again.example"));
        add_forwarded(&mut h, &Uri::from_static("/x"), &peer, false);
        assert_eq!(h.get_all(&X_FORWARDED_HOST).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_HOST], "real.example");
        let mut h = HeaderMap::new();
        h.insert(
            &X_FORWARDED_HOST,
            HeaderValue::from_static("spoofed.example"),
        );
        add_forwarded(&mut h, &Uri::from_static("/x"), &peer, false);
        assert!(!h.contains_key(&X_FORWARDED_HOST), "{h:?}");
        assert!(!h.contains_key(HOST), "{h:?}");
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("real.example"));
        h.insert(&X_FORWARDED_HOST, HeaderValue::from_static("edge.example"));
        add_forwarded(&mut h, &Uri::from_static("/x"), &peer, true);
        assert_eq!(h[&X_FORWARDED_HOST], "edge.example");
    }
}
