//! Several endpoints per slot: a pool of servers per slot in one backend, against the real
//! HAProxy. Switching under load, shrinking and growing a slot, an unhealthy endpoint among
//! several, and a haproxy.cfg with fewer servers than the pool.

mod common;

use bluegreen_core::{Endpoint, Endpoints, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_demo::{DemoConfig, DemoServer};
use bluegreen_haproxy::{HaproxyError, HaproxySwitch};
use common::{haproxy_available, haproxy_error, Demos, Haproxy};

/// The port of a server no `apply` has moved: the rendered placeholder (`<name>.bluegreen.invalid:1`
/// with `init-addr last,127.0.0.1`).
const UNTOUCHED: Option<u16> = Some(1);

/// (admin state, port) of each server of `slot`'s pool: `ready`, `drain` or `maint`.
async fn pool(switch: &HaproxySwitch, slot: Slot) -> Vec<(&'static str, Option<u16>)> {
    let pools = switch.pool_servers().await.unwrap();
    pools
        .get(slot)
        .iter()
        .map(|s| {
            let state = if s.is_maint() {
                "maint"
            } else if s.is_drain() {
                "drain"
            } else {
                "ready"
            };
            (state, s.addr.map(|_| s.port))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_slots_of_three_endpoints_under_load_fails_no_request_and_uses_every_endpoint() {
    if !haproxy_available("pool") {
        return;
    }
    let h = Haproxy::start();
    let demos = Demos::start_several(3, 3).await;
    demos.switch_under_load(&h.switch(), h.addr(), 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_shrinks_and_grows_its_spare_servers_stay_in_maintenance() {
    if !haproxy_available("pool") {
        return;
    }
    let h = Haproxy::start();
    let demos = Demos::start_several(3, 2).await;
    let switch = h.switch();
    let all = demos.all_endpoints();
    let port = |e: &Endpoint| Some(e.port);
    let blue = TrafficSplit::all(Slot::Blue);
    switch.apply(&blue, &all).await.unwrap();
    let b = &all.blue;
    assert_eq!(
        pool(&switch, Slot::Blue).await,
        [
            ("ready", port(&b[0])),
            ("ready", port(&b[1])),
            ("ready", port(&b[2])),
            ("maint", UNTOUCHED)
        ]
    );
    // Green is idle: every server of its pool in maintenance.
    assert!(pool(&switch, Slot::Green)
        .await
        .iter()
        .all(|(s, _)| *s == "maint"));
    // 100 % is spread so that the pool sums to the share: 34 + 33 + 33.
    let weights: Vec<u16> = switch.pool_servers().await.unwrap().blue[..3]
        .iter()
        .map(|s| s.weight)
        .collect();
    assert_eq!(weights.iter().sum::<u16>(), 100, "{weights:?}");

    // Shrinking from 3 to 2 (the first endpoint leaves): the two that stay keep their servers,
    // the one that left goes to maintenance.
    let mut shrunk = all.clone();
    shrunk.blue.remove(0);
    switch.apply(&blue, &shrunk).await.unwrap();
    assert_eq!(
        pool(&switch, Slot::Blue).await,
        [
            ("maint", port(&b[0])),
            ("ready", port(&b[1])),
            ("ready", port(&b[2])),
            ("maint", UNTOUCHED)
        ]
    );
    assert_eq!(switch.current().await.unwrap(), Some(blue.clone()));

    // Growing again to 3 with a new endpoint: a server out of rotation takes it.
    let extra = DemoServer::start(DemoConfig::new("v1", "blue"))
        .await
        .unwrap();
    let mut grown = shrunk.clone();
    grown
        .blue
        .push(Endpoint::new("127.0.0.1", extra.local_addr().port()));
    switch.apply(&blue, &grown).await.unwrap();
    let now = pool(&switch, Slot::Blue).await;
    assert_eq!(
        now.iter().filter(|(s, _)| *s == "ready").count(),
        3,
        "{now:?}"
    );
    assert!(
        now.contains(&("ready", Some(extra.local_addr().port()))),
        "{now:?}"
    );
    assert!(!now.contains(&("ready", port(&b[0]))), "{now:?}");
    assert_eq!(switch.current().await.unwrap(), Some(blue));

    // A canary over 3 and 2 endpoints reads back exactly.
    let canary = TrafficSplit::canary(Slot::Green, 10).unwrap();
    switch.apply(&canary, &all).await.unwrap();
    assert_eq!(switch.current().await.unwrap(), Some(canary));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_endpoint_among_three_is_refused_and_live_traffic_stays() {
    if !haproxy_available("pool") {
        return;
    }
    let h = Haproxy::start();
    let demos = Demos::start_several(3, 2).await;
    let switch = h.switch();
    let all = demos.all_endpoints();
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &all)
        .await
        .unwrap();
    let sick = DemoServer::start(DemoConfig::new("v2", "green").with_fail_health(true))
        .await
        .unwrap();
    let mut bad = all.clone();
    bad.green
        .push(Endpoint::new("127.0.0.1", sick.local_addr().port()));
    let switch = HaproxySwitch::new(
        h.config
            .clone()
            .with_ready_timeout(std::time::Duration::from_secs(2)),
    )
    .unwrap();
    let e = switch
        .apply(&TrafficSplit::all(Slot::Green), &bad)
        .await
        .unwrap_err();
    let msg = e.to_string();
    eprintln!("the caller sees: {msg}");
    match haproxy_error(&e) {
        HaproxyError::SwitchFailed {
            source, outcome, ..
        } => {
            assert!(
                matches!(&**source, HaproxyError::NotReady { server, .. } if server == "green-3"),
                "{msg}"
            );
            assert!(outcome.starts_with("restored the previous state"), "{msg}");
        }
        other => panic!("{other}"),
    }
    assert!(msg.contains(&sick.local_addr().to_string()), "{msg}");
    // Nothing half-done: green's servers are back in maintenance, blue's three still serve.
    assert!(pool(&switch, Slot::Green)
        .await
        .iter()
        .all(|(s, _)| *s == "maint"));
    assert_eq!(
        pool(&switch, Slot::Blue)
            .await
            .iter()
            .filter(|(s, _)| *s == "ready")
            .count(),
        3
    );
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );
    for _ in 0..6 {
        let slot = bluegreen_testenv::demo::served_by(h.addr()).await.unwrap();
        assert_eq!(slot, Slot::Blue);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_haproxy_cfg_with_fewer_servers_than_the_pool_is_named_and_nothing_changes() {
    if !haproxy_available("pool") {
        return;
    }
    // haproxy.cfg rendered with one server per slot; the switch expects a pool of 4.
    let h = Haproxy::launch(false, |sock| {
        bluegreen_testenv::haproxy::test_config(sock).with_pool_size(1)
    })
    .unwrap();
    let demos = Demos::start().await;
    let switch = HaproxySwitch::new(h.config.clone().with_pool_size(4)).unwrap();
    let e = switch
        .apply(&TrafficSplit::all(Slot::Blue), &demos.endpoints())
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(haproxy_error(&e), HaproxyError::NoSuchServer { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("app/blue-2") && msg.contains("pool_size is 4"),
        "{msg}"
    );
    assert!(!e.is_retryable());
    // Nothing was changed: the pool of one still reports nothing applied.
    assert_eq!(h.switch().current().await.unwrap(), None);
    // The pool it has works.
    h.switch()
        .apply(
            &TrafficSplit::all(Slot::Blue),
            &Endpoints::new(demos.endpoints().blue, vec![]),
        )
        .await
        .unwrap();
}
