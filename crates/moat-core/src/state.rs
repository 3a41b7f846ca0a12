//! Container state on disk: `<root>/<id>/state.json`, guarded by a per-container
//! `flock` so commands on one container serialize while different containers
//! proceed in parallel.
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};
use serde::{Deserialize, Serialize};

use crate::tier::Tier;

pub const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("invalid container id {0:?}: use 1-1024 characters from [A-Za-z0-9_.+-], not starting with '.'")]
    InvalidId(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("cannot create state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt state file {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The OCI status of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerStatus {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl ContainerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerStatus::Creating => "creating",
            ContainerStatus::Created => "created",
            ContainerStatus::Running => "running",
            ContainerStatus::Paused => "paused",
            ContainerStatus::Stopped => "stopped",
        }
    }
}

/// Everything moat remembers about a container between commands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub oci_version: String,
    pub id: String,
    /// What was last recorded; the live status is derived from the process (see the tier crates).
    pub status: ContainerStatus,
    /// PID of the container's init process, in the runtime's PID namespace (0 before it exists).
    pub pid: i32,
    /// Start time of `pid` (field 22 of /proc/PID/stat), to detect PID reuse.
    pub pid_start_time: u64,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// RFC 3339, UTC.
    pub created: String,
    pub owner: String,
    pub annotations: HashMap<String, String>,
    pub tier: Tier,
    /// Opaque cgroup description saved by the cgroup manager.
    pub cgroup: serde_json::Value,
    /// Hooks to run at delete time, and other parts of config.json later commands need.
    pub poststop_hooks: Vec<oci_spec::runtime::Hook>,
    pub poststart_hooks: Vec<oci_spec::runtime::Hook>,
    /// Whether the container has its own PID namespace (else `kill --all`/delete must kill every cgroup member).
    pub own_pid_ns: bool,
    /// The container's process spec is needed by `exec` defaults (env, caps, user); kept as given.
    pub use_systemd_cgroup: bool,
}

/// Validates a container ID as runc does: no path separators, no leading dot.
pub fn validate_id(id: &str) -> Result<(), StateError> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.+-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StateError::InvalidId(id.to_owned()))
    }
}

/// The runtime's state root (`--root`, default /run/moat).
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// A held per-container lock; released on drop.
#[derive(Debug)]
pub struct ContainerLock {
    _file: File,
    dir: PathBuf,
}

impl ContainerLock {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The lock's fd number: a forked child must close it, or the lock (which
    /// belongs to the open file, not the process) would live as long as it.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self._file)
    }
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Creates `<root>/<id>` (failing if it exists) and returns it locked.
    pub fn create(&self, id: &str) -> Result<ContainerLock, StateError> {
        validate_id(id)?;
        let mk = |p: &Path| {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(p)
                .map_err(|source| StateError::CreateDir {
                    path: p.to_owned(),
                    source,
                })
        };
        if !self.root.is_dir() {
            mk(&self.root)?;
        }
        let dir = self.container_dir(id);
        match fs::DirBuilder::new().mode(0o711).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(StateError::Exists(id.to_owned()))
            }
            Err(source) => return Err(StateError::CreateDir { path: dir, source }),
        }
        self.lock_dir(dir)
    }

    /// Locks an existing container's directory.
    pub fn lock(&self, id: &str) -> Result<ContainerLock, StateError> {
        validate_id(id)?;
        let dir = self.container_dir(id);
        if !dir.is_dir() {
            return Err(StateError::NotFound(id.to_owned()));
        }
        self.lock_dir(dir)
    }

    fn lock_dir(&self, dir: PathBuf) -> Result<ContainerLock, StateError> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| StateError::Lock {
                path: path.clone(),
                source,
            })?;
        flock(&file, FlockOperation::LockExclusive).map_err(|e| StateError::Lock {
            path: path.clone(),
            source: e.into(),
        })?;
        // The directory may have been deleted while we waited for the lock.
        if !dir.join(LOCK_FILE).exists() {
            return Err(StateError::NotFound(
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ));
        }
        Ok(ContainerLock { _file: file, dir })
    }

    /// IDs of all containers with a state directory.
    pub fn list(&self) -> Result<Vec<String>, StateError> {
        let rd = match fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.root.clone(),
                    source,
                })
            }
        };
        let mut ids: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| validate_id(id).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub fn load(&self, id: &str) -> Result<State, StateError> {
        validate_id(id)?;
        let path = self.container_dir(id).join(STATE_FILE);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotFound(id.to_owned()))
            }
            Err(source) => return Err(StateError::Read { path, source }),
        };
        serde_json::from_slice(&data).map_err(|e| StateError::Corrupt {
            path,
            message: e.to_string(),
        })
    }

    /// Atomically replaces the state file (write to a temp file, then rename).
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let dir = self.container_dir(&state.id);
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(".state.json.tmp");
        let data = serde_json::to_vec(state).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&data)?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|source| StateError::Write { path, source })
    }

    /// Removes a container's directory (the caller holds its lock).
    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        validate_id(id)?;
        let dir = self.container_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Remove { path: dir, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_validation() {
        for ok in ["a", "abc-1.2_3+x", &"x".repeat(1024)] {
            validate_id(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "a\0",
            "../x",
            &"x".repeat(1025),
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn create_lock_list_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::new(tmp.path().join("root"));
        let lock = sd.create("c1").unwrap();
        assert!(matches!(
            sd.create("c1").unwrap_err(),
            StateError::Exists(_)
        ));
        assert_eq!(sd.list().unwrap(), vec!["c1".to_string()]);
        drop(lock);
        let _l = sd.lock("c1").unwrap();
        assert!(matches!(
            sd.lock("nope").unwrap_err(),
            StateError::NotFound(_)
        ));
        sd.remove("c1").unwrap();
        assert!(sd.list().unwrap().is_empty());
    }
}
