//! Several endpoints per slot through the embedded proxy: load-balanced, an endpoint that
//! refuses connections skipped without a failed request, and switches between slots of three
//! endpoints under load.

use std::time::Duration;

use bluegreen_core::{Endpoint, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_proxy::{ProxyConfig, ProxySwitch};
use bluegreen_testenv::port::RefusedAddr;
use bluegreen_testenv::{DemoBackends, Load, LoadOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_of_three_with_one_closed_port_fails_no_request_and_both_others_serve() {
    let demos = DemoBackends::start_several(2, 1).await;
    let closed = RefusedAddr::new();
    let mut eps = demos.all_endpoints();
    // The closed port in the middle: round robin reaches it every third request.
    eps.blue
        .insert(1, Endpoint::new("127.0.0.1", closed.port()));
    let proxy = ProxySwitch::bind(ProxyConfig::default()).await.unwrap();
    proxy
        .apply(&TrafficSplit::all(Slot::Blue), &eps)
        .await
        .unwrap();
    // New connections and keep-alive ones.
    let load = Load::start(proxy.local_addr(), LoadOptions::new(8));
    let mut fresh = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        let slot = bluegreen_testenv::demo::served_by(proxy.local_addr())
            .await
            .unwrap_or_else(|e| panic!("request {fresh} on a new connection failed: {e}"));
        assert_eq!(slot, Slot::Blue);
        fresh += 1;
    }
    let stats = load.finish().await;
    eprintln!(
        "{} keep-alive requests ok, {} failed, {fresh} on new connections; per instance {:?}",
        stats.ok, stats.failed, stats.instances
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    assert!(
        stats.ok > 100,
        "too little load to mean anything: {}",
        stats.ok
    );
    for e in [&eps.blue[0], &eps.blue[2]] {
        let served = stats.instances.get(&e.authority()).copied().unwrap_or(0);
        assert!(
            served > stats.ok / 4,
            "{} served {served} of {}: {:?}",
            e.authority(),
            stats.ok,
            stats.instances
        );
    }
    assert!(!stats.instances.contains_key(&eps.blue[1].authority()));
    assert!(!stats
        .instances
        .contains_key(&demos.all_endpoints().green[0].authority()));
    // The proxy counted the refused connects it skipped.
    let m = proxy.metrics(Slot::Blue).await.unwrap();
    assert!(m.connect_errors > 0, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_slots_of_three_endpoints_under_load_fails_no_request_and_uses_every_endpoint() {
    let demos = DemoBackends::start_several(3, 3).await;
    let proxy = ProxySwitch::bind(ProxyConfig::default()).await.unwrap();
    demos.switch_under_load(&proxy, proxy.local_addr(), 6).await;
}
