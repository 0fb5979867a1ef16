//! The core switch conformance suite against a real HAProxy, over the unix and the TCP socket.

mod common;

use bluegreen_core::testkit::{switch_suite, SwitchSuite};
use bluegreen_core::{Slot, TrafficSplit, TrafficSwitch};
use bluegreen_haproxy::HaproxySwitch;
use common::{haproxy_available, Demos, Haproxy};

fn suite(h: &Haproxy, demos: &Demos) -> SwitchSuite {
    let config = h.config.clone();
    demos
        .suite()
        .served_through(h.addr())
        .reopen(move || HaproxySwitch::new(config.clone()).unwrap())
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_switch_passes_the_switch_conformance_suite() {
    if !haproxy_available("conformance") {
        return;
    }
    let h = Haproxy::start();
    // Slots of several endpoints too: 3 blue and 2 green demo apps.
    let demos = Demos::start_several(3, 2).await;
    let switch = h.switch();
    // Nothing applied yet: both servers start in maintenance.
    assert_eq!(switch.current().await.unwrap(), None);
    let suite = suite(&h, &demos);
    switch_suite(&switch, &suite).await.assert_complete();
    // Through a trait object, as the engine holds it, and over the TCP socket.
    let boxed: Box<dyn TrafficSwitch> = Box::new(h.tcp_switch());
    switch_suite(boxed.as_ref(), &suite).await.assert_complete();
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );
}
