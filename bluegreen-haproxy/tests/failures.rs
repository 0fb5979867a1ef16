//! What the caller sees, and what is left in HAProxy, when a switch fails.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bluegreen_core::{Endpoint, Endpoints, Error, Slot, TrafficSplit, TrafficSwitch};
use bluegreen_demo::{DemoConfig, DemoServer};
use bluegreen_haproxy::{HaproxyConfig, HaproxyError, HaproxySwitch};
use common::{client, haproxy_available, haproxy_error, served_by, Demos, Haproxy};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_socket_is_a_connect_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such.sock");
    let switch = HaproxySwitch::new(HaproxyConfig::unix(&path)).unwrap();
    let eps = Endpoints::new(vec![Endpoint::new("127.0.0.1", 8080)], vec![]);
    let e = switch
        .apply(&TrafficSplit::all(Slot::Blue), &eps)
        .await
        .unwrap_err();
    assert!(
        matches!(haproxy_error(&e), HaproxyError::Connect { .. }),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains(path.to_str().unwrap()), "{msg}");
    assert!(msg.contains("is HAProxy running"), "{msg}");
    assert!(e.is_retryable());
    let e = switch.current().await.unwrap_err();
    assert!(
        matches!(haproxy_error(&e), HaproxyError::Connect { .. }),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_not_running_is_a_connect_error_and_changes_nothing() {
    if !haproxy_available("failures") {
        return;
    }
    let mut h = Haproxy::start();
    let demos = Demos::start().await;
    let switch = h.switch();
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &demos.endpoints())
        .await
        .unwrap();
    h.kill();
    // The socket file is still there; nobody listens.
    assert!(h.admin_sock.exists());
    let e = switch
        .apply(&TrafficSplit::all(Slot::Green), &demos.endpoints())
        .await
        .unwrap_err();
    let inner = haproxy_error(&e);
    assert!(
        matches!(inner, HaproxyError::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused),
        "{e}"
    );
    assert!(e.to_string().contains("admin.sock"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_backend_or_server_names_are_typed_errors() {
    if !haproxy_available("failures") {
        return;
    }
    let h = Haproxy::start();
    let demos = Demos::start().await;
    let switch = HaproxySwitch::new(h.config.clone().with_servers("blue", "nosuch")).unwrap();
    let e = switch
        .apply(&TrafficSplit::all(Slot::Blue), &demos.endpoints())
        .await
        .unwrap_err();
    assert!(
        matches!(haproxy_error(&e), HaproxyError::NoSuchServer { server, backend } if server == "nosuch" && backend == "app"),
        "{e}"
    );
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("app/nosuch"), "{e}");
    let e = switch.current().await.unwrap_err();
    assert!(
        matches!(haproxy_error(&e), HaproxyError::NoSuchServer { .. }),
        "{e}"
    );

    let switch = HaproxySwitch::new(h.config.clone().with_backend("web")).unwrap();
    let e = switch.current().await.unwrap_err();
    assert!(
        matches!(haproxy_error(&e), HaproxyError::NoSuchBackend { backend } if backend == "web"),
        "{e}"
    );
    // Nothing was changed by the refused calls.
    assert_eq!(h.switch().current().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injection_names_are_refused_before_anything_is_sent() {
    // A socket that records every connection: none may be made.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let connections = Arc::new(Mutex::new(0u32));
    let counted = connections.clone();
    let task = tokio::spawn(async move {
        while let Ok((_s, _)) = listener.accept().await {
            *counted.lock().unwrap() += 1;
        }
    });
    let hostile = [
        "app;shutdown frontend fe",
        "app\nshutdown frontend fe",
        "app\r\nset server app/blue state maint",
        "app blue",
        "app\tblue",
        "app\u{0}",
        "app\u{7}",
        "app/blue",
        "",
    ];
    for bad in hostile {
        for config in [
            HaproxyConfig::unix(&path).with_backend(bad),
            HaproxyConfig::unix(&path).with_servers(bad, "green"),
            HaproxyConfig::unix(&path).with_servers("blue", bad),
        ] {
            let e = HaproxySwitch::new(config).unwrap_err();
            assert!(matches!(e, Error::InvalidInput { .. }), "{bad:?}: {e}");
        }
    }
    for bad in [
        "show info;shutdown frontend fe",
        "show info\nshutdown frontend fe",
    ] {
        let e = bluegreen_haproxy::Command::raw(bad).unwrap_err();
        assert!(matches!(e, HaproxyError::InvalidCommand { .. }), "{e}");
    }
    // Hostile endpoint hosts are refused by apply before any connection too.
    let switch = HaproxySwitch::new(HaproxyConfig::unix(&path)).unwrap();
    let eps = Endpoints::new(
        vec![Endpoint::new("127.0.0.1;shutdown frontend fe", 80)],
        vec![],
    );
    let e = switch
        .apply(&TrafficSplit::all(Slot::Blue), &eps)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    // So are shapes this switch cannot drive: more endpoints for one slot than its pool has
    // servers (the error names the pool size and how to raise it), https servers.
    let five = Endpoints::new(
        (8001..=8005)
            .map(|p| Endpoint::new("127.0.0.1", p))
            .collect(),
        vec![],
    );
    let e = switch
        .apply(&TrafficSplit::all(Slot::Blue), &five)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("5 endpoints for blue")
            && msg.contains("pool of 4 servers")
            && msg.contains("raise pool_size to at least 5"),
        "{msg}"
    );
    let mut tls = Endpoint::new("127.0.0.1", 8443);
    tls.scheme = "https".into();
    let e = switch
        .apply(
            &TrafficSplit::all(Slot::Blue),
            &Endpoints::new(vec![tls], vec![]),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(*connections.lock().unwrap(), 0);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_target_is_refused_and_the_previous_state_restored() {
    if !haproxy_available("failures") {
        return;
    }
    let h = Haproxy::start();
    let demos = Demos::start().await;
    let mut config = h.config.clone();
    config.ready_timeout = Duration::from_secs(2);
    let switch = HaproxySwitch::new(config).unwrap();
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &demos.endpoints())
        .await
        .unwrap();
    let sick = DemoServer::start(DemoConfig::new("v3", "green").with_fail_health(true))
        .await
        .unwrap();
    let mut eps = demos.endpoints();
    eps.green = vec![Endpoint::new("127.0.0.1", sick.local_addr().port())];
    let e = switch
        .apply(&TrafficSplit::all(Slot::Green), &eps)
        .await
        .unwrap_err();
    let msg = e.to_string();
    eprintln!("the caller sees: {msg}");
    match haproxy_error(&e) {
        HaproxyError::SwitchFailed {
            step,
            command,
            source,
            outcome,
            ..
        } => {
            assert_eq!(step, "1/3", "{msg}");
            assert_eq!(command, "wait for the health check", "{msg}");
            assert!(matches!(**source, HaproxyError::NotReady { .. }), "{msg}");
            assert!(outcome.starts_with("restored the previous state"), "{msg}");
            assert!(outcome.contains("green: maint"), "{msg}");
        }
        other => panic!("{other}"),
    }
    assert!(msg.contains("app/green"), "{msg}");
    // Live traffic never left blue.
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );
    let c = client();
    for _ in 0..5 {
        assert_eq!(served_by(&c, &h.url("/")).await.unwrap(), Slot::Blue);
    }
    let s = switch.servers().await.unwrap();
    assert!(s.green.is_maint(), "{}", s.green.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_killed_in_the_middle_of_a_switch_is_reported_with_the_step() {
    if !haproxy_available("failures") {
        return;
    }
    let mut h = Haproxy::start();
    let demos = Demos::start().await;
    let switch = h.switch();
    switch
        .apply(&TrafficSplit::all(Slot::Blue), &demos.endpoints())
        .await
        .unwrap();
    // Green never passes its check, so apply sits in step 1 while HAProxy is killed.
    let sick = DemoServer::start(DemoConfig::new("v3", "green").with_fail_health(true))
        .await
        .unwrap();
    let mut eps = demos.endpoints();
    eps.green = vec![Endpoint::new("127.0.0.1", sick.local_addr().port())];
    let running = {
        let (switch, eps) = (switch.clone(), eps.clone());
        tokio::spawn(async move { switch.apply(&TrafficSplit::all(Slot::Green), &eps).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.kill();
    let e = running.await.unwrap().unwrap_err();
    let msg = e.to_string();
    eprintln!("the caller sees: {msg}");
    match haproxy_error(&e) {
        HaproxyError::SwitchFailed {
            step,
            command,
            source,
            outcome,
            ..
        } => {
            assert_eq!(step, "1/3", "{msg}");
            assert_eq!(command, "wait for the health check", "{msg}");
            // Refused at the next poll, or reset during one.
            assert!(
                matches!(
                    **source,
                    HaproxyError::Connect { .. } | HaproxyError::Io { .. }
                ),
                "{msg}"
            );
            assert!(
                outcome.contains("restoring the previous state failed"),
                "{msg}"
            );
            // The last known state is reported: blue was serving, green in maintenance.
            assert!(outcome.contains("blue: ready, up"), "{msg}");
        }
        other => panic!("{other}"),
    }
    assert!(e.is_retryable(), "{msg}");
}

/// server -> (addr, port, admin state, weight).
type Table = BTreeMap<String, (String, u16, u8, u16)>;

/// A fake runtime API that keeps a tiny server table, answers like HAProxy 2.6, and closes the
/// connection without answering the command whose line starts with `drop_on`.
struct Fake {
    path: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    table: Arc<Mutex<Table>>,
    task: tokio::task::JoinHandle<()>,
}

impl Fake {
    fn start(dir: &std::path::Path, drop_on: &'static str) -> Fake {
        let path = dir.join("fake.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        // server -> (addr, port, admin state, weight); blue serving, green in maintenance.
        let table = Arc::new(Mutex::new(BTreeMap::from([
            (
                "blue".to_string(),
                ("127.0.0.1".to_string(), 8001, 0u8, 100u16),
            ),
            (
                "green".to_string(),
                ("127.0.0.1".to_string(), 8002, 1u8, 100u16),
            ),
        ])));
        let (l, t) = (log.clone(), table.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (mut r, mut w) = s.into_split();
                let mut line = String::new();
                let mut reader = BufReader::new(&mut r);
                if reader.read_line(&mut line).await.is_err() {
                    continue;
                }
                let line = line.trim_end().to_string();
                l.lock().unwrap().push(line.clone());
                if line.starts_with(drop_on) {
                    continue; // closes without an answer
                }
                let answer = Fake::answer(&t, &line);
                let _ = w.write_all(answer.as_bytes()).await;
            }
        });
        Fake {
            path,
            log,
            table,
            task,
        }
    }

    fn answer(t: &Mutex<Table>, line: &str) -> String {
        let mut t = t.lock().unwrap();
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["show", "servers", "state", "app"] => {
                let mut out = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n".to_string();
                for (i, (name, (addr, port, admin, weight))) in t.iter().enumerate() {
                    let (op, result) = if admin & 1 != 0 { (0, 0) } else { (2, 3) };
                    out.push_str(&format!(
                        "3 app {} {name} {addr} {op} {admin} {weight} 1 0 15 {result} 3 6 0 0 0 - {port} - 0 0 - - 0\n",
                        i + 1
                    ));
                }
                out + "\n"
            }
            ["show", "stat", "app", "4", "-1"] => {
                let mut out = "# pxname,svname,scur,status,\n".to_string();
                for name in t.keys() {
                    out.push_str(&format!("app,{name},0,UP,\n"));
                }
                out + "\n"
            }
            ["set", "server", target, "state", state] => {
                let server = target.trim_start_matches("app/");
                let Some(e) = t.get_mut(server) else {
                    return "No such server.\n\n".into();
                };
                e.2 = match *state {
                    "ready" => 0,
                    "drain" => 8,
                    _ => 1,
                };
                "\n".into()
            }
            ["set", "server", target, "health", "down"] => {
                // The fake's checks pass at once: it reports a server out of maintenance as up.
                if t.contains_key(target.trim_start_matches("app/")) {
                    "\n".into()
                } else {
                    "No such server.\n\n".into()
                }
            }
            ["set", "weight", target, w] => {
                let server = target.trim_start_matches("app/");
                let Some(e) = t.get_mut(server) else {
                    return "No such server.\n\n".into();
                };
                e.3 = w.parse().unwrap();
                "\n".into()
            }
            ["set", "server", target, "addr", ip, "port", port] => {
                let server = target.trim_start_matches("app/");
                let Some(e) = t.get_mut(server) else {
                    return "No such server.\n\n".into();
                };
                e.0 = ip.to_string();
                e.1 = port.parse().unwrap();
                "IP changed from 'x' to 'y' by 'stats socket command'\n\n".into()
            }
            _ => "Unknown command\n\n".into(),
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_mid_switch_names_the_step_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    // The connection closes when the old server is to be drained (step 2 of 3).
    let fake = Fake::start(dir.path(), "set server app/blue state drain");
    // The fake's backend has one server per slot, as a pool of one renders it.
    let switch = HaproxySwitch::new(
        HaproxyConfig::unix(&fake.path)
            .with_pool_size(1)
            .with_poll_interval(Duration::from_millis(10)),
    )
    .unwrap();
    let eps = Endpoints::new(
        vec![Endpoint::new("127.0.0.1", 8001)],
        vec![Endpoint::new("127.0.0.1", 9002)],
    );
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );
    let e = switch
        .apply(&TrafficSplit::all(Slot::Green), &eps)
        .await
        .unwrap_err();
    let msg = e.to_string();
    eprintln!("the caller sees: {msg}");
    match haproxy_error(&e) {
        HaproxyError::SwitchFailed {
            step,
            command,
            source,
            outcome,
            ..
        } => {
            assert_eq!(step, "2/3", "{msg}");
            assert_eq!(command, "set server app/blue state drain", "{msg}");
            assert!(
                matches!(&**source, HaproxyError::Io { source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof),
                "{msg}"
            );
            assert!(outcome.starts_with("restored the previous state"), "{msg}");
        }
        other => panic!("{other}"),
    }
    assert!(e.is_retryable());
    // Green was brought in (new address, health, weight, ready), then taken back out; blue
    // never left rotation.
    let log = fake.log.lock().unwrap().clone();
    let pos = |cmd: &str| {
        log.iter()
            .position(|l| l == cmd)
            .unwrap_or_else(|| panic!("{cmd} not sent: {log:#?}"))
    };
    assert!(
        pos("set server app/green addr 127.0.0.1 port 9002")
            < pos("set server app/green state ready")
    );
    assert!(pos("set server app/green health down") < pos("set server app/green state ready"));
    assert!(pos("set server app/green state ready") < pos("set server app/blue state drain"));
    assert!(
        log.iter()
            .rposition(|l| l == "set server app/green state maint")
            .unwrap()
            > pos("set server app/blue state drain")
    );
    let table = fake.table.lock().unwrap().clone();
    assert_eq!(table["blue"].2, 0, "blue must still be ready: {table:?}");
    assert_eq!(
        table["green"].2, 1,
        "green must be back in maintenance: {table:?}"
    );
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_passed_check_does_not_let_a_dead_endpoint_into_rotation() {
    if !haproxy_available("failures") {
        return;
    }
    let h = Haproxy::start();
    let demos = Demos::start().await;
    let mut config = h.config.clone();
    config.ready_timeout = Duration::from_secs(2);
    let switch = HaproxySwitch::new(config).unwrap();
    // Green served once, so HAProxy remembers a passed check for it while it sits in
    // maintenance.
    for slot in [Slot::Blue, Slot::Green, Slot::Blue] {
        switch
            .apply(&TrafficSplit::all(slot), &demos.endpoints())
            .await
            .unwrap();
    }
    assert_eq!(switch.servers().await.unwrap().green.check_result, 3);
    // Now green's endpoint moves to a port where nothing listens.
    let mut eps = demos.endpoints();
    let nowhere = common::RefusedAddr::new();
    eps.green = vec![Endpoint::new("127.0.0.1", nowhere.port())];
    let e = switch
        .apply(&TrafficSplit::all(Slot::Green), &eps)
        .await
        .unwrap_err();
    let msg = e.to_string();
    match haproxy_error(&e) {
        HaproxyError::SwitchFailed { source, .. } => {
            assert!(matches!(**source, HaproxyError::NotReady { .. }), "{msg}")
        }
        other => panic!("{other}"),
    }
    assert_eq!(
        switch.current().await.unwrap(),
        Some(TrafficSplit::all(Slot::Blue))
    );
    let c = client();
    for _ in 0..5 {
        assert_eq!(served_by(&c, &h.url("/")).await.unwrap(), Slot::Blue);
    }
}
