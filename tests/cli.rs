//! The `bluegreen` binary end to end: a real `bluegreen serve`, real demo processes, every
//! command, `--json` parsed back, bad pipeline files, environment overrides and Ctrl-C.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{stderr, Pipeline, BIN};

#[test]
fn version_prints_the_version_and_the_features_built_in() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    let want = format!("bluegreen {} (features: ", env!("CARGO_PKG_VERSION"));
    assert!(line.starts_with(&want), "{line}");
    let features: Vec<&str> = line
        .trim_end()
        .trim_start_matches(&want)
        .trim_end_matches(')')
        .split(", ")
        .collect();
    // The test build has the features the test run enabled: the binary reports each of them and
    // nothing else (the binary needs `cli`, which brings proxy, process and http).
    let built: Vec<&str> = [
        ("proxy", cfg!(feature = "proxy")),
        ("process", cfg!(feature = "process")),
        ("docker", cfg!(feature = "docker")),
        ("nginx", cfg!(feature = "nginx")),
        ("haproxy", cfg!(feature = "haproxy")),
        ("traefik", cfg!(feature = "traefik")),
        ("postgres", cfg!(feature = "postgres")),
        ("http", cfg!(feature = "http")),
        ("cli", cfg!(feature = "cli")),
    ]
    .iter()
    .filter(|(_, on)| *on)
    .map(|(name, _)| *name)
    .collect();
    assert_eq!(features, built, "{line}");
    for needed in ["cli", "proxy", "process", "http"] {
        assert!(features.contains(&needed), "{line}");
    }
}

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
    // The run's traffic ledger, read from the served proxy's counters.
    assert!(
        text.contains("\ntraffic: ") && text.contains(" 0 dropped"),
        "{text}"
    );
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
    // Each entry's traffic ledger: measured by the proxy, nothing dropped, one summary line.
    let ledger = &h[1]["ledger"];
    assert_eq!(ledger["measured"], "measured", "{ledger}");
    for cause in ["refused", "timeouts", "app_5xx", "switch_5xx"] {
        assert_eq!(ledger[cause], 0, "{cause}: {ledger}");
    }
    assert_eq!(
        ledger["graceful_closes"], 0,
        "the proxy counts graceful closes: a measured 0 here: {ledger}"
    );
    let traffic = h[1]["traffic"].as_str().unwrap();
    assert!(traffic.contains(" requests, 0 dropped, "), "{traffic}");
    assert_eq!(st["last_deployment"]["traffic"], traffic, "{st}");
    let out = p.run(&["history"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("traffic: {traffic}")), "{text}");
    let out = p.run(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.trim_end().ends_with(traffic),
        "status ends with the summary:\n{text}"
    );

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

/// A `deploy --json` running in the background; its remaining output is read by a thread.
struct Running {
    child: Child,
    output: std::thread::JoinHandle<Vec<String>>,
}

/// Deploys `version` in the background and returns once it reports the observe phase: traffic
/// is on the new release and the run is watching it.
fn deploy_until_observing(p: &Pipeline, version: &str) -> Running {
    let mut child = p
        .cmd(&["--json", "deploy", version])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("deploy {version} ended before observing"))
            .unwrap();
        let ev: serde_json::Value = serde_json::from_str(&line).unwrap();
        if ev["event"] == "phase_started" && ev["phase"] == "observe" {
            break;
        }
    }
    let output = std::thread::spawn(move || lines.map_while(Result::ok).collect());
    Running { child, output }
}

/// Waits for a deploy started by [`deploy_until_observing`]: its exit code and result line.
fn deploy_result(mut run: Running) -> (i32, serde_json::Value) {
    let status = run.child.wait().unwrap();
    let lines = run.output.join().unwrap();
    let last = lines
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no result line: {lines:?}"));
    (status.code().unwrap_or(-1), last)
}

/// kill -9 `bluegreen serve`.
fn kill_serve(p: &mut Pipeline) {
    let mut serve = p.serve.take().expect("serve running");
    serve.kill().unwrap();
    serve.wait().unwrap();
}

#[test]
fn restarting_serve_during_observe_never_reports_a_success_that_is_not_true() {
    let mut p = Pipeline::new("[policy]\nobservation = { window = 0.5, interval = 100 }\n");
    p.serve();
    // blue holds v5, green is live on v6.
    assert!(p.run(&["deploy", "v5"]).status.success());
    assert!(p.run(&["deploy", "v6"]).status.success());
    assert_eq!(p.get().as_deref(), Some("v6"));
    let (code, st, _) = p.json(&["status"]);
    assert_eq!(code, 0, "a healthy pipeline has no drift: {st}");
    assert_eq!(st["drift"].as_array().unwrap().len(), 0, "{st}");
    // Long enough to kill and restart `serve` inside the observation window.
    let text = std::fs::read_to_string(p.file()).unwrap();
    std::fs::write(p.file(), text.replace("window = 0.5", "window = 6")).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let _rt = rt.enter();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], p.listen).into();
    let opts = || bluegreen_testenv::LoadOptions::new(2).with_pause(Duration::from_millis(5));
    let routing = p.dir.path().join(".bluegreen/proxy-routing.json");

    // v7 goes to blue on a new port. `serve` restarts with its routing file (v7), then v8 goes
    // to green and `serve` restarts without it (an older serve left none): the state has v8's
    // endpoints, recorded by the flight before the switch.
    for (version, keep_routing_file) in [("v7", true), ("v8", false)] {
        let before = bluegreen_testenv::Load::start(addr, opts());
        let deploy = deploy_until_observing(&p, version);
        let seen = rt.block_on(before.finish());
        assert_eq!(
            seen.failed, 0,
            "{version} before the kill: {:?}",
            seen.errors
        );

        kill_serve(&mut p);
        if !keep_routing_file {
            std::fs::remove_file(&routing).unwrap();
        }
        p.serve();
        // From the moment the restarted `serve` listens, every request is answered by the new
        // release.
        let after = bluegreen_testenv::Load::start(addr, opts());
        let (code, result) = deploy_result(deploy);
        std::thread::sleep(Duration::from_millis(300));
        let seen = rt.block_on(after.finish());
        assert_eq!(code, 0, "{version}: {result}");
        assert_eq!(result["status"], "live", "{result}");
        assert_eq!(
            seen.failed, 0,
            "{version} after the restart: {:?}",
            seen.errors
        );
        assert!(seen.ok > 0);
        assert_eq!(
            seen.versions.keys().collect::<Vec<_>>(),
            vec![version],
            "{version}: {seen:?}"
        );
        assert_eq!(p.get().as_deref(), Some(version));
        let (code, st, _) = p.json(&["status"]);
        assert_eq!(code, 0, "{version}: {st}");
        assert_eq!(st["drift"].as_array().unwrap().len(), 0, "{st}");
    }

    // The switch routes the live slot to endpoints that do not answer (its routing file was
    // tampered with while it was down): `status` says so and exits 6.
    kill_serve(&mut p);
    let text = std::fs::read_to_string(&routing).unwrap();
    let mut r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    r["endpoints"]["green"][0]["port"] = dead_port.into();
    std::fs::write(&routing, r.to_string()).unwrap();
    p.serve();
    let (code, st, _) = p.json(&["status"]);
    assert_eq!(code, 6, "{st}");
    assert_eq!(st["exit_code"], 6, "{st}");
    let drift = st["drift"].as_array().unwrap();
    assert!(
        drift
            .iter()
            .any(|d| d.as_str().unwrap().contains("do not answer")),
        "{st}"
    );
    let out = p.run(&["status"]);
    assert_eq!(out.status.code(), Some(6));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("drift:") && text.contains("do not answer"),
        "{text}"
    );
}

#[test]
fn deploying_the_live_version_again_is_a_no_op_and_redeploy_warns() {
    let mut p = Pipeline::new("[policy]\nobservation = { window = 0, interval = 100 }\n");
    p.serve();
    assert!(p.run(&["deploy", "v1"]).status.success());
    assert!(p.run(&["deploy", "v2"]).status.success());

    // A retried CI job: v2 is live, nothing changes, the rollback target v1 stays on blue.
    let out = p.run(&["deploy", "v2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("v2 is already live on green"), "{text}");
    let (code, v, _) = p.json(&["deploy", "v2"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["status"], "already_live");
    let (_, st, _) = p.json(&["status"]);
    assert_eq!(st["slots"]["blue"]["version"], "v1", "{st}");
    let (_, h, _) = p.json(&["history"]);
    assert_eq!(h["history"].as_array().unwrap().len(), 2, "{h}");

    // --redeploy replaces the idle slot, saying that the rollback target goes.
    let out = p.run(&["deploy", "v2", "--redeploy"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("replaces v1 on blue") && err.contains("rollback"),
        "{err}"
    );
    let (_, st, _) = p.json(&["status"]);
    assert_eq!(st["active"], "blue", "{st}");
    assert_eq!(st["slots"]["blue"]["version"], "v2", "{st}");
    assert_eq!(st["slots"]["green"]["version"], "v2", "{st}");
    assert_eq!(p.get().as_deref(), Some("v2"));
}

#[test]
fn secrets_reach_every_redeploy_and_a_readable_secret_file_is_refused() {
    let mut p = Pipeline::new(
        "[policy]\nkeep_old = \"stop\"\nobservation = { window = 0, interval = 100 }\n\n\
         [secrets]\nenv = [\"BG_CLI_TEST_TOKEN\"]\nfiles = { API_KEY = \"api_key\" }\n",
    );
    let key = p.dir.path().join("api_key");
    std::fs::write(&key, "k-123456\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.serve();
    let deploy = |args: &[&str]| {
        p.cmd(args)
            .env("BG_CLI_TEST_TOKEN", "tok-42")
            .output()
            .unwrap()
    };
    let has = |name: &str| {
        bluegreen_testenv::demo::get_at(([127, 0, 0, 1], p.listen).into(), &format!("/env/{name}"))
            .unwrap_or_default()
    };
    for args in [&["deploy", "v1"][..], &["deploy", "v2"], &["rollback"]] {
        let out = deploy(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        // v1 is started again by the rollback (its slot was stopped): with its secrets.
        assert!(has("API_KEY").contains("set (8 bytes)"), "{args:?}");
        assert!(
            has("BG_CLI_TEST_TOKEN").contains("set (6 bytes)"),
            "{args:?}"
        );
    }
    assert_eq!(p.get().as_deref(), Some("v1"));
    // Values never reach the state directory.
    for entry in std::fs::read_dir(p.dir.path().join(".bluegreen")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        assert!(
            !text.contains("k-123456") && !text.contains("tok-42"),
            "{text}"
        );
    }

    // A secret file others can read is refused, naming it; nothing is started.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = deploy(&["deploy", "v3"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("api_key") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains("k-123456"), "{err}");
    assert_eq!(p.get().as_deref(), Some("v1"));
    let (_, st, _) = p.json(&["status"]);
    assert!(st["in_flight"].is_null(), "{st}");
}
