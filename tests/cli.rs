//! The `bluegreen` binary end to end: a real `bluegreen serve`, real demo processes, every
//! command, `--json` parsed back, bad pipeline files, environment overrides and Ctrl-C.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{stderr, Pipeline, BIN};

#[test]
fn every_command_end_to_end_with_json_output() {
    let mut p = Pipeline::new("[policy]\nobservation = { window = 0.5, interval = 100 }\n");
    p.serve();

    let (code, v, events) = p.json(&["deploy", "v1"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["result"], "ok");
    assert_eq!(v["status"], "live");
    assert_eq!(v["slot"], "blue");
    assert!(
        events.iter().any(|e| e["event"] == "switched"),
        "{events:?}"
    );
    assert_eq!(p.get().as_deref(), Some("v1"));

    let out = p.run(&["deploy", "v2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("deploy v2 is live on green"), "{text}");
    assert_eq!(p.get().as_deref(), Some("v2"));

    let (code, st, _) = p.json(&["status"]);
    assert_eq!(code, 0);
    assert_eq!(st["active"], "green");
    assert_eq!(st["slots"]["blue"]["version"], "v1");
    assert_eq!(st["slots"]["green"]["state"], "running");
    assert!(st["in_flight"].is_null() && st["lock"].is_null());

    let (_, h, _) = p.json(&["history"]);
    let h = h["history"].as_array().unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[1]["version"], "v2");

    let (code, plan, _) = p.json(&["plan", "v3"]);
    assert_eq!(code, 0);
    assert_eq!(plan["target"], "blue");
    assert!(plan["steps"].as_array().unwrap().len() >= 5);

    let (code, val, _) = p.json(&["validate"]);
    assert_eq!(code, 0, "{val}");

    let (code, r, _) = p.json(&["rollback"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["kind"], "rollback");
    assert_eq!(p.get().as_deref(), Some("v1"));

    // Nothing is waiting: promote and abort are usage errors.
    let (code, e, _) = p.json(&["promote"]);
    assert_eq!(code, 2, "{e}");
    let (code, _, _) = p.json(&["abort"]);
    assert_eq!(code, 2);

    let (code, c, _) = p.json(&["cleanup"]);
    assert_eq!(code, 0);
    assert_eq!(c["removed"], "green");

    let (code, b, _) = p.json(&["break-lock"]);
    assert_eq!(code, 0);
    assert!(b["removed"].is_null());

    let out = p.run(&["reset"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, st, _) = p.json(&["status"]);
    assert_eq!(st["slots"]["blue"]["state"], "absent");
}

#[test]
fn a_manual_gate_exits_4_and_promote_continues() {
    let mut p = Pipeline::new(
        "[policy]\npromotion = \"manual\"\nobservation = { window = 0, interval = 100 }\n",
    );
    p.serve();
    assert!(p.run(&["deploy", "v1"]).status.success());
    let (code, v, _) = p.json(&["deploy", "v2"]);
    assert_eq!(code, 4, "{v}");
    assert_eq!(v["status"], "waiting");
    assert_eq!(p.get().as_deref(), Some("v1"));
    // Another deploy is refused while one waits.
    let (code, _, _) = p.json(&["deploy", "v3"]);
    assert_eq!(code, 3);
    let (code, v, _) = p.json(&["promote"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(p.get().as_deref(), Some("v2"));
}

#[test]
fn bad_pipeline_files_name_the_file_line_and_key() {
    let p = Pipeline::new("[policy]\nreadiness_timout = 5\n");
    let out = p.run(&["status"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("bluegreen.toml"), "{err}");
    assert!(err.contains("readiness_timout"), "{err}");
    assert!(err.contains("line"), "{err}");

    let p = Pipeline::new("");
    let text = std::fs::read_to_string(p.file()).unwrap();
    std::fs::write(
        p.file(),
        text.replace("kind = \"proxy\"", "kind = \"squid\""),
    )
    .unwrap();
    let out = p.run(&["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("squid"), "{}", stderr(&out));

    let p = Pipeline::new("");
    let text = std::fs::read_to_string(p.file()).unwrap();
    std::fs::write(
        p.file(),
        text.replace("name = \"cli-test\"", "name = \"bad name;\""),
    )
    .unwrap();
    let out = p.run(&["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not allowed"), "{}", stderr(&out));

    let out = Command::new(BIN)
        .args(["--file", "/nonexistent/bluegreen.toml", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("/nonexistent/bluegreen.toml"));

    // JSON errors are JSON too.
    let p = Pipeline::new("[policy]\nrise = 0\n");
    let (code, v, _) = p.json(&["status"]);
    assert_eq!(code, 2);
    assert_eq!(v["result"], "error");
    assert!(v["error"].as_str().unwrap().contains("rise"), "{v}");
}

#[test]
fn runbook_environment_overrides_apply_and_are_validated() {
    let mut p = Pipeline::new("");
    p.serve();
    // No proxy route yet is fine: a bad value is refused before anything runs.
    let out = p
        .cmd(&["deploy", "v1"])
        .env("HEALTH_CHECK_TIMEOUT", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("HEALTH_CHECK_TIMEOUT"),
        "{}",
        stderr(&out)
    );

    // A release that never gets healthy fails after HEALTH_CHECK_TIMEOUT, not the default 300 s.
    let t = Instant::now();
    let out = p
        .cmd(&["deploy", "v1"])
        .env("HEALTH_CHECK_TIMEOUT", "2s")
        .env("HEALTH_CHECK_INTERVAL", "200ms")
        .env("DEMO_FAIL_HEALTH", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(60));
    let err = stderr(&out);
    assert!(err.contains("wait_ready") && err.contains("2s"), "{err}");
}

#[test]
fn ctrl_c_during_a_deploy_stops_at_a_safe_point_and_leaves_a_consistent_state() {
    let mut p = Pipeline::new(
        "[policy]\nreadiness_timeout = 120\nobservation = { window = 0, interval = 100 }\n",
    );
    p.serve();
    assert!(p.run(&["deploy", "v1"]).status.success());

    // v2 takes 60 s to start listening: the deploy sits in wait_ready.
    let mut child = p
        .cmd(&["deploy", "v2"])
        .env("DEMO_START_DELAY_MS", "60000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("deploy v2"), "{first}");
    // Wait until the target is deployed (its log exists), then interrupt.
    let log = p.dir.path().join(".bluegreen/process/green.log");
    let start = Instant::now();
    while !Path::new(&log).exists() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let status = child.wait().unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(status.code(), Some(130), "stdout: {rest:?}");

    let (_, st, _) = p.json(&["status"]);
    assert_eq!(st["active"], "blue", "{st}");
    assert!(st["in_flight"].is_null(), "{st}");
    assert!(st["lock"].is_null(), "{st}");
    assert_eq!(st["slots"]["green"]["state"], "absent", "{st}");
    assert_eq!(p.get().as_deref(), Some("v1"));
    let (_, h, _) = p.json(&["history"]);
    let last = h["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["outcome"]["result"], "failed", "{last}");
    assert!(
        last["outcome"]["reason"]
            .as_str()
            .unwrap()
            .contains("interrupted"),
        "{last}"
    );
}
