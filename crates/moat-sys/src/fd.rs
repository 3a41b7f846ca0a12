//! File descriptors that arrive from the kernel as plain integers.
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Takes ownership of an fd the kernel just installed in this process's table
/// (from `SCM_RIGHTS`, a syscall's return value, or inherited by number).
///
/// # Safety
/// `fd` must be open, and nothing else in the process may own it (no other
/// `OwnedFd`, `File` or socket wraps it, and nobody closes it by number):
/// the returned `OwnedFd` closes it when dropped. Safe code gets received
/// descriptors from [`recv_with_fd`] instead.
pub unsafe fn own(fd: RawFd) -> OwnedFd {
    assert!(fd >= 0, "negative fd");
    // SAFETY: per this function's contract the fd is open and unowned, so
    // creating the single OwnedFd for it cannot cause a double close.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// One `recvmsg(2)` on `sock` into `buf` (retried on `EINTR`), with room for
/// one descriptor passed as `SCM_RIGHTS` (received close-on-exec). Returns
/// the bytes received and the descriptor, if one came. Descriptors beyond the
/// first, which a well-behaved peer never sends, are closed; a message longer
/// than `buf` fails with `EMSGSIZE` rather than arriving cut.
pub fn recv_with_fd(sock: BorrowedFd, buf: &mut [u8]) -> std::io::Result<(usize, Option<OwnedFd>)> {
    // Room for the header and four ints: more than one fd is closed, not leaked.
    const FDS: usize = 4;
    let space = cmsg_space(FDS * std::mem::size_of::<RawFd>());
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header; the fields set
    // below point at `iov` and `control`, which outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    let n = loop {
        // SAFETY: `msg` describes writable buffers of the lengths it states
        // (`buf` through `iov`, and `control`), valid for the whole call.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    };
    let mut first = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled,
    // bounded by `msg_controllen`, which it set to the length it wrote.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is a header inside the control buffer (see above).
        let hdr = unsafe { &*c };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a constant computation.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count =
                (hdr.cmsg_len as usize).saturating_sub(header) / std::mem::size_of::<RawFd>();
            // SAFETY: CMSG_DATA points at `count` ints the kernel wrote
            // inside this header's length; read unaligned, as they may be.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: `i < count`, within the data just described.
                let fd = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel installed `fd` in our table for this
                // message just now; nothing else knows its number.
                let owned = unsafe { own(fd) };
                if first.is_none() {
                    first = Some(owned);
                }
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(std::io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    Ok((n, first))
}

fn cmsg_space(len: usize) -> usize {
    // SAFETY: CMSG_SPACE is a constant computation on its argument.
    unsafe { libc::CMSG_SPACE(len as u32) as usize }
}

/// Whether every holder of the other end of the socket `fd` (an fd number
/// this process has open) has closed it, without waiting: a socketpair
/// end reports `POLLHUP` then, queued messages or not.
pub fn hung_up(fd: RawFd) -> std::io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    loop {
        // SAFETY: one pollfd on our stack, no timeout; an invalid fd shows
        // as POLLNVAL, reported as an error.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n >= 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if p.revents & libc::POLLNVAL != 0 {
        return Err(std::io::Error::from_raw_os_error(libc::EBADF));
    }
    Ok(p.revents & libc::POLLHUP != 0)
}

/// Sets or clears `FD_CLOEXEC` on an fd number this process has open.
pub fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD only touch the descriptor flags of `fd`; an
    // invalid fd yields EBADF, reported as an error.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let new = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, new) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Closes every descriptor of this process above 2 that is not in `keep`
/// (a helper process drops what its forking parent held: a container's
/// state lock among them). Read from /proc/self/fd; a descriptor already
/// gone (the listing's own) is fine.
pub fn close_all_except(keep: &[RawFd]) -> std::io::Result<()> {
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    for fd in open {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing by number invalidates any owner of `fd` in
            // this process; callers are forked helpers that go on with the
            // listed descriptors only and end by `_exit` or `exec`, so the
            // other owners (their parent's frames) are never used or
            // dropped.
            if unsafe { libc::close(fd) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EBADF) {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_fd_and_bytes_arrive_together() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let fds = [f.as_raw_fd()];
        let data = b"hello";
        let iov = [libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: data.len(),
        }];
        let mut control = vec![0u8; cmsg_space(std::mem::size_of::<RawFd>())];
        // SAFETY: a zeroed msghdr filled with pointers to live buffers; the
        // SCM_RIGHTS header is written inside `control`.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_ptr() as *mut _;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len();
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            libc::CMSG_DATA(c).cast::<RawFd>().write_unaligned(fds[0]);
            assert_eq!(libc::sendmsg(a.as_raw_fd(), &msg, 0), 5);
        }
        let mut buf = [0u8; 16];
        let (n, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        let fd = fd.expect("an fd came");
        assert_ne!(fd.as_raw_fd(), f.as_raw_fd());
        a.send(b"x").unwrap();
        let (n, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fd.is_none()), (1, true));
    }

    use std::os::fd::AsFd;
}
