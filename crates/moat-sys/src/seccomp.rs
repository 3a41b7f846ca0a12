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
    if flags & !ALLOWED_FLAGS != 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    match raw_set_mode_filter(flags, prog)? {
        0 => Ok(()),
        // With TSYNC, a positive result is the ID of a thread that could
        // not be synchronised: the filter was not installed.
        tid => Err(io::Error::other(format!(
            "thread {tid} could not be synchronised to the seccomp filter"
        ))),
    }
}

/// The syscall itself, for flags the caller checked: its non-negative
/// result (0, a thread ID with TSYNC, or a new listener's fd number with
/// NEW_LISTENER, which the caller must own at once). `EINVAL` for a program
/// that is empty or longer than `BPF_MAXINSNS`.
fn raw_set_mode_filter(flags: libc::c_ulong, prog: &[SockFilter]) -> io::Result<libc::c_long> {
    let max = usize::try_from(libc::BPF_MAXINSNS).unwrap_or(0);
    if prog.is_empty() || prog.len() > max {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let len = u16::try_from(prog.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let fprog = libc::sock_fprog {
        len,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `len` initialised instructions borrowed from
    // `prog`, which outlives the call; the kernel copies the program and
    // does not keep the pointer, nor write through it. A file descriptor it
    // may return (NEW_LISTENER) is the caller's to own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The flags [`set_mode_filter_listener`] passes on besides the
/// `SECCOMP_FILTER_FLAG_NEW_LISTENER` it adds: [`ALLOWED_FLAGS`],
/// `SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV` (which needs a listener) and
/// `SECCOMP_FILTER_FLAG_TSYNC_ESRCH` (which the kernel requires with TSYNC
/// and a listener).
pub const LISTENER_FLAGS: libc::c_ulong = ALLOWED_FLAGS
    | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    | libc::SECCOMP_FILTER_FLAG_TSYNC_ESRCH;

/// `seccomp(SECCOMP_SET_MODE_FILTER, flags | NEW_LISTENER, &prog)`: as
/// [`set_mode_filter`], for a program with `SECCOMP_RET_USER_NOTIF`
/// returns; hands back the filter's listener (the kernel makes it
/// close-on-exec). With TSYNC it adds `TSYNC_ESRCH`, as the kernel asks:
/// a thread that cannot be synchronised is then `ESRCH`.
pub fn set_mode_filter_listener(
    flags: libc::c_ulong,
    prog: &[SockFilter],
) -> io::Result<std::os::fd::OwnedFd> {
    if flags & !LISTENER_FLAGS != 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut flags = flags | libc::SECCOMP_FILTER_FLAG_NEW_LISTENER;
    if flags & libc::SECCOMP_FILTER_FLAG_TSYNC != 0 {
        flags |= libc::SECCOMP_FILTER_FLAG_TSYNC_ESRCH;
    }
    let r = raw_set_mode_filter(flags, prog)?;
    let fd = i32::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: with NEW_LISTENER a non-negative result is the listener the
    // kernel just made for this call; nothing else owns it.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// The line [`exit_on_trap`] writes before the syscall number.
static TRAP_PREFIX: std::sync::atomic::AtomicPtr<u8> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
static TRAP_PREFIX_LEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Exit status of a process that [`exit_on_trap`] ended: 128 + SIGSYS, as
/// if the signal had killed it.
pub const TRAP_EXIT: i32 = 128 + libc::SIGSYS;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only async-signal-safe steps: atomics, a stack buffer, write, _exit.
    let mut line = [0u8; 160];
    let mut len = 0;
    let prefix = TRAP_PREFIX.load(std::sync::atomic::Ordering::Acquire);
    let plen = TRAP_PREFIX_LEN
        .load(std::sync::atomic::Ordering::Acquire)
        .min(line.len() - 16);
    if !prefix.is_null() {
        // SAFETY: `prefix` and `plen` come from a `&'static [u8]` stored by
        // `exit_on_trap` (its length first, then the pointer, both with
        // release ordering; read here pointer first with acquire), so the
        // bytes are live for the whole program and `plen` does not exceed
        // them; `line` has room for `plen` bytes.
        let p = unsafe { std::slice::from_raw_parts(prefix, plen) };
        line[..plen].copy_from_slice(p);
        len = plen;
    }
    // struct siginfo for SIGSYS (include/uapi/asm-generic/siginfo.h):
    // si_signo, si_errno, si_code (3 ints, padded to 16 bytes on 64-bit),
    // then _call_addr (a pointer) and _syscall (an int) at byte 24.
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a live `siginfo_t` (128 bytes) to an
        // SA_SIGINFO handler; byte 24 is inside it and 4-byte aligned (the
        // structure is 8-byte aligned), and for SIGSYS it holds the number
        // of the trapped syscall.
        unsafe { info.cast::<u8>().add(24).cast::<i32>().read() }
    };
    let mut digits = [0u8; 12];
    let mut n = i64::from(nr).unsigned_abs();
    let mut d = digits.len();
    loop {
        d -= 1;
        digits[d] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || d == 1 {
            break;
        }
    }
    if nr < 0 {
        d -= 1;
        digits[d] = b'-';
    }
    for b in digits[d..].iter().chain(b"\n") {
        line[len] = *b;
        len += 1;
    }
    // SAFETY: `line[..len]` is initialised and lives across the call; the
    // result is deliberately ignored, as nothing can be done about it in a
    // handler that ends the process next.
    unsafe { libc::write(2, line.as_ptr().cast(), len) };
    // SAFETY: _exit has no preconditions and never returns.
    unsafe { libc::_exit(TRAP_EXIT) }
}

/// For a process whose own seccomp filter answers what it does not allow
/// with `SECCOMP_RET_TRAP`: installs a SIGSYS handler that writes `prefix`
/// and the syscall's number to stderr as one line, and ends the process
/// with [`TRAP_EXIT`]. The process still dies (fail closed), but says why.
pub fn exit_on_trap(prefix: &'static [u8]) -> io::Result<()> {
    TRAP_PREFIX_LEN.store(prefix.len(), std::sync::atomic::Ordering::Release);
    TRAP_PREFIX.store(
        prefix.as_ptr().cast_mut(),
        std::sync::atomic::Ordering::Release,
    );
    // SAFETY: an all-zero `sigaction` is a valid value (no handler, empty
    // mask, no flags) that is filled in below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigsys;
    sa.sa_sigaction = handler as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `sa.sa_mask` is a live sigset_t owned by `sa`.
    unsafe { libc::sigfillset(&mut sa.sa_mask) };
    // SAFETY: `sa` is a live, initialised sigaction whose handler has the
    // SA_SIGINFO signature and only makes async-signal-safe calls; the old
    // action is not asked for (null).
    let r = unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
