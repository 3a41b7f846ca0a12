//! Socket and scheduling calls on raw bytes, for the sandbox supervisor: it
//! carries out a workload's `connect`/`bind`/`sendmsg` with the address and
//! control data it copied out of the workload's memory (so the kernel uses
//! exactly what was decided), and answers `getdents64` and
//! `sched_getaffinity` with the bytes the kernel returns. No wrapper takes
//! a socket address or control messages as plain bytes, hence these.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Largest socket address (`sizeof(struct sockaddr_storage)`).
pub const SOCKADDR_MAX: usize = 128;

fn addr_len(addr: &[u8]) -> io::Result<libc::socklen_t> {
    if addr.len() > SOCKADDR_MAX {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(addr.len() as libc::socklen_t)
}

/// `connect(2)` with `addr` (a whole `struct sockaddr_*`, as bytes).
pub fn connect_raw(fd: BorrowedFd<'_>, addr: &[u8]) -> io::Result<()> {
    let len = addr_len(addr)?;
    // SAFETY: `addr` is a live byte slice of `len` bytes; the kernel copies
    // `len` bytes from the pointer before returning and keeps no reference.
    // A sockaddr has no alignment requirement for the kernel's copy.
    let r = unsafe { libc::connect(fd.as_raw_fd(), addr.as_ptr().cast(), len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `bind(2)` with `addr` (as bytes).
pub fn bind_raw(fd: BorrowedFd<'_>, addr: &[u8]) -> io::Result<()> {
    let len = addr_len(addr)?;
    // SAFETY: as in `connect_raw`: `len` readable bytes, copied by the kernel.
    let r = unsafe { libc::bind(fd.as_raw_fd(), addr.as_ptr().cast(), len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `sendmsg(2)` of the buffers `iov`, to `name` (empty: none), with the
/// control messages `control` (empty: none) as they are, and `flags`.
pub fn sendmsg_raw(
    fd: BorrowedFd<'_>,
    name: &[u8],
    iov: &[&[u8]],
    control: &[u8],
    flags: i32,
) -> io::Result<usize> {
    let namelen = addr_len(name)?;
    let mut vecs: Vec<libc::iovec> = iov
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    // Control messages are read by the kernel as `cmsghdr`s (8-byte
    // aligned): copied into a buffer of u64s.
    let mut ctl = vec![0u64; control.len().div_ceil(8)];
    for (i, b) in control.iter().enumerate() {
        let w = &mut ctl[i / 8];
        let mut bytes = w.to_ne_bytes();
        bytes[i % 8] = *b;
        *w = u64::from_ne_bytes(bytes);
    }
    // SAFETY: all-zero is a valid `msghdr` (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    if !name.is_empty() {
        msg.msg_name = name.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = namelen;
    }
    msg.msg_iov = vecs.as_mut_ptr();
    msg.msg_iovlen = vecs.len();
    if !control.is_empty() {
        msg.msg_control = ctl.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
    }
    // SAFETY: every pointer in `msg` refers to memory live for this call:
    // `name` (namelen bytes), `vecs` (msg_iovlen iovecs, each over a live
    // slice of `iov`), `ctl` (at least msg_controllen bytes, 8-aligned).
    // The kernel only reads them (sendmsg writes nothing back) and keeps no
    // reference after returning.
    let r = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, flags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// `getdents64(2)` on `fd` into a buffer of `len` bytes: the bytes the
/// kernel wrote (empty at the end of the directory).
pub fn getdents64_raw(fd: BorrowedFd<'_>, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` is live and writable for `len` bytes; the kernel
    // writes at most `len` bytes of dirent64 records into it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            len as libc::c_ulong,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// `sched_getaffinity(2)` of thread `tid` with a mask of `len` bytes: the
/// bytes the kernel wrote (its return value says how many).
pub fn sched_getaffinity_raw(tid: i32, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` is live and writable for `len` bytes, the size passed;
    // the kernel writes at most that many bytes of the mask.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getaffinity,
            tid,
            len as libc::c_ulong,
            buf.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn unix_datagram_round_trip_with_raw_address() {
        let dir = std::env::temp_dir().join(format!("moat-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let tx = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let mut addr = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        addr.extend_from_slice(path.as_os_str().as_encoded_bytes());
        addr.push(0);
        let n = sendmsg_raw(tx.as_fd(), &addr, &[b"he", b"llo"], &[], 0).unwrap();
        assert_eq!(n, 5);
        let mut buf = [0u8; 16];
        assert_eq!(rx.recv(&mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
        let c = std::os::unix::net::UnixDatagram::unbound().unwrap();
        connect_raw(c.as_fd(), &addr).unwrap();
        assert!(bind_raw(c.as_fd(), &[0u8; 200]).is_err());
        let d = std::fs::File::open(&dir).unwrap();
        let ents = getdents64_raw(d.as_fd(), 4096).unwrap();
        assert!(ents.windows(2).any(|w| w == b"s\0"));
        let mask = sched_getaffinity_raw(0, 128).unwrap();
        assert!(!mask.is_empty() && mask.iter().any(|b| *b != 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
