//! Safe unpacking of a tar layer into a directory. The archive is attacker
//! input: every entry is placed by walking its parent one component at a
//! time from an fd of the target root with `openat(O_NOFOLLOW|O_DIRECTORY)`
//! and `mkdirat`, so no entry can land outside the root, `..` and absolute
//! names are refused, a symlink made by an earlier entry is never followed,
//! and a hard link must name a file already inside the root. Device nodes
//! (and FIFOs) from the archive are skipped, and no extended attribute of
//! the archive is applied.
//!
//! OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) are handled as [`Whiteouts`]
//! says: applied ([`Whiteouts::Apply`]: they remove what lower layers,
//! unpacked earlier into the same root, put there) or converted to
//! overlayfs' own form ([`Whiteouts::Overlay`]: each layer in a directory
//! of its own, later stacked by overlayfs): `.wh.NAME` becomes a character
//! device NAME with device number 0:0, `.wh..wh..opq` the extended
//! attribute `trusted.overlay.opaque=y` on its directory (setting a
//! `trusted.` attribute needs CAP_SYS_ADMIN: host root). Either way a
//! whiteout never removes or hides what its own layer adds.
//!
//! Bounds ([`Limits`]): one unpack stops with a clear error past a depth
//! of directories, a number of entries, a number of bytes written and a
//! total length of names (what it remembers per entry), so a hostile
//! archive costs time and memory in proportion to those bounds at most,
//! never more (the walk to an entry's directory reuses the previous entry's,
//! so a deep archive costs linear time, not quadratic). GNU sparse files are
//! unpacked (their holes written as zeros, counted against the bytes); the
//! PAX forms of sparse files are refused, never silently mangled.
//!
//! Ownership ([`Owners`]): unpacked by host root, every entry keeps its
//! owner from the archive (IDs at or above [`super::ID_RANGE`] become
//! 65534) and its mode without setuid/setgid; the cache directory is
//! reachable by root alone and the container sees it through an idmapped
//! mount (see `view`). Unpacked by anyone else (rootless), the files belong
//! to that user and lose write permission for "other" too, as the cache is
//! then reached by the container's unmapped host user directly.
//! Setuid/setgid are always dropped: no_new_privs makes them inert inside,
//! and on the host they could only be exploited.
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};
use thiserror::Error;

/// Prefix of an OCI whiteout file.
pub const WHITEOUT: &str = ".wh.";
/// The name that marks its directory opaque.
pub const OPAQUE: &str = ".wh..wh..opq";

#[derive(Debug, Error)]
pub enum UnpackError {
    #[error("cannot open {path}")]
    OpenRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the archive")]
    Read(#[source] io::Error),
    #[error("refused archive entry {name:?}: {problem}")]
    Refused { name: String, problem: PathProblem },
    #[error("refused archive entry {name:?}: a parent is a symlink or not a directory")]
    ThroughLink { name: String },
    #[error("cannot write archive entry {name:?}")]
    Write {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("refused archive entry {name:?}: deeper than {max} directories")]
    TooDeep { name: String, max: usize },
    #[error("the archive has more than {max} entries")]
    TooManyEntries { max: u64 },
    #[error("the archive unpacks to more than {max} bytes (entry {name:?})")]
    TooLarge { name: String, max: u64 },
    #[error("the archive's names are longer than {max} bytes in all")]
    NamesTooLong { max: u64 },
    #[error(
        "refused archive entry {name:?}: a PAX sparse file (unpack and repack it without --sparse)"
    )]
    PaxSparse { name: String },
}

/// What one unpack may cost at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Directories above an entry.
    pub max_depth: usize,
    pub max_entries: u64,
    /// Bytes of file contents written (holes of sparse files included).
    pub max_bytes: u64,
    /// Bytes of all entry names together (what the unpack remembers).
    pub max_name_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_depth: 128,
            max_entries: 1_000_000,
            max_bytes: 16 << 30,
            max_name_bytes: 256 << 20,
        }
    }
}

/// Why an entry's path (or link target) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PathProblem {
    #[error("absolute path")]
    Absolute,
    #[error("`..` component")]
    DotDot,
    #[error("hard link to an absolute path")]
    AbsoluteLink,
    #[error("hard link with a `..` component")]
    DotDotLink,
    #[error("hard link to the root")]
    LinkToRoot,
}

/// The components of an archive path, lexically checked: `.` and empty
/// components are dropped; `..` and absolute paths are refused. An empty
/// result is the root itself.
pub fn components(raw: &[u8]) -> Result<Vec<OsString>, PathProblem> {
    if raw.first() == Some(&b'/') {
        return Err(PathProblem::Absolute);
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(PathProblem::DotDot),
            name => out.push(OsString::from_vec(name.to_vec())),
        }
    }
    Ok(out)
}

/// What a whiteout name asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Whiteout<'a> {
    /// Not a whiteout: an ordinary entry.
    None,
    /// `.wh..wh..opq`: drop everything lower layers put in the directory.
    Opaque,
    /// `.wh.NAME`: remove NAME.
    Remove(&'a OsStr),
}

pub fn whiteout(name: &OsStr) -> Whiteout<'_> {
    let b = name.as_bytes();
    if b == OPAQUE.as_bytes() {
        Whiteout::Opaque
    } else if let Some(rest) = b.strip_prefix(WHITEOUT.as_bytes()) {
        if rest.is_empty() || rest == b"." || rest == b".." {
            Whiteout::None
        } else {
            Whiteout::Remove(OsStr::from_bytes(rest))
        }
    } else {
        Whiteout::None
    }
}

/// What the whiteouts of a layer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// Remove what is already in the root (layers unpacked one over
    /// another into one directory).
    Apply,
    /// Become overlayfs whiteouts (0:0 character devices) and opaque
    /// directories (`trusted.overlay.opaque=y`): the layer is unpacked into
    /// an empty directory of its own, to be a lower layer of an overlay.
    Overlay,
}

/// The extended attribute that makes a directory opaque to overlayfs.
pub const OVERLAY_OPAQUE: &str = "trusted.overlay.opaque";

/// Who owns the unpacked files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owners {
    /// The archive's owners (IDs below [`super::ID_RANGE`], others
    /// 65534); needs CAP_CHOWN.
    Archive,
    /// The unpacking user; "other" loses write permission.
    Unpacker,
}

/// The ID an archive's `id` is stored as.
pub fn stored_id(id: u64) -> u32 {
    match u32::try_from(id) {
        Ok(n) if n < super::ID_RANGE => n,
        _ => 65534,
    }
}

/// What one unpack did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub entries: u64,
    /// Bytes of regular files written.
    pub bytes: u64,
    /// Device nodes, FIFOs and other skipped entries.
    pub skipped: u64,
}

/// Unpacks the tar stream `reader` (already decompressed) as one layer over
/// the directory `root`, owned by the unpacker ([`Owners::Unpacker`]),
/// whiteouts applied.
pub fn unpack<R: Read>(reader: R, root: &Path) -> Result<Stats, UnpackError> {
    unpack_as(reader, root, Owners::Unpacker, Whiteouts::Apply)
}

/// Unpacks the tar stream `reader` (already decompressed) as one layer over
/// the directory `root`, files owned as `owners` says, whiteouts handled as
/// `whiteouts` says. Reads the stream to its end (so a digest over it
/// covers everything).
pub fn unpack_as<R: Read>(
    reader: R,
    root: &Path,
    owners: Owners,
    whiteouts: Whiteouts,
) -> Result<Stats, UnpackError> {
    unpack_limited(reader, root, owners, whiteouts, &Limits::default())
}

/// [`unpack_as`] within `limits`.
pub fn unpack_limited<R: Read>(
    reader: R,
    root: &Path,
    owners: Owners,
    whiteouts: Whiteouts,
    limits: &Limits,
) -> Result<Stats, UnpackError> {
    let fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::OpenRoot {
        path: root.to_path_buf(),
        source: e.into(),
    })?;
    let mut layer = Layer {
        root: fd,
        owners,
        whiteouts,
        limits: *limits,
        created: HashSet::new(),
        name_bytes: 0,
        path: Vec::new(),
        stats: Stats::default(),
    };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        layer.entry(&mut entry)?;
    }
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(UnpackError::Read)?;
    Ok(layer.stats)
}

struct Layer {
    root: OwnedFd,
    owners: Owners,
    whiteouts: Whiteouts,
    limits: Limits,
    /// Paths this layer created (components joined by `/`): whiteouts
    /// never remove them.
    created: HashSet<Vec<u8>>,
    /// Bytes of the paths in `created`.
    name_bytes: u64,
    /// The directories walked to last, each opened from the one before:
    /// the next entry's walk starts from the longest shared prefix. An entry
    /// that changes `parent/name` cuts the path there ([`Layer::changed`]),
    /// so an fd here is always the directory now at its path.
    path: Vec<(OsString, OwnedFd)>,
    stats: Stats,
}

/// Components joined by `/`, the key of [`Layer::created`].
fn key(comps: &[OsString]) -> Vec<u8> {
    let mut k = Vec::new();
    for (i, c) in comps.iter().enumerate() {
        if i > 0 {
            k.push(b'/');
        }
        k.extend_from_slice(c.as_bytes());
    }
    k
}

fn display(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

impl Layer {
    fn entry<R: Read>(&mut self, e: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw = e.path_bytes().into_owned();
        let name = display(&raw);
        let comps = components(&raw).map_err(|problem| UnpackError::Refused {
            name: name.clone(),
            problem,
        })?;
        self.stats.entries += 1;
        if self.stats.entries > self.limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                max: self.limits.max_entries,
            });
        }
        let kind = e.header().entry_type();
        let Some((last, parents)) = comps.split_last() else {
            // "./": the root itself keeps its mode.
            return Ok(());
        };
        if parents.len() > self.limits.max_depth {
            return Err(UnpackError::TooDeep {
                name,
                max: self.limits.max_depth,
            });
        }
        if is_pax_sparse(e) {
            return Err(UnpackError::PaxSparse { name });
        }
        let werr = |source: io::Error| UnpackError::Write {
            name: name.clone(),
            source,
        };
        let parent = self.walk(parents, &name)?;
        // Whatever this entry does, it changes `parent/last` (or, as an
        // opaque whiteout, what `parent` holds).
        self.changed(parents.len(), Some(last));
        match (whiteout(last), self.whiteouts) {
            (Whiteout::Opaque, Whiteouts::Apply) => {
                self.changed(parents.len(), None);
                return self
                    .opaque(parent.as_fd(), parents)
                    .map_err(|e| werr(e.into()));
            }
            (Whiteout::Opaque, Whiteouts::Overlay) => {
                return rustix::fs::fsetxattr(
                    &parent,
                    OVERLAY_OPAQUE,
                    b"y",
                    rustix::fs::XattrFlags::empty(),
                )
                .map_err(|e| werr(e.into()));
            }
            (Whiteout::Remove(target), mode) => {
                let mut p = parents.to_vec();
                p.push(target.to_os_string());
                if self.created.contains(&key(&p)) {
                    return Ok(());
                }
                self.changed(parents.len(), Some(target));
                remove_all(parent.as_fd(), target).map_err(|e| werr(e.into()))?;
                if mode == Whiteouts::Overlay {
                    overlay_whiteout(parent.as_fd(), target).map_err(|e| werr(e.into()))?;
                }
                return Ok(());
            }
            (Whiteout::None, _) => {}
        }
        let mode = e.header().mode().unwrap_or(0o644);
        let owner = self.owner(e.header());
        use tar::EntryType as T;
        match kind {
            T::Directory => self
                .dir(parent.as_fd(), last, mode, owner)
                .map_err(|e| werr(e.into()))?,
            // A GNU sparse file reads as its whole contents, holes as zeros.
            T::Regular | T::Continuous | T::GNUSparse => {
                let room = self.limits.max_bytes.saturating_sub(self.stats.bytes);
                let n = self
                    .file(parent.as_fd(), last, mode, owner, &mut e.take(room))
                    .map_err(werr)?;
                self.stats.bytes += n;
                if n == room && e.read(&mut [0u8; 1]).map_err(werr)? > 0 {
                    return Err(UnpackError::TooLarge {
                        name,
                        max: self.limits.max_bytes,
                    });
                }
            }
            T::Symlink => {
                let target = e.link_name_bytes().unwrap_or_default().into_owned();
                replace(parent.as_fd(), last).map_err(|e| werr(e.into()))?;
                rustix::fs::symlinkat(OsStr::from_bytes(&target), parent.as_fd(), last.as_os_str())
                    .map_err(|e| werr(e.into()))?;
                if let Some((u, g)) = owner {
                    rustix::fs::chownat(
                        parent.as_fd(),
                        last.as_os_str(),
                        Some(u),
                        Some(g),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| werr(e.into()))?;
                }
            }
            T::Link => {
                let target = e.link_name_bytes().unwrap_or_default().into_owned();
                self.hardlink(parent.as_fd(), last, &target, &name)?;
            }
            _ => {
                self.stats.skipped += 1;
                return Ok(());
            }
        }
        self.remember(key(&comps))
    }

    /// Records a path this layer created, within the bound on names.
    fn remember(&mut self, k: Vec<u8>) -> Result<(), UnpackError> {
        self.name_bytes += k.len() as u64 + 1;
        if self.name_bytes > self.limits.max_name_bytes {
            return Err(UnpackError::NamesTooLong {
                max: self.limits.max_name_bytes,
            });
        }
        self.created.insert(k);
        Ok(())
    }

    /// `parent/name` (the directory at depth `depth`, or with `name` None
    /// what it holds) is about to change: the walked path is cut there.
    fn changed(&mut self, depth: usize, name: Option<&OsStr>) {
        let keep = match (self.path.get(depth), name) {
            (Some((n, _)), Some(name)) if n != name => return,
            (Some(_), _) => depth,
            (None, _) => return,
        };
        self.path.truncate(keep);
    }

    /// The owner to give an entry: None to leave the unpacker's.
    fn owner(&self, h: &tar::Header) -> Option<(rustix::fs::Uid, rustix::fs::Gid)> {
        match self.owners {
            Owners::Unpacker => None,
            Owners::Archive => Some((
                rustix::fs::Uid::from_raw(stored_id(h.uid().unwrap_or(0))),
                rustix::fs::Gid::from_raw(stored_id(h.gid().unwrap_or(0))),
            )),
        }
    }

    fn dir_mode(&self, mode: u32) -> u32 {
        match self.owners {
            Owners::Archive => mode & 0o1777,
            Owners::Unpacker => dir_mode(mode),
        }
    }

    fn file_mode(&self, mode: u32) -> u32 {
        match self.owners {
            Owners::Archive => mode & 0o777,
            Owners::Unpacker => file_mode(mode),
        }
    }

    /// The directory `comps` under the root, created as needed, each
    /// component opened with O_NOFOLLOW: a symlink on the way is refused.
    /// Starts from the longest prefix shared with the previous walk.
    fn walk(&mut self, comps: &[OsString], name: &str) -> Result<OwnedFd, UnpackError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let werr = |e: rustix::io::Errno| UnpackError::Write {
            name: name.to_string(),
            source: e.into(),
        };
        let shared = self
            .path
            .iter()
            .zip(comps)
            .take_while(|((have, _), want)| have == *want)
            .count();
        self.path.truncate(shared);
        for (i, c) in comps.iter().enumerate().skip(shared) {
            let cur = match self.path.last() {
                Some((_, fd)) => fd.as_fd(),
                None => self.root.as_fd(),
            };
            let next = match rustix::fs::openat(cur, c.as_os_str(), flags, Mode::empty()) {
                Err(rustix::io::Errno::NOENT) => {
                    let made = rustix::fs::mkdirat(cur, c.as_os_str(), Mode::from_raw_mode(0o755))
                        .and_then(|()| {
                            rustix::fs::openat(cur, c.as_os_str(), flags, Mode::empty())
                        });
                    if made.is_ok() {
                        self.remember(key(&comps[..=i]))?;
                    }
                    made
                }
                r => r,
            };
            match next {
                Ok(fd) => self.path.push((c.clone(), fd)),
                Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                    return Err(UnpackError::ThroughLink {
                        name: name.to_string(),
                    })
                }
                Err(e) => return Err(werr(e)),
            }
        }
        let cur = match self.path.last() {
            Some((_, fd)) => fd.as_fd(),
            None => self.root.as_fd(),
        };
        rustix::fs::openat(cur, ".", flags, Mode::empty()).map_err(werr)
    }

    fn dir(
        &self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        mode: u32,
        owner: Option<(rustix::fs::Uid, rustix::fs::Gid)>,
    ) -> rustix::io::Result<()> {
        let mode = Mode::from_raw_mode(self.dir_mode(mode));
        match rustix::fs::mkdirat(parent, name, mode) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) => {
                let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
                if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    remove_all(parent, name)?;
                    rustix::fs::mkdirat(parent, name, mode)?;
                }
            }
            Err(e) => return Err(e),
        }
        if let Some((u, g)) = owner {
            rustix::fs::chownat(parent, name, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW)?;
        }
        rustix::fs::chmodat(parent, name, mode, AtFlags::empty())
    }

    fn file(
        &self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        mode: u32,
        owner: Option<(rustix::fs::Uid, rustix::fs::Gid)>,
        e: &mut impl Read,
    ) -> io::Result<u64> {
        replace(parent, name)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(parent, name, flags, Mode::from_raw_mode(0o600))?;
        let mut f = std::fs::File::from(fd);
        let n = io::copy(e, &mut f)?;
        if let Some((u, g)) = owner {
            rustix::fs::fchown(&f, Some(u), Some(g))?;
        }
        rustix::fs::fchmod(&f, Mode::from_raw_mode(self.file_mode(mode)))?;
        Ok(n)
    }

    fn hardlink(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        target: &[u8],
        entry: &str,
    ) -> Result<(), UnpackError> {
        let refused = |problem| UnpackError::Refused {
            name: entry.to_string(),
            problem,
        };
        let comps = components(target).map_err(|p| {
            refused(match p {
                PathProblem::Absolute => PathProblem::AbsoluteLink,
                _ => PathProblem::DotDotLink,
            })
        })?;
        let Some((tlast, tparents)) = comps.split_last() else {
            return Err(refused(PathProblem::LinkToRoot));
        };
        let tdir = self.walk(tparents, entry)?;
        let werr = |source: rustix::io::Errno| UnpackError::Write {
            name: entry.to_string(),
            source: source.into(),
        };
        replace(parent, name).map_err(werr)?;
        // No AT_SYMLINK_FOLLOW: a symlink target is linked as the symlink.
        rustix::fs::linkat(
            tdir.as_fd(),
            tlast.as_os_str(),
            parent,
            name,
            AtFlags::empty(),
        )
        .map_err(werr)
    }

    /// Removes every entry of the directory that this layer did not create.
    fn opaque(&self, dir: BorrowedFd<'_>, comps: &[OsString]) -> rustix::io::Result<()> {
        for name in list(dir)? {
            let mut p = comps.to_vec();
            p.push(name.clone());
            if !self.created.contains(&key(&p)) {
                remove_all(dir, &name)?;
            }
        }
        Ok(())
    }
}

/// Whether `e` is a sparse file in one of the PAX forms (GNU tar's
/// `--format=posix --sparse`), which the reader does not expand: unpacked as
/// a plain file it would be wrong (its map mixed into its contents).
fn is_pax_sparse<R: Read>(e: &mut tar::Entry<'_, R>) -> bool {
    let Ok(Some(exts)) = e.pax_extensions() else {
        return false;
    };
    exts.flatten()
        .any(|x| x.key_bytes().starts_with(b"GNU.sparse."))
}

/// An overlayfs whiteout: a character device `name` in `dir` with device
/// number 0:0 (allowed without CAP_MKNOD since Linux 5.8), owned by the
/// unpacker.
fn overlay_whiteout(dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<()> {
    rustix::fs::mknodat(
        dir,
        name,
        rustix::fs::FileType::CharacterDevice,
        Mode::empty(),
        0,
    )
}

/// Whether `st` is an overlayfs whiteout (a 0:0 character device).
pub fn is_overlay_whiteout(st: &rustix::fs::Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0
}

/// Mode bits kept on a directory: permissions and sticky, without write
/// for "other" (and never setuid/setgid).
pub fn dir_mode(mode: u32) -> u32 {
    mode & 0o1775
}

/// Mode bits kept on a file: permissions without setuid, setgid, sticky or
/// write for "other".
pub fn file_mode(mode: u32) -> u32 {
    mode & 0o775
}

/// Removes `name` in `dir` if it is anything but a directory (a directory
/// is replaced only by [`Layer::dir`] or a whiteout).
fn replace(dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<()> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => remove_all(dir, name),
        Ok(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty()),
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

fn list(dir: BorrowedFd<'_>) -> rustix::io::Result<Vec<OsString>> {
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Vec::new();
    for ent in rustix::fs::Dir::read_from(&fd)? {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(OsString::from_vec(n.to_vec()));
        }
    }
    Ok(out)
}

/// Removes `name` in `dir` and, for a directory, everything under it,
/// never following a symlink.
pub fn remove_all(dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<()> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(sub) => {
            for n in list(sub.as_fd())? {
                remove_all(sub.as_fd(), &n)?;
            }
            rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
        }
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, link, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if *kind == tar::EntryType::Directory {
                0o755
            } else {
                0o4777
            });
            h.set_size(data.len() as u64);
            // Bypass the builder's own path checks: write names raw.
            let name = h.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            if !link.is_empty() {
                let l = h.as_old_mut().linkname.as_mut();
                l[..link.len()].copy_from_slice(link.as_bytes());
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    use tar::EntryType as T;

    #[test]
    fn path_components() {
        assert_eq!(components(b"./a//b/").unwrap(), vec!["a", "b"]);
        assert!(components(b"./").unwrap().is_empty());
        assert_eq!(components(b"/etc/x"), Err(PathProblem::Absolute));
        assert_eq!(components(b"a/../../x"), Err(PathProblem::DotDot));
        assert_eq!(components(b".."), Err(PathProblem::DotDot));
        // A name that merely starts with dots is fine.
        assert_eq!(components(b"..a/...").unwrap(), vec!["..a", "..."]);
    }

    #[test]
    fn whiteout_names() {
        assert_eq!(whiteout(OsStr::new(".wh..wh..opq")), Whiteout::Opaque);
        assert_eq!(
            whiteout(OsStr::new(".wh.foo")),
            Whiteout::Remove(OsStr::new("foo"))
        );
        assert_eq!(whiteout(OsStr::new(".wh.")), Whiteout::None);
        assert_eq!(whiteout(OsStr::new(".wh..")), Whiteout::None);
        assert_eq!(whiteout(OsStr::new("foo")), Whiteout::None);
    }

    #[test]
    fn unpacks_and_drops_dangerous_bits() {
        let t = tempfile::tempdir().unwrap();
        let tar = tar_of(&[
            ("./bin/", T::Directory, "", b""),
            ("bin/sh", T::Regular, "", b"echo"),
            ("bin/sh2", T::Link, "bin/sh", b""),
            ("bin/ln", T::Symlink, "/etc/passwd", b""),
            ("a/b/c", T::Regular, "", b"deep"),
            ("dev/null", T::Char, "", b""),
        ]);
        let s = unpack(&tar[..], t.path()).unwrap();
        assert_eq!(s.skipped, 1);
        assert_eq!(std::fs::read(t.path().join("bin/sh2")).unwrap(), b"echo");
        assert_eq!(
            std::fs::read_link(t.path().join("bin/ln")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(std::fs::read(t.path().join("a/b/c")).unwrap(), b"deep");
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(t.path().join("bin/sh")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o775);
        assert!(!t.path().join("dev/null").exists());
    }

    #[test]
    fn hostile_entries_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        let evil = outside.path().join("evil");
        let link_target = outside.path().to_str().unwrap().to_string();
        let cases: Vec<Vec<u8>> = vec![
            tar_of(&[("../evil", T::Regular, "", b"x")]),
            tar_of(&[("/evil", T::Regular, "", b"x")]),
            tar_of(&[
                ("link", T::Symlink, &link_target, b""),
                ("link/evil", T::Regular, "", b"x"),
            ]),
            tar_of(&[("passwd", T::Link, "/etc/passwd", b"")]),
            tar_of(&[("passwd", T::Link, "../../etc/passwd", b"")]),
            tar_of(&[
                ("link", T::Symlink, "/etc", b""),
                ("passwd", T::Link, "link/passwd", b""),
            ]),
            // Whiteouts are placed like any entry: never through a link.
            tar_of(&[
                ("link", T::Symlink, &link_target, b""),
                ("link/.wh.evil", T::Regular, "", b""),
            ]),
            tar_of(&[
                ("link", T::Symlink, &link_target, b""),
                ("link/.wh..wh..opq", T::Regular, "", b""),
            ]),
            tar_of(&[("../.wh.evil", T::Regular, "", b"")]),
        ];
        let modes = [Whiteouts::Apply, Whiteouts::Overlay];
        for (i, (tar, mode)) in cases
            .iter()
            .flat_map(|t| modes.iter().map(move |m| (t, *m)))
            .enumerate()
        {
            let root = tempfile::tempdir().unwrap();
            let err = unpack_as(&tar[..], root.path(), Owners::Unpacker, mode).unwrap_err();
            assert!(
                matches!(
                    err,
                    UnpackError::Refused { .. } | UnpackError::ThroughLink { .. }
                ),
                "case {i}: {err:?}"
            );
            assert!(!evil.exists(), "case {i}");
            assert!(!root.path().join("passwd").exists(), "case {i}");
        }
    }

    #[test]
    fn whiteouts_apply_to_lower_layers_only() {
        let t = tempfile::tempdir().unwrap();
        let lower = tar_of(&[
            ("etc/a", T::Regular, "", b"a"),
            ("etc/b", T::Regular, "", b"b"),
            ("opq/old", T::Regular, "", b"o"),
            ("gone/x", T::Regular, "", b"x"),
        ]);
        unpack(&lower[..], t.path()).unwrap();
        let upper = tar_of(&[
            ("etc/.wh.a", T::Regular, "", b""),
            ("opq/new", T::Regular, "", b"n"),
            ("opq/.wh..wh..opq", T::Regular, "", b""),
            (".wh.gone", T::Regular, "", b""),
            ("c", T::Regular, "", b"c"),
            (".wh.c", T::Regular, "", b""),
        ]);
        unpack(&upper[..], t.path()).unwrap();
        let p = t.path();
        assert!(!p.join("etc/a").exists());
        assert!(p.join("etc/b").exists());
        assert!(!p.join("opq/old").exists());
        assert!(p.join("opq/new").exists());
        assert!(!p.join("gone").exists());
        // A whiteout does not remove what its own layer adds.
        assert!(p.join("c").exists());
        assert!(!p.join("etc/.wh.a").exists());
    }

    #[test]
    fn overlay_whiteouts_are_devices_and_xattrs() {
        // mknod of a 0:0 device needs no capability; trusted.* xattrs do.
        if moat_core::testing::needs_root("overlay_whiteouts_are_devices_and_xattrs") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let layer = tar_of(&[
            ("etc/", T::Directory, "", b""),
            ("etc/.wh.a", T::Regular, "", b""),
            ("opq/new", T::Regular, "", b"n"),
            ("opq/.wh..wh..opq", T::Regular, "", b""),
            (".wh.gone", T::Regular, "", b""),
            ("c", T::Regular, "", b"c"),
            (".wh.c", T::Regular, "", b""),
            ("dev/null", T::Char, "", b""),
            ("fake", T::Char, "", b""),
        ]);
        let s = unpack_as(&layer[..], t.path(), Owners::Archive, Whiteouts::Overlay).unwrap();
        assert_eq!(s.skipped, 2);
        let p = t.path();
        let st = |n: &str| rustix::fs::lstat(p.join(n)).unwrap();
        assert!(is_overlay_whiteout(&st("etc/a")));
        assert!(is_overlay_whiteout(&st("gone")));
        assert_eq!((st("gone").st_uid, st("gone").st_gid), (0, 0));
        // What the layer adds stays, whiteout or not; no `.wh.` name stays;
        // device nodes of the archive are not made (not even a 0:0 one).
        assert_eq!(std::fs::read(p.join("c")).unwrap(), b"c");
        assert_eq!(std::fs::read(p.join("opq/new")).unwrap(), b"n");
        assert!(!p.join("fake").exists() && !p.join("dev/null").exists());
        for n in ["etc/.wh.a", ".wh.gone", ".wh.c", "opq/.wh..wh..opq"] {
            assert!(!p.join(n).exists(), "{n}");
        }
        let mut buf = [0u8; 8];
        let n = rustix::fs::lgetxattr(p.join("opq"), OVERLAY_OPAQUE, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"y");
        assert!(rustix::fs::lgetxattr(p.join("etc"), OVERLAY_OPAQUE, &mut buf).is_err());
    }

    #[test]
    fn a_file_replaces_a_lower_directory_and_symlink() {
        let t = tempfile::tempdir().unwrap();
        unpack(
            &tar_of(&[
                ("d/x", T::Regular, "", b"x"),
                ("s", T::Symlink, "/etc", b""),
            ])[..],
            t.path(),
        )
        .unwrap();
        unpack(
            &tar_of(&[("d", T::Regular, "", b"f"), ("s", T::Regular, "", b"g")])[..],
            t.path(),
        )
        .unwrap();
        assert_eq!(std::fs::read(t.path().join("d")).unwrap(), b"f");
        assert_eq!(std::fs::read(t.path().join("s")).unwrap(), b"g");
    }

    #[test]
    fn archive_owners_are_kept_below_the_range() {
        if moat_core::testing::needs_root("archive_owners_are_kept_below_the_range") {
            return;
        }
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, uid, mode) in [
            ("d", T::Directory, 5u64, 0o1777u32),
            ("d/mine", T::Regular, 1000, 0o4600),
            ("far", T::Regular, 70000, 0o2755),
            ("ln", T::Symlink, 7, 0o777),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_uid(uid);
            h.set_gid(uid + 1);
            h.set_mode(mode);
            h.set_size(0);
            if kind == T::Symlink {
                h.set_link_name("d/mine").unwrap();
            }
            b.append_data(&mut h, path, &b""[..]).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let t = tempfile::tempdir().unwrap();
        unpack_as(&tar[..], t.path(), Owners::Archive, Whiteouts::Apply).unwrap();
        use std::os::unix::fs::MetadataExt;
        let md = |p: &str| std::fs::symlink_metadata(t.path().join(p)).unwrap();
        let d = md("d");
        assert_eq!((d.uid(), d.gid(), d.mode() & 0o7777), (5, 6, 0o1777));
        let f = md("d/mine");
        assert_eq!((f.uid(), f.gid(), f.mode() & 0o7777), (1000, 1001, 0o600));
        let far = md("far");
        assert_eq!(
            (far.uid(), far.gid(), far.mode() & 0o7777),
            (65534, 65534, 0o755)
        );
        assert_eq!((md("ln").uid(), md("ln").gid()), (7, 8));
    }

    /// Issue 15, defect 6: a deeply nested archive cost quadratic time and
    /// memory; now past the depth bound it is refused with a word.
    #[test]
    fn depth_entries_and_bytes_are_bounded() {
        let limits = Limits {
            max_depth: 8,
            max_entries: 20,
            max_bytes: 1000,
            max_name_bytes: 1 << 20,
        };
        let go = |tar: &[u8]| {
            let t = tempfile::tempdir().unwrap();
            unpack_limited(tar, t.path(), Owners::Unpacker, Whiteouts::Apply, &limits)
        };
        // At the bound: fine, every level unpacked.
        let deep: Vec<String> = (1..=9).map(|d| "d/".repeat(d)).collect();
        let entries: Vec<(&str, T, &str, &[u8])> = deep
            .iter()
            .map(|p| (p.as_str(), T::Directory, "", &b""[..]))
            .collect();
        go(&tar_of(&entries)).unwrap();
        let too_deep = format!("{}f", "d/".repeat(9));
        let e = go(&tar_of(&[(too_deep.as_str(), T::Regular, "", b"x")])).unwrap_err();
        assert!(matches!(e, UnpackError::TooDeep { max: 8, .. }), "{e:?}");
        assert!(e.to_string().contains("deeper than 8 directories"), "{e}");
        let names: Vec<String> = (0..21).map(|i| format!("f{i}")).collect();
        let many: Vec<(&str, T, &str, &[u8])> = names
            .iter()
            .map(|n| (n.as_str(), T::Regular, "", &b""[..]))
            .collect();
        let e = go(&tar_of(&many)).unwrap_err();
        assert!(
            matches!(e, UnpackError::TooManyEntries { max: 20 }),
            "{e:?}"
        );
        let big = vec![0u8; 600];
        let e = go(&tar_of(&[
            ("a", T::Regular, "", &big[..]),
            ("b", T::Regular, "", &big[..]),
        ]))
        .unwrap_err();
        assert!(
            matches!(e, UnpackError::TooLarge { max: 1000, .. }),
            "{e:?}"
        );
        // Exactly the bound is fine.
        go(&tar_of(&[("a", T::Regular, "", &vec![0u8; 1000][..])])).unwrap();
    }

    /// A long sequential archive (each entry one directory deeper, then
    /// files at every level) unpacks right: the walk reuses the previous
    /// entry's directories, and an entry that replaces one is followed.
    #[test]
    fn the_walk_reuses_and_forgets_directories() {
        let t = tempfile::tempdir().unwrap();
        let mut entries: Vec<(String, T, &str, &[u8])> = Vec::new();
        for d in 1..=40 {
            entries.push(("a/".repeat(d), T::Directory, "", b""));
            entries.push((format!("{}f", "a/".repeat(d)), T::Regular, "", b"x"));
        }
        // Replace a/a (a directory the walk holds) by a file, then a
        // directory again, then write under it.
        entries.push(("a/a".into(), T::Regular, "", b"file"));
        entries.push(("a/a/".into(), T::Directory, "", b""));
        entries.push(("a/a/g".into(), T::Regular, "", b"g"));
        let refs: Vec<(&str, T, &str, &[u8])> = entries
            .iter()
            .map(|(p, k, l, d)| (p.as_str(), *k, *l, *d))
            .collect();
        unpack(&tar_of(&refs)[..], t.path()).unwrap();
        assert_eq!(std::fs::read(t.path().join("a/f")).unwrap(), b"x");
        assert_eq!(std::fs::read(t.path().join("a/a/g")).unwrap(), b"g");
        assert!(!t.path().join("a/a/f").exists());
        // A whiteout of a directory the walk holds, then an entry under it.
        let t2 = tempfile::tempdir().unwrap();
        unpack(&tar_of(&[("x/y/z", T::Regular, "", b"1")])[..], t2.path()).unwrap();
        unpack(
            &tar_of(&[
                ("x/y/w", T::Regular, "", b"w"),
                ("x/.wh.y", T::Regular, "", b""),
                ("x/y/again", T::Regular, "", b"2"),
            ])[..],
            t2.path(),
        )
        .unwrap();
        assert!(!t2.path().join("x/y/z").exists());
        assert_eq!(std::fs::read(t2.path().join("x/y/again")).unwrap(), b"2");
    }

    /// A GNU sparse file is unpacked whole (holes as zeros), no longer
    /// dropped without a word; the PAX form is refused, saying so.
    #[test]
    fn sparse_files_are_unpacked_or_refused_with_a_word() {
        let octal = |field: &mut [u8], n: u64| {
            let text = format!("{n:0w$o}\0", w = field.len() - 1);
            field.copy_from_slice(text.as_bytes());
        };
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(T::GNUSparse);
        h.set_mode(0o644);
        h.set_size(4);
        h.set_path("sparse").unwrap();
        {
            let g = h.as_gnu_mut().unwrap();
            octal(&mut g.realsize, 10000);
            octal(&mut g.sparse[0].offset, 8192);
            octal(&mut g.sparse[0].numbytes, 4);
            // The hole at the end: a last, empty block at the real size.
            octal(&mut g.sparse[1].offset, 10000);
            octal(&mut g.sparse[1].numbytes, 0);
        }
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, &b"data"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let t = tempfile::tempdir().unwrap();
        let s = unpack(&tar[..], t.path()).unwrap();
        assert_eq!(s.skipped, 0);
        let got = std::fs::read(t.path().join("sparse")).unwrap();
        assert_eq!(got.len(), 10000);
        assert_eq!(&got[8192..8196], b"data");
        assert!(got[..8192].iter().all(|b| *b == 0));
        let rec = "22 GNU.sparse.major=1\n";
        assert_eq!(rec.len(), 22);
        let pax = tar_of(&[
            ("PaxHeaders/f", T::XHeader, "", rec.as_bytes()),
            ("f", T::Regular, "", b"x"),
        ]);
        let t = tempfile::tempdir().unwrap();
        let e = unpack(&pax[..], t.path()).unwrap_err();
        assert!(matches!(e, UnpackError::PaxSparse { .. }), "{e:?}");
        assert!(e.to_string().contains("PAX sparse"), "{e}");
    }

    #[test]
    fn stored_ids() {
        assert_eq!(stored_id(0), 0);
        assert_eq!(stored_id(65535), 65535);
        assert_eq!(stored_id(65536), 65534);
        assert_eq!(stored_id(u64::MAX), 65534);
    }
}
