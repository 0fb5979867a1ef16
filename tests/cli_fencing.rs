//! Fencing through the binary (issue #12, part 1): a `deploy` that lost its lock — to lease
//! expiry, or to `break-lock --force` while it ran — changes nothing more and exits 3, while the
//! run that took the lock goes live and a request loop through `bluegreen serve` sees no failure.

mod common;

use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use bluegreen_testenv::{Load, LoadOptions};
use common::{stderr, Pipeline};
use rustix::process::{kill_process, Pid, Signal};

const POLICY: &str = "[policy]\nlock_ttl = 2\nreadiness_timeout = 30\n\
                      observation = { window = 0, interval = 100 }\n";

/// Starts `deploy VERSION` whose release listens only after `delay_ms`, and waits until the run
/// sits in wait_ready.
// The child is returned: the caller waits for it.
#[allow(clippy::zombie_processes)]
fn slow_deploy(p: &Pipeline, version: &str, delay_ms: u64) -> Child {
    let mut child = p
        .cmd(&["deploy", version])
        .env("DEMO_START_DELAY_MS", delay_ms.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let (_, st, _) = p.json(&["status"]);
        if st["in_flight"]["phase"] == "wait_ready" {
            return child;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the deploy never reached wait_ready: {st}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: Signal) {
    let pid = Pid::from_raw(child.id() as i32).unwrap();
    kill_process(pid, sig).unwrap();
}

/// The loser's exit: 3, naming the lost lock, claiming nothing about live traffic.
fn assert_stopped_fenced(out: &Output) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("lock was lost"), "{err}");
    assert!(!err.contains("live traffic untouched"), "{err}");
}

/// What the survivor left: v3 live on green, nothing in flight, the lock free.
fn assert_survivor_live(p: &Pipeline) {
    assert_eq!(p.get().as_deref(), Some("v3"));
    let (_, st, _) = p.json(&["status"]);
    assert_eq!(st["active"], "green", "{st}");
    assert_eq!(st["slots"]["green"]["version"], "v3", "{st}");
    assert_eq!(st["slots"]["green"]["state"], "running", "{st}");
    assert!(st["in_flight"].is_null() && st["lock"].is_null(), "{st}");
}

/// `serve` running, v1 live on blue, and a request loop through the proxy.
fn v1_live_under_load() -> (Pipeline, Load) {
    let mut p = Pipeline::new(POLICY);
    p.serve();
    assert!(p.run(&["deploy", "v1"]).status.success());
    let load = Load::start(
        ([127, 0, 0, 1], p.listen).into(),
        LoadOptions::new(2).with_pause(Duration::from_millis(5)),
    );
    (p, load)
}

/// Waits for the run that lost its lock: it stopped (exit 3) having changed nothing, no request
/// failed, and the survivor's v3 is live.
async fn loser_stopped_and_survivor_live(p: Pipeline, loser: Child, load: Load) {
    let (p, out) = blocking(move || {
        let out = loser.wait_with_output().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        (p, out)
    })
    .await;
    assert_stopped_fenced(&out);
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    assert!(stats.ok > 0);
    assert_survivor_live(&p);
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_whose_lease_expired_changes_nothing_more() {
    let (p, load) = v1_live_under_load();

    // A: frozen in wait_ready (SIGSTOP) past its 2 s lease.
    let (p, a) = blocking(move || {
        let a = slow_deploy(&p, "v2", 3000);
        signal(&a, Signal::STOP);
        std::thread::sleep(Duration::from_millis(2500));
        // B takes the expired lock: it undoes A's flight and deploys v3.
        let b = p.run(&["deploy", "v3"]);
        assert!(b.status.success(), "{}", stderr(&b));
        assert_eq!(p.get().as_deref(), Some("v3"));
        (p, a)
    })
    .await;

    // A wakes up: its next step finds the lock gone and it stops, removing nothing.
    signal(&a, Signal::CONT);
    loser_stopped_and_survivor_live(p, a, load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaking_a_live_holders_lock_is_refused_unless_forced_and_the_holder_then_stops() {
    let (p, load) = v1_live_under_load();

    let (p, a) = blocking(move || {
        let a = slow_deploy(&p, "v2", 4000);
        // The holder is alive on this host: break-lock refuses, naming it, and leaves the lock.
        let (code, v, _) = p.json(&["break-lock"]);
        assert_eq!(code, 3, "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("still running"),
            "{v}"
        );
        let (_, st, _) = p.json(&["status"]);
        assert!(st["lock"].is_object(), "{st}");

        // --force breaks it and says what it broke.
        let out = p.run(&["break-lock", "--force"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("removed the lock held by deploy v2"),
            "{text}"
        );
        // B recovers A's flight as crashed and deploys v3 while A still runs.
        let b = p.run(&["deploy", "v3"]);
        assert!(b.status.success(), "{}", stderr(&b));
        (p, a)
    })
    .await;

    loser_stopped_and_survivor_live(p, a, load).await;
}
