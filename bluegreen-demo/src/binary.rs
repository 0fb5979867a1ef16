//! Finding (and if needed building) the `bluegreen-demo` executable for other crates' tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

/// The source of this crate, as it was when the caller was compiled.
const CRATE_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// The path of the `bluegreen-demo` executable, built if it is missing or older than this crate's
/// sources.
///
/// For tests of other crates that need a real program to run (an integration test of package
/// `bluegreen-demo` itself can use `env!("CARGO_BIN_EXE_bluegreen-demo")` instead).
///
/// - `BLUEGREEN_DEMO_BIN`, when set, is returned as it is (nothing is built).
/// - Otherwise the executable is `<target>/debug/bluegreen-demo`, where `<target>` is
///   `CARGO_TARGET_DIR` (relative paths are taken from the workspace root) or the workspace's
///   `target` directory, with `CARGO_BUILD_TARGET`'s triple inserted when that is set.
/// - If that file is missing, or older than a file of this crate's `src/` or its `Cargo.toml`, it
///   runs `$CARGO build -p bluegreen-demo --bin bluegreen-demo --target-dir <target>` (`cargo` when
///   `CARGO` is unset) in the workspace root, as an argument vector (no shell), and waits for it.
///   That may wait for another build holding cargo's lock on the target directory.
///
/// The answer (or the failure) is computed once per process (guarded by a `OnceLock`), so
/// parallel tests build at most once.
///
/// # Panics
/// If the executable cannot be built or is still missing afterwards; the message carries cargo's
/// error output.
pub fn binary_path() -> PathBuf {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PATH.get_or_init(locate_or_build) {
        Ok(path) => path.clone(),
        Err(e) => panic!("bluegreen_demo::binary_path: {e}"),
    }
}

fn locate_or_build() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("BLUEGREEN_DEMO_BIN") {
        return Ok(PathBuf::from(path));
    }
    let crate_dir = Path::new(CRATE_DIR);
    let workspace = crate_dir
        .parent()
        .ok_or_else(|| format!("{CRATE_DIR} has no parent directory"))?;
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    let mut profile_dir = target_dir.clone();
    if let Some(triple) = std::env::var_os("CARGO_BUILD_TARGET") {
        profile_dir.push(triple);
    }
    profile_dir.push("debug");
    let exe = profile_dir.join(format!("bluegreen-demo{}", std::env::consts::EXE_SUFFIX));

    if is_fresh(&exe, crate_dir) {
        return Ok(exe);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(&cargo)
        .args(["build", "-p", "bluegreen-demo", "--bin", "bluegreen-demo"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(workspace)
        .output()
        .map_err(|e| {
            format!(
                "cannot run {} to build bluegreen-demo: {e}; set CARGO or BLUEGREEN_DEMO_BIN",
                Path::new(&cargo).display()
            )
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "`cargo build -p bluegreen-demo` failed ({}):\n{}",
            output.status,
            tail.join("\n")
        ));
    }
    if !exe.is_file() {
        return Err(format!(
            "`cargo build -p bluegreen-demo` succeeded but {} does not exist; \
             set BLUEGREEN_DEMO_BIN to the executable",
            exe.display()
        ));
    }
    Ok(exe)
}

/// True if `exe` exists and is newer than every source file of the crate.
fn is_fresh(exe: &Path, crate_dir: &Path) -> bool {
    let Some(built) = mtime(exe) else {
        return false;
    };
    let mut newest = mtime(&crate_dir.join("Cargo.toml"));
    let mut dirs = vec![crate_dir.join("src")];
    // Bounded walk: the crate has a handful of files.
    let mut budget = 1_000;
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return false;
        };
        for entry in entries.flatten() {
            budget -= 1;
            if budget == 0 {
                return false;
            }
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                newest = newest.max(mtime(&path));
            }
        }
    }
    newest.is_some_and(|n| n <= built)
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
