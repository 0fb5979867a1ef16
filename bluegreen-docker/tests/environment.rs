//! DockerEnvironment against the real Docker Engine, with images the tests build themselves.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bluegreen_core::testkit::{environment_suite, EnvironmentSuite};
use bluegreen_core::{Endpoint, Environment, Error, InstanceState, RuntimeHealth, Slot};
use bluegreen_docker::bollard::models::{ContainerCreateBody, RestartPolicyNameEnum};
use bluegreen_docker::bollard::query_parameters::CreateContainerOptionsBuilder;
use bluegreen_docker::{
    DockerEnvironment, DockerError, Healthcheck, PullPolicy, RestartPolicy, LABEL_DEPLOYMENT,
    LABEL_PROJECT, LABEL_SLOT, LABEL_VERSION,
};
use common::{demo_image, engine, environment, health_image, release};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_environment_suite() {
    if engine().await.is_none() {
        return;
    }
    let image = demo_image().await;
    let (env, _guard) = environment("suite", |c| c).await;
    let img = image.clone();
    let suite = EnvironmentSuite {
        release: Arc::new(move |v| release(v, &img)),
        ready_timeout: Duration::from_secs(30),
        exec_argv: Some(vec!["/usr/bin/true".into()]),
    };
    environment_suite(&env, &suite).await.assert_complete();
    assert_eq!(
        env.status(Slot::Blue).await.unwrap().state,
        InstanceState::Absent
    );
}

/// The `DockerError` inside a backend error.
fn docker_error(e: &Error) -> &DockerError {
    match e {
        Error::Backend { source, .. } => source
            .downcast_ref::<DockerError>()
            .unwrap_or_else(|| panic!("not a DockerError: {e}")),
        other => panic!("expected a backend error, got {other}"),
    }
}

/// `GET path` on the endpoint, retried until the app answers (bounded).
async fn get(e: &Endpoint, path: &str) -> reqwest::Response {
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.get(e.url(path)).send().await {
            Ok(r) => return r,
            Err(err) if Instant::now() < deadline => {
                let _ = err;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("{e} never answered {path}: {err}"),
        }
    }
}

/// Polls `status` until `pred` holds (bounded).
async fn wait_status(
    env: &DockerEnvironment,
    slot: Slot,
    what: &str,
    pred: impl Fn(&bluegreen_core::SlotStatus) -> bool,
) -> bluegreen_core::SlotStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = env.status(slot).await.unwrap();
        if pred(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{slot} never became {what}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_runs_the_release_with_labels_env_network_and_limits() {
    if engine().await.is_none() {
        return;
    }
    let image = demo_image().await;
    let (env, _guard) = environment("spec", |c| {
        c.with_memory_limit(64 * 1024 * 1024)
            .with_cpus(0.5)
            .with_restart(RestartPolicy::OnFailure(2))
            .with_env("FROM_CONFIG", "yes")
    })
    .await;
    let project = env.config().project.to_string();
    let rel = release("v1", &image)
        .with_env("APP_MODE", "test")
        .with_secret_env("DEMO_TOKEN", "hunter2")
        .with_label("team", "payments");
    let eps = env.deploy(Slot::Blue, &rel).await.unwrap();
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].host, "127.0.0.1");
    let res = get(&eps[0], "/").await;
    assert_eq!(res.headers()["x-bluegreen-version"], "v1");
    assert_eq!(res.headers()["x-bluegreen-slot"], "blue");

    let st = env.status(Slot::Blue).await.unwrap();
    assert_eq!(st.state, InstanceState::Running);
    assert_eq!(st.version.unwrap().as_str(), "v1");
    assert_eq!(st.endpoints, eps);
    assert_eq!(st.health, None, "the image has no HEALTHCHECK");

    // What the engine holds.
    let name = format!("{project}-blue");
    let c = env.client().inspect_container(&name, None).await.unwrap();
    let cfg = c.config.unwrap();
    let labels = cfg.labels.unwrap();
    assert_eq!(labels[LABEL_PROJECT], project);
    assert_eq!(labels[LABEL_SLOT], "blue");
    assert_eq!(labels[LABEL_VERSION], "v1");
    assert!(!labels[LABEL_DEPLOYMENT].is_empty());
    assert_eq!(labels["team"], "payments");
    let cenv = cfg.env.unwrap();
    for want in [
        "APP_MODE=test",
        "DEMO_TOKEN=hunter2",
        "FROM_CONFIG=yes",
        "PORT=8080",
        "BLUEGREEN_SLOT=blue",
        "BLUEGREEN_VERSION=v1",
        "HOST=0.0.0.0",
    ] {
        assert!(cenv.iter().any(|e| e == want), "{want} missing");
    }
    let hc = c.host_config.unwrap();
    assert_eq!(hc.memory, Some(64 * 1024 * 1024));
    assert_eq!(hc.nano_cpus, Some(500_000_000));
    let rp = hc.restart_policy.unwrap();
    assert_eq!(rp.name, Some(RestartPolicyNameEnum::ON_FAILURE));
    assert_eq!(rp.maximum_retry_count, Some(2));
    let bindings = hc.port_bindings.unwrap()["8080/tcp"].clone().unwrap();
    assert_eq!(bindings[0].host_ip.as_deref(), Some("127.0.0.1"));
    let nets = c.network_settings.unwrap().networks.unwrap();
    let ep = &nets[project.as_str()];
    assert!(
        ep.aliases.as_ref().unwrap().contains(&name),
        "alias {name} missing: {:?}",
        ep.aliases
    );

    // Secrets stay out of Debug.
    assert!(!format!("{env:?}").contains("hunter2"));

    // The variables reach the process (exec sees the container's environment).
    let out = env
        .exec(Slot::Blue, &["/usr/bin/env".to_string()])
        .await
        .unwrap();
    assert!(out.success());
    assert!(out.stdout.contains("DEMO_TOKEN=hunter2"), "{}", out.stdout);

    // The same release again changes nothing; another one replaces the container.
    let id = c.id.unwrap();
    assert_eq!(env.deploy(Slot::Blue, &rel).await.unwrap(), eps);
    let again = env.client().inspect_container(&name, None).await.unwrap();
    assert_eq!(
        again.id.unwrap(),
        id,
        "a redeploy of the same release replaced the container"
    );
    // A caller-given deployment id is used as the label; other `bluegreen.` labels are refused.
    let spoof = rel.clone().with_label(LABEL_PROJECT, "someone-else");
    let err = env.deploy(Slot::Blue, &spoof).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    env.deploy(
        Slot::Blue,
        &rel.clone()
            .with_env("APP_MODE", "other")
            .with_label(LABEL_DEPLOYMENT, "deploy-7"),
    )
    .await
    .unwrap();
    let replaced = env.client().inspect_container(&name, None).await.unwrap();
    assert_eq!(
        replaced.config.as_ref().unwrap().labels.as_ref().unwrap()[LABEL_DEPLOYMENT],
        "deploy-7"
    );
    assert_ne!(
        replaced.id.unwrap(),
        id,
        "changed env did not replace the container"
    );

    // A new handle (the next CLI invocation) reads the same slot from the engine.
    let other = DockerEnvironment::connect(env.config().clone())
        .await
        .unwrap();
    let mine = env.status(Slot::Blue).await.unwrap();
    let theirs = other.status(Slot::Blue).await.unwrap();
    assert_eq!(theirs.state, InstanceState::Running);
    assert_eq!(theirs, mine);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_argv_and_reports_exit_codes_and_logs_read_since_a_time() {
    if engine().await.is_none() {
        return;
    }
    let image = demo_image().await;
    let (env, _guard) = environment("exec", |c| c).await;
    let before = SystemTime::now() - Duration::from_secs(2);
    let err = env
        .exec(Slot::Blue, &["/usr/bin/true".to_string()])
        .await
        .unwrap_err();
    assert!(
        matches!(
            docker_error(&err),
            DockerError::NotRunning { slot: Slot::Blue }
        ),
        "{err}"
    );
    env.deploy(Slot::Blue, &release("v1", &image))
        .await
        .unwrap();

    // Like a migration run that fails: argv only, exit code and output come back.
    let argv: Vec<String> = ["/usr/bin/env", "DEMO_EXIT_CODE=4", "/bluegreen-demo"]
        .map(String::from)
        .to_vec();
    let out = env.exec(Slot::Blue, &argv).await.unwrap();
    assert_eq!(out.code, Some(4), "{out:?}");
    assert!(out.stderr.contains("DEMO_EXIT_CODE"), "{out:?}");
    let err = env.exec(Slot::Blue, &[]).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    let err = env
        .exec(Slot::Blue, &["/no/such/program".to_string()])
        .await;
    // The engine either refuses to start it or reports exit code 126/127.
    match err {
        Ok(out) => assert!(!out.success(), "{out:?}"),
        Err(e) => assert!(e.to_string().contains("/no/such/program"), "{e}"),
    }

    let logs = wait_logs(&env, before).await;
    assert!(logs.contains("listening on 0.0.0.0:8080"), "{logs}");
    let future = env
        .logs(
            Slot::Blue,
            Some(SystemTime::now() + Duration::from_secs(120)),
        )
        .await
        .unwrap();
    assert!(future.is_empty(), "{future}");
    assert_eq!(env.logs(Slot::Green, None).await.unwrap(), "");
}

async fn wait_logs(env: &DockerEnvironment, since: SystemTime) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = env.logs(Slot::Blue, Some(since)).await.unwrap();
        if logs.contains("listening") || Instant::now() > deadline {
            return logs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_healthcheck_is_reported_as_runtime_health() {
    if engine().await.is_none() {
        return;
    }
    let image = health_image().await;
    let (env, _guard) = environment("health", |c| c).await;
    env.deploy(Slot::Blue, &release("v1", &image))
        .await
        .unwrap();
    env.deploy(
        Slot::Green,
        &release("v2", &image).with_env("DEMO_FAIL_HEALTH", "1"),
    )
    .await
    .unwrap();
    let blue = wait_status(&env, Slot::Blue, "healthy", |s| {
        s.health == Some(RuntimeHealth::Healthy)
    })
    .await;
    assert_eq!(blue.state, InstanceState::Running);
    let green = wait_status(&env, Slot::Green, "unhealthy", |s| {
        s.health == Some(RuntimeHealth::Unhealthy)
    })
    .await;
    assert_eq!(green.state, InstanceState::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_image_with_pull_policy_never_fails_clearly() {
    if engine().await.is_none() {
        return;
    }
    let (env, _guard) = environment("noimage", |c| c.with_pull(PullPolicy::Never)).await;
    let err = env
        .deploy(
            Slot::Blue,
            &release("v1", "bluegreen-docker-test/absent:nope"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            docker_error(&err),
            DockerError::ImageMissing {
                policy: "never",
                ..
            }
        ),
        "{err}"
    );
    assert!(!err.is_retryable());
    let msg = err.to_string();
    assert!(
        msg.contains("bluegreen-docker-test/absent:nope") && msg.contains("docker build"),
        "{msg}"
    );
    assert_eq!(
        env.status(Slot::Blue).await.unwrap().state,
        InstanceState::Absent
    );
    assert!(env.containers().await.unwrap().is_empty());
    // An invalid reference never reaches the engine.
    let err = env
        .deploy(Slot::Blue, &release("v1", "bad image\nname"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_exits_at_once_fails_the_deploy_with_its_log_lines() {
    if engine().await.is_none() {
        return;
    }
    let image = demo_image().await;
    // The default restart policy (unless-stopped) turns a crash into a restart loop: still a
    // failed start.
    // A generous grace: a crash is reported as soon as it is seen, so it costs nothing here and
    // keeps a loaded machine from starting the crash after the grace.
    let grace = Duration::from_secs(15);
    let (env, _guard) = environment("crash", |c| c.with_startup_grace(grace)).await;
    let err = env
        .deploy(
            Slot::Blue,
            &release("v1", &image).with_env("DEMO_EXIT_CODE", "3"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(docker_error(&err), DockerError::ExitedAtStart { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("exit code 3") || msg.contains("restarted it"),
        "{msg}"
    );
    assert!(
        msg.contains("exiting with code 3 (DEMO_EXIT_CODE)"),
        "{msg}"
    );
    let st = env.status(Slot::Blue).await.unwrap();
    assert!(!st.is_up(), "{st:?}");
    env.remove(Slot::Blue).await.unwrap();
    assert_eq!(
        env.status(Slot::Blue).await.unwrap().state,
        InstanceState::Absent
    );

    // Without restarts the container stays exited, with its code.
    let (env, _guard2) = environment("crash-norestart", |c| {
        c.with_restart(RestartPolicy::No).with_startup_grace(grace)
    })
    .await;
    let err = env
        .deploy(
            Slot::Green,
            &release("v1", &image).with_env("DEMO_EXIT_CODE", "5"),
        )
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("exit code 5") && msg.contains("exiting with code 5 (DEMO_EXIT_CODE)"),
        "{msg}"
    );
    let st = env.status(Slot::Green).await.unwrap();
    assert_eq!(
        (st.state, st.exit_code),
        (InstanceState::Exited, Some(5)),
        "{st:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_container_with_the_slot_name_is_never_touched() {
    let Some(docker) = engine().await else { return };
    let image = demo_image().await;
    let (env, mut guard) = environment("clash", |c| c).await;
    let project = env.config().project.to_string();
    let name = format!("{project}-blue");
    guard.foreign.push(name.clone());
    let body = ContainerCreateBody {
        image: Some(image.clone()),
        labels: Some(HashMap::from([(
            "owner".to_string(),
            "someone-else".to_string(),
        )])),
        ..Default::default()
    };
    let created = docker
        .create_container(
            Some(CreateContainerOptionsBuilder::default().name(&name).build()),
            body,
        )
        .await
        .unwrap();
    docker.start_container(&created.id, None).await.unwrap();

    let err = env
        .deploy(Slot::Blue, &release("v1", &image))
        .await
        .unwrap_err();
    assert!(
        matches!(docker_error(&err), DockerError::NameClash { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&name) && msg.contains("left untouched"),
        "{msg}"
    );
    for res in [
        env.remove(Slot::Blue).await,
        env.stop(Slot::Blue, Duration::from_secs(1)).await,
        env.status(Slot::Blue).await.map(|_| ()),
    ] {
        let e = res.unwrap_err();
        assert!(
            matches!(docker_error(&e), DockerError::NameClash { .. }),
            "{e}"
        );
    }
    // The other slot is unaffected; reset removes ours only.
    env.deploy(Slot::Green, &release("v1", &image))
        .await
        .unwrap();
    let removed = env.reset().await.unwrap();
    assert!(removed.contains(&format!("{project}-green")), "{removed:?}");
    assert!(!removed.contains(&name), "{removed:?}");
    let foreign = docker.inspect_container(&name, None).await.unwrap();
    assert_eq!(foreign.id.unwrap(), created.id);
    assert_eq!(
        foreign.state.unwrap().running,
        Some(true),
        "the foreign container was stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_and_reset_touch_only_this_project() {
    if engine().await.is_none() {
        return;
    }
    let image = demo_image().await;
    let (a, _ga) = environment("own-a", |c| c).await;
    let (b, _gb) = environment("own-b", |c| c).await;
    a.deploy(Slot::Blue, &release("v1", &image)).await.unwrap();
    a.deploy(Slot::Green, &release("v2", &image)).await.unwrap();
    b.deploy(Slot::Blue, &release("v1", &image)).await.unwrap();

    a.stop(Slot::Green, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        a.status(Slot::Green).await.unwrap().state,
        InstanceState::Stopped
    );
    let removed = a.cleanup().await.unwrap();
    assert_eq!(removed, vec![a.config().container_name(Slot::Green)]);
    assert_eq!(
        a.status(Slot::Blue).await.unwrap().state,
        InstanceState::Running
    );

    let removed = a.reset().await.unwrap();
    let a_name = a.config().project.to_string();
    assert!(
        removed.contains(&a.config().container_name(Slot::Blue)) && removed.contains(&a_name),
        "{removed:?}"
    );
    assert!(a.containers().await.unwrap().is_empty());
    assert!(matches!(
        a.client().inspect_network(&a_name, None).await,
        Err(e) if e.to_string().contains("404") || e.to_string().contains("not found")
    ));
    assert_eq!(
        b.status(Slot::Blue).await.unwrap().state,
        InstanceState::Running,
        "resetting project a touched project b"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_policies_fail_clearly_when_the_registry_cannot_be_reached() {
    let Some(docker) = engine().await else { return };
    let image = demo_image().await;
    // A registry address on loopback where nothing listens: the pull fails at once, locally.
    let nowhere = bluegreen_testenv::port::RefusedAddr::new();
    let port = nowhere.port();
    let repo = format!("127.0.0.1:{port}/bluegreen-test/demo");
    let absent = format!("127.0.0.1:{port}/bluegreen-test/absent:nope");

    let (if_missing, _g1) = environment("pull-ifmissing", |c| c).await;
    let err = if_missing
        .deploy(Slot::Blue, &release("v1", &absent))
        .await
        .unwrap_err();
    assert!(
        matches!(
            docker_error(&err),
            DockerError::ImageMissing {
                policy: "if-missing",
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&absent) && msg.contains("pulling it failed"),
        "{msg}"
    );
    assert!(if_missing.containers().await.unwrap().is_empty());

    // A local copy under the registry's name: `always` still pulls, fails, and says so;
    // `if-missing` runs the local copy without pulling.
    docker
        .tag_image(
            &image,
            Some(
                bluegreen_docker::bollard::query_parameters::TagImageOptionsBuilder::default()
                    .repo(&repo)
                    .tag("present")
                    .build(),
            ),
        )
        .await
        .unwrap();
    let present = format!("{repo}:present");
    let (always, _g2) = environment("pull-always", |c| c.with_pull(PullPolicy::Always)).await;
    let err = always
        .deploy(Slot::Blue, &release("v1", &present))
        .await
        .unwrap_err();
    assert!(
        matches!(docker_error(&err), DockerError::PullFailed { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&present) && msg.contains("a local copy exists"),
        "{msg}"
    );
    assert!(always.containers().await.unwrap().is_empty());
    let eps = if_missing
        .deploy(Slot::Blue, &release("v1", &present))
        .await
        .unwrap();
    assert_eq!(
        get(&eps[0], "/").await.headers()["x-bluegreen-version"],
        "v1"
    );
    if_missing.reset().await.unwrap();
    docker
        .remove_image(
            &present,
            None::<bluegreen_docker::bollard::query_parameters::RemoveImageOptions>,
            None,
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_endpoints_are_reached_by_alias_from_another_container() {
    if engine().await.is_none() {
        return;
    }
    // The healthcheck image has bash, whose /dev/tcp makes a tiny HTTP client.
    let image = health_image().await;
    let (env, _guard) = environment("net", |c| {
        c.with_publish(bluegreen_docker::Publish::Network)
    })
    .await;
    let project = env.config().project.to_string();
    let eps = env
        .deploy(Slot::Blue, &release("v1", &image))
        .await
        .unwrap();
    assert_eq!(eps, vec![Endpoint::new(format!("{project}-blue"), 8080)]);
    env.deploy(Slot::Green, &release("v2", &image))
        .await
        .unwrap();
    let c = env
        .client()
        .inspect_container(&format!("{project}-blue"), None)
        .await
        .unwrap();
    assert!(
        c.host_config
            .unwrap()
            .port_bindings
            .unwrap_or_default()
            .is_empty(),
        "Publish::Network published a port"
    );

    // From green, ask blue by its alias (host and port are arguments, not part of the script).
    let script = "exec 3<>/dev/tcp/$1/$2 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && \
                  while IFS= read -r l <&3; do printf '%s\\n' \"$l\"; done";
    let argv: Vec<String> = vec![
        "/bin/bash".into(),
        "-c".into(),
        script.into(),
        "probe".into(),
        eps[0].host.clone(),
        eps[0].port.to_string(),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = env.exec(Slot::Green, &argv).await.unwrap();
        if out.success() {
            assert!(out.stdout.contains("version=v1 slot=blue"), "{out:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "blue never answered green: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_cannot_start_is_removed_and_the_error_says_why() {
    let Some(docker) = engine().await else { return };
    let base = demo_image().await;
    let tag = "bluegreen-docker-test/bad-entrypoint:environment";
    bluegreen_testenv::docker::ScratchImage::new(tag)
        .unwrap()
        .with_base(base)
        .with_entrypoint(["/no-such-program"])
        .build(&docker)
        .await
        .unwrap();
    let (env, _guard) = environment("nostart", |c| c).await;
    let err = env
        .deploy(Slot::Blue, &release("v1", tag))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("start container") && msg.contains("/no-such-program"),
        "{msg}"
    );
    assert_eq!(
        env.status(Slot::Blue).await.unwrap().state,
        InstanceState::Absent,
        "the unstarted container was left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deploys_of_both_slots_share_one_network() {
    if engine().await.is_none() {
        return;
    }
    let image = demo_image().await;
    let (env, _guard) = environment("concurrent", |c| c).await;
    let (v1, v2) = (release("v1", &image), release("v2", &image));
    let (blue, green) = tokio::join!(env.deploy(Slot::Blue, &v1), env.deploy(Slot::Green, &v2));
    let (blue, green) = (blue.unwrap(), green.unwrap());
    assert_ne!(blue, green, "both slots got the same endpoint");
    let project = env.config().project.to_string();
    let filters = HashMap::from([("name".to_string(), vec![project.clone()])]);
    let nets = env
        .client()
        .list_networks(Some(
            bluegreen_docker::bollard::query_parameters::ListNetworksOptionsBuilder::default()
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap();
    let exact: Vec<_> = nets
        .iter()
        .filter(|n| n.name.as_deref() == Some(project.as_str()))
        .collect();
    assert_eq!(exact.len(), 1, "{nets:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_healthcheck_replaces_or_disables_the_images() {
    if engine().await.is_none() {
        return;
    }
    let with_check = health_image().await;
    let without_check = demo_image().await;
    let fast = |argv: &[&str]| {
        Healthcheck::new(argv.iter().map(|s| s.to_string()).collect())
            .with_interval(Duration::from_millis(500))
            .with_retries(1)
    };

    // The image's check passes; the configured one (a command exiting 1) wins.
    let (failing, _g1) = environment("hc-fail", |c| {
        c.with_healthcheck(fast(&[
            "/usr/bin/env",
            "DEMO_EXIT_CODE=1",
            "/bluegreen-demo",
        ]))
    })
    .await;
    failing
        .deploy(Slot::Blue, &release("v1", &with_check))
        .await
        .unwrap();
    // An image without a HEALTHCHECK gets one from the configuration.
    let (added, _g2) =
        environment("hc-add", |c| c.with_healthcheck(fast(&["/usr/bin/true"]))).await;
    added
        .deploy(Slot::Blue, &release("v1", &without_check))
        .await
        .unwrap();
    // Disabled: no runtime health even though the image has a check.
    let (disabled, _g3) = environment("hc-off", |c| {
        c.with_health(bluegreen_docker::ContainerHealth::Disabled)
    })
    .await;
    disabled
        .deploy(Slot::Blue, &release("v1", &with_check))
        .await
        .unwrap();

    wait_status(&failing, Slot::Blue, "unhealthy", |s| {
        s.health == Some(RuntimeHealth::Unhealthy)
    })
    .await;
    wait_status(&added, Slot::Blue, "healthy", |s| {
        s.health == Some(RuntimeHealth::Healthy)
    })
    .await;
    // By now the image's check (every 500 ms) would have reported.
    let st = disabled.status(Slot::Blue).await.unwrap();
    assert_eq!(
        (st.state, st.health),
        (InstanceState::Running, None),
        "{st:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_drains_in_flight_requests_and_forces_a_stuck_container() {
    if engine().await.is_none() {
        return;
    }
    let image = demo_image().await;
    let (env, _guard) = environment("stop", |c| c).await;
    let eps = env
        .deploy(Slot::Blue, &release("v1", &image))
        .await
        .unwrap();
    env.deploy(
        Slot::Green,
        &release("v1", &image).with_env("DEMO_IGNORE_SIGTERM", "1"),
    )
    .await
    .unwrap();
    // The app answers before the slow request starts.
    assert!(get(&eps[0], "/health").await.status().is_success());

    // A request in flight when the stop starts still gets its answer.
    let url = eps[0].url("/slow?ms=1500");
    let slow = tokio::spawn(async move {
        let c = reqwest::Client::builder().no_proxy().build().unwrap();
        let r = c.get(url).send().await?;
        let status = r.status();
        let body = r.text().await?;
        Ok::<_, reqwest::Error>((status, body))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.stop(Slot::Blue, Duration::from_secs(20)).await.unwrap();
    let (status, body) = slow.await.unwrap().unwrap();
    assert!(status.is_success(), "{status} {body}");
    assert!(body.contains("version=v1"), "{body}");
    let st = env.status(Slot::Blue).await.unwrap();
    assert_eq!(
        (st.state, st.exit_code),
        (InstanceState::Stopped, Some(0)),
        "a graceful stop ends with exit code 0: {st:?}"
    );

    // A container that ignores SIGTERM is killed once the drain bound has passed.
    let started = Instant::now();
    env.stop(Slot::Green, Duration::from_secs(2)).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "stop did not wait for the drain bound: {:?}",
        started.elapsed()
    );
    let st = env.status(Slot::Green).await.unwrap();
    assert_eq!(
        (st.state, st.exit_code),
        (InstanceState::Stopped, Some(137)),
        "{st:?}"
    );
}
