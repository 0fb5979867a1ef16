//! An [`Environment`] served by the control API, so that the long-running proxy process (e.g.
//! `bluegreen serve`) owns the instances and every `bluegreen deploy` asks it through
//! [`RemoteEnvironment`].
//!
//! | method and path | body / answer |
//! |---|---|
//! | `GET /v1/environment/{slot}` | `SlotStatus` |
//! | `POST /v1/environment/{slot}/deploy` | `{"release": Release, "secret_env": {name: value}}` → `{"endpoints": [...]}` |
//! | `POST /v1/environment/{slot}/stop` | `{"drain_ms": n}` |
//! | `POST /v1/environment/{slot}/remove` | — |
//! | `POST /v1/environment/{slot}/exec` | `{"argv": [...]}` → `{"code", "stdout", "stderr"}` |
//! | `GET /v1/environment/{slot}/logs?since_ms=n` | `{"text": ...}` |
//!
//! The release's secret variables travel in the request body (over loopback, with the bearer
//! token) and are held in the serving process's memory only, so that it can restart the
//! instance with them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bluegreen_core::{
    Endpoint, Environment, Error, ExecOutput, Release, Result, Secret, Slot, SlotStatus,
};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::admin::{body, error, from_error, json, no_content};
use crate::{ProxyError, RemoteProxySwitch};

#[derive(Serialize, Deserialize)]
struct DeployBody {
    release: Release,
    #[serde(default)]
    secret_env: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
struct EndpointsBody {
    endpoints: Vec<Endpoint>,
}

#[derive(Serialize, Deserialize)]
struct StopBody {
    drain_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct ExecBody {
    argv: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct ExecAnswer {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

#[derive(Serialize, Deserialize)]
struct LogsBody {
    text: String,
}

/// Answers `/v1/environment/{slot}/...` requests (`rest` is what follows the slot).
pub(crate) async fn handle(
    env: Option<&Arc<dyn Environment>>,
    method: Method,
    slot: &str,
    rest: &[&str],
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let Some(env) = env else {
        return error(
            StatusCode::NOT_FOUND,
            "no_environment",
            "this server does not manage an environment",
        );
    };
    let slot: Slot = match slot.parse() {
        Ok(s) => s,
        Err(e) => return from_error(e),
    };
    match (method, rest) {
        (Method::GET, []) => match env.status(slot).await {
            Ok(st) => json(StatusCode::OK, &st),
            Err(e) => from_error(e),
        },
        (Method::POST, ["deploy"]) => {
            let b = match body::<DeployBody>(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let mut release = b.release;
            for (k, v) in b.secret_env {
                release = release.with_secret_env(k, v);
            }
            match env.deploy(slot, &release).await {
                Ok(endpoints) => json(StatusCode::OK, &EndpointsBody { endpoints }),
                Err(e) => from_error(e),
            }
        }
        (Method::POST, ["stop"]) => match body::<StopBody>(req).await {
            Ok(b) => match env.stop(slot, Duration::from_millis(b.drain_ms)).await {
                Ok(()) => no_content(),
                Err(e) => from_error(e),
            },
            Err(resp) => resp,
        },
        (Method::POST, ["remove"]) => match env.remove(slot).await {
            Ok(()) => no_content(),
            Err(e) => from_error(e),
        },
        (Method::POST, ["exec"]) => match body::<ExecBody>(req).await {
            Ok(b) => match env.exec(slot, &b.argv).await {
                Ok(out) => json(
                    StatusCode::OK,
                    &ExecAnswer {
                        code: out.code,
                        stdout: out.stdout,
                        stderr: out.stderr,
                    },
                ),
                Err(e) => from_error(e),
            },
            Err(resp) => resp,
        },
        (Method::GET, ["logs"]) => {
            let since = req.uri().query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("since_ms="))
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
            });
            match env.logs(slot, since).await {
                Ok(text) => json(StatusCode::OK, &LogsBody { text }),
                Err(e) => from_error(e),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such resource"),
    }
}

/// An [`Environment`] served by another process's control API (see
/// [`ProxySwitch::serve_admin_with_environment`](crate::ProxySwitch::serve_admin_with_environment)):
/// `bluegreen deploy` asks `bluegreen serve`, which owns and supervises the instances.
///
/// Errors of the served environment come back with their message and retryability, as
/// [`Error::Backend`] of backend `name`.
#[derive(Clone)]
pub struct RemoteEnvironment {
    api: RemoteProxySwitch,
    name: String,
}

impl fmt::Debug for RemoteEnvironment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteEnvironment")
            .field("api", &self.api)
            .field("name", &self.name)
            .finish()
    }
}

/// Bound on a deploy or remove through the API (the served environment bounds its own stops).
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(600);

impl RemoteEnvironment {
    /// A client of the environment served at `base_url` (e.g. `http://127.0.0.1:8081`), whose
    /// backend is called `name` (e.g. `process`) in errors and events.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a URL that is not `http://` or `https://`.
    pub fn new(
        base_url: impl Into<String>,
        token: Secret,
        name: impl Into<String>,
    ) -> Result<Self> {
        Ok(RemoteEnvironment {
            api: RemoteProxySwitch::new(base_url, token)?,
            name: name.into(),
        })
    }

    async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        method: reqwest::Method,
        slot: Slot,
        what: &str,
        body: Option<serde_json::Value>,
        timeout: Duration,
        op: &'static str,
    ) -> Result<Option<T>> {
        let path = if what.is_empty() {
            format!("/v1/environment/{slot}")
        } else {
            format!("/v1/environment/{slot}/{what}")
        };
        let resp = self
            .api
            .call_as(&self.name, method, &path, body, timeout, op)
            .await?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        resp.json()
            .await
            .map(Some)
            .map_err(|e| ProxyError::Answer(e).into_core(op))
    }

    fn missing(op: &str) -> Error {
        Error::backend(
            crate::NAME,
            op.to_string(),
            false,
            std::io::Error::other("the control API answered without a body"),
        )
    }
}

#[async_trait]
impl Environment for RemoteEnvironment {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deploy(&self, slot: Slot, release: &Release) -> Result<Vec<Endpoint>> {
        let body = serde_json::json!({
            "release": release,
            "secret_env": release
                .secret_env
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_string()))
                .collect::<BTreeMap<_, _>>(),
        });
        let b: EndpointsBody = self
            .call(
                reqwest::Method::POST,
                slot,
                "deploy",
                Some(body),
                DEPLOY_TIMEOUT,
                "deploy",
            )
            .await?
            .ok_or_else(|| Self::missing("deploy"))?;
        Ok(b.endpoints)
    }

    async fn status(&self, slot: Slot) -> Result<SlotStatus> {
        self.call(
            reqwest::Method::GET,
            slot,
            "",
            None,
            Duration::from_secs(30),
            "status",
        )
        .await?
        .ok_or_else(|| Self::missing("status"))
    }

    async fn stop(&self, slot: Slot, drain: Duration) -> Result<()> {
        let body = serde_json::to_value(StopBody {
            drain_ms: u64::try_from(drain.as_millis()).unwrap_or(u64::MAX),
        })
        .map_err(|e| Error::backend(crate::NAME, "stop", false, e))?;
        self.call::<serde_json::Value>(
            reqwest::Method::POST,
            slot,
            "stop",
            Some(body),
            drain.saturating_add(Duration::from_secs(60)),
            "stop",
        )
        .await
        .map(|_| ())
    }

    async fn remove(&self, slot: Slot) -> Result<()> {
        self.call::<serde_json::Value>(
            reqwest::Method::POST,
            slot,
            "remove",
            None,
            DEPLOY_TIMEOUT,
            "remove",
        )
        .await
        .map(|_| ())
    }

    async fn exec(&self, slot: Slot, argv: &[String]) -> Result<ExecOutput> {
        let body = serde_json::json!({ "argv": argv });
        let a: ExecAnswer = self
            .call(
                reqwest::Method::POST,
                slot,
                "exec",
                Some(body),
                // The served environment bounds the command itself.
                Duration::from_secs(24 * 3600),
                "exec",
            )
            .await?
            .ok_or_else(|| Self::missing("exec"))?;
        Ok(ExecOutput {
            code: a.code,
            stdout: a.stdout,
            stderr: a.stderr,
        })
    }

    async fn logs(&self, slot: Slot, since: Option<SystemTime>) -> Result<String> {
        let what = match since {
            Some(t) => format!(
                "logs?since_ms={}",
                t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()
            ),
            None => "logs".to_string(),
        };
        let b: LogsBody = self
            .call(
                reqwest::Method::GET,
                slot,
                &what,
                None,
                Duration::from_secs(30),
                "logs",
            )
            .await?
            .ok_or_else(|| Self::missing("logs"))?;
        Ok(b.text)
    }
}
