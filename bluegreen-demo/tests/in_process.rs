//! The demo app served in-process answers as documented.

use std::time::{Duration, Instant};

use bluegreen_demo::{client, DemoConfig, DemoServer};

#[tokio::test]
async fn index_and_health_carry_version_and_slot() {
    let server = DemoServer::start(DemoConfig::new("v7", "blue"))
        .await
        .unwrap();
    let addr = server.local_addr();

    let res = client::get(addr, "/").await.unwrap();
    assert_eq!(res.status, 200);
    assert_eq!(res.body, "version=v7 slot=blue\n");
    assert_eq!(res.header("x-bluegreen-version"), Some("v7"));
    assert_eq!(res.header("x-bluegreen-slot"), Some("blue"));

    let health = client::get(addr, "/health").await.unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(health.body.trim(), "ok");
    assert_eq!(health.header("x-bluegreen-version"), Some("v7"));
    assert_eq!(health.header("x-bluegreen-slot"), Some("blue"));

    assert_eq!(client::get(addr, "/nope").await.unwrap().status, 404);
    server.shutdown().await.unwrap();
    assert!(
        client::get(addr, "/").await.is_err(),
        "still answering after shutdown"
    );
}

#[tokio::test]
async fn failing_health_answers_503() {
    let server = DemoServer::start(DemoConfig::new("v1", "green").with_fail_health(true))
        .await
        .unwrap();
    let res = client::get(server.local_addr(), "/health").await.unwrap();
    assert_eq!(res.status, 503);
    assert_eq!(res.header("x-bluegreen-slot"), Some("green"));
    // `/` is unaffected.
    assert_eq!(
        client::get(server.local_addr(), "/").await.unwrap().status,
        200
    );
}

#[tokio::test]
async fn error_rate_fails_that_share_of_index_requests() {
    let server = DemoServer::start(DemoConfig::new("v1", "blue").with_error_rate(0.3))
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(client::get(server.local_addr(), "/").await.unwrap().status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        6,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        14,
        "{statuses:?}"
    );
    // Health is never failed by the error rate.
    for _ in 0..5 {
        assert_eq!(
            client::get(server.local_addr(), "/health")
                .await
                .unwrap()
                .status,
            200
        );
    }
}

#[tokio::test]
async fn slow_sleeps_then_answers_and_rejects_unbounded_sleeps() {
    let server = DemoServer::start(DemoConfig::new("v1", "blue"))
        .await
        .unwrap();
    let started = Instant::now();
    let res = client::get(server.local_addr(), "/slow?ms=300")
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        (res.status, res.body.as_str()),
        (200, "version=v1 slot=blue\n")
    );
    assert_eq!(
        client::get(server.local_addr(), "/slow?ms=60001")
            .await
            .unwrap()
            .status,
        400
    );
    assert_eq!(
        client::get(server.local_addr(), "/slow")
            .await
            .unwrap()
            .status,
        400
    );
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests() {
    let server = DemoServer::start(DemoConfig::new("v1", "blue"))
        .await
        .unwrap();
    let addr = server.local_addr();
    let slow = tokio::spawn(async move { client::get(addr, "/slow?ms=700").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    server.shutdown().await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "shutdown returned before the in-flight request finished"
    );
    let res = slow.await.unwrap().unwrap();
    assert_eq!(res.status, 200);
}

#[tokio::test]
async fn drain_is_bounded() {
    let server = DemoServer::start(
        DemoConfig::new("v1", "blue").with_drain_timeout(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let slow = tokio::spawn(async move { client::get(addr, "/slow?ms=10000").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    server.shutdown().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    slow.abort();
}

/// A raw HTTP/1.1 request; returns the status and body.
async fn raw(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

#[tokio::test]
async fn odoo_style_routes_answer_and_jsonrpc_checks_the_token() {
    let server = DemoServer::start(DemoConfig::new("v3", "green").with_rpc_token("t0ken"))
        .await
        .unwrap();
    let addr = server.local_addr();
    assert_eq!(client::get(addr, "/web/health").await.unwrap().status, 200);
    let login = client::get(addr, "/web/login").await.unwrap();
    assert_eq!(login.status, 200);
    assert!(login.body.contains("<form"), "{}", login.body);

    let call = |auth: &str| {
        format!(
            "POST /jsonrpc HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{auth}\
             Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        )
    };
    let (status, body) = raw(addr, &call("Authorization: Bearer t0ken\r\n")).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["result"]["server_version"], "v3");
    assert_eq!(
        raw(addr, &call("Authorization: Bearer wrong\r\n")).await.0,
        401
    );
    assert_eq!(raw(addr, &call("")).await.0, 401);
    server.shutdown().await.unwrap();

    let failing = DemoServer::start(DemoConfig::new("v4", "blue").with_fail_health(true))
        .await
        .unwrap();
    assert_eq!(
        client::get(failing.local_addr(), "/web/health")
            .await
            .unwrap()
            .status,
        503
    );
    failing.shutdown().await.unwrap();
}

#[tokio::test]
async fn on_a_wildcard_address_the_instance_is_the_address_the_connection_reached() {
    let server = DemoServer::start(DemoConfig::new("v1", "blue").with_host("0.0.0.0"))
        .await
        .unwrap();
    let port = server.local_addr().port();
    let res = client::get(std::net::SocketAddr::from(([127, 0, 0, 2], port)), "/")
        .await
        .unwrap();
    let want = format!("127.0.0.2:{port}");
    assert_eq!(res.header("x-bluegreen-instance"), Some(want.as_str()));
}
