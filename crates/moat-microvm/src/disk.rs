//! The guest's disks: each directory the container sees (its root, and
//! every directory bind mount) becomes an ext4 image, formatted by
//! e2fsprogs' `mke2fs` and filled through the kernel's ext4 on a loop
//! device (or by `mke2fs -d` for small trees and where no loop device can
//! be had), and attached read-only as a virtio block device; the guest
//! finds each by its filesystem UUID.
//!
//! Images of directories moat manages or that are the host's own system
//! directories (the embedded default's /usr, /lib, …; image cache entries;
//! the embedded root) are **cached** under the state root's
//! `.cache/microvm/` and shared by every container; their key is the path
//! and a fingerprint of the tree's directories (inode, mtime, ctime to
//! depth [`FINGERPRINT_DEPTH`]), so installing or removing files rebuilds
//! the image. Any other directory (an engine's bundle rootfs, a volume) is
//! imaged once per content ([`crate::tree_cache`]), or, rootless or where
//! that fails, **per container**, in the container's state directory, and
//! removed by `delete`.
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::MicrovmError;

/// How deep the fingerprint of a cached image's source looks.
pub const FINGERPRINT_DEPTH: usize = 3;
/// The most entries an imaged tree may hold.
const MAX_ENTRIES: u64 = 4_000_000;

/// An image ready to attach.
#[derive(Debug, Clone)]
pub struct DiskImage {
    pub path: PathBuf,
    /// The ext4 UUID, 32 hex digits.
    pub uuid: String,
}

/// Creates a root-only directory (and its parents).
pub fn ensure_dir(dir: &Path) -> Result<(), MicrovmError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(MicrovmError::io(format!("create {}", dir.display())))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hashes the directories of `root` to `depth` (inode, mtime, ctime).
fn fingerprint(h: &mut Sha256, root: &Path, depth: usize) {
    let Ok(m) = std::fs::symlink_metadata(root) else {
        return;
    };
    h.update(root.as_os_str().as_encoded_bytes());
    h.update(m.ino().to_le_bytes());
    h.update(m.mtime().to_le_bytes());
    h.update(m.mtime_nsec().to_le_bytes());
    h.update(m.ctime().to_le_bytes());
    h.update(m.ctime_nsec().to_le_bytes());
    if depth == 0 || !m.is_dir() {
        return;
    }
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    let mut dirs: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    for d in dirs {
        fingerprint(h, &d, depth - 1);
    }
}

/// The cached image of `source` (built now if missing).
pub fn cached(cache: &Path, source: &Path) -> Result<DiskImage, MicrovmError> {
    let mut h = Sha256::new();
    h.update(b"moat-disk-2");
    fingerprint(&mut h, source, FINGERPRINT_DEPTH);
    let digest = h.finalize();
    let uuid = hex(&digest[..16]);
    let path = cache.join(format!("disk-{}.ext4", &uuid[..24]));
    if path.is_file() {
        return Ok(DiskImage { path, uuid });
    }
    ensure_dir(cache)?;
    sweep_dead_builds(cache);
    sweep_orphans(cache);
    build(source, &path, &uuid)?;
    prune_stale(cache, source.as_os_str().as_encoded_bytes(), &path);
    Ok(DiskImage { path, uuid })
}

/// Whether the process `pid` that named a build's files is this one or
/// still runs.
pub(crate) fn builder_lives(pid: u32) -> bool {
    pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes what builds by processes that no longer run left in `dir`
/// (moat killed while it imaged a tree): their `<name>.<pid>.tmp` files
/// and `<name>.<pid>.mnt` mount points (empty: the mount lived in the dead
/// child's namespace). A build by a live process is left alone.
pub(crate) fn sweep_dead_builds(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name
            .strip_suffix(".tmp")
            .or_else(|| name.strip_suffix(".mnt"))
        else {
            continue;
        };
        let Some(pid) = stem.rsplit('.').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if builder_lives(pid) {
            continue;
        }
        let p = e.path();
        let r = if name.ends_with(".mnt") {
            std::fs::remove_dir(&p)
        } else {
            std::fs::remove_file(&p)
        };
        match r {
            Ok(()) => tracing::debug!(
                "microvm: removed {}, left by a build that died",
                p.display()
            ),
            Err(err) => tracing::debug!("microvm: cannot remove {}: {err}", p.display()),
        }
    }
}

/// Removes the cached images whose recorded sources (one path, or a
/// group's list) are gone, one of them at least: a state root removed
/// with its prebuilt roots, a host directory deleted. Nothing can ask for
/// them again (a tree made anew at the same path is another key), and
/// [`prune_stale`], which removes an image when its source is imaged
/// anew, never meets them: such images piled up, one per removed root.
/// A record that is not a list of absolute paths, or a path that cannot
/// be looked at (not "not found"), keeps its image.
fn sweep_orphans(cache: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(rd) = std::fs::read_dir(cache) else {
        return;
    };
    for e in rd.flatten() {
        let mark = e.path();
        if mark.extension().is_none_or(|x| x != "source") {
            continue;
        }
        let Ok(record) = std::fs::read(&mark) else {
            continue;
        };
        let paths: Vec<&[u8]> = record
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .collect();
        if paths.is_empty() || !paths.iter().all(|p| p.starts_with(b"/")) {
            continue;
        }
        let gone = paths.iter().any(|p| {
            matches!(
                std::fs::symlink_metadata(Path::new(std::ffi::OsStr::from_bytes(p))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound
            )
        });
        if gone {
            let image = mark.with_extension("ext4");
            match std::fs::remove_file(&image) {
                Ok(()) => {
                    tracing::debug!("microvm: removed {}, whose source is gone", image.display())
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    tracing::debug!("microvm: cannot remove {}: {err}", image.display());
                    continue;
                }
            }
            let _ = std::fs::remove_file(&mark);
        }
    }
}

/// Records that `image` is the image of `source`, and removes the images
/// of `source` built before it (its tree changed since: nothing will ask
/// for them again, and an image of the host's /usr is gigabytes). A
/// container still running on one keeps it open until it ends.
fn prune_stale(cache: &Path, source: &[u8], image: &Path) {
    let mark = |p: &Path| p.with_extension("source");
    let Ok(rd) = std::fs::read_dir(cache) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p == image || p.extension().is_none_or(|x| x != "ext4") {
            continue;
        }
        let same = std::fs::read(mark(&p)).is_ok_and(|b| b == source);
        if same {
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::remove_file(mark(&p));
        }
    }
    let _ = std::fs::write(mark(image), source);
}

/// The image of several directories (and files), each at `<k>` in it:
/// cached when `cache` is given (keyed by all the sources), else at `dest`.
pub fn group(
    sources: &[PathBuf],
    cache: Option<&Path>,
    dest: &Path,
) -> Result<DiskImage, MicrovmError> {
    let mut h = Sha256::new();
    h.update(b"moat-group-2");
    for s in sources {
        fingerprint(&mut h, s, FINGERPRINT_DEPTH);
    }
    let digest = h.finalize();
    let (path, uuid) = match cache {
        Some(c) => {
            let uuid = hex(&digest[..16]);
            let p = c.join(format!("group-{}.ext4", &uuid[..24]));
            if p.is_file() {
                return Ok(DiskImage { path: p, uuid });
            }
            (p, uuid)
        }
        None => (dest.to_owned(), private_uuid(dest)),
    };
    if let Some(c) = cache {
        sweep_dead_builds(c);
        sweep_orphans(c);
    }
    let staging = path.with_extension("staging");
    std::fs::create_dir_all(&staging)
        .map_err(MicrovmError::io(format!("create {}", staging.display())))?;
    // The sources are bind-mounted into the staging directory in a mount
    // namespace of a child's own, so the host never sees those mounts.
    let built = if rootless() {
        let first = sources.first().cloned().unwrap_or_default();
        in_own_userns(&path, &first, |scratch| {
            stage(&staging, sources)?;
            cover_unreadable(&staging, scratch)?;
            build_as(&staging, &path, &uuid, usage(&staging)?, Fill::Mke2fs).map(drop)
        })
        .is_ok()
    } else {
        let code = moat_sys::process::run_in_child(libc::CLONE_NEWNS, || {
            let r = (|| -> Result<(), MicrovmError> {
                make_mounts_private().map_err(MicrovmError::sys("make the mounts private"))?;
                stage(&staging, sources)?;
                build(&staging, &path, &uuid).map(drop)
            })();
            exit_code(r)
        });
        matches!(code, Ok(0))
    };
    let _ = std::fs::remove_dir(&staging);
    if !built {
        return Err(MicrovmError::Mkfs {
            source_dir: sources.first().cloned().unwrap_or_default(),
            message: format!("cannot image {} directories together", sources.len()),
        });
    }
    if let Some(c) = cache {
        let key: Vec<u8> = sources
            .iter()
            .flat_map(|s| [s.as_os_str().as_encoded_bytes(), b"\0"].concat())
            .collect();
        prune_stale(c, &key, &path);
    }
    Ok(DiskImage { path, uuid })
}

/// A build child's exit code: 0, or 1 after its error on stderr.
fn exit_code(r: Result<(), MicrovmError>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("moat: {}", moat_core::error_chain(&e));
            1
        }
    }
}

/// Mounts a tmpfs on `staging` and binds each of `sources` at `<k>` in it
/// (a file onto a file, a directory onto a directory), in the calling
/// child's own mount namespace.
fn stage(staging: &Path, sources: &[PathBuf]) -> Result<(), MicrovmError> {
    use nix::mount::{mount, MsFlags};
    mount(
        Some("moat-staging"),
        staging,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(MicrovmError::sys("mount the staging directory"))?;
    for (k, s) in sources.iter().enumerate() {
        let at = staging.join(k.to_string());
        let made = if s.is_dir() {
            std::fs::create_dir(&at)
        } else {
            std::fs::File::create_new(&at).map(drop)
        };
        made.map_err(MicrovmError::io(format!("create {}", at.display())))?;
        mount(
            Some(s.as_path()),
            &at,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(MicrovmError::sys(format!("bind {}", s.display())))?;
    }
    Ok(())
}

/// Whether moat runs as an unprivileged user: it then images trees with
/// `mke2fs -d` in namespaces of a child's own ([`in_own_userns`]), since
/// it can neither attach a loop device nor read what its user cannot.
fn rootless() -> bool {
    !rustix::process::geteuid().is_root()
}

/// Rootless: runs `f` in a child with a user namespace of its own, where
/// the user is root and no one else is mapped, and a mount namespace of
/// its own, where `f` may cover what the user cannot read
/// ([`cover_unreadable`]); `f` gets an empty tmpfs private to the child
/// for the covers, mounted on `<at>.<pid>.mnt` (swept if the child dies).
/// Host files owned by anyone but the user show there as the overflow ID
/// (65534), and an image made there records that owner: to the guest's
/// container, whose user namespace maps neither root nor 65534 of the
/// guest, both read as unmapped, with the same permission bits. The
/// child's error goes to stderr; the one returned names `what`.
fn in_own_userns(
    at: &Path,
    what: &Path,
    f: impl FnOnce(&Path) -> Result<(), MicrovmError>,
) -> Result<(), MicrovmError> {
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    let scratch = at.with_extension(format!("{}.mnt", std::process::id()));
    std::fs::create_dir(&scratch)
        .map_err(MicrovmError::io(format!("create {}", scratch.display())))?;
    let code = moat_sys::process::run_in_child(libc::CLONE_NEWUSER | libc::CLONE_NEWNS, || {
        let r = (|| -> Result<(), MicrovmError> {
            moat_jail::idmap::map_self(uid, gid, (0, 0)).map_err(|e| {
                MicrovmError::Invalid(format!(
                    "map the image build's user namespace: {}",
                    moat_core::error_chain(&e)
                ))
            })?;
            make_mounts_private().map_err(MicrovmError::sys("make the mounts private"))?;
            nix::mount::mount(
                Some("moat-covers"),
                &scratch,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                Some("mode=0700,size=1m"),
            )
            .map_err(MicrovmError::sys("mount the covers' directory"))?;
            f(&scratch)
        })();
        exit_code(r)
    });
    let _ = std::fs::remove_dir(&scratch);
    match code {
        Ok(0) => Ok(()),
        // run_in_child's status when the unshare itself failed.
        Ok(126) => Err(MicrovmError::Mkfs {
            source_dir: what.to_owned(),
            message: "cannot make the image build's user namespace".into(),
        }),
        Ok(_) => Err(MicrovmError::Mkfs {
            source_dir: what.to_owned(),
            message: "cannot image it as an unprivileged user (the reason is above)".into(),
        }),
        Err(e) => Err(MicrovmError::Mkfs {
            source_dir: what.to_owned(),
            message: format!("cannot start the image build: {e}"),
        }),
    }
}

/// Rootless, in [`in_own_userns`]'s child: covers every entry under
/// `root` its user may not read (a directory without read and search
/// permission, a file without read permission) with an empty one of the
/// same mode (a tmpfs on the directory, an empty file from `scratch` bound
/// on the file), so that `mke2fs -d` images what the user can read and
/// nothing more, rather than failing on the first entry it cannot open.
/// Returns how many it covered.
fn cover_unreadable(root: &Path, scratch: &Path) -> Result<usize, MicrovmError> {
    use nix::mount::{mount, MsFlags};
    use nix::unistd::{access, AccessFlags};
    let mut covered = 0usize;
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let rd =
            std::fs::read_dir(&dir).map_err(MicrovmError::io(format!("read {}", dir.display())))?;
        for e in rd.flatten() {
            let Ok(t) = e.file_type() else { continue };
            let p = e.path();
            let dir = t.is_dir();
            let need = if dir {
                AccessFlags::R_OK | AccessFlags::X_OK
            } else if t.is_file() {
                AccessFlags::R_OK
            } else {
                continue;
            };
            if access(&p, need).is_ok() {
                if dir {
                    stack.push(p);
                }
                continue;
            }
            let mode = std::fs::symlink_metadata(&p)
                .map_err(MicrovmError::io(format!("stat {}", p.display())))?
                .mode()
                & 0o7777;
            if dir {
                mount(
                    Some("moat-cover"),
                    &p,
                    Some("tmpfs"),
                    MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some(format!("mode={mode:o},size=4k").as_str()),
                )
                .map_err(MicrovmError::sys(format!("cover {}", p.display())))?;
            } else {
                let empty = scratch.join(covered.to_string());
                std::fs::File::create_new(&empty)
                    .map_err(MicrovmError::io(format!("create {}", empty.display())))?;
                std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(mode))
                    .map_err(MicrovmError::io(format!("chmod {}", empty.display())))?;
                mount(
                    Some(&empty),
                    &p,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(MicrovmError::sys(format!("cover {}", p.display())))?;
            }
            covered += 1;
        }
    }
    if covered > 0 {
        tracing::info!(
            "microvm: {covered} entries under {} that this user cannot read are empty in its image",
            root.display()
        );
    }
    Ok(covered)
}

fn private_uuid(dest: &Path) -> String {
    let mut h = Sha256::new();
    h.update(b"moat-disk-private");
    h.update(dest.as_os_str().as_encoded_bytes());
    h.update(std::process::id().to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.update(now.to_le_bytes());
    hex(&h.finalize()[..16])
}

/// An image of `source` for one container, at `dest`.
pub fn per_container(source: &Path, dest: &Path) -> Result<DiskImage, MicrovmError> {
    let uuid = private_uuid(dest);
    build(source, dest, &uuid)?;
    Ok(DiskImage {
        path: dest.to_owned(),
        uuid,
    })
}

/// What an image of a tree needs: bytes and inodes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub entries: u64,
}

/// Walks `root` (without following symlinks) and adds up what ext4 needs.
pub fn usage(root: &Path) -> Result<Usage, MicrovmError> {
    let mut u = Usage::default();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let rd =
            std::fs::read_dir(&dir).map_err(MicrovmError::io(format!("read {}", dir.display())))?;
        u.entries += 1;
        u.bytes += 4096;
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            u.entries += 1;
            if u.entries > MAX_ENTRIES {
                return Err(MicrovmError::TooLarge(root.to_owned()));
            }
            if m.is_dir() {
                stack.push(e.path());
            } else {
                u.bytes += m.len().div_ceil(4096) * 4096;
            }
        }
    }
    Ok(u)
}

/// The image size for `u`: the data, a fifth more for metadata, 16 MiB
/// of room; in bytes, a multiple of 1 MiB.
pub fn image_size(u: Usage) -> u64 {
    let raw = u.bytes + u.bytes / 5 + u.entries * 512 + (16 << 20);
    raw.div_ceil(1 << 20) * (1 << 20)
}

/// How an image was filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// `mke2fs -d`: e2fsprogs writes every file itself (slow for big
    /// trees: ~80% of its time is its own CPU, 29 s for 776 MB here).
    Mke2fs,
    /// The kernel's ext4 on a loop device, filled by `cp -a` (4.5 s for
    /// the same tree).
    Kernel,
}

/// Trees with at least this many bytes of data, or
/// [`KERNEL_FILL_MIN_ENTRIES`] entries, are copied through the kernel;
/// smaller ones through `mke2fs -d`, which is as fast there (10 ms against
/// 30 for 3 MB; 0.45 s against 0.4 for 116 MB and 4000 entries), and
/// needs no loop device.
pub const KERNEL_FILL_MIN_BYTES: u64 = 64 << 20;
/// See [`KERNEL_FILL_MIN_BYTES`].
pub const KERNEL_FILL_MIN_ENTRIES: u64 = 10_000;

/// Builds the image of `source` at `dest` with the ext4 UUID `uuid`
/// (through a temporary file, so a failed build leaves nothing).
pub(crate) fn build_image(source: &Path, dest: &Path, uuid: &str) -> Result<(), MicrovmError> {
    build(source, dest, uuid).map(drop)
}

/// Builds the image of `source` at `dest` (through a temporary file, so a
/// failed build leaves nothing).
fn build(source: &Path, dest: &Path, uuid: &str) -> Result<Fill, MicrovmError> {
    if rootless() {
        in_own_userns(dest, source, |scratch| {
            cover_unreadable(source, scratch)?;
            build_as(source, dest, uuid, usage(source)?, Fill::Mke2fs).map(drop)
        })?;
        return Ok(Fill::Mke2fs);
    }
    let u = usage(source)?;
    let prefer = if u.bytes >= KERNEL_FILL_MIN_BYTES || u.entries >= KERNEL_FILL_MIN_ENTRIES {
        Fill::Kernel
    } else {
        Fill::Mke2fs
    };
    build_as(source, dest, uuid, u, prefer)
}

/// [`build`] with the fill to try first: through the kernel, falling back
/// to `mke2fs -d` where the host offers no loop devices (moat inside a
/// container) or the copy fails; `mke2fs -d` alone otherwise.
fn build_as(
    source: &Path,
    dest: &Path,
    uuid: &str,
    u: Usage,
    prefer: Fill,
) -> Result<Fill, MicrovmError> {
    let tmp = dest.with_extension(format!("{}.tmp", std::process::id()));
    let r = (|| {
        let mut fill = Fill::Mke2fs;
        if prefer == Fill::Kernel {
            mkfs(None, &tmp, u, uuid)?;
            match fill_through_kernel(source, &tmp) {
                Ok(()) => fill = Fill::Kernel,
                Err(why) => tracing::info!(
                    "microvm: imaging {} through a loop mount failed ({why}); mke2fs -d instead",
                    source.display()
                ),
            }
        }
        if fill == Fill::Mke2fs {
            mkfs(Some(source), &tmp, u, uuid)?;
        }
        drop_lost_found(source, &tmp)?;
        std::fs::rename(&tmp, dest)
            .map_err(MicrovmError::io(format!("rename {}", dest.display())))?;
        Ok(fill)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Removes the `lost+found` that mke2fs makes from `img`, unless the tree
/// has one of its own: the image is a copy of the tree, built again rather
/// than repaired, and the directory showed in the guest as the tree's (in
/// an image's `/` and the host's `/usr`; root's alone, so a walk of the
/// tree met "Permission denied" where the other tiers have nothing).
fn drop_lost_found(source: &Path, img: &Path) -> Result<(), MicrovmError> {
    if source.join("lost+found").symlink_metadata().is_ok() {
        return Ok(());
    }
    let failed = |message: String| MicrovmError::Mkfs {
        source_dir: source.to_owned(),
        message,
    };
    let out = Command::new(DEBUGFS)
        .args(["-w", "-R", "rmdir /lost+found"])
        .arg(img)
        .output()
        .map_err(|e| failed(format!("cannot run {DEBUGFS}: {e} (install e2fsprogs)")))?;
    // debugfs exits 0 whatever its request did; its complaint names it.
    let err = String::from_utf8_lossy(&out.stderr);
    match err.lines().find(|l| l.starts_with("rmdir")) {
        Some(l) => Err(failed(format!("{DEBUGFS}: {}", l.trim()))),
        None if !out.status.success() => Err(failed(format!("{DEBUGFS} failed: {}", out.status))),
        None => Ok(()),
    }
}

/// e2fsprogs' debugfs, which edits an unmounted image.
const DEBUGFS: &str = "debugfs";

/// Makes `img` an empty ext4 file system sized for `u` (a new file each
/// time), filled with `populate` by mke2fs itself when given.
fn mkfs(populate: Option<&Path>, img: &Path, u: Usage, uuid: &str) -> Result<(), MicrovmError> {
    let f = std::fs::File::create(img)
        .map_err(MicrovmError::io(format!("create {}", img.display())))?;
    f.set_len(image_size(u))
        .map_err(MicrovmError::io(format!("size {}", img.display())))?;
    drop(f);
    mke2fs(populate, img, Some(u.entries + 1024), uuid, Features::Plain)
}

/// What [`mke2fs`] puts in an image beyond the plain read-only one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Features {
    /// No journal: an image that is never written, or never outlives its VM.
    Plain,
    /// A 32 MiB journal, not zeroed (`lazy_journal_init`: only for a new
    /// sparse file, whose blocks read as zeros).
    Journal,
}

/// How large a container's writable layer may grow ([`scratch`]): a
/// sparse file, which takes the host's disk only as the guest writes.
pub const SCRATCH_BYTES: u64 = 32 << 30;

/// A container's writable layer in its guest: a new sparse ext4 image of
/// [`SCRATCH_BYTES`] at `path` (its own, never mounted on the host),
/// opened read-write, with a random filesystem UUID (how the guest finds
/// it among its disks). mke2fs writes about 1 MiB of it, in ~10 ms.
/// `journal`: a layer kept from one VM to the next ([`crate::layer`]) has
/// one (32 MiB, left sparse: the new file reads as zeros), so that a VM
/// killed mid-write leaves a consistent file system; one that dies with
/// its VM needs none.
pub fn scratch(path: &Path, journal: bool) -> Result<(std::fs::File, String), MicrovmError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut raw = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut r| r.read_exact(&mut raw))
        .map_err(MicrovmError::io("draw a UUID for the writable layer"))?;
    let uuid = hex(&raw);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(MicrovmError::io(format!("create {}", path.display())))?;
    f.set_len(SCRATCH_BYTES)
        .map_err(MicrovmError::io(format!("size {}", path.display())))?;
    let features = if journal {
        Features::Journal
    } else {
        Features::Plain
    };
    mke2fs(None, path, None, &uuid, features)?;
    Ok((f, uuid))
}

/// `mke2fs` of the file `img` (sized already): ext4 without a journal
/// unless `features` asks for one, `inodes` of them (the default ratio
/// without), its root directory root's, `populate`'s tree copied in
/// (`-d`) if given.
fn mke2fs(
    populate: Option<&Path>,
    img: &Path,
    inodes: Option<u64>,
    uuid: &str,
    features: Features,
) -> Result<(), MicrovmError> {
    let source_dir = populate.unwrap_or(img).to_owned();
    let dashed = format!(
        "{}-{}-{}-{}-{}",
        &uuid[..8],
        &uuid[8..12],
        &uuid[12..16],
        &uuid[16..20],
        &uuid[20..32]
    );
    let mut cmd = Command::new(MKFS);
    cmd.args([
        "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-L", "moat",
    ])
    .args(["-U", &dashed]);
    match features {
        Features::Plain => cmd
            .args(["-O", "^has_journal,^resize_inode"])
            .args(["-E", "lazy_itable_init=1,root_owner=0:0"]),
        Features::Journal => cmd
            .args(["-O", "has_journal,^resize_inode", "-J", "size=32"])
            .args([
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
            ]),
    };
    if let Some(n) = inodes {
        cmd.args(["-N", &n.to_string()]);
    }
    if let Some(src) = populate {
        cmd.arg("-d").arg(src);
    }
    let out = cmd.arg(img).output().map_err(|e| MicrovmError::Mkfs {
        source_dir: source_dir.clone(),
        message: format!("cannot run {MKFS}: {e} (install e2fsprogs)"),
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(MicrovmError::Mkfs {
            source_dir,
            message: err.lines().last().unwrap_or("failed").trim().to_string(),
        });
    }
    Ok(())
}

/// Copies `source` into the empty ext4 image `img` through the kernel: a
/// loop device that detaches itself once unmounted, mounted in a mount
/// namespace of a child's own (the host never sees the mount, and if moat
/// dies mid-copy the namespace, the mount and the loop device go with it),
/// `cp -a` (owners, modes, times, hard links, xattrs, special files), and
/// an unmount that writes everything back to the image before the child
/// reports success. The error says which step failed.
fn fill_through_kernel(source: &Path, img: &Path) -> Result<(), String> {
    let mnt = img.with_extension("mnt");
    std::fs::create_dir(&mnt).map_err(|e| format!("create {}: {e}", mnt.display()))?;
    let (rd, wr) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    let code = moat_sys::process::run_in_child(libc::CLONE_NEWNS, || {
        match loop_mount_and_copy(source, img, &mnt) {
            Ok(()) => 0,
            Err(e) => {
                let _ = std::io::Write::write_all(&mut std::fs::File::from(wr), e.as_bytes());
                1
            }
        }
    });
    let _ = std::fs::remove_dir(&mnt);
    let mut why = String::new();
    {
        use std::io::Read;
        let mut r = std::fs::File::from(rd);
        let _ = r.read_to_string(&mut why);
    }
    match code {
        Ok(0) => Ok(()),
        Ok(c) if why.is_empty() => Err(format!("the copy's process exited with {c}")),
        Ok(_) => Err(why),
        Err(e) => Err(format!("fork: {e}")),
    }
}

/// Makes every mount of the calling process's (new) mount namespace
/// private, so that what it mounts next never reaches the host's.
pub(crate) fn make_mounts_private() -> nix::Result<()> {
    root_propagation(nix::mount::MsFlags::MS_PRIVATE)
}

/// Makes every mount of the calling process's mount namespace a slave of
/// its peers: nothing mounted here propagates out, what the host mounts
/// still comes in.
pub(crate) fn make_mounts_slaves() -> nix::Result<()> {
    root_propagation(nix::mount::MsFlags::MS_SLAVE)
}

fn root_propagation(kind: nix::mount::MsFlags) -> nix::Result<()> {
    use nix::mount::{mount, MsFlags};
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | kind,
        None::<&str>,
    )
}

/// The child's side of [`fill_through_kernel`].
fn loop_mount_and_copy(source: &Path, img: &Path, mnt: &Path) -> Result<(), String> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    make_mounts_private().map_err(|e| format!("make the mounts private: {e}"))?;
    let (dev, dev_path) =
        moat_sys::loopdev::attach_autoclear(img).map_err(|e| format!("loop device: {e}"))?;
    mount(
        Some(dev_path.as_path()),
        mnt,
        Some("ext4"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_NOATIME,
        // The inode tables stay as mke2fs left them (sparse, so zero):
        // no background thread writing them while the copy runs.
        Some("noinit_itable"),
    )
    .map_err(|e| format!("mount {}: {e}", dev_path.display()))?;
    // The mount holds the device now; once it is gone, the device detaches.
    drop(dev);
    let copied = Command::new("cp")
        .arg("-a")
        .arg("--")
        .arg(source.join("."))
        .arg(mnt)
        .output();
    // Unmounted in every case, and not lazily: a clean unmount is what
    // writes the last of the copy back into the image.
    let unmounted = umount2(mnt, MntFlags::empty());
    let out = copied.map_err(|e| format!("cannot run cp: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "cp: {}",
            err.lines().next().unwrap_or("failed").trim()
        ));
    }
    unmounted.map_err(|e| format!("unmount {}: {e}", mnt.display()))
}

/// e2fsprogs' mke2fs, which `-t ext4` makes build ext4.
pub const MKFS: &str = "mke2fs";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_leave_room() {
        let s = image_size(Usage {
            bytes: 100 << 20,
            entries: 1000,
        });
        assert!(s >= 120 << 20 && s % (1 << 20) == 0, "{s}");
        assert!(image_size(Usage::default()) >= 16 << 20);
    }

    #[test]
    fn a_rebuilt_image_replaces_the_stale_one_of_its_source_only() {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        let (a, b): (&[u8], &[u8]) = (b"/src/a", b"/src/b");
        let (a1, a2, b1) = (
            cache.join("a1.ext4"),
            cache.join("a2.ext4"),
            cache.join("b1.ext4"),
        );
        for p in [&a1, &a2, &b1] {
            std::fs::write(p, b"image").unwrap();
        }
        let unmarked = cache.join("old.ext4");
        std::fs::write(&unmarked, b"from before marks").unwrap();
        prune_stale(&cache, a, &a1);
        prune_stale(&cache, b, &b1);
        assert!(a1.is_file() && b1.is_file());
        prune_stale(&cache, a, &a2);
        assert!(!a1.exists() && !a1.with_extension("source").exists());
        assert!(a2.is_file() && b1.is_file() && unmarked.is_file());
    }

    #[test]
    fn images_whose_sources_are_gone_are_swept() {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        let here = d.path().join("here");
        std::fs::create_dir(&here).unwrap();
        let gone = d.path().join("gone");
        let image = |name: &str, record: &[u8]| {
            let p = cache.join(format!("{name}.ext4"));
            std::fs::write(&p, b"image").unwrap();
            std::fs::write(p.with_extension("source"), record).unwrap();
            p
        };
        let path = |p: &Path| p.as_os_str().as_encoded_bytes().to_vec();
        let kept = image("kept", &path(&here));
        let orphan = image("orphan", &path(&gone));
        // A group's record: every source, each followed by a NUL.
        let group_kept = image("gkept", &[path(&here), b"\0/\0".to_vec()].concat());
        let group_orphan = image(
            "gorphan",
            &[path(&here), b"\0".to_vec(), path(&gone), b"\0".to_vec()].concat(),
        );
        let odd = image("odd", b"not a path");
        let unmarked = cache.join("old.ext4");
        std::fs::write(&unmarked, b"from before marks").unwrap();
        sweep_orphans(&cache);
        for p in [&kept, &group_kept, &odd, &unmarked] {
            assert!(p.is_file(), "{} kept", p.display());
        }
        for p in [&orphan, &group_orphan] {
            assert!(
                !p.exists() && !p.with_extension("source").exists(),
                "{} swept",
                p.display()
            );
        }
    }

    #[test]
    fn what_a_dead_build_left_is_swept_and_a_live_ones_is_not() {
        let d = tempfile::tempdir().unwrap();
        // A process that has exited: its PID is free until reused, and a
        // reused one only keeps its files a while longer.
        let mut child = Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let me = std::process::id();
        let dead_tmp = d.path().join(format!("disk-ab.{dead}.tmp"));
        let dead_mnt = d.path().join(format!("disk-ab.{dead}.mnt"));
        let live_tmp = d.path().join(format!("disk-cd.{me}.tmp"));
        let image = d.path().join("disk-ef.ext4");
        std::fs::write(&dead_tmp, b"half an image").unwrap();
        std::fs::create_dir(&dead_mnt).unwrap();
        std::fs::write(&live_tmp, b"being built").unwrap();
        std::fs::write(&image, b"image").unwrap();
        sweep_dead_builds(d.path());
        if !Path::new(&format!("/proc/{dead}")).exists() {
            assert!(!dead_tmp.exists() && !dead_mnt.exists());
        }
        assert!(live_tmp.is_file() && image.is_file());
    }

    #[test]
    fn fingerprint_follows_the_tree() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("a")).unwrap();
        let fp = || {
            let mut h = Sha256::new();
            fingerprint(&mut h, d.path(), 2);
            h.finalize()
        };
        let one = fp();
        assert_eq!(one, fp());
        std::fs::write(d.path().join("a/new"), b"x").unwrap();
        assert_ne!(one, fp(), "a file added below changes the fingerprint");
    }

    /// Rootless: a user's image holds what it can read, with the host's
    /// owners it cannot map as 65534, an unreadable directory and file as
    /// empty ones of the same mode; a group image the same; and the build
    /// leaves nothing but the images (no staging, no covers' directory).
    #[test]
    fn an_unprivileged_users_image_holds_what_it_can_read() {
        if moat_core::testing::needs_root("an_unprivileged_users_image_holds_what_it_can_read") {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("open/deeper")).unwrap();
        std::fs::create_dir_all(src.join("secret")).unwrap();
        std::fs::write(src.join("open/deeper/f"), b"readable\n").unwrap();
        std::fs::write(src.join("secret/x"), b"hidden\n").unwrap();
        std::fs::write(src.join("unread"), b"hidden too\n").unwrap();
        std::fs::set_permissions(src.join("secret"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        std::fs::set_permissions(src.join("unread"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::os::unix::fs::chown(&out, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (img, grp) = (out.join("one.ext4"), out.join("group.ext4"));
        let code = moat_sys::process::run_in_child(0, || {
            use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
            let (g, u) = (Gid::from_raw(65534), Uid::from_raw(65534));
            if setgroups(&[]).is_err() || setresgid(g, g, g).is_err() || setresuid(u, u, u).is_err()
            {
                return 2;
            }
            // As a user's own moat is (the switch made this one non-dumpable,
            // and its /proc/self files root's).
            if nix::sys::prctl::set_dumpable(true).is_err() {
                return 3;
            }
            let one = per_container(&src, &img);
            let two = group(
                &[src.join("open"), src.join("unread"), src.join("secret")],
                None,
                &grp,
            );
            match (one, two) {
                (Ok(_), Ok(_)) => 0,
                (a, b) => {
                    eprintln!("{a:?} {b:?}");
                    1
                }
            }
        })
        .unwrap();
        assert_eq!(code, 0);
        let cat = |img: &Path, path: &str| {
            let o = Command::new("debugfs")
                .args(["-R", &format!("cat {path}")])
                .arg(img)
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        assert_eq!(cat(&img, "/open/deeper/f"), "readable\n");
        assert_eq!(cat(&img, "/unread"), "");
        assert_eq!(cat(&img, "/secret/x"), "");
        let open = describe(&img, "/open/deeper/f");
        assert!(open.contains("User: 65534 Group: 65534"), "{open}");
        assert!(open.starts_with("regular Mode: 0644"), "{open}");
        let unread = describe(&img, "/unread");
        assert!(unread.starts_with("regular Mode: 0640"), "{unread}");
        assert!(unread.contains("Size: 0"), "{unread}");
        let secret = describe(&img, "/secret");
        assert!(secret.starts_with("directory Mode: 0700"), "{secret}");
        let listed = Command::new("debugfs")
            .args(["-R", "ls -p /secret"])
            .arg(&img)
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout);
        assert!(!listed.contains("/x/"), "{listed}");
        assert_eq!(cat(&grp, "/0/deeper/f"), "readable\n");
        assert_eq!(cat(&grp, "/1"), "");
        let secret = describe(&grp, "/2");
        assert!(secret.starts_with("directory Mode: 0700"), "{secret}");
        let mut left: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["group.ext4", "one.ext4"]);
        assert_eq!(std::fs::metadata(&img).unwrap().uid(), 65534);
    }

    #[test]
    fn a_group_image_holds_directories_and_files() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("certs");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), b"ca").unwrap();
        let file = d.path().join("services");
        std::fs::write(&file, b"http 80/tcp").unwrap();
        let img = group(&[dir, file], None, &d.path().join("g.ext4")).unwrap();
        let cat = |path: &str| {
            let out = Command::new("debugfs")
                .args(["-R", &format!("cat {path}")])
                .arg(&img.path)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(cat("/0/ca.pem"), "ca");
        assert_eq!(cat("/1"), "http 80/tcp");
    }

    #[test]
    fn an_image_holds_the_tree() {
        if Command::new(MKFS).arg("-V").output().is_err() {
            moat_core::testing::skip("an_image_holds_the_tree", "needs mke2fs (e2fsprogs)");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::write(src.join("bin/hello"), b"hello").unwrap();
        std::os::unix::fs::symlink("bin/hello", src.join("link")).unwrap();
        let img = per_container(&src, &d.path().join("x.ext4")).unwrap();
        let sb = {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = std::fs::File::open(&img.path).unwrap();
            f.seek(SeekFrom::Start(1024)).unwrap();
            let mut b = vec![0u8; 0x78];
            f.read_exact(&mut b).unwrap();
            b
        };
        assert_eq!(
            crate::agent::boot::uuid_from_superblock(&sb).as_deref(),
            Some(img.uuid.as_str())
        );
        // debugfs (e2fsprogs) reads the file back.
        let out = Command::new("debugfs")
            .args(["-R", "cat /bin/hello"])
            .arg(&img.path)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello");
        // Nothing but the tree: no lost+found of mke2fs's.
        let out = Command::new("debugfs")
            .args(["-R", "ls /"])
            .arg(&img.path)
            .output()
            .unwrap();
        let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert!(names.contains(&"bin".to_owned()), "{names:?}");
        assert!(!names.contains(&"lost+found".to_owned()), "{names:?}");
        // A missing source fails and leaves nothing.
        let bad = per_container(&d.path().join("nope"), &d.path().join("y.ext4"));
        assert!(bad.is_err());
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }

    /// What debugfs says of `path` in `img` that a copy must keep: type,
    /// mode, owner, size, links, mtime (seconds: mke2fs drops the
    /// nanoseconds), a symlink's target, the `user.moat` xattr.
    fn describe(img: &Path, path: &str) -> String {
        let run = |req: String| {
            let out = Command::new("debugfs")
                .args(["-R", &req])
                .arg(img)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let stat = run(format!("stat {path}"));
        let mut d: Vec<String> = Vec::new();
        for l in stat.lines() {
            let l = l.trim();
            if let Some(t) = l.strip_prefix("Inode:") {
                // "14   Type: regular    Mode:  04755   Flags: 0x80000"
                let t = t.split_once("Type:").map(|x| x.1).unwrap_or(t);
                d.push(
                    t.split("Flags:")
                        .next()
                        .unwrap_or(t)
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" "),
                );
            } else if l.starts_with("User:") || l.starts_with("Fast link dest:") {
                d.push(l.split_whitespace().collect::<Vec<_>>().join(" "));
            } else if l.starts_with("Links:") {
                d.push(l.split("Blockcount").next().unwrap_or(l).trim().to_string());
            } else if let Some(t) = l.strip_prefix("mtime:") {
                d.push(format!(
                    "mtime {}",
                    t.trim().split(':').next().unwrap_or("")
                ));
            }
        }
        d.push(run(format!("ea_get {path} user.moat")).trim().to_string());
        d.join("; ")
    }

    #[test]
    fn the_kernel_fill_keeps_what_mke2fs_keeps_and_leaves_nothing() {
        if moat_core::testing::needs_root(
            "the_kernel_fill_keeps_what_mke2fs_keeps_and_leaves_nothing",
        ) {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("d/e")).unwrap();
        std::fs::write(src.join("f"), b"hi\n").unwrap();
        std::os::unix::fs::chown(src.join("f"), Some(1234), Some(5678)).unwrap();
        std::fs::set_permissions(src.join("f"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        rustix::fs::setxattr(
            src.join("f"),
            "user.moat",
            b"yes",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        std::fs::hard_link(src.join("f"), src.join("d/hl")).unwrap();
        std::os::unix::fs::symlink("../f", src.join("d/link")).unwrap();
        // A link out of the tree (as a hostile rootfs may hold) is copied
        // as a link, not followed.
        std::os::unix::fs::symlink("/etc", src.join("d/out")).unwrap();
        nix::unistd::mkfifo(
            &src.join("d/p"),
            nix::sys::stat::Mode::from_bits_truncate(0o640),
        )
        .unwrap();
        std::fs::set_permissions(src.join("d/e"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::File::create(src.join("sparse"))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let u = usage(&src).unwrap();
        let (k, m) = (d.path().join("k.ext4"), d.path().join("m.ext4"));
        let uuid = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            build_as(&src, &k, uuid, u, Fill::Kernel).unwrap(),
            Fill::Kernel
        );
        assert_eq!(
            build_as(&src, &m, uuid, u, Fill::Mke2fs).unwrap(),
            Fill::Mke2fs
        );
        let paths = [
            "/f", "/d", "/d/e", "/d/hl", "/d/link", "/d/out", "/d/p", "/sparse",
        ];
        for p in paths {
            assert_eq!(describe(&k, p), describe(&m, p), "{p}");
        }
        let f = describe(&k, "/f");
        assert!(
            f.starts_with("regular Mode: 04755; User: 1234 Group: 5678"),
            "{f}"
        );
        assert!(
            f.contains("Links: 2") && f.ends_with("user.moat (3) = \"yes\""),
            "{f}"
        );
        assert!(describe(&k, "/d/p").starts_with("FIFO Mode: 0640"));
        assert!(describe(&k, "/d/e").starts_with("directory Mode: 01777"));
        assert!(describe(&k, "/d/link").contains("Fast link dest: \"../f\""));
        assert!(describe(&k, "/d/out").contains("Fast link dest: \"/etc\""));
        let cat = Command::new("debugfs")
            .args(["-R", "cat /d/hl"])
            .arg(&k)
            .output()
            .unwrap();
        assert_eq!(cat.stdout, b"hi\n");
        // Neither fill leaves mke2fs's lost+found in a tree without one;
        // a tree's own stays, with what it holds.
        let root_names = |img: &Path| {
            let out = Command::new("debugfs")
                .args(["-R", "ls /"])
                .arg(img)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        for img in [&k, &m] {
            let names = root_names(img);
            assert!(names.contains(" d ") || names.contains(" d\n"), "{names}");
            assert!(!names.contains("lost+found"), "{names}");
        }
        let own = d.path().join("own");
        std::fs::create_dir_all(own.join("lost+found")).unwrap();
        std::fs::write(own.join("lost+found/kept"), b"k").unwrap();
        let (ok, om) = (d.path().join("ok.ext4"), d.path().join("om.ext4"));
        let uo = usage(&own).unwrap();
        build_as(&own, &ok, uuid, uo, Fill::Kernel).unwrap();
        build_as(&own, &om, uuid, uo, Fill::Mke2fs).unwrap();
        for img in [&ok, &om] {
            let cat = Command::new("debugfs")
                .args(["-R", "cat /lost+found/kept"])
                .arg(img)
                .output()
                .unwrap();
            assert_eq!(cat.stdout, b"k", "{}", img.display());
            std::fs::remove_file(img).unwrap();
        }
        std::fs::remove_dir_all(&own).unwrap();
        // Nothing is left: no temporary file or mount point beside the
        // images, no loop device still backed by one, no mount on the host.
        let mut left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["k.ext4", "m.ext4", "src"]);
        let dir = d.path().to_string_lossy().into_owned();
        let backed = || -> Vec<String> {
            std::fs::read_dir("/sys/block")
                .unwrap()
                .flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("loop/backing_file"))
                        .is_ok_and(|b| b.starts_with(&dir))
                })
                .map(|e| e.path().display().to_string())
                .collect()
        };
        // The device detaches itself when the unmount drops its last user;
        // should a kernel do that from a worker, give it a moment (an end
        // state waited for, not a timing asserted).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !backed().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(
            backed().is_empty(),
            "loop devices still backed by the images: {:?}",
            backed()
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&dir), "{mounts}");
    }

    #[test]
    fn a_failed_kernel_fill_falls_back_to_mke2fs() {
        if moat_core::testing::needs_root("a_failed_kernel_fill_falls_back_to_mke2fs") {
            return;
        }
        // A source gone by the time of the copy fails the kernel fill;
        // mke2fs then fails too, its error is the one reported, and neither
        // leaves a file, a mount point or a loop device.
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a"), b"a").unwrap();
        let u = usage(&src).unwrap();
        std::fs::remove_dir_all(&src).unwrap();
        let r = build_as(
            &src,
            &d.path().join("x.ext4"),
            "0123456789abcdef0123456789abcdef",
            u,
            Fill::Kernel,
        );
        assert!(matches!(r, Err(MicrovmError::Mkfs { .. })), "{r:?}");
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
