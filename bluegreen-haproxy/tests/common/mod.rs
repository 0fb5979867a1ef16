//! Shared by the HAProxy tests: the throw-away HAProxy, the demo backends and the load generator
//! of `bluegreen-testenv`, and a keep-alive client that says which slot answered.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::time::Duration;

use bluegreen_core::{Error, Slot};
use bluegreen_haproxy::HaproxyError;
pub use bluegreen_testenv::haproxy::{available as haproxy_available, Haproxy};
pub use bluegreen_testenv::port::RefusedAddr;
pub use bluegreen_testenv::{DemoBackends as Demos, Load, LoadOptions, LoadStats};

/// The HAProxy binary (the caller checked [`haproxy_available`]).
pub fn haproxy_bin() -> std::path::PathBuf {
    bluegreen_testenv::haproxy::binary().expect("haproxy_available checked by the caller")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Which slot answered one request through HAProxy.
pub async fn served_by(client: &reqwest::Client, url: &str) -> Result<Slot, String> {
    let r = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = r.status();
    let slot = r
        .headers()
        .get("x-bluegreen-slot")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let _ = r.bytes().await;
    match (status.is_success(), slot) {
        (true, Some(s)) => s.parse::<Slot>().map_err(|e| e.to_string()),
        _ => Err(format!("status {status}")),
    }
}

/// The HaproxyError inside a core error.
pub fn haproxy_error(e: &Error) -> &HaproxyError {
    match e {
        Error::Backend {
            backend, source, ..
        } => {
            assert_eq!(backend, "haproxy");
            source
                .downcast_ref::<HaproxyError>()
                .unwrap_or_else(|| panic!("not a HaproxyError: {e}"))
        }
        other => panic!("expected Error::Backend, got {other:?}"),
    }
}
