//! Zero failed requests while switching back and forth under keep-alive load.

mod common;

use std::time::Duration;

use bluegreen_core::{Slot, TrafficSplit, TrafficSwitch};
use common::{haproxy_available, Demos, Haproxy, Load, LoadOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_switches_under_keep_alive_load_fail_no_request() {
    if !haproxy_available("load") {
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

    let load = Load::start(h.addr(), LoadOptions::new(8));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut slot = Slot::Blue;
    for i in 0..50 {
        slot = slot.other();
        // Every fifth switch goes through a canary step first.
        if i % 5 == 0 {
            switch
                .apply(&TrafficSplit::canary(slot, 20).unwrap(), &eps)
                .await
                .unwrap_or_else(|e| panic!("canary {i} failed: {e}"));
        }
        switch
            .apply(&TrafficSplit::all(slot), &eps)
            .await
            .unwrap_or_else(|e| panic!("switch {i} to {slot} failed: {e}"));
        assert_eq!(
            switch.current().await.unwrap(),
            Some(TrafficSplit::all(slot))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = load.finish().await;
    let (ok, failed, errors) = (stats.ok, stats.failed, stats.errors);
    let per_slot = [stats.blue, stats.green];
    eprintln!("50 switches: {ok} requests ok, {failed} failed, per slot {per_slot:?}");
    assert_eq!(failed, 0, "requests failed during switches: {errors:?}");
    assert!(ok > 100, "too little load to mean anything: {ok}");
    assert!(per_slot[0] > 0 && per_slot[1] > 0, "{per_slot:?}");
}
