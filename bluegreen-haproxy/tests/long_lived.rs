//! A WebSocket held through the real HAProxy across a switch: the old server keeps it after its
//! drain bound (HAProxy's `maint` does not end sessions), `close_long_lived` ends it with
//! `shutdown sessions server` and counts it, and the client reconnects to the new server.

mod common;

use std::time::{Duration, Instant};

use bluegreen_core::{Slot, TrafficSplit, TrafficSwitch};
use bluegreen_haproxy::HaproxySwitch;
use bluegreen_testenv::haproxy::test_config;
use common::{haproxy_available, Demos, Haproxy};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn echo(ws: &mut Ws, text: &str) -> Option<String> {
    ws.send(Message::text(text)).await.ok()?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Some(t.as_str().to_string()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            _ => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_left_on_the_old_server_are_shut_down_and_counted() {
    if !haproxy_available("long_lived") {
        return;
    }
    let h = Haproxy::start();
    // A short drain bound: apply does not wait for the WebSocket.
    let switch = HaproxySwitch::new(
        test_config(&h.admin_sock).with_drain_timeout(Duration::from_millis(300)),
    )
    .unwrap();
    assert!(switch.capabilities().close_long_lived);
    let demos = Demos::start().await;
    let eps = demos.endpoints();
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &eps)
        .await
        .unwrap();
    let url = format!("ws://127.0.0.1:{}/ws", h.port);
    let mut ws = tokio_tungstenite::connect_async(&url).await.unwrap().0;
    assert_eq!(echo(&mut ws, "a").await.as_deref(), Some("blue a"));
    assert_eq!(switch.long_lived(Slot::Blue).await.unwrap(), 1);

    switch
        .apply(&TrafficSplit::all(Slot::Green), &eps)
        .await
        .unwrap();
    // Past its drain bound the old server is in maintenance, and the WebSocket still works.
    assert!(switch.servers().await.unwrap().blue.is_maint());
    assert_eq!(echo(&mut ws, "b").await.as_deref(), Some("blue b"));
    assert_eq!(switch.long_lived(Slot::Blue).await.unwrap(), 1);

    assert_eq!(switch.close_long_lived(Slot::Blue).await.unwrap(), 1);
    assert_eq!(switch.long_lived(Slot::Blue).await.unwrap(), 0);
    // The client sees its connection end (HAProxy closes it at the TCP level)…
    let start = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => break,
            Ok(Some(Ok(_))) => assert!(start.elapsed() < Duration::from_secs(5)),
            Err(_) => panic!("the WebSocket was not closed"),
        }
    }
    // …and reconnects to green.
    let mut again = tokio_tungstenite::connect_async(&url).await.unwrap().0;
    assert_eq!(echo(&mut again, "c").await.as_deref(), Some("green c"));
    // Nothing left to close on blue; green's connection is untouched.
    assert_eq!(switch.close_long_lived(Slot::Blue).await.unwrap(), 0);
    assert_eq!(echo(&mut again, "d").await.as_deref(), Some("green d"));
}
