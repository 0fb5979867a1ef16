//! The HTTP server: routes, error injection and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::config::{DemoConfig, MAX_SLOW_MS};
use crate::db::Db;

struct App {
    version: HeaderValue,
    slot: HeaderValue,
    /// The address the app listens on, so a client behind a switch sees which instance answered.
    instance: Option<HeaderValue>,
    banner: Bytes,
    fail_health: bool,
    error_rate: f64,
    requests: AtomicU64,
    rpc_token: Option<String>,
    db: Option<Db>,
}

impl App {
    fn new(config: &DemoConfig) -> io::Result<App> {
        let header = |what: &str, v: &str| {
            HeaderValue::from_str(v).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{what} {v:?} cannot be sent as an HTTP header"),
                )
            })
        };
        Ok(App {
            version: header("version", &config.version)?,
            slot: header("slot", &config.slot)?,
            instance: None,
            banner: Bytes::from(format!("version={} slot={}\n", config.version, config.slot)),
            fail_health: config.fail_health,
            error_rate: config.error_rate.clamp(0.0, 1.0),
            requests: AtomicU64::new(0),
            rpc_token: config.rpc_token.clone(),
            db: match &config.database_url {
                Some(url) => {
                    Some(Db::new(url.parse().map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidInput, e)
                    })?))
                }
                None => None,
            },
        })
    }

    /// Whether the `n`-th (1-based) `/` request fails: exactly `floor(n * rate)` of the first `n` do.
    fn should_fail(&self) -> bool {
        if self.error_rate <= 0.0 {
            return false;
        }
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let failed_upto = |k: u64| (k as f64 * self.error_rate).floor() as u64;
        failed_upto(n) > failed_upto(n - 1)
    }

    fn respond(&self, status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
        let mut res = Response::new(Full::new(body));
        *res.status_mut() = status;
        let h = res.headers_mut();
        h.insert("x-bluegreen-version", self.version.clone());
        h.insert("x-bluegreen-slot", self.slot.clone());
        if let Some(instance) = &self.instance {
            h.insert("x-bluegreen-instance", instance.clone());
        }
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        res
    }

    fn index(&self) -> Response<Full<Bytes>> {
        if self.should_fail() {
            self.respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                Bytes::from_static(b"injected error (DEMO_ERROR_RATE)\n"),
            )
        } else {
            self.respond(StatusCode::OK, self.banner.clone())
        }
    }

    /// `POST /jsonrpc`, an Odoo-style authenticated smoke call: answers the server version.
    fn jsonrpc(&self, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        if let Some(token) = &self.rpc_token {
            let sent = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if sent != Some(token.as_str()) {
                return self.respond(
                    StatusCode::UNAUTHORIZED,
                    Bytes::from_static(b"{\"jsonrpc\":\"2.0\",\"error\":{\"code\":401,\"message\":\"access denied\"}}"),
                );
            }
        }
        let mut res = self.respond(
            StatusCode::OK,
            Bytes::from(format!(
                "{{\"jsonrpc\":\"2.0\",\"result\":{{\"server_version\":{:?}}}}}",
                self.version.to_str().unwrap_or_default()
            )),
        );
        res.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        res
    }

    /// `POST /write?id=N`: answered 200 only once the row is committed.
    async fn write(&self, query: Option<&str>) -> Response<Full<Bytes>> {
        let id = query
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("id="))
            .and_then(|v| v.parse::<i64>().ok());
        let Some(id) = id else {
            return self.respond(
                StatusCode::BAD_REQUEST,
                Bytes::from_static(b"missing ?id=N (an integer)\n"),
            );
        };
        let Some(db) = &self.db else {
            return self.respond(
                StatusCode::SERVICE_UNAVAILABLE,
                Bytes::from_static(b"no database: set DATABASE_URL\n"),
            );
        };
        match db.write(id).await {
            Ok(()) => self.respond(StatusCode::OK, Bytes::from(format!("written {id}\n"))),
            Err(e) => self.respond(
                StatusCode::SERVICE_UNAVAILABLE,
                Bytes::from(format!("database write failed: {e}\n")),
            ),
        }
    }

    /// `GET /ws`: a WebSocket that answers every text message with `<slot> <message>` and
    /// binary messages unchanged.
    fn websocket(&self, mut req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let key = req
            .headers()
            .get("sec-websocket-key")
            .map(|k| derive_accept_key(k.as_bytes()));
        let upgrade = req
            .headers()
            .get(hyper::header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        let Some(accept) = key.filter(|_| upgrade) else {
            return self.respond(
                StatusCode::BAD_REQUEST,
                Bytes::from_static(b"a WebSocket upgrade is expected here\n"),
            );
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let slot = self.slot.to_str().unwrap_or("none").to_string();
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            while let Some(Ok(msg)) = ws.next().await {
                let reply = match msg {
                    Message::Text(t) => Message::text(format!("{slot} {}", t.as_str())),
                    Message::Binary(b) => Message::Binary(b),
                    // The close reply is queued by tungstenite and sent by the next poll,
                    // which then ends the stream.
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    break;
                }
            }
        });
        let mut res = self.respond(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
        let h = res.headers_mut();
        h.remove(CONTENT_TYPE);
        h.insert(
            hyper::header::UPGRADE,
            HeaderValue::from_static("websocket"),
        );
        h.insert(
            hyper::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
        if let Ok(v) = HeaderValue::from_str(&accept) {
            h.insert("sec-websocket-accept", v);
        }
        res
    }

    async fn handle(self: Arc<Self>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        if req.method() == Method::POST && req.uri().path() == "/jsonrpc" {
            return self.jsonrpc(&req);
        }
        if req.uri().path() == "/ws" {
            return self.websocket(req);
        }
        if req.method() == Method::POST && req.uri().path() == "/write" {
            return self.write(req.uri().query()).await;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return self.respond(
                StatusCode::METHOD_NOT_ALLOWED,
                Bytes::from_static(b"only GET and HEAD\n"),
            );
        }
        match req.uri().path() {
            "/" => self.index(),
            "/web/login" => {
                let mut res = self.respond(
                    StatusCode::OK,
                    Bytes::from(format!(
                        "<html><body><form action=\"/web/login\">login ({})</form></body></html>\n",
                        self.version.to_str().unwrap_or_default()
                    )),
                );
                res.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
                res
            }
            "/health" | "/web/health" if self.fail_health => self.respond(
                StatusCode::SERVICE_UNAVAILABLE,
                Bytes::from_static(b"unhealthy\n"),
            ),
            "/health" | "/web/health" => self.respond(StatusCode::OK, Bytes::from_static(b"ok\n")),
            "/slow" => match slow_ms(req.uri().query()) {
                Ok(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    self.respond(StatusCode::OK, self.banner.clone())
                }
                Err(msg) => self.respond(StatusCode::BAD_REQUEST, Bytes::from(msg)),
            },
            path if path.starts_with("/env/") => {
                // Whether a variable reached the app, and its length: never its value.
                match std::env::var(&path["/env/".len()..]) {
                    Ok(v) => self.respond(
                        StatusCode::OK,
                        Bytes::from(format!("set ({} bytes)\n", v.len())),
                    ),
                    Err(_) => self.respond(StatusCode::NOT_FOUND, Bytes::from_static(b"unset\n")),
                }
            }
            _ => self.respond(StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
        }
    }
}

fn slow_ms(query: Option<&str>) -> Result<u64, String> {
    let value = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("ms="))
        .ok_or_else(|| "missing ?ms=N\n".to_string())?;
    match value.parse::<u64>() {
        Ok(ms) if ms <= MAX_SLOW_MS => Ok(ms),
        _ => Err(format!("ms must be a number from 0 to {MAX_SLOW_MS}\n")),
    }
}

/// Serves the demo app on `listener` until `shutdown` completes, then stops accepting and lets
/// in-flight requests finish for at most `config.drain_timeout`.
///
/// `config.host`, `config.port`, `config.start_delay` and `config.exit_code` are not used here:
/// the caller bound the listener (the binary applies the other two).
///
/// # Errors
/// A version or slot that cannot be sent as an HTTP header ([`io::ErrorKind::InvalidInput`]).
/// Accept errors are retried, not returned.
pub async fn serve(
    listener: TcpListener,
    config: DemoConfig,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut app = App::new(&config)?;
    app.instance = listener
        .local_addr()
        .ok()
        .and_then(|a| HeaderValue::from_str(&a.to_string()).ok());
    let app = Arc::new(app);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    // Out of file descriptors or a connection reset before accept: not fatal.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let app = app.clone();
                // A wildcard listener (`HOST=0.0.0.0`, as in containers) names the address the
                // connection reached instead, so that instances on several hosts tell apart.
                let reached = listener
                    .local_addr()
                    .is_ok_and(|a| a.ip().is_unspecified())
                    .then(|| stream.local_addr().ok())
                    .flatten()
                    .and_then(|a| HeaderValue::from_str(&a.to_string()).ok());
                let svc = service_fn(move |req| {
                    let app = app.clone();
                    let reached = reached.clone();
                    async move {
                        let mut res = app.handle(req).await;
                        if let Some(addr) = reached {
                            res.headers_mut().insert("x-bluegreen-instance", addr);
                        }
                        Ok::<_, Infallible>(res)
                    }
                });
                // HTTP/1.1 (with upgrades: `/ws`) and HTTP/2 with prior knowledge.
                let conn = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    // In-flight requests finish; idle keep-alive connections are closed. Bounded by the drain.
    let _ = tokio::time::timeout(config.drain_timeout, graceful.shutdown()).await;
    Ok(())
}

/// The demo app running in-process on a background task, for tests and examples.
///
/// Dropping it shuts it down too (without waiting).
#[derive(Debug)]
pub struct DemoServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl DemoServer {
    /// Binds `config.host:config.port` (port 0 picks a free one) and serves there.
    ///
    /// # Errors
    /// The address cannot be bound, or the version or slot is not a valid header value.
    pub async fn start(config: DemoConfig) -> io::Result<DemoServer> {
        let listener = TcpListener::bind((config.host.as_str(), config.port)).await?;
        DemoServer::start_on(listener, config)
    }

    /// Serves on a listener the caller bound.
    ///
    /// # Errors
    /// The version or slot is not a valid header value.
    pub fn start_on(listener: TcpListener, config: DemoConfig) -> io::Result<DemoServer> {
        App::new(&config)?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, config, async move {
            let _ = rx.await;
        }));
        Ok(DemoServer {
            addr,
            stop: Some(tx),
            task: Some(task),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stops accepting, waits for in-flight requests (bounded by the drain timeout) and returns.
    ///
    /// # Errors
    /// The server task failed or panicked.
    pub async fn shutdown(mut self) -> io::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_rate_fails_exactly_that_share() {
        let app = App::new(&DemoConfig::new("v", "s").with_error_rate(0.3)).unwrap();
        let fails: Vec<bool> = (0..10).map(|_| app.should_fail()).collect();
        assert_eq!(fails.iter().filter(|f| **f).count(), 3, "{fails:?}");
        assert!(!fails[0], "the first request succeeds");
        let none = App::new(&DemoConfig::new("v", "s")).unwrap();
        assert!((0..100).all(|_| !none.should_fail()));
        let all = App::new(&DemoConfig::new("v", "s").with_error_rate(1.0)).unwrap();
        assert!((0..100).all(|_| all.should_fail()));
    }

    #[tokio::test]
    async fn a_write_without_a_database_or_an_id_is_refused() {
        let app = App::new(&DemoConfig::new("v", "s")).unwrap();
        assert_eq!(app.write(Some("id=1")).await.status(), 503);
        assert_eq!(app.write(Some("id=x")).await.status(), 400);
        assert_eq!(app.write(None).await.status(), 400);
    }

    #[test]
    fn slow_query_is_bounded() {
        assert_eq!(slow_ms(Some("ms=250")), Ok(250));
        assert_eq!(slow_ms(Some("x=1&ms=0")), Ok(0));
        assert!(slow_ms(Some("ms=60001")).is_err());
        assert!(slow_ms(Some("ms=abc")).is_err());
        assert!(slow_ms(None).is_err());
    }
}
