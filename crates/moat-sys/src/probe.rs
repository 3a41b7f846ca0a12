//! Raw syscalls for `moat probe`, each called so that it cannot change the
//! system: arguments that fail right after the kernel's permission check
//! (so the errno says whether the call was permitted), or a throwaway object
//! (a file descriptor) that is closed before the function returns.
//!
//! Every function returns `Ok` when the kernel accepted the call and the raw
//! `io::Error` otherwise; reading the errno is the caller's business (EPERM
//! from seccomp or a missing capability, ENOSYS from seccomp or an old
//! kernel, EINVAL/ENOENT/ENOEXEC past the permission check).
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How a bounded child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    /// `_exit(code)`.
    Exited(i32),
    /// Killed by this signal (not by us).
    Signaled(i32),
    /// Still running at the deadline: killed with SIGKILL and reaped.
    TimedOut,
}

/// Forks a child that runs `f` and `_exit`s with its return value (101 if it
/// panics), and waits at most `timeout` for it; a child still running then is
/// killed and reaped. The child dies with the parent (PR_SET_PDEATHSIG).
///
/// Uses glibc's `fork()`, whose atfork handlers keep `malloc` usable in the
/// child even if the caller has other threads.
pub fn fork_bounded<F: FnOnce() -> i32>(timeout: Duration, f: F) -> io::Result<ChildExit> {
    // SAFETY: fork(2); the child only runs `f` and `_exit`s, never returning
    // into the caller's frames or running its destructors.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a signal for this
            // process; a failure just means the child may outlive a killed
            // parent, which the parent's deadline still bounds.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
            crate::process::exit_now(code)
        }
        pid => wait_bounded(pid, timeout),
    }
}

fn wait_bounded(pid: libc::pid_t, timeout: Duration) -> io::Result<ChildExit> {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Ok(if libc::WIFEXITED(status) {
                ChildExit::Exited(libc::WEXITSTATUS(status))
            } else {
                ChildExit::Signaled(libc::WTERMSIG(status))
            });
        }
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if start.elapsed() >= timeout {
            // SAFETY: `pid` is our unreaped child, so the PID cannot have been
            // reused by another process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: as above; blocking wait for the child we just killed.
            while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
            return Ok(ChildExit::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A child that sleeps until it is dropped (killed and reaped then) or until
/// `max` has passed: a target for the ptrace and process_vm_readv attempts.
#[derive(Debug)]
pub struct Sleeper {
    pid: libc::pid_t,
}

impl Sleeper {
    /// Forks the sleeping child.
    pub fn spawn(max: Duration) -> io::Result<Self> {
        // SAFETY: fork(2); the child only sleeps and `_exit`s.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                // SAFETY: only sets this process's parent-death signal.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
                std::thread::sleep(max);
                crate::process::exit_now(0)
            }
            pid => Ok(Self { pid }),
        }
    }

    /// The child's PID.
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        // SAFETY: `pid` is our child and has not been reaped (only this Drop
        // reaps it), so it still names that process.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let mut status = 0;
        // SAFETY: blocking wait for our own child with a valid out-pointer.
        while unsafe { libc::waitpid(self.pid, &mut status, 0) } < 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
        {}
    }
}

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Closes a descriptor the kernel just returned.
fn close_ret(r: libc::c_long) -> io::Result<()> {
    let r = check(r)?;
    let fd = libc::c_int::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned `fd` as a new descriptor that nothing
    // else in this process owns; dropping the OwnedFd closes it.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, create=0): reads
/// the session keyring's serial without creating one.
pub fn keyctl_session_keyring_id() -> io::Result<i64> {
    const KEYCTL_GET_KEYRING_ID: libc::c_long = 0;
    const KEY_SPEC_SESSION_KEYRING: libc::c_long = -3;
    // SAFETY: a pure query with integer arguments; create=0 allocates nothing.
    let r = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_GET_KEYRING_ID,
            KEY_SPEC_SESSION_KEYRING,
            0 as libc::c_long,
        )
    };
    check(r)
}

/// add_key("user", …) into a keyring serial that does not exist: ENOKEY means
/// the syscall is reachable (seccomp would answer EPERM or ENOSYS first), and
/// no key is created.
pub fn add_key_to_absent_keyring() -> io::Result<()> {
    const ABSENT_KEYRING: libc::c_long = 0x7fff_fff1;
    let ty = c"user";
    let desc = c"moat-probe";
    let payload = [0u8; 1];
    // SAFETY: `ty` and `desc` are NUL-terminated and outlive the call;
    // `payload` is a valid 1-byte buffer; the target keyring does not exist,
    // so the kernel fails the lookup before instantiating anything.
    let r = unsafe {
        libc::syscall(
            libc::SYS_add_key,
            ty.as_ptr(),
            desc.as_ptr(),
            payload.as_ptr(),
            1usize,
            ABSENT_KEYRING,
        )
    };
    check(r).map(drop)
}

/// bpf(BPF_MAP_CREATE) of a one-entry array map, closed at once.
pub fn bpf_map_create() -> io::Result<()> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let mut attr = [0u32; 30];
    attr[0] = BPF_MAP_TYPE_ARRAY;
    attr[1] = 4; // key_size
    attr[2] = 4; // value_size
    attr[3] = 1; // max_entries
                 // SAFETY: `attr` is a zero-filled buffer laid out as the map-create part
                 // of `union bpf_attr`, of exactly the size passed; the kernel only reads it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    close_ret(r)
}

/// bpf(BPF_PROG_LOAD) of a two-instruction socket filter (`r0 = 0; exit`),
/// closed at once; it is never attached.
pub fn bpf_prog_load_socket_filter() -> io::Result<()> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_SOCKET_FILTER: u64 = 1;
    // mov64 r0, 0 ; exit
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    let mut attr = [0u64; 16];
    attr[0] = BPF_PROG_TYPE_SOCKET_FILTER | (2 << 32); // prog_type, insn_cnt
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    // SAFETY: `attr` is laid out as the prog-load part of `union bpf_attr`
    // (prog_type, insn_cnt, insns, license; the rest zero), and `insns` and
    // `license` outlive the call; no log buffer is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    close_ret(r)
}

/// perf_event_open of a disabled, user-space-only software counter on the
/// calling thread, closed at once.
pub fn perf_event_open_self() -> io::Result<()> {
    const PERF_TYPE_SOFTWARE: u32 = 1;
    const PERF_COUNT_SW_TASK_CLOCK: u64 = 1;
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
    // struct perf_event_attr, PERF_ATTR_SIZE_VER0 (64 bytes).
    let mut attr = [0u64; 8];
    attr[0] = u64::from(PERF_TYPE_SOFTWARE) | (64 << 32); // type, size
    attr[1] = PERF_COUNT_SW_TASK_CLOCK; // config
    attr[5] = 1 | (1 << 5) | (1 << 6); // disabled, exclude_kernel, exclude_hv
                                       // SAFETY: `attr` is a 64-byte perf_event_attr (size field says 64) that
                                       // outlives the call; pid 0 / cpu -1 means this thread only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_mut_ptr(),
            0,
            -1,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    close_ret(r)
}

/// userfaultfd(2) (user-mode faults only where the kernel knows the flag),
/// closed at once.
pub fn userfaultfd() -> io::Result<()> {
    const UFFD_USER_MODE_ONLY: libc::c_int = 1;
    let base = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: integer flags only; the returned descriptor is closed.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, base | UFFD_USER_MODE_ONLY) };
    match close_ret(r) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // SAFETY: as above, without the flag older kernels reject.
            close_ret(unsafe { libc::syscall(libc::SYS_userfaultfd, base) })
        }
        other => other,
    }
}

/// io_uring_setup(0 entries): EINVAL past the io_uring_disabled sysctl and
/// seccomp, so no ring is ever created.
pub fn io_uring_setup_zero() -> io::Result<()> {
    let mut params = [0u8; 120];
    // SAFETY: `params` is a zero-filled, writable `struct io_uring_params`
    // (120 bytes); entries = 0 is rejected before anything is allocated.
    let r = unsafe { libc::syscall(libc::SYS_io_uring_setup, 0u32, params.as_mut_ptr()) };
    close_ret(r)
}

/// init_module with an empty image: EPERM without CAP_SYS_MODULE (or with
/// modules disabled), ENOEXEC past the permission check.
pub fn init_module_empty() -> io::Result<()> {
    let image = [0u8; 1];
    let params = c"";
    // SAFETY: `image` is a valid buffer; length 0 is shorter than an ELF
    // header, so the kernel refuses it before parsing anything.
    let r = unsafe {
        libc::syscall(
            libc::SYS_init_module,
            image.as_ptr(),
            0usize,
            params.as_ptr(),
        )
    };
    check(r).map(drop)
}

/// finit_module(-1): EPERM without permission, EBADF past it.
pub fn finit_module_bad_fd() -> io::Result<()> {
    let params = c"";
    // SAFETY: fd -1 is never a valid descriptor; the string is NUL-terminated.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, -1, params.as_ptr(), 0) };
    check(r).map(drop)
}

/// delete_module of a name no module has: EPERM without permission, ENOENT
/// past it.
pub fn delete_module_absent() -> io::Result<()> {
    let name = c"moat_probe_no_such_module";
    // SAFETY: NUL-terminated name of a module that does not exist;
    // O_NONBLOCK so the call never waits.
    let r = unsafe { libc::syscall(libc::SYS_delete_module, name.as_ptr(), libc::O_NONBLOCK) };
    check(r).map(drop)
}

/// kexec_load with more segments than the kernel allows: EPERM without
/// CAP_SYS_BOOT, EINVAL past it.
pub fn kexec_load_invalid() -> io::Result<()> {
    // SAFETY: a NULL segment array with nr_segments above KEXEC_SEGMENT_MAX
    // (16) is rejected before the kernel reads the array.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kexec_load,
            0usize,
            1000usize,
            std::ptr::null::<u8>(),
            0usize,
        )
    };
    check(r).map(drop)
}

/// reboot(2) with wrong magic numbers: EPERM without CAP_SYS_BOOT (in the PID
/// namespace's user namespace), EINVAL past it. The magic check is the
/// kernel's own guard against accidental reboots.
pub fn reboot_bad_magic() -> io::Result<()> {
    // SAFETY: magic1 = 0 is never LINUX_REBOOT_MAGIC1, so the kernel returns
    // before looking at cmd.
    let r = unsafe { libc::syscall(libc::SYS_reboot, 0, 0, 0, std::ptr::null::<u8>()) };
    check(r).map(drop)
}

/// open_by_handle_at with a bogus 8-byte handle on `mount_fd`: EPERM when
/// the caller may not decode file handles (CAP_DAC_READ_SEARCH, the
/// "shocker" escape), ESTALE past that check (no inode has that handle). Any
/// file it did open would be read-only and is closed at once.
pub fn open_by_handle_at_bogus(mount_fd: BorrowedFd<'_>) -> io::Result<()> {
    // struct file_handle { u32 handle_bytes; int handle_type; u8 f_handle[8]; }
    let mut handle = [8u32, 0xff, 0, 0];
    // SAFETY: `handle` is a writable file_handle whose handle_bytes (8)
    // matches the bytes that follow it; `mount_fd` is a live descriptor; the
    // flags ask for a read-only, close-on-exec open.
    let r = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_raw_fd(),
            handle.as_mut_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    close_ret(r)
}

/// adjtimex(ADJ_TICK, tick = 0): EPERM without CAP_SYS_TIME, EINVAL past it;
/// the clock is never touched.
pub fn adjtimex_invalid_tick() -> io::Result<()> {
    const ADJ_TICK: libc::c_uint = 0x4000;
    // SAFETY: `timex` is plain old data; all-zero is a valid value.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    tx.modes = ADJ_TICK;
    tx.tick = 0;
    // SAFETY: `tx` is a valid, writable struct timex; tick 0 is out of range
    // so the kernel refuses the change.
    let r = unsafe { libc::adjtimex(&mut tx) };
    check(libc::c_long::from(r)).map(drop)
}

/// swapon of a path that does not exist: EPERM without CAP_SYS_ADMIN, ENOENT
/// past it.
pub fn swapon_absent() -> io::Result<()> {
    let path = c"/nonexistent/moat-probe-swap";
    // SAFETY: NUL-terminated path to nothing; no swap is ever enabled.
    let r = unsafe { libc::syscall(libc::SYS_swapon, path.as_ptr(), 0) };
    check(r).map(drop)
}

/// fanotify_init for a notification group (needs CAP_SYS_ADMIN without
/// FID reporting), closed at once; no mark is ever added.
pub fn fanotify_init_notif() -> io::Result<()> {
    const FAN_CLOEXEC: libc::c_uint = 1;
    const FAN_CLASS_NOTIF: libc::c_uint = 0;
    // SAFETY: integer arguments; the returned descriptor is closed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fanotify_init,
            FAN_CLASS_NOTIF | FAN_CLOEXEC,
            libc::O_RDONLY,
        )
    };
    close_ret(r)
}

/// ioperm(0x80, 1, on): grants this process access to I/O port 0x80 when it
/// holds CAP_SYS_RAWIO. Only call it in a throwaway child.
#[cfg(target_arch = "x86_64")]
pub fn ioperm_port80() -> io::Result<()> {
    // SAFETY: only changes this process's I/O permission bitmap; nothing is
    // read from or written to the port.
    let r = unsafe { libc::ioperm(0x80, 1, 1) };
    check(libc::c_long::from(r)).map(drop)
}

/// The Landlock ABI version (landlock_create_ruleset with
/// LANDLOCK_CREATE_RULESET_VERSION), which creates no ruleset.
pub fn landlock_abi_version() -> io::Result<i64> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with the VERSION flag the kernel requires a NULL attr and size
    // 0 and only returns a number.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    check(r)
}

/// syslog(SYSLOG_ACTION_SIZE_BUFFER): the kernel log buffer size, if the
/// caller may read the kernel log.
pub fn syslog_size() -> io::Result<i64> {
    const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: this action takes no buffer.
    let r = unsafe {
        libc::syscall(
            libc::SYS_syslog,
            SYSLOG_ACTION_SIZE_BUFFER,
            std::ptr::null_mut::<u8>(),
            0,
        )
    };
    check(r)
}

/// syslog(SYSLOG_ACTION_READ_ALL): up to `max` bytes of the kernel log,
/// without consuming it.
pub fn syslog_read_all(max: usize) -> io::Result<Vec<u8>> {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    let len = libc::c_int::try_from(max).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut buf = vec![0u8; max];
    // SAFETY: `buf` is writable for `len` bytes and outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_syslog,
            SYSLOG_ACTION_READ_ALL,
            buf.as_mut_ptr(),
            len,
        )
    };
    let n = usize::try_from(check(r)?).unwrap_or(0);
    buf.truncate(n.min(max));
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_child_reports_exit_code() {
        assert_eq!(
            fork_bounded(Duration::from_secs(5), || 7).unwrap(),
            ChildExit::Exited(7)
        );
    }

    #[test]
    fn bounded_child_is_killed_at_deadline() {
        let r = fork_bounded(Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_secs(30));
            0
        })
        .unwrap();
        assert_eq!(r, ChildExit::TimedOut);
    }

    #[test]
    fn landlock_version_query_answers() {
        // Either a version (>= 1) or an errno; never a ruleset fd of 0.
        if let Ok(v) = landlock_abi_version() {
            assert!(v >= 1);
        }
    }

    #[test]
    fn io_uring_zero_entries_never_creates_a_ring() {
        let e = io_uring_setup_zero().unwrap_err();
        assert!(
            matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::EPERM | libc::ENOSYS)
            ),
            "{e}"
        );
    }

    #[test]
    fn delete_absent_module_fails() {
        let e = delete_module_absent().unwrap_err();
        // ENOSYS on kernels built without module support.
        assert!(
            matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::EPERM | libc::ENOSYS)
            ),
            "{e}"
        );
    }
}
