//! The `bluegreen` binary driven as an operator would: a pipeline file in a temp dir, a real
//! `bluegreen serve`, the demo app as the released program.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_bluegreen");

pub(crate) struct Pipeline {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) listen: u16,
    pub(crate) serve: Option<Child>,
}

impl Pipeline {
    pub(crate) fn new(extra: &str) -> Pipeline {
        let dir = tempfile::tempdir().unwrap();
        // Port 0: `serve` binds free ports and reports them (see `serve` below).
        let demo = bluegreen_demo::binary_path();
        let text = format!(
            r#"
[project]
name = "cli-test"

[environment]
kind = "process"
program = "{}"
# The demo app's knobs that tests set on the CLI's environment; nothing else of it passes.
pass_env = ["DEMO_FAIL_HEALTH", "DEMO_START_DELAY_MS"]

[switch]
kind = "proxy"
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"

[[health_checks]]
kind = "http"
path = "/health"

[verify]
header = "x-bluegreen-version"
{extra}
"#,
            demo.display()
        );
        std::fs::write(dir.path().join("bluegreen.toml"), text).unwrap();
        Pipeline {
            dir,
            listen: 0,
            serve: None,
        }
    }

    pub(crate) fn file(&self) -> PathBuf {
        self.dir.path().join("bluegreen.toml")
    }

    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--file").arg(self.file()).args(args);
        c.env_remove("HEALTH_CHECK_TIMEOUT")
            .env_remove("HEALTH_CHECK_INTERVAL")
            .env_remove("DRAIN_TIMEOUT");
        c
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs with `--json` and parses the last line (the result).
    pub(crate) fn json(&self, args: &[&str]) -> (i32, serde_json::Value, Vec<serde_json::Value>) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!(
                        "not JSON: {l:?} ({e}); stderr: {}",
                        String::from_utf8_lossy(&out.stderr)
                    )
                })
            })
            .collect();
        let last = lines.last().cloned().unwrap_or_else(|| {
            panic!(
                "no output from {args:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), last, lines)
    }

    pub(crate) fn serve(&mut self) {
        let mut child = self
            .cmd(&["serve"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert!(line.starts_with("serving on"), "{line}");
        self.serve = Some(child);
        // `serving on http://<listen> (control API on http://<admin>)`: the ports it bound. The
        // other commands of the test reach the proxy through them, so the file names them now.
        let addrs: Vec<&str> = line
            .split("http://")
            .skip(1)
            .map(|s| s.trim_end().trim_end_matches(')').trim_end_matches('/'))
            .map(|s| s.split_whitespace().next().unwrap_or(s))
            .collect();
        let [listen, admin] = addrs[..] else {
            panic!("unexpected serve line: {line}");
        };
        self.listen = listen.rsplit_once(':').unwrap().1.parse().unwrap();
        let text = std::fs::read_to_string(self.file()).unwrap();
        let text = text
            .replace(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"{listen}\""),
            )
            .replace("admin = \"127.0.0.1:0\"", &format!("admin = \"{admin}\""));
        std::fs::write(self.file(), text).unwrap();
    }

    /// `GET /` through the proxy (a raw HTTP/1.1 request); the answering version.
    pub(crate) fn get(&self) -> Option<String> {
        bluegreen_testenv::demo::version_at(([127, 0, 0, 1], self.listen).into())
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = self.cmd(&["reset"]).output();
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}
