//! The bodies of the fuzz targets, as plain functions: `fuzz_targets/*.rs` hand them libFuzzer's
//! input (`cargo +nightly fuzz run <target>`), and `tests/corpus.rs` runs them on stable over the
//! corpus and a list of hostile inputs. Each one must never panic; where the code under test
//! promises more (a renderer never lets a name change the document's structure), it asserts that.

use std::path::Path;

use bluegreen_core::{Endpoint, Endpoints, Secret, Slot, TrafficSplit};

/// The CLI's pipeline file module, compiled here as it is in the `bluegreen` binary.
#[allow(dead_code, unreachable_pub, missing_docs)]
#[path = "../../src/pipeline.rs"]
mod pipeline;

/// Pipeline parsing plus validation: any text is either a checked pipeline or an error.
pub fn pipeline(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A directory that does not exist: a file naming a token file or migrations relative to it
    // gets an error, never a file of this machine.
    let file = Path::new("/nonexistent/bluegreen-fuzz/bluegreen.toml");
    if let Ok((p, _state_dir)) = pipeline::Pipeline::parse(text, file) {
        // What the commands do next with a checked pipeline.
        let _ = p.release("v1");
        let _ = p.public_addr();
        let _ = p.proxy();
        for h in &p.hooks {
            if let Some(t) = h.timeout {
                pipeline::seconds(t).expect("a loaded hook timeout is a valid duration");
            }
        }
    }
}

/// HAProxy's `show stat` CSV and `show servers state` answers, whatever the socket sends.
pub fn haproxy_stat(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(rows) = bluegreen_haproxy::parse_stat_csv("show stat", &text) {
        assert!(rows.len() <= text.lines().count());
    }
    if let Ok(servers) = bluegreen_haproxy::parse_servers_state("show servers state", &text) {
        assert!(servers.len() <= text.lines().count());
    }
}

/// The structure of a rendered document: the characters a name would need to escape it.
fn shape(text: &str) -> [usize; 6] {
    let n = |c: char| text.matches(c).count();
    [n('{'), n('}'), n(';'), n('"'), n('\n'), n('\'')]
}

/// The nginx Dynamic snippet with a hostile name and state file path (input: `name\npath`).
/// Whatever the validation accepts must not change the snippet's structure.
pub fn nginx_render(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut fields = text.splitn(2, '\n');
    let name = fields.next().unwrap_or("");
    let state = fields.next();
    let control = "127.0.0.1:9000".parse().expect("an address");
    let token = || Secret::new("0123456789abcdef0123");
    let Ok(mut config) = bluegreen_nginx::NginxDynamicConfig::new(name, control, token()) else {
        return;
    };
    let mut reference = bluegreen_nginx::NginxDynamicConfig::new("a", control, token())
        .expect("the reference config is valid");
    if let Some(path) = state {
        match config.with_state_file(path) {
            Ok(c) => config = c,
            Err(_) => return,
        }
        reference = reference.with_state_file("/a").expect("a valid path");
    }
    let snippet = config.render_snippet();
    assert_eq!(
        shape(&snippet),
        shape(&reference.render_snippet()),
        "{name:?} / {state:?} changed the snippet's structure:\n{snippet}"
    );
    assert_eq!(
        shape(&config.render_location()),
        shape(&reference.render_location())
    );
}

/// The Traefik dynamic configuration with hostile names (input: `name\nrule\nentry points, one a
/// line ... \n\nmiddlewares ...`). TOML output parses back with exactly the one router; YAML
/// output has the structure of a benign rendering with as many entries.
pub fn traefik_render(data: &[u8]) {
    use bluegreen_traefik::{render::render_as, FileFormat, Routing, TraefikConfig};
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(2, "\n\n");
    let head = parts.next().unwrap_or("");
    let middlewares: Vec<&str> = parts
        .next()
        .map(|m| m.lines().collect())
        .unwrap_or_default();
    let mut lines = head.lines();
    let name = lines.next().unwrap_or("");
    let rule = lines.next().unwrap_or("");
    let entry_points: Vec<&str> = lines.collect();
    let Ok(config) = TraefikConfig::new(name, rule, "/nonexistent") else {
        return;
    };
    let config = config
        .with_entry_points(entry_points.iter().copied())
        .with_middlewares(middlewares.iter().copied());
    let reference = TraefikConfig::new("a", "Host(`a`)", "/nonexistent")
        .expect("the reference config is valid")
        .with_entry_points(entry_points.iter().map(|_| "a"))
        .with_middlewares(middlewares.iter().map(|_| "a"));
    let routing = Routing::new(TrafficSplit::all(Slot::Blue));
    let endpoints = Endpoints::new(
        vec![Endpoint::new("127.0.0.1", 8001)],
        vec![Endpoint::new("127.0.0.1", 8002)],
    );
    if let Ok(toml_text) = render_as(FileFormat::Toml, &config, &routing, &endpoints) {
        let doc: toml::Table = toml::from_str(&toml_text)
            .unwrap_or_else(|e| panic!("rendered TOML does not parse: {e}\n{toml_text}"));
        let routers = doc
            .get("http")
            .and_then(|h| h.get("routers"))
            .and_then(|r| r.as_table())
            .unwrap_or_else(|| panic!("no http.routers in\n{toml_text}"));
        assert_eq!(routers.len(), 1, "{toml_text}");
        assert!(routers.contains_key(name), "{toml_text}");
    }
    if let Ok(yaml) = render_as(FileFormat::Yaml, &config, &routing, &endpoints) {
        let benign = render_as(FileFormat::Yaml, &reference, &routing, &endpoints)
            .expect("the reference renders");
        // The header comment names the router; past it, one line per entry either way.
        let body = |t: &str| t.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(body(&yaml), body(&benign), "{yaml}");
    }
}
