//! Dynamic mode against real nginx with the Lua module: conformance, weights, sticky cookies,
//! zero failed requests under keep-alive load, and the control listener's failure modes.

mod common;

use std::time::Duration;

use bluegreen_core::testkit::switch_suite;
use bluegreen_core::{Error, Secret, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_nginx::{NginxDynamicConfig, NginxDynamicSwitch, NginxError};
use bluegreen_testenv::port::RefusedAddr;
use bluegreen_testenv::{Load, LoadOptions};

fn nginx_error(e: &Error) -> &NginxError {
    match e {
        Error::Backend { source, .. } => source
            .downcast_ref::<NginxError>()
            .unwrap_or_else(|| panic!("not an NginxError: {e}")),
        other => panic!("expected a backend error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_switch_passes_the_switch_conformance_suite() {
    if !common::require(true) {
        return;
    }
    let s = common::dynamic().await;
    // Nothing applied since nginx started: current() says so, requests fail with a 5xx and the
    // error log says why.
    assert_eq!(s.switch.current().await.unwrap(), None);
    let r = bluegreen_demo::client::get(s.listen, "/").await.unwrap();
    assert!(r.status >= 500, "{r:?}");
    let log = std::fs::read_to_string(s.nginx.config().error_log()).unwrap();
    assert!(log.contains("no traffic split set for app"), "{log}");

    let config = s.switch.config().clone();
    let suite = s
        .backends
        .suite()
        .served_through(s.listen)
        .reopen(move || NginxDynamicSwitch::new(config.clone()))
        .build();
    switch_suite(&s.switch, &suite).await.assert_complete();
    let boxed: Box<dyn TrafficSwitch> = Box::new(s.switch.clone());
    switch_suite(boxed.as_ref(), &suite).await.assert_complete();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_slots_of_three_peers_under_load_fails_no_request_and_uses_every_peer() {
    if !common::require(true) {
        return;
    }
    let s = common::dynamic().await;
    let demos = bluegreen_testenv::DemoBackends::start_several(3, 3).await;
    demos.switch_under_load(&s.switch, s.listen, 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_plus_switches_under_keep_alive_load_fail_no_request() {
    if !common::require(true) {
        return;
    }
    let s = common::dynamic().await;
    let endpoints = s.backends.endpoints();
    s.switch
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints)
        .await
        .unwrap();
    let load = Load::start(s.listen, LoadOptions::new(16));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let switches = 60;
    for i in 0..switches {
        let split = match i % 3 {
            0 => TrafficSplit::all(Slot::Green),
            1 => TrafficSplit::canary(Slot::Green, 30).unwrap(),
            _ => TrafficSplit::all(Slot::Blue),
        };
        s.switch.apply(&split, &endpoints).await.unwrap();
        assert!(s
            .switch
            .current()
            .await
            .unwrap()
            .unwrap()
            .same_weights(&split));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let stats = load.finish().await;
    assert_eq!(
        stats.failed,
        0,
        "{} of {} requests failed during {switches} switches: {:?}",
        stats.failed,
        stats.total(),
        stats.errors
    );
    assert!(
        stats.ok > 500,
        "too little load to mean anything: {stats:?}"
    );
    assert!(stats.blue > 0 && stats.green > 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_split_sends_about_its_weight_and_sticky_clients_stay_put() {
    if !common::require(true) {
        return;
    }
    let s = common::dynamic().await;
    let endpoints = s.backends.endpoints();
    s.switch
        .apply(&TrafficSplit::canary(Slot::Green, 20).unwrap(), &endpoints)
        .await
        .unwrap();
    let load = Load::start(s.listen, LoadOptions::new(4));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{stats:?}");
    let share = stats.green as f64 / (stats.blue + stats.green) as f64;
    assert!(
        (0.10..0.30).contains(&share),
        "green got {share:.3} of {} requests, the split says 0.20",
        stats.total()
    );

    // Sticky: 50/50 with a cookie; the first answer sets it, later requests with it stay.
    let sticky = TrafficSplit::new(50, 50).unwrap().with_sticky("bg_slot");
    s.switch.apply(&sticky, &endpoints).await.unwrap();
    assert_eq!(s.switch.current().await.unwrap(), Some(sticky));
    let first = bluegreen_demo::client::get(s.listen, "/").await.unwrap();
    let cookie = first
        .header("set-cookie")
        .expect("sticky cookie set")
        .to_string();
    let slot = first.header("x-bluegreen-slot").unwrap().to_string();
    assert!(cookie.starts_with(&format!("bg_slot={slot};")), "{cookie}");
    for _ in 0..20 {
        let r = sticky_get(s.listen, &format!("bg_slot={slot}")).await;
        assert_eq!(r.0, slot, "a pinned client moved");
        assert!(!r.1, "the cookie was set again although the client had it");
    }
}

/// GET with a cookie; (slot, whether a set-cookie came back).
async fn sticky_get(addr: std::net::SocketAddr, cookie: &str) -> (String, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET / HTTP/1.0\r\nHost: x\r\nCookie: {cookie}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let lower = raw.to_ascii_lowercase();
    let slot = lower
        .lines()
        .find_map(|l| l.strip_prefix("x-bluegreen-slot: "))
        .unwrap_or("none")
        .trim()
        .to_string();
    (slot, lower.contains("set-cookie"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_and_unreachable_listener_are_clear_errors_and_change_nothing() {
    if !common::require(true) {
        return;
    }
    let s = common::dynamic().await;
    let endpoints = s.backends.endpoints();
    s.switch
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints)
        .await
        .unwrap();

    // Wrong token: 401, reported as such, split unchanged.
    let wrong = NginxDynamicSwitch::new(
        NginxDynamicConfig::new(
            "app",
            s.switch.config().control,
            Secret::new("wrong-token-0123456789"),
        )
        .unwrap(),
    );
    let err = wrong
        .apply(&TrafficSplit::all(Slot::Green), &endpoints)
        .await
        .unwrap_err();
    assert!(
        matches!(nginx_error(&err), NginxError::Unauthorized { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("refused the token"), "{err}");
    assert!(!err.is_retryable());
    let err = wrong.current().await.unwrap_err();
    assert!(
        matches!(nginx_error(&err), NginxError::Unauthorized { .. }),
        "{err}"
    );
    assert_eq!(
        s.switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );
    assert_eq!(common::served_by(s.listen).await.unwrap(), Slot::Blue);

    // Unreachable listener (nothing listens there).
    let refused = RefusedAddr::new();
    let nowhere = NginxDynamicSwitch::new(
        NginxDynamicConfig::new(
            "app",
            refused.addr(),
            NginxDynamicConfig::generate_token().unwrap(),
        )
        .unwrap()
        .with_timeout(Duration::from_secs(2)),
    );
    let err = nowhere
        .apply(&TrafficSplit::all(Slot::Green), &endpoints)
        .await
        .unwrap_err();
    assert!(
        matches!(nginx_error(&err), NginxError::ControlUnreachable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("unreachable"), "{err}");
    assert!(err.is_retryable());
    assert_eq!(common::served_by(s.listen).await.unwrap(), Slot::Blue);

    // nginx not running at all: the same clear error from the real switch.
    let switch = s.switch.clone();
    let listen = s.listen;
    drop(s.nginx);
    let err = switch.current().await.unwrap_err();
    assert!(
        matches!(nginx_error(&err), NginxError::ControlUnreachable { .. }),
        "{err}"
    );
    assert!(common::served_by(listen).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_location_refuses_malformed_splits_itself() {
    if !common::require(true) {
        return;
    }
    let s = common::dynamic().await;
    let endpoints = s.backends.endpoints();
    s.switch
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints)
        .await
        .unwrap();
    let token = s.switch.config().token.expose().to_string();
    let ctl = s.switch.config().control;
    let blue = endpoints.blue[0].authority();
    let bodies = [
        "".to_string(),
        format!("bluegreen-split 1\nweights 50 60\nsticky -\nblue {blue}\ngreen {blue}\n"),
        format!("bluegreen-split 1\nweights 0 100\nsticky -\nblue {blue}\ngreen\n"),
        format!("bluegreen-split 1\nweights 100 0\nsticky a;b\nblue {blue}\ngreen\n"),
        format!("bluegreen-split 1\nweights 100 0\nsticky -\nblue {blue} \ngreen\n"),
        "bluegreen-split 1\nweights 100 0\nsticky -\nblue 999.0.0.1:80\ngreen\n".to_string(),
        "bluegreen-split 1\nweights 100 0\nsticky -\nblue evil.host:80\ngreen\n".to_string(),
        "bluegreen-split 1\nweights 100 0\nsticky -\nblue 127.0.0.1:70000\ngreen\n".to_string(),
        format!("bluegreen-split 1\nweights 100 0\nsticky -\nblue {blue}\ngreen\nextra\n"),
        format!("bluegreen-split 1\nweights 100 0\nsticky -\nblue {blue}\ngreen"),
    ];
    for body in bodies {
        let status = raw_put(ctl, &token, &body).await;
        assert_eq!(status, 400, "the control location accepted {body:?}");
    }
    assert_eq!(
        s.switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );
    assert_eq!(common::served_by(s.listen).await.unwrap(), Slot::Blue);
}

async fn raw_put(addr: std::net::SocketAddr, token: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "PUT /bluegreen/split HTTP/1.0\r\nHost: x\r\nx-bluegreen-token: {token}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    raw.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_state_file_a_restarted_nginx_resumes_the_last_split() {
    if !common::require(true) {
        return;
    }
    use bluegreen_testenv::nginx::{self, NginxProcess};
    let dir = common::tempdir();
    let backends = common::Backends::start().await;
    let endpoints = backends.endpoints();
    let state = dir.path().join("split.state");
    let (nginx, config) = nginx::start_dynamic(&dir.path().join("nginx"), "app", |c| {
        c.with_state_file(&state)
    })
    .unwrap();
    let listen = nginx.listen();
    // Restarted below on the same ports, as an operator restarts it.
    let standalone = nginx.config().clone();
    let switch = NginxDynamicSwitch::new(config);
    let canary = TrafficSplit::canary(Slot::Green, 40).unwrap();
    switch.apply(&canary, &endpoints).await.unwrap();
    switch
        .apply(&TrafficSplit::all(Slot::Green), &endpoints)
        .await
        .unwrap();
    nginx.stop();

    // nginx down: apply fails and the state file keeps the split nginx last had.
    let err = switch
        .apply(&TrafficSplit::all(Slot::Blue), &endpoints)
        .await
        .unwrap_err();
    assert!(
        matches!(nginx_error(&err), NginxError::ControlUnreachable { .. }),
        "{err}"
    );
    assert!(std::fs::read_to_string(&state)
        .unwrap()
        .contains("weights 0 100"));

    let _nginx = NginxProcess::start(standalone).unwrap();
    assert_eq!(common::served_by(listen).await.unwrap(), Slot::Green);
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Green))
    );
}

#[test]
fn state_file_paths_are_validated() {
    let c = NginxDynamicConfig::new(
        "app",
        "127.0.0.1:9000".parse().unwrap(),
        NginxDynamicConfig::generate_token().unwrap(),
    )
    .unwrap();
    assert!(c.clone().with_state_file("/var/lib/bg/split").is_ok());
    for bad in ["relative/x", "/a b", "/x\"]]..os.exit()", "/a\nb", "/"] {
        assert!(c.clone().with_state_file(bad).is_err(), "{bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_process_loads_the_token_back_from_the_included_snippet() {
    if !common::require(true) {
        return;
    }
    let dir = common::tempdir();
    let backends = common::Backends::start().await;
    let snippet = dir.path().join("app-bluegreen.conf");
    // nginx includes the snippet file, as a deployment would; the token lives only there.
    let nginx = bluegreen_testenv::port::start_on_fresh_ports(|[listen, control]| {
        let ip = std::net::Ipv4Addr::LOCALHOST;
        let config = NginxDynamicConfig::new(
            "app",
            (ip, control).into(),
            NginxDynamicConfig::generate_token().unwrap(),
        )
        .unwrap();
        std::fs::write(&snippet, config.render_snippet()).unwrap();
        let mut site = bluegreen_testenv::nginx::StandaloneConfig::dynamic(
            dir.path(),
            (ip, listen).into(),
            &config,
        );
        site.http = format!("include {};\n", snippet.display());
        bluegreen_testenv::nginx::NginxProcess::start(site).map(|n| (n, config.control))
    })
    .unwrap();
    let (nginx, control) = nginx;

    let token = NginxDynamicConfig::token_from_snippet(&snippet).unwrap();
    // The token never shows in Debug.
    assert!(!format!("{token:?}").contains(token.expose()));
    let switch = NginxDynamicSwitch::new(NginxDynamicConfig::new("app", control, token).unwrap());
    switch
        .apply(&TrafficSplit::all(Slot::Green), &backends.endpoints())
        .await
        .unwrap();
    assert_eq!(
        common::served_by(nginx.listen()).await.unwrap(),
        Slot::Green
    );

    // Not a snippet of ours, or one whose token line was edited: a clear error, no token shown.
    let other = dir.path().join("other.conf");
    std::fs::write(&other, "upstream app { server 127.0.0.1:1; }\n").unwrap();
    let err = NginxDynamicConfig::token_from_snippet(&other).unwrap_err();
    assert!(
        err.to_string()
            .contains("not a bluegreen-nginx Dynamic snippet"),
        "{err}"
    );
    let text = std::fs::read_to_string(&snippet).unwrap();
    let token = NginxDynamicConfig::token_from_snippet(&snippet).unwrap();
    let edited = dir.path().join("edited.conf");
    std::fs::write(&edited, text.replace(token.expose(), "short")).unwrap();
    let err = NginxDynamicConfig::token_from_snippet(&edited).unwrap_err();
    assert!(err.to_string().contains("control token"), "{err}");
    assert!(!err.to_string().contains("short"), "{err}");
    let err = NginxDynamicConfig::token_from_snippet(dir.path().join("missing.conf")).unwrap_err();
    assert!(err.to_string().contains("missing.conf"), "{err}");
}
