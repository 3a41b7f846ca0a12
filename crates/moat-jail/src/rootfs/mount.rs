//! The spec's mounts, one at a time, onto targets resolved inside the root.
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use oci_spec::runtime::{LinuxIdMapping, Mount};
use rustix::fs::{FileType, Mode, OFlags};

use super::options::{self, Idmap, MountOptions, ATIME_FLAGS};
use super::resolve::{self, Kind};
use super::{cgroupfs, mount_at, mount_fd, RootfsConfig, RootfsError};

/// Entries below /proc that may be mounted over (what lxcfs emulates).
const PROC_OVERRIDES: &[&str] = &[
    "/proc/cpuinfo",
    "/proc/diskstats",
    "/proc/meminfo",
    "/proc/stat",
    "/proc/swaps",
    "/proc/uptime",
    "/proc/loadavg",
    "/proc/slabinfo",
    "/proc/sys/kernel/ns_last_pid",
    "/proc/sys/crypto/fips_enabled",
];

/// One spec mount, as the steps below need it.
pub struct Entry<'a> {
    pub dest: PathBuf,
    pub fstype: &'a str,
    pub source: Option<&'a Path>,
    pub opts: MountOptions,
    pub uid_mappings: Option<&'a [LinuxIdMapping]>,
    pub gid_mappings: Option<&'a [LinuxIdMapping]>,
}

impl<'a> Entry<'a> {
    pub fn new(m: &'a Mount) -> Self {
        let opts = options::parse(m.options().as_deref().unwrap_or(&[]));
        let fstype = m
            .typ()
            .as_deref()
            .unwrap_or(if opts.is_bind() { "bind" } else { "none" });
        Entry {
            dest: resolve::clean(m.destination()),
            fstype,
            source: m.source().as_deref(),
            opts,
            uid_mappings: m.uid_mappings().as_deref(),
            gid_mappings: m.gid_mappings().as_deref(),
        }
    }

    fn is_bind(&self) -> bool {
        is_bind_entry(self)
    }

    fn err(&self, what: impl Into<String>) -> impl FnOnce(io::Error) -> RootfsError + '_ {
        let what = what.into();
        move |source| RootfsError::Mount {
            what,
            dest: self.dest.clone(),
            source,
        }
    }
}

/// Whether the entry is a bind mount (its source is a host path).
pub fn is_bind_entry(e: &Entry) -> bool {
    e.fstype == "bind" || e.fstype == "rbind" || e.opts.is_bind()
}

/// Mounts one spec entry inside the root; `source`: a bind's source, opened
/// beforehand ([`super::HostPaths`]).
pub fn mount_entry(
    root: BorrowedFd<'_>,
    cfg: &RootfsConfig,
    m: &Mount,
    source: Option<&io::Result<OwnedFd>>,
) -> Result<(), RootfsError> {
    let mut e = Entry::new(m);
    if e.opts.tmpcopyup && e.fstype != "tmpfs" {
        return Err(RootfsError::Unsupported {
            dest: e.dest.clone(),
            what: "tmpcopyup on a mount that is not tmpfs",
        });
    }
    if e.fstype == "rbind" {
        e.opts.flags |= MsFlags::MS_BIND | MsFlags::MS_REC;
    } else if e.fstype == "bind" {
        e.opts.flags |= MsFlags::MS_BIND;
    }
    check_proc_destination(&e)?;
    if e.is_bind() {
        return bind(root, cfg, &e, source);
    }
    if e.opts.idmap.is_some() {
        return Err(RootfsError::Unsupported {
            dest: e.dest.clone(),
            what: "idmap on a mount that is not a bind mount",
        });
    }
    match e.fstype {
        "cgroup" | "cgroup2" => cgroupfs::mount(root, cfg, &e),
        "sysfs" => fallback_to_bind(root, cfg, &e, "/sys"),
        "mqueue" => fallback_to_bind(root, cfg, &e, "/dev/mqueue"),
        _ => filesystem(root, &e),
    }
}

/// Refuses mounts that would hide or replace parts of procfs, which the
/// masked paths rely on (CVE-2019-16884/19921 family).
fn check_proc_destination(e: &Entry) -> Result<(), RootfsError> {
    let Ok(rest) = e.dest.strip_prefix("/proc") else {
        return Ok(());
    };
    let allowed = if rest.as_os_str().is_empty() {
        // Only procfs itself; a bind is checked on its source in `bind`.
        e.fstype == "proc" || e.is_bind()
    } else {
        PROC_OVERRIDES.iter().any(|p| Path::new(p) == e.dest)
    };
    if allowed {
        Ok(())
    } else {
        Err(RootfsError::ProcDestination {
            dest: e.dest.clone(),
        })
    }
}

/// A filesystem mount (tmpfs, proc, devpts, ...) with flags and data.
pub fn filesystem(root: BorrowedFd<'_>, e: &Entry) -> Result<(), RootfsError> {
    let strict = matches!(e.fstype, "proc" | "sysfs");
    let target = target_for(root, e, Kind::Dir, strict)?;
    let source = e
        .source
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| e.fstype.to_owned());
    let data = e.opts.data_string();
    let flags = e.opts.flags & !MsFlags::MS_REMOUNT;
    // tmpcopyup: keep a handle on the directory the tmpfs will hide.
    let below = if e.opts.tmpcopyup {
        let dir = std::fs::File::open(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&target)
        ))
        .map_err(|source| RootfsError::CopyUp {
            dest: e.dest.clone(),
            source,
        })?;
        Some(dir)
    } else {
        None
    };
    mount_at(
        Some(&source),
        target.as_fd(),
        Some(e.fstype),
        flags,
        Some(&data),
    )
    .map_err(e.err(format!("mount {}", e.fstype)))?;
    if let Some(below) = below {
        let top = resolve::open(root, &e.dest, true).map_err(|source| RootfsError::CopyUp {
            dest: e.dest.clone(),
            source,
        })?;
        copy_up(&below, &top).map_err(|source| RootfsError::CopyUp {
            dest: e.dest.clone(),
            source,
        })?;
    }
    after_mount(root, e, false)
}

/// Copies a directory tree (files, directories, symlinks; modes and owners)
/// from the hidden directory `below` into the fresh tmpfs `top`. Symlinks
/// are copied as links, never followed; device nodes, fifos and sockets are
/// skipped.
fn copy_up(below: &std::fs::File, top: &OwnedFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let src = PathBuf::from(format!("/proc/self/fd/{}", below.as_raw_fd()));
    let dst = PathBuf::from(format!("/proc/self/fd/{}", top.as_raw_fd()));
    let m = below.metadata()?;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
    std::os::unix::fs::chown(&dst, Some(m.uid()), Some(m.gid()))?;
    copy_tree(&src, &dst)
}

fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let m = std::fs::symlink_metadata(&from)?;
        let ft = m.file_type();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
            std::os::unix::fs::lchown(&to, Some(m.uid()), Some(m.gid()))?;
            continue;
        }
        if ft.is_dir() {
            std::fs::create_dir(&to)?;
            copy_tree(&from, &to)?;
        } else if ft.is_file() {
            std::fs::copy(&from, &to)?;
        } else {
            continue;
        }
        std::os::unix::fs::chown(&to, Some(m.uid()), Some(m.gid()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    Ok(())
}

/// Opens (creating if needed) the mount target. For proc and sysfs the last
/// component must be a real directory, not a symlink to follow.
fn target_for(
    root: BorrowedFd<'_>,
    e: &Entry,
    kind: Kind,
    strict: bool,
) -> Result<OwnedFd, RootfsError> {
    let fd = resolve::open_or_create(root, &e.dest, kind, strict).map_err(|source| {
        RootfsError::Create {
            path: e.dest.clone(),
            source,
        }
    })?;
    if strict {
        let st = rustix::fs::fstat(&fd).map_err(|err| RootfsError::Create {
            path: e.dest.clone(),
            source: err.into(),
        })?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(RootfsError::NotADirectory {
                dest: e.dest.clone(),
            });
        }
    }
    Ok(fd)
}

/// sysfs or mqueue, or in a user namespace that may not mount them (no own
/// network / IPC namespace), a recursive bind of the host's, as runc does.
fn fallback_to_bind(
    root: BorrowedFd<'_>,
    cfg: &RootfsConfig,
    e: &Entry,
    host: &'static str,
) -> Result<(), RootfsError> {
    match filesystem(root, e) {
        Err(RootfsError::Mount { source, .. })
            if cfg.in_user_ns
                && matches!(source.raw_os_error(), Some(libc::EPERM) | Some(libc::EBUSY)) =>
        {
            let mut opts = e.opts.clone();
            opts.flags |= MsFlags::MS_BIND | MsFlags::MS_REC;
            opts.data.clear();
            if opts.flags.contains(MsFlags::MS_RDONLY) {
                // Read-only all the way down, not just the top mount.
                opts.rec_set |= libc::MOUNT_ATTR_RDONLY;
            }
            let b = Entry {
                dest: e.dest.clone(),
                fstype: "bind",
                source: Some(Path::new(host)),
                opts,
                uid_mappings: None,
                gid_mappings: None,
            };
            bind_from(root, &b, Path::new(host))
        }
        r => r,
    }
}

fn bind(
    root: BorrowedFd<'_>,
    cfg: &RootfsConfig,
    e: &Entry,
    opened: Option<&io::Result<OwnedFd>>,
) -> Result<(), RootfsError> {
    let Some(source) = e.source else {
        return Err(RootfsError::NoSource {
            dest: e.dest.clone(),
        });
    };
    let source = if source.is_absolute() {
        source.to_owned()
    } else {
        cfg.bundle.join(source)
    };
    match opened {
        Some(Ok(fd)) => bind_fd(root, e, &source, fd.as_fd()),
        Some(Err(err)) => Err(RootfsError::OpenSource {
            path: source,
            source: io::Error::from_raw_os_error(err.raw_os_error().unwrap_or(libc::EIO)),
        }),
        None => bind_from(root, e, &source),
    }
}

/// Bind-mounts host path `source` (trusted, from the config) onto the entry's
/// destination, then applies flags, propagation and recursive attributes.
pub fn bind_from(root: BorrowedFd<'_>, e: &Entry, source: &Path) -> Result<(), RootfsError> {
    let src =
        rustix::fs::open(source, OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).map_err(|err| {
            RootfsError::OpenSource {
                path: source.to_owned(),
                source: err.into(),
            }
        })?;
    bind_fd(root, e, source, src.as_fd())
}

/// [`bind_from`] with the source already open (`src`; `source` names it).
fn bind_fd(
    root: BorrowedFd<'_>,
    e: &Entry,
    source: &Path,
    src: BorrowedFd<'_>,
) -> Result<(), RootfsError> {
    let st = rustix::fs::fstat(src).map_err(|err| RootfsError::OpenSource {
        path: source.to_owned(),
        source: err.into(),
    })?;
    if e.dest == Path::new("/proc") {
        let fs = rustix::fs::fstatfs(src).map_err(|err| RootfsError::OpenSource {
            path: source.to_owned(),
            source: err.into(),
        })?;
        if fs.f_type != rustix::fs::PROC_SUPER_MAGIC {
            return Err(RootfsError::ProcDestination {
                dest: e.dest.clone(),
            });
        }
    }
    let kind = if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        Kind::Dir
    } else {
        Kind::File
    };
    let target = target_for(root, e, kind, false)?;
    let recursive = e.opts.is_recursive_bind();
    match e.opts.idmap {
        Some(idmap) => idmapped_bind(e, src, target.as_fd(), recursive, idmap)?,
        None => {
            let flags = MsFlags::MS_BIND | (e.opts.flags & MsFlags::MS_REC);
            mount_fd(Some(src), target.as_fd(), None, flags, None)
                .map_err(e.err(format!("bind {}", source.display())))?;
        }
    }
    after_mount(root, e, true)
}

/// open_tree(OPEN_TREE_CLONE) of the source, MOUNT_ATTR_IDMAP with a user
/// namespace holding the mount's mappings (or the caller's own user
/// namespace when the mount has none), then move_mount onto the target.
fn idmapped_bind(
    e: &Entry,
    src: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    recursive: bool,
    idmap: Idmap,
) -> Result<(), RootfsError> {
    use rustix::mount::{MoveMountFlags, OpenTreeFlags};
    let fail = |step: &'static str| {
        move |source: io::Error| RootfsError::Idmap {
            dest: e.dest.clone(),
            step,
            source,
        }
    };
    let userns = match (e.uid_mappings, e.gid_mappings) {
        (Some(u), Some(g)) if !u.is_empty() && !g.is_empty() => {
            moat_sys::mount::userns_with_mappings(&map_text(u), &map_text(g))
                .map_err(fail("create user namespace for"))?
        }
        (None, None) => rustix::fs::open(
            "/proc/self/ns/user",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|err| fail("open own user namespace for")(err.into()))?,
        _ => {
            return Err(RootfsError::Unsupported {
                dest: e.dest.clone(),
                what: "idmap with only one of uidMappings/gidMappings",
            })
        }
    };
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_EMPTY_PATH;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree = rustix::mount::open_tree(src, "", flags)
        .map_err(|err| fail("clone source tree for")(err.into()))?;
    moat_sys::mount::mount_set_idmap(tree.as_fd(), idmap == Idmap::Recursive, userns.as_fd())
        .map_err(fail(
            "set MOUNT_ATTR_IDMAP (kernel or filesystem may not support it) for",
        ))?;
    let mv = MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH;
    rustix::mount::move_mount(tree.as_fd(), "", target, "", mv)
        .map_err(|err| fail("attach")(err.into()))
}

fn map_text(maps: &[LinuxIdMapping]) -> String {
    maps.iter()
        .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
        .collect()
}

/// After the mount exists: remount a bind with its flags, then propagation,
/// then recursive attributes, each on a fresh fd of the new mount's root.
pub fn after_mount(root: BorrowedFd<'_>, e: &Entry, is_bind: bool) -> Result<(), RootfsError> {
    let needs_remount = is_bind
        && !(e.opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT)).is_empty();
    if !needs_remount && e.opts.propagation.is_empty() && !e.opts.has_recursive_attrs() {
        return Ok(());
    }
    // The fd used for the mount refers to the covered directory; reopen so
    // the fd is the new mount's root.
    let fd = resolve::open(root, &e.dest, false).map_err(|source| RootfsError::Resolve {
        path: e.dest.clone(),
        source,
    })?;
    if needs_remount {
        let flags = e.opts.flags & !(MsFlags::MS_REC | MsFlags::MS_REMOUNT | MsFlags::MS_BIND);
        remount_bind(fd.as_fd(), flags, e.opts.cleared).map_err(|source| RootfsError::Remount {
            dest: e.dest.clone(),
            source,
        })?;
    }
    for p in &e.opts.propagation {
        mount_fd(None, fd.as_fd(), None, *p, None).map_err(|source| RootfsError::Propagation {
            path: e.dest.clone(),
            source,
        })?;
    }
    if e.opts.has_recursive_attrs() {
        let attr = moat_sys::mount::MountAttr {
            set: e.opts.rec_set,
            clear: e.opts.rec_clear,
            propagation: 0,
        };
        moat_sys::mount::mount_setattr(fd.as_fd(), true, &attr).map_err(|source| {
            RootfsError::SetAttr {
                dest: e.dest.clone(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Flags a less privileged mount namespace cannot drop from a mount it got
/// from a more privileged one ("locked" flags).
const LOCKABLE: MsFlags = MsFlags::MS_RDONLY
    .union(MsFlags::MS_NOSUID)
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC)
    .union(ATIME_FLAGS);

/// `MS_REMOUNT | MS_BIND | flags` on the mount whose root is `fd`. If the
/// kernel refuses (EPERM: locked flags in a user namespace), retry keeping the
/// mount's current lockable flags, unless the caller explicitly asked to clear
/// one of them or for a different atime mode — then the refusal stands.
pub fn remount_bind(fd: BorrowedFd<'_>, flags: MsFlags, cleared: MsFlags) -> io::Result<()> {
    remount_bind_at(&resolve::fd_path(fd), fd, flags, cleared)
}

/// [`remount_bind`] through a path (`target`) to the mount `fd` is the root
/// of; "/" needs no /proc.
pub fn remount_bind_at(
    target: &str,
    fd: BorrowedFd<'_>,
    flags: MsFlags,
    cleared: MsFlags,
) -> io::Result<()> {
    let base = MsFlags::MS_REMOUNT | MsFlags::MS_BIND;
    let remount = |f: MsFlags| {
        nix::mount::mount(None::<&str>, target, None::<&str>, f, None::<&str>)
            .map_err(io::Error::from)
    };
    match remount(base | flags) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let current = current_flags(fd)?;
            let locked = current & LOCKABLE;
            let mode = |f: MsFlags| f & (MsFlags::MS_NOATIME | MsFlags::MS_RELATIME);
            let asks_atime = flags
                .intersects(MsFlags::MS_NOATIME | MsFlags::MS_RELATIME | MsFlags::MS_STRICTATIME);
            let atime_conflict = asks_atime && mode(flags) != mode(current);
            if !(locked & cleared).is_empty() || atime_conflict {
                return Err(e);
            }
            let keep = if (flags & ATIME_FLAGS).is_empty() {
                locked
            } else {
                locked & !ATIME_FLAGS
            };
            remount(base | flags | keep)
        }
        r => r,
    }
}

/// The mount flags of the mount `fd` is on, as `MS_*` bits.
pub fn current_flags(fd: BorrowedFd<'_>) -> io::Result<MsFlags> {
    use rustix::fs::StatVfsMountFlags as St;
    let st = rustix::fs::fstatvfs(fd)?;
    let table = [
        (St::RDONLY, MsFlags::MS_RDONLY),
        (St::NOSUID, MsFlags::MS_NOSUID),
        (St::NODEV, MsFlags::MS_NODEV),
        (St::NOEXEC, MsFlags::MS_NOEXEC),
        (St::SYNCHRONOUS, MsFlags::MS_SYNCHRONOUS),
        (St::MANDLOCK, MsFlags::MS_MANDLOCK),
        (St::NOATIME, MsFlags::MS_NOATIME),
        (St::NODIRATIME, MsFlags::MS_NODIRATIME),
        (St::RELATIME, MsFlags::MS_RELATIME),
    ];
    Ok(table
        .iter()
        .filter(|(st_bit, _)| st.f_flag.contains(*st_bit))
        .fold(MsFlags::empty(), |acc, (_, ms)| acc | *ms))
}
