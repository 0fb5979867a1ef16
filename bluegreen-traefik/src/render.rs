//! Rendering the dynamic configuration (YAML or TOML) and reading it back.
//!
//! The configuration is built once as a JSON value — the shape of Traefik's documented dynamic
//! configuration, which is what the JSON schemas describe — and then emitted as YAML (a small
//! emitter that double-quotes every string) or TOML (the `toml` crate). Reading back parses
//! either format into the same JSON shape, so the file and the API answer are read by one
//! function ([`split_from_service`]).

use bluegreen_core::{Endpoint, Endpoints, Error, Result, Slot, TrafficSplit};
use serde_json::{json, Map, Value};

use crate::config::{validate_token, FileFormat, RouteName, TraefikConfig};

/// What a configuration routes: the split of the main router, and the slot that preview requests
/// reach (`None`: no preview router).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Routing {
    /// The split of the weighted service.
    pub split: TrafficSplit,
    /// The slot preview requests go to.
    pub preview: Option<Slot>,
}

impl Routing {
    /// A routing with no preview.
    pub fn new(split: TrafficSplit) -> Self {
        Routing {
            split,
            preview: None,
        }
    }

    /// With preview requests going to `slot`.
    pub fn with_preview(mut self, slot: Option<Slot>) -> Self {
        self.preview = slot;
        self
    }
}

impl std::fmt::Display for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.split)?;
        match self.preview {
            Some(slot) => write!(f, ", preview to {slot}"),
            None => write!(f, ", no preview"),
        }
    }
}

pub(crate) fn server_url(e: &Endpoint) -> String {
    format!("{}://{}", e.scheme, e.authority())
}

/// Validates the input and builds the dynamic configuration as JSON (the schema's shape).
///
/// Refused with [`Error::InvalidInput`] before anything is built: an invalid name, rule, entry
/// point, endpoint or sticky cookie name, a weight on a slot without endpoints, or a preview of a
/// slot without endpoints.
pub fn dynamic_config(
    config: &TraefikConfig,
    routing: &Routing,
    endpoints: &Endpoints,
) -> Result<Value> {
    config.validate()?;
    let split = &routing.split;
    for slot in Slot::ALL {
        for e in endpoints.get(slot) {
            e.validate()?;
        }
        if split.weight(slot) > 0 && endpoints.get(slot).is_empty() {
            return Err(Error::invalid(
                "traffic split",
                split.to_string(),
                format!("slot {slot} has weight but no endpoints"),
            ));
        }
    }
    if let Some(slot) = routing.preview {
        if endpoints.get(slot).is_empty() {
            return Err(Error::invalid(
                "preview slot",
                slot.as_str(),
                "the slot has no endpoints",
            ));
        }
    }
    if let Some(sticky) = &split.sticky {
        validate_token("sticky cookie name", &sticky.cookie, 128)?;
    }

    let name = &config.name;
    let mut services = Map::new();
    let mut weighted = Vec::new();
    for slot in Slot::ALL {
        let eps = endpoints.get(slot);
        // A loadBalancer needs at least one server (schema: minItems 1); a slot without
        // endpoints (and so without weight) is left out of the file altogether.
        if eps.is_empty() {
            continue;
        }
        if config.slot_services_from.is_none() {
            let servers: Vec<Value> = eps
                .iter()
                .map(|e| json!({ "url": server_url(e) }))
                .collect();
            services.insert(
                name.slot_service(slot),
                json!({ "loadBalancer": { "servers": servers } }),
            );
        }
        // Weight 0 is kept in the file so that both slots stay visible; Traefik's weighted
        // round robin ignores children with a non-positive weight.
        weighted
            .push(json!({ "name": config.slot_service_ref(slot), "weight": split.weight(slot) }));
    }
    let mut wrr = Map::new();
    wrr.insert("services".into(), Value::Array(weighted));
    if let Some(sticky) = &split.sticky {
        wrr.insert(
            "sticky".into(),
            json!({ "cookie": {
                "name": sticky.cookie,
                "httpOnly": config.sticky_http_only,
                "secure": config.sticky_secure,
            }}),
        );
    }
    services.insert(name.to_string(), json!({ "weighted": Value::Object(wrr) }));

    let mut routers = Map::new();
    routers.insert(
        name.to_string(),
        router(config, &config.rule, name.as_str()),
    );
    if let Some(slot) = routing.preview {
        // The preview rule contains the main rule and is longer, so with the default priority
        // (the rule's length) it wins for preview requests.
        let rule = config.preview_rule();
        routers.insert(
            name.preview_router(),
            router(config, &rule, &config.slot_service_ref(slot)),
        );
    }
    Ok(json!({ "http": { "routers": routers, "services": services } }))
}

fn router(config: &TraefikConfig, rule: &str, service: &str) -> Value {
    let mut r = Map::new();
    if !config.entry_points.is_empty() {
        r.insert("entryPoints".into(), json!(config.entry_points));
    }
    if !config.middlewares.is_empty() {
        r.insert("middlewares".into(), json!(config.middlewares));
    }
    r.insert("rule".into(), json!(rule));
    r.insert("service".into(), json!(service));
    if let Some(tls) = &config.tls {
        let mut t = Map::new();
        if let Some(resolver) = &tls.cert_resolver {
            t.insert("certResolver".into(), json!(resolver));
        }
        r.insert("tls".into(), Value::Object(t));
    }
    Value::Object(r)
}

/// Renders the dynamic configuration in the configured format.
pub fn render(config: &TraefikConfig, routing: &Routing, endpoints: &Endpoints) -> Result<String> {
    render_as(config.format, config, routing, endpoints)
}

/// Renders the dynamic configuration in `format`.
pub fn render_as(
    format: FileFormat,
    config: &TraefikConfig,
    routing: &Routing,
    endpoints: &Endpoints,
) -> Result<String> {
    let value = dynamic_config(config, routing, endpoints)?;
    let header = format!(
        "# Written by bluegreen-traefik: blue/green routing of router `{}` ({}).\n\
         # Rewritten on every switch; do not edit.\n",
        config.name, routing
    );
    let body = match format {
        FileFormat::Yaml => to_yaml(&value),
        FileFormat::Toml => toml::to_string(&value).map_err(|e| {
            Error::invalid(
                "traefik configuration",
                "toml",
                format!("cannot render: {e}"),
            )
        })?,
    };
    Ok(header + &body)
}

/// Emits `value` as block-style YAML. Every string is double-quoted with JSON escapes (a JSON
/// string is a valid YAML double-quoted scalar), so no value can change the document's structure.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => emit_map(map, 0, &mut out),
        other => {
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => Value::String(s.clone()).to_string(),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Object(m) if m.is_empty() => "{}".into(),
        // Non-empty containers are emitted as blocks by the callers.
        other => other.to_string(),
    }
}

fn key(k: &str) -> String {
    const SPECIAL: [&str; 11] = [
        "y", "n", "yes", "no", "on", "off", "true", "false", "null", "~", "",
    ];
    let plain = k
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !SPECIAL.contains(&k.to_ascii_lowercase().as_str());
    if plain {
        k.to_string()
    } else {
        Value::String(k.to_string()).to_string()
    }
}

fn is_block(v: &Value) -> bool {
    match v {
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => false,
    }
}

fn emit_map(map: &Map<String, Value>, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    for (k, v) in map {
        out.push_str(&pad);
        out.push_str(&key(k));
        out.push(':');
        if is_block(v) {
            out.push('\n');
            emit_block(v, indent + 2, out);
        } else {
            out.push(' ');
            out.push_str(&scalar(v));
            out.push('\n');
        }
    }
}

fn emit_block(v: &Value, indent: usize, out: &mut String) {
    match v {
        Value::Object(m) => emit_map(m, indent, out),
        Value::Array(items) => {
            let pad = " ".repeat(indent);
            for item in items {
                if is_block(item) {
                    // Emit the item two columns deeper, then turn the first line's indentation
                    // into the `- ` marker.
                    let mut inner = String::new();
                    emit_block(item, indent + 2, &mut inner);
                    out.push_str(&pad);
                    out.push_str("- ");
                    out.push_str(&inner[indent + 2..]);
                } else {
                    out.push_str(&pad);
                    out.push_str("- ");
                    out.push_str(&scalar(item));
                    out.push('\n');
                }
            }
        }
        other => {
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
}

/// Parses a dynamic configuration file (YAML or TOML) into its JSON shape.
pub fn parse(format: FileFormat, text: &str) -> std::result::Result<Value, String> {
    match format {
        FileFormat::Toml => toml::from_str::<Value>(text).map_err(|e| e.to_string()),
        FileFormat::Yaml => {
            let docs = yaml_rust2::YamlLoader::load_from_str(text).map_err(|e| e.to_string())?;
            match docs.as_slice() {
                [] => Ok(Value::Object(Map::new())),
                [doc] => yaml_to_json(doc),
                _ => Err("more than one YAML document".into()),
            }
        }
    }
}

fn yaml_to_json(y: &yaml_rust2::Yaml) -> std::result::Result<Value, String> {
    use yaml_rust2::Yaml;
    Ok(match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => json!(i),
        Yaml::Real(r) => {
            let f: f64 = r.parse().map_err(|_| format!("bad number {r:?}"))?;
            json!(f)
        }
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(a) => Value::Array(a.iter().map(yaml_to_json).collect::<Result<_, _>>()?),
        Yaml::Hash(h) => {
            let mut m = Map::new();
            for (k, v) in h {
                let k = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => return Err(format!("unsupported mapping key {other:?}")),
                };
                m.insert(k, yaml_to_json(v)?);
            }
            Value::Object(m)
        }
        Yaml::Alias(_) => return Err("YAML aliases are not supported".into()),
        Yaml::BadValue => return Err("bad YAML value".into()),
    })
}

/// Strips Traefik's `@provider` suffix.
fn unqualified(name: &str) -> &str {
    name.split_once('@').map_or(name, |(n, _)| n)
}

/// Reads the split of the weighted service `<name>` from its JSON (a file's
/// `http.services.<name>` or Traefik's `/api/http/services/<name>@file` answer — same shape).
///
/// Weights are normalised to percentages; a slot missing from the list has weight 0. `None` when
/// the value is not a weighted service over `<name>-blue` / `<name>-green` with a positive total.
pub fn split_from_service(name: &RouteName, service: &Value) -> Option<TrafficSplit> {
    let weighted = service.get("weighted")?;
    let mut w = [0f64; 2];
    for child in weighted.get("services")?.as_array()? {
        let child_name = unqualified(child.get("name")?.as_str()?);
        // Traefik's default weight is 1.
        let weight = child.get("weight").map_or(Some(1.0), Value::as_f64)?;
        match Slot::ALL
            .iter()
            .position(|s| name.slot_service(*s) == child_name)
        {
            Some(i) => w[i] += weight.max(0.0),
            None => return None,
        }
    }
    let total = w[0] + w[1];
    if total <= 0.0 {
        return None;
    }
    let blue = ((w[0] * 100.0) / total).round() as u8;
    let mut split = TrafficSplit::new(blue, 100 - blue).ok()?;
    if let Some(cookie) = weighted
        .pointer("/sticky/cookie/name")
        .and_then(Value::as_str)
    {
        split = split.with_sticky(cookie);
    }
    Some(split)
}

/// Reads the slot a preview router sends to (its `service` is `<name>-<slot>`).
pub fn preview_from_router(name: &RouteName, router: &Value) -> Option<Slot> {
    let service = unqualified(router.get("service")?.as_str()?);
    Slot::ALL
        .into_iter()
        .find(|s| name.slot_service(*s) == service)
}

/// Reads the routing back from a parsed file (`None`: the file has no weighted service
/// `<name>`).
pub fn routing_from_file(name: &RouteName, file: &Value) -> Option<Routing> {
    let service = file.pointer(&format!("/http/services/{name}"))?;
    let split = split_from_service(name, service)?;
    let preview = file
        .pointer(&format!("/http/routers/{}", name.preview_router()))
        .and_then(|r| preview_from_router(name, r));
    Some(Routing { split, preview })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TraefikConfig {
        TraefikConfig::new("app", "Host(`app.test`)", "/tmp").unwrap()
    }

    fn endpoints() -> Endpoints {
        Endpoints::new(
            vec![Endpoint::new("127.0.0.1", 8001)],
            vec![Endpoint::new("127.0.0.1", 8002)],
        )
    }

    #[test]
    fn yaml_round_trips_through_the_parser() {
        let routing = Routing::new(
            TrafficSplit::canary(Slot::Green, 10)
                .unwrap()
                .with_sticky("bg"),
        )
        .with_preview(Some(Slot::Green));
        let value = dynamic_config(&config(), &routing, &endpoints()).unwrap();
        let yaml = to_yaml(&value);
        assert_eq!(parse(FileFormat::Yaml, &yaml).unwrap(), value, "{yaml}");
        let toml = render_as(FileFormat::Toml, &config(), &routing, &endpoints()).unwrap();
        assert_eq!(parse(FileFormat::Toml, &toml).unwrap(), value, "{toml}");
        assert_eq!(
            routing_from_file(&config().name, &value),
            Some(routing),
            "{yaml}"
        );
    }

    #[test]
    fn yaml_quotes_hostile_strings_and_keys() {
        let v = json!({ "a": { "yes": "x: y\n- z # w", "1": ["\"q\"", "é\u{7}"], "k": [] } });
        let yaml = to_yaml(&v);
        assert_eq!(parse(FileFormat::Yaml, &yaml).unwrap(), v, "{yaml}");
    }

    #[test]
    fn weights_are_normalised_and_foreign_children_refused() {
        let name = RouteName::new("app").unwrap();
        let s = json!({ "weighted": { "services": [
            { "name": "app-blue@file", "weight": 1 }, { "name": "app-green", "weight": 3 } ] } });
        assert_eq!(
            split_from_service(&name, &s),
            Some(TrafficSplit::new(25, 75).unwrap())
        );
        let s = json!({ "weighted": { "services": [ { "name": "other", "weight": 1 } ] } });
        assert_eq!(split_from_service(&name, &s), None);
        let s = json!({ "loadBalancer": { "servers": [] } });
        assert_eq!(split_from_service(&name, &s), None);
    }
}
