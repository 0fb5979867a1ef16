//! Long-lived connections through the proxy with real clients: WebSockets (tokio-tungstenite)
//! to the demo app's echo route stay on their slot across a switch, are counted apart from
//! requests, and are closed by the proxy with `1001 going away` when asked (the engine does it at
//! the drain deadline); the client then reconnects and reaches the new slot.

mod common;

use std::time::Duration;

use bluegreen_core::{Endpoint, Endpoints, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_demo::ws_client::{self, WebSocket};
use bluegreen_demo::{DemoConfig, DemoServer};
use bluegreen_proxy::{ProxyConfig, ProxySwitch};
use common::eventually;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

async fn demo(slot: &str) -> DemoServer {
    DemoServer::start(DemoConfig::new("v", slot)).await.unwrap()
}

fn endpoint(s: &DemoServer) -> Endpoint {
    Endpoint::new("127.0.0.1", s.local_addr().port())
}

async fn setup() -> (DemoServer, DemoServer, ProxySwitch, Endpoints) {
    let (b, g) = (demo("blue").await, demo("green").await);
    let p = ProxySwitch::bind(ProxyConfig::default()).await.unwrap();
    let eps = Endpoints::new(vec![endpoint(&b)], vec![endpoint(&g)]);
    p.apply(&TrafficSplit::all(Slot::Blue), &eps).await.unwrap();
    (b, g, p, eps)
}

async fn connect(p: &ProxySwitch) -> WebSocket {
    connect_to(&format!("ws://{}/ws", p.local_addr())).await
}

async fn echo(ws: &mut WebSocket, text: &str) -> String {
    ws_client::echo(ws, text)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_stays_on_its_slot_until_closed_with_1001_then_reconnects_to_the_new_one() {
    let (_b, _g, p, eps) = setup().await;
    let mut ws = connect(&p).await;
    assert_eq!(echo(&mut ws, "a").await, "blue a");
    assert_eq!(p.long_lived_now(Slot::Blue), 1);
    assert_eq!(p.in_flight_now(Slot::Blue), 0, "not a request in flight");
    assert_eq!(p.long_lived(Slot::Blue).await.unwrap(), 1);

    p.apply(&TrafficSplit::all(Slot::Green), &eps)
        .await
        .unwrap();
    // The switch does not cut it: it stays on blue until the drain deadline.
    assert_eq!(echo(&mut ws, "b").await, "blue b");

    // A client that keeps sending while the proxy closes its connection: it sees its echoes,
    // then a close frame 1001, then reconnects and reaches green.
    let url = format!("ws://{}/ws", p.local_addr());
    let client = tokio::spawn(async move {
        let closed = ws_client::send_until_closed(ws, Duration::from_millis(3))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut again = connect_to(&url).await;
        (closed, echo(&mut again, "after").await)
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let closed = p.close_long_lived(Slot::Blue).await.unwrap();
    assert_eq!(closed, 1);
    let (closed, after) = tokio::time::timeout(Duration::from_secs(20), client)
        .await
        .expect("the client never saw the close")
        .unwrap();
    let echoes = &closed.echoes;
    assert!(
        !echoes.is_empty(),
        "the client was not answered before the close"
    );
    for t in echoes {
        assert!(t.starts_with("blue m"), "{t}");
    }
    let close = closed.close.expect("a close frame with a code");
    assert_eq!(close.code, CloseCode::Away);
    assert_eq!(after, "green after");
    assert_eq!(p.long_lived_closed(Slot::Blue), 1);
    assert_eq!(p.long_lived_now(Slot::Blue), 0);
    assert_eq!(p.long_lived_closed(Slot::Green), 0);
    // The traffic ledger's counters and `/metrics` say the same: one graceful close on blue,
    // a measured 0 on green.
    let c = p.counters().await.unwrap();
    assert_eq!(c.slots.blue.graceful_closes, Some(1), "{c:?}");
    assert_eq!(c.slots.green.graceful_closes, Some(0), "{c:?}");
    let text = p.prometheus_metrics();
    for line in [
        "bluegreen_proxy_long_lived_closed_total{slot=\"blue\"} 1\n",
        "bluegreen_proxy_long_lived_closed_total{slot=\"green\"} 0\n",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    match bluegreen_testenv::prometheus::check_metrics(&text) {
        Some(res) => res.unwrap_or_else(|e| panic!("{e}\n{text}")),
        None => eprintln!("promtool not installed: the exposition was not linted"),
    }
}

async fn connect_to(url: &str) -> WebSocket {
    ws_client::connect(url).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_slot_without_long_lived_connections_closes_nothing() {
    let (_b, _g, p, _eps) = setup().await;
    let mut ws = connect(&p).await;
    assert_eq!(echo(&mut ws, "x").await, "blue x");
    assert_eq!(p.close_long_lived(Slot::Green).await.unwrap(), 0);
    assert_eq!(
        echo(&mut ws, "y").await,
        "blue y",
        "a green close touched blue"
    );
    ws.close(None).await.unwrap();
    let probe = p.clone();
    eventually("the WebSocket is gone", || {
        probe.long_lived_now(Slot::Blue) == 0
    })
    .await;
    assert_eq!(
        p.long_lived_closed(Slot::Blue),
        0,
        "the client closed it, not the proxy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_with_a_stream_to_the_old_slot_gets_goaway_and_the_stream_finishes() {
    let (_b, _g, p, eps) = setup().await;
    let (sender, conn) = common::h2_connect(p.local_addr()).await;
    let get = |mut sender: hyper::client::conn::http2::SendRequest<_>, path: &str| {
        let uri = format!("http://{}{path}", p.local_addr());
        async move {
            let req = hyper::Request::get(uri)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await?;
            let slot = resp.headers()["x-bluegreen-slot"]
                .to_str()
                .unwrap()
                .to_string();
            let status = resp.status().as_u16();
            http_body_util::BodyExt::collect(resp.into_body()).await?;
            Ok::<_, hyper::Error>((status, slot))
        }
    };
    // A long stream to blue, then the switch: the connection now carries a stream to the old
    // slot.
    let slow = tokio::spawn(get(sender.clone(), "/slow?ms=1500"));
    let probe = p.clone();
    eventually("the stream is in flight", || {
        probe.in_flight_now(Slot::Blue) == 1
    })
    .await;
    p.apply(&TrafficSplit::all(Slot::Green), &eps)
        .await
        .unwrap();
    // New streams on the same connection go to green already.
    assert_eq!(
        get(sender.clone(), "/").await.unwrap(),
        (200, "green".into())
    );
    assert_eq!(p.long_lived_now(Slot::Blue), 1);
    assert_eq!(p.close_long_lived(Slot::Blue).await.unwrap(), 1);
    // GOAWAY: the stream in flight finishes on blue; the client opens no new stream here.
    assert_eq!(slow.await.unwrap().unwrap(), (200, "blue".into()));
    assert!(
        get(sender, "/").await.is_err(),
        "a new stream was accepted after GOAWAY"
    );
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the connection did not end after GOAWAY")
        .unwrap()
        .unwrap();
    assert_eq!(p.long_lived_closed(Slot::Blue), 1);
    assert_eq!(p.long_lived_now(Slot::Blue), 0);
}
