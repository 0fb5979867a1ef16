//! An engine reached over TCP (`DOCKER_HOST=tcp://…`), as a remote engine would be. Its own test
//! binary: it sets `DOCKER_HOST`, which no other test may see.
//!
//! The "remote" engine is this machine's, exposed on a loopback TCP port by a small forwarder to
//! its unix socket.

mod common;

use std::time::Duration;

use bluegreen_core::{Environment, InstanceState, Slot};
use bluegreen_docker::{DockerConfig, DockerEnvironment, DockerError};
use common::{demo_image, engine, release, Cleanup};

/// Forwards TCP connections on a loopback port to the engine's unix socket until dropped.
struct Forwarder {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forwarder(socket: &'static str) -> Forwarder {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        // Connections live in this set: aborting the task closes them all, like an engine host
        // going away.
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            conns.spawn(async move {
                if let Ok(mut unix) = tokio::net::UnixStream::connect(socket).await {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
            });
            while conns.try_join_next().is_some() {}
        }
    });
    Forwarder { port, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_named_by_a_tcp_docker_host_runs_the_slots() {
    const SOCKET: &str = "/var/run/docker.sock";
    if engine().await.is_none() {
        return;
    }
    if !std::path::Path::new(SOCKET).exists() {
        // `engine()` found an engine some other way (DOCKER_HOST): nothing to forward here.
        println!("SKIPPED: the engine is not on {SOCKET}");
        return;
    }
    let image = demo_image().await;
    let fwd = forwarder(SOCKET).await;
    std::env::set_var("DOCKER_HOST", format!("tcp://127.0.0.1:{}", fwd.port));

    let project = common::project("tcp");
    let _guard = Cleanup::new(&project);
    let env = DockerEnvironment::connect(
        DockerConfig::new(&project)
            .unwrap()
            .with_stop_timeout(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    assert!(format!("{env:?}").contains(&format!("tcp://127.0.0.1:{}", fwd.port)));
    let eps = env
        .deploy(Slot::Blue, &release("v1", &image))
        .await
        .unwrap();
    let st = env.status(Slot::Blue).await.unwrap();
    assert_eq!(st.state, InstanceState::Running);
    assert_eq!(st.endpoints, eps);
    let out = env
        .exec(Slot::Blue, &["/usr/bin/true".to_string()])
        .await
        .unwrap();
    assert!(out.success());
    env.remove(Slot::Blue).await.unwrap();
    assert_eq!(
        env.status(Slot::Blue).await.unwrap().state,
        InstanceState::Absent
    );

    // The engine's host goes away: calls fail as unreachable (retryable), naming the address.
    let addr = format!("tcp://127.0.0.1:{}", fwd.port);
    // The cleanup guard's own client reads DOCKER_HOST too: point it back at the socket first.
    std::env::remove_var("DOCKER_HOST");
    drop(fwd);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = env.status(Slot::Blue).await.unwrap_err();
    match &err {
        bluegreen_core::Error::Backend { source, .. } => assert!(
            matches!(
                source.downcast_ref::<DockerError>(),
                Some(DockerError::Unreachable { .. })
            ),
            "{err}"
        ),
        other => panic!("expected a backend error, got {other}"),
    }
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains(&addr), "{err}");
}
