//! A container's writable layer kept from one of its VMs to the next.
//!
//! Under runc a container writes into its root directory on the host: an
//! engine's snapshot (Docker's and Podman's overlay `diff`, containerd's
//! snapshot, a vfs directory), which outlives the container's process, so
//! `docker stop` then `docker start` (or a restart policy) finds what the
//! container wrote. A microVM's root is a read-only image of that directory
//! under an overlay in the guest whose upper layer is an ext4 disk
//! ([`crate::disk::scratch`]); made per `create`, it went with `delete`,
//! and what the container had written with it.
//!
//! The layer of a root whose writable directory is not moat's own (not
//! under its state root) is therefore **kept**: `layers/<key>.ext4` in the
//! microVM cache, keyed by the host path of that directory, with a record
//! (`<key>.json`: the path, its inode and birth time). The next `create` of a container
//! on the same directory attaches the same layer; the guest syncs it before
//! reporting the container's exit (`proto::RunRequest::keep_layer`). A kept
//! layer goes when its directory has gone (the engine removed the container:
//! `docker rm`) or was made anew (another inode or birth time), found by the [`sweep`]
//! every `create` runs first. A layer in use is locked (`flock`, held by the
//! VMM through its descriptor): a second container on the same directory at
//! the same time gets a layer of its own, for that VM only, with a warning.
//!
//! The host never mounts a layer, nor reads more of it than its superblock's
//! magic number and UUID (the guest finds the disk by its UUID).
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::pod::unescape_mountinfo as unescape;
use crate::{disk, MicrovmError};

/// The kept layers' directory in the microVM cache.
pub const DIR: &str = "layers";

/// What a kept layer belongs to, and where its mirror stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    /// The host directory that holds the container's writes under runc.
    dir: PathBuf,
    /// Its inode and birth time (nanoseconds; 0 where the file system
    /// keeps none) when the layer was made: a directory made anew at the
    /// same path (another container), even on the inode the old one freed,
    /// does not get the old one's layer.
    ino: u64,
    #[serde(default)]
    born: u128,
    #[serde(default)]
    mirror: Mirror,
}

/// Where a kept layer's mirror stands: what the host's root directory
/// holds of the layer's writes (`crate::mirror`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Mirror {
    /// The UUID of the image the layer lies over (made before this was
    /// recorded: none; such a layer stays over whatever image its root
    /// gets, as before).
    #[serde(default)]
    base: Option<String>,
    /// The digest (`tree_cache::tree_digest`, hex) of the layer's
    /// directory (the root itself, or an overlay root's upper directory:
    /// what an engine changes on the host) since the layer's writes were
    /// last applied to the root (or since the layer was made): while the
    /// directory still has it, nothing but the mirror changed the root,
    /// and the layer over `base` stands for it.
    #[serde(default)]
    tree: Option<String>,
    /// The guest's time when the last whole mirror began: the next asks
    /// for what changed since (0: everything in the layer).
    #[serde(default)]
    since_ns: i64,
}

impl Record {
    /// Whether `self` is the record of the directory `other` names (its
    /// path, inode and birth time).
    fn same_dir(&self, other: &Record) -> bool {
        self.dir == other.dir && self.ino == other.ino && self.born == other.born
    }

    fn of(dir: &Path, m: &std::fs::Metadata) -> Record {
        Record {
            mirror: Mirror::default(),
            dir: dir.to_owned(),
            ino: m.ino(),
            born: m
                .created()
                .ok()
                .and_then(|t| t.duration_since(std::time::SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos()),
        }
    }
}

/// A kept layer, locked for this container's VM.
#[derive(Debug)]
pub struct Kept {
    /// Open read-write; its `flock` lasts as long as this descriptor (the
    /// VMM's copy of it) is open.
    pub file: File,
    /// The file system's UUID, 32 hex digits.
    pub uuid: String,
    /// `layers/<key>.ext4`.
    pub path: PathBuf,
    /// Made by this `create`: removed if the `create` fails.
    pub made: bool,
    /// What the guest mirrors: what changed since this time
    /// (`proto::RunRequest::mirror_since`).
    pub since_ns: i64,
    /// `layers/<key>.mirror`, where the VMM keeps the guest's mirror
    /// stream until [`settle`] applies it.
    pub stream: PathBuf,
}

/// What [`open`] found.
#[derive(Debug)]
pub enum Opened {
    Kept(Kept),
    /// Another VM holds the layer of this directory.
    Busy,
}

/// The host directory whose contents a container on `rootfs` writes under
/// runc, by a path that outlives the container's mounts: `rootfs` itself
/// when it is a plain directory (Docker's and Podman's vfs, a bundle's
/// rootfs); an overlay's upper directory when `rootfs` is an overlay's
/// mount point (Docker's and Podman's overlay drivers, containerd's
/// overlayfs snapshotter: an engine unmounts, and may remove, the mount
/// point when the container stops, never the upper directory); the same
/// directory by another mount's path when `rootfs` is a bind mount
/// (containerd's native snapshotter). None when there is none such (an
/// overlay without an upper directory, a bind mount of what no other mount
/// shows): the layer then lasts one VM.
pub fn writable_dir(rootfs: &Path, mountinfo: &str) -> Option<PathBuf> {
    let r = rootfs.canonicalize().ok()?;
    let mounts: Vec<Mount> = mountinfo.lines().filter_map(Mount::parse).collect();
    // The last mount listed at a point is the one on top.
    let Some(m) = mounts.iter().rev().find(|m| m.point == r) else {
        return Some(r);
    };
    if m.fstype == "overlay" {
        let upper = m.layers("upperdir").pop()??;
        return upper.is_dir().then_some(upper);
    }
    let here = std::fs::metadata(&r).ok()?;
    mounts
        .iter()
        .filter(|o| o.dev == m.dev && !o.point.starts_with(&r))
        .filter_map(|o| Some(o.point.join(m.root.strip_prefix(&o.root).ok()?)))
        .find(|p| {
            std::fs::metadata(p)
                .is_ok_and(|md| md.is_dir() && md.dev() == here.dev() && md.ino() == here.ino())
        })
}

/// One line of `/proc/self/mountinfo`, the fields [`writable_dir`] (and
/// `tree_cache`'s overlay map) read.
pub(crate) struct Mount {
    /// `major:minor` of the file system.
    pub dev: String,
    /// The mount's root within its file system.
    pub root: PathBuf,
    pub point: PathBuf,
    pub fstype: String,
    /// The file system's (super block's) options.
    pub options: String,
}

impl Mount {
    /// An overlay's layer directories named by its option `key`
    /// (`upperdir`, `lowerdir`: colon-separated), as absolute paths; None
    /// for one that cannot be resolved. Docker's overlay2 and
    /// containers/storage name the layers relative to their driver's home
    /// (`<home>/<id>/merged`) when the absolute paths would not fit the
    /// mount's options.
    pub(crate) fn layers(&self, key: &str) -> Vec<Option<PathBuf>> {
        let prefix = format!("{key}=");
        self.options
            .split(',')
            .filter_map(|o| o.strip_prefix(prefix.as_str()))
            .flat_map(|v| v.split(':'))
            .map(|l| {
                let p = PathBuf::from(unescape(l));
                if p.is_absolute() {
                    Some(p)
                } else {
                    Some(self.point.parent()?.parent()?.join(p))
                }
            })
            .collect()
    }

    pub(crate) fn parse(line: &str) -> Option<Mount> {
        let (head, tail) = line.split_once(" - ")?;
        let f: Vec<&str> = head.split(' ').collect();
        let t: Vec<&str> = tail.split(' ').collect();
        Some(Mount {
            dev: (*f.get(2)?).to_string(),
            root: PathBuf::from(unescape(f.get(3)?)),
            point: PathBuf::from(unescape(f.get(4)?)),
            fstype: (*t.first()?).to_string(),
            options: (*t.get(2)?).to_string(),
        })
    }
}

/// How long [`open`] waits for a held layer to be let go: a stopped
/// container's processes may still be on their way out (SIGKILLed by
/// `delete`, their descriptors closed as they exit) when the engine's next
/// `create` comes.
pub const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The image the root gets under its layer, as `create` found it
/// (`tree_cache::image_over`).
#[derive(Clone, Copy)]
pub struct Lower<'a> {
    /// Its UUID.
    pub uuid: &'a str,
    /// The digest of the layer's directory now, for a new layer's record
    /// (asked only when one is made).
    pub tree: &'a dyn Fn() -> Option<String>,
    /// It is the layer's base: the root is what the two stand for.
    pub on_base: bool,
}

/// The kept layer of `dir` (from [`writable_dir`]) in `store`, made if there
/// is none yet, and locked; [`Opened::Busy`] if another holds it for
/// longer than `wait`. A layer found is kept only over its base image
/// (`lower.on_base`): otherwise the root changed outside its VMs (an
/// engine's `docker cp`, or a new image of it) and has all the layer's
/// mirrored writes, and the layer starts anew over `lower`.
pub fn open(
    store: &Path,
    dir: &Path,
    wait: std::time::Duration,
    lower: Lower<'_>,
) -> Result<Opened, MicrovmError> {
    let meta =
        std::fs::metadata(dir).map_err(MicrovmError::io(format!("stat {}", dir.display())))?;
    disk::ensure_dir(store)?;
    let key = key(dir);
    let img = store.join(format!("{key}.ext4"));
    let rec_path = store.join(format!("{key}.json"));
    let stream = img.with_extension(STREAM);
    let want = Record {
        mirror: Mirror {
            base: Some(lower.uuid.to_string()),
            tree: None,
            since_ns: 0,
        },
        ..Record::of(dir, &meta)
    };
    // A few rounds: another `create` may make, or the sweep remove, the
    // same layer at the same time.
    for _ in 0..4 {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
        {
            Ok(file) => {
                if !lock_within(&file, wait)? {
                    return Ok(Opened::Busy);
                }
                // Still the file at that name (not one a sweep removed
                // between the open and the lock)?
                if !same_file(&file, &img) {
                    continue;
                }
                match read_record(&rec_path).filter(|r| r.same_dir(&want)) {
                    // Over its base; or made before bases were recorded;
                    // or with a stream still to apply (another VM's, which
                    // ended after this `create`'s `settle`): kept, since
                    // the root lacks some of its writes.
                    Some(mut rec)
                        if lower.on_base
                            || rec.mirror.base.is_none()
                            || std::fs::metadata(&stream).is_ok_and(|m| m.len() > 0) =>
                    {
                        let uuid = superblock_uuid(&file, &img)?;
                        if rec.mirror.base.is_none() {
                            rec.mirror = want.mirror.clone();
                            rec.mirror.tree = (lower.tree)();
                            write_record(&rec_path, &rec)?;
                        }
                        return Ok(Opened::Kept(Kept {
                            file,
                            uuid,
                            path: img,
                            made: false,
                            since_ns: rec.mirror.since_ns,
                            stream,
                        }));
                    }
                    Some(_) => tracing::debug!(
                        "microvm: {} is not what its kept layer and that layer's image stand for (changed on the host, or the image left the cache): the layer starts anew",
                        dir.display()
                    ),
                    // Another directory's at the same path (made anew), or
                    // a `create` died between the image and its record:
                    // its writes are no container's now.
                    None => {}
                }
                remove(&img);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let tmp = store.join(format!("{key}.{}.tmp", std::process::id()));
                let _ = std::fs::remove_file(&tmp);
                let (file, uuid) = disk::scratch(&tmp, true).inspect_err(|_| {
                    let _ = std::fs::remove_file(&tmp);
                })?;
                // A new file: nobody else can hold it.
                lock(&file)?;
                let mut rec = want.clone();
                rec.mirror.tree = (lower.tree)();
                if let Err(e) = write_record(&rec_path, &rec) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                match rename_new(&tmp, &img) {
                    Ok(true) => {
                        let _ = std::fs::remove_file(&stream);
                        return Ok(Opened::Kept(Kept {
                            file,
                            uuid,
                            path: img,
                            made: true,
                            since_ns: 0,
                            stream,
                        }));
                    }
                    // Another `create` made it first: take that one.
                    Ok(false) => {
                        let _ = std::fs::remove_file(&tmp);
                    }
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(e);
                    }
                }
            }
            Err(e) => return Err(MicrovmError::io(format!("open {}", img.display()))(e)),
        }
    }
    Err(MicrovmError::Invalid(format!(
        "the kept writable layer {} changed under this create four times",
        img.display()
    )))
}

/// Removes the kept layer at `img` (`layers/<key>.ext4`), its record and
/// its mirror stream.
pub fn remove(img: &Path) {
    let _ = std::fs::remove_file(img);
    let _ = std::fs::remove_file(img.with_extension("json"));
    let _ = std::fs::remove_file(img.with_extension(STREAM));
}

/// The extension of a layer's mirror stream file.
const STREAM: &str = "mirror";

/// The key of `dir`'s kept layer: its path's SHA-256, 32 hex digits.
fn key(dir: &Path) -> String {
    disk::hex(&Sha256::digest(dir.as_os_str().as_encoded_bytes()))[..32].to_string()
}

/// Removes the kept layers whose directory is gone or was made anew, but
/// not one a VM holds; and the half-made layers and records of `create`s
/// that died (`<name>.<pid>.tmp`, as the cache's builds name theirs).
pub fn sweep(store: &Path) {
    disk::sweep_dead_builds(store);
    let Ok(entries) = std::fs::read_dir(store) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let alive = read_record(&path).is_some_and(|r| {
            std::fs::metadata(&r.dir)
                .is_ok_and(|m| m.is_dir() && Record::of(&r.dir, &m).same_dir(&r))
        });
        if alive {
            continue;
        }
        let img = path.with_extension("ext4");
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
        {
            // Held by a VM (whose directory went while it ran): left for
            // a later sweep.
            Ok(f) if !lock(&f).unwrap_or(false) => {}
            _ => remove(&img),
        }
    }
}

/// Applies the mirror stream the last VM of `dir`'s kept layer left
/// (`layers/<key>.mirror`) to `rootfs`, the container's root directory
/// (whose writable directory `dir` is), once no VM holds the layer (waiting
/// [`BUSY_WAIT`] at most); then records the root's digest, and where the
/// next mirror begins if the stream was whole. A stream that cannot be
/// applied whole is said in a warning: its changes are still in the layer,
/// and the next mirror sends them again. Gives the layer's base for the
/// root's image ([`crate::tree_cache::image_over`]): none when there is
/// no such layer or another VM holds it (then `Settled::busy`), or, with
/// `check`, when the layer's directory is not the root itself and has
/// changed since (the root's image step checks a plain root's digest).
pub fn settle(store: &Path, cache: &Path, dir: &Path, rootfs: &Path, check: bool) -> Settled {
    settle_as(store, cache, dir, rootfs, check, true)
}

/// [`settle`]; `lock`: take the layer's lock first (not when its VM, which
/// holds it, is known to write no more: paused, its mirror sent).
fn settle_as(
    store: &Path,
    cache: &Path,
    dir: &Path,
    rootfs: &Path,
    check: bool,
    lock: bool,
) -> Settled {
    let key = key(dir);
    let img = store.join(format!("{key}.ext4"));
    let rec_path = store.join(format!("{key}.json"));
    let stream = img.with_extension(STREAM);
    let found = std::fs::metadata(dir).ok().and_then(|meta| {
        let rec = read_record(&rec_path).filter(|r| r.same_dir(&Record::of(dir, &meta)))?;
        Some((rec, File::open(&img).ok()?))
    });
    let Some((mut rec, layer)) = found else {
        return Settled::default();
    };
    if lock && !lock_within(&layer, BUSY_WAIT).unwrap_or(false) {
        return Settled {
            base: None,
            busy: true,
        };
    }
    let applied = std::fs::metadata(&stream).is_ok_and(|m| m.len() > 0);
    if applied {
        apply_stream(&stream, cache, dir, rootfs, &mut rec.mirror);
        // The stream goes whether or not it was all applied: `since_ns`
        // still asks the next VM for what it did not bring.
        let kept = write_record(&rec_path, &rec)
            .inspect_err(|e| tracing::warn!("microvm: {}", moat_core::error_chain(e)));
        if kept.is_ok() {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .open(&stream)
                .and_then(|f| f.set_len(0));
        }
    }
    // A plain root's digest is the image step's to compare; an overlay's
    // upper directory (small: the container's own writes) is checked here.
    let plain = rootfs.canonicalize().is_ok_and(|r| r == dir);
    let tree = match rec.mirror.tree {
        Some(t) if plain => Some(Some(t)),
        Some(_) if applied || !check => Some(None),
        Some(t) => crate::tree_cache::digest(cache, dir)
            .ok()
            .filter(|d| disk::hex(d) == t)
            .map(|_| None),
        None => None,
    };
    Settled {
        base: tree
            .zip(rec.mirror.base)
            .map(|(tree, uuid)| crate::tree_cache::Base { tree, uuid }),
        busy: false,
    }
}

/// What [`settle`] found.
#[derive(Debug, Default)]
pub struct Settled {
    /// The layer's base, for the root's image.
    pub base: Option<crate::tree_cache::Base>,
    /// Another VM held the layer for all of [`BUSY_WAIT`].
    pub busy: bool,
}

/// [`settle`] at the container's `delete`, for the layer at `img`: only if
/// `rootfs` still shows that layer's directory (an engine may have
/// unmounted it already; the next `create`, which has it mounted, applies
/// the stream then).
pub fn settle_at_delete(store: &Path, cache: &Path, img: &Path, rootfs: &Path) {
    settle_layer(store, cache, img, rootfs, true);
}

/// [`settle_at_delete`] at the container's `pause`, once its VM (which
/// holds the layer) froze it and sent its mirror: the stream is applied
/// without the layer's lock, and the VM appends to an emptied file.
pub fn settle_held(store: &Path, cache: &Path, img: &Path, rootfs: &Path) {
    settle_layer(store, cache, img, rootfs, false);
}

fn settle_layer(store: &Path, cache: &Path, img: &Path, rootfs: &Path, lock: bool) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let Some(dir) = writable_dir(rootfs, &mountinfo) else {
        return;
    };
    if img.file_stem() != Some(std::ffi::OsStr::new(&key(&dir))) {
        tracing::debug!(
            "microvm: {} is not the kept layer's root any more: its mirror waits for the next create",
            rootfs.display()
        );
        return;
    }
    settle_as(store, cache, &dir, rootfs, false, lock);
}

/// Applies the stream at `path` to `rootfs` (whose writable directory is
/// `dir`) and moves `m` on.
fn apply_stream(path: &Path, cache: &Path, dir: &Path, rootfs: &Path, m: &mut Mirror) {
    let opts = crate::mirror::ApplyOptions {
        // Rootless, files are the user's whoever the guest says owns them.
        owners: rustix::process::geteuid().is_root(),
        keep_setid: reached_by_root_only(rootfs),
    };
    let applied = File::open(path).map_err(|e| e.to_string()).and_then(|f| {
        let root = File::open(rootfs)
            .and_then(|d| match d.metadata()?.is_dir() {
                true => Ok(d),
                false => Err(std::io::Error::other("not a directory")),
            })
            .map_err(|e| format!("open {}: {e}", rootfs.display()))?;
        crate::mirror::apply(&mut std::io::BufReader::new(f), root.as_fd(), opts)
            .map_err(|e| e.to_string())
    });
    match applied {
        Ok(a) => {
            tracing::debug!(
                "microvm: mirrored {} entries ({} bytes) of the kept layer into {}{}",
                a.entries,
                a.bytes,
                rootfs.display(),
                if a.complete {
                    ""
                } else {
                    " (the stream was cut)"
                }
            );
            if a.complete {
                m.since_ns = a.started_ns;
            }
        }
        Err(e) => tracing::warn!(
            "microvm: the container's writes were not all mirrored into {}: {e}",
            rootfs.display()
        ),
    }
    // Whatever was applied, the root holds only the layer's writes beyond
    // its base: the two still stand for it.
    m.tree = crate::tree_cache::digest(cache, dir)
        .inspect_err(|e| {
            tracing::debug!(
                "microvm: no digest of {}: {}",
                dir.display(),
                moat_core::error_chain(e)
            )
        })
        .ok()
        .map(|d| disk::hex(&d));
}

/// Whether only root can reach `path`: a directory on its way (itself
/// among them) lets no other user through (no search permission for
/// others, nor for its group unless that is root's). Docker's and Podman's
/// stores are so; a user's bundle is often not. A set-user-ID file the
/// guest makes keeps that bit on the host only there.
fn reached_by_root_only(path: &Path) -> bool {
    path.ancestors().any(|a| {
        std::fs::symlink_metadata(a).is_ok_and(|m| {
            m.is_dir()
                && m.uid() == 0
                && m.mode() & 0o001 == 0
                && (m.mode() & 0o010 == 0 || m.gid() == 0)
        })
    })
}

/// [`lock`], tried again every 20 ms for `wait`.
fn lock_within(f: &File, wait: std::time::Duration) -> Result<bool, MicrovmError> {
    let until = std::time::Instant::now() + wait;
    loop {
        if lock(f)? {
            return Ok(true);
        }
        if std::time::Instant::now() >= until {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: false when another descriptor holds it.
fn lock(f: &File) -> Result<bool, MicrovmError> {
    match rustix::fs::flock(
        f.as_fd(),
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    ) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(MicrovmError::io("lock a kept writable layer")(e.into())),
    }
}

fn same_file(f: &File, path: &Path) -> bool {
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn read_record(path: &Path) -> Option<Record> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Writes `rec` at `path` whole or not at all (a new file renamed over).
fn write_record(path: &Path, rec: &Record) -> Result<(), MicrovmError> {
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    let text = serde_json::to_vec(rec).map_err(|e| MicrovmError::Invalid(e.to_string()))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &text))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            MicrovmError::io(format!("write {}", path.display()))(e)
        })
}

/// Renames `from` to `to` unless `to` exists: false when it does.
fn rename_new(from: &Path, to: &Path) -> Result<bool, MicrovmError> {
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        rustix::fs::RenameFlags::NOREPLACE,
    ) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::EXIST) => Ok(false),
        Err(e) => Err(MicrovmError::io(format!("rename {}", from.display()))(
            e.into(),
        )),
    }
}

/// Where ext4's super block starts, and its fields [`superblock_uuid`] reads.
const SUPERBLOCK: u64 = 1024;
const MAGIC_AT: usize = 0x38;
const UUID_AT: usize = 0x68;
const EXT4_MAGIC: u16 = 0xEF53;

/// The UUID in the ext4 super block of the layer `f` (at `img`): the guest
/// wrote this file, so it is checked to be ext4 at all; an error names the
/// file (removing it starts the container from its image's root again).
fn superblock_uuid(f: &File, img: &Path) -> Result<String, MicrovmError> {
    let mut sb = [0u8; 0x78];
    f.read_exact_at(&mut sb, SUPERBLOCK)
        .map_err(MicrovmError::io(format!("read {}", img.display())))?;
    if u16::from_le_bytes([sb[MAGIC_AT], sb[MAGIC_AT + 1]]) != EXT4_MAGIC {
        return Err(MicrovmError::Invalid(format!(
            "the container's kept writable layer {} is not an ext4 file system any more (remove it to start from the image's root)",
            img.display()
        )));
    }
    Ok(disk::hex(&sb[UUID_AT..UUID_AT + 16]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_writable_directory_of_a_plain_overlay_and_bound_root() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().canonicalize().unwrap();
        for p in [
            "home/c1/diff",
            "home/c1/merged",
            "snap/5",
            "bundle/rootfs",
            "plain",
        ] {
            std::fs::create_dir_all(base.join(p)).unwrap();
        }
        let b = base.display();
        // Mountinfo lines as the kernel writes them (the mounts themselves
        // are not made: a bind mount is checked by its inode, which the
        // test's directories give through the plain paths below).
        let info = format!(
            "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
             90 22 0:77 / {b}/home/c1/merged rw,relatime - overlay overlay rw,lowerdir=/l/1:/l/2,upperdir={b}/home/c1/diff,workdir={b}/home/c1/work\n\
             91 22 0:78 / {b}/home/c2/merged rw,relatime - overlay overlay rw,lowerdir=l/A,upperdir=c1/diff,workdir=c1/work\n\
             92 22 254:0 {b}/snap/5 {b}/bundle/rootfs rw,relatime - ext4 /dev/vda rw\n"
        );
        // A plain directory is its own.
        assert_eq!(
            writable_dir(&base.join("plain"), &info),
            Some(base.join("plain"))
        );
        // An overlay's mount point: its upper directory, by an absolute or
        // a relative (to the driver's home) path.
        assert_eq!(
            writable_dir(&base.join("home/c1/merged"), &info),
            Some(base.join("home/c1/diff"))
        );
        std::fs::create_dir_all(base.join("home/c2/merged")).unwrap();
        assert_eq!(
            writable_dir(&base.join("home/c2/merged"), &info),
            Some(base.join("home/c1/diff"))
        );
        // A bind mount (here not made: the "mount point" is a directory of
        // its own, another inode than the source's, so no path of the
        // root file system shows the same directory).
        assert_eq!(writable_dir(&base.join("bundle/rootfs"), &info), None);
        // An overlay without an upper directory: none.
        let ro = format!(
            "22 1 254:0 / / rw - ext4 /dev/vda rw\n93 22 0:79 / {b}/plain ro - overlay overlay ro,lowerdir=/a:/b\n"
        );
        assert_eq!(writable_dir(&base.join("plain"), &ro), None);
        // Missing: none.
        assert_eq!(writable_dir(&base.join("nowhere"), &info), None);
    }

    /// Real mounts, as an engine makes them (in a mount namespace of a
    /// child's own): an overlay and a bind mount, read back through the
    /// kernel's own `/proc/self/mountinfo`.
    #[test]
    fn the_writable_directory_of_real_overlay_and_bind_mounts() {
        use nix::mount::{mount, MsFlags};
        let d = tempfile::tempdir().unwrap();
        let base = d.path().canonicalize().unwrap();
        for p in [
            "l",
            "c/diff",
            "c/work",
            "c/merged",
            "snap/5",
            "bundle/rootfs",
        ] {
            std::fs::create_dir_all(base.join(p)).unwrap();
        }
        let code = moat_sys::process::run_in_child(libc::CLONE_NEWNS, || {
            let none: Option<&str> = None;
            if mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).is_err() {
                return 10;
            }
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                base.join("l").display(),
                base.join("c/diff").display(),
                base.join("c/work").display()
            );
            let merged = base.join("c/merged");
            if mount(
                Some("overlay"),
                &merged,
                Some("overlay"),
                MsFlags::empty(),
                Some(opts.as_str()),
            )
            .is_err()
            {
                return 11;
            }
            let rootfs = base.join("bundle/rootfs");
            if mount(
                Some(&base.join("snap/5")),
                &rootfs,
                none,
                MsFlags::MS_BIND,
                none,
            )
            .is_err()
            {
                return 12;
            }
            let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            if writable_dir(&merged, &info) != Some(base.join("c/diff")) {
                return 1;
            }
            if writable_dir(&rootfs, &info) != Some(base.join("snap/5")) {
                return 2;
            }
            0
        })
        .unwrap();
        assert_eq!(
            code, 0,
            "1: the overlay's, 2: the bind mount's; 1x: a mount failed"
        );
    }

    /// The image a test's layer lies over, as `create` would find it when
    /// nothing but the mirror changed the root.
    const BASE: Lower<'static> = Lower {
        uuid: "0123456789abcdef0123456789abcdef",
        tree: &no_tree,
        on_base: true,
    };

    fn no_tree() -> Option<String> {
        None
    }

    #[test]
    fn a_layer_stays_only_over_its_base_or_with_writes_the_root_lacks() {
        let d = tempfile::tempdir().unwrap();
        let store = d.path().join("layers");
        let dir = d.path().join("upper");
        std::fs::create_dir(&dir).unwrap();
        let Opened::Kept(first) = open(&store, &dir, Duration::ZERO, BASE).unwrap() else {
            panic!("busy");
        };
        let (uuid, stream) = (first.uuid.clone(), first.stream.clone());
        drop(first);
        // Over another image (the root changed on the host): anew.
        let other = Lower {
            on_base: false,
            uuid: "fedcba9876543210fedcba9876543210",
            ..BASE
        };
        let Opened::Kept(second) = open(&store, &dir, Duration::ZERO, other).unwrap() else {
            panic!("busy");
        };
        assert!(second.made);
        assert_ne!(second.uuid, uuid);
        let uuid = second.uuid.clone();
        drop(second);
        // With a stream not yet applied (another VM's): kept, whatever
        // the image, since the root lacks those writes.
        std::fs::write(&stream, b"moat-mirror-1").unwrap();
        let not_base = Lower {
            on_base: false,
            ..BASE
        };
        let Opened::Kept(third) = open(&store, &dir, Duration::ZERO, not_base).unwrap() else {
            panic!("busy");
        };
        assert!(!third.made);
        assert_eq!(third.uuid, uuid);
        drop(third);
        // A record from before bases were recorded: kept, and given one.
        std::fs::remove_file(&stream).unwrap();
        let rec = store.join(format!("{}.json", key(&dir)));
        let mut old: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
        old.as_object_mut().unwrap().remove("mirror");
        std::fs::write(&rec, old.to_string()).unwrap();
        let Opened::Kept(fourth) = open(&store, &dir, Duration::ZERO, not_base).unwrap() else {
            panic!("busy");
        };
        assert!(!fourth.made);
        assert_eq!(
            read_record(&rec).unwrap().mirror.base.as_deref(),
            Some(BASE.uuid)
        );
    }

    #[test]
    fn settle_applies_the_pending_mirror_and_records_where_the_next_begins() {
        let d = tempfile::tempdir().unwrap();
        let store = d.path().join("layers");
        let cache = d.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        let root = d.path().join("rootfs");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("old"), "old").unwrap();
        let Opened::Kept(k) = open(&store, &root, Duration::ZERO, BASE).unwrap() else {
            panic!("busy");
        };
        // What a guest would send: a tree of its own, in full.
        let guest = d.path().join("guest");
        std::fs::create_dir_all(guest.join("etc")).unwrap();
        std::fs::write(guest.join("etc/new"), "new").unwrap();
        let mut bytes = Vec::new();
        crate::mirror::write_changes(&guest, &guest, 0, &mut bytes).unwrap();
        std::fs::write(&k.stream, &bytes).unwrap();
        // Not while its VM holds the layer.
        let held = settle(&store, &cache, &root, &root, true);
        assert!(held.busy && held.base.is_none());
        assert!(!root.join("etc/new").exists());
        drop(k);
        let s = settle(&store, &cache, &root, &root, true);
        assert!(!s.busy);
        assert_eq!(
            std::fs::read_to_string(root.join("etc/new")).unwrap(),
            "new"
        );
        assert!(
            !root.join("old").exists(),
            "the guest's root listing prunes it"
        );
        let base = s.base.expect("a base");
        assert_eq!(base.uuid, BASE.uuid);
        let digest = crate::tree_cache::tree_digest(&root).unwrap();
        assert_eq!(base.tree, Some(disk::hex(&digest)));
        let rec = read_record(&store.join(format!("{}.json", key(&root)))).unwrap();
        assert!(rec.mirror.since_ns > 0);
        assert_eq!(
            std::fs::metadata(store.join(format!("{}.mirror", key(&root))))
                .unwrap()
                .len(),
            0
        );
        // A cut stream: applied as far as it goes; the next mirror still
        // begins where the last whole one did.
        std::fs::write(
            store.join(format!("{}.mirror", key(&root))),
            &bytes[..bytes.len() - 3],
        )
        .unwrap();
        std::fs::remove_file(root.join("etc/new")).unwrap();
        settle(&store, &cache, &root, &root, true);
        assert!(root.join("etc/new").exists());
        let again = read_record(&store.join(format!("{}.json", key(&root)))).unwrap();
        assert_eq!(again.mirror.since_ns, rec.mirror.since_ns);
    }

    #[test]
    fn an_overlay_roots_layer_keeps_its_base_while_its_upper_directory_is_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let store = d.path().join("layers");
        let cache = d.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        // The root is another directory (an overlay's mount point, as far
        // as `settle` is concerned); the layer's is its upper directory.
        let (root, upper) = (d.path().join("merged"), d.path().join("diff"));
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&upper).unwrap();
        std::fs::write(upper.join("kept"), "1").unwrap();
        let cache2 = cache.clone();
        let upper2 = upper.clone();
        let tree = move || {
            crate::tree_cache::digest(&cache2, &upper2)
                .ok()
                .map(|x| disk::hex(&x))
        };
        let lower = Lower {
            tree: &tree,
            ..BASE
        };
        let Opened::Kept(k) = open(&store, &upper, Duration::ZERO, lower).unwrap() else {
            panic!("busy");
        };
        drop(k);
        // Unchanged: the base, already checked (no digest for the image
        // step to compare).
        let s = settle(&store, &cache, &upper, &root, true);
        let base = s.base.expect("its base");
        assert_eq!((base.uuid.as_str(), base.tree), (BASE.uuid, None));
        // At `delete`, nothing is checked.
        assert!(settle(&store, &cache, &upper, &root, false).base.is_some());
        // Changed on the host (`docker cp` into the stopped container):
        // no base, and the layer starts anew.
        std::fs::write(upper.join("kept"), "2").unwrap();
        assert!(settle(&store, &cache, &upper, &root, true).base.is_none());
    }

    #[test]
    fn a_kept_layer_is_found_again_locked_and_swept_with_its_directory() {
        let d = tempfile::tempdir().unwrap();
        let store = d.path().join("layers");
        let dir = d.path().join("upper");
        std::fs::create_dir(&dir).unwrap();
        let Opened::Kept(first) = open(&store, &dir, Duration::ZERO, BASE).unwrap() else {
            panic!("a new layer is not busy");
        };
        assert!(first.made);
        assert_eq!(first.uuid.len(), 32);
        assert_eq!(first.file.metadata().unwrap().len(), disk::SCRATCH_BYTES);
        // Held: a second open is told so, after its wait.
        assert!(matches!(
            open(&store, &dir, Duration::ZERO, BASE).unwrap(),
            Opened::Busy
        ));
        // Let go during the wait: taken.
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
        });
        let Opened::Kept(waited) = open(&store, &dir, Duration::from_secs(10), BASE).unwrap()
        else {
            panic!("let go, yet busy");
        };
        holder.join().unwrap();
        assert!(!waited.made);
        let first = waited;
        // The sweep leaves a live directory's layer.
        sweep(&store);
        assert!(first.path.exists());
        let (path, uuid) = (first.path.clone(), first.uuid.clone());
        drop(first);
        let Opened::Kept(again) = open(&store, &dir, Duration::ZERO, BASE).unwrap() else {
            panic!("released, yet busy");
        };
        assert!(!again.made);
        assert_eq!(
            (again.path.clone(), again.uuid.clone()),
            (path.clone(), uuid.clone())
        );
        // Its directory removed while a VM holds it: kept for now.
        std::fs::remove_dir(&dir).unwrap();
        sweep(&store);
        assert!(path.exists());
        drop(again);
        // Made anew at the same path: another container's, a new layer.
        std::fs::create_dir(&dir).unwrap();
        let Opened::Kept(fresh) = open(&store, &dir, Duration::ZERO, BASE).unwrap() else {
            panic!("busy");
        };
        assert!(fresh.made);
        assert_ne!(fresh.uuid, uuid);
        drop(fresh);
        // Gone: the sweep removes the layer and its record.
        std::fs::remove_dir(&dir).unwrap();
        std::fs::write(store.join("abc.4000000000.tmp"), "").unwrap();
        sweep(&store);
        let left: Vec<_> = std::fs::read_dir(&store).unwrap().flatten().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_layer_that_is_not_ext4_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let store = d.path().join("layers");
        let dir = d.path().join("upper");
        std::fs::create_dir(&dir).unwrap();
        let Opened::Kept(k) = open(&store, &dir, Duration::ZERO, BASE).unwrap() else {
            panic!("busy");
        };
        k.file
            .write_all_at(&[0u8; 2], SUPERBLOCK + MAGIC_AT as u64)
            .unwrap();
        let path = k.path.clone();
        drop(k);
        let e = open(&store, &dir, Duration::ZERO, BASE)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("not an ext4"), "{e}");
    }
}
