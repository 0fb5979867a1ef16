//! The control API: a `RemoteProxySwitch` drives a real `ProxySwitch` and passes the conformance
//! suite; wrong tokens and unreachable proxies give clear errors.

mod common;

use std::sync::Arc;

use bluegreen_core::testkit::{switch_suite, BoxFuture, SwitchSuite};
use bluegreen_core::{Endpoints, Error, Secret, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_proxy::{ProxyConfig, ProxySwitch, RemoteProxySwitch};
use common::upstream;

const TOKEN: &str = "test-token-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_switch_passes_the_switch_conformance_suite() {
    let (blue, green) = (upstream("blue").await, upstream("green").await);
    let proxy = ProxySwitch::bind(ProxyConfig::default()).await.unwrap();
    let admin = proxy
        .serve_admin("127.0.0.1:0".parse().unwrap(), Secret::new(TOKEN))
        .await
        .unwrap();
    let remote = RemoteProxySwitch::new(admin.url(), Secret::new(TOKEN)).unwrap();
    let mut suite = SwitchSuite::new(Endpoints::new(
        vec![blue.endpoint()],
        vec![green.endpoint()],
    ));
    let base = admin.url();
    suite.reopen = Some(Arc::new(move || -> BoxFuture<Box<dyn TrafficSwitch>> {
        let base = base.clone();
        Box::pin(async move {
            Box::new(RemoteProxySwitch::new(base, Secret::new(TOKEN)).unwrap())
                as Box<dyn TrafficSwitch>
        })
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
                r.text()
                    .await
                    .map_err(|e| Error::backend("test", "request", true, e))?
                    .parse::<Slot>()
            })
        },
    ));
    switch_suite(&remote, &suite).await.assert_complete();
    // The in-process handle sees what the remote one applied.
    remote
        .apply(&TrafficSplit::all(Slot::Green), &suite.endpoints)
        .await
        .unwrap();
    assert_eq!(
        proxy.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Green))
    );
    let st = remote.state().await.unwrap();
    assert!(!st.paused);
    remote.pause().await.unwrap();
    assert!(proxy.is_paused());
    remote.resume().await.unwrap();
    assert!(!proxy.is_paused());
    admin.shutdown().await;
}

#[tokio::test]
async fn wrong_tokens_and_unreachable_proxies_are_clear_errors() {
    let proxy = ProxySwitch::bind(ProxyConfig::default()).await.unwrap();
    assert!(proxy
        .serve_admin("127.0.0.1:0".parse().unwrap(), Secret::new("short"))
        .await
        .is_err());
    let admin = proxy
        .serve_admin("127.0.0.1:0".parse().unwrap(), Secret::new(TOKEN))
        .await
        .unwrap();
    let wrong =
        RemoteProxySwitch::new(admin.url(), Secret::new("wrong-token-0123456789ab")).unwrap();
    let err = wrong.current().await.unwrap_err();
    assert!(err.to_string().contains("refused the token"), "{err}");
    assert!(!format!("{wrong:?}").contains("wrong-token"));

    let url = admin.url();
    admin.shutdown().await;
    let gone = RemoteProxySwitch::new(url, Secret::new(TOKEN)).unwrap();
    let err = gone.current().await.unwrap_err();
    assert!(err.is_retryable());
    assert!(err.to_string().contains("bluegreen serve"), "{err}");
}
