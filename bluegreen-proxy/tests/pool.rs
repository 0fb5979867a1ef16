//! The proxy's upstream connection pool on real sockets: keep-alive connections are reused,
//! kept across table changes for the endpoints that stay, closed after the idle timeout, and a
//! connection the upstream closed is never used for a request.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bluegreen_core::{Endpoint, Endpoints, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_proxy::{ProxyConfig, ProxySwitch};
use common::{client, get, upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn eps(blue: &common::Upstream, green: &common::Upstream) -> Endpoints {
    Endpoints::new(vec![blue.endpoint()], vec![green.endpoint()])
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = ProxySwitch::bind(ProxyConfig::default()).await.unwrap();
    p.apply(&TrafficSplit::all(Slot::Blue), &eps(&b, &g))
        .await
        .unwrap();
    let c = client();
    for path in ["/", "/status/204", "/stream?ms=1", "/"] {
        for _ in 0..10 {
            let (status, _) = get(&c, &p.url(path)).await;
            assert!(status == 200 || status == 204, "{path}: {status}");
        }
    }
    // HEAD answers have no body either: their connection is free at once.
    for _ in 0..10 {
        let r = c.head(p.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(b.requests(), 50);
    assert_eq!(
        b.connections(),
        1,
        "50 sequential requests (bodies, 204s, streams, HEADs) need one upstream connection"
    );
}

#[tokio::test]
async fn a_table_change_keeps_the_warm_connections_of_the_endpoints_that_stay() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = ProxySwitch::bind(ProxyConfig::default()).await.unwrap();
    let e = eps(&b, &g);
    p.apply(&TrafficSplit::all(Slot::Blue), &e).await.unwrap();
    let c = client();
    assert_eq!(get(&c, &p.url("/")).await.1, "blue");
    // A canary step and a preview build new tables that still name blue's endpoint.
    p.apply(&TrafficSplit::canary(Slot::Green, 0).unwrap(), &e)
        .await
        .unwrap();
    p.preview(Some(Slot::Green), &e).await.unwrap();
    p.apply(&TrafficSplit::all(Slot::Blue), &e).await.unwrap();
    for _ in 0..5 {
        assert_eq!(get(&c, &p.url("/")).await.1, "blue");
    }
    assert_eq!(
        b.connections(),
        1,
        "blue's connection survived the table changes"
    );
    // Endpoints that go away take their pool with them; coming back starts a new one.
    let other = upstream("other").await;
    let moved = Endpoints::new(vec![other.endpoint()], vec![g.endpoint()]);
    p.apply(&TrafficSplit::all(Slot::Blue), &moved)
        .await
        .unwrap();
    assert_eq!(get(&c, &p.url("/")).await.1, "other");
    p.apply(&TrafficSplit::all(Slot::Blue), &e).await.unwrap();
    assert_eq!(get(&c, &p.url("/")).await.1, "blue");
    assert_eq!(b.connections(), 2);
}

#[tokio::test]
async fn an_idle_connection_is_not_reused_after_the_idle_timeout() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let config = ProxyConfig::default().with_upstream_idle_timeout(Duration::from_millis(150));
    let p = ProxySwitch::bind(config).await.unwrap();
    p.apply(&TrafficSplit::all(Slot::Blue), &eps(&b, &g))
        .await
        .unwrap();
    let c = client();
    assert_eq!(get(&c, &p.url("/")).await.1, "blue");
    assert_eq!(get(&c, &p.url("/")).await.1, "blue");
    assert_eq!(b.connections(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(get(&c, &p.url("/")).await.1, "blue");
    assert_eq!(
        b.connections(),
        2,
        "the connection idle past the timeout was closed"
    );
}

/// An HTTP/1.1 server that answers one request per connection, keep-alive by its headers,
/// then closes the connection `close_after` later: the keep-alive race the pool must survive.
async fn closing_upstream(close_after: Duration) -> (Endpoint, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(close_after).await;
                // Gone without a word, as a server whose keep-alive timeout fired.
                drop(s);
            });
        }
    });
    (Endpoint::new("127.0.0.1", port), accepted)
}

#[tokio::test]
async fn a_connection_the_upstream_closed_is_never_used_for_a_request() {
    let (ep, accepted) = closing_upstream(Duration::from_millis(20)).await;
    let p = ProxySwitch::bind(ProxyConfig::default()).await.unwrap();
    p.apply(
        &TrafficSplit::all(Slot::Blue),
        &Endpoints::new(vec![ep.clone()], vec![ep]),
    )
    .await
    .unwrap();
    let c = client();
    for i in 0..20 {
        let (status, body) = get(&c, &p.url("/")).await;
        assert_eq!((status, body.as_str()), (200, "ok"), "request {i}");
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        20,
        "one connection per request"
    );
    let m = p.metrics(Slot::Blue).await.unwrap();
    assert_eq!(m.errors_5xx, 0, "{m:?}");
}
