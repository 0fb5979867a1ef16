//! Test hosts are real separate engines: each answers on its own socket, runs containers
//! reachable on its own address, can be killed, cut off and restored, and leaves nothing behind.
#![cfg(feature = "docker")]

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use bluegreen_docker::bollard::models::{ContainerCreateBody, HostConfig};
use bluegreen_docker::bollard::query_parameters::{
    CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bluegreen_testenv::hosts::{self, TestHosts};

fn reachable(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_are_separate_engines_reachable_on_their_own_address_and_leave_nothing() {
    if !hosts::require_available() {
        return;
    }
    let Some(main) = bluegreen_testenv::docker::engine().await else {
        return;
    };
    let set = TestHosts::start(2).await.expect("two test hosts start");
    let tag = hosts::demo_image(&main).await.unwrap();
    set.load_image(&main, &tag).await.unwrap();
    let (h1, h2) = (&set.hosts()[0], &set.hosts()[1]);
    assert_eq!((h1.name(), h2.name()), ("h1", "h2"));
    assert_ne!(h1.address(), h2.address());
    let d1 = h1.client().await.unwrap();
    // Engines of one machine share their id (the trust key in /etc/docker): tell them apart by
    // their data roots.
    let root1 = d1.info().await.unwrap().docker_root_dir.unwrap();
    let root2 = h2
        .client()
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .docker_root_dir
        .unwrap();
    let root_main = main.info().await.unwrap().docker_root_dir.unwrap();
    assert!(
        root1 != root2 && root1 != root_main && root1.starts_with(&*h1.dir().to_string_lossy()),
        "three distinct engines: {root1} {root2} {root_main}"
    );

    // A container on the host network answers on the host's address from this namespace (the
    // engines run with `--bridge=none`: publishing needs a user-defined network).
    let body = ContainerCreateBody {
        image: Some(tag.clone()),
        env: Some(vec!["PORT=18080".into(), "BLUEGREEN_VERSION=v1".into()]),
        host_config: Some(HostConfig {
            network_mode: Some("host".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let opts = CreateContainerOptionsBuilder::default()
        .name("probe")
        .build();
    d1.create_container(Some(opts), body).await.unwrap();
    d1.start_container("probe", None).await.unwrap();
    let addr = SocketAddr::from((h1.address(), 18080));
    let mut up = false;
    for _ in 0..100 {
        if bluegreen_testenv::demo::version_at(addr).as_deref() == Some("v1") {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the container answers on {addr}");
    assert!(
        set.hosts()[1].address() != h1.address()
            && !reachable(SocketAddr::from((set.hosts()[1].address(), 18080))),
        "only on its own host"
    );
    // Not on loopback: it is another host.
    assert!(!reachable(SocketAddr::from(([127, 0, 0, 1], 18080))));

    // Cut off: unreachable; restored: answers again.
    h1.cut_link().unwrap();
    assert!(!reachable(addr), "cut off");
    h1.restore_link().unwrap();
    let mut back = false;
    for _ in 0..100 {
        if reachable(addr) {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "reachable again after restore_link");

    // Killed: the API stops answering; restarted: it answers, its images are kept.
    let pid = h1.engine_pid().expect("engine runs");
    h1.kill_engine();
    assert!(h1.engine_pid().is_none());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || {
            // A zombie is reaped by kill_engine; the pid may only be recycled.
            let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            !String::from_utf8_lossy(&c).contains("dockerd")
        }
    );
    assert!(d1.ping().await.is_err(), "a killed engine does not answer");
    h1.restart_engine().await.unwrap();
    let d1 = h1.client().await.unwrap();
    assert!(
        d1.inspect_image(&tag).await.is_ok(),
        "images survive a restart"
    );
    let _ = d1
        .remove_container(
            "probe",
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await;

    let dirs: Vec<_> = set.hosts().iter().map(|h| h.dir().to_path_buf()).collect();
    let netns: Vec<String> = set.hosts().iter().map(|h| h.netns().to_string()).collect();
    let links: Vec<String> = set.hosts().iter().map(|h| h.link().to_string()).collect();
    set.stop().unwrap();
    for (dir, ns) in dirs.iter().zip(&netns) {
        assert!(!dir.exists(), "{} removed", dir.display());
        assert!(
            !Path::new(&format!("/var/run/netns/{ns}")).exists(),
            "{ns} deleted"
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for dir in &dirs {
        assert!(
            !mounts.contains(&*dir.to_string_lossy()),
            "nothing stays mounted under {}",
            dir.display()
        );
    }
    for link in &links {
        assert!(
            !Path::new(&format!("/sys/class/net/{link}")).exists(),
            "{link} deleted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_of_a_dead_owner_are_cleaned_up_and_those_of_a_live_one_are_not() {
    if !hosts::require_available() {
        return;
    }
    if bluegreen_testenv::docker::engine().await.is_none() {
        return;
    }
    let set = TestHosts::start(1).await.expect("a test host starts");
    let h = &set.hosts()[0];
    let (dir, ns, link) = (
        h.dir().to_path_buf(),
        h.netns().to_string(),
        h.link().to_string(),
    );
    // Owned by this live process: left alone.
    hosts::clean_leftovers().unwrap();
    assert!(
        dir.exists() && h.client().await.is_ok(),
        "a live owner's host stays"
    );

    // As if its owner had been killed: a pid that has exited.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    std::fs::write(dir.join("owner"), dead.to_string()).unwrap();
    std::fs::remove_file(dir.join("owner-start")).unwrap();
    let cleaned = hosts::clean_leftovers().unwrap();
    assert!(cleaned.contains(&ns), "{cleaned:?}");
    assert!(!dir.exists());
    assert!(!Path::new(&format!("/var/run/netns/{ns}")).exists());
    assert!(!Path::new(&format!("/sys/class/net/{link}")).exists());
    assert!(h.client().await.is_err(), "its engine was stopped");
    // Stopping the set afterwards finds nothing left and does not fail.
    set.stop().unwrap();
}
