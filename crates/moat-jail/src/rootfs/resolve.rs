//! Paths inside the container's root, resolved by the kernel with
//! `openat2(RESOLVE_IN_ROOT)` from an fd of the root: a symlink in the image
//! (attacker input) can never lead out of it, even if it is swapped while we
//! work (CVE-2021-30465). Nothing here joins strings under the rootfs.
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// What to create at a destination that does not exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// Lexically cleans a path given by the spec into an absolute path with no
/// `.`, `..` or repeated separators (`..` at the top stays at the top). The
/// result is still resolved by the kernel inside the root, so this only
/// decides what the path means, never whether it stays inside.
pub fn clean(path: &Path) -> PathBuf {
    let mut parts: Vec<&OsStr> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(name) => parts.push(name),
            Component::ParentDir => {
                parts.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    let mut out = PathBuf::from("/");
    out.extend(parts);
    out
}

/// The "/proc/self/fd/N" magic link of `fd`, to hand an fd to a path-based
/// syscall (mount(2)) without naming the path again.
pub fn fd_path(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// The one opener of paths under a root that moat does not trust (a
/// container's rootfs, an image's files): `openat2` with `RESOLVE_IN_ROOT`
/// (`..` and absolute symlinks stop at `root`) and no magic links, retried
/// when a concurrent rename makes the kernel ask for it.
pub fn in_root(root: BorrowedFd<'_>, path: &Path, oflags: OFlags) -> io::Result<OwnedFd> {
    let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    let mut tries = 0;
    loop {
        // EAGAIN: a concurrent rename raced with ".." resolution; try again.
        match rustix::fs::openat2(root, path, oflags | OFlags::CLOEXEC, Mode::empty(), resolve) {
            Err(rustix::io::Errno::AGAIN) if tries < 16 => tries += 1,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// Opens `path` inside `root` as an `O_PATH` fd, following symlinks only
/// inside the root. With `nofollow`, a final symlink is refused (`ELOOP` or
/// `ENOTDIR`) rather than followed.
pub fn open(root: BorrowedFd<'_>, path: &Path, nofollow: bool) -> io::Result<OwnedFd> {
    let mut flags = OFlags::PATH;
    if nofollow {
        flags |= OFlags::NOFOLLOW;
    }
    in_root(root, path, flags)
}

/// Opens a directory inside `root` (an `O_PATH | O_DIRECTORY` fd).
pub fn open_dir(root: BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    in_root(root, path, OFlags::PATH | OFlags::DIRECTORY)
}

/// Symlinks followed by their text while creating, at most.
const MAX_HOPS: usize = 40;

/// Opens directory `path` inside `root`, creating missing directories (mode
/// 0755 less umask) one component at a time with `mkdirat` relative to the
/// fd of the already-resolved parent. A dangling symlink on the way is
/// followed by its text, inside the root, and its target created (as runc's
/// securejoin does).
pub fn mkdir_all(root: BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    let mut path = clean(path);
    for _ in 0..MAX_HOPS {
        match mkdir_walk(root, &path)? {
            Walk::Done(fd) => return Ok(fd),
            Walk::Redirect(next) => path = next,
        }
    }
    Err(io::Error::from_raw_os_error(libc::ELOOP))
}

enum Walk {
    Done(OwnedFd),
    /// A dangling symlink was met: the path to create instead.
    Redirect(PathBuf),
}

fn mkdir_walk(root: BorrowedFd<'_>, path: &Path) -> io::Result<Walk> {
    let names: Vec<&OsStr> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let mut cur = open_dir(root, Path::new("/"))?;
    let mut prefix = PathBuf::from("/");
    for (i, name) in names.iter().enumerate() {
        let parent = prefix.clone();
        prefix.push(name);
        match open_dir(root, &prefix) {
            Ok(fd) => {
                cur = fd;
                continue;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        match rustix::fs::mkdirat(&cur, *name, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        match open_dir(root, &prefix) {
            Ok(fd) => cur = fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let Some(next) = follow_dangling(cur.as_fd(), name, &parent)? else {
                    return Err(e);
                };
                let mut next = next;
                next.extend(&names[i + 1..]);
                return Ok(Walk::Redirect(clean(&next)));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Walk::Done(cur))
}

/// If `name` in `dir` (whose path in the root is `dir_path`) is a symlink,
/// the path its text names, else `None`.
fn follow_dangling(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    dir_path: &Path,
) -> io::Result<Option<PathBuf>> {
    let text = match rustix::fs::readlinkat(dir, name, Vec::new()) {
        Ok(t) => t,
        Err(rustix::io::Errno::INVAL) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let target = PathBuf::from(
        <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(text.into_bytes()),
    );
    Ok(Some(if target.is_absolute() {
        target
    } else {
        dir_path.join(target)
    }))
}

/// Opens `path` inside `root` (`O_PATH`), creating it first if missing: a
/// directory (and parents) for [`Kind::Dir`], an empty file (mode 0644 less
/// umask) in a created parent for [`Kind::File`]. Dangling symlinks are
/// followed inside the root as in [`mkdir_all`] (except a last one with
/// `nofollow`, which is refused).
pub fn open_or_create(
    root: BorrowedFd<'_>,
    path: &Path,
    kind: Kind,
    nofollow: bool,
) -> io::Result<OwnedFd> {
    let mut path = clean(path);
    for _ in 0..MAX_HOPS {
        match open(root, &path, nofollow) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            r => return r,
        }
        if kind == Kind::Dir {
            mkdir_all(root, &path)?;
            return open(root, &path, nofollow);
        }
        let (Some(parent_path), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let parent = mkdir_all(root, parent_path)?;
        let flags =
            OFlags::CREATE | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC;
        match rustix::fs::openat(parent.as_fd(), name, flags, Mode::from_raw_mode(0o644)) {
            Ok(fd) => {
                drop(fd);
                return open(root, &path, nofollow);
            }
            Err(rustix::io::Errno::LOOP) if !nofollow => {
                match follow_dangling(parent.as_fd(), name, parent_path)? {
                    Some(next) => path = clean(&next),
                    None => return Err(io::Error::from_raw_os_error(libc::ELOOP)),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::from_raw_os_error(libc::ELOOP))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn clean_paths() {
        assert_eq!(clean(Path::new("/a/./b//c/")), PathBuf::from("/a/b/c"));
        assert_eq!(clean(Path::new("a/b")), PathBuf::from("/a/b"));
        assert_eq!(clean(Path::new("/../../etc")), PathBuf::from("/etc"));
        assert_eq!(clean(Path::new("/a/../..")), PathBuf::from("/"));
        assert_eq!(clean(Path::new("")), PathBuf::from("/"));
    }

    fn root_fd(dir: &Path) -> OwnedFd {
        rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap()
    }

    #[test]
    fn symlinks_stay_inside_the_root() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("root");
        std::fs::create_dir(&root).unwrap();
        symlink("/", root.join("toslash")).unwrap();
        symlink("../../../../outside", root.join("up")).unwrap();
        let fd = root_fd(&root);
        // "/toslash/x" means "<root>/x", never the host's "/x".
        let made =
            open_or_create(fd.as_fd(), Path::new("/toslash/made/dir"), Kind::Dir, false).unwrap();
        assert!(root.join("made/dir").is_dir());
        let st = rustix::fs::fstat(&made).unwrap();
        let want = std::fs::metadata(root.join("made/dir")).unwrap();
        assert_eq!(st.st_ino, std::os::unix::fs::MetadataExt::ino(&want));
        // "../../../../outside" resolves to "<root>/outside", created there.
        open_or_create(fd.as_fd(), Path::new("/up/f"), Kind::File, false).unwrap();
        assert!(root.join("outside/f").is_file());
        assert!(!outer.path().join("outside").exists());
        // A dangling symlink as the last component: its target is created inside.
        symlink("/etc/../../x/file", root.join("filelink")).unwrap();
        open_or_create(fd.as_fd(), Path::new("/filelink"), Kind::File, false).unwrap();
        assert!(root.join("x/file").is_file());
        symlink("/deep/dir", root.join("dirlink")).unwrap();
        open_or_create(fd.as_fd(), Path::new("/dirlink/sub"), Kind::Dir, false).unwrap();
        assert!(root.join("deep/dir/sub").is_dir());
        // Loops end.
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();
        assert!(open_or_create(fd.as_fd(), Path::new("/loop1/a"), Kind::Dir, false).is_err());
    }

    #[test]
    fn nofollow_refuses_a_final_symlink() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("real")).unwrap();
        symlink("real", root.path().join("link")).unwrap();
        let fd = root_fd(root.path());
        let r = in_root(
            fd.as_fd(),
            Path::new("/link"),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::DIRECTORY,
        );
        assert!(r.is_err());
        assert!(open(fd.as_fd(), Path::new("/link"), false).is_ok());
    }
}
