//! The spec's "cgroup" mount. With a cgroup namespace the kernel's own cgroup
//! filesystems are mounted (cgroup2, or a tmpfs holding one cgroup v1 mount
//! per hierarchy); without one, the container's cgroup directories on the
//! host are bind-mounted (`RootfsConfig::cgroup_mounts`).
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use nix::mount::MsFlags;
use oci_spec::runtime::LinuxNamespaceType;

use super::mount::{bind_from, filesystem, remount_bind, Entry};
use super::options::MountOptions;
use super::resolve;
use super::{RootfsConfig, RootfsError};

/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_MAGIC: i64 = 0x6367_7270;

/// cgroup v1 controllers the kernel knows; any other hierarchy name is a
/// named one ("systemd" is mounted with "none,name=systemd").
use crate::cgroup::V1_CONTROLLERS as CONTROLLERS;

const SAFE_FLAGS: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

pub fn mount(root: BorrowedFd<'_>, cfg: &RootfsConfig, e: &Entry) -> Result<(), RootfsError> {
    for (name, _) in cfg.cgroup_mounts {
        if name.contains('/') || name == "." || name == ".." {
            return Err(RootfsError::InvalidCgroupName { name: name.clone() });
        }
    }
    let cgroupns = cfg
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == LinuxNamespaceType::Cgroup));
    if cgroupns {
        with_namespace(root, cfg, e)
    } else {
        without_namespace(root, cfg, e)
    }
}

fn host_is_unified() -> Result<bool, RootfsError> {
    let st = rustix::fs::statfs("/sys/fs/cgroup").map_err(|err| RootfsError::OpenSource {
        path: "/sys/fs/cgroup".into(),
        source: err.into(),
    })?;
    Ok(st.f_type as i64 == CGROUP2_MAGIC)
}

fn sub_entry<'a>(
    e: &Entry,
    name: &str,
    fstype: &'a str,
    source: Option<&'a Path>,
    opts: MountOptions,
) -> Entry<'a> {
    Entry {
        dest: e.dest.join(name),
        fstype,
        source,
        opts,
        uid_mappings: None,
        gid_mappings: None,
    }
}

fn with_namespace(root: BorrowedFd<'_>, cfg: &RootfsConfig, e: &Entry) -> Result<(), RootfsError> {
    let flags = (e.opts.flags | SAFE_FLAGS) & !MsFlags::MS_REMOUNT;
    if host_is_unified()? {
        let opts = MountOptions {
            flags,
            data: e.opts.data.clone(),
            ..Default::default()
        };
        let cg = Entry {
            dest: e.dest.clone(),
            fstype: "cgroup2",
            source: Some(Path::new("cgroup2")),
            opts,
            uid_mappings: None,
            gid_mappings: None,
        };
        return filesystem(root, &cg);
    }
    holder_tmpfs(root, e)?;
    for (name, _) in cfg.cgroup_mounts {
        let (fstype, data) = if name == "unified" {
            ("cgroup2", Vec::new())
        } else if name.split(',').all(|c| CONTROLLERS.contains(&c)) {
            ("cgroup", vec![name.clone()])
        } else {
            ("cgroup", vec!["none".to_owned(), format!("name={name}")])
        };
        let opts = MountOptions {
            flags,
            data,
            ..Default::default()
        };
        filesystem(
            root,
            &sub_entry(e, name, fstype, Some(Path::new(fstype)), opts),
        )?;
    }
    finish_holder(root, cfg, e)
}

fn without_namespace(
    root: BorrowedFd<'_>,
    cfg: &RootfsConfig,
    e: &Entry,
) -> Result<(), RootfsError> {
    let ro = e.opts.flags & MsFlags::MS_RDONLY;
    let bind_opts = MountOptions {
        flags: MsFlags::MS_BIND | MsFlags::MS_REC | SAFE_FLAGS | ro,
        ..Default::default()
    };
    if let [(name, host)] = cfg.cgroup_mounts {
        if name.is_empty() {
            // cgroup v2: the container's own cgroup directory is the mount.
            let b = Entry {
                dest: e.dest.clone(),
                fstype: "bind",
                source: Some(host),
                opts: bind_opts,
                uid_mappings: None,
                gid_mappings: None,
            };
            return bind_from(root, &b, host);
        }
    }
    holder_tmpfs(root, e)?;
    for (name, host) in cfg.cgroup_mounts {
        bind_from(
            root,
            &sub_entry(e, name, "bind", Some(host), bind_opts.clone()),
            host,
        )?;
    }
    finish_holder(root, cfg, e)
}

/// The tmpfs that holds the v1 hierarchies.
fn holder_tmpfs(root: BorrowedFd<'_>, e: &Entry) -> Result<(), RootfsError> {
    let opts = MountOptions {
        flags: SAFE_FLAGS,
        data: vec!["mode=755".to_owned()],
        ..Default::default()
    };
    let t = Entry {
        dest: e.dest.clone(),
        fstype: "tmpfs",
        source: Some(Path::new("tmpfs")),
        opts,
        uid_mappings: None,
        gid_mappings: None,
    };
    filesystem(root, &t)
}

/// Symlinks for co-mounted controllers ("cpu" -> "cpu,cpuacct"), then the
/// holder made read-only if the spec mount is.
fn finish_holder(root: BorrowedFd<'_>, cfg: &RootfsConfig, e: &Entry) -> Result<(), RootfsError> {
    let dir = resolve::open_dir(root, &e.dest).map_err(|source| RootfsError::Resolve {
        path: e.dest.clone(),
        source,
    })?;
    for (name, _) in cfg.cgroup_mounts.iter().filter(|(n, _)| n.contains(',')) {
        for part in name.split(',') {
            match rustix::fs::symlinkat(name.as_str(), &dir, part) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(err) => {
                    return Err(RootfsError::Symlink {
                        path: e.dest.join(part),
                        source: err.into(),
                    })
                }
            }
        }
    }
    if e.opts.flags.contains(MsFlags::MS_RDONLY) {
        remount_bind(
            dir.as_fd(),
            MsFlags::MS_RDONLY | SAFE_FLAGS,
            MsFlags::empty(),
        )
        .map_err(|source| RootfsError::Remount {
            dest: e.dest.clone(),
            source,
        })?;
    }
    Ok(())
}
