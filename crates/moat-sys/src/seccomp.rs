//! Installing a seccomp filter that is already compiled to classic BPF (the
//! runtime compiles a profile once, through libseccomp, and keeps the
//! program; libseccomp itself has no call that loads a program it did not
//! just generate).
use std::io;

/// One classic BPF instruction, `struct sock_filter`.
pub type SockFilter = libc::sock_filter;

/// The flags [`set_mode_filter`] passes on: none of them makes the kernel
/// return a new file descriptor (`SECCOMP_FILTER_FLAG_NEW_LISTENER`), which
/// this call would have no owner for.
pub const ALLOWED_FLAGS: libc::c_ulong = libc::SECCOMP_FILTER_FLAG_TSYNC
    | libc::SECCOMP_FILTER_FLAG_LOG
    | libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW;

/// `seccomp(SECCOMP_SET_MODE_FILTER, flags, &prog)`: adds `prog` to the
/// calling thread's filters (all threads' with `SECCOMP_FILTER_FLAG_TSYNC`).
/// Needs no_new_privs or CAP_SYS_ADMIN, as the kernel says. `EINVAL` for
/// flags outside [`ALLOWED_FLAGS`] or a program that is empty or longer
/// than `BPF_MAXINSNS`; an error naming the thread when TSYNC cannot
/// synchronise one.
pub fn set_mode_filter(flags: libc::c_ulong, prog: &[SockFilter]) -> io::Result<()> {
    let max = usize::try_from(libc::BPF_MAXINSNS).unwrap_or(0);
    if flags & !ALLOWED_FLAGS != 0 || prog.is_empty() || prog.len() > max {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let len = u16::try_from(prog.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let fprog = libc::sock_fprog {
        len,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `len` initialised instructions borrowed from
    // `prog`, which outlives the call; the kernel copies the program and
    // does not keep the pointer, nor write through it. No flag that returns
    // a file descriptor is passed, so nothing is leaked.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    match r {
        0 => Ok(()),
        r if r < 0 => Err(io::Error::last_os_error()),
        // With TSYNC, a positive result is the ID of a thread that could
        // not be synchronised: the filter was not installed.
        tid => Err(io::Error::other(format!(
            "thread {tid} could not be synchronised to the seccomp filter"
        ))),
    }
}
