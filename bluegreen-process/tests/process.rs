//! ProcessEnvironment against the real `bluegreen-demo` executable.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bluegreen_core::testkit::{environment_suite, EnvironmentSuite};
use bluegreen_core::{Endpoint, Environment, Error, InstanceState, Release, Slot};
use bluegreen_demo::client;
use bluegreen_process::{ProcessConfig, ProcessEnvironment, ProcessError};
use bluegreen_testenv::port::{start_on_fresh_ports_async, StartError};

/// A temporary state directory and an environment on it; every program it started is killed
/// when the test ends, whatever happened.
struct Fixture {
    env: ProcessEnvironment,
    dir: tempfile::TempDir,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.env.kill_all();
    }
}

fn fixture_with(config: impl FnOnce(ProcessConfig) -> ProcessConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let env = ProcessEnvironment::new(config(
        ProcessConfig::new(dir.path()).with_stop_timeout(Duration::from_secs(5)),
    ));
    Fixture { env, dir }
}

fn fixture() -> Fixture {
    fixture_with(|c| c)
}

fn demo(version: &str) -> Release {
    Release::new(version, bluegreen_demo::binary_path().to_string_lossy())
        .unwrap()
        // Keep knobs from the test's own environment out of the program's.
        .with_env("DEMO_EXIT_CODE", "")
        .with_env("DEMO_IGNORE_SIGTERM", "")
        .with_env("DEMO_FAIL_HEALTH", "")
        .with_env("DEMO_START_DELAY_MS", "")
}

fn addr(e: &Endpoint) -> SocketAddr {
    format!("{}:{}", e.host, e.port).parse().unwrap()
}

/// `GET path`, retried until the program listens (bounded).
async fn get(e: &Endpoint, path: &str) -> client::Response {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match client::get(addr(e), path).await {
            Ok(res) => return res,
            Err(err) if Instant::now() < deadline => {
                let _ = err;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("{e} never answered {path}: {err}"),
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    // Alive and not a zombie.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s[s.rfind(')').unwrap() + 2..].chars().next().unwrap();
            state != 'Z' && state != 'X'
        })
        .unwrap_or(false)
}

async fn wait_dead(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "pid {pid} still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn deploy_starts_the_release_with_its_slot_settings() {
    let f = fixture();
    let release = demo("v1").with_secret_env("DEMO_TOKEN", "hunter2");
    let eps = f.env.deploy(Slot::Blue, &release).await.unwrap();
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].host, "127.0.0.1");

    let res = get(&eps[0], "/").await;
    assert_eq!(
        (res.status, res.body.as_str()),
        (200, "version=v1 slot=blue\n")
    );
    assert_eq!(res.header("x-bluegreen-version"), Some("v1"));

    let st = f.env.status(Slot::Blue).await.unwrap();
    assert_eq!(st.state, InstanceState::Running);
    assert_eq!(st.version.unwrap().as_str(), "v1");
    assert_eq!(st.endpoints, eps);
    assert_eq!(
        f.env.status(Slot::Green).await.unwrap().state,
        InstanceState::Absent
    );

    // Output goes to the slot's log; secrets never reach the pid file.
    let log = read(&f.env.log_path(Slot::Blue));
    assert!(log.contains("listening on 127.0.0.1:"), "{log}");
    let pid_file = read(&f.env.pid_file(Slot::Blue));
    assert!(
        pid_file.contains("DEMO_TOKEN") && !pid_file.contains("hunter2"),
        "{pid_file}"
    );
}

#[tokio::test]
async fn the_program_leads_its_own_process_group() {
    let f = fixture();
    f.env.deploy(Slot::Blue, &demo("v1")).await.unwrap();
    let pid = f.env.pid(Slot::Blue).unwrap().unwrap() as i32;
    let pid = rustix::process::Pid::from_raw(pid).unwrap();
    let pgid = rustix::process::getpgid(Some(pid)).unwrap();
    assert_eq!(pgid, pid, "not in its own process group");
    assert_ne!(pgid, rustix::process::getpgid(None).unwrap());
}

/// Blue ran v1 and was stopped: its pid file names a process that is gone.
async fn deploy_and_stop_v1_on_blue(f: &Fixture) {
    f.env.deploy(Slot::Blue, &demo("v1")).await.unwrap();
    f.env
        .stop(Slot::Blue, Duration::from_secs(5))
        .await
        .unwrap();
}

/// What a run killed after spawning the slot's program and before writing its pid file leaves: a
/// program writing to the slot's log that no pid file names.
fn stray(f: &Fixture, slot: Slot) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(f.env.log_path(slot))
        .unwrap();
    std::process::Command::new("sleep")
        .arg("60")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn deploy_and_remove_stop_a_program_the_pid_file_does_not_name() {
    let f = fixture();
    deploy_and_stop_v1_on_blue(&f).await;
    let mut lost = stray(&f, Slot::Blue);
    f.env.deploy(Slot::Blue, &demo("v2")).await.unwrap();
    assert!(!pid_alive(lost.id()), "deploy left the stray running");
    let _ = lost.wait();

    let mut lost = stray(&f, Slot::Blue);
    let v2 = f.env.pid(Slot::Blue).unwrap().unwrap();
    f.env.remove(Slot::Blue).await.unwrap();
    assert!(!pid_alive(lost.id()), "remove left the stray running");
    assert!(!pid_alive(v2));
    let _ = lost.wait();
}

#[tokio::test]
async fn a_new_handle_sees_and_stops_the_running_slot() {
    let f = fixture();
    let eps = f.env.deploy(Slot::Green, &demo("v4")).await.unwrap();
    let pid = f.env.pid(Slot::Green).unwrap().unwrap();

    let other = ProcessEnvironment::new(ProcessConfig::new(f.dir.path()));
    let st = other.status(Slot::Green).await.unwrap();
    assert_eq!(st.state, InstanceState::Running);
    assert_eq!(st.version.unwrap().as_str(), "v4");
    assert_eq!(st.endpoints, eps);
    assert_eq!(other.pid(Slot::Green).unwrap(), Some(pid));

    other
        .stop(Slot::Green, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(!pid_alive(pid));
    for env in [&other, &f.env] {
        let st = env.status(Slot::Green).await.unwrap();
        assert_eq!(st.state, InstanceState::Stopped);
        assert!(st.endpoints.is_empty());
    }
}

#[tokio::test]
async fn stop_is_graceful_for_a_program_that_handles_sigterm() {
    let f = fixture();
    let eps = f.env.deploy(Slot::Blue, &demo("v1")).await.unwrap();
    get(&eps[0], "/health").await;
    let started = Instant::now();
    f.env
        .stop(Slot::Blue, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let log = read(&f.env.log_path(Slot::Blue));
    assert!(log.contains("stopped (SIGTERM)"), "{log}");
    assert!(!log.contains("SIGKILL"), "{log}");
    // Stopping again, and stopping an absent slot, is fine.
    f.env
        .stop(Slot::Blue, Duration::from_secs(1))
        .await
        .unwrap();
    f.env
        .stop(Slot::Green, Duration::from_secs(1))
        .await
        .unwrap();
}

#[tokio::test]
async fn stop_kills_a_program_that_ignores_sigterm_after_the_drain() {
    let f = fixture();
    let release = demo("v1").with_env("DEMO_IGNORE_SIGTERM", "1");
    let eps = f.env.deploy(Slot::Blue, &release).await.unwrap();
    get(&eps[0], "/health").await;
    let pid = f.env.pid(Slot::Blue).unwrap().unwrap();

    let drain = Duration::from_millis(700);
    let started = Instant::now();
    f.env.stop(Slot::Blue, drain).await.unwrap();
    let took = started.elapsed();
    assert!(took >= drain, "did not wait for the drain: {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(!pid_alive(pid));
    let log = read(&f.env.log_path(Slot::Blue));
    assert!(
        log.contains("ignoring SIGTERM"),
        "SIGTERM was not sent first: {log}"
    );
    assert!(log.contains("SIGKILL"), "{log}");
    assert_eq!(
        f.env.status(Slot::Blue).await.unwrap().state,
        InstanceState::Stopped
    );
}

#[tokio::test]
async fn a_program_that_exits_at_once_fails_deploy_with_its_last_log_lines() {
    let f = fixture();
    let release = demo("v2").with_env("DEMO_EXIT_CODE", "3");
    let err = f.env.deploy(Slot::Green, &release).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("bluegreen-demo"), "names the program: {msg}");
    assert!(msg.contains("slot green"), "names the slot: {msg}");
    assert!(msg.contains("exit code 3"), "{msg}");
    assert!(msg.contains("DEMO_EXIT_CODE"), "quotes the log: {msg}");
    assert!(!err.is_retryable());
    match &err {
        Error::Backend {
            backend,
            operation,
            source,
            ..
        } => {
            assert_eq!(
                (backend.as_str(), operation.as_str()),
                ("process", "deploy")
            );
            assert!(matches!(
                source.downcast_ref::<ProcessError>(),
                Some(ProcessError::ExitedAtStart { .. })
            ));
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
    let st = f.env.status(Slot::Green).await.unwrap();
    assert_eq!(st.state, InstanceState::Exited);
    assert_eq!(st.exit_code, Some(3));
}

#[tokio::test]
async fn a_missing_program_fails_deploy_naming_it() {
    let f = fixture();
    let release = Release::new("v1", "/nonexistent/bluegreen-app").unwrap();
    let err = f.env.deploy(Slot::Blue, &release).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("/nonexistent/bluegreen-app") && msg.contains("slot blue"),
        "{msg}"
    );
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");

    let empty = Release::new("v1", " ").unwrap();
    assert!(matches!(
        f.env.deploy(Slot::Blue, &empty).await,
        Err(Error::InvalidInput { .. })
    ));
}

#[tokio::test]
async fn exec_runs_argv_with_the_slot_environment() {
    let f = fixture();
    let release = demo("v5")
        .with_env("APP_MODE", "migrate")
        .with_secret_env("DB_PASSWORD", "s3cret");
    let eps = f.env.deploy(Slot::Blue, &release).await.unwrap();

    let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let out = f
        .env
        .exec(
            Slot::Blue,
            &argv(&[
                "printenv",
                "PORT",
                "BLUEGREEN_SLOT",
                "BLUEGREEN_VERSION",
                "APP_MODE",
                "DB_PASSWORD",
            ]),
        )
        .await
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(
        out.stdout,
        format!("{}\nblue\nv5\nmigrate\ns3cret\n", eps[0].port)
    );

    let out = f.env.exec(Slot::Blue, &argv(&["false"])).await.unwrap();
    assert_eq!(out.code, Some(1));
    let out = f
        .env
        .exec(Slot::Blue, &argv(&["ls", "/nonexistent-dir"]))
        .await
        .unwrap();
    assert!(!out.success() && !out.stderr.is_empty(), "{out:?}");

    // No shell: metacharacters are plain arguments.
    let out = f
        .env
        .exec(Slot::Blue, &argv(&["echo", "$PORT;", "&&", "id"]))
        .await
        .unwrap();
    assert_eq!(out.stdout, "$PORT; && id\n");

    assert!(matches!(
        f.env.exec(Slot::Blue, &[]).await,
        Err(Error::InvalidInput { .. })
    ));
    let err = f.env.exec(Slot::Green, &argv(&["true"])).await.unwrap_err();
    assert!(
        err.to_string().contains("slot green has nothing deployed"),
        "{err}"
    );
}

#[tokio::test]
async fn exec_is_bounded() {
    let f = fixture_with(|c| c.with_exec_timeout(Duration::from_millis(300)));
    f.env.deploy(Slot::Blue, &demo("v1")).await.unwrap();
    let started = Instant::now();
    let err = f
        .env
        .exec(Slot::Blue, &["sleep".to_string(), "20".to_string()])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn slots_are_independent() {
    let f = fixture();
    let blue = f.env.deploy(Slot::Blue, &demo("v1")).await.unwrap();
    let green = f.env.deploy(Slot::Green, &demo("v2")).await.unwrap();
    assert_ne!(blue[0].port, green[0].port);
    assert_eq!(get(&blue[0], "/").await.body, "version=v1 slot=blue\n");
    assert_eq!(get(&green[0], "/").await.body, "version=v2 slot=green\n");

    f.env
        .stop(Slot::Blue, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        f.env.status(Slot::Blue).await.unwrap().state,
        InstanceState::Stopped
    );
    assert_eq!(get(&green[0], "/").await.body, "version=v2 slot=green\n");
    f.env.remove(Slot::Blue).await.unwrap();
    let st = f.env.status(Slot::Green).await.unwrap();
    assert_eq!(st.state, InstanceState::Running);
}

#[tokio::test]
async fn deploying_again_replaces_and_the_same_release_is_kept() {
    // A fixed port: the program cannot report it, so it is chosen fresh and the first deploy is
    // retried on another one if something else took it meanwhile.
    let (f, first) = start_on_fresh_ports_async(|[port]| async move {
        let f = fixture_with(|c| c.with_port(Slot::Blue, port));
        match f.env.deploy(Slot::Blue, &demo("v1")).await {
            Ok(first) => Ok((f, first)),
            Err(e) => Err(StartError::from_log(
                "deploy on a fixed port",
                &e.to_string(),
            )),
        }
    })
    .await
    .unwrap();
    let pid1 = f.env.pid(Slot::Blue).unwrap().unwrap();
    get(&first[0], "/health").await;

    // The same release: nothing restarts.
    let again = f.env.deploy(Slot::Blue, &demo("v1")).await.unwrap();
    assert_eq!(again, first);
    assert_eq!(f.env.pid(Slot::Blue).unwrap(), Some(pid1));

    // A new release on the same fixed port: the old program is stopped first.
    let second = f.env.deploy(Slot::Blue, &demo("v2")).await.unwrap();
    assert_eq!(second, first);
    let pid2 = f.env.pid(Slot::Blue).unwrap().unwrap();
    assert_ne!(pid1, pid2);
    wait_dead(pid1).await;
    assert_eq!(get(&second[0], "/").await.body, "version=v2 slot=blue\n");
    assert_eq!(
        f.env
            .status(Slot::Blue)
            .await
            .unwrap()
            .version
            .unwrap()
            .as_str(),
        "v2"
    );
}

#[tokio::test]
async fn remove_stops_deletes_the_pid_file_and_keeps_the_log_rotated() {
    let f = fixture();
    f.env.deploy(Slot::Blue, &demo("v1")).await.unwrap();
    let pid = f.env.pid(Slot::Blue).unwrap().unwrap();
    assert!(f.env.pid_file(Slot::Blue).exists() && f.env.log_path(Slot::Blue).exists());
    f.env.remove(Slot::Blue).await.unwrap();
    assert!(!pid_alive(pid));
    assert!(!f.env.pid_file(Slot::Blue).exists());
    assert!(!f.env.log_path(Slot::Blue).exists());
    // The removed release's output is what an operator reads after a rollback: kept.
    let kept = f.dir.path().join("blue.log.1");
    assert_eq!(f.env.log_paths(Slot::Blue), vec![kept.clone()]);
    assert!(read(&kept).contains("deploy version=v1"), "{}", read(&kept));
    assert_eq!(
        f.env.status(Slot::Blue).await.unwrap().state,
        InstanceState::Absent
    );
    assert_eq!(f.env.logs(Slot::Blue, None).await.unwrap(), "");
    f.env.remove(Slot::Blue).await.unwrap();
}

#[tokio::test]
async fn logs_filter_by_time_through_markers() {
    let f = fixture();
    let eps = f.env.deploy(Slot::Blue, &demo("v1")).await.unwrap();
    get(&eps[0], "/health").await;
    // Markers are matched with a second of slack.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let between = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    f.env
        .stop(Slot::Blue, Duration::from_secs(5))
        .await
        .unwrap();

    let all = f.env.logs(Slot::Blue, None).await.unwrap();
    assert!(
        all.contains("deploy version=v1") && all.contains("listening"),
        "{all}"
    );
    let recent = f.env.logs(Slot::Blue, Some(between)).await.unwrap();
    assert!(recent.contains("stopped (SIGTERM)"), "{recent}");
    assert!(!recent.contains("deploy version=v1"), "{recent}");
    let future = SystemTime::now() + Duration::from_secs(3600);
    assert_eq!(f.env.logs(Slot::Blue, Some(future)).await.unwrap(), "");
}

#[tokio::test]
async fn a_reused_pid_is_not_taken_for_the_slot_program() {
    let f = fixture();
    deploy_and_stop_v1_on_blue(&f).await;

    // A stranger process now "has the pid" the pid file names, with another start time.
    let mut stranger = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    struct Reap<'a>(&'a mut std::process::Child);
    impl Drop for Reap<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stranger = Reap(&mut stranger);
    let path = f.env.pid_file(Slot::Blue);
    let mut rec: serde_json::Value = serde_json::from_str(&read(&path)).unwrap();
    rec["pid"] = stranger.0.id().into();
    rec["stop_requested"] = false.into();
    std::fs::write(&path, rec.to_string()).unwrap();

    let st = f.env.status(Slot::Blue).await.unwrap();
    assert_eq!(
        st.state,
        InstanceState::Exited,
        "a reused pid counted as running"
    );
    f.env
        .stop(Slot::Blue, Duration::from_millis(100))
        .await
        .unwrap();
    f.env.remove(Slot::Blue).await.unwrap();
    assert!(pid_alive(stranger.0.id()), "the stranger was signalled");
}

#[tokio::test]
async fn passes_the_environment_conformance_suite() {
    let f = fixture();
    let suite = EnvironmentSuite {
        release: Arc::new(demo),
        ready_timeout: Duration::from_secs(15),
        exec_argv: Some(vec!["true".to_string()]),
    };
    environment_suite(&f.env, &suite).await.assert_complete();
    // And through a trait object, as the engine holds it.
    let boxed: Box<dyn Environment> = Box::new(f.env.clone());
    environment_suite(boxed.as_ref(), &suite)
        .await
        .assert_complete();
}

/// Run by `a_later_process_sees_the_slot_of_one_that_exited` in a child process: deploys to the
/// directory it is given and exits, as a CLI invocation would.
#[tokio::test]
#[ignore = "helper run in a separate process by another test"]
async fn helper_deploy_and_exit() {
    let dir = std::env::var("BLUEGREEN_PROCESS_TEST_DIR").expect("run by another test");
    let env = ProcessEnvironment::new(ProcessConfig::new(dir));
    env.deploy(Slot::Green, &demo("v8")).await.unwrap();
}

#[tokio::test]
async fn a_later_process_sees_the_slot_of_one_that_exited() {
    let f = fixture();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["helper_deploy_and_exit", "--exact", "--ignored", "--quiet"])
        .env("BLUEGREEN_PROCESS_TEST_DIR", f.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "helper failed: {out:?}");

    // The deploying process is gone; its program is not.
    let st = f.env.status(Slot::Green).await.unwrap();
    assert_eq!(st.state, InstanceState::Running);
    assert_eq!(st.version.unwrap().as_str(), "v8");
    let res = get(&st.endpoints[0], "/").await;
    assert_eq!(res.body, "version=v8 slot=green\n");
    let pid = f.env.pid(Slot::Green).unwrap().unwrap();

    f.env
        .stop(Slot::Green, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(!pid_alive(pid));
    assert_eq!(
        f.env.status(Slot::Green).await.unwrap().state,
        InstanceState::Stopped
    );
}

#[tokio::test]
async fn each_release_gets_a_fresh_log_and_the_last_few_are_kept() {
    let f = fixture_with(|c| c.with_keep_logs(2));
    for v in ["v1", "v2", "v3", "v4"] {
        f.env.deploy(Slot::Green, &demo(v)).await.unwrap();
    }
    let logs = f.env.log_paths(Slot::Green);
    let names: Vec<_> = logs
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["green.log", "green.log.1", "green.log.2"]);
    // Newest first: each file holds one release.
    for (path, v) in logs.iter().zip(["v4", "v3", "v2"]) {
        let text = read(path);
        assert!(text.contains(&format!("deploy version={v}")), "{text}");
        assert_eq!(text.matches("deploy version=").count(), 1, "{text}");
    }
    // The other slot's logs are its own.
    assert!(f.env.log_paths(Slot::Blue).is_empty());

    // keep_logs = 0 keeps nothing.
    let g = fixture_with(|c| c.with_keep_logs(0));
    g.env.deploy(Slot::Blue, &demo("v1")).await.unwrap();
    g.env.remove(Slot::Blue).await.unwrap();
    assert!(g.env.log_paths(Slot::Blue).is_empty());
}

/// The program's environment as the kernel has it (`/proc/<pid>/environ`).
fn environ_of(pid: u32) -> std::collections::BTreeMap<String, String> {
    let bytes = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    bytes
        .split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// Run by `programs_get_a_clean_environment_plus_what_is_passed` in a child process whose
/// environment holds `BG_TEST_PASSED` and `BG_TEST_CI_TOKEN`.
#[tokio::test]
#[ignore = "helper run in a separate process by another test"]
async fn helper_deploy_with_a_clean_environment() {
    let dir = std::env::var("BLUEGREEN_PROCESS_TEST_DIR").expect("run by another test");
    let inherit = std::env::var("BG_TEST_INHERIT").is_ok();
    let env = ProcessEnvironment::new(
        ProcessConfig::new(dir)
            .with_pass_env("BG_TEST_PASSED")
            .with_pass_env("BG_TEST_NOT_SET")
            .with_env("FROM_CONFIG", "c")
            .with_inherit_env(inherit),
    );
    let release = demo("v1").with_secret_env("APP_SECRET", "from-release");
    env.deploy(Slot::Blue, &release).await.unwrap();
}

#[tokio::test]
async fn programs_get_a_clean_environment_plus_what_is_passed() {
    for inherit in [false, true] {
        let f = fixture();
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "helper_deploy_with_a_clean_environment",
            "--exact",
            "--ignored",
            "--quiet",
        ])
        .env("BLUEGREEN_PROCESS_TEST_DIR", f.dir.path())
        .env("BG_TEST_PASSED", "passed")
        .env("BG_TEST_CI_TOKEN", "do-not-leak")
        .env("PGPASSWORD", "do-not-leak-either")
        .env("LANG", "C.UTF-8")
        .env_remove("BG_TEST_NOT_SET");
        if inherit {
            cmd.env("BG_TEST_INHERIT", "1");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "helper failed: {out:?}");
        let pid = f.env.pid(Slot::Blue).unwrap().unwrap();
        let env = environ_of(pid);
        let get = |k: &str| env.get(k).map(String::as_str);
        // What every program gets, and what the release and config say.
        assert_eq!(get("PATH"), std::env::var("PATH").ok().as_deref());
        assert_eq!(get("LANG"), Some("C.UTF-8"));
        assert_eq!(get("BG_TEST_PASSED"), Some("passed"));
        assert_eq!(get("FROM_CONFIG"), Some("c"));
        assert_eq!(get("APP_SECRET"), Some("from-release"));
        assert_eq!(get("BLUEGREEN_SLOT"), Some("blue"));
        assert!(get("PORT").is_some() && get("HOST").is_some());
        assert_eq!(get("BG_TEST_NOT_SET"), None);
        if inherit {
            // The explicit opt-in inherits everything.
            assert_eq!(get("BG_TEST_CI_TOKEN"), Some("do-not-leak"));
        } else {
            // Nothing else of the deploying process reaches the program.
            assert_eq!(get("BG_TEST_CI_TOKEN"), None);
            assert_eq!(get("PGPASSWORD"), None);
            assert_eq!(get("BLUEGREEN_PROCESS_TEST_DIR"), None);
            let names: Vec<_> = env.keys().map(String::as_str).collect();
            for k in &names {
                assert!(
                    [
                        "PATH",
                        "HOME",
                        "LANG",
                        "TZ",
                        "BG_TEST_PASSED",
                        "FROM_CONFIG",
                        "APP_SECRET",
                        "PORT",
                        "HOST",
                        "BLUEGREEN_SLOT",
                        "BLUEGREEN_VERSION",
                    ]
                    .contains(k)
                        || k.starts_with("DEMO_"),
                    "unexpected variable {k} in {names:?}"
                );
            }
        }
    }
}
