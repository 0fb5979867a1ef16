//! The runtime API client against a real HAProxy: both transports, both modes, typed errors.

mod common;

use std::time::Duration;

use bluegreen_core::{Name, Slot};
use bluegreen_haproxy::{
    AdminState, Command, HaproxyError, OpState, RuntimeAddress, RuntimeClient,
};
use common::{haproxy_available, Haproxy};

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn clients(h: &Haproxy) -> [RuntimeClient; 2] {
    let t = Duration::from_secs(10);
    [
        RuntimeClient::new(RuntimeAddress::Unix(h.admin_sock.clone()), t),
        RuntimeClient::new(RuntimeAddress::Tcp(format!("127.0.0.1:{}", h.tcp_port)), t),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_command_per_connection_over_unix_and_tcp() {
    if !haproxy_available("client") {
        return;
    }
    let h = Haproxy::start();
    let (app, blue) = (name("app"), name("blue"));
    for c in clients(&h) {
        let info = c.send(&Command::raw("show info").unwrap()).await.unwrap();
        assert!(info.contains("Name: HAProxy"), "{info}");

        let servers = c.servers_state(&app).await.unwrap();
        let names: Vec<_> = servers.iter().map(|s| s.name.clone()).collect();
        // Both pools, as the backend is rendered: blue, blue-2, …, green, green-2, …
        let pools = [h.config.pool(Slot::Blue), h.config.pool(Slot::Green)].concat();
        assert_eq!(names, pools);
        assert_eq!(names[0], "blue");
        assert!(servers.iter().all(|s| s.is_maint() && s.has_check()));

        c.send(&Command::set_weight(&app, &blue, 42)).await.unwrap();
        let s = c.servers_state(&app).await.unwrap();
        assert_eq!(s[0].weight, 42);

        let stats = c.server_stats(&app).await.unwrap();
        let row = stats.iter().find(|r| r.server() == "blue").unwrap();
        assert_eq!(row.proxy(), "app");
        assert_eq!(row.status(), "MAINT");
        assert_eq!(row.current_sessions(), 0);
        assert_eq!(row.get("uweight"), Some("42"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_mode_runs_several_commands_on_one_connection() {
    if !haproxy_available("client") {
        return;
    }
    let h = Haproxy::start();
    let (app, blue) = (name("app"), name("blue"));
    let nowhere = common::RefusedAddr::new();
    for c in clients(&h) {
        let mut s = c.session().await.unwrap();
        s.send(&Command::set_addr(
            &app,
            &blue,
            "127.0.0.1".parse().unwrap(),
            nowhere.port(),
        ))
        .await
        .unwrap();
        s.send(&Command::set_weight(&app, &blue, 7)).await.unwrap();
        let w = s
            .send(&Command::raw("get weight app/blue").unwrap())
            .await
            .unwrap();
        assert!(w.starts_with("7 "), "{w:?}");
        // An error answer does not end the session.
        let err = s
            .send(&Command::set_state(
                &app,
                &name("nosuch"),
                AdminState::Ready,
            ))
            .await
            .unwrap_err();
        assert!(
            matches!(err, HaproxyError::NoSuchServer { ref server, .. } if server == "nosuch"),
            "{err}"
        );
        s.send(&Command::set_state(&app, &blue, AdminState::Drain))
            .await
            .unwrap();
        let rows = s.servers_state(&app).await.unwrap();
        assert!(rows[0].is_drain() && !rows[0].is_maint());
        assert_ne!(rows[0].op_state, OpState::Other(9));
        s.send(&Command::set_state(&app, &blue, AdminState::Maint))
            .await
            .unwrap();
        s.quit().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_error_answers_become_typed_errors() {
    if !haproxy_available("client") {
        return;
    }
    let h = Haproxy::start();
    let [c, _] = clients(&h);
    let (app, blue) = (name("app"), name("blue"));

    let e = c
        .send(&Command::set_state(
            &app,
            &name("nosuch"),
            AdminState::Ready,
        ))
        .await
        .unwrap_err();
    assert!(matches!(e, HaproxyError::NoSuchServer { .. }), "{e}");
    assert!(e.to_string().contains("app/nosuch"), "{e}");
    assert!(!e.is_retryable());

    let e = c
        .send(&Command::set_weight(&name("nosuch"), &blue, 1))
        .await
        .unwrap_err();
    assert!(matches!(e, HaproxyError::NoSuchBackend { .. }), "{e}");
    let e = c.servers_state(&name("nosuch")).await.unwrap_err();
    assert!(matches!(e, HaproxyError::NoSuchBackend { .. }), "{e}");
    let e = c.server_stats(&name("nosuch")).await.unwrap_err();
    assert!(matches!(e, HaproxyError::NoSuchBackend { .. }), "{e}");

    let e = c
        .send(&Command::raw("frobnicate the servers").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, HaproxyError::UnknownCommand { .. }), "{e}");

    // The user-level socket may read but not change anything.
    let user = RuntimeClient::new(
        RuntimeAddress::Unix(h.user_sock.clone()),
        Duration::from_secs(10),
    );
    assert!(user.servers_state(&app).await.is_ok());
    let e = user
        .send(&Command::set_state(&app, &blue, AdminState::Ready))
        .await
        .unwrap_err();
    assert!(matches!(e, HaproxyError::PermissionDenied { .. }), "{e}");
    assert!(e.to_string().contains("level admin"), "{e}");
}
