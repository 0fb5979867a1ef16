//! What the caller sees, and what is left, when the watched directory, Traefik's API or Traefik's
//! reload fails. Traefik's API is the HTTP TEST DOUBLE in `common/mod.rs` (no Traefik binary can
//! be installed here). Tests run as root, so "not writable" is produced by situations permissions
//! cannot bypass: the directory path being a regular file, a missing directory, and the target
//! name being taken by a directory.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bluegreen_core::{Endpoint, Endpoints, Error, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_traefik::{TraefikConfig, TraefikError, TraefikSwitch};
use common::{closed_port_url, silent_server_url, FakeTraefik};

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
        .with_verify_timeout(Duration::from_secs(20))
        .with_poll_interval(Duration::from_millis(50));
    match api {
        Some(url) => c.with_api(url),
        None => c,
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn blue_weight(traefik: &FakeTraefik) -> i64 {
    traefik.service("app@file").expect("service loaded")["weighted"]["services"][0]["weight"]
        .as_i64()
        .unwrap()
}

/// A file-system error naming `path_part`, saying nothing changed; `write` tells which step.
fn expect_fs_error(err: &Error, path_part: &str, write: bool) {
    let typed = TraefikError::from_core(err);
    if write {
        assert!(
            matches!(typed, Some(TraefikError::Write { .. })),
            "expected a write error, got {err:?}"
        );
    } else {
        assert!(
            matches!(typed, Some(TraefikError::Read { .. })),
            "expected a read error, got {err:?}"
        );
    }
    let msg = err.to_string();
    assert!(
        msg.contains(path_part) && msg.contains("nothing was changed") && msg.contains("writable"),
        "{msg}"
    );
    assert!(!TraefikError::is_not_loaded(err));
    assert!(!err.is_retryable(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_directory_that_is_a_file_or_missing_fails_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let watched = tmp.path().join("dynamic");
    std::fs::create_dir(&watched).unwrap();
    let traefik = FakeTraefik::start(&watched, THROTTLE).await;
    let switch = TraefikSwitch::new(config(&watched, Some(&traefik.url))).unwrap();
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints())
        .await
        .unwrap();
    let before = std::fs::read(watched.join("app.bluegreen.yml")).unwrap();

    // The watched path is replaced by a regular file (root cannot create files inside a file).
    let moved = tmp.path().join("moved-away");
    std::fs::rename(&watched, &moved).unwrap();
    std::fs::write(&watched, "not a directory").unwrap();
    let err = switch
        .apply(&TrafficSplit::all(Slot::Green), &endpoints())
        .await
        .unwrap_err();
    // The switch first reads its own file (to keep the preview): ENOTDIR.
    expect_fs_error(&err, "dynamic", false);
    // Nothing changed: the old file is intact, Traefik still routes to blue.
    assert_eq!(
        std::fs::read(moved.join("app.bluegreen.yml")).unwrap(),
        before
    );
    assert_eq!(entries(&moved), vec!["app.bluegreen.yml".to_string()]);
    assert_eq!(
        std::fs::read_to_string(&watched).unwrap(),
        "not a directory"
    );
    assert_eq!(blue_weight(&traefik), 100);
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );

    // A directory that does not exist at all.
    std::fs::remove_file(&watched).unwrap();
    let err = switch
        .apply(&TrafficSplit::all(Slot::Green), &endpoints())
        .await
        .unwrap_err();
    expect_fs_error(&err, "dynamic", true);
    assert!(!watched.exists());
    assert_eq!(blue_weight(&traefik), 100);

    // Once the directory is back, the same switch works again.
    std::fs::rename(&moved, &watched).unwrap();
    switch
        .apply(&TrafficSplit::all(Slot::Green), &endpoints())
        .await
        .unwrap();
    assert_eq!(blue_weight(&traefik), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_name_taken_by_a_directory_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("app.bluegreen.yml")).unwrap();
    let switch = TraefikSwitch::new(config(dir.path(), None)).unwrap();
    let err = switch
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints())
        .await
        .unwrap_err();
    expect_fs_error(&err, "app.bluegreen.yml", false);
    assert_eq!(entries(dir.path()), vec!["app.bluegreen.yml".to_string()]);
    assert!(dir.path().join("app.bluegreen.yml").is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_fails_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    // A previous configuration, written without the API.
    let offline = TraefikSwitch::new(config(dir.path(), None)).unwrap();
    offline
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints())
        .await
        .unwrap();
    let before = std::fs::read(dir.path().join("app.bluegreen.yml")).unwrap();

    let (url, _reserved) = closed_port_url();
    let switch = TraefikSwitch::new(
        config(dir.path(), Some(&url)).with_request_timeout(Duration::from_secs(5)),
    )
    .unwrap();
    let err = switch
        .apply(&TrafficSplit::all(Slot::Green), &endpoints())
        .await
        .unwrap_err();
    assert!(
        matches!(
            TraefikError::from_core(&err),
            Some(TraefikError::ApiUnreachable { .. })
        ),
        "{err:?}"
    );
    assert!(err.is_retryable(), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&url) && msg.contains("cannot reach Traefik's API"),
        "{msg}"
    );
    // Nothing was written.
    assert_eq!(
        std::fs::read(dir.path().join("app.bluegreen.yml")).unwrap(),
        before
    );
    assert_eq!(entries(dir.path()), vec!["app.bluegreen.yml".to_string()]);

    // `current` reads the API, so it fails too — it does not fall back to a guess.
    let err = switch.current().await.unwrap_err();
    assert!(
        matches!(
            TraefikError::from_core(&err),
            Some(TraefikError::ApiUnreachable { .. })
        ),
        "{err:?}"
    );
    // Preview is refused the same way, leaving the file as it was.
    assert!(switch
        .preview(Some(Slot::Green), &endpoints())
        .await
        .is_err());
    assert_eq!(
        std::fs::read(dir.path().join("app.bluegreen.yml")).unwrap(),
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_that_never_reflects_the_change_is_reported_as_written_but_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let traefik = FakeTraefik::start(dir.path(), THROTTLE).await;
    // The first apply may take as long as a loaded machine needs; the failing one is bounded
    // short.
    TraefikSwitch::new(config(dir.path(), Some(&traefik.url)))
        .unwrap()
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints())
        .await
        .unwrap();
    let switch = TraefikSwitch::new(
        config(dir.path(), Some(&traefik.url)).with_verify_timeout(Duration::from_secs(1)),
    )
    .unwrap();

    // Traefik stops picking up changes (e.g. the provider does not watch this directory).
    traefik.freeze();
    let green = TrafficSplit::all(Slot::Green);
    let err = switch.apply(&green, &endpoints()).await.unwrap_err();
    assert!(TraefikError::is_not_loaded(&err), "{err:?}");
    assert!(err.is_retryable());
    let msg = err.to_string();
    let file = dir.path().join("app.bluegreen.yml");
    assert!(
        msg.contains(&file.display().to_string())
            && msg.contains("did not report the new configuration")
            && msg.contains("blue 100% / green 0%")
            && msg.contains("the file stays in place"),
        "{msg}"
    );
    // The file IS written (that is the point of the distinct error)…
    let on_disk = TraefikSwitch::new(config(dir.path(), None)).unwrap();
    assert_eq!(on_disk.current().await.unwrap(), Some(green.clone()));
    // …while Traefik still routes to blue, and `current` says so.
    assert_eq!(blue_weight(&traefik), 100);
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );

    // When Traefik catches up, applying the same split again succeeds (the file is not rewritten).
    traefik.unfreeze();
    let slow = TraefikSwitch::new(config(dir.path(), Some(&traefik.url))).unwrap();
    slow.apply(&green, &endpoints()).await.unwrap();
    assert_eq!(blue_weight(&traefik), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_traefik_refuses_is_reported_as_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let traefik = FakeTraefik::start(dir.path(), THROTTLE).await;
    // The first apply may take as long as a loaded machine needs; the failing one is bounded
    // short.
    TraefikSwitch::new(config(dir.path(), Some(&traefik.url)))
        .unwrap()
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints())
        .await
        .unwrap();
    let switch = TraefikSwitch::new(
        config(dir.path(), Some(&traefik.url)).with_verify_timeout(Duration::from_secs(2)),
    )
    .unwrap();
    // Someone drops a broken file into the same directory: the provider's whole configuration is
    // refused, so our new weights never load.
    std::fs::write(
        dir.path().join("broken.yml"),
        "http:\n  services:\n    x:\n      loadBalancer:\n        servers: []\n",
    )
    .unwrap();
    let err = switch
        .apply(
            &TrafficSplit::canary(Slot::Green, 10).unwrap(),
            &endpoints(),
        )
        .await
        .unwrap_err();
    assert!(TraefikError::is_not_loaded(&err), "{err:?}");
    assert!(
        traefik
            .rejections()
            .iter()
            .any(|r| r.contains("broken.yml")),
        "{:?}",
        traefik.rejections()
    );
    assert_eq!(blue_weight(&traefik), 100);
}

#[test]
fn readers_never_see_a_half_written_file() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Big files (hundreds of servers) make a torn write likely if writes were not atomic.
    let many = |port: u16| -> Vec<Endpoint> {
        (0..300)
            .map(|i| Endpoint::new(format!("10.0.{}.{}", i / 250, i % 250 + 1), port))
            .collect()
    };
    let eps = Endpoints::new(many(8001), many(8002));
    let switch = TraefikSwitch::new(config(dir.path(), None)).unwrap();
    rt.block_on(switch.apply(&TrafficSplit::all(Slot::Blue), &eps))
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, path): (_, PathBuf) = (stop.clone(), dir.path().join("app.bluegreen.yml"));
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let text = std::fs::read_to_string(&path).expect("the file never disappears");
                let docs = yaml_rust2::YamlLoader::load_from_str(&text)
                    .unwrap_or_else(|e| panic!("torn file after {reads} reads: {e}\n{text}"));
                let servers = docs[0]["http"]["services"]["app-green"]["loadBalancer"]["servers"]
                    .as_vec()
                    .map_or(0, Vec::len);
                assert_eq!(servers, 300, "incomplete file after {reads} reads");
                reads += 1;
            }
            reads
        })
    };
    for i in 0..60u8 {
        let split = TrafficSplit::canary(Slot::Green, i % 101).unwrap();
        rt.block_on(switch.apply(&split, &eps)).unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let reads = reader.join().expect("reader saw only whole files");
    assert!(reads > 0);
    // No temporary files are left.
    assert_eq!(entries(dir.path()), vec!["app.bluegreen.yml".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_that_never_answers_is_bounded_by_the_request_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (url, server) = silent_server_url().await;
    let switch = TraefikSwitch::new(
        config(dir.path(), Some(&url)).with_request_timeout(Duration::from_millis(300)),
    )
    .unwrap();
    let err = switch
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints())
        .await
        .unwrap_err();
    assert!(
        matches!(
            TraefikError::from_core(&err),
            Some(TraefikError::ApiUnreachable { .. })
        ),
        "{err:?}"
    );
    assert!(entries(dir.path()).is_empty(), "nothing written");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_credentials_are_sent_and_a_refusal_stops_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let traefik = FakeTraefik::start(dir.path(), THROTTLE).await;
    traefik.require_basic_auth("ops", "s3cret-pw");

    let anonymous = TraefikSwitch::new(config(dir.path(), Some(&traefik.url))).unwrap();
    let err = anonymous
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints())
        .await
        .unwrap_err();
    assert!(
        matches!(
            TraefikError::from_core(&err),
            Some(TraefikError::ApiStatus { status: 401, .. })
        ),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert!(entries(dir.path()).is_empty(), "nothing written");

    let config = config(dir.path(), Some(&traefik.url)).with_api_basic_auth("ops", "s3cret-pw");
    assert!(!format!("{config:?}").contains("s3cret-pw"));
    let switch = TraefikSwitch::new(config).unwrap();
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints())
        .await
        .unwrap();
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );
    assert!(!format!("{switch:?}").contains("s3cret-pw"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_own_file_is_refused_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.bluegreen.yml");
    std::fs::write(&path, "http: [unclosed\n").unwrap();
    let switch = TraefikSwitch::new(config(dir.path(), None)).unwrap();
    let err = switch
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints())
        .await
        .unwrap_err();
    assert!(
        matches!(
            TraefikError::from_core(&err),
            Some(TraefikError::Parse { .. })
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("app.bluegreen.yml") && msg.contains("fix or remove it"),
        "{msg}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "http: [unclosed\n");
    assert!(switch.current().await.is_err());
}
