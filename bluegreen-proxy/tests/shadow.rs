//! Shadow traffic through the real proxy: live requests mirrored to the preview slot (the demo
//! app, another version), compared with the ignore rules, and never visible to the client: a
//! hanging or refusing shadow changes nothing for it.

mod common;

use std::time::{Duration, Instant};

use bluegreen_core::{Endpoint, Endpoints, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_demo::{DemoConfig, DemoServer};
use bluegreen_proxy::{ProxyConfig, ProxySwitch, ShadowConfig};
use bluegreen_testenv::port::RefusedAddr;
use common::{client, eventually};

fn endpoint(addr: std::net::SocketAddr) -> Endpoint {
    Endpoint::new("127.0.0.1", addr.port())
}

async fn proxy(shadow: ShadowConfig, green: Endpoint) -> (DemoServer, ProxySwitch) {
    let blue = DemoServer::start(DemoConfig::new("v1", "blue"))
        .await
        .unwrap();
    let p = ProxySwitch::bind(ProxyConfig::default().with_shadow(shadow))
        .await
        .unwrap();
    let eps = Endpoints::new(vec![endpoint(blue.local_addr())], vec![green]);
    p.apply(&TrafficSplit::all(Slot::Blue), &eps).await.unwrap();
    p.preview(Some(Slot::Green), &eps).await.unwrap();
    (blue, p)
}

async fn get(c: &reqwest::Client, url: &str) -> (u16, String) {
    let r = c.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_is_mirrored_and_mismatches_are_reported_with_examples() {
    let green = DemoServer::start(DemoConfig::new("v2", "green"))
        .await
        .unwrap();
    let shadow = ShadowConfig::default()
        .with_percent(50)
        .with_compare_bodies(true)
        // The demo app names its version, slot and instance (its address) in headers.
        .with_ignore_headers([
            "x-bluegreen-version",
            "x-bluegreen-slot",
            "x-bluegreen-instance",
        ]);
    let (_blue, p) = proxy(shadow, endpoint(green.local_addr())).await;
    let c = client();
    // Same answer on both sides once the version headers are ignored.
    for _ in 0..10 {
        assert_eq!(get(&c, &p.url("/health")).await, (200, "ok\n".into()));
    }
    let probe = p.clone();
    eventually("5 health answers compared", || {
        probe.shadow_report().unwrap().compared == 5
    })
    .await;
    let r = p.shadow_report().unwrap();
    assert_eq!((r.mirrored, r.mismatched), (5, 0), "{r:?}");
    assert_eq!(r.mismatch_rate(), Some(0.0));

    // `/` names the version in its body: every mirrored one differs.
    for _ in 0..10 {
        assert_eq!(
            get(&c, &p.url("/?q=secret")).await.1,
            "version=v1 slot=blue\n"
        );
    }
    // A write is never mirrored.
    let posted = c.post(p.url("/jsonrpc")).send().await.unwrap();
    assert_eq!(posted.status(), 200);
    let probe = p.clone();
    eventually("10 answers compared", || {
        probe.shadow_report().unwrap().compared == 10
    })
    .await;
    let r = p.shadow_report().unwrap();
    assert_eq!(
        (r.mirrored, r.mismatched, r.shadow_errors),
        (10, 5, 0),
        "{r:?}"
    );
    assert_eq!(r.mismatch_rate(), Some(0.5));
    let e = &r.examples[0];
    assert_eq!((e.method.as_str(), e.path.as_str()), ("GET", "/"));
    assert_eq!((e.live_status, e.shadow_status), (200, 200));
    assert!(
        e.detail.contains("slot=blue") && e.detail.contains("slot=green"),
        "{e:?}"
    );
    assert!(!e.path.contains("secret"), "the query is never kept");

    // Preview off: nothing more is mirrored.
    p.preview(None, &p.endpoints()).await.unwrap();
    get(&c, &p.url("/health")).await;
    get(&c, &p.url("/health")).await;
    assert_eq!(p.shadow_report().unwrap().mirrored, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_shadow_is_invisible_to_the_client_and_bounded() {
    // The preview slot accepts connections and never answers.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hang.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            open.push(s);
        }
    });
    let shadow = ShadowConfig::default()
        .with_percent(100)
        .with_max_concurrent(2)
        .with_timeout(Duration::from_millis(1500));
    let (_blue, p) = proxy(shadow, endpoint(addr)).await;
    let c = client();
    let started = Instant::now();
    for _ in 0..10 {
        assert_eq!(
            get(&c, &p.url("/")).await,
            (200, "version=v1 slot=blue\n".into())
        );
    }
    // Ten answers, each without waiting for its 1.5 s shadow.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the client waited for the shadow: {:?}",
        started.elapsed()
    );
    let r = p.shadow_report().unwrap();
    assert_eq!((r.mirrored, r.skipped_busy), (2, 8), "{r:?}");
    let probe = p.clone();
    eventually("the shadow requests time out", || {
        probe.shadow_report().unwrap().shadow_errors == 2
    })
    .await;
    assert_eq!(p.shadow_report().unwrap().compared, 0);
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_shadow_is_invisible_to_the_client() {
    let refused = RefusedAddr::new();
    let shadow = ShadowConfig::default().with_percent(100);
    let (_blue, p) = proxy(shadow, endpoint(refused.addr())).await;
    let c = client();
    for _ in 0..5 {
        assert_eq!(get(&c, &p.url("/")).await.0, 200);
    }
    let probe = p.clone();
    eventually("5 shadow errors", || {
        probe.shadow_report().unwrap().shadow_errors == 5
    })
    .await;
    let m = p.metrics(Slot::Blue).await.unwrap();
    assert_eq!(
        (m.requests, m.errors_5xx),
        (5, 0),
        "the live side saw no error"
    );
}

#[test]
fn a_shadow_config_that_could_mirror_writes_is_refused_at_load() {
    let err = serde_json::from_str::<ProxyConfig>(r#"{"shadow": {"methods": ["GET", "POST"]}}"#)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shadow.methods") && err.contains("POST"),
        "{err}"
    );
    assert!(serde_json::from_str::<ProxyConfig>(r#"{"shadow": {"percnt": 5}}"#).is_err());
}
