//! The proxy on real sockets: routing, switching under load, pause, drain, preview, sticky
//! sessions, metrics, errors, upgrades and HTTP/2.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bluegreen_core::{Endpoint, Endpoints, Error, Slot, Sticky, TrafficSplit, TrafficSwitch};
use bluegreen_proxy::{ProxyConfig, ProxySwitch};
use common::{client, dead_endpoint, eventually, get, upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn proxy() -> ProxySwitch {
    ProxySwitch::bind(ProxyConfig::default()).await.unwrap()
}

fn eps(blue: &common::Upstream, green: &common::Upstream) -> Endpoints {
    Endpoints::new(vec![blue.endpoint()], vec![green.endpoint()])
}

#[tokio::test]
async fn answers_503_until_a_split_is_applied_then_routes_to_it() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = proxy().await;
    let c = client();
    assert_eq!(p.current().await.unwrap(), None);
    let (status, _) = get(&c, &p.url("/")).await;
    assert_eq!(status, 503);

    p.apply(&TrafficSplit::all(Slot::Green), &eps(&b, &g))
        .await
        .unwrap();
    assert_eq!(get(&c, &p.url("/")).await, (200, "green".to_string()));
    // A clone reads the same routing table.
    let clone = p.clone();
    assert_eq!(
        clone.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Green))
    );
    assert_eq!(b.requests(), 0);
}

#[tokio::test]
async fn invalid_splits_are_refused_and_change_nothing() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = proxy().await;
    p.apply(&TrafficSplit::all(Slot::Blue), &eps(&b, &g))
        .await
        .unwrap();

    let no_green = Endpoints::new(vec![b.endpoint()], vec![]);
    let err = p
        .apply(&TrafficSplit::all(Slot::Green), &no_green)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");

    let mut https = g.endpoint();
    https.scheme = "https".into();
    let err = p
        .apply(
            &TrafficSplit::all(Slot::Green),
            &Endpoints::new(vec![b.endpoint()], vec![https]),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");

    let bad_host = Endpoints::new(vec![b.endpoint()], vec![Endpoint::new("evil host", 80)]);
    assert!(p
        .apply(&TrafficSplit::all(Slot::Green), &bad_host)
        .await
        .is_err());

    assert_eq!(
        p.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );
    assert_eq!(get(&client(), &p.url("/")).await.1, "blue");
}

/// The headline property: flipping the split while clients hammer the proxy fails no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipping_the_split_under_load_fails_no_request() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = proxy().await;
    let endpoints = eps(&b, &g);
    p.apply(&TrafficSplit::all(Slot::Blue), &endpoints)
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    // 8 keep-alive clients and 2 that open a new connection per request.
    for i in 0..10 {
        let (stop, ok, failed, url) = (
            Arc::clone(&stop),
            Arc::clone(&ok),
            Arc::clone(&failed),
            p.url("/"),
        );
        clients.push(tokio::spawn(async move {
            let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
            if i >= 8 {
                builder = builder.pool_max_idle_per_host(0);
            }
            let c = builder.build().unwrap();
            let mut seen = (0u64, 0u64);
            while !stop.load(Ordering::SeqCst) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => match r.text().await.as_deref() {
                        Ok("blue") => {
                            seen.0 += 1;
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok("green") => {
                            seen.1 += 1;
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        other => {
                            eprintln!("unexpected body {other:?}");
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                    },
                    other => {
                        eprintln!("failed request: {other:?}");
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            seen
        }));
    }

    eventually("first responses", || ok.load(Ordering::SeqCst) > 50).await;
    let mut slot = Slot::Blue;
    for _ in 0..60 {
        slot = slot.other();
        p.apply(&TrafficSplit::all(slot), &endpoints).await.unwrap();
        tokio::time::sleep(Duration::from_millis(8)).await;
    }
    // Weighted splits too.
    for w in [10u8, 50, 90] {
        p.apply(&TrafficSplit::canary(Slot::Green, w).unwrap(), &endpoints)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(8)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (mut blue, mut green) = (0, 0);
    for c in clients {
        let (b_, g_) = c.await.unwrap();
        blue += b_;
        green += g_;
    }
    assert_eq!(failed.load(Ordering::SeqCst), 0, "failed requests");
    assert!(blue > 0 && green > 0, "blue {blue}, green {green}");
    assert_eq!(blue + green, ok.load(Ordering::SeqCst));
    let m = (
        p.metrics(Slot::Blue).await.unwrap(),
        p.metrics(Slot::Green).await.unwrap(),
    );
    assert_eq!(m.0.errors_5xx + m.1.errors_5xx, 0);
    assert_eq!(m.0.requests + m.1.requests, blue + green);
    assert_eq!(
        p.in_flight_now(Slot::Blue) + p.in_flight_now(Slot::Green),
        0
    );
}

#[tokio::test]
async fn paused_requests_wait_and_go_to_the_split_applied_meanwhile() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = proxy().await;
    let endpoints = eps(&b, &g);
    p.apply(&TrafficSplit::all(Slot::Blue), &endpoints)
        .await
        .unwrap();
    p.pause().await.unwrap();
    assert!(p.is_paused());

    let c = client();
    let held: Vec<_> = (0..5)
        .map(|_| {
            let (c, url) = (c.clone(), p.url("/"));
            tokio::spawn(async move { get(&c, &url).await })
        })
        .collect();
    let probe = p.clone();
    eventually("5 held requests", || probe.paused_requests() == 5).await;
    assert_eq!(b.requests() + g.requests(), 0);

    p.apply(&TrafficSplit::all(Slot::Green), &endpoints)
        .await
        .unwrap();
    p.resume().await.unwrap();
    for h in held {
        assert_eq!(h.await.unwrap(), (200, "green".to_string()));
    }
    assert_eq!(b.requests(), 0);
    assert_eq!(p.paused_requests(), 0);
}

#[tokio::test]
async fn pause_queue_overflow_answers_503_and_overlong_wait_504_both_with_retry_after_and_counted()
{
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = ProxySwitch::bind(
        ProxyConfig::default()
            .with_max_paused_requests(2)
            .with_max_pause_wait(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    p.apply(&TrafficSplit::all(Slot::Blue), &eps(&b, &g))
        .await
        .unwrap();
    p.pause().await.unwrap();
    let c = client();
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (c, url) = (c.clone(), p.url("/"));
            tokio::spawn(async move { get(&c, &url).await })
        })
        .collect();
    let probe = p.clone();
    eventually("2 held requests", || probe.paused_requests() == 2).await;

    let r = c.get(p.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");

    p.resume().await.unwrap();
    for h in held {
        assert_eq!(h.await.unwrap(), (200, "blue".to_string()));
    }
    let counts = p.pause_counts();
    assert_eq!(
        (counts.held, counts.overflowed, counts.timed_out),
        (2, 1, 0)
    );

    // The time bound.
    let p =
        ProxySwitch::bind(ProxyConfig::default().with_max_pause_wait(Duration::from_millis(200)))
            .await
            .unwrap();
    p.apply(&TrafficSplit::all(Slot::Blue), &eps(&b, &g))
        .await
        .unwrap();
    p.pause().await.unwrap();
    let started = Instant::now();
    let r = c.get(p.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert!(r.headers().contains_key("retry-after"));
    assert!(started.elapsed() >= Duration::from_millis(200));
    let counts = p.pause_counts();
    assert_eq!(
        (counts.held, counts.overflowed, counts.timed_out),
        (0, 0, 1)
    );
    assert_eq!(
        b.requests(),
        2,
        "only the two released requests reached blue"
    );
}

#[tokio::test]
async fn in_flight_counts_a_slow_request_and_drain_waits_for_it() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = proxy().await;
    p.apply(&TrafficSplit::all(Slot::Blue), &eps(&b, &g))
        .await
        .unwrap();
    let c = client();
    let url = p.url("/slow?ms=1500");
    let slow = tokio::spawn(async move { get(&c, &url).await });
    let probe = p.clone();
    eventually("slow request in flight", || {
        probe.in_flight_now(Slot::Blue) == 1
    })
    .await;
    assert_eq!(p.in_flight(Slot::Blue).await.unwrap(), 1);
    assert_eq!(p.in_flight(Slot::Green).await.unwrap(), 0);

    let err = p
        .wait_drained(Slot::Blue, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("1 requests"), "{err}");

    p.wait_drained(Slot::Blue, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(p.in_flight_now(Slot::Blue), 0);
    assert_eq!(slow.await.unwrap(), (200, "blue".to_string()));
    // Green was idle all along.
    p.wait_drained(Slot::Green, Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn a_request_stays_in_flight_until_its_body_is_finished() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = proxy().await;
    p.apply(&TrafficSplit::all(Slot::Blue), &eps(&b, &g))
        .await
        .unwrap();
    let c = client();
    let mut r = c.get(p.url("/stream?ms=800")).send().await.unwrap();
    // Headers and the first chunk are here; the rest of the body is not.
    assert_eq!(r.chunk().await.unwrap().as_deref(), Some(&b"a"[..]));
    assert_eq!(p.in_flight_now(Slot::Blue), 1);
    // Switching does not cut it: it finishes on blue.
    p.apply(&TrafficSplit::all(Slot::Green), &eps(&b, &g))
        .await
        .unwrap();
    assert_eq!(r.chunk().await.unwrap().as_deref(), Some(&b"b"[..]));
    assert_eq!(r.chunk().await.unwrap(), None);
    p.wait_drained(Slot::Blue, Duration::from_secs(10))
        .await
        .unwrap();

    // A client that goes away mid-body ends the request too.
    let r = c.get(p.url("/stream?ms=60000")).send().await.unwrap();
    let probe = p.clone();
    eventually("stream in flight", || probe.in_flight_now(Slot::Green) == 1).await;
    drop(r);
    p.wait_drained(Slot::Green, Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test]
async fn sticky_sessions_keep_a_client_on_its_slot_while_it_has_weight() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = proxy().await;
    let endpoints = eps(&b, &g);
    let sticky = Some(Sticky {
        cookie: "app_slot".into(),
    });
    let mut split = TrafficSplit::new(50, 50).unwrap();
    split.sticky = sticky.clone();
    p.apply(&split, &endpoints).await.unwrap();

    let c = client();
    let first = c.get(p.url("/")).send().await.unwrap();
    let cookie = first.headers()["set-cookie"].to_str().unwrap().to_string();
    let body = first.text().await.unwrap();
    assert!(cookie.starts_with(&format!("app_slot={body};")), "{cookie}");
    let pinned = format!("app_slot={body}");
    for _ in 0..30 {
        let r = c
            .get(p.url("/"))
            .header("cookie", &pinned)
            .send()
            .await
            .unwrap();
        assert!(!r.headers().contains_key("set-cookie"));
        assert_eq!(r.text().await.unwrap(), body);
    }

    // Once its slot has no weight left, the client moves and gets a new cookie.
    let slot: Slot = body.parse().unwrap();
    let mut moved = TrafficSplit::all(slot.other());
    moved.sticky = sticky;
    p.apply(&moved, &endpoints).await.unwrap();
    let r = c
        .get(p.url("/"))
        .header("cookie", &pinned)
        .send()
        .await
        .unwrap();
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.starts_with(&format!("app_slot={};", slot.other())));
    assert_eq!(r.text().await.unwrap(), slot.other().as_str());
}

#[tokio::test]
async fn preview_routes_by_header_and_by_cookie_until_stopped() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = proxy().await;
    let endpoints = eps(&b, &g);
    p.apply(
        &TrafficSplit::all(Slot::Blue),
        &Endpoints::new(vec![b.endpoint()], vec![]),
    )
    .await
    .unwrap();
    let c = client();
    let with = |name: &'static str, value: &'static str| {
        let req = c.get(p.url("/")).header(name, value);
        async move { req.send().await.unwrap().text().await.unwrap() }
    };
    assert_eq!(with("x-bluegreen-preview", "1").await, "blue");

    p.preview(Some(Slot::Green), &endpoints).await.unwrap();
    assert_eq!(p.preview_slot(), Some(Slot::Green));
    assert_eq!(with("x-bluegreen-preview", "1").await, "green");
    assert_eq!(with("cookie", "a=b; bluegreen_preview=1").await, "green");
    assert_eq!(with("x-bluegreen-preview", "0").await, "blue");
    assert_eq!(with("x-other", "1").await, "blue");
    assert_eq!(
        p.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );
    assert_eq!(p.metrics(Slot::Green).await.unwrap().requests, 2);

    // Preview of a slot without endpoints is refused and changes nothing.
    let err = p
        .preview(Some(Slot::Blue), &Endpoints::new(vec![], vec![]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    assert_eq!(p.preview_slot(), Some(Slot::Green));

    p.preview(None, &endpoints).await.unwrap();
    assert_eq!(p.preview_slot(), None);
    assert_eq!(with("x-bluegreen-preview", "1").await, "blue");
    assert_eq!(with("cookie", "bluegreen_preview=1").await, "blue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_split_roughly_honours_its_weights() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = proxy().await;
    p.apply(
        &TrafficSplit::canary(Slot::Green, 10).unwrap(),
        &eps(&b, &g),
    )
    .await
    .unwrap();
    let c = client();
    let mut green = 0;
    for _ in 0..1000 {
        if get(&c, &p.url("/")).await.1 == "green" {
            green += 1;
        }
    }
    assert!((30..=170).contains(&green), "green got {green} of 1000");
    assert_eq!(g.requests(), green);
    assert_eq!(b.requests(), 1000 - green);
}

#[tokio::test]
async fn metrics_count_requests_errors_and_latency_per_slot() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = proxy().await;
    p.apply(&TrafficSplit::all(Slot::Blue), &eps(&b, &g))
        .await
        .unwrap();
    let c = client();
    for _ in 0..8 {
        assert_eq!(get(&c, &p.url("/")).await.0, 200);
    }
    for _ in 0..2 {
        assert_eq!(get(&c, &p.url("/status/500")).await.0, 500);
    }
    assert_eq!(get(&c, &p.url("/slow?ms=300")).await.0, 200);
    let m = p.metrics(Slot::Blue).await.unwrap();
    assert_eq!((m.requests, m.errors_5xx, m.connect_errors), (11, 2, 0));
    assert!(m.p50 > Duration::ZERO && m.p50 <= m.p99, "{m:?}");
    // The slow request is the top 1 %: p99 reflects it (histogram error < 12.5 %).
    assert!(m.p99 >= Duration::from_millis(250), "{m:?}");
    assert_eq!(p.metrics(Slot::Green).await.unwrap().requests, 0);
}

#[tokio::test]
async fn a_connect_error_is_a_counted_502() {
    let b = upstream("blue").await;
    let (dead, _held) = dead_endpoint();
    let p = proxy().await;
    p.apply(
        &TrafficSplit::all(Slot::Green),
        &Endpoints::new(vec![b.endpoint()], vec![dead]),
    )
    .await
    .unwrap();
    let (status, body) = get(&client(), &p.url("/")).await;
    assert_eq!(status, 502, "{body}");
    let m = p.metrics(Slot::Green).await.unwrap();
    assert_eq!((m.requests, m.errors_5xx, m.connect_errors), (1, 1, 1));
    assert_eq!(p.in_flight_now(Slot::Green), 0);
}

#[tokio::test]
async fn a_connect_error_is_retried_once_on_another_endpoint_of_the_slot() {
    let (b1, b2) = (upstream("blue-1").await, upstream("blue-2").await);
    let (dead, _held) = dead_endpoint();
    let p = proxy().await;
    p.apply(
        &TrafficSplit::all(Slot::Blue),
        &Endpoints::new(vec![b1.endpoint(), dead, b2.endpoint()], vec![]),
    )
    .await
    .unwrap();
    let c = client();
    for i in 0..9 {
        // A request with a body is retried intact: it was never sent to the dead endpoint.
        let r = c
            .post(p.url("/echo"))
            .body(format!("payload-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(text.ends_with(&format!(":payload-{i}")), "{text}");
    }
    // Round-robin over three endpoints: the dead one was picked 3 times, each retried.
    assert_eq!(b1.requests() + b2.requests(), 9);
    assert!(b1.requests() >= 3 && b2.requests() >= 3);
    let m = p.metrics(Slot::Blue).await.unwrap();
    assert_eq!((m.requests, m.errors_5xx, m.connect_errors), (9, 0, 3));
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_in_time_is_a_504() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = ProxySwitch::bind(
        ProxyConfig::default().with_response_header_timeout(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    p.apply(&TrafficSplit::all(Slot::Blue), &eps(&b, &g))
        .await
        .unwrap();
    let (status, _) = get(&client(), &p.url("/slow?ms=5000")).await;
    assert_eq!(status, 504);
    // Never retried: the request may have reached the upstream.
    assert_eq!(b.requests(), 1);
    let m = p.metrics(Slot::Blue).await.unwrap();
    assert_eq!((m.requests, m.errors_5xx, m.connect_errors), (1, 1, 0));
}

#[tokio::test]
async fn forwarded_headers_are_added_and_hop_by_hop_headers_dropped() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = proxy().await;
    p.apply(&TrafficSplit::all(Slot::Blue), &eps(&b, &g))
        .await
        .unwrap();
    let r = client()
        .get(p.url("/headers"))
        .header("host", "app.example")
        .header("x-forwarded-for", "203.0.113.9")
        .header("connection", "x-hop")
        .header("x-hop", "secret")
        .header("x-app", "kept")
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    let has = |line: &str| text.lines().any(|l| l.eq_ignore_ascii_case(line));
    assert!(has("x-forwarded-for: 203.0.113.9, 127.0.0.1"), "{text}");
    assert!(has("x-forwarded-proto: http"), "{text}");
    assert!(has("x-forwarded-host: app.example"), "{text}");
    assert!(has("host: app.example"), "{text}");
    assert!(has("x-app: kept"), "{text}");
    assert!(!text.contains("x-hop"), "{text}");
}

#[tokio::test]
async fn upgraded_connections_are_tunnelled_and_counted_as_long_lived_until_closed() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = proxy().await;
    p.apply(&TrafficSplit::all(Slot::Blue), &eps(&b, &g))
        .await
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(p.local_addr())
        .await
        .unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "eof in head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: echo"),
        "{head}"
    );

    // A switch does not cut the tunnel.
    p.apply(&TrafficSplit::all(Slot::Green), &eps(&b, &g))
        .await
        .unwrap();
    for msg in [&b"hello"[..], b"over the tunnel"] {
        s.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg);
    }
    // A long-lived connection, not a request in flight: a drain does not wait for it.
    assert_eq!(p.long_lived_now(Slot::Blue), 1);
    assert_eq!(p.in_flight_now(Slot::Blue), 0);
    p.wait_drained(Slot::Blue, Duration::from_secs(10))
        .await
        .unwrap();
    drop(s);
    let probe = p.clone();
    eventually("the tunnel is gone", || {
        probe.long_lived_now(Slot::Blue) == 0
    })
    .await;
    assert_eq!(p.long_lived_closed(Slot::Blue), 0, "the client closed it");
}

#[tokio::test]
async fn http2_prior_knowledge_clients_are_served() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = proxy().await;
    p.apply(&TrafficSplit::all(Slot::Green), &eps(&b, &g))
        .await
        .unwrap();
    let (sender, _conn) = common::h2_connect(p.local_addr()).await;
    let mut streams = Vec::new();
    for _ in 0..10 {
        let mut sender = sender.clone();
        let uri = format!("http://{}/headers", p.local_addr());
        streams.push(tokio::spawn(async move {
            let req = hyper::Request::get(uri)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.version(), hyper::Version::HTTP_2);
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            String::from_utf8(body.to_vec()).unwrap()
        }));
    }
    let host = format!("host: {}", p.local_addr());
    for s in streams {
        let headers = s.await.unwrap();
        assert!(headers.lines().any(|l| l == host), "{headers}");
    }
    assert_eq!(g.requests(), 10);
}

#[tokio::test]
async fn shutdown_stops_listening() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let p = proxy().await;
    p.apply(&TrafficSplit::all(Slot::Blue), &eps(&b, &g))
        .await
        .unwrap();
    assert_eq!(get(&client(), &p.url("/")).await.0, 200);
    let addr = p.local_addr();
    p.clone().shutdown().await;
    p.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn malformed_names_in_the_config_are_refused() {
    for config in [
        ProxyConfig::default().with_preview_header("bad header"),
        ProxyConfig::default().with_preview_cookie("a;b"),
        ProxyConfig::default().with_sticky_cookie(""),
    ] {
        let err = ProxySwitch::bind(config).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    }
}

#[tokio::test]
async fn a_prebound_listener_can_be_served() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let p = ProxySwitch::from_listener(listener, ProxyConfig::default()).unwrap();
    assert_eq!(p.local_addr(), addr);
    p.apply(&TrafficSplit::all(Slot::Blue), &eps(&b, &g))
        .await
        .unwrap();
    assert_eq!(get(&client(), &p.url("/")).await, (200, "blue".to_string()));
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_proxy() {
    let p = proxy().await;
    let addr = p.local_addr();
    let clone = p.clone();
    drop(p);
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    drop(clone);
    let mut stopped = false;
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stopped, "the proxy still accepts connections");
}

#[tokio::test]
async fn a_restarted_proxy_restores_the_routing_it_last_applied() {
    use std::os::unix::fs::PermissionsExt;
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routing.json");
    let config = ProxyConfig::default().with_routing_file(&file);
    let p = ProxySwitch::bind(config.clone()).await.unwrap();
    p.apply(&TrafficSplit::all(Slot::Blue), &eps(&b, &g))
        .await
        .unwrap();
    // The target got new endpoints with the switch: the file has them.
    let g2 = upstream("green v7").await;
    p.apply(&TrafficSplit::all(Slot::Green), &eps(&b, &g2))
        .await
        .unwrap();
    p.preview(Some(Slot::Blue), &eps(&b, &g2)).await.unwrap();
    p.shutdown().await;
    drop(p);

    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the routing file is private");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != "routing.json")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let again = ProxySwitch::bind(config).await.unwrap();
    assert_eq!(
        again.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Green))
    );
    assert_eq!(again.endpoints(), eps(&b, &g2));
    assert_eq!(again.preview_slot(), Some(Slot::Blue));
    let c = client();
    assert_eq!(
        get(&c, &again.url("/")).await,
        (200, "green v7".to_string())
    );
    assert_eq!(g.requests(), 0);
}

#[tokio::test]
async fn a_corrupt_routing_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routing.json");
    std::fs::write(&file, b"{ not json").unwrap();
    let err = ProxySwitch::bind(ProxyConfig::default().with_routing_file(&file))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::CorruptState { .. }), "{err}");
    assert!(err.to_string().contains("routing.json"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"{ not json");
}

#[tokio::test]
async fn a_change_that_cannot_be_kept_is_refused_and_changes_nothing() {
    let (b, g) = (upstream("blue").await, upstream("green").await);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("missing-dir").join("routing.json");
    let p = ProxySwitch::bind(ProxyConfig::default().with_routing_file(&file))
        .await
        .unwrap();
    let err = p
        .apply(&TrafficSplit::all(Slot::Blue), &eps(&b, &g))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert_eq!(p.current().await.unwrap(), None);
    let (status, _) = get(&client(), &p.url("/")).await;
    assert_eq!(status, 503);
}
