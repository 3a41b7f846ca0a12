//! The workload's syscall arguments, decoded: pure functions over the bytes
//! the supervisor copied out of the workload's memory ([`super::target`]
//! reads them, bounded), so that they are unit-tested here and fuzzed with
//! arbitrary bytes (the `sandbox_args` target in `fuzz/`). The layouts are
//! x86-64's, the only ABI the workload's filter lets through. A malformed
//! argument is the errno the kernel would answer for it, never a panic;
//! every length the workload states is checked before it is used.
//!
//! Not decoded here because the supervisor never reads them: `clone3`'s
//! `struct clone_args` (the filter answers ENOSYS, so libc falls back to
//! `clone`, whose flags are registers the filter checks) and `ioctl`
//! argument structs (the filter lets through a fixed list of requests by
//! number, `profile::IOCTLS`; the kernel reads their arguments).
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Range;

use rustix::fs::OFlags;

type R<T> = Result<T, i32>;

/// Longest path read from the workload, its NUL included (`PATH_MAX`).
pub const PATH_MAX: usize = 4096;
/// The page size: strings are read a page at a time.
pub const PAGE: usize = 4096;

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

fn i64_at(b: &[u8], at: usize) -> i64 {
    u64_at(b, at) as i64
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(w)
}

// ----- NUL-terminated strings -----

/// The NUL-terminated string at `addr` (at most [`PATH_MAX`] bytes with its
/// NUL), read through `read` (address, length → bytes) a page at a time, so
/// that a string ending just before an unmapped page is still read.
/// `ENAMETOOLONG` past the bound, `EFAULT` for a NULL or unmapped address.
/// What it returns holds no NUL and is shorter than [`PATH_MAX`].
pub fn cstr(addr: u64, read: impl Fn(u64, usize) -> R<Vec<u8>>) -> R<Vec<u8>> {
    if addr == 0 {
        return Err(libc::EFAULT);
    }
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() < PATH_MAX {
        let to_page_end = PAGE - (at % PAGE as u64) as usize;
        let want = to_page_end.min(PATH_MAX - out.len());
        let chunk = read(at, want)?;
        if chunk.len() != want {
            return Err(libc::EFAULT);
        }
        if let Some(nul) = chunk.iter().position(|b| *b == 0) {
            out.extend_from_slice(&chunk[..nul]);
            return Ok(out);
        }
        out.extend_from_slice(&chunk);
        at = at.checked_add(want as u64).ok_or(libc::EFAULT)?;
    }
    Err(libc::ENAMETOOLONG)
}

// ----- openat2's struct open_how -----

/// `sizeof(struct open_how)` as first published (`OPEN_HOW_SIZE_VER0`):
/// `{ u64 flags; u64 mode; u64 resolve; }`.
pub const OPEN_HOW_SIZE: usize = 24;

/// The decoded `struct open_how`, checked as openat2 checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenHow {
    pub flags: u64,
    pub mode: u64,
    pub resolve: u64,
}

impl OpenHow {
    /// The first [`OPEN_HOW_SIZE`] bytes it was decoded from.
    pub fn to_bytes(&self) -> [u8; OPEN_HOW_SIZE] {
        let mut b = [0u8; OPEN_HOW_SIZE];
        b[..8].copy_from_slice(&self.flags.to_ne_bytes());
        b[8..16].copy_from_slice(&self.mode.to_ne_bytes());
        b[16..].copy_from_slice(&self.resolve.to_ne_bytes());
        b
    }
}

/// How many bytes of `struct open_how` to read for openat2's `size`
/// argument: EINVAL below the first version, E2BIG past a page (the
/// kernel's bounds).
pub fn open_how_len(size: u64) -> R<usize> {
    if size < OPEN_HOW_SIZE as u64 {
        return Err(libc::EINVAL);
    }
    if size > PAGE as u64 {
        return Err(libc::E2BIG);
    }
    Ok(size as usize)
}

/// The kernel's `VALID_OPEN_FLAGS`.
pub fn valid_open_flags() -> OFlags {
    OFlags::RWMODE
        | OFlags::CREATE
        | OFlags::EXCL
        | OFlags::NOCTTY
        | OFlags::TRUNC
        | OFlags::APPEND
        | OFlags::NONBLOCK
        | OFlags::DSYNC
        | OFlags::from_bits_retain(libc::O_ASYNC as u32)
        | OFlags::DIRECT
        | OFlags::LARGEFILE
        | OFlags::DIRECTORY
        | OFlags::NOFOLLOW
        | OFlags::NOATIME
        | OFlags::CLOEXEC
        | OFlags::SYNC
        | OFlags::PATH
        | OFlags::TMPFILE
}

/// `struct open_how` from the `size` bytes openat2 was given (see
/// [`open_how_len`]), refused as openat2 refuses it: E2BIG for a non-zero
/// byte past the fields it knows (a newer version's), EINVAL for unknown
/// flags, flags with `O_PATH` that it would drop, a mode without a file to
/// create or with bits past 07777. Any `resolve` is EINVAL too: the
/// broker's own scoping stands in for the caller's and the caller's is
/// not emulated (yet).
pub fn open_how(b: &[u8]) -> R<OpenHow> {
    if b.len() < OPEN_HOW_SIZE {
        return Err(libc::EINVAL);
    }
    if b[OPEN_HOW_SIZE..].iter().any(|x| *x != 0) {
        return Err(libc::E2BIG);
    }
    let how = OpenHow {
        flags: u64_at(b, 0),
        mode: u64_at(b, 8),
        resolve: u64_at(b, 16),
    };
    if how.resolve != 0 {
        return Err(libc::EINVAL);
    }
    let f = OFlags::from_bits_retain(how.flags as u32);
    let path_only = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let creates = f.contains(OFlags::CREATE) || f.contains(OFlags::TMPFILE);
    if how.flags > u64::from(u32::MAX)
        || !(f - valid_open_flags()).is_empty()
        || (f.contains(OFlags::PATH) && !(f - path_only).is_empty())
        || (how.mode != 0 && !creates)
        || how.mode & !0o7777 != 0
    {
        return Err(libc::EINVAL);
    }
    Ok(how)
}

// ----- timestamps -----

/// The timestamp argument of the utime family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Times {
    /// utimensat: `struct timespec[2]`.
    Timespec,
    /// utime: `struct utimbuf { time_t actime, modtime; }`.
    Utimbuf,
    /// utimes, futimesat: `struct timeval[2]`.
    Timeval,
}

impl Times {
    /// Its size in bytes.
    pub fn size(self) -> usize {
        match self {
            Times::Utimbuf => 16,
            Times::Timespec | Times::Timeval => 32,
        }
    }

    /// (access, modification) as (seconds, nanoseconds), from exactly
    /// [`Times::size`] bytes (else EFAULT). The ranges are the kernel's to
    /// check (utimensat refuses a nanosecond count out of range); a
    /// microsecond count too large to convert saturates, which it refuses
    /// too.
    pub fn decode(self, b: &[u8]) -> R<[(i64, i64); 2]> {
        if b.len() != self.size() {
            return Err(libc::EFAULT);
        }
        let w = |i: usize| i64_at(b, i * 8);
        Ok(match self {
            Times::Timespec => [(w(0), w(1)), (w(2), w(3))],
            Times::Utimbuf => [(w(0), 0), (w(1), 0)],
            Times::Timeval => [
                (w(0), w(1).saturating_mul(1000)),
                (w(2), w(3).saturating_mul(1000)),
            ],
        })
    }
}

// ----- socket addresses -----

/// `sizeof(struct sockaddr_un)`: a longer unix address is EINVAL.
pub const SOCKADDR_UN_LEN: usize = 110;
/// `sizeof(sun_path)`.
pub const SUN_PATH_MAX: usize = 108;
/// `sizeof(struct sockaddr_in)`, `SIN6_LEN_RFC2133`: the shortest inet
/// addresses the kernel reads an address from.
pub const SOCKADDR_IN_LEN: usize = 16;
pub const SOCKADDR_IN6_MIN: usize = 24;

/// A socket address as the workload passed it. Each form keeps every byte
/// it was decoded from: [`SockAddr::to_bytes`] gives them back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SockAddr<'a> {
    /// No address (a NULL pointer or a zero length).
    None,
    /// `AF_UNSPEC`: a disconnect for `connect`; for a send, some inet
    /// sockets read an address from it anyway (see [`inet_destination`]).
    Unspec(&'a [u8]),
    Unix(UnixAddr<'a>),
    /// `AF_INET`, at least [`SOCKADDR_IN_LEN`] bytes; `rest` is
    /// `sin_zero` and anything after it.
    Inet {
        port: u16,
        ip: Ipv4Addr,
        rest: &'a [u8],
    },
    /// `AF_INET6`, at least [`SOCKADDR_IN6_MIN`] bytes; `rest` is the
    /// scope ID (when given) and anything after it.
    Inet6 {
        port: u16,
        flowinfo: u32,
        ip: Ipv6Addr,
        rest: &'a [u8],
    },
    /// Any other family, or an inet address too short for its family
    /// (every inet socket refuses it): the bytes as they are.
    Other(&'a [u8]),
}

/// An `AF_UNIX` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnixAddr<'a> {
    /// The family alone: unnamed (a bind autobinds).
    Unnamed,
    /// An abstract name: the bytes after the leading NUL.
    Abstract(&'a [u8]),
    /// A pathname: the bytes up to the first NUL or the end (as the kernel
    /// reads it: never empty, no NUL), and the rest (the NUL and anything
    /// after it).
    Path { path: &'a [u8], rest: &'a [u8] },
}

impl<'a> SockAddr<'a> {
    /// Decodes `raw` (at most `SOCKADDR_MAX` bytes, as read). A unix
    /// address longer than `struct sockaddr_un` is EINVAL, as the kernel
    /// answers it.
    pub fn decode(raw: &'a [u8]) -> R<SockAddr<'a>> {
        if raw.is_empty() {
            return Ok(SockAddr::None);
        }
        if raw.len() < 2 {
            return Ok(SockAddr::Other(raw));
        }
        let family = i32::from(u16::from_ne_bytes([raw[0], raw[1]]));
        Ok(match family {
            libc::AF_UNSPEC => SockAddr::Unspec(raw),
            libc::AF_UNIX => {
                if raw.len() > SOCKADDR_UN_LEN {
                    return Err(libc::EINVAL);
                }
                SockAddr::Unix(match &raw[2..] {
                    [] => UnixAddr::Unnamed,
                    [0, name @ ..] => UnixAddr::Abstract(name),
                    body => {
                        let end = body.iter().position(|b| *b == 0).unwrap_or(body.len());
                        UnixAddr::Path {
                            path: &body[..end],
                            rest: &body[end..],
                        }
                    }
                })
            }
            libc::AF_INET if raw.len() >= SOCKADDR_IN_LEN => SockAddr::Inet {
                port: u16::from_be_bytes([raw[2], raw[3]]),
                ip: Ipv4Addr::new(raw[4], raw[5], raw[6], raw[7]),
                rest: &raw[8..],
            },
            libc::AF_INET6 if raw.len() >= SOCKADDR_IN6_MIN => {
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&raw[8..24]);
                SockAddr::Inet6 {
                    port: u16::from_be_bytes([raw[2], raw[3]]),
                    flowinfo: u32_at(raw, 4),
                    ip: Ipv6Addr::from(ip),
                    rest: &raw[24..],
                }
            }
            _ => SockAddr::Other(raw),
        })
    }

    /// The bytes it was decoded from.
    pub fn to_bytes(&self) -> Vec<u8> {
        let family = |f: i32| (f as u16).to_ne_bytes().to_vec();
        match self {
            SockAddr::None => Vec::new(),
            SockAddr::Unspec(b) | SockAddr::Other(b) => b.to_vec(),
            SockAddr::Unix(u) => {
                let mut v = family(libc::AF_UNIX);
                match u {
                    UnixAddr::Unnamed => {}
                    UnixAddr::Abstract(name) => {
                        v.push(0);
                        v.extend_from_slice(name);
                    }
                    UnixAddr::Path { path, rest } => {
                        v.extend_from_slice(path);
                        v.extend_from_slice(rest);
                    }
                }
                v
            }
            SockAddr::Inet { port, ip, rest } => {
                let mut v = family(libc::AF_INET);
                v.extend_from_slice(&port.to_be_bytes());
                v.extend_from_slice(&ip.octets());
                v.extend_from_slice(rest);
                v
            }
            SockAddr::Inet6 {
                port,
                flowinfo,
                ip,
                rest,
            } => {
                let mut v = family(libc::AF_INET6);
                v.extend_from_slice(&port.to_be_bytes());
                v.extend_from_slice(&flowinfo.to_ne_bytes());
                v.extend_from_slice(&ip.octets());
                v.extend_from_slice(rest);
                v
            }
        }
    }

    /// The scope ID of an `AF_INET6` address that gives one.
    pub fn scope_id(&self) -> Option<u32> {
        match self {
            SockAddr::Inet6 { rest, .. } if rest.len() >= 4 => Some(u32_at(rest, 0)),
            _ => None,
        }
    }
}

/// `struct sockaddr_un` naming `path` (no NUL in it, shorter than
/// [`SUN_PATH_MAX`]), its NUL included.
pub fn sockaddr_un(path: &[u8]) -> R<Vec<u8>> {
    if path.len() >= SUN_PATH_MAX {
        return Err(libc::ENAMETOOLONG);
    }
    if path.contains(&0) {
        return Err(libc::EINVAL);
    }
    let mut v = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
    v.extend_from_slice(path);
    v.push(0);
    Ok(v)
}

/// What an address is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Connect,
    Bind,
    Send,
}

/// Where an inet socket's call goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// Nowhere new: no address, a disconnect, or one every inet socket
    /// refuses (or, for some sends, ignores).
    None,
    To(SocketAddr),
}

/// The destination the kernel takes from `addr` for a socket of
/// `socket_family` (`AF_INET` or `AF_INET6`), as it reads it: by the
/// address's own family, not the socket's (an `AF_INET6` UDP socket sends
/// and connects to an `AF_INET` address), and `AF_UNSPEC` in a send, which
/// UDP and raw IPv4 sockets (and raw IPv6 ones) take as an address of
/// their own family. Where sockets of a kind differ, the one that reaches
/// furthest is assumed.
pub fn inet_destination(socket_family: i32, what: Use, addr: &SockAddr<'_>) -> Dest {
    let v4 = |ip, port| Dest::To(SocketAddr::V4(SocketAddrV4::new(ip, port)));
    let v6 = |ip, port, flowinfo, scope| {
        Dest::To(SocketAddr::V6(SocketAddrV6::new(ip, port, flowinfo, scope)))
    };
    match addr {
        SockAddr::Inet { port, ip, .. } => v4(*ip, *port),
        SockAddr::Inet6 {
            port, flowinfo, ip, ..
        } => v6(*ip, *port, *flowinfo, addr.scope_id().unwrap_or(0)),
        // The same bytes, read as an address of the socket's family.
        SockAddr::Unspec(b) if what == Use::Send => {
            let port = || u16::from_be_bytes([b[2], b[3]]);
            if socket_family == libc::AF_INET && b.len() >= SOCKADDR_IN_LEN {
                v4(Ipv4Addr::new(b[4], b[5], b[6], b[7]), port())
            } else if socket_family == libc::AF_INET6 && b.len() >= SOCKADDR_IN6_MIN {
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&b[8..24]);
                v6(Ipv6Addr::from(ip), port(), u32_at(b, 4), 0)
            } else {
                Dest::None
            }
        }
        _ => Dest::None,
    }
}

impl Dest {
    /// Whether it stays on this host's loopback network: 127.0.0.0/8,
    /// `::1`, the unspecified addresses (which Linux takes as this host),
    /// and their IPv4-mapped forms.
    pub fn is_loopback(self) -> bool {
        let v4 = |ip: Ipv4Addr| ip.is_loopback() || ip.is_unspecified();
        match self {
            Dest::None => true,
            Dest::To(SocketAddr::V4(a)) => v4(*a.ip()),
            Dest::To(SocketAddr::V6(a)) => {
                let ip = a.ip();
                ip.is_loopback() || ip.is_unspecified() || ip.to_ipv4_mapped().is_some_and(v4)
            }
        }
    }
}

impl std::fmt::Display for Dest {
    /// The address and port, for a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::None => f.write_str("no address"),
            Dest::To(a) => write!(f, "{a}"),
        }
    }
}

// ----- sendmsg's struct msghdr, its iovec and control messages -----

/// `sizeof(struct msghdr)`, `sizeof(struct mmsghdr)`.
pub const MSGHDR_LEN: usize = 56;
pub const MMSGHDR_LEN: usize = 64;
/// `sizeof(struct iovec)`.
pub const IOVEC_LEN: usize = 16;
/// Most buffers in one message (`UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;
/// Most bytes of control messages in one message (the kernel's bound is
/// `optmem_max`, 20 KiB by default; past this it is ENOBUFS).
pub const CONTROL_MAX: usize = 64 * 1024;
/// `sizeof(struct sockaddr_storage)`: a longer `msg_namelen` is cut to it.
pub const SOCKADDR_STORAGE: usize = 128;
/// `sizeof(struct cmsghdr)`.
pub const CMSGHDR_LEN: usize = 16;
/// Most descriptors one message passes (`SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;

/// A decoded `struct msghdr`, its lengths checked as sendmsg checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgHdr {
    pub name: u64,
    /// At most [`SOCKADDR_STORAGE`]; 0 when `name` is NULL.
    pub name_len: usize,
    pub iov: u64,
    /// At most [`IOV_MAX`].
    pub iov_len: usize,
    pub control: u64,
    /// At most [`CONTROL_MAX`].
    pub control_len: usize,
}

impl MsgHdr {
    /// Decodes exactly [`MSGHDR_LEN`] bytes (else EFAULT): a negative
    /// `msg_namelen` is EINVAL, one past `sockaddr_storage` is cut to it;
    /// more than [`IOV_MAX`] buffers is EMSGSIZE; more than
    /// [`CONTROL_MAX`] bytes of control messages is ENOBUFS. `msg_flags`
    /// is not read (sendmsg ignores it).
    pub fn decode(b: &[u8]) -> R<MsgHdr> {
        if b.len() != MSGHDR_LEN {
            return Err(libc::EFAULT);
        }
        let name = u64_at(b, 0);
        let name_len = u32_at(b, 8) as i32;
        if name_len < 0 {
            return Err(libc::EINVAL);
        }
        let name_len = if name == 0 {
            0
        } else {
            (name_len as usize).min(SOCKADDR_STORAGE)
        };
        let iov_len = usize::try_from(u64_at(b, 24)).map_err(|_| libc::EMSGSIZE)?;
        if iov_len > IOV_MAX {
            return Err(libc::EMSGSIZE);
        }
        let control_len = usize::try_from(u64_at(b, 40)).map_err(|_| libc::ENOBUFS)?;
        if control_len > CONTROL_MAX {
            return Err(libc::ENOBUFS);
        }
        Ok(MsgHdr {
            name,
            name_len,
            iov: u64_at(b, 16),
            iov_len,
            control: u64_at(b, 32),
            control_len,
        })
    }
}

/// One `struct iovec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iovec {
    pub base: u64,
    pub len: usize,
}

/// The `struct iovec` array in `b` (a whole number of them, else EFAULT);
/// a length that is negative as a `ssize_t` is EINVAL, as the kernel
/// answers it.
pub fn iovecs(b: &[u8]) -> R<Vec<Iovec>> {
    if b.len() % IOVEC_LEN != 0 {
        return Err(libc::EFAULT);
    }
    b.chunks_exact(IOVEC_LEN)
        .map(|v| {
            let len = i64_at(v, 8);
            if len < 0 {
                return Err(libc::EINVAL);
            }
            Ok(Iovec {
                base: u64_at(v, 0),
                len: len as usize,
            })
        })
        .collect()
}

/// One control message: its level, type and where its data lies in the
/// control buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmsg {
    pub level: i32,
    pub kind: i32,
    pub data: Range<usize>,
}

/// The control messages of `control`, walked as the kernel walks them
/// (`for_each_cmsghdr`): a header starts every `CMSG_ALIGN(cmsg_len)`
/// bytes while a whole header fits; a `cmsg_len` shorter than the header
/// or past the buffer's end is EINVAL.
pub fn cmsgs(control: &[u8]) -> R<Vec<Cmsg>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while control.len() - at >= CMSGHDR_LEN {
        let len = usize::try_from(u64_at(control, at)).map_err(|_| libc::EINVAL)?;
        if len < CMSGHDR_LEN || len > control.len() - at {
            return Err(libc::EINVAL);
        }
        out.push(Cmsg {
            level: u32_at(control, at + 8) as i32,
            kind: u32_at(control, at + 12) as i32,
            data: at + CMSGHDR_LEN..at + len,
        });
        // `len` is at most the buffer's length, so neither overflows.
        let next = at + len.next_multiple_of(8);
        if next >= control.len() {
            break;
        }
        at = next;
    }
    Ok(out)
}

/// Where the descriptors of the `SCM_RIGHTS` messages in `control` lie
/// (the offset of each 4-byte descriptor number): as many whole numbers as
/// each message's data holds, at most [`SCM_MAX_FD`] in all (else EINVAL).
pub fn scm_rights(control: &[u8]) -> R<Vec<usize>> {
    let mut slots = Vec::new();
    for c in cmsgs(control)? {
        if c.level != libc::SOL_SOCKET || c.kind != libc::SCM_RIGHTS {
            continue;
        }
        let count = c.data.len() / 4;
        if slots.len() + count > SCM_MAX_FD {
            return Err(libc::EINVAL);
        }
        slots.extend((0..count).map(|i| c.data.start + i * 4));
    }
    Ok(slots)
}

/// The descriptor number at `slot` (from [`scm_rights`]).
pub fn fd_at(control: &[u8], slot: usize) -> i32 {
    u32_at(control, slot) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake address space: `mem` mapped at `base`, whole pages.
    fn reader(base: u64, mem: &[u8]) -> impl Fn(u64, usize) -> R<Vec<u8>> + '_ {
        move |at, len| {
            assert!(len <= PAGE && (at % PAGE as u64) as usize + len <= PAGE);
            let off = at.checked_sub(base).ok_or(libc::EFAULT)? as usize;
            mem.get(off..off + len)
                .map(<[u8]>::to_vec)
                .ok_or(libc::EFAULT)
        }
    }

    #[test]
    fn strings_end_at_nul_within_the_bound() {
        let base = 0x10000;
        let mut mem = vec![b'a'; 2 * PAGE];
        mem[PAGE + 5] = 0;
        // Across a page boundary.
        let s = cstr(base + PAGE as u64 - 3, reader(base, &mem)).unwrap();
        assert_eq!(s, b"aaaaaaaa");
        // Ends just before an unmapped page: still read.
        let mut one = vec![b'b'; PAGE];
        one[PAGE - 1] = 0;
        assert_eq!(cstr(base, reader(base, &one)).unwrap().len(), PAGE - 1);
        // Runs into an unmapped page.
        assert_eq!(
            cstr(base + 10, reader(base, &[b'c'; PAGE])),
            Err(libc::EFAULT)
        );
        // PATH_MAX bytes without a NUL.
        let long = vec![b'd'; 3 * PAGE];
        assert_eq!(cstr(base, reader(base, &long)), Err(libc::ENAMETOOLONG));
        assert_eq!(cstr(0, reader(base, &long)), Err(libc::EFAULT));
        // The last address: no overflow.
        assert!(cstr(u64::MAX - 2, |_, len| Ok(vec![b'e'; len])).is_err());
    }

    fn how(flags: u64, mode: u64, resolve: u64) -> Vec<u8> {
        OpenHow {
            flags,
            mode,
            resolve,
        }
        .to_bytes()
        .to_vec()
    }

    #[test]
    fn open_how_is_checked_as_openat2_checks_it() {
        let creat = (libc::O_CREAT | libc::O_WRONLY) as u64;
        assert_eq!(open_how(&how(creat, 0o644, 0)).unwrap().mode, 0o644);
        assert_eq!(open_how(&how(0, 0o644, 0)), Err(libc::EINVAL));
        assert_eq!(open_how(&how(creat, 0o10000, 0)), Err(libc::EINVAL));
        assert_eq!(open_how(&how(1 << 40, 0, 0)), Err(libc::EINVAL));
        assert_eq!(
            open_how(&how((libc::O_PATH | libc::O_RDWR) as u64, 0, 0)),
            Err(libc::EINVAL)
        );
        assert_eq!(open_how(&how(0, 0, 8)), Err(libc::EINVAL));
        let mut longer = how(0, 0, 0);
        longer.extend_from_slice(&[0; 8]);
        assert!(open_how(&longer).is_ok());
        longer[30] = 1;
        assert_eq!(open_how(&longer), Err(libc::E2BIG));
        assert_eq!(open_how_len(23), Err(libc::EINVAL));
        assert_eq!(open_how_len(4097), Err(libc::E2BIG));
        assert_eq!(open_how_len(32), Ok(32));
    }

    #[test]
    fn times_decode() {
        let mut b = Vec::new();
        for v in [1i64, 2, 3, 4] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(Times::Timespec.decode(&b), Ok([(1, 2), (3, 4)]));
        assert_eq!(Times::Timeval.decode(&b), Ok([(1, 2000), (3, 4000)]));
        assert_eq!(Times::Utimbuf.decode(&b[..16]), Ok([(1, 0), (2, 0)]));
        assert_eq!(Times::Utimbuf.decode(&b), Err(libc::EFAULT));
        b[8..16].copy_from_slice(&i64::MAX.to_ne_bytes());
        assert_eq!(Times::Timeval.decode(&b).unwrap()[0].1, i64::MAX);
    }

    fn v4(a: [u8; 4]) -> Vec<u8> {
        let mut v = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&80u16.to_be_bytes());
        v.extend_from_slice(&a);
        v.extend_from_slice(&[0; 8]);
        v
    }

    fn v6(a: [u8; 16]) -> Vec<u8> {
        let mut v = (libc::AF_INET6 as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&80u16.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
        v.extend_from_slice(&a);
        v.extend_from_slice(&[0; 4]);
        v
    }

    fn lo(family: i32, what: Use, raw: &[u8]) -> bool {
        inet_destination(family, what, &SockAddr::decode(raw).unwrap()).is_loopback()
    }

    #[test]
    fn loopback_destinations() {
        use libc::{AF_INET, AF_INET6};
        for what in [Use::Connect, Use::Send] {
            assert!(lo(AF_INET, what, &v4([127, 0, 0, 1])));
            assert!(lo(AF_INET, what, &v4([127, 9, 9, 9])));
            assert!(lo(AF_INET, what, &v4([0, 0, 0, 0])));
            assert!(!lo(AF_INET, what, &v4([10, 0, 0, 1])));
            assert!(!lo(AF_INET, what, &v4([1, 1, 1, 1])));
            // An AF_INET6 socket connects and sends to AF_INET addresses.
            assert!(!lo(AF_INET6, what, &v4([10, 0, 0, 1])));
            let mut one = [0u8; 16];
            one[15] = 1;
            assert!(lo(AF_INET6, what, &v6(one)));
            assert!(lo(AF_INET6, what, &v6([0; 16])));
            let mut mapped = [0u8; 16];
            mapped[10] = 0xff;
            mapped[11] = 0xff;
            mapped[12..].copy_from_slice(&[127, 0, 0, 1]);
            assert!(lo(AF_INET6, what, &v6(mapped)));
            mapped[12..].copy_from_slice(&[8, 8, 8, 8]);
            assert!(!lo(AF_INET6, what, &v6(mapped)));
            let mut g = [0u8; 16];
            g[0] = 0x20;
            g[1] = 0x01;
            assert!(!lo(AF_INET6, what, &v6(g)));
            // Too short for its family: refused by every inet socket.
            assert!(lo(AF_INET, what, &v4([10, 0, 0, 1])[..15]));
        }
        // AF_UNSPEC: a disconnect; but UDP and raw IPv4 sockets send to
        // the address it holds.
        let mut unspec = v4([10, 0, 0, 1]);
        unspec[..2].copy_from_slice(&0u16.to_ne_bytes());
        assert!(lo(AF_INET, Use::Connect, &unspec));
        assert!(!lo(AF_INET, Use::Send, &unspec));
        assert!(lo(AF_INET, Use::Send, &unspec[..8]));
        let mut unspec6 = v6([0x20; 16]);
        unspec6[..2].copy_from_slice(&0u16.to_ne_bytes());
        assert!(!lo(AF_INET6, Use::Send, &unspec6));
        assert!(lo(AF_INET6, Use::Connect, &unspec6));
        assert_eq!(
            inet_destination(
                AF_INET,
                Use::Send,
                &SockAddr::decode(&v4([10, 0, 0, 1])).unwrap()
            )
            .to_string(),
            "10.0.0.1:80"
        );
    }

    #[test]
    fn socket_addresses_decode_and_give_their_bytes_back() {
        let raws = [
            v4([10, 0, 0, 1]),
            v6([1; 16]),
            v6([1; 16])[..24].to_vec(),
            sockaddr_un(b"/run/x.sock").unwrap(),
            sockaddr_un(b"").unwrap(),
            b"\x01\x00\x00hidden".to_vec(),
            b"\x01\x00rel\x00junk".to_vec(),
            b"\x01\x00".to_vec(),
            vec![0, 0, 1, 2],
            vec![7],
            vec![0x10, 0, 1, 2, 3],
        ];
        for raw in &raws {
            let a = SockAddr::decode(raw).unwrap();
            assert_eq!(&a.to_bytes(), raw, "{a:?}");
        }
        assert_eq!(
            SockAddr::decode(&sockaddr_un(b"/run/x.sock").unwrap()).unwrap(),
            SockAddr::Unix(UnixAddr::Path {
                path: b"/run/x.sock",
                rest: b"\0"
            })
        );
        assert_eq!(
            SockAddr::decode(b"\x01\x00\x00hidden").unwrap(),
            SockAddr::Unix(UnixAddr::Abstract(b"hidden"))
        );
        assert_eq!(SockAddr::decode(&v6([1; 16])).unwrap().scope_id(), Some(0));
        let mut long = sockaddr_un(b"a").unwrap();
        long.resize(SOCKADDR_UN_LEN + 1, b'b');
        assert_eq!(SockAddr::decode(&long), Err(libc::EINVAL));
        assert!(sockaddr_un(&[b'a'; SUN_PATH_MAX]).is_err());
        assert!(sockaddr_un(b"a\0b").is_err());
        assert_eq!(&sockaddr_un(b"self/fd/7").unwrap()[2..], b"self/fd/7\0");
    }

    fn msghdr(name: u64, name_len: u32, iov_len: u64, control_len: u64) -> Vec<u8> {
        let mut b = vec![0u8; MSGHDR_LEN];
        b[..8].copy_from_slice(&name.to_ne_bytes());
        b[8..12].copy_from_slice(&name_len.to_ne_bytes());
        b[16..24].copy_from_slice(&0x1000u64.to_ne_bytes());
        b[24..32].copy_from_slice(&iov_len.to_ne_bytes());
        b[32..40].copy_from_slice(&0x2000u64.to_ne_bytes());
        b[40..48].copy_from_slice(&control_len.to_ne_bytes());
        b
    }

    #[test]
    fn msghdr_lengths_are_checked() {
        let h = MsgHdr::decode(&msghdr(0x3000, 16, 2, 24)).unwrap();
        assert_eq!(
            (h.name, h.name_len, h.iov_len, h.control_len),
            (0x3000, 16, 2, 24)
        );
        assert_eq!((h.iov, h.control), (0x1000, 0x2000));
        assert_eq!(
            MsgHdr::decode(&msghdr(0x3000, 4000, 0, 0))
                .unwrap()
                .name_len,
            128
        );
        assert_eq!(MsgHdr::decode(&msghdr(0, 16, 0, 0)).unwrap().name_len, 0);
        assert_eq!(
            MsgHdr::decode(&msghdr(1, u32::MAX, 0, 0)),
            Err(libc::EINVAL)
        );
        assert_eq!(MsgHdr::decode(&msghdr(0, 0, 1025, 0)), Err(libc::EMSGSIZE));
        assert_eq!(
            MsgHdr::decode(&msghdr(0, 0, u64::MAX, 0)),
            Err(libc::EMSGSIZE)
        );
        assert_eq!(
            MsgHdr::decode(&msghdr(0, 0, 0, 1 << 20)),
            Err(libc::ENOBUFS)
        );
        assert_eq!(MsgHdr::decode(&[0; 55]), Err(libc::EFAULT));
        let mut iov = Vec::new();
        for (base, len) in [(1u64, 5i64), (2, -1)] {
            iov.extend_from_slice(&base.to_ne_bytes());
            iov.extend_from_slice(&len.to_ne_bytes());
        }
        assert_eq!(iovecs(&iov[..16]), Ok(vec![Iovec { base: 1, len: 5 }]));
        assert_eq!(iovecs(&iov), Err(libc::EINVAL));
        assert_eq!(iovecs(&iov[..15]), Err(libc::EFAULT));
    }

    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let mut b = ((CMSGHDR_LEN + data.len()) as u64).to_ne_bytes().to_vec();
        b.extend_from_slice(&level.to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(data);
        b.resize(b.len().next_multiple_of(8), 0);
        b
    }

    #[test]
    fn control_messages_walk_as_the_kernel_walks_them() {
        let fds: Vec<u8> = [3i32, 4, 5].iter().flat_map(|f| f.to_ne_bytes()).collect();
        let mut c = cmsg(libc::SOL_SOCKET, libc::SCM_CREDENTIALS, &[0; 12]);
        c.extend(cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &fds));
        let slots = scm_rights(&c).unwrap();
        assert_eq!(slots.len(), 3);
        let got: Vec<i32> = slots.iter().map(|s| fd_at(&c, *s)).collect();
        assert_eq!(got, vec![3, 4, 5]);
        // The last message need not be padded.
        let last = c.len() - 4;
        assert_eq!(scm_rights(&c[..last]).unwrap().len(), 3);
        // A length past the end, or shorter than the header.
        let mut bad = c.clone();
        bad[32..40].copy_from_slice(&u64::MAX.to_ne_bytes());
        assert_eq!(cmsgs(&bad), Err(libc::EINVAL));
        bad[32..40].copy_from_slice(&8u64.to_ne_bytes());
        assert_eq!(cmsgs(&bad), Err(libc::EINVAL));
        // Fewer bytes than a header: nothing.
        assert_eq!(cmsgs(&c[..15]), Ok(Vec::new()));
        // Past SCM_MAX_FD descriptors.
        let many = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &[0; 4 * 254]);
        assert_eq!(scm_rights(&many), Err(libc::EINVAL));
    }
}
