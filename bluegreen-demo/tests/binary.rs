//! The `bluegreen-demo` executable: environment variables, knobs and signals.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bluegreen_demo::client;
use rustix::process::{kill_process, Pid, Signal};

const EXE: &str = env!("CARGO_BIN_EXE_bluegreen-demo");

/// Kills the child when the test ends, whatever happened.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The address in the demo's start line (`… listening on 127.0.0.1:<port> …`): it binds port 0
/// and reports the port it got.
fn listening_addr(line: &str) -> SocketAddr {
    line.split_whitespace()
        .skip_while(|w| *w != "on")
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in the start line: {line}"))
}

fn demo(port: u16, extra: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(EXE);
    cmd.env("PORT", port.to_string())
        .env("HOST", "127.0.0.1")
        .env("BLUEGREEN_VERSION", "v9")
        .env("BLUEGREEN_SLOT", "green")
        .env_remove("VERSION")
        .env_remove("DEMO_FAIL_HEALTH")
        .env_remove("DEMO_START_DELAY_MS")
        .env_remove("DEMO_ERROR_RATE")
        .env_remove("DEMO_EXIT_CODE")
        .env_remove("DEMO_IGNORE_SIGTERM")
        .env_remove("DEMO_DRAIN_MS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

/// Waits (bounded) for the first stdout line, the "listening" line.
fn first_line(child: &mut Child) -> String {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        while let Some(Ok(line)) = lines.next() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("no start line from bluegreen-demo");
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    line
}

fn sigterm(child: &Child) {
    kill_process(Pid::from_raw(child.id() as i32).unwrap(), Signal::TERM).unwrap();
}

fn wait_bounded(child: &mut Child, bound: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "bluegreen-demo still running after {bound:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn serves_with_env_settings_and_exits_0_on_sigterm() {
    let mut child = Guard(demo(0, &[]).spawn().unwrap());
    let line = first_line(&mut child.0);
    assert!(
        line.contains("listening on 127.0.0.1:") && line.contains("version=v9 slot=green"),
        "{line}"
    );
    let addr = listening_addr(&line);
    let res = client::get(addr, "/").await.unwrap();
    assert_eq!(
        (res.status, res.body.as_str()),
        (200, "version=v9 slot=green\n")
    );
    assert_eq!(res.header("x-bluegreen-version"), Some("v9"));

    // An in-flight request started before SIGTERM still completes.
    let slow = tokio::spawn(async move { client::get(addr, "/slow?ms=800").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    sigterm(&child.0);
    let res = slow.await.unwrap().unwrap();
    assert_eq!(res.status, 200);
    let status = wait_bounded(&mut child.0, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn version_falls_back_to_version_and_health_can_fail() {
    let mut cmd = demo(0, &[("VERSION", "1.2.3"), ("DEMO_FAIL_HEALTH", "1")]);
    cmd.env_remove("BLUEGREEN_VERSION");
    let mut child = Guard(cmd.spawn().unwrap());
    let addr = listening_addr(&first_line(&mut child.0));
    let res = client::get(addr, "/health").await.unwrap();
    assert_eq!(res.status, 503);
    assert_eq!(res.header("x-bluegreen-version"), Some("1.2.3"));
}

#[test]
fn exit_code_knob_exits_at_once_with_a_message() {
    let mut child = Guard(demo(0, &[("DEMO_EXIT_CODE", "7")]).spawn().unwrap());
    let status = wait_bounded(&mut child.0, Duration::from_secs(10));
    assert_eq!(status.code(), Some(7));
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("DEMO_EXIT_CODE") && err.contains('7'), "{err}");
}

#[tokio::test]
async fn start_delay_postpones_listening() {
    let started = Instant::now();
    let mut child = Guard(demo(0, &[("DEMO_START_DELAY_MS", "600")]).spawn().unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Port 0: "not listening yet" is read from the process's own sockets.
    let held = bluegreen_testenv::port::listening_ports(child.0.id());
    assert!(held.is_empty(), "listening before the delay: {held:?}");
    let addr = listening_addr(&first_line(&mut child.0));
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert_eq!(client::get(addr, "/health").await.unwrap().status, 200);
}

#[test]
fn sigterm_during_start_delay_exits_0() {
    let mut child = Guard(
        demo(0, &[("DEMO_START_DELAY_MS", "30000")])
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    sigterm(&child.0);
    let status = wait_bounded(&mut child.0, Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn invalid_settings_exit_2_naming_the_variable() {
    let mut child = Guard(demo(0, &[("DEMO_ERROR_RATE", "lots")]).spawn().unwrap());
    let status = wait_bounded(&mut child.0, Duration::from_secs(10));
    assert_eq!(status.code(), Some(2));
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("DEMO_ERROR_RATE"), "{err}");
}

#[test]
fn binary_path_finds_the_built_executable() {
    let path = bluegreen_demo::binary_path();
    assert!(path.is_file(), "{}", path.display());
    assert!(path.ends_with("bluegreen-demo"));
}

#[tokio::test]
async fn ignore_sigterm_knob_keeps_serving_until_sigint() {
    let mut child = Guard(demo(0, &[("DEMO_IGNORE_SIGTERM", "1")]).spawn().unwrap());
    let addr = listening_addr(&first_line(&mut child.0));
    sigterm(&child.0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(child.0.try_wait().unwrap().is_none(), "exited on SIGTERM");
    assert_eq!(client::get(addr, "/").await.unwrap().status, 200);
    kill_process(Pid::from_raw(child.0.id() as i32).unwrap(), Signal::INT).unwrap();
    let status = wait_bounded(&mut child.0, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn stop_after_init_stands_in_for_a_module_update_and_exits_0() {
    let out = demo(0, &[])
        .args(["-u", "sale,stock", "--stop-after-init"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("version=v9: updated modules sale,stock"),
        "{stdout}"
    );

    let out = demo(0, &[]).arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
}
