//! Derived data the runtime keeps under its state root (`<root>/.cache/KIND/`)
//! because it costs time to make and comes out the same each time: the
//! compiled seccomp program of a profile, the skeleton of `moat run`'s
//! embedded default root.
//!
//! The rules that make an entry safe to reuse:
//! - its name is the SHA-256 of everything it is derived from ([`key`]), so a
//!   changed input is a different entry, never a stale one;
//! - it is built under a private temporary name and renamed into place, so a
//!   reader never sees a partial entry ([`publish`]);
//! - it is used only when it, and the directory holding it, belong to the
//!   runtime's own user and nobody else can write them ([`trusted`]); an entry
//!   that fails this is refused, not repaired.
use std::fs::Metadata;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The cache's directory under a state root.
pub const DIR: &str = ".cache";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot create the cache directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot inspect {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing {path}: it must be a directory of uid {uid}, writable by nobody else")]
    Untrusted { path: PathBuf, uid: u32 },
    #[error("cannot move {from} into place at {to}")]
    Publish {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The hex SHA-256 of `parts`, each prefixed by its length (so that no two
/// different lists of parts share a key).
pub fn key(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex(&h.finalize())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Whether `md` belongs to the effective user and no one else may write it.
pub fn trusted(md: &Metadata) -> bool {
    md.uid() == rustix::process::geteuid().as_raw() && md.mode() & 0o022 == 0
}

/// `<state_root>/.cache/<kind>`, created (mode 0711: an unprivileged
/// container user may need to reach an entry, never list them) and checked
/// with [`trusted`].
pub fn dir(state_root: &Path, kind: &str) -> Result<PathBuf, CacheError> {
    let path = state_root.join(DIR).join(kind);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(&path)
        .map_err(|source| CacheError::Create {
            path: path.clone(),
            source,
        })?;
    for p in [state_root.join(DIR), path.clone()] {
        let md = std::fs::symlink_metadata(&p).map_err(|source| CacheError::Stat {
            path: p.clone(),
            source,
        })?;
        if !md.is_dir() || !trusted(&md) {
            return Err(CacheError::Untrusted {
                path: p,
                uid: rustix::process::geteuid().as_raw(),
            });
        }
    }
    Ok(path)
}

/// A private name in `dir` to build an entry under before [`publish`].
pub fn temp_name(dir: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Renames the finished `tmp` to `entry`. When another process published
/// the same entry first, `tmp` is removed and theirs is kept (same key, same
/// content). Returns whether ours was the one published.
pub fn publish(tmp: &Path, entry: &Path) -> Result<bool, CacheError> {
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        tmp,
        rustix::fs::CWD,
        entry,
        rustix::fs::RenameFlags::NOREPLACE,
    ) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::EXIST) => {
            let md = std::fs::symlink_metadata(tmp);
            let removed = if md.is_ok_and(|m| m.is_dir()) {
                std::fs::remove_dir_all(tmp)
            } else {
                std::fs::remove_file(tmp)
            };
            removed.map_err(|source| CacheError::Publish {
                from: tmp.to_owned(),
                to: entry.to_owned(),
                source,
            })?;
            Ok(false)
        }
        Err(e) => Err(CacheError::Publish {
            from: tmp.to_owned(),
            to: entry.to_owned(),
            source: e.into(),
        }),
    }
}

/// Keeps the `keep` most recently modified entries of `dir` and removes the
/// others (best effort: a cache is never a reason to fail). Temporary names
/// of builds in progress are left alone.
pub fn trim(dir: &Path, keep: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<(std::time::SystemTime, PathBuf, bool)> = rd
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let md = e.metadata().ok()?;
            Some((md.modified().ok()?, e.path(), md.is_dir()))
        })
        .collect();
    if entries.len() <= keep {
        return;
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (_, path, is_dir) in entries.into_iter().skip(keep) {
        let _ = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_parts() {
        assert_ne!(key(&[b"ab", b"c"]), key(&[b"a", b"bc"]));
        assert_eq!(key(&[b"x"]), key(&[b"x"]));
        assert_eq!(key(&[b"x"]).len(), 64);
    }

    #[test]
    fn publish_keeps_the_first_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dir(tmp.path(), "t").unwrap();
        let entry = d.join("e");
        let a = temp_name(&d);
        std::fs::write(&a, "first").unwrap();
        assert!(publish(&a, &entry).unwrap());
        let b = temp_name(&d);
        std::fs::create_dir(&b).unwrap();
        std::fs::write(b.join("f"), "second").unwrap();
        assert!(!publish(&b, &entry).unwrap());
        assert!(!b.exists());
        assert_eq!(std::fs::read_to_string(&entry).unwrap(), "first");
    }

    #[test]
    fn writable_cache_dirs_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        dir(tmp.path(), "t").unwrap();
        let p = tmp.path().join(DIR).join("t");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            dir(tmp.path(), "t"),
            Err(CacheError::Untrusted { .. })
        ));
    }

    #[test]
    fn trim_keeps_the_newest() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dir(tmp.path(), "t").unwrap();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let p = d.join(name);
            std::fs::write(&p, "").unwrap();
            let t =
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(100 + i as u64);
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        std::fs::write(d.join(".tmp-1-0"), "").unwrap();
        trim(&d, 2);
        let mut left: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![".tmp-1-0", "b", "c"]);
    }
}
