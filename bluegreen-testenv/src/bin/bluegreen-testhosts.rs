//! Starts or cleans up test hosts (extra Docker engines in network namespaces, see
//! `bluegreen_testenv::hosts`) from scripts such as `.ci/run`:
//!
//! ```sh
//! bluegreen-testhosts clean          # tear down hosts whose owner process is gone
//! bluegreen-testhosts run N -- PROG ARGS…
//!     # start N hosts with the demo image, run PROG with BLUEGREEN_FLEET_HOSTS set
//!     # (`name=unix:///…/docker.sock@10.201.b.2`, comma-separated), stop the hosts, exit as PROG
//! ```

use std::process::ExitCode;

use bluegreen_testenv::hosts::{self, TestHosts};

fn usage() -> ExitCode {
    eprintln!("usage: bluegreen-testhosts clean | run N -- PROGRAM [ARGS…]");
    ExitCode::from(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("clean") => match hosts::clean_leftovers() {
            Ok(cleaned) => {
                for ns in cleaned {
                    println!("removed left-over test host {ns}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Some("run") => {
            let Some(n) = args.get(1).and_then(|n| n.parse::<usize>().ok()) else {
                return usage();
            };
            if args.get(2).map(String::as_str) != Some("--") || args.len() < 4 {
                return usage();
            }
            let started = async {
                let set = TestHosts::start(n).await?;
                let main = bluegreen_testenv::docker::engine().await.ok_or_else(|| {
                    bluegreen_core::Error::invalid("docker", "main", "unreachable")
                })?;
                let tag = hosts::demo_image(&main).await?;
                set.load_image(&main, &tag).await?;
                Ok::<_, bluegreen_core::Error>((set, tag))
            }
            .await;
            let (set, tag) = match started {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("starting test hosts: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let list: Vec<String> = set
                .hosts()
                .iter()
                .map(|h| format!("{}={}@{}", h.name(), h.docker_host(), h.address()))
                .collect();
            let status = tokio::process::Command::new(&args[3])
                .args(&args[4..])
                .env("BLUEGREEN_FLEET_HOSTS", list.join(","))
                .env("BLUEGREEN_FLEET_IMAGE", &tag)
                .status()
                .await;
            let stopped = set.stop();
            if let Err(e) = &stopped {
                eprintln!("{e}");
            }
            match status {
                Ok(s) if s.success() && stopped.is_ok() => ExitCode::SUCCESS,
                Ok(s) => {
                    eprintln!("{} exited with {s}", args[3]);
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("running {}: {e}", args[3]);
                    ExitCode::FAILURE
                }
            }
        }
        _ => usage(),
    }
}
