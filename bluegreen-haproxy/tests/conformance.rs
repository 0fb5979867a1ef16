//! The core switch conformance suite against a real HAProxy, over the unix and the TCP socket.

mod common;

use std::sync::Arc;

use bluegreen_core::testkit::{switch_suite, BoxFuture, SwitchSuite};
use bluegreen_core::{Error, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_haproxy::HaproxySwitch;
use common::{client, haproxy_available, served_by, Demos, Haproxy};

fn suite(h: &Haproxy, demos: &Demos) -> SwitchSuite {
    let mut suite = SwitchSuite::new(demos.endpoints());
    let config = h.config.clone();
    suite.reopen = Some(Arc::new(move || -> BoxFuture<Box<dyn TrafficSwitch>> {
        let config = config.clone();
        Box::pin(
            async move { Box::new(HaproxySwitch::new(config).unwrap()) as Box<dyn TrafficSwitch> },
        )
    }));
    let (c, url) = (client(), h.url("/"));
    suite.served_by = Some(Arc::new(
        move || -> BoxFuture<bluegreen_core::Result<Slot>> {
            let (c, url) = (c.clone(), url.clone());
            Box::pin(async move {
                served_by(&c, &url)
                    .await
                    .map_err(|e| Error::backend("test", "request", true, e))
            })
        },
    ));
    suite
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_switch_passes_the_switch_conformance_suite() {
    if !haproxy_available("conformance") {
        return;
    }
    let h = Haproxy::start();
    let demos = Demos::start().await;
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
