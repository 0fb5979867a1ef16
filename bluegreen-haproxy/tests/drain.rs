//! The old server is drained: `apply` waits for its sessions (`scur`) before maintenance, and a
//! request longer than the drain bound still finishes.

mod common;

use std::time::{Duration, Instant};

use bluegreen_core::{Slot, TrafficSplit, TrafficSwitch};
use bluegreen_haproxy::HaproxySwitch;
use common::{client, haproxy_available, Demos, Haproxy};

async fn slow_request(url: String) -> (u16, String) {
    let r = client().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let slot = r.headers()["x-bluegreen-slot"]
        .to_str()
        .unwrap()
        .to_string();
    let _ = r.bytes().await;
    (status, slot)
}

/// Waits until blue has at least one session in HAProxy.
async fn wait_in_flight(switch: &HaproxySwitch) {
    let start = Instant::now();
    while switch.in_flight(Slot::Blue).await.unwrap() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the slow request never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_waits_for_the_old_servers_sessions_before_maintenance() {
    if !haproxy_available("drain") {
        return;
    }
    let h = Haproxy::start();
    let demos = Demos::start().await;
    let switch = h.switch();
    let eps = demos.endpoints();
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &eps)
        .await
        .unwrap();

    let slow = tokio::spawn(slow_request(h.url("/slow?ms=10000")));
    wait_in_flight(&switch).await;
    let apply = {
        let (switch, eps) = (switch.clone(), eps.clone());
        tokio::spawn(async move { switch.apply(&TrafficSplit::all(Slot::Green), &eps).await })
    };
    // While the request runs, blue drains: out of rotation, not yet in maintenance.
    let start = Instant::now();
    loop {
        let s = switch.servers().await.unwrap();
        if s.blue.is_drain() {
            assert!(!s.blue.is_maint());
            assert!(switch.in_flight(Slot::Blue).await.unwrap() >= 1);
            // New requests already go to green.
            assert_eq!(
                common::served_by(&client(), &h.url("/")).await.unwrap(),
                Slot::Green
            );
            break;
        }
        assert!(
            !apply.is_finished(),
            "apply finished before the slow request: {:?}",
            s.blue.summary()
        );
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    apply.await.unwrap().unwrap();
    // apply returned after the session ended, so the request had finished, on blue.
    assert!(slow.is_finished());
    assert_eq!(slow.await.unwrap(), (200, "blue".to_string()));
    let s = switch.servers().await.unwrap();
    assert!(s.blue.is_maint());
    assert_eq!(switch.in_flight(Slot::Blue).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_drain_bound_the_server_goes_to_maintenance_and_the_request_still_finishes() {
    if !haproxy_available("drain") {
        return;
    }
    let h = Haproxy::start();
    let demos = Demos::start().await;
    let switch = HaproxySwitch::new(
        h.config
            .clone()
            .with_drain_timeout(Duration::from_millis(300)),
    )
    .unwrap();
    let eps = demos.endpoints();
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &eps)
        .await
        .unwrap();
    let slow = tokio::spawn(slow_request(h.url("/slow?ms=10000")));
    wait_in_flight(&switch).await;
    switch
        .apply(&TrafficSplit::all(Slot::Green), &eps)
        .await
        .unwrap();
    // The bound passed with the request still running: blue is in maintenance anyway...
    let s = switch.servers().await.unwrap();
    assert!(s.blue.is_maint());
    assert!(
        !slow.is_finished(),
        "the slow request ended before the drain bound"
    );
    // ...and maintenance does not cut the running request.
    assert_eq!(slow.await.unwrap(), (200, "blue".to_string()));
}
