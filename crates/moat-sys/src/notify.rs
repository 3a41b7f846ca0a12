//! seccomp user notification: the supervisor's side of a listener fd
//! (seccomp_unotify(2)). Each function is one ioctl on the notify fd; the
//! structures are the kernel's, copied in and out by value.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

/// One notification: a syscall of the workload, waiting for an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notif {
    /// The cookie every answer and every check names.
    pub id: u64,
    /// The calling thread, as this process's PID namespace names it.
    pub pid: u32,
    pub nr: i32,
    pub arch: u32,
    pub args: [u64; 6],
}

/// `SECCOMP_USER_NOTIF_FLAG_CONTINUE`: let the kernel run the syscall.
pub const FLAG_CONTINUE: u32 = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32;

fn ioctl<T>(fd: BorrowedFd<'_>, request: libc::Ioctl, arg: *mut T) -> io::Result<libc::c_int> {
    loop {
        // SAFETY: every caller passes a request whose argument type is `T`
        // (the kernel's structure for that request, `repr(C)` in libc) and
        // `arg` points at one such value, live and writable for the whole
        // call; the kernel reads or writes exactly `size_of::<T>()` bytes,
        // the size encoded in the request number.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) };
        if r >= 0 {
            return Ok(r);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// The kernel's sizes of the notification structures; a kernel whose
/// `seccomp_notif` is larger than the one compiled here is refused (it
/// would write past the buffer).
pub fn check_sizes() -> io::Result<()> {
    let mut sizes = libc::seccomp_notif_sizes {
        seccomp_notif: 0,
        seccomp_notif_resp: 0,
        seccomp_data: 0,
    };
    // SAFETY: SECCOMP_GET_NOTIF_SIZES writes one `seccomp_notif_sizes` to
    // the pointer, which refers to a live, writable value of that type.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_NOTIF_SIZES,
            0,
            &mut sizes as *mut libc::seccomp_notif_sizes,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let fits = usize::from(sizes.seccomp_notif) <= std::mem::size_of::<libc::seccomp_notif>()
        && usize::from(sizes.seccomp_notif_resp) <= std::mem::size_of::<libc::seccomp_notif_resp>();
    if !fits {
        return Err(io::Error::other(format!(
            "kernel seccomp notification structures are larger than moat's ({} / {} bytes)",
            sizes.seccomp_notif, sizes.seccomp_notif_resp
        )));
    }
    Ok(())
}

/// `SECCOMP_IOCTL_NOTIF_RECV`: waits for the next notification. `ENOENT`
/// once no process uses the filter any more.
pub fn recv(fd: BorrowedFd<'_>) -> io::Result<Notif> {
    // SAFETY: an all-zero `seccomp_notif` is valid (plain integers), and the
    // kernel requires the buffer zeroed.
    let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut n)?;
    Ok(Notif {
        id: n.id,
        pid: n.pid,
        nr: n.data.nr,
        arch: n.data.arch,
        args: n.data.args,
    })
}

/// `SECCOMP_IOCTL_NOTIF_SEND`: answers `id` with a return value, an error
/// (`error` > 0 is returned as `-error`) or [`FLAG_CONTINUE`]. `ENOENT` when
/// the caller is gone (killed, or its syscall interrupted).
pub fn send(fd: BorrowedFd<'_>, id: u64, val: i64, error: i32, flags: u32) -> io::Result<()> {
    let mut resp = libc::seccomp_notif_resp {
        id,
        val,
        error: error.checked_neg().unwrap_or(-libc::EPERM),
        flags,
    };
    ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp).map(drop)
}

/// `SECCOMP_IOCTL_NOTIF_ID_VALID`: whether `id` still waits (its thread is
/// alive and blocked in that syscall). Checked after reading the target's
/// memory and before acting on it: a PID reused since would have been
/// read instead.
pub fn id_valid(fd: BorrowedFd<'_>, id: u64) -> bool {
    let mut id = id;
    ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &mut id).is_ok()
}

/// `SECCOMP_IOCTL_NOTIF_ADDFD` with `SECCOMP_ADDFD_FLAG_SEND`: installs a
/// copy of `src` in the target and answers `id` with its number, in one
/// step. Returns that number.
pub fn addfd_send(
    fd: BorrowedFd<'_>,
    id: u64,
    src: BorrowedFd<'_>,
    cloexec: bool,
) -> io::Result<RawFd> {
    let mut add = libc::seccomp_notif_addfd {
        id,
        flags: libc::SECCOMP_ADDFD_FLAG_SEND as u32,
        srcfd: src.as_raw_fd() as u32,
        newfd: 0,
        newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
    };
    ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_ADDFD, &mut add)
}

/// `SECCOMP_IOCTL_NOTIF_SET_FLAGS` with `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP`
/// (Linux 6.6): the kernel wakes the supervisor on the target's CPU and
/// the target on the supervisor's, the two-context-switch round trip.
pub fn set_sync_wakeup(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (include/uapi/linux/seccomp.h).
    const SYNC_WAKE_UP: libc::c_ulong = 1;
    // SAFETY: SET_FLAGS takes its flags by value (the kernel reads the
    // ioctl argument itself, not memory it points to), so no memory is
    // read or written.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS,
            SYNC_WAKE_UP,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The bytes of a kernel structure the caller zero-initialised and the
/// kernel filled, to copy into another process's memory as they are.
fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
    let len = std::mem::size_of::<T>();
    // SAFETY: `value` is a live, initialised `T`: every `T` this is called
    // with (`stat`, `statx`, `statfs`, `utsname`) was zeroed in full before
    // the kernel wrote it, so its padding bytes are initialised too; the
    // slice covers exactly its `len` bytes and ends with the borrow.
    let raw = unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), len) };
    raw.to_vec()
}

/// `struct stat` of what `fd` refers to (an `O_PATH` fd included: of a
/// symlink, the link itself), as the `stat` family returns it.
pub fn stat_bytes(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    stat_bytes_at(fd, c"", libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
}

/// `struct stat` of `path` relative to `dir`, as `fstatat(2)` with `flags`.
pub fn stat_bytes_at(
    dir: BorrowedFd<'_>,
    path: &std::ffi::CStr,
    flags: i32,
) -> io::Result<Vec<u8>> {
    // SAFETY: all-zero is a valid `stat` (plain integers).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a NUL-terminated string, and `st` is a live,
    // writable `stat` the kernel fills.
    let r = unsafe { libc::fstatat(dir.as_raw_fd(), path.as_ptr(), &mut st, flags) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(bytes_of(&st))
}

/// `struct statx` of what `fd` refers to, for `mask`, with the
/// synchronisation bits of `flags` (`AT_STATX_*`).
pub fn statx_bytes(fd: BorrowedFd<'_>, flags: i32, mask: u32) -> io::Result<Vec<u8>> {
    let flags =
        (flags & libc::AT_STATX_SYNC_TYPE) | libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW;
    statx_bytes_at(fd, c"", flags, mask)
}

/// `struct statx` of `path` relative to `dir`, for `mask`, as `statx(2)`
/// with `flags`.
pub fn statx_bytes_at(
    dir: BorrowedFd<'_>,
    path: &std::ffi::CStr,
    flags: i32,
    mask: u32,
) -> io::Result<Vec<u8>> {
    // SAFETY: all-zero is a valid `statx` (plain integers).
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: as for `stat_bytes_at`: a C string and a live `statx`.
    let r = unsafe { libc::statx(dir.as_raw_fd(), path.as_ptr(), flags, mask, &mut st) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(bytes_of(&st))
}

/// `struct statfs` of the filesystem `fd` is on.
pub fn statfs_bytes(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    // SAFETY: all-zero is a valid `statfs` (plain integers).
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live, writable `statfs` the kernel fills.
    let r = unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(bytes_of(&st))
}

/// `struct utsname` with each field from `fields` (sysname, nodename,
/// release, version, machine, domainname), cut to fit with its NUL.
pub fn utsname_bytes(fields: [&[u8]; 6]) -> Vec<u8> {
    const LEN: usize = 65;
    let mut out = vec![0u8; LEN * 6];
    for (i, f) in fields.iter().enumerate() {
        let n = f.len().min(LEN - 1);
        out[i * LEN..i * LEN + n].copy_from_slice(&f[..n]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_are_the_kernels() {
        assert_eq!(std::mem::size_of::<libc::seccomp_notif>(), 80);
        assert_eq!(std::mem::size_of::<libc::seccomp_notif_resp>(), 24);
        assert_eq!(std::mem::size_of::<libc::seccomp_notif_addfd>(), 24);
        check_sizes().unwrap();
    }
}
