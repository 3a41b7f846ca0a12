//! Switching the process's root to the rootfs.
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use rustix::fs::{Mode, OFlags};

use super::RootfsError;

fn err<'a>(
    step: &'static str,
    rootfs: &'a Path,
) -> impl FnOnce(std::io::Error) -> RootfsError + 'a {
    move |source| RootfsError::Pivot {
        step,
        path: rootfs.to_owned(),
        source,
    }
}

fn open_dir(path: &Path, rootfs: &Path) -> Result<std::os::fd::OwnedFd, RootfsError> {
    rustix::fs::open(
        path,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err("open", rootfs)(e.into()))
}

/// pivot_root(".", ".") inside the new root (`new`, the rootfs mount's
/// root): the old root ends up stacked on the new one; made rslave (so the
/// detach cannot propagate to the host) and lazily unmounted, it disappears.
pub fn pivot_root(rootfs: &Path, new: BorrowedFd<'_>) -> Result<(), RootfsError> {
    let old = open_dir(Path::new("/"), rootfs)?;
    rustix::process::fchdir(new).map_err(|e| err("enter rootfs", rootfs)(e.into()))?;
    rustix::process::pivot_root(".", ".").map_err(|e| err("pivot_root", rootfs)(e.into()))?;
    rustix::process::fchdir(&old).map_err(|e| err("enter old root", rootfs)(e.into()))?;
    nix::mount::mount(
        None::<&str>,
        ".",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| err("make old root rslave", rootfs)(e.into()))?;
    nix::mount::umount2(".", MntFlags::MNT_DETACH)
        .map_err(|e| err("detach old root", rootfs)(e.into()))?;
    rustix::process::chdir("/").map_err(|e| err("chdir to new root", rootfs)(e.into()))
}

/// Without pivot_root (e.g. on a ramfs root): move the rootfs mount onto "/"
/// and chroot into it. Weaker: the old root stays reachable to a process
/// that can escape a chroot.
pub fn move_root(rootfs: &Path, new: BorrowedFd<'_>) -> Result<(), RootfsError> {
    rustix::process::fchdir(new).map_err(|e| err("enter rootfs", rootfs)(e.into()))?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| err("move rootfs onto /", rootfs)(e.into()))?;
    rustix::process::chroot(".").map_err(|e| err("chroot", rootfs)(e.into()))?;
    rustix::process::chdir("/").map_err(|e| err("chdir to new root", rootfs)(e.into()))
}

/// In the runtime's own mount namespace (the config has none): only
/// `chroot` into the rootfs, mounting nothing (a mount there would be the
/// host's). A process that can escape a chroot (CAP_SYS_CHROOT) reaches
/// the host's root: `moat audit` rates such a config high.
pub fn chroot_only(rootfs: &Path, new: BorrowedFd<'_>) -> Result<(), RootfsError> {
    rustix::process::fchdir(new).map_err(|e| err("enter rootfs", rootfs)(e.into()))?;
    rustix::process::chroot(".").map_err(|e| err("chroot", rootfs)(e.into()))?;
    rustix::process::chdir("/").map_err(|e| err("chdir to new root", rootfs)(e.into()))
}

/// The mount point (and whether it is shared) of the last-mounted entry of
/// `mountinfo` that is the longest prefix of `path`.
pub fn parent_mount(mountinfo: &str, path: &Path) -> Option<(PathBuf, bool)> {
    let mut best: Option<(PathBuf, bool)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(mp) = fields.get(4).map(|m| PathBuf::from(unescape(m))) else {
            continue;
        };
        if !path.starts_with(&mp) {
            continue;
        }
        let shared = fields
            .iter()
            .skip(6)
            .take_while(|f| **f != "-")
            .any(|f| f.starts_with("shared:"));
        let longer = best
            .as_ref()
            .is_none_or(|(b, _)| mp.components().count() >= b.components().count());
        if longer {
            best = Some((mp, shared));
        }
    }
    best
}

use crate::mountinfo::unescape;

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:5 / /var rw shared:5 - ext4 /dev/sdb rw
31 30 0:6 / /var/lib\\040x rw - tmpfs tmpfs rw
32 22 0:7 / /var/lib2 rw shared:9 - tmpfs tmpfs rw
";

    #[test]
    fn finds_the_parent_mount() {
        assert_eq!(
            parent_mount(INFO, Path::new("/var/lib x/rootfs")),
            Some((PathBuf::from("/var/lib x"), false))
        );
        assert_eq!(
            parent_mount(INFO, Path::new("/var/lib/rootfs")),
            Some((PathBuf::from("/var"), true))
        );
        assert_eq!(
            parent_mount(INFO, Path::new("/srv/rootfs")),
            Some((PathBuf::from("/"), true))
        );
        assert_eq!(
            parent_mount(INFO, Path::new("/var/lib2")),
            Some((PathBuf::from("/var/lib2"), true))
        );
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("a\\040b\\134c"), "a b\\c");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }
}
