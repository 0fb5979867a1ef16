//! The core conformance suite against a real `ProxySwitch` on loopback upstreams.

mod common;

use std::sync::Arc;

use bluegreen_core::testkit::{switch_suite, BoxFuture, SwitchSuite};
use bluegreen_core::{Endpoints, Error, Slot, TrafficSwitch};
use bluegreen_proxy::{ProxyConfig, ProxySwitch};
use common::upstream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_switch_passes_the_switch_conformance_suite() {
    let (blue, green) = (upstream("blue").await, upstream("green").await);
    let proxy = ProxySwitch::bind(ProxyConfig::default()).await.unwrap();
    let mut suite = SwitchSuite::new(Endpoints::new(
        vec![blue.endpoint()],
        vec![green.endpoint()],
    ));

    let handle = proxy.clone();
    suite.reopen = Some(Arc::new(move || -> BoxFuture<Box<dyn TrafficSwitch>> {
        let handle = handle.clone();
        Box::pin(async move { Box::new(handle) as Box<dyn TrafficSwitch> })
    }));

    let client = common::client();
    let url = proxy.url("/");
    suite.served_by = Some(Arc::new(
        move || -> BoxFuture<bluegreen_core::Result<Slot>> {
            let (client, url) = (client.clone(), url.clone());
            Box::pin(async move {
                let r = client
                    .get(&url)
                    .send()
                    .await
                    .map_err(|e| Error::backend("test", "request", true, e))?;
                let body = r
                    .text()
                    .await
                    .map_err(|e| Error::backend("test", "request", true, e))?;
                body.parse::<Slot>()
            })
        },
    ));

    // Slots of several endpoints (demo apps that say which instance answered).
    let demos = bluegreen_testenv::DemoBackends::start_several(3, 2).await;
    suite.several = Some(demos.all_endpoints());
    suite.answered_by = Some(bluegreen_testenv::demo::answered_by_fn(proxy.local_addr()));

    switch_suite(&proxy, &suite).await.assert_complete();
    // Also through a trait object, as the engine holds it.
    let boxed: Box<dyn TrafficSwitch> = Box::new(proxy.clone());
    switch_suite(boxed.as_ref(), &suite).await.assert_complete();
    assert!(blue.requests() > 0 && green.requests() > 0);
}
