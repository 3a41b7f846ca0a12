//! Images of trees moat does not manage (an engine's bundle rootfs, a
//! read-only volume, a `--read-write` root's copy), cached by **content**:
//! two containers of one image (Docker's, Podman's, a Kubernetes pod's)
//! have rootfs directories of their own, copies with the same files, so a
//! per-container image made each of them copy the whole tree again at its
//! `create` (~0.5 s for a 118 MB rootfs here, seconds for the usual
//! language images). The key is a SHA-256 of the tree as an image holds
//! it ([`tree_digest`]: every entry's path, type, mode, owners, extended
//! attributes, device numbers, symlink target, hard links and every
//! regular file's bytes) — never of paths or times alone, so a tree can
//! only ever get an image of exactly its own files, whoever made the
//! image first. What the key leaves out are timestamps: the image keeps
//! those of the tree it was first made from (an engine's copies of one
//! image differ in little else: the files it writes for each container,
//! `/etc/hostname` and the like, carry the time of that `create`).
//!
//! A miss images the tree under a name no lookup sees, hashes the tree
//! again and only then renames the image into place, so a tree that
//! changed while it was copied never gets cached under the key of what it
//! was before; such a build is thrown away and the caller images the tree
//! per container instead. Kept: the [`KEPT`] images used last (a hit
//! refreshes its mtime), but none used in the last [`IN_USE`] (a `create`
//! may be about to open it; a running VM holds its own descriptor). The
//! images are read-only to the guests (their writes go to a tmpfs), and
//! not shared disks for primed snapshots (`Guest::shared`): their
//! containers' configs differ from run to run (an engine's hostname,
//! bind sources), so a held container would rarely be taken.
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::disk::{self, DiskImage};
use crate::MicrovmError;

/// How many content-cached images are kept.
pub const KEPT: usize = 16;
/// An image used this recently is never removed to make room.
pub const IN_USE: Duration = Duration::from_secs(600);
/// The most entries a tree may have to be hashed (as an image may).
const MAX_ENTRIES: u64 = 4_000_000;
/// The cached images' names: `tree-<24 hex digits>.ext4`.
const PREFIX: &str = "tree-";

/// The image of `source` from the content cache in `cache`, made now if
/// missing. `None` when the tree changed while it was imaged (the caller
/// images it per container). An error when the tree cannot be read whole.
pub fn image(cache: &Path, source: &Path) -> Result<Option<DiskImage>, MicrovmError> {
    Ok(image_over(cache, source, None)?.map(|i| i.image))
}

/// The image a kept writable layer lies over (`crate::layer`), and the
/// digest of the host tree the two together stand for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    /// The tree's [`tree_digest`] (hex) it stands for; None when the
    /// caller checked already (an overlay root's upper directory).
    pub tree: Option<String>,
    /// The image's UUID (32 hex digits), which names it in the cache.
    pub uuid: String,
}

/// What [`image_over`] gave.
#[derive(Debug)]
pub struct Imaged {
    pub image: DiskImage,
    /// The tree's [`tree_digest`].
    pub digest: [u8; 32],
    /// `image` is the `base` asked for: the tree is what that image and
    /// its kept layer stand for (the layer's writes mirrored into it).
    pub on_base: bool,
}

/// [`image`], for a root with a kept writable layer over `base`: when the
/// tree's digest is still the one `base` records (nothing but the layer's
/// mirror changed it since) and that image is still cached, that image,
/// rather than an image of the tree as it is (which would hold the
/// layer's writes a second time, and cost a build after every run that
/// wrote).
pub fn image_over(
    cache: &Path,
    source: &Path,
    base: Option<&Base>,
) -> Result<Option<Imaged>, MicrovmError> {
    let mut known = hashes(cache);
    let key = tree_digest_with(source, &mut known)?;
    tracing::debug!(
        "microvm: digest of {}: {} files' hashes known, {} read",
        source.display(),
        known.hits,
        known.misses
    );
    if let Some(b) = base.filter(|b| b.tree.as_ref().is_none_or(|t| *t == disk::hex(&key))) {
        if let Some(path) = image_path(cache, &b.uuid).filter(|p| p.is_file()) {
            known.save();
            touch(&path);
            tracing::debug!(
                "microvm: image of {} under its kept layer ({})",
                source.display(),
                path.display()
            );
            return Ok(Some(Imaged {
                image: DiskImage {
                    path,
                    uuid: b.uuid.clone(),
                },
                digest: key,
                on_base: true,
            }));
        }
    }
    let found = |image| Imaged {
        image,
        digest: key,
        on_base: false,
    };
    let uuid = disk::hex(&key[..16]);
    let path = cache.join(format!("{PREFIX}{}.ext4", &uuid[..24]));
    if path.is_file() {
        known.save();
        touch(&path);
        tracing::debug!(
            "microvm: image of {} from the content cache ({})",
            source.display(),
            path.display()
        );
        return Ok(Some(found(DiskImage { path, uuid })));
    }
    disk::ensure_dir(cache)?;
    disk::sweep_dead_builds(cache);
    // A name of this build's own (`<name>.<pid>.tmp` while `build` writes
    // it, which a later build sweeps if this process dies).
    let staging = cache.join(format!(
        "{PREFIX}{}.staging.{}",
        &uuid[..24],
        std::process::id()
    ));
    disk::build_image(source, &staging, &uuid)?;
    let unchanged = tree_digest_with(source, &mut known).is_ok_and(|k| k == key);
    known.save();
    if !unchanged {
        let _ = std::fs::remove_file(&staging);
        tracing::info!(
            "microvm: {} changed while it was imaged: imaged for this container alone",
            source.display()
        );
        return Ok(None);
    }
    std::fs::rename(&staging, &path).map_err(|e| {
        let _ = std::fs::remove_file(&staging);
        MicrovmError::io(format!("rename {}", path.display()))(e)
    })?;
    tracing::debug!(
        "microvm: imaged {} into the content cache ({})",
        source.display(),
        path.display()
    );
    trim(cache, &path);
    Ok(Some(found(DiskImage { path, uuid })))
}

/// The cached image whose UUID is `uuid` (32 hex digits), by name; None
/// for anything else.
fn image_path(cache: &Path, uuid: &str) -> Option<PathBuf> {
    (uuid.len() == 32 && uuid.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| cache.join(format!("{PREFIX}{}.ext4", &uuid[..24])))
}

/// The cache's [`FileHashes`].
fn hashes(cache: &Path) -> FileHashes {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    FileHashes::load(&cache.join(HASHES), &mountinfo)
}

/// [`tree_digest`] of `source`, through the cache's [`FileHashes`] (and
/// learning into them).
pub fn digest(cache: &Path, source: &Path) -> Result<[u8; 32], MicrovmError> {
    let mut known = hashes(cache);
    let key = tree_digest_with(source, &mut known)?;
    known.save();
    Ok(key)
}

/// Marks `image` used now (its mtime), for [`trim`].
fn touch(image: &Path) {
    if let Ok(f) = std::fs::File::open(image) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Removes the least recently used content-cached images beyond [`KEPT`],
/// never `keep` nor one used within [`IN_USE`]; and staging files whose
/// builder is gone.
fn trim(cache: &Path, keep: &Path) {
    let Ok(rd) = std::fs::read_dir(cache) else {
        return;
    };
    let mut images: Vec<(SystemTime, PathBuf)> = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with(PREFIX) {
            continue;
        }
        if let Some(pid) = name.rsplit_once(".staging.").map(|(_, pid)| pid) {
            if !pid.parse::<u32>().is_ok_and(disk::builder_lives) {
                let _ = std::fs::remove_file(&p);
            }
            continue;
        }
        if p.extension().is_some_and(|x| x == "ext4") && p != keep {
            if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                images.push((m, p));
            }
        }
    }
    // `keep` counts among the kept.
    let room = KEPT.saturating_sub(1);
    if images.len() <= room {
        return;
    }
    images.sort();
    let excess = images.len() - room;
    let now = SystemTime::now();
    for (used, p) in images.into_iter().take(excess) {
        if now.duration_since(used).unwrap_or_default() < IN_USE {
            continue;
        }
        match std::fs::remove_file(&p) {
            Ok(()) => tracing::debug!("microvm: removed {} (used least recently)", p.display()),
            Err(e) => tracing::debug!("microvm: cannot remove {}: {e}", p.display()),
        }
    }
}

/// A SHA-256 of the tree at `root` as its image holds it: for every entry,
/// in a fixed order (names sorted bytewise, depth first), its path under
/// `root`, type, permission bits, owner, group and extended attributes
/// (file capabilities, ACLs, SELinux labels, overlay whiteout marks), and
/// a directory's entries, a symlink's target, a device's numbers, a
/// regular file's bytes — or, for a second name of a file already seen,
/// that first name (a hard link in the image too). Timestamps are left
/// out. Symlinks are never followed. An entry that cannot be read is an
/// error: its image could not be a copy of it. One thread: the runtime
/// starts none (it forks, and checks it has one thread before each fork;
/// a hashing thread joined moments before still counted there, 1 run in 5).
pub fn tree_digest(root: &Path) -> Result<[u8; 32], MicrovmError> {
    tree_digest_with(root, &mut FileHashes::none())
}

/// [`tree_digest`], a regular file's bytes standing in it as their SHA-256,
/// taken from `known` when the file is one read before (and unchanged:
/// [`FileHashes`]), else read, and learnt.
pub fn tree_digest_with(root: &Path, known: &mut FileHashes) -> Result<[u8; 32], MicrovmError> {
    let mut h = Sha256::new();
    h.update(b"moat-tree-2\0");
    let mut w = Walk {
        root,
        links: HashMap::new(),
        entries: 0,
        buf: vec![0u8; 1 << 20],
        known,
    };
    w.entry(&mut h, root, b"")?;
    Ok(h.finalize().into())
}

/// The file of [`FileHashes`] in the cache.
const HASHES: &str = "file-hashes";
/// One record of it: a file's identity (16 bytes), its bytes' SHA-256.
const RECORD: usize = 48;
/// At most this many records are kept (3 MiB): past it, the file is
/// rewritten with the records of the last walk only. Every walk loads the
/// whole file: 2^16 records took 5–12 ms here, 2^18 took 25–55 ms (most of
/// it page faults of this VM), one image of 4 000 files well under 1 ms.
const MAX_RECORDS: usize = 1 << 16;

/// The SHA-256 of regular files' bytes already read, by the file's
/// identity: its file system's device, inode, birth, change and
/// modification times (nanoseconds) and size. A file whose bytes change
/// gets a new change time from the kernel (no call sets it), so a known
/// identity has the bytes it had when read; a new file on a reused inode
/// has a new birth and change time. An engine's containers of one image
/// share its layers' files: through each container's overlay mount they
/// show the overlay's device, so the device of an overlay whose layers all
/// are on one file system (its inode numbers are then the layers' own) is
/// that file system's. Kept in the cache (`file-hashes`, the runtime's
/// alone), so a second container of an image reads none of its files
/// again (measured: docs/performance.md).
pub struct FileHashes {
    path: Option<PathBuf>,
    known: HashMap<[u8; 16], [u8; 32], IdentityHash>,
    /// Those this walk found known, and those it learnt (not saved yet).
    used: Vec<([u8; 16], [u8; 32])>,
    learnt: Vec<([u8; 16], [u8; 32])>,
    /// Records in the file when it was loaded.
    on_file: usize,
    /// Overlay devices mapped to their layers' file system's.
    overlays: HashMap<u64, u64>,
    pub hits: usize,
    pub misses: usize,
}

impl FileHashes {
    /// None known, none kept.
    pub fn none() -> FileHashes {
        FileHashes {
            path: None,
            known: HashMap::default(),
            used: Vec::new(),
            learnt: Vec::new(),
            on_file: 0,
            overlays: HashMap::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// Those kept at `path` (none if it cannot be read), with the overlays
    /// of `mountinfo`.
    pub fn load(path: &Path, mountinfo: &str) -> FileHashes {
        let mut f = FileHashes::none();
        let bytes = std::fs::read(path).unwrap_or_default();
        f.known.reserve(bytes.len() / RECORD);
        for r in bytes.chunks_exact(RECORD) {
            let mut k = [0u8; 16];
            let mut v = [0u8; 32];
            k.copy_from_slice(&r[..16]);
            v.copy_from_slice(&r[16..]);
            f.known.insert(k, v);
        }
        f.on_file = bytes.len() / RECORD;
        f.path = Some(path.to_owned());
        f.overlays = same_fs_overlays(mountinfo);
        f
    }

    /// The identity of the file `m` describes.
    fn identity(&self, m: &std::fs::Metadata) -> [u8; 16] {
        let dev = self.overlays.get(&m.dev()).copied().unwrap_or(m.dev());
        let born = m
            .created()
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let mut h = Sha256::new();
        h.update(b"moat-file-1\0");
        h.update(dev.to_le_bytes());
        h.update(m.ino().to_le_bytes());
        h.update(born.to_le_bytes());
        h.update(m.ctime().to_le_bytes());
        h.update(m.ctime_nsec().to_le_bytes());
        h.update(m.mtime().to_le_bytes());
        h.update(m.mtime_nsec().to_le_bytes());
        h.update(m.len().to_le_bytes());
        let mut k = [0u8; 16];
        k.copy_from_slice(&h.finalize()[..16]);
        k
    }

    fn get(&mut self, id: &[u8; 16]) -> Option<[u8; 32]> {
        let v = *self.known.get(id)?;
        self.hits += 1;
        self.used.push((*id, v));
        Some(v)
    }

    fn learn(&mut self, id: [u8; 16], hash: [u8; 32]) {
        if self.known.insert(id, hash).is_none() {
            self.learnt.push((id, hash));
        }
    }

    /// Appends what this walk learnt to the file (one write; concurrent
    /// runtimes' appends do not mix); past [`MAX_RECORDS`], rewrites it
    /// with this walk's records alone. Failures only cost a later read.
    pub fn save(&mut self) {
        let Some(path) = &self.path else {
            return;
        };
        if self.learnt.is_empty() {
            return;
        }
        let bytes = |recs: &mut dyn Iterator<Item = &([u8; 16], [u8; 32])>| -> Vec<u8> {
            recs.flat_map(|(k, v)| k.iter().chain(v.iter()).copied())
                .collect()
        };
        if self.on_file + self.learnt.len() > MAX_RECORDS {
            let data = bytes(&mut self.used.iter().chain(self.learnt.iter()));
            let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut f| std::io::Write::write_all(&mut f, &data))
                .and_then(|()| std::fs::rename(&tmp, path));
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            self.on_file = data.len() / RECORD;
        } else {
            let data = bytes(&mut self.learnt.iter());
            let _ = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, &data));
            self.on_file += self.learnt.len();
        }
        self.used.append(&mut self.learnt);
    }
}

/// Hashes a [`FileHashes`] identity (already a SHA-256 prefix) by its
/// first eight bytes: no second hash of each key the file's load inserts.
#[derive(Default, Clone, Copy)]
struct IdentityHash;

impl std::hash::BuildHasher for IdentityHash {
    type Hasher = FirstBytes;
    fn build_hasher(&self) -> FirstBytes {
        FirstBytes(0)
    }
}

/// The hasher of [`IdentityHash`]: the first eight bytes written (the key's
/// own; an array's length, written first, is skipped as a `usize`).
struct FirstBytes(u64);

impl std::hash::Hasher for FirstBytes {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= u64::from(*b) << (8 * i);
        }
    }
    fn write_usize(&mut self, _: usize) {}
}

/// The overlays of `mountinfo` whose layers (upper and lower directories)
/// are all on one file system, by device: their files' inode numbers are
/// that file system's (overlayfs reports the real inode when the layers
/// share a file system). Not one with data-only layers or `metacopy` (a
/// file's bytes may then be another layer's than its inode's).
fn same_fs_overlays(mountinfo: &str) -> HashMap<u64, u64> {
    let mut out = HashMap::new();
    for m in mountinfo.lines().filter_map(crate::layer::Mount::parse) {
        if m.fstype != "overlay"
            || m.options.contains("metacopy=on")
            || m.options.contains("datadir")
        {
            continue;
        }
        let Some((maj, min)) = m.dev.split_once(':') else {
            continue;
        };
        let (Ok(maj), Ok(min)) = (maj.parse::<u32>(), min.parse::<u32>()) else {
            continue;
        };
        let devs: Option<Vec<u64>> = m
            .layers("lowerdir")
            .into_iter()
            .chain(m.layers("upperdir"))
            .map(|l| std::fs::metadata(l?).ok().map(|md| md.dev()))
            .collect();
        if let Some(devs) = devs.filter(|d| !d.is_empty()) {
            if devs.iter().all(|d| *d == devs[0]) {
                out.insert(libc::makedev(maj, min), devs[0]);
            }
        }
    }
    out
}

struct Walk<'a> {
    known: &'a mut FileHashes,
    root: &'a Path,
    /// Files with more than one link, by (device, inode): the first name.
    links: HashMap<(u64, u64), Vec<u8>>,
    entries: u64,
    buf: Vec<u8>,
}

impl Walk<'_> {
    fn entry(&mut self, h: &mut Sha256, path: &Path, rel: &[u8]) -> Result<(), MicrovmError> {
        self.entries += 1;
        if self.entries > MAX_ENTRIES {
            return Err(MicrovmError::TooLarge(self.root.to_owned()));
        }
        let read = |what: &str| MicrovmError::io(format!("{what} {}", path.display()));
        let m = std::fs::symlink_metadata(path).map_err(read("look at"))?;
        let t = m.file_type();
        h.update((rel.len() as u64).to_le_bytes());
        h.update(rel);
        let kind: u8 = if t.is_dir() {
            b'd'
        } else if t.is_file() {
            b'f'
        } else if t.is_symlink() {
            b'l'
        } else if t.is_char_device() {
            b'c'
        } else if t.is_block_device() {
            b'b'
        } else if t.is_fifo() {
            b'p'
        } else {
            b's'
        };
        h.update([kind]);
        h.update((m.mode() & 0o7777).to_le_bytes());
        h.update(m.uid().to_le_bytes());
        h.update(m.gid().to_le_bytes());
        self.xattrs(h, path)?;
        if kind != b'd' && m.nlink() > 1 {
            let id = (m.dev(), m.ino());
            if let Some(first) = self.links.get(&id) {
                h.update(b"=");
                h.update((first.len() as u64).to_le_bytes());
                h.update(first);
                return Ok(());
            }
            self.links.insert(id, rel.to_vec());
        }
        match kind {
            b'd' => {
                let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(path)
                    .map_err(read("read"))?
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<Result<_, _>>()
                    .map_err(read("read"))?;
                names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
                h.update((names.len() as u64).to_le_bytes());
                for n in names {
                    let mut child = rel.to_vec();
                    child.push(b'/');
                    child.extend_from_slice(n.as_bytes());
                    self.entry(h, &path.join(&n), &child)?;
                }
            }
            b'f' => {
                let id = self.known.identity(&m);
                if let Some(hash) = self.known.get(&id) {
                    h.update(m.len().to_le_bytes());
                    h.update(hash);
                    h.update(m.len().to_le_bytes());
                    return Ok(());
                }
                self.known.misses += 1;
                let mut f = std::fs::File::options()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(path)
                    .map_err(read("open"))?;
                // The file opened must be the one looked at.
                let opened = f.metadata().map_err(read("look at"))?;
                if !opened.is_file() || opened.ino() != m.ino() || opened.dev() != m.dev() {
                    return Err(read("open")(std::io::Error::other(
                        "it changed while it was read",
                    )));
                }
                h.update(opened.len().to_le_bytes());
                let mut bytes = Sha256::new();
                let mut total = 0u64;
                loop {
                    let n = f.read(&mut self.buf).map_err(read("read"))?;
                    if n == 0 {
                        break;
                    }
                    bytes.update(&self.buf[..n]);
                    total += n as u64;
                }
                let hash: [u8; 32] = bytes.finalize().into();
                h.update(hash);
                h.update(total.to_le_bytes());
                // Learnt only when read whole and unchanged meanwhile (the
                // identity as looked at before the read, and after).
                let after = f.metadata().map_err(read("look at"))?;
                if total == m.len() && self.known.identity(&after) == id {
                    self.known.learn(id, hash);
                }
            }
            b'l' => {
                let target = std::fs::read_link(path).map_err(read("read the link"))?;
                let target = target.as_os_str().as_bytes();
                h.update((target.len() as u64).to_le_bytes());
                h.update(target);
            }
            b'c' | b'b' => h.update(m.rdev().to_le_bytes()),
            _ => {}
        }
        Ok(())
    }

    /// The entry's extended attributes, names sorted, with their values.
    fn xattrs(&mut self, h: &mut Sha256, path: &Path) -> Result<(), MicrovmError> {
        let err = |e: rustix::io::Errno| {
            MicrovmError::io(format!(
                "read the extended attributes of {}",
                path.display()
            ))(e.into())
        };
        let mut list = vec![0u8; 64 << 10];
        let n = match rustix::fs::llistxattr(path, &mut list[..]) {
            Ok(n) => n,
            // A file system without extended attributes.
            Err(rustix::io::Errno::NOTSUP) => 0,
            Err(e) => return Err(err(e)),
        };
        let mut names: Vec<&[u8]> = list[..n]
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .collect();
        names.sort();
        h.update((names.len() as u64).to_le_bytes());
        let mut value = vec![0u8; 64 << 10];
        for name in names {
            let name_c = std::ffi::CString::new(name).map_err(|_| {
                MicrovmError::io(format!(
                    "read the extended attributes of {}",
                    path.display()
                ))(std::io::Error::other("a name with a NUL"))
            })?;
            let v = rustix::fs::lgetxattr(path, name_c.as_c_str(), &mut value[..]).map_err(err)?;
            h.update((name.len() as u64).to_le_bytes());
            h.update(name);
            h.update((v as u64).to_le_bytes());
            h.update(&value[..v]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(dir: &Path) {
        std::fs::create_dir_all(dir.join("etc/sub")).unwrap();
        std::fs::write(dir.join("etc/a"), b"alpha").unwrap();
        std::fs::write(dir.join("etc/sub/b"), b"beta").unwrap();
        std::os::unix::fs::symlink("etc/a", dir.join("link")).unwrap();
        std::fs::hard_link(dir.join("etc/a"), dir.join("hard")).unwrap();
    }

    fn copy(from: &Path, to: &Path) {
        let ok = std::process::Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    fn set_mtime(p: &Path, secs: u64) {
        let f = std::fs::File::open(p).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap();
    }

    #[test]
    fn a_copy_has_the_digest_and_any_change_of_content_or_metadata_another() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        tree(&a);
        let base = tree_digest(&a).unwrap();
        let b = d.path().join("b");
        copy(&a, &b);
        // Times differ: not in the key.
        set_mtime(&b.join("etc/a"), 12345);
        set_mtime(&b.join("etc"), 999);
        assert_eq!(tree_digest(&b).unwrap(), base);
        // Each change below gives another digest.
        let changed = |edit: &dyn Fn(&Path)| {
            let c = d.path().join(format!("c{}", rand_suffix()));
            copy(&a, &c);
            edit(&c);
            let dg = tree_digest(&c).unwrap();
            std::fs::remove_dir_all(&c).unwrap();
            dg
        };
        use std::os::unix::fs::PermissionsExt;
        type Edit = Box<dyn Fn(&Path)>;
        let edits: Vec<(&str, Edit)> = vec![
            (
                "a byte",
                Box::new(|c| std::fs::write(c.join("etc/sub/b"), b"betA").unwrap()),
            ),
            (
                "a mode",
                Box::new(|c| {
                    std::fs::set_permissions(
                        c.join("etc/sub/b"),
                        std::fs::Permissions::from_mode(0o600),
                    )
                    .unwrap()
                }),
            ),
            (
                "an owner",
                Box::new(|c| {
                    std::os::unix::fs::lchown(c.join("etc/sub/b"), Some(4321), None).unwrap()
                }),
            ),
            (
                "a link's target",
                Box::new(|c| {
                    std::fs::remove_file(c.join("link")).unwrap();
                    std::os::unix::fs::symlink("etc/sub/b", c.join("link")).unwrap();
                }),
            ),
            (
                "a hard link made a copy",
                Box::new(|c| {
                    std::fs::remove_file(c.join("hard")).unwrap();
                    std::fs::write(c.join("hard"), b"alpha").unwrap();
                }),
            ),
            (
                "a name",
                Box::new(|c| std::fs::rename(c.join("etc/sub/b"), c.join("etc/sub/c")).unwrap()),
            ),
            (
                "an empty file more",
                Box::new(|c| std::fs::write(c.join("etc/new"), b"").unwrap()),
            ),
            (
                "an empty directory more",
                Box::new(|c| std::fs::create_dir(c.join("etc/dir")).unwrap()),
            ),
            (
                "an extended attribute",
                Box::new(|c| {
                    rustix::fs::lsetxattr(
                        c.join("etc/a").as_path(),
                        "user.moat",
                        b"x",
                        rustix::fs::XattrFlags::empty(),
                    )
                    .unwrap()
                }),
            ),
        ];
        let mut seen = vec![base];
        for (what, edit) in edits {
            let dg = changed(&*edit);
            assert!(
                !seen.contains(&dg),
                "{what}: the same digest as another tree"
            );
            seen.push(dg);
        }
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn a_known_files_hash_stands_for_its_bytes_until_it_changes() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        tree(&a);
        let store = d.path().join(HASHES);
        let mut first = FileHashes::load(&store, "");
        let base = tree_digest_with(&a, &mut first).unwrap();
        // Two regular files (`hard` is a second name of `etc/a`).
        assert_eq!((first.hits, first.misses), (0, 2));
        first.save();
        assert_eq!(base, tree_digest(&a).unwrap(), "the same digest read whole");
        let mut again = FileHashes::load(&store, "");
        assert_eq!(tree_digest_with(&a, &mut again).unwrap(), base);
        assert_eq!((again.hits, again.misses), (2, 0));
        // A copy: other inodes, read again, the same digest.
        let b = d.path().join("b");
        copy(&a, &b);
        let mut copied = FileHashes::load(&store, "");
        assert_eq!(tree_digest_with(&b, &mut copied).unwrap(), base);
        assert_eq!((copied.hits, copied.misses), (0, 2));
        // The same size, another byte: a new change time, read again.
        std::fs::write(a.join("etc/sub/b"), b"betA").unwrap();
        let mut changed = FileHashes::load(&store, "");
        let dg = tree_digest_with(&a, &mut changed).unwrap();
        assert_ne!(dg, base);
        assert_eq!(dg, tree_digest(&a).unwrap());
        assert_eq!((changed.hits, changed.misses), (1, 1));
        // Past the bound the file holds the last walk's records alone.
        changed.on_file = MAX_RECORDS;
        changed.save();
        assert_eq!(std::fs::metadata(&store).unwrap().len(), 2 * RECORD as u64);
    }

    /// Two containers of one image: two overlay mounts of the same layers
    /// (made in a mount namespace of a child's own), each with a device of
    /// its own. The second walk knows every file the first read; an
    /// overlay whose upper layer is on another file system is not mapped.
    #[test]
    fn an_images_files_read_through_one_overlay_are_known_through_another() {
        use nix::mount::{mount, MsFlags};
        let d = tempfile::tempdir().unwrap();
        let base = d.path().canonicalize().unwrap();
        let lower = base.join("lower");
        tree(&lower);
        for p in ["u1", "w1", "m1", "u2", "w2", "m2", "t", "m3"] {
            std::fs::create_dir_all(base.join(p)).unwrap();
        }
        let code = moat_sys::process::run_in_child(libc::CLONE_NEWNS, || {
            let none: Option<&str> = None;
            if mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).is_err() {
                return 10;
            }
            let ovl = |upper: &Path, work: &Path, at: &Path| {
                let o = format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lower.display(),
                    upper.display(),
                    work.display()
                );
                mount(
                    Some("overlay"),
                    at,
                    Some("overlay"),
                    MsFlags::empty(),
                    Some(o.as_str()),
                )
                .is_ok()
            };
            if !ovl(&base.join("u1"), &base.join("w1"), &base.join("m1"))
                || !ovl(&base.join("u2"), &base.join("w2"), &base.join("m2"))
            {
                return 11;
            }
            // Another file system for the third one's upper layer.
            if mount(
                Some("tmpfs"),
                &base.join("t"),
                Some("tmpfs"),
                MsFlags::empty(),
                none,
            )
            .is_err()
                || std::fs::create_dir(base.join("t/u")).is_err()
                || std::fs::create_dir(base.join("t/w")).is_err()
                || !ovl(&base.join("t/u"), &base.join("t/w"), &base.join("m3"))
            {
                return 12;
            }
            let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let store = base.join(HASHES);
            let mut first = FileHashes::load(&store, &info);
            let Ok(one) = tree_digest_with(&base.join("m1"), &mut first) else {
                return 13;
            };
            first.save();
            if first.misses != 2 || first.overlays.len() != 2 {
                return 1;
            }
            let mut second = FileHashes::load(&store, &info);
            match tree_digest_with(&base.join("m2"), &mut second) {
                Ok(two) if two == one && second.hits == 2 && second.misses == 0 => {}
                _ => return 2,
            }
            let mut third = FileHashes::load(&store, &info);
            match tree_digest_with(&base.join("m3"), &mut third) {
                Ok(three) if three == one && third.misses == 2 => {}
                _ => return 3,
            }
            0
        })
        .unwrap();
        assert_eq!(
            code, 0,
            "1: the first walk, 2: the second overlay's, 3: the unmapped one's; 1x: set-up"
        );
    }

    #[test]
    fn a_tree_that_cannot_be_read_whole_has_no_digest() {
        let d = tempfile::tempdir().unwrap();
        assert!(tree_digest(&d.path().join("missing")).is_err());
    }

    #[test]
    fn trimming_keeps_the_recent_and_the_one_just_made() {
        let d = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - IN_USE - Duration::from_secs(60);
        let mut paths = Vec::new();
        for i in 0..KEPT + 3 {
            let p = d.path().join(format!("{PREFIX}{i:024}.ext4"));
            std::fs::write(&p, b"").unwrap();
            let f = std::fs::File::open(&p).unwrap();
            // The first two were used recently; the rest long ago, oldest first.
            let t = if i < 2 {
                SystemTime::now()
            } else {
                old - Duration::from_secs(1000 - i as u64)
            };
            f.set_modified(t).unwrap();
            paths.push(p);
        }
        // A dead builder's staging file, and another cache file.
        let dead = d.path().join(format!("{PREFIX}x.staging.{}", u32::MAX));
        std::fs::write(&dead, b"").unwrap();
        let other = d.path().join("disk-0.ext4");
        std::fs::write(&other, b"").unwrap();
        set_mtime(&other, 1);
        let keep = paths[KEPT + 2].clone();
        set_mtime(&keep, 1);
        trim(d.path(), &keep);
        let left: Vec<bool> = paths.iter().map(|p| p.exists()).collect();
        // 19 images, 16 kept: the three least recently used of the old
        // ones go (paths 2, 3, 4), never the recent two nor `keep`.
        let gone: Vec<usize> = (0..left.len()).filter(|i| !left[*i]).collect();
        assert_eq!(gone, vec![2, 3, 4], "{left:?}");
        assert!(!dead.exists());
        assert!(other.exists());
    }
}
