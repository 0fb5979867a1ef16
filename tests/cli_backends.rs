//! The `bluegreen` binary driving the real HAProxy and nginx (Dynamic mode) from a pipeline file:
//! deploy, status, rollback and validate, with the answers read back through the real server.
//! These need the `haproxy` / `nginx` features (on with `--all-features`) and the servers
//! installed; outside CI a missing server skips with a printed reason, in CI it fails.
#![cfg(all(feature = "haproxy", feature = "nginx", feature = "docker"))]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bluegreen_testenv::haproxy::{self, Haproxy};
use bluegreen_testenv::nginx;
use bluegreen_testenv::pg::{Cluster, ClusterOptions};

const BIN: &str = env!("CARGO_BIN_EXE_bluegreen");

/// A pipeline file in a temp dir with the demo app as the process environment.
fn pipeline(dir: &Path, switch: &str) -> PathBuf {
    let env = format!(
        "[environment]\nkind = \"process\"\nprogram = \"{}\"",
        bluegreen_demo::binary_path().display()
    );
    pipeline_with(dir, "cli-backend", &env, switch)
}

fn pipeline_with(dir: &Path, project: &str, env: &str, switch: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let text = format!(
        r#"
[project]
name = "{project}"

{env}

{switch}

[[health_checks]]
kind = "http"
path = "/health"

[verify]
header = "x-bluegreen-version"

[policy]
drain_timeout = 2
observation = {{ window = 1, interval = 250 }}
"#
    );
    let file = dir.join("bluegreen.toml");
    std::fs::write(&file, text).unwrap();
    file
}

fn run(file: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--file")
        .arg(file)
        .args(args)
        .env_remove("HEALTH_CHECK_TIMEOUT")
        .env_remove("HEALTH_CHECK_INTERVAL")
        .env_remove("DRAIN_TIMEOUT")
        .output()
        .unwrap()
}

fn ok(file: &Path, args: &[&str]) -> String {
    let out = run(file, args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{args:?} exited with {:?}\nstdout: {stdout}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The version answering `GET /` at `port` (raw HTTP/1.1).
fn version_at(port: u16) -> Option<String> {
    bluegreen_testenv::demo::version_at(([127, 0, 0, 1], port).into())
}

fn status_json(file: &Path) -> serde_json::Value {
    let out = ok(file, &["--json", "status"]);
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

/// deploy v1, deploy v2, status, validate, rollback, reset — each checked through `port`.
fn drive(file: &Path, port: u16) {
    ok(file, &["deploy", "v1"]);
    assert_eq!(version_at(port).as_deref(), Some("v1"));
    ok(file, &["deploy", "v2"]);
    assert_eq!(version_at(port).as_deref(), Some("v2"));
    let st = status_json(file);
    assert_eq!(st["active"], "green", "{st}");
    let v = ok(file, &["validate"]);
    assert!(v.contains("switch reachable"), "{v}");
    ok(file, &["rollback"]);
    assert_eq!(version_at(port).as_deref(), Some("v1"));
    let st = status_json(file);
    assert_eq!(st["active"], "blue", "{st}");
    ok(file, &["reset"]);
}

/// HAProxy on a rendered configuration; returns it, its runtime socket and its port.
fn start_haproxy() -> (Haproxy, PathBuf, u16) {
    let h = Haproxy::start();
    let (sock, port) = (h.admin_sock.clone(), h.port);
    (h, sock, port)
}

#[test]
fn the_cli_drives_real_haproxy() {
    if !haproxy::available("cli") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_haproxy, sock, port) = start_haproxy();
    let file = pipeline(
        dir.path(),
        &format!(
            "[switch]\nkind = \"haproxy\"\nruntime = \"{}\"\npublic = \"127.0.0.1:{port}\"",
            sock.display()
        ),
    );
    drive(&file, port);
}

#[test]
fn the_cli_drives_real_nginx_in_dynamic_mode() {
    if !nginx::available(true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (nginx, config) = nginx::start_dynamic(&dir.path().join("nginx"), "shop", Ok).unwrap();
    let token = dir.path().join("nginx.token");
    std::fs::write(&token, config.token.expose()).unwrap();
    // A token file others can read is refused.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (port, control) = (nginx.listen().port(), config.control.port());
    let file = pipeline(
        dir.path(),
        &format!(
            "[switch]\nkind = \"nginx\"\nname = \"shop\"\ncontrol = \"127.0.0.1:{control}\"\n\
             token_file = \"nginx.token\"\npublic = \"127.0.0.1:{port}\""
        ),
    );
    drive(&file, port);
}

#[test]
fn a_missing_token_file_or_unset_password_variable_is_a_clear_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = pipeline(
        dir.path(),
        "[switch]\nkind = \"nginx\"\nname = \"shop\"\ncontrol = \"127.0.0.1:9\"\n\
         token_file = \"missing.token\"",
    );
    let out = run(&file, &["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("missing.token"), "{err}");

    let file = pipeline(
        dir.path(),
        "[switch]\nkind = \"haproxy\"\nruntime = \"/nonexistent/admin.sock\"\n\n\
         [state]\nkind = \"postgres\"\n[state.connection]\ndbname = \"x\"\n\
         password_env = \"BLUEGREEN_TEST_UNSET_PASSWORD\"",
    );
    let out = run(&file, &["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("BLUEGREEN_TEST_UNSET_PASSWORD"), "{err}");
}

#[test]
fn the_cli_deploys_docker_containers_behind_haproxy() {
    if !haproxy::available("cli") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(docker) = rt.block_on(bluegreen_testenv::docker::engine()) else {
        return;
    };
    let tag = format!("bluegreen-demo:cli-{}", std::process::id());
    rt.block_on(
        bluegreen_testenv::docker::ScratchImage::demo(&tag, bluegreen_demo::binary_path())
            .unwrap()
            .build(&docker),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_haproxy, sock, port) = start_haproxy();
    let project = format!("cli-docker-{}", std::process::id());
    let file = pipeline_with(
        dir.path(),
        &project,
        &format!(
            "[environment]\nkind = \"docker\"\nimage = \"{tag}\"\nport = 8080\npull = \"never\"\n\
             memory_mb = 64"
        ),
        &format!(
            "[switch]\nkind = \"haproxy\"\nruntime = \"{}\"\npublic = \"127.0.0.1:{port}\"",
            sock.display()
        ),
    );
    // A version label that cannot be part of an image reference: a usage error.
    let out = run(&file, &["deploy", "v0:bad"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // An image that is not there, with pull = never: the deploy fails naming the image, and
    // nothing is left behind.
    let missing = pipeline_with(
        &dir.path().join("missing"),
        &project,
        "[environment]\nkind = \"docker\"\nimage = \"bluegreen-missing:{version}\"\npull = \"never\"",
        &format!(
            "[switch]\nkind = \"haproxy\"\nruntime = \"{}\"\npublic = \"127.0.0.1:{port}\"",
            sock.display()
        ),
    );
    let out = run(&missing, &["deploy", "v1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bluegreen-missing:v1"), "{err}");
    drive(&file, port);
    let left = rt.block_on(async {
        use bluegreen::docker::bollard::query_parameters::ListContainersOptionsBuilder;
        let mut filters = std::collections::HashMap::new();
        filters.insert(
            "label".to_string(),
            vec![format!("bluegreen.project={project}")],
        );
        docker
            .list_containers(Some(
                ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .unwrap()
    });
    assert!(left.is_empty(), "reset left containers: {left:?}");
}

/// A throw-away PostgreSQL cluster with trust authentication (the pipelines carry no password).
fn trust_cluster() -> Option<Cluster> {
    Cluster::start_blocking(ClusterOptions::new().trust())
}

#[test]
fn the_cli_copies_the_database_per_slot_and_keeps_its_state_in_postgres() {
    if !haproxy::available("cli") {
        return;
    }
    let Some(pg) = trust_cluster() else { return };
    pg.psql("postgres", "CREATE DATABASE shop");
    pg.psql(
        "shop",
        "CREATE TABLE items AS SELECT generate_series(1, 100) AS id",
    );
    pg.psql("postgres", "CREATE DATABASE deploys");
    let dir = tempfile::tempdir().unwrap();
    let (_haproxy, sock, port) = start_haproxy();
    let connection = |db: &str| {
        format!(
            "host = \"127.0.0.1\"\nport = {}\ndbname = \"{db}\"\nuser = \"postgres\"",
            pg.port
        )
    };
    let file = pipeline(
        dir.path(),
        &format!(
            "[switch]\nkind = \"haproxy\"\nruntime = \"{}\"\npublic = \"127.0.0.1:{port}\"\n\n\
             [database]\nkind = \"copied\"\n[database.connection]\n{}\n\n\
             [state]\nkind = \"postgres\"\n[state.connection]\n{}",
            sock.display(),
            connection("shop"),
            connection("deploys"),
        ),
    );
    let v = ok(&file, &["validate"]);
    assert!(v.contains("PostgreSQL 15"), "{v}");
    ok(&file, &["deploy", "v1"]);
    ok(&file, &["deploy", "v2"]);
    for db in ["shop_blue", "shop_green"] {
        assert_eq!(pg.psql(db, "SELECT count(*) FROM items"), "100", "{db}");
    }
    // The state lives in the deploys database, not in a file.
    assert!(!dir.path().join(".bluegreen/state").exists());
    let st = status_json(&file);
    assert_eq!(st["active"], "green", "{st}");
    let rows = pg.psql("deploys", "SELECT count(*) FROM bluegreen_state");
    assert_eq!(rows, "1");
    ok(&file, &["rollback"]);
    assert_eq!(version_at(port).as_deref(), Some("v1"));
    ok(&file, &["reset"]);
}

#[test]
fn a_shared_database_pipeline_refuses_a_breaking_expand_migration_by_name() {
    let Some(pg) = trust_cluster() else { return };
    pg.psql("postgres", "CREATE DATABASE shop");
    let dir = tempfile::tempdir().unwrap();
    let migrations = dir.path().join("migrations");
    std::fs::create_dir_all(&migrations).unwrap();
    std::fs::write(
        migrations.join("001_orders.expand.sql"),
        "CREATE TABLE orders (id int, code text);",
    )
    .unwrap();
    std::fs::write(
        migrations.join("002_cleanup.expand.sql"),
        "ALTER TABLE orders DROP COLUMN code;",
    )
    .unwrap();
    let file = pipeline(
        dir.path(),
        &format!(
            "[switch]\nkind = \"haproxy\"\nruntime = \"/nonexistent/admin.sock\"\n\n\
             [database]\nkind = \"shared\"\nmigrations = \"migrations\"\n\
             [database.connection]\nport = {}\ndbname = \"shop\"",
            pg.port
        ),
    );
    let out = run(&file, &["deploy", "v1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("ALTER TABLE orders DROP COLUMN code"), "{err}");
    // Nothing ran: not even the first, compatible migration.
    assert_eq!(
        pg.psql(
            "shop",
            "SELECT count(*) FROM pg_tables WHERE tablename = 'orders'"
        ),
        "0"
    );
}

#[test]
fn the_cli_writes_the_traefik_file_provider_configuration() {
    // No Traefik binary here: without `api`, the switch writes the file provider's file and reads
    // it back; the routing itself is Traefik's (see bluegreen-traefik's tests against its schemas).
    let dir = tempfile::tempdir().unwrap();
    let watched = dir.path().join("dynamic");
    std::fs::create_dir_all(&watched).unwrap();
    let file = dir.path().join("bluegreen.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[project]
name = "cli-traefik"

[environment]
kind = "process"
program = "{}"

[switch]
kind = "traefik"
name = "shop"
rule = "Host(`shop.example`)"
dir = "dynamic"
format = "toml"
version = "v2"

[[health_checks]]
kind = "http"
path = "/health"

[policy]
drain_timeout = 1
observation = {{ window = 1, interval = 250 }}
"#,
            bluegreen_demo::binary_path().display()
        ),
    )
    .unwrap();
    ok(&file, &["deploy", "v1"]);
    ok(&file, &["deploy", "v2"]);
    let written: Vec<_> = std::fs::read_dir(&watched)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(written.len(), 1, "{written:?}");
    let text = std::fs::read_to_string(&written[0]).unwrap();
    assert!(text.contains("shop-green"), "{text}");
    assert!(text.contains("Host(`shop.example`)"), "{text}");
    let st = status_json(&file);
    assert_eq!(st["active"], "green", "{st}");
    assert_eq!(st["split"]["green"], 100, "{st}");
    ok(&file, &["rollback"]);
    assert_eq!(status_json(&file)["split"]["blue"], 100);
    ok(&file, &["reset"]);
}

#[test]
fn status_of_a_fleet_names_each_host_and_the_unreachable_one() {
    if !haproxy::available("cli") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    if rt.block_on(bluegreen_testenv::docker::engine()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_haproxy, sock, port) = start_haproxy();
    // web1 is this machine's engine; web2's engine socket does not exist.
    let engine = std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| h.starts_with("unix://"))
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
    let gone = dir.path().join("gone.sock");
    let file = pipeline_with(
        dir.path(),
        &format!("cli-fleet-{}", std::process::id()),
        &format!(
            "[environment]\nkind = \"docker\"\nimage = \"bluegreen-demo:{{version}}\"\n\
             pull = \"never\"\nport = 8080\nhosts = [\n  \
             {{ name = \"web1\", engine = \"{engine}\", address = \"127.0.0.1\" }},\n  \
             {{ name = \"web2\", engine = \"unix://{}\", address = \"127.0.0.2\" }},\n]",
            gone.display()
        ),
        &format!(
            "[switch]\nkind = \"haproxy\"\nruntime = \"{}\"\npublic = \"127.0.0.1:{port}\"",
            sock.display()
        ),
    );
    let text = ok(&file, &["status"]);
    assert!(text.contains("blue     Unknown"), "{text}");
    assert!(text.contains("  host web1: Absent"), "{text}");
    let web2 = text
        .lines()
        .find(|l| l.starts_with("  host web2: unreachable: "))
        .unwrap_or_else(|| panic!("web2 not reported unreachable: {text}"));
    assert!(web2.contains(&gone.display().to_string()), "{web2}");

    let st = status_json(&file);
    for slot in ["blue", "green"] {
        let s = &st["slots"][slot];
        assert_eq!(s["state"], "unknown", "{st}");
        assert_eq!(s["parts"][0]["name"], "web1", "{st}");
        assert_eq!(s["parts"][0]["state"], "absent", "{st}");
        assert_eq!(s["parts"][1]["name"], "web2", "{st}");
        assert_eq!(s["parts"][1]["state"], "unknown", "{st}");
        assert!(
            s["parts"][1]["error"]
                .as_str()
                .unwrap()
                .contains("gone.sock"),
            "{st}"
        );
    }

    // validate does not call an environment with an unreachable host reachable.
    let out = run(&file, &["validate"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(err.contains("web2") && err.contains("unreachable"), "{err}");
    assert_eq!(
        err.matches("gone.sock)").count(),
        1,
        "web2 named once: {err}"
    );
}
