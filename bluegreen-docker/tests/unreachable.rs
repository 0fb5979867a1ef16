//! An engine that cannot be reached. Its own test binary: it sets `DOCKER_HOST`, which no other
//! test may see.

use bluegreen_core::Error;
use bluegreen_docker::bollard::{Docker, API_DEFAULT_VERSION};
use bluegreen_docker::{DockerConfig, DockerEnvironment, DockerError};

fn docker_error(e: &Error) -> &DockerError {
    match e {
        Error::Backend { source, .. } => source
            .downcast_ref::<DockerError>()
            .unwrap_or_else(|| panic!("not a DockerError: {e}")),
        other => panic!("expected a backend error, got {other}"),
    }
}

#[tokio::test]
async fn an_unreachable_engine_fails_clearly_and_is_retryable() {
    let dir = tempfile::tempdir().unwrap();
    // A socket file nobody listens on: what a stopped daemon leaves behind.
    let sock = dir.path().join("docker.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let host = format!("unix://{}", sock.display());
    std::env::set_var("DOCKER_HOST", &host);

    let err = DockerEnvironment::connect(DockerConfig::new("bgt-unreachable").unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(docker_error(&err), DockerError::Unreachable { .. }),
        "{err}"
    );
    assert!(err.is_retryable(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&host) && msg.contains("DOCKER_HOST") && msg.contains("daemon"),
        "{msg}"
    );

    // A socket path that does not exist at all.
    let missing = dir.path().join("missing.sock");
    std::env::set_var("DOCKER_HOST", format!("unix://{}", missing.display()));
    let err = DockerEnvironment::connect(DockerConfig::new("bgt-unreachable").unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(docker_error(&err), DockerError::Unreachable { .. }),
        "{err}"
    );

    // A TCP engine address where nothing listens, through a client the caller configured.
    let nowhere = bluegreen_testenv::port::RefusedAddr::new();
    let port = nowhere.port();
    let client =
        Docker::connect_with_http(&format!("tcp://127.0.0.1:{port}"), 5, API_DEFAULT_VERSION)
            .unwrap();
    let err = DockerEnvironment::with_client(client, DockerConfig::new("bgt-unreachable").unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(docker_error(&err), DockerError::Unreachable { .. }),
        "{err}"
    );
    assert!(err.is_retryable());
}
