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
    let key = tree_digest(source)?;
    let uuid = disk::hex(&key[..16]);
    let path = cache.join(format!("{PREFIX}{}.ext4", &uuid[..24]));
    if path.is_file() {
        touch(&path);
        tracing::debug!(
            "microvm: image of {} from the content cache ({})",
            source.display(),
            path.display()
        );
        return Ok(Some(DiskImage { path, uuid }));
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
    let unchanged = tree_digest(source).is_ok_and(|k| k == key);
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
    Ok(Some(DiskImage { path, uuid }))
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
    let mut h = Sha256::new();
    h.update(b"moat-tree-1\0");
    let mut w = Walk {
        root,
        links: HashMap::new(),
        entries: 0,
        buf: vec![0u8; 1 << 20],
    };
    w.entry(&mut h, root, b"")?;
    Ok(h.finalize().into())
}

struct Walk<'a> {
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
                let mut total = 0u64;
                loop {
                    let n = f.read(&mut self.buf).map_err(read("read"))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&self.buf[..n]);
                    total += n as u64;
                }
                h.update(total.to_le_bytes());
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
