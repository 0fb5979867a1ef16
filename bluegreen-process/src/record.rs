//! Pid files, liveness checks that survive pid reuse, and log markers.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bluegreen_core::{Error, Result, Slot, Version};
use rustix::process::{Pid, Signal};
use serde::{Deserialize, Serialize};

use crate::error::{io_error, ProcessError};

/// The format of pid files this build writes and reads.
const FORMAT: u32 = 1;

/// What a slot's pid file (`<state_dir>/<slot>.json`) says about its program.
///
/// Secret variables are never written here; only their names are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SlotRecord {
    pub(crate) format: u32,
    pub(crate) pid: i32,
    /// `/proc/<pid>/stat` start time (clock ticks since boot), to tell our process from a later
    /// one that got the same pid. `None` where `/proc` is missing.
    pub(crate) proc_start: Option<u64>,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) version: Version,
    pub(crate) program: String,
    pub(crate) args: Vec<String>,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) secret_keys: Vec<String>,
    pub(crate) started_at_ms: u64,
    /// Set before SIGTERM: a later death is a stop, not a crash.
    pub(crate) stop_requested: bool,
    pub(crate) exit_code: Option<i32>,
    pub(crate) exit_signal: Option<i32>,
    pub(crate) exited_at_ms: Option<u64>,
}

impl SlotRecord {
    /// Whether this record's process is still running (not a zombie, not a reused pid).
    pub(crate) fn is_alive(&self) -> bool {
        is_alive(self.pid, self.proc_start)
    }

    /// Sends `signal` to the process group (the program is its group's leader, so its children
    /// get it too), or to the process alone if the group is gone. `Ok` if the process is gone.
    pub(crate) fn signal(&self, slot: Slot, signal: Signal) -> Result<()> {
        if !self.is_alive() {
            return Ok(());
        }
        let Some(pid) = Pid::from_raw(self.pid) else {
            return Ok(());
        };
        let res = rustix::process::kill_process_group(pid, signal)
            .or_else(|_| rustix::process::kill_process(pid, signal));
        match res {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::SRCH => Ok(()),
            Err(e) => Err(ProcessError::Signal {
                signal: if signal == Signal::KILL {
                    "SIGKILL"
                } else {
                    "SIGTERM"
                },
                pid: self.pid,
                slot,
                source: e.into(),
            }
            .into_core("stop")),
        }
    }
}

pub(crate) fn describe_exit(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "exit status unknown".to_string(),
    }
}

/// Paths of one slot's files.
#[derive(Debug, Clone)]
pub(crate) struct SlotFiles {
    pub(crate) record: PathBuf,
    pub(crate) log: PathBuf,
}

impl SlotFiles {
    pub(crate) fn new(state_dir: &Path, slot: Slot) -> Self {
        SlotFiles {
            record: state_dir.join(format!("{slot}.json")),
            log: state_dir.join(format!("{slot}.log")),
        }
    }
}

/// Creates the state directory (mode 0700) if needed.
pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_error("creating state directory", dir, e))
}

/// Reads a pid file; `None` when there is none.
pub(crate) fn read(path: &Path) -> Result<Option<SlotRecord>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("reading pid file", path, e)),
    };
    let corrupt = |reason: String| {
        ProcessError::CorruptPidFile {
            path: path.to_path_buf(),
            reason,
        }
        .into_core("status")
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
    let format = value.get("format").and_then(|f| f.as_u64()).unwrap_or(0);
    if format != u64::from(FORMAT) {
        return Err(corrupt(format!(
            "format {format}, this build reads format {FORMAT}"
        )));
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| corrupt(e.to_string()))
}

/// Writes a pid file atomically (temporary file, fsync, rename), mode 0600.
pub(crate) fn write(path: &Path, record: &SlotRecord) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "json.tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let json = serde_json::to_vec_pretty(record)
        .map_err(|e| Error::backend(crate::NAME, "save pid file", false, e))?;
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_error("writing pid file", path, e)
    })
}

/// Deletes a file; `Ok` if it was not there.
pub(crate) fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("deleting", path, e)),
    }
}

/// The `n`th earlier log of `log` (`<slot>.log.<n>`); `n = 0` is `log` itself.
pub(crate) fn rotated(log: &Path, n: u32) -> PathBuf {
    if n == 0 {
        return log.to_path_buf();
    }
    let mut name = log.as_os_str().to_os_string();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Moves `log` to `<log>.1`, shifting the earlier ones up and dropping what goes past `keep`
/// (with `keep = 0`, deletes it). Where `log` went, if it existed.
pub(crate) fn rotate_log(log: &Path, keep: u32) -> Result<Option<PathBuf>> {
    if fs::symlink_metadata(log).is_err() {
        return Ok(None);
    }
    if keep == 0 {
        remove_file(log)?;
        return Ok(None);
    }
    remove_file(&rotated(log, keep))?;
    for n in (0..keep).rev() {
        let from = rotated(log, n);
        let to = rotated(log, n + 1);
        match fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("rotating log", &from, e)),
        }
    }
    Ok(Some(rotated(log, 1)))
}

// ---------------------------------------------------------------------------------------------
// Liveness

/// State letter and start time from `/proc/<pid>/stat`; `None` if there is no such process.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may itself contain spaces or parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field 22 (starttime) is fields[19].
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

fn have_proc() -> bool {
    Path::new("/proc/self/stat").exists()
}

/// The start time of `pid`, when `/proc` can tell.
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|(_, start)| start)
}

/// Whether `pid` runs and is the process that started at `start` (when known).
pub(crate) fn is_alive(pid: i32, start: Option<u64>) -> bool {
    if pid <= 0 {
        return false;
    }
    if have_proc() {
        match proc_stat(pid) {
            Some((state, now_start)) => {
                // Z: exited, not yet reaped; X: dead.
                !matches!(state, 'Z' | 'X') && start.is_none_or(|s| s == now_start)
            }
            None => false,
        }
    } else {
        Pid::from_raw(pid).is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
    }
}

/// Waits (polling, bounded by `bound`) until the process is gone; true if it is.
pub(crate) async fn wait_gone(pid: i32, start: Option<u64>, bound: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if !is_alive(pid, start) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Processes other than this one whose standard output is the file `log` (by device and inode):
/// the slot's programs, including one started by a run killed after the spawn and before its pid
/// file was written, which no pid file names. Empty without `/proc` or without the log.
pub(crate) fn writers_of(log: &Path) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let (Ok(meta), true) = (fs::metadata(log), have_proc()) else {
        return Vec::new();
    };
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/fd/1"))
                .is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Time and log markers

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2026-01-31T12:34:56.789Z`.
pub(crate) fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

const MARKER: &str = "--- bluegreen ts=";

/// Appends a marker line (`--- bluegreen ts=<ms> <rfc3339> <slot>: <what>`) to the slot's log.
/// Markers are what [`lines_since`] uses to filter by time. Best effort: a log that cannot be
/// written must not fail a stop.
pub(crate) fn mark(log: &Path, slot: Slot, what: &str) {
    let ms = unix_ms(SystemTime::now());
    let line = format!("{MARKER}{ms} {} {slot}: {what}\n", rfc3339(ms));
    let res = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = res {
        tracing::warn!(log = %log.display(), error = %e, "cannot write to the slot's log");
    }
}

fn marker_ms(line: &str) -> Option<u64> {
    let rest = line.strip_prefix(MARKER)?;
    rest.split(' ').next()?.parse().ok()
}

/// A marker's stamp is taken just before it is written, so a program line written after the stamp
/// may come before the marker in the file; starting from a marker stamped this much earlier than
/// `since` keeps such lines.
const MARKER_SLACK_MS: u64 = 1_000;

/// The part of `text` that may hold lines written at or after `since_ms`: from the last marker
/// stamped at least [`MARKER_SLACK_MS`] before `since_ms` (everything if there is none).
pub(crate) fn lines_since(text: &str, since_ms: u64) -> &str {
    let bound = since_ms.saturating_sub(MARKER_SLACK_MS);
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if marker_ms(line).is_some_and(|ms| ms <= bound) {
            start = offset;
        }
        offset += line.len();
    }
    &text[start..]
}

/// The last `n` lines of the log, indented for an error message (empty if there are none).
pub(crate) fn log_tail(log: &Path, n: usize) -> String {
    let Ok(bytes) = fs::read(log) else {
        return String::new();
    };
    let from = bytes.len().saturating_sub(64 * 1024);
    let text = String::from_utf8_lossy(&bytes[from..]);
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(n)..];
    if tail.is_empty() {
        return String::new();
    }
    let mut out = format!("; last lines of {}:", log.display());
    for l in tail {
        out.push_str("\n    ");
        out.push_str(l);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_767_225_599_999), "2025-12-31T23:59:59.999Z");
    }

    #[test]
    fn since_starts_at_the_last_marker_a_second_before_it() {
        let deploy = "--- bluegreen ts=1000 x blue: deploy\nold\n";
        let stop = "--- bluegreen ts=5000 x blue: stop\nnew\n";
        let text = format!("{deploy}{stop}");
        assert_eq!(lines_since(&text, 500), text);
        assert_eq!(lines_since(&text, 1500), text, "within the slack");
        assert_eq!(lines_since(&text, 5500), text, "within the slack");
        assert_eq!(lines_since(&text, 6000), stop);
    }

    #[test]
    fn our_own_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id() as i32;
        let start = start_time(me);
        assert!(start.is_some(), "this test needs /proc");
        assert!(is_alive(me, start));
        assert!(is_alive(me, None));
        assert!(
            !is_alive(me, start.map(|s| s + 1)),
            "pid reuse not detected"
        );
        assert!(!is_alive(0, None));
    }

    #[test]
    fn pid_files_round_trip_and_refuse_other_formats() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blue.json");
        assert_eq!(read(&path).unwrap(), None);
        let rec = SlotRecord {
            format: FORMAT,
            pid: 42,
            proc_start: Some(7),
            host: "127.0.0.1".into(),
            port: 8080,
            version: Version::new("v1").unwrap(),
            program: "app".into(),
            args: vec!["--x".into()],
            env: BTreeMap::new(),
            secret_keys: vec!["PGPASSWORD".into()],
            started_at_ms: 1,
            stop_requested: false,
            exit_code: None,
            exit_signal: None,
            exited_at_ms: None,
        };
        write(&path, &rec).unwrap();
        assert_eq!(read(&path).unwrap(), Some(rec.clone()));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let mut newer = serde_json::to_value(&rec).unwrap();
        newer["format"] = 2.into();
        fs::write(&path, newer.to_string()).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(
            err.contains("format 2") && err.contains("blue.json"),
            "{err}"
        );
        fs::write(&path, "{not json").unwrap();
        assert!(read(&path).is_err());
    }
}
