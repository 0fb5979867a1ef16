//! Every configuration the crate renders (blue, green, each canary step, sticky, preview; YAML and
//! TOML; Traefik v2 and v3 syntax) parses back and validates against BOTH official Traefik
//! file-provider schemas (copies in `schemas/`), and deliberately broken ones fail.

use bluegreen_core::{Endpoint, Endpoints, Error, Slot, TrafficSplit};
use bluegreen_traefik::render::{dynamic_config, parse, render_as, routing_from_file};
use bluegreen_traefik::{FileFormat, Routing, TraefikConfig, TraefikVersion};
use serde_json::{json, Value};

fn schemas() -> Vec<(&'static str, jsonschema::Validator)> {
    let load = |text: &str| {
        let schema: Value = serde_json::from_str(text).expect("schema is JSON");
        jsonschema::validator_for(&schema).expect("schema compiles")
    };
    vec![
        (
            "v2",
            load(include_str!(
                "../schemas/traefik-v2-file-provider.schema.json"
            )),
        ),
        (
            "v3",
            load(include_str!(
                "../schemas/traefik-v3-file-provider.schema.json"
            )),
        ),
    ]
}

fn endpoints() -> Endpoints {
    let mut green_tls = Endpoint::new("app-green.internal", 8443);
    green_tls.scheme = "https".into();
    Endpoints::new(
        vec![Endpoint::new("127.0.0.1", 8001), Endpoint::new("::1", 8003)],
        vec![Endpoint::new("127.0.0.1", 8002), green_tls],
    )
}

/// Every routing the tests render: blue, green, each canary step both ways, sticky, preview.
fn routings() -> Vec<(String, Routing)> {
    let mut out = vec![
        (
            "blue".to_string(),
            Routing::new(TrafficSplit::all(Slot::Blue)),
        ),
        (
            "green".to_string(),
            Routing::new(TrafficSplit::all(Slot::Green)),
        ),
    ];
    for to in Slot::ALL {
        for step in [1, 5, 10, 25, 50, 75, 90, 99] {
            out.push((
                format!("canary {step}% to {to}"),
                Routing::new(TrafficSplit::canary(to, step).unwrap()),
            ));
        }
    }
    out.push((
        "sticky canary".into(),
        Routing::new(
            TrafficSplit::canary(Slot::Green, 10)
                .unwrap()
                .with_sticky("bg_slot"),
        ),
    ));
    out.push((
        "sticky green".into(),
        Routing::new(TrafficSplit::all(Slot::Green).with_sticky("bg_slot")),
    ));
    out.push((
        "preview green".into(),
        Routing::new(TrafficSplit::all(Slot::Blue)).with_preview(Some(Slot::Green)),
    ));
    out.push((
        "preview blue, sticky canary".into(),
        Routing::new(
            TrafficSplit::canary(Slot::Green, 50)
                .unwrap()
                .with_sticky("s"),
        )
        .with_preview(Some(Slot::Blue)),
    ));
    out
}

fn configs() -> Vec<(String, TraefikConfig)> {
    let mut out = Vec::new();
    for version in [TraefikVersion::V2, TraefikVersion::V3] {
        for format in [FileFormat::Yaml, FileFormat::Toml] {
            let base = TraefikConfig::new(
                "shop_web-1",
                "Host(`shop.example.com`) && PathPrefix(`/`)",
                "/unused",
            )
            .unwrap()
            .with_version(version)
            .with_format(format);
            out.push((format!("{version:?}/{format:?}"), base.clone()));
            out.push((
                format!("{version:?}/{format:?}/slot services from docker"),
                base.clone().with_slot_services_from("docker"),
            ));
            out.push((
                format!("{version:?}/{format:?}/entry points, preview cookie"),
                base.with_entry_points(["web", "websecure"])
                    .with_middlewares(["compress", "auth@docker"])
                    .with_tls(Some("le"))
                    .with_preview_cookie("bg_preview", "yes-1")
                    .with_sticky_cookie_attributes(true, true),
            ));
        }
    }
    out
}

fn errors(validator: &jsonschema::Validator, v: &Value) -> Vec<String> {
    validator.iter_errors(v).map(|e| e.to_string()).collect()
}

#[test]
fn every_rendered_configuration_validates_against_both_schemas() {
    let schemas = schemas();
    let mut checked = 0;
    for (config_label, config) in configs() {
        for (label, routing) in routings() {
            let text = render_as(config.format, &config, &routing, &endpoints())
                .unwrap_or_else(|e| panic!("{config_label} {label}: render failed: {e}"));
            let parsed = parse(config.format, &text)
                .unwrap_or_else(|e| panic!("{config_label} {label}: does not parse: {e}\n{text}"));
            // The text says exactly what the model says…
            let model = dynamic_config(&config, &routing, &endpoints()).unwrap();
            assert_eq!(parsed, model, "{config_label} {label}:\n{text}");
            // …routes what was asked…
            assert_eq!(
                routing_from_file(&config.name, &parsed).as_ref(),
                Some(&routing),
                "{config_label} {label}:\n{text}"
            );
            let children: Vec<&str> = parsed["http"]["services"]["shop_web-1"]["weighted"]
                ["services"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["name"].as_str().unwrap())
                .collect();
            let suffix = if config.slot_services_from.is_some() {
                "@docker"
            } else {
                ""
            };
            assert_eq!(
                children,
                vec![
                    format!("shop_web-1-blue{suffix}"),
                    format!("shop_web-1-green{suffix}")
                ],
                "{config_label} {label}"
            );
            assert_eq!(
                parsed["http"]["services"].get("shop_web-1-blue").is_some(),
                config.slot_services_from.is_none(),
                "{config_label} {label}"
            );
            let weights: Vec<i64> = parsed["http"]["services"]["shop_web-1"]["weighted"]
                ["services"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["weight"].as_i64().unwrap())
                .collect();
            assert_eq!(
                weights,
                vec![
                    i64::from(routing.split.weight(Slot::Blue)),
                    i64::from(routing.split.weight(Slot::Green))
                ],
                "{config_label} {label}"
            );
            // …and Traefik's schemas accept it.
            for (schema, validator) in &schemas {
                let errs = errors(validator, &parsed);
                assert!(
                    errs.is_empty(),
                    "{config_label} {label} fails the {schema} schema: {errs:?}\n{text}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, configs().len() * routings().len());
    assert!(checked >= 12 * 22, "{checked}");
}

#[test]
fn preview_rules_use_each_versions_matchers() {
    let routing = Routing::new(TrafficSplit::all(Slot::Blue)).with_preview(Some(Slot::Green));
    let rule = |version, cookie: bool| {
        let mut c = TraefikConfig::new("app", "Host(`a.test`)", "/unused")
            .unwrap()
            .with_version(version);
        if cookie {
            c = c.with_preview_cookie("bg_preview", "1");
        }
        let v = dynamic_config(&c, &routing, &endpoints()).unwrap();
        assert_eq!(v["http"]["routers"]["app-preview"]["service"], "app-green");
        v["http"]["routers"]["app-preview"]["rule"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        rule(TraefikVersion::V3, false),
        "(Host(`a.test`)) && Header(`X-Bluegreen-Preview`, `1`)"
    );
    assert_eq!(
        rule(TraefikVersion::V2, false),
        "(Host(`a.test`)) && Headers(`X-Bluegreen-Preview`, `1`)"
    );
    assert_eq!(
        rule(TraefikVersion::V3, true),
        "(Host(`a.test`)) && HeaderRegexp(`Cookie`, `(^|;\\s*)bg_preview=1(;|$)`)"
    );
    assert_eq!(
        rule(TraefikVersion::V2, true),
        "(Host(`a.test`)) && HeadersRegexp(`Cookie`, `(^|;\\s*)bg_preview=1(;|$)`)"
    );
}

#[test]
fn deliberately_broken_configurations_fail_both_schemas() {
    let schemas = schemas();
    let config = TraefikConfig::new("app", "Host(`a.test`)", "/unused").unwrap();
    let good = dynamic_config(
        &config,
        &Routing::new(TrafficSplit::canary(Slot::Green, 10).unwrap()),
        &endpoints(),
    )
    .unwrap();
    for (_, v) in &schemas {
        assert!(v.is_valid(&good));
    }

    let mut broken: Vec<(&str, Value)> = Vec::new();
    // A service is exactly one kind: loadBalancer next to weighted breaks `oneOf`.
    let mut both = good.clone();
    both["http"]["services"]["app"]["loadBalancer"] =
        json!({ "servers": [{ "url": "http://127.0.0.1:1" }] });
    broken.push(("weighted and loadBalancer in one service", both));
    // A load balancer needs at least one server.
    let mut empty = good.clone();
    empty["http"]["services"]["app-blue"]["loadBalancer"]["servers"] = json!([]);
    broken.push(("load balancer without servers", empty));
    // Weights are numbers.
    let mut weight = good.clone();
    weight["http"]["services"]["app"]["weighted"]["services"][0]["weight"] = json!("ninety");
    broken.push(("weight as a string", weight));
    // A server is a URL object.
    let mut server = good.clone();
    server["http"]["services"]["app-green"]["loadBalancer"]["servers"] =
        json!([{ "address": "127.0.0.1:1" }]);
    broken.push(("server without url", server));
    // Unknown keys inside a weighted service are refused.
    let mut extra = good.clone();
    extra["http"]["services"]["app"]["weighted"]["percent"] = json!(10);
    broken.push(("unknown key in weighted", extra));
    // Priorities are non-negative integers.
    let mut prio = good.clone();
    prio["http"]["routers"]["app"]["priority"] = json!(-1);
    broken.push(("negative router priority", prio));

    for (label, value) in &broken {
        for (schema, v) in &schemas {
            assert!(
                !v.is_valid(value),
                "{label}: the {schema} schema accepted a broken configuration"
            );
        }
    }
    // Broken text that still parses as YAML fails too once parsed.
    let text = "http:\n  services:\n    app:\n      weighted:\n        services: 7\n";
    let parsed = parse(FileFormat::Yaml, text).unwrap();
    for (schema, v) in &schemas {
        assert!(!v.is_valid(&parsed), "{schema} accepted {text}");
    }
}

#[test]
fn names_and_values_are_refused_before_rendering() {
    for bad in ["a.b", "a@file", "a b", "a{{", "ä", "", "a/b", "a\nb", "a;b"] {
        let res = TraefikConfig::new(bad, "Host(`a.test`)", "/unused");
        assert!(
            matches!(res, Err(Error::InvalidInput { .. })),
            "name {bad:?}: {res:?}"
        );
    }
    for bad in [
        "",
        "Host(`{{ .Env.X }}`)",
        "Host(`a`)\nevil: 1",
        "Host(`a`)}}",
    ] {
        let res = TraefikConfig::new("app", bad, "/unused");
        assert!(
            matches!(res, Err(Error::InvalidInput { .. })),
            "rule {bad:?}: {res:?}"
        );
    }
    let base = TraefikConfig::new("app", "Host(`a.test`)", "/unused").unwrap();
    let routing = Routing::new(TrafficSplit::all(Slot::Blue));
    let refused = |config: &TraefikConfig, routing: &Routing, eps: &Endpoints| {
        let res = render_as(FileFormat::Yaml, config, routing, eps);
        assert!(
            matches!(res, Err(Error::InvalidInput { .. })),
            "accepted: {res:?}"
        );
    };
    refused(
        &base.clone().with_entry_points(["web site"]),
        &routing,
        &endpoints(),
    );
    refused(
        &base.clone().with_middlewares(["a@b@c"]),
        &routing,
        &endpoints(),
    );
    refused(
        &base.clone().with_tls(Some("le resolver")),
        &routing,
        &endpoints(),
    );
    refused(
        &base.clone().with_preview_header("X-Preview", "a\"b"),
        &routing,
        &endpoints(),
    );
    refused(
        &base.clone().with_preview_cookie("c=d", "1"),
        &routing,
        &endpoints(),
    );
    refused(
        &base,
        &Routing::new(TrafficSplit::all(Slot::Blue).with_sticky("a;b")),
        &endpoints(),
    );
    let mut hostile = endpoints();
    hostile.green = vec![Endpoint::new("evil\"\n  x: {", 80)];
    refused(&base, &routing, &hostile);
    let mut no_green = endpoints();
    no_green.green.clear();
    refused(
        &base,
        &Routing::new(TrafficSplit::all(Slot::Green)),
        &no_green,
    );
    refused(
        &base,
        &Routing::new(TrafficSplit::all(Slot::Blue)).with_preview(Some(Slot::Green)),
        &no_green,
    );
}

#[test]
fn every_endpoint_of_a_slot_is_a_server_url_in_order_and_valid() {
    let schemas = schemas();
    let config = TraefikConfig::new("app", "Host(`a.test`)", "/unused").unwrap();
    let eps = Endpoints::new(
        vec![
            Endpoint::new("127.0.0.1", 8001),
            Endpoint::new("10.0.0.2", 8001),
            Endpoint::new("::1", 8003),
        ],
        vec![
            Endpoint::new("127.0.0.1", 8002),
            Endpoint::new("app-green.internal", 8002),
        ],
    );
    for version in [TraefikVersion::V2, TraefikVersion::V3] {
        for format in [FileFormat::Yaml, FileFormat::Toml] {
            let config = config.clone().with_version(version).with_format(format);
            let routing = Routing::new(TrafficSplit::canary(Slot::Green, 30).unwrap());
            let text = render_as(format, &config, &routing, &eps).unwrap();
            let parsed = parse(format, &text).unwrap();
            for slot in Slot::ALL {
                let urls: Vec<&str> = parsed["http"]["services"][format!("app-{slot}")]
                    ["loadBalancer"]["servers"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{version:?}/{format:?}: no {slot} servers\n{text}"))
                    .iter()
                    .map(|s| s["url"].as_str().unwrap())
                    .collect();
                let want: Vec<String> = eps.get(slot).iter().map(|e| e.url("/")).collect();
                let want: Vec<&str> = want.iter().map(|u| u.trim_end_matches('/')).collect();
                assert_eq!(urls, want, "{version:?}/{format:?} {slot}:\n{text}");
            }
            assert_eq!(
                routing_from_file(&config.name, &parsed),
                Some(routing),
                "{text}"
            );
            for (schema, v) in &schemas {
                assert!(
                    v.is_valid(&parsed),
                    "{version:?}/{format:?} {schema}: {:?}",
                    errors(v, &parsed)
                );
            }
        }
    }
}

#[test]
fn a_slot_without_endpoints_is_left_out_and_still_valid() {
    let schemas = schemas();
    let config = TraefikConfig::new("app", "Host(`a.test`)", "/unused").unwrap();
    let mut eps = endpoints();
    eps.green.clear();
    for format in [FileFormat::Yaml, FileFormat::Toml] {
        let text = render_as(
            format,
            &config,
            &Routing::new(TrafficSplit::all(Slot::Blue)),
            &eps,
        )
        .unwrap();
        let parsed = parse(format, &text).unwrap();
        assert!(
            parsed["http"]["services"].get("app-green").is_none(),
            "{text}"
        );
        for (schema, v) in &schemas {
            assert!(v.is_valid(&parsed), "{schema}: {:?}", errors(v, &parsed));
        }
    }
}

#[test]
fn tls_and_middlewares_reach_both_routers() {
    let config = TraefikConfig::new("app", "Host(`a.test`)", "/unused")
        .unwrap()
        .with_middlewares(["compress", "auth@docker"])
        .with_tls(Some("le"));
    let routing = Routing::new(TrafficSplit::all(Slot::Blue)).with_preview(Some(Slot::Green));
    for format in [FileFormat::Yaml, FileFormat::Toml] {
        let text = render_as(format, &config, &routing, &endpoints()).unwrap();
        let parsed = parse(format, &text).unwrap();
        for router in ["app", "app-preview"] {
            let r = &parsed["http"]["routers"][router];
            assert_eq!(r["tls"], json!({ "certResolver": "le" }), "{text}");
            assert_eq!(
                r["middlewares"],
                json!(["compress", "auth@docker"]),
                "{text}"
            );
        }
        for (schema, v) in &schemas() {
            assert!(v.is_valid(&parsed), "{schema}: {:?}", errors(v, &parsed));
        }
    }
    let plain_tls = TraefikConfig::new("app", "Host(`a.test`)", "/unused")
        .unwrap()
        .with_tls(None);
    for format in [FileFormat::Yaml, FileFormat::Toml] {
        let text = render_as(format, &plain_tls, &routing, &endpoints()).unwrap();
        let parsed = parse(format, &text).unwrap();
        assert_eq!(parsed["http"]["routers"]["app"]["tls"], json!({}), "{text}");
        for (schema, v) in &schemas() {
            assert!(v.is_valid(&parsed), "{schema}: {:?}", errors(v, &parsed));
        }
    }
}
