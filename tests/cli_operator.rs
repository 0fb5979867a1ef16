//! The operator's edges: inputs `validate` must refuse (naming the field) instead of panicking or
//! failing a deploy later, the control API kept on loopback, private token files, log levels,
//! `break-lock` on a corrupt lock and `status` against a stale record.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{stderr, Pipeline};

/// The file's text with `from` replaced by `to` (which must be there).
fn edit(p: &Pipeline, from: &str, to: &str) {
    let text = std::fs::read_to_string(p.file()).unwrap();
    assert!(text.contains(from), "{from:?} not in {text}");
    std::fs::write(p.file(), text.replace(from, to)).unwrap();
}

/// `validate` exits 2 naming `field`, and nothing panics.
fn refused(p: &Pipeline, field: &str) {
    for cmd in ["validate", "status"] {
        let out = p.run(&[cmd]);
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{cmd}: {err}");
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(err.contains(field), "{cmd}: expected {field:?} in {err}");
    }
}

#[test]
fn hook_timeouts_that_are_not_durations_are_refused_naming_the_hook() {
    for t in ["-1.0", "nan", "inf", "-inf", "1e300", "0.0"] {
        let p = Pipeline::new(&format!(
            "[[hooks]]\npoint = \"after_deploy\"\nargv = [\"true\"]\ntimeout = {t}\n"
        ));
        refused(&p, "hooks[0].timeout");
    }
}

#[test]
fn checks_that_could_never_pass_are_refused_naming_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        // A verify header HTTP cannot carry: every deploy would switch, fail verify, switch back.
        (
            "header = \"x-bluegreen-version\"",
            "header = \"x-bluegreen-version\\r\\nX-Evil: 1\"",
            "[verify]",
        ),
        (
            "header = \"x-bluegreen-version\"",
            "header = \"x bluegreen version\"",
            "[verify]",
        ),
        (
            "header = \"x-bluegreen-version\"",
            "header = \"x-bluegreen-version\"\npath = \"/\\r\\n\"",
            "[verify]",
        ),
        // Health checks: path, headers, status.
        (
            "path = \"/health\"",
            "path = \"/health\\r\\nX: y\"",
            "health_checks[0]",
        ),
        (
            "path = \"/health\"",
            "path = \"/health\"\nheaders = { \"X-A\" = \"v\\r\\nX-B: 1\" }",
            "health_checks[0]",
        ),
        (
            "path = \"/health\"",
            "path = \"/health\"\nheaders = { \"X A\" = \"v\" }",
            "health_checks[0]",
        ),
        (
            "path = \"/health\"",
            "path = \"/health\"\nstatus = 0",
            "status",
        ),
        (
            "path = \"/health\"",
            "path = \"/health\"\nstatus = 999",
            "status",
        ),
        (
            "path = \"/health\"",
            "path = \"/health\"\nstatus = 70000",
            "status",
        ),
    ];
    for (from, to, field) in cases {
        let p = Pipeline::new("");
        edit(&p, from, to);
        refused(&p, field);
    }
}

#[test]
fn process_settings_that_could_never_start_are_refused_naming_the_field() {
    let p = Pipeline::new("");
    let text = std::fs::read_to_string(p.file()).unwrap();
    let program_line = text
        .lines()
        .find(|l| l.starts_with("program = "))
        .unwrap()
        .to_string();
    for (extra, field) in [
        ("env = { \"A=B\" = \"1\" }", "environment.env"),
        ("env = { \"A\\u0000B\" = \"1\" }", "environment.env"),
        ("env = { \"\" = \"1\" }", "environment.env"),
        ("env = { \"A\" = \"x\\u0000y\" }", "environment.env.A"),
    ] {
        let p = Pipeline::new("");
        edit(&p, &program_line, &format!("{program_line}\n{extra}"));
        refused(&p, field);
    }
    let p = Pipeline::new("");
    edit(&p, &program_line, "program = \"\"");
    refused(&p, "environment.program");
}

#[test]
fn a_non_loopback_admin_address_needs_admin_public_and_then_warns() {
    let p = Pipeline::new("");
    edit(&p, "admin = \"127.0.0.1:0\"", "admin = \"0.0.0.0:0\"");
    refused(&p, "admin_public");

    let p = Pipeline::new("");
    edit(
        &p,
        "admin = \"127.0.0.1:0\"",
        "admin = \"0.0.0.0:0\"\nadmin_public = true",
    );
    // Loaded (the command then fails for want of a running `serve`), with a warning by default.
    let err = stderr(&p.run(&["status"]));
    assert!(!err.contains("admin_public = true` to serve"), "{err}");
    assert!(err.contains("plain HTTP"), "{err}");
    // `-q` and `RUST_LOG` choose what is logged.
    let err = stderr(&p.run(&["-q", "status"]));
    assert!(!err.contains("plain HTTP"), "{err}");
    let err = stderr(&p.cmd(&["status"]).env("RUST_LOG", "off").output().unwrap());
    assert!(!err.contains("plain HTTP"), "{err}");
}

#[test]
fn a_token_file_others_can_read_is_refused() {
    let p = Pipeline::new("");
    let dir = p.dir.path().join(".bluegreen");
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("admin.token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef").unwrap();
    for mode in [0o644, 0o640, 0o604, 0o620] {
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).unwrap();
        for cmd in ["status", "serve"] {
            let out = p.run(&[cmd]);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{cmd} {mode:o}: {err}");
            assert!(
                err.contains("group or others") && err.contains("chmod 600"),
                "{cmd} {mode:o}: {err}"
            );
        }
        // Refused, not replaced.
        assert_eq!(
            std::fs::read_to_string(&token).unwrap(),
            "0123456789abcdef0123456789abcdef"
        );
    }
}

#[test]
fn break_lock_on_a_corrupt_lock_says_what_it_removed() {
    let p = Pipeline::new("");
    let dir = p.dir.path().join(".bluegreen");
    std::fs::create_dir_all(dir.join("state")).unwrap();
    // The proxy switch is built from its token; nothing here reaches it.
    let token = dir.join("admin.token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let lock = dir.join("state").join("lock.json");
    std::fs::write(&lock, "{ not json").unwrap();
    let out = p.run(&["break-lock"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text} {}", stderr(&out));
    assert!(
        text.contains("corrupt lock") && text.contains("lock.json"),
        "{text}"
    );
    assert!(!lock.exists());
    // Nothing left: said so.
    let out = p.run(&["break-lock"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no lock was held"));
}

#[test]
fn status_does_not_put_a_stale_record_next_to_a_different_running_version() {
    let mut p = Pipeline::new("");
    p.serve();
    let out = p.run(&["deploy", "v1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Something else now runs in blue (the record of deployment #1 says v1).
    let pid_file = p.dir.path().join(".bluegreen/process/blue.json");
    let rec = std::fs::read_to_string(&pid_file).unwrap();
    assert!(rec.contains("\"v1\""), "{rec}");
    std::fs::write(&pid_file, rec.replace("\"v1\"", "\"v9\"")).unwrap();
    let out = p.run(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let blue = text.lines().find(|l| l.starts_with("blue")).unwrap();
    assert!(blue.contains("v9"), "{text}");
    assert!(!blue.contains("(deployment #1,"), "{text}");
    assert!(blue.contains("not the recorded v1"), "{text}");
}
