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
    let demos = bluegreen_testenv::DemoBackends::start_several(3, 2).await;
    suite.several = Some(demos.all_endpoints());
    suite.answered_by = Some(bluegreen_testenv::demo::answered_by_fn(proxy.local_addr()));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_environment_passes_the_environment_suite_through_the_api() {
    use bluegreen_core::testkit::{environment_suite, EnvironmentSuite, Fakes};
    use bluegreen_core::{Environment, Release};
    use bluegreen_proxy::RemoteEnvironment;
    use std::time::Duration;

    let fakes = Fakes::new();
    let proxy = ProxySwitch::bind(ProxyConfig::default()).await.unwrap();
    let served: Arc<dyn Environment> = Arc::new(fakes.environment());
    let admin = proxy
        .serve_admin_with_environment(
            "127.0.0.1:0".parse().unwrap(),
            Secret::new(TOKEN),
            Some(served),
        )
        .await
        .unwrap();
    let remote = RemoteEnvironment::new(admin.url(), Secret::new(TOKEN), "fake").unwrap();
    assert_eq!(remote.name(), "fake");
    let suite = EnvironmentSuite {
        release: Arc::new(|v| Release::new(v, "app").unwrap()),
        ready_timeout: Duration::from_secs(5),
        exec_argv: Some(vec!["migrate".into()]),
    };
    environment_suite(&remote, &suite).await.assert_complete();

    // Secret variables reach the served environment (they travel in the body, never in state).
    let release = Release::new("v9", "app")
        .unwrap()
        .with_env("MODE", "web")
        .with_secret_env("API_KEY", "k-123");
    remote.deploy(Slot::Blue, &release).await.unwrap();
    let env = fakes.started_env(Slot::Blue).unwrap();
    assert_eq!(env.get("MODE").map(String::as_str), Some("web"));
    assert!(env.get("API_KEY").is_some_and(|v| v == "k-123"));

    // A server without an environment says so; a wrong token is refused.
    let bare = proxy
        .serve_admin("127.0.0.1:0".parse().unwrap(), Secret::new(TOKEN))
        .await
        .unwrap();
    let none = RemoteEnvironment::new(bare.url(), Secret::new(TOKEN), "fake").unwrap();
    let err = none.status(Slot::Blue).await.unwrap_err();
    assert!(
        err.to_string().contains("does not manage an environment"),
        "{err}"
    );
    let wrong = RemoteEnvironment::new(admin.url(), Secret::new("x".repeat(20)), "fake").unwrap();
    assert!(wrong.status(Slot::Blue).await.is_err());
}
