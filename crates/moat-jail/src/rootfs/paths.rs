//! After the pivot: masked paths, read-only paths and the read-only root.
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use rustix::fs::FileType;

use super::mount::{current_flags, remount_bind, remount_bind_at};
use super::resolve;
use super::sysctl::check_procfs;
use super::{mount_at, mount_fd, RootfsError};

const KEEP: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Opens a path to protect; `None` when it does not exist. Paths under /proc
/// must really be on procfs, or an image that replaced /proc would leave the
/// real entries exposed (CVE-2019-19921 family).
fn open_target(
    root: BorrowedFd<'_>,
    path: &Path,
) -> Result<Option<std::os::fd::OwnedFd>, RootfsError> {
    let fd = match resolve::open(root, path, false) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(source) => {
            return Err(RootfsError::Resolve {
                path: path.to_owned(),
                source,
            })
        }
    };
    if path.starts_with("/proc") {
        check_procfs(&fd, path)?;
    }
    Ok(Some(fd))
}

/// Hides `path`: an empty read-only tmpfs over a directory, /dev/null over
/// anything else. A missing path is nothing to hide.
pub fn mask(root: BorrowedFd<'_>, path: &Path) -> Result<(), RootfsError> {
    let Some(fd) = open_target(root, path)? else {
        return Ok(());
    };
    let err = |source| RootfsError::Mask {
        path: path.to_owned(),
        source,
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| err(e.into()))?;
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        return mount_at(
            Some("tmpfs"),
            fd.as_fd(),
            Some("tmpfs"),
            MsFlags::MS_RDONLY | KEEP,
            None,
        )
        .map_err(err);
    }
    let null = resolve::open(root, Path::new("/dev/null"), false).map_err(err)?;
    let nst = rustix::fs::fstat(&null).map_err(|e| err(e.into()))?;
    let is_null = FileType::from_raw_mode(nst.st_mode) == FileType::CharacterDevice
        && nst.st_rdev == rustix::fs::makedev(1, 3);
    if !is_null {
        return Err(RootfsError::NotDevNull);
    }
    mount_fd(Some(null.as_fd()), fd.as_fd(), None, MsFlags::MS_BIND, None).map_err(err)
}

/// Makes `path` read-only: bound onto itself, then remounted read-only
/// keeping its nosuid/nodev/noexec, and every submount read-only too.
pub fn make_readonly(root: BorrowedFd<'_>, path: &Path) -> Result<(), RootfsError> {
    let Some(fd) = open_target(root, path)? else {
        return Ok(());
    };
    let err = |source| RootfsError::Readonly {
        path: path.to_owned(),
        source,
    };
    mount_fd(
        Some(fd.as_fd()),
        fd.as_fd(),
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
    .map_err(err)?;
    let top = resolve::open(root, path, false).map_err(err)?;
    remount_readonly(top.as_fd()).map_err(err)
}

/// Remounts the mount whose root is `fd` read-only, recursively.
pub fn remount_readonly(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let keep = current_flags(fd)? & KEEP;
    remount_bind(fd, MsFlags::MS_RDONLY | keep, MsFlags::empty())?;
    let attr = moat_sys::mount::MountAttr {
        set: libc::MOUNT_ATTR_RDONLY,
        ..Default::default()
    };
    match moat_sys::mount::mount_setattr(fd, true, &attr) {
        // Kernels before 5.12: the top mount is read-only, as runc does it.
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => Ok(()),
        r => r,
    }
}

/// The container's "/" read-only (that mount only: volumes and /dev below it
/// keep their own flags).
pub fn readonly_root(root: BorrowedFd<'_>) -> Result<(), RootfsError> {
    let err = |source| RootfsError::Readonly {
        path: PathBuf::from("/"),
        source,
    };
    let keep = current_flags(root).map_err(err)? & KEEP;
    remount_bind_at("/", root, MsFlags::MS_RDONLY | keep, MsFlags::empty()).map_err(err)
}
