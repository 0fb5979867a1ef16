//! The proxy's `/metrics` scraped by a real Prometheus, judged by `PrometheusAnalysis`.

use std::time::{Duration, Instant};

use bluegreen_core::prometheus::PrometheusAnalysis;
use bluegreen_core::{
    Endpoint, Endpoints, Error, Secret, Slot, TrafficSplit, TrafficSwitch, Verdict,
};
use bluegreen_demo::{DemoConfig, DemoServer};
use bluegreen_proxy::{ProxyConfig, ProxySwitch};
use bluegreen_testenv::port::RefusedAddr;
use bluegreen_testenv::prometheus::{self, Prometheus, ScrapeTarget};
use bluegreen_testenv::{Load, LoadOptions};

const TOKEN: &str = "a-long-random-admin-token";

/// The share of failed requests of a slot, over everything the proxy counted.
const ERROR_RATE: &str = r#"sum(bluegreen_proxy_failed_requests_total{slot="{slot}"}) / sum(bluegreen_proxy_requests_total{slot="{slot}"})"#;

/// Evaluates until Prometheus has data (not inconclusive), at most 20 s.
async fn verdict(a: &PrometheusAnalysis, slot: Slot) -> Verdict {
    let start = Instant::now();
    loop {
        match a.evaluate(slot).await.unwrap() {
            Verdict::Inconclusive(_) if start.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            v => return v,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_proxy_and_judges_each_slot() {
    if !prometheus::available("prometheus_scrapes_the_proxy_and_judges_each_slot") {
        return;
    }
    // Blue answers 20 % of requests with 500, green none.
    let blue = DemoServer::start(DemoConfig::new("v1", "blue").with_error_rate(0.2))
        .await
        .unwrap();
    let green = DemoServer::start(DemoConfig::new("v2", "green"))
        .await
        .unwrap();
    let eps = Endpoints::new(
        vec![Endpoint::new("127.0.0.1", blue.local_addr().port())],
        vec![Endpoint::new("127.0.0.1", green.local_addr().port())],
    );
    let p = ProxySwitch::bind(ProxyConfig::default()).await.unwrap();
    p.apply(&TrafficSplit::new(50, 50).unwrap(), &eps)
        .await
        .unwrap();
    let admin = p
        .serve_admin("127.0.0.1:0".parse().unwrap(), Secret::new(TOKEN))
        .await
        .unwrap();
    let load = Load::start(
        p.local_addr(),
        LoadOptions::new(2).with_pause(Duration::from_millis(2)),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;

    // `/metrics` needs the token, and is valid text exposition.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("{}/metrics", admin.url());
    let anonymous = http.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let resp = http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = resp.text().await.unwrap();
    for needle in [
        "bluegreen_proxy_requests_total{slot=\"blue\"}",
        "bluegreen_proxy_failed_requests_total{slot=\"blue\",cause=\"app_5xx\"}",
        "bluegreen_proxy_request_duration_seconds_bucket{slot=\"green\",le=\"+Inf\"}",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    match prometheus::check_metrics(&text) {
        Some(res) => res.unwrap_or_else(|e| panic!("{e}\n{text}")),
        None => eprintln!("promtool not installed: the exposition was not linted"),
    }

    let prom = tokio::task::spawn_blocking({
        let target = ScrapeTarget::new(admin.local_addr())
            .with_bearer_token(TOKEN)
            .with_interval(Duration::from_millis(200));
        move || Prometheus::start(&target)
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("starting Prometheus: {e}"));

    let under_1pc = PrometheusAnalysis::new(prom.url(), ERROR_RATE, "result < 0.01").unwrap();
    assert_eq!(
        verdict(&under_1pc, Slot::Green).await,
        Verdict::Pass,
        "{}",
        prom.log()
    );
    match verdict(&under_1pc, Slot::Blue).await {
        Verdict::Fail(why) => {
            assert!(why.contains("does not meet `result < 0.01`"), "{why}");
            assert!(
                why.contains(r#"slot=\"blue\""#) || why.contains("blue"),
                "{why}"
            );
        }
        v => panic!("blue answers 20 % errors, got {v:?}"),
    }
    // The same rate seen from the other side.
    let over_10pc = PrometheusAnalysis::new(prom.url(), ERROR_RATE, "result > 0.1").unwrap();
    assert_eq!(verdict(&over_10pc, Slot::Blue).await, Verdict::Pass);

    // A metric Prometheus never saw: no data, inconclusive (never a pass).
    let absent = PrometheusAnalysis::new(
        prom.url(),
        r#"bluegreen_proxy_no_such_metric{slot="{slot}"}"#,
        "result < 1",
    )
    .unwrap();
    match absent.evaluate(Slot::Blue).await.unwrap() {
        Verdict::Inconclusive(why) => assert!(why.contains("no data"), "{why}"),
        v => panic!("expected inconclusive, got {v:?}"),
    }
    // A query Prometheus refuses: an error naming Prometheus and what it said.
    let broken = PrometheusAnalysis::new(prom.url(), "sum(", "result < 1").unwrap();
    match broken.evaluate(Slot::Blue).await.unwrap_err() {
        e @ Error::Backend { .. } => {
            let msg = e.to_string();
            assert!(
                msg.contains("prometheus") && msg.contains("parse error"),
                "{msg}"
            );
            assert!(!e.is_retryable(), "a bad query does not get better: {msg}");
        }
        e => panic!("expected a backend error, got {e}"),
    }
    let load = load.finish().await;
    assert!(load.total() > 0);

    // Prometheus unreachable: a retryable error naming it.
    let nowhere = RefusedAddr::new();
    let gone = PrometheusAnalysis::new(
        format!("http://{}", nowhere.addr()),
        ERROR_RATE,
        "result < 1",
    )
    .unwrap();
    let e = gone.evaluate(Slot::Blue).await.unwrap_err();
    assert!(e.to_string().contains("prometheus"), "{e}");
    assert!(e.is_retryable(), "{e}");

    admin.shutdown().await;
    p.shutdown().await;
    blue.shutdown().await.unwrap();
    green.shutdown().await.unwrap();
}
