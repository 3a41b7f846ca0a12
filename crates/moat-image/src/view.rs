//! The container's view of a cached image, mounted on the host by `moat run`
//! (as host root) inside the run's temporary bundle directory:
//!
//! 1. an idmapped, read-only, nosuid, nodev clone of each of the image's
//!    layers (directories of the cache) whose user namespace maps IDs
//!    0..65536 on disk to the container's host ID block, so image uid 0 is
//!    the container's root and image uid 1000 its uid 1000
//!    (MOUNT_ATTR_IDMAP needs CAP_SYS_ADMIN over the filesystem's user
//!    namespace: host root);
//! 2. an image of one layer, read-only, is that clone itself; otherwise an
//!    overlayfs stacks the clones (given as fds, never attached anywhere)
//!    as its lower layers, top first. Without an upper layer the overlay is
//!    read-only; with one (`--read-write`, or read-only after moat created
//!    volume mount points in it, [`View::seal`]) its upper and work
//!    directories are in the bundle, so writes land there and are
//!    discarded with it; the cache never changes. overlayfs honours the
//!    whiteouts (0:0 character devices) and opaque directories
//!    (`trusted.overlay.opaque`) of the layers through the idmapped clones.
//!
//! The view is attached at `<bundle>/rootfs`; [`View::unmount`] (or drop)
//! detaches it. The container's own mount namespace gets a copy of it when
//! it is created, so the host mount is only needed until then, but it stays
//! until the run ends so that a failure is easy to reason about.
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags,
};
use thiserror::Error;

use super::ID_RANGE;

/// The most lower layers overlayfs stacks (`OVL_MAX_STACK`).
pub const MAX_LOWER: usize = 500;

#[derive(Debug, Error)]
pub enum ViewError {
    #[error("cannot create {path}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the user namespace for the idmapped image")]
    Userns(#[source] io::Error),
    #[error("cannot {step} the image mount of {path}")]
    Mount {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("an image without layers")]
    NoLayers,
    #[error("{count} layers: overlayfs stacks at most {max}")]
    TooManyLayers { count: usize, max: usize },
    #[error("cannot unmount {path}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A mounted view of an image; unmounted on drop.
#[derive(Debug)]
pub struct View {
    rootfs: PathBuf,
    /// Attached mounts, innermost last: unmounted in reverse.
    attached: Vec<PathBuf>,
}

/// Where a view's writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// Nowhere: the view is read-only.
    Refused,
    /// To an upper layer in the bundle, discarded with it.
    Bundle,
}

impl View {
    /// Mounts the image whose layers are `layers` (directories, top first)
    /// at `<bundle>/rootfs`, IDs shifted to start at `host_id`: one layer
    /// read-only is its idmapped clone itself; otherwise an overlayfs whose
    /// lower layers are the idmapped clones, read-only without an upper
    /// layer or writable with one in the bundle.
    pub fn mount(
        layers: &[PathBuf],
        bundle: &Path,
        host_id: u32,
        writes: Writes,
    ) -> Result<View, ViewError> {
        let Some(top) = layers.first() else {
            return Err(ViewError::NoLayers);
        };
        if layers.len() > MAX_LOWER {
            return Err(ViewError::TooManyLayers {
                count: layers.len(),
                max: MAX_LOWER,
            });
        }
        let rootfs = bundle.join("rootfs");
        let mut view = View {
            rootfs: rootfs.clone(),
            attached: Vec::new(),
        };
        let map = format!("0 {host_id} {ID_RANGE}\n");
        let userns =
            moat_sys::mount::userns_with_mappings(&map, &map).map_err(ViewError::Userns)?;
        if let ([one], Writes::Refused) = (layers, writes) {
            let tree = idmapped_clone(one, userns.as_fd())?;
            mkdir(&rootfs, 0o755)?;
            attach(&tree, &rootfs, one)?;
            view.attached.push(rootfs);
            return Ok(view);
        }
        let mut lowers = Vec::with_capacity(layers.len());
        for l in layers {
            lowers.push(idmapped_clone(l, userns.as_fd())?);
        }
        let upper = match writes {
            Writes::Refused => None,
            Writes::Bundle => Some(upper_dirs(top, bundle, host_id)?),
        };
        let overlay = overlay(top, &lowers, upper.as_ref())?;
        mkdir(&rootfs, 0o755)?;
        attach(&overlay, &rootfs, top)?;
        view.attached.push(rootfs);
        Ok(view)
    }

    /// Makes the attached view read-only (`MOUNT_ATTR_RDONLY`, set by host
    /// root, so locked in the container's mount namespace): for a view
    /// with an upper layer that moat wrote mount points into.
    pub fn seal(&self) -> Result<(), ViewError> {
        let fd = rustix::fs::open(
            &self.rootfs,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ViewError::Open {
            path: self.rootfs.clone(),
            source: e.into(),
        })?;
        let attr = moat_sys::mount::MountAttr {
            set: libc::MOUNT_ATTR_RDONLY,
            clear: 0,
            propagation: 0,
        };
        moat_sys::mount::mount_setattr(fd.as_fd(), false, &attr).map_err(|source| {
            ViewError::Mount {
                step: "make read-only",
                path: self.rootfs.clone(),
                source,
            }
        })
    }

    /// Where the view is attached: the container's root.
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }

    /// Detaches the view.
    pub fn unmount(mut self) -> Result<(), ViewError> {
        self.unmount_all()
    }

    /// Unmounts every attached mount, innermost first, going on past a
    /// failure; the first failure is returned.
    fn unmount_all(&mut self) -> Result<(), ViewError> {
        let mut first = Ok(());
        while let Some(p) = self.attached.pop() {
            let r = rustix::mount::unmount(&p, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW);
            if let (Err(e), Ok(())) = (r, &first) {
                first = Err(ViewError::Unmount {
                    path: p,
                    source: e.into(),
                });
            }
        }
        first
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // Only on an error path of a run (success goes through unmount(),
        // which reports): there is no one to tell here. A mount that stayed
        // would be read-only or an overlay, so removing the bundle after it
        // still cannot change the cache.
        if let Err(e) = self.unmount_all() {
            drop(e);
        }
    }
}

fn mkdir(p: &Path, mode: u32) -> Result<(), ViewError> {
    std::fs::DirBuilder::new()
        .mode(mode)
        .create(p)
        .map_err(|source| ViewError::Mkdir {
            path: p.to_path_buf(),
            source,
        })
}

fn merr<'a>(
    step: &'static str,
    path: &'a Path,
) -> impl FnOnce(rustix::io::Errno) -> ViewError + 'a {
    move |e| ViewError::Mount {
        step,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// A detached clone of `image`, read-only, nosuid, nodev, idmapped with
/// the mappings of `userns` (on-disk IDs 0..ID_RANGE read as the
/// container's block).
fn idmapped_clone(image: &Path, userns: BorrowedFd<'_>) -> Result<OwnedFd, ViewError> {
    let src = rustix::fs::open(
        image,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ViewError::Open {
        path: image.to_path_buf(),
        source: e.into(),
    })?;
    let tree = rustix::mount::open_tree(
        src.as_fd(),
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(merr("clone", image))?;
    moat_sys::mount::mount_set_idmap(tree.as_fd(), false, userns).map_err(|source| {
        ViewError::Mount {
            step: "idmap (MOUNT_ATTR_IDMAP)",
            path: image.to_path_buf(),
            source,
        }
    })?;
    let attr = moat_sys::mount::MountAttr {
        set: libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
        clear: 0,
        propagation: 0,
    };
    moat_sys::mount::mount_setattr(tree.as_fd(), false, &attr).map_err(|source| {
        ViewError::Mount {
            step: "make read-only",
            path: image.to_path_buf(),
            source,
        }
    })?;
    Ok(tree)
}

fn attach(tree: &OwnedFd, target: &Path, image: &Path) -> Result<(), ViewError> {
    rustix::mount::move_mount(
        tree.as_fd(),
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(merr("attach", image))
}

/// `<bundle>/rw/{upper,work}` (rw/ 0700): the upper directory belongs to
/// the container's root and has the mode of the image's root (`top`).
fn upper_dirs(top: &Path, bundle: &Path, host_id: u32) -> Result<(PathBuf, PathBuf), ViewError> {
    let rw = bundle.join("rw");
    let upper = rw.join("upper");
    let work = rw.join("work");
    mkdir(&rw, 0o700)?;
    let st = rustix::fs::stat(top).map_err(|e| ViewError::Open {
        path: top.to_path_buf(),
        source: e.into(),
    })?;
    mkdir(&upper, st.st_mode & 0o7777)?;
    mkdir(&work, 0o700)?;
    let id = Some(rustix::fs::Uid::from_raw(host_id));
    let gid = Some(rustix::fs::Gid::from_raw(host_id));
    rustix::fs::chown(&upper, id, gid).map_err(|e| ViewError::Mkdir {
        path: upper.clone(),
        source: e.into(),
    })?;
    rustix::fs::chmod(&upper, Mode::from_raw_mode(st.st_mode & 0o7777)).map_err(|e| {
        ViewError::Mkdir {
            path: upper.clone(),
            source: e.into(),
        }
    })?;
    Ok((upper, work))
}

/// A detached overlay of `lowers` (idmapped clones, top first, given to
/// overlayfs as fds: `lowerdir+` with FSCONFIG_SET_FD, Linux 6.13 or
/// later), under `upper` (upper and work directories) when given, else
/// read-only.
fn overlay(
    image: &Path,
    lowers: &[OwnedFd],
    upper: Option<&(PathBuf, PathBuf)>,
) -> Result<OwnedFd, ViewError> {
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(merr("open overlayfs for", image))?;
    for l in lowers {
        rustix::mount::fsconfig_set_fd(fs.as_fd(), "lowerdir+", l.as_fd())
            .map_err(merr("add a lower layer (lowerdir+) for", image))?;
    }
    let mut attrs = MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV;
    match upper {
        Some((upper, work)) => {
            rustix::mount::fsconfig_set_string(fs.as_fd(), "upperdir", upper)
                .map_err(merr("set the overlay's upper layer for", image))?;
            rustix::mount::fsconfig_set_string(fs.as_fd(), "workdir", work)
                .map_err(merr("set the overlay's work directory for", image))?;
        }
        None => attrs |= MountAttrFlags::MOUNT_ATTR_RDONLY,
    }
    rustix::mount::fsconfig_create(fs.as_fd()).map_err(merr("create the overlay over", image))?;
    rustix::mount::fsmount(fs.as_fd(), FsMountFlags::FSMOUNT_CLOEXEC, attrs)
        .map_err(merr("mount the overlay over", image))
}
