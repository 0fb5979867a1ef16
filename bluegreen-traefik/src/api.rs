//! A small client for the read-only parts of Traefik's HTTP API that the switch needs:
//! `GET /api/http/services/{name}@file` and `GET /api/http/routers/{name}@file`.
//!
//! Documented answer shapes (Traefik v2.11 and v3, `pkg/api/handler_http.go`): a service is its
//! dynamic configuration (`weighted: {services: [{name, weight}], sticky}`) plus `status`
//! (`enabled` / `disabled` / `warning`), `err`, `usedBy`, `name` (`app@file`), `provider`, `type`;
//! a router is its configuration (`rule`, `service`, `entryPoints`, …) plus `status`, `err`,
//! `using`, `name`, `provider`. An unknown name answers 404 with `{"message": "… not found: …"}`.

use std::collections::BTreeSet;
use std::time::Duration;

use bluegreen_core::Slot;

use serde_json::Value;

use crate::config::RouteName;
use crate::error::TraefikError;
use crate::render::{preview_from_router, split_from_service, Routing};

#[derive(Debug, Clone)]
pub(crate) struct Api {
    base: String,
    client: reqwest::Client,
    auth: Option<(String, bluegreen_core::Secret)>,
}

/// What the API reports about the three objects this switch owns.
#[derive(Debug, Clone, Default)]
pub(crate) struct ApiView {
    pub(crate) service: Option<Value>,
    pub(crate) router: Option<Value>,
    pub(crate) preview_router: Option<Value>,
    /// `<name>-blue@file` and `<name>-green@file`, when they were asked for.
    pub(crate) slots: [Option<Value>; 2],
}

/// What the API should report after a write.
#[derive(Debug, Clone)]
pub(crate) struct Expected<'a> {
    pub(crate) routing: &'a Routing,
    pub(crate) rule: &'a str,
    pub(crate) preview_rule: &'a str,
    /// The server URLs of each slot's `loadBalancer` (blue, green) when they are in our file;
    /// `None` when another provider defines the slots' services.
    pub(crate) servers: Option<[Vec<String>; 2]>,
}

impl Api {
    pub(crate) fn new(
        base: &str,
        timeout: Duration,
        auth: Option<(String, bluegreen_core::Secret)>,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()?;
        Ok(Api {
            base: base.trim_end_matches('/').to_string(),
            client,
            auth,
        })
    }

    /// GET `path`; `None` on 404.
    pub(crate) async fn get(&self, path: &str) -> Result<Option<Value>, TraefikError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.client.get(&url);
        if let Some((user, password)) = &self.auth {
            req = req.basic_auth(user, Some(password.expose()));
        }
        let resp = req
            .send()
            .await
            .map_err(|source| TraefikError::ApiUnreachable {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|source| TraefikError::ApiUnreachable {
                url: url.clone(),
                source,
            })?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            return Err(TraefikError::ApiStatus {
                url,
                status: status.as_u16(),
                body: text.chars().take(300).collect(),
            });
        }
        let value: Value =
            serde_json::from_slice(&body).map_err(|e| TraefikError::ApiResponse {
                url: url.clone(),
                reason: format!("not JSON: {e}"),
            })?;
        if !value.is_object() {
            return Err(TraefikError::ApiResponse {
                url,
                reason: "expected a JSON object".into(),
            });
        }
        Ok(Some(value))
    }

    pub(crate) fn service_path(name: &str) -> String {
        format!("/api/http/services/{name}@file")
    }

    pub(crate) fn router_path(name: &str) -> String {
        format!("/api/http/routers/{name}@file")
    }

    /// Reads the weighted service, the router, the preview router and (with `slots`) the slots'
    /// load balancers.
    pub(crate) async fn view(
        &self,
        name: &RouteName,
        slots: bool,
    ) -> Result<ApiView, TraefikError> {
        let mut view = ApiView {
            service: self.get(&Self::service_path(name.as_str())).await?,
            router: self.get(&Self::router_path(name.as_str())).await?,
            preview_router: self.get(&Self::router_path(&name.preview_router())).await?,
            slots: [None, None],
        };
        if slots {
            for (i, slot) in Slot::ALL.into_iter().enumerate() {
                view.slots[i] = self
                    .get(&Self::service_path(&name.slot_service(slot)))
                    .await?;
            }
        }
        Ok(view)
    }

    /// The routing Traefik has loaded; `None` when it has no service `<name>@file`.
    pub(crate) async fn routing(&self, name: &RouteName) -> Result<Option<Routing>, TraefikError> {
        let path = Self::service_path(name.as_str());
        let Some(service) = self.get(&path).await? else {
            return Ok(None);
        };
        let split =
            split_from_service(name, &service).ok_or_else(|| TraefikError::ApiResponse {
                url: format!("{}{}", self.base, path),
                reason: format!(
                    "{name}@file is not a weighted service over {} and {}",
                    name.slot_service(Slot::Blue),
                    name.slot_service(Slot::Green)
                ),
            })?;
        let preview = self
            .get(&Self::router_path(&name.preview_router()))
            .await?
            .and_then(|r| preview_from_router(name, &r));
        Ok(Some(Routing::new(split).with_preview(preview)))
    }
}

/// The server URLs of a `loadBalancer` service.
fn server_urls(v: &Value) -> BTreeSet<&str> {
    v.pointer("/loadBalancer/servers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|s| s.get("url").and_then(Value::as_str))
        .collect()
}

fn status(v: &Value) -> &str {
    v.get("status").and_then(Value::as_str).unwrap_or("")
}

fn errors(v: &Value) -> String {
    match v.get("err").and_then(Value::as_array) {
        Some(errs) if !errs.is_empty() => {
            let list: Vec<String> = errs
                .iter()
                .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_string))
                .collect();
            format!(" [errors: {}]", list.join("; "))
        }
        _ => String::new(),
    }
}

impl ApiView {
    /// Whether Traefik has exactly what is expected loaded, and not disabled.
    pub(crate) fn matches(&self, name: &RouteName, expected: &Expected<'_>) -> bool {
        let (routing, rule, preview_rule) =
            (expected.routing, expected.rule, expected.preview_rule);
        if let Some(servers) = &expected.servers {
            for (i, want) in servers.iter().enumerate() {
                let want: BTreeSet<&str> = want.iter().map(String::as_str).collect();
                match &self.slots[i] {
                    None if want.is_empty() => {}
                    Some(svc) if status(svc) != "disabled" && server_urls(svc) == want => {}
                    _ => return false,
                }
            }
        }
        let Some(service) = &self.service else {
            return false;
        };
        if status(service) == "disabled" {
            return false;
        }
        match split_from_service(name, service) {
            Some(s) if s.same_weights(&routing.split) && s.sticky == routing.split.sticky => {}
            _ => return false,
        }
        let Some(router) = &self.router else {
            return false;
        };
        let router_ok = status(router) != "disabled"
            && router.get("rule").and_then(Value::as_str) == Some(rule)
            && router
                .get("service")
                .and_then(Value::as_str)
                .map(|s| s.split('@').next().unwrap_or(s))
                == Some(name.as_str());
        if !router_ok {
            return false;
        }
        match (routing.preview, &self.preview_router) {
            (None, None) => true,
            (None, Some(_)) | (Some(_), None) => false,
            (Some(slot), Some(p)) => {
                status(p) != "disabled"
                    && preview_from_router(name, p) == Some(slot)
                    && p.get("rule").and_then(Value::as_str) == Some(preview_rule)
            }
        }
    }

    /// What Traefik reports, for error messages.
    pub(crate) fn describe(&self, name: &RouteName) -> String {
        let service = match &self.service {
            None => format!("no service {name}@file"),
            Some(s) => match split_from_service(name, s) {
                Some(split) => format!(
                    "service {name}@file {split} (status {}){}",
                    status(s),
                    errors(s)
                ),
                None => format!("service {name}@file is not a weighted blue/green service"),
            },
        };
        let router = match &self.router {
            None => format!("no router {name}@file"),
            Some(r) => format!(
                "router {name}@file rule {} (status {}){}",
                r.get("rule")
                    .map_or_else(|| "none".into(), Value::to_string),
                status(r),
                errors(r)
            ),
        };
        let preview = match &self.preview_router {
            None => "no preview router".to_string(),
            Some(p) => match preview_from_router(name, p) {
                Some(slot) => format!("preview to {slot} (status {}){}", status(p), errors(p)),
                None => "a preview router to an unknown service".into(),
            },
        };
        let mut slots = String::new();
        for (i, slot) in Slot::ALL.into_iter().enumerate() {
            if let Some(s) = &self.slots[i] {
                let urls: Vec<&str> = server_urls(s).into_iter().collect();
                slots.push_str(&format!(
                    "; {}@file servers {urls:?} (status {}){}",
                    name.slot_service(slot),
                    status(s),
                    errors(s)
                ));
            }
        }
        format!("{service}; {router}; {preview}{slots}")
    }
}
