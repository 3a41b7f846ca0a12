//! The container's view of a cached image, mounted on the host by `moat run`
//! (as host root) inside the run's temporary bundle directory:
//!
//! 1. an idmapped, read-only, nosuid, nodev clone of the cached rootfs
//!    whose user namespace maps IDs 0..65536 on disk to the container's host
//!    ID block, so image uid 0 is the container's root and image uid 1000 its
//!    uid 1000 (MOUNT_ATTR_IDMAP needs CAP_SYS_ADMIN over the filesystem's
//!    user namespace: host root);
//! 2. for a writable root, an overlayfs with that clone as its only lower
//!    layer and its upper and work directories in the bundle, so writes
//!    land in the bundle and are discarded with it; the cache never changes.
//!
//! The view is attached at `<bundle>/rootfs`; [`View::unmount`] (or drop)
//! detaches it. The container's own mount namespace gets a copy of it when
//! it is created, so the host mount is only needed until then, but it stays
//! until the run ends so that a failure is easy to reason about.
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags,
};
use thiserror::Error;

use super::ID_RANGE;

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

impl View {
    /// Mounts the image whose unpacked root is `image` at
    /// `<bundle>/rootfs`, its IDs shifted to start at `host_id`; writable
    /// (an overlay over it, upper layer in the bundle) or read-only.
    pub fn mount(
        image: &Path,
        bundle: &Path,
        host_id: u32,
        writable: bool,
    ) -> Result<View, ViewError> {
        let rootfs = bundle.join("rootfs");
        let mut view = View {
            rootfs: rootfs.clone(),
            attached: Vec::new(),
        };
        let tree = idmapped_clone(image, host_id)?;
        if !writable {
            mkdir(&rootfs, 0o755)?;
            attach(&tree, &rootfs, image)?;
            view.attached.push(rootfs);
            return Ok(view);
        }
        // The overlay's lower layer must be a path: attach the clone in
        // the bundle; the overlay keeps a private clone of it, so it is
        // detached again as soon as the overlay exists.
        let lower = bundle.join("lower");
        mkdir(&lower, 0o700)?;
        attach(&tree, &lower, image)?;
        view.attached.push(lower.clone());
        let overlay = overlay(image, &lower, bundle, host_id);
        view.unmount_all()?;
        let overlay = overlay?;
        mkdir(&rootfs, 0o755)?;
        attach(&overlay, &rootfs, image)?;
        view.attached.push(rootfs);
        Ok(view)
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

/// A detached clone of `image`, read-only, nosuid, nodev, idmapped so that
/// on-disk IDs 0..ID_RANGE read as `host_id`...
fn idmapped_clone(image: &Path, host_id: u32) -> Result<OwnedFd, ViewError> {
    let src = rustix::fs::open(
        image,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ViewError::Open {
        path: image.to_path_buf(),
        source: e.into(),
    })?;
    let map = format!("0 {host_id} {ID_RANGE}\n");
    let userns = moat_sys::mount::userns_with_mappings(&map, &map).map_err(ViewError::Userns)?;
    let tree = rustix::mount::open_tree(
        src.as_fd(),
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(merr("clone", image))?;
    moat_sys::mount::mount_set_idmap(tree.as_fd(), false, userns.as_fd()).map_err(|source| {
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

/// A detached overlay: `lower` under an upper layer in `<bundle>/rw`, whose
/// root belongs to the container's root and has the image root's mode.
fn overlay(image: &Path, lower: &Path, bundle: &Path, host_id: u32) -> Result<OwnedFd, ViewError> {
    let rw = bundle.join("rw");
    let upper = rw.join("upper");
    let work = rw.join("work");
    mkdir(&rw, 0o700)?;
    let st = rustix::fs::stat(image).map_err(|e| ViewError::Open {
        path: image.to_path_buf(),
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
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(merr("open overlayfs for", image))?;
    // `lowerdir+` takes one path as is (no `:` or `,` splitting).
    rustix::mount::fsconfig_set_string(fs.as_fd(), "lowerdir+", lower)
        .map_err(merr("set the overlay's lower layer for", image))?;
    rustix::mount::fsconfig_set_string(fs.as_fd(), "upperdir", &upper)
        .map_err(merr("set the overlay's upper layer for", image))?;
    rustix::mount::fsconfig_set_string(fs.as_fd(), "workdir", &work)
        .map_err(merr("set the overlay's work directory for", image))?;
    rustix::mount::fsconfig_create(fs.as_fd()).map_err(merr("create the overlay over", image))?;
    rustix::mount::fsmount(
        fs.as_fd(),
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV,
    )
    .map_err(merr("mount the overlay over", image))
}
