//! Process creation with namespace flags, and process-wide syscalls without a
//! safe wrapper elsewhere.
use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// What a fork-like call returned in the calling process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// In the parent, with the child's PID (in the parent's PID namespace).
    Parent(i32),
    /// In the child.
    Child,
}

/// `clone(2)` used like `fork(2)`, with namespace flags (`CLONE_NEW*`) and
/// optionally `CLONE_PARENT` (the child becomes a sibling of the caller): the
/// child starts in the new namespaces, owned by the new user namespace when
/// `CLONE_NEWUSER` is among the flags, and is PID 1 of a new PID namespace
/// with `CLONE_NEWPID`. Exit signal is SIGCHLD.
///
/// # Safety
/// Same contract as `fork(2)` in a Rust program: the caller must be
/// single-threaded (or the child must only call async-signal-safe functions
/// until it execs or exits), and the child must never return into code that
/// assumes it is the original process (it should `_exit` or `exec`).
pub unsafe fn clone_fork(ns_flags: libc::c_int) -> io::Result<Forked> {
    let allowed = libc::CLONE_PARENT
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP
        | libc::CLONE_NEWTIME;
    if ns_flags & !allowed != 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let flags = libc::c_ulong::try_from(ns_flags | libc::SIGCHLD)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: raw clone with a NULL stack behaves as fork(2): the child gets a
    // copy-on-write copy of the address space and continues on its own copy of
    // the stack. No CLONE_VM, CLONE_SETTLS or tid pointers are passed, so
    // nothing is shared. The caller upholds fork's threading contract.
    let ret = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match ret {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => i32::try_from(pid)
            .map(Forked::Parent)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW)),
    }
}

/// Forks a child (with namespace flags and/or `CLONE_PARENT`) that runs `f`
/// and `_exit`s with its return value (101 if it panics); returns the child's
/// PID in the caller. `f` typically ends in `exec`.
///
/// # Safety
/// The calling process must be single-threaded: a raw clone skips glibc's
/// atfork handlers, so a lock (malloc's, stdio's) held by another thread at
/// the fork stays locked for ever in the child, which then deadlocks or
/// corrupts memory the first time it allocates. [`fork_single_threaded`]
/// checks this and is what the runtime calls; tests, which are
/// multi-threaded, use [`run_in_child`].
pub unsafe fn fork_with<F: FnOnce() -> i32>(flags: libc::c_int, f: F) -> io::Result<i32> {
    // SAFETY: the caller guarantees a single thread (fork's contract); the
    // child runs `f` and `_exit`s without unwinding into or returning to the
    // caller's frames.
    match unsafe { clone_fork(flags) }? {
        Forked::Child => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
            exit_now(code)
        }
        Forked::Parent(pid) => Ok(pid),
    }
}

/// Proof that the process holding it has one thread: made by
/// [`OneThread::check`] (which counts them) or handed to the child of a fork
/// (a forked child starts with one thread). It cannot leave its thread. Its
/// holder must not start a thread while it holds it: moat's runtime and
/// container-side processes never do.
#[derive(Debug)]
pub struct OneThread {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl OneThread {
    /// Counts this process's threads (field 20 of /proc/self/stat); with
    /// more than one, fails with `EDEADLK` (a fork then could deadlock).
    pub fn check() -> io::Result<OneThread> {
        let threads = thread_count()?;
        if threads != 1 {
            return Err(io::Error::new(
                io::ErrorKind::Deadlock,
                format!("the runtime process has {threads} threads; it must fork with one"),
            ));
        }
        Ok(OneThread {
            _not_send: std::marker::PhantomData,
        })
    }

    /// [`fork_with`]; the child gets its own proof, for forks of its own
    /// (after `setns` into another mount namespace, /proc may not show it).
    pub fn fork<F: FnOnce(OneThread) -> i32>(&self, flags: libc::c_int, f: F) -> io::Result<i32> {
        // SAFETY: `self` proves this process has one thread, and its holder
        // starts none; the child, a fork, has one thread too.
        unsafe {
            fork_with(flags, || {
                f(OneThread {
                    _not_send: std::marker::PhantomData,
                })
            })
        }
    }
}

/// Threads of this process, from /proc/self/stat.
pub fn thread_count() -> io::Result<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(17))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/self/stat"))
}

/// Sets the disposition of every catchable signal to its default
/// (`SIG_DFL`), as a process that was never told to ignore anything has:
/// `execve` keeps `SIG_IGN` dispositions, so a workload would otherwise
/// inherit the ones moat's own caller set (a shell's background job ignores
/// SIGINT and SIGQUIT, and then a workload's `trap … INT` never fires).
/// Signals that cannot be caught (SIGKILL, SIGSTOP) and numbers the kernel
/// refuses are skipped.
pub fn default_signal_dispositions() -> io::Result<()> {
    for sig in 1..libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: `sigaction` with a zeroed struct whose handler is SIG_DFL
        // installs no handler (no code of ours runs on delivery, so there
        // is no async-signal-safety to uphold), and reads only the struct,
        // which lives for the call; the old action is not requested.
        let rc = unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &act, std::ptr::null_mut())
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // Signals glibc keeps for itself (32, 33) are refused: skipped.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// `_exit(2)`: ends the process at once, without atexit handlers or
/// destructors (which belong to the process that forked us).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions and never returns.
    unsafe { libc::_exit(code) }
}

/// An `execve(2)` prepared in advance: the path, argument and environment
/// strings and their NULL-terminated pointer arrays are built by [`Exec::new`],
/// so [`Exec::exec`] allocates nothing and makes one syscall. It is the last
/// step after a seccomp filter that may allow nothing but `execve`.
#[derive(Debug)]
pub struct Exec {
    path: CString,
    // Own the strings the pointer arrays point into.
    _args: Vec<CString>,
    _env: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl Exec {
    pub fn new(path: CString, args: Vec<CString>, env: Vec<CString>) -> Exec {
        let ptrs = |v: &[CString]| -> Vec<*const libc::c_char> {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        let (argv, envp) = (ptrs(&args), ptrs(&env));
        Exec {
            path,
            _args: args,
            _env: env,
            argv,
            envp,
        }
    }

    /// Replaces this process's program; returns only on failure, with the
    /// errno (building the error allocates nothing).
    pub fn exec(&self) -> io::Error {
        // SAFETY: `path` is a NUL-terminated string, and `argv`/`envp` are
        // NULL-terminated arrays of pointers into NUL-terminated strings
        // owned by `self` (a CString's bytes stay where they are when the
        // CString moves), all alive for the call. execve reads them and
        // either replaces the process or returns -1 without keeping them.
        unsafe { libc::execve(self.path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr()) };
        io::Error::last_os_error()
    }
}

/// Runs `f` in a forked child that first `unshare`s `ns_flags`, and returns
/// the child's wait status code (`f`'s return value, or 128+signal). For
/// tests and short helpers that need a real kernel effect in a throwaway
/// process. Uses glibc's `fork()` (not a raw clone) so its atfork handlers
/// make `malloc` safe in the child even when the caller is multi-threaded,
/// as a test harness is. With `CLONE_NEWPID`, `f` runs in a grandchild that
/// is PID 1 of the new namespace.
pub fn run_in_child<F: FnOnce() -> i32>(ns_flags: libc::c_int, f: F) -> io::Result<i32> {
    // SAFETY: fork(2) through glibc; the child only runs `f` (after unshare)
    // and `_exit`s, never returning into the caller's frames.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            // SAFETY: unshare only changes this (child) process's namespaces.
            if ns_flags != 0 && unsafe { libc::unshare(ns_flags) } != 0 {
                exit_now(126);
            }
            if ns_flags & libc::CLONE_NEWPID != 0 {
                // The new PID namespace applies to our children: run `f` in one.
                let code = run_in_child(0, f).unwrap_or(125);
                exit_now(code);
            }
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
            exit_now(code)
        }
        pid => wait_code(pid),
    }
}

fn wait_code(pid: i32) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: plain waitpid on our own child with a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        Ok(128 + libc::WTERMSIG(status))
    }
}

/// Closes every file descriptor from `first` upward (close_range(2)), or marks
/// them close-on-exec with `cloexec`.
pub fn close_from(first: u32, cloexec: bool) -> io::Result<()> {
    let flags = if cloexec {
        libc::CLOSE_RANGE_CLOEXEC
    } else {
        0
    };
    // SAFETY: close_range only affects this process's fd table; callers use it
    // right before exec, when no Rust object still owns those fds (or with
    // CLOEXEC, which leaves ownership intact).
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, flags) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Duplicates a raw descriptor number handed out by a C library that keeps
/// ownership of the original (libseccomp's notify fd), as a new close-on-exec
/// descriptor that the caller owns.
///
/// Duplicating a number that is not open fails with `EBADF`; it can never
/// touch memory or steal the original, which stays owned by whoever had it.
pub fn dup_raw_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) reads no memory; on a closed number it
    // fails with EBADF and the original descriptor is left untouched.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just created by fcntl and no other object refers to it,
    // so the OwnedFd is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// `struct sched_attr` of sched_setattr(2) (version 1, with the util-clamp
/// fields: 56 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SchedAttr {
    /// Filled in by [`sched_setattr`] / [`sched_getattr`].
    pub size: u32,
    /// `SCHED_OTHER` (0), `FIFO` (1), `RR` (2), `BATCH` (3), `IDLE` (5), `DEADLINE` (6).
    pub sched_policy: u32,
    /// `SCHED_FLAG_*`.
    pub sched_flags: u64,
    /// Nice value for `SCHED_OTHER` / `SCHED_BATCH`.
    pub sched_nice: i32,
    /// Static priority for `SCHED_FIFO` / `SCHED_RR`.
    pub sched_priority: u32,
    /// `SCHED_DEADLINE` runtime, in nanoseconds.
    pub sched_runtime: u64,
    /// `SCHED_DEADLINE` deadline, in nanoseconds.
    pub sched_deadline: u64,
    /// `SCHED_DEADLINE` period, in nanoseconds.
    pub sched_period: u64,
    /// Utilisation clamp minimum (with `SCHED_FLAG_UTIL_CLAMP_MIN`).
    pub sched_util_min: u32,
    /// Utilisation clamp maximum (with `SCHED_FLAG_UTIL_CLAMP_MAX`).
    pub sched_util_max: u32,
}

const SCHED_ATTR_SIZE: u32 = std::mem::size_of::<SchedAttr>() as u32;

/// sched_setattr(2) on `pid` (0: the calling thread). `attr.size` is set here.
pub fn sched_setattr(pid: i32, attr: &SchedAttr) -> io::Result<()> {
    let attr = SchedAttr {
        size: SCHED_ATTR_SIZE,
        ..*attr
    };
    // SAFETY: `attr` is a live, fully initialised repr(C) sched_attr whose
    // `size` field equals its real size, so the kernel reads only inside it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            pid,
            &attr as *const SchedAttr,
            0u32,
        )
    };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// sched_getattr(2) on `pid` (0: the calling thread).
pub fn sched_getattr(pid: i32) -> io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    // SAFETY: the kernel writes at most `SCHED_ATTR_SIZE` bytes, the size of
    // the live, writable `attr`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            pid,
            &mut attr as *mut SchedAttr,
            SCHED_ATTR_SIZE,
            0u32,
        )
    };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(attr)
    }
}

/// `IOPRIO_WHO_PROCESS` for [`ioprio_set`] / [`ioprio_get`].
pub const IOPRIO_WHO_PROCESS: i32 = 1;

/// ioprio_set(2): `ioprio` is `class << 13 | data`.
pub fn ioprio_set(which: i32, who: i32, ioprio: i32) -> io::Result<()> {
    // SAFETY: ioprio_set takes only integers and touches no user memory.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_set, which, who, ioprio) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// ioprio_get(2): returns `class << 13 | data`.
pub fn ioprio_get(which: i32, who: i32) -> io::Result<i32> {
    // SAFETY: ioprio_get takes only integers and touches no user memory.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_get, which, who) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        i32::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
    }
}

/// personality(2): sets the execution domain and flags, returning the previous
/// persona. `0xffffffff` only queries. (nix's wrapper drops the domain bits,
/// such as `PER_LINUX32`, from what it returns.)
pub fn personality(persona: u32) -> io::Result<u32> {
    // SAFETY: personality takes one integer and touches no user memory.
    let r = unsafe { libc::personality(libc::c_ulong::from(persona)) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        u32::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
    }
}

/// keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL): gives the process a new,
/// anonymous session keyring, so a container does not share the runtime's.
pub fn join_session_keyring() -> io::Result<()> {
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
    // SAFETY: a NULL name is allowed and asks for an anonymous keyring; the
    // call only changes this process's keyring.
    let r = unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, 0usize) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The CPU the calling thread runs on (`sched_getcpu(3)`, libc's vDSO
/// call, set up at start: no lookup that a seccomp filter would have to
/// allow).
pub fn current_cpu() -> Option<usize> {
    // SAFETY: no arguments; returns the CPU number or -1.
    usize::try_from(unsafe { libc::sched_getcpu() }).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_exit_code_comes_back() {
        assert_eq!(run_in_child(0, || 7).unwrap(), 7);
    }

    #[test]
    fn sched_attr_is_version_1_size() {
        assert_eq!(SCHED_ATTR_SIZE, 56);
    }

    #[test]
    fn dup_raw_fd_of_closed_number_fails() {
        assert!(dup_raw_fd(-1).is_err());
    }

    #[test]
    fn personality_query_is_linux_by_default() {
        assert_eq!(personality(0xffff_ffff).unwrap() & 0xff, 0);
    }

    #[test]
    fn refuses_non_namespace_flags() {
        // SAFETY: the call fails before forking.
        let r = unsafe { clone_fork(libc::CLONE_VM) };
        assert!(r.is_err());
    }
}
