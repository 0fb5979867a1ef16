//! Per-slot metrics read from HAProxy's `show stat`, against a real HAProxy: the counters move by
//! exactly what went through each server, and 5xx answers are counted as errors.

mod common;

use bluegreen_core::{Endpoint, Endpoints, Slot, TrafficLedger, TrafficSplit, TrafficSwitch};
use bluegreen_demo::{DemoConfig, DemoServer};
use common::{client, haproxy_available, Haproxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_each_servers_answers_and_5xx() {
    if !haproxy_available("metrics") {
        return;
    }
    let h = Haproxy::start();
    // Green answers every second request with a 500.
    let blue = DemoServer::start(DemoConfig::new("v1", "blue"))
        .await
        .unwrap();
    let green = DemoServer::start(DemoConfig::new("v2", "green").with_error_rate(0.5))
        .await
        .unwrap();
    let eps = Endpoints::new(
        vec![Endpoint::new("127.0.0.1", blue.local_addr().port())],
        vec![Endpoint::new("127.0.0.1", green.local_addr().port())],
    );
    let switch = h.switch();
    assert!(switch.capabilities().metrics);
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &eps)
        .await
        .unwrap();
    let (b0, g0) = (
        switch.metrics(Slot::Blue).await.unwrap(),
        switch.metrics(Slot::Green).await.unwrap(),
    );
    let c = client();
    for _ in 0..10 {
        assert!(c
            .get(h.url("/"))
            .send()
            .await
            .unwrap()
            .status()
            .is_success());
    }
    switch
        .apply(&TrafficSplit::all(Slot::Green), &eps)
        .await
        .unwrap();
    let mut five_xx = 0;
    for _ in 0..20 {
        if c.get(h.url("/")).send().await.unwrap().status().as_u16() == 500 {
            five_xx += 1;
        }
    }
    assert_eq!(five_xx, 10, "the demo fails exactly every second request");
    let (b1, g1) = (
        switch.metrics(Slot::Blue).await.unwrap(),
        switch.metrics(Slot::Green).await.unwrap(),
    );
    // Health checks go to /health and are not counted as responses.
    assert_eq!(b1.requests - b0.requests, 10, "{b0:?} -> {b1:?}");
    assert_eq!(b1.errors_5xx - b0.errors_5xx, 0);
    assert_eq!(g1.requests - g0.requests, 20, "{g0:?} -> {g1:?}");
    assert_eq!(g1.errors_5xx - g0.errors_5xx, 10);
    assert!(g1.p99 >= g1.p50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_from_show_stat_matches_what_the_clients_saw() {
    if !haproxy_available("the_ledger_from_show_stat_matches_what_the_clients_saw") {
        return;
    }
    let h = Haproxy::start();
    // Blue answers 20 % with its own 500, green never fails.
    let blue = DemoServer::start(DemoConfig::new("v1", "blue").with_error_rate(0.2))
        .await
        .unwrap();
    let green = DemoServer::start(DemoConfig::new("v2", "green"))
        .await
        .unwrap();
    let eps = Endpoints::new(
        vec![Endpoint::new("127.0.0.1", blue.local_addr().port())],
        vec![Endpoint::new("127.0.0.1", green.local_addr().port())],
    );
    let switch = h.switch();
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &eps)
        .await
        .unwrap();
    let start = switch.counters().await.unwrap();
    let load = bluegreen_testenv::Load::start(h.addr(), bluegreen_testenv::LoadOptions::new(3));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let at_switch = switch.counters().await.unwrap();
    switch
        .apply(&TrafficSplit::new(50, 50).unwrap(), &eps)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let load = load.finish().await;
    let end = switch.counters().await.unwrap();

    let ledger = TrafficLedger::between(&start, Some(&at_switch), &end);
    let c = ledger.counts().expect("HAProxy counts responses");
    let seen = |status| load.statuses.get(&status).copied().unwrap_or(0);
    assert_eq!(
        load.statuses.values().sum::<u64>(),
        load.total(),
        "{load:?}"
    );
    assert!(seen(500) > 0 && load.green > 0, "{load:?}");
    // Health checks (to /health) are not requests; every client request is on a server row.
    assert_eq!(c.requests.blue + c.requests.green, load.total(), "{ledger}");
    assert_eq!(c.requests.green, load.green, "{ledger}");
    assert_eq!(c.requests.blue, load.blue + seen(500), "{ledger}");
    assert_eq!(c.app_5xx, Some(seen(500)), "{ledger}");
    // What HAProxy's server rows cannot tell: not measured, never 0.
    assert_eq!((c.refused, c.timeouts, c.switch_5xx), (None, None, None));
    assert_eq!(
        (c.buffered, c.graceful_closes, c.latency),
        (None, None, None)
    );
    let summary = ledger.summary();
    assert!(
        summary.starts_with(&format!(
            "{} requests, at least {} dropped",
            load.total(),
            seen(500)
        )),
        "{summary}"
    );
    assert!(summary.ends_with("latency not measured"), "{summary}");
}
