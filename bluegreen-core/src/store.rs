//! The file [`StateStore`]: one directory holding `state.json` and `lock.json`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::state::{new_token, DeploymentState, Lease, LockInfo, LockOwner, Timestamp};
use crate::traits::StateStore;

/// State and lock in files under one directory.
///
/// - Writes are atomic: a temporary file in the same directory (mode 0600), `fsync`, `rename`,
///   `fsync` of the directory. A reader never sees a half-written file.
/// - Every read-modify-write (compare-and-swap save, lock acquisition) runs under an advisory
///   `flock` on `<dir>/.guard`, so two processes (or tasks) never interleave.
/// - The lock is a lease (`lock.json`: holder host, pid, purpose, since, expiry, epoch); `epoch`
///   keeps the highest epoch granted, so epochs only grow. A save is refused unless its lease is the
///   one in `lock.json`, unexpired. An expired lease
///   is taken over; so is a lease whose holder is a process on this host that no longer exists.
/// - A corrupt or newer-format `state.json` is an error and is never overwritten.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use bluegreen_core::{store::FileStateStore, StateStore, DeploymentState, LockOwner};
/// let dir = std::env::temp_dir().join(format!("bg-doc-{}", std::process::id()));
/// let store = FileStateStore::new(&dir).unwrap();
/// assert!(store.load().await.unwrap().is_none());
/// let lease = store.acquire(&LockOwner::current("doc"), Duration::from_secs(60)).await.unwrap();
/// let rev = store.save(&DeploymentState::default(), &lease).await.unwrap();
/// assert_eq!(rev, 1);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct FileStateStore {
    dir: PathBuf,
}

impl FileStateStore {
    /// A store in `dir` (created with mode 0700 if missing).
    pub fn new(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| Error::io(format!("creating state directory {}", dir.display()), e))?;
        }
        Ok(FileStateStore { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join("lock.json")
    }

    /// Runs `f` under the directory's advisory lock, on a blocking thread.
    async fn guarded<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Path) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let guard_path = dir.join(".guard");
            let guard = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&guard_path)
                .map_err(|e| Error::io(format!("opening {}", guard_path.display()), e))?;
            guard
                .lock()
                .map_err(|e| Error::io(format!("locking {}", guard_path.display()), e))?;
            let out = f(&dir);
            let _ = guard.unlock();
            out
        })
        .await
        .map_err(|e| Error::backend("file", "state store task", false, e))?
    }
}

/// Reads `path`, or `None` when it does not exist. Shared with backends that keep their own files
/// (the embedded proxy's routing file).
///
/// # Errors
/// [`Error::Io`] for any other read failure.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

/// Writes `bytes` to `path` atomically with mode 0600: a temporary file in the same directory,
/// `fsync`, `rename`, `fsync` of the directory. A reader sees the old content or the new, whole.
///
/// # Errors
/// [`Error::Io`] naming the temporary file; it is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        new_token()
    ));
    let ctx = |what: &str| format!("{what} {}", tmp.display());
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(ctx("writing"), e)
    })
}

fn read_lock(path: &Path) -> Result<Option<LockInfo>> {
    match read_optional(path)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::CorruptState {
                location: path.display().to_string(),
                reason: format!("lock file: {e}"),
            }),
    }
}

/// The highest lease epoch granted in this directory (0 before the first).
fn read_epoch(path: &Path) -> Result<u64> {
    match read_optional(path)? {
        None => Ok(0),
        Some(b) => String::from_utf8_lossy(&b)
            .trim()
            .parse()
            .map_err(|e| Error::CorruptState {
                location: path.display().to_string(),
                reason: format!("lease epoch: {e}"),
            }),
    }
}

fn holder_is_dead(l: &LockInfo) -> bool {
    l.owner.is_other_process() && l.owner.alive_here() == Some(false)
}

#[async_trait]
impl StateStore for FileStateStore {
    fn name(&self) -> &str {
        "file"
    }

    async fn load(&self) -> Result<Option<DeploymentState>> {
        let path = self.state_path();
        tokio::task::spawn_blocking(move || match read_optional(&path)? {
            None => Ok(None),
            Some(b) => DeploymentState::from_json(&path.display().to_string(), &b).map(Some),
        })
        .await
        .map_err(|e| Error::backend("file", "load", false, e))?
    }

    async fn save(&self, state: &DeploymentState, lease: &Lease) -> Result<u64> {
        let path = self.state_path();
        let lock_path = self.lock_path();
        let lease = lease.clone();
        let mut next = state.clone();
        self.guarded(move |_| {
            match read_lock(&lock_path)? {
                Some(held) => held.check_held_by(&lease, Timestamp::now())?,
                None => {
                    return Err(Error::LockLost {
                        reason: "the lock was broken or released".into(),
                    })
                }
            }
            let found = match read_optional(&path)? {
                None => 0,
                Some(b) => DeploymentState::from_json(&path.display().to_string(), &b)?.revision,
            };
            if found != next.revision {
                return Err(Error::Conflict {
                    expected: next.revision,
                    found,
                });
            }
            next.revision = found + 1;
            write_atomic(&path, &next.to_json())?;
            Ok(next.revision)
        })
        .await
    }

    async fn acquire(&self, owner: &LockOwner, ttl: Duration) -> Result<Lease> {
        let path = self.lock_path();
        let epoch_path = self.dir.join("epoch");
        let owner = owner.clone();
        self.guarded(move |_| {
            let now = Timestamp::now();
            if let Some(held) = read_lock(&path)? {
                if !held.expired_at(now) && !holder_is_dead(&held) {
                    return Err(Error::Locked {
                        holder: Box::new(held),
                    });
                }
                tracing::warn!(holder = %held, "taking over a stale deployment lock");
            }
            // The epoch outlives the lock file (released and broken locks included).
            let epoch =
                read_epoch(&epoch_path)?.max(read_lock(&path)?.map(|l| l.epoch).unwrap_or(0)) + 1;
            write_atomic(&epoch_path, epoch.to_string().as_bytes())?;
            let lease = LockInfo {
                owner,
                token: new_token(),
                since: now,
                expires: now.plus(ttl),
                epoch,
            };
            write_atomic(
                &path,
                &serde_json::to_vec_pretty(&lease).expect("lock serializes"),
            )?;
            Ok(lease)
        })
        .await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let path = self.lock_path();
        let lease = lease.clone();
        self.guarded(move |_| match read_lock(&path)? {
            Some(mut held) if held.token == lease.token => {
                held.expires = Timestamp::now().plus(ttl);
                write_atomic(
                    &path,
                    &serde_json::to_vec_pretty(&held).expect("lock serializes"),
                )?;
                Ok(held)
            }
            Some(other) => Err(Error::LockLost {
                reason: format!("now held by {other}"),
            }),
            None => Err(Error::LockLost {
                reason: "the lock was broken or released".into(),
            }),
        })
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let path = self.lock_path();
        let token = lease.token.clone();
        self.guarded(move |_| {
            if read_lock(&path)?.map(|l| l.token == token).unwrap_or(false) {
                fs::remove_file(&path)
                    .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
            }
            Ok(())
        })
        .await
    }

    async fn lock_info(&self) -> Result<Option<LockInfo>> {
        let path = self.lock_path();
        tokio::task::spawn_blocking(move || read_lock(&path))
            .await
            .map_err(|e| Error::backend("file", "lock_info", false, e))?
    }

    async fn break_lock(&self) -> Result<Option<LockInfo>> {
        let path = self.lock_path();
        self.guarded(move |_| {
            let held = read_lock(&path).unwrap_or(None);
            match fs::remove_file(&path) {
                Ok(()) => Ok(held),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    #[tokio::test]
    async fn file_store_passes_the_state_store_suite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        crate::testkit::state_store_suite(&move || {
            Arc::new(FileStateStore::new(&path).unwrap()) as Arc<dyn StateStore>
        })
        .await
        .assert_complete();
    }

    #[tokio::test]
    async fn state_files_are_private_and_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStateStore::new(dir.path().join("s")).unwrap();
        let lease = store
            .acquire(&LockOwner::current("test"), Duration::from_secs(60))
            .await
            .unwrap();
        store
            .save(&DeploymentState::default(), &lease)
            .await
            .unwrap();
        let mode = fs::metadata(store.state_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = fs::metadata(store.dir()).unwrap().permissions().mode();
        assert_eq!(dmode & 0o777, 0o700);
        let leftovers: Vec<_> = fs::read_dir(store.dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    }

    #[tokio::test]
    async fn corrupt_and_newer_state_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStateStore::new(dir.path()).unwrap();
        let lease = store
            .acquire(&LockOwner::current("test"), Duration::from_secs(60))
            .await
            .unwrap();
        fs::write(store.state_path(), b"{ half a file").unwrap();
        let err = store.load().await.unwrap_err();
        assert!(matches!(err, Error::CorruptState { .. }), "{err}");
        assert!(err.to_string().contains("state.json"), "{err}");
        let err = store
            .save(&DeploymentState::default(), &lease)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::CorruptState { .. }), "{err}");
        assert_eq!(fs::read(store.state_path()).unwrap(), b"{ half a file");

        fs::write(store.state_path(), br#"{"format": 42, "revision": 3}"#).unwrap();
        let err = store.load().await.unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedStateFormat { found: 42, .. }),
            "{err}"
        );
        assert!(store
            .save(&DeploymentState::default(), &lease)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn a_lock_held_by_a_dead_process_on_this_host_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStateStore::new(dir.path()).unwrap();
        // A pid that cannot exist (above the kernel's pid_max ceiling).
        let mut dead = LockOwner::current("deploy v9 (crashed)");
        dead.pid = 4_194_304 + 7;
        let stale = LockInfo {
            owner: dead,
            token: "t".into(),
            since: Timestamp::now(),
            expires: Timestamp::now().plus(Duration::from_secs(3600)),
            epoch: 0,
        };
        write_atomic(&store.lock_path(), &serde_json::to_vec(&stale).unwrap()).unwrap();
        let lease = store
            .acquire(&LockOwner::current("deploy v10"), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(lease.owner.purpose, "deploy v10");

        // A live holder on another host is respected until it expires.
        let mut remote = LockOwner::current("deploy from ci");
        remote.host = "another-host".into();
        let held = LockInfo {
            owner: remote,
            token: "r".into(),
            since: Timestamp::now(),
            expires: Timestamp::now().plus(Duration::from_secs(3600)),
            epoch: 0,
        };
        write_atomic(&store.lock_path(), &serde_json::to_vec(&held).unwrap()).unwrap();
        let err = store
            .acquire(&LockOwner::current("x"), Duration::from_secs(60))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("deploy from ci") && msg.contains("another-host"),
            "{msg}"
        );
    }
}
