//! The container's filesystem: mounts, devices, pivot_root, masked and read-only paths.
//!
//! The container's init calls, in this order:
//! ```ignore
//! /// Before it takes its IDs in its user namespace (it still has the
//! /// runtime's credentials): opens the rootfs and the bind mounts' sources,
//! /// so that neither the container's host IDs nor anyone else need to be able
//! /// to traverse the (possibly private) directories above them.
//! pub fn HostPaths::open(spec, rootfs, bundle) -> Result<HostPaths, RootfsError>;
//! /// Propagation, bind rootfs on itself, every spec mount (targets resolved inside the
//! /// rootfs with openat2 RESOLVE_IN_ROOT, never by joining strings), default devices and
//! /// spec devices, /dev symlinks, /dev/ptmx, /dev/pts. Runs before createRuntime hooks.
//! pub fn prepare(cfg: &RootfsConfig, host: &HostPaths) -> Result<Root, RootfsError>;
//! /// pivot_root (or MS_MOVE + chroot with no_pivot), detach the old root, chdir("/").
//! pub fn pivot(cfg: &RootfsConfig, root: &Root) -> Result<(), RootfsError>;
//! /// After pivot: masked paths, read-only paths, read-only root, rootfsPropagation.
//! pub fn finish(cfg: &RootfsConfig) -> Result<(), RootfsError>;
//! /// Write `value` to /proc/sys/<key with dots as slashes>, checking the open fd is on procfs.
//! pub fn write_sysctl(key: &str, value: &str) -> Result<(), RootfsError>;
//! ```
//!
//! Without a mount namespace of its own (`own_mount_ns` false) the container
//! shares the runtime's mounts: nothing is mounted (it would change the
//! host's mounts), and the root is only changed with `chroot` into the
//! rootfs; the runtime warns when it loads such a config.

mod cgroupfs;
pub mod devices;
mod mount;
pub mod options;
pub use mount::remount_bind;
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
    /// The container has a mount namespace of its own (new or joined); without
    /// one nothing is mounted and the root is changed with `chroot`.
    pub own_mount_ns: bool,
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

/// Host paths the setup needs, opened by the container's process while it
/// still has the runtime's credentials (before it takes its IDs in its user
/// namespace), in its own mount namespace: the rootfs, the mount holding it
/// (when its propagation may need changing), and the sources of the spec's
/// bind mounts. The setup then works from these descriptors, so a rootfs,
/// bundle or volume under a private (0700) directory of root or of the
/// rootless user works although the container's host IDs cannot traverse
/// that directory.
#[derive(Debug)]
pub struct HostPaths {
    rootfs: OwnedFd,
    /// The mount point holding the rootfs (`pivot_root` refuses a shared one).
    parent: Option<(PathBuf, OwnedFd)>,
    /// By index into the spec's mounts: the bind source, or why it could not
    /// be opened (reported when that mount is made).
    binds: Vec<Option<io::Result<OwnedFd>>>,
}

impl HostPaths {
    pub fn open(spec: &Spec, rootfs: &Path, bundle: &Path) -> Result<HostPaths, RootfsError> {
        let rootfs_fd = open_root(rootfs)?;
        let parent = if needs_private_parent(spec)? {
            parent_mount_of(rootfs)?
        } else {
            None
        };
        let binds = spec
            .mounts()
            .iter()
            .flatten()
            .map(|m| {
                let e = mount::Entry::new(m);
                let src = e.source.filter(|_| mount::is_bind_entry(&e))?;
                let src = if src.is_absolute() {
                    src.to_owned()
                } else {
                    bundle.join(src)
                };
                Some(
                    rustix::fs::open(&src, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())
                        .map_err(io::Error::from),
                )
            })
            .collect();
        Ok(HostPaths {
            rootfs: rootfs_fd,
            parent,
            binds,
        })
    }

    /// The opened source of spec mount `index`, when it is a bind.
    pub(crate) fn bind_source(&self, index: usize) -> Option<&io::Result<OwnedFd>> {
        self.binds.get(index).and_then(Option::as_ref)
    }
}

/// Whether "/" may still be shared after the propagation `prepare` sets
/// first: only a recursive slave or private one makes every mount unshared.
fn needs_private_parent(spec: &Spec) -> Result<bool, RootfsError> {
    let p = initial_propagation(spec)?;
    Ok(!(p.contains(MsFlags::MS_REC) && p.intersects(MsFlags::MS_SLAVE | MsFlags::MS_PRIVATE)))
}

/// The mount point holding `rootfs`, opened (the mount's root).
fn parent_mount_of(rootfs: &Path) -> Result<Option<(PathBuf, OwnedFd)>, RootfsError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|source| RootfsError::MountInfo { source })?;
    let real = std::fs::canonicalize(rootfs).map_err(|source| RootfsError::OpenRootfs {
        path: rootfs.to_owned(),
        source,
    })?;
    let Some((mp, _)) = pivot::parent_mount(&info, &real) else {
        return Ok(None);
    };
    let fd = rustix::fs::open(
        &mp,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| RootfsError::Propagation {
        path: mp.clone(),
        source: e.into(),
    })?;
    Ok(Some((mp, fd)))
}

/// The propagation of "/" while the root is set up: the spec's
/// rootfsPropagation, except that an unbindable one is applied only at the
/// end ([`finish`]), since the rootfs cannot be bind-mounted from an
/// unbindable mount; the default is recursive slave.
fn initial_propagation(spec: &Spec) -> Result<MsFlags, RootfsError> {
    let default = MsFlags::MS_SLAVE | MsFlags::MS_REC;
    Ok(match rootfs_propagation(spec)? {
        Some(f) if !f.contains(MsFlags::MS_UNBINDABLE) => f,
        _ => default,
    })
}

/// The container's root: the rootfs bind-mounted on itself (a mount of the
/// container's namespace), or without a mount namespace the rootfs itself.
#[derive(Debug)]
pub struct Root(OwnedFd);

impl Root {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Propagation, bind rootfs on itself, every spec mount (targets resolved
/// inside the rootfs with openat2 RESOLVE_IN_ROOT, never by joining strings),
/// default devices and spec devices, /dev symlinks, /dev/ptmx, /dev/pts.
/// Runs before createRuntime hooks. Without a mount namespace of its own,
/// nothing (the root is only changed by [`pivot`]).
pub fn prepare(cfg: &RootfsConfig, host: &HostPaths) -> Result<Root, RootfsError> {
    if !cfg.own_mount_ns {
        let fd = rustix::io::fcntl_dupfd_cloexec(&host.rootfs, 0).map_err(|e| {
            RootfsError::OpenRootfs {
                path: cfg.rootfs.to_owned(),
                source: e.into(),
            }
        })?;
        return Ok(Root(fd));
    }
    set_propagation("/", initial_propagation(cfg.spec)?)?;
    if let Some((path, fd)) = &host.parent {
        make_private_if_shared(path, fd.as_fd())?;
    }
    let root = bind_rootfs(cfg.rootfs, host.rootfs.as_fd())?;
    let with_kcore = Path::new("/proc/kcore").exists();
    for (i, m) in cfg.spec.mounts().iter().flatten().enumerate() {
        mount::mount_entry(root.as_fd(), cfg, m, host.bind_source(i))?;
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
    Ok(Root(root))
}

/// A recursive clone of the rootfs tree attached onto the rootfs itself
/// (`open_tree` + `move_mount`, by descriptor): a mount point for
/// `pivot_root`. Returns the new mount's root.
fn bind_rootfs(path: &Path, rootfs: BorrowedFd<'_>) -> Result<OwnedFd, RootfsError> {
    use rustix::mount::{MoveMountFlags, OpenTreeFlags};
    let err = |e: rustix::io::Errno| RootfsError::BindRootfs {
        path: path.to_owned(),
        source: e.into(),
    };
    let tree = rustix::mount::open_tree(
        rootfs,
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_RECURSIVE
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(err)?;
    rustix::mount::move_mount(
        tree.as_fd(),
        "",
        rootfs,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(err)?;
    Ok(tree)
}

/// pivot_root refuses a new root whose parent mount is shared: if the mount
/// holding the rootfs (`fd`, its root) is shared, make it private (in our
/// namespace only).
fn make_private_if_shared(path: &Path, fd: BorrowedFd<'_>) -> Result<(), RootfsError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|source| RootfsError::MountInfo { source })?;
    let shared = info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.get(4).map(|m| crate::mountinfo::unescape(m)).as_deref() == Some(&*path.to_string_lossy())
            && f.iter()
                .skip(6)
                .take_while(|x| **x != "-")
                .any(|x| x.starts_with("shared:"))
    });
    if !shared {
        return Ok(());
    }
    mount_fd(None, fd, None, MsFlags::MS_PRIVATE, None).map_err(|source| RootfsError::Propagation {
        path: path.to_owned(),
        source,
    })
}

/// pivot_root (or MS_MOVE + chroot with no_pivot), detach the old root,
/// chdir("/"). Without a mount namespace of its own: chroot only.
pub fn pivot(cfg: &RootfsConfig, root: &Root) -> Result<(), RootfsError> {
    if !cfg.own_mount_ns {
        pivot::chroot_only(cfg.rootfs, root.fd())
    } else if cfg.no_pivot {
        pivot::move_root(cfg.rootfs, root.fd())
    } else {
        pivot::pivot_root(cfg.rootfs, root.fd())
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
    if !cfg.own_mount_ns {
        return Ok(());
    }
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
