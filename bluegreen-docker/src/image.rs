//! [`ScratchImage`]: builds a minimal image from host executables, with no registry and no base
//! image, through the Engine's build API.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use bluegreen_core::{Error, Result};
use bollard::query_parameters::BuildImageOptionsBuilder;
use bollard::Docker;
use futures_util::StreamExt;

use crate::config::Healthcheck;
use crate::error::DockerError;

/// A minimal image (`FROM scratch` by default) made of host files: each executable added with
/// [`with_executable`](Self::with_executable) comes with the shared libraries `ldd` lists for it,
/// copied to the same paths, so a dynamically linked program runs without any base image.
///
/// The build context (a `Dockerfile` and a `rootfs/` tree) is written in memory and sent to the
/// engine's build API: nothing is pulled, no registry is needed. File times are fixed, so
/// rebuilding the same files gives the same layer.
///
/// ```no_run
/// # async fn run() -> bluegreen_core::Result<()> {
/// use bluegreen_docker::ScratchImage;
///
/// let docker = bollard::Docker::connect_with_local_defaults().unwrap();
/// let id = ScratchImage::new("myapp:1.0")?
///     .with_executable("target/release/myapp", "/myapp")
///     .with_env("HOST", "0.0.0.0")
///     .with_expose(8080)
///     .with_entrypoint(["/myapp"])
///     .build(&docker)
///     .await?;
/// println!("built {id}");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScratchImage {
    tag: String,
    base: String,
    executables: Vec<(PathBuf, String)>,
    files: Vec<(PathBuf, String)>,
    env: Vec<(String, String)>,
    labels: Vec<(String, String)>,
    expose: Vec<u16>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    healthcheck: Option<Healthcheck>,
}

fn checked_tag(tag: &str) -> Result<()> {
    let ok = !tag.is_empty()
        && tag.len() <= 255
        && tag.as_bytes()[0].is_ascii_alphanumeric()
        && tag.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/' | ':')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "image tag",
            tag,
            "use lower-case letters, digits, `.`, `_`, `-`, `/` and `:` (e.g. `myapp:1.0`)",
        ))
    }
}

/// A value for a `Dockerfile` double-quoted string: `"`, `\` and `$` escaped; control
/// characters refused (they would end the instruction).
fn dockerfile_quote(what: &'static str, s: &str) -> Result<String> {
    if s.chars().any(char::is_control) {
        return Err(Error::invalid(
            what,
            s,
            "control characters (newlines) cannot go into a Dockerfile",
        ));
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if matches!(c, '"' | '\\' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Ok(out)
}

/// A JSON array of strings, for the exec form of `ENTRYPOINT`, `CMD` and `HEALTHCHECK`.
fn json_array(what: &'static str, items: &[String]) -> Result<String> {
    let mut out = String::from("[");
    for (i, s) in items.iter().enumerate() {
        if s.chars().any(char::is_control) {
            return Err(Error::invalid(
                what,
                s.as_str(),
                "control characters (newlines) cannot go into a Dockerfile",
            ));
        }
        if i > 0 {
            out.push_str(", ");
        }
        out.push('"');
        for c in s.chars() {
            if matches!(c, '"' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push(']');
    Ok(out)
}

fn check_dest(dest: &str) -> Result<()> {
    let p = Path::new(dest);
    let bad = !p.is_absolute()
        || p.components().any(|c| {
            matches!(
                c,
                std::path::Component::ParentDir | std::path::Component::CurDir
            )
        })
        || dest.chars().any(char::is_control)
        || dest.ends_with('/');
    if bad {
        return Err(Error::invalid(
            "image file path",
            dest,
            "expected an absolute file path without `.` or `..`",
        ));
    }
    Ok(())
}

/// The absolute library paths `ldd` lists for `exe` (empty for a static executable).
pub fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(exe).output().map_err(|source| {
        DockerError::Context {
            what: format!(
                "running `ldd {}` (install libc-bin, or add libraries yourself with with_file)",
                exe.display()
            ),
            source,
        }
        .into_core("build image")
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        return Err(DockerError::Context {
            what: format!("`ldd {}` failed: {}", exe.display(), stderr.trim()),
            source: std::io::Error::other("ldd failed"),
        }
        .into_core("build image"));
    }
    let mut libs = Vec::new();
    for line in stdout.lines() {
        let line = line.trim();
        if line.contains("statically linked") {
            continue;
        }
        if line.contains("=> not found") {
            return Err(DockerError::Context {
                what: format!("`ldd {}`: {line}", exe.display()),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            }
            .into_core("build image"));
        }
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

impl ScratchImage {
    /// An empty image to be tagged `tag` (`name[:tag]`, lower case).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an invalid tag.
    pub fn new(tag: impl Into<String>) -> Result<Self> {
        let tag = tag.into();
        checked_tag(&tag)?;
        Ok(ScratchImage {
            tag,
            base: "scratch".into(),
            executables: Vec::new(),
            files: Vec::new(),
            env: Vec::new(),
            labels: Vec::new(),
            expose: Vec::new(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            healthcheck: None,
        })
    }

    /// The image for the `bluegreen-demo` web app at `binary` (e.g.
    /// `bluegreen_demo::binary_path()`): the binary at `/bluegreen-demo` with its libraries,
    /// `HOST=0.0.0.0`, `PORT=8080`, port 8080 exposed.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an invalid tag.
    pub fn demo(tag: impl Into<String>, binary: impl Into<PathBuf>) -> Result<Self> {
        Ok(ScratchImage::new(tag)?
            .with_executable(binary, "/bluegreen-demo")
            .with_env("HOST", "0.0.0.0")
            .with_env("PORT", "8080")
            .with_expose(8080)
            .with_entrypoint(["/bluegreen-demo"]))
    }

    /// The tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Builds on `base` (an image already on the engine) instead of `scratch`.
    pub fn with_base(mut self, base: impl Into<String>) -> Self {
        self.base = base.into();
        self
    }

    /// Adds the host executable `src` at `dest`, with the shared libraries it needs.
    pub fn with_executable(mut self, src: impl Into<PathBuf>, dest: impl Into<String>) -> Self {
        self.executables.push((src.into(), dest.into()));
        self
    }

    /// Adds the host file `src` at `dest` (its mode is kept).
    pub fn with_file(mut self, src: impl Into<PathBuf>, dest: impl Into<String>) -> Self {
        self.files.push((src.into(), dest.into()));
        self
    }

    /// Sets an environment variable in the image.
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets a label on the image.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    /// Declares an exposed TCP port.
    pub fn with_expose(mut self, port: u16) -> Self {
        self.expose.push(port);
        self
    }

    /// Sets the entrypoint (exec form).
    pub fn with_entrypoint<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.entrypoint = argv.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the default command (arguments after the entrypoint).
    pub fn with_cmd<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cmd = argv.into_iter().map(Into::into).collect();
        self
    }

    /// Bakes a `HEALTHCHECK` into the image.
    pub fn with_healthcheck(mut self, check: Healthcheck) -> Self {
        self.healthcheck = Some(check);
        self
    }

    /// The `Dockerfile` of the build context.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for values that cannot be written into a Dockerfile.
    pub fn dockerfile(&self) -> Result<String> {
        let base = &self.base;
        if base.is_empty() || base.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::invalid(
                "base image",
                base.as_str(),
                "expected an image reference",
            ));
        }
        let mut d = format!("FROM {base}\nCOPY rootfs/ /\n");
        for (k, v) in &self.env {
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(Error::invalid(
                    "image environment variable",
                    k.as_str(),
                    "use letters, digits and `_`",
                ));
            }
            d.push_str(&format!(
                "ENV {k}={}\n",
                dockerfile_quote("image env value", v)?
            ));
        }
        for (k, v) in &self.labels {
            d.push_str(&format!(
                "LABEL {}={}\n",
                dockerfile_quote("image label", k)?,
                dockerfile_quote("image label", v)?
            ));
        }
        for p in &self.expose {
            d.push_str(&format!("EXPOSE {p}/tcp\n"));
        }
        if let Some(h) = &self.healthcheck {
            if h.argv.is_empty() {
                return Err(Error::invalid("healthcheck", "[]", "needs a command"));
            }
            // The engine refuses a zero start period: leave it out then.
            let start = if h.start_period.is_zero() {
                String::new()
            } else {
                format!(" --start-period={}ms", h.start_period.as_millis())
            };
            d.push_str(&format!(
                "HEALTHCHECK --interval={}ms --timeout={}ms{start} --retries={} CMD {}\n",
                h.interval.as_millis().max(1),
                h.timeout.as_millis().max(1),
                h.retries.max(1),
                json_array("healthcheck", &h.argv)?
            ));
        }
        if !self.entrypoint.is_empty() {
            d.push_str(&format!(
                "ENTRYPOINT {}\n",
                json_array("entrypoint", &self.entrypoint)?
            ));
        }
        if !self.cmd.is_empty() {
            d.push_str(&format!("CMD {}\n", json_array("cmd", &self.cmd)?));
        }
        Ok(d)
    }

    /// The build context: a tar archive with the `Dockerfile` and `rootfs/`. Reads the files and
    /// runs `ldd` (blocking).
    ///
    /// # Errors
    /// A file that cannot be read, `ldd` failing, or invalid values.
    pub fn context(&self) -> Result<Vec<u8>> {
        let dockerfile = self.dockerfile()?;
        let mut entries: Vec<(PathBuf, String)> = Vec::new();
        for (src, dest) in &self.executables {
            check_dest(dest)?;
            entries.push((src.clone(), dest.clone()));
            for lib in shared_libraries(src)? {
                let dest = lib.to_string_lossy().into_owned();
                entries.push((lib, dest));
            }
        }
        for (src, dest) in &self.files {
            check_dest(dest)?;
            entries.push((src.clone(), dest.clone()));
        }
        let ctx_err = |what: String, source: std::io::Error| {
            DockerError::Context { what, source }.into_core("build image")
        };

        let mut tar = tar::Builder::new(Vec::new());
        let mut dirs: BTreeSet<String> = BTreeSet::from(["rootfs".to_string()]);
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut files: Vec<(String, Vec<u8>, u32)> = Vec::new();
        for (src, dest) in entries {
            if !seen.insert(dest.clone()) {
                continue;
            }
            let data = std::fs::read(&src)
                .map_err(|e| ctx_err(format!("reading {}", src.display()), e))?;
            let mode = std::fs::metadata(&src)
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
                .map_err(|e| ctx_err(format!("reading {}", src.display()), e))?;
            let path = format!("rootfs{dest}");
            let mut parent = Path::new(&path).parent();
            while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
                dirs.insert(p.to_string_lossy().into_owned());
                parent = p.parent();
            }
            files.push((path, data, mode));
        }
        let append = |tar: &mut tar::Builder<Vec<u8>>,
                      path: &str,
                      kind: tar::EntryType,
                      mode: u32,
                      data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_mtime(1);
            h.set_uid(0);
            h.set_gid(0);
            h.set_cksum();
            tar.append_data(&mut h, path, data)
                .map_err(|e| ctx_err(format!("writing {path} into the build context"), e))
        };
        append(
            &mut tar,
            "Dockerfile",
            tar::EntryType::Regular,
            0o644,
            dockerfile.as_bytes(),
        )?;
        for d in &dirs {
            append(
                &mut tar,
                &format!("{d}/"),
                tar::EntryType::Directory,
                0o755,
                &[],
            )?;
        }
        for (path, data, mode) in &files {
            append(&mut tar, path, tar::EntryType::Regular, *mode, data)?;
        }
        tar.into_inner()
            .map_err(|e| ctx_err("finishing the build context".into(), e))
    }

    /// Builds the image on the engine of `docker` and tags it; returns the image id.
    ///
    /// # Errors
    /// The context cannot be made, the engine is unreachable, or the build fails (the error
    /// carries the builder's message).
    pub async fn build(&self, docker: &Docker) -> Result<String> {
        let me = self.clone();
        let context = tokio::task::spawn_blocking(move || me.context())
            .await
            .map_err(|e| {
                DockerError::Context {
                    what: "preparing the build context".into(),
                    source: std::io::Error::other(e.to_string()),
                }
                .into_core("build image")
            })??;
        let opts = BuildImageOptionsBuilder::default()
            .t(&self.tag)
            .rm(true)
            .forcerm(true)
            .build();
        let mut stream = docker.build_image(
            opts,
            None,
            Some(bollard::body_full(bytes::Bytes::from(context))),
        );
        let mut output = String::new();
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| {
                DockerError::engine(format!("build image {}", self.tag), e).into_core("build image")
            })?;
            if let Some(s) = info.stream {
                output.push_str(&s);
            }
            if let Some(msg) = info.error_detail.and_then(|d| d.message) {
                let tail: Vec<&str> = output.lines().rev().take(10).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(DockerError::Build {
                    tag: self.tag.clone(),
                    message: format!("{msg}\n{}", tail.join("\n")),
                }
                .into_core("build image"));
            }
        }
        let img = docker.inspect_image(&self.tag).await.map_err(|e| {
            DockerError::engine(format!("inspect image {}", self.tag), e).into_core("build image")
        })?;
        Ok(img.id.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerfile_quotes_values_and_refuses_newlines() {
        let img = ScratchImage::new("demo:1")
            .unwrap()
            .with_env("A", "x\"$y\\")
            .with_entrypoint(["/app", "--name=\"q\""]);
        let d = img.dockerfile().unwrap();
        assert!(d.contains("ENV A=\"x\\\"\\$y\\\\\"\n"), "{d}");
        assert!(
            d.contains("ENTRYPOINT [\"/app\", \"--name=\\\"q\\\"\"]"),
            "{d}"
        );
        let bad = ScratchImage::new("demo:1")
            .unwrap()
            .with_env("A", "x\nRUN evil");
        assert!(bad.dockerfile().is_err());
        assert!(ScratchImage::new("Bad Tag").is_err());
        assert!(ScratchImage::new("demo:1")
            .unwrap()
            .with_file("/etc/hostname", "../x")
            .context()
            .is_err());
    }

    #[test]
    fn ldd_lists_libc_for_a_dynamic_executable() {
        let libs = shared_libraries(Path::new("/usr/bin/env")).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
    }

    #[test]
    fn the_context_holds_the_dockerfile_the_program_and_its_libraries() {
        let ctx = ScratchImage::new("demo:1")
            .unwrap()
            .with_executable("/usr/bin/env", "/bin/env")
            .with_entrypoint(["/bin/env"])
            .context()
            .unwrap();
        let mut ar = tar::Archive::new(ctx.as_slice());
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"Dockerfile".to_string()), "{names:?}");
        assert!(names.contains(&"rootfs/bin/env".to_string()), "{names:?}");
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("rootfs/") && n.contains("libc.so")),
            "{names:?}"
        );
    }
}
