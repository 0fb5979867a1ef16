//! TEST DOUBLE of Traefik's HTTP API — this is **not Traefik**.
//!
//! Why a double: no Traefik binary can be installed on the machines this project is built and
//! tested on (no Debian package, no network downloads), so the switch cannot be run against a real
//! Traefik here. This double stands in for the two things the switch relies on, and nothing else:
//!
//! - **The file provider's reload**: a background task re-reads the watched directory like
//!   Traefik's file provider — only `.yml`, `.yaml` and `.toml` files, all merged — and, after a
//!   throttle delay (Traefik's `providersThrottleDuration`), publishes the new configuration. A
//!   file that does not parse, or does not validate against Traefik's v3 JSON schema, means the
//!   new configuration is ignored and the previous one stays, as Traefik does when a provider's
//!   configuration cannot be loaded; a name defined in two files keeps its first definition
//!   (files in name order), as the file provider does.
//! - **The API's documented answers** (Traefik `pkg/api/handler_http.go`):
//!   `GET /api/http/services/{name}@file` → the service's dynamic configuration plus `name`,
//!   `provider`, `status`, `type`, `usedBy` (and `serverStatus` for load balancers);
//!   `GET /api/http/routers/{name}@file` → the router's configuration plus `name`, `provider`,
//!   `status`, `using`; an unknown name → 404 `{"message": "… not found: …"}`;
//!   `GET /api/version`.
//!
//! It does not route requests: data-path behaviour needs a real Traefik.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::task::JoinHandle;

/// The official schemas (copies in `schemas/`), compiled.
pub fn schemas() -> Vec<(&'static str, jsonschema::Validator)> {
    let load = |text: &str| {
        let schema: Value = serde_json::from_str(text).expect("schema is JSON");
        jsonschema::validator_for(&schema).expect("schema compiles")
    };
    vec![
        (
            "v2",
            load(include_str!(
                "../../schemas/traefik-v2-file-provider.schema.json"
            )),
        ),
        (
            "v3",
            load(include_str!(
                "../../schemas/traefik-v3-file-provider.schema.json"
            )),
        ),
    ]
}

/// Parses one dynamic-configuration file independently of the crate under test.
fn parse_file(path: &Path, text: &str) -> Result<Value, String> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => toml::from_str::<Value>(text).map_err(|e| e.to_string()),
        _ => {
            let docs = yaml_rust2::YamlLoader::load_from_str(text).map_err(|e| e.to_string())?;
            match docs.first() {
                None => Ok(json!({})),
                Some(doc) => yaml_to_json(doc),
            }
        }
    }
}

fn yaml_to_json(y: &yaml_rust2::Yaml) -> Result<Value, String> {
    use yaml_rust2::Yaml;
    Ok(match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => json!(b),
        Yaml::Integer(i) => json!(i),
        Yaml::Real(r) => json!(r.parse::<f64>().map_err(|e| e.to_string())?),
        Yaml::String(s) => json!(s),
        Yaml::Array(a) => Value::Array(a.iter().map(yaml_to_json).collect::<Result<_, _>>()?),
        Yaml::Hash(h) => {
            let mut m = Map::new();
            for (k, v) in h {
                let k = k.as_str().ok_or("non-string key")?.to_string();
                m.insert(k, yaml_to_json(v)?);
            }
            Value::Object(m)
        }
        other => return Err(format!("unsupported YAML {other:?}")),
    })
}

/// The runtime configuration the API serves, keyed by qualified name (`app@file`).
#[derive(Debug, Default, Clone)]
struct Runtime {
    routers: BTreeMap<String, Value>,
    services: BTreeMap<String, Value>,
}

#[derive(Debug, Default)]
struct Shared {
    runtime: Mutex<Runtime>,
    frozen: AtomicBool,
    published: AtomicU64,
    api_requests: AtomicU64,
    rejections: Mutex<Vec<String>>,
    external: Mutex<BTreeMap<String, Value>>,
    /// The `Authorization` header value required, if any.
    auth: Mutex<Option<String>>,
}

/// Standard base64 (for the expected basic-auth header).
fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The running test double; everything stops on drop.
#[derive(Debug)]
pub struct FakeTraefik {
    /// Base URL of the API (`http://127.0.0.1:<port>`).
    pub url: String,
    dir: PathBuf,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeTraefik {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn qualify(name: &str) -> String {
    if name.contains('@') {
        name.to_string()
    } else {
        format!("{name}@file")
    }
}

/// Reads the directory like the file provider; `Err` when the configuration cannot be loaded.
fn load_dir(
    dir: &Path,
    validator: &jsonschema::Validator,
    external: &BTreeMap<String, Value>,
) -> Result<(Runtime, String), String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yml" | "yaml" | "toml")
                )
        })
        .collect();
    files.sort();
    let mut fingerprint = format!("{external:?}");
    let mut routers: BTreeMap<String, Value> = BTreeMap::new();
    let mut services: BTreeMap<String, Value> = BTreeMap::new();
    for path in &files {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        fingerprint.push_str(&text);
        let value = parse_file(path, &text).map_err(|e| format!("{}: {e}", path.display()))?;
        if !validator.is_valid(&value) {
            let errs: Vec<String> = validator
                .iter_errors(&value)
                .map(|e| e.to_string())
                .collect();
            return Err(format!("{}: schema: {errs:?}", path.display()));
        }
        for (kind, map) in [("routers", &mut routers), ("services", &mut services)] {
            if let Some(items) = value
                .pointer(&format!("/http/{kind}"))
                .and_then(Value::as_object)
            {
                for (name, item) in items {
                    // Like Traefik's file provider: files are read in name order and a name
                    // already defined is skipped (with a warning), not an error.
                    map.entry(qualify(name)).or_insert_with(|| item.clone());
                }
            }
        }
    }

    // Services of other providers (`app-blue@docker`), as registered by the test.
    for (name, svc) in external {
        services.insert(name.clone(), svc.clone());
    }

    // Runtime view: the configuration plus the fields the API adds.
    let mut rt = Runtime::default();
    for (name, svc) in &services {
        let mut out = svc.as_object().cloned().unwrap_or_default();
        let mut errs = Vec::new();
        let kind = if let Some(lb) = out.get_mut("loadBalancer") {
            lb["passHostHeader"] = json!(true);
            let status: Map<String, Value> = lb["servers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["url"].as_str())
                .map(|u| (u.to_string(), json!("UP")))
                .collect();
            out.insert("serverStatus".into(), Value::Object(status));
            "loadbalancer"
        } else if let Some(w) = out.get("weighted") {
            for child in w["services"].as_array().into_iter().flatten() {
                let child = qualify(child["name"].as_str().unwrap_or(""));
                if !services.contains_key(&child) {
                    errs.push(format!("the service \"{child}\" does not exist"));
                }
            }
            "weighted"
        } else {
            "unknown"
        };
        let used_by: Vec<String> = routers
            .iter()
            .filter(|(_, r)| r["service"].as_str().map(qualify).as_deref() == Some(name))
            .map(|(n, _)| n.clone())
            .collect();
        out.insert("name".into(), json!(name));
        let provider = name.split_once('@').map_or("file", |(_, p)| p);
        out.insert("provider".into(), json!(provider));
        out.insert("type".into(), json!(kind));
        out.insert("usedBy".into(), json!(used_by));
        out.insert(
            "status".into(),
            json!(if errs.is_empty() {
                "enabled"
            } else {
                "disabled"
            }),
        );
        if !errs.is_empty() {
            out.insert("err".into(), json!(errs));
        }
        rt.services.insert(name.clone(), Value::Object(out));
    }
    for (name, router) in &routers {
        let mut out = router.as_object().cloned().unwrap_or_default();
        let service = qualify(router["service"].as_str().unwrap_or(""));
        let ok = rt.services.contains_key(&service);
        out.insert("name".into(), json!(name));
        out.insert("provider".into(), json!("file"));
        let using = router
            .get("entryPoints")
            .cloned()
            .unwrap_or_else(|| json!(["web"]));
        out.insert("using".into(), using);
        out.insert(
            "status".into(),
            json!(if ok { "enabled" } else { "disabled" }),
        );
        if !ok {
            out.insert(
                "err".into(),
                json!([format!("the service \"{service}\" does not exist")]),
            );
        }
        rt.routers.insert(name.clone(), Value::Object(out));
    }
    Ok((rt, fingerprint))
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn handle(shared: &Shared, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    shared.api_requests.fetch_add(1, Ordering::Relaxed);
    if req.method() != hyper::Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({ "message": "method not allowed" }),
        );
    }
    if let Some(want) = shared.auth.lock().unwrap().as_deref() {
        let got = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if got != Some(want) {
            return reply(
                StatusCode::UNAUTHORIZED,
                json!({ "message": "401 Unauthorized" }),
            );
        }
    }
    let path = req.uri().path();
    let rt = shared.runtime.lock().unwrap();
    if path == "/api/version" {
        return reply(
            StatusCode::OK,
            json!({ "Version": "3.0.0-testdouble", "Codename": "test double" }),
        );
    }
    if let Some(name) = path.strip_prefix("/api/http/services/") {
        return match rt.services.get(name) {
            Some(v) => reply(StatusCode::OK, v.clone()),
            None => reply(
                StatusCode::NOT_FOUND,
                json!({ "message": format!("service not found: {name}") }),
            ),
        };
    }
    if let Some(name) = path.strip_prefix("/api/http/routers/") {
        return match rt.routers.get(name) {
            Some(v) => reply(StatusCode::OK, v.clone()),
            None => reply(
                StatusCode::NOT_FOUND,
                json!({ "message": format!("router not found: {name}") }),
            ),
        };
    }
    reply(
        StatusCode::NOT_FOUND,
        json!({ "message": "404 page not found" }),
    )
}

impl FakeTraefik {
    /// Starts the double on a free loopback port, watching `dir`, publishing a change `throttle`
    /// after it is first seen.
    pub async fn start(dir: &Path, throttle: Duration) -> FakeTraefik {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared::default());

        let s = shared.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let resp = handle(&s, &req);
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });

        let s = shared.clone();
        let watched = dir.to_path_buf();
        let watcher = tokio::spawn(async move {
            let (_, validator) = schemas().pop().expect("v3 schema");
            let mut last_fingerprint: Option<String> = None;
            let mut pending: Option<(String, Instant)> = None;
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if s.frozen.load(Ordering::SeqCst) {
                    continue;
                }
                let external = s.external.lock().unwrap().clone();
                match load_dir(&watched, &validator, &external) {
                    Ok((rt, fp)) => {
                        if last_fingerprint.as_deref() == Some(fp.as_str()) {
                            pending = None;
                            continue;
                        }
                        // Throttle: publish only once the change has been seen for `throttle`.
                        match &pending {
                            Some((p, since)) if *p == fp => {
                                if since.elapsed() >= throttle {
                                    *s.runtime.lock().unwrap() = rt;
                                    s.published.fetch_add(1, Ordering::SeqCst);
                                    last_fingerprint = Some(fp);
                                    pending = None;
                                }
                            }
                            _ => pending = Some((fp, Instant::now())),
                        }
                    }
                    Err(reason) => {
                        pending = None;
                        let mut r = s.rejections.lock().unwrap();
                        if r.last() != Some(&reason) {
                            r.push(reason);
                        }
                    }
                }
            }
        });

        FakeTraefik {
            url,
            dir: dir.to_path_buf(),
            shared,
            tasks: vec![server, watcher],
        }
    }

    /// Stops reloading: the API keeps serving the configuration it has.
    pub fn freeze(&self) {
        self.shared.frozen.store(true, Ordering::SeqCst);
    }

    /// Resumes reloading.
    pub fn unfreeze(&self) {
        self.shared.frozen.store(false, Ordering::SeqCst);
    }

    /// Registers (or with `None` removes) a service of another provider, e.g. `app-blue@docker`
    /// as the Docker provider would define it from a container's labels.
    pub fn set_external_service(&self, qualified: &str, service: Option<Value>) {
        let mut ext = self.shared.external.lock().unwrap();
        match service {
            Some(v) => ext.insert(qualified.to_string(), v),
            None => ext.remove(qualified),
        };
    }

    /// Answers 401 unless requests carry these basic-auth credentials (like an API router behind
    /// a `basicAuth` middleware).
    pub fn require_basic_auth(&self, user: &str, password: &str) {
        let header = format!("Basic {}", base64(format!("{user}:{password}").as_bytes()));
        *self.shared.auth.lock().unwrap() = Some(header);
    }

    /// How many configurations were published.
    pub fn published(&self) -> u64 {
        self.shared.published.load(Ordering::SeqCst)
    }

    /// How many API requests were answered.
    pub fn api_requests(&self) -> u64 {
        self.shared.api_requests.load(Ordering::Relaxed)
    }

    /// Why configurations were refused.
    pub fn rejections(&self) -> Vec<String> {
        self.shared.rejections.lock().unwrap().clone()
    }

    /// The service the API serves under `qualified` (`app@file`).
    pub fn service(&self, qualified: &str) -> Option<Value> {
        self.shared
            .runtime
            .lock()
            .unwrap()
            .services
            .get(qualified)
            .cloned()
    }

    /// The router the API serves under `qualified`.
    pub fn router(&self, qualified: &str) -> Option<Value> {
        self.shared
            .runtime
            .lock()
            .unwrap()
            .routers
            .get(qualified)
            .cloned()
    }
}

/// A base URL on which nothing listens: the port stays bound (so no parallel test can take it)
/// but never listens, so connections are refused. Keep the socket alive while using the URL.
pub fn closed_port_url() -> (String, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("http://{}", socket.local_addr().unwrap());
    (url, socket)
}

/// A base URL whose server accepts connections and never answers.
pub async fn silent_server_url() -> (String, JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (url, task)
}

#[test]
fn base64_matches_rfc4648_vectors() {
    for (i, o) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
    ] {
        assert_eq!(base64(i.as_bytes()), o);
    }
}
