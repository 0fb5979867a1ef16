//! Test upstreams: tiny hyper servers on 127.0.0.1 that answer with their name.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bluegreen_core::Endpoint;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A running test upstream.
pub struct Upstream {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
    /// TCP connections accepted.
    pub connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::new("127.0.0.1", self.addr.port())
    }
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn full(s: impl Into<Bytes>) -> BoxBody {
    Full::new(s.into()).boxed()
}

fn query_ms(req: &Request<Incoming>) -> u64 {
    req.uri()
        .query()
        .and_then(|q| q.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Routes:
/// - `/slow?ms=N`: answers after N ms
/// - `/stream?ms=N`: sends headers at once, then `a`, then after N ms `b`
/// - `/status/204`: answers 204 (no body)
/// - `/status/500`: answers 500
/// - `/headers`: echoes the request headers, one `name: value` per line
/// - `/echo`: echoes the request body, prefixed with the name
/// - an `Upgrade` request: answers 101 and echoes bytes on the upgraded connection
/// - anything else: the name
async fn answer(name: &'static str, mut req: Request<Incoming>) -> Response<BoxBody> {
    if req.headers().contains_key(hyper::header::UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(full(""))
            .unwrap();
    }
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query_ms(&req))).await;
            Response::new(full(name))
        }
        "/stream" => {
            let ms = query_ms(&req);
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"a")))).await;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"b")))).await;
            });
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|f| (f, rx))
            });
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        "/status/204" => Response::builder().status(204).body(full("")).unwrap(),
        "/status/500" => Response::builder()
            .status(500)
            .body(full(format!("{name} failed")))
            .unwrap(),
        "/headers" => {
            let mut out = String::new();
            for (k, v) in req.headers() {
                out.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
            }
            Response::new(full(out))
        }
        "/echo" => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let mut out = name.as_bytes().to_vec();
            out.push(b':');
            out.extend_from_slice(&body);
            Response::new(full(out))
        }
        _ => Response::new(full(name)),
    }
}

/// Starts an upstream answering with `name`.
pub async fn upstream(name: &'static str) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&requests);
    let connections = Arc::new(AtomicU64::new(0));
    let accepted = Arc::clone(&connections);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            accepted.fetch_add(1, Ordering::SeqCst);
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async move { Ok::<_, Infallible>(answer(name, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Upstream {
        name,
        addr,
        requests,
        connections,
        task,
    }
}

/// A loopback endpoint with nothing listening on it, refused for as long as the guard lives.
pub fn dead_endpoint() -> (Endpoint, bluegreen_testenv::port::RefusedAddr) {
    let held = bluegreen_testenv::port::RefusedAddr::new();
    (Endpoint::new("127.0.0.1", held.port()), held)
}

/// Polls `cond` every 5 ms for at most 10 s.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A keep-alive HTTP/1.1 client.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// GET `url`, returning status and body.
pub async fn get(c: &reqwest::Client, url: &str) -> (u16, String) {
    let r = c.get(url).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.text().await.unwrap())
}

/// An HTTP/2 (prior knowledge) client connection to `addr`: the request sender and the
/// connection's task, which ends when the connection does.
pub async fn h2_connect(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(conn))
}
