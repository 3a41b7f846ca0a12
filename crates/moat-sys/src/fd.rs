//! File descriptors that arrive from the kernel as plain integers.
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Takes ownership of an fd the kernel just installed in this process's table
/// (from `SCM_RIGHTS`, a syscall's return value, or inherited by number).
///
/// The caller must pass an fd that nothing else in the process owns; moat
/// calls it only on fds returned by `recvmsg` and on fds it was told to
/// inherit (`--preserve-fds`, `LISTEN_FDS`) that no other object wraps.
pub fn own(fd: RawFd) -> OwnedFd {
    assert!(fd >= 0, "negative fd");
    // SAFETY: per this function's contract the fd is open and unowned, so
    // creating the single OwnedFd for it cannot cause a double close.
    unsafe { OwnedFd::from_raw_fd(fd) }
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
