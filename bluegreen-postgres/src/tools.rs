//! Running `pg_dump` piped into `psql` (argv only, password through the environment).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bluegreen_core::{Error, Result};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::conn::PostgresConfig;
use crate::error::fail;

/// Environment variables of the caller that could redirect a child's connection.
const SCRUBBED: &[&str] = &[
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGHOSTADDR",
    "PGSSLMODE",
    "PGTARGETSESSIONATTRS",
    "DATABASE_URL",
];

/// Finds a PostgreSQL client program: in `bin_dir` when given, else the newest
/// `/usr/lib/postgresql/<major>/bin`, else `PATH`.
pub(crate) fn program(bin_dir: Option<&Path>, name: &str) -> PathBuf {
    if let Some(d) = bin_dir {
        return d.join(name);
    }
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        for e in rd.flatten() {
            let major = e.file_name().to_string_lossy().parse::<u32>().ok();
            let p = e.path().join("bin").join(name);
            if let Some(m) = major {
                if p.exists() && best.as_ref().map(|(b, _)| m > *b).unwrap_or(true) {
                    best = Some((m, p));
                }
            }
        }
    }
    best.map(|(_, p)| p).unwrap_or_else(|| PathBuf::from(name))
}

fn command(bin_dir: Option<&Path>, name: &str, cfg: &PostgresConfig) -> Command {
    let mut c = Command::new(program(bin_dir, name));
    for k in SCRUBBED {
        c.env_remove(k);
    }
    for (k, v) in cfg.child_env() {
        c.env(k, v);
    }
    c.kill_on_drop(true);
    c
}

/// Runs `pg_dump <dump_args>` against `source` and pipes its output into
/// `psql -X -v ON_ERROR_STOP=1 --single-transaction` on `target`; fails (naming the program and its
/// stderr) if either fails. Bounded by `timeout`.
pub(crate) async fn dump_into(
    backend: &str,
    bin_dir: Option<&Path>,
    source: &PostgresConfig,
    dump_args: &[String],
    target: &PostgresConfig,
    timeout: Duration,
) -> Result<()> {
    let op = format!("pg_dump {} | psql", dump_args.join(" "));
    let mut dump = command(bin_dir, "pg_dump", source);
    dump.arg("--no-password")
        .args(dump_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut psql = command(bin_dir, "psql", target);
    psql.args([
        "--no-password",
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "--single-transaction",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());

    let run = async {
        let mut d = dump.spawn().map_err(|e| {
            Error::io(
                format!("starting {}", program(bin_dir, "pg_dump").display()),
                e,
            )
        })?;
        let mut p = psql.spawn().map_err(|e| {
            Error::io(
                format!("starting {}", program(bin_dir, "psql").display()),
                e,
            )
        })?;
        let mut out = d.stdout.take().expect("piped");
        let mut inp = p.stdin.take().expect("piped");
        let mut derr = d.stderr.take().expect("piped");
        let mut perr = p.stderr.take().expect("piped");
        let pipe = async move {
            let r = tokio::io::copy(&mut out, &mut inp).await;
            drop(inp); // EOF for psql
            r
        };
        let read_d = async move {
            let mut s = String::new();
            let _ = derr.read_to_string(&mut s).await;
            s
        };
        let read_p = async move {
            let mut s = String::new();
            let _ = perr.read_to_string(&mut s).await;
            s
        };
        let (piped, dstderr, pstderr, dstatus, pstatus) =
            tokio::join!(pipe, read_d, read_p, d.wait(), p.wait());
        let dstatus = dstatus.map_err(|e| Error::io("waiting for pg_dump", e))?;
        let pstatus = pstatus.map_err(|e| Error::io("waiting for psql", e))?;
        if !dstatus.success() {
            return Err(fail(
                backend,
                &op,
                format!("pg_dump exited with {dstatus}: {}", dstderr.trim()),
            ));
        }
        if !pstatus.success() {
            return Err(fail(
                backend,
                &op,
                format!("psql exited with {pstatus}: {}", pstderr.trim()),
            ));
        }
        if let Err(e) = piped {
            return Err(Error::io(format!("piping {op}"), e));
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            what: op,
            after: timeout,
        }),
    }
}

/// Runs one client program to completion; fails naming it with its stderr.
async fn run_tool(backend: &str, mut cmd: Command, what: &str) -> Result<()> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let out = cmd
        .output()
        .await
        .map_err(|e| Error::io(format!("starting {what}"), e))?;
    if !out.status.success() {
        return Err(fail(
            backend,
            what,
            format!(
                "exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// A custom-format dump in a temporary file, removed on drop.
#[derive(Debug)]
pub(crate) struct DumpFile(PathBuf);

impl Drop for DumpFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `pg_dump -Fc <dump_args>` against `source` into a temporary file. Bounded by `timeout`.
pub(crate) async fn dump_to_file(
    backend: &str,
    bin_dir: Option<&Path>,
    source: &PostgresConfig,
    dump_args: &[String],
    timeout: Duration,
) -> Result<DumpFile> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let file = DumpFile(
        std::env::temp_dir().join(format!("bluegreen-{}-{nanos}.dump", std::process::id())),
    );
    let what = format!("pg_dump -Fc {}", dump_args.join(" "));
    let mut dump = command(bin_dir, "pg_dump", source);
    dump.args(["--no-password", "-Fc", "-f"])
        .arg(&file.0)
        .args(dump_args);
    match tokio::time::timeout(timeout, run_tool(backend, dump, &what)).await {
        Ok(r) => r.map(|()| file),
        Err(_) => Err(Error::Timeout {
            what,
            after: timeout,
        }),
    }
}

/// Runs `pg_restore -j <jobs> --exit-on-error` of `file` into `target` (independent objects, such
/// as the indexes of different tables, are built in parallel). `settings` (`name=value`, checked
/// by the caller) are set in each of its sessions through `PGOPTIONS`. Bounded by `timeout`.
pub(crate) async fn restore_file(
    backend: &str,
    bin_dir: Option<&Path>,
    file: &DumpFile,
    target: &PostgresConfig,
    jobs: usize,
    settings: &[String],
    timeout: Duration,
) -> Result<()> {
    let mut restore = command(bin_dir, "pg_restore", target);
    if !settings.is_empty() {
        let opts: Vec<String> = settings.iter().map(|s| format!("-c {s}")).collect();
        restore.env("PGOPTIONS", opts.join(" "));
    }
    restore
        .args(["--no-password", "--exit-on-error", "-j"])
        .arg(jobs.max(1).to_string())
        .arg("-d")
        .arg(&target.dbname)
        .arg(&file.0);
    let what = format!("pg_restore -j {jobs}");
    match tokio::time::timeout(timeout, run_tool(backend, restore, "pg_restore")).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            what,
            after: timeout,
        }),
    }
}
