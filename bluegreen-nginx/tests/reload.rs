//! Reload mode against real, stock nginx: conformance, and every failure path with what the
//! caller sees and what is left (the previous include, live traffic untouched).

mod common;

use std::time::Duration;

use bluegreen_core::testkit::switch_suite;
use bluegreen_core::{Endpoint, Error, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_demo::{DemoConfig, DemoServer};
use bluegreen_nginx::{
    NginxError, NginxReloadConfig, NginxReloadSwitch, Restored, Routing, SlotMarker, Step,
    VerifyProbe, PROBE_HEADER, UPSTREAM_HEADER,
};
use bluegreen_testenv::{nginx, port};

fn nginx_error(e: &Error) -> &NginxError {
    match e {
        Error::Backend { source, .. } => source
            .downcast_ref::<NginxError>()
            .unwrap_or_else(|| panic!("not an NginxError: {e}")),
        other => panic!("expected a backend error, got {other:?}"),
    }
}

fn include_text(s: &common::ReloadSetup) -> String {
    std::fs::read_to_string(&s.switch.config().include).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_switch_passes_the_switch_conformance_suite() {
    if !common::require(false) {
        return;
    }
    let s = common::reload().await;
    let config = s.switch.config().clone();
    let suite = s
        .backends
        .suite()
        .served_through(s.listen)
        .reopen(move || NginxReloadSwitch::new(config.clone()))
        .build();
    switch_suite(&s.switch, &suite).await.assert_complete();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_nginx_t_rejects_is_restored_and_traffic_stays() {
    if !common::require(false) {
        return;
    }
    let s = common::reload().await;
    let before = include_text(&s);
    // Valid for our grammar, refused by nginx: the name does not resolve.
    let mut endpoints = s.backends.endpoints();
    endpoints.green = vec![Endpoint::new("no-such-host.invalid", 8080)];
    let err = s
        .switch
        .apply(&TrafficSplit::all(Slot::Green), &endpoints)
        .await
        .unwrap_err();
    let ne = nginx_error(&err);
    assert_eq!(ne.step(), Some(Step::ConfigTest), "{err}");
    assert_eq!(ne.restored(), Some(&Restored::Restored { reloaded: false }));
    assert!(matches!(ne.root(), NginxError::ConfigTest { .. }), "{err}");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("nginx -t") && msg.contains("no-such-host.invalid"),
        "{msg}"
    );
    assert!(msg.contains("live traffic untouched"), "{msg}");
    assert_eq!(
        include_text(&s),
        before,
        "the previous include was not restored"
    );
    assert_eq!(
        s.switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );
    assert_eq!(common::served_by(s.listen).await.unwrap(), Slot::Blue);
    assert!(!s
        .switch
        .config()
        .include
        .with_file_name(".upstream.conf.bluegreen-tmp")
        .exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_whose_requests_do_not_reach_the_target_is_rolled_back() {
    if !common::require(false) {
        return;
    }
    let s = common::reload().await;
    let before = include_text(&s);
    // "green" is really another blue instance (a misrouted environment): nginx accepts the
    // config and reloads, but the probe sees blue answering. Only the application's own slot
    // header can tell (the default marker, the upstream address, proves where nginx sends
    // requests, not what runs there).
    let wrong = DemoServer::start(DemoConfig::new("v1", "blue"))
        .await
        .unwrap();
    let mut endpoints = s.backends.endpoints();
    endpoints.green = vec![Endpoint::new("127.0.0.1", wrong.local_addr().port())];
    let app_marker = VerifyProbe::new(s.listen)
        .with_marker(SlotMarker::Header("x-bluegreen-slot".into()))
        .unwrap();
    let switch = NginxReloadSwitch::new(
        s.switch
            .config()
            .clone()
            .with_verify(app_marker)
            .with_verify_timeout(Duration::from_secs(2)),
    );
    let err = switch
        .apply(&TrafficSplit::all(Slot::Green), &endpoints)
        .await
        .unwrap_err();
    let ne = nginx_error(&err);
    assert_eq!(ne.step(), Some(Step::Verify), "{err}");
    assert_eq!(
        ne.restored(),
        Some(&Restored::Restored { reloaded: true }),
        "{err}"
    );
    eprintln!("{err}");
    assert!(err.to_string().contains("did not reach green"), "{err}");
    assert_eq!(include_text(&s), before);
    for _ in 0..5 {
        assert_eq!(common::served_by(s.listen).await.unwrap(), Slot::Blue);
    }
    assert!(err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_not_running_and_a_stale_pid_file_are_told_apart_and_change_nothing() {
    if !common::require(false) {
        return;
    }
    let s = common::reload().await;
    let endpoints = s.backends.endpoints();
    let before = include_text(&s);

    // A pid file naming a process that is gone.
    let stale = s.dir.path().join("stale.pid");
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    std::fs::write(&stale, format!("{dead}\n")).unwrap();
    let mut config = s.switch.config().clone();
    config.pid_file = Some(stale);
    let err = NginxReloadSwitch::new(config)
        .apply(&TrafficSplit::all(Slot::Green), &endpoints)
        .await
        .unwrap_err();
    let ne = nginx_error(&err);
    assert_eq!(ne.step(), Some(Step::Preflight));
    assert!(
        matches!(ne.root(), NginxError::StalePidFile { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("stale pid file"), "{err}");
    assert_eq!(include_text(&s), before);

    // nginx stopped: its pid file is gone.
    let switch = s.switch.clone();
    s.nginx.stop();
    let err = switch
        .apply(&TrafficSplit::all(Slot::Green), &endpoints)
        .await
        .unwrap_err();
    let ne = nginx_error(&err);
    assert!(matches!(ne.root(), NginxError::NotRunning { .. }), "{err}");
    assert!(err.to_string().contains("nginx is not running"), "{err}");
    assert_eq!(ne.restored(), Some(&Restored::NothingChanged));
    assert_eq!(
        std::fs::read_to_string(&switch.config().include).unwrap(),
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_denied_on_the_include_is_reported_with_the_path() {
    if !common::require(false) {
        return;
    }
    let s = common::reload().await;
    // Even root cannot create files in sysfs.
    let mut config = s.switch.config().clone();
    config.include = "/sys/kernel/bluegreen-nginx-test.conf".into();
    let err = NginxReloadSwitch::new(config)
        .apply(&TrafficSplit::all(Slot::Green), &s.backends.endpoints())
        .await
        .unwrap_err();
    let ne = nginx_error(&err);
    assert_eq!(ne.step(), Some(Step::WriteCandidate), "{err}");
    assert!(
        matches!(ne.root(), NginxError::PermissionDenied { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("/sys/kernel/"), "{err}");
    assert_eq!(common::served_by(s.listen).await.unwrap(), Slot::Blue);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edited_include_is_a_clear_error_for_current() {
    if !common::require(false) {
        return;
    }
    let s = common::reload().await;
    let path = s.switch.config().include.clone();
    let text = include_text(&s).replace("weight=1;", "weight=1 max_fails=3;");
    std::fs::write(&path, text).unwrap();
    let err = s.switch.current().await.unwrap_err();
    assert!(
        matches!(nginx_error(&err), NginxError::Unparseable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("edited by hand"), "{err}");
    std::fs::remove_file(&path).unwrap();
    assert_eq!(s.switch.current().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_workers_still_serving_are_reported_and_their_request_completes() {
    if !common::require(false) {
        return;
    }
    let s = common::reload().await;
    let listen = s.listen;
    let slow =
        tokio::spawn(async move { bluegreen_demo::client::get(listen, "/slow?ms=5000").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let switch = NginxReloadSwitch::new(
        s.switch
            .config()
            .clone()
            .with_drain_wait(Duration::from_millis(200)),
    );
    let routing = Routing {
        split: TrafficSplit::all(Slot::Green),
        endpoints: s.backends.endpoints(),
    };
    let report = switch.switch_to(&routing).await.unwrap();
    assert!(report.changed && report.verified, "{report:?}");
    assert!(
        report.old_workers_draining >= 1,
        "the old worker serving the slow request was not reported: {report:?}"
    );
    let r = slow.await.unwrap().unwrap();
    assert_eq!(r.status, 200, "the in-flight request failed: {r:?}");
    assert_eq!(r.header("x-bluegreen-slot"), Some("blue"));

    // Same routing again: nothing to do.
    let again = switch.switch_to(&routing).await.unwrap();
    assert!(!again.changed);
    // With a long enough wait, nothing is left.
    let back = Routing {
        split: TrafficSplit::all(Slot::Blue),
        endpoints: s.backends.endpoints(),
    };
    let report = NginxReloadSwitch::new(
        s.switch
            .config()
            .clone()
            .with_drain_wait(Duration::from_secs(10)),
    )
    .switch_to(&back)
    .await
    .unwrap();
    assert_eq!(report.old_workers_draining, 0, "{report:?}");
}

#[test]
fn reload_config_refuses_hostile_names() {
    let cmd = bluegreen_nginx::NginxCommand::new("/etc/nginx/nginx.conf");
    for bad in ["app;", "app\n", "a b", "app}", ""] {
        assert!(
            NginxReloadConfig::builder(cmd.clone())
                .include("/tmp/u.conf")
                .upstream(bad)
                .pid_file("/run/nginx.pid")
                .build()
                .is_err(),
            "{bad:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_the_master_rejects_is_reported_and_the_previous_include_restored() {
    if !common::require(false) {
        return;
    }
    let s = common::reload().await;
    let before = include_text(&s);
    // `nginx -t` runs against another (valid) main config, as happens when the switch is given
    // other -p/-c than the master uses: the test passes, the master's reload fails to resolve
    // the new peer and keeps its old workers.
    let other = s.dir.path().join("other");
    std::fs::create_dir_all(other.join("logs")).unwrap();
    let other_conf = other.join("nginx.conf");
    std::fs::write(
        &other_conf,
        format!(
            "error_log {0}/logs/error.log;\npid {0}/nginx.pid;\nevents {{}}\nhttp {{}}\n",
            other.display()
        ),
    )
    .unwrap();
    let mut config = s
        .switch
        .config()
        .clone()
        .with_reload_timeout(Duration::from_secs(3));
    config.nginx = bluegreen_nginx::NginxCommand::new(&other_conf).with_prefix(&other);
    // The master's own pid file, given explicitly (the other config names another).
    config.pid_file = Some(s.nginx.config().pid_file());
    let mut endpoints = s.backends.endpoints();
    endpoints.green = vec![Endpoint::new("no-such-host.invalid", 8080)];
    let err = NginxReloadSwitch::new(config)
        .apply(&TrafficSplit::all(Slot::Green), &endpoints)
        .await
        .unwrap_err();
    let ne = nginx_error(&err);
    assert_eq!(ne.step(), Some(Step::Reload), "{err}");
    assert!(
        matches!(ne.root(), NginxError::ReloadNotApplied { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("rejected the reload"), "{err}");
    assert!(
        matches!(ne.restored(), Some(Restored::Restored { reloaded: true })),
        "{err}"
    );
    assert_eq!(include_text(&s), before);
    assert_eq!(common::served_by(s.listen).await.unwrap(), Slot::Blue);
    // The master still answers a normal switch afterwards.
    s.switch
        .apply(&TrafficSplit::all(Slot::Green), &s.backends.endpoints())
        .await
        .unwrap();
    assert_eq!(common::served_by(s.listen).await.unwrap(), Slot::Green);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_of_a_weighted_slot_is_rendered_and_serves() {
    if !common::require(false) {
        return;
    }
    let s = common::reload().await;
    let all = s.backends.all_endpoints();
    assert_eq!((all.blue.len(), all.green.len()), (3, 2));
    // 70/30 over 3 + 2 peers: each blue peer 14, each green 9, so the slots get 42 : 18.
    s.switch
        .apply(&TrafficSplit::canary(Slot::Green, 30).unwrap(), &all)
        .await
        .unwrap();
    let text = include_text(&s);
    for (slot, weight) in [(Slot::Blue, 14), (Slot::Green, 9)] {
        for e in all.get(slot) {
            let line = format!("    server {} weight={weight}; # {slot}\n", e.authority());
            assert!(text.contains(&line), "{line:?} missing:\n{text}");
        }
    }
    assert_eq!(text.matches("    server ").count(), 5, "{text}");
    // All on green: only green's two peers are servers, and both serve.
    s.switch
        .apply(&TrafficSplit::all(Slot::Green), &all)
        .await
        .unwrap();
    let text = include_text(&s);
    assert_eq!(text.matches("    server ").count(), 2, "{text}");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        seen.insert(
            bluegreen_testenv::demo::answered_by(s.listen)
                .await
                .unwrap(),
        );
    }
    let want: std::collections::BTreeSet<String> =
        all.green.iter().map(|e| e.authority()).collect();
    assert_eq!(seen, want);
    assert_eq!(
        s.switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Green))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pid_file_is_the_one_the_configuration_names() {
    if !common::require(false) {
        return;
    }
    let s = common::reload().await;
    // The setup gives no pid file: the switch found nginx's through `nginx -T`.
    assert_eq!(s.switch.config().pid_file, None);
    let found = s
        .switch
        .config()
        .nginx
        .pid_file(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(found, s.nginx.config().pid_file());
    assert_eq!(
        std::fs::read_to_string(&found).unwrap().trim(),
        s.nginx.pid().to_string()
    );
    // A main config without `pid`: the binary's compiled-in path (Debian: /run/nginx.pid).
    let bare = s.dir.path().join("bare.conf");
    std::fs::write(
        &bare,
        format!(
            "error_log {}/logs/bare.log;\nevents {{}}\nhttp {{}}\n",
            s.dir.path().display()
        ),
    )
    .unwrap();
    let compiled = bluegreen_nginx::NginxCommand::new(&bare)
        .with_prefix(s.dir.path())
        .pid_file(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(compiled.is_absolute(), "{compiled:?}");
    assert_ne!(compiled, found);
    // A main config nginx refuses: the error says so.
    let broken = s.dir.path().join("broken.conf");
    std::fs::write(&broken, "events {}\nhttp { nonsense; }\n").unwrap();
    let err = bluegreen_nginx::NginxCommand::new(&broken)
        .with_prefix(s.dir.path())
        .pid_file(Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(err, NginxError::ConfigTest { .. }), "{err:?}");
    assert!(err.to_string().contains("nonsense"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_needs_nothing_from_the_app_and_clients_never_see_the_marker() {
    if !common::require(false) {
        return;
    }
    let s = common::reload().await;
    // The default probe reads the upstream address the include adds; the demo's own
    // `x-bluegreen-slot` is not used.
    let probe = s.switch.config().verify.clone().unwrap();
    assert_eq!(
        probe.marker,
        SlotMarker::UpstreamAddrHeader(UPSTREAM_HEADER.into())
    );
    assert_eq!(s.switch.last_report(), None);
    s.switch
        .apply(&TrafficSplit::all(Slot::Green), &s.backends.endpoints())
        .await
        .unwrap();
    // The report of that apply is reachable through the switch (and its clones).
    let report = s.switch.clone().last_report().unwrap();
    assert!(report.changed && report.verified, "{report:?}");
    assert!(report.latency > Duration::ZERO, "{report:?}");

    let green = s.backends.endpoints().green[0].authority();
    let probed = bluegreen_demo::client::get_with(s.listen, "/", &[(PROBE_HEADER, "1")])
        .await
        .unwrap();
    assert_eq!(probed.header(UPSTREAM_HEADER), Some(green.as_str()));
    // A client without the probe header never sees upstream addresses.
    let plain = bluegreen_demo::client::get(s.listen, "/").await.unwrap();
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header(UPSTREAM_HEADER), None, "{plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_location_with_its_own_add_header_fails_verification_naming_the_fix_and_restores() {
    if !common::require(false) {
        return;
    }
    let dir = common::tempdir();
    let backends = common::Backends::start().await;
    let include = dir.path().join("upstream.conf");
    let config = NginxReloadConfig::builder(nginx::command(dir.path()))
        .include(&include)
        .upstream("app")
        .build()
        .unwrap()
        .with_verify_timeout(Duration::from_secs(2));
    NginxReloadSwitch::new(config.clone())
        .write_initial(&TrafficSplit::all(Slot::Blue), &backends.endpoints())
        .unwrap();
    // The site's location sets a header of its own: it no longer inherits the include's.
    let start = |location: String| {
        port::start_on_fresh_ports(|[listen]| {
            let mut c = nginx::StandaloneConfig::reload(
                dir.path(),
                std::net::SocketAddr::from(([127, 0, 0, 1], listen)),
                &include,
                "app",
            );
            c.location = location.clone();
            nginx::NginxProcess::start(c)
        })
        .unwrap()
    };
    let own = "proxy_pass http://app;\nadd_header x-frame-options DENY always;\n".to_string();
    let server = start(own);
    let listen = server.listen();
    let switch = NginxReloadSwitch::new(config.clone().with_verify(VerifyProbe::new(listen)));
    let before = std::fs::read_to_string(&include).unwrap();
    let err = switch
        .apply(&TrafficSplit::all(Slot::Green), &backends.endpoints())
        .await
        .unwrap_err();
    let ne = nginx_error(&err);
    assert_eq!(ne.step(), Some(Step::Verify), "{err}");
    assert!(err.to_string().contains("render_location"), "{err}");
    assert!(
        matches!(ne.restored(), Some(Restored::Restored { reloaded: true })),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&include).unwrap(), before);
    assert_eq!(common::served_by(listen).await.unwrap(), Slot::Blue);
    assert_eq!(switch.last_report(), None);
    server.stop();

    // The location with render_location()'s lines (plus its own header) verifies.
    let fixed = format!(
        "{}add_header x-frame-options DENY always;\n",
        config.render_location()
    );
    let server = start(fixed);
    let listen = server.listen();
    let switch = NginxReloadSwitch::new(config.with_verify(VerifyProbe::new(listen)));
    switch
        .apply(&TrafficSplit::all(Slot::Green), &backends.endpoints())
        .await
        .unwrap();
    assert!(switch.last_report().unwrap().verified);
    assert_eq!(common::served_by(listen).await.unwrap(), Slot::Green);
}
