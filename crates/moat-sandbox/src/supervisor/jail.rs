//! The supervisor confines itself once it holds what it needs (the
//! container's root, host /proc, the notify fd), with moat-jail's
//! primitives, in this order:
//! 1. enter the container's user namespace and become its root there: the
//!    supervisor's host UID is the container's (unprivileged) root, and its
//!    capabilities hold only over the container;
//! 2. no supplementary groups;
//! 3. capabilities: [`BASE_CAPS`] effective, plus in the permitted and
//!    bounding sets whatever the workload's bounding set holds (to act
//!    with the workload's own capabilities, never more);
//! 4. rlimits: no core dumps, no new processes, bounded descriptors and
//!    address space;
//! 5. no_new_privs;
//! 6. chroot into the container's root, its working directory host /proc
//!    (the only host directory it uses, through relative paths). Not
//!    Landlock: a process in a Landlock domain may not read the memory of a
//!    process outside it (Landlock scopes ptrace access to its own domain),
//!    and the workload's domain is not the supervisor's;
//! 7. its own seccomp filter, every allowed syscall with its reason
//!    ([`SUPERVISOR_SYSCALLS`]); anything else kills it.
use std::os::fd::BorrowedFd;

use rustix::process::Resource;
use rustix::thread::{CapabilitySet, CapabilitySets};

use super::broker::BASE_CAPS;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot {step}")]
    Step {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("seccomp")]
    Seccomp(#[from] moat_jail::seccomp::SeccompError),
}

fn step(step: &'static str) -> impl FnOnce(rustix::io::Errno) -> JailError {
    move |e| JailError::Step {
        step,
        source: e.into(),
    }
}

/// Every syscall the supervisor makes, and why.
pub const SUPERVISOR_SYSCALLS: &[(&str, &str)] = &[
    (
        "ioctl",
        "seccomp notification: receive, answer, check, add a descriptor",
    ),
    (
        "poll",
        "wait for notifications, new listeners and the container's end",
    ),
    ("ppoll", "as poll"),
    (
        "accept4",
        "take the notify fd of a process `moat exec` adds",
    ),
    (
        "recvmsg",
        "receive that fd; the container's cgroup files from the runtime",
    ),
    ("recvfrom", "read the rest of the listener's message"),
    ("read", "read /proc/TID/status, the listener's message"),
    (
        "pread64",
        "the container process's memory before its exec (/proc/PID/mem)",
    ),
    ("setsockopt", "a read timeout on a listener connection"),
    (
        "write",
        "log denials to stderr; join the container's cgroup (\"0\" to a cgroup \
         file the runtime opened)",
    ),
    ("writev", "log denials to stderr"),
    ("close", "close what the broker opened"),
    (
        "openat",
        "open /proc/TID/status; create names in the container root",
    ),
    ("openat2", "the in-root opener (RESOLVE_IN_ROOT)"),
    (
        "readlinkat",
        "container paths of descriptors and of the caller's cwd; readlink",
    ),
    ("newfstatat", "stat family, file types"),
    ("fstat", "file types"),
    ("statx", "statx"),
    ("fstatfs", "statfs"),
    (
        "faccessat2",
        "access family, checked with the caller's identity",
    ),
    ("mkdirat", "mkdir"),
    ("mknodat", "mknod"),
    ("unlinkat", "unlink, rmdir"),
    ("renameat2", "rename"),
    ("linkat", "link"),
    ("symlinkat", "symlink"),
    ("fchmodat", "chmod"),
    ("fchownat", "chown"),
    ("utimensat", "utimes family"),
    ("ftruncate", "truncate, O_TRUNC after the check"),
    ("fcntl", "clear the non-blocking flag of a brokered open"),
    ("getxattr", "xattr family"),
    ("setxattr", "xattr family"),
    ("listxattr", "xattr family"),
    ("removexattr", "xattr family"),
    ("inotify_add_watch", "inotify on the caller's instance"),
    ("process_vm_readv", "read path and struct arguments"),
    ("process_vm_writev", "write stat buffers and link text"),
    ("pidfd_open", "reach the caller's descriptors"),
    (
        "pidfd_getfd",
        "fstat and /proc/self/fd/N through the caller's descriptor",
    ),
    ("setfsuid", "act with the caller's fs UID"),
    ("setfsgid", "act with the caller's fs GID"),
    ("setgroups", "act with the caller's groups"),
    ("capset", "act with the caller's capabilities, and back"),
    ("capget", "read own capabilities"),
    ("umask", "create with the caller's umask"),
    (
        "memfd_create",
        "virtual views: the content of a virtual /proc or /sys file",
    ),
    ("lseek", "virtual views"),
    (
        "connect",
        "carry out the workload's connect with the address it decided",
    ),
    (
        "bind",
        "carry out the workload's bind with the address it decided",
    ),
    (
        "sendmsg",
        "carry out the workload's sendto/sendmsg/sendmmsg with the address, \
         data and descriptors it copied; answer the runtime's cgroup join",
    ),
    (
        "getsockopt",
        "a socket's family and type (to decide its address), SO_ERROR of a \
         deferred connect",
    ),
    (
        "setresuid",
        "act with the caller's real and effective UIDs for a socket call (peer \
         credentials), keeping the saved UID to come back",
    ),
    ("setresgid", "as setresuid, for GIDs"),
    (
        "fchdir",
        "bind a relative unix socket name from the caller's working directory, \
         then back to host /proc",
    ),
    (
        "getdents64",
        "read the caller's directory for getdents, leaving hidden names out",
    ),
    (
        "sched_getaffinity",
        "the caller's CPU mask, cut to its CPU limit; the caller's and its own \
         mask before narrowing them for a hand-over (colocate)",
    ),
    (
        "sched_setaffinity",
        "narrow the caller thread and itself to one CPU while it hands the \
         caller a descriptor, and restore both (colocate)",
    ),
    ("getcpu", "the CPU it runs on, for the hand-over (colocate)"),
    (
        "pidfd_send_signal",
        "SIGPIPE to a caller whose brokered send found the peer gone, as the \
         kernel would send it",
    ),
    ("brk", "memory"),
    ("mmap", "memory"),
    ("munmap", "memory"),
    ("mremap", "memory"),
    ("madvise", "memory (the allocator)"),
    ("futex", "the allocator and stdio locks"),
    ("rt_sigreturn", "signal return"),
    ("rt_sigprocmask", "signal masks"),
    ("rt_sigaction", "signal handlers"),
    ("sigaltstack", "Rust's stack-overflow handler"),
    ("getpid", "logs"),
    ("gettid", "logs"),
    ("clock_gettime", "rate limit of logs"),
    ("getrandom", "hash maps"),
    ("sched_yield", "lock back-off"),
    ("exit", "end"),
    ("exit_group", "end"),
];

/// Steps 1-6 (the filter comes last, from [`load_filter`]).
pub fn confine(
    userns: Option<BorrowedFd<'_>>,
    root: BorrowedFd<'_>,
    proc: BorrowedFd<'_>,
    workload_bounding: u64,
) -> Result<CapabilitySet, JailError> {
    if let Some(ns) = userns {
        rustix::thread::move_into_link_name_space(
            ns,
            Some(rustix::thread::LinkNameSpaceType::User),
        )
        .map_err(step("enter the container's user namespace"))?;
        rustix::thread::set_thread_groups(&[]).map_err(step("drop supplementary groups"))?;
        let root_gid = rustix::process::Gid::from_raw(0);
        let root_uid = rustix::process::Uid::from_raw(0);
        rustix::thread::set_thread_res_gid(root_gid, root_gid, root_gid)
            .map_err(step("become the container's root group"))?;
        rustix::thread::set_thread_res_uid(root_uid, root_uid, root_uid)
            .map_err(step("become the container's root user"))?;
    }
    rustix::process::fchdir(root).map_err(step("enter the container's root"))?;
    rustix::process::chroot(".").map_err(step("chroot into the container's root"))?;
    rustix::process::fchdir(proc).map_err(step("work in host /proc"))?;
    let keep = BASE_CAPS | CapabilitySet::from_bits_retain(workload_bounding);
    for c in ::caps::all() {
        if keep.contains(CapabilitySet::from_bits_retain(1u64 << c.index())) {
            continue;
        }
        ::caps::drop(None, ::caps::CapSet::Bounding, c).map_err(|e| JailError::Step {
            step: "drop the bounding set",
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    for c in ::caps::all() {
        if !keep.contains(CapabilitySet::from_bits_retain(1u64 << c.index())) {
            ::caps::drop(None, ::caps::CapSet::Ambient, c).map_err(|e| JailError::Step {
                step: "clear the ambient set",
                source: std::io::Error::other(e.to_string()),
            })?;
        }
    }
    let held = rustix::thread::capabilities(None).map_err(step("read capabilities"))?;
    let permitted = held.permitted & keep;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: BASE_CAPS & permitted,
            permitted,
            inheritable: CapabilitySet::empty(),
        },
    )
    .map_err(step("set capabilities"))?;
    let limit = |r, v| {
        rustix::process::setrlimit(
            r,
            rustix::process::Rlimit {
                current: Some(v),
                maximum: Some(v),
            },
        )
    };
    limit(Resource::Core, 0).map_err(step("limit core dumps"))?;
    limit(Resource::Nproc, 0).map_err(step("forbid new processes"))?;
    limit(Resource::Nofile, 1024).map_err(step("limit descriptors"))?;
    limit(Resource::As, 1 << 30).map_err(step("limit the address space"))?;
    rustix::thread::set_no_new_privs(true).map_err(step("set no_new_privs"))?;
    Ok(permitted)
}

/// Step 7: the supervisor's own filter. Anything else ends it: the filter
/// traps, and the handler names the syscall on stderr before it exits.
pub fn load_filter() -> Result<(), JailError> {
    moat_sys::seccomp::exit_on_trap(
        b"moat: sandbox supervisor: ended by its own seccomp filter on syscall ",
    )
    .map_err(|source| JailError::Step {
        step: "catch SIGSYS",
        source,
    })?;
    let names: Vec<&str> = SUPERVISOR_SYSCALLS.iter().map(|(n, _)| *n).collect();
    let doc = serde_json::json!({
        "defaultAction": "SCMP_ACT_TRAP",
        "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"}],
    });
    let spec: oci_spec::runtime::LinuxSeccomp =
        serde_json::from_value(doc).map_err(|e| JailError::Step {
            step: "build the supervisor's seccomp filter",
            source: std::io::Error::other(e),
        })?;
    let filter = moat_jail::seccomp::compile(&spec)?;
    filter.load()?;
    Ok(())
}
