//! The proxy's traffic ledger under real load: its counts are exactly what the clients saw.

use std::time::Duration;

use bluegreen_core::ledger::TrafficLedger;
use bluegreen_core::{Endpoint, Endpoints, PerSlot, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_demo::{DemoConfig, DemoServer};
use bluegreen_proxy::{ProxyConfig, ProxySwitch};
use bluegreen_testenv::port::RefusedAddr;
use bluegreen_testenv::{Load, LoadOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_counts_exactly_what_the_clients_saw() {
    // Blue answers 10 % of `/` with its own 500; green's endpoint refuses every connection.
    let blue = DemoServer::start(DemoConfig::new("v1", "blue").with_error_rate(0.1))
        .await
        .unwrap();
    let refused = RefusedAddr::new();
    let eps = Endpoints::new(
        vec![Endpoint::new("127.0.0.1", blue.local_addr().port())],
        vec![Endpoint::new("127.0.0.1", refused.port())],
    );
    let p = ProxySwitch::bind(
        ProxyConfig::default().with_response_header_timeout(Duration::from_millis(150)),
    )
    .await
    .unwrap();
    // Requests before the split is applied: the proxy's own 503, counted outside the slots.
    let early = Load::start(p.local_addr(), LoadOptions::new(1));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let early = early.finish().await;
    assert!(
        early.total() > 0 && early.statuses.keys().all(|s| *s == 503),
        "{early:?}"
    );

    let start = p.counters().await.unwrap();
    p.apply(&TrafficSplit::all(Slot::Blue), &eps).await.unwrap();
    let load = Load::start(p.local_addr(), LoadOptions::new(6));
    // One client whose requests outlast the response-header timeout: 504s.
    let slow = Load::start(
        p.local_addr(),
        LoadOptions::new(1).with_path("/slow?ms=1000"),
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let at_switch = p.counters().await.unwrap();
    p.apply(&TrafficSplit::new(70, 30).unwrap(), &eps)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (load, slow) = (load.finish().await, slow.finish().await);
    let end = p.counters().await.unwrap();

    let seen = |stats: &bluegreen_testenv::LoadStats, status: u16| {
        stats.statuses.get(&status).copied().unwrap_or(0)
    };
    // Every request got a complete answer: the client's counts are by status only.
    let answered: u64 = load.statuses.values().sum::<u64>() + slow.statuses.values().sum::<u64>();
    assert_eq!(answered, load.total() + slow.total(), "{load:?} {slow:?}");
    assert!(seen(&load, 500) > 0 && seen(&load, 502) > 0, "{load:?}");
    assert!(seen(&slow, 504) > 0, "{slow:?}");

    let ledger = TrafficLedger::between(&start, Some(&at_switch), &end);
    let c = ledger.counts().expect("the proxy counts");
    assert_eq!(
        c.requests.blue + c.requests.green,
        load.total() + slow.total(),
        "{ledger}"
    );
    // Both clients' requests went 70/30 after the switch: each cause sums over both.
    let both = |status| seen(&load, status) + seen(&slow, status);
    assert_eq!(c.app_5xx, Some(both(500)), "{ledger}");
    assert_eq!(c.refused, Some(both(502)), "{ledger}");
    assert_eq!(c.timeouts, Some(both(504)), "{ledger}");
    assert_eq!(c.switch_5xx, Some(0), "{ledger}");
    assert_eq!(c.buffered, Some(0));
    assert_eq!(
        c.graceful_closes,
        Some(0),
        "the proxy counts graceful closes: none here, a measured 0"
    );
    assert_eq!(
        ledger.dropped(),
        Some(load.failed + slow.failed),
        "dropped is what failed for the clients: {ledger}"
    );
    // Green got only refused connections; blue answered everything else.
    assert_eq!(c.requests.green, both(502));
    assert_eq!(c.requests.blue, both(200) + both(500) + both(504));
    assert_eq!(load.blue, seen(&load, 200), "every 200 came from blue");
    let lat = c.latency.expect("the proxy measures latency");
    assert!(lat.before.is_some() && lat.after.is_some(), "{lat:?}");
    // The slow client's 504s come after 150 ms: the histogram's largest latency shows them
    // (within a bucket's 12.5 %).
    let all = end.since(&start).unwrap();
    let max = all.slots.blue.latency.unwrap().quantile(1.0).unwrap();
    assert!(max >= Duration::from_millis(130), "{max:?}");
    // The 503s before the split: outside this window, counted apart.
    assert_eq!(
        start.unrouted_5xx,
        Some(seen(&early, 503)),
        "unrouted 503s are the proxy's own"
    );
    let summary = ledger.summary();
    assert!(
        summary.starts_with(&format!(
            "{} requests, {} dropped (",
            load.total() + slow.total(),
            load.failed + slow.failed
        )),
        "{summary}"
    );
    assert_eq!(
        PerSlot::new(c.requests.blue, c.requests.green),
        c.requests,
        "requests per slot"
    );
    p.shutdown().await;
    blue.shutdown().await.unwrap();
}

#[tokio::test]
async fn requests_held_by_a_pause_count_as_buffered_not_failed() {
    let blue = DemoServer::start(DemoConfig::new("v1", "blue"))
        .await
        .unwrap();
    let eps = Endpoints::new(
        vec![Endpoint::new("127.0.0.1", blue.local_addr().port())],
        vec![],
    );
    let p = ProxySwitch::bind(ProxyConfig::default()).await.unwrap();
    p.apply(&TrafficSplit::all(Slot::Blue), &eps).await.unwrap();
    let start = p.counters().await.unwrap();
    p.pause().await.unwrap();
    let load = Load::start(p.local_addr(), LoadOptions::new(3));
    // Each client sends one request and waits for it: three are held.
    for _ in 0..200 {
        if p.paused_requests() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(p.paused_requests(), 3);
    p.resume().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let load = load.finish().await;
    let ledger = TrafficLedger::between(&start, None, &p.counters().await.unwrap());
    let c = ledger.counts().unwrap();
    assert_eq!(c.buffered, Some(3), "{ledger}");
    assert_eq!(ledger.dropped(), Some(0));
    assert_eq!(load.failed, 0, "{load:?}");
    assert_eq!(c.requests.blue, load.ok);
    assert!(
        ledger.summary().contains(", 3 buffered,"),
        "{}",
        ledger.summary()
    );
    p.shutdown().await;
    blue.shutdown().await.unwrap();
}
