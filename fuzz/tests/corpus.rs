//! The fuzz targets on stable: every file of `corpus/<target>/` (the seeds, and any input a fuzz
//! run saved there) plus hostile inputs made here. CI runs this; a crash a fuzz run finds is
//! added to the corpus (and, in the crate it concerns, as a unit test).

use std::path::Path;

/// The characters that break out of a name in one config language or another.
const HOSTILE: &[&str] = &[
    "", " ", "\n", "\r\n", "\0", ";", "{", "}", "\"", "'", "`", "\\", "$", "#", "]]", "[[", "--",
    "/*", "*/", "${x}", "@TOKEN@", "@DICT@", "%", "\u{202e}", "é", "\u{feff}", "a b",
];

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(!inputs.is_empty(), "no corpus in {}", dir.display());
    // Every seed cut at every length: truncated files, half-written names.
    let seeds = inputs.clone();
    for s in &seeds {
        for n in 0..s.len().min(512) {
            inputs.push(s[..n].to_vec());
        }
    }
    inputs
}

/// `base` with each hostile string put before, after and in place of `word`.
fn spliced(base: &str, word: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for h in HOSTILE {
        for with in [format!("{h}{word}"), format!("{word}{h}"), h.to_string()] {
            out.push(base.replacen(word, &with, 1).into_bytes());
        }
    }
    out
}

#[test]
fn pipeline_parsing_never_panics() {
    let mut inputs = corpus("pipeline");
    let base = String::from_utf8(inputs[0].clone()).unwrap();
    for word in [
        "shop",
        "/health",
        "x-bluegreen-version",
        "127.0.0.1:8080",
        "30",
    ] {
        inputs.extend(spliced(&base, word));
    }
    for n in [
        "-1.0",
        "nan",
        "+inf",
        "-inf",
        "1e300",
        "0.0",
        "1e-300",
        "-0.0",
        "18446744073709551616",
    ] {
        for key in ["timeout", "drain_timeout", "readiness_timeout", "lag_bound"] {
            inputs.push(format!("{base}\n[[hooks]]\npoint = \"before_switch\"\nargv = [\"true\"]\n{key} = {n}\n").into_bytes());
            inputs.push(format!("{base}\n[policy]\n{key} = {n}\n").into_bytes());
        }
    }
    for input in &inputs {
        bluegreen_fuzz::pipeline(input);
    }
}

#[test]
fn haproxy_stat_parsing_never_panics() {
    let mut inputs = corpus("haproxy_stat");
    let base = String::from_utf8(inputs[0].clone()).unwrap();
    for word in ["app", "blue", ",", "\"", "scur", "\n"] {
        inputs.extend(spliced(&base, word));
    }
    for input in &inputs {
        bluegreen_fuzz::haproxy_stat(input);
    }
}

#[test]
fn nginx_renders_only_names_that_keep_its_structure() {
    let mut inputs = corpus("nginx_render");
    for h in HOSTILE {
        inputs.push(format!("shop{h}").into_bytes());
        inputs.push(format!("shop\n/var/lib/{h}state.json").into_bytes());
    }
    for input in &inputs {
        bluegreen_fuzz::nginx_render(input);
    }
}

#[test]
fn traefik_renders_only_documents_with_its_structure() {
    let mut inputs = corpus("traefik_render");
    let base = String::from_utf8(inputs[0].clone()).unwrap();
    for word in ["shop", "shop.example", "websecure", "auth@file"] {
        inputs.extend(spliced(&base, word));
    }
    for input in &inputs {
        bluegreen_fuzz::traefik_render(input);
    }
}
