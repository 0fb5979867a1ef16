//! The nginx master process: its pid file, its workers, SIGHUP, and `nginx -t`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::process::{Pid, Signal};

use crate::error::NginxError;

/// How to run the `nginx` binary against a configuration. In files: `main_config`, and
/// optionally `binary` and `prefix`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NginxCommand {
    /// The binary (`nginx`, found on `PATH`, by default).
    #[serde(default = "default_binary")]
    pub binary: PathBuf,
    /// The main configuration file (`-c`).
    pub main_config: PathBuf,
    /// The prefix (`-p`), when not the compiled-in one.
    #[serde(default)]
    pub prefix: Option<PathBuf>,
}

fn default_binary() -> PathBuf {
    PathBuf::from("nginx")
}

impl NginxCommand {
    /// `nginx -c <main_config>`.
    pub fn new(main_config: impl Into<PathBuf>) -> Self {
        NginxCommand {
            binary: PathBuf::from("nginx"),
            main_config: main_config.into(),
            prefix: None,
        }
    }

    /// With `-p <prefix>`.
    pub fn with_prefix(mut self, prefix: impl Into<PathBuf>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// With another binary.
    pub fn with_binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = binary.into();
        self
    }

    /// The common argv after the binary: `[-p prefix] -c config`.
    pub fn base_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        if let Some(p) = &self.prefix {
            args.push("-p".into());
            args.push(p.clone().into_os_string());
        }
        args.push("-c".into());
        args.push(self.main_config.clone().into_os_string());
        args
    }

    /// Runs `nginx -t -q` (argv only, no shell), bounded by `timeout`.
    ///
    /// # Errors
    /// [`NginxError::ConfigTest`] with nginx's output when the test fails; I/O errors when the binary
    /// cannot be run.
    pub async fn test_config(&self, include: &Path, timeout: Duration) -> Result<(), NginxError> {
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(self.base_args())
            .arg("-t")
            .arg("-q")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(timeout, cmd.output())
            .await
            .map_err(|_| {
                NginxError::io(
                    "nginx -t",
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("took longer than {timeout:?}"),
                    ),
                )
            })?
            .map_err(|e| NginxError::io(format!("running {}", self.binary.display()), e))?;
        if out.status.success() {
            return Ok(());
        }
        let mut output = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if output.is_empty() {
            output = format!("exit status {}", out.status);
        }
        Err(NginxError::ConfigTest {
            include: include.to_path_buf(),
            output,
        })
    }
}

impl NginxCommand {
    /// The master's pid file as the configuration names it: the main context's `pid` directive
    /// (read from `nginx -T`, the configuration as nginx parses it, includes resolved), else the
    /// binary's compiled-in `--pid-path` (`nginx -V`), else nginx's own default `logs/nginx.pid`;
    /// a relative path is taken from the prefix (`-p`, else the compiled-in `--prefix`).
    ///
    /// # Errors
    /// [`NginxError::ConfigTest`] when nginx refuses the configuration, I/O errors when the binary
    /// cannot be run or does not answer within `timeout`.
    pub async fn pid_file(&self, timeout: Duration) -> Result<PathBuf, NginxError> {
        let dump = self.run(&["-T", "-q"], timeout).await?;
        if !dump.status.success() {
            return Err(NginxError::ConfigTest {
                include: self.main_config.clone(),
                output: String::from_utf8_lossy(&dump.stderr).trim().to_string(),
            });
        }
        let configured = pid_directive(&String::from_utf8_lossy(&dump.stdout));
        let version = self.run(&["-V"], timeout).await?;
        // `nginx -V` prints the build's configure arguments on stderr.
        let built = String::from_utf8_lossy(&version.stderr).into_owned();
        let build_arg = |name: &str| {
            built
                .split_whitespace()
                .find_map(|a| a.strip_prefix(name))
                .map(PathBuf::from)
        };
        let path = configured
            .map(PathBuf::from)
            .or_else(|| build_arg("--pid-path="))
            .unwrap_or_else(|| PathBuf::from("logs/nginx.pid"));
        if path.is_absolute() {
            return Ok(path);
        }
        let prefix = self
            .prefix
            .clone()
            .or_else(|| build_arg("--prefix="))
            .unwrap_or_else(|| PathBuf::from("/usr/local/nginx"));
        Ok(prefix.join(path))
    }

    /// Runs the binary with the common arguments and `extra` (argv only), bounded by `timeout`.
    async fn run(
        &self,
        extra: &[&str],
        timeout: Duration,
    ) -> Result<std::process::Output, NginxError> {
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(self.base_args())
            .args(extra)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let what = format!("{} {}", self.binary.display(), extra.join(" "));
        tokio::time::timeout(timeout, cmd.output())
            .await
            .map_err(|_| {
                NginxError::io(
                    what.clone(),
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("took longer than {timeout:?}"),
                    ),
                )
            })?
            .map_err(|e| NginxError::io(format!("running {what}"), e))
    }
}

/// The value of the first `pid` statement outside any block in an `nginx -T` dump. `pid` is
/// allowed in the main context only, and nginx accepted this configuration, so a top-level `pid`
/// of any file in the dump is the main context's. Comments and quotes are honoured.
fn pid_directive(dump: &str) -> Option<String> {
    let mut depth = 0usize;
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut chars = dump.chars().peekable();
    // Each file of the dump starts at depth 0 after its `# configuration file …:` line.
    let mut at_line_start = true;
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            if c == '\\' {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            } else if c == q {
                quote = None;
            } else {
                word.push(c);
            }
            continue;
        }
        if at_line_start && c == '#' {
            let line: String = std::iter::once(c)
                .chain(chars.by_ref().take_while(|&n| n != '\n'))
                .collect();
            if line.starts_with("# configuration file ") && line.ends_with(':') {
                depth = 0;
                words.clear();
                word.clear();
            }
            continue;
        }
        at_line_start = c == '\n';
        match c {
            '#' => {
                for n in chars.by_ref() {
                    if n == '\n' {
                        at_line_start = true;
                        break;
                    }
                }
            }
            '"' | '\'' => quote = Some(c),
            '{' => {
                depth += 1;
                words.clear();
                word.clear();
            }
            '}' => {
                depth = depth.saturating_sub(1);
                words.clear();
                word.clear();
            }
            ';' => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                if depth == 0 && words.len() == 2 && words[0] == "pid" {
                    return Some(words.pop().unwrap_or_default());
                }
                words.clear();
            }
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    None
}

/// Reads the master's pid from `pid_file` and checks that the process exists.
///
/// # Errors
/// [`NginxError::NotRunning`] (no pid file), [`NginxError::StalePidFile`] (no such process),
/// [`NginxError::PermissionDenied`] (file unreadable), [`NginxError::Unparseable`] (garbage).
pub(crate) fn master_pid(pid_file: &Path) -> Result<Pid, NginxError> {
    let text = match std::fs::read_to_string(pid_file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(NginxError::NotRunning {
                pid_file: pid_file.to_path_buf(),
                detail: "does not exist".into(),
            })
        }
        Err(e) => return Err(NginxError::fs("reading pid file", pid_file, e)),
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(NginxError::NotRunning {
            pid_file: pid_file.to_path_buf(),
            detail: "is empty".into(),
        });
    }
    let pid = trimmed
        .parse::<i32>()
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| NginxError::Unparseable {
            source_desc: format!("pid file {}", pid_file.display()),
            reason: format!("{trimmed:?} is not a process id"),
        })?;
    match rustix::process::test_kill_process(pid) {
        Ok(()) => Ok(pid),
        Err(e) if e == rustix::io::Errno::SRCH => Err(NginxError::StalePidFile {
            pid_file: pid_file.to_path_buf(),
            pid: pid.as_raw_nonzero().get(),
        }),
        Err(e) if e == rustix::io::Errno::PERM => Err(NginxError::PermissionDenied {
            what: "signalling nginx master".into(),
            path: PathBuf::from(format!("pid {}", pid.as_raw_nonzero())),
        }),
        Err(e) => Err(NginxError::io(
            format!("checking nginx master pid {}", pid.as_raw_nonzero()),
            e.into(),
        )),
    }
}

/// Sends SIGHUP (reload) to the master.
///
/// # Errors
/// [`NginxError::PermissionDenied`] or the OS error.
pub(crate) fn send_reload(pid: Pid) -> Result<(), NginxError> {
    rustix::process::kill_process(pid, Signal::HUP).map_err(|e| {
        if e == rustix::io::Errno::PERM {
            NginxError::PermissionDenied {
                what: "sending SIGHUP to nginx master".into(),
                path: PathBuf::from(format!("pid {}", pid.as_raw_nonzero())),
            }
        } else {
            NginxError::io(
                format!("sending SIGHUP to nginx master {}", pid.as_raw_nonzero()),
                e.into(),
            )
        }
    })
}

/// A worker of the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Worker {
    /// Its pid.
    pub(crate) pid: i32,
    /// True for an old worker finishing its connections after a reload.
    pub(crate) shutting_down: bool,
}

/// The master's worker processes, read from `/proc` (Linux).
pub(crate) fn workers(master: Pid) -> Vec<Worker> {
    let master = master.as_raw_nonzero().get();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`: comm may hold spaces, so read after the last `)`.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid != Some(master) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.starts_with("nginx: worker process") {
            out.push(Worker {
                pid,
                shutting_down: cmdline.contains("is shutting down"),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_directive_is_read_from_the_main_context_only() {
        let dump = "# configuration file /etc/nginx/nginx.conf:\n\
            user www-data; # pid /wrong/comment.pid;\n\
            events { }\n\
            http { include /etc/nginx/conf.d/*.conf; }\n\
            pid \"/run/my nginx.pid\";\n\
            \n\
            # configuration file /etc/nginx/conf.d/a.conf:\n\
            server { listen 80; location / { return 200 'pid /x;'; } }\n";
        assert_eq!(pid_directive(dump).as_deref(), Some("/run/my nginx.pid"));
        let dump = "# configuration file /n.conf:\nevents {}\nhttp { server { } }\n";
        assert_eq!(pid_directive(dump), None);
        let dump = "# configuration file /n.conf:\npid logs/n.pid;\nevents {}\n";
        assert_eq!(pid_directive(dump).as_deref(), Some("logs/n.pid"));
    }

    #[test]
    fn pid_file_states_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nginx.pid");
        assert!(matches!(master_pid(&p), Err(NginxError::NotRunning { .. })));
        std::fs::write(&p, "\n").unwrap();
        assert!(matches!(master_pid(&p), Err(NginxError::NotRunning { .. })));
        std::fs::write(&p, "abc\n").unwrap();
        assert!(matches!(
            master_pid(&p),
            Err(NginxError::Unparseable { .. })
        ));
        // A process that has exited: its pid is free (pid reuse within this test is unlikely).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        std::fs::write(&p, format!("{pid}\n")).unwrap();
        let err = master_pid(&p).unwrap_err();
        assert!(matches!(err, NginxError::StalePidFile { .. }), "{err:?}");
        assert!(err.to_string().contains("stale pid file"), "{err}");
        std::fs::write(&p, format!("{}\n", std::process::id())).unwrap();
        assert!(master_pid(&p).is_ok());
    }
}
