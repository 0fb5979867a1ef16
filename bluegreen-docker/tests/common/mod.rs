//! Shared helpers of the Docker tests: the engine (or a skip), test images built once per test
//! binary, unique project names, and guards that remove what a test created.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bluegreen_core::Release;
use bluegreen_docker::{DockerConfig, DockerEnvironment, Healthcheck};
use tokio::sync::OnceCell;

pub use bluegreen_testenv::docker::engine;
use bluegreen_testenv::docker::ScratchImage;

fn binary_tag(what: &str) -> String {
    format!(
        "bluegreen-docker-test/{what}:{}",
        env!("CARGO_CRATE_NAME").replace('_', "-")
    )
}

/// The demo app image (plus `/usr/bin/env` and `/usr/bin/true` for exec tests), built once per
/// test binary. Returns its tag.
pub async fn demo_image() -> String {
    static IMAGE: OnceCell<String> = OnceCell::const_new();
    IMAGE
        .get_or_init(|| async {
            let tag = binary_tag("demo");
            let docker = engine().await.expect("engine checked by the caller");
            ScratchImage::demo(&tag, bluegreen_demo::binary_path())
                .unwrap()
                .with_executable("/usr/bin/env", "/usr/bin/env")
                .with_executable("/usr/bin/true", "/usr/bin/true")
                .with_label("bluegreen.test", "1")
                .build(&docker)
                .await
                .unwrap_or_else(|e| panic!("building the demo image failed: {e}"));
            tag
        })
        .await
        .clone()
}

/// The demo image with a `HEALTHCHECK` (bash probing `/health` on `$PORT`), built once per test
/// binary on top of [`demo_image`].
pub async fn health_image() -> String {
    static IMAGE: OnceCell<String> = OnceCell::const_new();
    let base = demo_image().await;
    IMAGE
        .get_or_init(|| async {
            let tag = binary_tag("demo-healthcheck");
            let docker = engine().await.expect("engine checked by the caller");
            // A fixed script in the test image, no input reaches it.
            let probe = "exec 3<>/dev/tcp/127.0.0.1/${PORT:-8080} && \
                         printf 'GET /health HTTP/1.0\\r\\n\\r\\n' >&3 && \
                         IFS= read -r line <&3 && [[ $line == *' 200 '* ]]";
            ScratchImage::new(&tag)
                .unwrap()
                .with_base(base)
                .with_executable("/bin/bash", "/bin/bash")
                .with_healthcheck(
                    Healthcheck::new(vec!["/bin/bash".into(), "-c".into(), probe.into()])
                        .with_interval(Duration::from_millis(500))
                        .with_retries(2),
                )
                .build(&docker)
                .await
                .unwrap_or_else(|e| panic!("building the healthcheck image failed: {e}"));
            tag
        })
        .await
        .clone()
}

/// A project name unique to this test run and call.
pub fn project(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("bgt-{prefix}-{}-{n}", std::process::id())
}

/// A release of `image` with knobs from the test's own environment cleared.
pub fn release(version: &str, image: &str) -> Release {
    Release::new(version, image).unwrap()
}

/// Removes every container and network of `project` (and the named foreign containers) when
/// dropped, whatever happened in the test: on a thread with its own runtime and client, since
/// the test's runtime may be gone.
pub struct Cleanup {
    pub project: String,
    pub foreign: Vec<String>,
}

impl Cleanup {
    pub fn new(project: &str) -> Self {
        Cleanup {
            project: project.to_string(),
            foreign: Vec::new(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let project = self.project.clone();
        let foreign = std::mem::take(&mut self.foreign);
        let t = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(env) = DockerEnvironment::connect(
                    DockerConfig::new(&project)
                        .unwrap()
                        .with_stop_timeout(Duration::from_secs(2)),
                )
                .await
                else {
                    return;
                };
                for name in foreign {
                    let _ = env
                        .client()
                        .remove_container(
                            &name,
                            Some(
                                bluegreen_docker::bollard::query_parameters::RemoveContainerOptionsBuilder::default()
                                    .force(true)
                                    .build(),
                            ),
                        )
                        .await;
                }
                if let Err(e) = env.reset().await {
                    eprintln!("cleanup of project {project} failed: {e}");
                }
            });
        });
        let _ = t.join();
    }
}

/// An environment for a fresh project with short timeouts, and its cleanup guard.
pub async fn environment(
    prefix: &str,
    config: impl FnOnce(DockerConfig) -> DockerConfig,
) -> (DockerEnvironment, Cleanup) {
    let project = project(prefix);
    let guard = Cleanup::new(&project);
    let env = DockerEnvironment::connect(config(
        DockerConfig::new(&project)
            .unwrap()
            .with_stop_timeout(Duration::from_secs(5)),
    ))
    .await
    .unwrap();
    (env, guard)
}

/// A Deployer of `env` switching through `proxy`: the file state store in `dir`, `/health`
/// checks (500 ms each), the data path proved through the proxy by the version header.
pub fn proxy_deployer(
    env: std::sync::Arc<dyn bluegreen_core::Environment>,
    proxy: &bluegreen_proxy::ProxySwitch,
    dir: &std::path::Path,
    policy: bluegreen_core::Policy,
) -> bluegreen_core::Deployer {
    switch_deployer(
        env,
        std::sync::Arc::new(proxy.clone()),
        proxy.url("/"),
        dir,
        policy,
    )
}

/// A Deployer of `env` switching through `switch` (any switch): the file state store in `dir`,
/// `/health` checks (500 ms each), the data path proved at `url` (the switch's public address)
/// by the version header.
pub fn switch_deployer(
    env: std::sync::Arc<dyn bluegreen_core::Environment>,
    switch: std::sync::Arc<dyn bluegreen_core::TrafficSwitch>,
    url: String,
    dir: &std::path::Path,
    policy: bluegreen_core::Policy,
) -> bluegreen_core::Deployer {
    use std::sync::Arc;
    bluegreen_core::Deployer::builder()
        .environment(env)
        .switch(switch)
        .store(Arc::new(
            bluegreen_core::FileStateStore::new(dir.join("state")).unwrap(),
        ))
        .verify_data_path(Arc::new(bluegreen_core::HttpVersionProbe::new(
            url,
            bluegreen_core::VersionMarker::Header("x-bluegreen-version".into()),
        )))
        .health_check(Arc::new(
            bluegreen_core::health::HttpCheck::new("/health")
                .with_timeout(Duration::from_millis(500)),
        ))
        .policy(policy)
        .build()
        .unwrap()
}

/// Keep-alive clients through the proxy, 2 ms apart; counts answers and failures.
pub fn proxy_load(proxy: &bluegreen_proxy::ProxySwitch) -> bluegreen_testenv::Load {
    load_at(proxy.local_addr())
}

/// Keep-alive clients to `addr` (a switch's public address), 2 ms apart; counts answers and
/// failures.
pub fn load_at(addr: std::net::SocketAddr) -> bluegreen_testenv::Load {
    bluegreen_testenv::Load::start(
        addr,
        bluegreen_testenv::LoadOptions::new(4).with_pause(Duration::from_millis(2)),
    )
}

/// The version the proxy serves now (its `x-bluegreen-version` header).
pub async fn served_version(proxy: &bluegreen_proxy::ProxySwitch) -> String {
    version_at(&proxy.url("/")).await
}

/// The version `url` serves now (its `x-bluegreen-version` header).
pub async fn version_at(url: &str) -> String {
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = c.get(url).send().await.unwrap();
    r.headers()["x-bluegreen-version"]
        .to_str()
        .unwrap()
        .to_string()
}
