//! The sandbox supervisor's decoding of the workload's syscall arguments
//! (`moat_sandbox::supervisor::decode`): bytes the workload put in its own
//! memory, as the supervisor copies them out. The input's first byte picks
//! the decoder, the rest is what the workload wrote. Nothing may panic or
//! overflow, and what a decoder accepts keeps its properties: a path holds
//! no NUL and respects PATH_MAX, a socket address gives back the bytes it
//! was decoded from, every length stays within its bound and within the
//! buffer it describes.
use std::collections::HashSet;
use std::net::SocketAddr;

use moat_sandbox::supervisor::decode::{
    self, cmsgs, cstr, inet_destination, iovecs, open_how, open_how_len, scm_rights, sockaddr_un,
    Dest, MsgHdr, SockAddr, Times, UnixAddr, Use, PAGE, PATH_MAX,
};
use rustix::fs::OFlags;

pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => string(rest),
        1 => how(rest),
        2 => times(rest),
        3 => sockaddr(rest),
        4 => msghdr(rest),
        5 => control(rest),
        6 => dents(rest),
        _ => interpreter(rest),
    }
}

/// Where the fake address space starts (page-aligned, not NULL).
const BASE: u64 = 0x7f00_0000_0000;

/// A NUL-terminated string in a fake address space of whole pages: bytes
/// 0-1 the string's offset from the first page, byte 2 the fill byte (low
/// 6 bits) and extra mapped pages (high 2), then the string's bytes. What
/// `cstr` returns is compared with a plain scan of that memory.
fn string(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let off = usize::from(u16::from_le_bytes([data[0], data[1]])) % (2 * PAGE);
    let (fill, extra) = (data[2] & 0x3f, usize::from(data[2] >> 6));
    let content = &data[3..];
    let pages = (off + content.len()).div_ceil(PAGE) + extra;
    let mut mem = vec![fill; pages.max(1) * PAGE];
    mem[off..off + content.len()].copy_from_slice(content);
    let read = |at: u64, len: usize| -> Result<Vec<u8>, i32> {
        // The reader is called a page at a time, as process_vm_readv needs.
        assert!(len > 0 && len <= PAGE, "a read of {len} bytes");
        assert!(
            (at % PAGE as u64) as usize + len <= PAGE,
            "a read across a page"
        );
        let start = at.checked_sub(BASE).ok_or(libc::EFAULT)? as usize;
        mem.get(start..start + len)
            .map(<[u8]>::to_vec)
            .ok_or(libc::EFAULT)
    };
    let got = cstr(BASE + off as u64, read);
    // The reference: scan from the string's start.
    let scan = &mem[off..];
    let expected = match scan.iter().take(PATH_MAX).position(|b| *b == 0) {
        Some(nul) => Ok(scan[..nul].to_vec()),
        None if scan.len() >= PATH_MAX => Err(libc::ENAMETOOLONG),
        None => Err(libc::EFAULT),
    };
    assert_eq!(got, expected, "cstr disagrees with a scan of the memory");
    if let Ok(s) = got {
        crate::reached();
        assert!(!s.contains(&0) && s.len() < PATH_MAX);
    }
    // NULL is never read.
    assert_eq!(cstr(0, |_, _| panic!("NULL read")), Err(libc::EFAULT));
}

/// `struct open_how` as openat2's `size` bytes.
fn how(data: &[u8]) {
    let Ok(len) = open_how_len(data.len() as u64) else {
        assert!(data.len() < decode::OPEN_HOW_SIZE || data.len() > PAGE);
        return;
    };
    let Ok(h) = open_how(&data[..len]) else {
        return;
    };
    crate::reached();
    assert_eq!(h.to_bytes()[..], data[..decode::OPEN_HOW_SIZE]);
    assert!(data[decode::OPEN_HOW_SIZE..].iter().all(|b| *b == 0));
    let f = OFlags::from_bits_retain(u32::try_from(h.flags).expect("flags fit 32 bits"));
    assert!((f - decode::valid_open_flags()).is_empty());
    assert!(h.mode <= 0o7777 && h.resolve == 0);
    if f.contains(OFlags::PATH) {
        let path_only = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        assert!((f - path_only).is_empty());
    }
    if h.mode != 0 {
        assert!(f.contains(OFlags::CREATE) || f.contains(OFlags::TMPFILE));
    }
}

/// The utime family's timestamps: byte 0 picks the layout.
fn times(data: &[u8]) {
    let Some((&kind, b)) = data.split_first() else {
        return;
    };
    let kind = [Times::Timespec, Times::Utimbuf, Times::Timeval][usize::from(kind % 3)];
    match kind.decode(b) {
        Ok(t) => {
            crate::reached();
            assert_eq!(b.len(), kind.size());
            if kind == Times::Timespec {
                let again: Vec<u8> = t
                    .iter()
                    .flat_map(|(s, ns)| [s.to_ne_bytes(), ns.to_ne_bytes()])
                    .flatten()
                    .collect();
                assert_eq!(again, b);
            }
        }
        Err(e) => assert!(b.len() != kind.size() && e == libc::EFAULT),
    }
}

/// A socket address: byte 0 the socket's family, byte 1 the call, then
/// the address (as read: at most `SOCKADDR_MAX` bytes).
fn sockaddr(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let family = [libc::AF_INET, libc::AF_INET6, libc::AF_UNIX][usize::from(data[0] % 3)];
    let what = [Use::Connect, Use::Bind, Use::Send][usize::from(data[1] % 3)];
    let raw = &data[2..data.len().min(2 + decode::SOCKADDR_STORAGE)];
    let Ok(a) = SockAddr::decode(raw) else {
        // Only a unix address longer than struct sockaddr_un is refused.
        assert!(raw.len() > decode::SOCKADDR_UN_LEN);
        assert_eq!(raw[..2], (libc::AF_UNIX as u16).to_ne_bytes());
        return;
    };
    crate::reached();
    assert_eq!(a.to_bytes(), raw, "a decoded address gives its bytes back");
    assert_eq!(SockAddr::decode(&a.to_bytes()), Ok(a.clone()));
    match &a {
        SockAddr::Unix(UnixAddr::Path { path, rest }) => {
            assert!(!path.is_empty() && !path.contains(&0));
            assert!(path.len() <= decode::SUN_PATH_MAX);
            assert!(rest.first().is_none_or(|b| *b == 0));
            // What the broker hands the kernel for a name it resolved.
            if let Ok(enc) = sockaddr_un(path) {
                assert_eq!(
                    SockAddr::decode(&enc),
                    Ok(SockAddr::Unix(UnixAddr::Path { path, rest: b"\0" }))
                );
            }
        }
        SockAddr::Unix(UnixAddr::Abstract(_)) => assert_eq!(raw[2], 0),
        SockAddr::None => assert!(raw.is_empty()),
        _ => {}
    }
    let dest = inet_destination(family, what, &a);
    let _ = (dest.is_loopback(), dest.to_string());
    // An inet address long enough for its family is always the
    // destination, whatever the socket (the kernel goes there).
    match (&a, dest) {
        (SockAddr::Inet { ip, port, .. }, Dest::To(SocketAddr::V4(d))) => {
            assert_eq!((d.ip(), d.port()), (ip, *port));
            assert_eq!(d.ip().octets(), raw[4..8]);
        }
        (SockAddr::Inet6 { ip, .. }, Dest::To(SocketAddr::V6(d))) => {
            assert_eq!(d.ip(), ip);
            assert_eq!(d.ip().octets(), raw[8..24]);
        }
        (SockAddr::Inet { .. } | SockAddr::Inet6 { .. }, d) => panic!("{a:?} went to {d:?}"),
        (SockAddr::Unspec(_), Dest::To(_)) => assert_eq!(what, Use::Send),
        (_, Dest::To(d)) => panic!("{a:?} went to {d:?}"),
        _ => {}
    }
}

/// A `struct msghdr` and, after it, its `iovec` array.
fn msghdr(data: &[u8]) {
    let Some(h) = data.get(..decode::MSGHDR_LEN) else {
        assert!(MsgHdr::decode(data).is_err());
        return;
    };
    if let Ok(m) = MsgHdr::decode(h) {
        crate::reached();
        let word = |at: usize| u64::from_ne_bytes(h[at..at + 8].try_into().expect("8 bytes"));
        assert_eq!((m.name, m.iov, m.control), (word(0), word(16), word(32)));
        assert!(m.name_len <= decode::SOCKADDR_STORAGE);
        assert!(m.name != 0 || m.name_len == 0);
        assert!(m.iov_len <= decode::IOV_MAX && m.iov_len as u64 == word(24));
        assert!(m.control_len <= decode::CONTROL_MAX && m.control_len as u64 == word(40));
    }
    let rest = &data[decode::MSGHDR_LEN..];
    let whole = rest.len() / decode::IOVEC_LEN * decode::IOVEC_LEN;
    if let Ok(v) = iovecs(&rest[..whole]) {
        assert_eq!(v.len() * decode::IOVEC_LEN, whole);
        for (i, iov) in v.iter().enumerate() {
            let at = i * decode::IOVEC_LEN;
            assert_eq!(iov.base.to_ne_bytes()[..], rest[at..at + 8]);
            assert_eq!((iov.len as u64).to_ne_bytes()[..], rest[at + 8..at + 16]);
            assert!(iov.len <= i64::MAX as usize);
        }
    }
    if whole != rest.len() {
        assert_eq!(iovecs(rest), Err(libc::EFAULT));
    }
}

/// Control messages (`msg_control`), and the `SCM_RIGHTS` descriptors in
/// them that the supervisor duplicates and rewrites.
fn control(data: &[u8]) {
    let data = &data[..data.len().min(decode::CONTROL_MAX)];
    let Ok(list) = cmsgs(data) else {
        assert!(scm_rights(data).is_err());
        return;
    };
    crate::reached();
    let mut next = 0;
    for c in &list {
        // Each header at an aligned offset past the previous message, its
        // data within the buffer, its length as the header states it.
        let at = c.data.start - decode::CMSGHDR_LEN;
        assert!(at >= next && at.is_multiple_of(8));
        assert!(c.data.start <= c.data.end && c.data.end <= data.len());
        let len = u64::from_ne_bytes(data[at..at + 8].try_into().expect("8 bytes"));
        assert_eq!(len, (c.data.len() + decode::CMSGHDR_LEN) as u64);
        next = c.data.end;
    }
    if let Ok(slots) = scm_rights(data) {
        assert!(slots.len() <= decode::SCM_MAX_FD);
        for s in &slots {
            assert!(list.iter().any(|c| c.level == libc::SOL_SOCKET
                && c.kind == libc::SCM_RIGHTS
                && c.data.start <= *s
                && s + 4 <= c.data.end));
            let _ = decode::fd_at(data, *s);
        }
        assert!(slots.windows(2).all(|w| w[0] + 4 <= w[1]));
    }
}

/// A directory read (`linux_dirent64` records, names the workload chose)
/// filtered of a hidden name, in both record layouts.
fn dents(data: &[u8]) {
    let hidden: HashSet<Vec<u8>> = [b"secret".to_vec()].into();
    for old in [false, true] {
        let out = moat_sandbox::supervisor::broker::filter_dents(data, Some(&hidden), old);
        assert!(out.len() <= data.len());
        if !old {
            // The records left are whole, and none is the hidden name.
            let again = moat_sandbox::supervisor::broker::filter_dents(&out, Some(&hidden), false);
            assert_eq!(again, out);
        }
    }
}

/// A program's first bytes (a file the workload wrote), for the
/// interpreter learning mode records.
fn interpreter(data: &[u8]) {
    if let Some(p) = moat_sandbox::learn::interpreter(data) {
        crate::reached();
        assert!(p.starts_with(b"/") && !p.contains(&0));
    }
}
