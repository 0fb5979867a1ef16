//! Chaos through the binary (issue #12, section 4): about twenty kill -9 points, chosen by a
//! seeded pseudo-random sequence, across `deploy` and `rollback`, a few of them on `bluegreen
//! serve` itself, while a request loop runs through the proxy.
//!
//! After each kill the operator's retry of the same command must converge (recovery finishes or
//! undoes the flight) and leave a consistent pipeline: nothing in flight, the lock free, the live
//! slot's recorded version is what the proxy serves, no drift, no release process left over.
//! Requests may fail only while `serve` itself is down.
//!
//! The seed is printed; `BLUEGREEN_CHAOS_SEED=<n>` replays a sequence.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bluegreen_testenv::{Load, LoadOptions, LoadStats};
use common::Pipeline;

const DEFAULT_SEED: u64 = 0x5eed_0012_b1e6_4ee7;
const ROUNDS: usize = 20;
/// At least this many rounds kill `serve` (alone or with the command).
const SERVE_KILLS: usize = 3;
/// How long `serve` stays down.
const SERVE_DOWN: Duration = Duration::from_millis(100);
/// Bound on one command of the test.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

const POLICY: &str = "[policy]\nreadiness_timeout = 30\ndrain_timeout = 1\n\
                      observation = { window = 0.3, interval = 100 }\n";

/// Where a command can be killed: right after its run started (the flight is saved), or once it
/// reports that a phase started. Every phase a deploy and a rollback pass reports its start,
/// skipped or not.
const POINTS: [&str; 18] = [
    "started",
    "prepare_database",
    "before_deploy_hook",
    "deploy_target",
    "wait_ready",
    "after_deploy_hook",
    "preview",
    "smoke_test",
    "gate",
    "database_before_switch",
    "switch",
    "verify_data_path",
    "observe",
    "database_after_switch",
    "after_switch_hook",
    "drain_old",
    "finalize",
    "confirm_data_path",
];

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone)]
enum Op {
    Deploy(String),
    /// A deploy whose release never gets healthy: it fails and undoes, and the kill lands in its
    /// undo. The operator then deploys the same version, fixed.
    FailingDeploy(String),
    Rollback,
}

impl Op {
    fn args(&self) -> Vec<&str> {
        match self {
            Op::Deploy(v) | Op::FailingDeploy(v) => vec!["deploy", v],
            Op::Rollback => vec!["rollback"],
        }
    }

    /// What the command's release gets (the demo app reads these).
    fn env(&self) -> Vec<(&'static str, &'static str)> {
        let mut env = vec![("DEMO_START_DELAY_MS", "200")];
        if let Op::FailingDeploy(_) = self {
            env.extend([
                ("DEMO_FAIL_HEALTH", "1"),
                ("HEALTH_CHECK_TIMEOUT", "1s"),
                ("HEALTH_CHECK_INTERVAL", "100ms"),
            ]);
        }
        env
    }

    /// The operator's retry.
    fn retry(&self) -> Op {
        match self {
            Op::FailingDeploy(v) => Op::Deploy(v.clone()),
            op => op.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Point {
    /// When the command reports this event or phase, plus a delay.
    After(&'static str, Duration),
    /// A delay after the command started.
    Delay(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Victim {
    /// The `deploy` or `rollback` command.
    Command,
    /// `bluegreen serve`, restarted at once; the command goes on.
    Serve,
    /// Both at once, as when the host's processes die together.
    Both,
}

/// A command running in the background with `--json`: its output lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    seen: Vec<serde_json::Value>,
}

impl Drop for Running {
    /// A test that fails mid-round leaves no command running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Running {
    fn start(p: &Pipeline, op: &Op) -> Running {
        let mut args = vec!["--json"];
        args.extend(op.args());
        let mut child = p
            .cmd(&args)
            .envs(op.env())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Running {
            child,
            lines,
            stderr: Some(stderr),
            seen: Vec::new(),
        }
    }

    /// Reads output until `point`; false if the command ended first.
    fn wait_for(&mut self, point: Point) -> bool {
        let start = Instant::now();
        let (until, extra) = match point {
            Point::After(what, extra) => (Some(what), extra),
            Point::Delay(d) => (None, d),
        };
        let mut reached = until.is_none();
        while !reached {
            assert!(start.elapsed() < COMMAND_TIMEOUT, "never reached {point:?}");
            let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) else {
                if self.child.try_wait().unwrap().is_some() {
                    self.drain();
                    return false;
                }
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            reached = v["event"] == until.unwrap()
                || (v["event"] == "phase_started" && v["phase"] == until.unwrap());
            self.seen.push(v);
        }
        std::thread::sleep(extra);
        self.child.try_wait().unwrap().is_none()
    }

    fn drain(&mut self) {
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(serde_json::from_str(&l).unwrap());
        }
    }

    /// Waits for the command to end: its exit code (None when killed) and stderr.
    fn wait(mut self) -> (Option<i32>, String, Vec<serde_json::Value>) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > COMMAND_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("a command ran past {COMMAND_TIMEOUT:?}: {:?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.drain();
        let stderr = self.stderr.take().unwrap().join().unwrap();
        (status.code(), stderr, std::mem::take(&mut self.seen))
    }

    /// kill -9: the command's last reported phase (where it died), or its exit code if it
    /// ended first.
    fn kill(mut self) -> Result<String, Option<i32>> {
        let _ = self.child.kill();
        let (code, _, seen) = self.wait();
        if code.is_some() {
            return Err(code);
        }
        if seen.iter().any(|v| v["event"] == "finished") {
            // In the moment between the end of its run and its exit.
            return Ok("after its run finished".into());
        }
        let phase = seen
            .iter()
            .rev()
            .find(|v| v["event"] == "phase_started" || v["event"] == "started")
            .map(|v| v["phase"].as_str().unwrap_or("started").to_string())
            .unwrap_or_else(|| "before its run started".into());
        if seen.iter().any(|v| v["event"] == "rolling_back") {
            return Ok(format!("undo after {phase} failed"));
        }
        Ok(phase)
    }
}

/// Release processes whose output goes to a log in this pipeline's state directory, the slot's
/// log or one already removed (`… (deleted)`): `(pid, where its output goes)`.
fn release_processes(p: &Pipeline) -> Vec<(u32, String)> {
    let logs = p.dir.path().join(".bluegreen/process");
    let logs = logs.to_string_lossy();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().map_while(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(out) = std::fs::read_link(entry.path().join("fd/1")) else {
            continue;
        };
        let out = out.to_string_lossy().into_owned();
        if out.starts_with(&*logs) {
            found.push((pid, out));
        }
    }
    found.sort();
    found
}

/// The pipeline at rest is consistent; returns the live version.
fn check_at_rest(p: &Pipeline, round: usize) -> String {
    let (code, st, _) = p.json(&["status"]);
    assert_eq!(code, 0, "round {round}: status reports drift: {st}");
    assert_eq!(
        st["drift"].as_array().unwrap().len(),
        0,
        "round {round}: {st}"
    );
    assert!(
        st["in_flight"].is_null(),
        "round {round}: still in flight: {st}"
    );
    assert!(
        st["lock"].is_null(),
        "round {round}: the lock is held at rest: {st}"
    );
    let active = st["active"]
        .as_str()
        .unwrap_or_else(|| panic!("round {round}: {st}"));
    let live = &st["slots"][active];
    assert_eq!(live["state"], "running", "round {round}: {st}");
    let version = live["version"].as_str().unwrap().to_string();
    assert_eq!(
        p.get().as_deref(),
        Some(version.as_str()),
        "round {round}: the proxy does not serve the recorded live version: {st}"
    );

    // The release processes are exactly those of the running slots, as their pid files say: no
    // release outlives its slot.
    let mut expected: Vec<u32> = ["blue", "green"]
        .iter()
        .filter(|slot| st["slots"][slot]["state"] == "running")
        .map(|slot| {
            let file = p.dir.path().join(format!(".bluegreen/process/{slot}.json"));
            let rec: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
            rec["pid"].as_u64().unwrap() as u32
        })
        .collect();
    expected.sort();
    let procs = release_processes(p);
    assert_eq!(
        procs.iter().map(|(pid, _)| *pid).collect::<Vec<_>>(),
        expected,
        "round {round}: release processes {procs:?}, expected the slots' {expected:?}; {st}"
    );

    // History records every run once.
    let (_, h, _) = p.json(&["history"]);
    let ids: Vec<u64> = h["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "round {round}: history ids repeat or go back: {ids:?}"
    );
    version
}

/// A command that reported its release live left it live: the proxy serves it (before any other
/// command runs).
fn assert_success_is_true(p: &Pipeline, round: usize, seen: &[serde_json::Value]) {
    let result = seen
        .last()
        .unwrap_or_else(|| panic!("round {round}: no output"));
    if result["status"] == "live" {
        assert_eq!(
            p.get().as_deref(),
            result["version"].as_str(),
            "round {round}: reported live but not served: {result}"
        );
    }
}

/// Requests seen while `serve` was up and while it was down.
#[derive(Default)]
struct Windows {
    up: LoadStats,
    down: LoadStats,
}

fn add(total: &mut LoadStats, s: LoadStats) {
    total.ok += s.ok;
    total.failed += s.failed;
    for e in s.errors {
        if total.errors.len() < 10 {
            total.errors.push(e);
        }
    }
}

fn load(p: &Pipeline) -> Load {
    Load::start(
        ([127, 0, 0, 1], p.listen).into(),
        LoadOptions::new(2).with_pause(Duration::from_millis(5)),
    )
}

#[test]
fn kill_9_at_random_points_of_deploy_and_rollback_never_breaks_traffic_or_consistency() {
    let seed = std::env::var("BLUEGREEN_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    println!("chaos seed {seed} (BLUEGREEN_CHAOS_SEED={seed} replays it)");
    let mut rng = Rng(seed.max(1));
    let started = Instant::now();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let _rt = rt.enter();
    let mut p = Pipeline::new(POLICY);
    p.serve();
    let out = p.run(&["deploy", "v1"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let mut live = check_at_rest(&p, 0);
    let mut next_version = 2;

    let mut windows = Windows::default();
    let mut running_load = Some(load(&p));
    let mut kills: BTreeMap<String, usize> = BTreeMap::new();
    let mut serve_kills = 0;
    let mut ended_first = 0;
    let mut command_exits: BTreeMap<String, usize> = BTreeMap::new();
    let mut recoveries: BTreeMap<String, usize> = BTreeMap::new();

    for round in 1..=ROUNDS {
        let (_, st, _) = p.json(&["status"]);
        let idle = match st["active"].as_str() {
            Some("blue") => "green",
            _ => "blue",
        };
        let idle_version = st["slots"][idle]["version"].as_str().map(str::to_string);
        let op = if idle_version.is_some() && rng.below(3) == 0 {
            Op::Rollback
        } else {
            let v = format!("v{next_version}");
            next_version += 1;
            if rng.below(6) == 0 {
                Op::FailingDeploy(v)
            } else {
                Op::Deploy(v)
            }
        };
        let point = if let Op::FailingDeploy(_) = op {
            Point::After("rolling_back", Duration::from_millis(rng.below(30)))
        } else if rng.below(8) == 0 {
            Point::Delay(Duration::from_millis(rng.below(1500)))
        } else {
            let what = POINTS[rng.below(POINTS.len() as u64) as usize];
            Point::After(what, Duration::from_millis(rng.below(60)))
        };
        let left = ROUNDS - round;
        let victim = if rng.below(4) == 0 || serve_kills + left < SERVE_KILLS {
            if rng.below(2) == 0 {
                Victim::Serve
            } else {
                Victim::Both
            }
        } else {
            Victim::Command
        };
        println!("round {round}: {op:?}, kill {victim:?} at {point:?}");

        let mut cmd = Running::start(&p, &op);
        let alive = cmd.wait_for(point);
        let at = cmd
            .seen
            .iter()
            .rev()
            .find(|v| v["event"] == "phase_started")
            .and_then(|v| v["phase"].as_str())
            .unwrap_or("-")
            .to_string();
        let mut going_on = None;
        if victim == Victim::Serve {
            going_on = Some(cmd);
        } else if !alive {
            ended_first += 1;
            let (code, err, seen) = cmd.wait();
            println!("  the command ended before its kill point: exit {code:?} {err}");
            // Nothing touched it: it succeeded, or failed as it was made to.
            let expected = if let Op::FailingDeploy(_) = op { 1 } else { 0 };
            assert_eq!(code, Some(expected), "round {round}: {err}");
            assert_success_is_true(&p, round, &seen);
        } else {
            match cmd.kill() {
                Ok(phase) => *kills.entry(phase).or_default() += 1,
                Err(code) => {
                    ended_first += 1;
                    println!("  the command ended as it was killed: exit {code:?}");
                }
            }
        }
        if victim != Victim::Command {
            serve_kills += 1;
            let who = if victim == Victim::Both {
                "serve too"
            } else {
                "serve alone"
            };
            *kills.entry(format!("{who} during {at}")).or_default() += 1;
            // Requests while serve is up are counted apart from those while it is down.
            add(
                &mut windows.up,
                rt.block_on(running_load.take().unwrap().finish()),
            );
            let mut serve = p.serve.take().unwrap();
            serve.kill().unwrap();
            serve.wait().unwrap();
            let down = load(&p);
            std::thread::sleep(SERVE_DOWN);
            add(&mut windows.down, rt.block_on(down.finish()));
            p.serve();
            running_load = Some(load(&p));
        }
        if let Some(cmd) = going_on {
            // The command was not killed: it goes on with the restarted proxy.
            let (code, err, seen) = cmd.wait();
            println!("  the command went on: exit {code:?} {}", err.trim());
            // It may fail (and then says so); a success must be true.
            if code == Some(0) {
                assert_success_is_true(&p, round, &seen);
            }
            *command_exits
                .entry(format!("exit {}", code.unwrap_or(-1)))
                .or_default() += 1;
        }

        // The operator retries the same command: it recovers what the kill left and converges.
        let retry = op.retry();
        let (code, v, events) = p.json(&retry.args());
        assert_eq!(code, 0, "round {round}: the retried {retry:?} failed: {v}");
        let recovered = events
            .iter()
            .find(|e| e["event"] == "recovering")
            .map(|e| e["action"].as_str().unwrap().to_string())
            .unwrap_or_else(|| "nothing to recover".into());
        *recoveries.entry(recovered.clone()).or_default() += 1;
        let before = live.clone();
        live = check_at_rest(&p, round);
        // Both releases of the round are kept: the new live one and the rollback target.
        let (_, st, _) = p.json(&["status"]);
        let mut held: Vec<&str> = ["blue", "green"]
            .iter()
            .filter_map(|s| st["slots"][s]["version"].as_str())
            .collect();
        held.sort();
        let mut expected = match &retry {
            Op::Deploy(version) | Op::FailingDeploy(version) => {
                assert_eq!(&live, version, "round {round}: {v}");
                vec![version.as_str(), before.as_str()]
            }
            Op::Rollback => {
                let idle_version = idle_version.as_deref().unwrap();
                assert!(
                    live == before || live == idle_version,
                    "round {round}: {live} is live after a rollback from {before}"
                );
                vec![before.as_str(), idle_version]
            }
        };
        expected.sort();
        assert_eq!(held, expected, "round {round}: a release was lost: {st}");
        println!(
            "  retried: {} ({recovered}); live {live}",
            v["status"].as_str().unwrap_or("?")
        );
    }

    add(
        &mut windows.up,
        rt.block_on(running_load.take().unwrap().finish()),
    );
    println!(
        "chaos: {ROUNDS} rounds in {:.1}s; kills by phase {kills:?}; {ended_first} commands \
         ended before their kill point; commands that saw serve restart: {command_exits:?}; \
         retries: {recoveries:?}; requests while serve up: {} ok, {} failed; while serve down: {} ok, {} failed",
        started.elapsed().as_secs_f64(),
        windows.up.ok,
        windows.up.failed,
        windows.down.ok,
        windows.down.failed,
    );
    assert_eq!(
        windows.up.failed, 0,
        "requests failed while serve was up: {:?}",
        windows.up.errors
    );
    assert!(windows.up.ok > 0);
    assert!(serve_kills >= SERVE_KILLS);
    assert!(
        kills.values().sum::<usize>() >= ROUNDS * 3 / 4,
        "too few kills landed: {kills:?}"
    );
}
