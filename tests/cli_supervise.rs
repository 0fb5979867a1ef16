//! `bluegreen serve` supervises the process environment's live program: kill -9 it under a
//! request loop and measure what clients saw; the programs get a clean environment; a failed
//! release's log survives the rollback.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::{stderr, Pipeline};

const FAST: &str = "[policy]\nobservation = { window = 0, interval = 100 }\n";

/// Adds `keys` to the `[environment]` section.
fn environment_keys(p: &Pipeline, keys: &str) {
    let text = std::fs::read_to_string(p.file()).unwrap();
    let text = text.replace(
        "kind = \"process\"\n",
        &format!("kind = \"process\"\n{keys}\n"),
    );
    std::fs::write(p.file(), text).unwrap();
}

/// Adds `name` to the file's `pass_env`.
fn pass_also(p: &Pipeline, name: &str) {
    let text = std::fs::read_to_string(p.file()).unwrap();
    let text = text.replace("pass_env = [", &format!("pass_env = [\"{name}\", "));
    std::fs::write(p.file(), text).unwrap();
}

fn process_dir(p: &Pipeline) -> PathBuf {
    p.dir.path().join(".bluegreen").join("process")
}

/// The pid the slot's pid file records.
fn pid_of(p: &Pipeline, slot: &str) -> u32 {
    let text = std::fs::read_to_string(process_dir(p).join(format!("{slot}.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["pid"].as_u64().unwrap() as u32
}

fn kill_9(pid: u32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
}

/// What a request loop through the proxy saw from the kill until `done` held (bounded).
struct Outage {
    requests: u64,
    failed: u64,
    /// From the kill to the last failed request (zero if none failed).
    recovery: Duration,
}

/// Kills `pid` with SIGKILL while a loop sends requests through the proxy, and keeps the loop
/// going until `done()` (checked between requests) or 30 s.
fn kill_under_load(p: &Pipeline, pid: u32, expect: &str, done: impl Fn() -> bool) -> Outage {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let looper = s.spawn(|| {
            let (mut requests, mut failed, mut last_failure) = (0u64, 0u64, None);
            let mut killed_at = None;
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if killed_at.is_none() && requests >= 20 {
                    kill_9(pid);
                    killed_at = Some(Instant::now());
                }
                let ok = p.get().as_deref() == Some(expect);
                requests += 1;
                if !ok {
                    failed += 1;
                    last_failure = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let killed_at = killed_at.expect("the loop ran long enough to kill");
            Outage {
                requests,
                failed,
                recovery: last_failure.map_or(Duration::ZERO, |t| t - killed_at),
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        // Give the loop its first requests, then wait for recovery plus a second of steady
        // answers.
        std::thread::sleep(Duration::from_millis(300));
        while !done() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        looper.join().unwrap()
    })
}

/// The parent pid of `pid`.
fn ppid_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The names of the variables `pid` was started with.
fn env_names(pid: u32) -> Vec<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    environ
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=').map(|(k, _)| k.to_string())
        })
        .collect()
}

#[test]
fn serve_restarts_the_live_program_after_kill_9() {
    let mut p = Pipeline::new(FAST);
    pass_also(&p, "BG_CLI_SECRET");
    p.serve();
    for v in ["v1", "v2"] {
        let out = p
            .cmd(&["deploy", v])
            .env("BG_CLI_SECRET", "from-the-deploying-shell")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(p.get().as_deref(), Some("v2"));
    let pid = pid_of(&p, "green");
    // `serve` owns the program: `deploy` asked it through the admin API.
    let serve_pid = p.serve.as_ref().unwrap().id();
    assert_eq!(ppid_of(pid), serve_pid, "the program is not serve's child");
    assert!(env_names(pid).iter().any(|n| n == "BG_CLI_SECRET"));

    let outage = kill_under_load(&p, pid, "v2", || {
        pid_of(&p, "green") != pid && p.get().as_deref() == Some("v2")
    });
    println!(
        "kill -9 of the live program under load: {} requests, {} failed, recovered in {:?}",
        outage.requests, outage.failed, outage.recovery
    );
    let restarted = pid_of(&p, "green");
    assert_ne!(restarted, pid, "the program was not restarted");
    // Restarted by serve, with the passed variable it holds in memory only.
    assert_eq!(ppid_of(restarted), serve_pid);
    assert!(
        env_names(restarted).iter().any(|n| n == "BG_CLI_SECRET"),
        "the restarted program lost a passed variable"
    );
    let state = std::fs::read_to_string(p.dir.path().join(".bluegreen/state/state.json")).unwrap();
    assert!(!state.contains("from-the-deploying-shell"));
    assert_eq!(
        p.get().as_deref(),
        Some("v2"),
        "the live program answers again"
    );
    assert!(
        outage.recovery < Duration::from_secs(15),
        "recovery took {:?}",
        outage.recovery
    );
    // The killed program's log is kept next to the restarted one's.
    let old_log = std::fs::read_to_string(process_dir(&p).join("green.log.1")).unwrap();
    assert!(old_log.contains("deploy version=v2"), "{old_log}");
    // A restart is no deployment: the history still has the two deploys, v2 live on green.
    let (_, st, _) = p.json(&["status"]);
    assert_eq!(st["active"], "green", "{st}");
    let (_, h, _) = p.json(&["history"]);
    assert_eq!(h["history"].as_array().unwrap().len(), 2, "{h}");
}

#[test]
fn serve_fails_over_to_the_warm_previous_release_when_the_live_one_stays_down() {
    let mut p = Pipeline::new(FAST);
    // A copy of the demo app that can be taken away, so that restarts fail.
    let program = p.dir.path().join("app");
    std::fs::copy(bluegreen_demo::binary_path(), &program).unwrap();
    let text = std::fs::read_to_string(p.file()).unwrap();
    let demo = bluegreen_demo::binary_path().display().to_string();
    std::fs::write(
        p.file(),
        text.replace(&demo, &program.display().to_string()),
    )
    .unwrap();
    environment_keys(
        &p,
        "on_live_failure = \"failover\"\nfailover_after = \"2s\"",
    );
    p.serve();
    for v in ["v1", "v2"] {
        let out = p.run(&["deploy", v]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    std::fs::remove_file(&program).unwrap();
    let pid = pid_of(&p, "green");

    let outage = kill_under_load(&p, pid, "v1", || p.get().as_deref() == Some("v1"));
    println!(
        "kill -9 of the live program that cannot restart: {} requests, {} failed, \
         failed over in {:?}",
        outage.requests, outage.failed, outage.recovery
    );
    assert_eq!(p.get().as_deref(), Some("v1"), "the warm release serves");
    assert!(
        outage.recovery < Duration::from_secs(15),
        "failover took {:?}",
        outage.recovery
    );
    // Recorded like any run: a rollback to blue in the history, blue live. (Traffic moves
    // before the rollback run ends: wait for its record, bounded.)
    let deadline = Instant::now() + Duration::from_secs(20);
    let h = loop {
        let (_, h, _) = p.json(&["history"]);
        let h = h["history"].as_array().unwrap().clone();
        if h.len() >= 3 || Instant::now() > deadline {
            break h;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (_, st, _) = p.json(&["status"]);
    assert_eq!(st["active"], "blue", "{st}");
    assert_eq!(h.len(), 3, "{h:?}");
    assert_eq!(h[2]["kind"], "rollback", "{h:?}");
    assert_eq!(h[2]["version"], "v1", "{h:?}");
}

#[test]
fn the_cli_environment_does_not_reach_the_program_unless_passed() {
    let mut p = Pipeline::new(FAST);
    pass_also(&p, "BG_CLI_PASSED");
    p.serve();
    let out = p
        .cmd(&["deploy", "v1"])
        .env("BG_CLI_PASSED", "yes")
        .env("BG_CLI_CI_TOKEN", "not-for-the-app")
        .env("PGPASSWORD", "not-for-the-app-either")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let names = env_names(pid_of(&p, "blue"));
    assert!(names.iter().any(|n| n == "BG_CLI_PASSED"), "{names:?}");
    assert!(names.iter().any(|n| n == "PATH"), "{names:?}");
    for leak in ["BG_CLI_CI_TOKEN", "PGPASSWORD", "CARGO_MANIFEST_DIR"] {
        assert!(!names.iter().any(|n| n == leak), "{leak} leaked: {names:?}");
    }

    // A bad name is a usage error naming the key.
    let text = std::fs::read_to_string(p.file()).unwrap();
    std::fs::write(p.file(), text.replace("BG_CLI_PASSED", "A=B")).unwrap();
    let out = p.run(&["validate"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("pass_env"), "{}", stderr(&out));
}

#[test]
fn a_failed_release_keeps_its_log_and_the_error_names_it() {
    let mut p = Pipeline::new(&format!("{FAST}readiness_timeout = 3\n"));
    // DEMO_FAIL_HEALTH reaches the program only because the file passes it.
    p.serve();
    let out = p.run(&["deploy", "v1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // v2 never becomes healthy: the deploy fails and removes green.
    let out = p
        .cmd(&["deploy", "v2"])
        .env("DEMO_FAIL_HEALTH", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    let kept = process_dir(&p).join("green.log.1");
    assert!(
        err.contains(&kept.display().to_string()),
        "the error output names the kept log: {err}"
    );
    let log = std::fs::read_to_string(&kept).unwrap();
    assert!(log.contains("deploy version=v2"), "{log}");
    assert_eq!(p.get().as_deref(), Some("v1"));
}
