//! cgroups v1 and v2 behind one manager.
//!
//! CONTRACT (called by the container lifecycle; implement, keep the signatures):
//! ```ignore
//! pub enum CgroupManager { V1(v1::Manager), V2(v2::Manager) }
//! impl CgroupManager {
//!     /// Detect the host layout (v1, hybrid, unified) and resolve the container's cgroup from
//!     /// `cgroupsPath` (None => "/<id>" like runc). `systemd` => clear error if no systemd.
//!     pub fn new(cgroups_path: Option<&Path>, id: &str, systemd: bool, rootless: bool) -> Result<Self, CgroupError>;
//!     /// Rebuild from what `to_saved()` returned (stored in state.json).
//!     pub fn from_saved(v: &serde_json::Value) -> Result<Self, CgroupError>;
//!     pub fn to_saved(&self) -> serde_json::Value;
//!     /// mkdir the cgroup(s) and apply `resources`; then `add_pid`.
//!     pub fn create(&self, resources: Option<&LinuxResources>) -> Result<(), CgroupError>;
//!     pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError>;
//!     pub fn update(&self, resources: &LinuxResources) -> Result<(), CgroupError>;
//!     pub fn freeze(&self) -> Result<(), CgroupError>;  pub fn thaw(&self) -> Result<(), CgroupError>;
//!     pub fn pids(&self) -> Result<Vec<i32>, CgroupError>;
//!     pub fn stats(&self) -> Result<Stats, CgroupError>;   // serializes as runc's events "stats" data
//!     /// Kill remaining members (SIGKILL), wait for them to leave, rmdir. Idempotent.
//!     pub fn destroy(&self) -> Result<(), CgroupError>;
//!     /// (controller or "" for v2, host path) for the container's cgroup mount without cgroupns.
//!     pub fn mount_sources(&self) -> Vec<(String, PathBuf)>;
//!     pub fn is_v2(&self) -> bool;
//! }
//! ```
//!
//! Notes on behaviour:
//! - `create` with `rootless` returns [`CgroupError::NoDelegation`] when the
//!   cgroup cannot be created for lack of permission *and* no limit was
//!   requested; the caller may turn that into a warning and run without a
//!   cgroup. With limits requested, the failure is an ordinary error.
//! - Device rules are not applied for rootless containers (a user namespace
//!   cannot create device nodes, and loading BPF needs privilege).
//! - Settings that cannot be honoured and are only advisory (kernel memory,
//!   rdma, BFQ leaf weights, v2 swappiness) are listed by
//!   [`ignored_settings`] for the caller to print; every real limit either
//!   applies or fails.
//! - With `systemd`, "slice:prefix:name" is turned into the path systemd
//!   gives the scope and managed through cgroupfs (no D-Bus).
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};

mod devices;
mod layout;
pub mod stats;
mod translate;
pub mod v1;
pub mod v2;

pub use layout::V1_CONTROLLERS;
pub use stats::Stats;
pub use translate::ignored_settings;

/// Failures of the cgroup manager; each names the file or directory.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("creating cgroup {path}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing cgroup {path}")]
    Rmdir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening cgroup {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no cgroup filesystem is mounted")]
    NoCgroupMounts,
    #[error("systemd cgroup driver requested but systemd is not running")]
    SystemdNotRunning,
    #[error("systemd cgroupsPath {0:?} is not of the form slice:prefix:name")]
    BadSystemdPath(String),
    #[error("invalid cgroupsPath {path}: {reason}")]
    InvalidPath { path: PathBuf, reason: &'static str },
    #[error(
        "cgroup controller {controller:?} is not mounted or enabled under {path}, but {file} was requested"
    )]
    ControllerMissing {
        controller: String,
        file: String,
        path: PathBuf,
    },
    #[error("invalid {setting}: {reason}")]
    InvalidValue { setting: String, reason: String },
    #[error("{setting} is not supported on cgroup v{version}")]
    Unsupported { setting: &'static str, version: u8 },
    #[error("unified resource key {key:?} {reason}")]
    BadUnifiedKey { key: String, reason: &'static str },
    #[error(
        "linux.resources.unified needs cgroup v2, but this host's controllers are on cgroup v1"
    )]
    UnifiedOnV1,
    #[error("no delegated cgroup at {path} (rootless); running without cgroup limits")]
    NoDelegation {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the device filter program")]
    BpfLoad(#[source] moat_sys::bpf::LoadError),
    #[error("attaching the device filter to {path}")]
    BpfAttach {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot enable the {controller} controller in {path}: processes are in it (cgroup v2 enables controllers only in a cgroup without processes)"
    )]
    Populated { path: PathBuf, controller: String },
    #[error("{path} did not reach the frozen state")]
    FreezeTimeout { path: PathBuf },
    #[error("sending SIGKILL to pid {pid}")]
    Kill {
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("{path} still has processes after SIGKILL")]
    StillPopulated { path: PathBuf },
    #[error("saved cgroup state is invalid")]
    Saved(#[source] serde_json::Error),
}

/// Files the manager reads to learn the host's layout; tests point them at
/// a fake tree.
#[derive(Debug, Clone)]
pub struct HostPaths {
    pub mountinfo: PathBuf,
    pub proc_cgroup: PathBuf,
    /// Exists when systemd is PID 1 (`/run/systemd/system`).
    pub systemd_marker: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            mountinfo: "/proc/self/mountinfo".into(),
            proc_cgroup: "/proc/self/cgroup".into(),
            systemd_marker: "/run/systemd/system".into(),
        }
    }
}

/// The host's cgroup layout ("v1", "hybrid" or "v2") and its controllers,
/// for `moat info`.
pub fn host_layout() -> Result<(&'static str, Vec<String>), CgroupError> {
    let host = HostPaths::default();
    let mounts = layout::parse_mountinfo(&read(&host.mountinfo)?);
    Ok(match layout::detect(mounts)? {
        layout::Layout::Unified(m) => {
            let list = read(&m.mount_point.join("cgroup.controllers")).unwrap_or_default();
            ("v2", list.split_whitespace().map(str::to_owned).collect())
        }
        layout::Layout::Legacy {
            hierarchies,
            unified,
        } => {
            let mut ctrls: Vec<String> = hierarchies
                .iter()
                .flat_map(|h| h.controllers.iter())
                .filter(|c| !c.starts_with("name="))
                .cloned()
                .collect();
            ctrls.sort();
            ctrls.dedup();
            (if unified.is_some() { "hybrid" } else { "v1" }, ctrls)
        }
    })
}

/// Whether this process may create cgroups under its own: always for root;
/// for another user, whether its cgroup directory (v2, or v1's pids
/// hierarchy) is writable by it, as systemd's delegation makes it.
pub fn own_cgroup_writable() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    let host = HostPaths::default();
    let (Ok(mountinfo), Ok(own)) = (read(&host.mountinfo), read(&host.proc_cgroup)) else {
        return false;
    };
    let own = layout::parse_proc_cgroup(&own);
    let dir = match layout::detect(layout::parse_mountinfo(&mountinfo)) {
        Ok(layout::Layout::Unified(m)) => own
            .get("")
            .map(|p| layout::place_own(&m.mount_point, &m.root, p)),
        Ok(layout::Layout::Legacy { hierarchies, .. }) => hierarchies
            .iter()
            .find(|h| h.controllers.iter().any(|c| c == "pids"))
            .and_then(|h| {
                own.get("pids")
                    .map(|p| layout::place_own(&h.mount_point, &h.root, p))
            }),
        Err(_) => None,
    };
    dir.is_some_and(|d| rustix::fs::access(&d, rustix::fs::Access::WRITE_OK).is_ok())
}

/// On a unified (v2) host, the controllers this process's own cgroup
/// offers its children (`cgroup.controllers`): those a rootless runtime's
/// containers can use. None on v1 and hybrid hosts, or when unreadable.
pub fn own_v2_controllers() -> Option<Vec<String>> {
    let host = HostPaths::default();
    let mounts = layout::parse_mountinfo(&read(&host.mountinfo).ok()?);
    let layout::Layout::Unified(m) = layout::detect(mounts).ok()? else {
        return None;
    };
    let own = layout::parse_proc_cgroup(&read(&host.proc_cgroup).ok()?);
    let dir = layout::place_own(&m.mount_point, &m.root, own.get("")?);
    let list = read(&dir.join("cgroup.controllers")).ok()?;
    Some(list.split_whitespace().map(str::to_owned).collect())
}

/// The container's cgroup on a v1/hybrid or a unified host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cgroup_version")]
pub enum CgroupManager {
    #[serde(rename = "1")]
    V1(v1::Manager),
    #[serde(rename = "2")]
    V2(v2::Manager),
}

macro_rules! dispatch {
    ($self:ident, $m:ident => $e:expr) => {
        match $self {
            CgroupManager::V1($m) => $e,
            CgroupManager::V2($m) => $e,
        }
    };
}

impl CgroupManager {
    /// Detects the host layout and places the container's cgroup; see the
    /// module docs for `cgroups_path` forms. Touches nothing on disk.
    pub fn new(
        cgroups_path: Option<&Path>,
        id: &str,
        systemd: bool,
        rootless: bool,
    ) -> Result<Self, CgroupError> {
        Self::new_with(&HostPaths::default(), cgroups_path, id, systemd, rootless)
    }

    /// [`CgroupManager::new`] reading the layout from `host`.
    pub fn new_with(
        host: &HostPaths,
        cgroups_path: Option<&Path>,
        id: &str,
        systemd: bool,
        rootless: bool,
    ) -> Result<Self, CgroupError> {
        let cg = layout::resolve(
            cgroups_path,
            id,
            systemd,
            host.systemd_marker.is_dir(),
            rootless,
        )?;
        let mountinfo = read(&host.mountinfo)?;
        let own = layout::parse_proc_cgroup(&read(&host.proc_cgroup)?);
        match layout::detect(layout::parse_mountinfo(&mountinfo))? {
            layout::Layout::Unified(m) => {
                Ok(Self::V2(v2::Manager::place(&m, &cg, &own, rootless)?))
            }
            layout::Layout::Legacy {
                hierarchies,
                unified,
            } => Ok(Self::V1(v1::Manager::place(
                &hierarchies,
                unified.as_ref(),
                &cg,
                &own,
                rootless,
            )?)),
        }
    }

    pub fn from_saved(v: &serde_json::Value) -> Result<Self, CgroupError> {
        serde_json::from_value(v.clone()).map_err(CgroupError::Saved)
    }

    pub fn to_saved(&self) -> serde_json::Value {
        // All fields are strings, bools and UTF-8 paths (checked when
        // placed), so serialisation cannot fail; Null would fail from_saved.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Creates the cgroup and applies `resources`; settings it cannot
    /// honour are warnings ([`CgroupManager::ignored_settings`]).
    pub fn create(&self, resources: Option<&LinuxResources>) -> Result<(), CgroupError> {
        self.warn_ignored(resources);
        dispatch!(self, m => m.create(resources))
    }

    fn warn_ignored(&self, resources: Option<&LinuxResources>) {
        for note in resources
            .map(|r| self.ignored_settings(r))
            .unwrap_or_default()
        {
            tracing::warn!("{note}");
        }
    }

    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        dispatch!(self, m => m.add_pid(pid))
    }

    /// Opens the files through which a process moves *itself* into this
    /// cgroup (see [`JoinFiles`]). Opened by the runtime, written by the
    /// container process: the kernel checks the opener's credentials.
    pub fn join_files(&self) -> Result<JoinFiles, CgroupError> {
        let targets = dispatch!(self, m => m.join_targets());
        let mut files = Vec::with_capacity(targets.len());
        for path in targets {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|source| CgroupError::Open {
                    path: path.clone(),
                    source,
                })?;
            files.push((path, f));
        }
        Ok(JoinFiles { files })
    }

    pub fn update(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        self.warn_ignored(Some(resources));
        dispatch!(self, m => m.update(resources))
    }

    pub fn freeze(&self) -> Result<(), CgroupError> {
        dispatch!(self, m => m.freeze())
    }

    pub fn thaw(&self) -> Result<(), CgroupError> {
        dispatch!(self, m => m.thaw())
    }

    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        dispatch!(self, m => m.pids())
    }

    /// OOM kills (v1 memory.oom_control, v2 memory.events) and forks
    /// refused at the pids limit (`max` of pids.events); 0 for what cannot
    /// be read.
    pub fn limit_events(&self) -> moat_core::stats::LimitEvents {
        let (oom, pids) = match self {
            CgroupManager::V1(m) => (
                m.dir("memory").map(|d| d.join("memory.oom_control")),
                m.dir("pids").map(|d| d.join("pids.events")),
            ),
            CgroupManager::V2(m) => (
                Some(m.path().join("memory.events")),
                Some(m.path().join("pids.events")),
            ),
        };
        let counter = |path: Option<std::path::PathBuf>, key: &str| -> u64 {
            path.and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|t| {
                    t.lines().find_map(|l| {
                        let (k, v) = l.split_once(' ')?;
                        (k == key).then(|| v.trim().parse().ok()).flatten()
                    })
                })
                .unwrap_or(0)
        };
        moat_core::stats::LimitEvents {
            oom_kills: counter(oom, "oom_kill"),
            pids_limit_hits: counter(pids, "max"),
        }
    }

    pub fn stats(&self) -> Result<Stats, CgroupError> {
        dispatch!(self, m => m.stats())
    }

    pub fn destroy(&self) -> Result<(), CgroupError> {
        dispatch!(self, m => m.destroy())
    }

    pub fn mount_sources(&self) -> Vec<(String, PathBuf)> {
        dispatch!(self, m => m.mount_sources())
    }

    /// The memory limit of the cgroup's parent, in bytes, if it has one
    /// (a Kubernetes pod's cgroup, whose limit is the sum of its
    /// containers' and the pod's overhead). `None` when unlimited or
    /// unreadable.
    pub fn parent_memory_limit(&self) -> Option<u64> {
        let (dir, file) = match self {
            CgroupManager::V1(m) => (m.dir("memory")?, "memory.limit_in_bytes"),
            CgroupManager::V2(m) => (m.path(), "memory.max"),
        };
        let text = std::fs::read_to_string(dir.parent()?.join(file)).ok()?;
        // cgroup v1 writes "no limit" as the largest page-aligned i64.
        text.trim()
            .parse::<u64>()
            .ok()
            .filter(|l| *l < i64::MAX as u64 / 2)
    }

    pub fn is_v2(&self) -> bool {
        matches!(self, Self::V2(_))
    }

    /// Settings in `resources` this manager will not apply (for warnings).
    pub fn ignored_settings(&self, resources: &LinuxResources) -> Vec<String> {
        let mut notes = ignored_settings(resources, self.is_v2());
        let tcp = resources.memory().as_ref().and_then(|m| m.kernel_tcp());
        if let (Some(_), CgroupManager::V1(m)) = (tcp, self) {
            if !m.has_file("memory", translate::KERNEL_TCP_V1) {
                notes.push(format!(
                    "memory.kernelTCP is ignored: this kernel has no {}",
                    translate::KERNEL_TCP_V1
                ));
            }
        }
        if self.rootless() && resources.devices().as_ref().is_some_and(|d| !d.is_empty()) {
            notes.push("device rules are not applied to a rootless container's cgroup".into());
        }
        notes
    }

    fn rootless(&self) -> bool {
        dispatch!(self, m => m.rootless)
    }
}

// ---- file helpers shared by v1 and v2 ----

pub(crate) fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })
}

/// Contents, or None when the file does not exist.
pub(crate) fn read_opt(path: &Path) -> Result<Option<String>, CgroupError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CgroupError::Read {
            path: path.into(),
            source,
        }),
    }
}

/// Open cgroup files a single-threaded process writes "0" to in order to
/// join the container's cgroup. On v1 these are `tasks` files: moving only
/// the calling thread lets the kernel skip the global threadgroup lock,
/// whose RCU grace period makes the first `cgroup.procs` write of a process
/// cost ~10 ms; on v2 (and the hybrid v2 tree) they are `cgroup.procs`.
#[derive(Debug)]
pub struct JoinFiles {
    files: Vec<(PathBuf, std::fs::File)>,
}

impl JoinFiles {
    /// Moves the calling (single-threaded) process into every hierarchy.
    pub fn join_self(&self) -> Result<(), CgroupError> {
        use std::io::Write as _;
        for (path, f) in &self.files {
            (&*f).write_all(b"0").map_err(|source| CgroupError::Write {
                path: path.clone(),
                value: "0".into(),
                source,
            })?;
        }
        Ok(())
    }

    /// The open files, for a process that joins through them (sent to it
    /// over a socket): each takes one write of "0".
    pub fn fds(&self) -> impl Iterator<Item = std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd as _;
        self.files.iter().map(|(_, f)| f.as_fd())
    }
}

/// Writes `value` to an existing cgroup file in one write(2), as the kernel
/// parses each write separately.
pub(crate) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    use std::io::Write as _;
    let err = |source| CgroupError::Write {
        path: path.into(),
        value: value.into(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(err)?;
    f.write_all(value.as_bytes()).map_err(err)
}

/// Applies one planned setting in `dir`, honouring `alt` and `optional`.
pub(crate) fn apply_setting(dir: &Path, s: &translate::Setting) -> Result<(), CgroupError> {
    let primary = dir.join(&s.file);
    if !primary.exists() {
        if let Some((file, value)) = &s.alt {
            let alt = dir.join(file);
            if alt.exists() {
                return write(&alt, value);
            }
        }
        if s.optional {
            return Ok(());
        }
    }
    write(&primary, &s.value)
}

/// PIDs in `dir`'s cgroup.procs and in all its descendants.
pub(crate) fn procs_recursive(dir: &Path) -> Result<Vec<i32>, CgroupError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Some(text) = read_opt(&d.join("cgroup.procs"))? else {
            continue;
        };
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        for sub in subdirs(&d)? {
            stack.push(sub);
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CgroupError::Read {
                path: dir.into(),
                source,
            })
        }
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|source| CgroupError::Read {
            path: dir.into(),
            source,
        })?;
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.push(e.path());
        }
    }
    Ok(out)
}

/// SIGKILLs everything in `dirs` (recursively) until they are empty, for up
/// to ~2 s. `after_signal` runs after each round (v1 thaws the freezer so
/// frozen tasks can die).
pub(crate) fn kill_all(
    dirs: &[&Path],
    after_signal: &dyn Fn() -> Result<(), CgroupError>,
) -> Result<(), CgroupError> {
    use nix::sys::signal::{kill, Signal};
    let deadline = Instant::now() + Duration::from_secs(2);
    // Dying tasks leave within microseconds to a few ms: poll from 0.5 ms up.
    let mut nap = Duration::from_micros(500);
    loop {
        let mut pids = Vec::new();
        for d in dirs {
            pids.extend(procs_recursive(d)?);
        }
        if pids.is_empty() {
            return Ok(());
        }
        for &pid in &pids {
            match kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL) {
                Ok(()) | Err(nix::Error::ESRCH) => {}
                Err(source) => return Err(CgroupError::Kill { pid, source }),
            }
        }
        after_signal()?;
        if Instant::now() >= deadline {
            let path = dirs.first().map(|d| d.to_path_buf()).unwrap_or_default();
            return Err(CgroupError::StillPopulated { path });
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    }
}

/// rmdir `dir` and its sub-cgroups, deepest first, retrying EBUSY (a dying
/// task can hold a cgroup for a moment). Missing directories are fine.
pub(crate) fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    let mut order = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        stack.extend(subdirs(&d)?);
        order.push(d);
    }
    for d in order.iter().rev() {
        let mut tries = 0;
        let mut nap = Duration::from_micros(500);
        loop {
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(CgroupError::Rmdir {
                        path: d.clone(),
                        source,
                    })
                }
            }
        }
    }
    Ok(())
}

/// Whether a mkdir failure means "not delegated to us".
pub(crate) fn is_permission(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS)
    )
}

/// Polls `done` for up to ~2 s.
pub(crate) fn wait_until(
    mut done: impl FnMut() -> Result<bool, CgroupError>,
) -> Result<bool, CgroupError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut delay = Duration::from_millis(1);
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

/// Paths stored in state must round-trip through JSON strings.
pub(crate) fn utf8(path: PathBuf) -> Result<PathBuf, CgroupError> {
    if path.to_str().is_none() {
        return Err(CgroupError::InvalidPath {
            path,
            reason: "not UTF-8",
        });
    }
    Ok(path)
}

#[cfg(test)]
mod tests;
