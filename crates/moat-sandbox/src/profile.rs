//! The workload's seccomp profile in the sandbox tier. Three kinds of
//! syscall:
//! - [`ALLOWED`]: no pointer argument the kernel resolves as a path or an
//!   address, nothing that reaches beyond what the container holds; run by
//!   the kernel at full speed (the action cache skips the filter);
//! - [`NOTIFIED`]: sent to the supervisor, which decides on the arguments
//!   and brokers the operation (paths) or lets a value-only call continue;
//! - [`DENIED`]: fail with EPERM; anything else fails with ENOSYS (as on an
//!   older kernel, so libc falls back: `clone3` → `clone`).
use oci_spec::runtime::LinuxSeccomp;
use serde_json::{json, Value};

pub const ENOSYS: u32 = 38;
pub const EPERM: u32 = 1;

/// Allowed in the kernel, by group (the reason is the group's).
pub const ALLOWED: &[(&str, &[&str])] = &[
    (
        "I/O on descriptors the workload already holds (the broker decided when it opened them)",
        &[
            "read",
            "write",
            "readv",
            "writev",
            "pread64",
            "pwrite64",
            "preadv",
            "pwritev",
            "preadv2",
            "pwritev2",
            "close",
            "close_range",
            "dup",
            "dup2",
            "dup3",
            "lseek",
            "fcntl",
            "flock",
            "fstat",
            "fstatfs",
            "ftruncate",
            "fallocate",
            "fadvise64",
            "readahead",
            "fsync",
            "fdatasync",
            "sync",
            "syncfs",
            "sync_file_range",
            "fchdir",
            "fchmod",
            "fchown",
            "fgetxattr",
            "fsetxattr",
            "flistxattr",
            "fremovexattr",
            "sendfile",
            "splice",
            "tee",
            "vmsplice",
            "copy_file_range",
            "inotify_init",
            "inotify_init1",
            "inotify_rm_watch",
            "getcwd",
        ],
    ),
    (
        "pipes, polling, events, timers, classic AIO, randomness",
        &[
            "pipe",
            "pipe2",
            "poll",
            "ppoll",
            "select",
            "pselect6",
            "epoll_create",
            "epoll_create1",
            "epoll_ctl",
            "epoll_wait",
            "epoll_pwait",
            "epoll_pwait2",
            "eventfd",
            "eventfd2",
            "futex",
            "futex_waitv",
            "nanosleep",
            "clock_nanosleep",
            "clock_gettime",
            "clock_getres",
            "gettimeofday",
            "time",
            "getitimer",
            "setitimer",
            "timer_create",
            "timer_settime",
            "timer_gettime",
            "timer_getoverrun",
            "timer_delete",
            "timerfd_create",
            "timerfd_settime",
            "timerfd_gettime",
            "io_setup",
            "io_destroy",
            "io_submit",
            "io_cancel",
            "io_getevents",
            "io_pgetevents",
            "getrandom",
        ],
    ),
    (
        "memory of the workload itself (bounded by its cgroup)",
        &[
            "brk",
            "mmap",
            "munmap",
            "mremap",
            "mprotect",
            "madvise",
            "mincore",
            "msync",
            "mlock",
            "mlock2",
            "munlock",
            "mlockall",
            "munlockall",
            "membarrier",
            "memfd_create",
            "remap_file_pages",
        ],
    ),
    (
        "its own lifetime, identity queries and signals (inside its PID and user namespaces)",
        &[
            "fork",
            "vfork",
            "exit",
            "exit_group",
            "wait4",
            "waitid",
            "getpid",
            "getppid",
            "gettid",
            "getpgid",
            "getpgrp",
            "setpgid",
            "getsid",
            "setsid",
            "getuid",
            "geteuid",
            "getgid",
            "getegid",
            "getresuid",
            "getresgid",
            "getgroups",
            "capget",
            "arch_prctl",
            "set_tid_address",
            "set_robust_list",
            "get_robust_list",
            "rseq",
            "restart_syscall",
            "getrlimit",
            "setrlimit",
            "prlimit64",
            "getrusage",
            "times",
            "getcpu",
            "kill",
            "tkill",
            "tgkill",
            "rt_sigaction",
            "rt_sigprocmask",
            "rt_sigreturn",
            "rt_sigpending",
            "rt_sigsuspend",
            "rt_sigtimedwait",
            "rt_sigqueueinfo",
            "rt_tgsigqueueinfo",
            "sigaltstack",
            "signalfd",
            "signalfd4",
            "pause",
            "alarm",
            "pidfd_open",
            "pidfd_send_signal",
            "seccomp",
            "landlock_create_ruleset",
            "landlock_add_rule",
            "landlock_restrict_self",
        ],
    ),
    (
        "sockets already created, calls that pass no address (the kernel \
         resolves none; received addresses are outputs)",
        &[
            "socketpair",
            "listen",
            "accept",
            "accept4",
            "getsockname",
            "getpeername",
            "getsockopt",
            "setsockopt",
            "shutdown",
            "recvfrom",
            "recvmsg",
            "recvmmsg",
        ],
    ),
    (
        "System V and POSIX IPC (the container's own IPC namespace)",
        &[
            "shmget",
            "shmat",
            "shmdt",
            "shmctl",
            "semget",
            "semop",
            "semtimedop",
            "semctl",
            "msgget",
            "msgsnd",
            "msgrcv",
            "msgctl",
            "mq_open",
            "mq_unlink",
            "mq_timedsend",
            "mq_timedreceive",
            "mq_notify",
            "mq_getsetattr",
        ],
    ),
    (
        "scheduling (limited by the cgroup)",
        &[
            "sched_yield",
            "sched_getparam",
            "sched_setparam",
            "sched_getscheduler",
            "sched_setscheduler",
            "sched_getattr",
            "sched_setattr",
            "sched_get_priority_max",
            "sched_get_priority_min",
            "sched_rr_get_interval",
            "getpriority",
            "setpriority",
            "ioprio_get",
            "ioprio_set",
        ],
    ),
];

/// Sent to the supervisor.
pub const NOTIFIED: &[(&str, &[&str])] = &[
    (
        "paths: brokered inside the container's root by the policy",
        &[
            "open",
            "openat",
            "openat2",
            "creat",
            "stat",
            "lstat",
            "newfstatat",
            "statx",
            "access",
            "faccessat",
            "faccessat2",
            "readlink",
            "readlinkat",
            "mkdir",
            "mkdirat",
            "rmdir",
            "unlink",
            "unlinkat",
            "rename",
            "renameat",
            "renameat2",
            "link",
            "linkat",
            "symlink",
            "symlinkat",
            "chmod",
            "fchmodat",
            "fchmodat2",
            "chown",
            "lchown",
            "fchownat",
            "utime",
            "utimes",
            "futimesat",
            "mknod",
            "mknodat",
            "truncate",
            "statfs",
            "getxattr",
            "lgetxattr",
            "setxattr",
            "lsetxattr",
            "listxattr",
            "llistxattr",
            "removexattr",
            "lremovexattr",
            "chdir",
            "inotify_add_watch",
        ],
    ),
    (
        "umask: the supervisor creates names with the caller's umask, cached \
         with its credentials until the process changes it",
        &["umask"],
    ),
    (
        "sched_setaffinity: run by the kernel; the supervisor stops narrowing \
         threads to its CPU while it hands them descriptors",
        &["sched_setaffinity"],
    ),
    (
        "exec: the path checked by the policy, held in the kernel by Landlock",
        &["execve", "execveat"],
    ),
    (
        "credential changes: the supervisor's view of the caller's \
         credentials is dropped before the kernel runs them",
        &[
            "setuid",
            "setgid",
            "setreuid",
            "setregid",
            "setresuid",
            "setresgid",
            "setgroups",
            "setfsuid",
            "setfsgid",
            "capset",
        ],
    ),
    ("options decided on their values", &["prctl", "socket"]),
    (
        "socket addresses: decided, and the call carried out by the supervisor \
         on the workload's socket with the address it copied",
        &["connect", "bind", "sendmsg", "sendmmsg"],
    ),
    (
        "directory listings: read by the supervisor, names the policy hides \
         left out",
        &["getdents", "getdents64"],
    ),
    (
        "the machine as the sandbox shows it: emulated",
        &["uname", "sysinfo", "sched_getaffinity"],
    ),
];

/// Refused with EPERM, by reason.
pub const DENIED: &[(&str, &[&str])] = &[
    (
        "kernel surfaces that bypass or outlive the filter",
        &[
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "userfaultfd",
            "bpf",
            "perf_event_open",
            "keyctl",
            "add_key",
            "request_key",
        ],
    ),
    (
        "host administration",
        &[
            "init_module",
            "finit_module",
            "delete_module",
            "create_module",
            "kexec_load",
            "kexec_file_load",
            "swapon",
            "swapoff",
            "acct",
            "quotactl",
            "quotactl_fd",
            "reboot",
            "sethostname",
            "setdomainname",
            "syslog",
            "iopl",
            "ioperm",
            "vhangup",
            "lookup_dcookie",
            "nfsservctl",
            "uselib",
            "ustat",
            "sysfs",
            "_sysctl",
            "clock_settime",
            "settimeofday",
            "adjtimex",
            "clock_adjtime",
        ],
    ),
    (
        "mounts and namespaces",
        &[
            "mount",
            "umount",
            "umount2",
            "pivot_root",
            "chroot",
            "move_mount",
            "open_tree",
            "fsopen",
            "fsmount",
            "fsconfig",
            "fspick",
            "mount_setattr",
            "unshare",
            "setns",
        ],
    ),
    (
        "other processes' memory and descriptors",
        &[
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
        ],
    ),
    (
        "paths the broker cannot carry out",
        &[
            "name_to_handle_at",
            "open_by_handle_at",
            "fanotify_init",
            "fanotify_mark",
        ],
    ),
];

/// Requests `ioctl` may make in the kernel: terminals, non-blocking and
/// close-on-exec flags, bytes pending, and the read-only `SIOCGIF*`
/// queries about a network device (of the sandbox's own network namespace:
/// `ip link`, `ifconfig`). Anything else fails with ENOSYS.
pub const IOCTLS: &[(&str, u64)] = &[
    ("TCGETS", 0x5401),
    ("TCSETS", 0x5402),
    ("TCSETSW", 0x5403),
    ("TCSETSF", 0x5404),
    ("TCSBRK", 0x5409),
    ("TCXONC", 0x540A),
    ("TCFLSH", 0x540B),
    ("TIOCGPGRP", 0x540F),
    ("TIOCSPGRP", 0x5410),
    ("TIOCOUTQ", 0x5411),
    ("TIOCGWINSZ", 0x5413),
    ("TIOCSWINSZ", 0x5414),
    ("FIONREAD", 0x541B),
    ("FIONBIO", 0x5421),
    ("TIOCGSID", 0x5429),
    ("TIOCGPTN", 0x80045430),
    ("TIOCSPTLCK", 0x40045431),
    ("TIOCGPTPEER", 0x5441),
    ("FIONCLEX", 0x5450),
    ("FIOCLEX", 0x5451),
    ("FIOASYNC", 0x5452),
    ("TCGETS2", 0x802C542A),
    ("TCSETS2", 0x402C542B),
    ("SIOCGIFCONF", 0x8912),
    ("SIOCGIFFLAGS", 0x8913),
    ("SIOCGIFINDEX", 0x8933),
    ("SIOCGIFNAME", 0x8910),
    ("SIOCGIFMTU", 0x8921),
    ("SIOCGIFADDR", 0x8915),
    ("SIOCGIFDSTADDR", 0x8917),
    ("SIOCGIFBRDADDR", 0x8919),
    ("SIOCGIFNETMASK", 0x891b),
    ("SIOCGIFMETRIC", 0x891d),
    ("SIOCGIFHWADDR", 0x8927),
    ("SIOCGIFTXQLEN", 0x8942),
    ("SIOCGIFMAP", 0x8970),
    ("FS_IOC_GETFLAGS", 0x80086601),
];

/// `clone` flags that create namespaces: refused with EPERM.
pub const CLONE_NS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

/// personality(2) values allowed: PER_LINUX, PER_LINUX32, UNAME26, query.
pub const PERSONALITIES: &[u64] = &[0, 0x8, 0x20000, 0xffff_ffff];

/// The profile, listening on `listener`.
pub fn profile(listener: &std::path::Path) -> LinuxSeccomp {
    let mut syscalls: Vec<Value> = Vec::new();
    fn names(groups: &[(&str, &[&'static str])]) -> Vec<&'static str> {
        groups.iter().flat_map(|(_, n)| n.iter().copied()).collect()
    }
    syscalls.push(json!({"names": names(ALLOWED), "action": "SCMP_ACT_ALLOW"}));
    syscalls.push(json!({"names": names(NOTIFIED), "action": "SCMP_ACT_NOTIFY"}));
    syscalls.push(json!({"names": names(DENIED), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}));
    // clone: in the kernel unless it asks for a new namespace (EPERM),
    // decided on its flags by the filter itself: no round trip per fork or
    // thread. A process that shares its umask with another (CLONE_FS
    // without CLONE_THREAD, which no libc's fork, thread or spawn does) is
    // told to the supervisor, which then stops trusting cached umasks.
    let fs = libc::CLONE_FS as u64;
    let thread = libc::CLONE_THREAD as u64;
    syscalls.push(json!({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 0, "value": CLONE_NS | fs, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}));
    syscalls.push(json!({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 0, "value": CLONE_NS | fs | thread, "valueTwo": fs | thread,
                  "op": "SCMP_CMP_MASKED_EQ"}]}));
    syscalls.push(json!({"names": ["clone"], "action": "SCMP_ACT_NOTIFY",
        "args": [{"index": 0, "value": CLONE_NS | fs | thread, "valueTwo": fs,
                  "op": "SCMP_CMP_MASKED_EQ"}]}));
    for bit in (0..64).map(|b| 1u64 << b).filter(|b| CLONE_NS & b != 0) {
        syscalls.push(
            json!({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
            "args": [{"index": 0, "value": bit, "valueTwo": bit, "op": "SCMP_CMP_MASKED_EQ"}]}),
        );
    }
    // sendto without an address (send(2)) passes nothing to decide.
    syscalls.push(json!({"names": ["sendto"], "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 4, "value": 0, "op": "SCMP_CMP_EQ"}]}));
    syscalls.push(json!({"names": ["sendto"], "action": "SCMP_ACT_NOTIFY",
        "args": [{"index": 4, "value": 0, "op": "SCMP_CMP_NE"}]}));
    // utimensat on a descriptor (no path) is futimens.
    syscalls.push(json!({"names": ["utimensat"], "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}]}));
    syscalls.push(json!({"names": ["utimensat"], "action": "SCMP_ACT_NOTIFY",
        "args": [{"index": 1, "value": 0, "op": "SCMP_CMP_NE"}]}));
    for (_, req) in IOCTLS {
        syscalls.push(json!({"names": ["ioctl"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 1, "value": req, "op": "SCMP_CMP_EQ"}]}));
    }
    for p in PERSONALITIES {
        syscalls.push(json!({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": p, "op": "SCMP_CMP_EQ"}]}));
    }
    let doc = json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": ENOSYS,
        "listenerPath": listener,
        "syscalls": syscalls,
    });
    serde_json::from_value(doc).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_syscall_has_one_kind_and_compiles() {
        let mut seen = HashSet::new();
        for groups in [ALLOWED, NOTIFIED, DENIED] {
            for (_, names) in groups {
                for n in *names {
                    assert!(seen.insert(*n), "{n} listed twice");
                }
            }
        }
        for n in [
            "open",
            "execve",
            "ptrace",
            "clone3",
            "connect",
            "getdents64",
        ] {
            assert_eq!(seen.contains(n), n != "clone3", "{n}");
        }
        // Decided on its address argument by the profile itself.
        assert!(!seen.contains("sendto"));
        let p = profile(std::path::Path::new("/run/x.sock"));
        assert!(p.listener_path().is_some());
        let f = moat_jail::seccomp::compile(&p).unwrap();
        assert!(f.needs_notify());
    }
}
