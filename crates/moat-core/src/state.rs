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

/// The on-disk format [`StateDir::save`] writes. Format 1 (no `format`
/// field, container-shaped) is what moat wrote before tiers had a seam;
/// [`StateDir::load`] still reads it.
pub const STATE_FORMAT: u32 = 2;

/// Everything moat remembers about a container between commands: a common
/// part every tier shares, and a tier-tagged part only that tier reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    pub oci_version: String,
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// RFC 3339, UTC.
    pub created: String,
    pub owner: String,
    pub annotations: HashMap<String, String>,
    /// Status inputs. The status itself is derived by the tier from these
    /// and the live system, never taken from here: `status` is only what
    /// was last recorded.
    pub status: ContainerStatus,
    /// PID of the container process, in the runtime's PID namespace (0
    /// before it exists): the init for `container`, the VMM for `microvm`.
    pub pid: i32,
    /// Start time of `pid` (field 22 of /proc/PID/stat), to detect PID reuse.
    pub pid_start_time: u64,
    /// Hooks later commands run (`start`, `delete`).
    pub poststart_hooks: Vec<oci_spec::runtime::Hook>,
    pub poststop_hooks: Vec<oci_spec::runtime::Hook>,
    /// Which tier owns the container: every command on it goes there.
    pub tier: Tier,
    /// That tier's own part (for `container`: its cgroup), opaque here.
    #[serde(default)]
    pub tier_state: serde_json::Value,
}

/// Format 1, as the first releases wrote it: the container tier's part
/// (`cgroup`) among the common fields, no `format`.
#[derive(Deserialize)]
struct StateV1 {
    oci_version: String,
    id: String,
    status: ContainerStatus,
    pid: i32,
    pid_start_time: u64,
    bundle: PathBuf,
    rootfs: PathBuf,
    created: String,
    owner: String,
    annotations: HashMap<String, String>,
    tier: Tier,
    cgroup: serde_json::Value,
    poststop_hooks: Vec<oci_spec::runtime::Hook>,
    poststart_hooks: Vec<oci_spec::runtime::Hook>,
}

impl From<StateV1> for State {
    fn from(v: StateV1) -> State {
        State {
            format: STATE_FORMAT,
            oci_version: v.oci_version,
            id: v.id,
            bundle: v.bundle,
            rootfs: v.rootfs,
            created: v.created,
            owner: v.owner,
            annotations: v.annotations,
            status: v.status,
            pid: v.pid,
            pid_start_time: v.pid_start_time,
            poststart_hooks: v.poststart_hooks,
            poststop_hooks: v.poststop_hooks,
            tier: v.tier,
            tier_state: serde_json::json!({ "cgroup": v.cgroup }),
        }
    }
}

impl State {
    /// Parses a state file of any format this release reads.
    pub fn parse(data: &[u8], path: &Path) -> Result<State, StateError> {
        let corrupt = |message: String| StateError::Corrupt {
            path: path.to_owned(),
            message,
        };
        let v: serde_json::Value =
            serde_json::from_slice(data).map_err(|e| corrupt(e.to_string()))?;
        match v.get("format").map(serde_json::Value::as_u64) {
            None => serde_json::from_value::<StateV1>(v)
                .map(State::from)
                .map_err(|e| corrupt(format!("format 1: {e}"))),
            Some(Some(n)) if n == u64::from(STATE_FORMAT) => {
                serde_json::from_value(v).map_err(|e| corrupt(e.to_string()))
            }
            Some(Some(n)) => Err(corrupt(format!(
                "format {n} is newer than this moat reads ({STATE_FORMAT}); use the moat that created it"
            ))),
            Some(None) => Err(corrupt("format is not a number".into())),
        }
    }

    /// The tier's own part, as that tier's type.
    pub fn tier_part<T: serde::de::DeserializeOwned>(&self, path: &Path) -> Result<T, StateError> {
        serde_json::from_value(self.tier_state.clone()).map_err(|e| StateError::Corrupt {
            path: path.to_owned(),
            message: format!("{} part: {e}", self.tier),
        })
    }
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

/// The default state root (root's; other users default to one of their own).
pub const DEFAULT_ROOT: &str = "/run/moat";

/// Opens (creating it) and locks the lock file `path`, waiting for it.
fn lock_file(path: &Path) -> Result<File, StateError> {
    let err = |source| StateError::Lock {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(err)?;
    flock(&file, FlockOperation::LockExclusive).map_err(|e| err(e.into()))?;
    Ok(file)
}

/// Prefix of a container directory being made ([`StateDir::create`]); not
/// a valid ID (it starts with a dot), so never listed.
const NEW_DIR_PREFIX: &str = ".new-";
/// Prefix of a container directory being removed ([`StateDir::remove`]).
const GONE_DIR_PREFIX: &str = ".gone-";

fn new_dir_name() -> String {
    temp_dir_name(NEW_DIR_PREFIX)
}

/// `PREFIX<pid>-<nanos>-<n>`: unique, and naming the process that made it.
fn temp_dir_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether the process that made the `.new-<pid>-…` directory `name` is
/// gone (no process of that PID; a PID in use again only delays the
/// removal to the age limit).
fn creator_gone(name: &str) -> bool {
    let pid = name
        .strip_prefix(NEW_DIR_PREFIX)
        .and_then(|r| r.split('-').next())
        .and_then(|p| p.parse::<i32>().ok())
        .and_then(rustix::process::Pid::from_raw);
    pid.is_some_and(|p| rustix::process::test_kill_process(p) == Err(rustix::io::Errno::SRCH))
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
    /// The directory is made under a private name, locked, and renamed into
    /// place without replacing anything: `<root>/<id>` never exists
    /// unlocked while its creator runs, so a directory whose lock is free
    /// and whose state says it is still being created was left by a killed
    /// creator ([`StateDir::abandoned`]).
    pub fn create(&self, id: &str) -> Result<ContainerLock, StateError> {
        validate_id(id)?;
        if !self.root.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(&self.root)
                .map_err(|source| StateError::CreateDir {
                    path: self.root.clone(),
                    source,
                })?;
        }
        let dir = self.container_dir(id);
        let tmp = self.root.join(new_dir_name());
        fs::DirBuilder::new()
            .mode(0o711)
            .create(&tmp)
            .map_err(|source| StateError::CreateDir {
                path: tmp.clone(),
                source,
            })?;
        let placed = lock_file(&tmp.join(LOCK_FILE)).and_then(|file| {
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                &tmp,
                rustix::fs::CWD,
                &dir,
                rustix::fs::RenameFlags::NOREPLACE,
            )
            .map_err(|e| match e {
                rustix::io::Errno::EXIST => StateError::Exists(id.to_owned()),
                e => StateError::CreateDir {
                    path: dir.clone(),
                    source: e.into(),
                },
            })?;
            Ok(file)
        });
        match placed {
            Ok(file) => Ok(ContainerLock { _file: file, dir }),
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Whether `<root>/<id>` was left by a `create` that was killed: no
    /// process holds its lock, and its state is missing, unreadable, or
    /// still `creating` (a creator holds the lock until it has saved the
    /// created state). Such a directory blocks its ID until removed.
    pub fn abandoned(&self, id: &str) -> bool {
        if validate_id(id).is_err() {
            return false;
        }
        let dir = self.container_dir(id);
        let Ok(file) = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(dir.join(LOCK_FILE))
        else {
            // No lock file: not a directory this moat made (or being made).
            return false;
        };
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
            return false;
        }
        match self.load(id) {
            Ok(st) => st.status == ContainerStatus::Creating,
            Err(_) => true,
        }
    }

    /// Directories of creates killed before they renamed them into place
    /// (`.new-*`, their lock free or not made yet; older than a minute, or
    /// at once when the process named in the name is gone) and
    /// of removals killed after they renamed them away (`.gone-*`, their
    /// lock free): removed.
    pub fn remove_unfinished(&self) {
        let Ok(rd) = fs::read_dir(&self.root) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let gone = name.starts_with(GONE_DIR_PREFIX);
            if !gone && !name.starts_with(NEW_DIR_PREFIX) {
                continue;
            }
            // Some(free) for a lock file, None without one.
            let lock = match OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(e.path().join(LOCK_FILE))
            {
                Ok(f) => Some(flock(&f, FlockOperation::NonBlockingLockExclusive).is_ok()),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
                Err(_) => Some(false),
            };
            let remove = if gone {
                // Nobody takes a `.gone-*` directory back: only its remover,
                // while it holds the lock, may still be at work in it.
                lock != Some(false)
            } else {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > std::time::Duration::from_secs(60));
                // Without a lock file the creator may be between its
                // mkdir and its lock: only its end (or the age) says so.
                lock != Some(false) && (old || creator_gone(&name))
            };
            if remove {
                let _ = fs::remove_dir_all(e.path());
            }
        }
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
        let file = lock_file(&dir.join(LOCK_FILE))?;
        // The directory may have been removed while we waited for the lock
        // (or removed and made again for another container of that name):
        // the lock is this container's only if its file is still there.
        let same = match (file.metadata(), fs::metadata(dir.join(LOCK_FILE))) {
            (Ok(a), Ok(b)) => {
                use std::os::unix::fs::MetadataExt;
                (a.dev(), a.ino()) == (b.dev(), b.ino())
            }
            _ => false,
        };
        if !same {
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
        State::parse(&data, &path)
    }

    /// Atomically replaces the state file: written to a temp file, then
    /// swapped with the old one (`RENAME_EXCHANGE`) and the old one
    /// removed; the first save, or a filesystem without exchange, renames.
    /// A reader sees the old or the new file, whole, at every instant. Not
    /// a rename over the old file: ext4 (`auto_da_alloc`) allocates and
    /// starts writing back the new file's blocks on such a rename, ~90 µs
    /// per save here against ~10 µs for the exchange and the unlink.
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
            drop(f);
            match rustix::fs::renameat_with(
                rustix::fs::CWD,
                &tmp,
                rustix::fs::CWD,
                &path,
                rustix::fs::RenameFlags::EXCHANGE,
            ) {
                // The old state is now under the temp name: it goes (a
                // runtime killed before that leaves it to the next save,
                // which truncates it, or to the removal of the directory).
                Ok(()) => fs::remove_file(&tmp),
                // No state file yet, or no exchange on this filesystem.
                Err(_) => fs::rename(&tmp, &path),
            }
        };
        write().map_err(|source| StateError::Write { path, source })
    }

    /// Removes a container's directory (the caller holds its lock). It is
    /// first renamed out of the way (`.gone-*`, not an ID): the ID is gone
    /// at once, and a runtime killed while removing leaves no container
    /// with half its files (which nothing could load, lock or delete), only
    /// a `.gone-*` directory that the next sweep removes
    /// ([`Self::remove_unfinished`]).
    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        validate_id(id)?;
        let dir = self.container_dir(id);
        let gone = self.root.join(temp_dir_name(GONE_DIR_PREFIX));
        match fs::rename(&dir, &gone) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StateError::Remove { path: dir, source }),
        }
        match fs::remove_dir_all(&gone) {
            Ok(()) => Ok(()),
            // A sweep may have removed (part of) it first.
            Err(_) if !gone.exists() => Ok(()),
            Err(source) => Err(StateError::Remove { path: gone, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 15 (stress `kill`): a runtime SIGKILLed while removing a
    /// container left a directory with half its files, which no sweep or
    /// `delete` could take; and a killed create's `.new-*` directory
    /// waited a minute although its creator was gone.
    #[test]
    fn interrupted_creates_and_removals_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::new(tmp.path());
        let names = || -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(tmp.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        // A whole removal leaves nothing.
        drop(sd.create("a").unwrap());
        let lock = sd.lock("a").unwrap();
        sd.remove("a").unwrap();
        drop(lock);
        assert!(names().is_empty(), "{:?}", names());
        // A removal killed after the rename: a `.gone-*` directory, swept
        // once its lock is free, never while it is held.
        let gone = tmp.path().join(temp_dir_name(GONE_DIR_PREFIX));
        fs::create_dir(&gone).unwrap();
        fs::write(gone.join("config.json"), "{}").unwrap();
        let held = lock_file(&gone.join(LOCK_FILE)).unwrap();
        sd.remove_unfinished();
        assert!(gone.exists());
        drop(held);
        sd.remove_unfinished();
        assert!(!gone.exists());
        // A create killed before the rename: swept at once when the
        // process in its name is gone (with or without its lock file); a
        // live creator's young directory stays.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let dead_new = tmp.path().join(format!("{NEW_DIR_PREFIX}{dead}-1-0"));
        let live_new = tmp.path().join(new_dir_name());
        let bare_new = tmp.path().join(format!("{NEW_DIR_PREFIX}{dead}-2-0"));
        for d in [&dead_new, &live_new, &bare_new] {
            fs::create_dir(d).unwrap();
        }
        drop(lock_file(&dead_new.join(LOCK_FILE)).unwrap());
        drop(lock_file(&live_new.join(LOCK_FILE)).unwrap());
        sd.remove_unfinished();
        assert!(!dead_new.exists() && !bare_new.exists());
        assert!(live_new.exists());
    }

    /// A lock taken on a directory that was removed and made again for
    /// another container while the taker waited is refused (it would lock
    /// the old file and believe it held the new container).
    #[test]
    fn a_lock_on_a_removed_container_is_not_the_new_ones() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::new(tmp.path());
        drop(sd.create("x").unwrap());
        let ino = fs::metadata(tmp.path().join("x").join(LOCK_FILE))
            .unwrap()
            .ino();
        let held = sd.lock("x").unwrap();
        let sd2 = sd.clone();
        let waiter = std::thread::spawn(move || sd2.lock("x").map(|_| ()));
        // Until the waiter blocks on the old lock file (/proc/locks lists a
        // blocked request as "-> FLOCK … :<inode> …").
        let blocked = |ino: u64| {
            fs::read_to_string("/proc/locks").unwrap().lines().any(|l| {
                l.contains("->")
                    && l.split_whitespace()
                        .any(|f| f.ends_with(&format!(":{ino}")))
            })
        };
        // (A waiter that returned at once, without blocking, ends the wait
        // too: its result is checked below.)
        while !blocked(ino) && !waiter.is_finished() {
            std::thread::yield_now();
        }
        sd.remove("x").unwrap();
        drop(sd.create("x").unwrap());
        drop(held);
        let r = waiter.join().unwrap();
        assert!(matches!(r, Err(StateError::NotFound(_))), "{r:?}");
        sd.lock("x").unwrap();
    }

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
        // Nothing but the container directories is left in the root.
        assert_eq!(
            fs::read_dir(sd.root()).unwrap().count(),
            0,
            "leftovers of create"
        );
    }

    #[test]
    fn a_directory_left_by_a_killed_create_is_abandoned() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::new(tmp.path().join("root"));
        // Killed after the rename, before the first save.
        drop(sd.create("c1").unwrap());
        assert!(sd.abandoned("c1"));
        // Its creator still runs: not abandoned.
        let busy = sd.lock("c1").unwrap();
        assert!(!sd.abandoned("c1"));
        drop(busy);
        // A created container is not abandoned; one still creating is.
        let mut st = sample_v2();
        st.status = ContainerStatus::Created;
        sd.save(&st).unwrap();
        assert!(!sd.abandoned("c1"));
        st.status = ContainerStatus::Creating;
        sd.save(&st).unwrap();
        assert!(sd.abandoned("c1"));
        // A state path that is a directory is unreadable: abandoned, and removable.
        fs::remove_file(sd.container_dir("c1").join(STATE_FILE)).unwrap();
        fs::create_dir(sd.container_dir("c1").join(STATE_FILE)).unwrap();
        assert!(sd.abandoned("c1"));
        sd.remove("c1").unwrap();
        assert!(!sd.abandoned("c1"));
        assert!(!sd.abandoned("../x"));
    }

    /// Saves swap the state file whole and leave no temp file behind; a
    /// temp file left by a runtime killed between the swap and the unlink
    /// is overwritten by the next save.
    #[test]
    fn saves_replace_the_state_whole_and_leave_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::new(tmp.path().join("root"));
        let _lock = sd.create("c1").unwrap();
        let mut st = sample_v2();
        sd.save(&st).unwrap();
        assert_eq!(sd.load("c1").unwrap().pid, 42);
        let stale = sd.container_dir("c1").join(".state.json.tmp");
        fs::write(&stale, "stale").unwrap();
        for pid in [43, 44] {
            st.pid = pid;
            sd.save(&st).unwrap();
            assert_eq!(sd.load("c1").unwrap().pid, pid);
            assert!(!stale.exists(), "temp file left");
        }
    }

    fn sample_v2() -> State {
        State {
            format: STATE_FORMAT,
            oci_version: "1.2.0".into(),
            id: "c1".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: "2026-01-01T00:00:00.000000000Z".into(),
            owner: String::new(),
            annotations: HashMap::new(),
            status: ContainerStatus::Running,
            pid: 42,
            pid_start_time: 7,
            poststart_hooks: Vec::new(),
            poststop_hooks: Vec::new(),
            tier: Tier::Container,
            tier_state: serde_json::json!({"cgroup": {"v1": {"x": 1}}}),
        }
    }

    #[test]
    fn formats_1_and_2_are_read_a_newer_one_is_refused() {
        let p = Path::new("/s/state.json");
        let v2 = sample_v2();
        let again = State::parse(&serde_json::to_vec(&v2).unwrap(), p).unwrap();
        assert_eq!(again.tier_state, v2.tier_state);
        assert_eq!(again.pid, 42);
        let v1 = serde_json::json!({
            "oci_version": "1.0.2", "id": "old", "status": "created", "pid": 9,
            "pid_start_time": 3, "bundle": "/b", "rootfs": "/b/r", "created": "x",
            "owner": "", "annotations": {"a": "b"}, "tier": "container",
            "cgroup": {"v1": {"y": 2}}, "poststop_hooks": [], "poststart_hooks": [],
            "own_pid_ns": true, "use_systemd_cgroup": false
        });
        let old = State::parse(v1.to_string().as_bytes(), p).unwrap();
        assert_eq!(old.format, STATE_FORMAT);
        assert_eq!(
            (old.id.as_str(), old.pid, old.pid_start_time),
            ("old", 9, 3)
        );
        assert_eq!(old.status, ContainerStatus::Created);
        assert_eq!(
            old.tier_state,
            serde_json::json!({"cgroup": {"v1": {"y": 2}}})
        );
        let mut future = serde_json::to_value(&v2).unwrap();
        future["format"] = serde_json::json!(3);
        let e = State::parse(future.to_string().as_bytes(), p).unwrap_err();
        assert!(e.to_string().contains("corrupt state file"), "{e}");
        assert!(
            matches!(e, StateError::Corrupt { ref message, .. } if message.contains("format 3"))
        );
        assert!(State::parse(b"{}", p).is_err());
        assert!(State::parse(b"", p).is_err());
    }
}
