//! The supervisor against the real `bluegreen-demo` executable and a file state store: only the
//! live slot is restarted, on its port, and never while a run holds the lock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bluegreen_core::{
    DeploymentState, Environment, FileStateStore, LockOwner, Release, Slot, StateStore,
};
use bluegreen_process::{
    OnLiveFailure, ProcessConfig, ProcessEnvironment, Supervisor, SupervisorConfig, SupervisorEvent,
};
use tokio::sync::broadcast;

struct KillOnDrop(ProcessEnvironment);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.kill_all();
    }
}

fn demo(version: &str) -> Release {
    Release::new(version, bluegreen_demo::binary_path().to_string_lossy())
        .unwrap()
        .with_secret_env("APP_TOKEN", "kept-in-memory")
}

fn kill_9(pid: u32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
}

/// The next event for which `want` holds, within `within`.
async fn wait_for(
    events: &mut broadcast::Receiver<SupervisorEvent>,
    within: Duration,
    want: impl Fn(&SupervisorEvent) -> bool,
) -> Option<SupervisorEvent> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(e)) if want(&e) => return Some(e),
            Ok(Ok(_)) => {}
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            _ => return None,
        }
    }
}

async fn crashed_for_a_while(env: &ProcessEnvironment, slot: Slot) -> bool {
    tokio::time::sleep(Duration::from_millis(800)).await;
    env.crashed(slot).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_live_slot_is_restarted_on_its_port_and_never_under_a_held_lock() {
    let dir = tempfile::tempdir().unwrap();
    let env = ProcessEnvironment::new(ProcessConfig::new(dir.path().join("process")));
    let _guard = KillOnDrop(env.clone());
    let store: Arc<dyn StateStore> =
        Arc::new(FileStateStore::new(dir.path().join("state")).unwrap());
    let owner = LockOwner::current("test");
    let lease = store
        .acquire(&owner, Duration::from_secs(30))
        .await
        .unwrap();
    let mut state = DeploymentState::default();
    state.active = Some(Slot::Blue);
    store.save(&state, &lease).await.unwrap();
    store.release(&lease).await.unwrap();

    let blue = env.deploy(Slot::Blue, &demo("v1")).await.unwrap();
    env.deploy(Slot::Green, &demo("v2")).await.unwrap();
    let config = SupervisorConfig::default()
        .with_check_interval(Duration::from_millis(50))
        .with_backoff(Duration::from_millis(100), Duration::from_secs(1));
    let handle = Supervisor::new(env.clone(), store.clone(), config).start();
    let mut events = handle.subscribe();

    // The idle slot is the engine's business: left as it is.
    kill_9(env.pid(Slot::Green).unwrap().unwrap());
    assert!(crashed_for_a_while(&env, Slot::Green).await);

    // The live one comes back on the same port, with its secret variable.
    let pid = env.pid(Slot::Blue).unwrap().unwrap();
    kill_9(pid);
    let restarted = wait_for(&mut events, Duration::from_secs(10), |e| {
        matches!(
            e,
            SupervisorEvent::Restarted {
                slot: Slot::Blue,
                ..
            }
        )
    })
    .await;
    assert!(restarted.is_some(), "blue was not restarted");
    let again = env.pid(Slot::Blue).unwrap().unwrap();
    assert_ne!(again, pid);
    let st = env.status(Slot::Blue).await.unwrap();
    assert_eq!(st.endpoints, blue, "restarted elsewhere");
    let environ = std::fs::read(format!("/proc/{again}/environ")).unwrap();
    assert!(environ
        .split(|b| *b == 0)
        .any(|kv| kv.starts_with(b"APP_TOKEN=")));

    // While a run holds the lock, the supervisor keeps out; once it is released, it acts.
    let lease = store
        .acquire(&owner, Duration::from_secs(30))
        .await
        .unwrap();
    kill_9(again);
    assert!(crashed_for_a_while(&env, Slot::Blue).await);
    store.release(&lease).await.unwrap();
    let restarted = wait_for(&mut events, Duration::from_secs(10), |e| {
        matches!(
            e,
            SupervisorEvent::Restarted {
                slot: Slot::Blue,
                ..
            }
        )
    })
    .await;
    assert!(restarted.is_some(), "blue was not restarted after the lock");
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_policy_none_the_live_slot_stays_down_and_a_new_handle_cannot_restart_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let env = ProcessEnvironment::new(ProcessConfig::new(dir.path().join("process")));
    let _guard = KillOnDrop(env.clone());
    let store: Arc<dyn StateStore> =
        Arc::new(FileStateStore::new(dir.path().join("state")).unwrap());
    let lease = store
        .acquire(&LockOwner::current("test"), Duration::from_secs(30))
        .await
        .unwrap();
    let mut state = DeploymentState::default();
    state.active = Some(Slot::Green);
    store.save(&state, &lease).await.unwrap();
    store.release(&lease).await.unwrap();

    env.deploy(Slot::Green, &demo("v1")).await.unwrap();
    let config = SupervisorConfig::default()
        .with_check_interval(Duration::from_millis(50))
        .with_on_live_failure(OnLiveFailure::None);
    let handle = Supervisor::new(env.clone(), store, config).start();
    let mut events = handle.subscribe();
    kill_9(env.pid(Slot::Green).unwrap().unwrap());
    let down = wait_for(&mut events, Duration::from_secs(10), |e| {
        matches!(e, SupervisorEvent::Down { slot: Slot::Green })
    })
    .await;
    assert!(down.is_some(), "the death was not reported");
    assert!(crashed_for_a_while(&env, Slot::Green).await);
    handle.shutdown().await;

    // A handle that never held the release's secrets refuses to start it without them.
    let other = ProcessEnvironment::new(ProcessConfig::new(dir.path().join("process")));
    let err = other.restart(Slot::Green).await.unwrap_err();
    assert!(
        err.to_string().contains("APP_TOKEN") && !err.to_string().contains("kept-in-memory"),
        "{err}"
    );
    assert!(other.crashed(Slot::Green).unwrap());
    // The one that deployed it can.
    assert!(env.restart(Slot::Green).await.unwrap());
    assert!(!env.crashed(Slot::Green).unwrap());
}
