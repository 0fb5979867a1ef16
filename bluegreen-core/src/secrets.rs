//! [`SecretSource`]s: a release's secret environment, resolved again at every (re)deploy.
//!
//! - [`EnvSecrets`]: named variables of the calling process's environment;
//! - [`FileSecrets`]: one file per variable, refused when readable by group or others;
//! - [`CommandSecrets`]: a command run as an argv (no shell) that prints `KEY=VALUE` lines;
//! - [`StaticSecrets`]: values held in memory (from your own vault client, or tests).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use bluegreen_core::secrets::StaticSecrets;
//! use bluegreen_core::{Release, SecretSource};
//! let source = StaticSecrets::new().with("API_KEY", "k-123");
//! let env = source.resolve(&Release::new("v1", "app").unwrap()).await.unwrap();
//! assert_eq!(env["API_KEY"].expose(), "k-123");
//! # });
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;

use crate::error::{Error, Result};
use crate::traits::SecretSource;
use crate::types::{Release, Secret};

/// At most this much output is read from a secrets command.
const MAX_COMMAND_OUTPUT: u64 = 1 << 20;

fn unavailable(release: &Release, reason: impl Into<String>) -> Error {
    Error::SecretsUnavailable {
        version: release.version.to_string(),
        reason: reason.into(),
    }
}

/// Checks a variable name: letters, digits and `_`, not starting with a digit.
pub fn validate_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "secret name",
            key,
            "use letters, digits and _ (not starting with a digit)",
        ))
    }
}

/// Named variables of this process's environment, read at each resolve: `API_KEY` from
/// `$API_KEY`, or from another variable with [`with_var`](Self::with_var).
#[derive(Debug, Clone, Default)]
pub struct EnvSecrets {
    /// Release variable → variable of this process.
    vars: BTreeMap<String, String>,
}

impl EnvSecrets {
    /// Each of `names`, from the variable of the same name.
    pub fn new<I, S>(names: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut s = EnvSecrets::default();
        for n in names {
            let n = n.into();
            s = s.with_var(n.clone(), n)?;
        }
        Ok(s)
    }

    /// `key` for the release, from this process's variable `var`.
    pub fn with_var(mut self, key: impl Into<String>, var: impl Into<String>) -> Result<Self> {
        let (key, var) = (key.into(), var.into());
        validate_key(&key)?;
        validate_key(&var)?;
        self.vars.insert(key, var);
        Ok(self)
    }
}

#[async_trait]
impl SecretSource for EnvSecrets {
    fn name(&self) -> &str {
        "env"
    }

    async fn resolve(&self, release: &Release) -> Result<BTreeMap<String, Secret>> {
        let mut out = BTreeMap::new();
        for (key, var) in &self.vars {
            match std::env::var(var) {
                Ok(v) => {
                    out.insert(key.clone(), Secret::new(v));
                }
                Err(_) => {
                    return Err(unavailable(
                        release,
                        format!("{key}: the variable {var} is not set (or not UTF-8)"),
                    ))
                }
            }
        }
        Ok(out)
    }
}

/// One file per variable, read at each resolve (one trailing newline removed). A file readable
/// by group or others is refused, as ssh refuses such a key.
#[derive(Debug, Clone, Default)]
pub struct FileSecrets {
    files: BTreeMap<String, PathBuf>,
}

impl FileSecrets {
    /// No files yet.
    pub fn new() -> Self {
        FileSecrets::default()
    }

    /// `key` from the file at `path`.
    pub fn with_file(mut self, key: impl Into<String>, path: impl Into<PathBuf>) -> Result<Self> {
        let key = key.into();
        validate_key(&key)?;
        self.files.insert(key, path.into());
        Ok(self)
    }
}

/// Refuses a secret file that group or others may read or write, as ssh refuses such a key.
/// `what` names it in the error (`the admin token file`).
///
/// # Errors
/// [`Error::InvalidInput`] naming the file, its mode and the `chmod` to run; [`Error::Io`] when it
/// cannot be read.
pub fn check_private(path: &std::path::Path, what: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("reading {what} {}", path.display()), e))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(Error::invalid(
            "secret file",
            path.display().to_string(),
            format!(
                "{what} is accessible by group or others (mode {:04o}); run `chmod 600 {}`",
                mode & 0o7777,
                path.display()
            ),
        ));
    }
    Ok(())
}

#[async_trait]
impl SecretSource for FileSecrets {
    fn name(&self) -> &str {
        "files"
    }

    async fn resolve(&self, release: &Release) -> Result<BTreeMap<String, Secret>> {
        let mut out = BTreeMap::new();
        for (key, path) in &self.files {
            let what = format!("the secret file of {key}");
            check_private(path, &what).map_err(|e| unavailable(release, e.to_string()))?;
            let mut text = tokio::fs::read_to_string(path).await.map_err(|e| {
                unavailable(release, format!("{key}: reading {}: {e}", path.display()))
            })?;
            if text.ends_with('\n') {
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
            }
            out.insert(key.clone(), Secret::new(text));
        }
        Ok(out)
    }
}

/// A command run as an argv (never through a shell) that prints `KEY=VALUE` lines on stdout
/// (blank lines and `#` comments ignored). `{version}` in an argument is replaced by the release's
/// version. It must exit 0 within the timeout (default 30 s).
#[derive(Clone)]
pub struct CommandSecrets {
    argv: Vec<String>,
    timeout: Duration,
}

impl fmt::Debug for CommandSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandSecrets")
            .field("program", &self.argv.first())
            .field("args", &self.argv.len().saturating_sub(1))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl CommandSecrets {
    /// Runs `argv` (program first).
    pub fn new<I, S>(argv: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let argv: Vec<String> = argv.into_iter().map(Into::into).collect();
        if argv.first().map(|p| p.is_empty()).unwrap_or(true) {
            return Err(Error::invalid(
                "secrets command",
                "",
                "give the program to run as the first element",
            ));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(Error::invalid(
                "secrets command",
                &argv[0],
                "an argument contains NUL",
            ));
        }
        Ok(CommandSecrets {
            argv,
            timeout: Duration::from_secs(30),
        })
    }

    /// With a timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// Parses `KEY=VALUE` lines; names the line of a malformed one, never its content.
fn parse_lines(release: &Release, program: &str, text: &str) -> Result<BTreeMap<String, Secret>> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(unavailable(
                release,
                format!("{program}: output line {} is not KEY=VALUE", i + 1),
            ));
        };
        let k = k.trim();
        validate_key(k).map_err(|_| {
            unavailable(
                release,
                format!("{program}: output line {} has an invalid name", i + 1),
            )
        })?;
        out.insert(k.to_string(), Secret::new(v));
    }
    Ok(out)
}

#[async_trait]
impl SecretSource for CommandSecrets {
    fn name(&self) -> &str {
        "command"
    }

    async fn resolve(&self, release: &Release) -> Result<BTreeMap<String, Secret>> {
        let program = &self.argv[0];
        let args: Vec<String> = self.argv[1..]
            .iter()
            .map(|a| a.replace("{version}", release.version.as_str()))
            .collect();
        let mut child = tokio::process::Command::new(program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| unavailable(release, format!("starting {program}: {e}")))?;
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let run = async {
            let mut out = Vec::new();
            let mut err = Vec::new();
            let mut out_r = (&mut stdout).take(MAX_COMMAND_OUTPUT);
            let mut err_r = (&mut stderr).take(MAX_COMMAND_OUTPUT);
            let (r1, r2) = tokio::join!(out_r.read_to_end(&mut out), err_r.read_to_end(&mut err));
            r1.and(r2)?;
            let status = child.wait().await?;
            Ok::<_, std::io::Error>((status, out, err))
        };
        let (status, out, err) = tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| {
                unavailable(
                    release,
                    format!("{program} did not finish within {:?}", self.timeout),
                )
            })?
            .map_err(|e| unavailable(release, format!("running {program}: {e}")))?;
        if !status.success() {
            let err = String::from_utf8_lossy(&err);
            let last = err
                .lines()
                .last()
                .unwrap_or("")
                .chars()
                .take(200)
                .collect::<String>();
            return Err(unavailable(
                release,
                format!("{program} exited with {status}: {last}"),
            ));
        }
        let text = String::from_utf8(out)
            .map_err(|_| unavailable(release, format!("{program} printed non-UTF-8 output")))?;
        parse_lines(release, program, &text)
    }
}

/// Values held in memory: for secrets your own code fetched (a vault client), and tests.
#[derive(Clone, Default)]
pub struct StaticSecrets {
    values: BTreeMap<String, Secret>,
}

impl fmt::Debug for StaticSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticSecrets")
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl StaticSecrets {
    /// No values yet.
    pub fn new() -> Self {
        StaticSecrets::default()
    }

    /// Adds `key` = `value`.
    ///
    /// # Panics
    /// If `key` is not a valid variable name (letters, digits, `_`).
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        validate_key(&key).expect("a valid secret name");
        self.values.insert(key, Secret::new(value));
        self
    }
}

#[async_trait]
impl SecretSource for StaticSecrets {
    fn name(&self) -> &str {
        "static"
    }

    async fn resolve(&self, _release: &Release) -> Result<BTreeMap<String, Secret>> {
        Ok(self.values.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn release() -> Release {
        Release::new("v7", "app").unwrap()
    }

    #[tokio::test]
    async fn env_secrets_read_the_named_variables_and_name_a_missing_one() {
        std::env::set_var("BG_TEST_SECRET_A", "alpha");
        let s = EnvSecrets::new(["BG_TEST_SECRET_A"])
            .unwrap()
            .with_var("RENAMED", "BG_TEST_SECRET_A")
            .unwrap();
        let env = s.resolve(&release()).await.unwrap();
        assert_eq!(env["BG_TEST_SECRET_A"].expose(), "alpha");
        assert_eq!(env["RENAMED"].expose(), "alpha");
        let missing = EnvSecrets::new(["BG_TEST_SECRET_NEVER_SET"]).unwrap();
        let err = missing.resolve(&release()).await.unwrap_err();
        assert!(matches!(err, Error::SecretsUnavailable { .. }), "{err}");
        assert!(
            err.to_string().contains("BG_TEST_SECRET_NEVER_SET"),
            "{err}"
        );
        assert!(EnvSecrets::new(["BAD=NAME"]).is_err());
    }

    #[tokio::test]
    async fn file_secrets_refuse_a_file_others_can_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db_password");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let s = FileSecrets::new().with_file("DB_PASSWORD", &path).unwrap();
        let err = s.resolve(&release()).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("0644") && msg.contains("chmod 600"), "{msg}");
        assert!(!msg.contains("s3cret"), "{msg}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let env = s.resolve(&release()).await.unwrap();
        assert_eq!(env["DB_PASSWORD"].expose(), "s3cret");
    }

    #[tokio::test]
    async fn command_secrets_parse_key_value_lines_without_a_shell() {
        let s = CommandSecrets::new([
            "/bin/echo",
            "-e",
            "# for {version}\\nAPI_KEY=k-{version}\\n\\nTOKEN=a=b",
        ])
        .unwrap();
        let env = s.resolve(&release()).await.unwrap();
        assert_eq!(env["API_KEY"].expose(), "k-v7");
        assert_eq!(env["TOKEN"].expose(), "a=b");
        // No shell: a `;` is just an argument.
        let s = CommandSecrets::new(["/bin/echo", "A=1; touch /tmp/bg-pwned"]).unwrap();
        let env = s.resolve(&release()).await.unwrap();
        assert_eq!(env["A"].expose(), "1; touch /tmp/bg-pwned");
    }

    #[tokio::test]
    async fn command_secrets_fail_clearly_without_echoing_the_output() {
        let bad = CommandSecrets::new(["/bin/echo", "not a pair hunter2"]).unwrap();
        let err = bad.resolve(&release()).await.unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let failing = CommandSecrets::new(["/bin/false"]).unwrap();
        let err = failing.resolve(&release()).await.unwrap_err();
        assert!(err.to_string().contains("exited"), "{err}");
        let slow = CommandSecrets::new(["/bin/sleep", "5"])
            .unwrap()
            .with_timeout(Duration::from_millis(100));
        let err = slow.resolve(&release()).await.unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert!(CommandSecrets::new(Vec::<String>::new()).is_err());
    }

    #[test]
    fn static_secrets_never_show_values_in_debug() {
        let s = StaticSecrets::new().with("API_KEY", "k-123");
        assert!(!format!("{s:?}").contains("k-123"));
    }
}
