//! The container's filesystem: mounts, devices, pivot_root, masked and read-only paths.
//!
//! CONTRACT (called in the container's init process, already in its new mount and
//! user namespaces and with full capabilities there):
//! ```ignore
//! pub struct RootfsConfig<'a> { pub spec: &'a Spec, pub rootfs: &'a Path /*absolute host path*/,
//!     pub bundle: &'a Path, pub cgroup_mounts: &'a [(String, PathBuf)], pub no_pivot: bool,
//!     pub in_user_ns: bool /* devices are bind-mounted from the host, not mknod'ed */ }
//! /// Propagation, bind rootfs on itself, every spec mount (targets resolved inside the
//! /// rootfs with openat2 RESOLVE_IN_ROOT, never by joining strings), default devices and
//! /// spec devices, /dev symlinks, /dev/ptmx, /dev/pts. Runs before createRuntime hooks.
//! pub fn prepare(cfg: &RootfsConfig) -> Result<(), RootfsError>;
//! /// pivot_root (or MS_MOVE + chroot with no_pivot), detach the old root, chdir("/").
//! pub fn pivot(cfg: &RootfsConfig) -> Result<(), RootfsError>;
//! /// After pivot: masked paths, read-only paths, read-only root, rootfsPropagation.
//! pub fn finish(cfg: &RootfsConfig) -> Result<(), RootfsError>;
//! /// Write `value` to /proc/sys/<key with dots as slashes>, checking the open fd is on procfs.
//! pub fn write_sysctl(key: &str, value: &str) -> Result<(), RootfsError>;
//! ```

mod cgroupfs;
pub mod devices;
mod mount;
pub mod options;
mod paths;
mod pivot;
pub mod resolve;
mod sysctl;

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use moat_core::spec::Spec;
use nix::mount::MsFlags;
use rustix::fs::{Mode, OFlags};

/// What the filesystem setup needs to know.
#[derive(Debug, Clone, Copy)]
pub struct RootfsConfig<'a> {
    pub spec: &'a Spec,
    /// The rootfs as an absolute host path.
    pub rootfs: &'a Path,
    /// The bundle; relative bind sources are relative to it.
    pub bundle: &'a Path,
    /// The container's cgroup directories on the host, by hierarchy: the
    /// name is the directory under /sys/fs/cgroup ("memory", "cpu,cpuacct",
    /// "systemd", "unified"). For cgroup v2, one entry with an empty name.
    /// Without a cgroup namespace they are bind-mounted under the spec's
    /// cgroup mount; with one, only the names are used.
    pub cgroup_mounts: &'a [(String, PathBuf)],
    /// MS_MOVE + chroot instead of pivot_root.
    pub no_pivot: bool,
    /// In a user namespace: devices are bind-mounted from the host, and
    /// sysfs/mqueue fall back to binds of the host's when the kernel refuses.
    pub in_user_ns: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("invalid rootfsPropagation {value:?}")]
    InvalidPropagation { value: String },
    #[error("set mount propagation of {path}")]
    Propagation {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("read /proc/self/mountinfo")]
    MountInfo {
        #[source]
        source: io::Error,
    },
    #[error("bind-mount the rootfs {path} onto itself")]
    BindRootfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("open the rootfs {path}")]
    OpenRootfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("resolve {path} inside the rootfs")]
    Resolve {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("create {path} inside the rootfs")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("open mount source {path}")]
    OpenSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bind mount on {dest} has no source")]
    NoSource { dest: PathBuf },
    #[error("{what} on {dest}")]
    Mount {
        what: String,
        dest: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("remount {dest} with its options")]
    Remount {
        dest: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("set recursive mount attributes on {dest}")]
    SetAttr {
        dest: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("idmapped mount on {dest}: {step}")]
    Idmap {
        dest: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("copy the contents of {dest} into its tmpfs (tmpcopyup)")]
    CopyUp {
        dest: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount on {dest}: {what} is not supported")]
    Unsupported { dest: PathBuf, what: &'static str },
    #[error("mount on {dest} refused: only procfs on /proc, and only lxcfs-style files inside it")]
    ProcDestination { dest: PathBuf },
    #[error("mount destination {dest} must be a directory (not a symlink)")]
    NotADirectory { dest: PathBuf },
    #[error("invalid cgroup hierarchy name {name:?}")]
    InvalidCgroupName { name: String },
    #[error("invalid device {path}: {reason}")]
    InvalidDevice { path: PathBuf, reason: &'static str },
    #[error("{step} device {path}")]
    Device {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("create symlink {path}")]
    Symlink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("switch root to {path}: {step}")]
    Pivot {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mask {path}")]
    Mask {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the container's /dev/null is not the null device")]
    NotDevNull,
    #[error("make {path} read-only")]
    Readonly {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not on procfs")]
    NotProcfs { path: PathBuf },
    #[error("invalid sysctl key {key:?}")]
    InvalidSysctl { key: String },
    #[error("write sysctl {key}")]
    Sysctl {
        key: String,
        #[source]
        source: io::Error,
    },
}

/// mount(2) onto the mount target `target` (via its /proc/self/fd link).
fn mount_at(
    source: Option<&str>,
    target: BorrowedFd<'_>,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    let target = resolve::fd_path(target);
    let data = data.filter(|d| !d.is_empty());
    nix::mount::mount(source, target.as_str(), fstype, flags, data).map_err(io::Error::from)
}

/// mount(2) from one fd onto another (binds, propagation, remounts).
fn mount_fd(
    source: Option<BorrowedFd<'_>>,
    target: BorrowedFd<'_>,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(resolve::fd_path);
    mount_at(source.as_deref(), target, fstype, flags, data)
}

fn rootfs_propagation(spec: &Spec) -> Result<Option<MsFlags>, RootfsError> {
    let Some(value) = spec
        .linux()
        .as_ref()
        .and_then(|l| l.rootfs_propagation().as_deref())
    else {
        return Ok(None);
    };
    if value.is_empty() {
        return Ok(None);
    }
    options::propagation_flags(value)
        .map(Some)
        .ok_or_else(|| RootfsError::InvalidPropagation {
            value: value.to_owned(),
        })
}

fn set_propagation(path: &str, flags: MsFlags) -> Result<(), RootfsError> {
    nix::mount::mount(None::<&str>, path, None::<&str>, flags, None::<&str>).map_err(|e| {
        RootfsError::Propagation {
            path: PathBuf::from(path),
            source: e.into(),
        }
    })
}

fn open_root(path: &Path) -> Result<OwnedFd, RootfsError> {
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| RootfsError::OpenRootfs {
        path: path.to_owned(),
        source: e.into(),
    })
}

/// Whether moat sets up /dev itself (not when the spec bind-mounts a /dev).
fn sets_up_dev(spec: &Spec) -> bool {
    !spec.mounts().iter().flatten().any(|m| {
        let e = mount::Entry::new(m);
        e.dest == Path::new("/dev") && (e.fstype == "bind" || e.opts.is_bind())
    })
}

fn has_devpts(spec: &Spec) -> bool {
    spec.mounts().iter().flatten().any(|m| {
        m.typ().as_deref() == Some("devpts")
            && resolve::clean(m.destination()) == Path::new("/dev/pts")
    })
}

/// Propagation, bind rootfs on itself, every spec mount (targets resolved
/// inside the rootfs with openat2 RESOLVE_IN_ROOT, never by joining strings),
/// default devices and spec devices, /dev symlinks, /dev/ptmx, /dev/pts.
/// Runs before createRuntime hooks.
pub fn prepare(cfg: &RootfsConfig) -> Result<(), RootfsError> {
    let propagation = rootfs_propagation(cfg.spec)?.unwrap_or(MsFlags::MS_SLAVE | MsFlags::MS_REC);
    set_propagation("/", propagation)?;
    pivot::make_parent_private(cfg.rootfs)?;
    nix::mount::mount(
        Some(cfg.rootfs),
        cfg.rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| RootfsError::BindRootfs {
        path: cfg.rootfs.to_owned(),
        source: e.into(),
    })?;
    // Opened after the bind, so paths resolve through the new mount.
    let root = open_root(cfg.rootfs)?;
    let with_kcore = Path::new("/proc/kcore").exists();
    for m in cfg.spec.mounts().iter().flatten() {
        mount::mount_entry(root.as_fd(), cfg, m)?;
    }
    if sets_up_dev(cfg.spec) {
        let spec_devices = cfg
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.devices().as_deref())
            .unwrap_or(&[]);
        devices::create_all(root.as_fd(), &devices::merge(spec_devices)?, cfg.in_user_ns)?;
        devices::create_symlinks(root.as_fd(), with_kcore)?;
        if has_devpts(cfg.spec) {
            devices::setup_ptmx(root.as_fd())?;
        }
    }
    Ok(())
}

/// pivot_root (or MS_MOVE + chroot with no_pivot), detach the old root,
/// chdir("/").
pub fn pivot(cfg: &RootfsConfig) -> Result<(), RootfsError> {
    if cfg.no_pivot {
        pivot::move_root(cfg.rootfs)
    } else {
        pivot::pivot_root(cfg.rootfs)
    }
}

fn unique_cleaned(paths: Option<&Vec<String>>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for p in paths.into_iter().flatten() {
        let p = resolve::clean(Path::new(p));
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// After pivot: masked paths, read-only paths, read-only root,
/// rootfsPropagation.
pub fn finish(cfg: &RootfsConfig) -> Result<(), RootfsError> {
    let root = open_root(Path::new("/"))?;
    let linux = cfg.spec.linux().as_ref();
    for p in unique_cleaned(linux.and_then(|l| l.masked_paths().as_ref())) {
        paths::mask(root.as_fd(), &p)?;
    }
    for p in unique_cleaned(linux.and_then(|l| l.readonly_paths().as_ref())) {
        paths::make_readonly(root.as_fd(), &p)?;
    }
    if cfg
        .spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        // Masks and read-only paths mount below "/", never on it, so `root`
        // is still the root mount's root.
        paths::readonly_root(root.as_fd())?;
    }
    if let Some(flags) = rootfs_propagation(cfg.spec)? {
        set_propagation("/", flags)?;
    }
    Ok(())
}

/// Write `value` to /proc/sys/<key with dots as slashes>, checking the open
/// fd is on procfs.
pub fn write_sysctl(key: &str, value: &str) -> Result<(), RootfsError> {
    sysctl::write(key, value)
}

#[cfg(test)]
mod tests;
