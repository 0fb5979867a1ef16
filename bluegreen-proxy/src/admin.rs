//! The proxy's control API, so that a long-running proxy (e.g. `bluegreen serve`) can be switched
//! from other processes (e.g. each `bluegreen deploy` invocation) through [`RemoteProxySwitch`].
//!
//! HTTP/1.1 on its own listener (keep it on loopback), every request authenticated with
//! `Authorization: Bearer <token>`; JSON bodies of at most 1 MiB:
//!
//! | method and path | body / answer |
//! |---|---|
//! | `GET /v1/state` | `{"split": TrafficSplit or null, "preview": slot or null, "paused": bool}` |
//! | `PUT /v1/split` | `{"split": TrafficSplit, "endpoints": {"blue": [...], "green": [...]}}` |
//! | `PUT /v1/preview` | `{"slot": slot or null, "endpoints": {...}}` |
//! | `GET /v1/slots/{slot}/in-flight` | `{"in_flight": n}` |
//! | `GET /v1/slots/{slot}/metrics` | `SlotMetrics` |
//! | `GET /v1/counters` | `SwitchCounters` (the traffic ledger's snapshot) |
//! | `GET /metrics` | the counters in the Prometheus text format (scrape with a bearer token) |
//! | `POST /v1/pause`, `POST /v1/resume` | — |
//! | `/v1/environment/{slot}/…` | the served [`Environment`], see [`RemoteEnvironment`](crate::RemoteEnvironment) |
//!
//! Errors answer 400 (invalid input), 401 (token), 404, 501 (unsupported) or 500 with
//! `{"kind": ..., "message": ...}`.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bluegreen_core::{
    Capabilities, Endpoints, Environment, Error, Result, Secret, Slot, SlotMetrics, SwitchCounters,
    TrafficSplit, TrafficSwitch, TrafficSwitchExt,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{ProxyError, ProxySwitch};

const MAX_BODY: usize = 1 << 20;

/// What `GET /v1/state` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminState {
    /// The split in force.
    pub split: Option<TrafficSplit>,
    /// The slot receiving preview traffic.
    pub preview: Option<Slot>,
    /// Whether new requests are held.
    pub paused: bool,
}

#[derive(Serialize, Deserialize)]
struct ApplyBody {
    split: TrafficSplit,
    endpoints: Endpoints,
}

#[derive(Serialize, Deserialize)]
struct PreviewBody {
    slot: Option<Slot>,
    endpoints: Endpoints,
}

#[derive(Serialize, Deserialize)]
struct InFlightBody {
    in_flight: u64,
}

#[derive(Serialize, Deserialize)]
struct ErrorBody {
    kind: String,
    message: String,
    /// Whether the failed call may succeed if tried again.
    #[serde(default)]
    retryable: bool,
}

/// A running control API. Stops on [`AdminServer::shutdown`] or when dropped.
pub struct AdminServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for AdminServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl AdminServer {
    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL (`http://addr`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting and waits for the accept loop to end.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl ProxySwitch {
    /// Serves the control API on `listen`, accepting requests that carry `token`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an empty or short token (fewer than 16 characters);
    /// [`Error::Io`] when the address cannot be bound.
    pub async fn serve_admin(&self, listen: SocketAddr, token: Secret) -> Result<AdminServer> {
        self.serve_admin_with_environment(listen, token, None).await
    }

    /// [`serve_admin`](Self::serve_admin), also serving `environment` under
    /// `/v1/environment/…` for [`RemoteEnvironment`](crate::RemoteEnvironment) clients: this
    /// process then owns the instances other processes deploy.
    ///
    /// # Errors
    /// As [`serve_admin`](Self::serve_admin).
    pub async fn serve_admin_with_environment(
        &self,
        listen: SocketAddr,
        token: Secret,
        environment: Option<Arc<dyn Environment>>,
    ) -> Result<AdminServer> {
        if token.expose().len() < 16 {
            return Err(Error::invalid(
                "admin token",
                "<redacted>",
                "must be at least 16 characters",
            ));
        }
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| Error::io(format!("binding the proxy admin API to {listen}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("reading the admin API address", e))?;
        let (stop, mut stopped) = watch::channel(false);
        let switch = self.clone();
        let token = Arc::new(token);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        };
                        let (switch, token, env) =
                            (switch.clone(), token.clone(), environment.clone());
                        let svc = service_fn(move |req| {
                            let (switch, token, env) = (switch.clone(), token.clone(), env.clone());
                            async move {
                                Ok::<_, Infallible>(handle(&switch, &token, env.as_ref(), req).await)
                            }
                        });
                        tokio::spawn(async move {
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                    _ = stopped.changed() => return,
                }
            }
        });
        Ok(AdminServer {
            addr,
            stop,
            task: Some(task),
        })
    }
}

pub(crate) fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(body).expect("serializable"),
        )))
        .expect("valid response")
}

pub(crate) fn no_content() -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Full::new(Bytes::new()))
        .expect("valid response")
}

pub(crate) fn error(
    status: StatusCode,
    kind: &str,
    message: impl Into<String>,
) -> Response<Full<Bytes>> {
    json(
        status,
        &ErrorBody {
            kind: kind.into(),
            message: message.into(),
            retryable: false,
        },
    )
}

pub(crate) fn from_error(e: Error) -> Response<Full<Bytes>> {
    match &e {
        Error::InvalidInput { .. } => error(StatusCode::BAD_REQUEST, "invalid", e.to_string()),
        Error::Unsupported { .. } => {
            error(StatusCode::NOT_IMPLEMENTED, "unsupported", e.to_string())
        }
        _ => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &ErrorBody {
                kind: "backend".into(),
                message: e.to_string(),
                retryable: e.is_retryable(),
            },
        ),
    }
}

/// Compares without an early exit on the first differing byte.
fn same_token(given: &[u8], want: &[u8]) -> bool {
    given.len() == want.len()
        && given
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

pub(crate) async fn body<T: for<'de> Deserialize<'de>>(
    req: Request<Incoming>,
) -> std::result::Result<T, Response<Full<Bytes>>> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("reading the body: {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("malformed JSON: {e}"),
        )
    })
}

async fn handle(
    switch: &ProxySwitch,
    token: &Secret,
    env: Option<&Arc<dyn Environment>>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| same_token(t.as_bytes(), token.expose().as_bytes()))
        .unwrap_or(false);
    if !authorized {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        );
    }
    let path: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (method, path.as_slice()) {
        (method, ["v1", "environment", slot, rest @ ..]) => {
            let (slot, rest) = (slot.to_string(), rest.to_vec());
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
            crate::remote_env::handle(env, method, &slot, &rest, req).await
        }
        (Method::GET, ["v1", "state"]) => {
            let split = match switch.current().await {
                Ok(s) => s,
                Err(e) => return from_error(e),
            };
            json(
                StatusCode::OK,
                &AdminState {
                    split,
                    preview: switch.preview_slot(),
                    paused: switch.is_paused(),
                },
            )
        }
        (Method::PUT, ["v1", "split"]) => match body::<ApplyBody>(req).await {
            Ok(b) => match switch.apply(&b.split, &b.endpoints).await {
                Ok(()) => no_content(),
                Err(e) => from_error(e),
            },
            Err(resp) => resp,
        },
        (Method::PUT, ["v1", "preview"]) => match body::<PreviewBody>(req).await {
            Ok(b) => match switch.preview(b.slot, &b.endpoints).await {
                Ok(()) => no_content(),
                Err(e) => from_error(e),
            },
            Err(resp) => resp,
        },
        (Method::GET, ["v1", "slots", slot, what]) => {
            let slot: Slot = match slot.parse() {
                Ok(s) => s,
                Err(e) => return from_error(e),
            };
            match *what {
                "in-flight" => match switch.in_flight(slot).await {
                    Ok(n) => json(StatusCode::OK, &InFlightBody { in_flight: n }),
                    Err(e) => from_error(e),
                },
                "metrics" => match switch.metrics(slot).await {
                    Ok(m) => json(StatusCode::OK, &m),
                    Err(e) => from_error(e),
                },
                _ => error(StatusCode::NOT_FOUND, "not_found", "no such resource"),
            }
        }
        (Method::GET, ["v1", "counters"]) => match switch.counters().await {
            Ok(c) => json(StatusCode::OK, &c),
            Err(e) => from_error(e),
        },
        (Method::GET, ["metrics"]) => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .body(Full::new(Bytes::from(switch.prometheus_metrics())))
            .expect("valid response"),
        (Method::POST, ["v1", "pause"]) => match switch.pause().await {
            Ok(()) => no_content(),
            Err(e) => from_error(e),
        },
        (Method::POST, ["v1", "resume"]) => match switch.resume().await {
            Ok(()) => no_content(),
            Err(e) => from_error(e),
        },
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such resource"),
    }
}

/// A [`TrafficSwitch`] driving a [`ProxySwitch`] in another process through its control API.
///
/// ```no_run
/// # async fn run() -> bluegreen_core::Result<()> {
/// use bluegreen_core::{Secret, TrafficSwitch};
/// use bluegreen_proxy::RemoteProxySwitch;
/// let switch = RemoteProxySwitch::new("http://127.0.0.1:8081", Secret::new("a-long-random-token"))?;
/// println!("{:?}", switch.current().await?);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RemoteProxySwitch {
    base: String,
    token: Secret,
    client: reqwest::Client,
}

impl fmt::Debug for RemoteProxySwitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteProxySwitch")
            .field("base", &self.base)
            .field("token", &self.token)
            .finish()
    }
}

impl RemoteProxySwitch {
    /// A client of the control API at `base_url` (e.g. `http://127.0.0.1:8081`).
    pub fn new(base_url: impl Into<String>, token: Secret) -> Result<Self> {
        let base = base_url.into().trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(Error::invalid(
                "admin URL",
                base,
                "expected http:// or https://",
            ));
        }
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ProxyError::Client(e).into_core("admin client"))?;
        Ok(RemoteProxySwitch {
            base,
            token,
            client,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
        op: &'static str,
    ) -> Result<reqwest::Response> {
        self.call_as(crate::NAME, method, path, body, Duration::from_secs(30), op)
            .await
    }

    /// A request bounded by `timeout`; a failure of the served backend is reported as one of
    /// `backend`.
    pub(crate) async fn call_as(
        &self,
        backend: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
        timeout: Duration,
        op: &'static str,
    ) -> Result<reqwest::Response> {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.token.expose())
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|source| {
            ProxyError::Unreachable {
                base: self.base.clone(),
                source,
            }
            .into_core(op)
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let err: ErrorBody = resp.json().await.unwrap_or(ErrorBody {
            kind: "backend".into(),
            message: format!("HTTP {status}"),
            retryable: false,
        });
        Err(match err.kind.as_str() {
            "invalid" => Error::invalid("proxy request", op.to_string(), err.message),
            "unsupported" => Error::unsupported(op, backend.to_string()),
            "unauthorized" => ProxyError::Unauthorized.into_core(op),
            "backend" if backend != crate::NAME => Error::backend(
                backend.to_string(),
                op.to_string(),
                err.retryable,
                ProxyError::Api {
                    status: status.as_u16(),
                    message: err.message,
                },
            ),
            _ => ProxyError::Api {
                status: status.as_u16(),
                message: err.message,
            }
            .into_core(op),
        })
    }

    /// The proxy's state: split, preview slot, paused.
    pub async fn state(&self) -> Result<AdminState> {
        self.call(reqwest::Method::GET, "/v1/state", None, "state")
            .await?
            .json()
            .await
            .map_err(|e| ProxyError::Answer(e).into_core("state"))
    }
}

#[async_trait]
impl TrafficSwitch for RemoteProxySwitch {
    fn name(&self) -> &str {
        crate::NAME
    }

    fn capabilities(&self) -> Capabilities {
        crate::switch::capabilities()
    }

    async fn apply(&self, split: &TrafficSplit, endpoints: &Endpoints) -> Result<()> {
        self.check_split(split, endpoints)?;
        let body = serde_json::to_value(ApplyBody {
            split: split.clone(),
            endpoints: endpoints.clone(),
        })
        .expect("serializable");
        self.call(reqwest::Method::PUT, "/v1/split", Some(body), "apply")
            .await
            .map(|_| ())
    }

    async fn current(&self) -> Result<Option<TrafficSplit>> {
        Ok(self.state().await?.split)
    }

    async fn preview(&self, slot: Option<Slot>, endpoints: &Endpoints) -> Result<()> {
        let body = serde_json::to_value(PreviewBody {
            slot,
            endpoints: endpoints.clone(),
        })
        .expect("serializable");
        self.call(reqwest::Method::PUT, "/v1/preview", Some(body), "preview")
            .await
            .map(|_| ())
    }

    async fn in_flight(&self, slot: Slot) -> Result<u64> {
        let b: InFlightBody = self
            .call(
                reqwest::Method::GET,
                &format!("/v1/slots/{slot}/in-flight"),
                None,
                "in_flight",
            )
            .await?
            .json()
            .await
            .map_err(|e| ProxyError::Answer(e).into_core("in_flight"))?;
        Ok(b.in_flight)
    }

    async fn metrics(&self, slot: Slot) -> Result<SlotMetrics> {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/slots/{slot}/metrics"),
            None,
            "metrics",
        )
        .await?
        .json()
        .await
        .map_err(|e| ProxyError::Answer(e).into_core("metrics"))
    }

    async fn counters(&self) -> Result<SwitchCounters> {
        self.call(reqwest::Method::GET, "/v1/counters", None, "counters")
            .await?
            .json()
            .await
            .map_err(|e| ProxyError::Answer(e).into_core("counters"))
    }

    async fn pause(&self) -> Result<()> {
        self.call(reqwest::Method::POST, "/v1/pause", None, "pause")
            .await
            .map(|_| ())
    }

    async fn resume(&self) -> Result<()> {
        self.call(reqwest::Method::POST, "/v1/resume", None, "resume")
            .await
            .map(|_| ())
    }
}
