//! [`TraefikSwitch`]: the [`TrafficSwitch`] over Traefik's file provider.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bluegreen_core::{
    Capabilities, Endpoints, Error, Result, Slot, TrafficSplit, TrafficSwitch, TrafficSwitchExt,
};

use crate::api::{Api, Expected};
use crate::config::TraefikConfig;
use crate::error::TraefikError;
use crate::render::{parse, render, routing_from_file, server_url, Routing};

/// A [`TrafficSwitch`] that writes Traefik's dynamic configuration into the file provider's
/// watched directory and verifies through Traefik's API that it was loaded.
///
/// Cheap to clone (shared state); changes through one handle are serialized.
#[derive(Debug, Clone)]
pub struct TraefikSwitch {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: TraefikConfig,
    api: Option<Api>,
    // Serializes read-modify-write of the file (apply keeps the preview, preview keeps the split).
    lock: tokio::sync::Mutex<()>,
}

impl TraefikSwitch {
    /// A switch with `config` (validated here).
    pub fn new(config: TraefikConfig) -> Result<Self> {
        config.validate()?;
        let api = match &config.api {
            Some(url) => Some(
                Api::new(url, config.request_timeout, config.api_basic_auth.clone())
                    .map_err(|e| Error::backend(crate::NAME, "build the API client", false, e))?,
            ),
            None => None,
        };
        Ok(TraefikSwitch {
            inner: Arc::new(Inner {
                config,
                api,
                lock: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TraefikConfig {
        &self.inner.config
    }

    /// The routing in the file this switch writes (`None`: no file yet).
    pub async fn file_routing(&self) -> Result<Option<Routing>> {
        let config = &self.inner.config;
        let path = config.file_path();
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(TraefikError::Read { path, source }.into_core("read")),
        };
        let value = parse(config.format, &text).map_err(|reason| {
            TraefikError::Parse {
                path: path.clone(),
                reason,
            }
            .into_core("read")
        })?;
        match routing_from_file(&config.name, &value) {
            Some(r) => Ok(Some(r)),
            None => Err(TraefikError::Parse {
                path,
                reason: format!(
                    "no weighted service `{}` over `{}` and `{}`",
                    config.name,
                    config.name.slot_service(Slot::Blue),
                    config.name.slot_service(Slot::Green)
                ),
            }
            .into_core("read")),
        }
    }

    /// The routing Traefik reports through its API (`None`: Traefik has no service
    /// `<name>@file`). [`Error::Unsupported`] when no API is configured.
    pub async fn api_routing(&self) -> Result<Option<Routing>> {
        let Some(api) = &self.inner.api else {
            return Err(Error::unsupported(
                "reading Traefik's API (no API URL configured)",
                crate::NAME,
            ));
        };
        api.routing(&self.inner.config.name)
            .await
            .map_err(|e| e.into_core("read the API"))
    }

    /// The routing in force: from the API when configured, else from the file.
    pub async fn routing(&self) -> Result<Option<Routing>> {
        if self.inner.api.is_some() {
            self.api_routing().await
        } else {
            self.file_routing().await
        }
    }

    /// Renders `routing`, writes it atomically, and (with an API) waits until Traefik reports it.
    async fn write_and_verify(&self, routing: &Routing, endpoints: &Endpoints) -> Result<()> {
        let config = &self.inner.config;
        let text = render(config, routing, endpoints)?;

        // Nothing is written when Traefik cannot be asked afterwards: an unreachable API is
        // reported with the old configuration untouched.
        if let Some(api) = &self.inner.api {
            api.get(&Api::service_path(config.name.as_str()))
                .await
                .map_err(|e| e.into_core("read the API before writing"))?;
        }

        let path = config.file_path();
        let unchanged = tokio::fs::read_to_string(&path)
            .await
            .is_ok_and(|old| old == text);
        if !unchanged {
            let (dir, name) = (config.dir.clone(), config.file_name());
            tokio::task::spawn_blocking(move || write_atomic(&dir, &name, text.as_bytes()))
                .await
                .map_err(|e| Error::backend(crate::NAME, "write", false, e))?
                .map_err(|e| e.into_core("write"))?;
            tracing::info!(file = %path.display(), %routing, "wrote Traefik dynamic configuration");
        }
        // A file of the other format for the same router would make Traefik see every name
        // twice; it is ours, so it goes.
        match tokio::fs::remove_file(config.other_format_path()).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TraefikError::Write {
                    path: config.other_format_path(),
                    source,
                }
                .into_core("remove the other-format file"))
            }
        }

        if let Some(api) = &self.inner.api {
            self.verify(api, routing, endpoints, &path).await?;
        }
        Ok(())
    }

    /// Polls the API until it reports `routing`, within the configured bound.
    async fn verify(
        &self,
        api: &Api,
        routing: &Routing,
        endpoints: &Endpoints,
        path: &Path,
    ) -> Result<()> {
        let config = &self.inner.config;
        let preview_rule = config.preview_rule();
        // The slots' load balancers are ours only when the file defines them.
        let servers = config
            .slot_services_from
            .is_none()
            .then(|| Slot::ALL.map(|slot| endpoints.get(slot).iter().map(server_url).collect()));
        let expected = Expected {
            routing,
            rule: &config.rule,
            preview_rule: &preview_rule,
            servers,
        };
        let with_slots = expected.servers.is_some();
        let start = Instant::now();
        let mut seen;
        loop {
            seen = match api.view(&config.name, with_slots).await {
                Ok(view) if view.matches(&config.name, &expected) => {
                    tracing::debug!(waited = ?start.elapsed(), "Traefik reports the new configuration");
                    return Ok(());
                }
                Ok(view) => view.describe(&config.name),
                Err(e) => format!("an API error ({e})"),
            };
            if start.elapsed() >= config.verify_timeout {
                break;
            }
            tokio::time::sleep(config.poll_interval).await;
        }
        Err(TraefikError::NotLoaded {
            path: path.to_path_buf(),
            dir: config.dir.clone(),
            waited: start.elapsed(),
            expected: routing.to_string(),
            seen,
        }
        .into_core("verify"))
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `contents` to `dir/name` atomically: a temporary file in the same directory (an
/// extension Traefik ignores), fsync, rename over the target, fsync the directory. On failure the
/// temporary file is removed and the target is untouched.
fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> std::result::Result<(), TraefikError> {
    let target = dir.join(name);
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut created = false;
    let result = (|| -> io::Result<()> {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // Traefik (often another user) must read it; it holds no secrets.
            options.mode(0o644);
        }
        let mut f = options.open(&tmp)?;
        created = true;
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &target)?;
        created = false;
        // Make the rename itself durable. The new file is in place already, so a failure here
        // is logged, not reported as "nothing was changed".
        #[cfg(unix)]
        if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot fsync the directory after the rename");
        }
        Ok(())
    })();
    result.map_err(|source| {
        if created {
            let _ = fs::remove_file(&tmp);
        }
        TraefikError::Write {
            path: target,
            source,
        }
    })
}

#[async_trait]
impl TrafficSwitch for TraefikSwitch {
    fn name(&self) -> &str {
        crate::NAME
    }

    fn capabilities(&self) -> Capabilities {
        // Weighted round robin, a sticky cookie on it, and a preview router are all plain
        // dynamic configuration. Pause, in-flight counts and per-slot metrics are not offered
        // (Traefik's metrics go to Prometheus & co., not through this switch).
        Capabilities::basic()
            .with_weights(true)
            .with_sticky(true)
            .with_preview(true)
    }

    async fn apply(&self, split: &TrafficSplit, endpoints: &Endpoints) -> Result<()> {
        self.check_split(split, endpoints)?;
        let _guard = self.inner.lock.lock().await;
        // The preview router stays as it is in the file.
        let preview = self.file_routing().await?.and_then(|r| r.preview);
        let routing = Routing::new(split.clone()).with_preview(preview);
        self.write_and_verify(&routing, endpoints).await
    }

    async fn current(&self) -> Result<Option<TrafficSplit>> {
        Ok(self.routing().await?.map(|r| r.split))
    }

    async fn preview(&self, slot: Option<Slot>, endpoints: &Endpoints) -> Result<()> {
        let _guard = self.inner.lock.lock().await;
        let Some(existing) = self.file_routing().await? else {
            return Err(Error::invalid(
                "preview",
                slot.map_or("none", Slot::as_str),
                "no split has been applied yet: apply one first",
            ));
        };
        let routing = existing.with_preview(slot);
        self.write_and_verify(&routing, endpoints).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_rename_removes_the_temporary_file_and_keeps_the_target() {
        let dir = tempfile::tempdir().unwrap();
        // The target name is a directory: the temporary file is written, the rename fails.
        std::fs::create_dir(dir.path().join("app.yml")).unwrap();
        let err = write_atomic(dir.path(), "app.yml", b"http: {}\n").unwrap_err();
        assert!(matches!(err, TraefikError::Write { .. }), "{err:?}");
        assert!(err.to_string().contains("app.yml"), "{err}");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("app.yml")]);
        assert!(dir.path().join("app.yml").is_dir());
    }

    #[test]
    fn a_write_replaces_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "app.yml", b"a long first version\n").unwrap();
        write_atomic(dir.path(), "app.yml", b"short\n").unwrap();
        assert_eq!(fs::read(dir.path().join("app.yml")).unwrap(), b"short\n");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
