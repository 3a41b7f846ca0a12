//! The mirror: what a microVM's workload wrote to its root file system,
//! brought back to the container's root directory on the host.
//!
//! The guest's root is an overlay whose upper layer (the kept layer's disk)
//! the host engine never sees. When the workload exits, the guest agent walks
//! the upper directory ([`write_changes`]) and writes a stream: every upper
//! directory, with the full listing of the merged directory where it changed,
//! and every changed file (its content read through the merged mount), hard
//! link, symlink and FIFO. The host runtime later applies the stream to the
//! container's root ([`apply`]) so that `docker diff/commit/cp` see the
//! writes; a deletion is whatever a changed directory's listing leaves out.
//!
//! The stream comes from the guest, so the host trusts nothing in it: every
//! length, name and mode is bounded and checked, every path is resolved in the
//! root with `openat2(RESOLVE_IN_ROOT)` and its last component never followed,
//! only directories, regular files, symlinks and FIFOs are made, and a stream
//! cut short (the VM killed mid-write) stops cleanly where it was cut.
//!
//! Encoding, integers little-endian; `bytes` is a u32 length then the bytes;
//! `meta` is mode u32 (at most 07777), uid u32, gid u32, mtime i64 (ns):
//! - header: `moat-mirror-1`, started_ns i64 (the guest's CLOCK_REALTIME
//!   before its walk: the next walk's `since_ns`)
//! - 1 Dir: path bytes, meta, u8 0 (unchanged) or 1, a u32 count and as many
//!   name bytes (the merged directory's full listing)
//! - 2 File: path bytes, meta, u64 length, then that many bytes of content
//! - 3 Link: path bytes, to bytes (the path of an earlier File)
//! - 4 Symlink: path bytes, target bytes, uid u32, gid u32, mtime i64
//! - 5 Fifo: path bytes, meta
//! - 6 End: entries u64 (records 1-5), bytes u64 (content)
//! - 7 Xattrs: path bytes, a u32 count and as many pairs of name bytes and
//!   value bytes: the extended attributes of the File or changed Dir of
//!   that path, which comes next (a changed Dir without them has none)
//!
//! Paths are relative ("etc/passwd"); the root directory is "".
//!
//! Extended attributes carried ([`carried`]): `user.*` (not overlayfs's
//! own), POSIX ACLs and file capabilities (`security.capability`). The host
//! sets ACLs only where it sets owners, and file capabilities only where it
//! also keeps set-ID bits: they grant privilege as a setuid bit does.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Stat, Timespec, Timestamps, Uid,
};
use rustix::io::Errno;

/// How far before `since_ns` a change still counts: clocks and file
/// timestamps are coarse.
pub const MARGIN_NS: i64 = 1_000_000_000;
/// The longest path the host accepts.
pub const MAX_PATH: usize = 4096;
/// The longest name (a path component, a listed name).
pub const MAX_NAME: usize = 255;
/// The most names one directory may list.
pub const MAX_NAMES: u32 = 1 << 20;
/// The most bytes of names one directory may list (what the host holds of
/// a listing at once).
pub const MAX_LISTING: usize = 32 << 20;
/// The longest symlink target.
pub const MAX_TARGET: usize = 4096;
/// Names the host's temporaries take, refused in a stream.
pub const TEMP_PREFIX: &[u8] = b".moat-mirror-";

const MAGIC: &[u8] = b"moat-mirror-1";
/// The most memory the directories' times kept for last may take.
const MAX_DIR_TIMES_BYTES: usize = 64 << 20;
const CHUNK: usize = 1 << 16;
const NS: i64 = 1_000_000_000;

const DIR: u8 = 1;
const FILE: u8 = 2;
const LINK: u8 = 3;
const SYMLINK: u8 = 4;
const FIFO: u8 = 5;
const END: u8 = 6;
const XATTRS: u8 = 7;
/// Extended attributes of one entry the stream may carry.
pub const MAX_XATTRS: u32 = 64;
/// An extended attribute's name, and its value (Linux's own bounds).
const MAX_XATTR_NAME: usize = 255;
const MAX_XATTR_VALUE: usize = 64 << 10;

/// What [`write_changes`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Walked {
    /// Records written (directories, files, links, symlinks, FIFOs).
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// What was left out: device nodes other than whiteouts, sockets, other
    /// file systems, paths over [`MAX_PATH`], names with [`TEMP_PREFIX`],
    /// listings over [`MAX_NAMES`] (sent as unchanged).
    pub skipped: u64,
}

/// How [`apply`] treats owners and modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Set owners from the stream (else everything is the applier's).
    pub owners: bool,
    /// Keep setuid and setgid on files (else they are stripped).
    pub keep_setid: bool,
}

/// What [`apply`] applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// The stream's end was reached (else it was cut short). Only then is
    /// `started_ns` the next walk's `since_ns`.
    pub complete: bool,
    /// The guest's clock when its walk began (0 when the header was cut).
    pub started_ns: i64,
    /// Records applied (directories, files, links, symlinks, FIFOs).
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("cannot read the mirror stream")]
    Read(#[source] io::Error),
    #[error("not a mirror stream of this version")]
    Magic,
    #[error("unknown record tag {0}")]
    Tag(u8),
    #[error("the stream's {field} is {len} bytes long")]
    Length { field: &'static str, len: u32 },
    #[error("refused path {path:?}: {why}")]
    Path { path: String, why: &'static str },
    #[error("refused a name listed in {path:?}: {why}")]
    Name { path: String, why: &'static str },
    #[error("{path:?} lists {count} names (or more than MAX_LISTING bytes of them)")]
    TooManyNames { path: String, count: u32 },
    #[error("refused the target of symlink {path:?}: {why}")]
    Target { path: String, why: &'static str },
    #[error("{path:?}: {field} out of range")]
    Field { path: String, field: &'static str },
    #[error("cannot open the directory of {path:?}")]
    Parent {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("cannot make directory {path:?}")]
    Mkdir {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("cannot open directory {path:?}")]
    OpenDir {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("cannot list {path:?}")]
    List {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("cannot remove {path:?}")]
    Remove {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("cannot make a temporary for {path:?}")]
    Temp {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("cannot write {path:?}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the owner of {path:?}")]
    Owner {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("cannot set the mode of {path:?}")]
    Mode {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("cannot set the times of {path:?}")]
    Times {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("cannot rename onto {path:?}")]
    Rename {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("cannot open {to:?}, which {path:?} links to")]
    LinkSource {
        path: String,
        to: String,
        #[source]
        source: Errno,
    },
    #[error("{path:?} links to {to:?}, not a regular file")]
    NotAFile { path: String, to: String },
    #[error("cannot link {path:?}")]
    Link {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("cannot make symlink {path:?}")]
    Symlink {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("refused the extended attributes of {path:?}: {why}")]
    Xattr { path: String, why: &'static str },
    #[error("cannot set extended attribute {name:?} of {path:?}")]
    SetXattr {
        path: String,
        name: String,
        #[source]
        source: Errno,
    },
    #[error("the stream's end counts {said_entries} entries and {said_bytes} bytes, not the {entries} and {bytes} it carried")]
    Counts {
        said_entries: u64,
        said_bytes: u64,
        entries: u64,
        bytes: u64,
    },
}

/// A path as errors show it (quoted with `{:?}`: the guest chose it).
fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// Owner, mode and modification time of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
}

/// One record of the stream (a File's content follows it).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Record {
    Dir {
        path: Vec<u8>,
        meta: Meta,
        names: Option<Vec<Vec<u8>>>,
    },
    File {
        path: Vec<u8>,
        meta: Meta,
        len: u64,
    },
    Link {
        path: Vec<u8>,
        to: Vec<u8>,
    },
    Symlink {
        path: Vec<u8>,
        target: Vec<u8>,
        uid: u32,
        gid: u32,
        mtime_ns: i64,
    },
    Fifo {
        path: Vec<u8>,
        meta: Meta,
    },
    End {
        entries: u64,
        bytes: u64,
    },
    Xattrs {
        path: Vec<u8>,
        attrs: Attrs,
    },
}

/// Extended attributes: names and values.
type Attrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Whether the mirror carries the extended attribute `name`.
pub fn carried(name: &[u8]) -> bool {
    (name.starts_with(b"user.") && name.len() > 5 && !name.starts_with(b"user.overlay."))
        || name == b"security.capability"
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

// ---------------------------------------------------------------- encoding

fn put_bytes(out: &mut impl Write, b: &[u8]) -> io::Result<()> {
    let len = u32::try_from(b.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "field over 4 GiB"))?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(b)
}

fn put_meta(out: &mut impl Write, m: &Meta) -> io::Result<()> {
    out.write_all(&m.mode.to_le_bytes())?;
    out.write_all(&m.uid.to_le_bytes())?;
    out.write_all(&m.gid.to_le_bytes())?;
    out.write_all(&m.mtime_ns.to_le_bytes())
}

fn put_header(out: &mut impl Write, started_ns: i64) -> io::Result<()> {
    out.write_all(MAGIC)?;
    out.write_all(&started_ns.to_le_bytes())
}

impl Record {
    /// Writes the record (for a File, without its content).
    fn encode(&self, out: &mut impl Write) -> io::Result<()> {
        match self {
            Record::Dir { path, meta, names } => {
                out.write_all(&[DIR])?;
                put_bytes(out, path)?;
                put_meta(out, meta)?;
                match names {
                    None => out.write_all(&[0]),
                    Some(names) => {
                        let count = u32::try_from(names.len()).map_err(|_| {
                            io::Error::new(io::ErrorKind::InvalidInput, "too many names")
                        })?;
                        out.write_all(&[1])?;
                        out.write_all(&count.to_le_bytes())?;
                        names.iter().try_for_each(|n| put_bytes(out, n))
                    }
                }
            }
            Record::File { path, meta, len } => {
                out.write_all(&[FILE])?;
                put_bytes(out, path)?;
                put_meta(out, meta)?;
                out.write_all(&len.to_le_bytes())
            }
            Record::Link { path, to } => {
                out.write_all(&[LINK])?;
                put_bytes(out, path)?;
                put_bytes(out, to)
            }
            Record::Symlink {
                path,
                target,
                uid,
                gid,
                mtime_ns,
            } => {
                out.write_all(&[SYMLINK])?;
                put_bytes(out, path)?;
                put_bytes(out, target)?;
                out.write_all(&uid.to_le_bytes())?;
                out.write_all(&gid.to_le_bytes())?;
                out.write_all(&mtime_ns.to_le_bytes())
            }
            Record::Fifo { path, meta } => {
                out.write_all(&[FIFO])?;
                put_bytes(out, path)?;
                put_meta(out, meta)
            }
            Record::End { entries, bytes } => {
                out.write_all(&[END])?;
                out.write_all(&entries.to_le_bytes())?;
                out.write_all(&bytes.to_le_bytes())
            }
            Record::Xattrs { path, attrs } => {
                out.write_all(&[XATTRS])?;
                put_bytes(out, path)?;
                let count = u32::try_from(attrs.len())
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many xattrs"))?;
                out.write_all(&count.to_le_bytes())?;
                attrs.iter().try_for_each(|(name, value)| {
                    put_bytes(out, name)?;
                    put_bytes(out, value)
                })
            }
        }
    }
}

// ---------------------------------------------------------------- decoding

/// Why decoding stopped: the stream ended inside a record (not an error),
/// or it is malformed.
#[derive(Debug)]
enum Stop {
    Cut,
    Bad(MirrorError),
}

impl From<MirrorError> for Stop {
    fn from(e: MirrorError) -> Stop {
        Stop::Bad(e)
    }
}

/// Why `name` cannot be a path component or a listed name.
fn name_problem(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("an empty name")
    } else if name == b"." || name == b".." {
        Some("a dot name")
    } else if name.len() > MAX_NAME {
        Some("a name too long")
    } else if name.contains(&b'/') {
        Some("a slash in a name")
    } else if name.contains(&0) {
        Some("a NUL in a name")
    } else if name.starts_with(TEMP_PREFIX) {
        Some("a name of the mirror's temporaries")
    } else {
        None
    }
}

/// Why `path` cannot be an entry's path ("" only where `root_ok`).
fn path_problem(path: &[u8], root_ok: bool) -> Option<&'static str> {
    if path.is_empty() {
        return (!root_ok).then_some("the root");
    }
    if path.len() > MAX_PATH {
        return Some("too long");
    }
    path.split(|&b| b == b'/').find_map(name_problem)
}

/// Reads records from a stream, checking every bound before it allocates.
struct Decoder<R> {
    r: R,
}

impl<R: Read> Decoder<R> {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), Stop> {
        self.r.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Stop::Cut
            } else {
                Stop::Bad(MirrorError::Read(e))
            }
        })
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Stop> {
        let mut b = [0; N];
        self.fill(&mut b)?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, Stop> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, Stop> {
        self.array().map(u64::from_le_bytes)
    }

    fn i64(&mut self) -> Result<i64, Stop> {
        self.array().map(i64::from_le_bytes)
    }

    fn bytes(&mut self, max: usize, field: &'static str) -> Result<Vec<u8>, Stop> {
        let len = self.u32()?;
        if len as usize > max {
            return Err(MirrorError::Length { field, len }.into());
        }
        let mut b = vec![0; len as usize];
        self.fill(&mut b)?;
        Ok(b)
    }

    fn header(&mut self) -> Result<i64, Stop> {
        let magic: [u8; MAGIC.len()] = self.array()?;
        if magic != MAGIC {
            return Err(MirrorError::Magic.into());
        }
        self.i64()
    }

    fn path(&mut self, root_ok: bool) -> Result<Vec<u8>, Stop> {
        let path = self.bytes(MAX_PATH, "path")?;
        match path_problem(&path, root_ok) {
            Some(why) => Err(MirrorError::Path {
                path: show(&path),
                why,
            }
            .into()),
            None => Ok(path),
        }
    }

    fn owner(&mut self, path: &[u8]) -> Result<(u32, u32), Stop> {
        let (uid, gid) = (self.u32()?, self.u32()?);
        // -1 means "unchanged" to chown, and is no ID.
        if uid == u32::MAX || gid == u32::MAX {
            return Err(MirrorError::Field {
                path: show(path),
                field: "owner",
            }
            .into());
        }
        Ok((uid, gid))
    }

    fn meta(&mut self, path: &[u8]) -> Result<Meta, Stop> {
        let mode = self.u32()?;
        if mode & !0o7777 != 0 {
            return Err(MirrorError::Field {
                path: show(path),
                field: "mode",
            }
            .into());
        }
        let (uid, gid) = self.owner(path)?;
        let mtime_ns = self.i64()?;
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime_ns,
        })
    }

    fn names(&mut self, path: &[u8]) -> Result<Option<Vec<Vec<u8>>>, Stop> {
        match self.array::<1>()?[0] {
            0 => return Ok(None),
            1 => {}
            _ => {
                return Err(MirrorError::Field {
                    path: show(path),
                    field: "listing flag",
                }
                .into())
            }
        }
        let count = self.u32()?;
        if count > MAX_NAMES {
            return Err(MirrorError::TooManyNames {
                path: show(path),
                count,
            }
            .into());
        }
        let mut names = Vec::with_capacity(count.min(1024) as usize);
        let mut total = 0usize;
        for _ in 0..count {
            let name = self.bytes(MAX_NAME, "name")?;
            total += name.len();
            if total > MAX_LISTING {
                return Err(MirrorError::TooManyNames {
                    path: show(path),
                    count,
                }
                .into());
            }
            if let Some(why) = name_problem(&name) {
                return Err(MirrorError::Name {
                    path: show(path),
                    why,
                }
                .into());
            }
            names.push(name);
        }
        Ok(Some(names))
    }

    fn target(&mut self, path: &[u8]) -> Result<Vec<u8>, Stop> {
        let target = self.bytes(MAX_TARGET, "symlink target")?;
        let why = if target.is_empty() {
            "empty"
        } else if target.contains(&0) {
            "a NUL"
        } else {
            return Ok(target);
        };
        Err(MirrorError::Target {
            path: show(path),
            why,
        }
        .into())
    }

    fn xattrs(&mut self, path: &[u8]) -> Result<Attrs, Stop> {
        let count = self.u32()?;
        if count > MAX_XATTRS {
            return Err(MirrorError::Field {
                path: show(path),
                field: "extended attribute count",
            }
            .into());
        }
        let mut attrs = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let name = self.bytes(MAX_XATTR_NAME, "extended attribute name")?;
            if !carried(&name) || name.contains(&0) {
                return Err(MirrorError::Xattr {
                    path: show(path),
                    why: "a name the mirror does not carry",
                }
                .into());
            }
            let value = self.bytes(MAX_XATTR_VALUE, "extended attribute value")?;
            attrs.push((name, value));
        }
        Ok(attrs)
    }

    /// The next record; a File's content is then read from `self.r`.
    fn record(&mut self) -> Result<Record, Stop> {
        let [tag] = self.array()?;
        Ok(match tag {
            DIR => {
                let path = self.path(true)?;
                let meta = self.meta(&path)?;
                let names = self.names(&path)?;
                Record::Dir { path, meta, names }
            }
            FILE => {
                let path = self.path(false)?;
                let meta = self.meta(&path)?;
                let len = self.u64()?;
                Record::File { path, meta, len }
            }
            LINK => {
                let path = self.path(false)?;
                let to = self.path(false)?;
                Record::Link { path, to }
            }
            SYMLINK => {
                let path = self.path(false)?;
                let target = self.target(&path)?;
                let (uid, gid) = self.owner(&path)?;
                let mtime_ns = self.i64()?;
                Record::Symlink {
                    path,
                    target,
                    uid,
                    gid,
                    mtime_ns,
                }
            }
            FIFO => {
                let path = self.path(false)?;
                let meta = self.meta(&path)?;
                Record::Fifo { path, meta }
            }
            END => Record::End {
                entries: self.u64()?,
                bytes: self.u64()?,
            },
            XATTRS => {
                let path = self.path(true)?;
                let attrs = self.xattrs(&path)?;
                Record::Xattrs { path, attrs }
            }
            tag => return Err(MirrorError::Tag(tag).into()),
        })
    }
}

// ---------------------------------------------------------------- the guest

#[allow(clippy::unnecessary_cast)] // the fields' types differ between architectures
fn ctime_ns(st: &Stat) -> i64 {
    ns(st.st_ctime as i64, st.st_ctime_nsec as i64)
}

#[allow(clippy::unnecessary_cast)] // the fields' types differ between architectures
fn mtime_ns(st: &Stat) -> i64 {
    ns(st.st_mtime as i64, st.st_mtime_nsec as i64)
}

fn ns(sec: i64, nsec: i64) -> i64 {
    sec.saturating_mul(NS).saturating_add(nsec)
}

fn meta_of(st: &Stat) -> Meta {
    Meta {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime_ns: mtime_ns(st),
    }
}

fn now_ns() -> i64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
    ns(t.tv_sec, t.tv_nsec)
}

/// An I/O error naming the path it happened at.
fn at(path: &[u8]) -> impl FnOnce(Errno) -> io::Error + '_ {
    move |e| {
        let e = io::Error::from(e);
        io::Error::new(e.kind(), format!("{:?}: {e}", show(path)))
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
    if !parent.is_empty() {
        p.extend_from_slice(parent);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// The names in the directory `fd` (without `.`, `..`).
fn list(fd: BorrowedFd<'_>) -> Result<Vec<Vec<u8>>, Errno> {
    let mut out = Vec::new();
    for ent in rustix::fs::Dir::read_from(fd)? {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(n.to_vec());
        }
    }
    Ok(out)
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// A directory open where its entries are walked (`src`: the upper layer,
/// or with `full` the merged mount) and in the merged mount.
struct Pair {
    src: OwnedFd,
    merged: OwnedFd,
    /// Everything under it is sent: it is (under) a directory renamed with
    /// `redirect_dir`, whose content the upper layer does not hold.
    full: bool,
}

impl Pair {
    /// `path` opened again from the roots, through no symlink.
    fn reopen(
        upper: BorrowedFd<'_>,
        merged: BorrowedFd<'_>,
        path: &[u8],
        full: bool,
    ) -> io::Result<Pair> {
        let p = if path.is_empty() { b"." } else { path };
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS;
        let open =
            |root: BorrowedFd<'_>| rustix::fs::openat2(root, os(p), DIR_FLAGS, Mode::empty(), how);
        Ok(Pair {
            src: open(if full { merged } else { upper }).map_err(at(path))?,
            merged: open(merged).map_err(at(path))?,
            full,
        })
    }
}

/// Whether the upper directory `fd` was renamed from a lower one (its
/// content stays in the lower layer).
fn redirected(fd: BorrowedFd<'_>) -> bool {
    ["trusted.overlay.redirect", "user.overlay.redirect"]
        .iter()
        .any(|x| rustix::fs::fgetxattr_query(fd, *x).is_ok())
}

/// A directory being walked: its path, the names still to visit (last
/// first), whether everything under it is sent.
struct Frame {
    path: Vec<u8>,
    todo: Vec<Vec<u8>>,
    full: bool,
}

/// Where [`write_changes`] sends the stream: its bytes, and files'
/// contents, which a sink on a descriptor may move without copying them
/// through user memory (the guest agent's: `splice`).
pub trait Sink: Write {
    /// Sends the next `len` bytes of `file` (read from its offset) as the
    /// stream's next bytes; returns how many it sent, fewer only where the
    /// file ended first.
    fn send_file(&mut self, file: &std::fs::File, len: u64) -> io::Result<u64> {
        io::copy(&mut Read::take(file, len), self)
    }
}

impl Sink for Vec<u8> {}

impl<S: Sink + ?Sized> Sink for &mut S {
    fn send_file(&mut self, file: &std::fs::File, len: u64) -> io::Result<u64> {
        (**self).send_file(file, len)
    }
}

/// The names of `fd`'s extended attributes (none where its file system
/// has none), the list's size asked for first: most files have none, and
/// a list may take 64 KiB.
fn xattr_names(fd: BorrowedFd<'_>) -> Result<Vec<Vec<u8>>, Errno> {
    // Tried again while the list grows between the query and the read.
    for _ in 0..4 {
        let size = match rustix::fs::flistxattr_query(fd) {
            Ok(0) | Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Ok(n) => n,
            Err(e) => return Err(e),
        };
        let mut list = vec![0u8; size];
        match rustix::fs::flistxattr(fd, &mut list[..]) {
            Ok(n) => {
                let names = list[..n].split(|&b| b == 0).filter(|n| !n.is_empty());
                return Ok(names.map(<[u8]>::to_vec).collect());
            }
            Err(Errno::RANGE) => {}
            Err(e) => return Err(e),
        }
    }
    Err(Errno::RANGE)
}

/// The value of `fd`'s extended attribute `name`, its size asked for
/// first; None once it is gone.
fn xattr_value(fd: BorrowedFd<'_>, name: &[u8]) -> Result<Option<Vec<u8>>, Errno> {
    for _ in 0..4 {
        let size = match rustix::fs::fgetxattr_query(fd, os(name)) {
            Ok(n) => n,
            Err(Errno::NODATA) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut value = vec![0u8; size];
        match rustix::fs::fgetxattr(fd, os(name), &mut value[..]) {
            Ok(n) => {
                value.truncate(n);
                return Ok(Some(value));
            }
            Err(Errno::NODATA) => return Ok(None),
            Err(Errno::RANGE) => {}
            Err(e) => return Err(e),
        }
    }
    Err(Errno::RANGE)
}

/// Files at least this long go to [`Sink::send_file`]; smaller ones are
/// copied with the records around them.
const SEND_FILE_MIN: u64 = 64 << 10;

struct Walker<W: Sink> {
    out: BufWriter<W>,
    threshold: i64,
    /// The upper layer's device, and the merged mount's (its directories').
    dev: u64,
    merged_dev: u64,
    /// Files of several links already sent, by (device, inode).
    links: HashMap<(u64, u64), Vec<u8>>,
    walked: Walked,
}

/// Writes the stream of what changed in the overlay whose upper directory is
/// `upper` and whose merged mount is `merged`: entries whose ctime is at or
/// after `since_ns - MARGIN_NS` (nanoseconds since the epoch,
/// CLOCK_REALTIME; 0 = everything).
pub fn write_changes(
    upper: &Path,
    merged: &Path,
    since_ns: i64,
    out: &mut impl Sink,
) -> io::Result<Walked> {
    let started_ns = now_ns();
    let threshold = if since_ns == 0 {
        i64::MIN
    } else {
        since_ns.saturating_sub(MARGIN_NS)
    };
    let open = |p: &Path| {
        rustix::fs::open(p, DIR_FLAGS, Mode::empty()).map_err(at(p.as_os_str().as_bytes()))
    };
    let (upper, merged) = (open(upper)?, open(merged)?);
    let mut w = Walker {
        out: BufWriter::with_capacity(CHUNK, out),
        threshold,
        dev: 0,
        merged_dev: 0,
        links: HashMap::new(),
        walked: Walked::default(),
    };
    put_header(&mut w.out, started_ns)?;
    w.walk(upper.as_fd(), merged.as_fd())?;
    let end = Record::End {
        entries: w.walked.entries,
        bytes: w.walked.bytes,
    };
    end.encode(&mut w.out)?;
    w.out.flush()?;
    Ok(w.walked)
}

impl<W: Sink> Walker<W> {
    /// Pre-order, holding open only the directory being read (a deep tree
    /// costs no descriptors): a parent is opened again when the walk comes
    /// back to it.
    fn walk(&mut self, upper: BorrowedFd<'_>, merged: BorrowedFd<'_>) -> io::Result<()> {
        let root = Pair::reopen(upper, merged, b"", false)?;
        let st = rustix::fs::fstat(&root.src).map_err(at(b""))?;
        self.dev = st.st_dev;
        self.merged_dev = rustix::fs::fstat(&root.merged).map_err(at(b""))?.st_dev;
        let todo = self.dir(b"", &st, &root)?;
        let mut stack = vec![Frame {
            path: Vec::new(),
            todo,
            full: false,
        }];
        let mut cur = Some(root);
        while let Some(top) = stack.last_mut() {
            let Some(name) = top.todo.pop() else {
                stack.pop();
                cur = None;
                continue;
            };
            let pair = match cur.take() {
                Some(p) => p,
                None => Pair::reopen(upper, merged, &top.path, top.full)?,
            };
            let path = join(&top.path, &name);
            match self.entry(&pair, &name, path)? {
                Some((child, frame)) => {
                    stack.push(frame);
                    cur = Some(child);
                }
                None => cur = Some(pair),
            }
        }
        Ok(())
    }

    /// Sends the directory `path` (open as `pair`); returns its names to
    /// visit, last first.
    fn dir(&mut self, path: &[u8], st: &Stat, pair: &Pair) -> io::Result<Vec<Vec<u8>>> {
        let names = if pair.full || ctime_ns(st) >= self.threshold {
            let mut names = list(pair.merged.as_fd()).map_err(at(path))?;
            names.retain(|n| !n.starts_with(TEMP_PREFIX));
            names.sort();
            if names.len() > MAX_NAMES as usize
                || names.iter().map(Vec::len).sum::<usize>() > MAX_LISTING
            {
                self.walked.skipped += 1;
                None
            } else {
                Some(names)
            }
        } else {
            None
        };
        if names.is_some() {
            self.send_xattrs(pair.merged.as_fd(), path)?;
        }
        let rec = Record::Dir {
            path: path.to_vec(),
            meta: meta_of(st),
            names,
        };
        rec.encode(&mut self.out)?;
        self.walked.entries += 1;
        let mut todo = list(pair.src.as_fd()).map_err(at(path))?;
        let before = todo.len();
        todo.retain(|n| !n.starts_with(TEMP_PREFIX));
        self.walked.skipped += (before - todo.len()) as u64;
        todo.sort_by(|a, b| b.cmp(a));
        Ok(todo)
    }

    /// Sends the entry `name` of `dir`; for a directory, returns it open
    /// and its frame.
    fn entry(
        &mut self,
        dir: &Pair,
        name: &[u8],
        path: Vec<u8>,
    ) -> io::Result<Option<(Pair, Frame)>> {
        let st =
            rustix::fs::statat(&dir.src, os(name), AtFlags::SYMLINK_NOFOLLOW).map_err(at(&path))?;
        let kind = FileType::from_raw_mode(st.st_mode);
        if kind == FileType::CharacterDevice && st.st_rdev == 0 {
            return Ok(None); // a whiteout: the parent's listing covers it
        }
        if path.len() > MAX_PATH {
            self.walked.skipped += 1;
            return Ok(None);
        }
        let changed = dir.full || ctime_ns(&st) >= self.threshold;
        let dev = if dir.full { self.merged_dev } else { self.dev };
        match kind {
            FileType::Directory if st.st_dev == dev => {
                let pair = self.subdir(dir, name, &path, changed)?;
                let todo = self.dir(&path, &st, &pair)?;
                let full = pair.full;
                return Ok(Some((pair, Frame { path, todo, full })));
            }
            FileType::RegularFile if changed => self.file(dir, name, path, &st)?,
            FileType::Symlink if changed => {
                let target = rustix::fs::readlinkat(&dir.src, os(name), Vec::new())
                    .map_err(at(&path))?
                    .into_bytes();
                let rec = Record::Symlink {
                    path,
                    target,
                    uid: st.st_uid,
                    gid: st.st_gid,
                    mtime_ns: mtime_ns(&st),
                };
                self.send(&rec)?;
            }
            FileType::Fifo if changed => self.send(&Record::Fifo {
                path,
                meta: meta_of(&st),
            })?,
            FileType::RegularFile | FileType::Symlink | FileType::Fifo => {}
            _ => self.walked.skipped += 1,
        }
        Ok(None)
    }

    /// The subdirectory `name` of `dir`, walked in full from where a
    /// directory that `changed` was renamed.
    fn subdir(&self, dir: &Pair, name: &[u8], path: &[u8], changed: bool) -> io::Result<Pair> {
        let open = |d: &OwnedFd| {
            rustix::fs::openat(d, os(name), DIR_FLAGS, Mode::empty()).map_err(at(path))
        };
        let (src, merged) = (open(&dir.src)?, open(&dir.merged)?);
        if !dir.full && changed && redirected(src.as_fd()) {
            let src = open(&dir.merged)?;
            return Ok(Pair {
                src,
                merged,
                full: true,
            });
        }
        Ok(Pair {
            src,
            merged,
            full: dir.full,
        })
    }

    /// Sends the carried extended attributes of the entry `path`, open
    /// as `fd` (in the merged mount: overlayfs's own are not listed
    /// there), if it has any, before the entry's own record.
    fn send_xattrs(&mut self, fd: BorrowedFd<'_>, path: &[u8]) -> io::Result<()> {
        let mut attrs = Vec::new();
        let names = xattr_names(fd).map_err(at(path))?;
        for name in names.into_iter().filter(|n| carried(n)) {
            if attrs.len() == MAX_XATTRS as usize {
                self.walked.skipped += 1;
                break;
            }
            // None: removed since it was listed.
            if let Some(value) = xattr_value(fd, &name).map_err(at(path))? {
                attrs.push((name, value));
            }
        }
        if attrs.is_empty() {
            return Ok(());
        }
        attrs.sort();
        let path = path.to_vec();
        Record::Xattrs { path, attrs }.encode(&mut self.out)
    }

    fn send(&mut self, rec: &Record) -> io::Result<()> {
        rec.encode(&mut self.out)?;
        self.walked.entries += 1;
        Ok(())
    }

    /// A changed regular file: a Link to the path it was first sent as, or
    /// its content read through the merged mount (with metacopy the upper
    /// file can be metadata only).
    fn file(&mut self, dir: &Pair, name: &[u8], path: Vec<u8>, st: &Stat) -> io::Result<()> {
        #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
        let (nlink, key) = (u64::from(st.st_nlink), (st.st_dev, st.st_ino as u64));
        if nlink > 1 {
            if let Some(to) = self.links.get(&key) {
                let to = to.clone();
                return self.send(&Record::Link { path, to });
            }
            self.links.insert(key, path.clone());
        }
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let f =
            rustix::fs::openat(&dir.merged, os(name), flags, Mode::empty()).map_err(at(&path))?;
        let mst = rustix::fs::fstat(&f).map_err(at(&path))?;
        if FileType::from_raw_mode(mst.st_mode) != FileType::RegularFile {
            let why = format!("{:?}: not a regular file in the merged mount", show(&path));
            return Err(io::Error::new(io::ErrorKind::InvalidData, why));
        }
        let len = u64::try_from(mst.st_size).unwrap_or(0);
        self.send_xattrs(f.as_fd(), &path)?;
        let rec = Record::File {
            path: path.clone(),
            meta: meta_of(st),
            len,
        };
        rec.encode(&mut self.out)?;
        let f = std::fs::File::from(f);
        let copied = if len >= SEND_FILE_MIN {
            self.out.flush()?;
            self.out.get_mut().send_file(&f, len)?
        } else {
            io::copy(&mut Read::take(&f, len), &mut self.out)?
        };
        if copied != len {
            let why = format!("{:?}: shrank while it was read", show(&path));
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, why));
        }
        self.walked.entries += 1;
        self.walked.bytes += len;
        Ok(())
    }
}

// ---------------------------------------------------------------- the host

/// Resolution of every path the stream names: inside the root, whatever
/// symlinks are on the way, on the root's own file system.
const IN_ROOT: ResolveFlags = ResolveFlags::IN_ROOT
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

static TEMPS: AtomicU64 = AtomicU64::new(0);

fn open_in_root(root: BorrowedFd<'_>, path: &[u8], flags: OFlags) -> Result<OwnedFd, Errno> {
    let p = if path.is_empty() { b"." } else { path };
    // EAGAIN: a rename or mount elsewhere raced the resolution; try again.
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(root, os(p), flags, Mode::empty(), IN_ROOT) {
            Err(Errno::AGAIN) if tries < 8 => tries += 1,
            r => return r,
        }
    }
}

/// A temporary sibling that is unlinked unless renamed onto its name.
struct Temp<'a> {
    dir: BorrowedFd<'a>,
    name: OsString,
    live: bool,
}

impl<'a> Temp<'a> {
    /// Makes a temporary in `dir` with `make`, under a fresh name.
    fn make<T>(
        dir: BorrowedFd<'a>,
        mut make: impl FnMut(&OsStr) -> Result<T, Errno>,
    ) -> Result<(T, Temp<'a>), Errno> {
        let mut tries = 0;
        loop {
            let n = TEMPS.fetch_add(1, Ordering::Relaxed);
            let mut name = TEMP_PREFIX.to_vec();
            name.extend_from_slice(format!("{}-{n}", std::process::id()).as_bytes());
            let name = OsString::from_vec(name);
            match make(&name) {
                Ok(t) => {
                    let temp = Temp {
                        dir,
                        name,
                        live: true,
                    };
                    return Ok((t, temp));
                }
                Err(Errno::EXIST) if tries < 16 => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Renames the temporary onto `name` (removing a directory there first).
    fn commit(mut self, name: &OsStr, path: &[u8]) -> Result<(), MirrorError> {
        clear_dir(self.dir, name).map_err(|source| MirrorError::Remove {
            path: show(path),
            source,
        })?;
        rustix::fs::renameat(self.dir, &self.name, self.dir, name).map_err(|source| {
            MirrorError::Rename {
                path: show(path),
                source,
            }
        })?;
        self.live = false;
        Ok(())
    }
}

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        if self.live {
            // Best effort: the error being reported is the one that matters,
            // and a Dir record's listing removes a temporary left behind.
            let _ = rustix::fs::unlinkat(self.dir, &self.name, AtFlags::empty());
        }
    }
}

/// Removes `name` in `dir` if it is a directory (a rename cannot replace one).
fn clear_dir(dir: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            remove_tree(dir, name)
        }
        Ok(_) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes `name` in `dir` and, for a directory, everything under it, never
/// following a symlink. Holds open only the directory being emptied (a deep
/// tree costs no descriptors), going back up through `..`.
fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    let mut cur = match rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(Errno::LOOP | Errno::NOTDIR) => {
            return rustix::fs::unlinkat(dir, name, AtFlags::empty())
        }
        Err(e) => return Err(e),
    };
    // Each level: its name in its parent and its names still to remove.
    let mut stack = vec![(name.to_os_string(), list(cur.as_fd())?)];
    while let Some((_, todo)) = stack.last_mut() {
        if let Some(n) = todo.pop() {
            match rustix::fs::openat(&cur, os(&n), DIR_FLAGS, Mode::empty()) {
                Ok(sub) => {
                    let names = list(sub.as_fd())?;
                    stack.push((OsString::from_vec(n), names));
                    cur = sub;
                }
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    rustix::fs::unlinkat(&cur, os(&n), AtFlags::empty())?
                }
                Err(Errno::NOENT) => {}
                Err(e) => return Err(e),
            }
            continue;
        }
        let (done, _) = stack.pop().unwrap_or_default();
        if stack.is_empty() {
            return rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR);
        }
        let up = rustix::fs::openat(&cur, "..", DIR_FLAGS, Mode::empty())?;
        rustix::fs::unlinkat(&up, &done, AtFlags::REMOVEDIR)?;
        cur = up;
    }
    Ok(())
}

fn times(mtime_ns: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime_ns.div_euclid(NS),
        tv_nsec: mtime_ns.rem_euclid(NS),
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

struct Applier<'a> {
    root: BorrowedFd<'a>,
    opts: ApplyOptions,
    /// Directories applied and their mtimes, set last.
    dir_times: HashMap<Vec<u8>, i64>,
    /// What `dir_times` holds, roughly ([`MAX_DIR_TIMES_BYTES`]).
    dir_times_bytes: usize,
    /// An Xattrs record's, for the File or Dir that comes next.
    xattrs: Option<(Vec<u8>, Attrs)>,
    done: Applied,
}

/// Applies the stream read from `stream` to the directory `root` (an fd
/// opened O_DIRECTORY on the container's root). A stream cut short is
/// applied up to the cut (`complete` false); a malformed one is an error,
/// with what came before it applied.
pub fn apply(
    stream: &mut impl Read,
    root: BorrowedFd<'_>,
    opts: ApplyOptions,
) -> Result<Applied, MirrorError> {
    let mut dec = Decoder { r: stream };
    let started_ns = match dec.header() {
        Ok(t) => t,
        Err(Stop::Cut) => return Ok(Applied::default()),
        Err(Stop::Bad(e)) => return Err(e),
    };
    let mut ap = Applier {
        root,
        opts,
        dir_times: HashMap::new(),
        dir_times_bytes: 0,
        xattrs: None,
        done: Applied {
            started_ns,
            ..Applied::default()
        },
    };
    let applied = ap.records(&mut dec);
    // Directory times last: adding entries changed them.
    let timed = ap.set_dir_times();
    ap.done.complete = applied?;
    timed?;
    Ok(ap.done)
}

impl Applier<'_> {
    /// Applies records up to the End (true) or the cut (false).
    fn records<R: Read>(&mut self, dec: &mut Decoder<R>) -> Result<bool, MirrorError> {
        loop {
            let rec = match dec.record() {
                Ok(r) => r,
                Err(Stop::Cut) => return Ok(false),
                Err(Stop::Bad(e)) => return Err(e),
            };
            if let Record::Xattrs { path, attrs } = rec {
                if self.xattrs.is_some() {
                    return Err(MirrorError::Xattr {
                        path: show(&path),
                        why: "a second record of them",
                    });
                }
                self.xattrs = Some((path, attrs));
                continue; // not an entry
            }
            let attrs = match &rec {
                Record::File { path, .. } | Record::Dir { path, .. } => {
                    self.xattrs_of(Some(path))?
                }
                _ => self.xattrs_of(None)?,
            };
            match rec {
                Record::Xattrs { .. } => {} // kept above
                Record::End { entries, bytes } => {
                    if (entries, bytes) != (self.done.entries, self.done.bytes) {
                        return Err(MirrorError::Counts {
                            said_entries: entries,
                            said_bytes: bytes,
                            entries: self.done.entries,
                            bytes: self.done.bytes,
                        });
                    }
                    return Ok(true);
                }
                Record::Dir { path, meta, names } => self.dir(&path, meta, names, &attrs)?,
                Record::File { path, meta, len } => {
                    if !self.file(&path, meta, len, &attrs, &mut dec.r)? {
                        return Ok(false);
                    }
                }
                Record::Link { path, to } => self.link(&path, &to)?,
                Record::Symlink {
                    path,
                    target,
                    uid,
                    gid,
                    mtime_ns,
                } => self.symlink(&path, &target, (uid, gid), mtime_ns)?,
                Record::Fifo { path, meta } => self.fifo(&path, meta)?,
            }
            self.done.entries += 1;
        }
    }

    /// The extended attributes sent for `path` (none if none were), which
    /// must be the entry that follows them.
    fn xattrs_of(&mut self, path: Option<&[u8]>) -> Result<Attrs, MirrorError> {
        match self.xattrs.take() {
            None => Ok(Vec::new()),
            Some((p, attrs)) if Some(p.as_slice()) == path => Ok(attrs),
            Some((p, _)) => Err(MirrorError::Xattr {
                path: show(&p),
                why: "not followed by that file or directory",
            }),
        }
    }

    /// Whether this apply sets the extended attribute `name` (one the
    /// stream may carry): ACLs name owners, file capabilities grant
    /// privilege as set-ID bits do.
    fn sets_xattr(&self, name: &[u8]) -> bool {
        if name.starts_with(b"system.posix_acl_") {
            self.opts.owners
        } else if name == b"security.capability" {
            self.opts.owners && self.opts.keep_setid
        } else {
            true
        }
    }

    /// Sets `attrs` on the entry open as `fd` (after its owner: a chown
    /// clears file capabilities); with `exact`, removes the carried ones it
    /// has beyond them. A file system without extended attributes gets none.
    fn set_xattrs(
        &self,
        fd: BorrowedFd<'_>,
        path: &[u8],
        attrs: &Attrs,
        exact: bool,
    ) -> Result<(), MirrorError> {
        let err = |name: &[u8]| {
            let name = show(name);
            move |source| MirrorError::SetXattr {
                path: show(path),
                name,
                source,
            }
        };
        for (name, value) in attrs.iter().filter(|(n, _)| self.sets_xattr(n)) {
            match rustix::fs::fsetxattr(fd, os(name), value, rustix::fs::XattrFlags::empty()) {
                Ok(()) | Err(Errno::NOTSUP) => {}
                Err(e) => return Err(err(name)(e)),
            }
        }
        if !exact {
            return Ok(());
        }
        let have = xattr_names(fd).map_err(err(b""))?;
        for name in have.iter().filter(|n| carried(n) && self.sets_xattr(n)) {
            if attrs.iter().any(|(n, _)| n == name) {
                continue;
            }
            match rustix::fs::fremovexattr(fd, os(name)) {
                Ok(()) | Err(Errno::NODATA) => {}
                Err(e) => return Err(err(name)(e)),
            }
        }
        Ok(())
    }

    /// The directory holding `path`'s last component, and that component.
    fn parent<'p>(&self, path: &'p [u8]) -> Result<(OwnedFd, &'p OsStr), MirrorError> {
        let (dir, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&b""[..], path),
        };
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = open_in_root(self.root, dir, flags).map_err(|source| MirrorError::Parent {
            path: show(path),
            source,
        })?;
        Ok((fd, os(name)))
    }

    fn owner(
        &self,
        fd: BorrowedFd<'_>,
        path: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<(), MirrorError> {
        if !self.opts.owners {
            return Ok(());
        }
        rustix::fs::fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(
            |source| MirrorError::Owner {
                path: show(path),
                source,
            },
        )
    }

    /// Owner, then mode (chown clears setid bits), then times, of a
    /// non-directory open as `fd`.
    fn finish(&self, fd: BorrowedFd<'_>, path: &[u8], meta: Meta) -> Result<(), MirrorError> {
        self.owner(fd, path, meta.uid, meta.gid)?;
        let mode = if self.opts.keep_setid {
            meta.mode
        } else {
            meta.mode & !0o6000
        };
        rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(|source| MirrorError::Mode {
            path: show(path),
            source,
        })?;
        rustix::fs::futimens(fd, &times(meta.mtime_ns)).map_err(|source| MirrorError::Times {
            path: show(path),
            source,
        })
    }

    fn dir(
        &mut self,
        path: &[u8],
        meta: Meta,
        names: Option<Vec<Vec<u8>>>,
        attrs: &Attrs,
    ) -> Result<(), MirrorError> {
        let open_err = |source| MirrorError::OpenDir {
            path: show(path),
            source,
        };
        let fd = if path.is_empty() {
            rustix::fs::openat(self.root, ".", DIR_FLAGS, Mode::empty()).map_err(open_err)?
        } else {
            let (parent, name) = self.parent(path)?;
            make_dir(parent.as_fd(), name, path)?;
            rustix::fs::openat(&parent, name, DIR_FLAGS, Mode::empty()).map_err(open_err)?
        };
        self.owner(fd.as_fd(), path, meta.uid, meta.gid)?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(meta.mode)).map_err(|source| {
            MirrorError::Mode {
                path: show(path),
                source,
            }
        })?;
        // A changed directory's set is whole; an unchanged one sends none.
        self.set_xattrs(fd.as_fd(), path, attrs, names.is_some())?;
        if let Some(names) = names {
            let keep: HashSet<&[u8]> = names.iter().map(Vec::as_slice).collect();
            let have = list(fd.as_fd()).map_err(|source| MirrorError::List {
                path: show(path),
                source,
            })?;
            for n in have.iter().filter(|n| !keep.contains(n.as_slice())) {
                remove_tree(fd.as_fd(), os(n)).map_err(|source| MirrorError::Remove {
                    path: show(&join(path, n)),
                    source,
                })?;
            }
        }
        // Bounded: a guest's millions of directories cost the host at
        // most this much memory; past it, their times are the apply's.
        if self.dir_times_bytes + path.len() <= MAX_DIR_TIMES_BYTES
            && self
                .dir_times
                .insert(path.to_vec(), meta.mtime_ns)
                .is_none()
        {
            self.dir_times_bytes += path.len() + 32;
        }
        Ok(())
    }

    /// Copies `len` bytes of content into a temporary, then renames it onto
    /// `path`; false when the stream was cut inside the content.
    fn file(
        &mut self,
        path: &[u8],
        meta: Meta,
        len: u64,
        attrs: &Attrs,
        r: &mut impl Read,
    ) -> Result<bool, MirrorError> {
        let (parent, name) = self.parent(path)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let (fd, temp) = Temp::make(parent.as_fd(), |t| {
            rustix::fs::openat(&parent, t, flags, Mode::from_raw_mode(0o600))
        })
        .map_err(|source| MirrorError::Temp {
            path: show(path),
            source,
        })?;
        let mut f = std::fs::File::from(fd);
        if !copy_exact(r, &mut f, len, path)? {
            return Ok(false);
        }
        self.finish(f.as_fd(), path, meta)?;
        self.set_xattrs(f.as_fd(), path, attrs, false)?;
        temp.commit(name, path)?;
        self.done.bytes += len;
        Ok(true)
    }

    fn link(&mut self, path: &[u8], to: &[u8]) -> Result<(), MirrorError> {
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let src = open_in_root(self.root, to, flags).map_err(|source| MirrorError::LinkSource {
            path: show(path),
            to: show(to),
            source,
        })?;
        let st = rustix::fs::fstat(&src).map_err(|source| MirrorError::LinkSource {
            path: show(path),
            to: show(to),
            source,
        })?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(MirrorError::NotAFile {
                path: show(path),
                to: show(to),
            });
        }
        let (parent, name) = self.parent(path)?;
        // Already a link to it: a rename between two links of one file
        // would do nothing, and leave the temporary.
        if let Ok(have) = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            if (have.st_dev, have.st_ino) == (st.st_dev, st.st_ino) {
                return Ok(());
            }
        }
        let ((), temp) = Temp::make(parent.as_fd(), |t| {
            rustix::fs::linkat(&src, "", &parent, t, AtFlags::EMPTY_PATH)
        })
        .map_err(|source| MirrorError::Link {
            path: show(path),
            source,
        })?;
        temp.commit(name, path)
    }

    fn symlink(
        &mut self,
        path: &[u8],
        target: &[u8],
        (uid, gid): (u32, u32),
        mtime_ns: i64,
    ) -> Result<(), MirrorError> {
        let (parent, name) = self.parent(path)?;
        let ((), temp) = Temp::make(parent.as_fd(), |t| {
            rustix::fs::symlinkat(os(target), &parent, t)
        })
        .map_err(|source| MirrorError::Symlink {
            path: show(path),
            source,
        })?;
        if self.opts.owners {
            let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
            rustix::fs::chownat(
                &parent,
                &temp.name,
                Some(u),
                Some(g),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|source| MirrorError::Owner {
                path: show(path),
                source,
            })?;
        }
        rustix::fs::utimensat(
            &parent,
            &temp.name,
            &times(mtime_ns),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|source| MirrorError::Times {
            path: show(path),
            source,
        })?;
        temp.commit(name, path)
    }

    fn fifo(&mut self, path: &[u8], meta: Meta) -> Result<(), MirrorError> {
        let (parent, name) = self.parent(path)?;
        let temp_err = |source| MirrorError::Temp {
            path: show(path),
            source,
        };
        let ((), temp) = Temp::make(parent.as_fd(), |t| {
            rustix::fs::mknodat(&parent, t, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
        })
        .map_err(temp_err)?;
        // Opened without waiting for a writer, never following a link.
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&parent, &temp.name, flags, Mode::empty()).map_err(temp_err)?;
        self.finish(fd.as_fd(), path, meta)?;
        temp.commit(name, path)
    }

    /// Sets the applied directories' times, deepest first. A directory that
    /// a later record replaced is left alone.
    fn set_dir_times(&self) -> Result<(), MirrorError> {
        let mut dirs: Vec<(&Vec<u8>, &i64)> = self.dir_times.iter().collect();
        let depth =
            |p: &[u8]| p.iter().filter(|&&b| b == b'/').count() + usize::from(!p.is_empty());
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(depth(p)));
        for (path, &mtime_ns) in dirs {
            let fd = match open_in_root(self.root, path, DIR_FLAGS) {
                Ok(fd) => fd,
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
                Err(source) => {
                    return Err(MirrorError::OpenDir {
                        path: show(path),
                        source,
                    })
                }
            };
            rustix::fs::futimens(&fd, &times(mtime_ns)).map_err(|source| MirrorError::Times {
                path: show(path),
                source,
            })?;
        }
        Ok(())
    }
}

/// Makes the directory `name` in `parent`, replacing anything else there.
fn make_dir(parent: BorrowedFd<'_>, name: &OsStr, path: &[u8]) -> Result<(), MirrorError> {
    let mkdir = || {
        rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)).map_err(|source| {
            MirrorError::Mkdir {
                path: show(path),
                source,
            }
        })
    };
    match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Ok(()),
        Ok(_) => {
            rustix::fs::unlinkat(parent, name, AtFlags::empty()).map_err(|source| {
                MirrorError::Remove {
                    path: show(path),
                    source,
                }
            })?;
            mkdir()
        }
        Err(Errno::NOENT) => mkdir(),
        Err(source) => Err(MirrorError::Mkdir {
            path: show(path),
            source,
        }),
    }
}

/// Copies exactly `len` bytes from `r` to `f` in chunks; false when `r`
/// ends first.
fn copy_exact(
    r: &mut impl Read,
    f: &mut impl Write,
    len: u64,
    path: &[u8],
) -> Result<bool, MirrorError> {
    let mut buf = vec![0; CHUNK];
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match r.read(&mut buf[..want]) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(MirrorError::Read(e)),
        };
        f.write_all(&buf[..n])
            .map_err(|source| MirrorError::Write {
                path: show(path),
                source,
            })?;
        left -= n as u64;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{lchown, symlink, FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::PathBuf;

    const MTIME: i64 = 1_600_000_000_123_456_789;
    const OPTS: ApplyOptions = ApplyOptions {
        owners: true,
        keep_setid: false,
    };

    fn meta(mode: u32) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime_ns: MTIME,
        }
    }

    fn dir(path: &str, mode: u32, names: Option<&[&str]>) -> (Record, Vec<u8>) {
        let names = names.map(|n| n.iter().map(|n| n.as_bytes().to_vec()).collect());
        let path = path.into();
        let meta = meta(mode);
        (Record::Dir { path, meta, names }, Vec::new())
    }

    fn file(path: &str, mode: u32, content: &[u8]) -> (Record, Vec<u8>) {
        let (path, meta, len) = (path.into(), meta(mode), content.len() as u64);
        (Record::File { path, meta, len }, content.to_vec())
    }

    fn link(path: &str, to: &str) -> (Record, Vec<u8>) {
        let (path, to) = (path.into(), to.into());
        (Record::Link { path, to }, Vec::new())
    }

    fn sym(path: &str, target: &str) -> (Record, Vec<u8>) {
        let rec = Record::Symlink {
            path: path.into(),
            target: target.into(),
            uid: 0,
            gid: 0,
            mtime_ns: MTIME,
        };
        (rec, Vec::new())
    }

    fn xattrs(path: &str, attrs: &[(&str, &[u8])]) -> (Record, Vec<u8>) {
        let attrs = attrs
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.to_vec()))
            .collect();
        (
            Record::Xattrs {
                path: path.into(),
                attrs,
            },
            Vec::new(),
        )
    }

    /// A file capability: CAP_NET_RAW permitted and effective (revision 2).
    const NET_RAW: [u8; 20] = [
        0x01, 0, 0, 0x02, // VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
        0, 0x20, 0, 0, 0, 0, 0, 0, // permitted: bit 13; inheritable
        0, 0, 0, 0, 0, 0, 0, 0,
    ];

    /// The carried extended attributes of `p` (not following a symlink).
    fn carried_of(p: &Path) -> Vec<(String, Vec<u8>)> {
        let mut list = vec![0u8; 64 << 10];
        let n = rustix::fs::llistxattr(p, &mut list[..]).unwrap();
        let mut out: Vec<(String, Vec<u8>)> = list[..n]
            .split(|&b| b == 0)
            .filter(|n| carried(n))
            .map(|n| {
                let mut v = vec![0u8; 64 << 10];
                let len = rustix::fs::lgetxattr(p, os(n), &mut v[..]).unwrap();
                v.truncate(len);
                (String::from_utf8_lossy(n).into_owned(), v)
            })
            .collect();
        out.sort();
        out
    }

    /// A stream of `recs` (each with a File's content) and its End.
    fn build(recs: &[(Record, Vec<u8>)]) -> Vec<u8> {
        let mut s = Vec::new();
        put_header(&mut s, 42).unwrap();
        for (r, content) in recs {
            r.encode(&mut s).unwrap();
            s.extend_from_slice(content);
        }
        let bytes = recs.iter().map(|(_, c)| c.len() as u64).sum();
        let entries = recs
            .iter()
            .filter(|(r, _)| !matches!(r, Record::Xattrs { .. }))
            .count();
        let end = Record::End {
            entries: entries as u64,
            bytes,
        };
        end.encode(&mut s).unwrap();
        s
    }

    /// A small stream of every kind of record.
    fn sample() -> Vec<u8> {
        build(&[
            dir("", 0o755, Some(&["d", "top"])),
            dir("d", 0o750, Some(&["f", "g", "s", "p"])),
            xattrs("d/f", &[("user.a", b"1")]),
            file("d/f", 0o644, b"0123456789"),
            link("d/g", "d/f"),
            sym("d/s", "../top"),
            (
                Record::Fifo {
                    path: "d/p".into(),
                    meta: meta(0o640),
                },
                Vec::new(),
            ),
            file("top", 0o600, b"top\n"),
        ])
    }

    /// The stream's start time and records (contents skipped).
    fn decode_all(s: &[u8]) -> (i64, Vec<Record>) {
        let mut d = Decoder { r: s };
        let started = d.header().unwrap();
        let mut recs = Vec::new();
        loop {
            let r = d.record().unwrap();
            if let Record::File { len, .. } = &r {
                io::copy(&mut Read::take(&mut d.r, *len), &mut io::sink()).unwrap();
            }
            let end = matches!(r, Record::End { .. });
            recs.push(r);
            if end {
                return (started, recs);
            }
        }
    }

    fn apply_to(root: &Path, s: &[u8], opts: ApplyOptions) -> Result<Applied, MirrorError> {
        let fd = fs::File::open(root).unwrap();
        apply(&mut &s[..], fd.as_fd(), opts)
    }

    /// Everything under `dir` named like the applier's temporaries.
    fn temps(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for e in fs::read_dir(dir).unwrap().flatten() {
            if e.file_name().as_bytes().starts_with(TEMP_PREFIX) {
                found.push(e.path());
            }
            if e.file_type().unwrap().is_dir() {
                found.extend(temps(&e.path()));
            }
        }
        found
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    /// A root to apply to and, beside it, a directory `outside` holding
    /// `keep` that nothing may change.
    fn host() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().canonicalize().unwrap();
        let (root, outside) = (base.join("root"), base.join("outside"));
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), "keep").unwrap();
        (d, root, outside)
    }

    fn untouched(outside: &Path) {
        assert_eq!(names(outside), ["keep"]);
        assert_eq!(fs::read(outside.join("keep")).unwrap(), b"keep");
        assert_eq!(names(outside.parent().unwrap()), ["outside", "root"]);
    }

    #[test]
    fn records_round_trip() {
        let long = "n".repeat(MAX_NAME);
        let recs = [
            dir("", 0o1777, None),
            dir("a", 0o2755, Some(&["x", "y", long.as_str()])),
            dir("a/b", 0o700, Some(&[])),
            xattrs("a/x", &[("user.a", b""), ("security.capability", &NET_RAW)]),
            file("a/x", 0o4755, b"content"),
            file("a/empty", 0o644, b""),
            link("a/y", "a/x"),
            sym("a/s", "/abs/target"),
            (
                Record::Fifo {
                    path: "a/p".into(),
                    meta: Meta {
                        mode: 0o600,
                        uid: 1000,
                        gid: 100,
                        mtime_ns: -5,
                    },
                },
                Vec::new(),
            ),
        ];
        let s = build(&recs);
        let (started, back) = decode_all(&s);
        assert_eq!(started, 42);
        let want: Vec<Record> = recs.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(back[..want.len()], want[..]);
        assert_eq!(
            back[want.len()..],
            [Record::End {
                entries: 8,
                bytes: 7
            }]
        );
        // A File's content follows its record.
        let at = s.windows(7).position(|w| w == b"content").unwrap();
        assert_eq!(&s[at - 8..at], &7u64.to_le_bytes());
    }

    #[test]
    fn a_sample_stream_applies_every_kind() {
        let (_d, root, outside) = host();
        fs::write(root.join("stale"), "gone").unwrap();
        let a = apply_to(&root, &sample(), OPTS).unwrap();
        assert!(a.complete);
        assert_eq!((a.started_ns, a.entries, a.bytes), (42, 7, 14));
        assert_eq!(names(&root), ["d", "top"]);
        assert_eq!(fs::read(root.join("d/f")).unwrap(), b"0123456789");
        let want = vec![("user.a".to_string(), b"1".to_vec())];
        assert_eq!(carried_of(&root.join("d/f")), want);
        let (f, g) = (root.join("d/f"), root.join("d/g"));
        assert_eq!(
            fs::metadata(&f).unwrap().ino(),
            fs::metadata(&g).unwrap().ino()
        );
        assert_eq!(
            fs::read_link(root.join("d/s")).unwrap(),
            Path::new("../top")
        );
        let p = fs::symlink_metadata(root.join("d/p")).unwrap();
        assert!(p.file_type().is_fifo());
        assert_eq!(p.mode() & 0o7777, 0o640);
        let d = fs::metadata(root.join("d")).unwrap();
        assert_eq!(d.mode() & 0o7777, 0o750);
        // Directory times are set last, after their entries were added.
        assert_eq!((d.mtime(), d.mtime_nsec()), (1_600_000_000, 123_456_789));
        let s = fs::symlink_metadata(root.join("d/s")).unwrap();
        assert_eq!((s.mtime(), s.mtime_nsec()), (1_600_000_000, 123_456_789));
        assert!(temps(&root).is_empty());
        untouched(&outside);
    }

    #[test]
    fn extended_attributes_are_set_as_far_as_the_host_allows() {
        let (_d, root, outside) = host();
        let s = build(&[
            xattrs("", &[("user.new", b"n")]),
            dir("", 0o755, Some(&["d", "f"])),
            dir("d", 0o755, None),
            xattrs(
                "f",
                &[
                    ("security.capability", &NET_RAW),
                    ("user.a", b"1"),
                    ("user.b", b""),
                ],
            ),
            file("f", 0o755, b"#!/bin/sh\n"),
        ]);
        let user = |n: &str, v: &[u8]| (n.to_string(), v.to_vec());
        for keep_setid in [false, true] {
            for p in [&root, &root.join("d")] {
                fs::create_dir_all(p).unwrap();
                for (n, v) in [("user.old", &b"o"[..]), ("user.new", b"before")] {
                    rustix::fs::setxattr(p, n, v, rustix::fs::XattrFlags::empty()).unwrap();
                }
            }
            let opts = ApplyOptions {
                owners: true,
                keep_setid,
            };
            let a = apply_to(&root, &s, opts).unwrap();
            assert!(a.complete && a.entries == 3, "{a:?}");
            let mut want = vec![user("user.a", b"1"), user("user.b", b"")];
            // A file capability only where set-ID bits are kept.
            if keep_setid {
                want.insert(0, user("security.capability", &NET_RAW));
            }
            assert_eq!(carried_of(&root.join("f")), want, "keep_setid {keep_setid}");
            // A changed directory's set is whole: what it lacks goes.
            assert_eq!(carried_of(&root), [user("user.new", b"n")]);
            // An unchanged one is left as it was.
            let d = carried_of(&root.join("d"));
            assert_eq!(d, [user("user.new", b"before"), user("user.old", b"o")]);
        }
        untouched(&outside);
    }

    #[test]
    fn extended_attributes_are_refused_unless_carried_and_before_their_entry() {
        let (_d, root, outside) = host();
        let many: Vec<String> = (0..=MAX_XATTRS).map(|i| format!("user.{i}")).collect();
        let many: Vec<(&str, &[u8])> = many.iter().map(|n| (n.as_str(), &b""[..])).collect();
        for (recs, why) in [
            (
                vec![
                    xattrs("f", &[("trusted.overlay.opaque", b"y")]),
                    file("f", 0o644, b""),
                ],
                "not carry",
            ),
            (
                vec![
                    xattrs("f", &[("user.overlay.redirect", b"/x")]),
                    file("f", 0o644, b""),
                ],
                "not carry",
            ),
            (
                vec![
                    xattrs("f", &[("security.selinux", b"l")]),
                    file("f", 0o644, b""),
                ],
                "not carry",
            ),
            (
                vec![xattrs("f", &[("user.", b"l")]), file("f", 0o644, b"")],
                "not carry",
            ),
            (
                vec![xattrs("f", &many), file("f", 0o644, b"")],
                "out of range",
            ),
            (
                vec![xattrs("f", &[("user.a", b"1")]), file("g", 0o644, b"")],
                "not followed",
            ),
            (
                vec![xattrs("s", &[("user.a", b"1")]), sym("s", "t")],
                "not followed",
            ),
            (vec![xattrs("f", &[("user.a", b"1")])], "not followed"),
            (
                vec![
                    xattrs("f", &[("user.a", b"1")]),
                    xattrs("f", &[("user.b", b"1")]),
                    file("f", 0o644, b""),
                ],
                "a second",
            ),
        ] {
            let e = apply_to(&root, &build(&recs), OPTS)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{recs:?}: {e}");
            assert!(!root.join("g").exists() && !root.join("s").exists());
            assert!(carried_of(&root).is_empty());
        }
        untouched(&outside);
    }

    #[test]
    fn a_stream_cut_anywhere_applies_up_to_the_cut() {
        let (_d, root, outside) = host();
        let s = sample();
        for cut in 0..=s.len() {
            fs::remove_dir_all(&root).unwrap();
            fs::create_dir(&root).unwrap();
            let a =
                apply_to(&root, &s[..cut], OPTS).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            assert_eq!(a.complete, cut == s.len(), "cut at {cut}");
            assert!(temps(&root).is_empty(), "cut at {cut}: {:?}", temps(&root));
            untouched(&outside);
            // The file is there whole, or not at all.
            if let Ok(f) = fs::read(root.join("d/f")) {
                assert_eq!(f, b"0123456789", "cut at {cut}");
            }
        }
    }

    #[test]
    fn hostile_paths_are_refused_and_nothing_lands_outside_the_root() {
        let (_d, root, outside) = host();
        symlink(&outside, root.join("evil")).unwrap();
        symlink("../outside", root.join("rel")).unwrap();
        fs::create_dir(root.join("sub")).unwrap();
        symlink("/sub", root.join("inner")).unwrap();
        for (rec, why) in [
            (file("../x", 0o644, b"x"), "a dot name"),
            (file("/x", 0o644, b"x"), "an empty name"),
            (file("a//b", 0o644, b"x"), "an empty name"),
            (file("a/", 0o644, b"x"), "an empty name"),
            (file("a/./b", 0o644, b"x"), "a dot name"),
            (file("", 0o644, b"x"), "the root"),
            (file(".moat-mirror-1-1", 0o644, b"x"), "temporaries"),
            (link("x", "../outside/keep"), "a dot name"),
        ] {
            let e = apply_to(&root, &build(&[rec]), OPTS).unwrap_err();
            assert!(matches!(e, MirrorError::Path { .. }), "{e}");
            assert!(e.to_string().contains(why), "{e}");
            untouched(&outside);
        }
        // Through a symlink to an absolute path outside: resolved in the
        // root, where that path does not exist.
        for rec in [
            file("evil/x", 0o644, b"x"),
            file("rel/x", 0o644, b"x"),
            dir("evil/d", 0o755, None),
            link("x", "evil/keep"),
            link("y", "rel/keep"),
        ] {
            let e = apply_to(&root, &build(&[rec]), OPTS).unwrap_err();
            assert!(
                matches!(
                    e,
                    MirrorError::Parent { .. } | MirrorError::LinkSource { .. }
                ),
                "{e}"
            );
            untouched(&outside);
        }
        // Through a symlink that resolves inside the root: written there.
        apply_to(&root, &build(&[file("inner/x", 0o644, b"in")]), OPTS).unwrap();
        assert_eq!(fs::read(root.join("sub/x")).unwrap(), b"in");
        // The last component is replaced, never followed.
        let s = build(&[
            file("evil", 0o644, b"replaced"),
            sym("s", &outside.join("keep").to_string_lossy()),
            file("s", 0o644, b"pwned"),
        ]);
        apply_to(&root, &s, OPTS).unwrap();
        assert_eq!(fs::read(root.join("evil")).unwrap(), b"replaced");
        assert_eq!(fs::read(root.join("s")).unwrap(), b"pwned");
        untouched(&outside);
        // A link again, or to itself: nothing to do, nothing left behind.
        let s = build(&[
            file("f", 0o644, b"f"),
            link("g", "f"),
            link("g", "f"),
            link("f", "f"),
        ]);
        apply_to(&root, &s, OPTS).unwrap();
        assert_eq!(fs::metadata(root.join("f")).unwrap().nlink(), 2);
        // A link to anything but a regular file is refused.
        let e = apply_to(&root, &build(&[link("l", "rel")]), OPTS).unwrap_err();
        assert!(matches!(e, MirrorError::NotAFile { .. }), "{e}");
        let e = apply_to(&root, &build(&[link("l", "sub")]), OPTS).unwrap_err();
        assert!(matches!(e, MirrorError::NotAFile { .. }), "{e}");
        assert!(temps(&root).is_empty());
        untouched(&outside);
    }

    #[test]
    fn a_listing_prunes_without_following_symlinks() {
        let (_d, root, outside) = host();
        symlink(&outside, root.join("lnk")).unwrap();
        symlink("../outside", root.join("rel")).unwrap();
        fs::create_dir_all(root.join("deep/a/b/c")).unwrap();
        symlink(&outside, root.join("deep/a/b/c/out")).unwrap();
        symlink(&outside, root.join("deep/a/out")).unwrap();
        fs::write(root.join("deep/a/b/f"), "f").unwrap();
        fs::write(root.join(".moat-mirror-9-9"), "left by a crash").unwrap();
        // A symlinked directory listed as empty: replaced by a directory.
        let s = build(&[
            dir("", 0o755, Some(&["lnk", "deep"])),
            dir("lnk", 0o755, Some(&[])),
        ]);
        apply_to(&root, &s, OPTS).unwrap();
        untouched(&outside);
        assert_eq!(names(&root), ["deep", "lnk"]);
        assert!(fs::symlink_metadata(root.join("lnk")).unwrap().is_dir());
        assert!(names(&root.join("lnk")).is_empty());
        // Everything pruned, a tree with links out of it included.
        apply_to(&root, &build(&[dir("", 0o755, Some(&[]))]), OPTS).unwrap();
        assert!(names(&root).is_empty());
        untouched(&outside);
        // Deeper than the descriptors a process may hold.
        let mut p = root.clone();
        for _ in 0..1500 {
            p.push("d");
            fs::create_dir(&p).unwrap();
        }
        apply_to(&root, &build(&[dir("", 0o755, Some(&[]))]), OPTS).unwrap();
        assert!(names(&root).is_empty());
    }

    #[test]
    fn oversized_and_malformed_fields_are_refused() {
        let (_d, root, outside) = host();
        let long = "n".repeat(MAX_NAME + 1);
        let e = apply_to(&root, &build(&[dir("", 0o755, Some(&[&long]))]), OPTS);
        assert!(matches!(e, Err(MirrorError::Length { .. })), "{e:?}");
        for bad in [".", "..", ".moat-mirror-x", "a/b"] {
            let e = apply_to(&root, &build(&[dir("", 0o755, Some(&[bad]))]), OPTS);
            assert!(matches!(e, Err(MirrorError::Name { .. })), "{bad}: {e:?}");
        }
        let e = apply_to(&root, &build(&[file(&long, 0o644, b"")]), OPTS);
        assert!(matches!(e, Err(MirrorError::Path { .. })), "{e:?}");
        let deep = vec!["a"; MAX_PATH / 2 + 1].join("/");
        let e = apply_to(&root, &build(&[file(&deep, 0o644, b"")]), OPTS);
        assert!(matches!(e, Err(MirrorError::Length { .. })), "{e:?}");
        let e = apply_to(&root, &build(&[sym("s", "a\0b")]), OPTS);
        assert!(matches!(e, Err(MirrorError::Target { .. })), "{e:?}");
        let e = apply_to(&root, &build(&[sym("s", "")]), OPTS);
        assert!(matches!(e, Err(MirrorError::Target { .. })), "{e:?}");
        let e = apply_to(&root, &build(&[file("f", 0o17777, b"")]), OPTS);
        assert!(matches!(e, Err(MirrorError::Field { .. })), "{e:?}");
        let mut s = Vec::new();
        put_header(&mut s, 0).unwrap();
        let mut owner = build(&[file("f", 0o644, b"")]);
        let at = owner.len() - 17 - 8 - 8 - 4; // the File's gid
        owner[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = apply_to(&root, &owner, OPTS);
        assert!(matches!(e, Err(MirrorError::Field { .. })), "{e:?}");
        // Too many names: refused before a name is read.
        let mut many = s.clone();
        many.push(DIR);
        put_bytes(&mut many, b"").unwrap();
        put_meta(&mut many, &meta(0o755)).unwrap();
        many.push(1);
        many.extend_from_slice(&(MAX_NAMES + 1).to_le_bytes());
        let e = apply_to(&root, &many, OPTS);
        assert!(matches!(e, Err(MirrorError::TooManyNames { .. })), "{e:?}");
        // A listing flag other than 0 and 1.
        let mut flag = build(&[dir("", 0o755, None)]);
        flag[MAGIC.len() + 8 + 1 + 4 + 20] = 2;
        let e = apply_to(&root, &flag, OPTS);
        assert!(matches!(e, Err(MirrorError::Field { .. })), "{e:?}");
        assert!(matches!(
            apply_to(&root, b"moat-mirror-2\0\0\0\0\0\0\0\0", OPTS),
            Err(MirrorError::Magic)
        ));
        // An unknown tag after a record: the record stays applied.
        let mut tag = build(&[dir("kept", 0o755, None)]);
        let end = tag.len() - 17;
        tag[end] = 99;
        assert!(matches!(
            apply_to(&root, &tag, OPTS),
            Err(MirrorError::Tag(99))
        ));
        assert!(root.join("kept").is_dir());
        // An end that miscounts.
        let mut count = build(&[dir("", 0o755, None)]);
        let n = count.len() - 16;
        count[n] = 7;
        let e = apply_to(&root, &count, OPTS);
        assert!(matches!(e, Err(MirrorError::Counts { .. })), "{e:?}");
        assert!(temps(&root).is_empty());
        untouched(&outside);
    }

    #[test]
    fn setid_bits_are_stripped_unless_kept() {
        for keep_setid in [false, true] {
            let (_d, root, _) = host();
            let s = build(&[
                dir("sg", 0o2775, None),
                file("su", 0o4755, b"x"),
                file("sg/g", 0o2755, b"x"),
                file("sticky", 0o1644, b"x"),
            ]);
            let opts = ApplyOptions {
                owners: true,
                keep_setid,
            };
            apply_to(&root, &s, opts).unwrap();
            let mode = |p: &str| fs::metadata(root.join(p)).unwrap().mode() & 0o7777;
            // A directory's setgid (new entries take its group) is harmless.
            assert_eq!(mode("sg"), 0o2775);
            assert_eq!(mode("sticky"), 0o1644);
            if keep_setid {
                assert_eq!((mode("su"), mode("sg/g")), (0o4755, 0o2755));
            } else {
                assert_eq!((mode("su"), mode("sg/g")), (0o755, 0o755));
            }
        }
    }

    #[test]
    fn owners_are_set_only_when_asked() {
        for owners in [false, true] {
            let (_d, root, _) = host();
            let owned = || Meta {
                mode: 0o640,
                uid: 1234,
                gid: 5678,
                mtime_ns: MTIME,
            };
            let s = build(&[
                (
                    Record::Dir {
                        path: "d".into(),
                        meta: owned(),
                        names: None,
                    },
                    Vec::new(),
                ),
                (
                    Record::File {
                        path: "d/f".into(),
                        meta: owned(),
                        len: 1,
                    },
                    b"x".to_vec(),
                ),
                (
                    Record::Symlink {
                        path: "d/s".into(),
                        target: "f".into(),
                        uid: 1234,
                        gid: 5678,
                        mtime_ns: MTIME,
                    },
                    Vec::new(),
                ),
            ]);
            let opts = ApplyOptions {
                owners,
                keep_setid: false,
            };
            apply_to(&root, &s, opts).unwrap();
            let want = if owners { (1234, 5678) } else { (0, 0) };
            for p in ["d", "d/f", "d/s"] {
                let m = fs::symlink_metadata(root.join(p)).unwrap();
                assert_eq!((m.uid(), m.gid()), want, "{p}");
            }
        }
    }

    /// The walk of a plain directory (its own upper and merged): what the
    /// host cannot make is counted, a whiteout is not.
    #[test]
    fn the_walk_skips_what_the_host_cannot_make() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        fs::write(dir.join("f"), "f").unwrap();
        fs::write(dir.join(".moat-mirror-1-2"), "x").unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.join("wh"),
            FileType::CharacterDevice,
            Mode::empty(),
            0,
        )
        .unwrap();
        let mut s = Vec::new();
        let w = write_changes(dir, dir, 0, &mut s).unwrap();
        assert_eq!((w.entries, w.bytes, w.skipped), (2, 1, 2));
        let (_, recs) = decode_all(&s);
        let Record::Dir { names, .. } = &recs[0] else {
            panic!("{:?}", recs[0]);
        };
        // The listing is the merged directory's (here the same), less the
        // temporaries' names.
        let want: Vec<Vec<u8>> = ["f", "sock", "wh"].map(|n| n.as_bytes().to_vec()).into();
        assert_eq!(names.as_deref(), Some(&want[..]));
        assert!(matches!(&recs[1], Record::File { path, len: 1, .. } if path == b"f"));
    }

    // ------------------------------------------------------------ overlay

    /// Copies `from` to `to` keeping types, modes, owners, times and carried
    /// extended attributes.
    fn copy_tree(from: &Path, to: &Path) {
        let m = fs::symlink_metadata(from).unwrap();
        let ft = m.file_type();
        if ft.is_dir() {
            fs::create_dir(to).unwrap();
            for e in fs::read_dir(from).unwrap().flatten() {
                copy_tree(&e.path(), &to.join(e.file_name()));
            }
        } else if ft.is_symlink() {
            symlink(fs::read_link(from).unwrap(), to).unwrap();
        } else {
            fs::copy(from, to).unwrap();
        }
        lchown(to, Some(m.uid()), Some(m.gid())).unwrap();
        if !ft.is_symlink() {
            fs::set_permissions(to, fs::Permissions::from_mode(m.mode() & 0o7777)).unwrap();
            for (n, v) in carried_of(from) {
                rustix::fs::setxattr(to, n.as_str(), &v, rustix::fs::XattrFlags::empty()).unwrap();
            }
        }
        let t = Timespec {
            tv_sec: m.mtime(),
            tv_nsec: m.mtime_nsec(),
        };
        let times = Timestamps {
            last_access: t,
            last_modification: t,
        };
        rustix::fs::utimensat(rustix::fs::CWD, to, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
    }

    /// The first difference between the trees `a` and `b`: names, types,
    /// modes, owners, times, link counts, contents, symlink targets, carried
    /// extended attributes.
    fn compare(a: &Path, b: &Path, rel: &str) -> Result<(), String> {
        let (ma, mb) = (fs::symlink_metadata(a), fs::symlink_metadata(b));
        let (ma, mb) = (
            ma.map_err(|e| format!("{rel}: {e}"))?,
            mb.map_err(|e| format!("{rel}: {e}"))?,
        );
        let kind = |m: &fs::Metadata| m.mode() & libc::S_IFMT;
        let facts = |m: &fs::Metadata| {
            let nlink = if m.is_file() { m.nlink() } else { 0 };
            (
                kind(m),
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                m.mtime(),
                m.mtime_nsec(),
                nlink,
            )
        };
        if facts(&ma) != facts(&mb) {
            return Err(format!("/{rel}: {:?} != {:?}", facts(&ma), facts(&mb)));
        }
        if ma.is_file() && fs::read(a).unwrap() != fs::read(b).unwrap() {
            return Err(format!("/{rel}: contents differ"));
        }
        let (xa, xb) = (carried_of(a), carried_of(b));
        if xa != xb {
            return Err(format!("/{rel}: extended attributes {xa:?} != {xb:?}"));
        }
        if ma.is_symlink() && fs::read_link(a).unwrap() != fs::read_link(b).unwrap() {
            return Err(format!("/{rel}: targets differ"));
        }
        if ma.is_dir() {
            let (na, nb) = (names(a), names(b));
            if na != nb {
                return Err(format!("/{rel}: {na:?} != {nb:?}"));
            }
            for n in na {
                let r = if rel.is_empty() {
                    n.clone()
                } else {
                    format!("{rel}/{n}")
                };
                compare(&a.join(&n), &b.join(&n), &r)?;
            }
        }
        Ok(())
    }

    /// Runs `f` in a child in a mount namespace of its own; its failure
    /// (an error or a panic) fails the test with its message.
    fn in_own_mounts(base: &Path, f: impl FnOnce() -> Result<(), String>) {
        let report = base.join("failure");
        let code = moat_sys::process::run_in_child(libc::CLONE_NEWNS, || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
                Err(p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default())
            });
            match r {
                Ok(()) => 0,
                Err(m) => {
                    fs::write(&report, m).ok();
                    1
                }
            }
        })
        .unwrap();
        let why = fs::read_to_string(&report).unwrap_or_default();
        assert_eq!(code, 0, "{why}");
    }

    fn mount_overlay(base: &Path) -> Result<(), String> {
        use nix::mount::{mount, MsFlags};
        let none: Option<&str> = None;
        mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
            .map_err(|e| format!("private mounts: {e}"))?;
        // metacopy: a chmod copies up only the metadata, so the content
        // must be read through the merged mount.
        let opts = format!(
            "lowerdir={},upperdir={},workdir={},metacopy=on",
            base.join("lower").display(),
            base.join("upper").display(),
            base.join("work").display()
        );
        let merged = base.join("merged");
        mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .map_err(|e| format!("overlay: {e}"))
    }

    /// An image's tree in `lower`, its copy as the host's root in `host`,
    /// and empty `upper`, `work` and `merged`.
    fn overlay_dirs() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().canonicalize().unwrap();
        let l = base.join("lower");
        for p in [
            "etc",
            "bin",
            "gone/sub",
            "opq",
            "becomes-file",
            "tmp",
            "mvdir/sub",
        ] {
            fs::create_dir_all(l.join(p)).unwrap();
        }
        for (p, c) in [
            ("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
            ("etc/hosts", "127.0.0.1 localhost\n"),
            ("bin/tool", "#!/bin/sh\n"),
            ("gone/a", "a"),
            ("gone/sub/b", "b"),
            ("opq/old1", "1"),
            ("opq/old2", "2"),
            ("data.txt", "data\n"),
            ("old.txt", "old"),
            ("mv-src", "moved"),
            ("link-src.txt", "linked"),
            ("owned", "o"),
            ("owned2", "o2"),
            ("becomes-dir", "f"),
            ("becomes-file/x", "x"),
            ("mvdir/f", "f"),
            ("mvdir/sub/g", "g"),
        ] {
            fs::write(l.join(p), c).unwrap();
        }
        fs::set_permissions(l.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(l.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        // Extended attributes in the image: one kept, one changed, one
        // removed, a directory's removed.
        for (p, n) in [
            ("bin", "user.dir"),
            ("etc/hosts", "user.origin"),
            ("data.txt", "user.origin"),
            ("owned", "user.origin"),
        ] {
            rustix::fs::setxattr(l.join(p), n, b"image", rustix::fs::XattrFlags::empty()).unwrap();
        }
        lchown(l.join("owned"), Some(1234), Some(5678)).unwrap();
        lchown(l.join("owned2"), Some(1234), Some(5678)).unwrap();
        symlink("etc/hosts", l.join("lsym")).unwrap();
        for p in ["upper", "work", "merged"] {
            fs::create_dir(base.join(p)).unwrap();
        }
        copy_tree(&l, &base.join("host"));
        (d, base)
    }

    /// What a workload does to the merged tree `m`: every kind of change.
    fn first_changes(m: &Path) -> io::Result<()> {
        fs::write(m.join("top.txt"), "new\n")?;
        fs::set_permissions(m.join("top.txt"), fs::Permissions::from_mode(0o640))?;
        lchown(m.join("top.txt"), Some(1000), Some(1000))?;
        fs::create_dir_all(m.join("newdir/deep"))?;
        let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(m.join("newdir/deep/f.bin"), big)?;
        fs::write(m.join("newdir/a"), "shared")?;
        fs::hard_link(m.join("newdir/a"), m.join("newdir/b"))?;
        symlink("../etc/passwd", m.join("newdir/ln"))?;
        symlink("/etc/hosts", m.join("abs"))?;
        nix::unistd::mkfifo(
            &m.join("newdir/pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o640),
        )?;
        fs::hard_link(m.join("link-src.txt"), m.join("hl-lower"))?;
        let mut data = fs::OpenOptions::new()
            .append(true)
            .open(m.join("data.txt"))?;
        data.write_all(b"more\n")?;
        fs::remove_file(m.join("old.txt"))?;
        fs::remove_dir_all(m.join("gone"))?;
        fs::remove_dir_all(m.join("opq"))?;
        fs::create_dir(m.join("opq"))?;
        fs::write(m.join("opq/new"), "n")?;
        fs::rename(m.join("mv-src"), m.join("mv-dst"))?;
        fs::set_permissions(m.join("bin/tool"), fs::Permissions::from_mode(0o700))?;
        lchown(m.join("owned2"), Some(4321), Some(4321))?;
        fs::write(m.join("tmpfile"), "x")?;
        fs::remove_file(m.join("tmpfile"))?;
        fs::write(m.join("empty.txt"), "")?;
        fs::remove_file(m.join("becomes-dir"))?;
        fs::create_dir(m.join("becomes-dir"))?;
        fs::write(m.join("becomes-dir/in"), "in")?;
        fs::remove_dir_all(m.join("becomes-file"))?;
        fs::write(m.join("becomes-file"), "now a file")?;
        fs::write(m.join("tmp/t"), "t")?;
        // Extended attributes: set on new and copied-up entries, changed,
        // removed (a directory's too), a file capability and an ACL.
        let set = |p: &str, n: &str, v: &[u8]| {
            rustix::fs::setxattr(m.join(p), n, v, rustix::fs::XattrFlags::empty())
        };
        set("top.txt", "user.note", b"new")?;
        set("newdir", "user.d", b"dd")?;
        set("data.txt", "user.origin", b"changed")?;
        set("bin/tool", "security.capability", &NET_RAW)?;
        // ACL: owner rw, user 1234 r, group r, mask r, other nothing.
        let mut acl = 2u32.to_le_bytes().to_vec(); // version 2
        for (tag, perm, id) in [
            (0x01u16, 6u16, u32::MAX), // USER_OBJ
            (0x02, 4, 1234),           // USER 1234
            (0x04, 4, u32::MAX),       // GROUP_OBJ
            (0x10, 4, u32::MAX),       // MASK
            (0x20, 0, u32::MAX),       // OTHER
        ] {
            acl.extend(tag.to_le_bytes());
            acl.extend(perm.to_le_bytes());
            acl.extend(id.to_le_bytes());
        }
        set("newdir/a", "system.posix_acl_access", &acl)?;
        rustix::fs::removexattr(m.join("owned"), "user.origin")?;
        rustix::fs::removexattr(m.join("bin"), "user.dir")?;
        // A lower directory renamed: with redirect_dir, its upper directory
        // only points at the lower one.
        fs::rename(m.join("mvdir"), m.join("mvdir-new"))?;
        fs::write(m.join("mvdir-new/sub/h"), "h")?;
        Ok(())
    }

    /// Mirrors `base`'s overlay since `since` onto its host tree.
    fn mirror(base: &Path, since: i64) -> Result<(Walked, Applied, Vec<u8>), String> {
        let mut s = Vec::new();
        let w = write_changes(&base.join("upper"), &base.join("merged"), since, &mut s)
            .map_err(|e| format!("walk: {e}"))?;
        // As an engine's store: file capabilities kept.
        let opts = ApplyOptions {
            owners: true,
            keep_setid: true,
        };
        let a = apply_to(&base.join("host"), &s, opts).map_err(|e| format!("apply: {e}"))?;
        if !a.complete || (a.entries, a.bytes) != (w.entries, w.bytes) || w.skipped != 0 {
            return Err(format!("walked {w:?}, applied {a:?}"));
        }
        Ok((w, a, s))
    }

    #[test]
    fn a_mirror_of_a_real_overlay_makes_the_host_tree_the_merged_tree() {
        let (_d, base) = overlay_dirs();
        in_own_mounts(&base, || {
            mount_overlay(&base)?;
            let m = base.join("merged");
            first_changes(&m).map_err(|e| format!("changes: {e}"))?;
            compare(&m, &base.join("host"), "").expect_err("the trees differ before");
            let (_, _, s) = mirror(&base, 0)?;
            let (_, recs) = decode_all(&s);
            let linked = recs.iter().any(|r| {
                matches!(r, Record::Link { path, to } if path == b"link-src.txt" && to == b"hl-lower")
            });
            if !linked {
                return Err(format!("no link: {recs:?}"));
            }
            compare(&m, &base.join("host"), "")
        });
    }

    #[test]
    fn a_second_mirror_carries_only_what_changed_since_the_first() {
        let (_d, base) = overlay_dirs();
        in_own_mounts(&base, || {
            mount_overlay(&base)?;
            let m = base.join("merged");
            first_changes(&m).map_err(|e| format!("changes: {e}"))?;
            // The first changes older than the margin before the first walk.
            std::thread::sleep(std::time::Duration::from_millis(1100));
            let (w1, a1, s1) = mirror(&base, 0)?;
            assert_eq!(a1.started_ns, decode_all(&s1).0);
            fs::write(m.join("top.txt"), "newer\n").unwrap();
            fs::write(m.join("newdir/c"), "c").unwrap();
            fs::remove_file(m.join("newdir/b")).unwrap();
            fs::remove_file(m.join("etc/hosts")).unwrap();
            let (w2, _, s2) = mirror(&base, a1.started_ns)?;
            assert!(w2.entries < w1.entries, "{w2:?} {w1:?}");
            let (_, recs) = decode_all(&s2);
            let mut sent: Vec<&[u8]> = Vec::new();
            let mut listed: Vec<&[u8]> = Vec::new();
            for r in &recs {
                match r {
                    Record::Dir {
                        path,
                        names: Some(_),
                        ..
                    } => listed.push(path),
                    Record::Dir { .. } | Record::End { .. } | Record::Xattrs { .. } => {}
                    Record::File { path, .. } | Record::Link { path, .. } => sent.push(path),
                    Record::Symlink { path, .. } | Record::Fifo { path, .. } => sent.push(path),
                }
            }
            sent.sort();
            listed.sort();
            // newdir/a: its link count changed with newdir/b's removal.
            let want: [&[u8]; 3] = [b"newdir/a", b"newdir/c", b"top.txt"];
            assert_eq!(sent, want, "{recs:?}");
            // etc: copied up for the whiteout of hosts.
            let want: [&[u8]; 3] = [b"", b"etc", b"newdir"];
            assert_eq!(listed, want, "{recs:?}");
            compare(&m, &base.join("host"), "")
        });
    }
}
