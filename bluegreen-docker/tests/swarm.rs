//! SwarmEnvironment on a real 3-node Docker Swarm: the test hosts' engines (bluegreen-testenv's
//! `hosts`), the first one a manager, the others workers (bluegreen-testenv's `swarm`), never
//! the machine's main engine. The demo image, with a HEALTHCHECK, is loaded on every node.
//!
//! The tests share the swarm; each uses its own project and its own ports (the tasks run on the
//! nodes' network), so they may run at once.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bluegreen_core::testkit::{environment_suite, EnvironmentSuite};
use bluegreen_core::{
    Deployer, Environment, Error, InstanceState, Policy, Release, RunOutcome, Slot,
};
use bluegreen_docker::bollard::query_parameters::{
    ListContainersOptionsBuilder, TagImageOptionsBuilder,
};
use bluegreen_docker::{DockerError, SwarmConfig, SwarmEnvironment, LABEL_PROJECT};
use bluegreen_proxy::{ProxyConfig, ProxySwitch};
use bluegreen_testenv::swarm::{self, TestSwarm};
use bluegreen_testenv::LoadStats;
use tokio::sync::OnceCell;

/// The shared swarm, with the health-checked demo image on every node; `None` (skipped outside
/// CI).
async fn swarm() -> Option<(&'static TestSwarm<'static>, String)> {
    static IMAGE: OnceCell<String> = OnceCell::const_new();
    let sw = swarm::shared().await?;
    let main = common::engine().await?;
    let image = IMAGE
        .get_or_init(|| async {
            let tag = common::health_image().await;
            sw.hosts().load_image(&main, &tag).await.unwrap();
            tag
        })
        .await
        .clone();
    Some((sw, image))
}

/// Two ports for a test's slots, different from every other test's (the tasks of all tests
/// share the nodes' network).
fn ports() -> (u16, u16) {
    static NEXT: AtomicU16 = AtomicU16::new(21000);
    let p = NEXT.fetch_add(2, Ordering::Relaxed);
    (p, p + 1)
}

fn project(prefix: &str) -> String {
    common::project(&format!("sw-{prefix}"))
}

fn config(prefix: &str) -> SwarmConfig {
    let (blue, green) = ports();
    SwarmConfig::new(project(prefix))
        .unwrap()
        .with_replicas(3)
        .with_ports(blue, green)
        .with_ready_timeout(Duration::from_secs(60))
        .with_stop_timeout(Duration::from_secs(2))
}

/// Removes the project's services when dropped, whatever happened.
struct Cleanup(SwarmEnvironment);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let env = self.0.clone();
        let t = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            if let Err(e) = rt.block_on(env.reset()) {
                eprintln!("swarm cleanup failed: {e}");
            }
        });
        let _ = t.join();
    }
}

async fn environment(sw: &TestSwarm<'_>, config: SwarmConfig) -> (SwarmEnvironment, Cleanup) {
    let env = SwarmEnvironment::with_client(sw.manager_client().await.unwrap(), config)
        .await
        .unwrap();
    (env.clone(), Cleanup(env))
}

/// The `DockerError` inside a backend error.
fn docker_error(e: &Error) -> &DockerError {
    let mut cur: &(dyn std::error::Error + 'static) = e;
    loop {
        if let Some(f) = cur.downcast_ref::<DockerError>() {
            return f;
        }
        match cur.source() {
            Some(s) => cur = s,
            None => panic!("no DockerError in {e}"),
        }
    }
}

/// The project's containers on every node, as `host: name state`.
async fn containers_on_nodes(sw: &TestSwarm<'_>, project: &str) -> Vec<String> {
    let filters = HashMap::from([(
        "label".to_string(),
        vec![format!("{LABEL_PROJECT}={project}")],
    )]);
    let mut out = Vec::new();
    for h in sw.hosts().hosts() {
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        for c in h
            .client()
            .await
            .unwrap()
            .list_containers(Some(opts))
            .await
            .unwrap()
        {
            out.push(format!(
                "{}: {:?} {:?}",
                h.name(),
                c.names.unwrap_or_default(),
                c.state
            ));
        }
    }
    out
}

/// Waits (bounded) until no node keeps a container of the project: after a service's tasks are
/// gone, each node's agent removes their containers.
async fn no_containers_left(sw: &TestSwarm<'_>, project: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = containers_on_nodes(sw, project).await;
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "containers left on the nodes: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn get(url: &str) -> (u16, String) {
    let c = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = c.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_swarm_passes_the_environment_suite() {
    let Some((sw, image)) = swarm().await else {
        return;
    };
    let (env, _cleanup) = environment(sw, config("suite")).await;
    let suite = EnvironmentSuite {
        release: Arc::new(move |v: &str| Release::new(v, image.as_str()).unwrap()),
        ready_timeout: Duration::from_secs(60),
        exec_argv: None,
    };
    environment_suite(&env, &suite).await.assert_complete();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_runs_one_healthy_task_per_node_and_remove_leaves_no_container() {
    let Some((sw, image)) = swarm().await else {
        return;
    };
    let cfg = config("nodes");
    let project = cfg.project.to_string();
    let port = cfg.blue_port;
    let (env, _cleanup) = environment(sw, cfg).await;

    let eps = env
        .deploy(Slot::Blue, &Release::new("v1", image.as_str()).unwrap())
        .await
        .unwrap();
    // One endpoint per node: its address, the slot's port; each answers with the release.
    let mut hosts: Vec<String> = eps.iter().map(|e| e.host.clone()).collect();
    hosts.sort();
    let mut want: Vec<String> = sw
        .hosts()
        .hosts()
        .iter()
        .map(|h| h.address().to_string())
        .collect();
    want.sort();
    assert_eq!(hosts, want, "{eps:?}");
    for e in &eps {
        assert_eq!(e.port, port);
        let (code, body) = get(&format!("http://{}:{}/", e.host, e.port)).await;
        assert_eq!((code, body.as_str()), (200, "version=v1 slot=blue\n"));
    }

    // Status: wanted, running (past the health check), each node by name.
    let st = env.status(Slot::Blue).await.unwrap();
    assert_eq!(st.state, InstanceState::Running);
    assert_eq!(st.version.as_ref().map(|v| v.as_str()), Some("v1"));
    assert_eq!(st.health, Some(bluegreen_core::RuntimeHealth::Healthy));
    assert_eq!(st.endpoints.len(), 3);
    let s = env.service_status(Slot::Blue).await.unwrap().unwrap();
    assert_eq!((s.wanted, s.running), (3, 3), "{s:?}");
    assert!(s.health_checked, "{s:?}");
    let mut nodes: Vec<&str> = s
        .tasks
        .iter()
        .map(|t| t.node.split(' ').next().unwrap())
        .collect();
    nodes.sort_unstable();
    assert_eq!(nodes, ["h1", "h2", "h3"], "{s:?}");
    assert!(s.tasks.iter().all(|t| t.state == "running"), "{s:?}");

    // Deploying the same release again keeps the tasks.
    let before = containers_on_nodes(sw, &project).await;
    env.deploy(Slot::Blue, &Release::new("v1", image.as_str()).unwrap())
        .await
        .unwrap();
    assert_eq!(containers_on_nodes(sw, &project).await, before);

    // Logs come from every task.
    let logs = env.logs(Slot::Blue, None).await.unwrap();
    assert!(logs.contains("version=v1"), "{logs}");

    // remove: the service and its tasks go, and no node keeps a container of the project.
    env.remove(Slot::Blue).await.unwrap();
    assert_eq!(
        env.status(Slot::Blue).await.unwrap().state,
        InstanceState::Absent
    );
    no_containers_left(sw, &project).await;
}

// ---------------------------------------------------------------------------------------------
// Through the engine and the embedded proxy, under load.

struct Setup {
    _dir: tempfile::TempDir,
    proxy: ProxySwitch,
    env: SwarmEnvironment,
    deployer: Deployer,
    _cleanup: Cleanup,
}

async fn setup(sw: &TestSwarm<'_>, prefix: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let proxy =
        ProxySwitch::bind(ProxyConfig::default().with_connect_timeout(Duration::from_millis(500)))
            .await
            .unwrap();
    let (env, cleanup) = environment(sw, config(prefix)).await;
    let deployer = common::proxy_deployer(
        Arc::new(env.clone()),
        &proxy,
        dir.path(),
        Policy::default()
            .with_readiness_timeout(Duration::from_secs(60))
            .with_observation(Duration::from_secs(2), Duration::from_millis(100))
            .with_drain_timeout(Duration::from_secs(2)),
    );
    Setup {
        _dir: dir,
        proxy,
        env,
        deployer,
        _cleanup: cleanup,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_to_v2_on_three_nodes_through_the_embedded_proxy_and_back_fails_no_request() {
    let Some((sw, image)) = swarm().await else {
        return;
    };
    let s = setup(sw, "e2e").await;
    s.deployer
        .deploy(Release::new("v1", image.as_str()).unwrap())
        .await
        .unwrap();
    assert_eq!(common::served_version(&s.proxy).await, "v1");
    let load = common::proxy_load(&s.proxy);
    let report = s
        .deployer
        .deploy(Release::new("v2", image.as_str()).unwrap())
        .await
        .unwrap();
    assert_eq!(report.outcome, RunOutcome::Live, "{report:?}");
    assert_eq!(common::served_version(&s.proxy).await, "v2");
    // The proxy routes green to its three tasks, one per node.
    let routed = s.proxy.endpoints();
    assert_eq!(routed.get(Slot::Green).len(), 3, "{routed:?}");
    let st = s.env.status(Slot::Green).await.unwrap();
    assert_eq!(st.state, InstanceState::Running);

    // The old slot was kept warm: rollback is a switch back, still under load.
    let report = s.deployer.rollback().await.unwrap();
    assert_eq!(report.version.as_str(), "v1");
    let LoadStats { ok, failed, .. } = load.finish().await;
    assert_eq!(
        failed, 0,
        "requests failed during the swarm deploy and rollback ({ok} ok)"
    );
    assert!(ok > 20, "too little load went through: {ok}");
    assert_eq!(common::served_version(&s.proxy).await, "v1");
    // What the engine recorded matches the swarm.
    let st = s.deployer.status().await.unwrap();
    assert_eq!(st.state.active, Some(Slot::Blue));
    assert!(st.drift.is_empty(), "{:?}", st.drift);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_failing_its_health_check_is_refused_and_live_is_untouched() {
    let Some((sw, image)) = swarm().await else {
        return;
    };
    let s = setup(sw, "unhealthy").await;
    s.deployer
        .deploy(Release::new("v1", image.as_str()).unwrap())
        .await
        .unwrap();
    let live = s.env.service_status(Slot::Blue).await.unwrap().unwrap();
    let load = common::proxy_load(&s.proxy);
    let bad = Release::new("v2", image.as_str())
        .unwrap()
        .with_env("DEMO_FAIL_HEALTH", "1");
    let err = s.deployer.deploy(bad).await.unwrap_err();
    let LoadStats { ok, failed, .. } = load.finish().await;
    assert_eq!(
        failed, 0,
        "requests failed during the refused deploy ({ok} ok)"
    );
    assert!(ok > 20, "too little load went through: {ok}");
    // The error names the service, the node and the health check.
    let text = err.to_string();
    match docker_error(&err) {
        DockerError::TaskFailed { service, node, .. } => {
            assert!(service.ends_with("-green"), "{text}");
            assert!(node.starts_with('h'), "{text}");
        }
        other => panic!("expected TaskFailed, got {other}"),
    }
    assert!(text.contains("health check"), "{text}");
    // Live untouched: blue still serves v1 on its three tasks; green's service is gone.
    assert_eq!(common::served_version(&s.proxy).await, "v1");
    let now = s.env.service_status(Slot::Blue).await.unwrap().unwrap();
    assert_eq!((now.wanted, now.running), (3, 3), "{now:?}");
    assert_eq!(now.tasks, live.tasks);
    assert!(
        s.env.service_status(Slot::Green).await.unwrap().is_none(),
        "the failed release's service was left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_missing_on_one_node_names_that_node_and_leaves_nothing() {
    let Some((sw, image)) = swarm().await else {
        return;
    };
    // A tag only h1 and h2 have.
    let cfg = config("noimage");
    let project = cfg.project.to_string();
    let (repo, tag) = (format!("bluegreen-swarm-test/{project}"), "only-two");
    for h in &sw.hosts().hosts()[..2] {
        let opts = TagImageOptionsBuilder::default()
            .repo(&repo)
            .tag(tag)
            .build();
        h.client()
            .await
            .unwrap()
            .tag_image(&image, Some(opts))
            .await
            .unwrap();
    }
    let (env, _cleanup) = environment(sw, cfg).await;
    let err = env
        .deploy(
            Slot::Green,
            &Release::new("v1", format!("{repo}:{tag}")).unwrap(),
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    match docker_error(&err) {
        DockerError::TaskFailed { node, message, .. } => {
            assert!(node.starts_with("h3 "), "{text}");
            assert!(message.contains("No such image"), "{text}");
        }
        other => panic!("expected TaskFailed, got {other}"),
    }
    assert!(text.contains("docker load"), "{text}");
    assert!(!err.is_retryable());
    // All or nothing: no service, no container on any node.
    assert!(env.service_status(Slot::Green).await.unwrap().is_none());
    no_containers_left(sw, &project).await;
    for h in &sw.hosts().hosts()[..2] {
        let _ = h
            .client()
            .await
            .unwrap()
            .remove_image(
                &format!("{repo}:{tag}"),
                None::<bluegreen_docker::bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_replicas_than_nodes_is_refused_before_anything_is_created() {
    let Some((sw, image)) = swarm().await else {
        return;
    };
    let (env, _cleanup) = environment(sw, config("toomany").with_replicas(4)).await;
    let err = env
        .deploy(Slot::Blue, &Release::new("v1", image.as_str()).unwrap())
        .await
        .unwrap_err();
    match docker_error(&err) {
        DockerError::TooFewNodes {
            replicas, nodes, ..
        } => assert_eq!((*replicas, *nodes), (4, 3)),
        other => panic!("expected TooFewNodes, got {other}"),
    }
    assert!(env.service_status(Slot::Blue).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_engine_is_refused_as_the_manager() {
    let Some((sw, _)) = swarm().await else {
        return;
    };
    let worker = sw.hosts().hosts()[1].client().await.unwrap();
    let err = SwarmEnvironment::with_client(worker, config("worker"))
        .await
        .unwrap_err();
    assert!(
        matches!(docker_error(&err), DockerError::NotSwarmManager { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("not a swarm manager"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_service_holding_the_slots_name_is_never_touched() {
    use bluegreen_docker::bollard::models::{
        ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, TaskSpec, TaskSpecContainerSpec,
    };
    let Some((sw, image)) = swarm().await else {
        return;
    };
    let cfg = config("foreign");
    let name = cfg.service_name(Slot::Blue);
    let manager = sw.manager_client().await.unwrap();
    // Someone else's service, no tasks, no labels.
    manager
        .create_service(
            ServiceSpec {
                name: Some(name.clone()),
                mode: Some(ServiceSpecMode {
                    replicated: Some(ServiceSpecModeReplicated { replicas: Some(0) }),
                    ..Default::default()
                }),
                task_template: Some(TaskSpec {
                    container_spec: Some(TaskSpecContainerSpec {
                        image: Some(image.clone()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    let (env, cleanup) = environment(sw, cfg).await;
    let err = env
        .deploy(Slot::Blue, &Release::new("v1", image.as_str()).unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(docker_error(&err), DockerError::NameClash { .. }),
        "{err}"
    );
    assert!(env.remove(Slot::Blue).await.is_err());
    drop(cleanup); // reset: only services carrying the project's label
    let still = manager.inspect_service(&name, None).await.unwrap();
    assert_eq!(
        still
            .spec
            .and_then(|s| s.mode)
            .and_then(|m| m.replicated)
            .and_then(|r| r.replicas),
        Some(0),
        "the foreign service was changed"
    );
    manager.delete_service(&name).await.unwrap();
}
