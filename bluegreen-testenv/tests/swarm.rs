//! A swarm of test hosts: formed with each node named after its host and advertising the host's
//! address, refused on engines already in a swarm, and left without a trace.
#![cfg(feature = "docker")]

use std::process::Command;

use bluegreen_testenv::hosts::{self, TestHosts};
use bluegreen_testenv::swarm::TestSwarm;

/// The engine's swarm state (`inactive`, `active`, …).
async fn swarm_state(h: &hosts::TestHost) -> String {
    h.client()
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .swarm
        .and_then(|s| s.local_node_state)
        .map(|s| s.to_string())
        .unwrap_or_default()
}

fn link_exists(h: &hosts::TestHost, link: &str) -> bool {
    Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", h.netns()))
        .args(["ip", "link", "show", link])
        .output()
        .unwrap()
        .status
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_of_test_hosts_is_formed_refused_twice_and_left_as_found() {
    if let Some(what) = hosts::unavailable() {
        bluegreen_testenv::require(false, &format!("test hosts ({what})"));
        return;
    }
    let set = TestHosts::start(2).await.expect("two test hosts start");
    let (h1, h2) = (&set.hosts()[0], &set.hosts()[1]);
    assert_eq!(swarm_state(h1).await, "inactive");

    let swarm = TestSwarm::init(&set).await.expect("the swarm forms");
    // Every node ready, named after its host, advertising the host's address.
    let mut nodes: Vec<(String, String)> = swarm
        .manager_client()
        .await
        .unwrap()
        .list_nodes(None)
        .await
        .unwrap()
        .into_iter()
        .map(|n| {
            (
                n.spec.and_then(|s| s.name).unwrap_or_default(),
                n.status.and_then(|s| s.addr).unwrap_or_default(),
            )
        })
        .collect();
    nodes.sort();
    assert_eq!(
        nodes,
        [
            ("h1".to_string(), h1.address().to_string()),
            ("h2".to_string(), h2.address().to_string())
        ]
    );
    assert_eq!(swarm_state(h2).await, "active");

    // Engines already in a swarm are refused, and left in it.
    let err = TestSwarm::init(&set).await.unwrap_err().to_string();
    assert!(err.contains("already in a swarm"), "{err}");
    assert_eq!(swarm_state(h1).await, "active");
    assert!(link_exists(h1, "bgswarm"));

    // Leaving: every engine out of the swarm, the LAN gone; a second leave changes nothing.
    swarm.leave().await.unwrap();
    for h in set.hosts() {
        assert_eq!(swarm_state(h).await, "inactive", "{}", h.name());
    }
    assert!(!link_exists(h1, "bgswarm"));
    assert!(!link_exists(h2, "bgswarm0"));
    swarm.leave().await.unwrap();
    drop(swarm);
    set.stop().unwrap();
}
