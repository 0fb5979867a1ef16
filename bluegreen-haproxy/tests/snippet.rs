//! The rendered haproxy.cfg snippet, checked by HAProxy itself, and a reload that keeps the
//! runtime state through the server-state file.

mod common;

use std::time::{Duration, Instant};

use bluegreen_core::{Slot, TrafficSplit, TrafficSwitch};
use bluegreen_haproxy::Command;
use common::{client, haproxy_available, haproxy_bin, served_by, Demos, Haproxy};

#[test]
fn the_rendered_config_passes_haproxy_check() {
    if !haproxy_available("snippet") {
        return;
    }
    let h = Haproxy::start();
    let out = std::process::Command::new(haproxy_bin())
        .arg("-c")
        .arg("-f")
        .arg(&h.cfg)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "haproxy -c refused the config:\n{text}"
    );
    assert!(text.contains("Configuration file is valid"), "{text}");
    // A broken variant is refused, so the check above means something.
    let bad = h.dir.path().join("bad.cfg");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&h.cfg)
            .unwrap()
            .replace("balance roundrobin", "balance nonsense"),
    )
    .unwrap();
    let out = std::process::Command::new(haproxy_bin())
        .arg("-c")
        .arg("-f")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

async fn worker_pid(h: &Haproxy) -> Option<String> {
    let info = h
        .switch()
        .client()
        .send(&Command::raw("show info").unwrap())
        .await
        .ok()?;
    info.lines()
        .find(|l| l.starts_with("Pid: "))
        .map(str::to_string)
}

/// Reloads and waits until a new worker answers on the admin socket.
async fn reload(h: &mut Haproxy) {
    let before = worker_pid(h)
        .await
        .expect("worker answers before the reload");
    h.reload();
    let start = Instant::now();
    loop {
        if let Some(now) = worker_pid(h).await {
            if now != before {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no new worker after reload:\n{}",
            h.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_runtime_state_when_it_was_saved() {
    if !haproxy_available("snippet") {
        return;
    }
    let mut h = Haproxy::start_with(true);
    let demos = Demos::start().await;
    let eps = demos.endpoints();
    let switch = h.switch();
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &eps)
        .await
        .unwrap();
    let canary = TrafficSplit::canary(Slot::Green, 30).unwrap();
    switch.apply(&canary, &eps).await.unwrap();
    switch
        .apply(&TrafficSplit::all(Slot::Green), &eps)
        .await
        .unwrap();
    let before = switch.servers().await.unwrap();

    // A state file that cannot be written is an error naming it.
    let bad = h.dir.path().join("missing-dir").join("server-state");
    let e = switch.save_server_state(&bad).await.unwrap_err();
    assert!(matches!(e, bluegreen_core::Error::Io { .. }), "{e}");
    assert!(e.to_string().contains("missing-dir"), "{e}");

    // Saved state: the reloaded process keeps addresses, weights and states.
    switch.save_server_state(&h.state_file).await.unwrap();
    let saved = std::fs::read_to_string(&h.state_file).unwrap();
    assert!(saved.starts_with("1\n# be_id "), "{saved}");
    reload(&mut h).await;
    let after = switch.servers().await.unwrap();
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Green)),
        "{}",
        h.log()
    );
    for slot in Slot::ALL {
        let (b, a) = (before.get(slot), after.get(slot));
        assert_eq!(
            (a.addr, a.port, a.weight),
            (b.addr, b.port, b.weight),
            "{slot}: {} vs {}",
            a.summary(),
            b.summary()
        );
        assert_eq!(
            (a.is_maint(), a.is_drain()),
            (b.is_maint(), b.is_drain()),
            "{slot}"
        );
    }
    let c = client();
    let start = Instant::now();
    // The reloaded worker may need one check round before it sends traffic to green.
    loop {
        match served_by(&c, &h.url("/")).await {
            Ok(Slot::Green) => break,
            other => assert!(start.elapsed() < Duration::from_secs(10), "{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // And a switch after the reload works as before.
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &eps)
        .await
        .unwrap();
    assert_eq!(served_by(&c, &h.url("/")).await.unwrap(), Slot::Blue);

    // Without saving, a reload falls back to the state file's older content: the runtime
    // change since the last save (blue live) is lost — which is why the save is needed.
    reload(&mut h).await;
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Green))
    );
}
