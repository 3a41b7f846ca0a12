//! The guest's disks: each directory the container sees (its root, and
//! every directory bind mount) becomes an ext4 image, built with `mkfs.ext4
//! -d` (e2fsprogs) and attached read-only as a virtio block device; the
//! guest finds each by its filesystem UUID.
//!
//! Images of directories moat manages or that are the host's own system
//! directories (the embedded default's /usr, /lib, …; image cache entries;
//! the embedded root) are **cached** under the state root's
//! `.cache/microvm/` and shared by every container; their key is the path
//! and a fingerprint of the tree's directories (inode, mtime, ctime to
//! depth [`FINGERPRINT_DEPTH`]), so installing or removing files rebuilds
//! the image. Any other directory (an engine's bundle rootfs, a volume) is
//! imaged **per container**, in the container's state directory, and
//! removed by `delete`.
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
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
    h.update(b"moat-disk-1");
    fingerprint(&mut h, source, FINGERPRINT_DEPTH);
    let digest = h.finalize();
    let uuid = hex(&digest[..16]);
    let path = cache.join(format!("disk-{}.ext4", &uuid[..24]));
    if path.is_file() {
        return Ok(DiskImage { path, uuid });
    }
    ensure_dir(cache)?;
    build(source, &path, &uuid)?;
    prune_stale(cache, source.as_os_str().as_encoded_bytes(), &path);
    Ok(DiskImage { path, uuid })
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
    h.update(b"moat-group-1");
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
    let staging = path.with_extension("staging");
    std::fs::create_dir_all(&staging)
        .map_err(MicrovmError::io(format!("create {}", staging.display())))?;
    // The sources are bind-mounted into the staging directory in a mount
    // namespace of a child's own, so the host never sees those mounts.
    let code = moat_sys::process::run_in_child(libc::CLONE_NEWNS, || {
        use nix::mount::{mount, MsFlags};
        let r = (|| -> Result<(), MicrovmError> {
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .map_err(MicrovmError::sys("make the mounts private"))?;
            mount(
                Some("moat-staging"),
                &staging,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("mode=0755"),
            )
            .map_err(MicrovmError::sys("mount the staging directory"))?;
            for (k, s) in sources.iter().enumerate() {
                let at = staging.join(k.to_string());
                // A file is bound onto a file, a directory onto a directory.
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
            build(&staging, &path, &uuid)
        })();
        match r {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("moat: {}", moat_core::error_chain(&e));
                1
            }
        }
    });
    let _ = std::fs::remove_dir(&staging);
    match code {
        Ok(0) => {
            if let Some(c) = cache {
                let key: Vec<u8> = sources
                    .iter()
                    .flat_map(|s| [s.as_os_str().as_encoded_bytes(), b"\0"].concat())
                    .collect();
                prune_stale(c, &key, &path);
            }
            Ok(DiskImage { path, uuid })
        }
        _ => Err(MicrovmError::Mkfs {
            source_dir: sources.first().cloned().unwrap_or_default(),
            message: format!("cannot image {} directories together", sources.len()),
        }),
    }
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

/// Builds the image of `source` at `dest` (through a temporary file, so a
/// failed build leaves nothing).
fn build(source: &Path, dest: &Path, uuid: &str) -> Result<(), MicrovmError> {
    let u = usage(source)?;
    let size = image_size(u);
    let tmp = dest.with_extension(format!("{}.tmp", std::process::id()));
    let r = (|| {
        let f = std::fs::File::create(&tmp)
            .map_err(MicrovmError::io(format!("create {}", tmp.display())))?;
        f.set_len(size)
            .map_err(MicrovmError::io(format!("size {}", tmp.display())))?;
        drop(f);
        let dashed = format!(
            "{}-{}-{}-{}-{}",
            &uuid[..8],
            &uuid[8..12],
            &uuid[12..16],
            &uuid[16..20],
            &uuid[20..32]
        );
        let out = Command::new(MKFS)
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-L", "moat",
            ])
            .args(["-O", "^has_journal,^resize_inode"])
            .args(["-N", &(u.entries + 1024).to_string()])
            .args(["-U", &dashed, "-E", "lazy_itable_init=1,root_owner=0:0"])
            .arg("-d")
            .arg(source)
            .arg(&tmp)
            .output()
            .map_err(|e| MicrovmError::Mkfs {
                source_dir: source.to_owned(),
                message: format!("cannot run {MKFS}: {e} (install e2fsprogs)"),
            })?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(MicrovmError::Mkfs {
                source_dir: source.to_owned(),
                message: err.lines().last().unwrap_or("failed").trim().to_string(),
            });
        }
        std::fs::rename(&tmp, dest).map_err(MicrovmError::io(format!("rename {}", dest.display())))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
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
}
