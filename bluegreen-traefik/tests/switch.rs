//! The switch against the HTTP TEST DOUBLE of Traefik's API (see `common/mod.rs` for what it is and
//! why: no Traefik binary can be installed here): the core conformance suite (its data-path checks
//! reported as skipped: the double routes no traffic), canary steps, sticky, preview, and what the
//! caller sees when the directory, the API or the reload fails.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bluegreen_core::testkit::{switch_suite, BoxFuture, SuiteReport, SwitchSuite};
use bluegreen_core::{Endpoint, Endpoints, Error, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_traefik::{FileFormat, Routing, TraefikConfig, TraefikSwitch, TraefikVersion};
use common::FakeTraefik;

const THROTTLE: Duration = Duration::from_millis(200);

fn endpoints() -> Endpoints {
    Endpoints::new(
        vec![Endpoint::new("127.0.0.1", 8001)],
        vec![Endpoint::new("127.0.0.1", 8002)],
    )
}

fn config(dir: &Path, api: Option<&str>) -> TraefikConfig {
    let c = TraefikConfig::new("app", "Host(`app.test`)", dir)
        .unwrap()
        .with_entry_points(["web"])
        .with_verify_timeout(Duration::from_secs(20))
        .with_poll_interval(Duration::from_millis(50));
    match api {
        Some(url) => c.with_api(url),
        None => c,
    }
}

fn weights(service: &serde_json::Value) -> Vec<(String, i64)> {
    service["weighted"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["weight"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// The API test double routes no traffic, so the suite has no `served_by`: its data-path checks
/// are skipped, visibly (stderr and the report), and every other check runs.
fn expect_only_the_data_path_skipped(report: &SuiteReport) {
    assert!(report.was_skipped("data path"), "{report}");
    for s in report.skipped() {
        assert!(
            s.check.ends_with(": data path")
                && (s.why.starts_with("no served_by") || s.why.starts_with("no answered_by")),
            "unexpected skip: {report}"
        );
    }
    assert!(report.has_run("switch_current_reads_the_proxy"), "{report}");
    assert!(
        report.has_run("switch_routes_a_slot_to_several_endpoints"),
        "{report}"
    );
}

/// Three blue and two green endpoints: the slots of the suite's multi-endpoint check.
fn several() -> Endpoints {
    Endpoints::new(
        (8011..=8013)
            .map(|p| Endpoint::new("127.0.0.1", p))
            .collect(),
        (8021..=8022)
            .map(|p| Endpoint::new("127.0.0.1", p))
            .collect(),
    )
}

fn suite_for(config: TraefikConfig) -> SwitchSuite {
    let mut suite = SwitchSuite::new(endpoints());
    suite.several = Some(several());
    suite.reopen = Some(Arc::new(move || -> BoxFuture<Box<dyn TrafficSwitch>> {
        let config = config.clone();
        Box::pin(
            async move { Box::new(TraefikSwitch::new(config).unwrap()) as Box<dyn TrafficSwitch> },
        )
    }));
    suite
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefik_switch_passes_the_switch_conformance_suite_against_the_api_test_double() {
    for (format, version) in [
        (FileFormat::Yaml, TraefikVersion::V3),
        (FileFormat::Toml, TraefikVersion::V2),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let traefik = FakeTraefik::start(dir.path(), THROTTLE).await;
        let config = config(dir.path(), Some(&traefik.url))
            .with_format(format)
            .with_version(version);
        let switch = TraefikSwitch::new(config.clone()).unwrap();
        assert_eq!(switch.current().await.unwrap(), None, "nothing applied yet");

        let suite = suite_for(config);
        let report = switch_suite(&switch, &suite).await;
        expect_only_the_data_path_skipped(&report);
        let boxed: Box<dyn TrafficSwitch> = Box::new(switch.clone());
        expect_only_the_data_path_skipped(&switch_suite(boxed.as_ref(), &suite).await);

        // The suite's answers came from the double's API, which loaded the files.
        assert!(traefik.published() >= 3, "{}", traefik.published());
        assert!(
            traefik.rejections().is_empty(),
            "{:?}",
            traefik.rejections()
        );
        let service = traefik.service("app@file").expect("service loaded");
        assert_eq!(
            weights(&service),
            vec![("app-blue".into(), 100), ("app-green".into(), 0)]
        );
        assert_eq!(traefik.router("app@file").unwrap()["status"], "enabled");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_api_the_switch_passes_the_suite_reading_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), None);
    let switch = TraefikSwitch::new(config.clone()).unwrap();
    expect_only_the_data_path_skipped(&switch_suite(&switch, &suite_for(config)).await);
    assert!(dir.path().join("app.bluegreen.yml").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_steps_and_sticky_cookies_are_loaded_and_read_back_from_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let traefik = FakeTraefik::start(dir.path(), THROTTLE).await;
    let switch = TraefikSwitch::new(config(dir.path(), Some(&traefik.url))).unwrap();
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints())
        .await
        .unwrap();
    for step in [10, 50, 90] {
        let split = TrafficSplit::canary(Slot::Green, step)
            .unwrap()
            .with_sticky("bg_slot");
        switch.apply(&split, &endpoints()).await.unwrap();
        // `apply` returned only once the API reported it: no waiting needed here.
        let service = traefik.service("app@file").unwrap();
        assert_eq!(
            weights(&service),
            vec![
                ("app-blue".into(), i64::from(100 - step)),
                ("app-green".into(), i64::from(step))
            ]
        );
        assert_eq!(service["weighted"]["sticky"]["cookie"]["name"], "bg_slot");
        assert_eq!(switch.current().await.unwrap(), Some(split));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_routes_to_the_idle_slot_and_survives_apply_until_removed() {
    let dir = tempfile::tempdir().unwrap();
    let traefik = FakeTraefik::start(dir.path(), THROTTLE).await;
    let switch = TraefikSwitch::new(
        config(dir.path(), Some(&traefik.url)).with_preview_cookie("bg_preview", "1"),
    )
    .unwrap();

    // Preview before anything was applied is refused: there is no split to keep.
    let res = switch.preview(Some(Slot::Green), &endpoints()).await;
    assert!(matches!(res, Err(Error::InvalidInput { .. })), "{res:?}");
    assert!(!dir.path().join("app.bluegreen.yml").exists());

    switch
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints())
        .await
        .unwrap();
    switch
        .preview(Some(Slot::Green), &endpoints())
        .await
        .unwrap();
    let preview = traefik.router("app-preview@file").expect("preview router");
    assert_eq!(preview["service"], "app-green");
    assert_eq!(
        preview["rule"],
        "(Host(`app.test`)) && HeaderRegexp(`Cookie`, `(^|;\\s*)bg_preview=1(;|$)`)"
    );
    assert_eq!(
        switch.routing().await.unwrap(),
        Some(Routing::new(TrafficSplit::all(Slot::Blue)).with_preview(Some(Slot::Green)))
    );

    // A canary step keeps the preview router.
    let canary = TrafficSplit::canary(Slot::Green, 10).unwrap();
    switch.apply(&canary, &endpoints()).await.unwrap();
    assert_eq!(
        traefik.router("app-preview@file").unwrap()["service"],
        "app-green"
    );
    assert_eq!(switch.current().await.unwrap(), Some(canary.clone()));

    switch.preview(None, &endpoints()).await.unwrap();
    assert!(traefik.router("app-preview@file").is_none());
    assert_eq!(switch.routing().await.unwrap(), Some(Routing::new(canary)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_format_replaces_the_other_file() {
    let dir = tempfile::tempdir().unwrap();
    let traefik = FakeTraefik::start(dir.path(), THROTTLE).await;
    let yaml = TraefikSwitch::new(config(dir.path(), Some(&traefik.url))).unwrap();
    yaml.apply(&TrafficSplit::all(Slot::Blue), &endpoints())
        .await
        .unwrap();
    let toml =
        TraefikSwitch::new(config(dir.path(), Some(&traefik.url)).with_format(FileFormat::Toml))
            .unwrap();
    toml.apply(&TrafficSplit::all(Slot::Green), &endpoints())
        .await
        .unwrap();
    assert!(!dir.path().join("app.bluegreen.yml").exists());
    assert!(dir.path().join("app.bluegreen.toml").is_file());
    assert_eq!(
        toml.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Green))
    );
    assert!(
        traefik.rejections().is_empty(),
        "{:?}",
        traefik.rejections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_services_from_docker_are_weighted_without_load_balancers_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let traefik = FakeTraefik::start(dir.path(), THROTTLE).await;
    // What the Docker provider defines from `DockerLabels::service_only` on each container.
    for (slot, port) in [("blue", 8001), ("green", 8002)] {
        traefik.set_external_service(
            &format!("app-{slot}@docker"),
            Some(serde_json::json!({ "loadBalancer": { "servers": [
                { "url": format!("http://172.17.0.2:{port}") } ] } })),
        );
    }
    let config = config(dir.path(), Some(&traefik.url)).with_slot_services_from("docker");
    let switch = TraefikSwitch::new(config.clone()).unwrap();
    let canary = TrafficSplit::canary(Slot::Green, 25).unwrap();
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints())
        .await
        .unwrap();
    switch.apply(&canary, &endpoints()).await.unwrap();
    assert_eq!(
        weights(&traefik.service("app@file").unwrap()),
        vec![
            ("app-blue@docker".into(), 75),
            ("app-green@docker".into(), 25)
        ]
    );
    assert_eq!(switch.current().await.unwrap(), Some(canary.clone()));
    let text = std::fs::read_to_string(dir.path().join("app.bluegreen.yml")).unwrap();
    assert!(!text.contains("loadBalancer"), "{text}");

    // The green container is gone: Traefik disables the weighted service, the switch says so.
    traefik.set_external_service("app-green@docker", None);
    let fast = TraefikSwitch::new(config.with_verify_timeout(Duration::from_secs(2))).unwrap();
    let err = fast
        .apply(&TrafficSplit::all(Slot::Green), &endpoints())
        .await
        .unwrap_err();
    assert!(
        bluegreen_traefik::TraefikError::is_not_loaded(&err),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("app-green@docker") && msg.contains("does not exist"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_endpoints_with_the_same_weights_are_verified_too() {
    let dir = tempfile::tempdir().unwrap();
    let traefik = FakeTraefik::start(dir.path(), THROTTLE).await;
    let switch = TraefikSwitch::new(config(dir.path(), Some(&traefik.url))).unwrap();
    let split = TrafficSplit::all(Slot::Green);
    switch.apply(&split, &endpoints()).await.unwrap();
    // Green was redeployed on another port: same weights, new server. `apply` returns only once
    // Traefik serves the new URL.
    let mut moved = endpoints();
    moved.green = vec![
        Endpoint::new("127.0.0.1", 9002),
        Endpoint::new("127.0.0.2", 9002),
    ];
    switch.apply(&split, &moved).await.unwrap();
    let green = traefik.service("app-green@file").unwrap();
    let urls: Vec<&str> = green["loadBalancer"]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["url"].as_str().unwrap())
        .collect();
    assert_eq!(urls, vec!["http://127.0.0.1:9002", "http://127.0.0.2:9002"]);

    // And when Traefik does not pick the new servers up, that is reported, naming them.
    traefik.freeze();
    let fast = TraefikSwitch::new(
        config(dir.path(), Some(&traefik.url)).with_verify_timeout(Duration::from_millis(500)),
    )
    .unwrap();
    let err = fast.apply(&split, &endpoints()).await.unwrap_err();
    assert!(
        bluegreen_traefik::TraefikError::is_not_loaded(&err),
        "{err:?}"
    );
    assert!(err.to_string().contains("127.0.0.2:9002"), "{err}");
}
