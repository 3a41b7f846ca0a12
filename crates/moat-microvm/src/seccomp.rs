//! The VMM process's seccomp allow-list, with the reason for each syscall.
//! Every other syscall fails with EPERM.
//!
//! Under the QEMU backend one process filter covers the VMM process (moat's
//! relay loop) and QEMU, which inherits it across `execve`; QEMU then adds
//! its own (`-sandbox on,…`: no obsolete calls, no privilege changes, no
//! spawning, no resource control). The list was taken from `strace -f -c`
//! of QEMU 7.2 booting the cloud kernel under TCG with moat's devices, and
//! of the relay loop. Notably absent: `socket`, `connect`, `bind` (QEMU
//! gets its sockets as descriptors), `open_by_handle_at`, `ptrace`,
//! `mount`, `unshare`, `setns`, `bpf`, `perf_event_open`, `keyctl`,
//! `userfaultfd`, `io_uring_*`, module and kexec calls.
use oci_spec::runtime::{LinuxSeccompAction, LinuxSeccompBuilder, LinuxSyscallBuilder};

/// (syscall, why it is allowed).
pub const VMM: &[(&str, &str)] = &[
    // Memory: guest RAM, TCG's translation cache, the allocator.
    ("mmap", "guest RAM, the TCG code cache, allocations"),
    ("munmap", "freeing mappings"),
    (
        "mprotect",
        "TCG makes translated code executable; guard pages",
    ),
    (
        "madvise",
        "QEMU marks guest RAM (DONTDUMP, hugepages) and gives back the pages the guest's balloon reports free",
    ),
    ("mremap", "allocator growth"),
    ("brk", "allocator"),
    (
        "get_mempolicy",
        "QEMU's host memory backend queries NUMA policy",
    ),
    (
        "set_mempolicy",
        "QEMU's host memory backend sets NUMA policy",
    ),
    ("memfd_create", "QEMU's anonymous guest RAM backing"),
    (
        "ftruncate",
        "sizing the shared guest RAM, a file of the jail's RAM tmpfs (read-write volumes: virtiofsd maps it)",
    ),
    ("membarrier", "QEMU's RCU"),
    // Threads and synchronisation.
    (
        "clone",
        "QEMU's vCPU and I/O threads; the VMM process starts QEMU",
    ),
    ("clone3", "thread creation on newer glibc"),
    ("futex", "locks between threads"),
    ("set_robust_list", "thread start-up (glibc)"),
    ("set_tid_address", "thread start-up (glibc)"),
    ("rseq", "thread start-up (glibc)"),
    ("gettid", "thread identity"),
    ("getpid", "process identity"),
    ("sched_getaffinity", "QEMU sizes its thread pools"),
    ("sched_yield", "spinning vCPU threads"),
    ("exit", "a thread ends"),
    ("exit_group", "the process ends"),
    ("tgkill", "QEMU kicks its vCPU threads"),
    ("kill", "the VMM process stops QEMU"),
    // Events and waiting.
    ("ppoll", "QEMU's main loop"),
    ("poll", "the relay loop"),
    ("eventfd2", "QEMU's event notifiers"),
    ("epoll_create1", "QEMU's AIO event loop"),
    ("epoll_ctl", "QEMU's AIO event loop"),
    ("epoll_wait", "QEMU's AIO event loop"),
    ("epoll_pwait", "QEMU's AIO event loop"),
    (
        "signalfd4",
        "QEMU and the relay loop take signals as descriptors",
    ),
    ("timerfd_create", "QEMU timers"),
    ("timerfd_settime", "QEMU timers"),
    ("clock_nanosleep", "sleeping"),
    ("nanosleep", "sleeping"),
    (
        "restart_syscall",
        "a poll, sleep or futex wait the cgroup freezer (`pause`) or a stop interrupted resumes through it",
    ),
    ("clock_gettime", "time, when the vDSO does not serve it"),
    ("gettimeofday", "time, when the vDSO does not serve it"),
    ("rt_sigaction", "signal handlers"),
    ("rt_sigprocmask", "signal masks"),
    ("rt_sigreturn", "returning from a signal handler"),
    ("sigaltstack", "signal stacks (Rust, QEMU coroutines)"),
    ("wait4", "the VMM process reaps QEMU"),
    ("waitid", "the VMM process reaps QEMU"),
    // Descriptors: the disks, the agent channel, the console, pipes.
    ("read", "descriptors"),
    ("write", "descriptors"),
    ("readv", "descriptors"),
    ("writev", "descriptors"),
    ("pread64", "disk reads"),
    ("pwrite64", "disk writes (refused by read-only images)"),
    ("preadv", "disk reads"),
    ("pwritev", "disk writes"),
    (
        "fallocate",
        "the writable layer's discards, holes punched in its file (`discard=unmap`); pages the guest's balloon reports free, punched out of a shared RAM file",
    ),
    ("lseek", "disk size"),
    ("fsync", "disk flush"),
    (
        "fadvise64",
        "QEMU drops a disk image's cached pages when it takes the images back after saving or restoring a snapshot",
    ),
    ("fdatasync", "disk flush"),
    ("close", "descriptors"),
    ("dup", "QEMU's fd sets"),
    (
        "dup2",
        "starting QEMU with its descriptors (glibc's posix_spawn)",
    ),
    ("dup3", "starting QEMU with its descriptors"),
    ("fcntl", "descriptor flags"),
    ("pipe2", "QEMU's internal notifiers; starting QEMU"),
    ("ioctl", "ttys, disk geometry, KVM"),
    (
        "recvmsg",
        "the agent channel and control clients' descriptors",
    ),
    ("sendmsg", "the agent channel and control replies"),
    (
        "socketpair",
        "vhost-user's back-end request channel (read-write volumes' virtiofsd)",
    ),
    ("recvfrom", "the agent channel"),
    ("sendto", "the agent channel and control replies"),
    (
        "accept4",
        "control clients (start, kill, exec); connections to a pod's localhost (port forwards)",
    ),
    ("getsockopt", "QEMU inspects the agent socket"),
    ("setsockopt", "QEMU sets options on the agent socket"),
    (
        "getsockname",
        "QEMU inspects the agent socket; the relay reads where a port forward's connection was made to",
    ),
    ("getpeername", "QEMU inspects the agent socket"),
    (
        "shutdown",
        "closing the agent channel; a port forward's end of file",
    ),
    // Files in the jail (kernel, initramfs, firmware, libraries).
    ("openat", "QEMU's kernel, initramfs, firmware and libraries"),
    ("newfstatat", "file sizes"),
    ("fstat", "file sizes"),
    ("statx", "file sizes"),
    ("statfs", "QEMU checks file systems"),
    ("fstatfs", "QEMU checks file systems"),
    ("access", "the dynamic loader"),
    ("faccessat", "the dynamic loader"),
    ("faccessat2", "the dynamic loader"),
    ("readlink", "QEMU looks for its data directory"),
    ("readlinkat", "QEMU looks for its data directory"),
    ("getdents64", "QEMU lists its module directory"),
    ("getcwd", "QEMU's paths"),
    ("fchdir", "QEMU's paths"),
    // Process start-up.
    (
        "execve",
        "the VMM process starts QEMU (QEMU's own filter then forbids it)",
    ),
    ("arch_prctl", "thread-local storage"),
    ("prctl", "thread names, QEMU's own seccomp set-up"),
    ("seccomp", "QEMU adds its own, stricter filter"),
    ("prlimit64", "QEMU reads its limits"),
    ("getrlimit", "QEMU reads its limits"),
    ("getrandom", "randomness (QEMU's rng-builtin device)"),
    ("sysinfo", "QEMU checks the host's memory"),
    ("uname", "library start-up"),
    ("getuid", "identity"),
    ("geteuid", "identity"),
    ("getgid", "identity"),
    ("getegid", "identity"),
];

/// The calls of [`VMM`] that only QEMU makes (its loader, its event
/// loops, its memory backend, its checks of files and sockets): the VMM
/// process of moat's own VMM goes without them ([`builtin_process_profile`]).
pub const QEMU_ONLY: &[&str] = &[
    "execve",
    "memfd_create",
    "ftruncate",
    "socketpair",
    "get_mempolicy",
    "set_mempolicy",
    "membarrier",
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "timerfd_create",
    "timerfd_settime",
    "statfs",
    "fstatfs",
    "access",
    "faccessat",
    "faccessat2",
    "readlink",
    "readlinkat",
    "getdents64",
    "getcwd",
    "fchdir",
    "sysinfo",
    "fadvise64",
    "preadv",
    "pwritev",
    "fallocate",
    "getsockopt",
    "setsockopt",
    "getpeername",
    "dup",
    "prlimit64",
    "getrlimit",
    "uname",
];

/// The VMM process's filter under moat's own VMM, from its jail on: the
/// relay's calls ([`VMM`] without [`QEMU_ONLY`]: it forks the VMM's child
/// but executes nothing) and every call of the VMM's own lists, which the
/// child then narrows to [`builtin_setup_profile`] before it builds the VM.
pub fn builtin_process_profile() -> Result<oci_spec::runtime::LinuxSeccomp, oci_spec::OciSpecError>
{
    let mut names: Vec<&str> = VMM
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| !QEMU_ONLY.contains(n))
        .chain(BUILTIN_ALL.iter().flat_map(|l| l.iter().map(|(n, _)| *n)))
        .collect();
    names.sort_unstable();
    names.dedup();
    allow_list(&names)
}

/// moat's own VMM, per thread role ([`moat_vmm::ThreadRole`]): what each
/// thread of a running VM may call once it has entered its role (its
/// start-up, before that, is the thread runtime's). Taken from `strace -f`
/// of the payload tests (`moat-vmm/tests/kvm_payloads.rs`), which then run
/// under these filters. Every role: allocation and a thread's end.
pub const BUILTIN_COMMON: &[(&str, &str)] = &[
    ("mmap", "the allocator's large blocks and per-thread arenas"),
    ("munmap", "freeing them; a thread's signal stack at its end"),
    ("mremap", "the allocator growing a block"),
    ("mprotect", "the allocator growing a per-thread arena"),
    (
        "madvise",
        "the allocator returning memory; a thread's stack at its end; on a vCPU, the pages the guest's balloon reports free, given back",
    ),
    ("brk", "the allocator"),
    ("futex", "the locks around devices and the VM's exit state"),
    ("sigaltstack", "a thread's signal stack, removed at its end"),
    ("rt_sigprocmask", "a thread's end"),
    ("exit", "a thread ends"),
    (
        "close",
        "the last reference to a device's file or socket may drop here",
    ),
    (
        "restart_syscall",
        "a call interrupted by the vCPU kick signal, the cgroup freezer (`pause`) or a stop",
    ),
];

/// A vCPU thread: `KVM_RUN` and the devices' work on a queue notification.
pub const BUILTIN_VCPU: &[(&str, &str)] = &[
    (
        "ioctl",
        "KVM_RUN, reading its own vCPU's state for a snapshot, and TUNSETOFFLOAD when the guest's driver starts or resets its network card on a TAP (the filter checks the requests)",
    ),
    ("read", "virtio-blk reads from its image"),
    (
        "write",
        "virtio-blk writes; COM1's output file; interrupt eventfds",
    ),
    ("lseek", "virtio-blk positions in its image"),
    ("fdatasync", "virtio-blk's flush"),
    (
        "fallocate",
        "virtio-blk's discard: a hole punched in the writable layer's file",
    ),
    (
        "sendto",
        "the console's and the network card's transmits to their sockets",
    ),
    ("getrandom", "virtio-rng"),
    ("rt_sigreturn", "the kick signal's handler returns"),
    (
        "sendmsg",
        "vhost-user requests to a read-write volume's virtiofsd when the driver starts or resets its device (the memory table's and eventfds' descriptors ride along)",
    ),
    ("recvmsg", "virtiofsd's replies to those requests"),
];

/// An I/O thread (the agent console's, the network card's): read its
/// socket, then interrupt the guest.
pub const BUILTIN_IO: &[(&str, &str)] = &[
    ("recvfrom", "reading the agent or network socket"),
    (
        "read",
        "the same through read(2); the network card's TAP, a frame per read",
    ),
    ("write", "the device's interrupt eventfd"),
    (
        "ppoll",
        "the network card's TAP reader waits for a frame or its stop eventfd",
    ),
];

/// The thread that runs the VM, once the others have started: wait for
/// the end, kick the vCPUs out of `KVM_RUN`, join every thread, stop the
/// I/O, release the VM, report.
pub const BUILTIN_MAIN: &[(&str, &str)] = &[
    ("tgkill", "the kick signal to a vCPU thread"),
    ("getpid", "addressing that signal (pthread_kill)"),
    ("clock_nanosleep", "the pause between kicks"),
    (
        "shutdown",
        "ending the agent and network sockets, which wakes their I/O threads",
    ),
    (
        "write",
        "reporting the VM's end; an interrupt eventfd when a device is released",
    ),
    ("exit_group", "the VMM process ends"),
    (
        "ioctl",
        "reading the interrupt controllers, the PIT and the clock for a snapshot (the filter checks the requests)",
    ),
    ("pwrite64", "writing a snapshot's memory and state"),
    (
        "lseek",
        "a shared guest RAM's data extents for a save (SEEK_DATA, SEEK_HOLE): its holes are not read",
    ),
    ("ftruncate", "emptying the snapshot file before writing it"),
    ("fdatasync", "the snapshot on disk before it is reported saved"),
];

/// The thread that saves a snapshot when the relay asks
/// ([`moat_vmm::ThreadRole::Control`]): read the request, hand the main
/// thread the file, answer.
pub const BUILTIN_CONTROL: &[(&str, &str)] = &[
    ("recvfrom", "the relay's request"),
    ("read", "the same through read(2)"),
    ("sendto", "the answer"),
    ("write", "the same through write(2)"),
    (
        "fcntl",
        "the snapshot file duplicated for the main thread (F_DUPFD_CLOEXEC)",
    ),
];

/// The VMM process from its jail on (every thread inherits it; each role's
/// filter narrows it further): what building the VM and starting its
/// threads take, besides every role's calls. `ioctl` only for KVM's
/// requests (type `KVMIO`), `clone` only for threads, `clone3` answers
/// ENOSYS (glibc then uses `clone`, whose flags a filter can read), `prctl`
/// only to name a thread or set no_new_privs.
pub const BUILTIN_SETUP: &[(&str, &str)] = &[
    (
        "openat",
        "/dev/kvm, the kernel, the initramfs and the disks: all the jail's root holds",
    ),
    ("read", "loading the kernel and the initramfs"),
    ("pread64", "the kernel's headers"),
    ("lseek", "the kernel loader; file sizes"),
    ("fstat", "file sizes"),
    ("newfstatat", "file sizes"),
    ("statx", "file sizes"),
    (
        "fcntl",
        "a socket duplicated for its I/O thread (F_DUPFD_CLOEXEC)",
    ),
    (
        "eventfd2",
        "the devices' interrupt lines; a virtio-fs device's queue kicks",
    ),
    (
        "memfd_create",
        "guest RAM as a memfd when read-write volumes' virtiofsd must map it",
    ),
    ("ftruncate", "sizing that memfd"),
    (
        "sendmsg",
        "vhost-user requests opening a read-write volume's virtiofsd session",
    ),
    ("recvmsg", "virtiofsd's replies to those requests"),
    (
        "ioctl",
        "KVM's requests (the filter checks the type), and a TAP's header length and offloads (the requests checked)",
    ),
    ("rt_sigaction", "the vCPU kick signal's handler"),
    (
        "clone",
        "the VM's threads, and nothing else (CLONE_THREAD checked)",
    ),
    ("set_robust_list", "thread start-up (glibc)"),
    ("rseq", "thread start-up (glibc)"),
    (
        "prctl",
        "naming a thread; no_new_privs (the options checked)",
    ),
    (
        "seccomp",
        "each thread loads its role's filter, which can only narrow this one",
    ),
    ("getrandom", "the standard library's hash seeds"),
    ("gettid", "thread identity"),
];

/// Every list of moat's own VMM: its set-up's and each role's.
const BUILTIN_ALL: [&[(&str, &str)]; 6] = [
    BUILTIN_SETUP,
    BUILTIN_COMMON,
    BUILTIN_VCPU,
    BUILTIN_IO,
    BUILTIN_MAIN,
    BUILTIN_CONTROL,
];

/// `KVM_RUN`: `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;
/// The type byte of KVM's ioctl requests (`KVMIO`), in place.
const KVMIO_TYPE: u64 = 0xae00;
const IOCTL_TYPE_MASK: u64 = 0xff00;
const CLONE_THREAD: u64 = libc::CLONE_THREAD as u64;
const PR_SET_NAME: u64 = libc::PR_SET_NAME as u64;
const PR_SET_NO_NEW_PRIVS: u64 = libc::PR_SET_NO_NEW_PRIVS as u64;
/// A TAP's offloads, set to what the guest's driver accepted (on the vCPU
/// thread that starts or resets the network card; at set-up, cleared, and
/// on a restore, the saved driver's).
const TUNSETOFFLOAD: u64 = libc::TUNSETOFFLOAD;
/// A TAP's virtio-net header length, at set-up.
const TUNSETVNETHDRSZ: u64 = libc::TUNSETVNETHDRSZ;

/// The `ioctl` requests of `role`: a vCPU's `KVM_RUN`, the reads of its
/// state for a snapshot, and a TAP's offloads (the network card's driver
/// starts and resets it through MMIO writes, which the vCPU's thread
/// handles); the main thread's reads of the VM's in-kernel devices for a
/// snapshot.
fn builtin_ioctls(role: moat_vmm::ThreadRole) -> Vec<u64> {
    use moat_vmm::snapshot::requests;
    use moat_vmm::ThreadRole;
    match role {
        ThreadRole::Vcpu => [KVM_RUN, TUNSETOFFLOAD]
            .into_iter()
            .chain(requests::vcpu())
            .collect(),
        ThreadRole::Main => requests::vm().to_vec(),
        ThreadRole::AgentIo | ThreadRole::NetIo | ThreadRole::Control => Vec::new(),
    }
}

/// The filter of `role` for moat's own VMM: its list and the common one,
/// `ioctl` only for the role's requests ([`builtin_ioctls`]), EPERM for
/// everything else.
fn builtin_profile(
    role: moat_vmm::ThreadRole,
) -> Result<oci_spec::runtime::LinuxSeccomp, oci_spec::OciSpecError> {
    use moat_vmm::ThreadRole;
    let own = match role {
        ThreadRole::Vcpu => BUILTIN_VCPU,
        ThreadRole::AgentIo | ThreadRole::NetIo => BUILTIN_IO,
        ThreadRole::Main => BUILTIN_MAIN,
        ThreadRole::Control => BUILTIN_CONTROL,
    };
    let plain: Vec<String> = own
        .iter()
        .chain(BUILTIN_COMMON)
        .map(|(n, _)| *n)
        .filter(|n| *n != "ioctl")
        .map(str::to_owned)
        .collect();
    let mut rules = vec![allow(plain)?];
    if own.iter().any(|(n, _)| *n == "ioctl") {
        for request in builtin_ioctls(role) {
            rules.push(allow_if(
                "ioctl",
                1,
                oci_spec::runtime::LinuxSeccompOperator::ScmpCmpEq,
                (request, None),
            )?);
        }
    }
    eperm_profile(rules)
}

/// The hook that confines each thread of moat's own VMM to its role's
/// filter ([`moat_vmm::VmConfig::thread_hook`]): a thread whose filter
/// cannot be loaded stops the VM.
pub fn builtin_thread_hook() -> moat_vmm::ThreadHook {
    moat_vmm::ThreadHook(std::sync::Arc::new(|role| {
        // Per thread, as the filter: loading needs no CAP_SYS_ADMIN then.
        rustix::thread::set_no_new_privs(true).map_err(|e| format!("no_new_privs: {e}"))?;
        let profile = builtin_profile(role).map_err(|e| e.to_string())?;
        load(&profile).map_err(|e| moat_core::error_chain(&e))
    }))
}

/// The names of `list`.
pub fn names(list: &[(&'static str, &str)]) -> Vec<&'static str> {
    list.iter().map(|(n, _)| *n).collect()
}

fn allow(names: Vec<String>) -> Result<oci_spec::runtime::LinuxSyscall, oci_spec::OciSpecError> {
    LinuxSyscallBuilder::default()
        .names(names)
        .action(LinuxSeccompAction::ScmpActAllow)
        .build()
}

/// `name` allowed when argument `index` compares to `value` by `op`
/// (under `mask` for a masked comparison).
fn allow_if(
    name: &str,
    index: usize,
    op: oci_spec::runtime::LinuxSeccompOperator,
    (value, mask): (u64, Option<u64>),
) -> Result<oci_spec::runtime::LinuxSyscall, oci_spec::OciSpecError> {
    let mut arg = oci_spec::runtime::LinuxSeccompArgBuilder::default();
    arg = arg.index(index).op(op);
    // A masked comparison takes the mask as `value` and the expected bits as `valueTwo`.
    arg = match mask {
        Some(mask) => arg.value(mask).value_two(value),
        None => arg.value(value),
    };
    LinuxSyscallBuilder::default()
        .names(vec![name.to_owned()])
        .action(LinuxSeccompAction::ScmpActAllow)
        .args(vec![arg.build()?])
        .build()
}

/// A profile of `rules`, EPERM for every other call.
fn eperm_profile(
    rules: Vec<oci_spec::runtime::LinuxSyscall>,
) -> Result<oci_spec::runtime::LinuxSeccomp, oci_spec::OciSpecError> {
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(libc::EPERM as u32)
        .syscalls(rules)
        .build()
}

/// An allow-list by name, EPERM for everything else: QEMU's
/// ([`VMM`], then QEMU adds its own).
pub fn allow_list(
    syscalls: &[&str],
) -> Result<oci_spec::runtime::LinuxSeccomp, oci_spec::OciSpecError> {
    eperm_profile(vec![allow(
        syscalls.iter().map(|s| (*s).to_owned()).collect(),
    )?])
}

/// The filter of moat's own VMM process from its jail on:
/// [`BUILTIN_SETUP`] and every role's calls, with the argument checks
/// [`BUILTIN_SETUP`] names.
pub fn builtin_setup_profile() -> Result<oci_spec::runtime::LinuxSeccomp, oci_spec::OciSpecError> {
    use oci_spec::runtime::LinuxSeccompOperator::{ScmpCmpEq, ScmpCmpMaskedEq};
    let checked = ["ioctl", "clone", "prctl"];
    let mut plain: Vec<String> = BUILTIN_ALL
        .iter()
        .flat_map(|l| l.iter().map(|(n, _)| *n))
        .filter(|n| !checked.contains(n))
        .map(str::to_owned)
        .collect();
    plain.sort();
    plain.dedup();
    let rules = vec![
        allow(plain)?,
        allow_if(
            "ioctl",
            1,
            ScmpCmpMaskedEq,
            (KVMIO_TYPE, Some(IOCTL_TYPE_MASK)),
        )?,
        allow_if("ioctl", 1, ScmpCmpEq, (TUNSETVNETHDRSZ, None))?,
        allow_if("ioctl", 1, ScmpCmpEq, (TUNSETOFFLOAD, None))?,
        allow_if(
            "clone",
            0,
            ScmpCmpMaskedEq,
            (CLONE_THREAD, Some(CLONE_THREAD)),
        )?,
        allow_if("prctl", 0, ScmpCmpEq, (PR_SET_NAME, None))?,
        allow_if("prctl", 0, ScmpCmpEq, (PR_SET_NO_NEW_PRIVS, None))?,
        LinuxSyscallBuilder::default()
            .names(vec!["clone3".to_owned()])
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(libc::ENOSYS as u32)
            .build()?,
    ];
    eperm_profile(rules)
}

/// Loads `profile` on the calling thread; threads and processes started
/// afterwards inherit it.
pub fn load(profile: &oci_spec::runtime::LinuxSeccomp) -> Result<(), crate::jail::JailError> {
    moat_jail::seccomp::compile(profile)?.load()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each call of `list` is there once, with a reason, and none of `bad` is.
    fn reasoned_without(list: &[(&str, &str)], bad: &[&str]) {
        let mut seen = std::collections::BTreeSet::new();
        for (name, why) in list {
            assert!(!why.is_empty(), "{name}");
            assert!(seen.insert(*name), "{name} listed twice");
        }
        for b in bad {
            assert!(!seen.contains(b), "{b} must not be allowed");
        }
    }

    #[test]
    fn every_allowed_syscall_has_a_reason_and_dangerous_ones_are_absent() {
        reasoned_without(
            VMM,
            &[
                "socket",
                "connect",
                "bind",
                "ptrace",
                "mount",
                "umount2",
                "unshare",
                "setns",
                "bpf",
                "perf_event_open",
                "keyctl",
                "userfaultfd",
                "io_uring_setup",
                "init_module",
                "finit_module",
                "kexec_load",
                "open_by_handle_at",
                "setuid",
                "setresuid",
                "capset",
                "chroot",
                "pivot_root",
                "process_vm_writev",
            ],
        );
    }

    #[test]
    fn the_builtin_backends_process_filter_drops_qemus_calls() {
        let all = names(VMM);
        for n in QEMU_ONLY {
            assert!(all.contains(n), "{n} is not in the QEMU list (a typo?)");
        }
        let profile = builtin_process_profile().unwrap();
        let allowed: Vec<String> = profile
            .syscalls()
            .iter()
            .flatten()
            .flat_map(|r| r.names().clone())
            .collect();
        for n in ["execve", "socketpair", "epoll_wait"] {
            assert!(!allowed.iter().any(|a| a == n), "{n} allowed");
        }
        // The fork of the VM's child, its reaping and killing, the child's
        // own narrowing and every role's calls.
        for n in [
            "clone",
            "wait4",
            "kill",
            "seccomp",
            "restart_syscall",
            "accept4",
        ] {
            assert!(allowed.iter().any(|a| a == n), "{n} missing");
        }
    }

    #[test]
    fn the_builtin_vmms_roles_have_reasons_compile_and_stay_small() {
        use moat_vmm::ThreadRole;
        for list in [
            BUILTIN_COMMON,
            BUILTIN_VCPU,
            BUILTIN_IO,
            BUILTIN_MAIN,
            BUILTIN_CONTROL,
        ] {
            for (name, why) in list {
                assert!(!why.is_empty(), "{name}");
                for bad in [
                    "openat", "socket", "clone", "clone3", "execve", "mount", "ptrace",
                ] {
                    assert_ne!(*name, bad, "{bad} must not be allowed");
                }
            }
        }
        for role in [
            ThreadRole::Vcpu,
            ThreadRole::AgentIo,
            ThreadRole::NetIo,
            ThreadRole::Main,
            ThreadRole::Control,
        ] {
            let f = moat_jail::seccomp::compile(&builtin_profile(role).unwrap()).unwrap();
            assert!(
                f.skipped_syscalls().is_empty(),
                "{role:?}: {:?}",
                f.skipped_syscalls()
            );
        }
    }

    #[test]
    fn the_filter_compiles() {
        let f = moat_jail::seccomp::compile(&allow_list(&names(VMM)).unwrap()).unwrap();
        assert!(
            f.skipped_syscalls().is_empty(),
            "{:?}",
            f.skipped_syscalls()
        );
    }

    #[test]
    fn the_builtin_vmms_process_filter_has_reasons_checks_and_compiles() {
        reasoned_without(
            BUILTIN_SETUP,
            &[
                "socket",
                "connect",
                "execve",
                "execveat",
                "mount",
                "ptrace",
                "unshare",
                "setns",
                "bpf",
                "io_uring_setup",
                "userfaultfd",
                "setresuid",
                "capset",
                "kill",
                "clone3",
            ],
        );
        let profile = builtin_setup_profile().unwrap();
        let rules = profile.syscalls().as_ref().unwrap();
        // ioctl, clone and prctl only with their checks; clone3 refused.
        for name in ["ioctl", "clone", "prctl"] {
            for r in rules.iter().filter(|r| r.names().iter().any(|n| n == name)) {
                assert!(
                    r.args().as_ref().is_some_and(|a| !a.is_empty()),
                    "{name} unchecked"
                );
            }
        }
        let f = moat_jail::seccomp::compile(&profile).unwrap();
        assert!(
            f.skipped_syscalls().is_empty(),
            "{:?}",
            f.skipped_syscalls()
        );
    }
}
