//! moat's default seccomp profile for `moat run`: an allow-list. Anything
//! not listed fails with ENOSYS (so programs and libc fall back as they do on
//! an older kernel); the dangerous calls listed in [`DENIED`] fail with
//! EPERM. docs/seccomp.md gives the reason for every entry; a test keeps the
//! two in step.
use oci_spec::runtime::LinuxSeccomp;
use serde_json::{json, Value};

pub const ENOSYS: u32 = 38;
pub const EPERM: u32 = 1;

/// Namespace-creating clone flags: CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC,
/// NEWUSER, NEWPID, NEWNET. (CLONE_NEWTIME shares its bit with the exit
/// signal in clone(2); it exists only for clone3 and unshare, both denied.)
pub const CLONE_NS_MASK: u64 =
    0x0002_0000 | 0x0200_0000 | 0x0400_0000 | 0x0800_0000 | 0x1000_0000 | 0x2000_0000 | 0x4000_0000;

/// personality(2) values allowed: PER_LINUX, PER_LINUX32 (0x8),
/// UNAME26 (0x20000) and the query 0xffffffff.
pub const PERSONALITIES: &[u64] = &[0, 0x8, 0x20000, 0xffff_ffff];

/// Socket address families `socket(2)` may create: AF_UNIX, AF_INET,
/// AF_INET6, AF_NETLINK (routing and address queries, e.g. getaddrinfo's)
/// and AF_PACKET (which the kernel still gates on CAP_NET_RAW).
pub const SOCKET_FAMILIES: &[u64] = &[1, 2, 10, 16, 17];

/// Families above the last one this profile knows fail too; below it,
/// every family not in [`SOCKET_FAMILIES`] gets EAFNOSUPPORT (AF_VSOCK,
/// AF_ALG, AF_KEY, AF_BLUETOOTH, AF_TIPC, AF_RDS, AF_CAN, AF_XDP…: kernel
/// code a container rarely needs and exploits often reach).
pub const SOCKET_FAMILY_MAX: u64 = 45;
pub const EAFNOSUPPORT: u32 = 97;

/// Allowed without conditions, grouped by purpose.
pub const ALLOWED: &[(&str, &[&str])] = &[
    (
        "process lifetime and identity (inside the user namespace only)",
        &[
            "execve",
            "execveat",
            "exit",
            "exit_group",
            "fork",
            "vfork",
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
            "setuid",
            "setgid",
            "setreuid",
            "setregid",
            "setresuid",
            "setresgid",
            "setgroups",
            "setfsuid",
            "setfsgid",
            "capget",
            "capset",
            "prctl",
            "arch_prctl",
            "set_tid_address",
            "set_robust_list",
            "get_robust_list",
            "rseq",
            "restart_syscall",
            "uname",
            "sysinfo",
            "getrlimit",
            "setrlimit",
            "prlimit64",
            "getrusage",
            "times",
            "umask",
            "getcpu",
            "get_thread_area",
            "set_thread_area",
            "seccomp",
            "landlock_create_ruleset",
            "landlock_add_rule",
            "landlock_restrict_self",
            "pidfd_open",
            "pidfd_send_signal",
        ],
    ),
    (
        "signals",
        &[
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
        ],
    ),
    (
        "memory",
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
        "files and directories (the mount table is fixed; permissions still apply)",
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
            "open",
            "openat",
            "openat2",
            "creat",
            "close",
            "close_range",
            "dup",
            "dup2",
            "dup3",
            "lseek",
            "fcntl",
            "flock",
            "ioctl",
            "stat",
            "fstat",
            "lstat",
            "newfstatat",
            "statx",
            "statfs",
            "fstatfs",
            "access",
            "faccessat",
            "faccessat2",
            "getcwd",
            "chdir",
            "fchdir",
            "mkdir",
            "mkdirat",
            "rmdir",
            "rename",
            "renameat",
            "renameat2",
            "link",
            "linkat",
            "unlink",
            "unlinkat",
            "symlink",
            "symlinkat",
            "readlink",
            "readlinkat",
            "chmod",
            "fchmod",
            "fchmodat",
            "fchmodat2",
            "chown",
            "fchown",
            "fchownat",
            "lchown",
            "truncate",
            "ftruncate",
            "fallocate",
            "fadvise64",
            "readahead",
            "fsync",
            "fdatasync",
            "sync",
            "syncfs",
            "sync_file_range",
            "getdents",
            "getdents64",
            "utime",
            "utimes",
            "utimensat",
            "futimesat",
            "mknod",
            "mknodat",
            "getxattr",
            "lgetxattr",
            "fgetxattr",
            "setxattr",
            "lsetxattr",
            "fsetxattr",
            "listxattr",
            "llistxattr",
            "flistxattr",
            "removexattr",
            "lremovexattr",
            "fremovexattr",
            "sendfile",
            "splice",
            "tee",
            "vmsplice",
            "copy_file_range",
            "inotify_init",
            "inotify_init1",
            "inotify_add_watch",
            "inotify_rm_watch",
        ],
    ),
    (
        "pipes, polling, events, timers, classic AIO",
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
        "sockets (the network namespace decides what they reach)",
        &[
            "socketpair",
            "bind",
            "listen",
            "accept",
            "accept4",
            "connect",
            "getsockname",
            "getpeername",
            "getsockopt",
            "setsockopt",
            "shutdown",
            "sendto",
            "recvfrom",
            "sendmsg",
            "recvmsg",
            "sendmmsg",
            "recvmmsg",
        ],
    ),
    (
        "System V and POSIX IPC (in the container's own IPC namespace)",
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
        "scheduling (limited by the cgroup and rlimits)",
        &[
            "sched_yield",
            "sched_getaffinity",
            "sched_setaffinity",
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

/// Denied with EPERM: each a known route to the kernel's attack surface or
/// to host state. (Most also need a capability the container lacks; the
/// filter holds even if one were added.)
pub const DENIED: &[(&str, &[&str])] = &[
    (
        "io_uring: a large, often-exploited kernel surface that bypasses this filter",
        &["io_uring_setup", "io_uring_enter", "io_uring_register"],
    ),
    (
        "userfaultfd: stalls kernel page faults, a staple of exploit races",
        &["userfaultfd"],
    ),
    (
        "eBPF and perf: kernel code loading and kernel pointer leaks",
        &["bpf", "perf_event_open"],
    ),
    (
        "kernel keyrings: not namespaced by the user namespace alone",
        &["keyctl", "add_key", "request_key"],
    ),
    (
        "kernel modules and kexec",
        &[
            "init_module",
            "finit_module",
            "delete_module",
            "create_module",
            "kexec_load",
            "kexec_file_load",
        ],
    ),
    (
        "mounts: the filesystem layout is fixed at start",
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
        ],
    ),
    (
        "new namespaces: would re-grant capabilities in a nested user namespace",
        &["unshare", "setns"],
    ),
    (
        "tracing other processes",
        &[
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "kcmp",
            "pidfd_getfd",
        ],
    ),
    (
        "clocks: host-wide time",
        &["clock_settime", "settimeofday", "adjtimex", "clock_adjtime"],
    ),
    (
        "host administration",
        &[
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
            "vm86",
            "vm86old",
        ],
    ),
    (
        "file handles: open_by_handle_at walks past the mount root",
        &["open_by_handle_at", "name_to_handle_at"],
    ),
    (
        "fanotify: watches whole mounts and filesystems",
        &["fanotify_init", "fanotify_mark"],
    ),
];

/// The profile as an OCI seccomp object.
pub fn profile() -> LinuxSeccomp {
    serde_json::from_value(profile_json()).expect("the built-in seccomp profile is valid")
}

/// The profile as config.json's `linux.seccomp`.
pub fn profile_json() -> Value {
    let allowed: Vec<&str> = ALLOWED
        .iter()
        .flat_map(|(_, n)| n.iter().copied())
        .collect();
    let denied: Vec<&str> = DENIED.iter().flat_map(|(_, n)| n.iter().copied()).collect();
    let mut syscalls = vec![
        json!({"names": allowed, "action": "SCMP_ACT_ALLOW"}),
        // clone without namespace flags.
        json!({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": CLONE_NS_MASK, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}),
        // clone3 passes its flags in memory a filter cannot read: ENOSYS
        // makes glibc fall back to clone, which the rule above checks.
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}),
        json!({"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}),
    ];
    // clone with any namespace flag: EPERM, one rule per flag.
    for bit in (0..64)
        .map(|b| 1u64 << b)
        .filter(|b| CLONE_NS_MASK & b != 0)
    {
        syscalls.push(
            json!({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
            "args": [{"index": 0, "value": bit, "valueTwo": bit, "op": "SCMP_CMP_MASKED_EQ"}]}),
        );
    }
    for f in SOCKET_FAMILIES {
        syscalls.push(json!({"names": ["socket"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": f, "op": "SCMP_CMP_EQ"}]}));
    }
    for f in (0..=SOCKET_FAMILY_MAX).filter(|f| !SOCKET_FAMILIES.contains(f)) {
        syscalls.push(
            json!({"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": EAFNOSUPPORT,
            "args": [{"index": 0, "value": f, "op": "SCMP_CMP_EQ"}]}),
        );
    }
    syscalls.push(
        json!({"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": EAFNOSUPPORT,
        "args": [{"index": 0, "value": SOCKET_FAMILY_MAX, "op": "SCMP_CMP_GT"}]}),
    );
    for p in PERSONALITIES {
        syscalls.push(json!({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": p, "op": "SCMP_CMP_EQ"}]}));
    }
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": ENOSYS,
        "syscalls": syscalls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn profile_parses_and_lists_are_disjoint() {
        let p = profile();
        assert_eq!(p.default_errno_ret(), Some(ENOSYS));
        let allowed: HashSet<&str> = ALLOWED
            .iter()
            .flat_map(|(_, n)| n.iter().copied())
            .collect();
        for (_, names) in DENIED {
            for n in *names {
                assert!(!allowed.contains(n), "{n} is both allowed and denied");
            }
        }
        for n in [
            "clone",
            "clone3",
            "personality",
            "socket",
            "io_uring_setup",
            "unshare",
            "mount",
        ] {
            assert!(
                !allowed.contains(n),
                "{n} must not be allowed unconditionally"
            );
        }
    }

    #[test]
    fn profile_compiles_with_libseccomp() {
        let p = profile();
        let f = moat_jail::seccomp::compile(&p).expect("compiles");
        assert!(f.rule_count() > 300);
    }

    #[test]
    fn docs_name_every_syscall() {
        let doc = include_str!("../../../../docs/seccomp.md");
        for (_, names) in ALLOWED.iter().chain(DENIED) {
            for n in *names {
                assert!(
                    doc.contains(&format!("`{n}`")),
                    "docs/seccomp.md does not name `{n}`"
                );
            }
        }
        for n in ["clone", "clone3", "personality", "socket"] {
            assert!(doc.contains(&format!("`{n}`")));
        }
    }
}
