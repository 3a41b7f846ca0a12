//! Device nodes in the container's /dev: the default set plus `linux.devices`,
//! made with mknod as real root, or bind-mounted from the host's node inside a
//! user namespace (where mknod of devices is refused). Also the standard /dev
//! symlinks and /dev/ptmx.
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use super::resolve::{self, Kind};
use super::{mount_fd, RootfsError};

/// The kind of node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Char,
    Block,
    Fifo,
}

/// One device node to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Absolute, cleaned path inside the container.
    pub path: PathBuf,
    pub kind: NodeKind,
    pub major: u32,
    pub minor: u32,
    /// Permission bits (no file type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

fn default_device(name: &str, major: u32, minor: u32) -> Device {
    Device {
        path: PathBuf::from("/dev").join(name),
        kind: NodeKind::Char,
        major,
        minor,
        mode: 0o666,
        uid: 0,
        gid: 0,
    }
}

/// The devices every container gets (OCI runtime-spec "Default Devices").
pub fn defaults() -> Vec<Device> {
    vec![
        default_device("null", 1, 3),
        default_device("zero", 1, 5),
        default_device("full", 1, 7),
        default_device("random", 1, 8),
        default_device("urandom", 1, 9),
        default_device("tty", 5, 0),
    ]
}

fn from_spec(d: &LinuxDevice) -> Result<Device, RootfsError> {
    let path = resolve::clean(d.path());
    let bad = |reason: &'static str| RootfsError::InvalidDevice {
        path: d.path().clone(),
        reason,
    };
    let kind = match d.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => NodeKind::Char,
        LinuxDeviceType::B => NodeKind::Block,
        LinuxDeviceType::P => NodeKind::Fifo,
        LinuxDeviceType::A => return Err(bad("type \"a\" is for cgroup rules, not a node")),
    };
    if path == Path::new("/") {
        return Err(bad("the path names the root"));
    }
    let major = u32::try_from(d.major()).map_err(|_| bad("major number out of range"))?;
    let minor = u32::try_from(d.minor()).map_err(|_| bad("minor number out of range"))?;
    Ok(Device {
        path,
        kind,
        major,
        minor,
        mode: d.file_mode().unwrap_or(0o666) & 0o7777,
        uid: d.uid().unwrap_or(0),
        gid: d.gid().unwrap_or(0),
    })
}

/// The default devices merged with the spec's: a spec device replaces a
/// default one at the same path; spec order is kept after the defaults.
pub fn merge(spec: &[LinuxDevice]) -> Result<Vec<Device>, RootfsError> {
    let mut out = defaults();
    for d in spec {
        let dev = from_spec(d)?;
        if let Some(existing) = out.iter_mut().find(|e| e.path == dev.path) {
            *existing = dev;
        } else {
            out.push(dev);
        }
    }
    Ok(out)
}

/// Creates each device inside the root.
pub fn create_all(
    root: BorrowedFd<'_>,
    devices: &[Device],
    in_user_ns: bool,
) -> Result<(), RootfsError> {
    // Modes are exact, as the spec gives them; umask is restored after.
    let old = rustix::process::umask(Mode::empty());
    let result = devices.iter().try_for_each(|d| create(root, d, in_user_ns));
    rustix::process::umask(old);
    result
}

fn create(root: BorrowedFd<'_>, d: &Device, in_user_ns: bool) -> Result<(), RootfsError> {
    let err = |step: &'static str| {
        move |e: std::io::Error| RootfsError::Device {
            path: d.path.clone(),
            step,
            source: e,
        }
    };
    let (Some(parent), Some(name)) = (d.path.parent(), d.path.file_name()) else {
        return Err(RootfsError::InvalidDevice {
            path: d.path.clone(),
            reason: "no file name",
        });
    };
    if in_user_ns && d.kind != NodeKind::Fifo {
        return bind_host_node(root, d);
    }
    let parent = resolve::mkdir_all(root, parent).map_err(err("create parent of"))?;
    let file_type = match d.kind {
        NodeKind::Char => FileType::CharacterDevice,
        NodeKind::Block => FileType::BlockDevice,
        NodeKind::Fifo => FileType::Fifo,
    };
    let dev = rustix::fs::makedev(d.major, d.minor);
    match rustix::fs::mknodat(&parent, name, file_type, Mode::from_raw_mode(d.mode), dev) {
        // Already there (an image's /dev without a tmpfs): keep it, as runc does.
        Err(rustix::io::Errno::EXIST) => return Ok(()),
        r => r.map_err(|e| err("mknod")(e.into()))?,
    }
    let owner = (
        Some(rustix::fs::Uid::from_raw(d.uid)),
        Some(rustix::fs::Gid::from_raw(d.gid)),
    );
    rustix::fs::chownat(&parent, name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| err("chown")(e.into()))
}

/// Bind-mounts the host's node at the same path over an empty file.
fn bind_host_node(root: BorrowedFd<'_>, d: &Device) -> Result<(), RootfsError> {
    let err = |step: &'static str| {
        move |e: std::io::Error| RootfsError::Device {
            path: d.path.clone(),
            step,
            source: e,
        }
    };
    let src = rustix::fs::open(&d.path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| err("open host node of")(e.into()))?;
    let target =
        resolve::open_or_create(root, &d.path, Kind::File, false).map_err(err("create"))?;
    mount_fd(
        Some(src.as_fd()),
        target.as_fd(),
        None,
        MsFlags::MS_BIND,
        None,
    )
    .map_err(err("bind-mount host node onto"))
}

/// /dev/fd, /dev/stdin, /dev/stdout, /dev/stderr, and /dev/core when the
/// kernel has /proc/kcore. An existing entry is left alone.
pub fn create_symlinks(root: BorrowedFd<'_>, with_kcore: bool) -> Result<(), RootfsError> {
    let mut links = vec![
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ];
    if with_kcore {
        links.push(("core", "/proc/kcore"));
    }
    let dev =
        resolve::mkdir_all(root, Path::new("/dev")).map_err(|source| RootfsError::Create {
            path: PathBuf::from("/dev"),
            source,
        })?;
    for (name, target) in links {
        match rustix::fs::symlinkat(target, &dev, name) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => {
                return Err(RootfsError::Symlink {
                    path: Path::new("/dev").join(name),
                    source: e.into(),
                })
            }
        }
    }
    Ok(())
}

/// Replaces /dev/ptmx by a symlink to the devpts instance's pts/ptmx.
pub fn setup_ptmx(root: BorrowedFd<'_>) -> Result<(), RootfsError> {
    let path = PathBuf::from("/dev/ptmx");
    let dev =
        resolve::open_dir(root, Path::new("/dev")).map_err(|source| RootfsError::Resolve {
            path: path.clone(),
            source,
        })?;
    match rustix::fs::unlinkat(&dev, "ptmx", AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => {
            return Err(RootfsError::Symlink {
                path,
                source: e.into(),
            })
        }
    }
    rustix::fs::symlinkat("pts/ptmx", &dev, "ptmx").map_err(|e| RootfsError::Symlink {
        path,
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxDeviceBuilder;

    fn spec_dev(path: &str, typ: LinuxDeviceType, major: i64, minor: i64) -> LinuxDevice {
        LinuxDeviceBuilder::default()
            .path(path)
            .typ(typ)
            .major(major)
            .minor(minor)
            .build()
            .unwrap()
    }

    #[test]
    fn defaults_are_the_spec_set() {
        let paths: Vec<_> = defaults().into_iter().map(|d| d.path).collect();
        let want: Vec<PathBuf> = ["null", "zero", "full", "random", "urandom", "tty"]
            .iter()
            .map(|n| Path::new("/dev").join(n))
            .collect();
        assert_eq!(paths, want);
        assert!(defaults()
            .iter()
            .all(|d| d.mode == 0o666 && d.kind == NodeKind::Char));
    }

    #[test]
    fn spec_devices_override_and_append() {
        let mut null = spec_dev("/dev/null", LinuxDeviceType::C, 1, 3);
        null.set_file_mode(Some(0o20600));
        null.set_uid(Some(7));
        let fuse = spec_dev("/dev/../dev/fuse", LinuxDeviceType::C, 10, 229);
        let fifo = spec_dev("/dev/fifo", LinuxDeviceType::P, 0, 0);
        let list = merge(&[null, fuse, fifo]).unwrap();
        assert_eq!(list.len(), 8);
        assert_eq!(list[0].path, PathBuf::from("/dev/null"));
        assert_eq!(list[0].mode, 0o600, "file type bits are dropped");
        assert_eq!(list[0].uid, 7);
        assert_eq!(list[6].path, PathBuf::from("/dev/fuse"));
        assert_eq!((list[6].major, list[6].minor), (10, 229));
        assert_eq!(list[7].kind, NodeKind::Fifo);
    }

    #[test]
    fn bad_devices_are_refused() {
        assert!(merge(&[spec_dev("/dev/x", LinuxDeviceType::A, 1, 1)]).is_err());
        assert!(merge(&[spec_dev("/dev/x", LinuxDeviceType::C, -1, 1)]).is_err());
        assert!(merge(&[spec_dev("/dev/x", LinuxDeviceType::C, 1, 1 << 40)]).is_err());
        assert!(merge(&[spec_dev("/..", LinuxDeviceType::C, 1, 3)]).is_err());
    }
}
