//! What happens to a WebSocket through real nginx when the switch changes, recorded (the
//! README's "WebSockets" section reports it): with the Dynamic switch (Lua balancer, no reload)
//! and with the Reload switch (`nginx -s reload`, old workers bounded by
//! `worker_shutdown_timeout`).

mod common;

use std::time::{Duration, Instant};

use bluegreen_core::{Slot, TrafficSplit, TrafficSwitch};
use bluegreen_testenv::nginx::{NginxProcess, StandaloneConfig};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(nginx: &NginxProcess) -> Ws {
    let url = format!("ws://{}/ws", nginx.listen());
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn echo(ws: &mut Ws, text: &str) -> Option<String> {
    ws.send(Message::text(text)).await.ok()?;
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => Some(t.as_str().to_string()),
        _ => None,
    }
}

/// How the connection ended, and after how long.
async fn ending(ws: &mut Ws, within: Duration) -> (String, Duration) {
    let start = Instant::now();
    let how = match tokio::time::timeout(within, ws.next()).await {
        Ok(None) => "closed without a close frame".to_string(),
        Ok(Some(Err(e))) => format!("error: {e}"),
        Ok(Some(Ok(Message::Close(f)))) => format!("close frame {f:?}"),
        Ok(Some(Ok(m))) => format!("message {m:?}"),
        Err(_) => "still open".to_string(),
    };
    (how, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_switch_leaves_an_open_websocket_on_the_old_slot() {
    if !common::require(true) {
        return;
    }
    let s = common::dynamic_site(StandaloneConfig::with_websockets).await;
    let (nginx, switch, eps) = (&s.nginx, &s.switch, s.backends.endpoints());
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &eps)
        .await
        .unwrap();
    let mut ws = open(nginx).await;
    assert_eq!(echo(&mut ws, "a").await.as_deref(), Some("blue a"));

    switch
        .apply(&TrafficSplit::all(Slot::Green), &eps)
        .await
        .unwrap();
    // No reload: the balancer only picks a peer for new connections. The open WebSocket stays
    // on blue for as long as it lives (nginx never closes it because of a switch).
    assert_eq!(echo(&mut ws, "b").await.as_deref(), Some("blue b"));
    let (how, _) = ending(&mut ws, Duration::from_millis(1500)).await;
    assert_eq!(how, "still open");
    assert_eq!(echo(&mut ws, "c").await.as_deref(), Some("blue c"));
    let mut new = open(nginx).await;
    assert_eq!(echo(&mut new, "d").await.as_deref(), Some("green d"));
    println!("nginx Dynamic switch: the open WebSocket stayed on blue, still open 1.5 s later; a new one went to green");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_switch_keeps_an_open_websocket_until_worker_shutdown_timeout_then_cuts_it() {
    if !common::require(false) {
        return;
    }
    let shutdown_timeout = Duration::from_secs(2);
    let s = common::reload_site(|site| {
        site.with_websockets()
            .with_worker_shutdown_timeout(shutdown_timeout)
    })
    .await;
    let (nginx, switch, eps) = (&s.nginx, s.switch.clone(), s.backends.endpoints());
    let mut ws = open(nginx).await;
    assert_eq!(echo(&mut ws, "a").await.as_deref(), Some("blue a"));

    let reloaded = Instant::now();
    // `apply` returns once the old workers are gone (it waits for them): run it aside.
    let apply = {
        let (switch, eps) = (switch.clone(), eps.clone());
        tokio::spawn(async move { switch.apply(&TrafficSplit::all(Slot::Green), &eps).await })
    };
    // Once new connections reach green the reload took effect…
    let mut new = loop {
        let mut c = open(nginx).await;
        if echo(&mut c, "c").await.as_deref() == Some("green c") {
            break c;
        }
        assert!(
            reloaded.elapsed() < Duration::from_secs(10),
            "the reload never took effect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // …and the old worker still serves the open WebSocket, on blue…
    assert_eq!(echo(&mut ws, "b").await.as_deref(), Some("blue b"));
    // …until worker_shutdown_timeout, when it is reset: no close frame.
    let (how, _) = ending(&mut ws, shutdown_timeout + Duration::from_secs(8)).await;
    let after = reloaded.elapsed();
    assert_ne!(how, "still open", "the old worker never closed it");
    assert!(
        !how.starts_with("close frame"),
        "nginx sent a close frame: {how}"
    );
    assert!(
        after >= shutdown_timeout.saturating_sub(Duration::from_millis(200)),
        "cut after {after:?}, before worker_shutdown_timeout"
    );
    apply.await.unwrap().unwrap();
    assert_eq!(echo(&mut new, "d").await.as_deref(), Some("green d"));
    println!("nginx Reload switch: the open WebSocket stayed on blue, then ended ({how}) {after:.2?} after the reload (worker_shutdown_timeout {shutdown_timeout:?})");
}
