//! Per-slot metrics read from HAProxy's `show stat`, against a real HAProxy: the counters move by
//! exactly what went through each server, and 5xx answers are counted as errors.

mod common;

use bluegreen_core::{Endpoint, Endpoints, Slot, TrafficSplit, TrafficSwitch};
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
